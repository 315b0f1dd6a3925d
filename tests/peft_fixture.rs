//! Checks entry sampling and ΔW against fixtures produced by real Hugging Face PEFT
//! (`scripts/make_peft_fixtures.py` → `tests/fixtures/peft_mlp/`).

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use fourierft::SpectralEntries;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft_mlp")
}

struct Layer {
    name: String,
    d1: usize,
    d2: usize,
    n: usize,
    seed: u64,
    scaling: f64,
}

fn layers() -> Vec<Layer> {
    let text = std::fs::read_to_string(fixture_dir().join("meta.json")).unwrap();
    let meta: serde_json::Value = serde_json::from_str(&text).unwrap();
    let obj = meta["layers"].as_object().expect("meta.json: layers");
    let get = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{k}"));
    let out: Vec<Layer> = obj
        .iter()
        .map(|(name, v)| Layer {
            name: name.clone(),
            d1: get(v, "d1") as usize,
            d2: get(v, "d2") as usize,
            n: get(v, "n") as usize,
            seed: get(v, "seed"),
            scaling: v["scaling"].as_f64().unwrap(),
        })
        .collect();
    assert_eq!(out.len(), 2, "expected fc1 and fc2");
    out
}

fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture_dir().join("expected.safetensors"), &Device::Cpu)
        .unwrap()
}

fn ints(t: &HashMap<String, Tensor>, key: &str) -> Vec<u64> {
    let v = t[key].to_vec1::<i64>().unwrap();
    v.into_iter().map(|x| u64::try_from(x).unwrap()).collect()
}

fn floats(t: &HashMap<String, Tensor>, key: &str) -> Vec<f32> {
    t[key].flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn entries_match_peft() {
    let t = expected();
    for l in layers() {
        let e = SpectralEntries::uniform(l.d1, l.d2, l.n, l.seed).unwrap();
        let name = &l.name;
        assert_eq!(
            e.flat_indices(),
            ints(&t, &format!("{name}.flat")),
            "{name}.flat"
        );
        let rows: Vec<u64> = e.rows().iter().map(|&r| r as u64).collect();
        let cols: Vec<u64> = e.cols().iter().map(|&c| c as u64).collect();
        assert_eq!(rows, ints(&t, &format!("{name}.rows")), "{name}.rows");
        assert_eq!(cols, ints(&t, &format!("{name}.cols")), "{name}.cols");
    }
}

#[test]
fn reference_matches_peft_delta_weight() {
    let t = expected();
    for l in layers() {
        let name = &l.name;
        let rows: Vec<u32> = ints(&t, &format!("{name}.rows"))
            .iter()
            .map(|&r| r as u32)
            .collect();
        let cols: Vec<u32> = ints(&t, &format!("{name}.cols"))
            .iter()
            .map(|&c| c as u32)
            .collect();
        let spectrum = floats(&t, &format!("{name}.spectrum"));
        let reference =
            common::reference_delta_weight(l.d1, l.d2, &rows, &cols, &spectrum, l.scaling);
        let peft = floats(&t, &format!("{name}.delta_weight"));
        common::assert_close(
            &peft,
            &reference,
            1e-5,
            &format!("{name}: PEFT vs f64 reference"),
        );
    }
}

#[test]
fn delta_weight_matches_peft() {
    let t = expected();
    for l in layers() {
        let name = &l.name;
        let entries = SpectralEntries::uniform(l.d1, l.d2, l.n, l.seed).unwrap();
        let spectrum = &t[&format!("{name}.spectrum")];
        let dw = fourierft::ops::delta_weight(&entries, spectrum, l.scaling).unwrap();
        assert_eq!(dw.dims(), &[l.d1, l.d2], "{name}: ΔW shape");
        let found = dw.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let peft: Vec<f64> = floats(&t, &format!("{name}.delta_weight"))
            .iter()
            .map(|&x| x as f64)
            .collect();
        common::assert_close(
            &found,
            &peft,
            1e-5,
            &format!("{name}: ops::delta_weight vs PEFT"),
        );
    }
}
