//! The spectral forward (x·ΔWᵀ without ΔW), the frozen base op and mixed-adapter batches.

mod common;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::Linear;
use common::{assert_close, f32s, lcg_coeffs, reference_delta_weight};
use fourierft::{ops, ForwardMode, FourierFTConfig, FourierLinear, SpectralEntries};

fn f64s(t: &Tensor) -> anyhow::Result<Vec<f64>> {
    Ok(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

/// Whether the GradStore holds a gradient shaped like the weight (or its transpose).
fn has_weight_sized(g: &candle_core::backprop::GradStore, dims: &[usize; 2]) -> bool {
    let t = [dims[1], dims[0]];
    g.get_ids()
        .filter_map(|id| g.get_id(*id))
        .any(|x| x.dims() == dims || x.dims() == t)
}

const SHAPES: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (1, 9, 4),
    (9, 1, 5),
    (1, 16, 16),
    (16, 1, 7),
    (5, 5, 25),
    (6, 6, 10),
    (7, 11, 30),
    (16, 9, 50),
    (13, 17, 1),
    (40, 24, 90),
    (97, 64, 300),
];

#[test]
fn spectral_product_matches_f64_reference() -> anyhow::Result<()> {
    for &(d1, d2, n) in SHAPES {
        let e = SpectralEntries::uniform(d1, d2, n, 31)?;
        let c = lcg_coeffs(n, 1);
        let tokens = 7;
        let x = lcg_coeffs(tokens * d2, 2);
        let dw = reference_delta_weight(d1, d2, e.rows(), e.cols(), &c, 120.0);
        let want: Vec<f64> = (0..tokens)
            .flat_map(|t| {
                let (x, dw) = (&x, &dw);
                (0..d1).map(move |j| (0..d2).map(|k| dw[j * d2 + k] * x[t * d2 + k] as f64).sum())
            })
            .collect();
        let y = fourierft::internals::forward::forward(&e, &c, 120.0, &x)?;
        assert_close(
            &y,
            &want,
            1e-5,
            &format!("spectral forward {d1}x{d2} n={n}"),
        );
    }
    Ok(())
}

#[test]
fn spectral_mode_equals_dense_mode_for_2d_and_3d_inputs() -> anyhow::Result<()> {
    for &(d1, d2, n) in &[(12usize, 10usize, 40usize), (7, 11, 20), (33, 16, 100)] {
        let w = Tensor::from_vec(lcg_coeffs(d1 * d2, 3), (d1, d2), &Device::Cpu)?;
        let b = Tensor::from_vec(lcg_coeffs(d1, 4), d1, &Device::Cpu)?;
        let cfg = FourierFTConfig {
            n_frequency: n,
            init_seed: Some(1),
            ..Default::default()
        };
        let layer = FourierLinear::new(Linear::new(w, Some(b)), &cfg)?;
        for x in [
            Tensor::from_vec(lcg_coeffs(5 * d2, 5), (5, d2), &Device::Cpu)?,
            Tensor::from_vec(lcg_coeffs(2 * 3 * d2, 6), (2, 3, d2), &Device::Cpu)?,
        ] {
            layer.set_forward_mode(ForwardMode::Dense);
            let dense = layer.forward(&x)?;
            layer.set_forward_mode(ForwardMode::Spectral);
            let spectral = layer.forward(&x)?;
            layer.set_forward_mode(ForwardMode::Auto);
            let auto = layer.forward(&x)?;
            assert_eq!(spectral.dims(), dense.dims());
            assert_close(&f32s(&spectral)?, &f64s(&dense)?, 1e-5, "spectral vs dense");
            assert_close(&f32s(&auto)?, &f64s(&dense)?, 1e-5, "auto vs dense");
        }
    }
    Ok(())
}

/// Quadratic loss through the spectral op, so central differences are exact up to rounding.
fn loss(
    e: &std::sync::Arc<SpectralEntries>,
    c: &Tensor,
    x: &Tensor,
    t: &Tensor,
) -> candle_core::Result<Tensor> {
    let y = ops::spectral_linear(x, e, c, 30.0).map_err(fourierft::Error::into_candle)?;
    (y - t)?.sqr()?.sum_all()
}

#[test]
fn spectral_gradients_match_finite_differences() -> anyhow::Result<()> {
    for &(d1, d2, n) in &[(7usize, 11usize, 9usize), (8, 6, 20), (1, 5, 3), (9, 1, 4)] {
        let e = SpectralEntries::uniform(d1, d2, n, 5)?;
        let tokens = 3;
        let (c0, x0) = (lcg_coeffs(n, 7), lcg_coeffs(tokens * d2, 8));
        let target = Tensor::from_vec(lcg_coeffs(tokens * d1, 9), (tokens, d1), &Device::Cpu)?;
        let c = Var::new(c0.as_slice(), &Device::Cpu)?;
        let x = Var::from_vec(x0.clone(), (tokens, d2), &Device::Cpu)?;
        let grads = loss(&e, c.as_tensor(), x.as_tensor(), &target)?.backward()?;
        let gc = f32s(grads.get(c.as_tensor()).expect("dc"))?;
        let gx = f32s(grads.get(x.as_tensor()).expect("dx"))?;

        let eval = |c: &[f32], x: &[f32]| -> anyhow::Result<f64> {
            let c = Tensor::new(c, &Device::Cpu)?;
            let x = Tensor::from_vec(x.to_vec(), (tokens, d2), &Device::Cpu)?;
            Ok(loss(&e, &c, &x, &target)?.to_scalar::<f32>()? as f64)
        };
        let eps = 0.05f32;
        let mut fd_c = Vec::new();
        for l in 0..n {
            let (mut p, mut m) = (c0.clone(), c0.clone());
            p[l] += eps;
            m[l] -= eps;
            fd_c.push((eval(&p, &x0)? - eval(&m, &x0)?) / (2.0 * eps as f64));
        }
        let mut fd_x = Vec::new();
        for i in 0..x0.len() {
            let (mut p, mut m) = (x0.clone(), x0.clone());
            p[i] += eps;
            m[i] -= eps;
            fd_x.push((eval(&c0, &p)? - eval(&c0, &m)?) / (2.0 * eps as f64));
        }
        assert_close(&gc, &fd_c, 2e-3, &format!("dL/dc {d1}x{d2}"));
        assert_close(&gx, &fd_x, 2e-3, &format!("dL/dx {d1}x{d2}"));
    }
    Ok(())
}

#[test]
fn spectral_and_dense_training_gradients_agree() -> anyhow::Result<()> {
    let (d1, d2) = (24, 20);
    let w = Tensor::from_vec(lcg_coeffs(d1 * d2, 1), (d1, d2), &Device::Cpu)?;
    let cfg = FourierFTConfig {
        n_frequency: 60,
        init_seed: Some(2),
        ..Default::default()
    };
    let layer = FourierLinear::new(Linear::new(w, None), &cfg)?;
    let c = layer.adapter("default")?.spectrum().clone();
    let x = Var::from_vec(lcg_coeffs(4 * 3 * d2, 2), (4, 3, d2), &Device::Cpu)?;
    let mut per_mode = Vec::new();
    for mode in [ForwardMode::Dense, ForwardMode::Spectral] {
        layer.set_forward_mode(mode);
        let grads = layer.forward(x.as_tensor())?.sqr()?.sum_all()?.backward()?;
        per_mode.push((
            f32s(grads.get(c.as_tensor()).expect("dc"))?,
            f32s(grads.get(x.as_tensor()).expect("dx"))?,
        ));
    }
    let to64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    assert_close(
        &per_mode[1].0,
        &to64(&per_mode[0].0),
        1e-4,
        "dc spectral vs dense",
    );
    assert_close(
        &per_mode[1].1,
        &to64(&per_mode[0].1),
        1e-4,
        "dx spectral vs dense",
    );
    Ok(())
}

#[test]
fn frozen_base_op_gives_plain_gradients_and_no_weight_gradient() -> anyhow::Result<()> {
    let w = Tensor::from_vec(lcg_coeffs(6 * 5, 1), (6, 5), &Device::Cpu)?;
    let b = Tensor::from_vec(lcg_coeffs(6, 2), 6, &Device::Cpu)?;
    let x = Var::from_vec(lcg_coeffs(4 * 5, 3), (4, 5), &Device::Cpu)?;

    let plain = x.as_tensor().matmul(&w.t()?)?.broadcast_add(&b)?;
    let frozen = ops::frozen_linear(x.as_tensor(), &w, Some(&b))?;
    assert_eq!(f32s(&plain)?, f32s(&frozen)?);
    let g_plain = plain.sqr()?.sum_all()?.backward()?;
    let g_frozen = frozen.sqr()?.sum_all()?.backward()?;
    assert_close(
        &f32s(g_frozen.get(x.as_tensor()).expect("dx"))?,
        &f64s(g_plain.get(x.as_tensor()).expect("dx"))?,
        1e-6,
        "dx frozen vs plain",
    );
    // candle's matmul stores a weight-sized gradient even for a frozen weight; the op does not.
    assert!(has_weight_sized(&g_plain, &[6, 5]));
    assert!(!has_weight_sized(&g_frozen, &[6, 5]));
    assert!(g_frozen.get(&w).is_none() && g_frozen.get(&b).is_none());

    // Through a layer: W0 never gets a gradient; the spectral and merged paths store nothing
    // weight-sized at all.
    let cfg = FourierFTConfig {
        n_frequency: 8,
        ..Default::default()
    };
    let layer = FourierLinear::new(Linear::new(w, Some(b)), &cfg)?;
    let w0 = layer.weight();
    let c = layer.adapter("default")?.spectrum().clone();
    layer.set_forward_mode(ForwardMode::Spectral);
    let g = layer.forward(x.as_tensor())?.sum_all()?.backward()?;
    assert!(g.get(&w0).is_none() && !has_weight_sized(&g, &[6, 5]));
    assert!(g.get(c.as_tensor()).is_some());
    // Dense mode needs dL/d(W0 + ΔW) for ΔW's gradient, but none for W0 itself.
    layer.set_forward_mode(ForwardMode::Dense);
    let g = layer.forward(x.as_tensor())?.sum_all()?.backward()?;
    assert!(g.get(&w0).is_none() && g.get(c.as_tensor()).is_some());
    layer.merge()?;
    let g = layer.forward(x.as_tensor())?.sum_all()?.backward()?;
    assert!(!has_weight_sized(&g, &[6, 5]) && g.get(x.as_tensor()).is_some());
    Ok(())
}

#[test]
fn mixed_adapter_batch_equals_per_row_forwards() -> anyhow::Result<()> {
    let (d1, d2) = (10, 8);
    let w = Tensor::from_vec(lcg_coeffs(d1 * d2, 1), (d1, d2), &Device::Cpu)?;
    let b = Tensor::from_vec(lcg_coeffs(d1, 2), d1, &Device::Cpu)?;
    let cfg = |n, seed| FourierFTConfig {
        n_frequency: n,
        random_loc_seed: seed,
        init_seed: Some(seed),
        ..Default::default()
    };
    let layer = FourierLinear::new(Linear::new(w, Some(b)), &cfg(20, 1))?;
    layer.add_adapter("b", &cfg(30, 2))?;
    layer.add_adapter("c", &cfg(12, 3))?;
    let rows = [Some("b"), None, Some("default"), Some("b"), Some("c")];
    for mode in [ForwardMode::Dense, ForwardMode::Spectral, ForwardMode::Auto] {
        layer.set_forward_mode(mode);
        let x = Tensor::from_vec(lcg_coeffs(5 * 3 * d2, 4), (5, 3, d2), &Device::Cpu)?;
        let mixed = layer.forward_mixed(&x, &rows)?;
        assert_eq!(mixed.dims(), &[5, 3, d1]);
        for (r, name) in rows.iter().enumerate() {
            let xr = x.narrow(0, r, 1)?;
            match name {
                Some(a) => layer.set_active_adapters(&[a])?,
                None => layer.set_active_adapters(&[])?,
            }
            let want = layer.forward(&xr)?;
            let got = mixed.narrow(0, r, 1)?;
            assert_close(
                &f32s(&got)?,
                &f64s(&want)?,
                1e-5,
                &format!("row {r} ({name:?}) {mode:?}"),
            );
        }
    }
    // Errors: wrong list length, unknown adapter, merged layer.
    let x = Tensor::zeros((2, d2), DType::F32, &Device::Cpu)?;
    assert!(matches!(
        layer.forward_mixed(&x, &[None]),
        Err(fourierft::Error::Shape { .. })
    ));
    assert!(matches!(
        layer.forward_mixed(&x, &[None, Some("zz")]),
        Err(fourierft::Error::UnknownAdapter { .. })
    ));
    layer.set_active_adapters(&["b"])?;
    layer.merge()?;
    assert!(matches!(
        layer.forward_mixed(&x, &[None, None]),
        Err(fourierft::Error::MergeState { .. })
    ));
    Ok(())
}

#[test]
fn mixed_batch_trains_each_adapter_from_its_rows_only() -> anyhow::Result<()> {
    let w = Tensor::from_vec(lcg_coeffs(6 * 6, 1), (6, 6), &Device::Cpu)?;
    let layer = FourierLinear::new(
        Linear::new(w, None),
        &FourierFTConfig {
            n_frequency: 6,
            ..Default::default()
        },
    )?;
    layer.add_adapter(
        "b",
        &FourierFTConfig {
            n_frequency: 6,
            random_loc_seed: 3,
            ..Default::default()
        },
    )?;
    let x = Tensor::from_vec(lcg_coeffs(2 * 6, 2), (2, 6), &Device::Cpu)?;
    let g = layer
        .forward_mixed(&x, &[Some("b"), None])?
        .sum_all()?
        .backward()?;
    assert!(g.get(layer.adapter("b")?.spectrum().as_tensor()).is_some());
    assert!(g
        .get(layer.adapter("default")?.spectrum().as_tensor())
        .is_none());
    Ok(())
}

#[test]
fn spectral_op_rejects_bad_input() -> anyhow::Result<()> {
    let e = SpectralEntries::uniform(4, 6, 5, 1)?;
    let c = Tensor::zeros(5, DType::F32, &Device::Cpu)?;
    let bad_x = Tensor::zeros((3, 5), DType::F32, &Device::Cpu)?;
    let err = ops::spectral_linear(&bad_x, &e, &c, 1.0).expect_err("width");
    assert!(err.to_string().contains("[3, 5]"), "{err}");
    let bad_c = Tensor::zeros(4, DType::F32, &Device::Cpu)?;
    let x = Tensor::zeros((3, 6), DType::F32, &Device::Cpu)?;
    assert!(matches!(
        ops::spectral_linear(&x, &e, &bad_c, 1.0),
        Err(fourierft::Error::Shape { .. })
    ));
    Ok(())
}

/// dL/dc_l = alpha/(d1·d2)·Σ_t Σ_{j,k} g[t,j]·x[t,k]·cos(2π(u_l·j/d1 + v_l·k/d2)), in f64.
fn reference_coeff_grad(e: &SpectralEntries, alpha: f64, x: &[f32], g: &[f32]) -> Vec<f64> {
    let (d1, d2) = e.shape();
    let tokens = x.len() / d2;
    let mut gx = vec![0f64; d1 * d2];
    for t in 0..tokens {
        for j in 0..d1 {
            for k in 0..d2 {
                gx[j * d2 + k] += g[t * d1 + j] as f64 * x[t * d2 + k] as f64;
            }
        }
    }
    (0..e.len())
        .map(|l| {
            let (u, v) = (e.rows()[l] as u64, e.cols()[l] as u64);
            let mut acc = 0f64;
            for j in 0..d1 {
                for k in 0..d2 {
                    let pu = (u * j as u64) % d1 as u64;
                    let pv = (v * k as u64) % d2 as u64;
                    let phase = pu as f64 / d1 as f64 + pv as f64 / d2 as f64;
                    acc += gx[j * d2 + k] * (2.0 * std::f64::consts::PI * phase).cos();
                }
            }
            alpha / (d1 * d2) as f64 * acc
        })
        .collect()
}

#[test]
fn coefficient_gradient_from_spectra_matches_f64_reference() -> anyhow::Result<()> {
    use fourierft::internals::forward::coeff_grad;
    for &(d1, d2, n) in SHAPES {
        let e = SpectralEntries::uniform(d1, d2, n, 12)?;
        // Token counts around the 64-token blocks of the frequency-major layout.
        for tokens in [1, 3, 63, 64, 65, 130] {
            let (x, g) = (lcg_coeffs(tokens * d2, 5), lcg_coeffs(tokens * d1, 6));
            let dc = coeff_grad(&e, 7.0, &x, &g)?;
            let want = reference_coeff_grad(&e, 7.0, &x, &g);
            assert_close(
                &dc,
                &want,
                2e-5,
                &format!("dL/dc {d1}x{d2} n={n} tokens={tokens}"),
            );
        }
    }
    let e = SpectralEntries::uniform(4, 6, 5, 1)?;
    assert!(coeff_grad(&e, 1.0, &[0.0; 12], &[0.0; 12]).is_err()); // 2 tokens of x, 3 of g
    assert!(coeff_grad(&e, 1.0, &[0.0; 7], &[0.0; 4]).is_err());
    Ok(())
}
