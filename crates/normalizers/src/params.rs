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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarMap;

    /// The update in values gives the bits of the update composed from candle ops (running ·
    /// (1 − f) + batch · f on f64 tensors, then the running dtype), over several steps, for
    /// both momentum kinds and both running dtypes, with values whose products round.
    #[test]
    fn the_update_in_values_matches_the_composed_update_bit_for_bit() {
        let batches: Vec<(Vec<f64>, Vec<f64>)> = (0..4)
            .map(|step| {
                let v =
                    |i: usize| ((i * 7 + step * 13) % 11) as f64 / 3.0 - 1.7 + step as f64 * 1e3;
                (
                    (0..6).map(v).collect(),
                    (0..6).map(|i| v(i).abs() + 0.1).collect(),
                )
            })
            .collect();
        for dtype in [DType::F32, DType::F64] {
            for momentum in [Momentum::Exponential(0.1), Momentum::Cumulative] {
                let varmap = VarMap::new();
                let vb = VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu);
                let stats = RunningStats::new(6, momentum, &vb).unwrap();
                let (mut mean, mut var) = (
                    stats.mean.as_tensor().clone(),
                    stats.var.as_tensor().clone(),
                );
                for (k, (bm, bv)) in batches.iter().enumerate() {
                    let f = match momentum {
                        Momentum::Exponential(m) => m,
                        Momentum::Cumulative => 1.0 / (k + 1) as f64,
                    };
                    let composed = |old: &Tensor, batch: &[f64]| -> Tensor {
                        let batch = Tensor::new(batch, &Device::Cpu).unwrap();
                        let old = old.to_dtype(DType::F64).unwrap();
                        ((old * (1.0 - f)).unwrap() + (batch * f).unwrap())
                            .unwrap()
                            .to_dtype(dtype)
                            .unwrap()
                    };
                    (mean, var) = (composed(&mean, bm), composed(&var, bv));
                    stats.update_values(bm, bv).unwrap();
                    let bits = |t: &Tensor| -> Vec<u64> {
                        let v = t.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
                        v.iter().map(|x| x.to_bits()).collect()
                    };
                    let (got_mean, got_var) = stats.stored().unwrap();
                    let what = format!("{dtype:?} {momentum:?} step {k}");
                    assert_eq!(bits(&got_mean), bits(&mean), "{what}: running mean");
                    assert_eq!(bits(&got_var), bits(&var), "{what}: running var");
                }
            }
        }
    }
}
