//! The constructors a model calls instead of `candle_nn::linear`, and the layer they build.

use super::AdapterContext;
use crate::error::Result;
use crate::layer::FourierLinear;
use candle_core::{Module, Tensor};
use candle_nn::{Linear, VarBuilder};

/// A linear layer built by this module's constructors: a plain [`Linear`] or, where the adapter
/// targets it, a [`FourierLinear`].
#[derive(Debug, Clone)]
pub enum AdaptableLinear {
    /// Not adapted: exactly what `candle_nn::linear` builds.
    Base(Linear),
    /// Adapted.
    Fourier(FourierLinear),
}

impl AdaptableLinear {
    /// The adapted layer, if this one is adapted.
    pub fn fourier(&self) -> Option<&FourierLinear> {
        match self {
            AdaptableLinear::Fourier(l) => Some(l),
            AdaptableLinear::Base(_) => None,
        }
    }
}

impl Module for AdaptableLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            AdaptableLinear::Base(l) => l.forward(x),
            AdaptableLinear::Fourier(l) => l.forward(x),
        }
    }
}

/// `candle_nn::linear(in_dim, out_dim, vb)`, adapted when `vb` carries an [`AdapterContext`] that
/// targets `vb.prefix()`. Weight `(out_dim, in_dim)` and bias `[out_dim]` come from `vb` with
/// `candle_nn::linear`'s initialisation hints.
///
/// This family (`linear`, [`linear_no_bias`], [`linear_b`], [`conv1d`]) adapts only where the
/// context says; [`fourierft::linear`](crate::linear) (with an explicit configuration) always
/// builds a [`FourierLinear`].
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<AdaptableLinear> {
    build(in_dim, out_dim, true, false, vb)
}

/// Like [`linear`] without a bias.
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<AdaptableLinear> {
    build(in_dim, out_dim, false, false, vb)
}

/// Like [`linear`], with or without a bias.
pub fn linear_b(
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    vb: VarBuilder,
) -> Result<AdaptableLinear> {
    build(in_dim, out_dim, bias, false, vb)
}

/// A GPT-2 style `Conv1D` (transformers' `Conv1D(nf=out_dim, nx=in_dim)`): `y = x·W + b` with the
/// weight stored `(in_dim, out_dim)` and a bias `[out_dim]`. Adapted with `fan_in_fan_out`
/// whatever the configuration says, as PEFT does.
pub fn conv1d(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<AdaptableLinear> {
    build(in_dim, out_dim, true, true, vb)
}

fn build(
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    fan_in_fan_out: bool,
    vb: VarBuilder,
) -> Result<AdaptableLinear> {
    let (weight, bias) = crate::layer::base_parts(in_dim, out_dim, bias, fan_in_fan_out, &vb)?;
    let path = vb.prefix();
    if let Some(ctx) = AdapterContext::from_var_builder(&vb) {
        ctx.record_built(&path);
        if ctx.is_target(&path) {
            return Ok(AdaptableLinear::Fourier(ctx.adapt(
                &path,
                weight,
                bias,
                fan_in_fan_out,
            )?));
        }
    }
    let weight = if fan_in_fan_out { weight.t()? } else { weight };
    Ok(AdaptableLinear::Base(Linear::new(weight, bias)))
}
