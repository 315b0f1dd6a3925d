//! GELU (erf form) as one op, and the BERT sub-blocks as fused ops with hand-written backwards:
//! the FFN's first projection + GELU ([`linear_gelu`]), and a projection + residual + layer norm
//! ([`residual_norm`], the attention-output and FFN-output sub-blocks).

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use crate::kernels::{gelu_grad_par, gelu_par, par_zeros};
use crate::linear::FrozenLinear;
use crate::norm::LayerNorm;
use crate::profile;
use crate::storage::{as_rows, cpu_f32, reshaped, to_candle, with_f32};

/// GELU (erf form, as BERT's "gelu") with a one-pass backward.
#[derive(Debug, Clone, Copy)]
struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l, "gelu")?;
        Ok((CpuStorage::F32(gelu_par(x)), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dx = with_f32(x, |x| with_f32(g, |g| Ok(gelu_grad_par(x, g)))).map_err(to_candle)?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// GELU (erf form) elementwise, as one op with a one-pass backward.
pub fn gelu(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Gelu)
}

/// `LN(x·Wᵀ + b + r)` — a frozen projection, the residual add and layer norm — as one op (the
/// attention-output and FFN-output sub-blocks), for `x` `(tokens, in)` and `r` `(tokens, out)`.
/// The backward, from the saved pre-norm sum `z`: `g_z = LN′(z)ᵀ·g`, `dL/dx = g_z·W`,
/// `dL/dr = g_z`. As separate nodes (linear, add, norm) candle would also zero-fill and
/// accumulate a gradient buffer per node.
struct ResidualNorm {
    proj: FrozenLinear,
    norm: LayerNorm,
    z: std::sync::OnceLock<Vec<f32>>,
    /// The profile's name for the backward.
    kind: &'static str,
}

impl candle_core::CustomOp2 for ResidualNorm {
    fn name(&self) -> &'static str {
        "linear-residual-layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, r) = (
            cpu_f32(xs, xl, "projection input")?,
            cpu_f32(rs, rl, "residual")?,
        );
        let out = self.proj.weight.dim(0)?;
        let tokens = r.len() / out.max(1);
        let z = self.proj.project_rows(x, tokens, Some(r))?;
        let y = self.norm.forward_rows(&z);
        let _ = self.z.set(z);
        Ok((CpuStorage::F32(y), rl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        r: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let start = profile::Stamp::now();
        let z = self
            .z
            .get()
            .ok_or_else(|| candle_core::Error::msg("backward before forward"))?;
        let (out, inp) = self.proj.weight.dims2()?;
        let tokens = z.len() / out.max(1);
        let gz = with_f32(g, |g| Ok(self.norm.backward_rows(z, g))).map_err(to_candle)?;
        profile::subnormals(self.kind, &gz);
        let dx = if x.track_op() {
            let mut dx = par_zeros(tokens * inp);
            self.proj.back_rows(&mut dx, &gz, tokens)?;
            Some(Tensor::from_vec(dx, x.shape(), x.device())?)
        } else {
            None
        };
        let dr = if r.track_op() {
            Some(Tensor::from_vec(gz, r.shape(), r.device())?)
        } else {
            None
        };
        if profile::enabled() {
            profile::add(self.kind, start);
        }
        Ok((dx, dr))
    }
}

/// `LN(x·Wᵀ + b + r)` for `x` `(..., in)` and `r` `(..., out)` ([`ResidualNorm`]).
pub fn residual_norm(
    proj: &FrozenLinear,
    norm: &LayerNorm,
    x: &Tensor,
    r: &Tensor,
) -> candle_core::Result<Tensor> {
    let op = ResidualNorm {
        proj: proj.clone(),
        norm: norm.clone(),
        z: std::sync::OnceLock::new(),
        kind: "attn out + norm (bwd)",
    };
    let x2 = as_rows(x)?.contiguous()?;
    x2.apply_op2(&r.contiguous()?, op)
}

/// `gelu(x·Wᵀ + b)` — the FFN's first projection and activation — as one op, for `x`
/// `(tokens, in)`; the backward `dL/dx = (g∘gelu′(p))·W` uses the saved pre-activation `p`.
struct LinearGelu {
    proj: FrozenLinear,
    pre: std::sync::OnceLock<Vec<f32>>,
}

impl CustomOp1 for LinearGelu {
    fn name(&self) -> &'static str {
        "linear-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l, "linear-gelu input")?;
        let (out, inp) = self.proj.weight.dims2()?;
        let tokens = x.len() / inp.max(1);
        let pre = self.proj.project_rows(x, tokens, None)?;
        let y = gelu_par(&pre);
        profile::subnormals("FFN in + GELU (fwd)", &y);
        let _ = self.pre.set(pre);
        Ok((CpuStorage::F32(y), Shape::from((tokens, out))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let start = profile::Stamp::now();
        let pre = self
            .pre
            .get()
            .ok_or_else(|| candle_core::Error::msg("backward before forward"))?;
        let (out, inp) = self.proj.weight.dims2()?;
        let tokens = pre.len() / out.max(1);
        let dpre = with_f32(g, |g| Ok(gelu_grad_par(pre, g))).map_err(to_candle)?;
        profile::subnormals("FFN in + GELU (bwd)", &dpre);
        let mut dx = par_zeros(tokens * inp);
        self.proj.back_rows(&mut dx, &dpre, tokens)?;
        if profile::enabled() {
            profile::add("FFN in + GELU (bwd)", start);
        }
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// `gelu(x·Wᵀ + b)` for `x` `(..., in)` ([`LinearGelu`]).
pub fn linear_gelu(proj: &FrozenLinear, x: &Tensor) -> candle_core::Result<Tensor> {
    let op = LinearGelu {
        proj: proj.clone(),
        pre: std::sync::OnceLock::new(),
    };
    let mut dims = x.dims().to_vec();
    let last = dims.len() - 1;
    let x2 = as_rows(x)?.contiguous()?;
    dims[last] = proj.weight.dim(0)?;
    reshaped(&x2.apply_op1(op)?, &dims)
}

/// The whole feed-forward sub-block `LN(gelu(a·W1ᵀ + b1)·W2ᵀ + b2 + a)` as one op, for `a`
/// `(tokens, hidden)`. Same arithmetic as [`linear_gelu`] followed by [`residual_norm`], but one
/// graph node: the `(tokens, 4·hidden)` activation is not kept for the backward (both weights
/// are frozen, so only the pre-activation and the pre-norm sum are needed), and candle does not
/// zero-fill and accumulate a gradient buffer for it, nor accumulate `a`'s two gradients
/// (residual and projection) in separate passes. The backward: `g_z = LN′(z)ᵀ·g`,
/// `dL/da = g_z + (gelu′(p)∘(g_z·W2))·W1`.
struct FfnBlock {
    up: FrozenLinear,
    down: FrozenLinear,
    norm: LayerNorm,
    /// (pre-activation p, pre-norm sum z), saved by the forward.
    saved: std::sync::OnceLock<(Vec<f32>, Vec<f32>)>,
}

impl CustomOp1 for FfnBlock {
    fn name(&self) -> &'static str {
        "ffn-block"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let a = cpu_f32(s, l, "FFN input")?;
        let (mid, hidden) = self.up.weight.dims2()?;
        let (out, mid2) = self.down.weight.dims2()?;
        let tokens = a.len() / hidden.max(1);
        if out != hidden || mid2 != mid || a.len() != tokens * hidden {
            candle_core::bail!(
                "FFN block: input {:?}, weights ({mid}, {hidden}) and ({out}, {mid2})",
                l.dims()
            );
        }
        let start = profile::Stamp::now();
        let pre = self.up.project_rows(a, tokens, None)?;
        let act = gelu_par(&pre);
        profile::subnormals("FFN in + GELU (fwd)", &act);
        if profile::enabled() {
            profile::add("FFN in + GELU (fwd)", start);
        }
        let start = profile::Stamp::now();
        let z = self.down.project_rows(&act, tokens, Some(a))?;
        drop(act);
        let y = self.norm.forward_rows(&z);
        let _ = self.saved.set((pre, z));
        if profile::enabled() {
            profile::add("FFN out + norm (fwd)", start);
        }
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, a: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let start = profile::Stamp::now();
        let (pre, z) = self
            .saved
            .get()
            .ok_or_else(|| candle_core::Error::msg("backward before forward"))?;
        let hidden = self.up.weight.dim(1)?;
        let tokens = z.len() / hidden.max(1);
        let mut gz = with_f32(g, |g| Ok(self.norm.backward_rows(z, g))).map_err(to_candle)?;
        profile::subnormals("FFN out + norm (bwd)", &gz);
        let mut dact = par_zeros(pre.len());
        self.down.back_rows(&mut dact, &gz, tokens)?;
        if profile::enabled() {
            profile::add("FFN out + norm (bwd)", start);
        }
        let start = profile::Stamp::now();
        let dpre = gelu_grad_par(pre, &dact);
        drop(dact);
        profile::subnormals("FFN in + GELU (bwd)", &dpre);
        // dL/da = g_z (the residual) + dpre·W1, accumulated in place.
        self.up.back_rows(&mut gz, &dpre, tokens)?;
        if profile::enabled() {
            profile::add("FFN in + GELU (bwd)", start);
        }
        Ok(Some(Tensor::from_vec(gz, a.shape(), a.device())?))
    }
}

/// `LN(gelu(a·W1ᵀ + b1)·W2ᵀ + b2 + a)` for `a` `(..., hidden)` ([`FfnBlock`]): `up` is the FFN's
/// first projection (`(4·hidden, hidden)`), `down` its second, `norm` the output layer norm.
pub fn ffn_block(
    up: &FrozenLinear,
    down: &FrozenLinear,
    norm: &LayerNorm,
    a: &Tensor,
) -> candle_core::Result<Tensor> {
    let op = FfnBlock {
        up: up.clone(),
        down: down.clone(),
        norm: norm.clone(),
        saved: std::sync::OnceLock::new(),
    };
    let a2 = as_rows(a)?.contiguous()?;
    reshaped(&a2.apply_op1(op)?, a.dims())
}
