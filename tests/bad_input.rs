//! Bad input of every kind gives a typed `fourierft::Error` whose one-line message names the
//! culprit; nothing panics and nothing is half-written.
//!
//! Complements `peft_io.rs` (bad adapter directories), `cli.rs` (the same through the command
//! line), `inject.rs` and `backend.rs` (model/adapter mismatches): this file covers truncation
//! at every length, forged safetensors headers, spectrum dtypes, ranks, non-finite values,
//! configuration values, missing and extra keys, unmatched targets and partial writes, mostly
//! through the in-memory entry points the fuzz targets use.

mod common;

use common::{fixture, split_prefixed};
use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use fourierft::config::ModuleSelector;
use fourierft::inject::{self, AdapterContext};
use fourierft::peft::{
    merge_safetensors, merge_safetensors_bytes, PeftAdapter, CONFIG_FILE, WEIGHTS_FILE,
};
use fourierft::{Error, FourierFTConfig, FourierLinear};

const MEM_CONFIG: &str = "<adapter_config.json>";
const MEM_WEIGHTS: &str = "<adapter_model.safetensors>";
const MEM_BASE: &str = "<base safetensors>";
const FC1: &str = "base_model.model.fc1.fourierft_spectrum";
const FC2: &str = "base_model.model.fc2.fourierft_spectrum";

fn read(rel: &str) -> Vec<u8> {
    std::fs::read(fixture(rel)).expect("fixture")
}

/// The PEFT-made MLP adapter: config text, tensors by name, base tensors by name.
struct Mlp {
    config: serde_json::Value,
    spectra: BTreeMap<String, Tensor>,
    base: BTreeMap<String, Tensor>,
}

impl Mlp {
    fn new() -> Self {
        let load = |rel: &str| -> BTreeMap<String, Tensor> {
            candle_core::safetensors::load(fixture(rel), &Device::Cpu)
                .expect("fixture tensors")
                .into_iter()
                .collect()
        };
        Self {
            config: serde_json::from_slice(&read("peft_mlp/adapter/adapter_config.json"))
                .expect("config"),
            spectra: load("peft_mlp/adapter/adapter_model.safetensors"),
            base: load("peft_mlp/base.safetensors"),
        }
    }

    fn config_text(&self) -> String {
        self.config.to_string()
    }

    fn weights(&self) -> Vec<u8> {
        st_bytes(&self.spectra)
    }

    fn base_bytes(&self) -> Vec<u8> {
        st_bytes(&self.base)
    }

    fn load(&self) -> fourierft::Result<PeftAdapter> {
        PeftAdapter::from_bytes(self.config_text(), &self.weights())
    }
}

fn st_bytes(tensors: &BTreeMap<String, Tensor>) -> Vec<u8> {
    safetensors::serialize(tensors.iter().map(|(k, v)| (k.clone(), v)), None).expect("serialize")
}

/// Safetensors bytes with a hand-written header.
fn raw_st(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// Asserts `r` failed with a one-line message containing every needle, and returns the error.
#[track_caller]
fn fails<T: std::fmt::Debug>(r: fourierft::Result<T>, needles: &[&str]) -> Error {
    let e = r.expect_err("must fail");
    let msg = e.to_string();
    for n in needles {
        assert!(msg.contains(n), "message lacks {n:?}: {msg}");
    }
    assert!(!msg.contains('\n'), "multi-line message: {msg}");
    e
}

#[test]
fn every_truncation_of_every_file_is_an_error() {
    let config = read("peft_mlp/adapter/adapter_config.json");
    let weights = read("peft_mlp/adapter/adapter_model.safetensors");
    for len in 0..weights.len() {
        let e = fails(
            PeftAdapter::from_bytes(&config, &weights[..len]),
            &[MEM_WEIGHTS, "not a valid safetensors file"],
        );
        assert!(matches!(e, Error::File { .. }), "{e}");
    }
    for len in 0..config.len() {
        if serde_json::from_slice::<serde_json::Value>(&config[..len]).is_ok() {
            continue; // only the trailing whitespace was cut
        }
        let e = fails(
            PeftAdapter::from_bytes(&config[..len], &weights),
            &[MEM_CONFIG, "invalid adapter config"],
        );
        assert!(matches!(e, Error::File { .. }), "{e}");
    }
    let adapter = PeftAdapter::from_bytes(&config, &weights).expect("the whole files load");
    let base = read("peft_mlp/base.safetensors");
    for len in (0..base.len()).step_by(7) {
        fails(
            merge_safetensors_bytes(&base[..len], &adapter, ""),
            &[MEM_BASE, "not a valid safetensors file"],
        );
    }
}

#[test]
fn forged_safetensors_headers_are_rejected_before_allocating() {
    let mlp = Mlp::new();
    let config = mlp.config_text();
    let huge = u64::MAX.to_string();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("header length beyond the file", {
            let mut b = (1u64 << 40).to_le_bytes().to_vec();
            b.extend_from_slice(b"{}");
            b
        }),
        ("header length u64::MAX", u64::MAX.to_le_bytes().to_vec()),
        (
            "a shape of 2^40 x 2^40 floats over 8 bytes",
            raw_st(
                &format!(
                    r#"{{"{FC1}":{{"dtype":"F32","shape":[1099511627776,1099511627776],"data_offsets":[0,8]}}}}"#
                ),
                &[0; 8],
            ),
        ),
        (
            "a shape whose element count overflows",
            raw_st(
                &format!(
                    r#"{{"{FC1}":{{"dtype":"F32","shape":[{huge},{huge}],"data_offsets":[0,8]}}}}"#
                ),
                &[0; 8],
            ),
        ),
        (
            "offsets past the data",
            raw_st(
                &format!(r#"{{"{FC1}":{{"dtype":"F32","shape":[90],"data_offsets":[0,360]}}}}"#),
                &[0; 8],
            ),
        ),
        (
            "overlapping offsets",
            raw_st(
                &format!(
                    r#"{{"{FC1}":{{"dtype":"F32","shape":[2],"data_offsets":[0,8]}},"{FC2}":{{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}}}"#
                ),
                &[0; 12],
            ),
        ),
        (
            "header not UTF-8",
            raw_st("\u{0}", &[])
                .into_iter()
                .map(|b| if b == 0 { 0xff } else { b })
                .collect(),
        ),
        ("header a JSON array", raw_st("[1,2,3]", &[])),
        (
            "unknown dtype",
            raw_st(
                &format!(r#"{{"{FC1}":{{"dtype":"Q99","shape":[1],"data_offsets":[0,4]}}}}"#),
                &[0; 4],
            ),
        ),
        (
            "no data_offsets",
            raw_st(
                &format!(r#"{{"{FC1}":{{"dtype":"F32","shape":[1]}}}}"#),
                &[0; 4],
            ),
        ),
        (
            "trailing bytes",
            raw_st(
                &format!(r#"{{"{FC1}":{{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}}}"#),
                &[0; 8],
            ),
        ),
    ];
    for (what, bytes) in cases {
        let e = PeftAdapter::from_bytes(&config, &bytes).expect_err(what);
        let msg = e.to_string();
        assert!(matches!(e, Error::File { .. }), "{what}: {e}");
        assert!(
            msg.starts_with(&format!("{MEM_WEIGHTS}: not a valid safetensors file")),
            "{what}: {msg}"
        );
        // The same forged bytes as a base checkpoint.
        let adapter = mlp.load().expect("adapter");
        let e = merge_safetensors_bytes(&bytes, &adapter, "").expect_err(what);
        assert!(
            e.to_string()
                .starts_with(&format!("{MEM_BASE}: not a valid safetensors file")),
            "{what}: {e}"
        );
    }
}

#[test]
fn spectrum_dtypes_integer_and_exotic_fail_half_precision_loads_as_f32() -> anyhow::Result<()> {
    let mlp = Mlp::new();
    let config = mlp.config_text();
    let f32s = |t: &Tensor| t.to_dtype(DType::F32)?.to_vec1::<f32>();

    // F16, BF16 and F64 spectra load, converted to f32 exactly as the stored values.
    for dtype in [DType::F16, DType::BF16, DType::F64] {
        let mut tensors = mlp.spectra.clone();
        for t in tensors.values_mut() {
            *t = t.to_dtype(dtype)?;
        }
        let a = PeftAdapter::from_bytes(&config, &st_bytes(&tensors))?;
        for (key, stored) in &tensors {
            let path = key
                .strip_prefix("base_model.model.")
                .and_then(|k| k.strip_suffix(".fourierft_spectrum"))
                .expect("spectrum key");
            let loaded = a.spectrum(path).expect("loaded");
            assert_eq!(loaded.dtype(), DType::F32);
            assert_eq!(f32s(loaded)?, f32s(stored)?, "{dtype:?} {path}");
        }
    }

    // Integer and micro-scaling dtypes are typed dtype errors naming the tensor.
    for dtype in [DType::I64, DType::U8, DType::U32, DType::F8E4M3] {
        let mut tensors = mlp.spectra.clone();
        let t = tensors[FC1].clone();
        tensors.insert(FC1.into(), t.to_dtype(dtype)?);
        let e = fails(
            PeftAdapter::from_bytes(&config, &st_bytes(&tensors)),
            &[
                FC1,
                MEM_WEIGHTS,
                "expected dtype F32, F16, BF16 or F64",
                &format!("{dtype:?}"),
            ],
        );
        assert!(
            matches!(e, Error::DType { found, .. } if found == dtype),
            "{e}"
        );
    }
    // A dtype candle has no type for (BOOL), and a 4-bit float candle keeps as raw bytes.
    let header = |dtype: &str| {
        format!(
            r#"{{"{FC1}":{{"dtype":"{dtype}","shape":[90],"data_offsets":[0,{}]}}}}"#,
            if dtype == "F4" { 45 } else { 90 }
        )
    };
    fails(
        PeftAdapter::from_bytes(&config, &raw_st(&header("BOOL"), &[0; 90])),
        &[FC1, MEM_WEIGHTS, "BOOL"],
    );
    let e = fails(
        PeftAdapter::from_bytes(&config, &raw_st(&header("F4"), &[0; 45])),
        &[FC1, "expected dtype F32, F16, BF16 or F64", "F4"],
    );
    assert!(matches!(e, Error::DType { .. }), "{e}");

    // The same rule for spectra given directly.
    let cfg: FourierFTConfig = serde_json::from_value(mlp.config.clone())?;
    let e = fails(
        PeftAdapter::new(
            cfg,
            [(
                "fc1".to_string(),
                Tensor::zeros(90, DType::U8, &Device::Cpu)?,
            )]
            .into(),
            BTreeMap::new(),
        ),
        &[FC1, "U8"],
    );
    assert!(matches!(e, Error::DType { .. }), "{e}");
    Ok(())
}

#[test]
fn wrong_ranks_and_shapes() -> anyhow::Result<()> {
    let mlp = Mlp::new();
    let config = mlp.config_text();
    let fc1 = mlp.spectra[FC1].clone();
    // Spectra: 2-D, scalar, one too long.
    for (t, found) in [
        (fc1.reshape((1, 90))?, "[1, 90]"),
        (Tensor::new(1f32, &Device::Cpu)?, "[]"),
        (Tensor::zeros(91, DType::F32, &Device::Cpu)?, "[91]"),
    ] {
        let mut tensors = mlp.spectra.clone();
        tensors.insert(FC1.into(), t);
        let e = fails(
            PeftAdapter::from_bytes(&config, &st_bytes(&tensors)),
            &[FC1, "expected shape [90]", &format!("found {found}")],
        );
        assert!(matches!(e, Error::Shape { .. }), "{e}");
    }

    // Base weights: not a matrix, a matrix of the wrong size, an empty matrix, integers.
    let adapter = mlp.load()?;
    let cases: Vec<(Tensor, Vec<&str>)> = vec![
        (
            Tensor::zeros(960, DType::F32, &Device::Cpu)?,
            vec!["\"fc1.weight\"", "expected shape 2 dims, found [960]"],
        ),
        (
            Tensor::zeros((40, 24, 1), DType::F32, &Device::Cpu)?,
            vec!["\"fc1.weight\"", "found [40, 24, 1]"],
        ),
        (
            Tensor::zeros((3, 5), DType::F32, &Device::Cpu)?,
            vec![
                "fc1",
                "n_frequency must be in 1..=15 for a 3x5 layer, found 90",
            ],
        ),
        (
            Tensor::zeros((0, 24), DType::F32, &Device::Cpu)?,
            vec![
                "fc1",
                "n_frequency must be in 1..=0 for a 0x24 layer, found 90",
            ],
        ),
        (
            Tensor::zeros((40, 24), DType::I64, &Device::Cpu)?,
            vec![
                "\"fc1.weight\"",
                "expected dtype F32, F16, BF16 or F64, found I64",
            ],
        ),
    ];
    for (w, needles) in cases {
        let mut base = mlp.base.clone();
        base.insert("fc1.weight".into(), w);
        let mut needles = needles;
        needles.push(MEM_BASE);
        fails(
            merge_safetensors_bytes(&st_bytes(&base), &adapter, ""),
            &needles,
        );
    }

    // A modules_to_save-style tensor of another shape than the base's.
    let mut tensors = mlp.spectra.clone();
    tensors.insert(
        "base_model.model.fc2.bias".into(),
        Tensor::zeros(17, DType::F32, &Device::Cpu)?,
    );
    let with_bias = PeftAdapter::from_bytes(&config, &st_bytes(&tensors))?;
    fails(
        merge_safetensors_bytes(&mlp.base_bytes(), &with_bias, ""),
        &["\"fc2.bias\"", "expected shape [18], found [17]"],
    );

    // Layers: a 3-D weight, a bias of the wrong length, an input of the wrong width.
    let w3 = Tensor::zeros((2, 3, 4), DType::F32, &Device::Cpu)?;
    let e = fails(
        FourierLinear::from_parts(w3, None, false),
        &["found [2, 3, 4]"],
    );
    assert!(matches!(e, Error::Shape { .. }));
    let layer = FourierLinear::from_parts(
        Tensor::zeros((4, 6), DType::F16, &Device::Cpu)?,
        None,
        false,
    )?
    .with_name("enc.fc1");
    layer.add_adapter(
        "default",
        &FourierFTConfig {
            n_frequency: 3,
            ..Default::default()
        },
    )?;
    let x = Tensor::zeros((2, 5), DType::F16, &Device::Cpu)?;
    let e = fails(layer.try_forward(&x), &["input of enc.fc1", "found [2, 5]"]);
    assert!(matches!(e, Error::Shape { .. }));
    let x = Tensor::zeros((2, 6), DType::F32, &Device::Cpu)?;
    let e = fails(
        layer.try_forward(&x),
        &[
            "input of enc.fc1",
            "expected dtype F16 (the dtype of its weight), found F32",
        ],
    );
    assert!(matches!(e, Error::DType { .. }));
    fails(
        layer.forward_mixed(&x, &[None, None]),
        &["input of enc.fc1"],
    );
    Ok(())
}

#[test]
fn non_finite_values() -> anyhow::Result<()> {
    let mlp = Mlp::new();
    let config = mlp.config_text();
    for (x, shown) in [
        (f32::NAN, "NaN"),
        (f32::INFINITY, "inf"),
        (f32::NEG_INFINITY, "-inf"),
    ] {
        let mut tensors = mlp.spectra.clone();
        let mut v = tensors[FC2].to_vec1::<f32>()?;
        v[11] = x;
        tensors.insert(FC2.into(), Tensor::new(v, &Device::Cpu)?);
        let e = fails(
            PeftAdapter::from_bytes(&config, &st_bytes(&tensors)),
            &[
                FC2,
                MEM_WEIGHTS,
                &format!("non-finite value ({shown}) at index 11"),
            ],
        );
        assert!(matches!(e, Error::File { .. }), "{e}");
    }
    // Given directly: a configuration error naming the tensor.
    let cfg: FourierFTConfig = serde_json::from_value(mlp.config.clone())?;
    let nan = Tensor::new(&[f32::NAN; 90], &Device::Cpu)?;
    let e = fails(
        PeftAdapter::new(cfg, [("fc1".to_string(), nan)].into(), BTreeMap::new()),
        &[FC1, "non-finite value (NaN) at index 0"],
    );
    assert!(matches!(e, Error::Config(_)), "{e}");

    // A finite spectrum that overflows an f16 weight: safe merge refuses and leaves the
    // weight as it was; plain merge (documented) does not check and stores infinities.
    let w0 = Tensor::zeros((8, 6), DType::F16, &Device::Cpu)?;
    let layer = FourierLinear::from_parts(w0, None, false)?.with_name("half");
    let cfg = FourierFTConfig {
        n_frequency: 4,
        init_weights: true,
        ..Default::default()
    };
    layer.add_adapter("default", &cfg)?;
    layer.set_spectrum(
        "default",
        &Tensor::new(&[1e9f32, 0.0, 0.0, 0.0], &Device::Cpu)?,
    )?;
    let e = fails(layer.safe_merge(), &["half", "non-finite", "\"default\""]);
    assert!(matches!(e, Error::NonFinite { .. }));
    assert!(!layer.is_merged());
    let w = layer
        .weight()
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    assert!(w.iter().all(|&x| x == 0.0));
    layer.merge()?;
    let w = layer
        .weight()
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    assert!(
        w.iter().any(|x| x.is_infinite()),
        "plain merge does not check"
    );

    // A NaN coefficient set on a layer: plain merge makes NaN weights.
    let layer =
        FourierLinear::from_parts(Tensor::ones((4, 4), DType::F32, &Device::Cpu)?, None, false)?;
    layer.add_adapter(
        "default",
        &FourierFTConfig {
            n_frequency: 2,
            ..cfg
        },
    )?;
    layer.set_spectrum("default", &Tensor::new(&[f32::NAN, 1.0], &Device::Cpu)?)?;
    assert!(matches!(layer.safe_merge(), Err(Error::NonFinite { .. })));
    layer.merge()?;
    let w = layer.weight().flatten_all()?.to_vec1::<f32>()?;
    assert!(w.iter().any(|x| x.is_nan()), "{w:?}");
    Ok(())
}

#[test]
fn configuration_values_and_keys() -> anyhow::Result<()> {
    let mlp = Mlp::new();
    let weights = mlp.weights();
    // The configuration with `key` set to the JSON text `value` (spliced as text, so that values
    // serde_json cannot hold, like 1e400, reach the parser).
    let with = |key: &str, value: &str| {
        let mut c = mlp.config.clone();
        c[key] = "@VALUE@".into();
        let text = c.to_string().replace("\"@VALUE@\"", value);
        PeftAdapter::from_bytes(text, &weights)
    };
    let json = |s: &str| serde_json::from_str::<serde_json::Value>(s).expect("json");

    // Values of the wrong type or range name their key.
    for (key, value) in [
        ("n_frequency", "-3"),
        ("n_frequency", "1e30"),
        ("n_frequency", "18446744073709551616"),
        ("n_frequency", "\"90\""),
        ("scaling", "1e400"),
        // torch's manual_seed range is -2^63 ..= 2^64-1 (negative values are valid seeds).
        ("random_loc_seed", "-9223372036854775809"),
        ("random_loc_seed", "18446744073709551616"),
        ("n_frequency_pattern", r#"{"fc2": -50}"#),
        ("target_modules", "7"),
        ("bias", "\"some\""),
        ("peft_type", "7"),
    ] {
        let e = fails(
            with(key, value),
            &[
                MEM_CONFIG,
                "invalid adapter config",
                &format!("key {key:?}"),
            ],
        );
        assert!(matches!(e, Error::File { .. }), "{e}");
    }
    // Valid JSON, invalid values.
    fails(
        with("n_frequency", "0"),
        &[MEM_CONFIG, "n_frequency must be at least 1, found 0"],
    );
    fails(
        with("n_frequency_pattern", r#"{"fc2": 0}"#),
        &[
            MEM_CONFIG,
            "n_frequency_pattern[\"fc2\"] must be at least 1",
        ],
    );
    // n in the config differs from the tensor's length.
    let e = fails(
        with("n_frequency", "18446744073709551615"),
        &[FC1, "expected shape [18446744073709551615]", "found [90]"],
    );
    assert!(matches!(e, Error::Shape { .. }), "{e}");
    fails(
        with("n_frequency_pattern", r#"{"fc2": 51}"#),
        &[FC2, "expected shape [51]", "found [50]"],
    );
    // Regexes that do not compile. PEFT's "all-linear" shorthand (PEFT saves it expanded) reads
    // as the modules the file has spectra for (tests/peft_formats.rs).
    fails(
        with("target_modules", r#""fc(1""#),
        &[MEM_CONFIG, "target_modules: cannot compile regex"],
    );
    fails(
        with("n_frequency_pattern", r#"{"fc[": 5}"#),
        &[MEM_CONFIG, "n_frequency_pattern: cannot compile regex"],
    );
    let all_linear = with("target_modules", r#""all-linear""#).expect("all-linear");
    assert_eq!(all_linear.spectra().len(), mlp.spectra.len());

    // Wrong or missing peft_type; missing target_modules; not an object at all.
    fails(
        with("peft_type", r#""LORA""#),
        &[MEM_CONFIG, "peft_type is \"LORA\", expected \"FOURIERFT\""],
    );
    fails(
        with("peft_type", r#""fourierft""#),
        &[MEM_CONFIG, "peft_type is \"fourierft\""],
    );
    let mut c = mlp.config.clone();
    c.as_object_mut().expect("object").remove("peft_type");
    fails(
        PeftAdapter::from_bytes(c.to_string(), &weights),
        &[MEM_CONFIG, "peft_type is missing"],
    );
    fails(
        PeftAdapter::from_bytes(r#"{"peft_type": "FOURIERFT"}"#, &weights),
        &[MEM_CONFIG, "target_modules is not set"],
    );
    fails(
        PeftAdapter::from_bytes("[]", &weights),
        &[MEM_CONFIG, "invalid adapter config"],
    );

    // Extra configuration keys are tolerated, as PEFT does.
    let mut c = mlp.config.clone();
    c["some_future_option"] = json(r#"{"nested": [1, 2]}"#);
    PeftAdapter::from_bytes(c.to_string(), &weights)?;
    Ok(())
}

#[test]
fn missing_and_extra_tensors() -> anyhow::Result<()> {
    let mlp = Mlp::new();
    let config = mlp.config_text();

    // The configuration targets fc1 and fc2 but the file has fc1 only: loading is fine (PEFT
    // allows partial files), merging into a base that has fc2 is not.
    let mut tensors = mlp.spectra.clone();
    tensors.remove(FC2);
    let partial = PeftAdapter::from_bytes(&config, &st_bytes(&tensors))?;
    let e = fails(
        merge_safetensors_bytes(&mlp.base_bytes(), &partial, ""),
        &[
            MEM_WEIGHTS,
            "missing tensor",
            FC2,
            "targets module \"fc2\"",
            "\"fc2.weight\"",
        ],
    );
    assert!(matches!(e, Error::File { .. }), "{e}");

    // The base lacks an adapted weight (e.g. a wrong prefix).
    let adapter = mlp.load()?;
    fails(
        merge_safetensors_bytes(&mlp.base_bytes(), &adapter, "model."),
        &[
            MEM_BASE,
            "no tensor \"model.fc1.weight\" for adapted module \"fc1\"",
            FC1,
        ],
    );

    // An extra (modules_to_save-style) tensor the base does not have.
    let mut tensors = mlp.spectra.clone();
    tensors.insert(
        "base_model.model.head.weight".into(),
        Tensor::zeros((2, 2), DType::F32, &Device::Cpu)?,
    );
    let extra = PeftAdapter::from_bytes(&config, &st_bytes(&tensors))?;
    fails(
        merge_safetensors_bytes(&mlp.base_bytes(), &extra, ""),
        &[
            MEM_BASE,
            "no tensor \"head.weight\" to replace",
            "\"head.weight\"",
        ],
    );
    // An extra tensor of a dtype candle keeps as raw bytes cannot be checked or converted.
    let mut header = String::from("{");
    let mut data = Vec::new();
    for (k, t) in &mlp.spectra {
        let raw = t.flatten_all()?.to_vec1::<f32>()?;
        let start = data.len();
        data.extend(raw.iter().flat_map(|x| x.to_le_bytes()));
        header += &format!(
            r#""{k}":{{"dtype":"F32","shape":[{}],"data_offsets":[{start},{}]}},"#,
            raw.len(),
            data.len()
        );
    }
    let start = data.len();
    data.push(0);
    header += &format!(
        r#""base_model.model.head.weight":{{"dtype":"F4","shape":[2],"data_offsets":[{start},{}]}}}}"#,
        data.len()
    );
    let bytes = raw_st(&header, &data);
    fails(
        PeftAdapter::from_bytes(&config, &bytes),
        &[MEM_WEIGHTS, "\"base_model.model.head.weight\"", "F4"],
    );

    // Tensors that are neither spectra nor base-model tensors; a name with and without PEFT's
    // prefix (unprefixed names load, as PEFT's set_peft_model_state_dict loads them).
    let mut tensors = mlp.spectra.clone();
    tensors.insert("fc1.fourierft_spectrum".into(), mlp.spectra[FC1].clone());
    fails(
        PeftAdapter::from_bytes(&config, &st_bytes(&tensors)),
        &[
            MEM_WEIGHTS,
            "\"fc1.fourierft_spectrum\"",
            "name the same model tensor",
        ],
    );
    let mut tensors = mlp.spectra.clone();
    tensors.insert(
        "base_model.model.fc1.fourierft_scale".into(),
        mlp.spectra[FC1].clone(),
    );
    fails(
        PeftAdapter::from_bytes(&config, &st_bytes(&tensors)),
        &[
            MEM_WEIGHTS,
            "\"base_model.model.fc1.fourierft_scale\"",
            "must be named",
        ],
    );
    Ok(())
}

/// A two-layer model built through `inject`, for the target-matching cases.
fn build(ctx: &AdapterContext) -> anyhow::Result<()> {
    let varmap = VarMap::new();
    let vb = ctx.var_builder(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu));
    inject::linear(6, 8, vb.pp("enc.fc1"))?;
    inject::linear(8, 4, vb.pp("enc.fc2"))?;
    Ok(())
}

#[test]
fn unknown_target_modules_are_errors_not_silence() -> anyhow::Result<()> {
    let ctx = AdapterContext::new(FourierFTConfig {
        target_modules: Some(ModuleSelector::Names(vec!["q_proj".into()])),
        n_frequency: 4,
        ..Default::default()
    })?;
    build(&ctx)?;
    let needles = [
        "target_modules",
        "q_proj",
        "matched none of the 2 linear layers",
        "enc.fc1",
    ];
    for e in [
        ctx.check().unwrap_err(),
        ctx.merge().unwrap_err(),
        ctx.safe_merge().unwrap_err(),
        ctx.to_adapter().unwrap_err(),
    ] {
        assert!(matches!(e, Error::Config(_)), "{e}");
        for n in needles {
            assert!(e.to_string().contains(n), "{n}: {e}");
        }
    }
    let tmp = tempfile::tempdir()?;
    fails(ctx.save_pretrained(tmp.path()), &needles);
    assert_eq!(std::fs::read_dir(tmp.path())?.count(), 0, "nothing written");
    assert!(ctx.trainable_vars().is_empty());

    // A regex that matches nothing, and an adapter with no spectra at all.
    let ctx = AdapterContext::new(FourierFTConfig {
        target_modules: Some(ModuleSelector::Regex(r"dec\..*".into())),
        n_frequency: 4,
        ..Default::default()
    })?;
    build(&ctx)?;
    fails(ctx.check(), &["dec\\\\..*", "matched none"]);
    let e = fails(
        PeftAdapter::new(
            FourierFTConfig {
                target_modules: Some(ModuleSelector::Names(vec!["fc1".into()])),
                ..Default::default()
            },
            BTreeMap::new(),
            BTreeMap::new(),
        ),
        &["at least one spectrum"],
    );
    assert!(matches!(e, Error::Config(_)));

    // A spectrum for a module the configuration does not target.
    let mlp = Mlp::new();
    let mut tensors = mlp.spectra.clone();
    tensors.insert(
        "base_model.model.fc3.fourierft_spectrum".into(),
        mlp.spectra[FC1].clone(),
    );
    fails(
        PeftAdapter::from_bytes(mlp.config_text(), &st_bytes(&tensors)),
        &[
            MEM_WEIGHTS,
            "unmatched key \"base_model.model.fc3.fourierft_spectrum\"",
        ],
    );
    Ok(())
}

#[test]
fn failed_writes_leave_nothing_half_written() -> anyhow::Result<()> {
    let mlp = Mlp::new();
    let adapter = mlp.load()?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    std::fs::write(dir.join("base.safetensors"), mlp.base_bytes())?;

    // A failing merge (non-finite base weight) leaves an existing output unchanged and creates
    // no temporary file.
    let mut bad = mlp.base.clone();
    let w = bad["fc2.weight"].clone();
    bad.insert("fc2.weight".into(), (w * f64::INFINITY)?);
    std::fs::write(dir.join("bad.safetensors"), st_bytes(&bad))?;
    let out = dir.join("merged.safetensors");
    std::fs::write(&out, b"previous content")?;
    fails(
        merge_safetensors(&dir.join("bad.safetensors"), &adapter, "", &out),
        &["fc2.weight", "produces non-finite weights"],
    );
    assert_eq!(std::fs::read(&out)?, b"previous content");
    let fresh = dir.join("fresh.safetensors");
    fails(
        merge_safetensors(&dir.join("bad.safetensors"), &adapter, "", &fresh),
        &["non-finite"],
    );
    assert!(!fresh.exists());
    let names = |d: &Path| -> anyhow::Result<Vec<String>> {
        let mut v: Vec<String> = std::fs::read_dir(d)?
            .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
            .collect::<std::io::Result<_>>()?;
        v.sort();
        Ok(v)
    };
    assert_eq!(
        names(dir)?,
        vec!["bad.safetensors", "base.safetensors", "merged.safetensors"]
    );
    // The merge succeeds and replaces the output whole.
    merge_safetensors(&dir.join("base.safetensors"), &adapter, "", &out)?;
    assert_eq!(candle_core::safetensors::load(&out, &Device::Cpu)?.len(), 4);

    // Saving where the weights file cannot be created: an Io error, and no temporary file or
    // configuration is left behind.
    let target = dir.join("adapter");
    std::fs::create_dir_all(target.join(WEIGHTS_FILE))?;
    let e = fails(adapter.save(&target, "default"), &[WEIGHTS_FILE]);
    assert!(matches!(e, Error::Io { .. }), "{e}");
    assert_eq!(names(&target)?, vec![WEIGHTS_FILE.to_string()]);
    assert!(!target.join(CONFIG_FILE).exists());
    Ok(())
}

/// The fuzz seeds (real PEFT files) load and merge; inputs kept in `fuzz/regressions/<target>/`
/// (minimised crashes, once fixed) run through the same code without panicking.
#[test]
fn fuzz_seeds_and_regressions_replay() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let files = common::fuzz_inputs;
    let load = |data: &[u8]| -> Option<fourierft::Result<PeftAdapter>> {
        let (config, weights) = split_prefixed(data)?;
        Some(PeftAdapter::from_bytes(config, weights))
    };
    let merge = |data: &[u8]| -> Option<fourierft::Result<Vec<u8>>> {
        let (config, rest) = split_prefixed(data)?;
        let (adapter, base) = split_prefixed(rest)?;
        let adapter = match PeftAdapter::from_bytes(config, adapter) {
            Ok(a) => a,
            Err(e) => return Some(Err(e)),
        };
        Some(merge_safetensors_bytes(base, &adapter, "").map(|(b, _)| b))
    };
    let seeds = files(root.join("seeds/load_adapter"))?;
    assert!(seeds.len() >= 3, "{seeds:?}");
    for f in seeds {
        load(&std::fs::read(&f)?)
            .expect("framed")
            .map_err(|e| anyhow::anyhow!("{f:?}: {e}"))?;
    }
    let seeds = files(root.join("seeds/merge"))?;
    assert!(seeds.len() >= 3, "{seeds:?}");
    for f in seeds {
        merge(&std::fs::read(&f)?)
            .expect("framed")
            .map_err(|e| anyhow::anyhow!("{f:?}: {e}"))?;
    }
    for f in files(root.join("regressions/load_adapter"))? {
        if let Some(Err(e)) = load(&std::fs::read(&f)?) {
            assert!(!e.to_string().contains('\n'), "{f:?}: {e}");
        }
    }
    for f in files(root.join("regressions/merge"))? {
        if let Some(Err(e)) = merge(&std::fs::read(&f)?) {
            assert!(!e.to_string().contains('\n'), "{f:?}: {e}");
        }
    }
    Ok(())
}
