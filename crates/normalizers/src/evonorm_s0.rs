//! EvoNorm-S0 (Liu, Brock, Simonyan & Le 2020, "Evolving Normalization-Activation Layers"), as
//! timm's `EvoNorm2dS0`: y = x · sigmoid(v[c] · x) / sqrt(var + eps) · weight[c] + bias[c],
//! var the biased variance of the sample's group of C/G consecutive channels over (C/G,
//! spatial), as `gn`'s groups. Batch-independent; a normalizer and activation in one.
//! Variables: `weight` (1) and `bias` (0) with `affine`, `v` (1).

use crate::forward::{self, Row};
use crate::kernels::SampleLayer;
use crate::params::Affine;
use crate::spec::{EvoNormS0Config, NormSpec};
use crate::{input, reference, Normalizer};
use candle_core::{bail, Result, Tensor};
use candle_nn::{Init, ModuleT, VarBuilder};

#[derive(Debug, Clone)]
pub struct EvoNormS0 {
    spec: NormSpec,
    cfg: EvoNormS0Config,
    num_channels: usize,
    affine: Option<Affine>,
    v: Tensor,
}

impl EvoNormS0 {
    /// Builds the EvoNorm-S0 that `cfg` describes; `groups` must divide `num_channels`.
    pub fn new(cfg: EvoNormS0Config, num_channels: usize, vb: VarBuilder) -> Result<Self> {
        let groups = cfg.groups;
        if groups == 0 || !num_channels.is_multiple_of(groups) {
            bail!(
                "evonorm-s0: groups={groups} does not divide num_channels={num_channels}; \
                 choose groups among {}",
                crate::group_norm::divisors(num_channels)
            );
        }
        Ok(Self {
            spec: NormSpec::EvoNormS0(cfg),
            cfg,
            num_channels,
            affine: Affine::maybe(cfg.common.affine, num_channels, &vb)?,
            v: vb.get_with_hints(num_channels, "v", Init::Const(1.0))?,
        })
    }
}

impl ModuleT for EvoNormS0 {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        let d = input::check("evonorm-s0", x, self.num_channels)?;
        let (w, b) = match &self.affine {
            Some(a) => (Row::Var(&a.weight), Row::Var(&a.bias)),
            None => (Row::Const(1.0), Row::Const(0.0)),
        };
        let c = self.cfg.common;
        let groups = self.cfg.groups;
        let layer = SampleLayer::EvoNormS0 { groups };
        let rows = [w, b, Row::Var(&self.v)];
        forward::per_sample(x, d, layer, &rows, c.eps, c.imp, |x3, p| {
            reference::evonorm_s0(x3, groups, &p[0], &p[1], &p[2], c.eps)
        })
    }
}

impl Normalizer for EvoNormS0 {
    fn norm_spec(&self) -> &NormSpec {
        &self.spec
    }

    fn num_channels(&self) -> usize {
        self.num_channels
    }
}
