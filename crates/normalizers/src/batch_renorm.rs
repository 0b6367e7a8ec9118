//! Batch Renormalization (Ioffe 2017, "Batch Renormalization: Towards Reducing Minibatch
//! Dependence in Batch-Normalized Models").
//!
//! In training, with the batch's mean μ_B and σ_B = sqrt(var_B + eps) (biased variance) and
//! σ = sqrt(running_var + eps): r = clip(σ_B / σ, 1/rmax, rmax) and
//! d = clip((μ_B − running_mean) / σ, −dmax, dmax), both constants to the gradient and taken
//! from the running statistics as they were before this step's update;
//! y = weight[c] · ((x − μ_B) / σ_B · r + d) + bias[c]. The running statistics are then updated
//! exactly as `bn`'s (momentum 0.1, unbiased variance); evaluation is `bn`'s.
//!
//! `warmup=K` ramps the clip limits over the first K training steps, as the paper's schedule:
//! at step t (0-based, the value of `num_batches_tracked` before the step) rmax is
//! 1 + (rmax − 1)·min(t/K, 1) and dmax is dmax·min(t/K, 1), so the first step is `bn`'s.
//! rmax = 1 and dmax = 0 make `brn` exactly `bn`.
//!
//! The paper keeps a moving *standard deviation*; `brn` keeps `bn`'s running *variance* (the
//! unbiased one) and takes σ from it, so that a `brn` checkpoint loads as a `bn` one.
//! Variables: `bn`'s and `num_batches_tracked`, the count of training steps.

use crate::forward;
use crate::input::{self, InputDims};
use crate::kernels::Sets;
use crate::params::{Affine, RunningStats};
use crate::spec::{BatchRenormConfig, Momentum, NormSpec};
use crate::{reference, Normalizer};
use candle_core::{bail, DType, Result, Tensor, Var};
use candle_nn::{Init, ModuleT, VarBuilder};

#[derive(Debug, Clone)]
pub struct BatchRenorm {
    spec: NormSpec,
    cfg: BatchRenormConfig,
    num_channels: usize,
    affine: Option<Affine>,
    running: RunningStats,
    steps: Var,
}

impl BatchRenorm {
    /// Builds the Batch Renormalization that `cfg` describes.
    pub fn new(cfg: BatchRenormConfig, num_channels: usize, vb: VarBuilder) -> Result<Self> {
        let momentum = Momentum::Exponential(cfg.momentum);
        let steps = vb.get_with_hints((), "num_batches_tracked", Init::Const(0.0))?;
        Ok(Self {
            spec: NormSpec::BatchRenorm(cfg),
            cfg,
            num_channels,
            affine: Affine::maybe(cfg.common.affine, num_channels, &vb)?,
            running: RunningStats::new(num_channels, momentum, &vb)?,
            steps: Var::from_tensor(&steps)?,
        })
    }

    /// The clip limits (rmax, dmax) at training step `t`.
    fn limits(&self, t: f64) -> (f64, f64) {
        let ramp = match self.cfg.warmup {
            0 => 1.0,
            k => (t / k as f64).min(1.0),
        };
        (1.0 + (self.cfg.rmax - 1.0) * ramp, self.cfg.dmax * ramp)
    }

    /// r and d per channel from the batch's statistics and the running ones.
    fn correction(&self, mean: &[f64], var: &[f64]) -> Result<(Vec<f64>, Vec<f64>)> {
        let t = self
            .steps
            .as_detached_tensor()
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        let (rmax, dmax) = self.limits(t);
        let (rmean, rvar) = self.running.stored()?;
        let rmean: Vec<f64> = rmean.to_dtype(DType::F64)?.to_vec1()?;
        let rvar: Vec<f64> = rvar.to_dtype(DType::F64)?.to_vec1()?;
        let eps = self.cfg.common.eps;
        let mut r = Vec::with_capacity(mean.len());
        let mut d = Vec::with_capacity(mean.len());
        for c in 0..mean.len() {
            let sigma = (rvar[c] + eps).sqrt();
            r.push(((var[c] + eps).sqrt() / sigma).clamp(1.0 / rmax, rmax));
            d.push(((mean[c] - rmean[c]) / sigma).clamp(-dmax, dmax));
        }
        Ok((r, d))
    }

    /// The training computation; `update` folds the batch into the running statistics.
    fn train(&self, x: &Tensor, d: InputDims, update: bool) -> Result<Tensor> {
        let m = d.n * d.s;
        if m < 2 {
            bail!(
                "brn: expected more than 1 value per channel when training, got input of shape \
                 {:?}; use a batch of at least 2, or evaluate with train=false",
                x.dims()
            );
        }
        let c = self.cfg.common;
        let out = forward::with_batch_stats(x, d, Sets::Channels, c.eps, &None, c.imp, true)?;
        let (mean, var) = out.stat_values()?;
        let (r, shift) = self.correction(&mean, &var)?;
        let dev = x.device();
        let (r, shift) = (Tensor::new(r, dev)?, Tensor::new(shift, dev)?);
        let (scale, shift) = match &self.affine {
            Some(a) => {
                let w = a.weight.to_dtype(DType::F64)?;
                let b = a.bias.to_dtype(DType::F64)?;
                ((&w * &r)?, ((&w * &shift)? + b)?)
            }
            None => (r, shift),
        };
        let xhat = out.y.reshape((d.n, d.c, d.s))?;
        let y = reference::affine(&xhat, &scale, &shift)?.reshape(x.shape())?;
        if update {
            let gathering = self.running.gathering()?;
            self.running.observe(&mean, &var, m)?;
            if !gathering {
                let t = self.steps.as_detached_tensor();
                self.steps.set(&(t + 1.0)?)?;
            }
        }
        Ok(y)
    }
}

impl ModuleT for BatchRenorm {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let d = input::check("brn", x, self.num_channels)?;
        if train {
            return self.train(x, d, true);
        }
        let c = self.cfg.common;
        forward::with_running_stats(x, d, &self.running, c.eps, &self.affine, c.imp)
    }
}

impl Normalizer for BatchRenorm {
    fn norm_spec(&self) -> &NormSpec {
        &self.spec
    }

    fn num_channels(&self) -> usize {
        self.num_channels
    }

    /// The training computation (r and d included) without updating anything.
    fn forward_batch_stats(&self, x: &Tensor) -> Result<Tensor> {
        let d = input::check("brn", x, self.num_channels)?;
        self.train(x, d, false)
    }

    fn running_stats(&self) -> Result<Option<(Tensor, Tensor)>> {
        self.running.stored().map(Some)
    }

    fn start_precise_stats(&self) -> Result<bool> {
        self.running.start_population()?;
        Ok(true)
    }

    fn finish_precise_stats(&self) -> Result<()> {
        self.running.finish_population()
    }
}
