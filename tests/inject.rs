//! Model-level injection: `AdapterContext` + `inject::linear` on a model with no FourierFT code.

mod common;

use common::max_diff;
use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use fourierft::config::{Bias, ModuleSelector};
use fourierft::inject::{self, AdaptableLinear, AdapterContext};
use fourierft::peft::{PeftAdapter, WEIGHTS_FILE};
use fourierft::{Error, FourierFTConfig};

/// A model written once against `inject::linear`.
struct Mlp {
    fc1: AdaptableLinear,
    fc2: AdaptableLinear,
    out: AdaptableLinear,
}

impl Mlp {
    fn new(vb: VarBuilder) -> fourierft::Result<Self> {
        Ok(Self {
            fc1: inject::linear(12, 20, vb.pp("blocks").pp(0).pp("fc1"))?,
            fc2: inject::linear(20, 12, vb.pp("blocks").pp(0).pp("fc2"))?,
            out: inject::linear_no_bias(12, 3, vb.pp("out"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.fc2.forward(&self.fc1.forward(x)?.tanh()?)?;
        self.out.forward(&(x + h)?)
    }
}

fn targets(names: &[&str]) -> Option<ModuleSelector> {
    Some(ModuleSelector::Names(
        names.iter().map(|s| s.to_string()).collect(),
    ))
}

fn config() -> FourierFTConfig {
    FourierFTConfig {
        target_modules: targets(&["fc1", "fc2"]),
        n_frequency: 40,
        scaling: 50.0,
        init_seed: Some(3),
        ..Default::default()
    }
}

/// Pretrained-looking base weights.
fn base_tensors() -> anyhow::Result<HashMap<String, Tensor>> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    Mlp::new(vb)?;
    let data = varmap.data().lock().expect("varmap");
    Ok(data
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().copy().expect("copy")))
        .collect())
}

fn base_vb(t: &HashMap<String, Tensor>) -> VarBuilder<'static> {
    VarBuilder::from_tensors(t.clone(), DType::F32, &Device::Cpu)
}

fn input() -> anyhow::Result<Tensor> {
    common::randn(7, 1.0, (4, 7, 12))
}

#[test]
fn without_a_context_the_constructors_are_candle_nn_linear() -> anyhow::Result<()> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = Mlp::new(vb.clone())?;
    assert!(AdapterContext::from_var_builder(&vb).is_none());
    assert!(model.fc1.fourier().is_none());
    // Same variables as candle_nn::linear, trainable through the VarMap.
    let mut names: Vec<String> = varmap
        .data()
        .lock()
        .expect("varmap")
        .keys()
        .cloned()
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "blocks.0.fc1.bias",
            "blocks.0.fc1.weight",
            "blocks.0.fc2.bias",
            "blocks.0.fc2.weight",
            "out.weight"
        ]
    );
    let reference = candle_nn::linear(12, 20, vb.pp("blocks.0.fc1"))?;
    let x = input()?;
    assert_eq!(
        max_diff(&model.fc1.forward(&x)?, &reference.forward(&x)?)?,
        0.0
    );
    Ok(())
}

#[test]
fn the_context_adapts_targeted_paths_and_travels_with_the_var_builder() -> anyhow::Result<()> {
    let base = base_tensors()?;
    let ctx = AdapterContext::new(config())?;
    let vb = ctx.var_builder(base_vb(&base));
    assert!(AdapterContext::from_var_builder(&vb.pp("a").pp("b")).is_some());
    let model = Mlp::new(vb)?;
    ctx.check()?;
    assert_eq!(ctx.layer_paths(), ["blocks.0.fc1", "blocks.0.fc2"]);
    assert!(model.out.fourier().is_none());
    let fc1 = model.fc1.fourier().expect("fc1 adapted");
    assert_eq!(fc1.name(), "blocks.0.fc1");
    assert_eq!(fc1.adapter_names(), ["default"]);
    assert_eq!(ctx.num_trainable(), 80);
    assert_eq!(ctx.trainable_vars().len(), 2);
    // Base weights are the pretrained ones, frozen.
    assert_eq!(max_diff(&fc1.weight(), &base["blocks.0.fc1.weight"])?, 0.0);
    // Building the same path again shares the layer.
    let again = inject::linear(12, 20, ctx.var_builder(base_vb(&base)).pp("blocks.0.fc1"))?;
    let again = again.fourier().expect("adapted");
    again.set_spectrum("default", &Tensor::zeros(40, DType::F32, &Device::Cpu)?)?;
    let spectrum = fc1.adapter("default")?.spectrum().as_tensor().clone();
    assert_eq!(spectrum.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
    Ok(())
}

#[test]
fn train_save_load_merge_round_trip() -> anyhow::Result<()> {
    let base = base_tensors()?;
    let cfg = FourierFTConfig {
        init_weights: true,
        ..config()
    };
    let ctx = AdapterContext::new(cfg)?;
    let model = Mlp::new(ctx.var_builder(base_vb(&base)))?;
    ctx.check()?;
    let plain = Mlp::new(base_vb(&base))?;
    let x = input()?;
    // Zero spectra: the adapted model starts as the base model.
    assert!(max_diff(&model.forward(&x)?, &plain.forward(&x)?)? < 1e-6);

    let target = (plain.forward(&x)? * 1.5)?;
    let mut opt = candle_nn::AdamW::new_lr(ctx.trainable_vars(), 0.05)?;
    let loss =
        |m: &Mlp| -> anyhow::Result<Tensor> { Ok((m.forward(&x)? - &target)?.sqr()?.mean_all()?) };
    let first = loss(&model)?.to_scalar::<f32>()?;
    for _ in 0..15 {
        opt.backward_step(&loss(&model)?)?;
    }
    let last = loss(&model)?.to_scalar::<f32>()?;
    assert!(last < 0.9 * first, "loss {first} -> {last}");
    let fc1 = model.fc1.fourier().expect("adapted");
    assert_eq!(max_diff(&fc1.weight(), &base["blocks.0.fc1.weight"])?, 0.0);

    let y = model.forward(&x)?;
    let tmp = tempfile::tempdir()?;
    let dir = ctx.save_pretrained(tmp.path())?;
    let loaded = AdapterContext::load(&dir)?;
    let model2 = Mlp::new(loaded.var_builder(base_vb(&base)))?;
    loaded.check()?;
    assert!(max_diff(&model2.forward(&x)?, &y)? < 1e-6);
    loaded.merge()?;
    assert!(loaded.layers().iter().all(|l| l.is_merged()));
    assert!(max_diff(&model2.forward(&x)?, &y)? < 1e-4);
    loaded.unmerge()?;
    assert!(max_diff(&model2.forward(&x)?, &y)? < 1e-5);
    Ok(())
}

#[test]
fn named_adapters_and_biases_are_saved_as_peft_does() -> anyhow::Result<()> {
    let base = base_tensors()?;
    let cfg = FourierFTConfig {
        bias: Bias::FourierOnly,
        ..config()
    };
    let ctx = AdapterContext::with_name("task_a", cfg)?;
    let model = Mlp::new(ctx.var_builder(base_vb(&base)))?;
    assert_eq!(
        model.fc2.fourier().expect("adapted").adapter_names(),
        ["task_a"]
    );
    let tmp = tempfile::tempdir()?;
    let dir = ctx.save_pretrained(tmp.path())?;
    assert_eq!(dir, tmp.path().join("task_a"));
    let st = candle_core::safetensors::load(dir.join(WEIGHTS_FILE), &Device::Cpu)?;
    let mut keys: Vec<&String> = st.keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "base_model.model.blocks.0.fc1.base_layer.bias",
            "base_model.model.blocks.0.fc1.fourierft_spectrum",
            "base_model.model.blocks.0.fc2.base_layer.bias",
            "base_model.model.blocks.0.fc2.fourierft_spectrum"
        ]
    );
    let back = AdapterContext::load_named(tmp.path(), "task_a")?;
    let model2 = Mlp::new(back.var_builder(base_vb(&base)))?;
    back.check()?;
    let x = input()?;
    assert!(max_diff(&model2.forward(&x)?, &model.forward(&x)?)? < 1e-6);
    Ok(())
}

#[test]
fn loaded_extra_tensors_replace_base_tensors() -> anyhow::Result<()> {
    let base = base_tensors()?;
    let ctx = AdapterContext::new(FourierFTConfig {
        modules_to_save: Some(vec!["out".into()]),
        ..config()
    })?;
    Mlp::new(ctx.var_builder(base_vb(&base)))?;
    let trained_head = Tensor::ones((3, 12), DType::F32, &Device::Cpu)?;
    let mut adapter = ctx.to_adapter()?;
    adapter = PeftAdapter::new(
        adapter.config().clone(),
        adapter.spectra().clone(),
        [("out.weight".to_string(), trained_head.clone())].into(),
    )?;
    let loaded = AdapterContext::from_adapter("default", adapter);
    let model = Mlp::new(loaded.var_builder(base_vb(&base)))?;
    loaded.check()?;
    let AdaptableLinear::Base(out) = &model.out else {
        panic!("modules_to_save must not be adapted");
    };
    assert_eq!(max_diff(out.weight(), &trained_head)?, 0.0);
    Ok(())
}

#[test]
fn mismatches_between_model_and_adapter_are_reported() -> anyhow::Result<()> {
    let base = base_tensors()?;
    // Nothing matched.
    let ctx = AdapterContext::new(FourierFTConfig {
        target_modules: targets(&["q_proj"]),
        ..config()
    })?;
    Mlp::new(ctx.var_builder(base_vb(&base)))?;
    let e = ctx.check().unwrap_err();
    assert!(matches!(e, Error::Config(_)));
    assert!(
        e.to_string()
            .contains("matched none of the 3 linear layers"),
        "{e}"
    );
    assert!(e.to_string().contains("blocks.0.fc1"), "{e}");

    // A saved adapter with more layers than the model builds (unmatched tensor).
    let ctx = AdapterContext::new(config())?;
    Mlp::new(ctx.var_builder(base_vb(&base)))?;
    let tmp = tempfile::tempdir()?;
    ctx.save_pretrained(tmp.path())?;
    let loaded = AdapterContext::load(tmp.path())?;
    inject::linear(
        12,
        20,
        loaded.var_builder(base_vb(&base)).pp("blocks.0.fc1"),
    )?;
    let e = loaded.check().unwrap_err();
    assert!(matches!(e, Error::File { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(WEIGHTS_FILE) && msg.contains("unmatched tensor"),
        "{msg}"
    );
    assert!(
        msg.contains("base_model.model.blocks.0.fc2.fourierft_spectrum"),
        "{msg}"
    );

    // The model builds a targeted layer the saved adapter has no spectrum for.
    let one = AdapterContext::new(FourierFTConfig {
        target_modules: targets(&["fc1"]),
        ..config()
    })?;
    Mlp::new(one.var_builder(base_vb(&base)))?;
    let a = one.to_adapter()?;
    let widened = PeftAdapter::new(
        FourierFTConfig {
            target_modules: targets(&["fc1", "fc2"]),
            ..a.config().clone()
        },
        a.spectra().clone(),
        Default::default(),
    )?;
    let ctx = AdapterContext::from_adapter("default", widened);
    let e = Mlp::new(ctx.var_builder(base_vb(&base)))
        .err()
        .expect("missing spectrum");
    assert!(
        e.to_string()
            .contains("missing tensor \"base_model.model.blocks.0.fc2.fourierft_spectrum\""),
        "{e}"
    );

    // More entries than the layer has.
    let ctx = AdapterContext::new(FourierFTConfig {
        n_frequency_pattern: vec![("fc2".into(), 241)],
        ..config()
    })?;
    let e = Mlp::new(ctx.var_builder(base_vb(&base)))
        .err()
        .expect("n too large");
    assert!(matches!(e, Error::EntryCount { .. }), "{e}");
    assert!(e.to_string().contains("blocks.0.fc2"), "{e}");

    // An extra tensor the model never loads.
    let a = ctx_with_extra(&base, "nothing.weight")?;
    let loaded = AdapterContext::from_adapter("default", a);
    Mlp::new(loaded.var_builder(base_vb(&base)))?;
    let e = loaded.check().unwrap_err();
    assert!(
        e.to_string().contains("never loaded \"nothing.weight\""),
        "{e}"
    );
    Ok(())
}

fn ctx_with_extra(base: &HashMap<String, Tensor>, extra: &str) -> anyhow::Result<PeftAdapter> {
    let ctx = AdapterContext::new(config())?;
    Mlp::new(ctx.var_builder(base_vb(base)))?;
    let a = ctx.to_adapter()?;
    Ok(PeftAdapter::new(
        a.config().clone(),
        a.spectra().clone(),
        [(
            extra.to_string(),
            Tensor::zeros(2, DType::F32, &Device::Cpu)?,
        )]
        .into(),
    )?)
}

#[test]
fn non_peft_entry_sampling_is_not_saved_in_peft_format() -> anyhow::Result<()> {
    let base = base_tensors()?;
    let ctx = AdapterContext::new(FourierFTConfig {
        entry_sampling: fourierft::EntrySampling::FrequencyBiased {
            center: 0.0,
            width: 4.0,
        },
        ..config()
    })?;
    Mlp::new(ctx.var_builder(base_vb(&base)))?;
    let tmp = tempfile::tempdir()?;
    let e = ctx.save_pretrained(tmp.path()).unwrap_err();
    assert!(
        e.to_string().contains("cannot be saved in PEFT's format"),
        "{e}"
    );
    assert_eq!(std::fs::read_dir(tmp.path())?.count(), 0);
    Ok(())
}

#[test]
fn safe_merge_is_all_or_nothing() -> anyhow::Result<()> {
    let mut base = base_tensors()?;
    let w = &base["blocks.0.fc2.weight"];
    let mut v = w.flatten_all()?.to_vec1::<f32>()?;
    v[0] = f32::INFINITY;
    base.insert(
        "blocks.0.fc2.weight".into(),
        Tensor::from_vec(v, w.dims(), &Device::Cpu)?,
    );
    let ctx = AdapterContext::new(config())?;
    Mlp::new(ctx.var_builder(base_vb(&base)))?;
    let e = ctx.safe_merge().unwrap_err();
    assert!(matches!(e, Error::NonFinite { .. }), "{e}");
    assert!(e.to_string().contains("blocks.0.fc2"), "{e}");
    assert!(ctx.layers().iter().all(|l| !l.is_merged()));

    // A layer merged before the call stays merged when a later layer fails: only what this call
    // merged is rolled back.
    let first = ctx.layers()[0].clone();
    assert_ne!(first.name(), "blocks.0.fc2");
    first.merge()?;
    let e = ctx.safe_merge().unwrap_err();
    assert!(matches!(e, Error::NonFinite { .. }), "{e}");
    assert!(
        first.is_merged(),
        "a layer merged before safe_merge was unmerged"
    );
    assert_eq!(ctx.layers().iter().filter(|l| l.is_merged()).count(), 1);
    Ok(())
}
