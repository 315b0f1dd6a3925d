//! `x·ΔWᵀ` as a candle op with autograd for `x` and the coefficients, without forming ΔW (CPU).

use super::f32_slice;
use crate::entries::SpectralEntries;
use crate::error::{dims_str, Error, Result};
use crate::spectral::forward;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use std::sync::Arc;

struct SpectralLinear {
    entries: Arc<SpectralEntries>,
    scaling: f64,
}

impl CustomOp2 for SpectralLinear {
    fn name(&self) -> &'static str {
        "fourierft-spectral-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice("input of the spectral forward", xs, xl)?;
        let c = f32_slice("spectral coefficients", cs, cl)?;
        let y = forward::forward(&self.entries, c, self.scaling, x).map_err(Error::into_candle)?;
        let tokens = xl.dims()[0];
        Ok((CpuStorage::F32(y), Shape::from((tokens, self.entries.d1()))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        c: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let need_dx = x.track_op();
        let op = SpectralLinearGrad {
            entries: self.entries.clone(),
            scaling: self.scaling,
            need_dx,
        };
        let packed = x.apply_op3_no_bwd(c, &grad.contiguous()?, &op)?;
        let (dx, dc) = super::unpack_grads(&packed, x, self.entries.len(), need_dx)?;
        Ok((dx, Some(dc)))
    }
}

/// Backward of [`SpectralLinear`]: `(x, c, dL/dy)` → `[dL/dx (flattened, if needed) | dL/dc]`.
struct SpectralLinearGrad {
    entries: Arc<SpectralEntries>,
    scaling: f64,
    need_dx: bool,
}

impl CustomOp3 for SpectralLinearGrad {
    fn name(&self) -> &'static str {
        "fourierft-spectral-linear-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice("input of the spectral forward", xs, xl)?;
        let c = f32_slice("spectral coefficients", cs, cl)?;
        let g = f32_slice("gradient of the spectral forward", gs, gl)?;
        let packed = forward::backward_packed(&self.entries, c, self.scaling, x, g, self.need_dx)
            .map_err(Error::into_candle)?;
        let len = packed.len();
        Ok((CpuStorage::F32(packed), Shape::from(len)))
    }
}

/// `x·ΔWᵀ` for `x` of shape `(tokens, d2)`, f32 on CPU, with ΔW given by `entries`,
/// `coeffs` (f32 `[n]`) and `scaling` — computed in O(d log d) per token without forming ΔW.
/// Differentiable in `x` and `coeffs`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use fourierft::{ops, SpectralEntries};
/// let e = SpectralEntries::uniform(6, 4, 5, 777)?;
/// let c = Tensor::new(&[1f32, -2.0, 0.5, 0.25, 1.5], &Device::Cpu)?;
/// let x = Tensor::new(&[[1f32, 0.0, -1.0, 2.0], [0.5, 0.5, 0.5, 0.5]], &Device::Cpu)?;
/// let y = ops::spectral_linear(&x, &e, &c, 100.0)?;
/// let dense = x.matmul(&ops::delta_weight(&e, &c, 100.0)?.t()?)?;
/// let diff = (y - dense)?.abs()?.max_all()?.to_scalar::<f32>()?;
/// assert!(diff < 1e-4);
/// # Ok::<(), fourierft::Error>(())
/// ```
pub fn spectral_linear(
    x: &Tensor,
    entries: &Arc<SpectralEntries>,
    coeffs: &Tensor,
    scaling: f64,
) -> Result<Tensor> {
    let (d1, d2) = entries.shape();
    let what = || format!("input of the spectral forward of a {d1}x{d2} adapter");
    match x.dims() {
        [_, k] if *k == d2 => {}
        dims => {
            return Err(Error::Shape {
                what: what(),
                expected: format!("(tokens, {d2})"),
                found: dims_str(dims),
            })
        }
    }
    if coeffs.dims() != [entries.len()] {
        return Err(Error::Shape {
            what: "spectral coefficients".into(),
            expected: format!("[{}]", entries.len()),
            found: dims_str(coeffs.dims()),
        });
    }
    if !x.device().is_cpu() {
        return Err(Error::Config(format!(
            "{}: the spectral forward runs on CPU only; use ForwardMode::Dense on {:?}",
            what(),
            x.device().location()
        )));
    }
    if coeffs.track_op() {
        crate::runtime::ensure_training_policy();
    }
    let dtype = x.dtype();
    let x32 = x.to_dtype(DType::F32)?.contiguous()?;
    let c32 = coeffs.to_dtype(DType::F32)?.contiguous()?;
    let op = SpectralLinear {
        entries: entries.clone(),
        scaling,
    };
    Ok(x32.apply_op2(&c32, op)?.to_dtype(dtype)?)
}
