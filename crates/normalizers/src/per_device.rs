//! Statistics per device: a normalizer applied in training to consecutive chunks of the batch,
//! each with its own statistics, as in data-parallel training on several devices without
//! synchronized BatchNorm. The GroupNorm paper's batch-size figure is this protocol: 8 GPUs,
//! BatchNorm's statistics over each GPU's images, one SGD step over all of them.
//!
//! [`per_device`] wraps only layers whose training output depends on the other samples
//! ([`NormSpec::uses_batch_statistics`]); for the others a chunk is the batch. The running
//! statistics are updated once per chunk, in order, as `ghostbn` does (on real devices each
//! keeps its own and one is saved). Evaluation, with running or batch statistics, and
//! PreciseBN are the wrapped layer's own.

use crate::spec::NormSpec;
use crate::{input, Normalizer};
use candle_core::{bail, Result, Tensor};
use candle_nn::ModuleT;

/// `f` on each chunk of `size` consecutive samples of `x` (the last may be smaller), the
/// outputs concatenated; `f(x)` itself when one chunk holds the batch.
pub(crate) fn chunked(
    x: &Tensor,
    size: usize,
    f: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let n = x.dim(0)?;
    if n <= size {
        return f(x);
    }
    let ys = (0..n)
        .step_by(size)
        .map(|start| f(&x.narrow(0, start, size.min(n - start))?))
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&ys, 0)
}

/// A batch-statistics normalizer whose training statistics come from chunks of `size` samples.
#[derive(Debug)]
pub struct PerDevice {
    inner: Box<dyn Normalizer>,
    size: usize,
}

/// `inner` with its training statistics over chunks of `size` samples (the per-device batch);
/// `inner` itself where its output does not depend on the batch. `size` must be at least 1.
pub fn per_device(inner: Box<dyn Normalizer>, size: usize) -> Result<Box<dyn Normalizer>> {
    if size == 0 {
        bail!("per-device statistics over 0 samples; the per-device batch must be at least 1");
    }
    if !inner.norm_spec().uses_batch_statistics() {
        return Ok(inner);
    }
    Ok(Box::new(PerDevice { inner, size }))
}

impl ModuleT for PerDevice {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if train {
            input::check(self.inner.norm_spec().name(), x, self.num_channels())?;
            chunked(x, self.size, |c| self.inner.forward_t(c, true))
        } else {
            self.inner.forward_t(x, false)
        }
    }
}

impl Normalizer for PerDevice {
    fn norm_spec(&self) -> &NormSpec {
        self.inner.norm_spec()
    }

    fn num_channels(&self) -> usize {
        self.inner.num_channels()
    }

    /// The statistics of the whole evaluated batch, as the wrapped layer's: the evaluation
    /// picks the batch (a device's, or a large one).
    fn forward_batch_stats(&self, x: &Tensor) -> Result<Tensor> {
        self.inner.forward_batch_stats(x)
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
