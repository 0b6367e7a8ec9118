//! SGD with momentum and decoupled-from-normalizers weight decay, PyTorch's update rule:
//! g ← ∇ + λ·θ (only where decay applies), b ← μ·b + g (b = g at the first step), θ ← θ − lr·b.
//! The update is one in-place pass per variable over θ, its gradient and its momentum buffer
//! (a plain vector, so no state is ever on the autograd graph); composed of candle ops it was
//! seven ops and four new tensors per variable and step.

use anyhow::Result;
use candle_core::backend::BackendStorage;
use candle_core::{backprop::GradStore, CpuStorage, InplaceOp2, Layout, Var};
use std::sync::Mutex;

pub struct Sgd {
    params: Vec<Param>,
    momentum: f64,
    weight_decay: f64,
}

struct Param {
    var: Var,
    decay: bool,
    buffer: Mutex<Buffer>,
}

/// A variable's momentum buffer, in the variable's own type (as PyTorch keeps it).
enum Buffer {
    /// Before the first step.
    Empty,
    F32(Vec<f32>),
    F64(Vec<f64>),
}

impl Sgd {
    /// `params`: each variable with whether weight decay applies to it.
    pub fn new(params: Vec<(Var, bool)>, momentum: f64, weight_decay: f64) -> Self {
        let params = params
            .into_iter()
            .map(|(var, decay)| Param {
                var,
                decay,
                buffer: Mutex::new(Buffer::Empty),
            })
            .collect();
        Self {
            params,
            momentum,
            weight_decay,
        }
    }

    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        for p in &self.params {
            let Some(grad) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            let update = Update {
                lr,
                momentum: self.momentum,
                decay: if p.decay { self.weight_decay } else { 0.0 },
                buffer: &p.buffer,
            };
            p.var.as_detached_tensor().inplace_op2(grad, &update)?;
        }
        Ok(())
    }
}

/// One variable's update, θ in place, from its gradient.
struct Update<'a> {
    lr: f64,
    momentum: f64,
    decay: f64,
    buffer: &'a Mutex<Buffer>,
}

/// PyTorch's update in the variable's type: g = ∇ + λθ; b = μb + g (b = g at first); θ −= lr·b.
fn update<T>(theta: &mut [T], grad: &[T], buffer: &mut Vec<T>, lr: T, momentum: T, decay: T)
where
    T: Copy + std::ops::Add<Output = T> + std::ops::Sub<Output = T> + std::ops::Mul<Output = T>,
{
    let first = buffer.is_empty();
    if first {
        buffer.extend_from_slice(grad);
    }
    for ((t, &g), b) in theta.iter_mut().zip(grad).zip(buffer.iter_mut()) {
        let g = g + *t * decay;
        *b = if first { g } else { *b * momentum + g };
        *t = *t - *b * lr;
    }
}

fn contiguous(layout: &Layout) -> candle_core::Result<(usize, usize)> {
    match layout.contiguous_offsets() {
        Some(range) => Ok(range),
        None => candle_core::bail!("sgd: a variable or its gradient is not contiguous"),
    }
}

impl InplaceOp2 for Update<'_> {
    fn name(&self) -> &'static str {
        "sgd-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let ((a, b), (c, d)) = (contiguous(l1)?, contiguous(l2)?);
        if b - a != d - c {
            candle_core::bail!("sgd: variable of {} values, gradient of {}", b - a, d - c);
        }
        let mut buffer = self
            .buffer
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned momentum buffer".into()))?;
        let (lr, mu, wd) = (self.lr, self.momentum, self.decay);
        match (s1, s2, &mut *buffer) {
            (CpuStorage::F32(t), CpuStorage::F32(g), buf) => {
                if matches!(buf, Buffer::Empty) {
                    *buf = Buffer::F32(Vec::with_capacity(b - a));
                }
                let Buffer::F32(buf) = buf else {
                    candle_core::bail!("sgd: a variable changed its dtype between steps")
                };
                update(&mut t[a..b], &g[c..d], buf, lr as f32, mu as f32, wd as f32);
            }
            (CpuStorage::F64(t), CpuStorage::F64(g), buf) => {
                if matches!(buf, Buffer::Empty) {
                    *buf = Buffer::F64(Vec::with_capacity(b - a));
                }
                let Buffer::F64(buf) = buf else {
                    candle_core::bail!("sgd: a variable changed its dtype between steps")
                };
                update(&mut t[a..b], &g[c..d], buf, lr, mu, wd);
            }
            (t, g, _) => candle_core::bail!(
                "sgd: variables and gradients must both be f32 or f64, got {:?} and {:?}",
                t.dtype(),
                g.dtype()
            ),
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

    /// f32 variables keep an f32 buffer and f32 arithmetic, as PyTorch's.
    #[test]
    fn f32_variables_update_in_f32() {
        let theta = Var::from_tensor(&Tensor::new(&[0.3f32, -1.7], &Device::Cpu).unwrap()).unwrap();
        let mut sgd = Sgd::new(vec![(theta.clone(), true)], 0.9, 5e-4);
        let (lr, mut expected, mut buf) = (0.1f32, [0.3f32, -1.7], [0f32; 2]);
        for step in 0..3 {
            let loss = theta.as_tensor().sqr().unwrap().sum_all().unwrap();
            sgd.step(&loss.backward().unwrap(), lr as f64).unwrap();
            for i in 0..2 {
                let g = 2.0 * expected[i] + expected[i] * 5e-4;
                buf[i] = if step == 0 { g } else { buf[i] * 0.9 + g };
                expected[i] -= buf[i] * lr;
            }
            assert_eq!(theta.as_tensor().to_vec1::<f32>().unwrap(), expected);
        }
    }
}
