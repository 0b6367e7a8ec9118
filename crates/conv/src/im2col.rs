//! im2col and its adjoint col2im, the data movement around the convolution's matmuls.
//!
//! Columns are laid out (K, N·P): row k = (ci·kh + ky)·kw + kx, column n·P + oy·OW + ox, so that
//! the whole batch is one matmul, `W (O, K) @ cols (K, N·P)`. Both functions are parallel over
//! a fixed partition (rows of `cols`; (sample, channel) planes of the image), each output element
//! written by one task in a fixed order: results are bit-identical for every thread count.

use candle_core::WithDType;
use rayon::prelude::*;

/// Chunks per rayon task for chunks of `chunk_len` values: no task is too small to be worth a
/// thread.
pub(crate) fn min_len(chunk_len: usize) -> usize {
    ((1 << 15) / chunk_len.max(1)).max(1)
}

/// The geometry of one convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub n: usize,
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub padding: usize,
    pub dilation: usize,
    pub oh: usize,
    pub ow: usize,
}

impl Geometry {
    /// Output positions per sample.
    pub fn p(&self) -> usize {
        self.oh * self.ow
    }

    /// Rows of the column matrix: input channels × kernel positions.
    pub fn k(&self) -> usize {
        self.c_in * self.kh * self.kw
    }

    /// The output coordinates `lo..hi` whose input coordinate at kernel offset `kk` lies inside
    /// an axis of `size` (`out` outputs), and the input coordinate of `lo`.
    #[inline]
    fn valid_range(&self, kk: usize, size: usize, out: usize) -> (usize, usize, usize) {
        let offset = kk * self.dilation;
        let lo = self.padding.saturating_sub(offset).div_ceil(self.stride);
        let end = size + self.padding;
        let hi = if end > offset {
            (end - offset).div_ceil(self.stride).min(out)
        } else {
            0
        };
        let lo = lo.min(hi);
        (
            lo,
            hi,
            (lo * self.stride + offset).saturating_sub(self.padding),
        )
    }

    /// Input coordinate of output coordinate `o` at kernel offset `kk`, if inside the image.
    #[inline]
    fn input_coord(&self, o: usize, kk: usize, size: usize) -> Option<usize> {
        (o * self.stride + kk * self.dilation)
            .checked_sub(self.padding)
            .filter(|&i| i < size)
    }
}

/// `x` (N, C, H, W), contiguous, to columns (K, N·P).
pub fn im2col<T: WithDType>(x: &[T], g: &Geometry) -> Vec<T> {
    let (p, np) = (g.p(), g.n * g.p());
    let mut cols = vec![T::zero(); g.k() * np];
    cols.par_chunks_mut(np)
        .with_min_len(min_len(np))
        .enumerate()
        .for_each(|(k, row)| {
            let (ci, kk) = (k / (g.kh * g.kw), k % (g.kh * g.kw));
            let (ky, kx) = (kk / g.kw, kk % g.kw);
            let (lo, hi, ix0) = g.valid_range(kx, g.w, g.ow);
            for n in 0..g.n {
                let plane = &x[(n * g.c_in + ci) * g.h * g.w..][..g.h * g.w];
                let out = &mut row[n * p..][..p];
                for oy in 0..g.oh {
                    let out_row = &mut out[oy * g.ow..][..g.ow];
                    let Some(iy) = g.input_coord(oy, ky, g.h) else {
                        out_row.fill(T::zero());
                        continue;
                    };
                    let in_row = &plane[iy * g.w..][..g.w];
                    out_row[..lo].fill(T::zero());
                    out_row[hi..].fill(T::zero());
                    let dst = &mut out_row[lo..hi];
                    if dst.is_empty() {
                        continue; // this kernel tap only ever sees padding
                    }
                    if g.stride == 1 {
                        dst.copy_from_slice(&in_row[ix0..ix0 + dst.len()]);
                    } else {
                        for (j, o) in dst.iter_mut().enumerate() {
                            *o = in_row[ix0 + j * g.stride];
                        }
                    }
                }
            }
        });
    cols
}

/// Columns (K, N·P), contiguous, summed back into an image (N, C, H, W): the adjoint of
/// [`im2col`], which turns the columns' gradient into the input's.
pub fn col2im<T: WithDType>(cols: &[T], g: &Geometry) -> Vec<T> {
    let (p, np) = (g.p(), g.n * g.p());
    let mut x = vec![T::zero(); g.n * g.c_in * g.h * g.w];
    x.par_chunks_mut(g.h * g.w)
        .with_min_len(min_len(g.h * g.w * g.kh * g.kw))
        .enumerate()
        .for_each(|(plane_idx, plane)| {
            let (n, ci) = (plane_idx / g.c_in, plane_idx % g.c_in);
            for ky in 0..g.kh {
                for kx in 0..g.kw {
                    let k = (ci * g.kh + ky) * g.kw + kx;
                    let src = &cols[k * np + n * p..][..p];
                    let (lo, hi, ix0) = g.valid_range(kx, g.w, g.ow);
                    for oy in 0..g.oh {
                        let Some(iy) = g.input_coord(oy, ky, g.h) else {
                            continue;
                        };
                        let in_row = &mut plane[iy * g.w..][..g.w];
                        let vals = &src[oy * g.ow + lo..oy * g.ow + hi];
                        for (j, v) in vals.iter().enumerate() {
                            in_row[ix0 + j * g.stride] += *v;
                        }
                    }
                }
            }
        });
    x
}
