//! InstanceNorm (Ulyanov, Vedaldi & Lempitsky 2016, "Instance Normalization: The Missing
//! Ingredient for Fast Stylization").
//!
//! Each sample's channel is normalized with its own mean and *biased* variance over the spatial
//! dimensions: GroupNorm with one channel per group, and built as one. The input needs spatial
//! dimensions, and more than one spatial value wherever instance statistics are used.
//!
//! With `track_running_stats=true` it behaves as PyTorch's InstanceNorm: training updates
//! `running_mean` with the batch average of the instance means and `running_var` with the batch
//! average of the *unbiased* instance variances (S/(S−1)), and evaluation normalizes with the
//! running statistics.

use crate::forward;
use crate::group_norm::GroupNorm;
use crate::input::{self, InputDims};
use crate::params::RunningStats;
use crate::spec::{InstanceNormConfig, NormSpec};
use crate::Normalizer;
use candle_core::{bail, Result, Tensor};
use candle_nn::{ModuleT, VarBuilder};

#[derive(Debug, Clone)]
pub struct InstanceNorm {
    inner: GroupNorm,
    running: Option<RunningStats>,
}

impl InstanceNorm {
    /// Builds the InstanceNorm that `cfg` describes.
    pub fn new(cfg: InstanceNormConfig, num_channels: usize, vb: VarBuilder) -> Result<Self> {
        let spec = NormSpec::Instance(cfg);
        let c = num_channels;
        Ok(Self {
            running: RunningStats::maybe(cfg.track_running_stats, c, cfg.momentum, &vb)?,
            inner: GroupNorm::with_groups(spec, c, c, cfg.common, vb)?,
        })
    }

    fn check(&self, x: &Tensor) -> Result<InputDims> {
        let d = input::check("in", x, self.inner.num_channels())?;
        if d.spatial_rank == 0 {
            bail!(
                "in: expected an input with spatial dimensions (N, C, L), (N, C, H, W) or \
                 (N, C, D, H, W), got shape {:?}; InstanceNorm of (N, C) normalizes single values",
                x.dims()
            );
        }
        Ok(d)
    }

    fn instance_stats(&self, x: &Tensor, update: bool) -> Result<Tensor> {
        let d = self.check(x)?;
        if d.s < 2 {
            bail!(
                "in: expected more than 1 spatial element when using instance statistics, got \
                 input of shape {:?}",
                x.dims()
            );
        }
        let out = self
            .inner
            .forward_named("in", x, self.running.is_some() && update)?;
        if let (Some(running), true) = (&self.running, update) {
            let bessel = d.s as f64 / (d.s - 1) as f64;
            let per_sample = |t: Tensor| t.reshape((d.n, d.c))?.mean(0);
            let (mean, var) = out.stats()?;
            running.update(&per_sample(mean)?, &(per_sample(var)? * bessel)?)?;
        }
        Ok(out.y)
    }
}

impl ModuleT for InstanceNorm {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match (&self.running, train) {
            (Some(running), false) => {
                let d = self.check(x)?;
                let inner = &self.inner;
                forward::with_running_stats(x, d, running, inner.eps(), inner.affine(), inner.imp())
            }
            _ => self.instance_stats(x, train),
        }
    }
}

impl Normalizer for InstanceNorm {
    fn norm_spec(&self) -> &NormSpec {
        self.inner.norm_spec()
    }
    fn num_channels(&self) -> usize {
        self.inner.num_channels()
    }

    fn forward_batch_stats(&self, x: &Tensor) -> Result<Tensor> {
        self.instance_stats(x, false)
    }

    fn running_stats(&self) -> Result<Option<(Tensor, Tensor)>> {
        self.running.as_ref().map(RunningStats::stored).transpose()
    }
}
