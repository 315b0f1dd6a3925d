//! Not part of the public API: the numeric kernels and helpers that the crate's own tests,
//! benchmarks and examples reach into. Nothing here is covered by semver; a candle user needs
//! none of it (the supported operations are in [`crate::ops`]).

use std::sync::Arc;

use candle_core::Tensor;

use crate::entries::SpectralEntries;
use crate::error::Result;
use crate::ops::DeltaWeight;

pub use crate::entries::ColumnGroups;
pub use crate::spectral::{fft, forward, phase, portable};

/// f32 products on checked strided views through the `gemm` crate, split by rows across rayon's
/// threads (what the fused CPU ops use; the demo crate's ops use it too).
pub mod gemm {
    pub use crate::ops::gemm::{matmul_into, Mat};
}

/// PEFT's seeded `torch.randperm`: a port of torch's MT19937 and both `randperm` branches.
pub mod torch_rng {
    pub use crate::entries::torch_rng::{randperm_prefix, Mt19937, RANDPERM_SMALL_LIMIT};
}

/// The entries of `entries` grouped by column (the layout the FFT path walks).
pub fn column_groups(entries: &SpectralEntries) -> &ColumnGroups {
    entries.column_groups()
}

/// ΔW through the portable tensor-op path (the one CUDA/Metal use), on whatever device `coeffs`
/// lives, CPU included.
pub fn delta_weight_portable(
    entries: &Arc<SpectralEntries>,
    coeffs: &Tensor,
    scaling: f64,
) -> Result<Tensor> {
    DeltaWeight::new(entries.clone()).forward_portable(coeffs, scaling)
}
