use super::lanes::{self, Acc, Float, LANES};
use super::parallel;
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp3, InplaceOp3, Layout, Result, Shape, Tensor, WithDType,
};
use std::mem::MaybeUninit;
use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};

/// Values that a task's step takes at once when sets are small (see [`Geom::par_steps`]): the
/// statistics (or gradient sums) of a few sets first, then their outputs, so that one set's
/// chain of dependent scalar work (sums, a square root, divisions) overlaps the next set's
/// loads instead of stalling between them. For InstanceNorm's sets of 196 and 49 values, at
/// (32, 256, 14, 14) and (8, 512, 7, 7), it took 8% and 20% off the forward (1% and 7% off
/// the backward); for sets of 1,000 values and more it changes nothing.
const STEP_VALUES: usize = 1024;

/// The most sets one step takes: [`MAX_USUAL_STEP_SETS`], or for BatchNorm's runs of one value
/// (see [`Geom::sets_per_step`]) a cache line of f32 channels.
const MAX_STEP_SETS: usize = 16;

/// The most sets one step takes, but for BatchNorm's runs of one value.
const MAX_USUAL_STEP_SETS: usize = 8;

/// Values of x that a BatchNorm step takes at once (see [`Geom::par_steps`]): a block of
/// channels whose reductions read x sample by sample. One channel's runs are S values each, C·S
/// apart; a sample's runs for the block's channels are one stretch of memory, which the hardware
/// prefetcher follows. The block (256 KiB of f32) stays in L2 for its second pass.
const CHANNEL_BLOCK_VALUES: usize = 1 << 16;

/// How the values of an (N, C, S) tensor are grouped for their statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sets {
    /// One set per channel over (N, S): BatchNorm.
    Channels,
    /// One set per sample and group of C/G consecutive channels: GroupNorm (LayerNorm G = 1,
    /// InstanceNorm G = C).
    Groups(usize),
}

/// Mean and biased variance of every set: C of them for `Channels` (channel order), N·G for
/// `Groups` (sample-major).
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    pub mean: Vec<f64>,
    pub var: Vec<f64>,
}

/// An input (N, C, *spatial) seen as (N, C, S), and how its values form sets.
#[derive(Debug, Clone, Copy)]
struct Geom {
    n: usize,
    c: usize,
    s: usize,
    sets: Sets,
    /// BatchNorm on a large input: its forward's passes prefetch the runs they read next (see
    /// [`prefetch`]; so does the evaluation backward) and write y with non-temporal stores (see
    /// [`stream_copy`]); its training backward makes two passes in memory order (`backward`).
    streaming: bool,
    /// BatchNorm's steps take blocks of channels read sample by sample (see
    /// [`CHANNEL_BLOCK_VALUES`]); always, but for the test that this changes no bit.
    channel_blocks: bool,
    /// BatchNorm's blocks of runs of one value go value by value (see [`Geom::one_value_runs`]);
    /// always, but for the test that this changes no bit.
    short_runs: bool,
}

/// Values from which BatchNorm streams (16 MiB of f32). At (32, 64, 56, 56), 25.7 MB, the
/// prefetches took 12% off the forward+backward through autograd and the non-temporal stores
/// another 10%; at 1.6–4.2 MB, where x and y stay in cache from one call to the next, the
/// prefetch instructions cost 10–20%. (GroupNorm, LayerNorm and InstanceNorm read each set as
/// one stretch of memory, which the hardware prefetcher follows. The non-temporal stores made
/// their forward alone slower at (32, 64, 56, 56) and GroupNorm's and InstanceNorm's
/// forward+backward no faster; LayerNorm's, whose 800 KB sets the second pass reads back from
/// L2 while writing y, 1.0 ms (6%) faster, but its forward alone 10–20% slower, below half the
/// copy bandwidth.)
const STREAMING_MIN_VALUES: usize = 1 << 22;

/// Values per run from which BatchNorm streams (1 KiB of f32): prefetching and streaming runs
/// of a few values costs more than it saves.
const STREAMING_MIN_RUN: usize = 256;

impl Geom {
    fn new(dims: &[usize], sets: Sets) -> Result<Self> {
        let &[n, c, ref spatial @ ..] = dims else {
            bail!("fused normalization expects (N, C, ...), got {dims:?}");
        };
        let s = spatial.iter().product::<usize>();
        let geom = Geom {
            n,
            c,
            s,
            sets,
            streaming: sets == Sets::Channels
                && n * c * s >= STREAMING_MIN_VALUES
                && s >= STREAMING_MIN_RUN,
            channel_blocks: true,
            short_runs: true,
        };
        if let Sets::Groups(g) = sets {
            if g == 0 || c % g != 0 {
                bail!("fused normalization: {c} channels do not split into {g} groups");
            }
        }
        Ok(geom)
    }

    fn num_sets(&self) -> usize {
        match self.sets {
            Sets::Channels => self.c,
            Sets::Groups(g) => self.n * g,
        }
    }

    /// Values per set.
    fn set_len(&self) -> usize {
        match self.sets {
            Sets::Channels => self.n * self.s,
            Sets::Groups(g) => self.c / g * self.s,
        }
    }

    /// The runs of `set` in memory order: (offset, sample, channel) of each (sample, channel)
    /// row of S values.
    #[inline(always)]
    fn runs(&self, set: usize) -> impl Iterator<Item = (usize, usize, usize)> {
        let (samples, channels) = match self.sets {
            Sets::Channels => (0..self.n, set..set + 1),
            Sets::Groups(g) => {
                let cg = self.c / g;
                let (n, group) = (set / g, set % g);
                (n..n + 1, group * cg..(group + 1) * cg)
            }
        };
        let (c, s) = (self.c, self.s);
        samples.flat_map(move |n| channels.clone().map(move |ch| ((n * c + ch) * s, n, ch)))
    }

    /// For BatchNorm (sets = channels, each N runs of S values C·S apart): the offset of the
    /// run that channel `ch`'s run at `off` (sample `n`) is followed by in its own channel,
    /// if any. While one run is summed, the next comes in (see [`prefetch`]).
    #[inline(always)]
    fn next_sample_run(&self, off: usize, n: usize) -> Option<usize> {
        (self.streaming && n + 1 < self.n).then_some(off + self.c * self.s)
    }

    /// For BatchNorm: the offset of the same sample's run in the next channel, if any. While
    /// one channel's second pass reads its runs from cache, the next channel's come in.
    #[inline(always)]
    fn next_channel_run(&self, off: usize, ch: usize) -> Option<usize> {
        (self.streaming && ch + 1 < self.c).then_some(off + self.s)
    }

    /// Whether each set is one stretch of memory, the next set's right after it (`Groups`):
    /// then the loops read (and write) ahead of their runs (see [`lanes::READ_AHEAD_BYTES`]).
    #[inline(always)]
    fn contiguous_sets(&self) -> bool {
        matches!(self.sets, Sets::Groups(_))
    }

    /// Sets that one step of a task takes together (see [`Geom::par_steps`]): as many as
    /// hold about [`STEP_VALUES`] values ([`CHANNEL_BLOCK_VALUES`] for BatchNorm), at most
    /// [`MAX_STEP_SETS`], at least one.
    fn sets_per_step(&self) -> usize {
        let values = match self.sets {
            Sets::Channels => CHANNEL_BLOCK_VALUES,
            Sets::Groups(_) => STEP_VALUES,
        };
        let usual = (values / self.set_len().max(1)).clamp(1, MAX_USUAL_STEP_SETS);
        if self.sets == Sets::Channels && self.s == 1 && self.short_runs && self.channel_blocks {
            // Each sample's row of the block is then at least a cache line of f32, so that the
            // block's passes read every line once rather than once per block.
            MAX_STEP_SETS
        } else {
            usual
        }
    }

    /// Whether a step's sets are a block of BatchNorm channels, read sample by sample.
    #[inline(always)]
    fn channel_block(&self, sets: &Range<usize>) -> bool {
        self.channel_blocks && self.sets == Sets::Channels && sets.len() > 1
    }

    /// Whether a step's sets are a block of BatchNorm channels whose runs are one value each
    /// (an (N, C) input): then its passes go value by value along each sample's row, with the
    /// operations the lane-wise loops apply to lane 0 of a one-value run (its other lanes only
    /// ever add exact zeros), rather than a loop call per value. The same bits.
    #[inline(always)]
    fn one_value_runs(&self, sets: &Range<usize>) -> bool {
        self.short_runs && self.s == 1 && self.channel_block(sets)
    }

    /// Runs `f` on consecutive ranges of [`Geom::sets_per_step`] sets that together cover
    /// every set, on the current rayon pool's threads (see [`parallel::for_each_index`]). The
    /// partition decides only who computes a set, never how.
    fn par_steps(&self, f: impl Fn(Range<usize>) + Sync + Send) {
        let (sets, step) = (self.num_sets(), self.sets_per_step());
        parallel::for_each_index(sets.div_ceil(step), step * self.set_len(), |i| {
            f(i * step..((i + 1) * step).min(sets))
        });
    }
}

/// A raw pointer that tasks write through at disjoint offsets.
#[derive(Clone, Copy)]
struct SharedMut<T>(*mut T);
unsafe impl<T: Send> Send for SharedMut<T> {}
unsafe impl<T: Send> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// # Safety
    /// No two tasks may touch the same `offset..offset + len`, and it must be in bounds.
    #[allow(clippy::mut_from_ref)]
    #[inline(always)]
    unsafe fn slice(&self, offset: usize, len: usize) -> &mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(offset), len)
    }

    /// # Safety
    /// No task may write `offset..offset + len` while the slice lives, and it must be in bounds.
    #[inline(always)]
    unsafe fn slice_ref(&self, offset: usize, len: usize) -> &[T] {
        std::slice::from_raw_parts(self.0.add(offset), len)
    }
}

/// 1/sqrt(σ² + eps): one expression for forward and backward, so both see the same bits.
#[inline(always)]
fn rstd(var: f64, eps: f64) -> f64 {
    1.0 / (var + eps).sqrt()
}

/// A vector of `len` values, every one of them written by `fill` through disjoint slices.
fn filled<T>(len: usize, fill: impl FnOnce(SharedMut<MaybeUninit<T>>)) -> Vec<T> {
    let mut v = Vec::with_capacity(len);
    fill(SharedMut(v.spare_capacity_mut().as_mut_ptr()));
    // SAFETY: callers write all `len` values (the sets partition the tensor).
    unsafe { v.set_len(len) };
    v
}

/// One set's sums for its mean and biased variance, in one sweep: sums of x − k and (x − k)²
/// in f64 into `s1` and `s2` (in lanes), with k the set's first value (the shifted-data
/// algorithm: no cancellation for a large mean); returns k. [`mean_var`] finishes them.
#[inline(always)]
fn set_sums<T: Float>(x: &[T], g: &Geom, set: usize, s1: &mut Acc, s2: &mut Acc) -> f64 {
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
fn mean_var(s1: &Acc, s2: &Acc, k: f64, m: f64) -> (f64, f64) {
    let d = lanes::total(s1) / m;
    (k + d, (lanes::total(s2) / m - d * d).max(0.0))
}

/// [`set_sums`] of a block of BatchNorm channels (`sets`), into `sums` and `ks`, reading x
/// sample by sample (see [`CHANNEL_BLOCK_VALUES`]). Each channel still adds its runs in sample
/// order into lanes of its own, with the same shift, so the bits are `set_sums`'s.
fn channel_block_sums<T: Float>(
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
fn normalize_set<T: Float>(
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
fn normalize_rows<T: Float>(
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
const STREAM_CHUNK: usize = 512;

/// Copies `src` to `dst` (same length), with non-temporal stores for the 16-byte-aligned
/// middle: a plain store to memory not in cache first reads the line it writes to, which for a
/// large output is a third of the forward's memory traffic. Followed by [`store_fence`] before
/// anyone reads `dst`.
#[inline(always)]
fn stream_copy<T>(src: &[MaybeUninit<T>], dst: &mut [MaybeUninit<T>]) {
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
fn store_fence() {
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
fn prefetch<T>(ptr: *const T, len: usize) {
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
fn step_stats<T: Float>(
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
fn stats_are_cheap<T>(g: &Geom) -> bool {
    2 * std::mem::size_of::<f64>() * 32 <= g.set_len() * std::mem::size_of::<T>()
}

/// The training forward: statistics of every set, then the normalized output; the statistics
/// are returned if `keep`.
fn forward<T: Float>(
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
fn forward_fixed<T: Float>(x: &[T], w: &[T], b: &[T], g: Geom, stats: &Stats, eps: f64) -> Vec<T> {
    filled(x.len(), |out| {
        g.par_steps(|sets| {
            for set in sets {
                let (mean, var) = (stats.mean[set], stats.var[set]);
                normalize_set(x, w, b, &g, set, mean, rstd(var, eps), out);
            }
        });
    })
}

/// The (mean, 1/std) of each set of a step.
type Consts = [(f64, f64); MAX_STEP_SETS];

/// Which gradients the backward pass must produce.
#[derive(Debug, Clone, Copy)]
struct Needs {
    dx: bool,
    dw_db: bool,
}

/// The output gradient the backward pass reads, and whether it may write dx over it.
enum Dy<'a, T> {
    Read(&'a [T]),
    Overwrite(&'a mut [T]),
}

/// Gradients (dx, dw, db) given the statistics in `ctx`; with `fixed` statistics (evaluation)
/// no gradient flows through them. With `Dy::Overwrite` and `needs.dx`, dx is written over dy
/// (each set's values once its sums are taken) and the returned dx is `None`.
fn backward<T: Float>(
    x: &[T],
    w: &[T],
    dy: Dy<'_, T>,
    ctx: &GradCtx<'_>,
) -> (Option<Vec<T>>, Vec<T>, Vec<T>) {
    let &GradCtx {
        g,
        stats,
        eps,
        fixed,
        needs,
    } = ctx;
    // BatchNorm on a large input, training: two passes in memory order (below).
    let two_pass = g.streaming && !fixed && stats.is_some();
    // The weight and bias gradients' sums of dy·x̂ and dy. Where each channel is one step's
    // (BatchNorm, but for two passes), added up per channel as its runs come, in sample order;
    // elsewhere one partial per (sample, channel), added over samples afterwards (`reduce`).
    // Either way from `Iterator::sum`'s own starting value, in the same order.
    let per_channel = g.sets == Sets::Channels && !two_pass;
    // Groups of one-value runs: the weight and bias gradients come from a pass of their own
    // (below), per channel in sample order, before dx may overwrite dy; a partial per (sample,
    // channel) would be four times such an input.
    let groups_apart = matches!(g.sets, Sets::Groups(_)) && g.s == 1 && g.short_runs;
    let zero_sum = std::iter::empty::<f64>().sum::<f64>();
    let parts = if per_channel || groups_apart {
        g.c
    } else {
        g.n * g.c
    };
    let mut part_w = vec![zero_sum; parts];
    let mut part_b = vec![zero_sum; parts];
    let (pw, pb) = (
        SharedMut(part_w.as_mut_ptr()),
        SharedMut(part_b.as_mut_ptr()),
    );
    // Only written through when `over_dy` (then it came from a `&mut`).
    let (dyp, over_dy) = match dy {
        Dy::Read(d) => (SharedMut(d.as_ptr().cast_mut()), false),
        Dy::Overwrite(d) => (SharedMut(d.as_mut_ptr()), needs.dx),
    };
    let m = g.set_len() as f64;
    // x's and dy's run at `next` (see `Geom::next_sample_run`, `Geom::next_channel_run`).
    let prefetch_run = |next: usize| {
        let dy = dyp; // the whole `SharedMut` (which is `Sync`), not its raw pointer
        prefetch(x[next..].as_ptr(), g.s);
        prefetch(dy.0.wrapping_add(next).cast_const(), g.s);
    };
    // SAFETY (for every slice of x, dy, dx below): runs of different sets never overlap,
    // each set is one task's, and within it no slice of dy outlives the write over it.
    // The first pass over a set: its per-run sums into the partials, and (Σg, Σg·x̂/rstd).
    // One run's sums (sample n, channel ch, at `off`) into the partials; returns its terms of
    // the set's (Σg, Σg·x̂/rstd).
    // A run's terms added to its channel's sums, which only one task adds to, in sample order
    // (`per_channel`, and the pass for `groups_apart`).
    let add_to_channel = |ch: usize, rstd: f64, (sd, sdx): (f64, f64)| unsafe {
        pw.slice(ch, 1)[0] += rstd * sdx;
        pb.slice(ch, 1)[0] += sd;
    };
    // `ahead`: whether the memory after the run is read next (see `lanes::READ_AHEAD_BYTES`).
    let run_sums = |off: usize, n: usize, ch: usize, (mean, rstd): (f64, f64), ahead: bool| {
        let (sd, sdx) = if g.s == 1 && g.short_runs {
            lanes::grad_sums_one(x[off], unsafe { dyp.slice_ref(off, 1) }[0], mean)
        } else {
            let dys = unsafe { dyp.slice_ref(off, g.s) };
            lanes::grad_sums(&x[off..off + g.s], dys, mean, ahead)
        };
        // Every (sample, channel) pair belongs to exactly one set, and with `per_channel`
        // every channel to one step, which takes its runs in sample order.
        if per_channel {
            add_to_channel(ch, rstd, (sd, sdx));
        } else if !groups_apart {
            // `groups_apart`: taken by the pass of their own.
            unsafe {
                pw.slice(n * g.c + ch, 1)[0] = rstd * sdx;
                pb.slice(n * g.c + ch, 1)[0] = sd;
            }
        }
        let wc = w[ch].widen();
        (wc * sd, wc * rstd * sdx)
    };
    let sums = |set: usize, (mean, rstd): (f64, f64)| {
        let (mut sum_g, mut sum_gx) = (0.0, 0.0);
        if !fixed || needs.dw_db {
            for (off, n, ch) in g.runs(set) {
                if let Some(next) = g.next_sample_run(off, n) {
                    prefetch_run(next);
                }
                let (tg, tgx) = run_sums(off, n, ch, (mean, rstd), g.contiguous_sets());
                sum_g += tg;
                sum_gx += tgx;
            }
        }
        (sum_g, sum_gx)
    };
    // The (q, r) of dx = rstd·(dy·w − mean(g) − x̂·mean(g·x̂)) = p·dy − q·(x − μ) + r, from
    // the set's (Σg, Σg·x̂/rstd).
    let qr = |rstd: f64, (sum_g, sum_gx): (f64, f64)| (rstd * rstd * sum_gx / m, -rstd * sum_g / m);
    // One run's dx (channel `ch`, at `off`), over dy (`out` None) or into `out`.
    let run_dx = |off: usize,
                  ch: usize,
                  (mean, rstd): (f64, f64),
                  (q, r): (f64, f64),
                  out: Option<SharedMut<MaybeUninit<T>>>,
                  ahead: bool| {
        let p = rstd * w[ch].widen();
        let xs = &x[off..off + g.s];
        if g.s == 1 && g.short_runs && !fixed {
            let (m, k) = lanes::grad_consts::<T>(mean, p, q, r);
            match out {
                None => {
                    let d = unsafe { dyp.slice(off, 1) };
                    d[0] = lanes::grad_of(xs[0], d[0], m, k);
                }
                Some(out) => {
                    let dv = unsafe { dyp.slice_ref(off, 1) }[0];
                    let dst = unsafe { out.slice(off, 1) };
                    dst[0].write(lanes::grad_of(xs[0], dv, m, k));
                }
            }
            return;
        }
        match out {
            None => {
                let dys = unsafe { dyp.slice(off, g.s) };
                if fixed {
                    lanes::scale_in_place(dys, p);
                } else {
                    lanes::grad_in_place(xs, dys, mean, p, q, r, ahead);
                }
            }
            Some(out) => {
                let (dys, dst) = unsafe { (dyp.slice_ref(off, g.s), out.slice(off, g.s)) };
                if fixed {
                    lanes::scale_into(dys, dst, p);
                } else {
                    lanes::grad_into(xs, dys, dst, mean, p, q, r, ahead);
                }
            }
        }
    };
    // The second pass: dx from the set's sums.
    let apply = |set: usize,
                 consts: (f64, f64),
                 sums: (f64, f64),
                 out: Option<SharedMut<MaybeUninit<T>>>| {
        let qr = qr(consts.1, sums);
        for (off, _, ch) in g.runs(set) {
            if let Some(next) = g.next_channel_run(off, ch) {
                prefetch_run(next);
            }
            run_dx(off, ch, consts, qr, out, g.contiguous_sets());
        }
    };
    // `apply` of a block of BatchNorm channels whose runs are one value each (see
    // `Geom::one_value_runs`), sample by sample: each value as `run_dx` computes it.
    let rows_dx = |sets: Range<usize>,
                   consts: &Consts,
                   taken: &[(f64, f64); MAX_STEP_SETS],
                   out: Option<SharedMut<MaybeUninit<T>>>| {
        let k: [_; MAX_STEP_SETS] = std::array::from_fn(|i| {
            let c = (sets.start + i).min(sets.end - 1);
            let (mean, rstd) = consts[i];
            let (q, r) = qr(rstd, taken[i]);
            lanes::grad_consts::<T>(mean, rstd * w[c].widen(), q, r)
        });
        for n in 0..g.n {
            let off = n * g.c + sets.start;
            let xs = &x[off..off + sets.len()];
            match out {
                None => {
                    let dys = unsafe { dyp.slice(off, sets.len()) };
                    for (i, (d, &xv)) in dys.iter_mut().zip(xs).enumerate() {
                        *d = lanes::grad_of(xv, *d, k[i].0, k[i].1);
                    }
                }
                Some(out) => {
                    let (dys, dst) =
                        unsafe { (dyp.slice_ref(off, sets.len()), out.slice(off, sets.len())) };
                    for (i, ((d, &xv), &dv)) in dst.iter_mut().zip(xs).zip(dys).enumerate() {
                        d.write(lanes::grad_of(xv, dv, k[i].0, k[i].1));
                    }
                }
            }
        }
    };
    // `sums` of a block of BatchNorm channels, reading x and dy sample by sample (see
    // `CHANNEL_BLOCK_VALUES`): each channel adds its runs in sample order, as `sums` does.
    let block_sums = |sets: Range<usize>, consts: &Consts, taken: &mut [(f64, f64)]| {
        if fixed && !needs.dw_db {
            return;
        }
        for n in 0..g.n {
            for (i, c) in sets.clone().enumerate() {
                let (tg, tgx) = run_sums((n * g.c + c) * g.s, n, c, consts[i], false);
                taken[i].0 += tg;
                taken[i].1 += tgx;
            }
        }
    };
    // Each set's mean and 1/std: kept by the forward, or recomputed by its own function.
    let consts = |sets: &Range<usize>| -> Consts {
        let mut c = [(0.0, 0.0); MAX_STEP_SETS];
        match stats {
            Some(stats) => {
                for (i, set) in sets.clone().enumerate() {
                    c[i] = (stats.mean[set], rstd(stats.var[set], eps));
                }
            }
            None => {
                let (mut mean, mut var) = ([0.0; MAX_STEP_SETS], [0.0; MAX_STEP_SETS]);
                step_stats(x, &g, sets.clone(), &mut mean, &mut var);
                for i in 0..sets.len() {
                    c[i] = (mean[i], rstd(var[i], eps));
                }
            }
        }
        c
    };
    let step = |sets: Range<usize>, out: Option<SharedMut<MaybeUninit<T>>>| {
        let consts = consts(&sets);
        let mut taken = [(0.0, 0.0); MAX_STEP_SETS];
        if g.channel_block(&sets) {
            block_sums(sets.clone(), &consts, &mut taken);
        } else {
            for (i, set) in sets.clone().enumerate() {
                taken[i] = sums(set, consts[i]);
            }
        }
        if (over_dy || out.is_some()) && g.one_value_runs(&sets) && !fixed {
            rows_dx(sets, &consts, &taken, out);
        } else if over_dy || out.is_some() {
            for (i, set) in sets.enumerate() {
                apply(set, consts[i], taken[i], out);
            }
        }
    };
    // Each channel's partials added in sample order, as `Iterator::sum` adds them (from its own
    // starting value), row by row: a column at a time reads the partials C apart, which for an
    // (N, C) input of many samples is a cache miss per partial.
    let reduce = |part: &[f64]| -> Vec<T> {
        if per_channel || groups_apart {
            return part.iter().map(|&v| T::narrow(v)).collect();
        }
        let mut acc = vec![zero_sum; g.c];
        for row in part.chunks_exact(g.c) {
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += v;
            }
        }
        acc.into_iter().map(T::narrow).collect()
    };
    if let (true, Some(stats)) = (two_pass, stats) {
        // BatchNorm on a large input, training: two passes over the whole tensor in memory
        // order, rather than one channel at a time. Channel by channel, each channel's N runs
        // are C·S apart and its second pass reads them back from L2; in memory order both
        // passes stream x and dy and read ahead. At (32, 64, 56, 56) the backward alone took
        // 4.4 ms instead of 5.0–5.7 (one thread) and 2.1–2.2 instead of 2.4–2.6 (two); on
        // inputs that stay in cache (6.4 MB and less) the channel blocks are faster (0.83
        // against 1.07 ms at (32, 256, 14, 14)). Each run's sums, each channel's totals (its
        // runs' terms added in sample order) and each value of dx are computed as the other
        // path computes them: the same bits.
        let consts: Vec<(f64, f64)> = (0..g.c)
            .map(|c| (stats.mean[c], rstd(stats.var[c], eps)))
            .collect();
        let runs = g.n * g.c;
        // Each run's term of its channel's Σg·x̂/rstd; its term of Σg, w[c]·Σdy, is computed
        // again from the bias gradient's partial (Σdy), as `run_sums` computes it.
        let mut terms_gx = vec![0f64; runs];
        let tp = SharedMut(terms_gx.as_mut_ptr());
        parallel::for_each_index(runs, 2 * g.s, |run| {
            let (n, c) = (run / g.c, run % g.c);
            // Every run is one index's.
            unsafe { tp.slice(run, 1)[0] = run_sums(run * g.s, n, c, consts[c], true).1 };
        });
        // Each channel's (q, r), its runs' terms added in sample order.
        let qr: Vec<(f64, f64)> = (0..g.c)
            .map(|c| {
                let wc = w[c].widen();
                let (mut sum_g, mut sum_gx) = (0.0, 0.0);
                for n in 0..g.n {
                    sum_g += wc * part_b[n * g.c + c];
                    sum_gx += terms_gx[n * g.c + c];
                }
                qr(consts[c].1, (sum_g, sum_gx))
            })
            .collect();
        let pass = |out: Option<SharedMut<MaybeUninit<T>>>| {
            parallel::for_each_index(runs, 2 * g.s, |run| {
                let c = run % g.c;
                run_dx(run * g.s, c, consts[c], qr[c], out, true);
            })
        };
        let dx = if needs.dx && !over_dy {
            Some(filled(x.len(), |out| pass(Some(out))))
        } else {
            if over_dy {
                pass(None);
            }
            None
        };
        return (dx, reduce(&part_w), reduce(&part_b));
    }
    if groups_apart && needs.dw_db {
        // Each channel's terms, as `run_sums` takes them, added in sample order; whole groups,
        // at least a cache line of f32 channels, to a task. Each set's mean and 1/std as the
        // steps have them: kept, or recomputed by the forward's own functions.
        let Sets::Groups(groups) = g.sets else {
            unreachable!("groups_apart is for groups")
        };
        let cg = g.c / groups;
        let per_task = 16usize.div_ceil(cg);
        parallel::for_each_index(groups.div_ceil(per_task), 2 * per_task * cg * g.n, |task| {
            for n in 0..g.n {
                for group in task * per_task..((task + 1) * per_task).min(groups) {
                    let set = n * groups + group;
                    let (mean, rstd) = match stats {
                        Some(stats) => (stats.mean[set], rstd(stats.var[set], eps)),
                        None => {
                            // `consts` for one set, without its arrays for a step's sets: for
                            // sets of a few values those made this pass 20-30% slower.
                            let (mut s1, mut s2): (Acc, Acc) = ([0.0; LANES], [0.0; LANES]);
                            let k = set_sums(x, &g, set, &mut s1, &mut s2);
                            let (mean, var) = mean_var(&s1, &s2, k, m);
                            (mean, rstd(var, eps))
                        }
                    };
                    for c in group * cg..(group + 1) * cg {
                        let off = n * g.c + c;
                        let dv = unsafe { dyp.slice_ref(off, 1) }[0];
                        // Every channel is one task's.
                        add_to_channel(c, rstd, lanes::grad_sums_one(x[off], dv, mean));
                    }
                }
            }
        });
    }
    let dx = if needs.dx && !over_dy {
        Some(filled(x.len(), |out| {
            g.par_steps(|sets| step(sets, Some(out)))
        }))
    } else {
        g.par_steps(|sets| step(sets, None));
        None
    };
    (dx, reduce(&part_w), reduce(&part_b))
}

/// The fused op on (x, weight, bias): with batch statistics (which land in `stats`), or with
/// fixed ones already in `stats` (`fixed`, evaluation).
struct NormOp {
    sets: Sets,
    eps: f64,
    fixed: bool,
    /// Whether the caller needs the batch statistics (else they are kept only where
    /// [`stats_are_cheap`]).
    keep_stats: bool,
    /// Set by the forward: the statistics, or `None` where the backward recomputes them.
    stats: Arc<OnceLock<Option<Stats>>>,
}

fn contiguous<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => bail!("fused normalization: the {what} must be contiguous"),
    }
}

impl NormOp {
    fn run_forward<T: Float>(&self, x: &[T], w: &[T], b: &[T], g: Geom) -> Result<Vec<T>> {
        if self.fixed {
            let Some(Some(stats)) = self.stats.get() else {
                bail!("fused normalization: fixed statistics missing");
            };
            return Ok(forward_fixed(x, w, b, g, stats, self.eps));
        }
        let keep = self.keep_stats || stats_are_cheap::<T>(&g);
        let (y, stats) = forward(x, w, b, g, self.eps, keep);
        // An op instance runs forward once; a second run would compute the same statistics.
        let _ = self.stats.set(stats);
        Ok(y)
    }
}

impl CustomOp3 for NormOp {
    fn name(&self) -> &'static str {
        "normbench-fused-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geom::new(l1.dims(), self.sets)?;
        macro_rules! run {
            ($t:ty, $variant:ident) => {
                CpuStorage::$variant(self.run_forward::<$t>(
                    contiguous(s1, l1, "input")?,
                    contiguous(s2, l2, "weight")?,
                    contiguous(s3, l3, "bias")?,
                    g,
                )?)
            };
        }
        let y = match s1 {
            CpuStorage::F32(_) => run!(f32, F32),
            CpuStorage::F64(_) => run!(f64, F64),
            other => bail!(
                "fused normalization takes f32 or f64, got {:?}",
                other.dtype()
            ),
        };
        Ok((y, l1.shape().clone()))
    }

    /// Writes dx over `dy` where it can: candle's backprop hands each op the output gradient it
    /// summed for that node alone (a fresh tensor removed from its store) and drops it after
    /// this call, so no one else sees it. That saves the input gradient's allocation and the
    /// cache misses of writing to memory not yet read.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(stats) = self.stats.get() else {
            bail!("fused normalization: backward before forward");
        };
        let stats = stats.as_ref();
        let needs = Needs {
            dx: x.track_op(),
            dw_db: w.track_op() || b.track_op(),
        };
        let ctx = GradCtx {
            g: Geom::new(x.dims(), self.sets)?,
            stats,
            eps: self.eps,
            fixed: self.fixed,
            needs,
        };
        let (dx, dw, db) = ctx.grads(x, w, dy, true)?;
        Ok((dx, w.track_op().then_some(dw), b.track_op().then_some(db)))
    }
}

/// What the backward pass of one op call needs besides the tensors.
struct GradCtx<'a> {
    g: Geom,
    /// The forward's statistics; `None`: recompute them (see [`stats_are_cheap`]).
    stats: Option<&'a Stats>,
    eps: f64,
    fixed: bool,
    needs: Needs,
}

/// Whether `t` is contiguous and covers its whole buffer from the start.
fn whole_buffer(t: &Tensor) -> bool {
    let (s, l) = t.storage_and_layout();
    let len = match &*s {
        candle_core::Storage::Cpu(CpuStorage::F32(v)) => v.len(),
        candle_core::Storage::Cpu(CpuStorage::F64(v)) => v.len(),
        _ => return false,
    };
    l.contiguous_offsets() == Some((0, len))
}

impl GradCtx<'_> {
    /// Gradients (dx if `needs.dx`, dw, db) of the op on `x` (contiguous); with `overwrite`,
    /// dx is written over `dy` (or over its contiguous copy) and returned as `dy` itself.
    fn grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        overwrite: bool,
    ) -> Result<(Option<Tensor>, Tensor, Tensor)> {
        let dy = dy.contiguous()?;
        if overwrite && self.needs.dx && dy.dtype() == x.dtype() && whole_buffer(&dy) {
            let op = OverDy {
                ctx: self,
                dw_db: Mutex::new(None),
            };
            dy.inplace_op3(x, w, &op)?;
            let Some((dw, db)) = op.dw_db.into_inner().ok().flatten() else {
                bail!("fused normalization: the backward pass left no weight gradient");
            };
            return Ok((Some(dy), dw, db));
        }
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (ds, dl) = dy.storage_and_layout();
        let (
            candle_core::Storage::Cpu(xs),
            candle_core::Storage::Cpu(ws),
            candle_core::Storage::Cpu(ds),
        ) = (&*xs, &*ws, &*ds)
        else {
            bail!("fused normalization runs on the CPU only");
        };
        macro_rules! grads {
            ($t:ty) => {{
                let dy = Dy::Read(contiguous::<$t>(ds, dl, "output gradient")?);
                let (dx, dw, db) = self.run::<$t>(xs, xl, ws, wl, dy)?;
                let dx = dx.map(|dx| Tensor::from_vec(dx, x.shape(), x.device()));
                (dx.transpose()?, dw, db)
            }};
        }
        Ok(match xs {
            CpuStorage::F32(_) => grads!(f32),
            CpuStorage::F64(_) => grads!(f64),
            other => bail!(
                "fused normalization takes f32 or f64, got {:?}",
                other.dtype()
            ),
        })
    }

    /// The typed backward pass: (dx unless written over dy, dw, db).
    fn run<T: Float>(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        dy: Dy<'_, T>,
    ) -> Result<(Option<Vec<T>>, Tensor, Tensor)> {
        let (dx, dw, db) = backward::<T>(
            contiguous(xs, xl, "input")?,
            contiguous(ws, wl, "weight")?,
            dy,
            self,
        );
        let cpu = &candle_core::Device::Cpu;
        Ok((
            dx,
            Tensor::from_vec(dw, self.g.c, cpu)?,
            Tensor::from_vec(db, self.g.c, cpu)?,
        ))
    }
}

/// The backward pass as an in-place op on dy (with x and the weight as sources), keeping the
/// weight and bias gradients it computes on the side.
struct OverDy<'a> {
    ctx: &'a GradCtx<'a>,
    dw_db: Mutex<Option<(Tensor, Tensor)>>,
}

impl InplaceOp3 for OverDy<'_> {
    fn name(&self) -> &'static str {
        "normbench-fused-norm-backward"
    }

    fn cpu_fwd(
        &self,
        dy: &mut CpuStorage,
        _: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<()> {
        let (dw, db) = match dy {
            CpuStorage::F32(d) => {
                let (_, dw, db) = self.ctx.run::<f32>(xs, xl, ws, wl, Dy::Overwrite(d))?;
                (dw, db)
            }
            CpuStorage::F64(d) => {
                let (_, dw, db) = self.ctx.run::<f64>(xs, xl, ws, wl, Dy::Overwrite(d))?;
                (dw, db)
            }
            other => bail!(
                "fused normalization takes f32 or f64, got {:?}",
                other.dtype()
            ),
        };
        if let Ok(mut slot) = self.dw_db.lock() {
            *slot = Some((dw, db));
        }
        Ok(())
    }
}

/// Refuses `t` unless it has shape (C) and `x`'s dtype: the kernels index the per-channel
/// operands by `x`'s channels, so this is what keeps them in bounds.
fn check_per_channel(what: &str, x: &Tensor, t: &Tensor) -> Result<()> {
    let c = x.dims().get(1).copied().unwrap_or(0);
    if t.dims() != [c] || t.dtype() != x.dtype() {
        bail!(
            "fused normalization: {what} must have shape ({c}) and dtype {:?}, as x {:?}; got {:?} {:?}",
            x.dtype(),
            x.dims(),
            t.dims(),
            t.dtype()
        );
    }
    Ok(())
}

/// The input's geometry, once its weight and bias are checked against it.
fn checked_geom(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, sets: Sets) -> Result<Geom> {
    let g = Geom::new(x.dims(), sets)?;
    check_per_channel("weight", x, weight)?;
    if let Some(bias) = bias {
        check_per_channel("bias", x, bias)?;
    }
    Ok(g)
}

/// Refuses statistics that are not one mean and one variance per set of `g`.
fn check_stats(g: &Geom, stats: &Stats) -> Result<()> {
    let sets = g.num_sets();
    if stats.mean.len() != sets || stats.var.len() != sets {
        bail!(
            "fused normalization: {} means and {} variances for {sets} sets",
            stats.mean.len(),
            stats.var.len()
        );
    }
    Ok(())
}

fn apply(x: &Tensor, weight: &Tensor, bias: &Tensor, op: NormOp) -> Result<Tensor> {
    checked_geom(x, weight, Some(bias), op.sets)?;
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)
}

/// Normalizes `x` (N, C, ...), f32 or f64, over `sets` with its own statistics and applies
/// the per-channel affine (`weight`, `bias` of shape (C), same dtype); returns the output (the
/// shape of `x`) and the sets' statistics.
pub fn fused_normalize(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    sets: Sets,
    eps: f64,
) -> Result<(Tensor, SharedStats)> {
    let stats = Arc::new(OnceLock::new());
    let op = NormOp {
        sets,
        eps,
        fixed: false,
        keep_stats: true,
        stats: stats.clone(),
    };
    let y = apply(x, weight, bias, op)?;
    if !matches!(stats.get(), Some(Some(_))) {
        bail!("fused normalization: forward left no statistics");
    }
    Ok((y, SharedStats(stats)))
}

/// `fused_normalize` for a caller that does not need the statistics (no running statistics to
/// update): the op keeps them for its backward only where they are small next to the input
/// (sets of 128 f32 values or more); for smaller sets its backward recomputes each set's
/// statistics with the forward's own function, the same bits, and the forward holds nothing
/// beyond its output. (InstanceNorm at (8, 512, 7, 7): 8% of the input less, for a backward
/// that reads x once more, from cache.)
pub fn fused_normalize_lean(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    sets: Sets,
    eps: f64,
) -> Result<Tensor> {
    let op = NormOp {
        sets,
        eps,
        fixed: false,
        keep_stats: false,
        stats: Arc::new(OnceLock::new()),
    };
    apply(x, weight, bias, op)
}

/// Whether [`fused_normalize_lean`] keeps the statistics of an input of shape `dims` and type
/// `dtype` (f32 or f64) for its backward, or lets the backward recompute them.
pub fn lean_keeps_stats(dims: &[usize], sets: Sets, dtype: candle_core::DType) -> Result<bool> {
    let g = Geom::new(dims, sets)?;
    Ok(match dtype {
        candle_core::DType::F64 => stats_are_cheap::<f64>(&g),
        _ => stats_are_cheap::<f32>(&g),
    })
}

/// The statistics of a training forward, shared with the op that keeps them for the backward
/// rather than copied: with many small sets (InstanceNorm on 7×7 planes) a copy is 8% of the
/// input.
#[derive(Clone)]
pub struct SharedStats(Arc<OnceLock<Option<Stats>>>);

impl std::ops::Deref for SharedStats {
    type Target = Stats;

    fn deref(&self) -> &Stats {
        // Only `fused_normalize` makes one, after checking that the statistics are set.
        self.0
            .get()
            .and_then(Option::as_ref)
            .expect("SharedStats made from a forward that kept its statistics")
    }
}

/// Normalizes each channel of `x` (N, C, ...) with the given statistics (`stats.mean` and
/// `stats.var`, one per channel) and applies the affine: evaluation with running statistics.
/// Gradients flow to `x`, `weight` and `bias`, not through the statistics.
pub fn fused_normalize_fixed(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stats: Stats,
    eps: f64,
) -> Result<Tensor> {
    check_stats(
        &checked_geom(x, weight, Some(bias), Sets::Channels)?,
        &stats,
    )?;
    let op = NormOp {
        sets: Sets::Channels,
        eps,
        fixed: true,
        keep_stats: true,
        stats: Arc::new(OnceLock::from(Some(stats))),
    };
    apply(x, weight, bias, op)
}

/// The fused backward pass on its own, outside autograd (for benchmarks): the gradients
/// (dx, dweight, dbias) of `fused_normalize(x, weight, _, sets, eps)` for an output gradient
/// `dy`, given the statistics that call returned (`None`: recomputed, as the backward of
/// [`fused_normalize_lean`] does where it kept none).
pub fn fused_backward(
    x: &Tensor,
    weight: &Tensor,
    dy: &Tensor,
    sets: Sets,
    stats: Option<&Stats>,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let g = checked_geom(x, weight, None, sets)?;
    if dy.dims() != x.dims() || dy.dtype() != x.dtype() {
        bail!(
            "fused normalization: the output gradient must have the input's shape {:?} and dtype \
             {:?}; got {:?} {:?}",
            x.dims(),
            x.dtype(),
            dy.dims(),
            dy.dtype()
        );
    }
    if let Some(stats) = stats {
        check_stats(&g, stats)?;
    }
    let ctx = GradCtx {
        g,
        stats,
        eps,
        fixed: false,
        needs: Needs {
            dx: true,
            dw_db: true,
        },
    };
    let (dx, dw, db) = ctx.grads(&x.contiguous()?, &weight.contiguous()?, dy, false)?;
    let Some(dx) = dx else {
        bail!("fused normalization: no input gradient");
    };
    Ok((dx, dw, db))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn grads_of(dy: &Tensor, x: &Tensor, w: &Tensor, stats: &Stats, overwrite: bool) -> Tensor {
        let ctx = GradCtx {
            g: Geom::new(x.dims(), Sets::Groups(2)).unwrap(),
            stats: Some(stats),
            eps: 1e-5,
            fixed: false,
            needs: Needs {
                dx: true,
                dw_db: true,
            },
        };
        let (dx, _, _) = ctx.grads(x, w, dy, overwrite).unwrap();
        dx.unwrap()
    }

    /// `len` values in [−0.5, 0.5) from a fixed linear congruential sequence.
    fn uniform(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    }

    /// Inputs for a kernel test on (n, c, s): x (off zero, with a pattern), dy, w, b.
    #[allow(clippy::type_complexity)]
    fn inputs(n: usize, c: usize, s: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
        let x = uniform(n * c * s, 0x2545_f491_4f6c_dd1d)
            .into_iter()
            .enumerate()
            .map(|(i, v)| 3.0 + v + (i % 7) as f32)
            .collect();
        let dy = uniform(n * c * s, 0x9e37_79b9_7f4a_7c15);
        (
            x,
            dy,
            (0..c).map(|i| 0.5 + i as f32).collect(),
            vec![0.25; c],
        )
    }

    /// Every output of the training forward and of the backward variants, which must agree to
    /// the bit: into a new buffer, over dy, and with the statistics recomputed (the backward of
    /// `fused_normalize_lean` where it keeps none). The forward that keeps no statistics must
    /// give the same output.
    #[allow(clippy::type_complexity)]
    fn all_outputs<T: Float>(
        x: &[T],
        dy: &[T],
        w: &[T],
        b: &[T],
        g: Geom,
    ) -> (Vec<T>, Stats, Vec<T>, Vec<T>, Vec<T>) {
        let (y, stats) = forward(x, w, b, g, 1e-5, true);
        let stats = stats.unwrap();
        let ctx = |stats| GradCtx {
            g,
            stats,
            eps: 1e-5,
            fixed: false,
            needs: Needs {
                dx: true,
                dw_db: true,
            },
        };
        let (dx, dw, db) = backward(x, w, Dy::Read(dy), &ctx(Some(&stats)));
        let mut over = dy.to_vec();
        let (none, dw2, db2) = backward(x, w, Dy::Overwrite(&mut over), &ctx(Some(&stats)));
        assert!(none.is_none());
        assert!((&dw, &db) == (&dw2, &db2));
        let dx = dx.unwrap();
        assert!(dx == over);
        let (dx3, dw3, db3) = backward(x, w, Dy::Read(dy), &ctx(None));
        assert!(dx3.as_ref() == Some(&dx), "dx with recomputed statistics");
        assert!(
            (&dw, &db) == (&dw3, &db3),
            "dw, db with recomputed statistics"
        );
        let (y_lean, kept) = forward(x, w, b, g, 1e-5, false);
        assert!(kept.is_none() && y_lean == y);
        (y, stats, dx, dw, db)
    }

    /// Every reduction has a fixed partition: no output may change by a bit with the number of
    /// threads, whether a task's step takes one set or several.
    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        // Sets of 1,517 values (one per step) and of 63 (eight per step); each shape is
        // large enough for several tasks.
        for (n, c, s) in [(6, 12, 1517), (32, 64, 63)] {
            let (x, dy, w, b) = inputs(n, c, s);
            for sets in [
                Sets::Channels,
                Sets::Groups(1),
                Sets::Groups(4),
                Sets::Groups(c),
            ] {
                let g = Geom::new(&[n, c, s], sets).unwrap();
                let on = |threads: usize| {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    pool.install(|| all_outputs(&x, &dy, &w, &b, g))
                };
                let one = on(1);
                for threads in [2, 3, 5] {
                    let many = on(threads);
                    let what = format!("{sets:?} on {:?}, {threads} threads", [n, c, s]);
                    assert!(one.0 == many.0, "forward output, {what}");
                    assert_eq!(one.1, many.1, "statistics, {what}");
                    assert!(one.2 == many.2, "input gradient, {what}");
                    assert_eq!((&one.3, &one.4), (&many.3, &many.4), "dw, db, {what}");
                }
            }
        }
    }

    /// BatchNorm on a large input prefetches and streams its output, and its backward makes two
    /// passes in memory order; none of it may change a bit of any output, in f32 or in f64, and
    /// the backward writing over dy must give what it gives elsewhere.
    #[test]
    fn streaming_changes_no_value() {
        // An odd S: runs start off 16-byte alignment, so the streamed copies have heads and tails.
        let (n, c, s) = (3, 5, 280_001);
        let (x, dy, w, b) = inputs(n, c, s);
        let on = Geom::new(&[n, c, s], Sets::Channels).unwrap();
        assert!(on.streaming);
        let off = Geom {
            streaming: false,
            ..on
        };
        same_outputs(&x, &dy, &w, &b, on, off);
        same_outputs(&wide(&x), &wide(&dy), &wide(&w), &wide(&b), on, off);
    }

    /// Every output of `all_outputs` is the same bits with geometry `on` as with `off`.
    fn same_outputs<T: Float>(x: &[T], dy: &[T], w: &[T], b: &[T], on: Geom, off: Geom) {
        let (a, b2) = (all_outputs(x, dy, w, b, on), all_outputs(x, dy, w, b, off));
        assert!(a.0 == b2.0, "forward output");
        assert_eq!(a.1, b2.1, "statistics");
        assert!(a.2 == b2.2, "input gradient");
        assert!((a.3, a.4) == (b2.3, b2.4), "weight and bias gradients");
    }

    /// `v` in f64 (the backward's float64 sums then reach dx unrounded).
    fn wide(v: &[f32]) -> Vec<f64> {
        v.iter().map(|&v| v as f64).collect()
    }

    /// Runs of one value (an (N, C) input) go value by value: every output keeps the bits of
    /// the lane-wise loops, for BatchNorm's blocks (of 8 channels and a last one of 3, and one
    /// large enough for several threads' steps) and for groups, in f32 and in f64.
    #[test]
    fn one_value_runs_change_no_value() {
        for (n, c) in [(37, 19), (2000, 64)] {
            let (x, dy, w, b) = inputs(n, c, 1);
            for sets in [Sets::Channels, Sets::Groups(1), Sets::Groups(c)] {
                let on = Geom::new(&[n, c, 1], sets).unwrap();
                let off = Geom {
                    short_runs: false,
                    ..on
                };
                same_outputs(&x, &dy, &w, &b, on, off);
                same_outputs(&wide(&x), &wide(&dy), &wide(&w), &wide(&b), on, off);
            }
        }
    }

    /// BatchNorm's blocks of channels, read sample by sample, give every output the bits that
    /// one channel at a time gives (blocks of 8 channels and a last one of 3), in f32 and in f64
    /// (where the backward's float64 sums reach dx unrounded).
    #[test]
    fn channel_blocks_change_no_value() {
        let (n, c, s) = (6, 11, 97);
        let (x, dy, w, b) = inputs(n, c, s);
        let on = Geom::new(&[n, c, s], Sets::Channels).unwrap();
        assert_eq!(on.sets_per_step(), MAX_USUAL_STEP_SETS);
        let off = Geom {
            channel_blocks: false,
            ..on
        };
        same_outputs(&x, &dy, &w, &b, on, off);
        same_outputs(&wide(&x), &wide(&dy), &wide(&w), &wide(&b), on, off);
    }

    #[test]
    fn dx_goes_over_a_whole_contiguous_dy_and_nowhere_else() {
        let cpu = &Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 4, 3, 5), cpu).unwrap();
        let (w, b) = (
            Tensor::ones(4, DType::F32, cpu).unwrap(),
            Tensor::zeros(4, DType::F32, cpu).unwrap(),
        );
        let (_, stats) = fused_normalize(&x, &w, &b, Sets::Groups(2), 1e-5).unwrap();
        let dy = Tensor::randn(0f32, 1.0, (2, 4, 3, 5), cpu).unwrap();
        let before = dy.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // Allocating: dy is left alone.
        let dx = grads_of(&dy, &x, &w, &stats, false);
        let want = dx.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(dy.flatten_all().unwrap().to_vec1::<f32>().unwrap(), before);
        assert_ne!(want, before);
        // A strided dy is copied first; the copy takes dx.
        let dy_t = dy.transpose(2, 3).unwrap().contiguous().unwrap();
        let strided = dy_t.transpose(2, 3).unwrap();
        let dx_s = grads_of(&strided, &x, &w, &stats, true);
        assert_eq!(dx_s.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
        assert_eq!(
            strided.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            before
        );
        // Part of a larger buffer: not overwritten.
        let wide = Tensor::cat(&[&dy, &dy], 0).unwrap();
        let part = wide.narrow(0, 2, 2).unwrap();
        let dx_p = grads_of(&part, &x, &w, &stats, true);
        assert_eq!(dx_p.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
        assert_eq!(
            part.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            before
        );
        // A whole contiguous dy becomes dx, with the same values.
        let dx_o = grads_of(&dy, &x, &w, &stats, true);
        assert_eq!(dy.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
        assert_eq!(dx_o.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
    }
}
