//! The composite reference path: every normalizer as a handful of plain candle ops, so that
//! candle's autograd supplies the backward.
//!
//! Statistics are two-pass (mean, then the mean of squared deviations) in a wide dtype: float64
//! for f32 and f64 inputs, float32 for f16 and bf16. Never E[x²] − E[x]² in f32: with values
//! around 1000 and a spread of 0.01 it loses every significant digit of the variance.
//!
//! Shapes: inputs arrive as `x3` of shape (N, C, S), S the product of the spatial dimensions
//! (1 when there are none).

use candle_core::{bail, DType, Result, Tensor};

/// The dtype statistics and normalization are computed in for an input dtype.
pub fn compute_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        _ => DType::F64,
    }
}

/// Mean and *biased* variance of `x` over `dims`, both keeping those dims (size 1).
pub fn moments(x: &Tensor, dims: &[usize]) -> Result<(Tensor, Tensor)> {
    let mean = x.mean_keepdim(dims)?;
    let var = x.broadcast_sub(&mean)?.sqr()?.mean_keepdim(dims)?;
    Ok((mean, var))
}

/// (x − mean) / sqrt(var + eps), broadcasting `mean` and `var`.
pub fn normalize(x: &Tensor, mean: &Tensor, var: &Tensor, eps: f64) -> Result<Tensor> {
    let inv_std = (var + eps)?.sqrt()?.recip()?;
    x.broadcast_sub(mean)?.broadcast_mul(&inv_std)
}

/// Batch statistics per channel over (N, S): returns x̂ (N, C, S) and the channels' mean and
/// biased variance, each of shape (C).
pub fn batch_norm_train(x3: &Tensor, eps: f64) -> Result<(Tensor, Tensor, Tensor)> {
    let (mean, var) = moments(x3, &[0, 2])?;
    let xhat = normalize(x3, &mean, &var, eps)?;
    Ok((xhat, mean.flatten_all()?, var.flatten_all()?))
}

/// Normalizes each channel with given per-channel statistics `mean` and `var` of shape (C).
pub fn normalize_per_channel(x3: &Tensor, mean: &Tensor, var: &Tensor, eps: f64) -> Result<Tensor> {
    let c = x3.dim(1)?;
    normalize(x3, &mean.reshape((1, c, 1))?, &var.reshape((1, c, 1))?, eps)
}

/// Group statistics per sample over `groups` groups of C/groups consecutive channels and all of
/// S: returns x̂ (N, C, S) and the groups' mean and biased variance, each of shape (N, groups).
pub fn group_norm(x3: &Tensor, groups: usize, eps: f64) -> Result<(Tensor, Tensor, Tensor)> {
    let (n, c, s) = x3.dims3()?;
    if groups == 0 || c % groups != 0 {
        bail!("reference group_norm: {c} channels do not split into {groups} groups");
    }
    let xg = x3.reshape((n, groups, (c / groups) * s))?;
    let (mean, var) = moments(&xg, &[2])?;
    let xhat = normalize(&xg, &mean, &var, eps)?.reshape((n, c, s))?;
    Ok((xhat, mean.squeeze(2)?, var.squeeze(2)?))
}

/// y = weight[c] · x̂ + bias[c] on x̂ of shape (N, C, S); weight and bias of shape (C), any dtype.
pub fn affine(xhat: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let c = xhat.dim(1)?;
    let dtype = xhat.dtype();
    let weight = weight.to_dtype(dtype)?.reshape((1, c, 1))?;
    let bias = bias.to_dtype(dtype)?.reshape((1, c, 1))?;
    xhat.broadcast_mul(&weight)?.broadcast_add(&bias)
}

/// Per-channel parameter `p` (C) as (1, C, 1) in `dtype`.
fn per_channel(p: &Tensor, dtype: DType) -> Result<Tensor> {
    p.to_dtype(dtype)?.reshape((1, p.dim(0)?, 1))
}

/// 1 / (1 + exp(−z)), composed so that autograd differentiates it.
fn sigmoid(z: &Tensor) -> Result<Tensor> {
    (z.neg()?.exp()? + 1.0)?.recip()
}

/// RMSNorm of each sample over (C, S): x / sqrt(mean(x²) + eps) · weight[c].
pub fn rms_norm(x3: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x3.sqr()?.mean_keepdim(&[1, 2][..])?;
    let y = x3.broadcast_mul(&(ms + eps)?.sqrt()?.recip()?)?;
    y.broadcast_mul(&per_channel(weight, x3.dtype())?)
}

/// FRN of each (sample, channel) over S, with the affine transform and, given `tau`, the TLU:
/// max(weight[c] · x / sqrt(mean(x²) + eps) + bias[c], tau[c]).
pub fn frn(
    x3: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    tau: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let nu2 = x3.sqr()?.mean_keepdim(2)?;
    let xhat = x3.broadcast_mul(&(nu2 + eps)?.sqrt()?.recip()?)?;
    let y = affine(&xhat, weight, bias)?;
    match tau {
        Some(tau) => y.broadcast_maximum(&per_channel(tau, x3.dtype())?),
        None => Ok(y),
    }
}

/// EvoNorm-S0: x · sigmoid(v[c] · x) / sqrt(var + eps) · weight[c] + bias[c], var the biased
/// variance of the sample's group of C/groups consecutive channels over (C/groups, S).
pub fn evonorm_s0(
    x3: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    v: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let (n, c, s) = x3.dims3()?;
    if groups == 0 || c % groups != 0 {
        bail!("reference evonorm_s0: {c} channels do not split into {groups} groups");
    }
    let (_, var) = moments(&x3.reshape((n, groups, (c / groups) * s))?, &[2])?;
    let rstd = (var + eps)?.sqrt()?.recip()?; // (N, G, 1)
    let gate = sigmoid(&x3.broadcast_mul(&per_channel(v, x3.dtype())?)?)?;
    let num = (x3 * gate)?.reshape((n, groups, (c / groups) * s))?;
    affine(&num.broadcast_mul(&rstd)?.reshape((n, c, s))?, weight, bias)
}

/// EvoNorm-B0: x / max(sqrt(var_batch + eps), v[c] · x + sqrt(var_inst + eps)) · weight[c] +
/// bias[c]. `var_batch` (C): the channel's batch variance in training, the running variance in
/// evaluation; var_inst the biased variance of each (sample, channel) over S.
pub fn evonorm_b0(
    x3: &Tensor,
    var_batch: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    v: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let dtype = x3.dtype();
    let left = (per_channel(var_batch, dtype)? + eps)?.sqrt()?;
    let (_, var_inst) = moments(x3, &[2])?;
    let right = x3
        .broadcast_mul(&per_channel(v, dtype)?)?
        .broadcast_add(&(var_inst + eps)?.sqrt()?)?;
    let denom = right.broadcast_maximum(&left)?;
    affine(&(x3 / denom)?, weight, bias)
}
