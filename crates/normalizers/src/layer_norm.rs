//! LayerNorm (Ba, Kiros & Hinton 2016, "Layer Normalization"), as the GroupNorm paper uses it
//! for CNNs: each sample is normalized with its mean and *biased* variance over (C, spatial), and
//! the affine transform is per channel, y = weight[c] · x̂ + bias[c]. It is GroupNorm with one
//! group, and is built as one.
//!
//! Not candle-nn's `LayerNorm`: its fused path has no backward and drops gradients.

use crate::group_norm::GroupNorm;
use crate::spec::{LayerNormConfig, NormSpec};
use crate::Normalizer;
use candle_core::{Result, Tensor};
use candle_nn::{ModuleT, VarBuilder};

#[derive(Debug, Clone)]
pub struct LayerNorm {
    inner: GroupNorm,
}

impl LayerNorm {
    /// Builds the LayerNorm that `cfg` describes.
    pub fn new(cfg: LayerNormConfig, num_channels: usize, vb: VarBuilder) -> Result<Self> {
        let spec = NormSpec::Layer(cfg);
        Ok(Self {
            inner: GroupNorm::with_groups(spec, num_channels, 1, cfg.common, vb)?,
        })
    }
}

impl ModuleT for LayerNorm {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.inner.forward_t(x, train)
    }
}

impl Normalizer for LayerNorm {
    fn norm_spec(&self) -> &NormSpec {
        self.inner.norm_spec()
    }

    fn num_channels(&self) -> usize {
        self.inner.num_channels()
    }
}
