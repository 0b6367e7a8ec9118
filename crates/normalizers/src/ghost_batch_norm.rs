//! Ghost BatchNorm (Hoffer, Hubara & Soudry 2017, "Train longer, generalize better").
//!
//! In training the batch is split into consecutive chunks of `virtual` samples (the last may
//! be smaller), each normalized with its own statistics as `bn` would, and the running
//! statistics are updated once per chunk, in order, exactly as if each chunk went through `bn`.
//! Evaluation is `bn`'s. Options and variables are `bn`'s.
//!
//! This follows Hoffer et al.'s chunking; tf-keras's `virtual_batch_size` instead takes strided
//! ghost batches and updates the running statistics with their averaged statistics.
//!
//! With `virtual=2` at a batch of 32, the layer sees BatchNorm's small-batch statistics at the
//! large batch's number of steps and learning rate: it separates noisy statistics from
//! under-training in a batch-size sweep.

use crate::batch_norm::BatchNorm;
use crate::per_device::chunked;
use crate::spec::{GhostBatchNormConfig, NormSpec};
use crate::{input, Normalizer};
use candle_core::{Result, Tensor};
use candle_nn::{ModuleT, VarBuilder};

#[derive(Debug, Clone)]
pub struct GhostBatchNorm {
    spec: NormSpec,
    virtual_size: usize,
    inner: BatchNorm,
}

impl GhostBatchNorm {
    /// Builds the Ghost BatchNorm that `cfg` describes.
    pub fn new(cfg: GhostBatchNormConfig, num_channels: usize, vb: VarBuilder) -> Result<Self> {
        if cfg.virtual_size == 0 {
            candle_core::bail!("ghostbn: virtual=0; the virtual batch size must be at least 1");
        }
        Ok(Self {
            spec: NormSpec::GhostBatch(cfg),
            virtual_size: cfg.virtual_size,
            inner: BatchNorm::new(cfg.bn, num_channels, vb)?,
        })
    }

    /// `f` on each chunk of `x`, the outputs concatenated.
    fn chunked(&self, x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        input::check("ghostbn", x, self.inner.num_channels())?;
        chunked(x, self.virtual_size, f)
    }
}

impl ModuleT for GhostBatchNorm {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if train {
            self.chunked(x, |chunk| self.inner.forward_t(chunk, true))
        } else {
            self.inner.forward_t(x, false)
        }
    }
}

impl Normalizer for GhostBatchNorm {
    fn norm_spec(&self) -> &NormSpec {
        &self.spec
    }

    fn num_channels(&self) -> usize {
        self.inner.num_channels()
    }

    /// Each chunk with its own statistics, running statistics untouched.
    fn forward_batch_stats(&self, x: &Tensor) -> Result<Tensor> {
        self.chunked(x, |chunk| self.inner.forward_batch_stats(chunk))
    }

    fn running_stats(&self) -> Result<Option<(Tensor, Tensor)>> {
        self.inner.running_stats()
    }

    fn start_precise_stats(&self) -> Result<bool> {
        self.inner.start_precise_stats()
    }

    fn finish_precise_stats(&self) -> Result<()> {
        self.inner.finish_precise_stats()
    }
}
