//! Every numeric path a GPU user takes, on the device named by `FOURIERFT_TEST_DEVICE` (`cpu` by
//! default; `scripts/gpu-check.sh` runs this file with `cuda`): ΔW, its gradient, the adapted
//! layer's forward and training gradient in f32 and bf16, merge and unmerge — each against the
//! naive f64 cosine sums, never against another path of this crate.

mod common;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::Linear;
use common::{assert_near, f64s, lcg_coeffs, reference_delta_weight, test_device};
use fourierft::ops::DeltaWeight;
use fourierft::{ForwardMode, FourierFTConfig, FourierLinear, SpectralEntries};

/// Odd, even, prime, non-square and 1×N shapes.
const SHAPES: &[(usize, usize)] = &[
    (1, 9),
    (9, 1),
    (2, 2),
    (5, 8),
    (8, 5),
    (13, 17),
    (16, 16),
    (31, 64),
];

fn n_for(d1: usize, d2: usize) -> usize {
    (d1 * d2).clamp(1, 40)
}

/// `dL/dc_l = alpha/(d1·d2) · Σ_jk R[j,k] · cos(2π(u_l j/d1 + v_l k/d2))` for `L = Σ ΔW ∘ R`.
fn reference_coeff_grad(e: &SpectralEntries, r: &[f64], alpha: f64) -> Vec<f64> {
    let (d1, d2) = e.shape();
    (0..e.len())
        .map(|l| {
            let mut one_hot = vec![0f32; e.len()];
            one_hot[l] = 1.0;
            let basis = reference_delta_weight(d1, d2, e.rows(), e.cols(), &one_hot, alpha);
            basis.iter().zip(r).map(|(b, r)| b * r).sum()
        })
        .collect()
}

#[test]
fn delta_weight_and_its_gradient_on_the_device() -> anyhow::Result<()> {
    let dev = test_device();
    for &(d1, d2) in SHAPES {
        let n = n_for(d1, d2);
        let e = SpectralEntries::uniform(d1, d2, n, 2024)?;
        let c = lcg_coeffs(n, (d1 * 100 + d2) as u64);
        let alpha = 150.0;
        let what = format!("{d1}x{d2} n={n} on {dev:?}");
        let cv = Var::from_tensor(&Tensor::new(c.as_slice(), &dev)?)?;
        let dw = DeltaWeight::new(e.clone()).forward(cv.as_tensor(), alpha)?;
        assert!(dw.device().same_device(&dev), "{what}: ΔW left the device");
        let want = reference_delta_weight(d1, d2, e.rows(), e.cols(), &c, alpha);
        assert_near(&f64s(&dw), &want, 1e-5, &format!("ΔW {what}"));

        let r = lcg_coeffs(d1 * d2, 7);
        let rt = Tensor::from_vec(r.clone(), (d1, d2), &dev)?;
        let grads = (dw * rt)?.sum_all()?.backward()?;
        let g = grads.get(cv.as_tensor()).expect("gradient of c");
        let r64: Vec<f64> = r.iter().map(|&x| x as f64).collect();
        let want = reference_coeff_grad(&e, &r64, alpha);
        assert_near(&f64s(g), &want, 1e-5, &format!("dL/dc {what}"));
    }
    Ok(())
}

/// The layer's unmerged forward, its coefficient gradient, merge and unmerge on the device, for
/// f32 and bf16 weights, against `x·(W0 + ΔW)ᵀ + b` and the gradient formed in f64.
#[test]
fn layer_forward_gradient_and_merge_on_the_device() -> anyhow::Result<()> {
    let dev = test_device();
    for dtype in [DType::F32, DType::BF16] {
        // bf16 keeps 8 significant bits; f32 paths are held to f32 accuracy.
        let tol = if dtype == DType::F32 { 2e-5 } else { 1.6e-2 };
        for &(d1, d2) in &[(13usize, 17usize), (16, 16), (1, 9), (24, 20)] {
            let n = n_for(d1, d2);
            let what = format!("{d1}x{d2} {dtype:?} on {dev:?}");
            let on = |v: Vec<f32>, shape: &[usize]| -> anyhow::Result<Tensor> {
                Ok(Tensor::from_vec(v, shape, &dev)?.to_dtype(dtype)?)
            };
            let w0 = on(
                lcg_coeffs(d1 * d2, 11).iter().map(|x| x * 0.1).collect(),
                &[d1, d2],
            )?;
            let b = on(lcg_coeffs(d1, 12), &[d1])?;
            let x = on(lcg_coeffs(3 * d2, 13), &[3, d2])?;
            let config = FourierFTConfig {
                n_frequency: n,
                scaling: 50.0,
                init_weights: false,
                init_seed: Some(3),
                ..Default::default()
            };
            let layer = FourierLinear::new(Linear::new(w0.clone(), Some(b.clone())), &config)?;
            layer.set_forward_mode(ForwardMode::Auto);
            let a = layer.adapter("default")?;
            let (e, c) = (
                a.entries().clone(),
                a.spectrum().as_tensor().to_vec1::<f32>()?,
            );
            let dw = reference_delta_weight(d1, d2, e.rows(), e.cols(), &c, a.scaling());
            let (w, bv, xv) = (f64s(&w0), f64s(&b), f64s(&x));
            let mut want = vec![0f64; 3 * d1];
            for t in 0..3 {
                for j in 0..d1 {
                    want[t * d1 + j] = bv[j]
                        + (0..d2)
                            .map(|k| xv[t * d2 + k] * (w[j * d2 + k] + dw[j * d2 + k]))
                            .sum::<f64>();
                }
            }
            let y = layer.forward(&x)?;
            assert_eq!(y.dtype(), dtype, "{what}");
            assert!(
                y.device().same_device(&dev),
                "{what}: output left the device"
            );
            assert_near(&f64s(&y), &want, tol, &format!("unmerged forward {what}"));

            // L = Σ y: dL/dc_l = Σ_t Σ_jk x[t,k] · basis_l[j,k].
            let grads = y.to_dtype(DType::F32)?.sum_all()?.backward()?;
            let g = grads.get(a.spectrum().as_tensor()).expect("gradient of c");
            let mut r = vec![0f64; d1 * d2];
            for t in 0..3 {
                for j in 0..d1 {
                    for k in 0..d2 {
                        r[j * d2 + k] += xv[t * d2 + k];
                    }
                }
            }
            let want_g = reference_coeff_grad(&e, &r, a.scaling());
            assert_near(&f64s(g), &want_g, tol.max(1e-4), &format!("dL/dc {what}"));

            layer.merge()?;
            assert_near(
                &f64s(&layer.forward(&x)?),
                &want,
                tol,
                &format!("merged {what}"),
            );
            let merged: Vec<f64> = w.iter().zip(&dw).map(|(w, d)| w + d).collect();
            assert_near(
                &f64s(&layer.weight()),
                &merged,
                tol,
                &format!("merged W {what}"),
            );
            layer.unmerge()?;
            // bf16 unmerge subtracts ΔW from a rounded sum (as PEFT's does): within one
            // rounding of the merged weight.
            let unmerged = f64s(&layer.weight());
            let worst = unmerged
                .iter()
                .zip(&w)
                .map(|(u, w)| (u - w).abs())
                .fold(0.0, f64::max);
            assert!(
                worst <= tol * common::max_abs(&merged),
                "unmerged W {what}: {worst:e}"
            );
        }
    }
    Ok(())
}

/// Off the CPU nothing needs this crate's own `cuda`/`metal` features: the ops above ran on the
/// device whatever features this test binary was built with. On the CPU this checks that the
/// device helper is the CPU by default.
#[test]
fn default_device_is_the_cpu_unless_asked() {
    if std::env::var("FOURIERFT_TEST_DEVICE").is_err() {
        assert!(matches!(test_device(), Device::Cpu));
    }
}
