//! Half-precision (f16, bf16) layers: the adapter's contribution is never rounded against W0.
//!
//! Forming `W0 + ΔW` in bf16 rounds ΔW to W0's exponent: an update below half a bf16 ulp of a
//! weight (|ΔW| ≲ 2⁻⁹·|W0|, the normal case early in training or with a small `scaling`) drops
//! out of the forward pass while its gradient still flows. Instead, as PEFT does, the base output
//! `x·W0ᵀ + b` is computed and rounded to the half dtype once, the contribution `x·ΔWᵀ` is computed
//! in f32 from the f32 spectrum, and their sum is rounded once:
//!
//! ```text
//! y = half( f32(half(x·W0ᵀ + b)) + f32(x)·ΔWᵀ )
//! ```
//!
//! so `y − y_base` carries the adapter to within half an ulp of `y`. Cost: the contribution is a
//! second f32 GEMM (`tokens·d1·d2`, or the O(d log d) spectral product on CPU) instead of one GEMM
//! with `W0 + ΔW`. `merge()` still stores `half(W0 + ΔW)`, as PEFT's merge does.

use crate::error::Result;
use candle_core::{DType, Tensor};

/// f16 or bf16: the dtypes whose layers take the adapter's contribution in f32.
pub(crate) fn is_half(dtype: DType) -> bool {
    matches!(dtype, DType::F16 | DType::BF16)
}

/// `base + Σ contributions` summed in f32 and rounded once to `base`'s dtype; `contributions`
/// are f32 tensors shaped like `base`.
pub(crate) fn add_in_f32(
    base: &Tensor,
    contributions: impl IntoIterator<Item = Result<Tensor>>,
) -> Result<Tensor> {
    let mut acc = base.to_dtype(DType::F32)?;
    for c in contributions {
        acc = (acc + c?.to_dtype(DType::F32)?)?;
    }
    Ok(acc.to_dtype(base.dtype())?)
}
