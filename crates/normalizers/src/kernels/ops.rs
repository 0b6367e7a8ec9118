use super::backward::*;
use super::geom::*;
use super::lanes::Float;
use super::normalize::*;
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp3, InplaceOp3, Layout, Result, Shape, Tensor, WithDType,
};
use std::sync::{Arc, Mutex, OnceLock};

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

/// Whether `t` is contiguous and covers its whole buffer from the start.
pub(super) fn whole_buffer(t: &Tensor) -> bool {
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
