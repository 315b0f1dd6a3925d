//! Round trips with real Hugging Face PEFT (`scripts/peft_roundtrip.py`).
//!
//! (a) PEFT → Rust: a toy GPT-2-like model (non-square `nn.Linear` and `Conv1D` layers) adapted by
//!     PEFT with a regex `target_modules`, `n_frequency_pattern`, seed 31337, `fan_in_fan_out` on
//!     the Conv1D weights, `modules_to_save` and `bias = "fourier_only"`. Rust loads the adapter
//!     directory and reproduces PEFT's outputs and `merge_and_unload()` weights.
//! (b) Rust → PEFT: a Rust-made adapter, committed under `tests/fixtures/rust_adapter/` with the
//!     Rust outputs; `scripts/peft_roundtrip.py check` loads it with `PeftModel.from_pretrained`
//!     and compares. Here: the adapter regenerates byte for byte and the outputs still match.
//!     `FOURIERFT_BLESS=1` rewrites the fixture.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use fourierft::backend::MergedBackend;
use fourierft::config::{ModuleSelector, OneOrMany};
use fourierft::inject::{self, AdaptableLinear, AdapterContext};
use fourierft::peft::{merge_safetensors, PeftAdapter, CONFIG_FILE, WEIGHTS_FILE};
use fourierft::FourierFTConfig;

const TOL: f64 = 1e-5;

fn fixtures() -> PathBuf {
    common::fixture("")
}

fn load(path: PathBuf) -> anyhow::Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(path, &Device::Cpu)?)
}

/// The PEFT fixture's base weights as a plain VarBuilder.
fn base_vb() -> anyhow::Result<VarBuilder<'static>> {
    let t = load(fixtures().join("peft_roundtrip/base.safetensors"))?;
    Ok(VarBuilder::from_tensors(t, DType::F32, &Device::Cpu))
}

fn expected(name: &str) -> anyhow::Result<Tensor> {
    let mut t = load(fixtures().join("peft_roundtrip/expected.safetensors"))?;
    t.remove(name)
        .ok_or_else(|| anyhow::anyhow!("no {name} in expected.safetensors"))
}

/// max |a - b| / max |b|, with the max abs error.
fn rel_err(a: &Tensor, b: &Tensor) -> anyhow::Result<(f64, f64)> {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F64)?.flatten_all()?;
    let b = b.to_dtype(DType::F64)?.flatten_all()?;
    let abs = (&a - &b)?.abs()?.max(0)?.to_scalar::<f64>()?;
    let scale = b.abs()?.max(0)?.to_scalar::<f64>()?.max(1e-30);
    Ok((abs / scale, abs))
}

fn assert_close(a: &Tensor, b: &Tensor, what: &str) -> anyhow::Result<()> {
    let (rel, abs) = rel_err(a, b)?;
    println!("{what}: max abs err {abs:.3e}, rel {rel:.3e}");
    assert!(
        rel <= TOL,
        "{what}: relative error {rel:e} (abs {abs:e}) > {TOL:e}"
    );
    Ok(())
}

// The toy model of scripts/peft_roundtrip.py, written once with `fourierft::inject` and no other
// FourierFT code. With a plain VarBuilder it is an ordinary candle model.
struct Block {
    c_fc: AdaptableLinear,
    c_proj: AdaptableLinear,
    gate: AdaptableLinear,
    up: AdaptableLinear,
}

impl Block {
    fn new(vb: VarBuilder) -> fourierft::Result<Self> {
        Ok(Self {
            c_fc: inject::conv1d(16, 40, vb.pp("c_fc"))?,
            c_proj: inject::conv1d(40, 16, vb.pp("c_proj"))?,
            gate: inject::linear(16, 24, vb.pp("gate"))?,
            up: inject::linear(24, 16, vb.pp("up"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = (x + self.c_proj.forward(&self.c_fc.forward(x)?.tanh()?)?)?;
        &x + self.up.forward(&self.gate.forward(&x)?.relu()?)?
    }
}

struct Toy {
    embed: AdaptableLinear,
    h: Vec<Block>,
    head: AdaptableLinear,
}

impl Toy {
    fn new(vb: VarBuilder) -> fourierft::Result<Self> {
        Ok(Self {
            embed: inject::linear(12, 16, vb.pp("embed"))?,
            h: (0..2)
                .map(|i| Block::new(vb.pp("h").pp(i)))
                .collect::<fourierft::Result<_>>()?,
            head: inject::linear(16, 6, vb.pp("head"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = self.embed.forward(x)?;
        for b in &self.h {
            x = b.forward(&x)?;
        }
        self.head.forward(&x)
    }
}

#[test]
fn toy_port_matches_the_python_base_model() -> anyhow::Result<()> {
    let toy = Toy::new(base_vb()?)?;
    assert!(toy.h[0].c_fc.fourier().is_none());
    assert_close(
        &toy.forward(&expected("x")?)?,
        &expected("y_base")?,
        "base model",
    )
}

#[test]
fn a_peft_adapter_reproduces_peft_outputs_and_merge() -> anyhow::Result<()> {
    let ctx = AdapterContext::load(fixtures().join("peft_roundtrip/adapter"))?;
    let toy = Toy::new(ctx.var_builder(base_vb()?))?;
    ctx.check()?;
    assert_eq!(
        ctx.layer_paths(),
        [
            "h.0.c_fc",
            "h.0.c_proj",
            "h.0.gate",
            "h.1.c_fc",
            "h.1.c_proj",
            "h.1.gate"
        ]
    );
    assert!(toy.h[1]
        .c_proj
        .fourier()
        .is_some_and(|l| l.fan_in_fan_out()));
    assert!(toy.h[1].gate.fourier().is_some_and(|l| !l.fan_in_fan_out()));
    assert!(toy.h[0].up.fourier().is_none() && toy.head.fourier().is_none());
    // 410 spectral coefficients, plus what PEFT trains in full with bias = "fourier_only" and
    // modules_to_save: the head and the adapted layers' biases (262 values, as `fourierft
    // inspect` counts the saved extra tensors).
    let coefficients: usize = ctx.layers().iter().map(|l| l.num_trainable()).sum();
    assert_eq!(coefficients, 410);
    assert_eq!(ctx.num_trainable(), 672);

    let x = expected("x")?;
    assert_close(
        &toy.forward(&x)?,
        &expected("y_adapted")?,
        "(a) unmerged vs PEFT",
    )?;
    ctx.merge()?;
    assert_close(
        &toy.forward(&x)?,
        &expected("y_merged")?,
        "(a) merged vs PEFT",
    )?;
    let merged = load(fixtures().join("peft_roundtrip/merged.safetensors"))?;
    for layer in ctx.layers() {
        let name = format!("{}.weight", layer.name());
        assert_close(
            &layer.weight(),
            &merged[&name],
            &format!("(a) {name} vs PEFT"),
        )?;
        let bias = format!("{}.bias", layer.name());
        assert_close(&layer.bias().expect("bias"), &merged[&bias], &bias)?;
    }
    ctx.unmerge()?;
    assert_close(
        &toy.forward(&x)?,
        &expected("y_adapted")?,
        "(a) unmerged again",
    )?;
    Ok(())
}

#[test]
fn merged_var_builder_serves_peft_merged_weights_to_a_plain_model() -> anyhow::Result<()> {
    let adapter = PeftAdapter::load(fixtures().join("peft_roundtrip/adapter"))?;
    let merged = MergedBackend::new(base_vb()?, adapter);
    let toy = Toy::new(merged.var_builder())?; // no context: plain candle Linear layers
    merged.check_all_used()?;
    assert!(toy.h[0].c_fc.fourier().is_none());
    assert_close(
        &toy.forward(&expected("x")?)?,
        &expected("y_merged")?,
        "(a) MergedBackend vs PEFT",
    )?;
    let vb = merged.var_builder();
    for (name, want) in load(fixtures().join("peft_roundtrip/merged.safetensors"))? {
        let got = vb.get(want.dims(), &name)?;
        assert_close(&got, &want, &format!("(a) served {name}"))?;
    }
    Ok(())
}

#[test]
fn merge_safetensors_reproduces_peft_merge_and_unload() -> anyhow::Result<()> {
    let adapter = PeftAdapter::load(fixtures().join("peft_roundtrip/adapter"))?;
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("merged.safetensors");
    let base = fixtures().join("peft_roundtrip/base.safetensors");
    let summary = merge_safetensors(&base, &adapter, "", &out)?;
    let layouts: Vec<(&str, bool)> = summary
        .merged
        .iter()
        .map(|(n, f)| (n.as_str(), *f))
        .collect();
    assert_eq!(
        layouts,
        [
            ("h.0.c_fc.weight", true),
            ("h.0.c_proj.weight", true),
            ("h.0.gate.weight", false),
            ("h.1.c_fc.weight", true),
            ("h.1.c_proj.weight", true),
            ("h.1.gate.weight", false)
        ]
    );
    assert_eq!(summary.replaced.len(), 8);
    let ours = load(out)?;
    let peft = load(fixtures().join("peft_roundtrip/merged.safetensors"))?;
    assert_eq!(ours.len(), peft.len());
    for (name, want) in &peft {
        assert_close(&ours[name], want, &format!("(a) merge_safetensors {name}"))?;
    }
    Ok(())
}

/// The adapter of round trip (b): list target_modules with layers_to_transform/layers_pattern,
/// n_frequency_pattern, seed 4242, standard-normal coefficients from a fixed init seed.
fn rust_config() -> FourierFTConfig {
    FourierFTConfig {
        n_frequency: 50,
        scaling: 90.0,
        random_loc_seed: 4242,
        target_modules: Some(ModuleSelector::Names(vec![
            "c_fc".into(),
            "gate".into(),
            "up".into(),
        ])),
        layers_to_transform: Some(OneOrMany::Many(vec![1])),
        layers_pattern: Some(OneOrMany::One("h".into())),
        n_frequency_pattern: vec![("up".into(), 70)],
        init_seed: Some(11),
        ..Default::default()
    }
}

#[test]
fn rust_adapter_fixture_is_reproducible() -> anyhow::Result<()> {
    let fixture = fixtures().join("rust_adapter");
    let ctx = AdapterContext::new(rust_config())?;
    let toy = Toy::new(ctx.var_builder(base_vb()?))?;
    ctx.check()?;
    assert_eq!(ctx.layer_paths(), ["h.1.c_fc", "h.1.gate", "h.1.up"]);
    let x = expected("x")?;
    let mut out: HashMap<String, Tensor> = HashMap::new();
    out.insert("y_adapted".into(), toy.forward(&x)?);
    ctx.merge()?;
    out.insert("y_merged".into(), toy.forward(&x)?);
    for layer in ctx.layers() {
        out.insert(format!("merged.{}.weight", layer.name()), layer.weight());
    }
    ctx.unmerge()?;

    if std::env::var_os("FOURIERFT_BLESS").is_some() {
        ctx.save_pretrained(fixture.join("adapter"))?;
        candle_core::safetensors::save(&out, fixture.join("expected.safetensors"))?;
        println!("wrote {}", fixture.display());
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let dir = ctx.save_pretrained(tmp.path())?;
    for f in [CONFIG_FILE, WEIGHTS_FILE] {
        let ours = std::fs::read(dir.join(f))?;
        let committed = std::fs::read(fixture.join("adapter").join(f))?;
        assert!(ours == committed, "{f} differs from the committed fixture");
    }
    let committed = load(fixture.join("expected.safetensors"))?;
    assert_eq!(committed.len(), out.len());
    for (name, want) in &committed {
        assert_close(&out[name], want, &format!("(b) {name}"))?;
    }
    // Loading the saved adapter back gives the same model.
    let back = AdapterContext::load(dir)?;
    let toy2 = Toy::new(back.var_builder(base_vb()?))?;
    back.check()?;
    assert_close(&toy2.forward(&x)?, &committed["y_adapted"], "(b) reloaded")?;
    Ok(())
}
