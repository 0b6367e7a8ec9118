//! Weight Standardization (Qiao, Wang, Liu, Shen & Yuille 2019, "Micro-Batch Training with
//! Batch-Channel Normalization and Weight Standardization"): each output channel's weights are
//! standardized over (C_in, kH, kW), ŵ = (w − mean) / sqrt(var + 1e-5) with the biased
//! variance, before the convolution, and the gradient flows through the standardization to w.
//! Composed of candle ops (the weights are small), two-pass in f64, so that it serves the fast
//! convolution and candle's alike.

use candle_core::{DType, Result, Tensor};

/// The `eps` of the standardization (the paper's code and the issue's).
pub const WS_EPS: f64 = 1e-5;

/// `w` (O, C, kH, kW) standardized per output channel, in w's dtype.
pub fn standardize_weight(w: &Tensor) -> Result<Tensor> {
    let o = w.dim(0)?;
    let flat = w.to_dtype(DType::F64)?.reshape((o, ()))?;
    let centred = flat.broadcast_sub(&flat.mean_keepdim(1)?)?;
    let var = centred.sqr()?.mean_keepdim(1)?;
    let ws = centred.broadcast_div(&(var + WS_EPS)?.sqrt()?)?;
    ws.reshape(w.shape())?.to_dtype(w.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn weights(seed: u64) -> Vec<f64> {
        (0..2 * 3 * 2 * 2)
            .map(|i| ((i as u64 * 7919 + seed * 104_729) % 97) as f64 / 13.0 - 3.0)
            .collect()
    }

    #[test]
    fn each_output_channel_has_mean_zero_and_variance_near_one() {
        let w = Tensor::from_vec(weights(1), (2, 3, 2, 2), &Device::Cpu).unwrap();
        let ws = standardize_weight(&w).unwrap().reshape((2, 12)).unwrap();
        for row in ws.to_vec2::<f64>().unwrap() {
            let mean = row.iter().sum::<f64>() / 12.0;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 12.0;
            assert!(mean.abs() < 1e-12, "mean {mean}");
            // var / (var + eps) of the original spread.
            assert!((var - 1.0).abs() < 1e-4, "var {var}");
        }
    }

    #[test]
    fn the_gradient_matches_finite_differences() {
        let base = weights(2);
        let r = Tensor::from_vec(weights(3), (2, 3, 2, 2), &Device::Cpu).unwrap();
        let loss = |v: &[f64]| -> f64 {
            let w = Tensor::from_vec(v.to_vec(), (2, 3, 2, 2), &Device::Cpu).unwrap();
            let y = standardize_weight(&w).unwrap();
            (y * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let w = Var::from_vec(base.clone(), (2, 3, 2, 2), &Device::Cpu).unwrap();
        let y = standardize_weight(w.as_tensor()).unwrap();
        let grads = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g = grads.get(w.as_tensor()).unwrap().flatten_all().unwrap();
        let g = g.to_vec1::<f64>().unwrap();
        for i in 0..base.len() {
            let (mut up, mut down) = (base.clone(), base.clone());
            up[i] += 1e-6;
            down[i] -= 1e-6;
            let numeric = (loss(&up) - loss(&down)) / 2e-6;
            assert!(
                (numeric - g[i]).abs() < 1e-6 * numeric.abs().max(1.0),
                "{i}: {numeric} vs {}",
                g[i]
            );
        }
    }

    #[test]
    fn the_fast_and_candle_convolutions_standardize_alike_with_their_gradients() {
        use crate::{Conv2d, Conv2dConfig, ConvImpl};
        use candle_core::Module;
        let cfg = Conv2dConfig {
            stride: 1,
            padding: 1,
            dilation: 1,
        };
        let x = Var::from_vec(weights(4).repeat(4), (2, 3, 4, 4), &Device::Cpu).unwrap();
        let mut outs = Vec::new();
        for kind in [ConvImpl::Fast, ConvImpl::Candle] {
            let w = Var::from_vec(weights(5), (2, 3, 2, 2), &Device::Cpu).unwrap();
            let conv = Conv2d::new(w.as_tensor().clone(), None, cfg, kind)
                .with_weight_standardization(true);
            assert!(conv.weight_standardization());
            let y = conv.forward(x.as_tensor()).unwrap();
            let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            outs.push((flat(&y), flat(grads.get(w.as_tensor()).unwrap())));
        }
        for (a, b) in outs[0]
            .0
            .iter()
            .zip(&outs[1].0)
            .chain(outs[0].1.iter().zip(&outs[1].1))
        {
            assert!((a - b).abs() < 1e-9 * a.abs().max(1.0), "{a} vs {b}");
        }
        let plain = Conv2d::new(
            Tensor::from_vec(weights(5), (2, 3, 2, 2), &Device::Cpu).unwrap(),
            None,
            cfg,
            ConvImpl::Fast,
        );
        let y = plain
            .forward(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        assert_ne!(y, outs[0].0, "standardization changes the output");
    }
}
