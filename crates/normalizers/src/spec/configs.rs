//! Each normalizer's options, with PyTorch's (or the paper's) defaults.

use super::{Common, Impl, Momentum, DEFAULT_EPS, DEFAULT_GROUPS, DEFAULT_MOMENTUM};

/// `bn`'s options.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchNormConfig {
    pub momentum: Momentum,
    pub track_running_stats: bool,
    pub common: Common,
}

impl Default for BatchNormConfig {
    fn default() -> Self {
        Self {
            momentum: DEFAULT_MOMENTUM,
            track_running_stats: true,
            common: Common::default(),
        }
    }
}

/// `gn`'s options.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupNormConfig {
    pub groups: usize,
    pub common: Common,
}

impl Default for GroupNormConfig {
    fn default() -> Self {
        Self {
            groups: DEFAULT_GROUPS,
            common: Common::default(),
        }
    }
}

/// `ln`'s options.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LayerNormConfig {
    pub common: Common,
}

/// `in`'s options (running statistics off by default, as PyTorch's InstanceNorm).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InstanceNormConfig {
    pub track_running_stats: bool,
    pub momentum: Momentum,
    pub common: Common,
}

impl Default for InstanceNormConfig {
    fn default() -> Self {
        Self {
            track_running_stats: false,
            momentum: DEFAULT_MOMENTUM,
            common: Common::default(),
        }
    }
}

/// `none`'s options: `eps` and `impl` are accepted, as every normalizer takes them, and change
/// nothing; it has no weight or bias (`affine` is false).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IdentityConfig {
    pub common: Common,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            common: Common {
                affine: false,
                ..Common::default()
            },
        }
    }
}

/// `rms`'s options (`affine` makes the per-channel `weight`; RMSNorm has no bias).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RmsNormConfig {
    pub common: Common,
}

/// `frn`'s options: `tlu` adds the thresholded linear unit max(y, tau[c]); `eps` is 1e-6 as in
/// the paper.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FrnConfig {
    pub tlu: bool,
    pub common: Common,
}

impl Default for FrnConfig {
    fn default() -> Self {
        Self {
            tlu: true,
            common: Common {
                eps: 1e-6,
                ..Common::default()
            },
        }
    }
}

/// `evonorm-s0`'s options: groups of C/G consecutive channels, as `gn`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvoNormS0Config {
    pub groups: usize,
    pub common: Common,
}

impl Default for EvoNormS0Config {
    fn default() -> Self {
        Self {
            groups: DEFAULT_GROUPS,
            common: Common::default(),
        }
    }
}

/// `evonorm-b0`'s options: the running variance is updated with `momentum`, as `bn`'s.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvoNormB0Config {
    pub momentum: Momentum,
    pub common: Common,
}

impl Default for EvoNormB0Config {
    fn default() -> Self {
        Self {
            momentum: DEFAULT_MOMENTUM,
            common: Common::default(),
        }
    }
}

/// `brn`'s options: the clip limits of r and d, and `warmup`, the training steps over which
/// they ramp from (1, 0) to (rmax, dmax). The momentum is a number: `num_batches_tracked`
/// already counts the training steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchRenormConfig {
    pub momentum: f64,
    pub rmax: f64,
    pub dmax: f64,
    pub warmup: usize,
    pub common: Common,
}

impl Default for BatchRenormConfig {
    fn default() -> Self {
        Self {
            momentum: 0.1,
            rmax: 3.0,
            dmax: 5.0,
            warmup: 0,
            common: Common::default(),
        }
    }
}

/// `ghostbn`'s options: the virtual batch size (required, at least 1) and `bn`'s.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct GhostBatchNormConfig {
    /// 0 until given: `ghostbn` without `virtual=K` is refused.
    pub virtual_size: usize,
    pub bn: BatchNormConfig,
}

impl Default for Common {
    fn default() -> Self {
        Self {
            eps: DEFAULT_EPS,
            affine: true,
            imp: Impl::Fused,
        }
    }
}
