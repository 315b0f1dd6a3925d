//! `MergedBackend`: merged weights for an unmodified candle-transformers model (a tiny BERT).

mod common;

use common::max_diff;
use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models::bert::{BertModel, Config};
use fourierft::backend::MergedBackend;
use fourierft::config::ModuleSelector;
use fourierft::peft::PeftAdapter;
use fourierft::{FourierFTConfig, SpectralEntries};

fn tiny_config() -> anyhow::Result<Config> {
    Ok(serde_json::from_value(serde_json::json!({
        "vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 40, "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
        "max_position_embeddings": 16, "type_vocab_size": 2, "initializer_range": 0.02,
        "layer_norm_eps": 1e-12, "pad_token_id": 0, "model_type": "bert"
    }))?)
}

/// Random "pretrained" BERT weights, names prefixed with `prefix`.
fn base_tensors(cfg: &Config, prefix: &str) -> anyhow::Result<HashMap<String, Tensor>> {
    let varmap = VarMap::new();
    BertModel::load(
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        cfg,
    )?;
    let data = varmap.data().lock().expect("varmap");
    Ok(data
        .iter()
        .map(|(k, v)| (format!("{prefix}{k}"), v.as_tensor().copy().expect("copy")))
        .collect())
}

const PATHS: [&str; 4] = [
    "encoder.layer.0.attention.self.query",
    "encoder.layer.0.attention.self.value",
    "encoder.layer.1.attention.self.query",
    "encoder.layer.1.attention.self.value",
];

fn adapter() -> anyhow::Result<PeftAdapter> {
    let config = FourierFTConfig {
        target_modules: Some(ModuleSelector::Names(vec!["query".into(), "value".into()])),
        n_frequency: 64,
        scaling: 300.0,
        random_loc_seed: 2024,
        ..Default::default()
    };
    let spectra: BTreeMap<String, Tensor> = PATHS
        .iter()
        .enumerate()
        .map(|(i, p)| Ok((p.to_string(), common::randn(i as u64, 1.0, 64)?)))
        .collect::<anyhow::Result<_>>()?;
    Ok(PeftAdapter::new(config, spectra, Default::default())?)
}

fn run(model: &BertModel) -> anyhow::Result<Tensor> {
    let ids = Tensor::new(&[[3u32, 9, 14, 2, 27, 5], [1, 2, 3, 4, 5, 6]], &Device::Cpu)?;
    Ok(model.forward(&ids, &ids.zeros_like()?, None)?)
}

#[test]
fn unmodified_bert_loads_merged_weights() -> anyhow::Result<()> {
    let cfg = tiny_config()?;
    let base = base_tensors(&cfg, "")?;
    let adapter = adapter()?;

    // Reference: W0 + ΔW computed independently from the entries and ops::delta_weight.
    let mut manual = base.clone();
    for path in PATHS {
        let name = format!("{path}.weight");
        let entries = SpectralEntries::uniform(32, 32, 64, 2024)?;
        let spectrum = adapter.spectrum(path).expect("spectrum");
        let dw = fourierft::ops::delta_weight(&entries, spectrum, 300.0)?;
        manual.insert(name.clone(), (&base[&name] + dw)?);
    }
    let reference = BertModel::load(
        VarBuilder::from_tensors(manual, DType::F32, &Device::Cpu),
        &cfg,
    )?;

    let merged = MergedBackend::new(
        VarBuilder::from_tensors(base.clone(), DType::F32, &Device::Cpu),
        adapter,
    );
    let model = BertModel::load(merged.var_builder(), &cfg)?;
    merged.check_all_used()?;
    let plain = BertModel::load(
        VarBuilder::from_tensors(base, DType::F32, &Device::Cpu),
        &cfg,
    )?;

    let (y, y_ref, y_base) = (run(&model)?, run(&reference)?, run(&plain)?);
    assert!(
        max_diff(&y, &y_ref)? < 1e-5,
        "merged backend vs manual merge"
    );
    assert!(
        max_diff(&y, &y_base)? > 1e-2,
        "the adapter must change the outputs"
    );

    // Served in the VarBuilder's dtype.
    let vb16 = merged.var_builder().to_dtype(DType::F16);
    let w = vb16.get((32, 32), "encoder.layer.0.attention.self.query.weight")?;
    assert_eq!(w.dtype(), DType::F16);
    Ok(())
}

#[test]
fn base_prefix_and_unused_adapters() -> anyhow::Result<()> {
    let cfg = tiny_config()?;
    // A checkpoint with BERT under "bert." (as BertForSequenceClassification saves it); the
    // adapter was trained on a bare BertModel.
    let base = base_tensors(&cfg, "bert.")?;
    let vb = || VarBuilder::from_tensors(base.clone(), DType::F32, &Device::Cpu);

    let merged = MergedBackend::with_base_prefix(vb(), adapter()?, "bert.");
    let model = BertModel::load(merged.var_builder(), &cfg)?;
    merged.check_all_used()?;
    let plain = BertModel::load(vb(), &cfg)?;
    assert!(max_diff(&run(&model)?, &run(&plain)?)? > 1e-2);

    // Without the prefix BERT still loads (from "bert.*") but no adapted weight is ever asked for.
    let wrong = MergedBackend::new(vb(), adapter()?);
    let model = BertModel::load(wrong.var_builder(), &cfg)?;
    assert_eq!(max_diff(&run(&model)?, &run(&plain)?)?, 0.0);
    let e = wrong.check_all_used().unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains(
            "never asked for the adapted weights [\"encoder.layer.0.attention.self.query.weight\""
        ),
        "{msg}"
    );
    // The message names the prefix that fits.
    assert!(msg.contains("use base prefix \"bert.\""), "{msg}");
    Ok(())
}

#[test]
fn bad_merges_surface_as_candle_errors_naming_the_weight() -> anyhow::Result<()> {
    let cfg = tiny_config()?;
    let mut base = base_tensors(&cfg, "")?;
    let name = "encoder.layer.1.attention.self.value.weight";
    base.insert(name.into(), (base[name].clone() * f64::INFINITY)?);
    let merged = MergedBackend::new(
        VarBuilder::from_tensors(base, DType::F32, &Device::Cpu),
        adapter()?,
    );
    let e = BertModel::load(merged.var_builder(), &cfg)
        .err()
        .expect("non-finite");
    let msg = e.to_string();
    assert!(msg.contains(name) && msg.contains("non-finite"), "{msg}");
    Ok(())
}
