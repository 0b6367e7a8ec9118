//! Fused CPU kernels: each normalizer's training forward as one candle custom op, and its
//! backward as a second fused pass, instead of a dozen composed elementwise ops.
//!
//! Every normalizer normalizes *sets* of values of a contiguous (N, C, S) tensor: BatchNorm one
//! set per channel (N segments of S values, C·S apart), GroupNorm one per sample and group (one
//! segment of C/G·S values); LayerNorm and InstanceNorm are GroupNorm with G = 1 and G = C.
//! - Forward, per set: the mean, then the *biased* variance from squared deviations (two passes,
//!   accumulated in f64, over data that stays in cache), then y = (x − μ)·rstd·w[c] + b[c]
//!   (in f64 per element). The sets' mean and variance are kept for the backward pass and the
//!   running statistics.
//! - Backward, per set: with x̂ = (x − μ)·rstd and g = dy·w[c], one pass for Σg and Σg·x̂ (and
//!   the per-channel Σdy·x̂, Σdy of the weight and bias gradients), one for
//!   dx = rstd·(g − Σg/M − x̂·Σg·x̂/M).
//!
//! Work is split over sets with rayon, each set reduced by one task in a fixed order, and the
//! per-sample partial sums of dw and db added in sample order: results are bit-identical for
//! every thread count.

mod ops;

pub use ops::{fused_normalize, Sets, Stats};
