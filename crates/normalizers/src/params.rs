//! What normalizers own: the per-channel affine parameters and the running statistics, made
//! through a `VarBuilder` under PyTorch's names so that a `VarMap` saves and loads them.

use crate::spec::Momentum;
use candle_core::{DType, Result, Tensor, Var};
use candle_nn::{Init, VarBuilder};
use std::sync::{Arc, Mutex};

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
/// `running_var` stores the *unbiased* batch variance. EvoNorm-B0 keeps the variance alone.
///
/// Between [`RunningStats::start_population`] and [`RunningStats::finish_population`] (PreciseBN,
/// Wu & Johnson 2021, as fvcore's `update_bn_stats`), batches are pooled instead: the stored
/// statistics become the mean and the *biased* variance of every value observed, each batch
/// weighted by its count (fvcore's `_PopulationVarianceEstimator`; pooled here with Chan's
/// update in f64 rather than fvcore's E[x²] − E[x]²).
#[derive(Debug, Clone)]
pub struct RunningStats {
    mean: Option<Var>,
    var: Var,
    update: Update,
    population: Arc<Mutex<Option<Population>>>,
}

#[derive(Debug, Clone)]
enum Update {
    Exponential(f64),
    /// Holds `num_batches_tracked`.
    Cumulative(Var),
}

/// The pooled statistics of the batches observed so far.
#[derive(Debug, Clone, Default)]
struct Population {
    count: f64,
    mean: Vec<f64>,
    /// Sums of squared deviations from `mean`.
    m2: Vec<f64>,
}

impl Population {
    /// Chan et al.'s pairwise update with a batch of `n` values per channel.
    fn add(&mut self, mean: &[f64], var_biased: &[f64], n: f64) {
        if self.mean.is_empty() {
            (self.mean, self.m2) = (vec![0.0; mean.len()], vec![0.0; mean.len()]);
        }
        let total = self.count + n;
        for c in 0..mean.len() {
            let delta = mean[c] - self.mean[c];
            self.mean[c] += delta * n / total;
            self.m2[c] += var_biased[c] * n + delta * delta * self.count * n / total;
        }
        self.count = total;
    }
}

impl RunningStats {
    pub fn new(num_channels: usize, momentum: Momentum, vb: &VarBuilder) -> Result<Self> {
        let mut stats = Self::var_only(num_channels, momentum, vb)?;
        let mean = vb.get_with_hints(num_channels, "running_mean", Init::Const(0.0))?;
        stats.mean = Some(Var::from_tensor(&mean)?);
        Ok(stats)
    }

    /// `running_var` alone (EvoNorm-B0's).
    pub fn var_only(num_channels: usize, momentum: Momentum, vb: &VarBuilder) -> Result<Self> {
        let update = match momentum {
            Momentum::Exponential(m) => Update::Exponential(m),
            Momentum::Cumulative => Update::Cumulative(Var::from_tensor(&vb.get_with_hints(
                (),
                "num_batches_tracked",
                Init::Const(0.0),
            )?)?),
        };
        let var = vb.get_with_hints(num_channels, "running_var", Init::Const(1.0))?;
        Ok(Self {
            mean: None,
            var: Var::from_tensor(&var)?,
            update,
            population: Arc::default(),
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
        let (mean, var) = self.stored()?;
        crate::reference::normalize_per_channel(
            x3,
            &mean.to_dtype(dtype)?,
            &var.to_dtype(dtype)?,
            eps,
        )
    }

    /// The running mean (zeros where only the variance is kept) and variance as stored,
    /// detached.
    pub fn stored(&self) -> Result<(Tensor, Tensor)> {
        let var = self.var.as_detached_tensor();
        let mean = match &self.mean {
            Some(m) => m.as_detached_tensor(),
            None => var.zeros_like()?,
        };
        Ok((mean, var))
    }

    /// The running variance as stored, detached.
    pub fn stored_var(&self) -> Tensor {
        self.var.as_detached_tensor()
    }

    /// Folds in one batch's per-channel mean and *unbiased* variance, each of shape (C).
    pub fn update(&self, batch_mean: &Tensor, batch_var_unbiased: &Tensor) -> Result<()> {
        let values = |t: &Tensor| t.detach().to_dtype(DType::F64)?.to_vec1::<f64>();
        self.update_values(&values(batch_mean)?, &values(batch_var_unbiased)?)
    }

    /// Observes one training batch of `count` values per channel with mean `mean` and *biased*
    /// variance `var`: folds it into the running statistics (with the unbiased variance,
    /// var·count/(count − 1)), or pools it while a population is being gathered.
    pub fn observe(&self, mean: &[f64], var: &[f64], count: usize) -> Result<()> {
        if let Some(pop) = self.lock()?.as_mut() {
            pop.add(mean, var, count as f64);
            return Ok(());
        }
        // The unbiased variance, as candle's `var * (m / (m − 1))` computes it.
        let bessel = count as f64 / (count - 1) as f64;
        let var: Vec<f64> = var.iter().map(|v| v * bessel + 0.0).collect();
        self.update_values(mean, &var)
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Option<Population>>> {
        self.population
            .lock()
            .map_err(|_| candle_core::Error::Msg("running statistics: poisoned lock".into()))
    }

    /// Whether a population is being gathered (see [`RunningStats::start_population`]).
    pub fn gathering(&self) -> Result<bool> {
        Ok(self.lock()?.is_some())
    }

    /// Starts gathering the population statistics (PreciseBN): training batches are pooled,
    /// not folded in, until [`RunningStats::finish_population`].
    pub fn start_population(&self) -> Result<()> {
        *self.lock()? = Some(Population::default());
        Ok(())
    }

    /// Stores the pooled mean and biased variance as the running statistics and returns to
    /// the usual updates. An error if no batch was observed.
    pub fn finish_population(&self) -> Result<()> {
        let Some(pop) = self.lock()?.take() else {
            candle_core::bail!("precise statistics: finish without start");
        };
        if pop.count == 0.0 {
            candle_core::bail!(
                "precise statistics: no training batch passed through the layer; run the \
                 training set through the model in training mode between start and finish"
            );
        }
        let var: Vec<f64> = pop.m2.iter().map(|m2| m2 / pop.count).collect();
        if let Some(mean) = &self.mean {
            set_values(mean, pop.mean)?;
        }
        set_values(&self.var, var)
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
            set_values(running, new)
        };
        if let Some(mean) = &self.mean {
            blend(mean, batch_mean)?;
        }
        blend(&self.var, batch_var_unbiased)
    }
}

/// Stores f64 `values` in `var`, in its dtype.
fn set_values(var: &Var, values: Vec<f64>) -> Result<()> {
    let t = Tensor::from_vec(values, var.shape(), var.device())?;
    var.set(&t.to_dtype(var.dtype())?)
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
                let (mut mean, mut var) = stats.stored().unwrap();
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
