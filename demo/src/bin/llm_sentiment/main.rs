//! SmolLM2-135M-Instruct (its Q4_1 GGUF, dequantized to f32) fine-tuned on CPU for Rotten
//! Tomatoes sentiment as instruction following, through the **stock**
//! `candle_transformers::models::llama` — no FourierFT code in the model
//! (`fourierft::train::StockTrainer`). Compared on the same split and batches:
//! - zero-shot: the instruct model as it is;
//! - FourierFT on every `q_proj` and `v_proj` (one run per `--n` × `--scaling` × `--lr-fourier`);
//! - LoRA on the same modules (`lora.rs`, the baseline, trained the same way).
//!
//! The prompt is the model's chat template around "Is this movie review positive or negative?
//! Answer with one word.\n\nReview: …"; the loss is the cross-entropy of the answer token
//! ("positive" / "negative") at the end of the prompt, over the whole vocabulary; accuracy
//! compares the two answers' logits there.
//!
//! Assets: `scripts/fetch-demo-assets.sh` (or run everything with `scripts/llm_demo.sh`).
//! `cargo run --release -p fourierft-demo --bin llm_sentiment -- --help`
//!
//! scripts/peft_llm_sentiment.py runs the same job with transformers + PEFT from the same GGUF
//! (`--dump-batches` on both prints the batches for a `diff`) and evaluates the adapters this
//! program saves (`--eval-adapter`).
//!
//! The stock model takes no padding mask, so a batch runs one forward per prompt length; each
//! core takes whole groups of equal length (`parallel.rs`) and their gradients are summed.
//!
//! Timing: "step ms" is the mean wall time of a training step after the first (forwards,
//! backward, AdamW, weight refresh), "step CPU ms" the process's CPU time over it; "peak RSS"
//! the process's peak resident memory during the run (reset before each run; the f32 base model
//! is resident throughout).

mod data;
mod lora;
mod parallel;

use anyhow::{ensure, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder};
use candle_transformers::models::llama::{Cache, Config, Llama};
use clap::{Parser, ValueEnum};
use fourierft::config::ModuleSelector;
use fourierft::train::StockTrainer;
use fourierft::FourierFTConfig;
use fourierft_demo::llm::{ChatTemplate, GgufFile, GgufLlama};
use fourierft_demo::run::{
    lr_at, mean_std, peak_rss_mb, process_cpu_s, progress_bar, reset_peak_rss,
};
use std::path::PathBuf;
use std::time::Instant;

use data::{epoch_batches, load_task, same_length_groups, Example, Task};
use lora::StockLora;
use parallel::{add_grads, balance, Workers};

/// The GGUF, under the assets folder.
const GGUF: &str = "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// The adapted modules.
const TARGETS: [&str; 2] = ["q_proj", "v_proj"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Method {
    ZeroShot,
    Lora,
    Fourierft,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum EvalSplit {
    /// The last --test snippets of the shuffled corpus.
    Test,
    /// The --val snippets right after the training snippets (for choosing settings).
    Val,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum FourierInit {
    Zeros,
    Normal,
}

#[derive(Debug, Parser)]
#[command(
    about = "SmolLM2-135M-Instruct + Rotten Tomatoes: FourierFT vs LoRA vs zero-shot, on CPU"
)]
struct Args {
    /// Folder written by scripts/fetch-demo-assets.sh.
    #[arg(long, default_value = "target/demo-assets")]
    assets: PathBuf,
    /// Training snippets (from the front of the shuffled corpus).
    #[arg(long, default_value_t = 256)]
    train: usize,
    /// Test snippets (from the back).
    #[arg(long, default_value_t = 300)]
    test: usize,
    /// Validation snippets (right after the training ones; used with --eval val).
    #[arg(long, default_value_t = 300)]
    val: usize,
    /// Which split to report accuracy on.
    #[arg(long, value_enum, default_value_t = EvalSplit::Test)]
    eval: EvalSplit,
    /// Methods to run.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "zero-shot,lora,fourierft"
    )]
    methods: Vec<Method>,
    /// Seeds (data order, LoRA's A, FourierFT's c with --fourier-init normal).
    #[arg(long, value_delimiter = ',', default_value = "0")]
    seeds: Vec<u64>,
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Prompts per training step.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Prompts evaluated at once, split across the cores (each forward: prompts of one length).
    #[arg(long, default_value_t = 16)]
    eval_batch: usize,
    /// FourierFT: coefficients per layer (one run per value).
    #[arg(long, value_delimiter = ',', default_value = "1000,5000")]
    n: Vec<usize>,
    /// FourierFT: scaling (one run per value).
    #[arg(long, value_delimiter = ',', default_value = "300")]
    scaling: Vec<f64>,
    /// FourierFT: learning rate of the coefficients (one run per value).
    #[arg(long, value_delimiter = ',', default_value = "0.01")]
    lr_fourier: Vec<f64>,
    /// FourierFT: initial coefficients (PEFT init_weights=true is zeros, false is normal).
    #[arg(long, value_enum, default_value_t = FourierInit::Zeros)]
    fourier_init: FourierInit,
    /// FourierFT: entry-position seed (PEFT's random_loc_seed).
    #[arg(long, default_value_t = 777)]
    random_loc_seed: u64,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    lora_r: usize,
    /// LoRA alpha (scale alpha/r).
    #[arg(long, default_value_t = 16.0)]
    lora_alpha: f64,
    /// LoRA: learning rate of A and B (one run per value).
    #[arg(long, value_delimiter = ',', default_value = "0.001")]
    lr_lora: Vec<f64>,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Where the FourierFT adapters are saved (PEFT directories).
    #[arg(long, default_value = "target/llm-demo-out")]
    out: PathBuf,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Print every seed's training batches (example indices) as JSON and exit.
    #[arg(long)]
    dump_batches: bool,
    /// Print each training step's forward time and backward-and-update time.
    #[arg(long)]
    step_times: bool,
}

/// One training configuration.
#[derive(Debug, Clone, Copy)]
struct Spec {
    method: Method,
    n: usize,
    scaling: f64,
    lr: f64,
}

impl Spec {
    fn label(&self, args: &Args) -> String {
        match self.method {
            Method::ZeroShot => "zero-shot".into(),
            Method::Lora => format!("LoRA r={} lr={}", args.lora_r, self.lr),
            Method::Fourierft => {
                format!("FourierFT n={} s={} lr={}", self.n, self.scaling, self.lr)
            }
        }
    }
}

/// Result of one (configuration, seed) run.
#[derive(Debug, Clone, serde::Serialize)]
struct RunResult {
    method: String,
    seed: u64,
    adapter_params: usize,
    accuracy: f64,
    train_s: f64,
    step_ms: f64,
    step_cpu_ms: f64,
    peak_rss_mb: f64,
    steps: usize,
    first_loss: f64,
    last_loss: f64,
    adapter_dir: Option<PathBuf>,
}

/// Accuracy (%) of `model` on `data`: the answer whose logit is higher at the prompt's end.
fn evaluate(
    workers: &Workers,
    model: &Llama,
    cfg: &Config,
    data: &[Example],
    answers: [u32; 2],
    batch: usize,
    msg: String,
) -> Result<f64> {
    let dev = Device::Cpu;
    let all: Vec<usize> = (0..data.len()).collect();
    // The trained weights are `Var`s, so every forward keeps its graph until its logits drop:
    // `batch` prompts in flight in all, as on one thread.
    let groups = same_length_groups(data, &all, batch.div_ceil(workers.len()));
    let pb = progress_bar(groups.len(), msg)?;
    let pick = Tensor::new(&answers, &dev)?;
    let shares = balance(groups, |g| tokens(data, g), workers.len());
    let correct = workers.run(&shares, |share| -> Result<usize> {
        let mut cache = Cache::new(false, DType::F32, cfg, &dev)?;
        let mut correct = 0usize;
        for g in share {
            let ids = prompt_tensor(data, g)?;
            let logits = model
                .forward(&ids, 0, &mut cache)?
                .detach()
                .index_select(&pick, 1)?
                .to_vec2::<f32>()?;
            for (&i, l) in g.iter().zip(&logits) {
                correct += (((l[1] > l[0]) as u32) == data[i].label) as usize;
            }
            pb.inc(1);
        }
        Ok(correct)
    })?;
    pb.finish_and_clear();
    Ok(100.0 * correct.iter().sum::<usize>() as f64 / data.len() as f64)
}

/// The prompts `idx` (all of one length) as a `(k, len)` tensor.
fn prompt_tensor(data: &[Example], idx: &[usize]) -> Result<Tensor> {
    let len = data[idx[0]].ids.len();
    let ids: Vec<u32> = idx.iter().flat_map(|&i| data[i].ids.clone()).collect();
    Ok(Tensor::from_vec(ids, (idx.len(), len), &Device::Cpu)?)
}

enum Adapter {
    Fourier(StockTrainer),
    Lora(StockLora),
}

impl Adapter {
    /// `loss.backward()` with the gradients of the trained parameters only.
    fn grads(&self, loss: &Tensor) -> Result<GradStore> {
        Ok(match self {
            Adapter::Fourier(t) => t.backward(loss)?,
            Adapter::Lora(l) => l.grads(loss)?,
        })
    }

    /// The optimizer step and the weights refreshed.
    fn update(&self, opt: &mut AdamW, grads: &GradStore) -> Result<()> {
        match self {
            Adapter::Fourier(t) => {
                opt.step(grads)?;
                t.sync()?;
            }
            Adapter::Lora(l) => l.update(opt, grads)?,
        }
        Ok(())
    }
}

/// Tokens in the prompts `g`.
fn tokens(data: &[Example], g: &[usize]) -> usize {
    g.iter().map(|&i| data[i].ids.len()).sum()
}

fn run_adapter(
    workers: &Workers,
    args: &Args,
    task: &Task,
    base: &GgufLlama,
    spec: Spec,
    seed: u64,
) -> Result<RunResult> {
    let dev = Device::Cpu;
    reset_peak_rss();
    let label = spec.label(args);
    let (model, adapter, vars, params) = match spec.method {
        Method::Fourierft => {
            let trainer = StockTrainer::new(FourierFTConfig {
                n_frequency: spec.n,
                scaling: spec.scaling,
                random_loc_seed: args.random_loc_seed,
                init_weights: args.fourier_init == FourierInit::Zeros,
                init_seed: Some(seed),
                target_modules: Some(ModuleSelector::Names(
                    TARGETS.iter().map(|t| t.to_string()).collect(),
                )),
                ..Default::default()
            })?;
            let model = Llama::load(trainer.var_builder(base.var_builder(&dev)), &base.config)?;
            trainer.check()?;
            let (vars, params) = (trainer.trainable_vars(), trainer.num_trainable());
            (model, Adapter::Fourier(trainer), vars, params)
        }
        Method::Lora => {
            let mut tensors = base.tensors.clone();
            let lora = StockLora::new(&mut tensors, &TARGETS, args.lora_r, args.lora_alpha, seed)?;
            let model = Llama::load(
                VarBuilder::from_tensors(tensors, DType::F32, &dev),
                &base.config,
            )?;
            let (vars, params) = (lora.vars(), lora.num_trainable());
            (model, Adapter::Lora(lora), vars, params)
        }
        Method::ZeroShot => unreachable!("zero-shot has no training run"),
    };
    let mut opt = AdamW::new(
        vars.clone(),
        ParamsAdamW {
            lr: spec.lr,
            weight_decay: args.weight_decay,
            ..Default::default()
        },
    )?;
    let per_epoch = task.train.len().div_ceil(args.batch);
    let total = args.epochs * per_epoch;
    let pb = progress_bar(total, format!("{label} seed {seed}"))?;
    let (mut step, mut losses) = (0usize, Vec::with_capacity(total));
    let (mut wall, mut cpu) = (0.0f64, 0.0f64);
    let start = Instant::now();
    for epoch in 0..args.epochs {
        for batch in epoch_batches(&task.train, args.batch, seed, epoch) {
            opt.set_learning_rate(lr_at(spec.lr, step, total));
            let (t0, c0) = (Instant::now(), process_cpu_s());
            let groups = same_length_groups(&task.train, &batch, usize::MAX);
            let shares = balance(groups, |g| tokens(&task.train, g), workers.len());
            let n = batch.len() as f64;
            // Per worker: each group's share of the batch's mean loss, forward and backward,
            // gradients summed.
            let parts = workers.run(&shares, |share| -> Result<(f64, GradStore)> {
                let mut cache = Cache::new(false, DType::F32, &base.config, &dev)?;
                let (mut loss_sum, mut acc) = (0.0, None::<GradStore>);
                for g in share {
                    let logits = model.forward(&prompt_tensor(&task.train, g)?, 0, &mut cache)?;
                    let targets: Vec<u32> = g
                        .iter()
                        .map(|&i| task.answer_ids[task.train[i].label as usize])
                        .collect();
                    let loss =
                        (candle_nn::loss::cross_entropy(&logits, &Tensor::new(targets, &dev)?)?
                            * (g.len() as f64 / n))?;
                    loss_sum += loss.to_scalar::<f32>()? as f64;
                    let grads = adapter.grads(&loss)?;
                    match &mut acc {
                        None => acc = Some(grads),
                        Some(a) => add_grads(a, &grads, &vars)?,
                    }
                }
                acc.map(|a| (loss_sum, a))
                    .ok_or_else(|| anyhow::anyhow!("empty share"))
            })?;
            let mut parts = parts.into_iter();
            let Some((mut loss, mut grads)) = parts.next() else {
                anyhow::bail!("empty batch");
            };
            for (l, g) in parts {
                loss += l;
                add_grads(&mut grads, &g, &vars)?;
            }
            losses.push(loss);
            let t_grad = t0.elapsed().as_secs_f64();
            adapter.update(&mut opt, &grads)?;
            if args.step_times {
                pb.println(format!(
                    "step {step}: forwards and backwards {:.0} ms, update {:.0} ms",
                    1e3 * t_grad,
                    1e3 * (t0.elapsed().as_secs_f64() - t_grad)
                ));
            }
            if step > 0 {
                wall += t0.elapsed().as_secs_f64();
                cpu += process_cpu_s() - c0;
            }
            step += 1;
            let recent = &losses[losses.len().saturating_sub(8)..];
            pb.set_message(format!(
                "loss {:.4}",
                recent.iter().sum::<f64>() / recent.len() as f64
            ));
            pb.inc(1);
        }
    }
    pb.finish_and_clear();
    let train_s = start.elapsed().as_secs_f64();
    let timed = step.saturating_sub(1).max(1) as f64;
    let accuracy = evaluate(
        workers,
        &model,
        &base.config,
        &task.eval,
        task.answer_ids,
        args.eval_batch,
        format!("evaluating {label}"),
    )?;
    let adapter_dir = match &adapter {
        Adapter::Fourier(t) => {
            let dir = args.out.join(format!(
                "fourierft-n{}-s{}-lr{}-seed{seed}",
                spec.n, spec.scaling, spec.lr
            ));
            t.save_pretrained(&dir)?;
            Some(dir)
        }
        Adapter::Lora(_) => None,
    };
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let k = losses.len().min(8);
    Ok(RunResult {
        method: label,
        seed,
        adapter_params: params,
        accuracy,
        train_s,
        step_ms: 1e3 * wall / timed,
        step_cpu_ms: 1e3 * cpu / timed,
        peak_rss_mb: peak_rss_mb(),
        steps: step,
        first_loss: mean(&losses[..k]),
        last_loss: mean(&losses[losses.len() - k..]),
        adapter_dir,
    })
}

fn specs(args: &Args) -> Vec<Spec> {
    let mut v = Vec::new();
    for &method in &args.methods {
        match method {
            Method::ZeroShot => {}
            Method::Lora => v.extend(args.lr_lora.iter().map(|&lr| Spec {
                method,
                n: 0,
                scaling: 0.0,
                lr,
            })),
            Method::Fourierft => {
                for &n in &args.n {
                    for &scaling in &args.scaling {
                        for &lr in &args.lr_fourier {
                            v.push(Spec {
                                method,
                                n,
                                scaling,
                                lr,
                            });
                        }
                    }
                }
            }
        }
    }
    v
}

fn main() -> Result<()> {
    fourierft_demo::tune_runtime();
    let args = Args::parse();
    run(args)
}

fn run(args: Args) -> Result<()> {
    ensure!(!args.seeds.is_empty(), "--seeds needs at least one seed");
    ensure!(
        args.batch > 0 && args.eval_batch > 0,
        "batch sizes must be positive"
    );
    let total_start = Instant::now();
    let file = GgufFile::open(args.assets.join(GGUF)).map_err(|e| {
        anyhow::anyhow!("{e} (the LLM demo's model comes from scripts/fetch-demo-assets.sh)")
    })?;
    let tok = file.tokenizer()?;
    let chat = ChatTemplate::from_gguf(&file)?;
    let task = load_task(&args, &tok, &chat)?;
    if args.dump_batches {
        let all: Vec<Vec<Vec<Vec<usize>>>> = args
            .seeds
            .iter()
            .map(|&seed| {
                (0..args.epochs)
                    .map(|e| epoch_batches(&task.train, args.batch, seed, e))
                    .collect()
            })
            .collect();
        println!("{}", serde_json::to_string(&all)?);
        return Ok(());
    }
    let t = Instant::now();
    let base = file.llama(&Device::Cpu)?;
    let split = match args.eval {
        EvalSplit::Test => "test",
        EvalSplit::Val => "val",
    };
    let lens: Vec<usize> = task.train.iter().map(|e| e.ids.len()).collect();
    println!(
        "SmolLM2-135M-Instruct (Q4_1 GGUF → f32, loaded in {:.1} s) + Rotten Tomatoes: {} train / \
         {} {split} prompts ({}–{} tokens), batch {}, {} epoch(s), seeds {:?}, {} rayon threads",
        t.elapsed().as_secs_f64(),
        task.train.len(),
        task.eval.len(),
        lens.iter().min().unwrap_or(&0),
        lens.iter().max().unwrap_or(&0),
        args.batch,
        args.epochs,
        args.seeds,
        rayon::current_num_threads()
    );
    // One set of worker threads for every run (threads, and their allocator arenas, reused).
    let workers = Workers::new()?;
    let mut results = Vec::new();
    if args.methods.contains(&Method::ZeroShot) {
        let model = Llama::load(base.var_builder(&Device::Cpu), &base.config)?;
        let t = Instant::now();
        let accuracy = evaluate(
            &workers,
            &model,
            &base.config,
            &task.eval,
            task.answer_ids,
            args.eval_batch,
            "zero-shot".into(),
        )?;
        println!(
            "{:>36}: accuracy {accuracy:.2}% ({:.0} s)",
            "zero-shot",
            t.elapsed().as_secs_f64()
        );
        results.push(RunResult {
            method: "zero-shot".into(),
            seed: 0,
            adapter_params: 0,
            accuracy,
            train_s: 0.0,
            step_ms: f64::NAN,
            step_cpu_ms: f64::NAN,
            peak_rss_mb: peak_rss_mb(),
            steps: 0,
            first_loss: f64::NAN,
            last_loss: f64::NAN,
            adapter_dir: None,
        });
    }
    // Seed by seed, alternating the configurations, so a change of machine load during the run
    // affects all alike.
    for &seed in &args.seeds {
        for spec in specs(&args) {
            let r = run_adapter(&workers, &args, &task, &base, spec, seed)?;
            println!(
                "{:>36} seed {seed}: accuracy {:.2}%, loss {:.3} → {:.3}, {:.0} s, {:.0} ms/step \
                 ({:.0} ms CPU), peak RSS {:.0} MB",
                r.method,
                r.accuracy,
                r.first_loss,
                r.last_loss,
                r.train_s,
                r.step_ms,
                r.step_cpu_ms,
                r.peak_rss_mb
            );
            results.push(r);
        }
    }
    print_table(&args, &results, split, base.config.num_hidden_layers);
    println!("total time {:.0} s", total_start.elapsed().as_secs_f64());
    if let Some(path) = &args.json {
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(&results)?)?;
        std::fs::rename(&tmp, path)?;
    }
    Ok(())
}

fn print_table(args: &Args, results: &[RunResult], split: &str, layers: usize) {
    println!();
    println!(
        "| method | adapter params | {split} acc % (mean ± std) | per seed | train s/run | step ms \
         | step CPU ms | peak RSS MB |"
    );
    println!("|---|---:|---:|---|---:|---:|---:|---:|");
    let mut labels: Vec<&str> = Vec::new();
    for r in results {
        if !labels.contains(&r.method.as_str()) {
            labels.push(&r.method);
        }
    }
    for label in labels {
        let rs: Vec<&RunResult> = results.iter().filter(|r| r.method == label).collect();
        let accs: Vec<f64> = rs.iter().map(|r| r.accuracy).collect();
        let (m, s) = mean_std(&accs);
        let per_seed = accs
            .iter()
            .map(|a| format!("{a:.1}"))
            .collect::<Vec<_>>()
            .join(" / ");
        let avg = |f: fn(&RunResult) -> f64| rs.iter().map(|r| f(r)).sum::<f64>() / rs.len() as f64;
        let fmt = |x: f64| {
            if x.is_nan() {
                "–".to_string()
            } else {
                format!("{x:.0}")
            }
        };
        println!(
            "| {label} | {} | {m:.2} ± {s:.2} | {per_seed} | {:.0} | {} | {} | {} |",
            rs[0].adapter_params,
            avg(|r| r.train_s),
            fmt(avg(|r| r.step_ms)),
            fmt(avg(|r| r.step_cpu_ms)),
            fmt(avg(|r| r.peak_rss_mb)),
        );
    }
    println!(
        "\nsettings: q_proj and v_proj of all {} layers; FourierFT init={:?} random_loc_seed={}; \
         LoRA r={} alpha={}; AdamW weight_decay={}, linear decay to 0, no warmup; loss on the \
         answer token",
        layers,
        args.fourier_init,
        args.random_loc_seed,
        args.lora_r,
        args.lora_alpha,
        args.weight_decay
    );
}
