//! LayerNorm (Ba, Kiros & Hinton 2016, "Layer Normalization"), as the GroupNorm paper uses it
//! for CNNs: each sample is normalized with its mean and *biased* variance over (C, spatial), and
//! the affine transform is per channel, y = weight[c] · x̂ + bias[c]. It is GroupNorm with one
//! group, and is built as one.
//!
//! Not candle-nn's `LayerNorm`: its fused path has no backward and drops gradients.

use crate::group_norm::GroupNorm;
use crate::spec::NormSpec;
use crate::Normalizer;
use candle_core::{Result, Tensor};
use candle_nn::{ModuleT, VarBuilder};

#[derive(Debug, Clone)]
pub struct LayerNorm {
    spec: NormSpec,
    inner: GroupNorm,
}

impl LayerNorm {
    pub fn new(num_channels: usize, eps: f64, affine: bool, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            spec: NormSpec::Layer { eps, affine },
            inner: GroupNorm::new(num_channels, 1, eps, affine, vb)?,
        })
    }
}

impl ModuleT for LayerNorm {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        Ok(self.inner.forward_named("ln", x)?.0)
    }
}

impl Normalizer for LayerNorm {
    fn norm_spec(&self) -> &NormSpec {
        &self.spec
    }

    fn num_channels(&self) -> usize {
        self.inner.num_channels()
    }
}
