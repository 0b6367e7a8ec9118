//! The backward pass: per set, one pass for Σdy and Σdy·(x − μ) per run, one for dx; the
//! weight and bias gradients from the same sums.

use super::geom::*;
use super::lanes::{self, Acc, Float, LANES};
use super::normalize::*;
use super::parallel;
use std::mem::MaybeUninit;
use std::ops::Range;

/// The (mean, 1/std) of each set of a step.
pub(super) type Consts = [(f64, f64); MAX_STEP_SETS];

/// Which gradients the backward pass must produce.
#[derive(Debug, Clone, Copy)]
pub(super) struct Needs {
    pub(super) dx: bool,
    pub(super) dw_db: bool,
}

/// The output gradient the backward pass reads, and whether it may write dx over it.
pub(super) enum Dy<'a, T> {
    Read(&'a [T]),
    Overwrite(&'a mut [T]),
}

/// Where dx goes: over dy (`None`) or into a new buffer.
pub(super) type DxOut<T> = Option<SharedMut<MaybeUninit<T>>>;

/// One backward call: its inputs, what it must produce, and the weight and bias gradients'
/// partial sums that its tasks write at disjoint places.
///
/// SAFETY (for every slice of x, dy, dx taken by its methods): runs of different sets never
/// overlap, each set is one task's, and within it no slice of dy outlives the write over it.
pub(super) struct Backward<'a, T> {
    x: &'a [T],
    w: &'a [T],
    g: Geom,
    stats: Option<&'a Stats>,
    eps: f64,
    fixed: bool,
    needs: Needs,
    /// Values per set.
    m: f64,
    /// dy; only written through when `over_dy` (then it came from a `&mut`).
    dyp: SharedMut<T>,
    over_dy: bool,
    /// Where each channel is one step's (BatchNorm, but for two passes), the weight and bias
    /// gradients' sums of dy·x̂ and dy are added up per channel as its runs come, in sample
    /// order; elsewhere one partial per (sample, channel), added over samples afterwards
    /// ([`Backward::reduce`]). Either way from `Iterator::sum`'s own starting value, in the same
    /// order.
    per_channel: bool,
    /// Groups of one-value runs: the weight and bias gradients come from a pass of their own
    /// ([`Backward::groups_pass`]), per channel in sample order, before dx may overwrite dy; a
    /// partial per (sample, channel) would be four times such an input.
    groups_apart: bool,
    pw: SharedMut<f64>,
    pb: SharedMut<f64>,
}

/// Gradients (dx, dw, db) given the statistics in `ctx`; with `fixed` statistics (evaluation)
/// no gradient flows through them. With `Dy::Overwrite` and `needs.dx`, dx is written over dy
/// (each set's values once its sums are taken) and the returned dx is `None`.
pub(super) fn backward<T: Float>(
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
    // BatchNorm on a large input, training: two passes in memory order.
    let two_pass = g.streaming && !fixed && stats.is_some();
    let per_channel = g.sets == Sets::Channels && !two_pass;
    let groups_apart = matches!(g.sets, Sets::Groups(_)) && g.s == 1 && g.short_runs;
    let zero_sum = std::iter::empty::<f64>().sum::<f64>();
    let parts = if per_channel || groups_apart {
        g.c
    } else {
        g.n * g.c
    };
    let mut part_w = vec![zero_sum; parts];
    let mut part_b = vec![zero_sum; parts];
    let (dyp, over_dy) = match dy {
        Dy::Read(d) => (SharedMut(d.as_ptr().cast_mut()), false),
        Dy::Overwrite(d) => (SharedMut(d.as_mut_ptr()), needs.dx),
    };
    let b = Backward {
        x,
        w,
        g,
        stats,
        eps,
        fixed,
        needs,
        m: g.set_len() as f64,
        dyp,
        over_dy,
        per_channel,
        groups_apart,
        pw: SharedMut(part_w.as_mut_ptr()),
        pb: SharedMut(part_b.as_mut_ptr()),
    };
    let dx = match (two_pass, stats) {
        (true, Some(stats)) => b.two_pass(stats),
        _ => {
            if groups_apart && needs.dw_db {
                b.groups_pass();
            }
            b.steps()
        }
    };
    (dx, b.reduce(&part_w), b.reduce(&part_b))
}

impl<T: Float> Backward<'_, T> {
    /// x's and dy's run at `next` (see `Geom::next_sample_run`, `Geom::next_channel_run`).
    fn prefetch_run(&self, next: usize) {
        prefetch(self.x[next..].as_ptr(), self.g.s);
        prefetch(self.dyp.0.wrapping_add(next).cast_const(), self.g.s);
    }

    /// A run's terms added to its channel's sums, which only one task adds to, in sample order
    /// (`per_channel`, and the pass for `groups_apart`).
    fn add_to_channel(&self, ch: usize, rstd: f64, (sd, sdx): (f64, f64)) {
        // SAFETY: every channel is one task's.
        unsafe {
            self.pw.slice(ch, 1)[0] += rstd * sdx;
            self.pb.slice(ch, 1)[0] += sd;
        }
    }

    /// One run's sums (sample n, channel ch, at `off`) into the partials; returns its terms of
    /// the set's (Σg, Σg·x̂/rstd). `ahead`: whether the memory after the run is read next (see
    /// `lanes::READ_AHEAD_BYTES`).
    fn run_sums(
        &self,
        off: usize,
        n: usize,
        ch: usize,
        (mean, rstd): (f64, f64),
        ahead: bool,
    ) -> (f64, f64) {
        let (g, x, dyp) = (&self.g, self.x, self.dyp);
        let (sd, sdx) = if g.s == 1 && g.short_runs {
            lanes::grad_sums_one(x[off], unsafe { dyp.slice_ref(off, 1) }[0], mean)
        } else {
            let dys = unsafe { dyp.slice_ref(off, g.s) };
            lanes::grad_sums(&x[off..off + g.s], dys, mean, ahead)
        };
        // Every (sample, channel) pair belongs to exactly one set, and with `per_channel`
        // every channel to one step, which takes its runs in sample order.
        if self.per_channel {
            self.add_to_channel(ch, rstd, (sd, sdx));
        } else if !self.groups_apart {
            // `groups_apart`: taken by the pass of their own.
            unsafe {
                self.pw.slice(n * g.c + ch, 1)[0] = rstd * sdx;
                self.pb.slice(n * g.c + ch, 1)[0] = sd;
            }
        }
        let wc = self.w[ch].widen();
        (wc * sd, wc * rstd * sdx)
    }

    /// The first pass over a set: its per-run sums into the partials, and (Σg, Σg·x̂/rstd).
    fn sums(&self, set: usize, consts: (f64, f64)) -> (f64, f64) {
        let g = &self.g;
        let (mut sum_g, mut sum_gx) = (0.0, 0.0);
        if !self.fixed || self.needs.dw_db {
            for (off, n, ch) in g.runs(set) {
                if let Some(next) = g.next_sample_run(off, n) {
                    self.prefetch_run(next);
                }
                let (tg, tgx) = self.run_sums(off, n, ch, consts, g.contiguous_sets());
                sum_g += tg;
                sum_gx += tgx;
            }
        }
        (sum_g, sum_gx)
    }

    /// The (q, r) of dx = rstd·(dy·w − mean(g) − x̂·mean(g·x̂)) = p·dy − q·(x − μ) + r, from
    /// the set's (Σg, Σg·x̂/rstd).
    fn qr(&self, rstd: f64, (sum_g, sum_gx): (f64, f64)) -> (f64, f64) {
        (rstd * rstd * sum_gx / self.m, -rstd * sum_g / self.m)
    }

    /// One run's dx (channel `ch`, at `off`), over dy (`out` None) or into `out`.
    fn run_dx(
        &self,
        off: usize,
        ch: usize,
        (mean, rstd): (f64, f64),
        (q, r): (f64, f64),
        out: DxOut<T>,
        ahead: bool,
    ) {
        let (g, dyp, fixed) = (&self.g, self.dyp, self.fixed);
        let p = rstd * self.w[ch].widen();
        let xs = &self.x[off..off + g.s];
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
    }

    /// The second pass: dx from the set's sums.
    fn apply(&self, set: usize, consts: (f64, f64), sums: (f64, f64), out: DxOut<T>) {
        let qr = self.qr(consts.1, sums);
        for (off, _, ch) in self.g.runs(set) {
            if let Some(next) = self.g.next_channel_run(off, ch) {
                self.prefetch_run(next);
            }
            self.run_dx(off, ch, consts, qr, out, self.g.contiguous_sets());
        }
    }

    /// `apply` of a block of BatchNorm channels whose runs are one value each (see
    /// `Geom::one_value_runs`), sample by sample: each value as `run_dx` computes it.
    fn rows_dx(
        &self,
        sets: Range<usize>,
        consts: &Consts,
        taken: &[(f64, f64); MAX_STEP_SETS],
        out: DxOut<T>,
    ) {
        let (g, x, dyp) = (&self.g, self.x, self.dyp);
        let k: [_; MAX_STEP_SETS] = std::array::from_fn(|i| {
            let c = (sets.start + i).min(sets.end - 1);
            let (mean, rstd) = consts[i];
            let (q, r) = self.qr(rstd, taken[i]);
            lanes::grad_consts::<T>(mean, rstd * self.w[c].widen(), q, r)
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
    }

    /// `sums` of a block of BatchNorm channels, reading x and dy sample by sample (see
    /// `CHANNEL_BLOCK_VALUES`): each channel adds its runs in sample order, as `sums` does.
    fn block_sums(&self, sets: Range<usize>, consts: &Consts, taken: &mut [(f64, f64)]) {
        if self.fixed && !self.needs.dw_db {
            return;
        }
        let g = &self.g;
        for n in 0..g.n {
            for (i, c) in sets.clone().enumerate() {
                let (tg, tgx) = self.run_sums((n * g.c + c) * g.s, n, c, consts[i], false);
                taken[i].0 += tg;
                taken[i].1 += tgx;
            }
        }
    }

    /// Each set's mean and 1/std: kept by the forward, or recomputed by its own function.
    fn consts(&self, sets: &Range<usize>) -> Consts {
        let mut c = [(0.0, 0.0); MAX_STEP_SETS];
        match self.stats {
            Some(stats) => {
                for (i, set) in sets.clone().enumerate() {
                    c[i] = (stats.mean[set], rstd(stats.var[set], self.eps));
                }
            }
            None => {
                let (mut mean, mut var) = ([0.0; MAX_STEP_SETS], [0.0; MAX_STEP_SETS]);
                step_stats(self.x, &self.g, sets.clone(), &mut mean, &mut var);
                for i in 0..sets.len() {
                    c[i] = (mean[i], rstd(var[i], self.eps));
                }
            }
        }
        c
    }

    /// One task's step of sets: their sums, then (where dx is wanted) their dx.
    fn step(&self, sets: Range<usize>, out: DxOut<T>) {
        let consts = self.consts(&sets);
        let mut taken = [(0.0, 0.0); MAX_STEP_SETS];
        if self.g.channel_block(&sets) {
            self.block_sums(sets.clone(), &consts, &mut taken);
        } else {
            for (i, set) in sets.clone().enumerate() {
                taken[i] = self.sums(set, consts[i]);
            }
        }
        let writes = self.over_dy || out.is_some();
        if writes && self.g.one_value_runs(&sets) && !self.fixed {
            self.rows_dx(sets, &consts, &taken, out);
        } else if writes {
            for (i, set) in sets.enumerate() {
                self.apply(set, consts[i], taken[i], out);
            }
        }
    }

    /// Every step on the pool; dx in a new buffer unless it goes over dy (or is not wanted).
    fn steps(&self) -> Option<Vec<T>> {
        if self.needs.dx && !self.over_dy {
            Some(filled(self.x.len(), |out| {
                self.g.par_steps(|sets| self.step(sets, Some(out)))
            }))
        } else {
            self.g.par_steps(|sets| self.step(sets, None));
            None
        }
    }

    /// Each channel's partials added in sample order, as `Iterator::sum` adds them (from its
    /// own starting value), row by row: a column at a time reads the partials C apart, which
    /// for an (N, C) input of many samples is a cache miss per partial.
    fn reduce(&self, part: &[f64]) -> Vec<T> {
        if self.per_channel || self.groups_apart {
            return part.iter().map(|&v| T::narrow(v)).collect();
        }
        let mut acc = vec![std::iter::empty::<f64>().sum::<f64>(); self.g.c];
        for row in part.chunks_exact(self.g.c) {
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += v;
            }
        }
        acc.into_iter().map(T::narrow).collect()
    }

    /// BatchNorm on a large input, training: two passes over the whole tensor in memory order,
    /// rather than one channel at a time. Channel by channel, each channel's N runs are C·S
    /// apart and its second pass reads them back from L2; in memory order both passes stream x
    /// and dy and read ahead. At (32, 64, 56, 56) the backward alone took 4.4 ms instead of
    /// 5.0–5.7 (one thread) and 2.1–2.2 instead of 2.4–2.6 (two); on inputs that stay in cache
    /// (6.4 MB and less) the channel blocks are faster (0.83 against 1.07 ms at (32, 256, 14,
    /// 14)). Each run's sums, each channel's totals (its runs' terms added in sample order) and
    /// each value of dx are computed as the other path computes them: the same bits.
    fn two_pass(&self, stats: &Stats) -> Option<Vec<T>> {
        let g = &self.g;
        let consts: Vec<(f64, f64)> = (0..g.c)
            .map(|c| (stats.mean[c], rstd(stats.var[c], self.eps)))
            .collect();
        let runs = g.n * g.c;
        // Each run's term of its channel's Σg·x̂/rstd; its term of Σg, w[c]·Σdy, is computed
        // again from the bias gradient's partial (Σdy), as `run_sums` computes it.
        let mut terms_gx = vec![0f64; runs];
        let tp = SharedMut(terms_gx.as_mut_ptr());
        parallel::for_each_index(runs, 2 * g.s, |run| {
            let (n, c) = (run / g.c, run % g.c);
            // Every run is one index's.
            unsafe { tp.slice(run, 1)[0] = self.run_sums(run * g.s, n, c, consts[c], true).1 };
        });
        // SAFETY: the first pass is over; nothing writes the partials any more.
        let part_b = unsafe { self.pb.slice_ref(0, runs) };
        // Each channel's (q, r), its runs' terms added in sample order.
        let qr: Vec<(f64, f64)> = (0..g.c)
            .map(|c| {
                let wc = self.w[c].widen();
                let (mut sum_g, mut sum_gx) = (0.0, 0.0);
                for n in 0..g.n {
                    sum_g += wc * part_b[n * g.c + c];
                    sum_gx += terms_gx[n * g.c + c];
                }
                self.qr(consts[c].1, (sum_g, sum_gx))
            })
            .collect();
        let pass = |out: DxOut<T>| {
            parallel::for_each_index(runs, 2 * g.s, |run| {
                let c = run % g.c;
                self.run_dx(run * g.s, c, consts[c], qr[c], out, true);
            })
        };
        if self.needs.dx && !self.over_dy {
            Some(filled(self.x.len(), |out| pass(Some(out))))
        } else {
            if self.over_dy {
                pass(None);
            }
            None
        }
    }

    /// The weight and bias gradients of groups of one-value runs: each channel's terms, as
    /// `run_sums` takes them, added in sample order; whole groups, at least a cache line of f32
    /// channels, to a task. Each set's mean and 1/std as the steps have them: kept, or
    /// recomputed by the forward's own functions.
    fn groups_pass(&self) {
        let (g, x, dyp) = (&self.g, self.x, self.dyp);
        let Sets::Groups(groups) = g.sets else {
            unreachable!("groups_apart is for groups")
        };
        let cg = g.c / groups;
        let per_task = 16usize.div_ceil(cg);
        parallel::for_each_index(groups.div_ceil(per_task), 2 * per_task * cg * g.n, |task| {
            for n in 0..g.n {
                for group in task * per_task..((task + 1) * per_task).min(groups) {
                    let set = n * groups + group;
                    let (mean, rstd) = match self.stats {
                        Some(stats) => (stats.mean[set], rstd(stats.var[set], self.eps)),
                        None => {
                            // `consts` for one set, without its arrays for a step's sets: for
                            // sets of a few values those made this pass 20-30% slower.
                            let (mut s1, mut s2): (Acc, Acc) = ([0.0; LANES], [0.0; LANES]);
                            let k = set_sums(x, g, set, &mut s1, &mut s2);
                            let (mean, var) = mean_var(&s1, &s2, k, self.m);
                            (mean, rstd(var, self.eps))
                        }
                    };
                    for c in group * cg..(group + 1) * cg {
                        let off = n * g.c + c;
                        let dv = unsafe { dyp.slice_ref(off, 1) }[0];
                        // Every channel is one task's.
                        self.add_to_channel(c, rstd, lanes::grad_sums_one(x[off], dv, mean));
                    }
                }
            }
        });
    }
}

/// What the backward pass of one op call needs besides the tensors.
pub(super) struct GradCtx<'a> {
    pub(super) g: Geom,
    /// The forward's statistics; `None`: recompute them (see [`stats_are_cheap`]).
    pub(super) stats: Option<&'a Stats>,
    pub(super) eps: f64,
    pub(super) fixed: bool,
    pub(super) needs: Needs,
}
