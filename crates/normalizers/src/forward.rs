//! The forward passes every normalizer shares, each with its two implementations behind one
//! call: the fused kernels (`kernels/`) on the CPU, the reference ops (`reference.rs`) when asked
//! for with `impl=reference` or on other devices.

use crate::input::{self, InputDims};
use crate::kernels::{self, Sets};
use crate::params::{apply_affine, Affine, RunningStats};
use crate::reference;
use crate::spec::Impl;
use candle_core::{DType, Result, Tensor};
use std::borrow::Cow;

/// The output of a forward pass with batch statistics, and those statistics: the mean and
/// biased variance of every set (C for `Sets::Channels`, N·G for `Sets::Groups`), float64,
/// detached, made tensors only when asked for ([`Normalized::stats`]).
pub struct Normalized {
    pub y: Tensor,
    stats: BatchStats,
}

enum BatchStats {
    /// The fused op's own, shared.
    Kernel(kernels::SharedStats),
    /// Not kept: the caller said it needs none (see [`with_batch_stats`]).
    NotKept,
    /// The reference ops' mean and variance.
    Tensors(Tensor, Tensor),
}

impl Normalized {
    /// [`Normalized::stats`] as values: the fused op's own, borrowed, or the reference's.
    #[allow(clippy::type_complexity)]
    pub fn stat_values(&self) -> Result<(Cow<'_, [f64]>, Cow<'_, [f64]>)> {
        Ok(match &self.stats {
            BatchStats::Kernel(s) => (Cow::Borrowed(&s.mean[..]), Cow::Borrowed(&s.var[..])),
            _ => {
                let (mean, var) = self.stats()?;
                (Cow::Owned(mean.to_vec1()?), Cow::Owned(var.to_vec1()?))
            }
        })
    }

    /// The mean and biased variance of every set, as float64 tensors on y's device.
    pub fn stats(&self) -> Result<(Tensor, Tensor)> {
        Ok(match &self.stats {
            BatchStats::Kernel(s) => (
                Tensor::from_slice(&s.mean, s.mean.len(), self.y.device())?,
                Tensor::from_slice(&s.var, s.var.len(), self.y.device())?,
            ),
            BatchStats::Tensors(mean, var) => (mean.clone(), var.clone()),
            BatchStats::NotKept => candle_core::bail!(
                "the forward kept no batch statistics; call it with keep_stats = true to read them"
            ),
        })
    }
}

fn use_kernels(x: &Tensor, imp: Impl) -> bool {
    imp == Impl::Fused && x.device().is_cpu()
}

/// The dtype the kernels run in for an input dtype: f64 for f64, f32 otherwise.
fn kernel_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// The kernels' weight and bias: the affine parameters in `dtype`, or ones and zeros.
fn kernel_affine(
    affine: &Option<Affine>,
    c: usize,
    dtype: DType,
    x: &Tensor,
) -> Result<(Tensor, Tensor)> {
    Ok(match affine {
        Some(a) => (a.weight.to_dtype(dtype)?, a.bias.to_dtype(dtype)?),
        None => (
            Tensor::ones(c, dtype, x.device())?,
            Tensor::zeros(c, dtype, x.device())?,
        ),
    })
}

/// Normalizes `x` with its own statistics over `sets` and applies the affine transform.
/// `keep_stats`: whether the caller reads [`Normalized::stats`] (to update running statistics);
/// without it the fused op holds only what its backward needs (see
/// [`kernels::fused_normalize_lean`]).
pub fn with_batch_stats(
    x: &Tensor,
    d: InputDims,
    sets: Sets,
    eps: f64,
    affine: &Option<Affine>,
    imp: Impl,
    keep_stats: bool,
) -> Result<Normalized> {
    if use_kernels(x, imp) {
        let dtype = kernel_dtype(x.dtype());
        let (weight, bias) = kernel_affine(affine, d.c, dtype, x)?;
        let xk = x.to_dtype(dtype)?;
        let (y, stats) = if keep_stats {
            let (y, stats) = kernels::fused_normalize(&xk, &weight, &bias, sets, eps)?;
            (y, BatchStats::Kernel(stats))
        } else {
            let y = kernels::fused_normalize_lean(&xk, &weight, &bias, sets, eps)?;
            (y, BatchStats::NotKept)
        };
        return Ok(Normalized {
            y: y.to_dtype(x.dtype())?,
            stats,
        });
    }
    let x3 = input::view3(x, d)?;
    let (xhat, mean, var) = match sets {
        Sets::Channels => reference::batch_norm_train(&x3, eps)?,
        Sets::Groups(g) => reference::group_norm(&x3, g, eps)?,
    };
    let flat = |t: Tensor| -> Result<Tensor> { t.detach().flatten_all()?.to_dtype(DType::F64) };
    Ok(Normalized {
        y: input::unview(apply_affine(xhat, affine)?, x)?,
        stats: BatchStats::Tensors(flat(mean)?, flat(var)?),
    })
}

/// Normalizes each channel of `x` with the running statistics and applies the affine transform.
pub fn with_running_stats(
    x: &Tensor,
    d: InputDims,
    running: &RunningStats,
    eps: f64,
    affine: &Option<Affine>,
    imp: Impl,
) -> Result<Tensor> {
    if use_kernels(x, imp) {
        let dtype = kernel_dtype(x.dtype());
        let (weight, bias) = kernel_affine(affine, d.c, dtype, x)?;
        let (mean, var) = running.stored()?;
        let stats = kernels::Stats {
            mean: mean.to_dtype(DType::F64)?.to_vec1()?,
            var: var.to_dtype(DType::F64)?.to_vec1()?,
        };
        let y = kernels::fused_normalize_fixed(&x.to_dtype(dtype)?, &weight, &bias, stats, eps)?;
        return y.to_dtype(x.dtype());
    }
    let x3 = input::view3(x, d)?;
    input::unview(apply_affine(running.normalize(&x3, eps)?, affine)?, x)
}

/// One row of a per-sample layer's parameters: a (C) tensor, or the constant it is without the
/// variable (a weight of 1 without `affine`).
pub enum Row<'a> {
    Var(&'a Tensor),
    Const(f64),
}

impl Row<'_> {
    fn tensor(&self, c: usize, dtype: DType, x: &Tensor) -> Result<Tensor> {
        match self {
            Row::Var(t) => t.to_dtype(dtype),
            Row::Const(v) => Tensor::full(*v, c, x.device())?.to_dtype(dtype),
        }
    }
}

/// The forward of a per-sample layer (`rms`, `frn`, `evonorm-s0`): the fused op where it runs
/// (`rows` stacked in its order, see [`kernels::fused_sample_norm`]), else `reference` on `x`
/// as (N, C, S) in the compute dtype with `rows` as tensors of that dtype.
pub fn per_sample(
    x: &Tensor,
    d: InputDims,
    layer: kernels::SampleLayer,
    rows: &[Row],
    eps: f64,
    imp: Impl,
    reference: impl FnOnce(&Tensor, &[Tensor]) -> Result<Tensor>,
) -> Result<Tensor> {
    let dtype = if use_kernels(x, imp) {
        kernel_dtype(x.dtype())
    } else {
        reference::compute_dtype(x.dtype())
    };
    let rows = rows
        .iter()
        .map(|r| r.tensor(d.c, dtype, x))
        .collect::<Result<Vec<_>>>()?;
    if use_kernels(x, imp) {
        let params = Tensor::stack(&rows, 0)?;
        let y = kernels::fused_sample_norm(&x.to_dtype(dtype)?, &params, layer, eps)?;
        return y.to_dtype(x.dtype());
    }
    input::unview(reference(&input::view3(x, d)?, &rows)?, x)
}
