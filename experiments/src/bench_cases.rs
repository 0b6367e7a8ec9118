//! The timed cases the bench commands share: a convolution's forward (and backward) on one
//! layer's shapes, and one training step of a model, each as a closure to time.

use crate::model::{ModelConfig, ResNet};
use crate::train::{optimizer, train_step, TrainConfig};
use anyhow::{ensure, Result};
use candle_core::{Device, Module, Tensor, Var};
use candle_nn::VarMap;
use conv::{Conv2d, Conv2dConfig, ConvImpl};

/// A convolution to time: its input of `size`×`size`, its kernel and stride.
pub struct ConvLayer {
    pub name: &'static str,
    pub cin: usize,
    pub cout: usize,
    pub size: usize,
    pub kernel: usize,
    pub stride: usize,
    /// Whether the layer's input needs a gradient (every layer but the first).
    pub input_grad: bool,
}

/// The convolution of `layer` (weights drawn at random) and an input for it at batch size `b`,
/// tracked for its gradient where the layer's input needs one.
pub fn conv_inputs(layer: &ConvLayer, b: usize, kind: ConvImpl) -> Result<(Conv2d, Tensor)> {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (b, layer.cin, layer.size, layer.size), &dev)?;
    let x = if layer.input_grad {
        Var::from_tensor(&x)?.as_tensor().clone()
    } else {
        x
    };
    let k = layer.kernel;
    let w = Var::randn(0f32, 0.1, (layer.cout, layer.cin, k, k), &dev)?;
    let cfg = Conv2dConfig {
        stride: layer.stride,
        padding: k / 2,
        dilation: 1,
    };
    Ok((Conv2d::new(w.as_tensor().clone(), None, cfg, kind), x))
}

pub fn conv_case(
    layer: &ConvLayer,
    b: usize,
    kind: ConvImpl,
    backward: bool,
) -> Result<impl FnMut() -> Result<()>> {
    let (conv, x) = conv_inputs(layer, b, kind)?;
    let r = conv.forward(&x)?.ones_like()?;
    Ok(move || {
        let y = conv.forward(&x)?;
        if backward {
            (y * &r)?.sum_all()?.backward()?;
        }
        Ok(())
    })
}

pub fn flops(layer: &ConvLayer, b: usize) -> f64 {
    let out = layer.size.div_ceil(layer.stride);
    2.0 * (b * layer.cout * out * out * layer.cin * layer.kernel * layer.kernel) as f64
}

/// One training step of `model` with normalizer `norm` at batch size `b` on each of `devices`
/// simulated devices (as `sweep --devices`), as a closure to time.
pub fn step_case(
    model: ModelConfig,
    norm: &str,
    (b, devices): (usize, usize),
    size: usize,
    kind: ConvImpl,
) -> Result<impl FnMut() -> Result<()>> {
    let varmap = VarMap::new();
    let net = ResNet::new(model, 3, 10, norm, kind, &varmap, 0)?.on_devices(b, devices)?;
    let b = b * devices;
    let cfg = TrainConfig {
        model: model.to_string(),
        epochs: 1,
        base_lr: 0.1,
        warmup_epochs: 0.0,
        momentum: 0.9,
        weight_decay: 5e-4,
        large_eval_batch: 250,
        conv: kind.to_string(),
        devices: 1,
    };
    let mut sgd = optimizer(&varmap, &cfg)?;
    let x = Tensor::randn(0f32, 1.0, (b, 3, size, size), &Device::Cpu)?;
    let y = Tensor::from_vec(
        (0..b as u32).map(|i| i % 10).collect::<Vec<_>>(),
        b,
        &Device::Cpu,
    )?;
    Ok(move || {
        train_step(&net, &mut sgd, &x, &y, 0.01)?;
        Ok(())
    })
}

/// Refuses the options the bench commands share where they would run nothing or panic.
pub fn check_args(threads: usize, batch_sizes: &[usize], min_time: f64) -> Result<()> {
    ensure!(threads >= 1, "--threads 0 runs nothing; give at least 1");
    ensure!(
        !batch_sizes.is_empty() && !batch_sizes.contains(&0),
        "--batch-sizes {batch_sizes:?}: every batch size must be at least 1 (e.g. --batch-sizes 32,2)"
    );
    ensure!(
        min_time.is_finite() && min_time >= 0.0,
        "--min-time must be a number of seconds >= 0, got {min_time}"
    );
    Ok(())
}

/// Runs `f` on a rayon pool of `threads` threads, with candle's matmul split as many ways (it
/// reads RAYON_NUM_THREADS at every call).
pub fn on_threads(threads: usize, f: impl FnOnce() -> Result<()> + Send) -> Result<()> {
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?
        .install(f)
}
