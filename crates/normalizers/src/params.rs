//! What normalizers own: the per-channel affine parameters and the running statistics, made
//! through a `VarBuilder` under PyTorch's names so that a `VarMap` saves and loads them.

use crate::spec::Momentum;
use candle_core::{DType, Result, Tensor, Var};
use candle_nn::{Init, VarBuilder};

/// `weight` (init 1) and `bias` (init 0), each of shape (C).
#[derive(Debug, Clone)]
pub struct Affine {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl Affine {
    pub fn new(num_channels: usize, vb: &VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(num_channels, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(num_channels, "bias", Init::Const(0.0))?,
        })
    }

    pub fn maybe(affine: bool, num_channels: usize, vb: &VarBuilder) -> Result<Option<Self>> {
        affine.then(|| Self::new(num_channels, vb)).transpose()
    }
}

/// Applies the affine transform where there is one.
pub fn apply_affine(xhat: Tensor, affine: &Option<Affine>) -> Result<Tensor> {
    match affine {
        Some(a) => crate::reference::affine(&xhat, &a.weight, &a.bias),
        None => Ok(xhat),
    }
}

/// `running_mean` (init 0) and `running_var` (init 1), each of shape (C), updated PyTorch's way:
/// `running = (1 − f)·running + f·batch` with f the momentum, or f = 1/k at the k-th update for a
/// cumulative average (`momentum=none`, which also keeps the count k in `num_batches_tracked`).
/// `running_var` stores the *unbiased* batch variance.
#[derive(Debug, Clone)]
pub struct RunningStats {
    mean: Var,
    var: Var,
    update: Update,
}

#[derive(Debug, Clone)]
enum Update {
    Exponential(f64),
    /// Holds `num_batches_tracked`.
    Cumulative(Var),
}

impl RunningStats {
    pub fn new(num_channels: usize, momentum: Momentum, vb: &VarBuilder) -> Result<Self> {
        let get = |name: &str, init: f64| -> Result<Var> {
            Var::from_tensor(&vb.get_with_hints(num_channels, name, Init::Const(init))?)
        };
        let update = match momentum {
            Momentum::Exponential(m) => Update::Exponential(m),
            Momentum::Cumulative => Update::Cumulative(Var::from_tensor(&vb.get_with_hints(
                (),
                "num_batches_tracked",
                Init::Const(0.0),
            )?)?),
        };
        Ok(Self {
            mean: get("running_mean", 0.0)?,
            var: get("running_var", 1.0)?,
            update,
        })
    }

    pub fn maybe(
        track: bool,
        num_channels: usize,
        momentum: Momentum,
        vb: &VarBuilder,
    ) -> Result<Option<Self>> {
        track
            .then(|| Self::new(num_channels, momentum, vb))
            .transpose()
    }

    /// Normalizes `x3` (N, C, S) with the running statistics, which get no gradient.
    pub fn normalize(&self, x3: &Tensor, eps: f64) -> Result<Tensor> {
        let dtype = x3.dtype();
        let mean = self.mean.as_detached_tensor().to_dtype(dtype)?;
        let var = self.var.as_detached_tensor().to_dtype(dtype)?;
        crate::reference::normalize_per_channel(x3, &mean, &var, eps)
    }

    /// The running mean and variance as stored, detached.
    pub fn stored(&self) -> Result<(Tensor, Tensor)> {
        Ok((
            self.mean.as_detached_tensor(),
            self.var.as_detached_tensor(),
        ))
    }

    /// Folds in one batch's per-channel mean and *unbiased* variance, each of shape (C).
    pub fn update(&self, batch_mean: &Tensor, batch_var_unbiased: &Tensor) -> Result<()> {
        let values = |t: &Tensor| t.detach().to_dtype(DType::F64)?.to_vec1::<f64>();
        self.update_values(&values(batch_mean)?, &values(batch_var_unbiased)?)
    }

    /// [`RunningStats::update`] with the batch's statistics as values, in plain f64 arithmetic
    /// rather than a dozen candle ops on C values (10–20 µs a step): running·(1 − f) + batch·f,
    /// each product plus 0 as candle's `t * f` (an affine map, t·f + 0) computes it, so the
    /// bits are those of the composed update.
    pub fn update_values(&self, batch_mean: &[f64], batch_var_unbiased: &[f64]) -> Result<()> {
        let factor = match &self.update {
            Update::Exponential(m) => *m,
            Update::Cumulative(count) => {
                let k = count
                    .as_detached_tensor()
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?
                    + 1.0;
                count.set(&Tensor::new(k, count.device())?.to_dtype(count.dtype())?)?;
                1.0 / k
            }
        };
        let blend = |running: &Var, batch: &[f64]| -> Result<()> {
            let old = running
                .as_detached_tensor()
                .to_dtype(DType::F64)?
                .to_vec1::<f64>()?;
            if old.len() != batch.len() {
                candle_core::bail!(
                    "running statistics of {} channels given a batch's of {}",
                    old.len(),
                    batch.len()
                );
            }
            let new: Vec<f64> = old
                .iter()
                .zip(batch)
                .map(|(&o, &b)| (o * (1.0 - factor) + 0.0) + (b * factor + 0.0))
                .collect();
            let new = Tensor::from_vec(new, running.shape(), running.device())?;
            running.set(&new.to_dtype(running.dtype())?)
        };
        blend(&self.mean, batch_mean)?;
        blend(&self.var, batch_var_unbiased)
    }
}
