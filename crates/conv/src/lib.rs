//! 2-D convolution for training normbench models on the CPU.
//!
//! Candle 0.11's CPU `conv2d` backward runs `conv_transpose2d` loops for the input gradient (even
//! for the first layer, whose input needs none) and a convolution over transposed tensors for the
//! weight gradient. Here the convolution is a candle custom op with its own backward:
//! - forward: im2col, then one matmul `W (O, K) @ cols (K, N·P)` for the whole batch;
//! - weight gradient: one matmul `dY (O, N·P) @ colsᵀ`, with the forward's columns where they
//!   are at most 2.25× the input (3×3 and 1×1 layers with stride 2), else recomputed;
//! - input gradient: one matmul `Wᵀ @ dY`, then col2im; skipped when the input needs none.
//!   With stride 1 it is instead a convolution of dY with the flipped kernel (im2col of dY,
//!   one matmul), and those columns of dY give the weight gradient too, as one matmul with
//!   x: one im2col for the whole backward, none kept.
//!
//! [`ConvImpl::Candle`] keeps candle's own `conv2d` as the baseline, and is what runs on devices
//! other than the CPU.

mod gemm;
mod im2col;
mod op;
mod standardize;

pub use im2col::{col2im, im2col, Geometry};
pub use standardize::{standardize_weight, WS_EPS};

use candle_core::{bail, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};
use std::fmt;
use std::str::FromStr;

/// Which convolution runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConvImpl {
    /// im2col + matmul custom op with its own backward (CPU); candle's on other devices.
    #[default]
    Fast,
    /// Candle's own `conv2d`.
    Candle,
}

impl FromStr for ConvImpl {
    type Err = candle_core::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "fast" => Ok(ConvImpl::Fast),
            "candle" => Ok(ConvImpl::Candle),
            _ => bail!("unknown convolution {s:?}; expected fast or candle"),
        }
    }
}

impl fmt::Display for ConvImpl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConvImpl::Fast => "fast",
            ConvImpl::Candle => "candle",
        })
    }
}

/// Stride, padding and dilation, the same along both spatial axes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dConfig {
    pub stride: usize,
    pub padding: usize,
    pub dilation: usize,
}

impl Default for Conv2dConfig {
    fn default() -> Self {
        Self {
            stride: 1,
            padding: 0,
            dilation: 1,
        }
    }
}

/// The geometry of convolving `x` (N, C, H, W) with `w` (O, C, kH, kW), or an error naming the
/// mismatch.
pub fn geometry(x: &[usize], w: &[usize], cfg: Conv2dConfig) -> Result<Geometry> {
    let (&[n, c_in, h, wd], &[o, wc, kh, kw]) = (x, w) else {
        bail!("conv2d: expected input (N, C, H, W) and weight (O, C, kH, kW), got {x:?} and {w:?}");
    };
    if [n, c_in, h, wd, o].contains(&0) {
        bail!(
            "conv2d: input {x:?} and weight {w:?} must have no empty dimension (batch, channels, \
             height, width, outputs of at least 1)"
        );
    }
    if c_in != wc {
        bail!("conv2d: input has {c_in} channels (shape {x:?}) but the weight {w:?} expects {wc}");
    }
    if cfg.stride == 0 || cfg.dilation == 0 {
        bail!("conv2d: stride and dilation must be at least 1, got {cfg:?}");
    }
    let out = |size: usize, k: usize| {
        let span = cfg.dilation * (k - 1) + 1;
        (size + 2 * cfg.padding >= span).then(|| (size + 2 * cfg.padding - span) / cfg.stride + 1)
    };
    match (out(h, kh), out(wd, kw), kh * kw) {
        (Some(oh), Some(ow), k) if k > 0 => Ok(Geometry {
            n,
            c_in,
            h,
            w: wd,
            kh,
            kw,
            stride: cfg.stride,
            padding: cfg.padding,
            dilation: cfg.dilation,
            oh,
            ow,
        }),
        _ => bail!(
            "conv2d: a {kh}x{kw} kernel with {cfg:?} does not fit an input of {h}x{wd} (shape {x:?})"
        ),
    }
}

/// A 2-D convolution layer, NCHW in and out, with PyTorch's variable names.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    cfg: Conv2dConfig,
    kind: ConvImpl,
    /// Weight Standardization before every forward (see [`standardize_weight`]).
    ws: bool,
}

impl Conv2d {
    pub fn new(weight: Tensor, bias: Option<Tensor>, cfg: Conv2dConfig, kind: ConvImpl) -> Self {
        Self {
            weight,
            bias,
            cfg,
            kind,
            ws: false,
        }
    }

    /// The same layer with Weight Standardization on (`true`) or off.
    pub fn with_weight_standardization(self, ws: bool) -> Self {
        Self { ws, ..self }
    }

    /// Whether the weight is standardized before each convolution.
    pub fn weight_standardization(&self) -> bool {
        self.ws
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn config(&self) -> Conv2dConfig {
        self.cfg
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.ws {
            let w = standardize_weight(&self.weight)?;
            return conv2d_with(x, &w, self.bias.as_ref(), self.cfg, self.kind);
        }
        conv2d_with(x, &self.weight, self.bias.as_ref(), self.cfg, self.kind)
    }
}

/// Convolves `x` (N, C, H, W) with `weight` (O, C, kH, kW), adding `bias` (O) where given.
pub fn conv2d_with(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    cfg: Conv2dConfig,
    kind: ConvImpl,
) -> Result<Tensor> {
    geometry(x.dims(), weight.dims(), cfg)?;
    if x.dtype() != weight.dtype() {
        bail!(
            "conv2d: input is {:?} but the weight is {:?}",
            x.dtype(),
            weight.dtype()
        );
    }
    let y = match kind {
        ConvImpl::Fast if x.device().is_cpu() => x
            .contiguous()?
            .apply_op2(&weight.contiguous()?, op::Conv2dOp::new(cfg))?,
        _ => x.conv2d(weight, cfg.padding, cfg.stride, cfg.dilation, 1)?,
    };
    match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
        None => Ok(y),
    }
}

/// A convolution with a `weight` (O, C, k, k) drawn Kaiming-normal and a `bias` (O) drawn
/// uniform in ±1/sqrt(fan_in), as candle-nn and PyTorch do.
pub fn conv2d(
    c_in: usize,
    c_out: usize,
    kernel: usize,
    cfg: Conv2dConfig,
    kind: ConvImpl,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let bound = 1.0 / ((c_in * kernel * kernel) as f64).sqrt();
    let bias = vb.get_with_hints(
        c_out,
        "bias",
        Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )?;
    Ok(Conv2d {
        bias: Some(bias),
        ..conv2d_no_bias(c_in, c_out, kernel, cfg, kind, vb)?
    })
}

/// [`conv2d`] without a bias, as before a normalization layer.
pub fn conv2d_no_bias(
    c_in: usize,
    c_out: usize,
    kernel: usize,
    cfg: Conv2dConfig,
    kind: ConvImpl,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let weight = vb.get_with_hints(
        (c_out, c_in, kernel, kernel),
        "weight",
        candle_nn::init::DEFAULT_KAIMING_NORMAL,
    )?;
    Ok(Conv2d::new(weight, None, cfg, kind))
}
