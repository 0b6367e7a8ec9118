//! RMSNorm (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization"), per sample over
//! (C, spatial) as `ln`: y = x / sqrt(mean(x²) + eps) · weight[c]. No mean subtraction and no
//! bias; `weight` (init 1) with `affine`.
//!
//! Not candle-nn's `RmsNorm` or `ops::rms_norm`: their fused path has no backward.

use crate::forward::{self, Row};
use crate::kernels::SampleLayer;
use crate::spec::{NormSpec, RmsNormConfig};
use crate::{input, reference, Normalizer};
use candle_core::{Result, Tensor};
use candle_nn::{Init, ModuleT, VarBuilder};

#[derive(Debug, Clone)]
pub struct RmsNorm {
    spec: NormSpec,
    cfg: RmsNormConfig,
    num_channels: usize,
    weight: Option<Tensor>,
}

impl RmsNorm {
    /// Builds the RMSNorm that `cfg` describes.
    pub fn new(cfg: RmsNormConfig, num_channels: usize, vb: VarBuilder) -> Result<Self> {
        let weight = cfg
            .common
            .affine
            .then(|| vb.get_with_hints(num_channels, "weight", Init::Const(1.0)))
            .transpose()?;
        Ok(Self {
            spec: NormSpec::Rms(cfg),
            cfg,
            num_channels,
            weight,
        })
    }
}

impl ModuleT for RmsNorm {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        let d = input::check("rms", x, self.num_channels)?;
        let weight = self.weight.as_ref().map_or(Row::Const(1.0), Row::Var);
        let c = self.cfg.common;
        forward::per_sample(x, d, SampleLayer::Rms, &[weight], c.eps, c.imp, |x3, p| {
            reference::rms_norm(x3, &p[0], c.eps)
        })
    }
}

impl Normalizer for RmsNorm {
    fn norm_spec(&self) -> &NormSpec {
        &self.spec
    }

    fn num_channels(&self) -> usize {
        self.num_channels
    }
}
