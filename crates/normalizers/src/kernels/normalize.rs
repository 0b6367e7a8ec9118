//! Statistics and the forward pass: each set's mean and biased variance in one sweep, then
//! y = (x − μ)·rstd·w[c] + b[c].

use super::geom::*;
use super::lanes::{self, Acc, Float, LANES};
use std::mem::MaybeUninit;
use std::ops::Range;

/// One set's sums for its mean and biased variance, in one sweep: sums of x − k and (x − k)²
/// in f64 into `s1` and `s2` (in lanes), with k the set's first value (the shifted-data
/// algorithm: no cancellation for a large mean); returns k. [`mean_var`] finishes them.
#[inline(always)]
pub(super) fn set_sums<T: Float>(x: &[T], g: &Geom, set: usize, s1: &mut Acc, s2: &mut Acc) -> f64 {
    if g.s == 1 && g.short_runs {
        // Runs of one value: lane 0 takes each, as `lanes::shifted_sums` does on a one-value
        // run (its other lanes add exact zeros), without a call per value.
        let mut k = None;
        for (off, _, _) in g.runs(set) {
            let v = x[off].widen();
            let d = v - *k.get_or_insert(v);
            s1[0] += d;
            s2[0] += d * d;
        }
        return k.unwrap_or(0.0);
    }
    let mut k = None;
    for (off, n, _) in g.runs(set) {
        let run = &x[off..off + g.s];
        if let Some(next) = g.next_sample_run(off, n) {
            prefetch(x[next..].as_ptr(), g.s);
        }
        let k = *k.get_or_insert_with(|| run[0].widen());
        lanes::shifted_sums(run, k, s1, s2, g.contiguous_sets());
    }
    k.unwrap_or(0.0)
}

/// Mean and biased variance of `m` values from their sums of x − k and (x − k)² in lanes.
#[inline(always)]
pub(super) fn mean_var(s1: &Acc, s2: &Acc, k: f64, m: f64) -> (f64, f64) {
    let d = lanes::total(s1) / m;
    (k + d, (lanes::total(s2) / m - d * d).max(0.0))
}

/// [`set_sums`] of a block of BatchNorm channels (`sets`), into `sums` and `ks`, reading x
/// sample by sample (see [`CHANNEL_BLOCK_VALUES`]). Each channel still adds its runs in sample
/// order into lanes of its own, with the same shift, so the bits are `set_sums`'s.
pub(super) fn channel_block_sums<T: Float>(
    x: &[T],
    g: &Geom,
    sets: Range<usize>,
    sums: &mut [(Acc, Acc); MAX_STEP_SETS],
    ks: &mut [f64; MAX_STEP_SETS],
) {
    if g.one_value_runs(&sets) {
        for n in 0..g.n {
            let row = &x[n * g.c + sets.start..n * g.c + sets.end];
            for (i, v) in row.iter().enumerate() {
                if n == 0 {
                    ks[i] = v.widen();
                }
                let d = v.widen() - ks[i];
                let (s1, s2) = &mut sums[i];
                s1[0] += d;
                s2[0] += d * d;
            }
        }
        return;
    }
    for n in 0..g.n {
        for (i, c) in sets.clone().enumerate() {
            let off = (n * g.c + c) * g.s;
            let run = &x[off..off + g.s];
            if n == 0 {
                ks[i] = run[0].widen();
            }
            let (s1, s2) = &mut sums[i];
            lanes::shifted_sums(run, ks[i], s1, s2, false);
        }
    }
}

/// y = (x − μ)·rstd·w[c] + b[c] over the runs of `set`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn normalize_set<T: Float>(
    x: &[T],
    w: &[T],
    b: &[T],
    g: &Geom,
    set: usize,
    mean: f64,
    rstd: f64,
    out: SharedMut<MaybeUninit<T>>,
) {
    for (off, _, ch) in g.runs(set) {
        // SAFETY: runs of different sets never overlap.
        let dst = unsafe { out.slice(off, g.s) };
        let (xs, a, b) = (&x[off..off + g.s], rstd * w[ch].widen(), b[ch].widen());
        if g.s == 1 && g.short_runs && !g.streaming {
            dst[0].write(lanes::affine_of(xs[0], lanes::affine_consts(mean, a, b)));
        } else if g.streaming {
            // Through a buffer in L1, then to memory without reading y's lines first.
            let mut buf = [MaybeUninit::<T>::uninit(); STREAM_CHUNK];
            for (xc, dc) in xs.chunks(STREAM_CHUNK).zip(dst.chunks_mut(STREAM_CHUNK)) {
                let tmp = &mut buf[..xc.len()];
                lanes::affine_into(xc, tmp, mean, a, b, false);
                stream_copy(tmp, dc);
            }
        } else {
            lanes::affine_into(xs, dst, mean, a, b, g.contiguous_sets());
        }
        if let Some(next) = g.next_channel_run(off, ch) {
            prefetch(x[next..].as_ptr(), g.s);
        }
    }
    if g.streaming {
        store_fence();
    }
}

/// `normalize_set` of a block of BatchNorm channels whose runs are one value each (see
/// [`Geom::one_value_runs`]), sample by sample: each value as `lanes::affine_into` computes it.
#[allow(clippy::too_many_arguments)]
pub(super) fn normalize_rows<T: Float>(
    x: &[T],
    w: &[T],
    b: &[T],
    g: &Geom,
    sets: Range<usize>,
    (mean, var): (&[f64; MAX_STEP_SETS], &[f64; MAX_STEP_SETS]),
    eps: f64,
    out: SharedMut<MaybeUninit<T>>,
) {
    let consts: [_; MAX_STEP_SETS] = std::array::from_fn(|i| {
        let c = (sets.start + i).min(sets.end - 1);
        lanes::affine_consts::<T>(mean[i], rstd(var[i], eps) * w[c].widen(), b[c].widen())
    });
    for n in 0..g.n {
        let off = n * g.c + sets.start;
        // SAFETY: the block's channels are this step's alone.
        let dst = unsafe { out.slice(off, sets.len()) };
        for (i, (d, &v)) in dst.iter_mut().zip(&x[off..off + sets.len()]).enumerate() {
            d.write(lanes::affine_of(v, consts[i]));
        }
    }
}

/// Values per chunk of the streamed output: a few KiB, in L1.
pub(super) const STREAM_CHUNK: usize = 512;

/// Copies `src` to `dst` (same length), with non-temporal stores for the 16-byte-aligned
/// middle: a plain store to memory not in cache first reads the line it writes to, which for a
/// large output is a third of the forward's memory traffic. Followed by [`store_fence`] before
/// anyone reads `dst`.
#[inline(always)]
pub(super) fn stream_copy<T>(src: &[MaybeUninit<T>], dst: &mut [MaybeUninit<T>]) {
    assert_eq!(src.len(), dst.len());
    let bytes = std::mem::size_of_val(src);
    let (s, d) = (src.as_ptr().cast::<u8>(), dst.as_mut_ptr().cast::<u8>());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: every access is to the first `bytes` bytes of `src` or `dst`, which do not
    // overlap (one is borrowed mutably); the streamed stores are 16-byte aligned, as
    // `_mm_stream_si128` needs; SSE2 is part of x86-64.
    unsafe {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};
        let head = d.align_offset(16).min(bytes);
        std::ptr::copy_nonoverlapping(s, d, head);
        let mut i = head;
        while i + 16 <= bytes {
            let v = _mm_loadu_si128(s.add(i).cast::<__m128i>());
            _mm_stream_si128(d.add(i).cast::<__m128i>(), v);
            i += 16;
        }
        std::ptr::copy_nonoverlapping(s.add(i), d.add(i), bytes - i);
    }
    #[cfg(not(target_arch = "x86_64"))]
    // SAFETY: as above.
    unsafe {
        std::ptr::copy_nonoverlapping(s, d, bytes);
    }
}

/// Orders the non-temporal stores before everything after: the task's results are then
/// visible to the thread that joins it.
#[inline(always)]
pub(super) fn store_fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE is part of x86-64.
    unsafe {
        std::arch::x86_64::_mm_sfence();
    }
}

/// Asks the CPU to start loading `len` values from `ptr` into its L2 cache, for BatchNorm on
/// large inputs (see [`STREAMING_MIN_VALUES`]), whose sets are channels read as N runs of S
/// values C·S apart: the hardware prefetcher follows one run at a time, and through autograd
/// x and dy are no longer in cache from the call before. Prefetching whole runs ahead (only
/// their first KiB does not help) overlaps the memory traffic with the work. Changes no value.
#[inline(always)]
pub(super) fn prefetch<T>(ptr: *const T, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        let p = ptr.cast::<i8>();
        for line in (0..len * std::mem::size_of::<T>()).step_by(64) {
            // SAFETY: a prefetch never faults and reads nothing into the program; the
            // address stays inside the caller's buffer.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(line)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (ptr, len);
}

/// The mean and biased variance of a step's sets (`sets`, at most [`MAX_STEP_SETS`]) into
/// `mean` and `var`: the forward's statistics, and the backward's when it recomputes them.
/// Not inlined: inlined into the backward, it slowed the backward that has the statistics.
#[inline(never)]
pub(super) fn step_stats<T: Float>(
    x: &[T],
    g: &Geom,
    sets: Range<usize>,
    mean: &mut [f64; MAX_STEP_SETS],
    var: &mut [f64; MAX_STEP_SETS],
) {
    let mut sums: [(Acc, Acc); MAX_STEP_SETS] = [([0.0; LANES], [0.0; LANES]); MAX_STEP_SETS];
    let mut ks = [0.0f64; MAX_STEP_SETS];
    if g.channel_block(&sets) {
        channel_block_sums(x, g, sets.clone(), &mut sums, &mut ks);
    } else {
        for (i, set) in sets.clone().enumerate() {
            let (s1, s2) = &mut sums[i];
            ks[i] = set_sums(x, g, set, s1, s2);
        }
    }
    // Every set's sums first, then their means and variances: the sets' chains of scalar work
    // (lane totals, divisions) overlap instead of each stalling the next set's loads
    // (InstanceNorm's forward at (8, 512, 7, 7) 16-22% faster in a probe).
    for (i, (s1, s2)) in sums.iter().take(sets.len()).enumerate() {
        (mean[i], var[i]) = mean_var(s1, s2, ks[i], g.set_len() as f64);
    }
}

/// Whether the statistics of every set (two f64 each) are small next to the input, so that
/// keeping them for the backward costs little memory: at most 1/32 of it (sets of 128 f32
/// values or more). For smaller sets (InstanceNorm on 7×7 planes: 8% of the input) the backward
/// recomputes them unless the caller needs them (see [`fused_normalize_lean`]).
pub(super) fn stats_are_cheap<T>(g: &Geom) -> bool {
    2 * std::mem::size_of::<f64>() * 32 <= g.set_len() * std::mem::size_of::<T>()
}

/// The training forward: statistics of every set, then the normalized output; the statistics
/// are returned if `keep`.
pub(super) fn forward<T: Float>(
    x: &[T],
    w: &[T],
    b: &[T],
    g: Geom,
    eps: f64,
    keep: bool,
) -> (Vec<T>, Option<Stats>) {
    let mut stats = keep.then(|| Stats {
        mean: vec![0.0; g.num_sets()],
        var: vec![0.0; g.num_sets()],
    });
    let kept = stats.as_mut().map(|s| {
        (
            SharedMut(s.mean.as_mut_ptr()),
            SharedMut(s.var.as_mut_ptr()),
        )
    });
    let y = filled(x.len(), |out| {
        g.par_steps(|sets| {
            let (mut mean, mut var) = ([0.0; MAX_STEP_SETS], [0.0; MAX_STEP_SETS]);
            step_stats(x, &g, sets.clone(), &mut mean, &mut var);
            if g.one_value_runs(&sets) {
                normalize_rows(x, w, b, &g, sets.clone(), (&mean, &var), eps, out);
            } else {
                for (i, set) in sets.clone().enumerate() {
                    normalize_set(x, w, b, &g, set, mean[i], rstd(var[i], eps), out);
                }
            }
            if let Some((m, v)) = kept {
                let k = sets.len();
                // SAFETY: steps cover disjoint ranges of sets.
                unsafe {
                    m.slice(sets.start, k).copy_from_slice(&mean[..k]);
                    v.slice(sets.start, k).copy_from_slice(&var[..k]);
                }
            }
        });
    });
    (y, stats)
}

/// The evaluation forward with given per-channel statistics.
pub(super) fn forward_fixed<T: Float>(
    x: &[T],
    w: &[T],
    b: &[T],
    g: Geom,
    stats: &Stats,
    eps: f64,
) -> Vec<T> {
    filled(x.len(), |out| {
        g.par_steps(|sets| {
            for set in sets {
                let (mean, var) = (stats.mean[set], stats.var[set]);
                normalize_set(x, w, b, &g, set, mean, rstd(var, eps), out);
            }
        });
    })
}
