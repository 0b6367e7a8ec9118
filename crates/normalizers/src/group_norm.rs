//! GroupNorm (Wu & He 2018, "Group Normalization").
//!
//! The C channels are split into G groups of C/G consecutive channels; each sample's group is
//! normalized with its own mean and *biased* variance over (C/G channels, spatial):
//! y = weight[c] · (x − μ_{n,g}) / sqrt(σ²_{n,g} + eps) + bias[c]. Training and evaluation are
//! the same computation; nothing depends on the rest of the batch. G must divide C.
//! LayerNorm is G = 1, InstanceNorm G = C (see `layer_norm.rs`, `instance_norm.rs`).

use crate::forward::{self, Normalized};
use crate::input;
use crate::kernels::Sets;
use crate::params::Affine;
use crate::spec::{Common, GroupNormConfig, Impl, NormSpec};
use crate::Normalizer;
use candle_core::{bail, Result, Tensor};
use candle_nn::{ModuleT, VarBuilder};

#[derive(Debug, Clone)]
pub struct GroupNorm {
    spec: NormSpec,
    num_channels: usize,
    groups: usize,
    eps: f64,
    imp: Impl,
    affine: Option<Affine>,
}

impl GroupNorm {
    /// Builds the GroupNorm that `cfg` describes.
    pub fn new(cfg: GroupNormConfig, num_channels: usize, vb: VarBuilder) -> Result<Self> {
        Self::with_groups(
            NormSpec::Group(cfg),
            num_channels,
            cfg.groups,
            cfg.common,
            vb,
        )
    }

    /// The GroupNorm that LayerNorm (G = 1) and InstanceNorm (G = C) are, carrying their `spec`.
    pub(crate) fn with_groups(
        spec: NormSpec,
        num_channels: usize,
        groups: usize,
        common: Common,
        vb: VarBuilder,
    ) -> Result<Self> {
        let Common { eps, affine, imp } = common;
        if groups == 0 || !num_channels.is_multiple_of(groups) {
            bail!(
                "gn: groups={groups} does not divide num_channels={num_channels}; choose groups \
                 among {}",
                divisors(num_channels)
            );
        }
        Ok(Self {
            spec,
            num_channels,
            groups,
            eps,
            imp,
            affine: Affine::maybe(affine, num_channels, &vb)?,
        })
    }

    /// Forward with the name `layer` in error messages; returns the output and, if
    /// `keep_stats`, the groups' statistics (see [`forward::with_batch_stats`]), for normalizers
    /// built on this one.
    pub(crate) fn forward_named(
        &self,
        layer: &str,
        x: &Tensor,
        keep_stats: bool,
    ) -> Result<Normalized> {
        let d = input::check(layer, x, self.num_channels)?;
        forward::with_batch_stats(
            x,
            d,
            Sets::Groups(self.groups),
            self.eps,
            &self.affine,
            self.imp,
            keep_stats,
        )
    }

    pub(crate) fn eps(&self) -> f64 {
        self.eps
    }

    pub(crate) fn imp(&self) -> Impl {
        self.imp
    }

    pub(crate) fn affine(&self) -> &Option<Affine> {
        &self.affine
    }
}

/// The divisors of `c`, comma-separated: the group counts a layer of `c` channels takes.
pub(crate) fn divisors(c: usize) -> String {
    let divisors: Vec<String> = (1..=c)
        .filter(|g| c.is_multiple_of(*g))
        .map(|g| g.to_string())
        .collect();
    divisors.join(", ")
}

impl ModuleT for GroupNorm {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        Ok(self.forward_named(self.spec.name(), x, false)?.y)
    }
}
impl Normalizer for GroupNorm {
    fn norm_spec(&self) -> &NormSpec {
        &self.spec
    }

    fn num_channels(&self) -> usize {
        self.num_channels
    }
}
