//! SGD with momentum and decoupled-from-normalizers weight decay, PyTorch's update rule:
//! g ← ∇ + λ·θ (only where decay applies), b ← μ·b + g (b = g at the first step), θ ← θ − lr·b.
//! All state is detached from the autograd graph.

use anyhow::Result;
use candle_core::{backprop::GradStore, Tensor, Var};

pub struct Sgd {
    params: Vec<Param>,
    momentum: f64,
    weight_decay: f64,
}

struct Param {
    var: Var,
    decay: bool,
    buffer: Option<Tensor>,
}

impl Sgd {
    /// `params`: each variable with whether weight decay applies to it.
    pub fn new(params: Vec<(Var, bool)>, momentum: f64, weight_decay: f64) -> Self {
        let params = params
            .into_iter()
            .map(|(var, decay)| Param {
                var,
                decay,
                buffer: None,
            })
            .collect();
        Self {
            params,
            momentum,
            weight_decay,
        }
    }

    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        for p in &mut self.params {
            let Some(grad) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            let theta = p.var.as_detached_tensor();
            let mut g = grad.detach();
            if p.decay && self.weight_decay != 0.0 {
                g = (g + (&theta * self.weight_decay)?)?;
            }
            let buffer = match p.buffer.take() {
                Some(b) => ((b * self.momentum)? + g)?,
                None => g,
            };
            p.var.set(&(theta - (&buffer * lr)?)?)?;
            p.buffer = Some(buffer);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// Two steps on loss = sum(θ²)/2 (gradient θ), checked against the update rule by hand.
    #[test]
    fn matches_pytorch_sgd_with_momentum_and_weight_decay() {
        let theta = Var::from_tensor(&Tensor::new(&[1.0f64, -2.0], &Device::Cpu).unwrap()).unwrap();
        let frozen = Var::from_tensor(&Tensor::new(&[3.0f64], &Device::Cpu).unwrap()).unwrap();
        let mut sgd = Sgd::new(
            vec![(theta.clone(), true), (frozen.clone(), false)],
            0.9,
            0.1,
        );
        let (lr, mut expected, mut buf) = (0.5, [1.0f64, -2.0], [0.0f64; 2]);
        for step in 0..2 {
            let loss = (theta.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
            let grads = loss.backward().unwrap();
            sgd.step(&grads, lr).unwrap();
            for i in 0..2 {
                let g = expected[i] + 0.1 * expected[i];
                buf[i] = if step == 0 { g } else { 0.9 * buf[i] + g };
                expected[i] -= lr * buf[i];
            }
            let got: Vec<f64> = theta.as_tensor().to_vec1().unwrap();
            for i in 0..2 {
                assert!(
                    (got[i] - expected[i]).abs() < 1e-12,
                    "step {step}: {got:?} vs {expected:?}"
                );
            }
        }
        assert_eq!(
            frozen.as_tensor().to_vec1::<f64>().unwrap(),
            [3.0],
            "no gradient, no update"
        );
    }
}
