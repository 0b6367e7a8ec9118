//! The convolution's matmuls, straight through the `gemm` crate that candle's own CPU matmul
//! calls. Going direct lets each product choose its operands' order and its output's layout
//! (and skips candle's zero-fill of the output): for the weight gradient that matters, since
//! gemm runs `dY · colsᵀ` written row-major at half the rate of the same product written
//! column-major (measured: `bench-conv`).

use crate::im2col::filled;
use candle_core::WithDType;

/// A strided matrix: element (i, j) is `data[i·rs + j·cs]`.
#[derive(Clone, Copy)]
struct View<'a, T> {
    data: &'a [T],
    rs: usize,
    cs: usize,
}

impl<'a, T> View<'a, T> {
    /// A row-major matrix whose rows are `row_len` apart.
    fn rows(data: &'a [T], row_len: usize) -> Self {
        Self {
            data,
            rs: row_len,
            cs: 1,
        }
    }

    /// The transpose of a row-major matrix whose rows are `row_len` apart.
    fn transposed(data: &'a [T], row_len: usize) -> Self {
        Self {
            data,
            rs: 1,
            cs: row_len,
        }
    }

    /// Panics unless every element of a (rows × cols) matrix lies inside `data`, which makes
    /// the unchecked reads of `gemm` sound.
    fn check(&self, rows: usize, cols: usize) {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * self.rs + (cols - 1) * self.cs;
            assert!(last < self.data.len(), "matrix view out of bounds");
        }
    }
}

/// `dst (m × n) = a (m × k) · b (k × n)`, with `dst` written whole: element (i, j) at
/// `dst[i·rs + j·cs]`, which must be a one-to-one map onto `0..m·n`.
fn product<T: WithDType>(
    m: usize,
    n: usize,
    k: usize,
    a: View<T>,
    b: View<T>,
    rs: usize,
    cs: usize,
) -> Vec<T> {
    assert!(
        (rs, cs) == (n, 1) || (rs, cs) == (1, m),
        "the output must be dense, row- or column-major"
    );
    a.check(m, k);
    b.check(k, n);
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    filled(m * n, |dst| {
        if m * n == 0 {
            return;
        }
        // SAFETY: both views were checked to lie inside their slices; the output is dense
        // (checked above) and `dst` holds m·n values, each written (alpha = 0 and read_dst =
        // false: gemm never reads it).
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.as_mut_ptr().cast::<T>(),
                cs as isize,
                rs as isize,
                false,
                a.data.as_ptr(),
                a.cs as isize,
                a.rs as isize,
                b.data.as_ptr(),
                b.cs as isize,
                b.rs as isize,
                T::zero(),
                T::one(),
                false,
                false,
                false,
                parallelism,
            )
        }
    })
}

/// `w (O, K) · cols (K, N·P)`, row-major (O, N·P).
pub(crate) fn forward<T: WithDType>(
    w: &[T],
    cols: &[T],
    c_out: usize,
    k: usize,
    np: usize,
) -> Vec<T> {
    let w = View::rows(w, k);
    let cols = View::rows(cols, np);
    product(c_out, np, k, w, cols, np, 1)
}

/// The columns' gradient `Wᵀ (K, O) · dY (O, N·P)`, row-major (K, N·P), from w (O, K).
pub(crate) fn cols_grad<T: WithDType>(
    w: &[T],
    dy_rows: &[T],
    c_out: usize,
    k: usize,
    np: usize,
) -> Vec<T> {
    let w_t = View::transposed(w, k);
    let dy = View::rows(dy_rows, np);
    product(k, np, c_out, w_t, dy, np, 1)
}

/// The weight gradient `dY (O, N·P) · colsᵀ`, row-major (O, K). gemm computes it column-major
/// (its fast layout for these shapes); one small transpose makes it row-major.
pub(crate) fn weight_grad<T: WithDType>(
    dy_rows: &[T],
    cols: &[T],
    c_out: usize,
    k: usize,
    np: usize,
) -> Vec<T> {
    let dy = View::rows(dy_rows, np);
    let cols_t = View::transposed(cols, np);
    let by_column = product(c_out, k, np, dy, cols_t, 1, c_out);
    filled(c_out * k, |dst| {
        for (o, row) in dst.chunks_mut(k.max(1)).enumerate() {
            for (j, d) in row.iter_mut().enumerate() {
                d.write(by_column[j * c_out + o]);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, summed in f64.
    fn naive(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|l| a[i * k + l] * b[l * n + j]).sum();
            }
        }
        out
    }

    fn values(len: usize, seed: u64) -> Vec<f64> {
        (0..len as u64)
            .map(|i| ((i * 2654435761 + seed * 97) % 1000) as f64 / 250.0 - 2.0)
            .collect()
    }

    #[test]
    fn the_three_products_equal_the_definition() {
        for (o, k, np) in [
            (1, 1, 1),
            (3, 5, 7),
            (16, 27, 100),
            (64, 9, 33),
            (5, 130, 2),
        ] {
            let (w, cols, dy) = (values(o * k, 1), values(k * np, 2), values(o * np, 3));
            let y = forward(&w, &cols, o, k, np);
            let want = naive(&w, &cols, o, k, np);
            let cols_t: Vec<f64> = (0..np * k).map(|i| cols[(i % k) * np + i / k]).collect();
            let dw = weight_grad(&dy, &cols, o, k, np);
            let w_t: Vec<f64> = (0..k * o).map(|i| w[(i % o) * k + i / o]).collect();
            let dcols = cols_grad(&w, &dy, o, k, np);
            let want_dcols = naive(&w_t, &dy, k, o, np);
            let want_dw = naive(&dy, &cols_t, o, np, k);
            let pairs = y.iter().zip(&want).chain(dw.iter().zip(&want_dw));
            for (got, want) in pairs.chain(dcols.iter().zip(&want_dcols)) {
                assert!(
                    (got - want).abs() <= 1e-12 * want.abs().max(1.0),
                    "{got} vs {want}"
                );
            }
            assert_eq!((y.len(), dw.len(), dcols.len()), (o * np, o * k, k * np));
        }
    }

    #[test]
    #[should_panic(expected = "out of bounds")]
    fn a_view_past_its_slice_is_refused() {
        forward(&[1.0f32; 5], &[1.0; 6], 2, 3, 2);
    }
}
