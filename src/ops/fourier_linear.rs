//! The adapted layer's training forward `x·(W0 + ΔW)ᵀ + b` as one op, with autograd for `x`
//! and the coefficients.
//!
//! On CPU in f32, `W0 + ΔW` is built in one fused pass (no ΔW buffer), the bias is the GEMM's
//! initial output, and the backward forms only `dL/dx = g·(W0 + ΔW)` (one GEMM) and `dL/dc`
//! from per-token spectra of `x` and `g` ([`coeff_grad`](crate::spectral::forward::coeff_grad)),
//! never the `d1×d2` weight gradient `gᵀ·x`. Composed of candle ops the
//! same layer would also store `W0 + ΔW` and ΔW as graph nodes, add the bias in a separate pass
//! and run candle's per-node gradient bookkeeping over each of them.

use super::gemm::{self, Mat};
use super::{add_to_frozen, delta_weight, f32_slice, frozen_linear, half};
use crate::entries::SpectralEntries;
use crate::error::{dims_str, Error, Result};
use crate::spectral::plans::{self, Pooled};
use crate::spectral::{fft, forward};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use std::sync::{Arc, OnceLock};

struct FourierLinearCpu {
    entries: Arc<SpectralEntries>,
    scaling: f64,
    /// The bias (zeros for none).
    bias: Vec<f32>,
    /// `W0 + ΔW` `(d1, d2)` from the forward, for the backward: a pooled workspace, returned to
    /// the pool when the graph is dropped and reused by the next step's forward.
    adapted: OnceLock<Arc<Pooled<f32>>>,
}

impl CustomOp3 for FourierLinearCpu {
    fn name(&self) -> &'static str {
        "fourierft-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (d1, d2) = self.entries.shape();
        let x = f32_slice("input of a FourierFT layer", xs, xl)?;
        let c = f32_slice("spectral coefficients", cs, cl)?;
        let w0 = f32_slice("frozen weight", ws, wl)?;
        let mut adapted = plans::pooled_overwrite::<f32>(d1 * d2);
        fft::add_delta_weight_into(&self.entries, c, self.scaling, w0, &mut adapted)
            .map_err(Error::into_candle)?;
        let tokens = xl.dims()[0];
        let y = Mat::new("input of a FourierFT layer", x, tokens, d2)
            .and_then(|x| {
                let w = Mat::new("adapted weight", &adapted, d1, d2)?;
                gemm::linear(x, w, &self.bias)
            })
            .map_err(Error::into_candle)?;
        // Set once: each call of `fourier_linear` makes a fresh op.
        let _ = self.adapted.set(Arc::new(adapted));
        Ok((CpuStorage::F32(y), Shape::from((tokens, d1))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _c: &Tensor,
        _w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let adapted = self
            .adapted
            .get()
            .cloned()
            .ok_or_else(|| candle_core::Error::msg("fourierft: backward before forward"))?;
        let need_dx = x.track_op();
        let op = FourierLinearGrad {
            entries: self.entries.clone(),
            scaling: self.scaling,
            adapted,
            need_dx,
        };
        let packed = x.apply_op2_no_bwd(&grad.contiguous()?, &op)?;
        let (dx, dc) = super::unpack_grads(&packed, x, self.entries.len(), need_dx)?;
        Ok((dx, Some(dc), None))
    }
}

/// Backward of [`FourierLinearCpu`]: `(x, dL/dy)` → `[dL/dx (flattened, if needed) | dL/dc]`.
struct FourierLinearGrad {
    entries: Arc<SpectralEntries>,
    scaling: f64,
    adapted: Arc<Pooled<f32>>,
    need_dx: bool,
}

impl CustomOp2 for FourierLinearGrad {
    fn name(&self) -> &'static str {
        "fourierft-linear-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (d1, d2) = self.entries.shape();
        let tokens = xl.dims()[0];
        let x = f32_slice("input of a FourierFT layer", xs, xl)?;
        let g = f32_slice("gradient of a FourierFT layer", gs, gl)?;
        let (x_all, g_all) = (x, g);
        let run = || -> Result<Vec<f32>> {
            let g = Mat::new("gradient of a FourierFT layer", g, tokens, d1)?;
            // Sized for both parts at once, so appending dL/dc never reallocates.
            let dx_len = if self.need_dx { tokens * d2 } else { 0 };
            let mut packed = Vec::with_capacity(dx_len + self.entries.len());
            packed.resize(dx_len, 0f32);
            if self.need_dx {
                let w = Mat::new("adapted weight", &self.adapted, d1, d2)?;
                gemm::par_matmul_into(&mut packed, g, w, false)?;
            }
            // dL/dc straight from per-token spectra: no d1×d2 gradient gᵀ·x.
            packed.extend_from_slice(&forward::coeff_grad(
                &self.entries,
                self.scaling,
                x_all,
                g_all,
            )?);
            Ok(packed)
        };
        let packed = run().map_err(Error::into_candle)?;
        let len = packed.len();
        Ok((CpuStorage::F32(packed), Shape::from(len)))
    }
}

/// `x·(W0 + ΔW)ᵀ + b` for `x` `(tokens, d2)`, a frozen `weight` W0 `(d1, d2)` and `bias` `[d1]`,
/// with ΔW given by `entries`, `coeffs` (f32 `[n]`) and `scaling`: differentiable in `x` and
/// `coeffs` only (nothing weight-sized is kept for W0 or the bias).
///
/// On CPU with f32 operands this is one fused op (see the module docs); elsewhere it is composed
/// of [`delta_weight`], [`add_to_frozen`] and a matmul. With an f16/bf16 `weight` the adapter's
/// contribution `x·ΔWᵀ` is computed in f32 and added to the rounded base output, as PEFT does, so
/// an update smaller than W0's rounding still reaches the output. This is [`FourierLinear`]'s unmerged
/// dense forward with one active adapter.
///
/// [`FourierLinear`]: crate::FourierLinear
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use fourierft::{ops, SpectralEntries};
/// let dev = Device::Cpu;
/// let e = SpectralEntries::uniform(3, 4, 5, 777)?;
/// let w0 = Tensor::randn(0f32, 1.0, (3, 4), &dev)?;
/// let b = Tensor::new(&[0.5f32, -1.0, 2.0], &dev)?;
/// let c = Var::new(&[1f32, -2.0, 0.5, 0.25, 1.5], &dev)?;
/// let x = Tensor::randn(0f32, 1.0, (2, 4), &dev)?;
/// let y = ops::fourier_linear(&x, &w0, Some(&b), &e, c.as_tensor(), 10.0)?;
/// let w = (w0 + ops::delta_weight(&e, c.as_tensor(), 10.0)?)?;
/// let want = x.matmul(&w.t()?)?.broadcast_add(&b)?;
/// assert!((y.clone() - want)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-4);
/// let grads = y.sum_all()?.backward()?;
/// assert_eq!(grads.get(c.as_tensor()).unwrap().dims(), &[5]);
/// # Ok::<(), fourierft::Error>(())
/// ```
pub fn fourier_linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    entries: &Arc<SpectralEntries>,
    coeffs: &Tensor,
    scaling: f64,
) -> Result<Tensor> {
    let (d1, d2) = entries.shape();
    let what = |t: &str| format!("{t} of a {d1}x{d2} FourierFT layer");
    let check = |name: &str, dims: &[usize], ok: bool, expected: String| {
        if ok {
            Ok(())
        } else {
            Err(Error::Shape {
                what: what(name),
                expected,
                found: dims_str(dims),
            })
        }
    };
    check(
        "input",
        x.dims(),
        matches!(x.dims(), [_, k] if *k == d2),
        format!("(tokens, {d2})"),
    )?;
    check(
        "weight",
        weight.dims(),
        weight.dims() == [d1, d2],
        format!("[{d1}, {d2}]"),
    )?;
    if let Some(b) = bias {
        check("bias", b.dims(), b.dims() == [d1], format!("[{d1}]"))?;
    }
    check(
        "spectral coefficients",
        coeffs.dims(),
        coeffs.dims() == [entries.len()],
        format!("[{}]", entries.len()),
    )?;
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if half::is_half(weight.dtype()) {
        // The contribution in f32, added to the rounded base output (see `ops::half`).
        let base = frozen_linear(x, weight, bias)?;
        let dw = delta_weight(entries, coeffs, scaling)?.to_device(weight.device())?;
        let contribution = x.to_dtype(DType::F32)?.matmul(&dw.t()?);
        return half::add_in_f32(&base, [contribution.map_err(Error::from)]);
    }
    if !(cpu_f32(x) && cpu_f32(weight) && cpu_f32(coeffs) && bias.is_none_or(cpu_f32)) {
        let dw = delta_weight(entries, coeffs, scaling)?.to_device(weight.device())?;
        let w = add_to_frozen(&dw, weight)?;
        let y = x.matmul(&w.t()?)?;
        return Ok(match bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        });
    }
    if coeffs.track_op() {
        crate::runtime::ensure_training_policy();
    }
    let op = FourierLinearCpu {
        entries: entries.clone(),
        scaling,
        bias: match bias {
            Some(b) => b.to_vec1::<f32>()?,
            None => vec![0f32; d1],
        },
        adapted: OnceLock::new(),
    };
    Ok(x.contiguous()?
        .apply_op3(&coeffs.contiguous()?, &weight.detach().contiguous()?, op)?)
}
