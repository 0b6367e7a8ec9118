use super::{padded, total, Acc, LANES, READ_AHEAD_BYTES};
use std::arch::x86_64::*;
use std::mem::MaybeUninit;

/// With `ON`, asks for the cache line [`READ_AHEAD_BYTES`] after `p` (a chunk's start).
#[inline(always)]
fn read_ahead<const ON: bool>(p: *const f32) {
    if ON {
        // SAFETY: a prefetch never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast::<i8>().wrapping_add(READ_AHEAD_BYTES)) };
    }
}

/// The two registers holding lanes 0–3 and 4–7 of `a`.
#[target_feature(enable = "avx2,fma")]
unsafe fn load(a: &Acc) -> [__m256d; 2] {
    [
        _mm256_loadu_pd(a.as_ptr()),
        _mm256_loadu_pd(a.as_ptr().add(4)),
    ]
}

#[target_feature(enable = "avx2,fma")]
unsafe fn store(r: [__m256d; 2], a: &mut Acc) {
    _mm256_storeu_pd(a.as_mut_ptr(), r[0]);
    _mm256_storeu_pd(a.as_mut_ptr().add(4), r[1]);
}

/// Lanes 0–3 and 4–7 of a chunk, widened to f64.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn widen(c: &[f32; LANES]) -> [__m256d; 2] {
    let p = c.as_ptr();
    [
        _mm256_cvtps_pd(_mm_loadu_ps(p)),
        _mm256_cvtps_pd(_mm_loadu_ps(p.add(4))),
    ]
}

/// `super::shifted_sums` on f32.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn shifted_sums<const AHEAD: bool>(x: &[f32], k: f64, s1: &mut Acc, s2: &mut Acc) {
    let kv = _mm256_set1_pd(k);
    let (mut a1, mut a2) = (load(s1), load(s2));
    let mut add = |c: &[f32; LANES]| {
        let v = widen(c);
        for h in 0..2 {
            let d = _mm256_sub_pd(v[h], kv);
            a1[h] = _mm256_add_pd(a1[h], d);
            a2[h] = _mm256_add_pd(a2[h], _mm256_mul_pd(d, d));
        }
    };
    let (chunks, rest) = x.as_chunks::<LANES>();
    for c in chunks {
        read_ahead::<AHEAD>(c.as_ptr());
        add(c);
    }
    // Padding with k adds exact zeros.
    add(&padded(rest, k as f32));
    store(a1, s1);
    store(a2, s2);
}

/// `super::affine_into` on f32: ((x − hi) − lo)·a + b, a multiply and an add as in the
/// generic code; 16 values a step, the last few one at a time with the same operations.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn affine_into<const AHEAD: bool>(
    x: &[f32],
    dst: &mut [MaybeUninit<f32>],
    (hi, lo): (f32, f32),
    a: f32,
    b: f32,
) {
    assert_eq!(x.len(), dst.len());
    let (vh, vl, va, vb) = (
        _mm256_set1_ps(hi),
        _mm256_set1_ps(lo),
        _mm256_set1_ps(a),
        _mm256_set1_ps(b),
    );
    let f = |v: __m256| {
        _mm256_add_ps(
            _mm256_mul_ps(_mm256_sub_ps(_mm256_sub_ps(v, vh), vl), va),
            vb,
        )
    };
    let (xp, dp) = (x.as_ptr(), dst.as_mut_ptr().cast::<f32>());
    let body = x.len() / 16 * 16;
    let mut i = 0;
    while i < body {
        read_ahead::<AHEAD>(dp.add(i));
        _mm256_storeu_ps(dp.add(i), f(_mm256_loadu_ps(xp.add(i))));
        _mm256_storeu_ps(dp.add(i + 8), f(_mm256_loadu_ps(xp.add(i + 8))));
        i += 16;
    }
    for (d, &v) in dst[body..].iter_mut().zip(&x[body..]) {
        d.write(((v - hi) - lo) * a + b);
    }
}

/// `super::grad_into` and `super::grad_in_place` on f32 (`out` may be `dy`): p·dy −
/// q·((x − hi) − lo) + r with the generic code's operations and order, 16 values a step,
/// the last few one at a time.
///
/// # Safety
/// The CPU has AVX2 and FMA; `x` and `dy` can be read and `out` written for `len` values;
/// `out` is `dy` or overlaps neither.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn grad<const AHEAD: bool>(
    x: *const f32,
    dy: *const f32,
    out: *mut f32,
    len: usize,
    ((hi, lo), (p, q, r)): ((f32, f32), (f32, f32, f32)),
) {
    let (vh, vl) = (_mm256_set1_ps(hi), _mm256_set1_ps(lo));
    let (vp, vq, vr) = (_mm256_set1_ps(p), _mm256_set1_ps(q), _mm256_set1_ps(r));
    let f = |xv: __m256, dv: __m256| {
        let xm = _mm256_sub_ps(_mm256_sub_ps(xv, vh), vl);
        _mm256_add_ps(
            _mm256_sub_ps(_mm256_mul_ps(vp, dv), _mm256_mul_ps(vq, xm)),
            vr,
        )
    };
    let body = len / 16 * 16;
    let mut i = 0;
    while i < body {
        read_ahead::<AHEAD>(x.add(i));
        read_ahead::<AHEAD>(dy.add(i));
        if out.cast_const() != dy {
            read_ahead::<AHEAD>(out.add(i));
        }
        for j in [i, i + 8] {
            let v = f(_mm256_loadu_ps(x.add(j)), _mm256_loadu_ps(dy.add(j)));
            _mm256_storeu_ps(out.add(j), v);
        }
        i += 16;
    }
    for j in body..len {
        let (xv, dv) = (*x.add(j), *dy.add(j));
        *out.add(j) = p * dv - q * ((xv - hi) - lo) + r;
    }
}

/// `super::grad_sums` on f32.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn grad_sums<const AHEAD: bool>(x: &[f32], dy: &[f32], mean: f64) -> (f64, f64) {
    let mv = _mm256_set1_pd(mean);
    let zero = _mm256_setzero_pd();
    let (mut sd, mut sdx) = ([zero; 2], [zero; 2]);
    let mut add = |xs: &[f32; LANES], ds: &[f32; LANES]| {
        let (xv, dv) = (widen(xs), widen(ds));
        for h in 0..2 {
            sd[h] = _mm256_add_pd(sd[h], dv[h]);
            let xm = _mm256_sub_pd(xv[h], mv);
            sdx[h] = _mm256_add_pd(sdx[h], _mm256_mul_pd(dv[h], xm));
        }
    };
    let ((xc, xr), (dc, dr)) = (x.as_chunks::<LANES>(), dy.as_chunks::<LANES>());
    for (xs, ds) in xc.iter().zip(dc) {
        read_ahead::<AHEAD>(xs.as_ptr());
        read_ahead::<AHEAD>(ds.as_ptr());
        add(xs, ds);
    }
    // Padding dy with zeros adds exact zeros (x − mean is finite wherever the result is).
    add(&padded(xr, 0.0), &padded(dr, 0.0));
    let (mut a, mut b) = ([0.0; LANES], [0.0; LANES]);
    store(sd, &mut a);
    store(sdx, &mut b);
    (total(&a), total(&b))
}
