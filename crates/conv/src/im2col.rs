//! im2col and its adjoint col2im, the data movement around the convolution's matmuls.
//!
//! Columns are laid out (K, N·P): row k = (ci·kh + ky)·kw + kx, column n·P + oy·OW + ox, so that
//! the whole batch is one matmul, `W (O, K) @ cols (K, N·P)`. Both functions are parallel over
//! a fixed partition (rows of `cols`; (sample, channel) planes of the image), each output element
//! written by one task in a fixed order: results are bit-identical for every thread count.

use candle_core::WithDType;
use rayon::prelude::*;
use std::mem::MaybeUninit;

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
}

/// Marks an output position whose input at some kernel tap is padding.
const PADDING: usize = usize::MAX;

impl Geometry {
    /// For strided convolutions: per kernel tap (ky·kW + kx), the index in an input plane that
    /// each output position (oy·OW + ox) reads, or [`PADDING`]. The same for every sample and
    /// channel, so the strided loops below are one gather (or scatter) per tap and plane
    /// instead of one short row at a time.
    fn tap_tables(&self) -> Vec<usize> {
        let p = self.p();
        let mut table = vec![PADDING; self.kh * self.kw * p];
        for ky in 0..self.kh {
            let (ylo, yhi, iy0) = self.valid_range(ky, self.h, self.oh);
            for kx in 0..self.kw {
                let (lo, hi, ix0) = self.valid_range(kx, self.w, self.ow);
                let tap = &mut table[(ky * self.kw + kx) * p..][..p];
                for oy in ylo..yhi {
                    let iy = iy0 + (oy - ylo) * self.stride;
                    for ox in lo..hi {
                        tap[oy * self.ow + ox] = iy * self.w + ix0 + (ox - lo) * self.stride;
                    }
                }
            }
        }
        table
    }

    /// For stride-1 geometries as wide as their input, where an output position and the input
    /// position it reads at one tap differ by a constant: per kernel tap, that constant and
    /// which output positions read the input (the others read padding, some of them where the
    /// shift wraps round a row's edge), as a byte mask for values of `value_bytes` bytes.
    fn shifts(&self, value_bytes: usize) -> Vec<Shift> {
        let (p, d, pad) = (self.p(), self.dilation as isize, self.padding as isize);
        (0..self.kh * self.kw)
            .map(|kk| {
                let (ky, kx) = (kk / self.kw, kk % self.kw);
                let (ylo, yhi, _) = self.valid_range(ky, self.h, self.oh);
                let (lo, hi, _) = self.valid_range(kx, self.w, self.ow);
                let mut mask = vec![0; p * value_bytes];
                for oy in ylo..yhi {
                    mask[(oy * self.ow + lo) * value_bytes..(oy * self.ow + hi) * value_bytes]
                        .fill(u8::MAX);
                }
                Shift {
                    delta: (ky as isize * d - pad) * self.w as isize + kx as isize * d - pad,
                    mask,
                }
            })
            .collect()
    }
}

/// One kernel tap of a stride-1 geometry as wide as its input (see [`Geometry::shifts`]).
struct Shift {
    /// Input index in a plane minus output index.
    delta: isize,
    /// Per output position, `size_of::<T>()` bytes: all ones where it reads the input, zero
    /// where it reads padding (see [`select`]).
    mask: Vec<u8>,
}

/// `src` where `mask` is all ones and zero where it is zero, as a bytewise AND (`size_of::<T>()`
/// mask bytes per value; all-zero bytes are zero in every dtype). One loop the compiler
/// vectorizes: on 4×4 planes a memcpy per short block plus a pass for the padding cost 8%
/// more of a convolution layer's forward+backward.
#[inline]
fn select<T: WithDType>(dst: &mut [MaybeUninit<T>], src: &[T], mask: &[u8]) {
    let bytes = std::mem::size_of_val(src);
    assert!(dst.len() == src.len() && mask.len() == bytes);
    // SAFETY: candle's dtypes are plain numbers without padding bytes, so `src`'s bytes are
    // initialized; `dst` is writable for as many bytes, and every one of them is written.
    let (src, dst) = unsafe {
        (
            std::slice::from_raw_parts(src.as_ptr().cast::<u8>(), bytes),
            std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast::<u8>(), bytes),
        )
    };
    for ((d, &s), &m) in dst.iter_mut().zip(src).zip(mask) {
        *d = s & m;
    }
}

/// A vector of `len` values, every one of them written by `fill` (which must write them all).
pub(crate) fn filled<T: WithDType>(len: usize, fill: impl FnOnce(&mut [MaybeUninit<T>])) -> Vec<T> {
    let mut v: Vec<T> = Vec::with_capacity(len);
    fill(&mut v.spare_capacity_mut()[..len]);
    // SAFETY: `fill` wrote all `len` values.
    unsafe { v.set_len(len) };
    v
}

#[inline]
fn zero<T: WithDType>(dst: &mut [MaybeUninit<T>]) {
    for d in dst {
        d.write(T::zero());
    }
}

/// `src` (A, B, P), contiguous, as (B, A, P): the matmuls' (O, N·P) layout to the image's
/// (N, O, P) and back, one contiguous copy of P values per (b, a), in parallel.
pub fn swap_outer<T: WithDType>(src: &[T], a: usize, b: usize, p: usize) -> Vec<T> {
    filled(a * b * p, |dst| {
        dst.par_chunks_mut(p.max(1))
            .with_min_len(min_len(p))
            .enumerate()
            .for_each(|(ba, d)| {
                let (bi, ai) = (ba / a, ba % a);
                copy(d, &src[(ai * b + bi) * p..][..p]);
            });
    })
}

#[inline]
fn copy<T: WithDType>(dst: &mut [MaybeUninit<T>], src: &[T]) {
    assert_eq!(dst.len(), src.len());
    // SAFETY: same length, and the two cannot overlap (one is borrowed mutably).
    unsafe {
        std::ptr::copy_nonoverlapping(src.as_ptr(), dst.as_mut_ptr().cast::<T>(), src.len());
    }
}

/// `x` (N, C, H, W), contiguous, to columns (K, N·P).
///
/// With stride 1 and an output as wide as the input (the usual "same" padding), output and
/// input positions of one kernel tap differ by a constant offset: each (tap, sample) block is
/// then one contiguous copy, after which the few positions that wrapped around a row edge are
/// set to zero. Strided geometries gather each (tap, sample) block through the tap's table;
/// others copy row by row.
pub fn im2col<T: WithDType>(x: &[T], g: &Geometry) -> Vec<T> {
    let (p, np) = (g.p(), g.n * g.p());
    let plane_len = g.h * g.w;
    let tables = (g.stride > 1).then(|| g.tap_tables());
    let shifts = (g.stride == 1 && g.ow == g.w).then(|| g.shifts(std::mem::size_of::<T>()));
    filled(g.k() * np, |cols| {
        cols.par_chunks_mut(np)
            .with_min_len(min_len(np))
            .enumerate()
            .for_each(|(k, row)| {
                let (ci, kk) = (k / (g.kh * g.kw), k % (g.kh * g.kw));
                if let Some(shifts) = &shifts {
                    let Shift { delta, mask } = &shifts[kk];
                    let value_bytes = std::mem::size_of::<T>();
                    for (n, out) in row.chunks_exact_mut(p).enumerate() {
                        // Input index of output position 0. Positions that read padding may
                        // reach outside the plane and, in the first and last planes, outside
                        // x: only positions lo..hi are read, the others are padding.
                        let start = ((n * g.c_in + ci) * plane_len) as isize + delta;
                        let lo = (-start).clamp(0, p as isize) as usize;
                        let hi = (x.len() as isize - start).clamp(lo as isize, p as isize) as usize;
                        debug_assert!(mask[..lo * value_bytes].iter().all(|&m| m == 0));
                        debug_assert!(mask[hi * value_bytes..].iter().all(|&m| m == 0));
                        if lo < hi {
                            let first = (start + lo as isize) as usize;
                            select(
                                &mut out[lo..hi],
                                &x[first..first + (hi - lo)],
                                &mask[lo * value_bytes..hi * value_bytes],
                            );
                        }
                        zero(&mut out[..lo]);
                        zero(&mut out[hi..]);
                    }
                    return;
                }
                let (ky, kx) = (kk / g.kw, kk % g.kw);
                let (lo, hi, ix0) = g.valid_range(kx, g.w, g.ow);
                let (ylo, yhi, iy0) = g.valid_range(ky, g.h, g.oh);
                for n in 0..g.n {
                    let plane = &x[(n * g.c_in + ci) * plane_len..][..plane_len];
                    let out = &mut row[n * p..][..p];
                    if let Some(tables) = &tables {
                        let tap = &tables[kk * p..][..p];
                        for (d, &i) in out.iter_mut().zip(tap) {
                            d.write(plane.get(i).copied().unwrap_or_else(T::zero));
                        }
                        continue;
                    }
                    zero(&mut out[..ylo * g.ow]);
                    zero(&mut out[yhi * g.ow..]);
                    if lo == hi {
                        zero(&mut out[ylo * g.ow..yhi * g.ow]); // a tap that only sees padding
                        continue;
                    }
                    // Stride 1, an output narrower than the input: rows are copies.
                    for oy in ylo..yhi {
                        let out_row = &mut out[oy * g.ow..][..g.ow];
                        let in_row = &plane[(iy0 + oy - ylo) * g.w..][..g.w];
                        zero(&mut out_row[..lo]);
                        zero(&mut out_row[hi..]);
                        copy(&mut out_row[lo..hi], &in_row[ix0..ix0 + (hi - lo)]);
                    }
                }
            });
    })
}

/// Columns (K, N·P), contiguous, summed back into an image (N, C, H, W): the adjoint of
/// [`im2col`], which turns the columns' gradient into the input's. Each plane adds its taps in
/// a fixed order (ky, kx, then rows).
pub fn col2im<T: WithDType>(cols: &[T], g: &Geometry) -> Vec<T> {
    let (p, np) = (g.p(), g.n * g.p());
    let tables = (g.stride > 1).then(|| g.tap_tables());
    let mut x = vec![T::zero(); g.n * g.c_in * g.h * g.w];
    x.par_chunks_mut(g.h * g.w)
        .with_min_len(min_len(g.h * g.w * g.kh * g.kw))
        .enumerate()
        .for_each(|(plane_idx, plane)| {
            let (n, ci) = (plane_idx / g.c_in, plane_idx % g.c_in);
            if let Some(tables) = &tables {
                // The same additions in the same order as the rows below: taps in order, each
                // adding at most one value to any input position.
                for (kk, tap) in tables.chunks_exact(p).enumerate() {
                    let src = &cols[(ci * g.kh * g.kw + kk) * np + n * p..][..p];
                    for (&i, &v) in tap.iter().zip(src) {
                        if let Some(d) = plane.get_mut(i) {
                            *d += v;
                        }
                    }
                }
                return;
            }
            for ky in 0..g.kh {
                let (ylo, yhi, iy0) = g.valid_range(ky, g.h, g.oh);
                for kx in 0..g.kw {
                    let k = (ci * g.kh + ky) * g.kw + kx;
                    let src = &cols[k * np + n * p..][..p];
                    let (lo, hi, ix0) = g.valid_range(kx, g.w, g.ow);
                    if lo == hi {
                        continue;
                    }
                    // Stride 1 (strided geometries took the tables above).
                    for oy in ylo..yhi {
                        let in_row = &mut plane[(iy0 + oy - ylo) * g.w..][..g.w];
                        let vals = &src[oy * g.ow + lo..oy * g.ow + hi];
                        for (d, v) in in_row[ix0..].iter_mut().zip(vals) {
                            *d += *v;
                        }
                    }
                }
            }
        });
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every (column index, input index) pair the convolution reads, by its definition, in
    /// the order (ci, ky, kx, n, oy, ox): for any input value, taps in (ky, kx) order.
    fn each_read(g: &Geometry, mut f: impl FnMut(usize, usize)) {
        let (p, np) = (g.p(), g.n * g.p());
        for ci in 0..g.c_in {
            for ky in 0..g.kh {
                for kx in 0..g.kw {
                    let k = (ci * g.kh + ky) * g.kw + kx;
                    for n in 0..g.n {
                        for oy in 0..g.oh {
                            for ox in 0..g.ow {
                                let at = |o: usize, kk: usize| {
                                    (o * g.stride + kk * g.dilation).checked_sub(g.padding)
                                };
                                let (Some(iy), Some(ix)) = (at(oy, ky), at(ox, kx)) else {
                                    continue;
                                };
                                if iy < g.h && ix < g.w {
                                    let col = k * np + n * p + oy * g.ow + ox;
                                    f(col, ((n * g.c_in + ci) * g.h + iy) * g.w + ix);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn gathers_and_scatters_equal_the_definition_bit_for_bit() {
        let mut checked = 0;
        // Stride 1 covers the block copies (outputs as wide as the input) and the row copies.
        for stride in 1..4 {
            for (h, w) in [(5, 5), (8, 8), (7, 4), (1, 6)] {
                for k in 1..4 {
                    for padding in 0..k + 1 {
                        for dilation in 1..3 {
                            let cfg = crate::Conv2dConfig {
                                stride,
                                padding,
                                dilation,
                            };
                            // Kernels that do not fit the padded input are not geometries.
                            let Ok(g) = crate::geometry(&[2, 3, h, w], &[1, 3, k, k], cfg) else {
                                continue;
                            };
                            let x: Vec<f32> = (0..g.n * g.c_in * h * w)
                                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.137)
                                .collect();
                            let cols = im2col(&x, &g);
                            let mut want = vec![0f32; cols.len()];
                            each_read(&g, |c, i| want[c] = x[i]);
                            assert_eq!(cols, want, "{g:?}");
                            let dcols: Vec<f32> = cols
                                .iter()
                                .enumerate()
                                .map(|(i, v)| v * 1.3 + i as f32 * 1e-3)
                                .collect();
                            let back = col2im(&dcols, &g);
                            let mut want = vec![0f32; x.len()];
                            each_read(&g, |c, i| want[i] += dcols[c]);
                            assert_eq!(
                                back.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                                "{g:?}"
                            );
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert!(checked > 50, "{checked}");
    }
}
