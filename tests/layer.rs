//! FourierLinear: forward, merge/unmerge, adapters, training, bad input.

mod common;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Linear, Optimizer, VarBuilder, VarMap};
use common::{assert_close, f32s, lcg_coeffs, reference_delta_weight};
use fourierft::{EntrySampling, Error, FourierFTConfig, FourierLinear};

fn cfg(n: usize) -> FourierFTConfig {
    FourierFTConfig {
        n_frequency: n,
        init_seed: Some(5),
        scaling: 20.0,
        ..Default::default()
    }
}

fn base(out: usize, inp: usize, bias: bool) -> anyhow::Result<Linear> {
    let w = Tensor::from_vec(lcg_coeffs(out * inp, 1), (out, inp), &Device::Cpu)?;
    let b = if bias {
        Some(Tensor::from_vec(lcg_coeffs(out, 2), out, &Device::Cpu)?)
    } else {
        None
    };
    Ok(Linear::new(w, b))
}

fn to_f64(t: &Tensor) -> anyhow::Result<Vec<f64>> {
    Ok(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

#[test]
fn unmerged_forward_is_base_plus_reference_delta() -> anyhow::Result<()> {
    for &(out, inp, n) in &[
        (9usize, 7usize, 20usize),
        (1, 16, 5),
        (16, 1, 3),
        (12, 12, 144),
    ] {
        let layer = FourierLinear::new(base(out, inp, true)?, &cfg(n))?;
        let a = layer.adapter("default")?;
        let c = a.spectrum().as_tensor().to_vec1::<f32>()?;
        let e = a.entries();
        let dw = reference_delta_weight(out, inp, e.rows(), e.cols(), &c, 20.0);
        let x = lcg_coeffs(3 * inp, 9);
        let w0 = f32s(&layer.weight())?;
        let b = f32s(&layer.bias().expect("bias"))?;
        let want: Vec<f64> = (0..3)
            .flat_map(|r| {
                let (x, w0, b, dw) = (&x, &w0, &b, &dw);
                (0..out).map(move |o| {
                    b[o] as f64
                        + (0..inp)
                            .map(|i| {
                                x[r * inp + i] as f64 * (w0[o * inp + i] as f64 + dw[o * inp + i])
                            })
                            .sum::<f64>()
                })
            })
            .collect();
        let y = layer.forward(&Tensor::from_vec(x, (3, inp), &Device::Cpu)?)?;
        assert_eq!(y.dims(), &[3, out]);
        assert_close(&f32s(&y)?, &want, 1e-5, &format!("forward {out}x{inp}"));
    }
    Ok(())
}

#[test]
fn merged_equals_unmerged_and_unmerge_restores_w0() -> anyhow::Result<()> {
    let layer = FourierLinear::new(base(40, 24, true)?, &cfg(90))?;
    let w0 = layer.weight().clone();
    for x in [
        Tensor::from_vec(lcg_coeffs(5 * 24, 3), (5, 24), &Device::Cpu)?,
        Tensor::from_vec(lcg_coeffs(2 * 3 * 24, 4), (2, 3, 24), &Device::Cpu)?,
    ] {
        let unmerged = layer.forward(&x)?;
        layer.merge()?;
        assert!(layer.is_merged());
        let merged = layer.forward(&x)?;
        assert_eq!(merged.dims(), unmerged.dims());
        assert_close(
            &f32s(&merged)?,
            &to_f64(&unmerged)?,
            1e-5,
            "merged vs unmerged",
        );
        layer.unmerge()?;
        assert!(!layer.is_merged());
        assert_close(
            &f32s(&layer.weight())?,
            &to_f64(&w0)?,
            1e-6,
            "merge->unmerge restores W0",
        );
    }
    Ok(())
}

#[test]
fn forward_after_merge_uses_merged_weight_only() -> anyhow::Result<()> {
    let layer = FourierLinear::new(base(8, 6, false)?, &cfg(10))?;
    layer.merge()?;
    let x = Tensor::from_vec(lcg_coeffs(12, 8), (2, 6), &Device::Cpu)?;
    let before = f32s(&layer.forward(&x)?)?;
    // Changing the coefficients after merging must not change a merged forward.
    layer
        .adapter("default")?
        .spectrum()
        .set(&Tensor::zeros(10, DType::F32, &Device::Cpu)?)?;
    assert_eq!(before, f32s(&layer.forward(&x)?)?);
    let plain = x.matmul(&layer.weight().t()?)?;
    assert_eq!(before, f32s(&plain)?);
    Ok(())
}

#[test]
fn fan_in_fan_out_merges_transposed_delta() -> anyhow::Result<()> {
    let (out, inp) = (10, 6);
    let w_in_out = Tensor::from_vec(lcg_coeffs(inp * out, 5), (inp, out), &Device::Cpu)?;
    let config = FourierFTConfig {
        fan_in_fan_out: true,
        ..cfg(12)
    };
    let layer = FourierLinear::from_parts(w_in_out.clone(), None, true)?;
    layer.add_adapter("default", &config)?;
    assert_eq!((layer.in_features(), layer.out_features()), (inp, out));
    let x = Tensor::from_vec(lcg_coeffs(4 * inp, 6), (4, inp), &Device::Cpu)?;
    let dw = layer.adapter("default")?.delta_weight()?; // (out, in)
    let want = (x.matmul(&w_in_out)? + x.matmul(&dw.t()?)?)?;
    let y = layer.forward(&x)?;
    assert_close(&f32s(&y)?, &to_f64(&want)?, 1e-5, "fan_in_fan_out forward");
    layer.merge()?;
    assert_close(
        &f32s(&layer.weight())?,
        &to_f64(&(w_in_out + dw.t()?)?)?,
        1e-6,
        "W += ΔWᵀ",
    );
    assert_close(
        &f32s(&layer.forward(&x)?)?,
        &to_f64(&want)?,
        1e-5,
        "fan_in_fan_out merged",
    );
    Ok(())
}

#[test]
fn adamw_training_reduces_loss_and_leaves_w0_bit_identical() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    // Worst case: W0 lives in a VarMap, so it is a Var that an optimiser could reach.
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let config = FourierFTConfig {
        init_weights: true,
        scaling: 100.0,
        ..cfg(64)
    };
    let layer = fourierft::linear(32, 16, &config, vb.pp("fc"))?;
    let w0_bits: Vec<u32> = f32s(&layer.weight())?.iter().map(|v| v.to_bits()).collect();
    let b0_bits: Vec<u32> = f32s(&layer.bias().expect("bias"))?
        .iter()
        .map(|v| v.to_bits())
        .collect();

    // Target: the base plus a ΔW reachable with the same entries (random coefficients).
    let x = Tensor::from_vec(lcg_coeffs(64 * 32, 21), (64, 32), &dev)?;
    let other = FourierLinear::new(
        Linear::new(Tensor::zeros((16, 32), DType::F32, &dev)?, None),
        &FourierFTConfig {
            init_weights: false,
            ..config.clone()
        },
    )?;
    let m = other.adapter("default")?.delta_weight()?.detach();
    let target = (layer.forward(&x)? + x.matmul(&m.t()?)?)?.detach();
    let vars = layer.trainable_vars();
    assert_eq!(vars.len(), 1);
    let mut opt = candle_nn::AdamW::new(
        vars,
        candle_nn::ParamsAdamW {
            lr: 0.05,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let mut losses = Vec::new();
    for _ in 0..30 {
        let loss = (layer.forward(&x)? - &target)?.sqr()?.mean_all()?;
        losses.push(loss.to_scalar::<f32>()?);
        opt.backward_step(&loss)?;
    }
    assert!(
        losses[29] < 0.1 * losses[0],
        "loss did not fall: {losses:?}"
    );
    let w_bits: Vec<u32> = f32s(&layer.weight())?.iter().map(|v| v.to_bits()).collect();
    let b_bits: Vec<u32> = f32s(&layer.bias().expect("bias"))?
        .iter()
        .map(|v| v.to_bits())
        .collect();
    assert_eq!(w_bits, w0_bits, "W0 changed during training");
    assert_eq!(b_bits, b0_bits, "bias changed during training");
    // The VarMap's own copy of W0 did not move either.
    let in_map = varmap
        .data()
        .lock()
        .expect("varmap")
        .get("fc.weight")
        .expect("fc.weight")
        .as_tensor()
        .clone();
    assert_eq!(
        f32s(&in_map)?
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<_>>(),
        w0_bits
    );
    Ok(())
}

#[test]
fn init_weights_true_starts_as_identity() -> anyhow::Result<()> {
    let lin = base(7, 5, true)?;
    let config = FourierFTConfig {
        init_weights: true,
        ..cfg(9)
    };
    let x = Tensor::from_vec(lcg_coeffs(10, 1), (2, 5), &Device::Cpu)?;
    let want = lin.forward(&x)?;
    let layer = FourierLinear::new(lin, &config)?;
    assert_eq!(f32s(&layer.forward(&x)?)?, f32s(&want)?);
    Ok(())
}

#[test]
fn multiple_adapters_activate_disable_delete() -> anyhow::Result<()> {
    let lin = base(6, 8, false)?;
    let x = Tensor::from_vec(lcg_coeffs(16, 2), (2, 8), &Device::Cpu)?;
    let y0 = lin.forward(&x)?;
    let layer = FourierLinear::new(lin, &cfg(5))?;
    layer.add_adapter(
        "other",
        &FourierFTConfig {
            random_loc_seed: 1,
            ..cfg(7)
        },
    )?;
    assert_eq!(layer.adapter_names(), vec!["default", "other"]);
    assert_eq!(layer.active_adapters(), vec!["default".to_string()]);
    // Only the active adapter trains: the count agrees with trainable_vars.
    assert_eq!(layer.num_trainable(), 5);
    assert_eq!(layer.trainable_vars().len(), 1);
    let d_a = layer.adapter("default")?.delta_weight()?;
    let d_b = layer.adapter("other")?.delta_weight()?;

    layer.set_active_adapters(&["default", "other"])?;
    assert_eq!(layer.num_trainable(), 12);
    let want = (&y0 + x.matmul(&(d_a + &d_b)?.t()?)?)?;
    assert_close(
        &f32s(&layer.forward(&x)?)?,
        &to_f64(&want)?,
        1e-5,
        "two adapters",
    );
    assert_eq!(layer.trainable_vars().len(), 2);

    layer.disable_adapters()?;
    assert_eq!(f32s(&layer.forward(&x)?)?, f32s(&y0)?);
    layer.enable_adapters();

    layer.merge()?;
    assert!(matches!(
        layer.delete_adapter("other"),
        Err(Error::MergeState { .. })
    ));
    assert!(matches!(
        layer.set_active_adapters(&["other"]),
        Err(Error::MergeState { .. })
    ));
    assert!(matches!(
        layer.disable_adapters(),
        Err(Error::MergeState { .. })
    ));
    layer.unmerge()?;

    layer.delete_adapter("default")?;
    assert_eq!(layer.active_adapters(), vec!["other".to_string()]);
    let want = (&y0 + x.matmul(&d_b.t()?)?)?;
    assert_close(
        &f32s(&layer.forward(&x)?)?,
        &to_f64(&want)?,
        1e-5,
        "after delete",
    );
    assert!(matches!(
        layer.set_active_adapters(&["nope"]),
        Err(Error::UnknownAdapter { .. })
    ));
    assert!(matches!(
        layer.add_adapter("other", &cfg(3)),
        Err(Error::AdapterExists { .. })
    ));
    Ok(())
}

#[test]
fn safe_merge_refuses_non_finite_and_leaves_weight() -> anyhow::Result<()> {
    let layer = FourierLinear::new(base(5, 4, false)?, &cfg(3))?;
    let w0 = f32s(&layer.weight())?;
    layer.set_spectrum(
        "default",
        &Tensor::new(&[1f32, f32::NAN, 0.0], &Device::Cpu)?,
    )?;
    let err = layer.safe_merge().expect_err("NaN must be refused");
    assert!(matches!(err, Error::NonFinite { .. }), "{err}");
    assert!(!layer.is_merged());
    assert_eq!(
        f32s(&layer.weight())?
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<_>>(),
        w0.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
    layer.set_spectrum(
        "default",
        &Tensor::new(&[1f32, f32::INFINITY, 0.0], &Device::Cpu)?,
    )?;
    assert!(matches!(layer.safe_merge(), Err(Error::NonFinite { .. })));
    layer.set_spectrum("default", &Tensor::new(&[1f32, 2.0, 0.0], &Device::Cpu)?)?;
    layer.safe_merge()?;
    assert!(layer.is_merged());
    Ok(())
}

#[test]
fn bad_input_is_a_typed_error() -> anyhow::Result<()> {
    let n0 = FourierLinear::new(base(4, 3, false)?, &cfg(0));
    assert!(matches!(n0, Err(Error::Config(_))), "{n0:?}");
    let too_many = FourierLinear::new(base(4, 3, false)?, &cfg(13));
    match too_many {
        Err(Error::EntryCount {
            n: 13,
            max: 12,
            d1: 4,
            d2: 3,
            ref context,
        }) => {
            assert!(context.contains("default"), "{context}")
        }
        other => panic!("expected EntryCount, got {other:?}"),
    }
    let layer = FourierLinear::new(base(4, 3, false)?, &cfg(12))?;
    let wrong_width = layer.try_forward(&Tensor::zeros((2, 5), DType::F32, &Device::Cpu)?);
    let msg = wrong_width.expect_err("wrong width").to_string();
    assert!(msg.contains("[2, 5]") && msg.contains('3'), "{msg}");
    let one_d = layer.forward(&Tensor::zeros(3, DType::F32, &Device::Cpu)?);
    assert!(one_d.expect_err("1-D").to_string().contains("[3]"));
    let dup = FourierFTConfig {
        entry_sampling: EntrySampling::Explicit(vec![(0, 1), (2, 2), (0, 1)]),
        ..cfg(3)
    };
    assert!(matches!(
        FourierLinear::new(base(4, 3, false)?, &dup),
        Err(Error::DuplicateEntry { .. })
    ));
    let bad_spec = FourierLinear::new(base(4, 3, false)?, &cfg(4))?
        .set_spectrum("default", &Tensor::zeros(5, DType::F32, &Device::Cpu)?);
    assert!(matches!(bad_spec, Err(Error::Shape { .. })));
    let bad_bias = FourierLinear::from_parts(
        Tensor::zeros((4, 3), DType::F32, &Device::Cpu)?,
        Some(Tensor::zeros(3, DType::F32, &Device::Cpu)?),
        false,
    );
    assert!(matches!(bad_bias, Err(Error::Shape { .. })));
    Ok(())
}

#[test]
fn half_precision_bases_work() -> anyhow::Result<()> {
    for dtype in [DType::BF16, DType::F16, DType::F64] {
        let lin = base(12, 10, true)?;
        let lin = Linear::new(
            lin.weight().to_dtype(dtype)?,
            lin.bias().map(|b| b.to_dtype(dtype)).transpose()?,
        );
        let layer = FourierLinear::new(lin, &cfg(20))?;
        let x = Tensor::from_vec(lcg_coeffs(30, 3), (3, 10), &Device::Cpu)?.to_dtype(dtype)?;
        let y = layer.forward(&x)?;
        assert_eq!(y.dtype(), dtype);
        layer.merge()?;
        assert_eq!(layer.weight().dtype(), dtype);
        let ym = layer.forward(&x)?;
        let diff = (y.to_dtype(DType::F32)? - ym.to_dtype(DType::F32)?)?
            .abs()?
            .max_keepdim(D::Minus1)?;
        let scale = y
            .to_dtype(DType::F32)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(
            diff.max_all()?.to_scalar::<f32>()? <= 2e-2 * scale.max(1.0),
            "{dtype:?}"
        );
    }
    Ok(())
}
