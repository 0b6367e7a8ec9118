use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;
use std::sync::{Arc, OnceLock};

/// Values below which splitting work over threads costs more than it saves.
const MIN_TASK_VALUES: usize = 1 << 15;

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

#[derive(Debug, Clone, Copy)]
struct Geom {
    n: usize,
    c: usize,
    s: usize,
    sets: Sets,
}

impl Geom {
    fn num_sets(&self) -> usize {
        match self.sets {
            Sets::Channels => self.c,
            Sets::Groups(g) => self.n * g,
        }
    }

    /// Values per set.
    fn set_len(&self) -> usize {
        self.n * self.c * self.s / self.num_sets()
    }

    /// Calls `f(offset, first_channel, channels)` for each contiguous segment of `set`, in order.
    #[inline]
    fn for_each_segment(&self, set: usize, mut f: impl FnMut(usize, usize, usize)) {
        match self.sets {
            Sets::Channels => {
                for n in 0..self.n {
                    f((n * self.c + set) * self.s, set, 1);
                }
            }
            Sets::Groups(g) => {
                let cg = self.c / g;
                let (n, group) = (set / g, set % g);
                f((n * self.c + group * cg) * self.s, group * cg, cg);
            }
        }
    }

    /// Sets per rayon task, so that no task is too small to be worth a thread.
    fn min_sets_per_task(&self) -> usize {
        (MIN_TASK_VALUES / self.set_len().max(1)).max(1)
    }

    /// The sample a set's segment at `offset` belongs to.
    fn sample(&self, offset: usize) -> usize {
        offset / (self.c * self.s)
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
    unsafe fn slice(&self, offset: usize, len: usize) -> &mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(offset), len)
    }
}

fn set_stats<T: WithDType>(x: &[T], g: &Geom, set: usize) -> (f64, f64) {
    let mut sum = 0.0;
    g.for_each_segment(set, |off, _, nch| {
        sum += x[off..off + nch * g.s]
            .iter()
            .map(|v| v.to_f64())
            .sum::<f64>();
    });
    let m = g.set_len() as f64;
    let mean = sum / m;
    let mut sq = 0.0;
    g.for_each_segment(set, |off, _, nch| {
        sq += x[off..off + nch * g.s]
            .iter()
            .map(|v| (v.to_f64() - mean).powi(2))
            .sum::<f64>();
    });
    (mean, sq / m)
}

fn forward<T: WithDType>(x: &[T], w: &[T], b: &[T], g: Geom, eps: f64) -> (Vec<T>, Stats) {
    let mut y = vec![T::zero(); x.len()];
    let out = SharedMut(y.as_mut_ptr());
    let stats: Vec<(f64, f64)> = (0..g.num_sets())
        .into_par_iter()
        .with_min_len(g.min_sets_per_task())
        .map(|set| {
            let (mean, var) = set_stats(x, &g, set);
            let rstd = 1.0 / (var + eps).sqrt();
            g.for_each_segment(set, |off, ch0, nch| {
                // SAFETY: the sets partition the tensor, so segments never overlap.
                let dst = unsafe { out.slice(off, nch * g.s) };
                for k in 0..nch {
                    let (a, shift) = (rstd * w[ch0 + k].to_f64(), b[ch0 + k].to_f64());
                    let src = &x[off + k * g.s..][..g.s];
                    for (d, xv) in dst[k * g.s..][..g.s].iter_mut().zip(src) {
                        *d = T::from_f64((xv.to_f64() - mean) * a + shift);
                    }
                }
            });
            (mean, var)
        })
        .collect();
    let (mean, var) = stats.into_iter().unzip();
    (y, Stats { mean, var })
}

/// Gradients (dx, dw, db) given the forward's statistics.
fn backward<T: WithDType>(
    x: &[T],
    w: &[T],
    dy: &[T],
    g: Geom,
    stats: &Stats,
    eps: f64,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let mut dx = vec![T::zero(); x.len()];
    // Per-(sample, channel) partial sums of dy·x̂ and dy, added over samples afterwards.
    let mut part_w = vec![0f64; g.n * g.c];
    let mut part_b = vec![0f64; g.n * g.c];
    let (out, pw, pb) = (
        SharedMut(dx.as_mut_ptr()),
        SharedMut(part_w.as_mut_ptr()),
        SharedMut(part_b.as_mut_ptr()),
    );
    let m = g.set_len() as f64;
    (0..g.num_sets())
        .into_par_iter()
        .with_min_len(g.min_sets_per_task())
        .for_each(|set| {
            let mean = stats.mean[set];
            let rstd = 1.0 / (stats.var[set] + eps).sqrt();
            let (mut sum_g, mut sum_gx) = (0.0, 0.0);
            g.for_each_segment(set, |off, ch0, nch| {
                let n = g.sample(off);
                // SAFETY: (sample, channel) pairs belong to exactly one set.
                let (pw, pb) =
                    unsafe { (pw.slice(n * g.c + ch0, nch), pb.slice(n * g.c + ch0, nch)) };
                for k in 0..nch {
                    let (c, seg) = (ch0 + k, off + k * g.s);
                    let (wc, mut sdx, mut sd) = (w[c].to_f64(), 0.0, 0.0);
                    for (xv, dv) in x[seg..seg + g.s].iter().zip(&dy[seg..seg + g.s]) {
                        let xhat = (xv.to_f64() - mean) * rstd;
                        let d = dv.to_f64();
                        sdx += d * xhat;
                        sd += d;
                    }
                    pw[k] = sdx;
                    pb[k] = sd;
                    sum_g += wc * sd;
                    sum_gx += wc * sdx;
                }
            });
            let (mean_g, mean_gx) = (sum_g / m, sum_gx / m);
            g.for_each_segment(set, |off, ch0, nch| {
                // SAFETY: the sets partition the tensor.
                let dst = unsafe { out.slice(off, nch * g.s) };
                // dx = rstd·(dy·w − mean_g − x̂·mean_gx) = p·dy − q·(x − μ) − rstd·mean_g
                let (q, r0) = (rstd * rstd * mean_gx, -rstd * mean_g);
                for k in 0..nch {
                    let p = rstd * w[ch0 + k].to_f64();
                    let seg = off + k * g.s;
                    let (xs, dys) = (&x[seg..][..g.s], &dy[seg..][..g.s]);
                    for ((d, xv), dv) in dst[k * g.s..][..g.s].iter_mut().zip(xs).zip(dys) {
                        *d = T::from_f64(p * dv.to_f64() - q * (xv.to_f64() - mean) + r0);
                    }
                }
            });
        });
    let reduce = |part: &[f64]| -> Vec<T> {
        (0..g.c)
            .map(|c| T::from_f64((0..g.n).map(|n| part[n * g.c + c]).sum()))
            .collect()
    };
    let (dw, db) = (reduce(&part_w), reduce(&part_b));
    (dx, dw, db)
}

/// The fused op on (x, weight, bias); its statistics land in `stats`.
struct NormOp {
    sets: Sets,
    eps: f64,
    stats: Arc<OnceLock<Stats>>,
}

fn contiguous<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => bail!("fused normalization: the {what} must be contiguous"),
    }
}

fn geom(dims: &[usize], sets: Sets) -> Result<Geom> {
    let &[n, c, s] = dims else {
        bail!("fused normalization expects (N, C, S), got {dims:?}");
    };
    Ok(Geom { n, c, s, sets })
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
        let g = geom(l1.dims(), self.sets)?;
        let (y, stats) = match s1 {
            CpuStorage::F32(_) => {
                let (y, st) = forward::<f32>(
                    contiguous(s1, l1, "input")?,
                    contiguous(s2, l2, "weight")?,
                    contiguous(s3, l3, "bias")?,
                    g,
                    self.eps,
                );
                (CpuStorage::F32(y), st)
            }
            CpuStorage::F64(_) => {
                let (y, st) = forward::<f64>(
                    contiguous(s1, l1, "input")?,
                    contiguous(s2, l2, "weight")?,
                    contiguous(s3, l3, "bias")?,
                    g,
                    self.eps,
                );
                (CpuStorage::F64(y), st)
            }
            other => bail!(
                "fused normalization takes f32 or f64, got {:?}",
                other.dtype()
            ),
        };
        // A op instance runs forward once; a second run would recompute the same statistics.
        let _ = self.stats.set(stats);
        Ok((y, l1.shape().clone()))
    }

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
        let g = geom(x.dims(), self.sets)?;
        let dy = dy.contiguous()?;
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
                let (dx, dw, db) = backward::<$t>(
                    contiguous(xs, xl, "input")?,
                    contiguous(ws, wl, "weight")?,
                    contiguous(ds, dl, "output gradient")?,
                    g,
                    stats,
                    self.eps,
                );
                let dev = x.device();
                (
                    Tensor::from_vec(dx, x.shape(), dev)?,
                    Tensor::from_vec(dw, g.c, dev)?,
                    Tensor::from_vec(db, g.c, dev)?,
                )
            }};
        }
        let (dx, dw, db) = match xs {
            CpuStorage::F32(_) => grads!(f32),
            CpuStorage::F64(_) => grads!(f64),
            other => bail!(
                "fused normalization takes f32 or f64, got {:?}",
                other.dtype()
            ),
        };
        Ok((
            x.track_op().then_some(dx),
            w.track_op().then_some(dw),
            b.track_op().then_some(db),
        ))
    }
}

/// Normalizes `x3` (N, C, S), f32 or f64, over `sets` and applies the per-channel affine
/// (`weight`, `bias` of shape (C), same dtype); returns the output and the sets' statistics.
pub fn fused_normalize(
    x3: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    sets: Sets,
    eps: f64,
) -> Result<(Tensor, Stats)> {
    let stats = Arc::new(OnceLock::new());
    let op = NormOp {
        sets,
        eps,
        stats: stats.clone(),
    };
    let y = x3
        .contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)?;
    let Some(stats) = stats.get().cloned() else {
        bail!("fused normalization: forward left no statistics");
    };
    Ok((y, stats))
}
