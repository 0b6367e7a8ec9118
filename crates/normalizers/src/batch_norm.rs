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

use crate::input;
use crate::params::{apply_affine, Affine, RunningStats};
use crate::reference;
use crate::spec::{Momentum, NormSpec};
use crate::Normalizer;
use candle_core::{bail, Result, Tensor};
use candle_nn::{ModuleT, VarBuilder};

#[derive(Debug, Clone)]
pub struct BatchNorm {
    spec: NormSpec,
    num_channels: usize,
    eps: f64,
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
    pub fn new(
        num_channels: usize,
        momentum: Momentum,
        eps: f64,
        affine: bool,
        track_running_stats: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            spec: NormSpec::Batch {
                momentum,
                eps,
                affine,
                track_running_stats,
            },
            num_channels,
            eps,
            affine: Affine::maybe(affine, num_channels, &vb)?,
            running: RunningStats::maybe(track_running_stats, num_channels, momentum, &vb)?,
        })
    }

    fn forward_stats(&self, x: &Tensor, stats: Stats) -> Result<Tensor> {
        let d = input::check("bn", x, self.num_channels)?;
        let x3 = input::view3(x, d)?;
        let xhat = match (&self.running, stats) {
            (Some(running), Stats::Eval) => running.normalize(&x3, self.eps)?,
            (running, stats) => {
                let m = d.n * d.s;
                if stats == Stats::Train && m < 2 {
                    bail!(
                        "bn: expected more than 1 value per channel when training, got input of \
                         shape {:?}; use a batch of at least 2, or evaluate with train=false",
                        x.dims()
                    );
                }
                let (xhat, mean, var) = reference::batch_norm_train(&x3, self.eps)?;
                if let (Some(running), Stats::Train) = (running, stats) {
                    running.update(&mean, &(var * (m as f64 / (m - 1) as f64))?)?;
                }
                xhat
            }
        };
        input::unview(apply_affine(xhat, &self.affine)?, x)
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
}
