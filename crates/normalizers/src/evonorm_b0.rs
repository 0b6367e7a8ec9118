//! EvoNorm-B0 (Liu, Brock, Simonyan & Le 2020), as timm's `EvoNorm2dB0`:
//! y = x / max(sqrt(var_batch + eps), v[c] · x + sqrt(var_inst + eps)) · weight[c] + bias[c].
//! var_batch: the biased variance of channel c over (N, spatial) in training, the stored
//! `running_var` in evaluation; var_inst: the biased variance of each (sample, channel) over
//! the spatial values. `running_var` is updated as `bn`'s (momentum 0.1, unbiased m/(m − 1));
//! there is no running mean. Training needs more than one value per channel, as `bn`.
//! Variables: `weight` (1) and `bias` (0) with `affine`, `v` (1), `running_var` (1).
//!
//! Composed of candle ops (no fused kernel).

use crate::input::{self, InputDims};
use crate::params::{Affine, RunningStats};
use crate::spec::{EvoNormB0Config, NormSpec};
use crate::{reference, Normalizer};
use candle_core::{bail, DType, Result, Tensor};
use candle_nn::{Init, ModuleT, VarBuilder};

#[derive(Debug, Clone)]
pub struct EvoNormB0 {
    spec: NormSpec,
    cfg: EvoNormB0Config,
    num_channels: usize,
    affine: Option<Affine>,
    v: Tensor,
    running: RunningStats,
}

/// Where var_batch comes from in one forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stats {
    Train,
    Eval,
    Batch,
}

impl EvoNormB0 {
    /// Builds the EvoNorm-B0 that `cfg` describes.
    pub fn new(cfg: EvoNormB0Config, num_channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            spec: NormSpec::EvoNormB0(cfg),
            cfg,
            num_channels,
            affine: Affine::maybe(cfg.common.affine, num_channels, &vb)?,
            v: vb.get_with_hints(num_channels, "v", Init::Const(1.0))?,
            running: RunningStats::var_only(num_channels, cfg.momentum, &vb)?,
        })
    }

    fn forward_stats(&self, x: &Tensor, stats: Stats) -> Result<Tensor> {
        let d: InputDims = input::check("evonorm-b0", x, self.num_channels)?;
        let m = d.n * d.s;
        if stats != Stats::Eval && m < 2 {
            bail!(
                "evonorm-b0: expected more than 1 value per channel when using batch \
                 statistics, got input of shape {:?}; use a batch of at least 2, or evaluate \
                 with train=false",
                x.dims()
            );
        }
        let x3 = input::view3(x, d)?;
        let dtype = x3.dtype();
        let var_batch = match stats {
            Stats::Eval => self.running.stored_var().to_dtype(dtype)?,
            _ => {
                let (mean, var) = reference::moments(&x3, &[0, 2])?;
                if stats == Stats::Train {
                    let values = |t: &Tensor| -> Result<Vec<f64>> {
                        t.detach().flatten_all()?.to_dtype(DType::F64)?.to_vec1()
                    };
                    self.running.observe(&values(&mean)?, &values(&var)?, m)?;
                }
                var.flatten_all()?
            }
        };
        let (w, b) = match &self.affine {
            Some(a) => (a.weight.clone(), a.bias.clone()),
            None => (
                Tensor::ones(d.c, dtype, x.device())?,
                Tensor::zeros(d.c, dtype, x.device())?,
            ),
        };
        let eps = self.cfg.common.eps;
        let y = reference::evonorm_b0(&x3, &var_batch, &w, &b, &self.v, eps)?;
        input::unview(y, x)
    }
}

impl ModuleT for EvoNormB0 {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_stats(x, if train { Stats::Train } else { Stats::Eval })
    }
}

impl Normalizer for EvoNormB0 {
    fn norm_spec(&self) -> &NormSpec {
        &self.spec
    }

    fn num_channels(&self) -> usize {
        self.num_channels
    }

    fn forward_batch_stats(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_stats(x, Stats::Batch)
    }

    fn start_precise_stats(&self) -> Result<bool> {
        self.running.start_population()?;
        Ok(true)
    }

    fn finish_precise_stats(&self) -> Result<()> {
        self.running.finish_population()
    }
}
