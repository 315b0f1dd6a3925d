//! Access to the f32 data of CPU tensors and custom-op arguments.

use anyhow::{bail, Context, Result};
use candle_core::{CpuStorage, Layout, Tensor};

/// Borrows the f32 data of a contiguous CPU tensor and calls `f` on it.
pub(crate) fn with_f32<T>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<T>) -> Result<T> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
        bail!("the demo's custom ops need f32 tensors on the CPU");
    };
    let (start, end) = layout
        .contiguous_offsets()
        .context("contiguous tensor expected")?;
    f(&data[start..end])
}

pub(crate) fn cpu_f32<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else {
        candle_core::bail!("{what}: f32 input expected")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what}: contiguous input expected"),
    }
}

pub(crate) fn to_candle(e: anyhow::Error) -> candle_core::Error {
    candle_core::Error::Msg(format!("{e:#}"))
}

/// Block `i` of length `len` of `t`.
pub(crate) fn slab(t: &[f32], i: usize, len: usize) -> &[f32] {
    &t[i * len..(i + 1) * len]
}

/// `t` with dims `dims`, and `t` itself — no graph node — when it already has them (candle's
/// `reshape` always records one, whose backward zero-fills and accumulates a gradient copy).
pub(crate) fn reshaped(t: &Tensor, dims: &[usize]) -> candle_core::Result<Tensor> {
    if t.dims() == dims {
        Ok(t.clone())
    } else {
        t.reshape(dims)
    }
}

/// `t` as a `(rows, last dim)` matrix ([`reshaped`]).
pub(crate) fn as_rows(t: &Tensor) -> candle_core::Result<Tensor> {
    let last = t.dim(candle_core::D::Minus1)?;
    reshaped(t, &[t.elem_count() / last.max(1), last])
}
