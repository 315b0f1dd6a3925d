//! The dtype matrix: base weights in f32, f16, bf16 and f64 through the forward pass (dense and
//! spectral), merge, unmerge, and save/load of PEFT directories, each against an f64 reference
//! with a tolerance suited to the dtype.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use common::{assert_near, f64s, lcg_coeffs, max_abs, reference_delta_weight};
use fourierft::config::ModuleSelector;
use fourierft::inject::{self, AdaptableLinear, AdapterContext};
use fourierft::peft::{merge_safetensors, PeftAdapter};
use fourierft::{ForwardMode, FourierFTConfig, FourierLinear};

const DTYPES: [DType; 4] = [DType::F32, DType::F16, DType::BF16, DType::F64];
const D1: usize = 24;
const D2: usize = 20;
const N: usize = 40;
const ALPHA: f64 = 150.0;

/// Relative precision of a dtype (its machine epsilon), and the error allowed for values that
/// went through a dot product of `D2` terms and a rounding to that dtype.
fn eps(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => f64::EPSILON,
        DType::F32 => f32::EPSILON as f64,
        DType::F16 => 9.77e-4,
        DType::BF16 => 7.81e-3,
        other => panic!("{other:?}"),
    }
}

/// Tolerance relative to the largest magnitude involved. ΔW itself is computed in f32 for every
/// dtype, so f64 gets f32's precision for the adapter part.
fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F64 | DType::F32 => 2e-5,
        d => 8.0 * eps(d),
    }
}

/// The layer's W0, bias and input in `dtype`, and the f64 values they hold after rounding.
struct Case {
    w0: Tensor,
    bias: Tensor,
    x: Tensor,
}

impl Case {
    fn new(dtype: DType) -> anyhow::Result<Self> {
        let dev = Device::Cpu;
        let t = |v: Vec<f32>, shape: &[usize]| -> anyhow::Result<Tensor> {
            Ok(Tensor::from_vec(v, shape, &dev)?.to_dtype(dtype)?)
        };
        Ok(Self {
            w0: t(lcg_coeffs(D1 * D2, 1), &[D1, D2])?,
            bias: t(lcg_coeffs(D1, 2), &[D1])?,
            x: t(lcg_coeffs(3 * 2 * D2, 3), &[3, 2, D2])?,
        })
    }

    /// `y = x·(W0 + ΔW)ᵀ + b` in f64 from the rounded inputs and the reference ΔW.
    fn reference(&self, dw: &[f64]) -> Vec<f64> {
        let (w0, b, x) = (f64s(&self.w0), f64s(&self.bias), f64s(&self.x));
        let mut y = Vec::with_capacity(x.len() / D2 * D1);
        for row in x.chunks(D2) {
            for j in 0..D1 {
                let w = |k: usize| w0[j * D2 + k] + dw[j * D2 + k];
                y.push(b[j] + (0..D2).map(|k| w(k) * row[k]).sum::<f64>());
            }
        }
        y
    }
}

fn config() -> FourierFTConfig {
    FourierFTConfig {
        n_frequency: N,
        scaling: ALPHA,
        init_seed: Some(7),
        ..Default::default()
    }
}

/// The reference ΔW of a layer's default adapter, from its current coefficients.
fn reference_dw(layer: &FourierLinear) -> anyhow::Result<Vec<f64>> {
    let a = layer.adapter("default")?;
    let c = a.spectrum().as_tensor().to_vec1::<f32>()?;
    let e = a.entries();
    Ok(reference_delta_weight(
        D1,
        D2,
        e.rows(),
        e.cols(),
        &c,
        a.scaling(),
    ))
}

#[test]
fn forward_merge_unmerge_in_every_dtype() -> anyhow::Result<()> {
    for dtype in DTYPES {
        let case = Case::new(dtype)?;
        let layer = FourierLinear::from_parts(case.w0.clone(), Some(case.bias.clone()), false)?;
        layer.add_adapter("default", &config())?;
        let dw = reference_dw(&layer)?;
        let want = case.reference(&dw);
        let tol = tol(dtype);

        for mode in [ForwardMode::Dense, ForwardMode::Spectral, ForwardMode::Auto] {
            layer.set_forward_mode(mode);
            let y = layer.forward(&case.x)?;
            assert_eq!(y.dtype(), dtype, "{dtype:?} {mode:?}");
            assert_eq!(y.dims(), &[3, 2, D1]);
            assert_near(
                &f64s(&y),
                &want,
                tol,
                &format!("{dtype:?} {mode:?} forward"),
            );
        }

        layer.merge()?;
        let merged = layer.weight();
        assert_eq!(merged.dtype(), dtype, "{dtype:?} merged weight");
        let w0 = f64s(&case.w0);
        let want_w: Vec<f64> = w0.iter().zip(&dw).map(|(a, b)| a + b).collect();
        // One rounding of W0 + ΔW to the dtype (ΔW in f32).
        let w_tol = 2.0 * eps(dtype).max(f32::EPSILON as f64);
        assert_near(
            &f64s(&merged),
            &want_w,
            w_tol,
            &format!("{dtype:?} merged weight"),
        );
        let y = layer.forward(&case.x)?;
        assert_eq!(y.dtype(), dtype);
        assert_near(&f64s(&y), &want, tol, &format!("{dtype:?} merged forward"));

        layer.unmerge()?;
        let back = layer.weight();
        assert_eq!(back.dtype(), dtype);
        // Two roundings, each relative to |W0 + ΔW|.
        let scale = max_abs(&want_w) / max_abs(&w0);
        assert_near(
            &f64s(&back),
            &w0,
            2.0 * w_tol * scale.max(1.0),
            &format!("{dtype:?} unmerged weight"),
        );
        if matches!(dtype, DType::F32 | DType::F64) {
            let diff = max_abs(
                &f64s(&back)
                    .iter()
                    .zip(&w0)
                    .map(|(a, b)| a - b)
                    .collect::<Vec<_>>(),
            );
            assert!(diff < 1e-5, "{dtype:?} unmerge: {diff}");
        }
    }
    Ok(())
}

#[test]
fn fan_in_fan_out_weights_in_every_dtype() -> anyhow::Result<()> {
    for dtype in DTYPES {
        let case = Case::new(dtype)?;
        let layer = FourierLinear::from_parts(case.w0.t()?.contiguous()?, Some(case.bias), true)?;
        layer.add_adapter(
            "default",
            &FourierFTConfig {
                fan_in_fan_out: true,
                ..config()
            },
        )?;
        let dw = reference_dw(&layer)?;
        let (w0, x) = (f64s(&case.w0), f64s(&case.x));
        let y = layer.forward(&case.x)?;
        layer.merge()?;
        assert_eq!(layer.weight().dims(), &[D2, D1]);
        let ym = layer.forward(&case.x)?;
        let want_w: Vec<f64> = (0..D2 * D1)
            .map(|i| {
                let (k, j) = (i / D1, i % D1);
                w0[j * D2 + k] + dw[j * D2 + k]
            })
            .collect();
        let w_tol = 2.0 * eps(dtype).max(f32::EPSILON as f64);
        assert_near(
            &f64s(&layer.weight()),
            &want_w,
            w_tol,
            &format!("{dtype:?}"),
        );
        assert_near(
            &f64s(&ym),
            &f64s(&y),
            tol(dtype),
            &format!("{dtype:?} merged"),
        );
        assert_eq!(x.len(), 3 * 2 * D2);
    }
    Ok(())
}

/// A model of one adapted and one plain layer, built through `inject` in the base's dtype.
struct Model {
    fc1: AdaptableLinear,
    fc2: AdaptableLinear,
}

impl Model {
    fn new(vb: VarBuilder) -> fourierft::Result<Self> {
        Ok(Self {
            fc1: inject::linear(D2, D1, vb.pp("fc1"))?,
            fc2: inject::linear(D1, 8, vb.pp("fc2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.fc2.forward(&self.fc1.forward(x)?)
    }
}

fn base_tensors(dtype: DType) -> anyhow::Result<HashMap<String, Tensor>> {
    let dev = Device::Cpu;
    let t = |v: Vec<f32>, shape: &[usize]| -> anyhow::Result<Tensor> {
        Ok(Tensor::from_vec(v, shape, &dev)?.to_dtype(dtype)?)
    };
    Ok([
        ("fc1.weight", t(lcg_coeffs(D1 * D2, 11), &[D1, D2])?),
        ("fc1.bias", t(lcg_coeffs(D1, 12), &[D1])?),
        ("fc2.weight", t(lcg_coeffs(8 * D1, 13), &[8, D1])?),
        ("fc2.bias", t(lcg_coeffs(8, 14), &[8])?),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect())
}

#[test]
fn save_load_and_file_merge_in_every_dtype() -> anyhow::Result<()> {
    for dtype in DTYPES {
        let base = base_tensors(dtype)?;
        let vb = || VarBuilder::from_tensors(base.clone(), dtype, &Device::Cpu);
        let ctx = AdapterContext::new(FourierFTConfig {
            target_modules: Some(ModuleSelector::Names(vec!["fc1".into()])),
            ..config()
        })?;
        let model = Model::new(ctx.var_builder(vb()))?;
        ctx.check()?;
        let x = Tensor::from_vec(lcg_coeffs(4 * D2, 15), (4, D2), &Device::Cpu)?.to_dtype(dtype)?;
        let y = model.forward(&x)?;
        assert_eq!(y.dtype(), dtype);

        // Save: spectra are f32 on disk whatever the base dtype.
        let tmp = tempfile::tempdir()?;
        let dir = ctx.save_pretrained(tmp.path())?;
        let saved = PeftAdapter::load(&dir)?;
        assert_eq!(saved.spectrum("fc1").expect("fc1").dtype(), DType::F32);
        let st =
            candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu)?;
        assert_eq!(
            st["base_model.model.fc1.fourierft_spectrum"].dtype(),
            DType::F32
        );

        // Load into a fresh model in the same dtype: the same outputs, bit for bit.
        let loaded = AdapterContext::load(&dir)?;
        let again = Model::new(loaded.var_builder(vb()))?;
        loaded.check()?;
        let y2 = again.forward(&x)?;
        assert_eq!(f64s(&y2), f64s(&y), "{dtype:?} reloaded forward");

        // Merge the saved adapter into a checkpoint in this dtype: dtype kept, values as the
        // layer merges them.
        std::fs::create_dir_all(tmp.path().join("ckpt"))?;
        let ckpt = tmp.path().join("ckpt/base.safetensors");
        candle_core::safetensors::save(&base, &ckpt)?;
        let out = tmp.path().join("ckpt/merged.safetensors");
        let summary = merge_safetensors(&ckpt, &saved, "", &out)?;
        assert_eq!(summary.merged, vec![("fc1.weight".to_string(), false)]);
        let merged = candle_core::safetensors::load(&out, &Device::Cpu)?;
        assert_eq!(merged["fc1.weight"].dtype(), dtype);
        assert_eq!(merged["fc2.weight"].dtype(), dtype);
        assert_eq!(f64s(&merged["fc2.weight"]), f64s(&base["fc2.weight"]));
        loaded.merge()?;
        let layer = loaded.layer("fc1").expect("fc1");
        let w_tol = 2.0 * eps(dtype).max(f32::EPSILON as f64);
        assert_near(
            &f64s(&merged["fc1.weight"]),
            &f64s(&layer.weight()),
            w_tol,
            &format!("{dtype:?} file merge vs layer merge"),
        );
        // The merged model computes what the unmerged one did.
        let ym = again.forward(&x)?;
        assert_near(
            &f64s(&ym),
            &f64s(&y),
            tol(dtype) * 4.0,
            &format!("{dtype:?} merged model"),
        );
        loaded.unmerge()?;
    }
    Ok(())
}
