//! Fused kernels of the per-sample layers without a mean-subtracting twin among the others:
//! RMSNorm, FRN (+ TLU) and EvoNorm-S0, each a candle custom op on (x, params) with its
//! backward, instead of the dozen composed ops of `impl=reference`.
//!
//! `params` is (K, C): the per-channel parameters stacked (`rms`: weight; `frn`: weight, bias,
//! tau; `evonorm-s0`: weight, bias, v), so that one op takes them all and candle's `stack`
//! routes each row's gradient back to its variable. Statistics and every per-element value
//! are computed in f64 from the stored f32 or f64 values; the work is split by sample over the
//! rayon pool and the parameter gradients are summed in sample order, so the results are the
//! same bits for any number of threads.
//!
//! Sets (M values each, the mean over them written ⟨·⟩):
//! - `rms`: the sample, M = C·S. y = x·r·w[c], r = 1/sqrt(⟨x²⟩ + eps).
//!   dx = r·g − x·r³·⟨g·x⟩ with g = dy·w[c]; dw[c] = Σ dy·x·r.
//! - `frn`: each (sample, channel), M = S. u = w[c]·x·r + b[c], r = 1/sqrt(⟨x²⟩ + eps);
//!   z = max(u, tau[c]) with `tlu` (a tie sends half the gradient each way, as PyTorch's and
//!   candle's `maximum`). du = dz·[u > tau]; dx = r·g − x·r³·⟨g·x⟩ with g = du·w[c].
//! - `evonorm-s0`: each (sample, group), M = (C/G)·S. a = x·σ(v[c]·x), r = 1/sqrt(var + eps)
//!   (biased variance); y = a·r·w[c] + b[c]. With g = dy·w[c]:
//!   dx = g·r·(σ + v·x·σ·(1 − σ)) − r³·⟨g·a⟩·(x − μ); dv[c] = Σ g·r·x²·σ·(1 − σ).

use super::parallel::for_each_index;
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp2, DType, InplaceOp2, Layout, Result, Shape, Storage, Tensor,
    WithDType,
};
use std::sync::Mutex;

/// Which per-sample layer the op computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleLayer {
    Rms,
    Frn { tlu: bool },
    EvoNormS0 { groups: usize },
}

impl SampleLayer {
    /// Rows of the params operand.
    pub fn num_params(self) -> usize {
        match self {
            SampleLayer::Rms => 1,
            SampleLayer::Frn { .. } | SampleLayer::EvoNormS0 { .. } => 3,
        }
    }
}

/// One sample's shape: C channels of S values.
#[derive(Debug, Clone, Copy)]
struct Dims {
    c: usize,
    s: usize,
}

/// A storage type of the kernels: `WithDType` and the sigmoid at that type's precision (the
/// f32 exponential is about twice as fast as the f64 one, and exact enough for f32 outputs).
pub trait Elem: WithDType {
    fn sigmoid(z: f64) -> f64;
}

impl Elem for f32 {
    fn sigmoid(z: f64) -> f64 {
        (1.0 / (1.0 + exp_f32(-(z as f32)))) as f64
    }
}

/// e^x in f32 in plain arithmetic, so that loops around it vectorize (no call, no rounding
/// instruction beyond SSE2): x = k·ln 2 + r with |r| ≤ ln 2 / 2, k rounded by adding and
/// subtracting 1.5·2²³; e^r by its degree-6 Taylor polynomial (relative error below 3e-7 on
/// that range), times 2^k built in the exponent bits. Clamped to [−87, 88], where e^x stays a
/// normal f32: the sigmoid of anything beyond is 0 or 1 to f32 precision.
fn exp_f32(x: f32) -> f32 {
    const SHIFT: f32 = 12_582_912.0; // 1.5 · 2^23
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E + SHIFT;
    let k = t - SHIFT;
    // r = x − k·ln 2, with ln 2 split in two for a reduction exact to f32.
    let r = (x - k * 0.693_145_75) - k * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0
            + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r / 720.0)))));
    let bits = (t.to_bits().wrapping_sub(SHIFT.to_bits()) as i32 + 127) as u32;
    p * f32::from_bits(bits << 23)
}

impl Elem for f64 {
    fn sigmoid(z: f64) -> f64 {
        1.0 / (1.0 + (-z).exp())
    }
}

/// The share of an output gradient that passes max(u, tau) to u: 1 above, ½ at a tie, 0 below
/// (branch-free: the comparison is a coin flip per value).
fn tlu_pass(u: f64, tau: f64) -> f64 {
    f64::from(u8::from(u > tau)) + 0.5 * f64::from(u8::from(u == tau))
}

/// 1/sqrt(⟨x²⟩ + eps) over `x`.
fn rms_scale<T: WithDType>(x: &[T], eps: f64) -> f64 {
    let sq: f64 = x.iter().map(|v| v.to_f64() * v.to_f64()).sum();
    1.0 / (sq / x.len() as f64 + eps).sqrt()
}

/// Mean and 1/sqrt(biased variance + eps) over `x`, two passes.
fn mean_rstd<T: WithDType>(x: &[T], eps: f64) -> (f64, f64) {
    let m = x.len() as f64;
    let mean = x.iter().map(|v| v.to_f64()).sum::<f64>() / m;
    let var = x.iter().map(|v| (v.to_f64() - mean).powi(2)).sum::<f64>() / m;
    (mean, 1.0 / (var + eps).sqrt())
}

impl SampleLayer {
    /// The forward of one sample `x` into `y`; `p` the params, row-major (K, C).
    fn forward<T: Elem>(self, x: &[T], y: &mut [T], p: &[f64], d: Dims, eps: f64) {
        let Dims { c, s } = d;
        match self {
            SampleLayer::Rms => {
                let r = rms_scale(x, eps);
                for (ch, (xc, yc)) in x.chunks(s).zip(y.chunks_mut(s)).enumerate() {
                    let k = r * p[ch];
                    for (yv, xv) in yc.iter_mut().zip(xc) {
                        *yv = T::from_f64(xv.to_f64() * k);
                    }
                }
            }
            SampleLayer::Frn { tlu } => {
                for (ch, (xc, yc)) in x.chunks(s).zip(y.chunks_mut(s)).enumerate() {
                    let r = rms_scale(xc, eps);
                    let (w, b, tau) = (p[ch], p[c + ch], p[2 * c + ch]);
                    for (yv, xv) in yc.iter_mut().zip(xc) {
                        let u = w * xv.to_f64() * r + b;
                        *yv = T::from_f64(if tlu { u.max(tau) } else { u });
                    }
                }
            }
            SampleLayer::EvoNormS0 { groups } => {
                let per = (c / groups) * s;
                for (gi, (xg, yg)) in x.chunks(per).zip(y.chunks_mut(per)).enumerate() {
                    let (_, r) = mean_rstd(xg, eps);
                    for (j, (xc, yc)) in xg.chunks(s).zip(yg.chunks_mut(s)).enumerate() {
                        let ch = gi * (c / groups) + j;
                        let (w, b, v) = (p[ch], p[c + ch], p[2 * c + ch]);
                        for (yv, xv) in yc.iter_mut().zip(xc) {
                            let x = xv.to_f64();
                            *yv = T::from_f64(x * T::sigmoid(v * x) * r * w + b);
                        }
                    }
                }
            }
        }
    }

    /// Whether the backward can write dx over dy ([`Self::backward_over`] without a copy).
    fn overwrites_dy(self) -> bool {
        !matches!(self, SampleLayer::EvoNormS0 { .. })
    }

    /// The backward of one sample with `g` holding dy on entry and dx on return (each value of
    /// dy is read before its dx is written); adds the params' gradients to `dp`. EvoNorm-S0
    /// reads dy after writing, so it goes through a copy.
    fn backward_over<T: Elem>(
        self,
        x: &[T],
        g: &mut [T],
        dp: &mut [f64],
        p: &[f64],
        d: Dims,
        eps: f64,
    ) {
        let Dims { c, s } = d;
        match self {
            SampleLayer::Rms => {
                let r = rms_scale(x, eps);
                let mut gx = 0.0;
                for (ch, (xc, dc)) in x.chunks(s).zip(g.chunks(s)).enumerate() {
                    let dot: f64 = xc
                        .iter()
                        .zip(dc)
                        .map(|(a, b)| a.to_f64() * b.to_f64())
                        .sum();
                    gx += dot * p[ch];
                    dp[ch] += dot * r;
                }
                let k = r * r * r * gx / x.len() as f64;
                for (ch, (xc, oc)) in x.chunks(s).zip(g.chunks_mut(s)).enumerate() {
                    let rw = r * p[ch];
                    for (o, xv) in oc.iter_mut().zip(xc) {
                        *o = T::from_f64(rw * o.to_f64() - xv.to_f64() * k);
                    }
                }
            }
            SampleLayer::Frn { tlu } => {
                for (ch, (xc, oc)) in x.chunks(s).zip(g.chunks_mut(s)).enumerate() {
                    let r = rms_scale(xc, eps);
                    let (w, b, tau) = (p[ch], p[c + ch], p[2 * c + ch]);
                    let (mut sw, mut sb, mut st, mut gx) = (0.0, 0.0, 0.0, 0.0);
                    // du per value, over dz, until the second pass.
                    for (o, xv) in oc.iter_mut().zip(xc) {
                        let (x, dz) = (xv.to_f64(), o.to_f64());
                        let u = w * x * r + b;
                        let du = if tlu { dz * tlu_pass(u, tau) } else { dz };
                        st += dz - du;
                        sb += du;
                        sw += du * x * r;
                        gx += du * w * x;
                        *o = T::from_f64(du);
                    }
                    dp[ch] += sw;
                    dp[c + ch] += sb;
                    if tlu {
                        dp[2 * c + ch] += st;
                    }
                    let k = r * r * r * gx / s as f64;
                    for (o, xv) in oc.iter_mut().zip(xc) {
                        *o = T::from_f64(r * w * o.to_f64() - xv.to_f64() * k);
                    }
                }
            }
            SampleLayer::EvoNormS0 { .. } => {
                let dy = g.to_vec();
                self.backward(x, &dy, g, dp, p, d, eps);
            }
        }
    }

    /// The backward of one sample: writes dx and adds the params' gradients (K, C) to `dp`.
    #[allow(clippy::too_many_arguments)]
    fn backward<T: Elem>(
        self,
        x: &[T],
        dy: &[T],
        dx: &mut [T],
        dp: &mut [f64],
        p: &[f64],
        d: Dims,
        eps: f64,
    ) {
        let Dims { c, s } = d;
        match self {
            SampleLayer::Rms | SampleLayer::Frn { .. } => {
                dx.copy_from_slice(dy);
                self.backward_over(x, dx, dp, p, d, eps);
            }
            SampleLayer::EvoNormS0 { groups } => {
                let cg = c / groups;
                let per = cg * s;
                for (gi, ((xg, dg), og)) in x
                    .chunks(per)
                    .zip(dy.chunks(per))
                    .zip(dx.chunks_mut(per))
                    .enumerate()
                {
                    let (mean, r) = mean_rstd(xg, eps);
                    let mut ga = 0.0;
                    // σ per value, held in dx until the second pass (its own loop, without
                    // the reductions, so that it vectorizes).
                    for (j, (xc, oc)) in xg.chunks(s).zip(og.chunks_mut(s)).enumerate() {
                        let v = p[2 * c + gi * cg + j];
                        for (o, xv) in oc.iter_mut().zip(xc) {
                            *o = T::from_f64(T::sigmoid(v * xv.to_f64()));
                        }
                    }
                    let chans = xg.chunks(s).zip(dg.chunks(s)).zip(og.chunks(s));
                    for (j, ((xc, dc), oc)) in chans.enumerate() {
                        let ch = gi * cg + j;
                        let w = p[ch];
                        let (mut sw, mut sb, mut sv) = (0.0, 0.0, 0.0);
                        for ((xv, dv), o) in xc.iter().zip(dc).zip(oc) {
                            let (x, dy, sg) = (xv.to_f64(), dv.to_f64(), o.to_f64());
                            let a = x * sg;
                            ga += dy * w * a;
                            sw += dy * a * r;
                            sb += dy;
                            sv += dy * w * r * x * x * sg * (1.0 - sg);
                        }
                        dp[ch] += sw;
                        dp[c + ch] += sb;
                        dp[2 * c + ch] += sv;
                    }
                    let k = r * r * r * ga / per as f64;
                    for (j, ((xc, dc), oc)) in xg
                        .chunks(s)
                        .zip(dg.chunks(s))
                        .zip(og.chunks_mut(s))
                        .enumerate()
                    {
                        let ch = gi * cg + j;
                        let (w, v) = (p[ch], p[2 * c + ch]);
                        for ((o, xv), dv) in oc.iter_mut().zip(xc).zip(dc) {
                            let x = xv.to_f64();
                            let sg = o.to_f64();
                            let da = dv.to_f64() * w * r * (sg + v * x * sg * (1.0 - sg));
                            *o = T::from_f64(da - k * (x - mean));
                        }
                    }
                }
            }
        }
    }
}

/// The custom op on (x, params).
struct SampleOp {
    layer: SampleLayer,
    eps: f64,
}

fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => bail!("fused {what}: operand must be contiguous"),
    }
}

/// One sample's slice of `n` equal parts, each behind its own lock (never contended: each
/// index is run once).
fn per_sample<T>(v: &mut [T], n: usize) -> Vec<Mutex<&mut [T]>> {
    let len = v.len() / n;
    v.chunks_mut(len).map(Mutex::new).collect()
}

impl SampleOp {
    fn dims(&self, shape: &[usize]) -> (usize, Dims) {
        let s = shape[2..].iter().product();
        (shape[0], Dims { c: shape[1], s })
    }

    fn run_forward<T: Elem>(&self, x: &[T], p: &[T], shape: &[usize]) -> Vec<T> {
        let (n, d) = self.dims(shape);
        let p: Vec<f64> = p.iter().map(|v| v.to_f64()).collect();
        let mut y = vec![T::zero(); x.len()];
        let per = d.c * d.s;
        let outs = per_sample(&mut y, n);
        for_each_index(n, per, |i| {
            let mut out = outs[i].lock().expect("sample slot");
            self.layer
                .forward(&x[i * per..(i + 1) * per], &mut out, &p, d, self.eps);
        });
        drop(outs);
        y
    }

    /// The backward over all samples into `dx`, from `dy`, or with `dy` None from the dy that
    /// `dx` holds on entry; returns the params' gradients, in f64.
    fn run_backward<T: Elem>(
        &self,
        x: &[T],
        p: &[f64],
        dy: Option<&[T]>,
        dx: &mut [T],
        shape: &[usize],
    ) -> Vec<f64> {
        let (n, d) = self.dims(shape);
        let mut dps = vec![0.0f64; n * p.len()];
        let per = d.c * d.s;
        {
            let outs = per_sample(dx, n);
            let parts = per_sample(&mut dps, n);
            for_each_index(n, per, |i| {
                let mut out = outs[i].lock().expect("sample slot");
                let mut dp = parts[i].lock().expect("sample slot");
                let span = i * per..(i + 1) * per;
                let xs = &x[span.clone()];
                let (layer, eps) = (self.layer, self.eps);
                match dy {
                    Some(dy) => layer.backward(xs, &dy[span], &mut out, &mut dp, p, d, eps),
                    None => layer.backward_over(xs, &mut out, &mut dp, p, d, eps),
                }
            });
        }
        // The samples' parameter gradients, added in sample order.
        let mut dp = vec![0.0f64; p.len()];
        for part in dps.chunks(p.len()) {
            for (acc, v) in dp.iter_mut().zip(part) {
                *acc += v;
            }
        }
        dp
    }

    /// dx written over dy's own buffer (see [`OverDy`]), and the params' gradients in f64;
    /// `p` the params (K, C) in f64, row-major.
    fn backward_over_dy(&self, x: &Tensor, p: Vec<f64>, dy: Tensor) -> Result<(Tensor, Vec<f64>)> {
        let op = OverDy {
            op: self,
            p,
            dp: Mutex::new(None),
        };
        dy.inplace_op2(x, &op)?;
        let Some(dp) = op.dp.into_inner().ok().flatten() else {
            bail!("fused normalization: the backward pass left no parameter gradient");
        };
        Ok((dy, dp))
    }
}

/// The backward of RMSNorm and FRN writing dx over dy: candle's backprop hands each op the
/// output gradient it summed for that node alone and drops it after the call (as
/// `ops::OverDy` uses for the other kernels), which saves dx's allocation and its page faults.
struct OverDy<'a> {
    op: &'a SampleOp,
    /// The params (K, C), row-major, in f64.
    p: Vec<f64>,
    dp: Mutex<Option<Vec<f64>>>,
}

impl InplaceOp2 for OverDy<'_> {
    fn name(&self) -> &'static str {
        "normbench-fused-sample-norm-backward"
    }

    fn cpu_fwd(&self, dy: &mut CpuStorage, _: &Layout, xs: &CpuStorage, xl: &Layout) -> Result<()> {
        let shape = xl.dims();
        let dp: Vec<f64> = match dy {
            CpuStorage::F32(g) => {
                self.op
                    .run_backward::<f32>(slice(xs, xl, "input")?, &self.p, None, g, shape)
            }
            CpuStorage::F64(g) => {
                self.op
                    .run_backward::<f64>(slice(xs, xl, "input")?, &self.p, None, g, shape)
            }
            other => bail!(
                "fused normalization takes f32 or f64, got {:?}",
                other.dtype()
            ),
        };
        if let Ok(mut slot) = self.dp.lock() {
            *slot = Some(dp);
        }
        Ok(())
    }
}

impl CustomOp2 for SampleOp {
    fn name(&self) -> &'static str {
        "normbench-fused-sample-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = l1.dims();
        let y = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(self.run_forward::<f32>(
                slice(s1, l1, "input")?,
                slice(s2, l2, "params")?,
                dims,
            )),
            CpuStorage::F64(_) => CpuStorage::F64(self.run_forward::<f64>(
                slice(s1, l1, "input")?,
                slice(s2, l2, "params")?,
                dims,
            )),
            other => bail!(
                "fused normalization takes f32 or f64, got {:?}",
                other.dtype()
            ),
        };
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        p: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        // The params are (K, C), a few rows of per-channel values: read once, in f64.
        let p64 = p.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        let (dx, dp) = if self.layer.overwrites_dy()
            && x.track_op()
            && dy.dtype() == x.dtype()
            && x.is_contiguous()
            && super::ops::whole_buffer(&dy)
        {
            self.backward_over_dy(x, p64, dy)?
        } else {
            let (xs, xl) = x.storage_and_layout();
            let (ds, dl) = dy.storage_and_layout();
            let (Storage::Cpu(xs), Storage::Cpu(ds)) = (&*xs, &*ds) else {
                bail!("fused normalization: operands must be on the CPU");
            };
            macro_rules! run {
                ($t:ty) => {{
                    let dy = slice::<$t>(ds, dl, "output gradient")?;
                    let mut dx = vec![<$t>::from_f64(0.0); dy.len()];
                    let xv = slice(xs, xl, "input")?;
                    let dp = self.run_backward::<$t>(xv, &p64, Some(dy), &mut dx, x.dims());
                    (Tensor::from_vec(dx, x.shape(), x.device())?, dp)
                }};
            }
            match xs {
                CpuStorage::F32(_) => run!(f32),
                _ => run!(f64),
            }
        };
        // f64 to the params' dtype: the same rounding as each value's `from_f64`.
        let dp = Tensor::from_vec(dp, p.shape(), p.device())?.to_dtype(p.dtype())?;
        Ok((x.track_op().then_some(dx), p.track_op().then_some(dp)))
    }
}

/// Applies `layer` to `x` (N, C, ...), f32 or f64, with `params` of shape (K, C) in x's dtype
/// (see the module docs for K and the rows' order).
pub fn fused_sample_norm(
    x: &Tensor,
    params: &Tensor,
    layer: SampleLayer,
    eps: f64,
) -> Result<Tensor> {
    let dims = x.dims();
    if dims.len() < 2 || dims.contains(&0) {
        bail!("fused {layer:?}: expected a non-empty input (N, C, ...), got shape {dims:?}");
    }
    let k = layer.num_params();
    if params.dims() != [k, dims[1]] || params.dtype() != x.dtype() {
        bail!(
            "fused {layer:?}: params must have shape ({k}, {}) and dtype {:?}, got {:?} {:?}",
            dims[1],
            x.dtype(),
            params.dims(),
            params.dtype()
        );
    }
    if let SampleLayer::EvoNormS0 { groups } = layer {
        if groups == 0 || !dims[1].is_multiple_of(groups) {
            bail!(
                "fused evonorm-s0: groups={groups} does not divide {} channels",
                dims[1]
            );
        }
    }
    x.contiguous()?
        .apply_op2(&params.contiguous()?, SampleOp { layer, eps })
}

#[cfg(test)]
mod tests {
    use super::exp_f32;

    #[test]
    fn the_f32_exponential_is_within_a_few_ulp_of_the_f64_one() {
        let mut worst = 0.0f64;
        for i in -870_000..=880_000 {
            let x = i as f32 * 1e-4;
            let exact = (x as f64).exp();
            let err = ((exp_f32(x) as f64 - exact) / exact).abs();
            worst = worst.max(err);
        }
        assert!(worst < 4e-7, "worst relative error {worst:e}");
        assert_eq!(exp_f32(-1000.0), exp_f32(-87.0));
        assert!(exp_f32(1000.0).is_finite());
    }
}
