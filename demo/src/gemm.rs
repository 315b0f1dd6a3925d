//! f32 matrix products through the `gemm` crate (the kernels behind candle's CPU matmul) on
//! checked strided views, so that attention reads each head of the `(b, s, h)` tensors in place
//! (no head split or merge copies) and the fused sub-blocks accumulate onto a bias-initialised
//! output.

use candle_core::{bail, Result};

/// A read-only strided view of an f32 buffer: element `(i, j)` is
/// `data[i·row_stride + j·col_stride]`, checked on construction to stay inside `data`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Mat<'a> {
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
    pub(crate) fn new(what: &str, data: &'a [f32], rows: usize, cols: usize) -> Result<Self> {
        Self::strided(what, data, rows, cols, cols, 1)
    }

    /// A strided view: element `(i, j)` at `data[i·row_stride + j·col_stride]`; an error if it
    /// would reach past `data`.
    fn strided(
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
            _ => bail!(
                "{what}: a {rows}x{cols} view with strides ({row_stride}, {col_stride}) does not \
                 fit in {} values",
                data.len()
            ),
        }
    }

    /// The transpose (a view; nothing is copied).
    pub(crate) fn t(self) -> Self {
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
/// result row-major with `dst_row_stride ≥ b.cols` values per row (so it can be a column block
/// of a wider matrix), on `threads` of rayon's threads (1: the calling thread).
fn matmul_into(
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
        bail!(
            "matrix product: ({m}, {k}) · ({}, {n}) into {} values with rows of {dst_row_stride}",
            b.rows,
            dst.len()
        );
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
    // Split the rows of dst across the threads, each running the single-threaded kernel: on
    // two cores this keeps both busy for every shape here, where the kernel's own threading
    // leaves some shapes (k = 384) on one core. Each block re-packs b (O(k·n), against
    // O(m·k·n / threads) of work).
    let blocks = threads.min(m / MIN_ROWS_PER_THREAD).max(1);
    if blocks > 1 {
        let rows = m.div_ceil(blocks);
        use rayon::prelude::*;
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
    // Too few rows to share: the kernel's own threading (over columns).
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    gemm_call(dst, dst_row_stride, a, b, accumulate, parallelism)
}

/// Below this many rows per thread, one thread does the product.
const MIN_ROWS_PER_THREAD: usize = 64;

/// The `gemm` crate's kernel, for operands already checked by [`matmul_into`] (or a row block
/// of them, checked again here).
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
        && extent(m, k, a.row_stride, a.col_stride).is_some_and(|e| e <= a.data.len());
    if !fits {
        bail!("matrix product: a row block does not fit its buffers");
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

/// Rows `[0, rows)` × columns `[col, col + cols)` of a row-major matrix with `stride` values per
/// row (one head of a `(s, h)` slab, or a whole `(s, s)` matrix), as a checked view.
pub(crate) fn block(
    data: &[f32],
    rows: usize,
    stride: usize,
    col: usize,
    cols: usize,
) -> Result<Mat<'_>> {
    Mat::strided(
        "matrix block",
        data.get(col..).unwrap_or_default(),
        rows,
        cols,
        stride,
        1,
    )
}

/// `dst = a·b` on the calling thread, `dst_rs` values per row of `dst`: attention's per-head
/// products are small, so the op parallelises over sequences instead.
pub(crate) fn head_gemm(dst: &mut [f32], dst_rs: usize, a: Mat, b: Mat) -> Result<()> {
    matmul_into(dst, dst_rs, a, b, false, 1)
}

/// `dst += a·b` for contiguous `a` `(m, k)`, on all rayon threads.
pub(crate) fn par_gemm_acc(dst: &mut [f32], a: &[f32], m: usize, k: usize, b: Mat) -> Result<()> {
    let a = Mat::new("operand", a, m, k)?;
    matmul_into(dst, b.cols, a, b, true, rayon::current_num_threads())
}
