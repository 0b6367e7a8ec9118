//! Fused CPU kernels: each normalizer's forward (training, and evaluation with running
//! statistics) as one candle custom op, and its backward as a second fused pass, instead of a
//! dozen composed elementwise ops.
//!
//! Every normalizer normalizes *sets* of values of a contiguous (N, C, *spatial) tensor, seen
//! as (N, C, S): BatchNorm one set per channel (N runs of S values, C·S apart), GroupNorm one
//! per sample and group (C/G consecutive runs); LayerNorm and InstanceNorm are GroupNorm with
//! G = 1 and G = C.
//! - Forward, per set: the mean and *biased* variance in one sweep (sums of x − k and (x − k)²
//!   in f64, k the set's first value), then y = (x − μ)·rstd·w[c] + b[c] per element in the
//!   storage type (μ split into a high and a low part), over data still in cache. The sets'
//!   mean and variance are kept for the backward pass and the running statistics; a caller
//!   that needs no statistics (`fused_normalize_lean`) keeps them only where they are small
//!   next to the input, and for small sets the backward recomputes them, the same bits.
//! - Backward, per set: with x̂ = (x − μ)·rstd and g = dy·w, one pass for the per-run Σdy and
//!   Σdy·(x − μ) (which give Σg, Σg·x̂ and the weight and bias gradients), one for
//!   dx = rstd·(g − Σg/M − x̂·Σg·x̂/M).
//! - Evaluation: y = (x − μ)·rstd·w[c] + b[c] with the running statistics; dx = rstd·w[c]·dy.
//!
//! The inner loops (`lanes`) are vectorized (an AVX2 build where the CPU has it) with
//! reductions in a fixed lane order; runs of one value (an (N, C) input) skip them and take the
//! same operations value by value, since only lane 0 of such a run ever moves. Work is split over steps of sets on the rayon pool's
//! threads (`parallel`: chunks from a shared cursor, the caller spinning briefly for the last
//! ones), each set reduced by one thread, and the per-sample partial sums of dw and db added in
//! sample order: results are bit-identical for every thread count and CPU.
//!
//! Files by role: `geom` (how values form sets, steps), `normalize` (statistics and the
//! forward), `backward`, `ops` (the candle custom ops and the public functions, which check
//! every operand's shape), `lanes` (the inner loops; `lanes/avx2.rs` their intrinsics) and
//! `parallel` (the work-splitting loop). Design notes and measurements: `docs/kernels.md`.

mod backward;
mod geom;
mod lanes;
mod normalize;
mod ops;
mod parallel;
mod sample;

pub use geom::{Sets, Stats};
pub use ops::{
    fused_backward, fused_normalize, fused_normalize_fixed, fused_normalize_lean, lean_keeps_stats,
    SharedStats,
};
pub use sample::{fused_sample_norm, SampleLayer};
