//! PEFT adapter directories: configuration keys, PEFT's matching rules, save/load, bad files.
//! Fixtures come from real PEFT (`scripts/peft_roundtrip.py make`, `scripts/make_peft_fixtures.py`).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use fourierft::config::{Bias, ModuleSelector, OneOrMany};
use fourierft::peft::{ModuleMatcher, PeftAdapter, CONFIG_FILE, WEIGHTS_FILE};
use fourierft::{Error, FourierFTConfig};

fn fixtures() -> PathBuf {
    common::fixture("")
}

fn peft_adapter() -> PathBuf {
    fixtures().join("peft_roundtrip/adapter")
}

/// A copy of the PEFT adapter fixture in a fresh temporary directory.
fn copy_adapter() -> anyhow::Result<(tempfile::TempDir, PathBuf)> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("adapter");
    std::fs::create_dir(&dir)?;
    for f in [CONFIG_FILE, WEIGHTS_FILE] {
        std::fs::copy(peft_adapter().join(f), dir.join(f))?;
    }
    Ok((tmp, dir))
}

fn names(v: &[&str]) -> Option<ModuleSelector> {
    Some(ModuleSelector::Names(
        v.iter().map(|s| s.to_string()).collect(),
    ))
}

#[test]
fn matching_agrees_with_peft() -> anyhow::Result<()> {
    // PEFT's own decisions (get_peft_model on a model with these module paths).
    let text = std::fs::read_to_string(fixtures().join("peft_roundtrip/matching.json"))?;
    let doc: serde_json::Value = serde_json::from_str(&text)?;
    let cases = doc["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), 10);
    for case in cases {
        let config: FourierFTConfig = serde_json::from_value(case["config"].clone())?;
        let m = ModuleMatcher::new(&config)?;
        for (path, want) in case["n_frequency"].as_object().expect("n_frequency") {
            let want = want.as_u64().map(|n| n as usize);
            let found = m.is_target(path).then(|| m.n_frequency(path));
            assert_eq!(found, want, "{path} with {}", case["config"]);
        }
    }
    Ok(())
}

#[test]
fn loads_a_peft_saved_adapter() -> anyhow::Result<()> {
    let a = PeftAdapter::load(peft_adapter())?;
    let cfg = a.config();
    assert_eq!(
        cfg.target_modules,
        Some(ModuleSelector::Regex(r"h\.\d+\.(c_fc|c_proj|gate)".into()))
    );
    assert_eq!(
        cfg.n_frequency_pattern,
        vec![("c_proj".to_string(), 100), ("h.1.gate".to_string(), 30)]
    );
    assert_eq!(
        (cfg.n_frequency, cfg.scaling, cfg.random_loc_seed),
        (60, 87.5, 31337)
    );
    assert_eq!(cfg.bias, Bias::FourierOnly);
    assert_eq!(cfg.modules_to_save, Some(vec!["head".to_string()]));
    assert_eq!(cfg.peft_version.as_deref(), Some("0.21.2"));
    assert!(cfg.auto_mapping.is_some() && cfg.inference_mode);
    let shapes: Vec<(String, usize)> = a
        .spectra()
        .iter()
        .map(|(p, t)| (p.clone(), t.elem_count()))
        .collect();
    let want = [
        ("h.0.c_fc", 60),
        ("h.0.c_proj", 100),
        ("h.0.gate", 60),
        ("h.1.c_fc", 60),
        ("h.1.c_proj", 100),
        ("h.1.gate", 30),
    ];
    let want: Vec<(String, usize)> = want.iter().map(|(p, n)| (p.to_string(), *n)).collect();
    assert_eq!(shapes, want);
    assert_eq!(a.num_coefficients(), 410);
    // Biases of adapted layers (saved as `<path>.base_layer.bias`) and modules_to_save, named as
    // in the base model.
    let extra: Vec<&String> = a.extra_tensors().keys().collect();
    assert_eq!(
        extra,
        [
            "h.0.c_fc.bias",
            "h.0.c_proj.bias",
            "h.0.gate.bias",
            "h.1.c_fc.bias",
            "h.1.c_proj.bias",
            "h.1.gate.bias",
            "head.bias",
            "head.weight"
        ]
    );
    // The older fixture: list target_modules, exact-name n_frequency_pattern.
    let mlp = PeftAdapter::load(fixtures().join("peft_mlp/adapter"))?;
    assert_eq!(mlp.spectrum("fc2").map(|t| t.elem_count()), Some(50));
    assert_eq!(mlp.spectrum("fc1").map(|t| t.elem_count()), Some(90));
    Ok(())
}

#[test]
fn saving_a_loaded_adapter_reproduces_peft_files_byte_for_byte() -> anyhow::Result<()> {
    for dir in [peft_adapter(), fixtures().join("peft_mlp/adapter")] {
        let a = PeftAdapter::load(&dir)?;
        let tmp = tempfile::tempdir()?;
        let out = a.save(tmp.path(), "default")?;
        assert_eq!(out, tmp.path());
        for f in [CONFIG_FILE, WEIGHTS_FILE] {
            let ours = std::fs::read(out.join(f))?;
            let peft = std::fs::read(dir.join(f))?;
            assert!(ours == peft, "{}: {f} differs from PEFT's", dir.display());
        }
        // Nothing but the two files (no temporaries left behind).
        assert_eq!(std::fs::read_dir(&out)?.count(), 2);
    }
    Ok(())
}

#[test]
fn save_and_load_round_trip_with_a_named_adapter() -> anyhow::Result<()> {
    let config = FourierFTConfig {
        n_frequency: 4,
        scaling: 33.0,
        random_loc_seed: 5,
        target_modules: names(&["q", "v"]),
        layers_to_transform: Some(OneOrMany::Many(vec![0, 1])),
        layers_pattern: Some(OneOrMany::One("layers".into())),
        n_frequency_pattern: vec![("v".into(), 3)],
        task_type: Some("SEQ_CLS".into()),
        ..Default::default()
    };
    let dev = Device::Cpu;
    let spectra: BTreeMap<String, Tensor> = [
        (
            "m.layers.0.q".to_string(),
            Tensor::new(&[1f32, 2., 3., 4.], &dev)?,
        ),
        (
            "m.layers.1.v".to_string(),
            Tensor::new(&[-1f64, 0.5, 0.25], &dev)?,
        ),
    ]
    .into();
    let extra: BTreeMap<String, Tensor> = [(
        "m.layers.0.q.bias".to_string(),
        Tensor::new(&[7f32, 8.], &dev)?,
    )]
    .into();
    let a = PeftAdapter::new(config.clone(), spectra, extra)?;
    let tmp = tempfile::tempdir()?;
    let dir = a.save(tmp.path(), "second")?;
    assert_eq!(dir, tmp.path().join("second"));
    let st = candle_core::safetensors::load(dir.join(WEIGHTS_FILE), &dev)?;
    let mut keys: Vec<&String> = st.keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "base_model.model.m.layers.0.q.base_layer.bias",
            "base_model.model.m.layers.0.q.fourierft_spectrum",
            "base_model.model.m.layers.1.v.fourierft_spectrum"
        ]
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(CONFIG_FILE))?)?;
    assert_eq!(json["peft_type"], "FOURIERFT");
    assert_eq!(json["inference_mode"], true);
    assert_eq!(json["peft_version"], "0.21.2");
    assert_eq!(json["layers_to_transform"], serde_json::json!([0, 1]));
    assert_eq!(json["layers_pattern"], "layers");
    assert!(json.get("ifft2_norm").is_none() && json.get("init_seed").is_none());

    let back = PeftAdapter::load_named(tmp.path(), "second")?;
    let mut want = config;
    want.inference_mode = true;
    want.peft_version = Some("0.21.2".into());
    assert_eq!(back.config(), &want);
    assert_eq!(
        back.spectrum("m.layers.1.v").unwrap().to_vec1::<f32>()?,
        vec![-1.0, 0.5, 0.25]
    );
    assert_eq!(
        back.extra_tensors()["m.layers.0.q.bias"].to_vec1::<f32>()?,
        vec![7.0, 8.0]
    );
    Ok(())
}

#[test]
fn config_tolerates_unknown_keys_and_peft_value_forms() -> anyhow::Result<()> {
    let json = r#"{
        "peft_type": "FOURIERFT", "n_frequency": 7, "scaling": 100, "random_loc_seed": 2024,
        "target_modules": "model\\..*\\.q_proj", "exclude_modules": ["lm_head"],
        "layers_to_transform": null, "layers_pattern": null, "n_frequency_pattern": null,
        "bias": "all", "a_key_from_the_future": {"x": [1, 2]}, "ifft2_norm": "ortho",
        "megatron_config": null, "init_weights": true
    }"#;
    let cfg: FourierFTConfig = serde_json::from_str(json)?;
    assert_eq!(
        cfg.target_modules,
        Some(ModuleSelector::Regex(r"model\..*\.q_proj".into()))
    );
    assert_eq!(cfg.exclude_modules, names(&["lm_head"]));
    assert_eq!(cfg.bias, Bias::All);
    assert!(cfg.n_frequency_pattern.is_empty() && cfg.init_weights);
    assert_eq!(cfg.scaling, 100.0);
    let one: FourierFTConfig =
        serde_json::from_str(r#"{"target_modules": ["q"], "layers_to_transform": 3}"#)?;
    assert_eq!(one.layers_to_transform, Some(OneOrMany::One(3)));
    Ok(())
}

#[test]
fn config_rules_mirror_peft() {
    let bad = |cfg: FourierFTConfig, needle: &str| {
        let e = ModuleMatcher::new(&cfg).unwrap_err();
        assert!(matches!(e, Error::Config(_)), "{e}");
        assert!(e.to_string().contains(needle), "{e}");
    };
    let regex = Some(ModuleSelector::Regex(".*q".into()));
    bad(
        FourierFTConfig {
            target_modules: regex.clone(),
            layers_to_transform: Some(OneOrMany::One(0)),
            ..Default::default()
        },
        "layers_to_transform cannot be used",
    );
    bad(
        FourierFTConfig {
            target_modules: names(&["q"]),
            layers_pattern: Some(OneOrMany::One("h".into())),
            ..Default::default()
        },
        "layers_pattern requires layers_to_transform",
    );
    bad(FourierFTConfig::default(), "target_modules is not set");
    bad(
        FourierFTConfig {
            target_modules: Some(ModuleSelector::Regex("all-linear".into())),
            ..Default::default()
        },
        "all-linear",
    );
    bad(
        FourierFTConfig {
            target_modules: Some(ModuleSelector::Regex("(?<=a)b".into())),
            ..Default::default()
        },
        "cannot compile regex",
    );
    bad(
        FourierFTConfig {
            target_modules: names(&["q"]),
            peft_type: "LORA".into(),
            ..Default::default()
        },
        "peft_type must be \"FOURIERFT\"",
    );
    bad(
        FourierFTConfig {
            target_modules: names(&["q"]),
            n_frequency_pattern: vec![("q".into(), 0)],
            ..Default::default()
        },
        "n_frequency_pattern[\"q\"] must be at least 1",
    );
}

/// `ifft2_norm` comes from an unmerged PEFT pull request; released PEFT ignores it and divides by
/// d1·d2. A file that sets another value would merge at a different scale in PEFT, so it is
/// refused; `"backward"` means the default and loads. The crate never writes the key.
#[test]
fn ifft2_norm_other_than_backward_is_refused() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let spectrum = Tensor::new(&[1f32, -0.5], &Device::Cpu)?;
    let cfg = FourierFTConfig {
        n_frequency: 2,
        target_modules: names(&["q"]),
        ..Default::default()
    };
    let adapter = PeftAdapter::new(
        cfg,
        [("q".to_string(), spectrum)].into(),
        Default::default(),
    )?;
    adapter.save(tmp.path(), "default")?;
    let path = tmp.path().join(CONFIG_FILE);
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    assert!(
        json.get("ifft2_norm").is_none(),
        "a key PEFT does not read was written"
    );
    for (value, ok) in [("backward", true), ("ortho", false), ("forward", false)] {
        json["ifft2_norm"] = serde_json::Value::String(value.into());
        std::fs::write(&path, serde_json::to_string(&json)?)?;
        match PeftAdapter::load(tmp.path()) {
            Ok(a) => {
                assert!(ok, "{value} loaded");
                assert_eq!(a.spectrum("q").unwrap().to_vec1::<f32>()?, vec![1.0, -0.5]);
            }
            Err(e) => {
                assert!(!ok, "{value}: {e}");
                let msg = e.to_string();
                assert!(
                    msg.contains(CONFIG_FILE) && msg.contains("ifft2_norm"),
                    "{msg}"
                );
                assert!(msg.contains("no PEFT release reads"), "{msg}");
            }
        }
    }
    Ok(())
}

/// Loads `dir` and returns the error message, asserting it names `file` and contains `needle`.
fn load_err(dir: &Path, file: &str, needle: &str) -> Error {
    let e = PeftAdapter::load(dir).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains(file), "message does not name {file}: {msg}");
    assert!(msg.contains(needle), "message lacks {needle:?}: {msg}");
    assert!(!msg.contains('\n'), "multi-line message: {msg}");
    e
}

/// Rewrites the adapter's tensors with `edit`.
fn edit_weights(
    dir: &Path,
    edit: impl FnOnce(&mut BTreeMap<String, Tensor>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let path = dir.join(WEIGHTS_FILE);
    let mut t: BTreeMap<String, Tensor> = candle_core::safetensors::load(&path, &Device::Cpu)?
        .into_iter()
        .collect();
    edit(&mut t)?;
    candle_core::safetensors::save(&t.into_iter().collect(), &path)?;
    Ok(())
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> anyhow::Result<()> {
    let path = dir.join(CONFIG_FILE);
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    edit(&mut v);
    std::fs::write(&path, serde_json::to_string(&v)?)?;
    Ok(())
}

const SPEC: &str = "base_model.model.h.0.c_fc.fourierft_spectrum";

#[test]
fn bad_adapter_directories_give_typed_errors() -> anyhow::Result<()> {
    // Missing directory / files.
    let tmp = tempfile::tempdir()?;
    let e = load_err(&tmp.path().join("nope"), CONFIG_FILE, "No such file");
    assert!(matches!(e, Error::Io { .. }));
    let (_t, dir) = copy_adapter()?;
    std::fs::remove_file(dir.join(WEIGHTS_FILE))?;
    assert!(matches!(
        load_err(&dir, WEIGHTS_FILE, "No such file"),
        Error::Io { .. }
    ));

    // Corrupt files.
    let (_t, dir) = copy_adapter()?;
    std::fs::write(dir.join(WEIGHTS_FILE), b"\x10\0\0\0\0\0\0\0{not json")?;
    let e = load_err(&dir, WEIGHTS_FILE, "not a valid safetensors file");
    assert!(matches!(e, Error::File { .. }));
    let bytes = std::fs::read(peft_adapter().join(WEIGHTS_FILE))?;
    std::fs::write(dir.join(WEIGHTS_FILE), &bytes[..bytes.len() - 10])?;
    load_err(&dir, WEIGHTS_FILE, "not a valid safetensors file");
    let (_t, dir) = copy_adapter()?;
    std::fs::write(dir.join(CONFIG_FILE), "{\"n_frequency\": -3}")?;
    load_err(&dir, CONFIG_FILE, "invalid adapter config");

    // Wrong peft_type.
    let (_t, dir) = copy_adapter()?;
    edit_config(&dir, |v| v["peft_type"] = "LORA".into())?;
    load_err(
        &dir,
        CONFIG_FILE,
        "peft_type is \"LORA\", expected \"FOURIERFT\"",
    );

    // A spectrum of the wrong length (the config says 60 for h.0.c_fc).
    let (_t, dir) = copy_adapter()?;
    edit_config(&dir, |v| v["n_frequency"] = 61.into())?;
    let e = load_err(&dir, WEIGHTS_FILE, SPEC);
    assert!(matches!(e, Error::Shape { .. }));
    assert!(e.to_string().contains("expected shape [61]") && e.to_string().contains("found [60]"));

    // Non-finite coefficients.
    let (_t, dir) = copy_adapter()?;
    edit_weights(&dir, |t| {
        let mut v = t[SPEC].to_vec1::<f32>()?;
        v[7] = f32::NAN;
        t.insert(SPEC.into(), Tensor::new(v, &Device::Cpu)?);
        Ok(())
    })?;
    load_err(&dir, WEIGHTS_FILE, "non-finite value (NaN) at index 7");

    // A spectrum for a module the configuration does not target (unmatched key).
    let (_t, dir) = copy_adapter()?;
    edit_weights(&dir, |t| {
        let s = t[SPEC].clone();
        t.insert("base_model.model.h.0.up.fourierft_spectrum".into(), s);
        Ok(())
    })?;
    load_err(
        &dir,
        WEIGHTS_FILE,
        "unmatched key \"base_model.model.h.0.up.fourierft_spectrum\"",
    );

    // A tensor with and without `base_model.model.` (unprefixed names alone load, as in PEFT's
    // set_peft_model_state_dict), an integer spectrum, a misnamed FourierFT tensor.
    let (_t, dir) = copy_adapter()?;
    edit_weights(&dir, |t| {
        let s = t[SPEC].clone();
        t.insert("h.0.c_fc.fourierft_spectrum".into(), s);
        Ok(())
    })?;
    load_err(
        &dir,
        WEIGHTS_FILE,
        "\"h.0.c_fc.fourierft_spectrum\" name the same model tensor",
    );
    let (_t, dir) = copy_adapter()?;
    edit_weights(&dir, |t| {
        t.insert(SPEC.into(), Tensor::arange(0i64, 60, &Device::Cpu)?);
        Ok(())
    })?;
    let e = load_err(&dir, WEIGHTS_FILE, SPEC);
    assert!(matches!(e, Error::DType { .. }), "{e}");
    let (_t, dir) = copy_adapter()?;
    edit_weights(&dir, |t| {
        let s = t.remove(SPEC).expect("spectrum");
        t.insert(format!("{SPEC}.default"), s);
        Ok(())
    })?;
    load_err(&dir, WEIGHTS_FILE, "FourierFT tensors must be named");

    // No spectrum at all.
    let (_t, dir) = copy_adapter()?;
    edit_weights(&dir, |t| {
        t.retain(|k, _| !k.ends_with("fourierft_spectrum"));
        Ok(())
    })?;
    load_err(
        &dir,
        WEIGHTS_FILE,
        "no base_model.model.<module>.fourierft_spectrum tensor",
    );
    Ok(())
}
