//! `bench-train`: where a training step's time goes. For each normalizer and batch size, the
//! sweep model's whole step (forward, backward, SGD update) per image, and beside it the same
//! model's parts timed alone at their shapes in the same run: every convolution's
//! forward+backward, every normalizer's (each less a harness that stands in for the rest of the
//! network), and the rest (the step less both: activations, residual adds, pooling, the loss,
//! autograd's bookkeeping, the optimizer).

use crate::bench_cases::{check_args, conv_inputs, flops, on_threads, step_case, ConvLayer};
use crate::model::{ConvShape, ModelConfig};
use crate::sweep::parse_norms;
use crate::timing::{measure, measure_net};
use anyhow::{ensure, Result};
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use conv::ConvImpl;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Normalizer specs [default: bn,gn:groups=G,ln,in, G the model's groups].
    #[arg(long)]
    norms: Option<String>,
    /// Batch sizes per step.
    #[arg(long, value_delimiter = ',', default_value = "32,16,8,4,2")]
    batch_sizes: Vec<usize>,
    /// The model, as `sweep --model` takes it.
    #[arg(long, default_value = "resnet")]
    model: String,
    /// Side of the (square, 3-channel) images.
    #[arg(long, default_value_t = 16)]
    size: usize,
    /// Threads (rayon's pool and candle's matmul).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Minimum measuring time per timed case, in seconds.
    #[arg(long, default_value_t = 0.3)]
    min_time: f64,
    /// Simulated devices, as `sweep --devices`: a step takes one batch per device, and
    /// BatchNorm-like layers take statistics over each device's batch.
    #[arg(long, default_value_t = 1)]
    devices: usize,
    /// A Python with torch: time the same model's step in PyTorch too
    /// (`scripts/bench_train_torch.py`, one normalizer at a time, before normbench's rows).
    #[arg(long, value_name = "PYTHON")]
    pytorch: Option<std::path::PathBuf>,
}

fn conv_layer(c: &ConvShape, first: bool) -> ConvLayer {
    ConvLayer {
        name: "",
        cin: c.cin,
        cout: c.cout,
        size: c.side,
        kernel: c.kernel,
        stride: c.stride,
        input_grad: !first,
    }
}

/// `(y * r).sum().backward()`: the harness that stands in for the rest of the network.
fn harness(y: Tensor, r: &Tensor) -> Result<()> {
    (y * r)?.sum_all()?.backward()?;
    Ok(())
}

/// Seconds of a convolution's forward+backward at batch size `b` (the fast one, its input
/// gradient where the model needs it), less the same harness on a tensor of its output's
/// shape.
fn conv_seconds(layer: &ConvLayer, b: usize, min_time: f64) -> Result<f64> {
    let (conv, x) = conv_inputs(layer, b, ConvImpl::Fast)?;
    let y0 = Var::from_tensor(&conv.forward(&x)?)?;
    let r = y0.ones_like()?;
    let (net, _, _) = measure_net(
        min_time,
        || harness(y0.as_tensor().clone(), &r),
        || harness(conv.forward(&x)?, &r),
    )?;
    Ok(net.max(0.0))
}

/// Seconds of the forward+backward of normalizer `norm` on (d·b, c, side, side) in training
/// mode with statistics per device of b (`d` devices), less the same harness without it.
fn norm_seconds(
    norm: &str,
    (b, d): (usize, usize),
    c: usize,
    side: usize,
    min_time: f64,
) -> Result<f64> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let mut layer = normalizers::from_spec(crate::model::split_ws(norm).0, c, vb)?;
    if d > 1 {
        layer = normalizers::per_device(layer, b)?;
    }
    let b = b * d;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, c, side, side), &Device::Cpu)?)?;
    let r = Tensor::randn(0f32, 1.0, (b, c, side, side), &Device::Cpu)?;
    let (net, _, _) = measure_net(
        min_time,
        || harness(x.as_tensor().clone(), &r),
        || harness(layer.forward_t(x.as_tensor(), true)?, &r),
    )?;
    Ok(net.max(0.0))
}

/// Per image, in ms: the step, its convolutions, its normalizers, the rest; and the
/// convolutions' GFLOP/s.
struct Row {
    step: f64,
    conv: f64,
    norm: f64,
    gflops: f64,
}

fn measure_row(args: &BenchArgs, model: ModelConfig, norm: &str, b: usize) -> Result<Row> {
    let convs = model.convolutions(3, args.size);
    let (d, n) = (args.devices, b * args.devices);
    let (mut conv, mut norms, mut work) = (0.0, 0.0, 0.0);
    for (i, c) in convs.iter().enumerate() {
        let layer = conv_layer(c, i == 0);
        conv += conv_seconds(&layer, n, args.min_time)?;
        work += flops(&layer, n) * if layer.input_grad { 3.0 } else { 2.0 };
        norms += norm_seconds(norm, (b, d), c.cout, c.out_side(), args.min_time)?;
    }
    let model_step = step_case(model, norm, (b, d), args.size, ConvImpl::Fast)?;
    let step = measure(args.min_time, model_step)?.0;
    let per_image = |s: f64| s * 1e3 / n as f64;
    Ok(Row {
        step: per_image(step),
        conv: per_image(conv),
        norm: per_image(norms),
        gflops: work / conv / 1e9,
    })
}

/// The table's header; with PyTorch's columns when `torch` names its version.
fn header(args: &BenchArgs, model: ModelConfig, torch: Option<&str>) {
    println!(
        "## Training step of {model} on {0}×{0} images: where the time goes\n",
        args.size
    );
    println!(
        "f32, {} thread(s), {} device(s) (a step takes B images per device; BatchNorm-like \
         layers take statistics per device). Per image: the whole step (forward, backward, SGD) timed as the \
         sweep runs it, and its convolutions and normalizers each timed alone at their \
         shapes (forward+backward, each less a harness on a tensor of its output's shape); the \
         rest is the step less both. B cost: this batch size's step per image over the \
         largest batch size's.",
        args.threads,
        args.devices
    );
    let mut cols = "| norm | B | step (ms/image) | convolutions | normalizers | rest | conv GFLOP/s | B cost |".to_string();
    let mut rule = "|---|---:|---:|---:|---:|---:|---:|---:|".to_string();
    if let Some(v) = torch {
        println!(
            "PyTorch {v}: the same model's step (`scripts/bench_train_torch.py`, same threads), \
             timed just before each normalizer's rows; × PyTorch: its time over normbench's \
             (above 1: normbench is faster)."
        );
        cols += " PyTorch (ms/image) | × PyTorch | PyTorch B cost |";
        rule += "---:|---:|---:|";
    }
    println!("\n{cols}\n{rule}");
}

pub fn run(args: BenchArgs) -> Result<()> {
    check_args(args.threads, &args.batch_sizes, args.min_time)?;
    ensure!(
        args.devices >= 1,
        "--devices 0 steps over nothing; give at least 1"
    );
    ensure!(
        args.pytorch.is_none() || args.devices == 1,
        "--pytorch times one device only; leave out --devices or --pytorch"
    );
    ensure!(
        (4..=64).contains(&args.size),
        "--size {} is out of range; use 4 to 64",
        args.size
    );
    let model: ModelConfig = args.model.parse()?;
    let default_norms = format!("bn,gn:groups={},ln,in", model.groups);
    let norms = parse_norms(
        args.norms.as_deref().unwrap_or(&default_norms),
        model.groups,
    )?;
    if args.pytorch.is_some() {
        crate::bench_torch::check(&model, &norms)?;
    }
    on_threads(args.threads, || {
        for (n, norm) in norms.iter().enumerate() {
            let torch = match &args.pytorch {
                Some(python) => Some(crate::bench_torch::step_times(
                    python,
                    &model,
                    norm,
                    &args.batch_sizes,
                    args.size,
                    args.threads,
                    args.min_time,
                )?),
                None => None,
            };
            if n == 0 {
                // After the first script call: the header names PyTorch's version.
                header(&args, model, torch.as_ref().map(|t| t.0.as_str()));
            }
            let mut largest: Option<f64> = None;
            for (i, &b) in args.batch_sizes.iter().enumerate() {
                let r = measure_row(&args, model, norm, b)?;
                let base = *largest.get_or_insert(r.step);
                print!(
                    "| {norm} | {b} | {:.3} | {:.3} ({:.0}%) | {:.3} ({:.0}%) | {:.3} ({:.0}%) | {:.1} | {:.2}× |",
                    r.step,
                    r.conv,
                    100.0 * r.conv / r.step,
                    r.norm,
                    100.0 * r.norm / r.step,
                    r.step - r.conv - r.norm,
                    100.0 * (r.step - r.conv - r.norm) / r.step,
                    r.gflops,
                    r.step / base
                );
                match &torch {
                    Some((_, t)) => {
                        println!(
                            " {:.3} | {:.2}× | {:.2}× |",
                            t[i],
                            t[i] / r.step,
                            t[i] / t[0]
                        )
                    }
                    None => println!(),
                }
            }
        }
        Ok(())
    })
}
