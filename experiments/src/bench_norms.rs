//! `bench-norms`: normbench's fused normalizers against their reference twins and candle-nn's
//! own layers, printed as markdown tables with speed-ups, effective bandwidth against a copy of
//! the same size, and peak extra memory.

use crate::alloc;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Module, ModuleT, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Threads for the kernels (and candle's own ops).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Shapes N,C,H,W separated by `;` [default: the five shapes of the kernels issue].
    #[arg(long)]
    shapes: Option<String>,
    /// Normalizers to time.
    #[arg(long, value_delimiter = ',', default_value = "bn,gn,ln,in")]
    norms: Vec<String>,
    /// Minimum measuring time per cell, in seconds.
    #[arg(long, default_value_t = 0.3)]
    min_time: f64,
    /// Leave out the reference twin (slow on the large shapes).
    #[arg(long)]
    no_reference: bool,
}

const DEFAULT_SHAPES: [[usize; 4]; 5] = [
    [2, 64, 56, 56],
    [32, 64, 56, 56],
    [32, 256, 14, 14],
    [8, 512, 7, 7],
    [32, 32, 32, 32],
];

/// Median seconds per call of `f` and peak bytes allocated above the level before a call, over
/// at least 3 calls and `min_time` seconds, after one warm-up call.
pub fn measure(min_time: f64, mut f: impl FnMut() -> Result<()>) -> Result<(f64, usize)> {
    f()?;
    let mut samples = Vec::new();
    let mut peak = 0;
    let start = Instant::now();
    while samples.len() < 3 || start.elapsed().as_secs_f64() < min_time {
        let base = alloc::reset_peak();
        let t = Instant::now();
        f()?;
        samples.push(t.elapsed().as_secs_f64());
        peak = peak.max(alloc::peak().saturating_sub(base));
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    Ok((samples[samples.len() / 2], peak))
}

/// A normalization layer under test: normbench's (fused or reference) or candle-nn's.
enum Layer {
    Normbench(Box<dyn normalizers::Normalizer>),
    CandleBatch(candle_nn::BatchNorm),
    CandleGroup(candle_nn::GroupNorm),
    /// LayerNorm over (C, H, W) composed from candle ops (candle-nn's fused one has no backward).
    ComposedLn {
        weight: Tensor,
        bias: Tensor,
    },
    Identity,
}

impl Layer {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Layer::Normbench(n) => n.forward_t(x, true)?,
            Layer::CandleBatch(bn) => bn.forward_t(x, true)?,
            Layer::CandleGroup(gn) => gn.forward(x)?,
            Layer::ComposedLn { weight, bias } => {
                let mean = x.mean_keepdim((1, 2, 3))?;
                let xc = x.broadcast_sub(&mean)?;
                let var = xc.sqr()?.mean_keepdim((1, 2, 3))?;
                let xhat = xc.broadcast_div(&(var + 1e-5)?.sqrt()?)?;
                let c = x.dim(1)?;
                xhat.broadcast_mul(&weight.reshape((1, c, 1, 1))?)?
                    .broadcast_add(&bias.reshape((1, c, 1, 1))?)?
            }
            Layer::Identity => x.clone(),
        })
    }
}

fn build(kind: &str, norm: &str, c: usize, vb: VarBuilder) -> Result<Layer> {
    let spec = match norm {
        "bn" => "bn".to_string(),
        "gn" => "gn:groups=32".to_string(),
        "ln" => "ln".to_string(),
        "in" => "in".to_string(),
        other => bail!("unknown normalizer {other:?} for bench-norms; use bn, gn, ln, in"),
    };
    Ok(match (kind, norm) {
        ("fused", _) => Layer::Normbench(normalizers::from_spec(&spec, c, vb)?),
        ("reference", _) => Layer::Normbench(normalizers::from_spec(
            &format!(
                "{spec}{}impl=reference",
                if spec.contains(':') { ',' } else { ':' }
            ),
            c,
            vb,
        )?),
        ("candle-nn", "bn") => Layer::CandleBatch(candle_nn::batch_norm(
            c,
            candle_nn::BatchNormConfig::default(),
            vb,
        )?),
        ("candle-nn", "gn") => Layer::CandleGroup(candle_nn::group_norm(32, c, 1e-5, vb)?),
        ("candle-nn", "in") => Layer::CandleGroup(candle_nn::group_norm(c, c, 1e-5, vb)?),
        ("candle-nn", _) => Layer::ComposedLn {
            weight: vb.get_with_hints(c, "weight", candle_nn::Init::Const(1.0))?,
            bias: vb.get_with_hints(c, "bias", candle_nn::Init::Const(0.0))?,
        },
        _ => Layer::Identity,
    })
}

struct Timing {
    fwd: f64,
    fwd_bwd: f64,
    mem_fwd: usize,
    mem_fwd_bwd: usize,
}

fn time_layer(layer: &Layer, x: &Var, r: &Tensor, min_time: f64) -> Result<Timing> {
    let (fwd, mem_fwd) = measure(min_time, || {
        layer.forward(x.as_tensor())?;
        Ok(())
    })?;
    let (fwd_bwd, mem_fwd_bwd) = measure(min_time, || {
        let y = layer.forward(x.as_tensor())?;
        (y * r)?.sum_all()?.backward()?;
        Ok(())
    })?;
    Ok(Timing {
        fwd,
        fwd_bwd,
        mem_fwd,
        mem_fwd_bwd,
    })
}

/// Bytes per second of copying a tensor of `n` f32 values (read once, written once).
fn copy_bandwidth(n: usize, min_time: f64) -> Result<f64> {
    let src = vec![1f32; n];
    let mut dst = vec![0f32; n];
    let (t, _) = measure(min_time, || {
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
        Ok(())
    })?;
    Ok(2.0 * 4.0 * n as f64 / t)
}

pub fn run(args: BenchArgs) -> Result<()> {
    std::env::set_var("RAYON_NUM_THREADS", args.threads.to_string());
    let shapes: Vec<[usize; 4]> = match &args.shapes {
        None => DEFAULT_SHAPES.to_vec(),
        Some(s) => s
            .split(';')
            .map(|shape| {
                let dims: Vec<usize> = shape
                    .split(',')
                    .map(|d| d.trim().parse())
                    .collect::<std::result::Result<_, _>>()?;
                match dims[..] {
                    [n, c, h, w] => Ok([n, c, h, w]),
                    _ => bail!("--shapes: {shape:?} is not N,C,H,W"),
                }
            })
            .collect::<Result<_>>()?,
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build()?;
    pool.install(|| -> Result<()> {
        println!("## Normalization layers, training forward and forward+backward\n");
        println!(
            "f32, NCHW, {} thread(s). Forward+backward is `(y * r).sum_all()?.backward()` through candle's \
             autograd, with the cost of that harness on an identity layer subtracted (\"net\"). \
             GB/s counts the bytes the bound says each pass must move (bn forward: read x twice, write y; \
             gn/ln/in forward: read x, write y; backward: read x and dy twice, write dx) against a copy of \
             the same size measured now. Memory is the peak allocated above the inputs, as a multiple of \
             the input's size.\n",
            args.threads
        );
        let mut kinds = vec!["fused"];
        if !args.no_reference {
            kinds.push("reference");
        }
        kinds.push("candle-nn");
        for shape in &shapes {
            let n: usize = shape.iter().product();
            let bytes = 4.0 * n as f64;
            let bandwidth = copy_bandwidth(n, args.min_time)?;
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, shape.as_slice(), &Device::Cpu)?)?;
            let r = Tensor::randn(0f32, 1.0, shape.as_slice(), &Device::Cpu)?;
            let harness = time_layer(&Layer::Identity, &x, &r, args.min_time)?;
            println!("### shape {shape:?} ({:.1} MB; copy bandwidth {:.1} GB/s; harness {:.2} ms)\n", bytes / 1e6, bandwidth / 1e9, harness.fwd_bwd * 1e3);
            println!("| norm | impl | fwd (ms) | fwd+bwd net (ms) | fwd+bwd speed-up vs candle-nn | fwd GB/s | fwd+bwd GB/s | % of copy bandwidth (fwd, fwd+bwd) | peak mem fwd, fwd+bwd (× input) |");
            println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
            for norm in &args.norms {
                let mut rows = Vec::new();
                for kind in &kinds {
                    let varmap = VarMap::new();
                    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
                    let layer = build(kind, norm, shape[1], vb)?;
                    rows.push((kind, time_layer(&layer, &x, &r, args.min_time)?));
                }
                let candle = rows.iter().find(|(k, _)| **k == "candle-nn").map(|(_, t)| (t.fwd_bwd - harness.fwd_bwd).max(1e-9));
                let fwd_bytes = if norm == "bn" { 3.0 } else { 2.0 } * bytes;
                let bwd_bytes = 5.0 * bytes;
                for (kind, t) in rows {
                    let net = (t.fwd_bwd - harness.fwd_bwd).max(1e-9);
                    let (gbs_f, gbs_fb) = (fwd_bytes / t.fwd, (fwd_bytes + bwd_bytes) / net);
                    println!(
                        "| {norm} | {kind} | {:.2} | {:.2} | {} | {:.1} | {:.1} | {:.0}%, {:.0}% | {:.1}, {:.1} |",
                        t.fwd * 1e3,
                        net * 1e3,
                        candle.map_or("–".into(), |c| format!("{:.1}×", c / net)),
                        gbs_f / 1e9,
                        gbs_fb / 1e9,
                        100.0 * gbs_f / bandwidth,
                        100.0 * gbs_fb / bandwidth,
                        t.mem_fwd as f64 / bytes,
                        t.mem_fwd_bwd as f64 / bytes,
                    );
                }
            }
            println!();
        }
        Ok(())
    })
}
