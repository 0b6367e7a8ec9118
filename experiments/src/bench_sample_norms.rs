//! bench-norms' table for the per-sample layers that have no twin in candle-nn (`rms`, `frn`,
//! `evonorm-s0`): the fused kernel against the same layer composed of candle ops
//! (`impl=reference`), training forward and forward+backward, with the speed-up.

use crate::bench_layer::{time_layer, Layer};
use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

/// The layers this table times.
pub const SAMPLE_NORMS: [&str; 3] = ["rms", "frn", "evonorm-s0"];

/// The spec timed for a name: EvoNorm-S0 with GroupNorm's 32 groups.
fn spec(norm: &str) -> String {
    match norm {
        "evonorm-s0" => "evonorm-s0:groups=32".into(),
        other => other.into(),
    }
}

fn layer(spec: &str, c: usize) -> Result<Layer> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    Ok(Layer::Normbench(normalizers::from_spec(spec, c, vb)?))
}

/// Prints the table for `norms` (among [`SAMPLE_NORMS`]) on `shapes`.
pub fn table(norms: &[&str], shapes: &[[usize; 4]], min_time: f64, threads: usize) -> Result<()> {
    if norms.is_empty() {
        return Ok(());
    }
    println!("## Per-sample layers: fused kernel vs the same layer composed of candle ops, {threads} thread(s)\n");
    println!(
        "f32, NCHW. Forward+backward is `(y * r).sum_all()?.backward()` through candle's \
         autograd, less the same harness on an identity layer (the median of paired differences, \
         the two calls alternating). The composed layer (`impl=reference`) computes in f64, as \
         every reference twin.\n"
    );
    println!("| norm | shape | fused fwd (ms) | composed fwd (ms) | fused fwd+bwd (ms) | composed fwd+bwd (ms) | fwd+bwd speed-up |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    for shape in shapes {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, shape.as_slice(), &Device::Cpu)?)?;
        let r = Tensor::randn(0f32, 1.0, shape.as_slice(), &Device::Cpu)?;
        for norm in norms {
            let spec = spec(norm);
            let fused = time_layer(&layer(&spec, shape[1])?, &x, &r, min_time)?;
            let composed = format!(
                "{spec}{}impl=reference",
                if spec.contains(':') { ',' } else { ':' }
            );
            let reference = time_layer(&layer(&composed, shape[1])?, &x, &r, min_time)?;
            println!(
                "| {spec} | {shape:?} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1}× |",
                fused.fwd * 1e3,
                reference.fwd * 1e3,
                fused.net * 1e3,
                reference.net * 1e3,
                reference.net / fused.net
            );
        }
    }
    println!();
    Ok(())
}
