//! The `fourierft` binary (feature `cli`): merge against PEFT's `merge_and_unload`, inspect, and
//! every bad input: one line on stderr naming the file/tensor, exit code 2, no output file.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};

const BIN: &str = env!("CARGO_BIN_EXE_fourierft");

fn fixture() -> PathBuf {
    common::fixture("peft_roundtrip")
}

/// A scratch copy of the PEFT fixture: `base.safetensors` and `adapter/`.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        std::fs::create_dir(dir.path().join("adapter"))?;
        std::fs::copy(
            fixture().join("base.safetensors"),
            dir.path().join("base.safetensors"),
        )?;
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(
                fixture().join("adapter").join(f),
                dir.path().join("adapter").join(f),
            )?;
        }
        Ok(Self { dir })
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn merge(&self) -> Output {
        run(&[
            "merge",
            "--base",
            &self.s("base.safetensors"),
            "--adapter",
            &self.s("adapter"),
            "--output",
            &self.s("out.safetensors"),
        ])
    }

    fn s(&self, rel: &str) -> String {
        self.path(rel).display().to_string()
    }

    /// Rewrites a safetensors file of the scratch copy.
    fn edit(
        &self,
        rel: &str,
        f: impl FnOnce(&mut HashMap<String, Tensor>) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let path = self.path(rel);
        let mut t = candle_core::safetensors::load(&path, &Device::Cpu)?;
        f(&mut t)?;
        candle_core::safetensors::save(&t, &path)?;
        Ok(())
    }

    fn edit_config(&self, f: impl FnOnce(&mut serde_json::Value)) -> anyhow::Result<()> {
        let path = self.path("adapter/adapter_config.json");
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
        f(&mut v);
        std::fs::write(path, v.to_string())?;
        Ok(())
    }

    /// Runs `merge`, expects failure with a one-line message containing every needle, and checks
    /// that neither the output nor a temporary file was left behind.
    fn merge_fails(&self, needles: &[&str]) {
        let out = self.merge();
        assert_fails(&out, needles);
        let left: Vec<String> = std::fs::read_dir(self.dir.path())
            .expect("read scratch dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n != "base.safetensors" && n != "adapter")
            .collect();
        assert!(
            left.is_empty(),
            "left behind after a failed merge: {left:?}"
        );
    }
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run fourierft")
}

fn assert_fails(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "exit code; stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr:?}");
    assert!(stderr.starts_with("fourierft: error: "), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "stderr lacks {n:?}: {stderr}");
    }
}

fn max_rel_err(a: &Tensor, b: &Tensor) -> anyhow::Result<f64> {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (a.to_dtype(DType::F64)?, b.to_dtype(DType::F64)?);
    let abs = (&a - &b)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()?;
    let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    Ok(abs / scale.max(1e-30))
}

fn assert_matches_peft_merge(path: &Path, tol: f64) -> anyhow::Result<()> {
    let ours = candle_core::safetensors::load(path, &Device::Cpu)?;
    let peft = candle_core::safetensors::load(fixture().join("merged.safetensors"), &Device::Cpu)?;
    assert_eq!(ours.len(), peft.len());
    for (name, want) in &peft {
        let err = max_rel_err(&ours[name], want)?;
        println!("fourierft merge {name}: rel err {err:.2e}");
        assert!(err <= tol, "{name}: rel err {err:e}");
    }
    Ok(())
}

#[test]
fn merge_matches_peft_merge_and_unload() -> anyhow::Result<()> {
    let s = Scratch::new()?;
    let out = s.merge();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("merged   h.0.c_fc.weight (in, out)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("merged   h.1.gate.weight (out, in)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("6 merged, 8 replaced, 6 copied unchanged"),
        "{stdout}"
    );
    assert_matches_peft_merge(&s.path("out.safetensors"), 1e-5)?;
    let bytes = std::fs::read(s.path("out.safetensors"))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)?;
    assert_eq!(
        meta.metadata()
            .as_ref()
            .and_then(|m| m.get("format"))
            .map(String::as_str),
        Some("pt")
    );
    Ok(())
}

#[test]
fn merge_keeps_dtypes_and_honours_prefix_and_adapter_name() -> anyhow::Result<()> {
    let s = Scratch::new()?;
    // A base with an f16 copy of everything under "model.", plus an integer buffer.
    s.edit("base.safetensors", |t| {
        let old: Vec<(String, Tensor)> = t.drain().collect();
        for (k, v) in old {
            t.insert(format!("model.{k}"), v.to_dtype(DType::F16)?);
        }
        t.insert(
            "position_ids".into(),
            Tensor::arange(0i64, 7, &Device::Cpu)?,
        );
        Ok(())
    })?;
    // The adapter saved under a non-default name, as PEFT lays it out.
    std::fs::rename(s.path("adapter"), s.path("other"))?;
    std::fs::create_dir(s.path("adapter"))?;
    std::fs::rename(s.path("other"), s.path("adapter/other"))?;
    let out = run(&[
        "merge",
        "--base",
        &s.s("base.safetensors"),
        "--adapter",
        &s.s("adapter"),
        "--adapter-name",
        "other",
        "--base-prefix",
        "model.",
        "--output",
        &s.s("out.safetensors"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ours = candle_core::safetensors::load(s.path("out.safetensors"), &Device::Cpu)?;
    assert_eq!(
        ours["position_ids"].to_vec1::<i64>()?,
        (0..7).collect::<Vec<i64>>()
    );
    let peft = candle_core::safetensors::load(fixture().join("merged.safetensors"), &Device::Cpu)?;
    for (name, want) in &peft {
        let got = &ours[&format!("model.{name}")];
        assert_eq!(got.dtype(), DType::F16, "{name}");
        let err = max_rel_err(got, want)?;
        assert!(err <= 2e-3, "{name}: f16 rel err {err:e}");
    }
    // Without the prefix nothing matches: a clear error, no output.
    std::fs::remove_file(s.path("out.safetensors"))?;
    let out = run(&[
        "merge",
        "--base",
        &s.s("base.safetensors"),
        "--adapter",
        &s.s("adapter/other"),
        "--output",
        &s.s("out.safetensors"),
    ]);
    assert_fails(
        &out,
        &[
            "base.safetensors",
            "no tensor \"h.0.c_fc.weight\"",
            "the base has \"model.h.0.c_fc.weight\": use base prefix \"model.\"",
        ],
    );
    assert!(!s.path("out.safetensors").exists());
    Ok(())
}

#[test]
fn inspect_describes_the_adapter() -> anyhow::Result<()> {
    let dir = fixture().join("adapter");
    let out = run(&[
        "inspect",
        &dir.display().to_string(),
        "--base",
        &fixture().join("base.safetensors").display().to_string(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "adapter_model.safetensors: 4120 bytes",
        "peft_type FOURIERFT  peft_version 0.21.2",
        "n_frequency 60  scaling 87.5  random_loc_seed 31337",
        r#"target_modules regex "h\\.\\d+\\.(c_fc|c_proj|gate)""#,
        r#"n_frequency_pattern {"c_proj":100,"h.1.gate":30}"#,
        "adapted layers (6):",
        "h.0.c_fc  n=60  (d1, d2) = (40, 16), weight stored (in, out)",
        "h.1.gate  n=30  (d1, d2) = (24, 16), weight stored (out, in)",
        "extra tensor head.weight [6, 16]",
        "trainable parameters: 410 spectral coefficients + 262 in extra tensors = 672",
    ] {
        assert!(
            stdout.contains(needle),
            "inspect lacks {needle:?}:\n{stdout}"
        );
    }
    let out = run(&["inspect", &dir.display().to_string()]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("(d1, d2) unknown: pass --base"));
    // A base the adapter does not fit.
    let s = Scratch::new()?;
    s.edit("base.safetensors", |t| {
        t.insert(
            "h.1.gate.weight".into(),
            Tensor::zeros((4, 4), DType::F32, &Device::Cpu)?,
        );
        t.insert(
            "h.1.gate.bias".into(),
            Tensor::zeros(4, DType::F32, &Device::Cpu)?,
        );
        Ok(())
    })?;
    let out = run(&[
        "inspect",
        &s.s("adapter"),
        "--base",
        &s.s("base.safetensors"),
    ]);
    assert_fails(
        &out,
        &[
            "h.1.gate",
            "n_frequency must be in 1..=16 for a 4x4 layer, found 30",
        ],
    );
    Ok(())
}

#[test]
fn missing_and_corrupt_files() -> anyhow::Result<()> {
    let s = Scratch::new()?;
    std::fs::remove_file(s.path("base.safetensors"))?;
    s.merge_fails(&["base.safetensors", "No such file"]);

    let s = Scratch::new()?;
    std::fs::remove_dir_all(s.path("adapter"))?;
    std::fs::create_dir(s.path("adapter"))?;
    s.merge_fails(&["adapter_config.json", "No such file"]);

    let s = Scratch::new()?;
    std::fs::remove_file(s.path("adapter/adapter_model.safetensors"))?;
    s.merge_fails(&["adapter_model.safetensors", "No such file"]);

    let s = Scratch::new()?;
    std::fs::write(s.path("base.safetensors"), b"garbage, not safetensors")?;
    s.merge_fails(&["base.safetensors", "not a valid safetensors file"]);

    let s = Scratch::new()?;
    let bytes = std::fs::read(s.path("adapter/adapter_model.safetensors"))?;
    std::fs::write(
        s.path("adapter/adapter_model.safetensors"),
        &bytes[..bytes.len() / 2],
    )?;
    s.merge_fails(&["adapter_model.safetensors", "not a valid safetensors file"]);

    let s = Scratch::new()?;
    std::fs::write(s.path("adapter/adapter_config.json"), "{ this is not json")?;
    s.merge_fails(&["adapter_config.json", "invalid adapter config"]);

    // The output directory does not exist.
    let s = Scratch::new()?;
    let out = run(&[
        "merge",
        "--base",
        &s.s("base.safetensors"),
        "--adapter",
        &s.s("adapter"),
        "--output",
        &s.s("no/such/dir/out.safetensors"),
    ]);
    assert_fails(&out, &["no/such/dir"]);
    Ok(())
}

#[test]
fn missing_unmatched_and_mismatched_keys() -> anyhow::Result<()> {
    // The base lacks an adapted weight.
    let s = Scratch::new()?;
    s.edit("base.safetensors", |t| {
        t.remove("h.1.c_proj.weight");
        Ok(())
    })?;
    s.merge_fails(&[
        "base.safetensors",
        "no tensor \"h.1.c_proj.weight\" for adapted module \"h.1.c_proj\"",
        "base_model.model.h.1.c_proj.fourierft_spectrum",
    ]);

    // The adapter holds a spectrum its configuration does not target.
    let s = Scratch::new()?;
    s.edit("adapter/adapter_model.safetensors", |t| {
        let x = t["base_model.model.h.0.c_fc.fourierft_spectrum"].clone();
        t.insert("base_model.model.h.0.up.fourierft_spectrum".into(), x);
        Ok(())
    })?;
    s.merge_fails(&[
        "adapter_model.safetensors",
        "unmatched key",
        "h.0.up.fourierft_spectrum",
    ]);

    // A modules_to_save tensor whose shape differs from the base's.
    let s = Scratch::new()?;
    s.edit("adapter/adapter_model.safetensors", |t| {
        t.insert(
            "base_model.model.head.weight".into(),
            Tensor::zeros((6, 15), DType::F32, &Device::Cpu)?,
        );
        Ok(())
    })?;
    s.merge_fails(&["\"head.weight\"", "expected shape [6, 16], found [6, 15]"]);

    // A base weight that is not a matrix.
    let s = Scratch::new()?;
    s.edit("base.safetensors", |t| {
        t.insert(
            "h.0.gate.weight".into(),
            Tensor::zeros((24, 16, 1), DType::F32, &Device::Cpu)?,
        );
        Ok(())
    })?;
    s.merge_fails(&[
        "h.0.gate.weight",
        "expected shape 2 dims, found [24, 16, 1]",
    ]);

    // A spectrum whose length is not the configured n_frequency.
    let s = Scratch::new()?;
    s.edit_config(|v| v["n_frequency_pattern"]["c_proj"] = 99.into())?;
    s.merge_fails(&[
        "base_model.model.h.0.c_proj.fourierft_spectrum",
        "expected shape [99]",
        "found [100]",
    ]);
    Ok(())
}

#[test]
fn impossible_sizes_types_and_values() -> anyhow::Result<()> {
    // n > d1·d2.
    let s = Scratch::new()?;
    s.edit("base.safetensors", |t| {
        t.insert(
            "h.1.gate.weight".into(),
            Tensor::zeros((4, 4), DType::F32, &Device::Cpu)?,
        );
        Ok(())
    })?;
    s.merge_fails(&[
        "h.1.gate.weight",
        "n_frequency must be in 1..=16 for a 4x4 layer, found 30",
    ]);

    // Wrong peft_type.
    let s = Scratch::new()?;
    s.edit_config(|v| v["peft_type"] = "LORA".into())?;
    s.merge_fails(&[
        "adapter_config.json",
        "peft_type is \"LORA\", expected \"FOURIERFT\"",
    ]);

    // Non-finite coefficients in the adapter.
    let s = Scratch::new()?;
    s.edit("adapter/adapter_model.safetensors", |t| {
        let key = "base_model.model.h.1.c_fc.fourierft_spectrum";
        let mut v = t[key].to_vec1::<f32>()?;
        v[3] = f32::INFINITY;
        t.insert(key.into(), Tensor::new(v, &Device::Cpu)?);
        Ok(())
    })?;
    s.merge_fails(&[
        "h.1.c_fc.fourierft_spectrum",
        "non-finite value (inf) at index 3",
    ]);

    // Non-finite base weights: the merge is refused.
    let s = Scratch::new()?;
    s.edit("base.safetensors", |t| {
        let w = t["h.0.gate.weight"].clone();
        let mut v = w.flatten_all()?.to_vec1::<f32>()?;
        v[5] = f32::NAN;
        t.insert(
            "h.0.gate.weight".into(),
            Tensor::from_vec(v, w.dims(), &Device::Cpu)?,
        );
        Ok(())
    })?;
    s.merge_fails(&["h.0.gate.weight", "produces non-finite weights"]);

    // Non-finite modules_to_save values.
    let s = Scratch::new()?;
    s.edit("adapter/adapter_model.safetensors", |t| {
        t.insert(
            "base_model.model.head.bias".into(),
            Tensor::new(&[0f32, 1., f32::NEG_INFINITY, 0., 0., 0.], &Device::Cpu)?,
        );
        Ok(())
    })?;
    s.merge_fails(&["base_model.model.head.bias", "non-finite value (-inf)"]);
    Ok(())
}

#[test]
fn bad_command_lines_exit_2_on_one_line() {
    assert_fails(&run(&[]), &["a subcommand is required"]);
    assert_fails(
        &run(&["merge", "--base", "x"]),
        &["--adapter <ADAPTER>", "--output <OUTPUT>"],
    );
    assert_fails(&run(&["frobnicate"]), &["unrecognized subcommand"]);
    assert_fails(
        &run(&["inspect", "/definitely/not/here"]),
        &["/definitely/not/here"],
    );
    let help = run(&["--help"]);
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).contains("merge"));
}

#[test]
fn inspect_rejects_forged_base_headers_without_allocating() -> anyhow::Result<()> {
    let s = Scratch::new()?;
    let inspect = |base: &str| run(&["inspect", &s.s("adapter"), "--base", &s.s(base)]);
    // A header length far beyond the file (inspect reads only the header).
    let mut huge = (1u64 << 40).to_le_bytes().to_vec();
    huge.extend_from_slice(b"{}");
    std::fs::write(s.path("huge.safetensors"), &huge)?;
    assert_fails(
        &inspect("huge.safetensors"),
        &[
            "huge.safetensors",
            "not a valid safetensors file: header of 1099511627776 bytes in a file of 10 bytes",
        ],
    );
    // Shapes whose byte size disagrees with the data, and a header with data it does not
    // describe: rejected as safetensors itself does, before any shape is used.
    let header = r#"{"h.0.c_fc.weight":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]}}"#;
    let mut forged = (header.len() as u64).to_le_bytes().to_vec();
    forged.extend_from_slice(header.as_bytes());
    forged.extend_from_slice(&[0; 4]);
    std::fs::write(s.path("forged.safetensors"), &forged)?;
    assert_fails(
        &inspect("forged.safetensors"),
        &["forged.safetensors", "not a valid safetensors file"],
    );
    let header = r#"{"h.0.c_fc.weight":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
    let mut extra = (header.len() as u64).to_le_bytes().to_vec();
    extra.extend_from_slice(header.as_bytes());
    extra.extend_from_slice(&[0; 12]);
    std::fs::write(s.path("extra.safetensors"), &extra)?;
    assert_fails(
        &inspect("extra.safetensors"),
        &[
            "extra.safetensors",
            "the header describes 4 bytes of tensor data, the file holds 12",
        ],
    );
    Ok(())
}

/// Real-PEFT adapters of tiny transformers models (`tests/fixtures/peft_interop/`): the CLI merge
/// equals `merge_and_unload()` to 1e-5 — lm_head targeted (its stored base weight gets ΔW, not
/// the other way round), and GPT-2 Conv1D next to an nn.Linear lm_head, whose square
/// `attn.c_proj` is refused until `--base-config` or `--fan-in-fan-out` says its layout.
#[test]
fn merge_equals_peft_on_real_models() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft_interop");
    let tmp = tempfile::tempdir()?;
    let merge = |case: &str, extra: &[&str]| {
        let dir = root.join(case);
        let base = dir.join("base/model.safetensors").display().to_string();
        let adapter = dir.join("adapter").display().to_string();
        let out = tmp.path().join(format!("{case}.safetensors"));
        let out_s = out.display().to_string();
        let mut args = vec![
            "merge",
            "--base",
            &base,
            "--adapter",
            &adapter,
            "--output",
            &out_s,
        ];
        args.extend_from_slice(extra);
        (run(&args), out)
    };
    let check = |case: &str, out: &Path| -> anyhow::Result<()> {
        let ours = candle_core::safetensors::load(out, &Device::Cpu)?;
        let peft = candle_core::safetensors::load(
            root.join(case).join("merged.safetensors"),
            &Device::Cpu,
        )?;
        assert_eq!(ours.len(), peft.len(), "{case}");
        for (name, want) in &peft {
            let d = (ours[name].to_dtype(DType::F64)? - want.to_dtype(DType::F64)?)?;
            let err = d.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
            assert!(err <= 1e-5, "{case}: {name} off by {err:e}");
        }
        Ok(())
    };
    let (out, file) = merge("llama_lm_head", &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("merged   lm_head.weight") && !stdout.contains("replaced lm_head"),
        "{stdout}"
    );
    check("llama_lm_head", &file)?;

    let (out, file) = merge("gpt2_mixed", &[]);
    assert_fails(
        &out,
        &[
            "transformer.h.0.attn.c_proj",
            "--base-config",
            "--fan-in-fan-out",
        ],
    );
    assert!(!file.exists());
    let config = root
        .join("gpt2_mixed/base/config.json")
        .display()
        .to_string();
    let (out, file) = merge("gpt2_mixed", &["--base-config", &config]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    check("gpt2_mixed", &file)?;
    let (out, file) = merge("gpt2_mixed", &["--fan-in-fan-out", r".*\.c_(attn|proj)"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    check("gpt2_mixed", &file)?;
    for case in ["bert_seqcls", "bert_bias_all"] {
        let (out, file) = merge(case, &[]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        check(case, &file)?;
    }
    Ok(())
}
