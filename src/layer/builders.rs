//! Building a [`FourierLinear`] from a [`VarBuilder`], like `candle_nn::linear`.

use super::handle::{FourierLinear, DEFAULT_ADAPTER};
use crate::config::FourierFTConfig;
use crate::error::Result;
use candle_core::Tensor;
use candle_nn::VarBuilder;

/// Builds a [`FourierLinear`] like `candle_nn::linear(in_dim, out_dim, vb)`: W0 (`weight`,
/// `(out, in)` or `(in, out)` with `fan_in_fan_out`) and `bias` come from `vb`, and an adapter
/// named `"default"` is attached. The layer is named after `vb`'s prefix.
///
/// This family (`linear`, [`linear_no_bias`], [`linear_b`]) **always** adapts, with the
/// configuration it is given. [`inject::linear`](crate::inject::linear) takes
/// `candle_nn::linear`'s exact arguments instead and adapts only the layers an
/// [`AdapterContext`](crate::AdapterContext) in `vb` targets.
///
/// ```
/// use candle_core::{DType, Device};
/// use candle_nn::{VarBuilder, VarMap};
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// let cfg = fourierft::FourierFTConfig { n_frequency: 16, ..Default::default() };
/// let layer = fourierft::linear(32, 24, &cfg, vb.pp("fc1"))?;
/// assert_eq!((layer.name(), layer.num_trainable()), ("fc1", 16));
/// # Ok::<(), fourierft::Error>(())
/// ```
pub fn linear(
    in_dim: usize,
    out_dim: usize,
    config: &FourierFTConfig,
    vb: VarBuilder,
) -> Result<FourierLinear> {
    linear_b(in_dim, out_dim, true, config, vb)
}

/// Like [`linear`] without a bias.
pub fn linear_no_bias(
    in_dim: usize,
    out_dim: usize,
    config: &FourierFTConfig,
    vb: VarBuilder,
) -> Result<FourierLinear> {
    linear_b(in_dim, out_dim, false, config, vb)
}

/// Like [`linear`], with or without a bias.
pub fn linear_b(
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    config: &FourierFTConfig,
    vb: VarBuilder,
) -> Result<FourierLinear> {
    let (weight, bias) = base_parts(in_dim, out_dim, bias, config.fan_in_fan_out, &vb)?;
    let layer =
        FourierLinear::from_parts(weight, bias, config.fan_in_fan_out)?.with_name(vb.prefix());
    layer.add_adapter(DEFAULT_ADAPTER, config)?;
    Ok(layer)
}

/// The base weight (`(out, in)`, or `(in, out)` with `fan_in_fan_out`) and optional bias from
/// `vb`, with `candle_nn::linear`'s initialisers when `vb` creates them.
pub(crate) fn base_parts(
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    fan_in_fan_out: bool,
    vb: &VarBuilder,
) -> Result<(Tensor, Option<Tensor>)> {
    let shape = if fan_in_fan_out {
        (in_dim, out_dim)
    } else {
        (out_dim, in_dim)
    };
    let weight = vb.get_with_hints(shape, "weight", candle_nn::init::DEFAULT_KAIMING_NORMAL)?;
    let bias = if bias {
        let bound = 1. / (in_dim as f64).sqrt();
        let init = candle_nn::Init::Uniform {
            lo: -bound,
            up: bound,
        };
        Some(vb.get_with_hints(out_dim, "bias", init)?)
    } else {
        None
    };
    Ok((weight, bias))
}
