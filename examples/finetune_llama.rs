//! Fine-tune FourierFT on an unmodified candle-transformers Llama (`fourierft::train`).
//!
//! Defaults: a small random-init Llama (or `--checkpoint DIR` with `config.json` and
//! `*.safetensors`), a toy next-token task (continue a run of consecutive tokens:
//! `… 7 8 9 →10`), a few hundred AdamW steps on the spectra only, then: save the adapter (PEFT
//! format), reload it with `MergedBackend` (the deployment path) and check the merged model gives
//! the trained model's logits, print the loss before/after and a greedy generation.
//!
//! `cargo run --release --example finetune_llama`
//!
//! `--bench` instead times one training step of a stock Llama (hidden 1024, 8 layers, 512
//! tokens; q_proj and v_proj adapted, n = 1000) and prints `train_step_ms` and `peak_rss_mb`;
//! `scripts/peft_llama_bench.py` prints the same for PEFT.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use candle_transformers::models::llama::{Cache, Config, Llama, LlamaConfig};
use clap::Parser;
use fourierft::config::ModuleSelector;
use fourierft::{FourierFTConfig, MergedBackend, PeftAdapter, StockTrainer};
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(about = "FourierFT on a stock candle-transformers Llama")]
struct Args {
    /// Training steps.
    #[arg(long, default_value_t = 300)]
    steps: usize,
    /// Sequences per batch.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 12)]
    seq: usize,
    /// AdamW learning rate on the spectra.
    #[arg(long, default_value_t = 0.05)]
    lr: f64,
    /// Spectral coefficients per adapted layer.
    #[arg(long, default_value_t = 256)]
    n: usize,
    /// FourierFT scaling (alpha).
    #[arg(long, default_value_t = 150.0)]
    scaling: f64,
    /// Comma-separated module names to adapt.
    #[arg(long, default_value = "q_proj,v_proj,o_proj,up_proj,down_proj,lm_head")]
    targets: String,
    /// A Llama checkpoint directory (config.json + *.safetensors) instead of random init.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Where the adapter is saved.
    #[arg(long, default_value = "target/finetune-llama-adapter")]
    out: PathBuf,
    /// Seed for the random model and data.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Time one training step of a hidden-1024, 8-layer Llama on 512 tokens instead.
    #[arg(long)]
    bench: bool,
    /// With --bench: time the alternative design instead (a backend serving `W0 + ΔW(c)` as
    /// graph tensors, the model rebuilt every step).
    #[arg(long)]
    graph_weights: bool,
    /// Timed steps in --bench (median reported).
    #[arg(long, default_value_t = 5)]
    bench_steps: usize,
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// The small random-init model of the default run.
fn small_config() -> Config {
    LlamaConfig {
        hidden_size: 64,
        intermediate_size: 128,
        vocab_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: Some(4),
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        bos_token_id: None,
        eos_token_id: None,
        rope_scaling: None,
        max_position_embeddings: 64,
        tie_word_embeddings: Some(false),
    }
    .into_config(false)
}

/// The bench model: hidden 1024, 8 layers (Llama-style MLP 2816, vocab 32000).
fn bench_config() -> Config {
    LlamaConfig {
        hidden_size: 1024,
        intermediate_size: 2816,
        vocab_size: 32_000,
        num_hidden_layers: 8,
        num_attention_heads: 16,
        num_key_value_heads: Some(16),
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        bos_token_id: None,
        eos_token_id: None,
        rope_scaling: None,
        max_position_embeddings: 1024,
        tie_word_embeddings: Some(false),
    }
    .into_config(false)
}

/// Random weights like transformers' init (normal, std 0.02; norms at 1), in a VarMap.
fn random_base(cfg: &Config, seed: u64, dev: &Device) -> Result<VarMap> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, dev);
    // Llama::load asks for every tensor with candle's init hints; build it once to create them.
    Llama::load(vb, cfg)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let data = varmap.data().lock().map_err(|_| anyhow::anyhow!("lock"))?;
    // By name: the map's iteration order varies between runs, and the draws follow it.
    let mut vars: Vec<_> = data.iter().collect();
    vars.sort_by(|a, b| a.0.cmp(b.0));
    for (name, var) in vars {
        let t = if name.contains("norm") {
            Tensor::ones(var.shape(), DType::F32, dev)?
        } else {
            let n = var.elem_count();
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    let x: f32 = rng.sample(rand_distr::StandardNormal);
                    0.02 * x
                })
                .collect();
            Tensor::from_vec(v, var.shape(), dev)?
        };
        var.set(&t)?;
    }
    drop(data);
    Ok(varmap)
}

fn fourier_config(args: &Args, targets: &str) -> FourierFTConfig {
    FourierFTConfig {
        target_modules: Some(ModuleSelector::Names(
            targets.split(',').map(|s| s.trim().to_string()).collect(),
        )),
        n_frequency: args.n,
        scaling: args.scaling,
        init_weights: true, // ΔW = 0 at the start: the model starts as the base model
        init_seed: Some(args.seed),
        ..Default::default()
    }
}

fn last_logits(model: &Llama, cfg: &Config, ids: &Tensor) -> Result<Tensor> {
    let mut cache = Cache::new(false, DType::F32, cfg, ids.device())?;
    Ok(model.forward(ids, 0, &mut cache)?)
}

/// A batch of runs of consecutive tokens (mod vocab) and the token that continues each.
fn batch(
    rng: &mut impl Rng,
    b: usize,
    t: usize,
    vocab: usize,
    dev: &Device,
) -> Result<(Tensor, Tensor)> {
    let mut ids = Vec::with_capacity(b * t);
    let mut next = Vec::with_capacity(b);
    for _ in 0..b {
        let start = rng.random_range(0..vocab);
        ids.extend((0..t).map(|i| ((start + i) % vocab) as u32));
        next.push(((start + t) % vocab) as u32);
    }
    Ok((
        Tensor::from_vec(ids, (b, t), dev)?,
        Tensor::from_vec(next, b, dev)?,
    ))
}

/// The alternative design, for `--bench --graph-weights`: adapted weights served as
/// `W0 + ΔW(c)` graph tensors (gradient to c through the delta-weight op), model rebuilt per step.
struct GraphBackend {
    base: VarBuilder<'static>,
    adapters: std::collections::HashMap<String, fourierft::LayerAdapter>,
}

impl candle_nn::var_builder::SimpleBackend for GraphBackend {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let w0 = self.base.get_with_hints_dtype(s, name, h, dtype)?.detach();
        match name
            .strip_suffix(".weight")
            .and_then(|p| self.adapters.get(p))
        {
            Some(a) => w0 + a.delta_weight()?.to_device(dev)?,
            None => Ok(w0.to_device(dev)?),
        }
    }

    fn get_unchecked(&self, name: &str, dtype: DType, _: &Device) -> candle_core::Result<Tensor> {
        Ok(self.base.get_unchecked_dtype(name, dtype)?.detach())
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.base.contains_tensor(name)
    }
}

fn bench_graph(
    cfg: &Config,
    varmap: &VarMap,
    ids: &Tensor,
    target: &Tensor,
    steps: usize,
) -> Result<f64> {
    let dev = Device::Cpu;
    let base = VarBuilder::from_varmap(varmap, DType::F32, &dev);
    let config = FourierFTConfig {
        n_frequency: 1000,
        scaling: 150.0,
        init_seed: Some(0),
        ..Default::default()
    };
    let mut adapters = std::collections::HashMap::new();
    for (name, var) in varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("lock"))?
        .iter()
    {
        if name.ends_with("q_proj.weight") || name.ends_with("v_proj.weight") {
            let path = name.trim_end_matches(".weight").to_string();
            let layer = fourierft::FourierLinear::from_parts(var.as_tensor().clone(), None, false)?
                .with_name(path.clone());
            layer.add_adapter("default", &config)?;
            adapters.insert(path, layer.adapter("default")?);
        }
    }
    let vars: Vec<_> = adapters.values().map(|a| a.spectrum().clone()).collect();
    let mut opt = AdamW::new(
        vars,
        ParamsAdamW {
            lr: 1e-3,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let backend = std::sync::Arc::new(GraphBackend { base, adapters });
    let mut times = Vec::new();
    for step in 0..=steps {
        let t = Instant::now();
        let vb = VarBuilder::from_backend(
            Box::new(ArcBackend(backend.clone())),
            DType::F32,
            dev.clone(),
        );
        let model = Llama::load(vb, cfg)?; // rebuilt every step
        let loss = candle_nn::loss::cross_entropy(&last_logits(&model, cfg, ids)?, target)?;
        opt.backward_step(&loss)?;
        if step > 0 {
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

struct ArcBackend(std::sync::Arc<GraphBackend>);

impl candle_nn::var_builder::SimpleBackend for ArcBackend {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0.get(s, name, h, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.get_unchecked(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_tensor(name)
    }
}

fn bench(args: &Args) -> Result<()> {
    let dev = Device::Cpu;
    let cfg = bench_config();
    let (tokens, vocab) = (512, cfg.vocab_size);
    let varmap = random_base(&cfg, args.seed, &dev)?;
    let base = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let t0 = Instant::now();
    let plain = Llama::load(base.clone(), &cfg)?;
    let build_ms = t0.elapsed().as_secs_f64() * 1e3;
    drop(plain);
    if args.graph_weights {
        let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
        let (ids, target) = batch(&mut rng, 1, tokens, vocab, &dev)?;
        let ms = bench_graph(&cfg, &varmap, &ids, &target, args.bench_steps)?;
        println!("design: W0 + ΔW(c) as graph tensors, model rebuilt every step");
        println!("train_step_ms {ms:.1}");
        println!("peak_rss_mb {:.1}", peak_rss_mb());
        return Ok(());
    }
    let config = FourierFTConfig {
        target_modules: Some(ModuleSelector::Names(vec![
            "q_proj".into(),
            "v_proj".into(),
        ])),
        n_frequency: 1000,
        scaling: 150.0,
        init_seed: Some(0),
        ..Default::default()
    };
    let trainer = StockTrainer::new(config)?;
    let model = Llama::load(trainer.var_builder(base), &cfg)?;
    trainer.check()?;
    let mut opt = AdamW::new(
        trainer.trainable_vars(),
        ParamsAdamW {
            lr: 1e-3,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let (ids, target) = batch(&mut rng, 1, tokens, vocab, &dev)?;
    // (forward, backward, optimizer + in-place weight refresh) per timed step.
    let mut times: Vec<[f64; 3]> = Vec::new();
    for step in 0..=args.bench_steps {
        let t = Instant::now();
        let loss = candle_nn::loss::cross_entropy(&last_logits(&model, &cfg, &ids)?, &target)?;
        let forward = t.elapsed().as_secs_f64() * 1e3;
        let grads = trainer.backward(&loss)?;
        let backward = t.elapsed().as_secs_f64() * 1e3 - forward;
        opt.step(&grads)?;
        trainer.sync()?;
        let update = t.elapsed().as_secs_f64() * 1e3 - forward - backward;
        if step > 0 {
            times.push([forward, backward, update]); // step 0 is warm-up
        }
    }
    let median = |f: &dyn Fn(&[f64; 3]) -> f64| {
        let mut v: Vec<f64> = times.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "stock candle-transformers Llama: hidden 1024, 8 layers, {tokens} tokens, q_proj+v_proj \
         n=1000 ({} trainable), {} threads",
        trainer.num_trainable(),
        rayon::current_num_threads()
    );
    println!("model_build_ms {build_ms:.1}");
    println!("train_step_ms {:.1}", median(&|t| t.iter().sum()));
    println!("forward_ms {:.1}", median(&|t| t[0]));
    println!("backward_ms {:.1}", median(&|t| t[1]));
    println!("peak_rss_mb {:.1}", peak_rss_mb());
    Ok(())
}

fn main() -> Result<()> {
    // The crate's CPU training settings, before any thread starts (docs/PERFORMANCE.md): one
    // pool of threads for candle's and this crate's kernels, freed buffers reused.
    fourierft::runtime::init_cpu_training();
    let args = Args::parse();
    if args.bench {
        return bench(&args);
    }
    let dev = Device::Cpu;
    let t_start = Instant::now();

    // The base model's weights: a checkpoint or a random init.
    let (cfg, varmap, files) = match &args.checkpoint {
        Some(dir) => {
            let c: LlamaConfig = serde_json::from_str(
                &std::fs::read_to_string(dir.join("config.json")).context("config.json")?,
            )?;
            let files: Vec<PathBuf> = std::fs::read_dir(dir)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            (c.into_config(false), None, files)
        }
        None => {
            let cfg = small_config();
            let vm = random_base(&cfg, args.seed, &dev)?;
            (cfg, Some(vm), Vec::new())
        }
    };
    let base = || -> Result<VarBuilder<'static>> {
        Ok(match &varmap {
            Some(vm) => VarBuilder::from_varmap(vm, DType::F32, &dev),
            // SAFETY: the checkpoint files are not modified while mapped.
            None => unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, &dev)? },
        })
    };

    // The stock model, built once through the trainer's VarBuilder.
    let trainer = StockTrainer::new(fourier_config(&args, &args.targets))?;
    let model = Llama::load(trainer.var_builder(base()?), &cfg)?;
    trainer.check()?;
    println!(
        "stock Llama ({} layers, hidden {}): {} adapted layers, {} trainable coefficients",
        cfg.num_hidden_layers,
        cfg.hidden_size,
        trainer.layer_paths().len(),
        trainer.num_trainable()
    );

    let vocab = cfg.vocab_size;
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed + 1);
    let eval = batch(&mut rng, 64, args.seq, vocab, &dev)?;
    let eval_loss = |m: &Llama| -> Result<f32> {
        let l = candle_nn::loss::cross_entropy(&last_logits(m, &cfg, &eval.0)?, &eval.1)?;
        Ok(l.to_scalar::<f32>()?)
    };
    let before = eval_loss(&model)?;

    let mut opt = AdamW::new(
        trainer.trainable_vars(),
        ParamsAdamW {
            lr: args.lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let bar = ProgressBar::new(args.steps as u64);
    bar.set_style(ProgressStyle::with_template(
        "{bar:40} {pos}/{len} [{elapsed_precise}] {msg}",
    )?);
    for _ in 0..args.steps {
        let (ids, next) = batch(&mut rng, args.batch, args.seq, vocab, &dev)?;
        let loss = candle_nn::loss::cross_entropy(&last_logits(&model, &cfg, &ids)?, &next)?;
        bar.set_message(format!("loss {:.4}", loss.to_scalar::<f32>()?));
        trainer.backward_step(&mut opt, &loss)?;
        bar.inc(1);
    }
    bar.finish();
    let after = eval_loss(&model)?;
    println!("eval loss (64 held-out runs): before {before:.4}, after {after:.4}");

    // Save (PEFT format), then deploy: merge the saved adapter into the base at load time.
    let dir = trainer.save_pretrained(&args.out)?;
    println!("adapter saved to {}", dir.display());
    trainer.merge()?; // the trained model already runs W0 + ΔW: nothing to fold
    let merged = MergedBackend::new(base()?, PeftAdapter::load(&dir)?);
    let deployed = Llama::load(merged.var_builder(), &cfg)?;
    merged.check_all_used()?;
    let a = last_logits(&model, &cfg, &eval.0)?;
    let b = last_logits(&deployed, &cfg, &eval.0)?;
    let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    println!("merged (MergedBackend) vs trained logits: max |diff| {diff:.2e}");

    // Greedy generation with the merged model (context: the last `seq` tokens, as trained).
    let mut tokens: Vec<u32> = (0..args.seq).map(|i| ((5 + i) % vocab) as u32).collect();
    let prompt = tokens.clone();
    for _ in 0..8 {
        let ctx = &tokens[tokens.len() - args.seq..];
        let ids = Tensor::new(ctx, &dev)?.unsqueeze(0)?;
        let next = last_logits(&deployed, &cfg, &ids)?
            .argmax(1)?
            .to_vec1::<u32>()?;
        tokens.extend(next);
    }
    println!("greedy: {prompt:?} -> {:?}", &tokens[prompt.len()..]);
    println!("total {:.1} s", t_start.elapsed().as_secs_f64());
    Ok(())
}
