//! Operations on a frozen tensor whose backward skips it entirely.
//!
//! candle's backward computes (and stores) the gradient of every operand of a matmul or an add,
//! so `x·W0ᵀ` or `W0 + ΔW` with a frozen `W0` still costs a weight-sized GEMM or buffer every
//! step. Here the value is computed outside the graph and re-attached to the trainable operand
//! by an op whose backward sends the gradient to that operand only.

use super::gemm::{self, Mat};
use crate::error::{Error, Result};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};

/// How the gradient of the attached value maps to the trainable operand.
enum GradMap {
    /// `dL/dx = g · weight` (`weight` is `(out, in)`).
    MatmulBy(Tensor),
    /// `dL/dx = g` (cast to the operand's dtype).
    Identity,
}

/// Returns its second argument (computed outside the graph); its backward sends the gradient,
/// mapped by [`GradMap`], to the first. CPU only: on other devices the callers compose candle's
/// own ops instead (see [`frozen_linear`]), so nothing here depends on which of this crate's
/// features are enabled — only on the tensor's device.
struct AttachGrad(GradMap);

impl CustomOp2 for AttachGrad {
    fn name(&self) -> &'static str {
        "fourierft-frozen-linear"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        y: &CpuStorage,
        yl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((y.try_clone(yl)?, yl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = match &self.0 {
            GradMap::MatmulBy(w) => grad.matmul(w)?,
            GradMap::Identity => grad.to_dtype(x.dtype())?,
        };
        Ok((Some(dx), None))
    }
}

/// `x·Wᵀ + b` for `x` `(tokens, in)` and a frozen `weight` `(out, in)`: the backward yields
/// `dL/dx` only, and nothing weight-sized is computed or stored for `weight` or `bias`.
/// f16/bf16 on CPU: accumulated in f32, bias included, and rounded once (torch's CPU result).
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// let w = Tensor::new(&[[1f32, 2.0], [3.0, 4.0], [5.0, 6.0]], &Device::Cpu)?;
/// let x = Var::new(&[[1f32, -1.0]], &Device::Cpu)?;
/// let y = fourierft::ops::frozen_linear(x.as_tensor(), &w, None)?;
/// assert_eq!(y.to_vec2::<f32>()?, vec![vec![-1.0, -1.0, -1.0]]);
/// let grads = y.sum_all()?.backward()?;
/// assert_eq!(grads.get(x.as_tensor()).unwrap().to_vec2::<f32>()?, vec![vec![9.0, 12.0]]);
/// assert!(grads.get(&w).is_none());
/// # Ok::<(), fourierft::Error>(())
/// ```
pub fn frozen_linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let weight = weight.detach();
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if x.track_op() && x.device().is_cpu() {
        crate::runtime::ensure_training_policy();
    }
    if x.rank() == 2 && cpu_f32(x) && cpu_f32(&weight) && bias.is_none_or(cpu_f32) {
        return frozen_linear_cpu(x, &weight, bias);
    }
    if x.rank() == 2 && x.device().is_cpu() && super::half::is_half(weight.dtype()) {
        // Accumulated in f32 with the bias and rounded once, as torch does on CPU.
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let bias = bias.map(f32).transpose()?;
        let y = frozen_linear_cpu(&f32(x)?, &f32(&weight)?, bias.as_ref())?;
        return Ok(y.to_dtype(weight.dtype())?);
    }
    if !x.device().is_cpu() {
        return composed_linear(x, &weight, bias);
    }
    let mut y = x.detach().matmul(&weight.t()?)?;
    if let Some(b) = bias {
        y = y.broadcast_add(&b.detach())?;
    }
    if !x.track_op() {
        return Ok(y);
    }
    attach(x, y, GradMap::MatmulBy(weight))
}

/// [`frozen_linear`] from candle's own ops, for devices without this crate's CPU ops (CUDA,
/// Metal): correct everywhere, but candle's matmul backward also forms the (discarded) weight
/// gradient.
fn composed_linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let y = x.broadcast_matmul(&weight.detach().t()?)?;
    Ok(match bias {
        Some(b) => y.broadcast_add(&b.detach())?,
        None => y,
    })
}

/// [`add_to_frozen`] from candle's own ops (non-CPU devices): the sum in `acc`, cast back.
fn composed_add(delta: &Tensor, frozen: &Tensor, acc: DType) -> Result<Tensor> {
    let sum = (frozen.detach().to_dtype(acc)? + delta.to_dtype(acc)?)?;
    Ok(sum.to_dtype(frozen.dtype())?)
}

/// `frozen + delta` in `frozen`'s dtype (the sum taken in f32, or f64 for f64 weights), with
/// gradient to `delta` only:
/// no weight-sized gradient is computed or stored for `frozen`.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// let w0 = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu)?;
/// let dw = Var::new(&[[0.5f32, 0.0], [0.0, 0.5]], &Device::Cpu)?;
/// let w = fourierft::ops::add_to_frozen(dw.as_tensor(), &w0)?;
/// assert_eq!(w.to_vec2::<f32>()?, vec![vec![1.5, 2.0], vec![3.0, 4.5]]);
/// let grads = w.sum_all()?.backward()?;
/// assert!(grads.get(dw.as_tensor()).is_some() && grads.get(&w0).is_none());
/// # Ok::<(), fourierft::Error>(())
/// ```
pub fn add_to_frozen(delta: &Tensor, frozen: &Tensor) -> Result<Tensor> {
    // f32 for f32/f16/bf16 weights; f64 weights keep their precision.
    let acc = if frozen.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    if !delta.device().is_cpu() {
        return composed_add(delta, frozen, acc);
    }
    let sum = (frozen.detach().to_dtype(acc)? + delta.detach().to_dtype(acc)?)?
        .to_dtype(frozen.dtype())?;
    if !delta.track_op() {
        return Ok(sum);
    }
    attach(delta, sum, GradMap::Identity)
}

/// `x·Wᵀ + b` on CPU in f32 as one op: the bias (zeros for none) is the GEMM's initial output,
/// so the result is written once (no broadcast pass, no copy).
struct FrozenLinearCpu;

impl CustomOp3 for FrozenLinearCpu {
    fn name(&self) -> &'static str {
        "fourierft-frozen-linear-cpu"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let run = || -> Result<(CpuStorage, Shape)> {
            let what = "input of a frozen linear layer";
            let (tokens, inp) = xl.shape().dims2()?;
            let x = Mat::new(what, super::f32_slice(what, xs, xl)?, tokens, inp)?;
            let w = Mat::from_layout("frozen weight", ws.as_slice::<f32>()?, wl)?;
            let y = gemm::linear(x, w, super::f32_slice("frozen bias", bs, bl)?)?;
            Ok((CpuStorage::F32(y), Shape::from((tokens, w.rows()))))
        };
        run().map_err(Error::into_candle)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = x.track_op().then(|| grad.matmul(w)).transpose()?;
        Ok((dx, None, None))
    }
}

fn frozen_linear_cpu(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (_, inp) = x.dims2()?;
    let (out, w_in) = weight.dims2()?;
    if w_in != inp || bias.is_some_and(|b| b.dims() != [out]) {
        return Err(Error::Shape {
            what: "frozen linear layer".into(),
            expected: format!("input (tokens, {w_in}) and bias [{out}]"),
            found: format!(
                "input {} and bias {}",
                crate::error::dims_str(x.dims()),
                bias.map_or("none".into(), |b| crate::error::dims_str(b.dims()))
            ),
        });
    }
    let bias = match bias {
        Some(b) => b.detach().contiguous()?,
        None => Tensor::zeros(out, DType::F32, x.device())?,
    };
    let x = x.contiguous()?;
    Ok(if x.track_op() {
        x.apply_op3(weight, &bias, FrozenLinearCpu)?
    } else {
        x.apply_op3_no_bwd(weight, &bias, &FrozenLinearCpu)?
    })
}

fn attach(operand: &Tensor, value: Tensor, map: GradMap) -> Result<Tensor> {
    // A fresh, contiguous value starting at offset 0, so cloning its storage is exact.
    let value = value.contiguous()?;
    let value = if value.layout().start_offset() == 0 {
        value
    } else {
        value.copy()?
    };
    Ok(operand.apply_op2(&value, AttachGrad(map))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn close(a: &Tensor, b: &Tensor) -> bool {
        let d = (a - b).and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>());
        d.is_ok_and(|d| d <= 1e-5)
    }

    /// The candle-op compositions used off the CPU give the custom ops' values and gradients
    /// (checked on the CPU, the one device every build has).
    #[test]
    fn composed_paths_match_the_cpu_ops() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::new(&[[1f32, -2.0, 0.5], [3.0, 4.0, -1.0]], &dev)?;
        let b = Tensor::new(&[0.25f32, -0.5], &dev)?;
        let x = Var::new(&[[1f32, -1.0, 2.0], [0.5, 0.0, -3.0]], &dev)?;
        let fused = frozen_linear(x.as_tensor(), &w, Some(&b))?;
        let composed = composed_linear(x.as_tensor(), &w, Some(&b))?;
        assert!(close(&fused, &composed));
        let g1 = fused.sqr()?.sum_all()?.backward()?;
        let g2 = composed.sqr()?.sum_all()?.backward()?;
        assert!(close(
            g1.get(x.as_tensor()).unwrap(),
            g2.get(x.as_tensor()).unwrap()
        ));

        let delta = Var::new(&[[0.5f32, 0.0, 1.0], [0.0, -0.5, 2.0]], &dev)?;
        for dtype in [DType::F32, DType::BF16] {
            let frozen = w.to_dtype(dtype)?;
            let a = add_to_frozen(delta.as_tensor(), &frozen)?;
            let c = composed_add(delta.as_tensor(), &frozen, DType::F32)?;
            assert_eq!(a.dtype(), c.dtype());
            assert!(close(&a.to_dtype(DType::F32)?, &c.to_dtype(DType::F32)?));
            let ga = a.to_dtype(DType::F32)?.sqr()?.sum_all()?.backward()?;
            let gc = c.to_dtype(DType::F32)?.sqr()?.sum_all()?.backward()?;
            let (ga, gc) = (
                ga.get(delta.as_tensor()).unwrap(),
                gc.get(delta.as_tensor()).unwrap(),
            );
            assert!(close(ga, gc), "{dtype:?}");
        }
        Ok(())
    }
}
