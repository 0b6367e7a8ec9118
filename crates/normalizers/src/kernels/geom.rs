//! How a tensor's values form sets, the kernels' step sizes, and the shared-pointer helper.

use super::parallel;
use candle_core::{bail, Result};
use std::mem::MaybeUninit;
use std::ops::Range;

/// Values that a task's step takes at once when sets are small (see [`Geom::par_steps`]): the
/// statistics (or gradient sums) of a few sets first, then their outputs, so that one set's
/// chain of dependent scalar work (sums, a square root, divisions) overlaps the next set's
/// loads instead of stalling between them. For InstanceNorm's sets of 196 and 49 values, at
/// (32, 256, 14, 14) and (8, 512, 7, 7), it took 8% and 20% off the forward (1% and 7% off
/// the backward); for sets of 1,000 values and more it changes nothing.
pub(super) const STEP_VALUES: usize = 1024;

/// The most sets one step takes: [`MAX_USUAL_STEP_SETS`], or for BatchNorm's runs of one value
/// (see [`Geom::sets_per_step`]) a cache line of f32 channels.
pub(super) const MAX_STEP_SETS: usize = 16;

/// The most sets one step takes, but for BatchNorm's runs of one value.
pub(super) const MAX_USUAL_STEP_SETS: usize = 8;

/// Values of x that a BatchNorm step takes at once (see [`Geom::par_steps`]): a block of
/// channels whose reductions read x sample by sample. One channel's runs are S values each, C·S
/// apart; a sample's runs for the block's channels are one stretch of memory, which the hardware
/// prefetcher follows. The block (256 KiB of f32) stays in L2 for its second pass.
pub(super) const CHANNEL_BLOCK_VALUES: usize = 1 << 16;

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
pub(super) struct Geom {
    pub(super) n: usize,
    pub(super) c: usize,
    pub(super) s: usize,
    pub(super) sets: Sets,
    /// BatchNorm on a large input: its forward's passes prefetch the runs they read next (see
    /// [`prefetch`]; so does the evaluation backward) and write y with non-temporal stores (see
    /// [`stream_copy`]); its training backward makes two passes in memory order (`backward`).
    pub(super) streaming: bool,
    /// BatchNorm's steps take blocks of channels read sample by sample (see
    /// [`CHANNEL_BLOCK_VALUES`]); always, but for the test that this changes no bit.
    pub(super) channel_blocks: bool,
    /// BatchNorm's blocks of runs of one value go value by value (see [`Geom::one_value_runs`]);
    /// always, but for the test that this changes no bit.
    pub(super) short_runs: bool,
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
pub(super) const STREAMING_MIN_VALUES: usize = 1 << 22;

/// Values per run from which BatchNorm streams (1 KiB of f32): prefetching and streaming runs
/// of a few values costs more than it saves.
pub(super) const STREAMING_MIN_RUN: usize = 256;

impl Geom {
    pub(super) fn new(dims: &[usize], sets: Sets) -> Result<Self> {
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

    pub(super) fn num_sets(&self) -> usize {
        match self.sets {
            Sets::Channels => self.c,
            Sets::Groups(g) => self.n * g,
        }
    }

    /// Values per set.
    pub(super) fn set_len(&self) -> usize {
        match self.sets {
            Sets::Channels => self.n * self.s,
            Sets::Groups(g) => self.c / g * self.s,
        }
    }

    /// The runs of `set` in memory order: (offset, sample, channel) of each (sample, channel)
    /// row of S values.
    #[inline(always)]
    pub(super) fn runs(&self, set: usize) -> impl Iterator<Item = (usize, usize, usize)> {
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
    pub(super) fn next_sample_run(&self, off: usize, n: usize) -> Option<usize> {
        (self.streaming && n + 1 < self.n).then_some(off + self.c * self.s)
    }

    /// For BatchNorm: the offset of the same sample's run in the next channel, if any. While
    /// one channel's second pass reads its runs from cache, the next channel's come in.
    #[inline(always)]
    pub(super) fn next_channel_run(&self, off: usize, ch: usize) -> Option<usize> {
        (self.streaming && ch + 1 < self.c).then_some(off + self.s)
    }

    /// Whether each set is one stretch of memory, the next set's right after it (`Groups`):
    /// then the loops read (and write) ahead of their runs (see [`lanes::READ_AHEAD_BYTES`]).
    #[inline(always)]
    pub(super) fn contiguous_sets(&self) -> bool {
        matches!(self.sets, Sets::Groups(_))
    }

    /// Sets that one step of a task takes together (see [`Geom::par_steps`]): as many as
    /// hold about [`STEP_VALUES`] values ([`CHANNEL_BLOCK_VALUES`] for BatchNorm), at most
    /// [`MAX_STEP_SETS`], at least one.
    pub(super) fn sets_per_step(&self) -> usize {
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
    pub(super) fn channel_block(&self, sets: &Range<usize>) -> bool {
        self.channel_blocks && self.sets == Sets::Channels && sets.len() > 1
    }

    /// Whether a step's sets are a block of BatchNorm channels whose runs are one value each
    /// (an (N, C) input): then its passes go value by value along each sample's row, with the
    /// operations the lane-wise loops apply to lane 0 of a one-value run (its other lanes only
    /// ever add exact zeros), rather than a loop call per value. The same bits.
    #[inline(always)]
    pub(super) fn one_value_runs(&self, sets: &Range<usize>) -> bool {
        self.short_runs && self.s == 1 && self.channel_block(sets)
    }

    /// Runs `f` on consecutive ranges of [`Geom::sets_per_step`] sets that together cover
    /// every set, on the current rayon pool's threads (see [`parallel::for_each_index`]). The
    /// partition decides only who computes a set, never how.
    pub(super) fn par_steps(&self, f: impl Fn(Range<usize>) + Sync + Send) {
        let (sets, step) = (self.num_sets(), self.sets_per_step());
        parallel::for_each_index(sets.div_ceil(step), step * self.set_len(), |i| {
            f(i * step..((i + 1) * step).min(sets))
        });
    }
}

/// A raw pointer that tasks write through at disjoint offsets.
#[derive(Clone, Copy)]
pub(super) struct SharedMut<T>(pub(super) *mut T);
unsafe impl<T: Send> Send for SharedMut<T> {}
unsafe impl<T: Send> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// # Safety
    /// No two tasks may touch the same `offset..offset + len`, and it must be in bounds.
    #[allow(clippy::mut_from_ref)]
    #[inline(always)]
    pub(super) unsafe fn slice(&self, offset: usize, len: usize) -> &mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(offset), len)
    }

    /// # Safety
    /// No task may write `offset..offset + len` while the slice lives, and it must be in bounds.
    #[inline(always)]
    pub(super) unsafe fn slice_ref(&self, offset: usize, len: usize) -> &[T] {
        std::slice::from_raw_parts(self.0.add(offset), len)
    }
}

/// 1/sqrt(σ² + eps): one expression for forward and backward, so both see the same bits.
#[inline(always)]
pub(super) fn rstd(var: f64, eps: f64) -> f64 {
    1.0 / (var + eps).sqrt()
}

/// A vector of `len` values, every one of them written by `fill` through disjoint slices.
pub(super) fn filled<T>(len: usize, fill: impl FnOnce(SharedMut<MaybeUninit<T>>)) -> Vec<T> {
    let mut v = Vec::with_capacity(len);
    fill(SharedMut(v.spare_capacity_mut().as_mut_ptr()));
    // SAFETY: callers write all `len` values (the sets partition the tensor).
    unsafe { v.set_len(len) };
    v
}
