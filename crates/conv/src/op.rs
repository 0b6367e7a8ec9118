//! The convolution as candle custom ops: forward and backward on the CPU.

use crate::gemm;
use crate::im2col::{col2im, im2col, swap_outer, Geometry};
use crate::{geometry, Conv2dConfig};
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, Device, Layout, Result, Shape, Tensor, WithDType,
};
use std::sync::Mutex;

/// y = conv(x, w), without bias; arguments x (N, C, H, W) and w (O, C, kH, kW).
pub struct Conv2dOp {
    cfg: Conv2dConfig,
    /// Keep the forward's columns whatever their size: for the stride-1 backward's transposed
    /// convolution, whose columns give the weight gradient when the weight needs one.
    keep_columns: bool,
    /// The forward's columns, kept for the weight gradient where they are small (see
    /// [`keeps_columns`]); the backward takes them.
    cols: Mutex<Option<Tensor>>,
}

impl Conv2dOp {
    pub fn new(cfg: Conv2dConfig) -> Self {
        Self {
            cfg,
            keep_columns: false,
            cols: Mutex::new(None),
        }
    }

    fn forward<T: WithDType>(&self, x: &[T], w: &[T], g: &Geometry) -> Result<Vec<T>> {
        let (k, np) = (g.k(), g.n * g.p());
        let c_out = w.len() / k.max(1);
        let cols = im2col(x, g);
        let y = gemm::forward(w, &cols, c_out, k, np);
        if self.keep_columns || keeps_columns(g) {
            *self.cols.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(Tensor::from_vec(cols, (k, np), &Device::Cpu)?);
        }
        Ok(swap_outer(&y, c_out, g.n, g.p()))
    }
}

/// Whether the forward keeps its columns for the backward, which then skips one im2col: where
/// they hold at most 2.25× the input's values (kH·kW·OH·OW ≤ 2.25·H·W: 3×3 and 1×1 kernels with
/// stride 2). Stride-1 layers whose input gradient is a convolution take the weight gradient
/// from that convolution's columns (see [`Conv2dOp::stride1_bwd`]) and keep none.
fn keeps_columns(g: &Geometry) -> bool {
    4 * g.kh * g.kw * g.p() <= 9 * g.h * g.w && transposed_as_convolution(g).is_none()
}

/// The contiguous data of a storage, or an error for strided or unsupported inputs.
fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&s.as_slice::<T>()?[start..end]),
        None => bail!("conv2d: the {what} must be contiguous"),
    }
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
        let shape = Shape::from((g.n, l2.dims()[0], g.oh, g.ow));
        Ok((dispatch2(s1, l1, s2, l2, &(self, g))?, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = geometry(x.dims(), w.dims(), self.cfg)?;
        if let (true, Some(cfg)) = (x.track_op(), transposed_as_convolution(&g)) {
            return self.stride1_bwd(x, w, dy, &g, cfg);
        }
        let (c_out, np) = (w.dim(0)?, g.n * g.p());
        // dY as (O, N·P), the layout of the matmuls.
        let dy_rows = dy
            .contiguous()?
            .apply_op1_no_bwd(&Reshape::SwapOuter(g.n, c_out, g.p()))?
            .reshape((c_out, np))?;
        let dw = if w.track_op() {
            let dw = match self.take_columns() {
                Some(cols) => {
                    dy_rows.apply_op2_no_bwd(&cols, &Products::WeightGradFromColumns(g))?
                }
                None => dy_rows.apply_op2_no_bwd(&x.detach(), &Products::WeightGrad(g))?,
            };
            Some(dw.reshape(w.shape())?)
        } else {
            None
        };
        let dx = if x.track_op() {
            let dcols = w
                .detach()
                .apply_op2_no_bwd(&dy_rows, &Products::ColsGrad(g))?;
            Some(dcols.apply_op1_no_bwd(&Reshape::Col2Im(g))?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

impl Conv2dOp {
    /// The backward of a stride-1 layer whose input needs a gradient. That gradient is itself
    /// a convolution, of dY with the kernel flipped in space and transposed in channels (`cfg`),
    /// which im2col + matmul do faster than matmul + col2im. That convolution's columns, dY's,
    /// then give the weight gradient too, as the product with x:
    /// dW[o, c, i, j] = Σ cols_dY[(o, kH − 1 − i, kW − 1 − j), (n, q)] · x[n, c, q],
    /// which is the transposed convolution's own weight gradient for output gradient x, flipped
    /// and transposed back. One im2col for the whole backward, and no columns kept.
    fn stride1_bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        g: &Geometry,
        cfg: Conv2dConfig,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let w_t = w.detach().apply_op1_no_bwd(&Reshape::FlipTranspose)?;
        let transposed = Conv2dOp {
            cfg,
            keep_columns: w.track_op(),
            cols: Mutex::new(None),
        };
        let dy = dy.contiguous()?;
        let dx = dy.apply_op2_no_bwd(&w_t, &transposed)?;
        let dw = if w.track_op() {
            let g_t = geometry(dy.dims(), w_t.dims(), cfg)?;
            let Some(cols) = transposed.take_columns() else {
                bail!("conv2d backward: the transposed convolution kept no columns")
            };
            let x_rows = x
                .detach()
                .contiguous()?
                .apply_op1_no_bwd(&Reshape::SwapOuter(g.n, g.c_in, g.h * g.w))?
                .reshape((g.c_in, g.n * g.h * g.w))?;
            let dw_t = x_rows.apply_op2_no_bwd(&cols, &Products::WeightGradFromColumns(g_t))?;
            Some(
                dw_t.reshape(w_t.shape())?
                    .apply_op1_no_bwd(&Reshape::FlipTranspose)?,
            )
        } else {
            None
        };
        Ok((Some(dx), dw))
    }

    fn take_columns(&self) -> Option<Tensor> {
        self.cols.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// For stride 1 and a square kernel, the convolution whose output is the transposed
/// convolution's (the input gradient): padding d·(k − 1) − p, which must not be negative.
fn transposed_as_convolution(g: &Geometry) -> Option<Conv2dConfig> {
    let span = g.dilation * (g.kh - 1);
    // `then`, not `then_some`: the padding is only worked out where it is not negative.
    (g.stride == 1 && g.kh == g.kw && g.padding <= span).then(|| Conv2dConfig {
        stride: 1,
        padding: span - g.padding,
        dilation: g.dilation,
    })
}

/// The products around the data movement, on contiguous operands of one dtype.
enum Products {
    /// dY as (O, N·P) and x (N, C, H, W) to dW as (O, K).
    WeightGrad(Geometry),
    /// dY as (O, N·P) and x's columns (K, N·P) to dW as (O, K).
    WeightGradFromColumns(Geometry),
    /// w (O, C, kH, kW) and dY as (O, N·P) to the columns' gradient (K, N·P).
    ColsGrad(Geometry),
}

/// A computation on two contiguous operands of one dtype, f32 or f64 (see [`dispatch2`]).
trait TwoOperands {
    fn apply<T: WithDType>(&self, a: &[T], b: &[T]) -> Result<Vec<T>>;
}

/// The forward: x and w to y.
impl TwoOperands for (&Conv2dOp, Geometry) {
    fn apply<T: WithDType>(&self, x: &[T], w: &[T]) -> Result<Vec<T>> {
        self.0.forward(x, w, &self.1)
    }
}

impl TwoOperands for Products {
    fn apply<T: WithDType>(&self, a: &[T], b: &[T]) -> Result<Vec<T>> {
        Ok(match *self {
            Products::WeightGrad(g) => {
                let np = g.n * g.p();
                gemm::weight_grad(a, &im2col(b, &g), a.len() / np.max(1), g.k(), np)
            }
            Products::WeightGradFromColumns(g) => {
                let np = g.n * g.p();
                gemm::weight_grad(a, b, a.len() / np.max(1), g.k(), np)
            }
            Products::ColsGrad(g) => {
                gemm::cols_grad(a, b, a.len() / g.k().max(1), g.k(), g.n * g.p())
            }
        })
    }
}

impl Products {
    /// The operands' expected shapes and the output's.
    fn shapes(&self, c_out: usize) -> ([Vec<usize>; 2], Shape) {
        let (Products::WeightGrad(g) | Products::WeightGradFromColumns(g) | Products::ColsGrad(g)) =
            *self;
        let np = g.n * g.p();
        let x = vec![g.n, g.c_in, g.h, g.w];
        let w = vec![c_out, g.c_in, g.kh, g.kw];
        match self {
            Products::WeightGrad(_) => ([vec![c_out, np], x], Shape::from((c_out, g.k()))),
            Products::WeightGradFromColumns(_) => (
                [vec![c_out, np], vec![g.k(), np]],
                Shape::from((c_out, g.k())),
            ),
            Products::ColsGrad(_) => ([w, vec![c_out, np]], Shape::from((g.k(), np))),
        }
    }
}

/// The products as a candle op without backward.
impl CustomOp2 for Products {
    fn name(&self) -> &'static str {
        match self {
            Products::WeightGrad(_) | Products::WeightGradFromColumns(_) => {
                "normbench-conv2d-weight-grad"
            }
            Products::ColsGrad(_) => "normbench-conv2d-cols-grad",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let c_out = l1.dims().first().copied().unwrap_or(0);
        let ([want1, want2], shape) = self.shapes(c_out);
        if l1.dims() != want1 || l2.dims() != want2 {
            bail!(
                "{}: expected operands {want1:?} and {want2:?}, got {:?} and {:?}",
                self.name(),
                l1.dims(),
                l2.dims()
            );
        }
        Ok((dispatch2(s1, l1, s2, l2, self)?, shape))
    }
}

/// `op` on two contiguous storages of one dtype, f32 or f64.
fn dispatch2(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    op: &impl TwoOperands,
) -> Result<CpuStorage> {
    Ok(match (s1, s2) {
        (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(op.apply(
            slice(s1, l1, "first operand")?,
            slice(s2, l2, "second operand")?,
        )?),
        (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(op.apply(
            slice(s1, l1, "first operand")?,
            slice(s2, l2, "second operand")?,
        )?),
        _ => bail!(
            "conv2d: the fast convolution takes f32 or f64 operands of one dtype, got {:?} and \
             {:?}; use --conv candle for other dtypes",
            s1.dtype(),
            s2.dtype()
        ),
    })
}

/// The data movement around the matmuls, as a candle op without backward.
#[derive(Clone, Copy)]
enum Reshape {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_kept_for_strided_layers_only() {
        let keeps = |x: [usize; 4], k: usize, stride: usize| {
            let cfg = Conv2dConfig {
                stride,
                padding: k / 2,
                dilation: 1,
            };
            keeps_columns(&geometry(&x, &[5, x[1], k, k], cfg).unwrap())
        };
        assert!(keeps([3, 4, 8, 6], 3, 2));
        assert!(keeps([3, 4, 8, 6], 1, 2));
        // Stride 1: the weight gradient comes from the transposed convolution's columns.
        assert!(!keeps([3, 4, 8, 6], 1, 1));
        assert!(!keeps([3, 4, 8, 6], 3, 1));
        assert!(!keeps([3, 4, 7, 6], 3, 2)); // 4×3 outputs: 108 values per channel > 2.25 · 42
    }
}
