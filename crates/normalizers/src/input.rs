//! Validation of a normalizer's input and its (N, C, S) view.

use crate::reference::compute_dtype;
use candle_core::{bail, Result, Tensor};

/// The sizes of an input (N, C, *spatial): S is the product of the spatial sizes (1 if none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputDims {
    pub n: usize,
    pub c: usize,
    pub s: usize,
    pub spatial_rank: usize,
}

/// Checks `x` for a normalizer built for `num_channels` channels; `layer` names it in errors.
pub fn check(layer: &str, x: &Tensor, num_channels: usize) -> Result<InputDims> {
    let dims = x.dims();
    if dims.len() < 2 {
        bail!(
            "{layer}: expected an input of shape (N, C, ...) with at least 2 dimensions, \
             got shape {dims:?}"
        );
    }
    if !x.dtype().is_float() {
        bail!(
            "{layer}: expected a floating-point input (f16, bf16, f32 or f64), got {:?}",
            x.dtype()
        );
    }
    let (n, c) = (dims[0], dims[1]);
    if c != num_channels {
        bail!(
            "{layer}: input has {c} channels (shape {dims:?}, channels are dimension 1) but the \
             normalizer was built for {num_channels}"
        );
    }
    let s = dims[2..].iter().product();
    if n == 0 || s == 0 {
        bail!("{layer}: input of shape {dims:?} is empty");
    }
    Ok(InputDims {
        n,
        c,
        s,
        spatial_rank: dims.len() - 2,
    })
}

/// `x` as (N, C, S) in the dtype its statistics are computed in.
pub fn view3(x: &Tensor, d: InputDims) -> Result<Tensor> {
    x.to_dtype(compute_dtype(x.dtype()))?
        .reshape((d.n, d.c, d.s))
}

/// `y3` (N, C, S) back to the shape and dtype of the input `x`.
pub fn unview(y3: Tensor, x: &Tensor) -> Result<Tensor> {
    y3.reshape(x.shape())?.to_dtype(x.dtype())
}
