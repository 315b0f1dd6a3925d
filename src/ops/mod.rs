//! candle operations with autograd: ΔW from the coefficients ([`delta_weight`]), the adapted
//! layer's forward in one op ([`fourier_linear`]), the spectral product `x·ΔWᵀ` that never forms
//! ΔW ([`spectral_linear`]), and operations on a frozen weight whose backward skips it
//! ([`frozen_linear`], [`add_to_frozen`]). A crate-private checked strided f32 GEMM (`gemm`) runs
//! under the fused ops.
//!
//! Argument order: the input first (`x`), then the layer's tensors, then the adapter's entries,
//! coefficients and `scaling` (PEFT's name for α in the paper).

mod delta_weight;
mod fourier_linear;
mod frozen;
pub(crate) mod gemm;
pub(crate) mod half;
mod spectral_linear;

pub use delta_weight::{delta_weight, DeltaWeight};
pub use fourier_linear::fourier_linear;
pub use frozen::{add_to_frozen, frozen_linear};
pub use spectral_linear::spectral_linear;

use crate::error::Error;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Tensor};

/// Borrows the contiguous f32 data of a CPU custom-op argument.
/// `t` with dims `dims`, and `t` itself — no graph node — when it already has them. candle's
/// `reshape` always records a node, and its backward zero-fills a gradient buffer for the input
/// and adds the reshaped gradient into it: two passes over the activation for nothing.
pub(crate) fn reshaped(t: &Tensor, dims: &[usize]) -> candle_core::Result<Tensor> {
    if t.dims() == dims {
        Ok(t.clone())
    } else {
        t.reshape(dims)
    }
}

pub(crate) fn f32_slice<'a>(
    what: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> candle_core::Result<&'a [f32]> {
    let dtype = storage.dtype();
    let data = storage.as_slice::<f32>().map_err(|_| {
        Error::DType {
            what: what.into(),
            expected: "F32".into(),
            found: dtype,
        }
        .into_candle()
    })?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => Err(candle_core::Error::msg(format!(
            "fourierft: {what} must be contiguous"
        ))),
    }
}

/// Splits a backward op's packed output `[dL/dx flattened (if `need_dx`) | dL/dc (n values)]`
/// into `dL/dx` shaped like the 2-d input `x` and `dL/dc`.
pub(crate) fn unpack_grads(
    packed: &candle_core::Tensor,
    x: &candle_core::Tensor,
    n: usize,
    need_dx: bool,
) -> candle_core::Result<(Option<candle_core::Tensor>, candle_core::Tensor)> {
    let (tokens, d2) = x.dims2()?;
    let dx = if need_dx {
        Some(packed.narrow(0, 0, tokens * d2)?.reshape((tokens, d2))?)
    } else {
        None
    };
    let dc = packed.narrow(0, packed.dim(0)? - n, n)?;
    Ok((dx, dc))
}
