//! Training FourierFT on unmodified candle-transformers models (`fourierft::train`), against the
//! trajectories of real transformers + PEFT (`scripts/make_peft_trajectory_fixtures.py`): the
//! same base weights, batches, initial spectra and AdamW hyper-parameters, 10 steps.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder};
use candle_transformers::models::{bert, llama, qwen2};
use fourierft::config::ModuleSelector;
use fourierft::{Error, FourierFTConfig, PeftAdapter, StockTrainer};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

type Result<T> = anyhow::Result<T>;

fn fixture(kind: &str) -> PathBuf {
    common::fixture(&format!("trajectory_{kind}"))
}

fn read_json(path: PathBuf) -> Result<Value> {
    Ok(serde_json::from_str(&std::fs::read_to_string(path)?)?)
}

fn load_tensors(path: PathBuf) -> Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(path, &Device::Cpu)?)
}

fn base_vb(kind: &str) -> Result<VarBuilder<'static>> {
    let t = load_tensors(fixture(kind).join("base.safetensors"))?;
    Ok(VarBuilder::from_tensors(t, DType::F32, &Device::Cpu))
}

/// The HF config.json as candle's config types want it: transformers 5 writes `rope_theta` only
/// inside `rope_parameters`, and qwen2 wants a number for `sliding_window`.
fn candle_config(kind: &str) -> Result<Value> {
    let mut c = read_json(fixture(kind).join("config.json"))?;
    let theta = c["rope_parameters"]["rope_theta"].clone();
    if let Some(obj) = c.as_object_mut() {
        if !theta.is_null() {
            obj.insert("rope_theta".into(), theta);
        }
        if obj.get("sliding_window").is_some_and(Value::is_null) {
            let max = obj["max_position_embeddings"].clone();
            obj.insert("sliding_window".into(), max);
        }
    }
    Ok(c)
}

/// A stock candle-transformers model and the loss the fixture defines for it.
enum Model {
    Llama(llama::Llama, llama::Config),
    Qwen2(qwen2::ModelForCausalLM),
    Bert(bert::BertModel, Tensor),
}

impl Model {
    fn load(kind: &str, vb: VarBuilder) -> Result<Self> {
        let cfg = candle_config(kind)?;
        Ok(match kind {
            "llama" => {
                let c: llama::LlamaConfig = serde_json::from_value(cfg)?;
                let c = c.into_config(false);
                Model::Llama(llama::Llama::load(vb, &c)?, c)
            }
            "qwen2" => {
                let c: qwen2::Config = serde_json::from_value(cfg)?;
                Model::Qwen2(qwen2::ModelForCausalLM::new(&c, vb)?)
            }
            _ => {
                let c: bert::Config = serde_json::from_value(cfg)?;
                let emb = load_tensors(fixture(kind).join("base.safetensors"))?
                    .remove("embeddings.word_embeddings.weight")
                    .ok_or_else(|| anyhow::anyhow!("no word embeddings"))?;
                Model::Bert(bert::BertModel::load(vb, &c)?, emb)
            }
        })
    }

    /// Last-position logits (causal LMs) or the last hidden state (BERT).
    fn output(&mut self, ids: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Model::Llama(m, c) => {
                let mut cache = llama::Cache::new(false, DType::F32, c, &Device::Cpu)?;
                m.forward(ids, 0, &mut cache)?
            }
            Model::Qwen2(m) => {
                m.clear_kv_cache();
                m.forward(ids, 0)?.squeeze(1)?
            }
            Model::Bert(m, _) => m.forward(ids, &ids.zeros_like()?, None)?,
        })
    }

    fn loss(&mut self, ids: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let out = self.output(ids)?;
        Ok(match self {
            Model::Bert(_, emb) => {
                let logits = out.broadcast_matmul(&emb.t()?)?;
                let v = logits.dim(2)?;
                candle_nn::loss::cross_entropy(&logits.reshape(((), v))?, &targets.flatten_all()?)?
            }
            _ => candle_nn::loss::cross_entropy(&out, targets)?,
        })
    }
}

struct Data {
    batches: Vec<(Tensor, Tensor)>,
    losses: Vec<f64>,
    params: ParamsAdamW,
}

fn ids_tensor(v: &Value) -> Result<Tensor> {
    let rows: Vec<Vec<u32>> = serde_json::from_value(v.clone())?;
    let (b, t) = (rows.len(), rows.first().map_or(0, Vec::len));
    Ok(Tensor::from_vec(rows.concat(), (b, t), &Device::Cpu)?)
}

fn data(kind: &str) -> Result<Data> {
    let d = read_json(fixture(kind).join("data.json"))?;
    let mut batches = Vec::new();
    for b in d["batches"].as_array().into_iter().flatten() {
        let ids = ids_tensor(&b["input_ids"])?;
        let targets = if b["targets"][0].is_array() {
            ids_tensor(&b["targets"])?
        } else {
            let t: Vec<u32> = serde_json::from_value(b["targets"].clone())?;
            Tensor::new(t, &Device::Cpu)?
        };
        batches.push((ids, targets));
    }
    let h = &d["hyper"];
    let f = |k: &str| h[k].as_f64().ok_or_else(|| anyhow::anyhow!("hyper {k}"));
    Ok(Data {
        batches,
        losses: serde_json::from_value(d["losses"].clone())?,
        params: ParamsAdamW {
            lr: f("lr")?,
            beta1: f("beta1")?,
            beta2: f("beta2")?,
            eps: f("eps")?,
            weight_decay: f("weight_decay")?,
        },
    })
}

fn rel(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_dtype(DType::F64)?;
    let b = b.to_dtype(DType::F64)?;
    let num = (&a - &b)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f64>()?;
    let den = b.sqr()?.sum_all()?.sqrt()?.to_scalar::<f64>()?;
    Ok(num / den.max(1e-30))
}

fn base_outputs_agree(kind: &str) -> Result<()> {
    let d = data(kind)?;
    let mut model = Model::load(kind, base_vb(kind)?)?;
    let out = model.output(&d.batches[0].0)?;
    let expected = &load_tensors(fixture(kind).join("outputs.safetensors"))?["base_out"];
    let r = rel(&out, expected)?;
    assert!(
        r < 1e-5,
        "{kind}: base output differs from transformers by {r:e}"
    );
    Ok(())
}

#[test]
fn base_outputs_agree_llama() -> Result<()> {
    base_outputs_agree("llama")
}

#[test]
fn base_outputs_agree_qwen2() -> Result<()> {
    base_outputs_agree("qwen2")
}

#[test]
fn base_outputs_agree_bert() -> Result<()> {
    base_outputs_agree("bert")
}

fn trajectory(kind: &str) -> Result<()> {
    let d = data(kind)?;
    let dir = fixture(kind);
    let trainer = StockTrainer::load(dir.join("adapter_init"))?;
    let mut model = Model::load(kind, trainer.var_builder(base_vb(kind)?))?;
    trainer.check()?;
    assert_eq!(
        trainer.layer_paths().len(),
        6,
        "{kind}: 3 targets x 2 layers"
    );
    let mut opt = AdamW::new(trainer.trainable_vars(), d.params.clone())?;
    let mut worst_loss = 0f64;
    for (step, ((ids, targets), expected)) in d.batches.iter().zip(&d.losses).enumerate() {
        let loss = model.loss(ids, targets)?;
        let got = loss.to_scalar::<f32>()? as f64;
        let r = (got - expected).abs() / expected.abs();
        assert!(
            r < 1e-4,
            "{kind} step {step}: loss {got} vs PEFT {expected} (rel {r:e})"
        );
        worst_loss = worst_loss.max(r);
        trainer.backward_step(&mut opt, &loss)?;
    }

    // Final spectra, per layer.
    let peft = PeftAdapter::load(dir.join("adapter_final"))?;
    let ours = trainer.to_adapter()?;
    assert_eq!(peft.spectra().len(), ours.spectra().len());
    let mut worst_spectrum = 0f64;
    for (path, expected) in peft.spectra() {
        let got = &ours.spectra()[path];
        let r = rel(got, expected)?;
        assert!(
            r < 1e-3,
            "{kind} {path}: final spectrum differs from PEFT's by {r:e}"
        );
        worst_spectrum = worst_spectrum.max(r);
    }
    println!("{kind}: worst step loss rel {worst_loss:.1e}, worst final spectrum rel {worst_spectrum:.1e}");

    // Our trained model is the merged model; it agrees with PEFT's within the spectra's accuracy.
    trainer.merge()?;
    let outputs = load_tensors(dir.join("outputs.safetensors"))?;
    let r = rel(&model.output(&d.batches[0].0)?, &outputs["merged_out"])?;
    assert!(r < 1e-3, "{kind}: trained merged output vs PEFT's: {r:e}");

    // save_pretrained round trip.
    let tmp = tempfile::tempdir()?;
    let saved = PeftAdapter::load(trainer.save_pretrained(tmp.path())?)?;
    for (path, t) in ours.spectra() {
        assert_eq!(rel(&saved.spectra()[path], t)?, 0.0, "{path}");
    }

    // unmerge gives back the base model.
    trainer.unmerge()?;
    let r = rel(&model.output(&d.batches[0].0)?, &outputs["base_out"])?;
    assert!(r < 1e-5, "{kind}: unmerged output vs base: {r:e}");
    assert!(matches!(
        trainer.backward(&model.loss(&d.batches[0].0, &d.batches[0].1)?),
        Err(Error::MergeState { .. })
    ));
    trainer.merge()?;
    Ok(())
}

#[test]
fn trajectory_matches_peft_llama() -> Result<()> {
    trajectory("llama")
}

#[test]
fn trajectory_matches_peft_qwen2() -> Result<()> {
    trajectory("qwen2")
}

#[test]
fn trajectory_matches_peft_bert() -> Result<()> {
    trajectory("bert")
}

/// merge() of PEFT's final spectra == PEFT's merge_and_unload, weights and outputs.
fn merge_matches(kind: &str) -> Result<()> {
    let dir = fixture(kind);
    let d = data(kind)?;
    let trainer = StockTrainer::load(dir.join("adapter_final"))?;
    let mut model = Model::load(kind, trainer.var_builder(base_vb(kind)?))?;
    trainer.check()?;
    trainer.merge()?;
    let outputs = load_tensors(dir.join("outputs.safetensors"))?;
    let weights = trainer.weights();
    assert_eq!(weights.len(), 6);
    for (name, w) in weights {
        let r = rel(&w, &outputs[&format!("merged.{name}")])?;
        assert!(
            r < 1e-5,
            "{kind} {name}: merged weight vs merge_and_unload: {r:e}"
        );
    }
    let r = rel(&model.output(&d.batches[0].0)?, &outputs["merged_out"])?;
    assert!(r < 1e-5, "{kind}: merged output vs merge_and_unload: {r:e}");
    Ok(())
}

#[test]
fn merge_matches_peft_llama() -> Result<()> {
    merge_matches("llama")
}

#[test]
fn merge_matches_peft_qwen2() -> Result<()> {
    merge_matches("qwen2")
}

#[test]
fn merge_matches_peft_bert() -> Result<()> {
    merge_matches("bert")
}

/// Gradient accumulation run in parallel: two threads each take half of a batch (each half's
/// share of the mean loss) and call `backward` at once; the summed spectra gradients equal one
/// backward over the whole batch.
#[test]
fn concurrent_backward_on_halves_sums_to_the_batch_gradient() -> Result<()> {
    let d = data("llama")?;
    let trainer = StockTrainer::load(fixture("llama").join("adapter_init"))?;
    let Model::Llama(model, cfg) = Model::load("llama", trainer.var_builder(base_vb("llama")?))?
    else {
        anyhow::bail!("not a llama");
    };
    trainer.check()?;
    let (ids, targets) = &d.batches[0];
    let b = ids.dim(0)?;
    let loss = |rows: std::ops::Range<usize>| -> Result<Tensor> {
        let mut cache = llama::Cache::new(false, DType::F32, &cfg, &Device::Cpu)?;
        let k = rows.len();
        let logits = model.forward(&ids.narrow(0, rows.start, k)?, 0, &mut cache)?;
        let ce = candle_nn::loss::cross_entropy(&logits, &targets.narrow(0, rows.start, k)?)?;
        Ok((ce * (k as f64 / b as f64))?)
    };
    let whole = trainer.backward(&loss(0..b)?)?;
    let halves = std::thread::scope(|s| {
        let h = [0..b / 2, b / 2..b].map(|r| {
            let (loss, trainer) = (&loss, &trainer);
            s.spawn(move || -> Result<_> {
                let g = trainer.backward(&loss(r)?)?;
                // backward applied the subnormal policy (flush by default) to its thread
                let policy = fourierft::runtime::subnormal_policy();
                let flush = policy == fourierft::runtime::SubnormalPolicy::FlushToZero;
                assert_eq!(
                    fourierft::runtime::thread_flushes(),
                    flush && fourierft::runtime::FLUSH_SUPPORTED
                );
                Ok(g)
            })
        });
        h.map(|h| h.join().expect("no panic"))
    });
    let [first, second] = halves;
    let (first, second) = (first?, second?);
    for v in trainer.trainable_vars() {
        let sum =
            (first.get(v.as_tensor()).expect("grad") + second.get(v.as_tensor()).expect("grad"))?;
        let r = rel(&sum, whole.get(v.as_tensor()).expect("grad"))?;
        assert!(r < 1e-5, "summed halves vs whole batch: {r:e}");
    }
    Ok(())
}

fn config(targets: &[&str], n: usize) -> FourierFTConfig {
    FourierFTConfig {
        target_modules: Some(ModuleSelector::Names(
            targets.iter().map(|s| s.to_string()).collect(),
        )),
        n_frequency: n,
        scaling: 100.0,
        init_seed: Some(0),
        ..Default::default()
    }
}

#[test]
fn frozen_weights_get_no_gradient_and_sync_is_required() -> Result<()> {
    let d = data("llama")?;
    let trainer = StockTrainer::new(config(&["q_proj"], 64))?;
    let mut model = Model::load("llama", trainer.var_builder(base_vb("llama")?))?;
    trainer.check()?;
    assert_eq!(trainer.num_trainable(), 2 * 64);
    assert_eq!(
        trainer.state_bytes("model.layers.0.self_attn.q_proj"),
        Some(16 * 64)
    );
    let (ids, targets) = &d.batches[0];
    let loss = model.loss(ids, targets)?;
    let grads = trainer.backward(&loss)?;
    // Only the spectra carry gradients among the parameters.
    for v in trainer.trainable_vars() {
        assert!(grads.get(v.as_tensor()).is_some());
    }
    for (_, w) in trainer.weights() {
        assert!(grads.get(&w).is_none());
    }
    let mut opt = AdamW::new_lr(trainer.trainable_vars(), 1e-2)?;
    opt.step(&grads)?;
    // Stepping without sync(): the weights are stale, training refuses.
    let loss = model.loss(ids, targets)?;
    assert!(matches!(
        trainer.backward(&loss),
        Err(Error::MergeState { .. })
    ));
    trainer.sync()?;
    trainer.backward(&model.loss(ids, targets)?)?;

    // A loss no gradient flows back from (as with candle-nn's unpatched fused ops): an error
    // naming the module, not a silently untrained layer.
    let cut = model.loss(ids, targets)?.detach();
    let e = trainer.backward(&cut).unwrap_err();
    assert!(e.to_string().contains("self_attn.q_proj"), "{e}");
    Ok(())
}

#[test]
fn config_matching_nothing_is_an_error() -> Result<()> {
    let trainer = StockTrainer::new(config(&["no_such_proj"], 64))?;
    let _model = Model::load("llama", trainer.var_builder(base_vb("llama")?))?;
    let e = trainer.check().unwrap_err();
    assert!(matches!(e, Error::Config(_)), "{e}");
    assert!(e.to_string().contains("no_such_proj"), "{e}");
    assert!(trainer.trainable_vars().is_empty());
    assert!(trainer
        .save_pretrained(tempfile::tempdir()?.path())
        .is_err());
    Ok(())
}

#[test]
fn targeted_weight_of_the_wrong_shape_is_an_error_not_a_panic() -> Result<()> {
    // A norm weight is 1-D: not a linear layer. Llama::load unwraps inside, so the backend must
    // not fail the load: the error comes from check().
    let trainer = StockTrainer::new(config(&["input_layernorm"], 8))?;
    let _model = Model::load("llama", trainer.var_builder(base_vb("llama")?))?;
    let e = trainer.check().unwrap_err();
    assert!(matches!(e, Error::Shape { .. }), "{e}");
    assert!(e.to_string().contains("input_layernorm"), "{e}");

    // More coefficients than a k_proj (16x32) has positions.
    let trainer = StockTrainer::new(config(&["k_proj"], 600))?;
    let _model = Model::load("llama", trainer.var_builder(base_vb("llama")?))?;
    let e = trainer.check().unwrap_err();
    assert!(matches!(e, Error::EntryCount { .. }), "{e}");
    assert!(e.to_string().contains("k_proj"), "{e}");
    let loss = Tensor::new(1f32, &Device::Cpu)?;
    assert!(trainer.backward(&loss).is_err());

    // An adapter made for bigger weights: 600 coefficients per module, more than the
    // model's v_proj (16x32) has positions.
    let init = PeftAdapter::load(fixture("llama").join("adapter_init"))?;
    let spectra: BTreeMap<String, Tensor> = init
        .spectra()
        .keys()
        .map(|k| Ok((k.clone(), Tensor::zeros(600, DType::F32, &Device::Cpu)?)))
        .collect::<Result<_>>()?;
    let mut cfg = init.config().clone();
    cfg.n_frequency = 600;
    let big = PeftAdapter::new(cfg, spectra, BTreeMap::new())?;
    let trainer = StockTrainer::from_adapter("default", big)?;
    let _model = Model::load("llama", trainer.var_builder(base_vb("llama")?))?;
    let e = trainer.check().unwrap_err();
    assert!(matches!(e, Error::EntryCount { .. }), "{e}");
    assert!(e.to_string().contains("v_proj"), "{e}");
    Ok(())
}

#[test]
fn adapter_modules_the_model_never_loads_are_an_error() -> Result<()> {
    let init = PeftAdapter::load(fixture("llama").join("adapter_init"))?;
    let mut spectra: BTreeMap<String, Tensor> = init.spectra().clone();
    let ghost = "model.layers.7.self_attn.q_proj".to_string();
    spectra.insert(ghost, Tensor::zeros(64, DType::F32, &Device::Cpu)?);
    let bad = PeftAdapter::new(init.config().clone(), spectra, BTreeMap::new())?;
    let trainer = StockTrainer::from_adapter("default", bad)?;
    let _model = Model::load("llama", trainer.var_builder(base_vb("llama")?))?;
    let e = trainer.check().unwrap_err();
    assert!(matches!(e, Error::File { .. }), "{e}");
    assert!(
        e.to_string().contains("model.layers.7.self_attn.q_proj"),
        "{e}"
    );

    // The BERT adapter on Llama: nothing it targets exists there.
    let trainer = StockTrainer::load(fixture("bert").join("adapter_init"))?;
    let _model = Model::load("llama", trainer.var_builder(base_vb("llama")?))?;
    assert!(trainer.check().is_err());
    Ok(())
}

#[test]
fn unsupported_configurations_are_errors() {
    let mut c = config(&["c_attn"], 64);
    c.fan_in_fan_out = true;
    assert!(matches!(StockTrainer::new(c), Err(Error::Config(_))));
}

#[test]
fn candle_adamw_matches_torch_formula() -> Result<()> {
    // torch.optim.AdamW: p -= lr*wd*p; m,v updates; p -= lr * (m/bc1) / (sqrt(v/bc2) + eps).
    let (lr, b1, b2, eps, wd) = (0.1f64, 0.9f64, 0.999f64, 1e-8f64, 0.01f64);
    let v = candle_core::Var::new(&[1.0f64, -2.0], &Device::Cpu)?;
    let mut opt = AdamW::new(
        vec![v.clone()],
        ParamsAdamW {
            lr,
            beta1: b1,
            beta2: b2,
            eps,
            weight_decay: wd,
        },
    )?;
    let (mut p, mut m, mut s) = ([1.0f64, -2.0], [0.0; 2], [0.0; 2]);
    for t in 1..=3 {
        let g = [0.5 * t as f64, -0.25];
        let loss = (v.as_tensor() * Tensor::new(&g, &Device::Cpu)?)?.sum_all()?;
        opt.backward_step(&loss)?;
        for i in 0..2 {
            p[i] -= lr * wd * p[i];
            m[i] = b1 * m[i] + (1.0 - b1) * g[i];
            s[i] = b2 * s[i] + (1.0 - b2) * g[i] * g[i];
            let (bc1, bc2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
            p[i] -= lr * (m[i] / bc1) / ((s[i] / bc2).sqrt() + eps);
        }
    }
    let got = v.as_tensor().to_vec1::<f64>()?;
    for i in 0..2 {
        assert!((got[i] - p[i]).abs() < 1e-12, "{got:?} vs {p:?}");
    }
    Ok(())
}

#[test]
fn fused_ops_pass_gradients() -> Result<()> {
    // The patched candle-nn: the fused ops' backward equals the composed ops' autograd.
    let x = candle_core::Var::from_tensor(&Tensor::new(
        &[[0.3f32, -1.2, 2.0, 0.7], [1.5, 0.1, -0.4, -2.2]],
        &Device::Cpu,
    )?)?;
    let a = candle_core::Var::from_tensor(&Tensor::new(&[1.1f32, 0.9, -0.5, 2.0], &Device::Cpu)?)?;
    let b = Tensor::new(&[0.1f32, 0.2, 0.3, 0.4], &Device::Cpu)?;
    let w = Tensor::new(
        &[[1.0f32, -2.0, 0.5, 3.0], [0.2, 0.4, -1.0, 1.5]],
        &Device::Cpu,
    )?;
    let check = |fused: Tensor, slow: Tensor| -> Result<()> {
        let gf = (fused * &w)?.sum_all()?.backward()?;
        let gs = (slow * &w)?.sum_all()?.backward()?;
        for t in [x.as_tensor(), a.as_tensor()] {
            if let Some(s) = gs.get(t) {
                let f = gf
                    .get(t)
                    .ok_or_else(|| anyhow::anyhow!("no fused gradient"))?;
                assert!(rel(f, s)? < 1e-5, "{f} vs {s}");
            }
        }
        Ok(())
    };
    check(
        candle_nn::ops::softmax_last_dim(&x)?,
        candle_nn::ops::softmax(&x, 1)?,
    )?;
    check(
        candle_nn::ops::rms_norm(&x, &a, 1e-5)?,
        candle_nn::ops::rms_norm_slow(&x, &a, 1e-5)?,
    )?;
    check(
        candle_nn::ops::layer_norm(&x, &a, &b, 1e-5)?,
        candle_nn::ops::layer_norm_slow(&x, &a, &b, 1e-5)?,
    )?;
    let x4 = x.reshape((1, 1, 2, 4))?;
    let (cos, sin) = (
        Tensor::new(&[[0.8f32, 0.6], [0.1, -0.3]], &Device::Cpu)?,
        Tensor::new(&[[0.6f32, -0.8], [0.5, 0.9]], &Device::Cpu)?,
    );
    let w4 = w.reshape((1, 1, 2, 4))?;
    type Rope = fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor>;
    let pairs: [(Rope, Rope); 2] = [
        (
            candle_nn::rotary_emb::rope,
            candle_nn::rotary_emb::rope_slow,
        ),
        (
            candle_nn::rotary_emb::rope_i,
            candle_nn::rotary_emb::rope_i_slow,
        ),
    ];
    for (fused, slow) in pairs {
        let gf = (fused(&x4, &cos, &sin)? * &w4)?.sum_all()?.backward()?;
        let gs = (slow(&x4, &cos, &sin)? * &w4)?.sum_all()?.backward()?;
        match (gf.get(x.as_tensor()), gs.get(x.as_tensor())) {
            (Some(f), Some(s)) => assert!(rel(f, s)? < 1e-5, "{f} vs {s}"),
            _ => anyhow::bail!("rope: no gradient"),
        }
    }
    // rope_thd: (b, t, h, d) layout, same rotation.
    let xt = x4.transpose(1, 2)?.contiguous()?;
    let wt = w4.transpose(1, 2)?.contiguous()?;
    let gf = (candle_nn::rotary_emb::rope_thd(&xt, &cos, &sin)? * &wt)?
        .sum_all()?
        .backward()?;
    let gs = (candle_nn::rotary_emb::rope_slow(&x4, &cos, &sin)? * &w4)?
        .sum_all()?
        .backward()?;
    match (gf.get(x.as_tensor()), gs.get(x.as_tensor())) {
        (Some(f), Some(s)) => assert!(rel(f, s)? < 1e-5, "{f} vs {s}"),
        _ => anyhow::bail!("rope_thd: no gradient"),
    }
    Ok(())
}

/// `Σ w ⊙ f(x)` in f64 for one row `x` of the fused ops (`op`: 0 softmax, 1 rms norm, 2 layer
/// norm, 3 SiLU), with the norms' weight `a` (bias 0).
fn row_loss(op: usize, x: &[f64], a: &[f64], w: &[f64], eps: f64) -> f64 {
    let n = x.len() as f64;
    let y: Vec<f64> = match op {
        0 => {
            let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = x.iter().map(|v| (v - m).exp()).collect();
            let s: f64 = e.iter().sum();
            e.iter().map(|v| v / s).collect()
        }
        1 | 2 => {
            let mean = if op == 2 {
                x.iter().sum::<f64>() / n
            } else {
                0.0
            };
            let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
            let r = 1.0 / (var + eps).sqrt();
            x.iter().zip(a).map(|(v, a)| a * (v - mean) * r).collect()
        }
        _ => x.iter().map(|v| v / (1.0 + (-v).exp())).collect(),
    };
    y.iter().zip(w).map(|(y, w)| y * w).sum()
}

#[test]
fn fused_backwards_match_f64_finite_differences() -> Result<()> {
    // The patched candle-nn's one-pass CPU backwards (softmax over the last dim, rms/layer norm
    // incl. dL/dα, SiLU) against central differences of an f64 evaluation, over 1×N, odd, even,
    // d = 1 and a prime-sized case large enough to be split across rayon tasks; f32 takes the
    // fused kernels, other dtypes the composed fallback; both must agree with the reference.
    let dev = Device::Cpu;
    let eps = 1e-5;
    for (rows, d) in [(1usize, 13usize), (3, 8), (4, 1), (37, 997)] {
        let val = |i: usize, s: f64| ((i as f64 * s).sin() * 1.7 + (i % 7) as f64 * 0.1) as f32;
        let xv: Vec<f32> = (0..rows * d).map(|i| val(i, 0.37)).collect();
        let wv: Vec<f32> = (0..rows * d).map(|i| val(i, 0.11)).collect();
        let av: Vec<f32> = (0..d).map(|j| 0.5 + val(j, 0.7).abs()).collect();
        let (x64, w64, a64): (Vec<f64>, Vec<f64>, Vec<f64>) = (
            xv.iter().map(|&v| v as f64).collect(),
            wv.iter().map(|&v| v as f64).collect(),
            av.iter().map(|&v| v as f64).collect(),
        );
        for op in 0..4 {
            // Reference dL/dx (each entry moves only its row) and dL/dα (moves every row).
            let h = 1e-6;
            let mut dx_ref = vec![0f64; rows * d];
            for r in 0..rows {
                let (xr, wr) = (&x64[r * d..(r + 1) * d], &w64[r * d..(r + 1) * d]);
                for j in 0..d {
                    let (mut p, mut m) = (xr.to_vec(), xr.to_vec());
                    p[j] += h;
                    m[j] -= h;
                    dx_ref[r * d + j] = (row_loss(op, &p, &a64, wr, eps)
                        - row_loss(op, &m, &a64, wr, eps))
                        / (2.0 * h);
                }
            }
            let mut da_ref = vec![0f64; d];
            if op == 1 || op == 2 {
                for (j, da) in da_ref.iter_mut().enumerate() {
                    let (mut p, mut m) = (a64.clone(), a64.clone());
                    p[j] += h;
                    m[j] -= h;
                    *da = (0..rows)
                        .map(|r| {
                            let (xr, wr) = (&x64[r * d..(r + 1) * d], &w64[r * d..(r + 1) * d]);
                            row_loss(op, xr, &p, wr, eps) - row_loss(op, xr, &m, wr, eps)
                        })
                        .sum::<f64>()
                        / (2.0 * h);
                }
            }
            // f32 takes the fused kernels; the composed fallback runs in f64 where the fused
            // forward has it (softmax, SiLU) and in bf16 for the norms (no f64 forward).
            let fallback = if op == 1 || op == 2 {
                DType::BF16
            } else {
                DType::F64
            };
            for dtype in [DType::F32, fallback] {
                let tol = if dtype == DType::BF16 { 3e-2 } else { 1e-4 };
                let x = candle_core::Var::from_tensor(
                    &Tensor::from_vec(xv.clone(), (rows, d), &dev)?.to_dtype(dtype)?,
                )?;
                let a = candle_core::Var::from_tensor(
                    &Tensor::from_vec(av.clone(), d, &dev)?.to_dtype(dtype)?,
                )?;
                let w = Tensor::from_vec(wv.clone(), (rows, d), &dev)?.to_dtype(dtype)?;
                let b = Tensor::zeros(d, dtype, &dev)?;
                let y = match op {
                    0 => candle_nn::ops::softmax_last_dim(&x)?,
                    1 => candle_nn::ops::rms_norm(&x, &a, eps as f32)?,
                    2 => candle_nn::ops::layer_norm(&x, &a, &b, eps as f32)?,
                    _ => candle_nn::ops::silu(&x)?,
                };
                let grads = (y * &w)?.sum_all()?.backward()?;
                let what = format!("op {op}, {rows}x{d}, {dtype:?}");
                let dx = grads
                    .get(x.as_tensor())
                    .ok_or_else(|| anyhow::anyhow!("{what}: no dL/dx"))?;
                let want = Tensor::from_vec(dx_ref.clone(), (rows, d), &dev)?;
                // Softmax and layer norm over one entry are constant: a zero reference.
                let close = |got: &Tensor, want: &Tensor| -> Result<bool> {
                    let err = (got.to_dtype(DType::F64)? - want)?
                        .sqr()?
                        .sum_all()?
                        .sqrt()?;
                    let norm = want.sqr()?.sum_all()?.sqrt()?.to_scalar::<f64>()?;
                    Ok(err.to_scalar::<f64>()? <= tol * norm + 1e-7)
                };
                assert!(close(dx, &want)?, "{what}: dL/dx {}", rel(dx, &want)?);
                if op == 1 || op == 2 {
                    let da = grads
                        .get(a.as_tensor())
                        .ok_or_else(|| anyhow::anyhow!("{what}: no dL/dα"))?;
                    let want = Tensor::from_vec(da_ref.clone(), d, &dev)?;
                    assert!(close(da, &want)?, "{what}: dL/dα {}", rel(da, &want)?);
                }
            }
        }
    }
    Ok(())
}

#[test]
fn frozen_linear_forms_only_the_input_gradient() -> Result<()> {
    // The patched candle-nn `Linear` at input ranks 1–4, contiguous or not, with and without
    // bias, against f64: with a frozen (untracked) weight and a tracked input, the value and
    // dL/dx, and no d_out×d_in gradient is formed for the weight; with a trainable weight (one
    // graph node instead of candle's reshape/transpose/matmul chain) the value, dL/dx and
    // dL/dW = Σ_t g_tᵀ x_t, also when the input records no gradient.
    use candle_nn::Module;
    let dev = Device::Cpu;
    let (d_out, d_in) = (5usize, 7usize);
    let wv: Vec<f32> = (0..d_out * d_in)
        .map(|i| ((i * 37 % 23) as f32 - 11.0) / 9.0)
        .collect();
    let bv: Vec<f32> = (0..d_out).map(|j| j as f32 * 0.25 - 0.5).collect();
    let w = Tensor::from_vec(wv.clone(), (d_out, d_in), &dev)?;
    let b = Tensor::from_vec(bv.clone(), d_out, &dev)?;
    // (trainable weight, input records a gradient)
    for (trainable, x_tracked) in [(false, true), (true, true), (true, false)] {
        for dims in [
            vec![d_in],
            vec![3, d_in],
            vec![2, 3, d_in],
            vec![2, 1, 3, d_in],
        ] {
            for transposed in [false, true] {
                for bias in [false, true] {
                    let m: usize = dims[..dims.len() - 1].iter().product();
                    let xv: Vec<f32> = (0..m * d_in)
                        .map(|i| ((i * 13 % 17) as f32 - 8.0) / 5.0)
                        .collect();
                    let x = candle_core::Var::from_tensor(&Tensor::from_vec(
                        xv.clone(),
                        dims.as_slice(),
                        &dev,
                    )?)?;
                    let x_in = if x_tracked {
                        x.as_tensor().clone()
                    } else {
                        x.as_tensor().detach()
                    };
                    // A non-contiguous view of the same values when `transposed` (rank ≥ 3).
                    let input = if transposed && dims.len() >= 3 {
                        let r = dims.len();
                        x_in.transpose(r - 3, r - 2)?
                            .contiguous()?
                            .transpose(r - 3, r - 2)?
                    } else {
                        x_in
                    };
                    let wvar = candle_core::Var::from_tensor(&w)?;
                    let weight = if trainable {
                        wvar.as_tensor().clone()
                    } else {
                        w.clone()
                    };
                    let layer = candle_nn::Linear::new(weight, bias.then(|| b.clone()));
                    let y = layer.forward(&input)?;
                    let mut ydims = dims.clone();
                    *ydims.last_mut().unwrap() = d_out;
                    assert_eq!(y.dims(), ydims.as_slice());
                    // Loss sum(y ∘ g) with g[t, j] = j + 1 - t/4.
                    let gv: Vec<f32> = (0..m * d_out)
                        .map(|i| (i % d_out) as f32 + 1.0 - (i / d_out) as f32 / 4.0)
                        .collect();
                    let g = Tensor::from_vec(gv.clone(), ydims.as_slice(), &dev)?;
                    let grads = (&y * &g)?.sum_all()?.backward()?;
                    let yv = y.flatten_all()?.to_vec1::<f32>()?;
                    let case = format!("{dims:?} trainable={trainable} x_tracked={x_tracked}");
                    for t in 0..m {
                        for j in 0..d_out {
                            let r: f64 = (0..d_in)
                                .map(|k| wv[j * d_in + k] as f64 * xv[t * d_in + k] as f64)
                                .sum::<f64>()
                                + if bias { bv[j] as f64 } else { 0.0 };
                            assert!((yv[t * d_out + j] as f64 - r).abs() < 1e-5, "{case}");
                        }
                    }
                    if x_tracked {
                        let gx = grads
                            .get(x.as_tensor())
                            .ok_or_else(|| anyhow::anyhow!("no dL/dx for {case}"))?
                            .flatten_all()?
                            .to_vec1::<f32>()?;
                        for t in 0..m {
                            for k in 0..d_in {
                                let r: f64 = (0..d_out)
                                    .map(|j| wv[j * d_in + k] as f64 * gv[t * d_out + j] as f64)
                                    .sum();
                                assert!((gx[t * d_in + k] as f64 - r).abs() < 1e-4, "{case}");
                            }
                        }
                    } else {
                        assert!(grads.get(x.as_tensor()).is_none(), "{case}: dL/dx formed");
                    }
                    if trainable {
                        let gw = grads
                            .get(wvar.as_tensor())
                            .ok_or_else(|| anyhow::anyhow!("no dL/dW for {case}"))?
                            .to_vec2::<f32>()?;
                        for j in 0..d_out {
                            for k in 0..d_in {
                                let r: f64 = (0..m)
                                    .map(|t| gv[t * d_out + j] as f64 * xv[t * d_in + k] as f64)
                                    .sum();
                                assert!((gw[j][k] as f64 - r).abs() < 1e-4, "{case}");
                            }
                        }
                    } else {
                        let weight_sized = grads
                            .get_ids()
                            .filter_map(|id| grads.get_id(*id))
                            .filter(|t| t.elem_count() == d_out * d_in)
                            .count();
                        assert_eq!(
                            weight_sized, 0,
                            "{case}: a frozen weight's gradient was formed"
                        );
                    }
                }
            }
        }
    }
    Ok(())
}
