//! One normalization layer under test in the bench commands (normbench's, fused or composed,
//! or candle-nn's) and its timing: training forward, and forward+backward less an identity
//! harness, with the peak memory of each.

use crate::timing::{measure, measure_net};
use anyhow::Result;
use candle_core::{Module, ModuleT, Tensor, Var};

/// A normalization layer under test: normbench's (fused or reference) or candle-nn's.
pub(crate) enum Layer {
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
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
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

pub(crate) struct Timing {
    pub fwd: f64,
    /// Forward+backward less the identity harness: the median of paired differences.
    pub net: f64,
    pub mem_fwd: usize,
    /// Peak memory of forward+backward less the harness's.
    pub mem_net: usize,
}

pub(crate) fn fwd_bwd(layer: &Layer, x: &Var, r: &Tensor) -> Result<()> {
    let y = layer.forward(x.as_tensor())?;
    (y * r)?.sum_all()?.backward()?;
    Ok(())
}

pub(crate) fn time_layer(layer: &Layer, x: &Var, r: &Tensor, min_time: f64) -> Result<Timing> {
    let (fwd, mem_fwd) = measure(min_time, || {
        layer.forward(x.as_tensor())?;
        Ok(())
    })?;
    let (net, mem, mem_base) = measure_net(
        min_time,
        || fwd_bwd(&Layer::Identity, x, r),
        || fwd_bwd(layer, x, r),
    )?;
    Ok(Timing {
        fwd,
        net: net.max(1e-9),
        mem_fwd,
        mem_net: mem.saturating_sub(mem_base),
    })
}
