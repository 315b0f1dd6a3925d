//! Adapters trained by real PEFT 0.21.2 on tiny random-init transformers models
//! (`scripts/make_peft_fixtures.py interop`, `tests/fixtures/peft_interop/<case>/`): the offline
//! merge and the merged `VarBuilder` backend equal PEFT's `merge_and_unload()` to 1e-5, and
//! unmodified candle-transformers models loaded through the backend reproduce PEFT's logits.
//!
//! Cases: `llama_lm_head` (lm_head targeted; PEFT also stores its base weight), `gpt2_mixed`
//! (Conv1D `c_attn`/`c_proj` next to an `nn.Linear` lm_head; the file's `fan_in_fan_out` is
//! `false`), `bert_seqcls` (SEQ_CLS: a trained classifier head in `modules_to_save`),
//! `bert_bias_all` (`bias = "all"`: every bias trained and saved).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::VarBuilder;
use fourierft::backend::MergedBackend;
use fourierft::peft::{merge_safetensors_with, Orientation, PeftAdapter};
use fourierft::Error;

const CASES: [&str; 4] = [
    "llama_lm_head",
    "gpt2_mixed",
    "bert_seqcls",
    "bert_bias_all",
];
const TOL: f64 = 1e-5;

fn case_dir(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/peft_interop")
        .join(case)
}

fn load(path: &Path) -> anyhow::Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(path, &Device::Cpu)?)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> anyhow::Result<f64> {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F64)?.flatten_all()?;
    let b = b.to_dtype(DType::F64)?.flatten_all()?;
    Ok((a - b)?.abs()?.max(0)?.to_scalar::<f64>()?)
}

/// What the base model's config.json says about layouts.
fn orientation(case: &str) -> anyhow::Result<Orientation> {
    Ok(Orientation::new().with_model_config_file(case_dir(case).join("base/config.json"))?)
}

/// Every tensor of `found` equals PEFT's merged state dict to `TOL`; returns the worst error.
fn assert_matches_merged(case: &str, found: &HashMap<String, Tensor>) -> anyhow::Result<f64> {
    let want = load(&case_dir(case).join("merged.safetensors"))?;
    let mut worst = 0f64;
    for (name, w) in &want {
        let f = found
            .get(name)
            .ok_or_else(|| anyhow::anyhow!("{case}: no {name}"))?;
        let err = max_abs_diff(f, w)?;
        assert!(
            err <= TOL,
            "{case}: {name} differs from PEFT's merge by {err:e}"
        );
        worst = worst.max(err);
    }
    Ok(worst)
}

#[test]
fn file_merge_equals_peft_merge_and_unload() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    for case in CASES {
        let dir = case_dir(case);
        let adapter = PeftAdapter::load(dir.join("adapter"))?;
        let out = tmp.path().join(format!("{case}.safetensors"));
        let base = dir.join("base/model.safetensors");
        let summary = merge_safetensors_with(&base, &adapter, "", &orientation(case)?, &out)?;
        let worst = assert_matches_merged(case, &load(&out)?)?;
        println!(
            "{case}: {} merged, worst error {worst:.2e}",
            summary.merged.len()
        );
        // Nothing that received ΔW is also "replaced" by an extra tensor.
        for (name, _) in &summary.merged {
            assert!(
                !summary.replaced.contains(name),
                "{case}: {name} merged and replaced"
            );
        }
    }
    Ok(())
}

/// The bug this guards against: PEFT stores lm_head's base weight next to its spectrum, and the
/// merge wrote that plain base weight over the merged one.
#[test]
fn lm_head_receives_its_delta_weight() -> anyhow::Result<()> {
    let dir = case_dir("llama_lm_head");
    let adapter = PeftAdapter::load(dir.join("adapter"))?;
    assert!(adapter.stored_base_weight("lm_head").is_some());
    assert!(adapter.replacements().all(|(n, _)| n != "lm_head.weight"));
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("merged.safetensors");
    let base = dir.join("base/model.safetensors");
    merge_safetensors_with(&base, &adapter, "", &Orientation::new(), &out)?;
    let merged = load(&out)?;
    let base = load(&base)?;
    let moved = max_abs_diff(&merged["lm_head.weight"], &base["lm_head.weight"])?;
    assert!(moved > 1e-3, "lm_head.weight left at its base value");
    assert_matches_merged("llama_lm_head", &merged)?;
    Ok(())
}

/// The stored base weight is W0 for the merge (PEFT loads it into the model first), not the
/// checkpoint's; a stored weight of another shape is an error, not a silent choice.
#[test]
fn stored_base_weight_is_w0() -> anyhow::Result<()> {
    let dir = case_dir("llama_lm_head");
    let adapter = PeftAdapter::load(dir.join("adapter"))?;
    let mut base = load(&dir.join("base/model.safetensors"))?;
    let stored = adapter.stored_base_weight("lm_head").unwrap().clone();
    let tmp = tempfile::tempdir()?;
    // A checkpoint whose lm_head differs: the result still starts from the stored W0.
    base.insert("lm_head.weight".into(), (&stored + 1.0)?);
    let other = tmp.path().join("other.safetensors");
    candle_core::safetensors::save(&base, &other)?;
    let out = tmp.path().join("merged.safetensors");
    merge_safetensors_with(&other, &adapter, "", &Orientation::new(), &out)?;
    assert_matches_merged("llama_lm_head", &load(&out)?)?;

    base.insert("lm_head.weight".into(), stored.narrow(0, 0, 10)?);
    candle_core::safetensors::save(&base, &other)?;
    let e = merge_safetensors_with(&other, &adapter, "", &Orientation::new(), &out).unwrap_err();
    assert!(matches!(e, Error::Shape { .. }), "{e}");
    assert!(e.to_string().contains("lm_head.base_layer.weight"), "{e}");
    Ok(())
}

/// GPT-2: the file says fan_in_fan_out=false (lm_head was adapted last); c_attn and c_proj are
/// Conv1D. The square attn.c_proj cannot be told from the files: without the model's config the
/// merge is refused naming it; with the config or an explicit regex it equals PEFT's merge.
#[test]
fn gpt2_square_conv1d_is_never_guessed() -> anyhow::Result<()> {
    let dir = case_dir("gpt2_mixed");
    let adapter = PeftAdapter::load(dir.join("adapter"))?;
    assert!(!adapter.config().fan_in_fan_out);
    let base = dir.join("base/model.safetensors");
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("merged.safetensors");
    let e = merge_safetensors_with(&base, &adapter, "", &Orientation::new(), &out).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Config(_)), "{msg}");
    assert!(
        msg.contains("attn.c_proj") && msg.contains("--base-config"),
        "{msg}"
    );
    assert!(!out.exists(), "a refused merge wrote its output");

    let regex = Orientation::new().with_fan_in_fan_out(r".*\.(c_attn|c_proj)")?;
    merge_safetensors_with(&base, &adapter, "", &regex, &out)?;
    assert_matches_merged("gpt2_mixed", &load(&out)?)?;

    // An override that contradicts a layer's own bias is refused too.
    let wrong = Orientation::new().with_fan_in_fan_out(r".*\.c_attn")?;
    let e = merge_safetensors_with(&base, &adapter, "", &wrong, &out).unwrap_err();
    assert!(e.to_string().contains("mlp.c_proj"), "{e}");
    Ok(())
}

fn base_vb(case: &str) -> anyhow::Result<VarBuilder<'static>> {
    let t = load(&case_dir(case).join("base/model.safetensors"))?;
    Ok(VarBuilder::from_tensors(t, DType::F32, &Device::Cpu))
}

#[test]
fn merged_backend_equals_peft_merge_and_unload() -> anyhow::Result<()> {
    for case in CASES {
        let adapter = PeftAdapter::load(case_dir(case).join("adapter"))?;
        let merged =
            MergedBackend::new(base_vb(case)?, adapter).with_orientation(orientation(case)?);
        let vb = merged.var_builder();
        let want = load(&case_dir(case).join("merged.safetensors"))?;
        let mut found = HashMap::new();
        for (name, w) in &want {
            found.insert(name.clone(), vb.get(w.dims(), name)?);
        }
        assert_matches_merged(case, &found)?;
        merged.check_all_used()?;
    }
    // Without the model's config, GPT-2's square Conv1D weight is refused by name.
    let adapter = PeftAdapter::load(case_dir("gpt2_mixed").join("adapter"))?;
    let merged = MergedBackend::new(base_vb("gpt2_mixed")?, adapter);
    let e = merged
        .var_builder()
        .get((32, 32), "transformer.h.0.attn.c_proj.weight")
        .unwrap_err();
    assert!(e.to_string().contains("attn.c_proj"), "{e}");
    Ok(())
}

fn io(case: &str) -> anyhow::Result<HashMap<String, Tensor>> {
    load(&case_dir(case).join("io.safetensors"))
}

/// The stock candle-transformers Llama, loaded through the merged backend, gives PEFT's logits.
#[test]
fn stock_llama_through_merged_backend_reproduces_peft_logits() -> anyhow::Result<()> {
    use candle_transformers::models::llama::{Cache, Llama, LlamaConfig};
    let case = "llama_lm_head";
    let text = std::fs::read_to_string(case_dir(case).join("base/config.json"))?;
    let config = serde_json::from_str::<LlamaConfig>(&text)?.into_config(false);
    let adapter = PeftAdapter::load(case_dir(case).join("adapter"))?;
    let merged = MergedBackend::new(base_vb(case)?, adapter);
    let model = Llama::load(merged.var_builder(), &config)?;
    merged.check_all_used()?;
    let io = io(case)?;
    let ids = io["input_ids"].to_dtype(DType::U32)?;
    let want = &io["logits_merged"];
    let (batch, seq) = ids.dims2()?;
    for b in 0..batch {
        let mut cache = Cache::new(false, DType::F32, &config, &Device::Cpu)?;
        let row = ids.narrow(0, b, 1)?;
        // candle's Llama returns the last position's logits.
        let logits = model.forward(&row, 0, &mut cache)?.squeeze(0)?;
        let expect = want.get(b)?.get(seq - 1)?;
        let err = max_abs_diff(&logits, &expect)?;
        assert!(err <= 1e-4, "row {b}: logits differ from PEFT's by {err:e}");
        let base = io["logits_base"].get(b)?.get(seq - 1)?;
        assert!(
            max_abs_diff(&base, &expect)? > 1e-3,
            "the adapter changes nothing"
        );
    }
    Ok(())
}

/// The stock candle-transformers BERT plus the classifier head loaded through the same
/// `VarBuilder` (PEFT trained and saved it as `modules_to_save`) gives PEFT's logits.
#[test]
fn stock_bert_with_saved_head_reproduces_peft_logits() -> anyhow::Result<()> {
    use candle_transformers::models::bert::{BertModel, Config};
    for case in ["bert_seqcls", "bert_bias_all"] {
        let text = std::fs::read_to_string(case_dir(case).join("base/config.json"))?;
        let config: Config = serde_json::from_str(&text)?;
        let adapter = PeftAdapter::load(case_dir(case).join("adapter"))?;
        assert!(adapter.extra_tensors().contains_key("classifier.weight"));
        let merged =
            MergedBackend::new(base_vb(case)?, adapter).with_orientation(orientation(case)?);
        let vb = merged.var_builder();
        let bert = BertModel::load(vb.pp("bert"), &config)?;
        let pooler = candle_nn::linear(
            config.hidden_size,
            config.hidden_size,
            vb.pp("bert.pooler.dense"),
        )?;
        let classifier = candle_nn::linear(config.hidden_size, 3, vb.pp("classifier"))?;
        merged.check_all_used()?;
        let io = io(case)?;
        let ids = io["input_ids"].to_dtype(DType::U32)?;
        let types = ids.zeros_like()?;
        let hidden = bert.forward(&ids, &types, None)?;
        let cls = hidden.narrow(1, 0, 1)?.squeeze(1)?;
        let logits = classifier.forward(&pooler.forward(&cls)?.tanh()?)?;
        let err = max_abs_diff(&logits, &io["logits_merged"])?;
        assert!(err <= 1e-4, "{case}: logits differ from PEFT's by {err:e}");
        let base_err = max_abs_diff(&io["logits_base"], &io["logits_merged"])?;
        assert!(base_err > 1e-3, "{case}: the adapter changes nothing");
        let _ = logits.argmax(D::Minus1)?;
    }
    Ok(())
}

/// A toy sequence classifier written with `fourierft::inject` for its adapted layers and plain
/// candle for the rest (layer norm, head): `classifier(mean_t(value(relu(query(ln(embed(x)))))))`.
/// `scripts/peft_roundtrip.py check-seqcls` builds the same model in torch.
struct SeqCls {
    embed: fourierft::inject::AdaptableLinear,
    ln: candle_nn::LayerNorm,
    query: fourierft::inject::AdaptableLinear,
    value: fourierft::inject::AdaptableLinear,
    classifier: candle_nn::Linear,
}

impl SeqCls {
    fn new(vb: VarBuilder) -> candle_core::Result<Self> {
        use fourierft::inject::linear;
        Ok(Self {
            embed: linear(12, 16, vb.pp("embed"))?,
            ln: candle_nn::layer_norm(16, 1e-5, vb.pp("ln"))?,
            query: linear(16, 16, vb.pp("query"))?,
            value: linear(16, 20, vb.pp("value"))?,
            classifier: candle_nn::linear(20, 3, vb.pp("classifier"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.ln.forward(&self.embed.forward(x)?)?;
        let h = self.value.forward(&self.query.forward(&h)?.relu()?)?;
        self.classifier.forward(&h.mean(1)?)
    }
}

fn seqcls_config() -> fourierft::FourierFTConfig {
    fourierft::FourierFTConfig {
        n_frequency: 30,
        scaling: 50.0,
        random_loc_seed: 99,
        target_modules: Some(fourierft::config::ModuleSelector::Names(vec![
            "query".into(),
            "value".into(),
        ])),
        task_type: Some("SEQ_CLS".into()),
        bias: fourierft::config::Bias::All,
        init_weights: true,
        ..Default::default()
    }
}

/// Deterministic base weights and inputs for [`SeqCls`] (splitmix values, no RNG state).
fn seqcls_base() -> anyhow::Result<(HashMap<String, Tensor>, Tensor, Tensor)> {
    let mut seed = 1u64;
    let mut t = |dims: &[usize], scale: f32| -> anyhow::Result<Tensor> {
        seed += 1;
        let n = dims.iter().product();
        let v: Vec<f32> = common::lcg_coeffs(n, seed)
            .into_iter()
            .map(|x| x * scale)
            .collect();
        Ok(Tensor::from_vec(v, dims, &Device::Cpu)?)
    };
    let mut base = HashMap::new();
    for (name, dims, scale) in [
        ("embed.weight", vec![16, 12], 0.3),
        ("embed.bias", vec![16], 0.1),
        ("ln.weight", vec![16], 0.2),
        ("ln.bias", vec![16], 0.1),
        ("query.weight", vec![16, 16], 0.25),
        ("query.bias", vec![16], 0.1),
        ("value.weight", vec![20, 16], 0.25),
        ("value.bias", vec![20], 0.1),
        ("classifier.weight", vec![3, 20], 0.3),
        ("classifier.bias", vec![3], 0.1),
    ] {
        base.insert(name.to_string(), t(&dims, scale)?);
    }
    let ln_w = (base["ln.weight"].clone() + 1.0)?;
    base.insert("ln.weight".into(), ln_w);
    let x = t(&[4, 5, 12], 1.0)?;
    let labels = Tensor::new(&[0u32, 2, 1, 2], &Device::Cpu)?;
    Ok((base, x, labels))
}

/// A SEQ_CLS adapter with `bias = "all"` trained in Rust: the head and every bias are trainable
/// `Var`s the optimizer moves, `save_pretrained` writes them under PEFT's names, and PEFT loads
/// the directory and reproduces the logits (`scripts/peft_roundtrip.py check-seqcls` on the
/// committed fixture `tests/fixtures/rust_seqcls/`; `FOURIERFT_BLESS=1` rewrites it).
#[test]
fn context_trains_and_saves_head_and_biases() -> anyhow::Result<()> {
    use candle_nn::Optimizer;
    use fourierft::inject::AdapterContext;
    let (base, x, labels) = seqcls_base()?;
    let vb = || VarBuilder::from_tensors(base.clone(), DType::F32, &Device::Cpu);
    let ctx = AdapterContext::new(seqcls_config())?;
    let model = SeqCls::new(ctx.var_builder(vb()))?;
    ctx.check()?;
    assert_eq!(
        ctx.config().modules_to_save.as_deref(),
        Some(&["classifier".to_string(), "score".to_string()][..])
    );
    let trained: Vec<String> = ctx.trained_tensors().into_keys().collect();
    assert_eq!(
        trained,
        [
            "classifier.bias",
            "classifier.weight",
            "embed.bias",
            "ln.bias",
            "query.bias",
            "value.bias"
        ]
    );
    assert_eq!(ctx.trainable_vars().len(), 2 + trained.len());
    let mut opt = candle_nn::AdamW::new_lr(ctx.trainable_vars(), 0.05)?;
    let mut losses = vec![];
    for _ in 0..8 {
        let loss = candle_nn::loss::cross_entropy(&model.forward(&x)?, &labels)?;
        losses.push(loss.to_scalar::<f32>()?);
        opt.backward_step(&loss)?;
    }
    assert!(losses[7] < losses[0], "{losses:?}");
    for (name, var) in ctx.trained_tensors() {
        let moved = max_abs_diff(var.as_tensor(), &base[&name])?;
        assert!(moved > 1e-4, "{name} did not train");
    }
    let y = model.forward(&x)?;
    let tmp = tempfile::tempdir()?;
    let dir = ctx.save_pretrained(tmp.path())?;
    let saved = load(&dir.join(fourierft::peft::WEIGHTS_FILE))?;
    let mut keys: Vec<&str> = saved.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "base_model.model.classifier.bias",
            "base_model.model.classifier.weight",
            "base_model.model.embed.bias",
            "base_model.model.ln.bias",
            "base_model.model.query.base_layer.bias",
            "base_model.model.query.fourierft_spectrum",
            "base_model.model.value.base_layer.bias",
            "base_model.model.value.fourierft_spectrum",
        ]
    );
    // Loading the directory back gives the trained model.
    let back = AdapterContext::load(&dir)?;
    let model2 = SeqCls::new(back.var_builder(vb()))?;
    back.check()?;
    assert!(max_abs_diff(&model2.forward(&x)?, &y)? <= 1e-6);
    // Merged deployment of an unmodified model: the same logits.
    let merged = MergedBackend::new(vb(), PeftAdapter::load(&dir)?);
    let plain = merged.load(|vb| {
        let l = |i, o, p: &str| candle_nn::linear(i, o, vb.pp(p));
        Ok((
            l(12, 16, "embed")?,
            candle_nn::layer_norm(16, 1e-5, vb.pp("ln"))?,
            l(16, 16, "query")?,
            l(16, 20, "value")?,
            l(20, 3, "classifier")?,
        ))
    })?;
    let h = plain.1.forward(&plain.0.forward(&x)?)?;
    let h = plain.3.forward(&plain.2.forward(&h)?.relu()?)?;
    let y_plain = plain.4.forward(&h.mean(1)?)?;
    assert!(max_abs_diff(&y_plain, &y)? <= 1e-5);

    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rust_seqcls");
    if std::env::var_os("FOURIERFT_BLESS").is_some() {
        std::fs::create_dir_all(&fixture)?;
        ctx.save_pretrained(fixture.join("adapter"))?;
        candle_core::safetensors::save(&base, fixture.join("base.safetensors"))?;
        let io: HashMap<String, Tensor> =
            [("x".to_string(), x.clone()), ("y_adapted".to_string(), y)].into();
        candle_core::safetensors::save(&io, fixture.join("expected.safetensors"))?;
        return Ok(());
    }
    // The committed adapter (checked by PEFT) loads to the committed logits.
    let committed = AdapterContext::load(fixture.join("adapter"))?;
    let model3 = SeqCls::new(committed.var_builder(vb()))?;
    committed.check()?;
    let expected = load(&fixture.join("expected.safetensors"))?;
    assert!(max_abs_diff(&model3.forward(&expected["x"])?, &expected["y_adapted"])? <= 1e-5);
    Ok(())
}

/// A MergedBackend whose model never asks for the adapter's head says so, and a wrong prefix
/// says which prefix would fit.
#[test]
fn merged_backend_errors_point_at_the_fix() -> anyhow::Result<()> {
    use candle_transformers::models::bert::{BertModel, Config};
    let case = "bert_seqcls";
    let text = std::fs::read_to_string(case_dir(case).join("base/config.json"))?;
    let config: Config = serde_json::from_str(&text)?;
    let adapter = || PeftAdapter::load(case_dir(case).join("adapter"));
    // No head built: not "the adapter does not fit" but "build the head".
    let merged = MergedBackend::new(base_vb(case)?, adapter()?);
    let e = merged
        .load(|vb| BertModel::load(vb.pp("bert"), &config))
        .err()
        .unwrap();
    let msg = e.to_string();
    assert!(
        msg.contains("classifier.weight") && msg.contains("VarBuilder"),
        "{msg}"
    );
    // The base checkpoint of a BertModel has no "bert." prefix: the adapter's paths do.
    let stripped: HashMap<String, Tensor> = load(&case_dir(case).join("base/model.safetensors"))?
        .into_iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("bert.")?.to_string(), v)))
        .collect();
    let vb = VarBuilder::from_tensors(stripped.clone(), DType::F32, &Device::Cpu);
    let merged = MergedBackend::new(vb, adapter()?);
    let e = merged
        .load(|vb| BertModel::load(vb, &config))
        .err()
        .unwrap();
    let msg = e.to_string();
    assert!(
        msg.contains("\"bert.\"") && msg.contains("never asked"),
        "{msg}"
    );
    // The file merge says the same.
    let tmp = tempfile::tempdir()?;
    let file = tmp.path().join("bert.safetensors");
    candle_core::safetensors::save(&stripped, &file)?;
    let e = merge_safetensors_with(
        &file,
        &adapter()?,
        "",
        &Orientation::new(),
        &tmp.path().join("o"),
    )
    .unwrap_err();
    assert!(e.to_string().contains("\"bert.\""), "{e}");
    Ok(())
}

/// Rust → PEFT for every case: the adapter re-saved by the crate has exactly the tensor names and
/// values PEFT wrote and PEFT reads the same configuration; the re-saved directories are committed
/// (`FOURIERFT_BLESS=1` rewrites them) and `scripts/peft_roundtrip.py check-interop` loads each
/// with `PeftModel.from_pretrained` and reproduces PEFT's own logits.
#[test]
fn resaved_adapters_are_what_peft_wrote() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    for case in CASES {
        let dir = case_dir(case);
        let adapter = PeftAdapter::load(dir.join("adapter"))?;
        let out = adapter.save(tmp.path().join(case), "default")?;
        let theirs = load(&dir.join("adapter").join(fourierft::peft::WEIGHTS_FILE))?;
        let ours = load(&out.join(fourierft::peft::WEIGHTS_FILE))?;
        let mut names: Vec<&String> = ours.keys().collect();
        names.sort();
        // With bias = "all" PEFT also saves the head wrapper's inner copies of its bias
        // (`classifier.modules_to_save.bias`, `classifier.original_module.bias`); it loads the
        // head from `classifier.bias` alone, which is what the crate writes.
        let wrapper_copy =
            |n: &str| n.contains(".modules_to_save.") || n.contains(".original_module.");
        let mut want: Vec<&String> = theirs.keys().filter(|n| !wrapper_copy(n)).collect();
        want.sort();
        assert_eq!(names, want, "{case}: tensor names");
        for (name, t) in theirs.iter().filter(|(n, _)| !wrapper_copy(n)) {
            assert_eq!(max_abs_diff(&ours[name], t)?, 0.0, "{case}: {name}");
        }
        let read = |p: &Path| -> anyhow::Result<serde_json::Value> {
            Ok(serde_json::from_str(&std::fs::read_to_string(
                p.join(fourierft::peft::CONFIG_FILE),
            )?)?)
        };
        let (ours_cfg, theirs_cfg) = (read(&out)?, read(&dir.join("adapter"))?);
        for (key, value) in ours_cfg.as_object().unwrap() {
            // Every key we write is one PEFT wrote, with the same value (target_modules as a set).
            let theirs_value = &theirs_cfg[key];
            assert!(
                theirs_cfg.get(key).is_some(),
                "{case}: we wrote {key:?}, PEFT did not"
            );
            if key == "target_modules" {
                let set = |v: &serde_json::Value| {
                    let mut s: Vec<String> = v
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.to_string())
                        .collect();
                    s.sort();
                    s
                };
                assert_eq!(set(value), set(theirs_value), "{case}");
            } else {
                assert_eq!(value, theirs_value, "{case}: {key}");
            }
        }
        let committed = dir.join("resaved");
        if std::env::var_os("FOURIERFT_BLESS").is_some() {
            adapter.save(&committed, "default")?;
            continue;
        }
        for f in [fourierft::peft::CONFIG_FILE, fourierft::peft::WEIGHTS_FILE] {
            let a = std::fs::read(out.join(f))?;
            let b = std::fs::read(committed.join(f))?;
            assert!(a == b, "{case}: {f} differs from the committed re-save");
        }
    }
    Ok(())
}
