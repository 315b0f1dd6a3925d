//! f32 matrix products for the demo's ops: the library's checked strided views and `gemm` calls
//! (`fourierft::internals::gemm`, split by rows across rayon's threads), so that attention reads
//! each head of the `(b, s, h)` tensors in place (no head split or merge copies) and the fused
//! sub-blocks accumulate onto a bias-initialised output.

use candle_core::Result;
use fourierft::internals::gemm::matmul_into;
pub(crate) use fourierft::internals::gemm::Mat;
use fourierft::Error;

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
    .map_err(Error::into_candle)
}

/// `dst = a·b` on the calling thread, `dst_rs` values per row of `dst`: attention's per-head
/// products are small, so the op parallelises over sequences instead.
pub(crate) fn head_gemm(dst: &mut [f32], dst_rs: usize, a: Mat, b: Mat) -> Result<()> {
    matmul_into(dst, dst_rs, a, b, false, 1).map_err(Error::into_candle)
}

/// `dst += a·b` for contiguous `a` `(m, k)`, on all rayon threads.
pub(crate) fn par_gemm_acc(dst: &mut [f32], a: &[f32], m: usize, k: usize, b: Mat) -> Result<()> {
    let a = Mat::new("operand", a, m, k).map_err(Error::into_candle)?;
    matmul_into(dst, b.cols(), a, b, true, rayon::current_num_threads()).map_err(Error::into_candle)
}
