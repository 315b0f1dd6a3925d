//! ΔW as a differentiable candle operation, dispatched by device.

use super::f32_slice;
use crate::entries::SpectralEntries;
use crate::error::{dims_str, Error, Result};
use crate::spectral::{fft, portable::PortableBasis};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use std::sync::Arc;

/// Forward: coefficients `[n]` → ΔW `(d1, d2)` via the pruned real FFT.
struct DeltaWeightFft {
    entries: Arc<SpectralEntries>,
    scaling: f64,
}

impl CustomOp1 for DeltaWeightFft {
    fn name(&self) -> &'static str {
        "fourierft-delta-weight"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let c = f32_slice("spectral coefficients", storage, layout)?;
        let dw = fft::delta_weight(&self.entries, c, self.scaling).map_err(Error::into_candle)?;
        Ok((CpuStorage::F32(dw), Shape::from(self.entries.shape())))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let op = DeltaWeightFftGrad {
            entries: self.entries.clone(),
            scaling: self.scaling,
        };
        Ok(Some(grad_res.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

/// Backward: dL/dΔW `(d1, d2)` → dL/dc `[n]`.
struct DeltaWeightFftGrad {
    entries: Arc<SpectralEntries>,
    scaling: f64,
}

impl CustomOp1 for DeltaWeightFftGrad {
    fn name(&self) -> &'static str {
        "fourierft-delta-weight-grad"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = f32_slice("gradient of ΔW", storage, layout)?;
        let dc =
            fft::delta_weight_grad(&self.entries, g, self.scaling).map_err(Error::into_candle)?;
        Ok((CpuStorage::F32(dc), Shape::from(self.entries.len())))
    }
}

/// `weight + ΔW` for an f32 `(d1, d2)` CPU weight, in one pass (no gradient).
struct AddDeltaWeightFft {
    entries: Arc<SpectralEntries>,
    coeffs: Vec<f32>,
    scaling: f64,
}

impl CustomOp1 for AddDeltaWeightFft {
    fn name(&self) -> &'static str {
        "fourierft-add-delta-weight"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = f32_slice("weight", storage, layout)?;
        let out = fft::add_delta_weight(&self.entries, &self.coeffs, self.scaling, w)
            .map_err(Error::into_candle)?;
        Ok((CpuStorage::F32(out), Shape::from(self.entries.shape())))
    }
}

/// ΔW for one entry set, dispatched by device: the pruned real FFT op on CPU, the portable
/// tensor-op path (with bases built once and shared) on CUDA and Metal.
///
/// Both directions are differentiable in the coefficients. The output is f32 `(d1, d2)`:
/// `ΔW[j,k] = scaling/(d1·d2) · Σ_l c_l cos(2π(u_l j/d1 + v_l k/d2))`.
#[derive(Debug, Clone)]
pub struct DeltaWeight {
    entries: Arc<SpectralEntries>,
}

impl DeltaWeight {
    /// The operation for these entries.
    pub fn new(entries: Arc<SpectralEntries>) -> Self {
        Self { entries }
    }

    /// The entries.
    pub fn entries(&self) -> &Arc<SpectralEntries> {
        &self.entries
    }

    /// ΔW for coefficients `coeffs` (f32, shape `[n]`) and scale `scaling`.
    pub fn forward(&self, coeffs: &Tensor, scaling: f64) -> Result<Tensor> {
        let n = self.entries.len();
        if coeffs.dims() != [n] {
            return Err(Error::Shape {
                what: format!(
                    "spectral coefficients of a {}x{} adapter",
                    self.entries.d1(),
                    self.entries.d2()
                ),
                expected: format!("[{n}]"),
                found: dims_str(coeffs.dims()),
            });
        }
        if coeffs.dtype() != DType::F32 {
            return Err(Error::DType {
                what: "spectral coefficients".into(),
                expected: "F32".into(),
                found: coeffs.dtype(),
            });
        }
        if coeffs.device().is_cpu() {
            if coeffs.track_op() {
                crate::runtime::ensure_training_policy();
            }
            let op = DeltaWeightFft {
                entries: self.entries.clone(),
                scaling,
            };
            Ok(coeffs.contiguous()?.apply_op1(op)?)
        } else {
            self.forward_portable(coeffs, scaling)
        }
    }

    /// `weight + ΔW` outside the autograd graph, for `weight` of shape `(d1, d2)`: one fused pass
    /// for f32 weights on CPU; otherwise ΔW is added in f32 (f64 for f64 weights) and cast back to
    /// the weight's dtype once.
    pub fn add_to(&self, weight: &Tensor, coeffs: &Tensor, scaling: f64) -> Result<Tensor> {
        let shape = self.entries.shape();
        if weight.dims() != [shape.0, shape.1] {
            return Err(Error::Shape {
                what: "weight to merge into".into(),
                expected: format!("[{}, {}]", shape.0, shape.1),
                found: dims_str(weight.dims()),
            });
        }
        if weight.device().is_cpu() && weight.dtype() == DType::F32 {
            let coeffs = coeffs.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            let op = AddDeltaWeightFft {
                entries: self.entries.clone(),
                coeffs,
                scaling,
            };
            return Ok(weight.detach().contiguous()?.apply_op1_no_bwd(&op)?);
        }
        let dw = self.forward(&coeffs.detach(), scaling)?;
        crate::ops::add_to_frozen(&dw, weight)
    }

    /// ΔW through the portable tensor-op path, on whatever device `coeffs` lives (CPU included).
    pub(crate) fn forward_portable(&self, coeffs: &Tensor, scaling: f64) -> Result<Tensor> {
        PortableBasis::shared(&self.entries, coeffs.device())?.delta_weight(coeffs, scaling)
    }
}

/// ΔW for `entries`, coefficients `coeffs` (f32 `[n]`) and scale `scaling`, differentiable in
/// `coeffs`; see [`DeltaWeight`].
///
/// ```
/// use candle_core::{Device, Tensor};
/// use fourierft::{ops::delta_weight, SpectralEntries};
/// let entries = SpectralEntries::uniform(6, 5, 4, 777)?;
/// let c = Tensor::new(&[1f32, -0.5, 0.25, 2.0], &Device::Cpu)?;
/// let dw = delta_weight(&entries, &c, 150.0)?;
/// assert_eq!(dw.dims(), &[6, 5]);
/// # Ok::<(), fourierft::Error>(())
/// ```
pub fn delta_weight(
    entries: &Arc<SpectralEntries>,
    coeffs: &Tensor,
    scaling: f64,
) -> Result<Tensor> {
    DeltaWeight::new(entries.clone()).forward(coeffs, scaling)
}
