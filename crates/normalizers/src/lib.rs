//! Exact normalization layers for candle behind one [`Normalizer`] trait, built by name with
//! [`from_spec`]: BatchNorm, GroupNorm, LayerNorm and InstanceNorm; the small-batch remedies
//! Batch Renormalization (`brn`), Ghost BatchNorm (`ghostbn`) and PreciseBN (an evaluation
//! mode, [`Normalizer::start_precise_stats`]); the batch-free RMSNorm (`rms`), FRN (`frn`) and
//! EvoNorm-S0 (`evonorm-s0`); EvoNorm-B0 (`evonorm-b0`); and `none`, the identity baseline.
//! [`per_device`] gives any of them training statistics per device of K samples, as in
//! data-parallel training without synchronized BatchNorm.
//!
//! Conventions are PyTorch's (and the GroupNorm paper's): normalize with the *biased* variance,
//! store the *unbiased* one in `running_var`, `momentum` is the weight of the new batch, and the
//! affine transform is per channel. Variables carry PyTorch's names (`weight`, `bias`,
//! `running_mean`, `running_var`), so a `VarMap` saves a model with its running statistics.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{ModuleT, VarBuilder, VarMap};
//!
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let norm = normalizers::from_spec("gn:groups=8", 64, vb.pp("norm1"))?;
//! let x = Tensor::randn(0f32, 1.0, (4, 64, 8, 8), &Device::Cpu)?;
//! let y = norm.forward_t(&x, true)?;
//! assert_eq!(norm.spec(), "gn:groups=8");
//! # Ok::<(), candle_core::Error>(())
//! ```

/// The README's example compiles and runs as a doctest.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

mod batch_norm;
mod batch_renorm;
mod evonorm_b0;
mod evonorm_s0;
mod forward;
mod frn;
mod ghost_batch_norm;
mod group_norm;
mod identity;
mod input;
mod instance_norm;
pub mod kernels;
mod layer_norm;
mod params;
mod per_device;
pub mod reference;
mod rms_norm;
pub mod spec;

pub use batch_norm::BatchNorm;
pub use batch_renorm::BatchRenorm;
pub use evonorm_b0::EvoNormB0;
pub use evonorm_s0::EvoNormS0;
pub use frn::Frn;
pub use ghost_batch_norm::GhostBatchNorm;
pub use group_norm::GroupNorm;
pub use identity::Identity;
pub use instance_norm::InstanceNorm;
pub use layer_norm::LayerNorm;
pub use per_device::{per_device, PerDevice};
pub use rms_norm::RmsNorm;
pub use spec::{
    BatchNormConfig, BatchRenormConfig, Common, EvoNormB0Config, EvoNormS0Config, FrnConfig,
    GhostBatchNormConfig, GroupNormConfig, IdentityConfig, Impl, InstanceNormConfig,
    LayerNormConfig, Momentum, NormSpec, RmsNormConfig,
};

use candle_core::{bail, Result, Tensor};
use candle_nn::VarBuilder;

/// A normalization layer. `forward_t(x, train)` takes (N, C, ...) and returns the same shape and
/// dtype; `train = true` uses (and, where tracked, updates) batch statistics.
pub trait Normalizer: candle_nn::ModuleT + std::fmt::Debug + Send + Sync {
    /// The parsed spec this normalizer was built from.
    fn norm_spec(&self) -> &NormSpec;

    /// Canonical spec string: `from_spec(&n.spec(), c, vb)` builds an equal normalizer.
    fn spec(&self) -> String {
        self.norm_spec().to_string()
    }

    fn num_channels(&self) -> usize;

    /// Normalizes with the statistics of this batch, as in training, but leaves any running
    /// statistics unchanged: BatchNorm evaluated with batch statistics (Wu & Johnson 2021,
    /// "Rethinking Batch in BatchNorm"). For batch-independent normalizers without running
    /// statistics it is the same as `forward_t(x, false)`.
    fn forward_batch_stats(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, false)
    }

    /// The stored running mean and running (unbiased) variance, each of shape (C), where tracked.
    fn running_stats(&self) -> Result<Option<(Tensor, Tensor)>> {
        Ok(None)
    }

    /// PreciseBN (Wu & Johnson 2021; fvcore's `update_bn_stats`): from now on, training-mode
    /// forwards pool their batch statistics instead of updating the running ones, until
    /// [`Normalizer::finish_precise_stats`] stores the pooled mean and biased variance of every
    /// value seen (count-weighted). Returns whether the layer keeps such statistics (`bn`,
    /// `brn`, `ghostbn`, `evonorm-b0`); the others ignore both calls.
    fn start_precise_stats(&self) -> Result<bool> {
        Ok(false)
    }

    /// Ends [`Normalizer::start_precise_stats`], storing the pooled statistics.
    fn finish_precise_stats(&self) -> Result<()> {
        Ok(())
    }
}

/// Builds the normalizer that `spec` names for `num_channels` channels, making its variables
/// through `vb` (see the crate docs for the names). Errors name what is wrong with the spec.
pub fn from_spec(spec: &str, num_channels: usize, vb: VarBuilder) -> Result<Box<dyn Normalizer>> {
    build(&spec.parse()?, num_channels, vb)
}

/// [`from_spec`] for a spec already parsed.
pub fn build(spec: &NormSpec, num_channels: usize, vb: VarBuilder) -> Result<Box<dyn Normalizer>> {
    if num_channels == 0 {
        bail!("{}: num_channels must be at least 1", spec.name());
    }
    Ok(match spec {
        NormSpec::Batch(cfg) => Box::new(BatchNorm::new(*cfg, num_channels, vb)?),
        NormSpec::Group(cfg) => Box::new(GroupNorm::new(*cfg, num_channels, vb)?),
        NormSpec::Layer(cfg) => Box::new(LayerNorm::new(*cfg, num_channels, vb)?),
        NormSpec::Instance(cfg) => Box::new(InstanceNorm::new(*cfg, num_channels, vb)?),
        NormSpec::Identity(cfg) => Box::new(Identity::new(*cfg, num_channels)),
        NormSpec::Rms(cfg) => Box::new(RmsNorm::new(*cfg, num_channels, vb)?),
        NormSpec::Frn(cfg) => Box::new(Frn::new(*cfg, num_channels, vb)?),
        NormSpec::EvoNormS0(cfg) => Box::new(EvoNormS0::new(*cfg, num_channels, vb)?),
        NormSpec::EvoNormB0(cfg) => Box::new(EvoNormB0::new(*cfg, num_channels, vb)?),
        NormSpec::BatchRenorm(cfg) => Box::new(BatchRenorm::new(*cfg, num_channels, vb)?),
        NormSpec::GhostBatch(cfg) => Box::new(GhostBatchNorm::new(*cfg, num_channels, vb)?),
    })
}
