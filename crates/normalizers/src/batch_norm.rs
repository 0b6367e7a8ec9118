//! BatchNorm (Ioffe & Szegedy 2015, "Batch Normalization: Accelerating Deep Network Training by
//! Reducing Internal Covariate Shift").
//!
//! y = weight[c] · (x − μ_c) / sqrt(σ²_c + eps) + bias[c], the statistics of channel c taken over
//! (N, spatial), m = N·S values.
//! - Training: μ_c and σ²_c are the batch's mean and *biased* variance. The running statistics
//!   are updated with the batch mean and the *unbiased* variance σ²_c·m/(m−1), as
//!   (1 − momentum)·running + momentum·batch, or as a cumulative average for `momentum=none`
//!   (PyTorch's `momentum=None`). Training needs m > 1, as in PyTorch.
//! - Evaluation: the running statistics; without tracked statistics, the batch's.

use crate::forward;
use crate::input;
use crate::kernels::Sets;
use crate::params::{Affine, RunningStats};
use crate::spec::{BatchNormConfig, Impl, NormSpec};
use crate::Normalizer;
use candle_core::{bail, Result, Tensor};
use candle_nn::{ModuleT, VarBuilder};

#[derive(Debug, Clone)]
pub struct BatchNorm {
    spec: NormSpec,
    num_channels: usize,
    eps: f64,
    imp: Impl,
    affine: Option<Affine>,
    running: Option<RunningStats>,
}

/// Where the statistics come from in one forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stats {
    /// The batch's, folding them into the running statistics.
    Train,
    /// The running statistics where tracked, else the batch's.
    Eval,
    /// The batch's, leaving the running statistics alone.
    Batch,
}

impl BatchNorm {
    /// Builds the BatchNorm that `cfg` describes.
    pub fn new(cfg: BatchNormConfig, num_channels: usize, vb: VarBuilder) -> Result<Self> {
        let c = cfg.common;
        Ok(Self {
            spec: NormSpec::Batch(cfg),
            num_channels,
            eps: c.eps,
            imp: c.imp,
            affine: Affine::maybe(c.affine, num_channels, &vb)?,
            running: RunningStats::maybe(cfg.track_running_stats, num_channels, cfg.momentum, &vb)?,
        })
    }

    fn forward_stats(&self, x: &Tensor, stats: Stats) -> Result<Tensor> {
        let d = input::check("bn", x, self.num_channels)?;
        if let (Some(running), Stats::Eval) = (&self.running, stats) {
            return forward::with_running_stats(x, d, running, self.eps, &self.affine, self.imp);
        }
        let m = d.n * d.s;
        if stats == Stats::Train && m < 2 {
            bail!(
                "bn: expected more than 1 value per channel when training, got input of shape \
                 {:?}; use a batch of at least 2, or evaluate with train=false",
                x.dims()
            );
        }
        let update = self.running.is_some() && stats == Stats::Train;
        let out = forward::with_batch_stats(
            x,
            d,
            Sets::Channels,
            self.eps,
            &self.affine,
            self.imp,
            update,
        )?;
        if let (Some(running), Stats::Train) = (&self.running, stats) {
            let (mean, var) = out.stat_values()?;
            running.observe(&mean, &var, m)?;
        }
        Ok(out.y)
    }
}
impl ModuleT for BatchNorm {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_stats(x, if train { Stats::Train } else { Stats::Eval })
    }
}

impl Normalizer for BatchNorm {
    fn norm_spec(&self) -> &NormSpec {
        &self.spec
    }

    fn num_channels(&self) -> usize {
        self.num_channels
    }

    fn forward_batch_stats(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_stats(x, Stats::Batch)
    }

    fn running_stats(&self) -> Result<Option<(Tensor, Tensor)>> {
        self.running.as_ref().map(RunningStats::stored).transpose()
    }

    fn start_precise_stats(&self) -> Result<bool> {
        match &self.running {
            Some(running) => running.start_population().map(|_| true),
            None => Ok(false),
        }
    }

    fn finish_precise_stats(&self) -> Result<()> {
        match &self.running {
            Some(running) => running.finish_population(),
            None => Ok(()),
        }
    }
}
