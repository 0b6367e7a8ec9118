//! The convolution as candle custom ops: forward and backward on the CPU.

use crate::im2col::{col2im, im2col, swap_outer, Geometry};
use crate::{geometry, Conv2dConfig};
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, Device, Layout, Result, Shape, Tensor, WithDType,
};

/// y = conv(x, w), without bias; arguments x (N, C, H, W) and w (O, C, kH, kW).
pub struct Conv2dOp {
    pub cfg: Conv2dConfig,
}

/// The contiguous data of a storage, or an error for strided or unsupported inputs.
fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&s.as_slice::<T>()?[start..end]),
        None => bail!("conv2d: the {what} must be contiguous"),
    }
}

fn forward<T: WithDType>(x: &[T], w: &[T], g: &Geometry, c_out: usize) -> Result<Vec<T>> {
    let (k, p, np) = (g.k(), g.p(), g.n * g.p());
    let cols = Tensor::from_vec(im2col(x, g), (k, np), &Device::Cpu)?;
    let w = Tensor::from_slice(w, (c_out, k), &Device::Cpu)?;
    let y = w.matmul(&cols)?;
    let (storage, layout) = y.storage_and_layout();
    let candle_core::Storage::Cpu(storage) = &*storage else {
        bail!("conv2d: matmul left the CPU");
    };
    let y = slice::<T>(storage, layout, "matmul output")?;
    Ok(swap_outer(y, c_out, g.n, p))
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "normbench-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = geometry(l1.dims(), l2.dims(), self.cfg)?;
        let c_out = l2.dims()[0];
        let shape = Shape::from((g.n, c_out, g.oh, g.ow));
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(forward(
                slice(s1, l1, "input")?,
                slice(s2, l2, "weight")?,
                &g,
                c_out,
            )?),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(forward(
                slice(s1, l1, "input")?,
                slice(s2, l2, "weight")?,
                &g,
                c_out,
            )?),
            _ => bail!(
                "conv2d: the fast convolution takes f32 or f64 input and weight of one dtype, \
                 got {:?} and {:?}; use --conv candle for other dtypes",
                s1.dtype(),
                s2.dtype()
            ),
        };
        Ok((out, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = geometry(x.dims(), w.dims(), self.cfg)?;
        let (c_out, k, np) = (w.dim(0)?, g.k(), g.n * g.p());
        // dY as (O, N·P), the layout of the matmuls.
        let dy_rows = dy
            .contiguous()?
            .apply_op1_no_bwd(&Reshape::SwapOuter(g.n, c_out, g.p()))?
            .reshape((c_out, np))?;
        let dw = if w.track_op() {
            let cols = x.detach().apply_op1_no_bwd(&Reshape::Im2Col(g))?;
            Some(dy_rows.matmul(&cols.t()?)?.reshape(w.shape())?)
        } else {
            None
        };
        let dx = match (x.track_op(), transposed_as_convolution(&g)) {
            (false, _) => None,
            (true, Some(cfg)) => {
                // Stride 1: the input gradient is itself a convolution of dY with the kernel
                // flipped in space and transposed in channels, which im2col + matmul do
                // faster than matmul + col2im.
                let w_t = w.detach().apply_op1_no_bwd(&Reshape::FlipTranspose)?;
                Some(dy.contiguous()?.apply_op2_no_bwd(&w_t, &Conv2dOp { cfg })?)
            }
            (true, None) => {
                let dcols = w.detach().reshape((c_out, k))?.t()?.matmul(&dy_rows)?;
                Some(dcols.apply_op1_no_bwd(&Reshape::Col2Im(g))?)
            }
        };
        Ok((dx, dw))
    }
}

/// For stride 1 and a square kernel, the convolution whose output is the transposed
/// convolution's (the input gradient): padding d·(k − 1) − p, which must not be negative.
fn transposed_as_convolution(g: &Geometry) -> Option<Conv2dConfig> {
    let span = g.dilation * (g.kh - 1);
    (g.stride == 1 && g.kh == g.kw && g.padding <= span).then_some(Conv2dConfig {
        stride: 1,
        padding: span - g.padding,
        dilation: g.dilation,
    })
}

/// The data movement around the matmuls, as a candle op without backward.
#[derive(Clone, Copy)]
enum Reshape {
    /// x (N, C, H, W) to columns (K, N·P).
    Im2Col(Geometry),
    /// Columns (K, N·P) back to an image (N, C, H, W), summing overlaps.
    Col2Im(Geometry),
    /// A kernel (O, C, kH, kW) to (C, O, kH, kW) flipped in space: w'[c, o, y, x] =
    /// w[o, c, kH − 1 − y, kW − 1 − x].
    FlipTranspose,
    /// (A, B, P) to (B, A, P).
    SwapOuter(usize, usize, usize),
}

impl CustomOp1 for Reshape {
    fn name(&self) -> &'static str {
        match self {
            Reshape::Im2Col(_) => "normbench-im2col",
            Reshape::Col2Im(_) => "normbench-col2im",
            Reshape::FlipTranspose => "normbench-flip-transpose",
            Reshape::SwapOuter(..) => "normbench-swap-outer",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((start, end)) = l.contiguous_offsets() else {
            bail!("{}: the input must be contiguous", self.name());
        };
        let (out, shape) = match *self {
            Reshape::Im2Col(g) => (
                dispatch(
                    s,
                    |v| im2col(&v[start..end], &g),
                    |v| im2col(&v[start..end], &g),
                )?,
                Shape::from((g.k(), g.n * g.p())),
            ),
            Reshape::Col2Im(g) => (
                dispatch(
                    s,
                    |v| col2im(&v[start..end], &g),
                    |v| col2im(&v[start..end], &g),
                )?,
                Shape::from((g.n, g.c_in, g.h, g.w)),
            ),
            Reshape::SwapOuter(a, b, p) => {
                if end - start != a * b * p {
                    bail!(
                        "{}: {} values are not ({a}, {b}, {p})",
                        self.name(),
                        end - start
                    );
                }
                (
                    dispatch(
                        s,
                        |v| swap_outer(&v[start..end], a, b, p),
                        |v| swap_outer(&v[start..end], a, b, p),
                    )?,
                    Shape::from((b, a, p)),
                )
            }
            Reshape::FlipTranspose => {
                let &[o, c, kh, kw] = l.dims() else {
                    bail!(
                        "{}: expected (O, C, kH, kW), got {:?}",
                        self.name(),
                        l.dims()
                    );
                };
                (
                    dispatch(
                        s,
                        |v| flip_transpose(&v[start..end], [o, c, kh, kw]),
                        |v| flip_transpose(&v[start..end], [o, c, kh, kw]),
                    )?,
                    Shape::from((c, o, kh, kw)),
                )
            }
        };
        Ok((out, shape))
    }
}

fn flip_transpose<T: Copy>(w: &[T], [o, c, kh, kw]: [usize; 4]) -> Vec<T> {
    let k = kh * kw;
    let mut out = Vec::with_capacity(w.len());
    for ci in 0..c {
        for oi in 0..o {
            let src = &w[(oi * c + ci) * k..][..k];
            out.extend(src.iter().rev());
        }
    }
    out
}

fn dispatch<F32, F64>(s: &CpuStorage, f32_: F32, f64_: F64) -> Result<CpuStorage>
where
    F32: FnOnce(&[f32]) -> Vec<f32>,
    F64: FnOnce(&[f64]) -> Vec<f64>,
{
    Ok(match s {
        CpuStorage::F32(v) => CpuStorage::F32(f32_(v)),
        CpuStorage::F64(v) => CpuStorage::F64(f64_(v)),
        _ => bail!("conv2d: expected f32 or f64, got {:?}", s.dtype()),
    })
}
