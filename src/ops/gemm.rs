//! f32 matrix products on CPU through the `gemm` crate (the kernels behind candle's CPU matmul),
//! on checked strided views: the fused ops accumulate into a bias-initialised output and read
//! transposed operands through strides, so no copy, broadcast pass or zero-filled buffer is
//! needed. Not public API: the fused ops use it, and `fourierft::internals::gemm` lends it to the
//! demo crate's ops.

use crate::error::{Error, Result};
use candle_core::Layout;

/// A read-only strided view of an f32 buffer: element `(i, j)` is
/// `data[i·row_stride + j·col_stride]`, checked on construction to stay inside `data`.
#[derive(Clone, Copy, Debug)]
pub struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

/// One past the last index a `rows × cols` view with these strides touches (`None` on overflow).
fn extent(rows: usize, cols: usize, row_stride: usize, col_stride: usize) -> Option<usize> {
    if rows == 0 || cols == 0 {
        return Some(0);
    }
    (rows - 1)
        .checked_mul(row_stride)?
        .checked_add((cols - 1).checked_mul(col_stride)?)?
        .checked_add(1)
}

impl<'a> Mat<'a> {
    /// A contiguous row-major `rows × cols` matrix (`what` names it in errors).
    pub fn new(what: &str, data: &'a [f32], rows: usize, cols: usize) -> Result<Self> {
        Self::strided(what, data, rows, cols, cols, 1)
    }

    /// A strided view: element `(i, j)` at `data[i·row_stride + j·col_stride]`. An
    /// [`Error::Shape`] if it would reach past `data`.
    pub fn strided(
        what: &str,
        data: &'a [f32],
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> Result<Self> {
        match extent(rows, cols, row_stride, col_stride) {
            Some(last) if last <= data.len() => Ok(Self {
                data,
                rows,
                cols,
                row_stride,
                col_stride,
            }),
            _ => Err(Error::Shape {
                what: what.into(),
                expected: format!(
                    "a {rows}x{cols} view with strides ({row_stride}, {col_stride}) inside the data"
                ),
                found: format!("{} values", data.len()),
            }),
        }
    }

    /// The 2-d tensor described by `layout` over its CPU storage `data`.
    pub(crate) fn from_layout(what: &str, data: &'a [f32], layout: &Layout) -> Result<Self> {
        let (dims, stride) = (layout.dims(), layout.stride());
        if dims.len() != 2 {
            return Err(Error::Shape {
                what: what.into(),
                expected: "a matrix".into(),
                found: crate::error::dims_str(dims),
            });
        }
        let data = data.get(layout.start_offset()..).unwrap_or_default();
        Self::strided(what, data, dims[0], dims[1], stride[0], stride[1])
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The transpose (a view; nothing is copied).
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }
}

/// `dst = a·b`, or `dst += a·b` with `accumulate`, where `dst` holds the `a.rows × b.cols`
/// result row-major with `dst_row_stride ≥ b.cols()` values per row (so it can be a column block
/// of a wider matrix), on `threads` of rayon's threads (1: the calling thread).
///
/// The crate's one `unsafe` block (in [`gemm_call`]): the `gemm` crate's entry point takes
/// raw pointers and strides; every extent is checked first.
pub fn matmul_into(
    dst: &mut [f32],
    dst_row_stride: usize,
    a: Mat,
    b: Mat,
    accumulate: bool,
    threads: usize,
) -> Result<()> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let fits = extent(m, n, dst_row_stride, 1).is_some_and(|e| e <= dst.len());
    if b.rows != k || dst_row_stride < n || !fits {
        return Err(Error::Shape {
            what: "matrix product".into(),
            expected: format!("({m}, {k}) · ({k}, {n}) into rows of {dst_row_stride} ≥ {n} values"),
            found: format!("({m}, {k}) · ({}, {n}) into {} values", b.rows, dst.len()),
        });
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            dst.chunks_mut(dst_row_stride)
                .take(m)
                .for_each(|r| r[..n].fill(0.0));
        }
        return Ok(());
    }
    // Split the rows of dst across the threads, each running the kernel single-threaded: the
    // `gemm` crate's own threading leaves some shapes (k = 384, square 384×384 products) on
    // one core of two. Each block re-packs b (O(k·n), against O(m·k·n / threads) of work).
    let blocks = threads.min(m / MIN_ROWS_PER_THREAD).max(1);
    if blocks > 1 {
        use rayon::prelude::*;
        let rows = m.div_ceil(blocks);
        let used = (m * dst_row_stride).min(dst.len());
        return dst[..used]
            .par_chunks_mut(rows * dst_row_stride)
            .enumerate()
            .try_for_each(|(i, d)| {
                let r0 = i * rows;
                let a = Mat {
                    data: a.data.get(r0 * a.row_stride..).unwrap_or_default(),
                    rows: rows.min(m - r0),
                    ..a
                };
                gemm_call(d, dst_row_stride, a, b, accumulate, gemm::Parallelism::None)
            });
    }
    if threads > 1 && k * n >= MIN_TRANSPOSED_KN && n >= threads * MIN_ROWS_PER_THREAD {
        return few_rows(dst, dst_row_stride, a, b, accumulate, threads);
    }
    // Too few rows to share: the kernel's own threading (over columns).
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    gemm_call(dst, dst_row_stride, a, b, accumulate, parallelism)
}

/// Below this many rows per thread the rows are not split (the kernel's own threading runs).
const MIN_ROWS_PER_THREAD: usize = 64;

/// From this many `b` values on, a product with too few rows to split goes through
/// [`few_rows`] (a 512×512 `b`: 1 MiB).
const MIN_TRANSPOSED_KN: usize = 512 * 512;

/// `dst (+)= a·b` for a few rows and a large `b` (a layer's forward on a short sequence:
/// `x·Wᵀ`): the `gemm` kernel packs its left operand, and for a row-major destination it swaps
/// the operands so that the large matrix becomes the one packed, with a transposition — on 2
/// threads a 64×4096 by 4096×4096 product ran at 50 GFLOP/s. Computing `(a·b)ᵀ = bᵀ·aᵀ` into a
/// column-major scratch instead keeps `a` on the packed side: the columns of the result are
/// split across the threads (each block single-threaded) and the small result is transposed
/// into `dst` (155 GFLOP/s on the same product, the transposition included).
fn few_rows(
    dst: &mut [f32],
    dst_row_stride: usize,
    a: Mat,
    b: Mat,
    accumulate: bool,
    threads: usize,
) -> Result<()> {
    use rayon::prelude::*;
    let (m, n) = (a.rows, b.cols);
    // scratch[j·m + i] = (a·b)[i][j]: block `c` holds columns c·cols.. of the product.
    let mut scratch = vec![0f32; m * n];
    let cols = n.div_ceil(threads);
    scratch
        .par_chunks_mut(cols * m)
        .enumerate()
        .try_for_each(|(c, block)| {
            let c0 = c * cols;
            let width = cols.min(n - c0);
            // (b[:, c0..])ᵀ · aᵀ, row-major width × m, is the column block written column-major.
            let bt = Mat {
                data: b.data.get(c0 * b.col_stride..).unwrap_or_default(),
                cols: width,
                ..b
            }
            .t();
            gemm_call(block, m, bt, a.t(), false, gemm::Parallelism::None)
        })?;
    // Transpose into dst, 16 destination rows at a time: each scratch row read is one cache line.
    const ROWS: usize = 16;
    let used = (m.saturating_sub(1) * dst_row_stride + n).min(dst.len());
    dst[..used]
        .par_chunks_mut(ROWS * dst_row_stride)
        .enumerate()
        .for_each(|(blk, rows)| {
            let i0 = blk * ROWS;
            let count = ROWS.min(m - i0);
            for (j, src) in scratch.chunks_exact(m).enumerate() {
                for (r, v) in src[i0..i0 + count].iter().enumerate() {
                    if let Some(d) = rows.get_mut(r * dst_row_stride + j) {
                        *d = if accumulate { *d + v } else { *v };
                    }
                }
            }
        });
    Ok(())
}

/// The `gemm` crate's kernel, for operands checked by [`matmul_into`] (or a row block of them,
/// checked again here).
#[allow(unsafe_code)]
fn gemm_call(
    dst: &mut [f32],
    dst_row_stride: usize,
    a: Mat,
    b: Mat,
    accumulate: bool,
    parallelism: gemm::Parallelism,
) -> Result<()> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let fits = extent(m, n, dst_row_stride, 1).is_some_and(|e| e <= dst.len())
        && extent(m, k, a.row_stride, a.col_stride).is_some_and(|e| e <= a.data.len())
        && extent(k, n, b.row_stride, b.col_stride).is_some_and(|e| e <= b.data.len());
    if !fits || b.rows != k {
        return Err(Error::Shape {
            what: "matrix product (row block)".into(),
            expected: format!("({m}, {k}) · ({k}, {n}) inside the buffers"),
            found: format!("{} / {} / {} values", a.data.len(), b.data.len(), dst.len()),
        });
    }
    // SAFETY: every index the kernel touches — (i, j) < (m, n) at i·dst_row_stride + j in dst,
    // and the views' extents in a and b — was checked above or in `Mat::strided` against the
    // slice lengths; dst is borrowed mutably and so aliases neither a nor b.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_row_stride as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

/// [`matmul_into`] into a contiguous `dst` on all of rayon's threads. (rayon's pool size:
/// candle's `get_num_threads` would re-read /proc/cpuinfo on every call unless
/// RAYON_NUM_THREADS is set.)
pub(crate) fn par_matmul_into(dst: &mut [f32], a: Mat, b: Mat, accumulate: bool) -> Result<()> {
    let n = b.cols;
    matmul_into(dst, n, a, b, accumulate, rayon::current_num_threads())
}

/// `x·wᵀ + bias` for `x` `(tokens, in)` and `w` `(out, in)`: the bias is written first and the
/// product accumulated onto it.
pub(crate) fn linear(x: Mat, w: Mat, bias: &[f32]) -> Result<Vec<f32>> {
    let (tokens, out) = (x.rows, w.rows);
    if bias.len() != out {
        return Err(Error::Shape {
            what: "bias".into(),
            expected: format!("[{out}]"),
            found: format!("[{}]", bias.len()),
        });
    }
    let mut y = bias.repeat(tokens);
    par_matmul_into(&mut y, x, w.t(), true)?;
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|l| a[i * k + l] * b[l * n + j]).sum();
            }
        }
        c
    }

    #[test]
    fn products_with_transposed_views_and_bias() -> Result<()> {
        let (m, k, n) = (7, 5, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        let want = naive(&a, &b, m, k, n);
        let mut got = vec![0f32; m * n];
        matmul_into(
            &mut got,
            n,
            Mat::new("a", &a, m, k)?,
            Mat::new("b", &b, k, n)?,
            false,
            2,
        )?;
        assert!(got.iter().zip(&want).all(|(g, w)| (g - w).abs() < 1e-5));
        // (bᵀ)ᵀ through a view: the linear layer's form, with a bias.
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        let bias = [1.0f32, -2.0, 0.5];
        let y = linear(Mat::new("x", &a, m, k)?, Mat::new("w", &bt, n, k)?, &bias)?;
        for (i, (g, w)) in y.iter().zip(&want).enumerate() {
            assert!((g - (w + bias[i % n])).abs() < 1e-5);
        }
        Ok(())
    }

    #[test]
    fn row_blocks_on_several_threads_equal_the_product() -> Result<()> {
        // m large enough to split (2 and 3 blocks, uneven), a transposed `a`, accumulation into
        // a column block of a wider destination whose last row is short.
        for (m, threads) in [(131, 2), (200, 3), (64, 2)] {
            let (k, n, stride) = (9, 5, 8);
            let at: Vec<f32> = (0..k * m).map(|i| (i as f32 * 0.23).sin()).collect();
            let a: Vec<f32> = (0..m * k).map(|i| at[(i % k) * m + i / k]).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.71).cos()).collect();
            let want = naive(&a, &b, m, k, n);
            let mut dst: Vec<f32> = (0..(m - 1) * stride + n).map(|i| i as f32).collect();
            let before = dst.clone();
            let a_view = Mat::new("at", &at, k, m)?.t();
            matmul_into(
                &mut dst,
                stride,
                a_view,
                Mat::new("b", &b, k, n)?,
                true,
                threads,
            )?;
            for i in 0..m {
                for j in 0..stride.min(dst.len() - i * stride) {
                    let (g, b0) = (dst[i * stride + j], before[i * stride + j]);
                    if j < n {
                        assert!((g - b0 - want[i * n + j]).abs() < 1e-4, "m={m} ({i},{j})");
                    } else {
                        assert_eq!(g, b0, "m={m}: column {j} outside the block was written");
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn few_rows_by_a_large_matrix_equal_the_product() -> Result<()> {
        // The transposed path: too few rows to split (37 and 64 on 2 threads, 100 on 3), a `b`
        // large enough, a transposed `a` view, accumulation into a column block of a wider
        // destination whose last row is short, and an odd column count split unevenly.
        for (m, k, n, threads) in [(37, 700, 801, 2), (64, 512, 512, 2), (100, 600, 700, 3)] {
            let stride = n + 3;
            let at: Vec<f32> = (0..k * m).map(|i| (i as f32 * 0.013).sin()).collect();
            let a: Vec<f32> = (0..m * k).map(|i| at[(i % k) * m + i / k]).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.0071).cos()).collect();
            let want = naive(&a, &b, m, k, n);
            // Through matmul_into's dispatch and through the path itself.
            for (accumulate, direct) in [(false, false), (true, false), (false, true), (true, true)]
            {
                let mut dst: Vec<f32> = (0..(m - 1) * stride + n).map(|i| i as f32).collect();
                let before = dst.clone();
                let a_view = Mat::new("at", &at, k, m)?.t();
                let b_view = Mat::new("b", &b, k, n)?;
                if direct {
                    few_rows(&mut dst, stride, a_view, b_view, accumulate, threads)?;
                } else {
                    matmul_into(&mut dst, stride, a_view, b_view, accumulate, threads)?;
                }
                for i in 0..m {
                    for j in 0..stride.min(dst.len() - i * stride) {
                        let (g, b0) = (dst[i * stride + j], before[i * stride + j]);
                        if j < n {
                            let w = want[i * n + j] + if accumulate { b0 } else { 0.0 };
                            assert!((g - w).abs() < 1e-3 * (1.0 + w.abs()), "m={m} ({i},{j})");
                        } else {
                            assert_eq!(g, b0, "m={m}: column {j} outside the block was written");
                        }
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn out_of_bounds_views_are_errors() {
        assert!(Mat::new("short", &[0.0; 5], 2, 3).is_err());
        let mut dst = vec![0f32; 4];
        let a = [0f32; 6];
        let r = matmul_into(
            &mut dst,
            2,
            Mat::new("a", &a, 2, 3).unwrap(),
            Mat::new("b", &a, 2, 3).unwrap(),
            false,
            1,
        );
        assert!(r.is_err());
        // Strides whose extent overflows, and a destination row stride narrower than a row.
        assert!(Mat::strided("huge", &a, 2, 2, usize::MAX, 1).is_err());
        let sq = Mat::new("a", &a[..4], 2, 2).unwrap();
        assert!(matmul_into(&mut dst, 1, sq, sq, false, 1).is_err());
    }
}
