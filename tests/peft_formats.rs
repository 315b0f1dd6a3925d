//! Adapter files in the other formats and from the other PEFT versions that real PEFT writes
//! (fixtures made by `scripts/make_peft_format_fixtures.py` in `tests/fixtures/peft_formats/`):
//! `adapter_model.bin`, `"all-linear"`, unset `target_modules`, names without the
//! `base_model.model.` prefix, negative `random_loc_seed`, empty `layers_pattern`, and PEFT 0.19 /
//! 0.20 / 0.21's layer-index rules. Each merge is compared with PEFT's `merge_and_unload`.

mod common;

use candle_core::{DType, Device, Tensor};
use fourierft::config::{ModuleSelector, OneOrMany};
use fourierft::peft::{merge_safetensors, ModuleMatcher, PeftAdapter};
use fourierft::{Error, FourierFTConfig};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_fourierft");

fn fixture(case: &str) -> PathBuf {
    common::fixture("peft_formats").join(case)
}

fn expected(case: &str) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_slice(&std::fs::read(
        fixture(case).join("expected.json"),
    )?)?)
}

fn adapted(case: &str) -> anyhow::Result<Vec<String>> {
    let e = expected(case)?;
    Ok(e["adapted"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("adapted"))?
        .iter()
        .map(|v| v.as_str().unwrap_or_default().to_string())
        .collect())
}

fn load_st(path: &Path) -> anyhow::Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(path, &Device::Cpu)?)
}

/// Every tensor of `found` equals `expected`'s to 1e-5 (absolute, on weights of order 0.1).
fn assert_same_tensors(found: &Path, expected: &Path) -> anyhow::Result<()> {
    let (f, e) = (load_st(found)?, load_st(expected)?);
    let mut fk: Vec<&String> = f.keys().collect();
    let mut ek: Vec<&String> = e.keys().collect();
    fk.sort();
    ek.sort();
    assert_eq!(fk, ek, "{found:?} vs {expected:?}");
    for (name, t) in &e {
        let a = f[name]
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        let b = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f64, f64::max);
        assert!(
            worst <= 1e-5,
            "{name}: max abs error {worst:e} vs PEFT's merge"
        );
    }
    Ok(())
}

fn base_file(case: &str) -> PathBuf {
    fixture(case).join("base/model.safetensors")
}

/// `fourierft merge` of the case's adapter into its base; returns the output path.
fn cli_merge(case: &str, adapter: &Path, tmp: &Path) -> anyhow::Result<PathBuf> {
    let out = tmp.join(format!("{case}-merged.safetensors"));
    let o = Command::new(BIN)
        .args(["merge", "--base"])
        .arg(base_file(case))
        .arg("--adapter")
        .arg(adapter)
        .arg("--output")
        .arg(&out)
        .output()?;
    assert!(
        o.status.success(),
        "{case}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(out)
}

/// Module paths of the 2-D `.weight` tensors of a safetensors file.
fn matrix_modules(path: &Path) -> anyhow::Result<Vec<String>> {
    let mut v: Vec<String> = load_st(path)?
        .into_iter()
        .filter(|(n, t)| t.rank() == 2 && n.ends_with(".weight"))
        .filter_map(|(n, _)| n.strip_suffix(".weight").map(str::to_string))
        .collect();
    v.sort();
    Ok(v)
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        std::fs::copy(e.path(), to.join(e.file_name()))?;
    }
    Ok(())
}

/// Rewrites one key of `adapter_config.json` in directory `dir`.
fn set_config_key(dir: &Path, key: &str, value: serde_json::Value) -> anyhow::Result<()> {
    let path = dir.join("adapter_config.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    cfg[key] = value;
    std::fs::write(&path, serde_json::to_vec_pretty(&cfg)?)?;
    Ok(())
}

#[test]
fn bin_adapter_reads_and_merges_like_peft() -> anyhow::Result<()> {
    let dir = fixture("llama_bin").join("adapter");
    assert!(!dir.join("adapter_model.safetensors").exists());
    let adapter = PeftAdapter::load(&dir)?;
    assert_eq!(
        adapter.source(),
        Some(dir.join("adapter_model.bin").as_path())
    );
    let paths: Vec<String> = adapter.spectra().keys().cloned().collect();
    assert_eq!(paths, adapted("llama_bin")?);
    for t in adapter.spectra().values() {
        assert_eq!((t.dtype(), t.dims()), (DType::F32, &[20][..]));
    }
    // The same bytes through the in-memory entry point.
    let config = std::fs::read(dir.join("adapter_config.json"))?;
    let bin = std::fs::read(dir.join("adapter_model.bin"))?;
    let mem = PeftAdapter::from_bin_bytes(&config, &bin)?;
    for (p, t) in adapter.spectra() {
        assert_eq!(mem.spectra()[p].to_vec1::<f32>()?, t.to_vec1::<f32>()?);
    }
    let tmp = tempfile::tempdir()?;
    let out = cli_merge("llama_bin", &dir, tmp.path())?;
    assert_same_tensors(&out, &fixture("llama_bin").join("merged.safetensors"))?;

    // PEFT's precedence: adapter_model.safetensors wins when both exist.
    let both = tmp.path().join("both");
    copy_dir(&dir, &both)?;
    let mut zeroed = adapter.clone();
    let spectra: BTreeMap<String, Tensor> = adapter
        .spectra()
        .iter()
        .map(|(p, t)| Ok((p.clone(), t.zeros_like()?)))
        .collect::<candle_core::Result<_>>()?;
    zeroed = PeftAdapter::new(zeroed.config().clone(), spectra, BTreeMap::new())?;
    let saved = tmp.path().join("saved");
    zeroed.save(&saved, "default")?;
    std::fs::copy(
        saved.join("adapter_model.safetensors"),
        both.join("adapter_model.safetensors"),
    )?;
    let read = PeftAdapter::load(&both)?;
    assert!(read
        .source()
        .is_some_and(|p| p.ends_with("adapter_model.safetensors")));
    assert!(read.spectra().values().all(|t| t
        .to_vec1::<f32>()
        .is_ok_and(|v| v.iter().all(|x| *x == 0.0))));
    Ok(())
}

#[test]
fn corrupt_bin_files_are_typed_errors() -> anyhow::Result<()> {
    let dir = fixture("llama_bin").join("adapter");
    let config = std::fs::read(dir.join("adapter_config.json"))?;
    let bin = std::fs::read(dir.join("adapter_model.bin"))?;
    let check = |bytes: &[u8]| match PeftAdapter::from_bin_bytes(&config, bytes) {
        Ok(_) => {}
        Err(e) => {
            let m = e.to_string();
            assert!(m.starts_with("<adapter_model.bin>"), "{m}");
            assert!(!m.contains('\n') && m.len() < 600, "{m}");
        }
    };
    // Every truncation, and every byte flipped (some flips land in padding and still load).
    for len in 0..bin.len() {
        check(&bin[..len]);
    }
    for i in 0..bin.len() {
        for x in [0x01u8, 0x80, 0xff] {
            let mut b = bin.clone();
            b[i] ^= x;
            check(&b);
        }
    }
    // Safetensors bytes are not an archive, and an archive is not safetensors.
    let e = PeftAdapter::from_bin_bytes(&config, b"\x80\x02}q\x00.").unwrap_err();
    assert!(e.to_string().contains("legacy torch.save format"), "{e}");
    let e = PeftAdapter::from_bytes(&config, &bin).unwrap_err();
    assert!(
        e.to_string().contains("not a valid safetensors file"),
        "{e}"
    );
    Ok(())
}

/// A torch.save-like archive holding `pkl` as `archive/data.pkl` and the given storages.
fn archive(pkl: &[u8], storages: &[(&str, &[u8])]) -> anyhow::Result<Vec<u8>> {
    use zip::write::SimpleFileOptions;
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    w.start_file("archive/data.pkl", opts)?;
    w.write_all(pkl)?;
    w.start_file("archive/byteorder", opts)?;
    w.write_all(b"little")?;
    for (key, data) in storages {
        w.start_file(format!("archive/data/{key}"), opts)?;
        w.write_all(data)?;
    }
    Ok(w.finish()?.into_inner())
}

/// The pickle torch writes for `{name: tensor}` with one f32 storage "0" of `numel` values and a
/// tensor of `size` at `offset` with `stride`.
fn state_dict_pickle(name: &str, numel: u8, offset: u8, size: &[u8], stride: &[u8]) -> Vec<u8> {
    let mut p = vec![0x80, 2, b'}', b'(', b'X'];
    p.extend((name.len() as u32).to_le_bytes());
    p.extend(name.as_bytes());
    p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n((X");
    p.extend(7u32.to_le_bytes());
    p.extend(b"storage");
    p.extend(b"ctorch\nFloatStorage\nX");
    p.extend(1u32.to_le_bytes());
    p.extend(b"0X");
    p.extend(3u32.to_le_bytes());
    p.extend(b"cpuK");
    p.push(numel);
    p.extend(b"tQK");
    p.push(offset);
    p.push(b'(');
    for s in size {
        p.extend([b'K', *s]);
    }
    p.extend(b"t(");
    for s in stride {
        p.extend([b'K', *s]);
    }
    p.extend(b"t\x89ccollections\nOrderedDict\n)RtRu.");
    p
}

#[test]
fn hand_made_archives_are_checked_before_use() -> anyhow::Result<()> {
    let config = br#"{"peft_type": "FOURIERFT", "n_frequency": 3, "target_modules": ["fc"]}"#;
    let key = "base_model.model.fc.fourierft_spectrum";
    let data: Vec<u8> = [1f32, -2.0, 0.5, 9.0]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    // A well-formed one loads; a view at offset 1 reads values 1..4.
    let a = PeftAdapter::from_bin_bytes(
        config,
        &archive(&state_dict_pickle(key, 4, 0, &[3], &[1]), &[("0", &data)])?,
    )?;
    assert_eq!(
        a.spectrum("fc").expect("fc").to_vec1::<f32>()?,
        [1.0, -2.0, 0.5]
    );
    let a = PeftAdapter::from_bin_bytes(
        config,
        &archive(&state_dict_pickle(key, 4, 1, &[3], &[1]), &[("0", &data)])?,
    )?;
    assert_eq!(
        a.spectrum("fc").expect("fc").to_vec1::<f32>()?,
        [-2.0, 0.5, 9.0]
    );
    // A strided view of its storage (torch saves the whole storage) is gathered.
    let strided = state_dict_pickle(key, 7, 1, &[3], &[2]);
    let data7: Vec<u8> = (0..7).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let a = PeftAdapter::from_bin_bytes(config, &archive(&strided, &[("0", &data7)])?)?;
    assert_eq!(
        a.spectrum("fc").expect("fc").to_vec1::<f32>()?,
        [1.0, 3.0, 5.0]
    );
    let fails = |pkl: Vec<u8>, storage: &[u8], wanted: &str| -> anyhow::Result<()> {
        let e =
            PeftAdapter::from_bin_bytes(config, &archive(&pkl, &[("0", storage)])?).unwrap_err();
        assert!(matches!(e, Error::File { .. } | Error::Shape { .. }), "{e}");
        assert!(e.to_string().contains(wanted), "{e} lacks {wanted:?}");
        Ok(())
    };
    // Past the storage (by offset, by stride), a storage of the wrong size, a wrong shape.
    fails(
        state_dict_pickle(key, 4, 2, &[3], &[1]),
        &data,
        "run past its storage",
    )?;
    fails(
        state_dict_pickle(key, 4, 0, &[3], &[2]),
        &data,
        "run past its storage",
    )?;
    fails(
        state_dict_pickle(key, 5, 0, &[3], &[1]),
        &data,
        "holds 16 bytes, expected 20",
    )?;

    fails(
        state_dict_pickle(key, 4, 0, &[4], &[1]),
        &data,
        "expected shape [3]",
    )?;
    // Pickle bombs and candle-crashing opcodes never reach candle's reader.
    let mut bomb = vec![0x80, 2, b'N', b'q', 0];
    for _ in 0..40 {
        bomb.extend([b'h', 0, b'h', 0, 0x86, b'q', 0]);
    }
    bomb.push(b'.');
    fails(bomb, &data, "pickle bomb")?;
    let mut long = vec![0x80, 2, 0x8a, 200];
    long.extend([0xffu8; 200]);
    long.push(b'.');
    fails(long, &data, "LONG1")?;
    fails(
        vec![0x80, 2, b'X', 0xff, 0xff, 0xff, 0x7f, b'.'],
        &data,
        "truncated",
    )?;
    let mut deep = vec![0x80, 2, b'N'];
    deep.extend([0x85; 5000]);
    deep.push(b'.');
    fails(deep, &data, "nested deeper")?;
    // Code-executing opcodes are not part of the machine.
    fails(
        b"\x80\x02cos\nsystem\n(X\x02\x00\x00\x00lstR.".to_vec(),
        &data,
        "a dict of tensors",
    )?;
    fails(
        b"\x80\x02\x93.".to_vec(),
        &data,
        "unsupported pickle opcode",
    )?;
    Ok(())
}

#[test]
fn all_linear_and_negative_seed_match_peft() -> anyhow::Result<()> {
    let case = "llama_all_linear";
    let dir = fixture(case).join("adapter");
    let adapter = PeftAdapter::load(&dir)?;
    // PEFT wrote the expanded list and the seed as given.
    let names = adapted(case)?;
    assert_eq!(adapter.spectra().keys().cloned().collect::<Vec<_>>(), names);
    assert_eq!(adapter.config().random_loc_seed, (-5i64) as u64);
    let tmp = tempfile::tempdir()?;
    let merged = fixture(case).join("merged.safetensors");
    assert_same_tensors(&cli_merge(case, &dir, tmp.path())?, &merged)?;

    // The same adapter with the shorthand kept in the file reads as its spectra's modules, and
    // saves expanded, as PEFT saves it.
    let short = tmp.path().join("shorthand");
    copy_dir(&dir, &short)?;
    set_config_key(&short, "target_modules", "ALL-LINEAR".into())?;
    let read = PeftAdapter::load(&short)?;
    assert_eq!(
        read.config().target_modules,
        Some(ModuleSelector::Names(names.clone()))
    );
    assert_same_tensors(&cli_merge(case, &short, tmp.path())?, &merged)?;
    let resaved = read.save(tmp.path().join("resaved"), "default")?;
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(resaved.join("adapter_config.json"))?)?;
    assert_eq!(
        cfg["target_modules"].as_array().map(Vec::len),
        Some(names.len())
    );

    // PEFT's expansion from the model: every linear layer but the output head.
    let linears: Vec<String> = matrix_modules(&base_file(case))?
        .into_iter()
        .filter(|m| !m.contains("embed"))
        .collect();
    let cfg = FourierFTConfig {
        target_modules: Some(ModuleSelector::Regex("all-linear".into())),
        ..Default::default()
    };
    let expanded = cfg.expand_all_linear(&linears, Some("lm_head"));
    assert_eq!(
        expanded.target_modules,
        Some(ModuleSelector::Names(names.clone()))
    );
    // Model-level injection asks per linear layer: with the head named, the same set.
    let e = ModuleMatcher::new(&cfg).unwrap_err();
    assert!(
        matches!(e, Error::Config(_)) && e.to_string().contains("output_head"),
        "{e}"
    );
    let m = ModuleMatcher::new(&FourierFTConfig {
        output_head: Some("lm_head".into()),
        ..cfg.clone()
    })?;
    let targeted: Vec<&String> = linears.iter().filter(|p| m.is_target(p)).collect();
    assert_eq!(targeted, names.iter().collect::<Vec<_>>());
    // SEQ_CLS without output embeddings: the top-level classifier is left out.
    let seq = FourierFTConfig {
        task_type: Some("SEQ_CLS".into()),
        ..cfg.clone()
    };
    let e = seq.expand_all_linear(["a.dense", "classifier"], None);
    assert_eq!(
        e.target_modules,
        Some(ModuleSelector::Names(vec!["a.dense".into()]))
    );
    let e = cfg.expand_all_linear(["a.dense", "classifier"], None);
    assert_eq!(
        e.target_modules.map(|t| t.to_string()),
        Some(r#"["a.dense", "classifier"]"#.into())
    );
    Ok(())
}

#[test]
fn negative_seeds_read_as_torch_maps_them() -> anyhow::Result<()> {
    for (json, seed) in [
        ("-5", (-5i64) as u64),
        ("-1", u64::MAX),
        ("-9223372036854775808", 1u64 << 63),
        ("18446744073709551615", u64::MAX),
    ] {
        let cfg: FourierFTConfig =
            serde_json::from_str(&format!(r#"{{"random_loc_seed": {json}}}"#))?;
        assert_eq!(cfg.random_loc_seed, seed, "{json}");
    }
    // Outside torch's range, or not an integer: an error naming the key.
    for json in ["-9223372036854775809", "18446744073709551616", "1.5"] {
        let text = format!(
            r#"{{"peft_type": "FOURIERFT", "random_loc_seed": {json}, "target_modules": ["fc"]}}"#
        );
        let e = PeftAdapter::from_bytes(text, b"").unwrap_err();
        assert!(e.to_string().contains("random_loc_seed"), "{json}: {e}");
    }
    // torch.randperm(20, generator=torch.Generator().manual_seed(-1))[:6] (torch 2.15).
    let p = fourierft::internals::torch_rng::randperm_prefix(20, 6, (-1i64) as u64);
    assert_eq!(p, [11, 7, 10, 0, 8, 15]);
    Ok(())
}

#[test]
fn unset_targets_use_peft_defaults_and_empty_layers_pattern() -> anyhow::Result<()> {
    let case = "bert_default_targets";
    let dir = fixture(case).join("adapter");
    let adapter = PeftAdapter::load(&dir)?;
    assert_eq!(
        adapter.config().layers_pattern,
        Some(OneOrMany::One(String::new()))
    );
    assert_eq!(
        adapter.spectra().keys().cloned().collect::<Vec<_>>(),
        adapted(case)?
    );
    let tmp = tempfile::tempdir()?;
    assert_same_tensors(
        &cli_merge(case, &dir, tmp.path())?,
        &fixture(case).join("merged.safetensors"),
    )?;
    // What PEFT did from target_modules=None and model_type "bert", from the model's layers.
    let model_type = serde_json::from_slice::<serde_json::Value>(&std::fs::read(
        fixture(case).join("base/config.json"),
    )?)?["model_type"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let cfg = FourierFTConfig {
        layers_to_transform: Some(OneOrMany::Many(vec![1])),
        layers_pattern: Some(OneOrMany::One(String::new())),
        ..Default::default()
    };
    let e = ModuleMatcher::new(&cfg).unwrap_err();
    assert!(e.to_string().contains("with_model_type"), "{e}");
    let m = ModuleMatcher::new(&cfg.clone().with_model_type(&model_type)?)?;
    let targeted: Vec<String> = matrix_modules(&base_file(case))?
        .into_iter()
        .filter(|p| m.is_target(p))
        .collect();
    assert_eq!(targeted, adapted(case)?);
    let e = cfg.with_model_type("my_model").unwrap_err();
    assert!(e.to_string().contains("my_model"), "{e}");
    // An empty layers_pattern needs no layers_to_transform (PEFT tests it for truth).
    FourierFTConfig {
        target_modules: Some(ModuleSelector::Names(vec!["q".into()])),
        layers_pattern: Some(OneOrMany::Many(vec![])),
        ..Default::default()
    }
    .validate()?;
    Ok(())
}

#[test]
fn unprefixed_names_load_as_peft_loads_them() -> anyhow::Result<()> {
    let case = "llama_unprefixed";
    let dir = fixture(case).join("adapter");
    let adapter = PeftAdapter::load(&dir)?;
    assert_eq!(
        adapter.spectra().keys().cloned().collect::<Vec<_>>(),
        adapted(case)?
    );
    let tmp = tempfile::tempdir()?;
    assert_same_tensors(
        &cli_merge(case, &dir, tmp.path())?,
        &fixture(case).join("merged.safetensors"),
    )?;
    // The same tensor with and without the prefix is ambiguous.
    let t = Tensor::new(&[1f32, 2.0], &Device::Cpu)?;
    let both: HashMap<String, Tensor> = [
        (
            "base_model.model.fc.fourierft_spectrum".to_string(),
            t.clone(),
        ),
        ("fc.fourierft_spectrum".to_string(), t),
    ]
    .into();
    let path = tmp.path().join("both.safetensors");
    candle_core::safetensors::save(&both, &path)?;
    let config = r#"{"peft_type": "FOURIERFT", "n_frequency": 2, "target_modules": ["fc"]}"#;
    let e = PeftAdapter::from_bytes(config, &std::fs::read(&path)?).unwrap_err();
    assert!(e.to_string().contains("name the same model tensor"), "{e}");
    Ok(())
}

/// PEFT 0.19, 0.20 and 0.21 find layer indices differently; each fixture was adapted by its
/// version, and this crate, reading `peft_version`, targets what that version targeted.
#[test]
fn layer_rules_follow_the_writing_peft_version() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    for rule in ["default", "pattern"] {
        for v in ["0191", "0200", "0212"] {
            let case = format!("layers_{rule}_{v}");
            let dir = fixture(&case).join("adapter");
            let adapter = PeftAdapter::load(&dir)?;
            let want = adapted(&case)?;
            assert_eq!(
                adapter.spectra().keys().cloned().collect::<Vec<_>>(),
                want,
                "{case}"
            );
            let targeted: Vec<String> = matrix_modules(&base_file(&case))?
                .into_iter()
                .filter(|p| adapter.matcher().is_target(p))
                .collect();
            assert_eq!(targeted, want, "{case}");
            let out = tmp.path().join(format!("{case}.safetensors"));
            merge_safetensors(&base_file(&case), &adapter, "", &out)?;
            assert_same_tensors(&out, &fixture(&case).join("merged.safetensors"))?;
        }
    }
    // The rule matters: read as 0.21, PEFT 0.19's default-rule adapter does not fit.
    let dir = tmp.path().join("relabelled");
    copy_dir(&fixture("layers_default_0191").join("adapter"), &dir)?;
    set_config_key(&dir, "peft_version", "0.21.2".into())?;
    let e = PeftAdapter::load(&dir).unwrap_err();
    assert!(e.to_string().contains("not targeted"), "{e}");
    Ok(())
}

/// The `load_adapter_bin` fuzz seeds (real PEFT `.bin` files) load; regressions kept in
/// `fuzz/regressions/load_adapter_bin/` run without panicking.
#[test]
fn bin_fuzz_seeds_and_regressions_replay() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let files = common::fuzz_inputs;
    let load = |data: &[u8]| -> Option<fourierft::Result<PeftAdapter>> {
        let (config, bin) = common::split_prefixed(data)?;
        Some(PeftAdapter::from_bin_bytes(config, bin))
    };
    let seeds = files(root.join("seeds/load_adapter_bin"))?;
    assert!(!seeds.is_empty());
    for f in seeds {
        load(&std::fs::read(&f)?)
            .expect("framed")
            .map_err(|e| anyhow::anyhow!("{f:?}: {e}"))?;
    }
    for f in files(root.join("regressions/load_adapter_bin"))? {
        if let Some(Err(e)) = load(&std::fs::read(&f)?) {
            assert!(!e.to_string().contains('\n'), "{f:?}: {e}");
        }
    }
    Ok(())
}

/// Model-level injection with `"all-linear"`: every linear layer built through
/// `fourierft::inject` but the named output head is adapted, and the saved configuration holds
/// the expanded list, as PEFT saves it.
#[test]
fn injection_resolves_all_linear_and_saves_it_expanded() -> anyhow::Result<()> {
    use candle_nn::{VarBuilder, VarMap};
    use fourierft::inject::{self, AdapterContext};
    let config = FourierFTConfig {
        target_modules: Some(ModuleSelector::Regex("all-linear".into())),
        n_frequency: 4,
        init_seed: Some(0),
        ..Default::default()
    };
    // Without the output head this crate cannot tell which layer PEFT leaves out.
    let e = AdapterContext::new(config.clone()).unwrap_err();
    assert!(e.to_string().contains("output_head"), "{e}");
    let ctx = AdapterContext::new(FourierFTConfig {
        output_head: Some("lm_head".into()),
        ..config
    })?;
    let varmap = VarMap::new();
    let vb = ctx.var_builder(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu));
    let _fc1 = inject::linear(8, 6, vb.pp("layers.0.fc1"))?;
    let _fc2 = inject::linear(6, 8, vb.pp("layers.0.fc2"))?;
    let _head = inject::linear(8, 5, vb.pp("lm_head"))?;
    ctx.check()?;
    assert_eq!(ctx.layer_paths(), ["layers.0.fc1", "layers.0.fc2"]);
    let tmp = tempfile::tempdir()?;
    ctx.save_pretrained(tmp.path())?;
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("adapter_config.json"))?)?;
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["layers.0.fc1", "layers.0.fc2"])
    );
    assert!(cfg.get("output_head").is_none(), "{cfg}");
    Ok(())
}

/// State dicts torch writes in other shapes load too (files made with torch 2.15's `torch.save`
/// in `torch_variants/`): an `OrderedDict` with `_metadata` (as `model.state_dict()` has), an
/// `nn.Parameter` in bf16, and a strided view (`torch.arange(6.).reshape(2, 3).t()[1]`).
/// `ordered_dict_metadata.bin` is also a valid archive that the zip crate's default archive-offset
/// detection rejects (and with it candle's `pickle::read_all`).
#[test]
fn torch_state_dict_variants_load() -> anyhow::Result<()> {
    let dir = fixture("torch_variants");
    let config = |n: usize| {
        format!(r#"{{"peft_type": "FOURIERFT", "n_frequency": {n}, "target_modules": ["fc"]}}"#)
    };
    for (file, want) in [
        ("ordered_dict_metadata.bin", vec![1.0f32, -2.0, 0.5]),
        ("parameter_bf16.bin", vec![1.0, -2.0, 0.5]),
        ("strided_view.bin", vec![1.0, 4.0]),
    ] {
        let bytes = std::fs::read(dir.join(file))?;
        let a = PeftAdapter::from_bin_bytes(config(want.len()), &bytes)
            .map_err(|e| anyhow::anyhow!("{file}: {e}"))?;
        assert_eq!(
            a.spectrum("fc").expect("fc").to_vec1::<f32>()?,
            want,
            "{file}"
        );
    }
    Ok(())
}
