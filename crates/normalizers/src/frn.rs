//! Filter Response Normalization with its Thresholded Linear Unit (Singh & Krishnan 2020):
//! per sample and channel over the spatial values, ν² = mean(x²),
//! y = weight[c] · x / sqrt(ν² + eps) + bias[c], z = max(y, tau[c]). No mean subtraction and
//! nothing shared across the batch. `eps` is 1e-6 (the paper's; it matters at 1×1 spatial,
//! where ν² = x² and FRN is a sign function without it). `tlu=false` drops the max and `tau`.
//! Variables: `weight` (1) and `bias` (0) with `affine`, `tau` (0) with `tlu`.

use crate::forward::{self, Row};
use crate::kernels::SampleLayer;
use crate::params::Affine;
use crate::spec::{FrnConfig, NormSpec};
use crate::{input, reference, Normalizer};
use candle_core::{Result, Tensor};
use candle_nn::{Init, ModuleT, VarBuilder};

#[derive(Debug, Clone)]
pub struct Frn {
    spec: NormSpec,
    cfg: FrnConfig,
    num_channels: usize,
    affine: Option<Affine>,
    tau: Option<Tensor>,
}

impl Frn {
    /// Builds the FRN that `cfg` describes.
    pub fn new(cfg: FrnConfig, num_channels: usize, vb: VarBuilder) -> Result<Self> {
        let tau = cfg
            .tlu
            .then(|| vb.get_with_hints(num_channels, "tau", Init::Const(0.0)))
            .transpose()?;
        Ok(Self {
            spec: NormSpec::Frn(cfg),
            cfg,
            num_channels,
            affine: Affine::maybe(cfg.common.affine, num_channels, &vb)?,
            tau,
        })
    }
}

impl ModuleT for Frn {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        let d = input::check("frn", x, self.num_channels)?;
        let (w, b) = match &self.affine {
            Some(a) => (Row::Var(&a.weight), Row::Var(&a.bias)),
            None => (Row::Const(1.0), Row::Const(0.0)),
        };
        let tau = self.tau.as_ref().map_or(Row::Const(0.0), Row::Var);
        let c = self.cfg.common;
        let tlu = self.cfg.tlu;
        let layer = SampleLayer::Frn { tlu };
        forward::per_sample(x, d, layer, &[w, b, tau], c.eps, c.imp, |x3, p| {
            reference::frn(x3, &p[0], &p[1], tlu.then_some(&p[2]), c.eps)
        })
    }
}

impl Normalizer for Frn {
    fn norm_spec(&self) -> &NormSpec {
        &self.spec
    }

    fn num_channels(&self) -> usize {
        self.num_channels
    }
}
