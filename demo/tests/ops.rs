//! The encoder's custom ops against the same computation from candle ops, values and gradients
//! (no assets needed). Random inputs come from fixed seeds.

use anyhow::Result;
use candle_core::{DType, Device, Module, Shape, Tensor, Var};
use candle_nn::VarBuilder;
use fourierft_demo as bert;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use std::collections::HashMap;

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// A tensor of normal(mean, std) f32 values drawn from a generator seeded with `seed` (candle's
/// CPU `randn` cannot be seeded).
fn randn(seed: u64, mean: f32, std: f32, shape: impl Into<Shape>) -> Result<Tensor> {
    let shape = shape.into();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let normal = Normal::new(mean, std)?;
    let v: Vec<f32> = (0..shape.elem_count())
        .map(|_| normal.sample(&mut rng))
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// Gradient of `Σ out·r` with respect to `x` for a fixed random `r`.
fn grad_of(x: &Var, out: &Tensor, r: &Tensor) -> Result<Tensor> {
    let grads = (out * r)?.sum_all()?.backward()?;
    Ok(grads.get(x.as_tensor()).expect("gradient").clone())
}

#[test]
fn layer_norm_op_matches_composed() -> Result<()> {
    let dev = Device::Cpu;
    let n = 384;
    let w = (randn(1, 0f32, 0.2, n)? + 1.0)?;
    let b = randn(2, 0f32, 0.2, n)?;
    let vb = VarBuilder::from_tensors(
        [("weight".to_string(), w), ("bias".to_string(), b)].into(),
        DType::F32,
        &dev,
    );
    let ln = bert::LayerNorm::load(n, 1e-12, vb)?;
    let x = Var::from_tensor(&(randn(3, 0f32, 2.0, (3, 70, n))? + 0.5)?)?;
    let r = randn(4, 0f32, 1.0, (3, 70, n))?;
    let (y1, y2) = (ln.forward(&x)?, ln.forward_composed(&x)?);
    assert!(max_abs_diff(&y1, &y2)? < 1e-4);
    let (g1, g2) = (grad_of(&x, &y1, &r)?, grad_of(&x, &y2, &r)?);
    let d = max_abs_diff(&g1, &g2)?;
    assert!(d < 1e-4, "layer norm gradient differs by {d}");
    Ok(())
}

#[test]
fn gelu_op_matches_candle_gelu_erf() -> Result<()> {
    let x = Var::from_tensor(&randn(5, 0f32, 3.0, (50, 1536))?)?;
    let r = randn(6, 0f32, 1.0, (50, 1536))?;
    let (y1, y2) = (bert::gelu(&x)?, x.as_tensor().gelu_erf()?);
    assert!(max_abs_diff(&y1, &y2)? < 2e-6);
    let d = max_abs_diff(&grad_of(&x, &y1, &r)?, &grad_of(&x, &y2, &r)?)?;
    assert!(d < 1e-4, "gelu gradient differs by {d}");
    Ok(())
}

#[test]
fn attention_op_matches_composed() -> Result<()> {
    let dev = Device::Cpu;
    let (b, s, h, heads) = (3, 17, 48, 4);
    let q = Var::from_tensor(&randn(7, 0f32, 1.5, (b, s, h))?)?;
    let k = Var::from_tensor(&randn(8, 0f32, 1.5, (b, s, h))?)?;
    let v = Var::from_tensor(&randn(9, 0f32, 1.0, (b, s, h))?)?;
    // Rows of 17, 9 and 1 tokens: padding masked out, down to a single key.
    let mask: Vec<f32> = [17usize, 9, 1]
        .iter()
        .flat_map(|&len| (0..s).map(move |j| if j < len { 1.0 } else { 0.0 }))
        .collect();
    let mask = Tensor::from_vec(mask, (b, s), &dev)?;
    let r = randn(10, 0f32, 1.0, (b, s, h))?;
    let y1 = bert::attention(&q, &k, &v, heads, &mask)?;
    let y2 = bert::attention_composed(&q, &k, &v, heads, &mask)?;
    assert!(max_abs_diff(&y1, &y2)? < 1e-5);
    for x in [&q, &k, &v] {
        let d = max_abs_diff(&grad_of(x, &y1, &r)?, &grad_of(x, &y2, &r)?)?;
        assert!(d < 1e-4, "attention gradient differs by {d}");
    }
    Ok(())
}

#[test]
fn fused_sublayer_ops_match_composed() -> Result<()> {
    let dev = Device::Cpu;
    let (t, h, f) = (37, 24, 40);
    let tensors = |names: &[(&str, Tensor)]| -> HashMap<String, Tensor> {
        names
            .iter()
            .map(|(n, t)| (n.to_string(), t.clone()))
            .collect()
    };
    let vb = |m: HashMap<String, Tensor>| VarBuilder::from_tensors(m, DType::F32, &dev);
    let proj_up = bert::FrozenLinear::new(
        randn(11, 0f32, 0.3, (f, h))?,
        Some(randn(12, 0f32, 0.3, f)?),
    );
    let proj_down = bert::FrozenLinear::new(
        randn(13, 0f32, 0.3, (h, f))?,
        Some(randn(14, 0f32, 0.3, h)?),
    );
    let norm = bert::LayerNorm::load(
        h,
        1e-12,
        vb(tensors(&[
            ("weight", (randn(15, 0f32, 0.2, h)? + 1.0)?),
            ("bias", randn(16, 0f32, 0.2, h)?),
        ])),
    )?;
    let a = Var::from_tensor(&randn(17, 0f32, 1.0, (2, t, h))?)?;
    let r = randn(18, 0f32, 1.0, (2, t, h))?;

    // gelu(a·W1ᵀ + b1), then LN(act·W2ᵀ + b2 + a): fused vs candle ops.
    let act1 = bert::linear_gelu(&proj_up, &a)?;
    let act2 = bert::gelu(&proj_up.forward(&a)?)?;
    assert!(max_abs_diff(&act1, &act2)? < 1e-5);
    let y1 = bert::residual_norm(&proj_down, &norm, &act1, &a)?;
    let y2 = norm.forward_composed(&(proj_down.forward(&act2)? + a.as_tensor())?)?;
    assert!(max_abs_diff(&y1, &y2)? < 1e-4);
    let (g1, g2) = (grad_of(&a, &y1, &r)?, grad_of(&a, &y2, &r)?);
    let d = max_abs_diff(&g1, &g2)?;
    assert!(d < 1e-4, "fused sub-layer gradient differs by {d}");
    // The whole block as one op: same value and gradient as the two ops.
    let y3 = bert::ffn_block(&proj_up, &proj_down, &norm, &a)?;
    assert!(max_abs_diff(&y3, &y1)? < 1e-5);
    let d = max_abs_diff(&grad_of(&a, &y3, &r)?, &g1)?;
    assert!(d < 1e-5, "FFN block gradient differs by {d}");
    Ok(())
}
