//! The kernels' inner loops over one contiguous run of values: reductions in f64 whatever the
//! storage type, into `LANES` independent accumulators combined in a fixed order (the same result
//! for every vector width, so scalar and vector code agree bit for bit); elementwise passes in the
//! storage type, with the mean split into a high and a low part so that x − μ loses nothing when
//! the mean is large; outputs written without a zeroing pass.
//!
//! Each loop is written once generically, for the compiler to vectorize, and compiled twice,
//! plainly and for AVX2 + FMA, picking the second where the CPU has them (Rust never contracts
//! a·b + c into an FMA on its own, so the numbers do not change, only the speed). The f32 loops
//! the kernels spend their time in also have a hand-written AVX2 version (the `avx2` module),
//! with the generic code's operations lane for lane; tests hold them to the plain build bit for
//! bit.

use candle_core::WithDType;
use std::mem::MaybeUninit;

/// The kernels' storage types, with conversions that always inline (candle's `WithDType`
/// conversions are not marked `#[inline]`, which keeps the loops from vectorizing).
pub trait Float:
    WithDType
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
{
    fn widen(self) -> f64;
    fn narrow(v: f64) -> Self;

    /// `x` itself where `Self` is f32 (for the kernels written for f32 alone).
    fn as_f32s(x: &[Self]) -> Option<&[f32]>;

    /// `x` itself where `Self` is f32, for writing.
    fn as_f32s_mut(x: &mut [MaybeUninit<Self>]) -> Option<&mut [MaybeUninit<f32>]>;

    /// `v` as hi + lo, each rounded to `Self`: (x − hi) − lo is x − v to within rounding of the
    /// result even when v is large against x − v.
    #[inline(always)]
    fn split(v: f64) -> (Self, Self) {
        let hi = Self::narrow(v);
        (hi, Self::narrow(v - hi.widen()))
    }
}

impl Float for f32 {
    #[inline(always)]
    fn widen(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn narrow(v: f64) -> Self {
        v as f32
    }
    #[inline(always)]
    fn as_f32s(x: &[Self]) -> Option<&[f32]> {
        Some(x)
    }
    #[inline(always)]
    fn as_f32s_mut(x: &mut [MaybeUninit<Self>]) -> Option<&mut [MaybeUninit<f32>]> {
        Some(x)
    }
}

impl Float for f64 {
    #[inline(always)]
    fn widen(self) -> f64 {
        self
    }
    #[inline(always)]
    fn narrow(v: f64) -> Self {
        v
    }
    #[inline(always)]
    fn as_f32s(_: &[Self]) -> Option<&[f32]> {
        None
    }
    #[inline(always)]
    fn as_f32s_mut(_: &mut [MaybeUninit<Self>]) -> Option<&mut [MaybeUninit<f32>]> {
        None
    }
}

/// Whether the CPU runs the AVX2 + FMA versions.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn avx2_fma() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
}

/// Defines a kernel `$name` that runs its AVX2 + FMA build where the CPU has those, and the
/// plain build `$plain` it dispatches to otherwise.
macro_rules! dispatched {
    ($plain:ident; $(#[$doc:meta])* pub fn $name:ident<T: Float>($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        #[inline(always)]
        #[allow(clippy::too_many_arguments)]
        pub fn $plain<T: Float>($($arg: $ty),*) $(-> $ret)? $body

        $(#[$doc])*
        #[inline]
        #[allow(clippy::too_many_arguments)]
        pub fn $name<T: Float>($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn avx2<T: Float>($($arg: $ty),*) $(-> $ret)? {
                    $plain($($arg),*)
                }
                if avx2_fma() {
                    // SAFETY: the CPU has both features.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $plain($($arg),*)
        }
    };
}

/// Independent accumulators per reduction: enough to hide the latency of f64 additions.
pub const LANES: usize = 8;

/// Partial sums in `LANES` lanes.
pub type Acc = [f64; LANES];

/// The lanes added in a fixed pairwise order.
#[inline(always)]
pub fn total(a: &Acc) -> f64 {
    ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
}

/// The last, partial chunk of a run padded with `fill` to a full one, so that it goes through
/// the same (vectorized) code as the others: array indices stay constant and the accumulators
/// stay in registers.
#[inline(always)]
fn padded<T: Float>(rest: &[T], fill: T) -> [T; LANES] {
    let mut c = [fill; LANES];
    c[..rest.len()].copy_from_slice(rest);
    c
}

/// How far ahead of its position a kernel asks for the memory it reads (or writes) next, where
/// its caller says that memory comes next (`read_ahead`): 8 KiB. Through autograd, x, dy and
/// y's buffer are not in cache, and the hardware prefetcher alone left the hand-written loops
/// waiting on memory. For GroupNorm, LayerNorm and InstanceNorm, whose sets follow one another
/// in memory, reading ahead in the reductions took 1.6–3.2 ms (10–19%) off the net
/// forward+backward at (32,64,56,56) and 0.2–0.4 ms at (32,256,14,14) in two A/B runs (2, 8
/// and 16 KiB did about as well, 1 KiB a little less); writing ahead in the forward's output
/// pass took up to 2 ms more off GroupNorm and InstanceNorm there, 0.1–0.2 ms at
/// (32,256,14,14), and 10% off GroupNorm's forward alone; in the backward's input-gradient pass,
/// 0.5–1.1 ms off the backward alone at (32,64,56,56). BatchNorm's sets are short runs C·S
/// apart, so the memory past a run is another set's; it prefetches whole runs instead (see
/// `ops::prefetch`), on large inputs only.
pub const READ_AHEAD_BYTES: usize = 8 << 10;

/// Adds Σ(x − k) to `s1` and Σ(x − k)² to `s2`; `k` must be a value of type `T`. With
/// `read_ahead`, the memory after `x` is read next (see [`READ_AHEAD_BYTES`]).
#[inline]
pub fn shifted_sums<T: Float>(x: &[T], k: f64, s1: &mut Acc, s2: &mut Acc, read_ahead: bool) {
    #[cfg(target_arch = "x86_64")]
    if let (Some(x), true) = (T::as_f32s(x), avx2_fma()) {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe {
            match read_ahead {
                true => avx2::shifted_sums::<true>(x, k, s1, s2),
                false => avx2::shifted_sums::<false>(x, k, s1, s2),
            }
        };
    }
    let _ = read_ahead;
    shifted_sums_generic(x, k, s1, s2)
}

/// Returns (Σdy, Σdy·(x − mean)). With `read_ahead`, the memory after `x` and after `dy` is
/// read next (see [`READ_AHEAD_BYTES`]).
#[inline]
pub fn grad_sums<T: Float>(x: &[T], dy: &[T], mean: f64, read_ahead: bool) -> (f64, f64) {
    #[cfg(target_arch = "x86_64")]
    if let (Some(x), Some(dy), true) = (T::as_f32s(x), T::as_f32s(dy), avx2_fma()) {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe {
            match read_ahead {
                true => avx2::grad_sums::<true>(x, dy, mean),
                false => avx2::grad_sums::<false>(x, dy, mean),
            }
        };
    }
    let _ = read_ahead;
    grad_sums_generic(x, dy, mean)
}

dispatched! {
shifted_sums_plain;
/// `shifted_sums` for any `Float`, left to the compiler to vectorize.
pub fn shifted_sums_generic<T: Float>(x: &[T], k: f64, s1: &mut Acc, s2: &mut Acc) {
    #[inline(always)]
    fn add<T: Float>(a1: &mut Acc, a2: &mut Acc, c: &[T; LANES], k: f64) {
        for i in 0..LANES {
            let d = c[i].widen() - k;
            a1[i] += d;
            a2[i] += d * d;
        }
    }
    let (mut a1, mut a2) = (*s1, *s2);
    let (chunks, rest) = x.as_chunks::<LANES>();
    for c in chunks {
        add(&mut a1, &mut a2, c, k);
    }
    // Padding with k adds exact zeros.
    add(&mut a1, &mut a2, &padded(rest, T::narrow(k)), k);
    (*s1, *s2) = (a1, a2);
}
}

/// `grad_sums` of a run of one value: lane 0 takes dy and dy·(x − mean), the other lanes add
/// exact zeros (dy padded with zeros), and `total` adds them up: the same bits as a call on a
/// one-value slice, without the call.
#[inline(always)]
pub fn grad_sums_one<T: Float>(x: T, dy: T, mean: f64) -> (f64, f64) {
    let d = dy.widen();
    let lane0 = |v: f64| {
        let mut a = [0.0; LANES];
        a[0] += v;
        total(&a)
    };
    (lane0(d), lane0(d * (x.widen() - mean)))
}

dispatched! {
grad_sums_plain;
/// `grad_sums` for any `Float`, left to the compiler to vectorize.
pub fn grad_sums_generic<T: Float>(x: &[T], dy: &[T], mean: f64) -> (f64, f64) {
    #[inline(always)]
    fn add<T: Float>(sd: &mut Acc, sdx: &mut Acc, xs: &[T; LANES], ds: &[T; LANES], mean: f64) {
        for i in 0..LANES {
            let d = ds[i].widen();
            sd[i] += d;
            sdx[i] += d * (xs[i].widen() - mean);
        }
    }
    let (mut sd, mut sdx): (Acc, Acc) = ([0.0; LANES], [0.0; LANES]);
    let ((xc, xr), (dc, dr)) = (x.as_chunks::<LANES>(), dy.as_chunks::<LANES>());
    for (xs, ds) in xc.iter().zip(dc) {
        add(&mut sd, &mut sdx, xs, ds, mean);
    }
    // Padding dy with zeros adds exact zeros (x − mean is finite wherever the result is).
    let (xl, dl) = (padded(xr, T::zero()), padded(dr, T::zero()));
    add(&mut sd, &mut sdx, &xl, &dl, mean);
    (total(&sd), total(&sdx))
}
}

/// The f32 loops for AVX2, in intrinsics: lane for lane the same operations as the generic code
/// (the reductions' lanes 0–3 in one register, 4–7 in another; a multiply and an add, never an
/// FMA), so the same bits. The compiler's own vectorization of `grad_sums` reversed every
/// register's lanes at every step, a shuffle per register on the port the f32 → f64 conversions
/// need too; the elementwise passes are here to read and write ahead.
#[cfg(target_arch = "x86_64")]
mod avx2;

/// dst = (x − mean)·a + b, in `T`. With `read_ahead`, `dst` goes on past its end and the
/// memory there is written next (see [`READ_AHEAD_BYTES`]).
#[inline]
pub fn affine_into<T: Float>(
    x: &[T],
    dst: &mut [MaybeUninit<T>],
    mean: f64,
    a: f64,
    b: f64,
    read_ahead: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if let (Some(xs), true) = (T::as_f32s(x), avx2_fma()) {
        if let Some(ds) = T::as_f32s_mut(dst) {
            let ((hi, lo), a, b) = (f32::split(mean), a as f32, b as f32);
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe {
                match read_ahead {
                    true => avx2::affine_into::<true>(xs, ds, (hi, lo), a, b),
                    false => avx2::affine_into::<false>(xs, ds, (hi, lo), a, b),
                }
            };
        }
    }
    let _ = read_ahead;
    affine_into_generic(x, dst, mean, a, b)
}

dispatched! {
affine_into_plain;
/// `affine_into` for any `Float`, left to the compiler to vectorize.
pub fn affine_into_generic<T: Float>(x: &[T], dst: &mut [MaybeUninit<T>], mean: f64, a: f64, b: f64) {
    let c = affine_consts::<T>(mean, a, b);
    for (d, &v) in dst.iter_mut().zip(x) {
        d.write(affine_of(v, c));
    }
}
}

/// The output of one value: (x − mean)·a + b, with mean = hi + lo, as every `affine_into`
/// computes it (the f32 intrinsics lane for lane).
#[inline(always)]
pub fn affine_of<T: Float>(v: T, ((hi, lo), a, b): ((T, T), T, T)) -> T {
    ((v - hi) - lo) * a + b
}

/// The constants of `affine_of` in `T`.
#[inline(always)]
pub fn affine_consts<T: Float>(mean: f64, a: f64, b: f64) -> ((T, T), T, T) {
    (T::split(mean), T::narrow(a), T::narrow(b))
}

/// The input gradient of one value: p·dy − q·(x − mean) + r, with mean = hi + lo.
#[inline(always)]
pub fn grad_of<T: Float>(xv: T, dv: T, (hi, lo): (T, T), (p, q, r): (T, T, T)) -> T {
    p * dv - q * ((xv - hi) - lo) + r
}

/// The constants of `grad_of` in `T`.
#[inline(always)]
pub fn grad_consts<T: Float>(mean: f64, p: f64, q: f64, r: f64) -> ((T, T), (T, T, T)) {
    (T::split(mean), (T::narrow(p), T::narrow(q), T::narrow(r)))
}

/// dst = p·dy − q·(x − mean) + r, in `T`. With `read_ahead`, x, dy and dst go on past their
/// ends and that memory is read and written next (see [`READ_AHEAD_BYTES`]).
#[inline]
#[allow(clippy::too_many_arguments)]
pub fn grad_into<T: Float>(
    x: &[T],
    dy: &[T],
    dst: &mut [MaybeUninit<T>],
    mean: f64,
    p: f64,
    q: f64,
    r: f64,
    read_ahead: bool,
) {
    assert!(x.len() == dst.len() && dy.len() == dst.len());
    #[cfg(target_arch = "x86_64")]
    if let (Some(xs), Some(ds)) = (T::as_f32s(x), T::as_f32s(dy)) {
        if let Some(out) = T::as_f32s_mut(dst) {
            let out = out.as_mut_ptr().cast::<f32>();
            // SAFETY: the three slices have the same length; dst is borrowed mutably, so it
            // overlaps neither x nor dy.
            if unsafe { grad_f32(xs, ds.as_ptr(), out, (mean, p, q, r), read_ahead) } {
                return;
            }
        }
    }
    let _ = read_ahead;
    grad_into_generic(x, dy, dst, mean, p, q, r)
}

/// dy = p·dy − q·(x − mean) + r, in `T`: `grad_into` writing over its own input.
#[inline]
pub fn grad_in_place<T: Float>(
    x: &[T],
    dy: &mut [T],
    mean: f64,
    p: f64,
    q: f64,
    r: f64,
    read_ahead: bool,
) {
    assert_eq!(x.len(), dy.len());
    #[cfg(target_arch = "x86_64")]
    if let (Some(xs), true) = (T::as_f32s(x), T::as_f32s(dy).is_some()) {
        let out = dy.as_mut_ptr().cast::<f32>();
        // SAFETY: T is f32 and dy has x's length; each value of dy is read before it is
        // written, both through the one pointer from the `&mut` borrow.
        if unsafe { grad_f32(xs, out.cast_const(), out, (mean, p, q, r), read_ahead) } {
            return;
        }
    }
    let _ = read_ahead;
    grad_in_place_generic(x, dy, mean, p, q, r)
}

/// The input gradient on f32 in AVX2, for `grad_into` and `grad_in_place`; false (nothing
/// written) where the CPU lacks AVX2 or FMA.
///
/// # Safety
/// `dy` can be read and `out` written for `x.len()` values; `out` is `dy` or overlaps neither.
#[cfg(target_arch = "x86_64")]
#[inline]
unsafe fn grad_f32(
    x: &[f32],
    dy: *const f32,
    out: *mut f32,
    (mean, p, q, r): (f64, f64, f64, f64),
    read_ahead: bool,
) -> bool {
    if !avx2_fma() {
        return false;
    }
    let c = grad_consts::<f32>(mean, p, q, r);
    // SAFETY: the CPU has AVX2 and FMA; the caller vouches for the pointers.
    unsafe {
        match read_ahead {
            true => avx2::grad::<true>(x.as_ptr(), dy, out, x.len(), c),
            false => avx2::grad::<false>(x.as_ptr(), dy, out, x.len(), c),
        }
    }
    true
}

dispatched! {
grad_into_plain;
/// `grad_into` for any `Float`, left to the compiler to vectorize.
pub fn grad_into_generic<T: Float>(
    x: &[T],
    dy: &[T],
    dst: &mut [MaybeUninit<T>],
    mean: f64,
    p: f64,
    q: f64,
    r: f64,
) {
    let (m, k) = grad_consts::<T>(mean, p, q, r);
    for ((d, &xv), &dv) in dst.iter_mut().zip(x).zip(dy) {
        d.write(grad_of(xv, dv, m, k));
    }
}
}

dispatched! {
grad_in_place_plain;
/// `grad_in_place` for any `Float`, left to the compiler to vectorize.
pub fn grad_in_place_generic<T: Float>(x: &[T], dy: &mut [T], mean: f64, p: f64, q: f64, r: f64) {
    let (m, k) = grad_consts::<T>(mean, p, q, r);
    for (d, &xv) in dy.iter_mut().zip(x) {
        *d = grad_of(xv, *d, m, k);
    }
}
}

dispatched! {
scale_into_plain;
/// dst = p·dy, in `T`.
pub fn scale_into<T: Float>(dy: &[T], dst: &mut [MaybeUninit<T>], p: f64) {
    let p = T::narrow(p);
    for (d, &dv) in dst.iter_mut().zip(dy) {
        d.write(p * dv);
    }
}
}

dispatched! {
scale_in_place_plain;
/// dy = p·dy, in `T`.
pub fn scale_in_place<T: Float>(dy: &mut [T], p: f64) {
    let p = T::narrow(p);
    for d in dy.iter_mut() {
        *d = p * *d;
    }
}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_match_plain_sums() {
        // 8·k + remainder lengths, values with a large offset to exercise the shift.
        for len in [1usize, 7, 8, 9, 23, 64, 101] {
            let x: Vec<f32> = (0..len)
                .map(|i| 1000.0 + ((i * 37 % 11) as f32) * 0.01)
                .collect();
            let dy: Vec<f32> = (0..len).map(|i| ((i * 13 % 7) as f32) - 3.0).collect();
            let k = x[0] as f64;
            let (mut s1, mut s2) = ([0.0; LANES], [0.0; LANES]);
            shifted_sums(&x, k, &mut s1, &mut s2, false);
            let d: Vec<f64> = x.iter().map(|&v| v as f64 - k).collect();
            let want1: f64 = d.iter().sum();
            let want2: f64 = d.iter().map(|v| v * v).sum();
            assert!(
                (total(&s1) - want1).abs() <= 1e-12 * (1.0 + want1.abs()),
                "{len}"
            );
            assert!(
                (total(&s2) - want2).abs() <= 1e-12 * (1.0 + want2.abs()),
                "{len}"
            );
            let mean = 1000.02;
            let (sd, sdx) = grad_sums(&x, &dy, mean, false);
            let want_sd: f64 = dy.iter().map(|&v| v as f64).sum();
            let want_sdx: f64 = x
                .iter()
                .zip(&dy)
                .map(|(&a, &b)| b as f64 * (a as f64 - mean))
                .sum();
            assert!(
                (sd - want_sd).abs() <= 1e-12 * (1.0 + want_sd.abs()),
                "{len}"
            );
            assert!((sdx - want_sdx).abs() <= 1e-9, "{len}: {sdx} vs {want_sdx}");
        }
    }

    #[test]
    fn f32_passes_keep_a_large_mean_exact() {
        // x ≈ 1000 ± 0.01: the mean rounded to f32 is off by up to 3e-5, a third of a percent
        // of the spread; split into hi + lo it is not.
        let x: Vec<f32> = (0..50)
            .map(|i| 1000.0 + ((i * 7) % 13) as f32 * 1.5e-3)
            .collect();
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / 50.0;
        let (a, b) = (97.5, 0.25);
        let mut dst = vec![MaybeUninit::uninit(); 50];
        affine_into(&x, &mut dst, mean, a, b, false);
        for (d, &v) in dst.iter().zip(&x) {
            let want = (v as f64 - mean) * a + b;
            let got = unsafe { d.assume_init() } as f64;
            assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        }
        let dy: Vec<f32> = (0..50).map(|i| ((i * 3) % 5) as f32 - 2.0).collect();
        grad_into(&x, &dy, &mut dst, mean, 2.0, 40.0, 0.5, false);
        for ((d, &v), &g) in dst.iter().zip(&x).zip(&dy) {
            let want = 2.0 * g as f64 - 40.0 * (v as f64 - mean) + 0.5;
            let got = unsafe { d.assume_init() } as f64;
            assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        }
    }

    #[test]
    fn elementwise_passes_write_every_value() {
        let x: Vec<f64> = (0..19).map(|i| i as f64 * 0.5 - 3.0).collect();
        let dy: Vec<f64> = (0..19).map(|i| (i % 5) as f64 - 2.0).collect();
        let mut dst = vec![MaybeUninit::uninit(); 19];
        affine_into(&x, &mut dst, 1.5, 2.0, -1.0, false);
        for (d, v) in dst.iter().zip(&x) {
            assert_eq!(unsafe { d.assume_init() }, (v - 1.5) * 2.0 - 1.0);
        }
        grad_into(&x, &dy, &mut dst, 1.5, 2.0, 0.25, 0.5, false);
        for ((d, v), g) in dst.iter().zip(&x).zip(&dy) {
            assert_eq!(unsafe { d.assume_init() }, 2.0 * g - 0.25 * (v - 1.5) + 0.5);
        }
        scale_into(&dy, &mut dst, 3.0);
        for (d, g) in dst.iter().zip(&dy) {
            assert_eq!(unsafe { d.assume_init() }, 3.0 * g);
        }
        // Writing over dy gives the same values as writing elsewhere.
        let mut over = dy.clone();
        grad_in_place(&x, &mut over, 1.5, 2.0, 0.25, 0.5, false);
        for ((o, v), g) in over.iter().zip(&x).zip(&dy) {
            assert_eq!(*o, 2.0 * g - 0.25 * (v - 1.5) + 0.5);
        }
        let mut over = dy.clone();
        scale_in_place(&mut over, 3.0);
        for (o, g) in over.iter().zip(&dy) {
            assert_eq!(*o, 3.0 * g);
        }
    }

    /// The reductions as the kernels run them on f32 (hand-written AVX2 where the CPU has it)
    /// give the bits of the plain scalar build: every length around the 8-lane chunks, values
    /// whose f64 products and sums round, accumulators that start non-zero (runs after the first).
    #[test]
    fn f32_reductions_give_the_plain_builds_bits() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        for len in 0..70 {
            // Around 1e3, with every fourth value scaled far up or down: differences from k
            // that need most of an f64's bits, so that d² rounds.
            let x: Vec<f32> = (0..len)
                .map(|i| {
                    let v = 1e3 + 3.7 * next();
                    if i % 4 == 3 {
                        v * 2f32.powi((next() * 40.0) as i32)
                    } else {
                        v
                    }
                })
                .collect();
            let dy: Vec<f32> = (0..len).map(|_| next() * 1e-3).collect();
            let k = x.first().copied().unwrap_or(0.0) as f64;
            let start: Acc = std::array::from_fn(|i| 0.1 * i as f64 + 1.0 / 3.0);
            let mean = 1e3 + 0.123456789;
            for ahead in [false, true] {
                let (mut a, mut b) = (start, start);
                let (mut c, mut d) = (start, start);
                shifted_sums(&x, k, &mut a, &mut b, ahead);
                shifted_sums_plain(&x, k, &mut c, &mut d);
                assert_eq!(
                    (a.map(f64::to_bits), b.map(f64::to_bits)),
                    (c.map(f64::to_bits), d.map(f64::to_bits)),
                    "{len}"
                );
                let got = grad_sums(&x, &dy, mean, ahead);
                let want = grad_sums_plain(&x, &dy, mean);
                assert_eq!(
                    (got.0.to_bits(), got.1.to_bits()),
                    (want.0.to_bits(), want.1.to_bits()),
                    "{len}"
                );
            }
        }
    }

    /// The f32 elementwise passes as the kernels run them (hand-written AVX2 where the CPU has
    /// it) write the plain build's bits, for every length around their 16-value steps.
    #[test]
    fn f32_elementwise_passes_give_the_plain_builds_bits() {
        for len in 0..70 {
            let x: Vec<f32> = (0..len)
                .map(|i| 1e3 + ((i * 37 % 23) as f32) * 0.173 - 2.0)
                .collect();
            let (mean, a, b) = (1001.0 + 1.0 / 3.0, 0.7 / 3.0, -0.2);
            for ahead in [false, true] {
                let mut got = vec![MaybeUninit::uninit(); len];
                let mut want = vec![MaybeUninit::uninit(); len];
                affine_into(&x, &mut got, mean, a, b, ahead);
                affine_into_plain(&x, &mut want, mean, a, b);
                let bits = |v: &[MaybeUninit<f32>]| -> Vec<u32> {
                    v.iter()
                        .map(|d| unsafe { d.assume_init() }.to_bits())
                        .collect()
                };
                assert_eq!(bits(&got), bits(&want), "{len}");
                // The input gradient, into a new buffer and over dy.
                let dy: Vec<f32> = (0..len)
                    .map(|i| ((i * 13 % 7) as f32) * 0.31 - 1.0)
                    .collect();
                let (p, q, r) = (1.0 / 3.0, 0.9 / 7.0, 1.0 / 9.0);
                grad_into(&x, &dy, &mut got, mean, p, q, r, ahead);
                grad_into_plain(&x, &dy, &mut want, mean, p, q, r);
                assert_eq!(bits(&got), bits(&want), "{len}");
                let mut over = dy.clone();
                grad_in_place(&x, &mut over, mean, p, q, r, ahead);
                let over: Vec<u32> = over.iter().map(|v| v.to_bits()).collect();
                assert_eq!(over, bits(&want), "{len}");
            }
        }
    }
}
