//! `bench-conv`: the fast convolution against candle's `conv2d` on the default model's layers,
//! and a whole training step of the model with each, printed as markdown tables.

use crate::bench_cases::{check_args, conv_case, flops, on_threads, step_case, ConvLayer};
use crate::model::ModelConfig;
use crate::timing::{measure, measure_pair};
use anyhow::Result;
use candle_core::{Device, Tensor};
use conv::ConvImpl;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Threads for the convolution and candle's matmul.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Batch sizes to time.
    #[arg(long, value_delimiter = ',', default_value = "32,2")]
    batch_sizes: Vec<usize>,
    /// Minimum measuring time per comparison (the two convolutions' calls alternate), in seconds.
    #[arg(long, default_value_t = 0.5)]
    min_time: f64,
}

/// Median seconds per call of `f` (see [`measure`]).
fn time(min_time: f64, f: impl FnMut() -> Result<()>) -> Result<f64> {
    Ok(measure(min_time, f)?.0)
}

/// The distinct convolutions of the default model on 16×16 images.
fn layers(w: usize) -> Vec<ConvLayer> {
    let l = |name, cin, cout, size, kernel, stride, input_grad| ConvLayer {
        name,
        cin,
        cout,
        size,
        kernel,
        stride,
        input_grad,
    };
    vec![
        l("stem 3x3", 3, w, 16, 3, 1, false),
        l("stage1 3x3", w, w, 16, 3, 1, true),
        l("stage2 3x3 /2", w, 2 * w, 16, 3, 2, true),
        l("stage2 3x3", 2 * w, 2 * w, 8, 3, 1, true),
        l("stage2 1x1 /2", w, 2 * w, 16, 1, 2, true),
        l("stage3 3x3 /2", 2 * w, 4 * w, 8, 3, 2, true),
        l("stage3 3x3", 4 * w, 4 * w, 4, 3, 1, true),
        l("stage3 1x1 /2", 2 * w, 4 * w, 8, 1, 2, true),
    ]
}

fn matmul_gflops(min_time: f64) -> Result<f64> {
    let n = 1024;
    let a = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    let t = time(min_time, || {
        a.matmul(&b)?;
        Ok(())
    })?;
    Ok(2.0 * (n * n * n) as f64 / t / 1e9)
}

pub fn run(args: BenchArgs) -> Result<()> {
    check_args(args.threads, &args.batch_sizes, args.min_time)?;
    on_threads(args.threads, || {
        let peak = matmul_gflops(args.min_time)?;
        println!("## Convolution: fast (im2col + matmul, own backward) vs candle's conv2d\n");
        println!(
            "f32, {} thread(s), default model (resnet width 16) on 16×16 images. Reference: a \
             1024³ f32 matmul runs at {peak:.1} GFLOP/s here. Forward+backward computes the input \
             gradient for every layer but the stem, as in training. Each comparison times the two \
             convolutions' calls alternating (medians), so that drift in the machine's speed hits \
             both alike.\n",
            args.threads
        );
        println!("| layer | B | fwd fast (ms) | fwd candle (ms) | speed-up | fwd+bwd fast (ms) | fwd+bwd candle (ms) | speed-up | fast fwd+bwd GFLOP/s | % of matmul |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        let (mut total_fast, mut total_candle) = (0.0, 0.0);
        for &b in &args.batch_sizes {
            for layer in layers(16) {
                // Each speed-up from calls of the two convolutions alternating, so that drift in
                // the machine's speed hits both alike.
                let t = |bwd| -> Result<(f64, f64)> {
                    measure_pair(
                        args.min_time,
                        conv_case(&layer, b, ConvImpl::Fast, bwd)?,
                        conv_case(&layer, b, ConvImpl::Candle, bwd)?,
                    )
                };
                let ((ff, fc), (bf, bc)) = (t(false)?, t(true)?);
                if b == 32 {
                    total_fast += bf;
                    total_candle += bc;
                }
                let work = flops(&layer, b) * if layer.input_grad { 3.0 } else { 2.0 };
                let gflops = work / bf / 1e9;
                println!(
                    "| {} {}→{} {}×{} | {b} | {:.3} | {:.3} | {:.1}× | {:.3} | {:.3} | {:.1}× | {gflops:.1} | {:.0}% |",
                    layer.name, layer.cin, layer.cout, layer.size, layer.size,
                    ff * 1e3, fc * 1e3, fc / ff, bf * 1e3, bc * 1e3, bc / bf, 100.0 * gflops / peak
                );
            }
        }
        if total_fast > 0.0 {
            println!("\nAll layers at B=32, forward+backward: fast {:.2} ms, candle {:.2} ms, {:.1}× faster.", total_fast * 1e3, total_candle * 1e3, total_candle / total_fast);
        }
        println!("\n## Whole training step of the default model (bn; forward, backward, SGD)\n");
        println!("| B | step, fast conv (ms) | step, candle conv (ms) | speed-up |");
        println!("|---:|---:|---:|---:|");
        for &b in &args.batch_sizes {
            let (f, c) = measure_pair(
                args.min_time,
                step_case(ModelConfig::default(), "bn", (b, 1), 16, ConvImpl::Fast)?,
                step_case(ModelConfig::default(), "bn", (b, 1), 16, ConvImpl::Candle)?,
            )?;
            println!("| {b} | {:.2} | {:.2} | {:.1}× |", f * 1e3, c * 1e3, c / f);
        }
        Ok(())
    })
}
