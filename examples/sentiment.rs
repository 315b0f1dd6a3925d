//! Fine-tunes MiniLM-L6 (all-MiniLM-L6-v2) for Rotten Tomatoes sentiment on CPU and compares,
//! on the same split, batches, seeds and budget:
//! - head only: a linear classifier on frozen, cached sentence embeddings;
//! - LoRA r=8 on every query and value (a minimal LoRA, the baseline);
//! - FourierFT on every query and value (`fourierft::linear`).
//!
//! Assets: `scripts/fetch-demo-assets.sh` (or run everything with `scripts/demo.sh`).
//!
//! `cargo run --release --example sentiment -- --help`
//!
//! scripts/peft_sentiment.py runs the same job with transformers + PEFT and prints the same table
//! (the same batches: `--dump-batches` on both prints them for a `diff`).
//!
//! Timing: "step ms" is the wall time of a training step (batch building, forward, backward,
//! AdamW), "step CPU ms" the CPU time of the process over it (all threads) — the work, which
//! other load on a shared machine disturbs less. `bert::tune_runtime` applies the crate's CPU
//! training settings at start (`fourierft::runtime::init_cpu_training`: `CANDLE_NUM_THREADS=1`
//! and `RAYON_NUM_THREADS` unless set, glibc keeps freed buffers, subnormals flushed to zero;
//! docs/PERFORMANCE.md). `--profile` prints the time per op kind for the first epoch.

mod bert;

use anyhow::{bail, ensure, Context, Result};
use bert::{Adapter, Encoder, LoraConfig};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use clap::{Parser, ValueEnum};
use fourierft::config::ModuleSelector;
use fourierft::peft::PeftAdapter;
use fourierft::FourierFTConfig;
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Method {
    Head,
    Lora,
    Fourierft,
}

impl Method {
    fn label(self) -> &'static str {
        match self {
            Method::Head => "head only",
            Method::Lora => "LoRA",
            Method::Fourierft => "FourierFT",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum EvalSplit {
    /// The last --test snippets of the shuffled corpus.
    Test,
    /// The --val snippets right after the training snippets (for tuning).
    Val,
}

#[derive(Debug, Parser)]
#[command(about = "MiniLM-L6 + Rotten Tomatoes: FourierFT vs LoRA vs head only, on CPU")]
struct Args {
    /// Folder written by scripts/fetch-demo-assets.sh.
    #[arg(long, default_value = "target/demo-assets")]
    assets: PathBuf,
    /// Training snippets (taken from the front of the shuffled corpus).
    #[arg(long, default_value_t = 1600)]
    train: usize,
    /// Test snippets (taken from the back).
    #[arg(long, default_value_t = 1000)]
    test: usize,
    /// Validation snippets (right after the training ones; used with --eval val).
    #[arg(long, default_value_t = 1000)]
    val: usize,
    /// Which split to report accuracy on.
    #[arg(long, value_enum, default_value_t = EvalSplit::Test)]
    eval: EvalSplit,
    /// Methods to run.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "head,lora,fourierft"
    )]
    methods: Vec<Method>,
    /// Seeds (data order, LoRA's A, FourierFT's c when --fourier-init normal).
    #[arg(long, value_delimiter = ',', default_value = "0,1,2")]
    seeds: Vec<u64>,
    /// Epochs for LoRA and FourierFT.
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Epochs for the head-only baseline (its features are cached, so epochs are nearly free).
    #[arg(long, default_value_t = 30)]
    head_epochs: usize,
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Tokens per snippet at most (longer ones are truncated).
    #[arg(long, default_value_t = 128)]
    max_len: usize,
    /// FourierFT: spectral coefficients per layer.
    #[arg(long, default_value_t = 1000)]
    n: usize,
    /// FourierFT: scaling alpha.
    #[arg(long, default_value_t = 150.0)]
    scaling: f64,
    /// FourierFT: entry-position seed (PEFT's random_loc_seed).
    #[arg(long, default_value_t = 777)]
    random_loc_seed: u64,
    /// FourierFT: initial coefficients (PEFT init_weights=true is zeros, false is normal).
    #[arg(long, value_enum, default_value_t = FourierInit::Zeros)]
    fourier_init: FourierInit,
    /// FourierFT: learning rate of the coefficients c.
    #[arg(long, default_value_t = 1e-1)]
    lr_fourier: f64,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    lora_r: usize,
    /// LoRA alpha (scale alpha/r).
    #[arg(long, default_value_t = 8.0)]
    lora_alpha: f64,
    /// LoRA: learning rate of A and B.
    #[arg(long, default_value_t = 5e-3)]
    lr_lora: f64,
    /// Learning rate of the classifier head when training with an adapter.
    #[arg(long, default_value_t = 3e-2)]
    lr_head: f64,
    /// Learning rate of the head-only baseline.
    #[arg(long, default_value_t = 5e-3)]
    lr_head_only: f64,
    /// AdamW weight decay (all parameters).
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// FourierFT forward: dense (W0 + ΔW), spectral (O(d log d) per token) or auto.
    #[arg(long, value_enum, default_value_t = FourierMode::Auto)]
    fourier_mode: FourierMode,
    /// Where the FourierFT adapters are saved.
    #[arg(long, default_value = "target/demo-out")]
    out: PathBuf,
    /// Skip the merged-model check (saves one evaluation per FourierFT seed).
    #[arg(long)]
    no_merge_check: bool,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Print every seed's training batches (example indices, epoch by epoch) as JSON and exit:
    /// `diff` with `scripts/peft_sentiment.py --dump-batches` shows both see the same batches.
    #[arg(long)]
    dump_batches: bool,
    /// Print, after the first epoch of each adapter run, the time per op kind (adapted layers,
    /// frozen key projection, attention, FFN, norms, optimizer; forward and backward apart) and
    /// the share of subnormal values among the GEMM operands each kind produces (run with
    /// FOURIERFT_SUBNORMALS=ieee to see where they arise). Profiling adds a clock read per op, a
    /// pass over each operand and two marker nodes per adapted layer: step times are higher.
    #[arg(long)]
    profile: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum FourierMode {
    Auto,
    Dense,
    Spectral,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum FourierInit {
    Zeros,
    Normal,
}

/// One labelled snippet, tokenized.
struct Example {
    ids: Vec<u32>,
    label: u32,
}

/// splitmix64: the data-order generator, shared bit for bit with scripts/peft_sentiment.py.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

/// Examples per length bucket, in batches.
const BUCKET_BATCHES: usize = 16;

/// The batches of one epoch: shuffle, sort each run of 16 batches' worth of examples by length
/// (so a batch pads little), cut into batches, shuffle the batches.
fn epoch_batches(lens: &[usize], batch: usize, seed: u64, epoch: usize) -> Vec<Vec<usize>> {
    let mut rng = SplitMix64(seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64));
    let mut idx: Vec<usize> = (0..lens.len()).collect();
    rng.shuffle(&mut idx);
    let mut batches = Vec::new();
    for chunk in idx.chunks(batch * BUCKET_BATCHES) {
        let mut c = chunk.to_vec();
        c.sort_by_key(|&i| lens[i]);
        batches.extend(c.chunks(batch).map(|b| b.to_vec()));
    }
    rng.shuffle(&mut batches);
    batches
}

/// Evaluation batches: sorted by length, in order.
fn eval_batches(lens: &[usize], batch: usize) -> Vec<Vec<usize>> {
    let mut idx: Vec<usize> = (0..lens.len()).collect();
    idx.sort_by_key(|&i| lens[i]);
    idx.chunks(batch).map(|b| b.to_vec()).collect()
}

fn load_split(args: &Args) -> Result<(Vec<Example>, Vec<Example>)> {
    let path = args.assets.join("rotten_tomatoes.jsonl");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {} (run scripts/fetch-demo-assets.sh first)",
            path.display()
        )
    })?;
    #[derive(serde::Deserialize)]
    struct Row {
        label: u32,
        text: String,
    }
    let rows: Vec<Row> = text
        .lines()
        .map(serde_json::from_str)
        .collect::<std::result::Result<_, _>>()?;
    let n = rows.len();
    let eval_range = match args.eval {
        EvalSplit::Test => n.saturating_sub(args.test)..n,
        EvalSplit::Val => args.train..args.train + args.val,
    };
    ensure!(
        args.train + args.val + args.test <= n,
        "--train {} + --val {} + --test {} exceeds the {n} snippets",
        args.train,
        args.val,
        args.test
    );
    let tok = bert::tokenizer(&args.assets.join("tokenizer.json"), args.max_len)?;
    let encode = |rows: &[Row]| -> Result<Vec<Example>> {
        let texts: Vec<&str> = rows.iter().map(|r| r.text.as_str()).collect();
        Ok(bert::encode(&tok, &texts)?
            .into_iter()
            .zip(rows)
            .map(|(ids, r)| Example {
                ids,
                label: r.label,
            })
            .collect())
    };
    Ok((encode(&rows[..args.train])?, encode(&rows[eval_range])?))
}

fn batch_tensors(
    data: &[Example],
    idx: &[usize],
    dev: &Device,
) -> Result<(Tensor, Tensor, Tensor)> {
    let seqs: Vec<&[u32]> = idx.iter().map(|&i| data[i].ids.as_slice()).collect();
    let (ids, mask) = bert::pad_batch(&seqs, dev)?;
    let labels: Vec<u32> = idx.iter().map(|&i| data[i].label).collect();
    Ok((ids, mask, Tensor::new(labels, dev)?))
}

/// The linear classifier on the sentence embedding; starts at zero (same in PEFT's script).
struct Head {
    w: Var,
    b: Var,
}

impl Head {
    fn new(hidden: usize, dev: &Device) -> Result<Self> {
        Ok(Self {
            w: Var::zeros((2, hidden), DType::F32, dev)?,
            b: Var::zeros(2, DType::F32, dev)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&self.w.as_tensor().t()?)?
            .broadcast_add(self.b.as_tensor())?)
    }

    fn vars(&self) -> Vec<Var> {
        vec![self.w.clone(), self.b.clone()]
    }
}

fn adamw(vars: Vec<Var>, lr: f64, weight_decay: f64) -> Result<AdamW> {
    Ok(AdamW::new(
        vars,
        ParamsAdamW {
            lr,
            weight_decay,
            ..Default::default()
        },
    )?)
}

fn bar(len: usize, prefix: String) -> Result<ProgressBar> {
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        ProgressStyle::with_template(
            "{prefix:>22} {bar:30} {pos}/{len} [{elapsed_precise}] {msg}",
        )?
        .progress_chars("=> "),
    );
    pb.set_prefix(prefix);
    Ok(pb)
}

/// Accuracy and logits `(n, 2)` (in data order) of `enc` + `head` on `data`.
fn evaluate(
    enc: &Encoder,
    head: &Head,
    data: &[Example],
    batch: usize,
    msg: &str,
) -> Result<(f64, Vec<[f32; 2]>)> {
    let dev = Device::Cpu;
    let lens: Vec<usize> = data.iter().map(|e| e.ids.len()).collect();
    let batches = eval_batches(&lens, batch);
    let pb = bar(batches.len(), msg.to_string())?;
    let mut logits = vec![[0f32; 2]; data.len()];
    for b in &batches {
        let (ids, mask, _) = batch_tensors(data, b, &dev)?;
        let out = head.forward(&enc.embed(&ids, &mask)?.detach())?;
        for (&i, row) in b.iter().zip(out.to_vec2::<f32>()?) {
            logits[i] = [row[0], row[1]];
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok((accuracy(&logits, data), logits))
}

fn accuracy(logits: &[[f32; 2]], data: &[Example]) -> f64 {
    let correct = logits
        .iter()
        .zip(data)
        .filter(|(l, e)| ((l[1] > l[0]) as u32) == e.label)
        .count();
    100.0 * correct as f64 / data.len() as f64
}

/// Result of one (method, seed) run.
#[derive(Debug, Clone, serde::Serialize)]
struct RunResult {
    method: String,
    seed: u64,
    adapter_params: usize,
    accuracy: f64,
    train_s: f64,
    step_ms: f64,
    /// CPU time of the whole process per step (all threads): the work, robust to other load.
    step_cpu_ms: f64,
    steps: usize,
}

/// CPU time used by this process so far (all threads), in seconds; NaN where unsupported.
fn process_cpu_s() -> f64 {
    #[cfg(unix)]
    {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec through a valid pointer.
        if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } == 0 {
            return ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9;
        }
    }
    f64::NAN
}

fn lr_at(lr: f64, step: usize, total: usize) -> f64 {
    lr * (1.0 - step as f64 / total as f64)
}

/// Head only: embeddings of the frozen encoder are computed once; the head trains on them.
fn run_head_only(
    args: &Args,
    seed: u64,
    feats: &(Tensor, Tensor),
    train: &[Example],
    eval: &[Example],
) -> Result<RunResult> {
    let dev = Device::Cpu;
    let (train_x, eval_x) = feats;
    let head = Head::new(train_x.dim(1)?, &dev)?;
    let mut opt = adamw(head.vars(), args.lr_head_only, args.weight_decay)?;
    let lens: Vec<usize> = train.iter().map(|e| e.ids.len()).collect();
    let labels = Tensor::new(train.iter().map(|e| e.label).collect::<Vec<_>>(), &dev)?;
    let steps_per_epoch = train.len().div_ceil(args.batch);
    let total = steps_per_epoch * args.head_epochs;
    let start = Instant::now();
    let mut step = 0;
    for epoch in 0..args.head_epochs {
        for b in epoch_batches(&lens, args.batch, seed, epoch) {
            let idx = Tensor::new(b.iter().map(|&i| i as u32).collect::<Vec<_>>(), &dev)?;
            let logits = head.forward(&train_x.index_select(&idx, 0)?)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &labels.index_select(&idx, 0)?)?;
            opt.set_learning_rate(lr_at(args.lr_head_only, step, total));
            opt.backward_step(&loss)?;
            step += 1;
        }
    }
    let train_s = start.elapsed().as_secs_f64();
    let logits = head.forward(eval_x)?.to_vec2::<f32>()?;
    let logits: Vec<[f32; 2]> = logits.into_iter().map(|r| [r[0], r[1]]).collect();
    Ok(RunResult {
        method: Method::Head.label().into(),
        seed,
        adapter_params: 0,
        accuracy: accuracy(&logits, eval),
        train_s,
        step_ms: 1e3 * train_s / total as f64,
        step_cpu_ms: f64::NAN,
        steps: total,
    })
}

fn embed_all(enc: &Encoder, data: &[Example], batch: usize, msg: &str) -> Result<Tensor> {
    let dev = Device::Cpu;
    let lens: Vec<usize> = data.iter().map(|e| e.ids.len()).collect();
    let batches = eval_batches(&lens, batch);
    let pb = bar(batches.len(), msg.to_string())?;
    let mut rows: Vec<Option<Tensor>> = vec![None; data.len()];
    for b in &batches {
        let (ids, mask, _) = batch_tensors(data, b, &dev)?;
        let e = enc.embed(&ids, &mask)?;
        for (k, &i) in b.iter().enumerate() {
            rows[i] = Some(e.get(k)?);
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    let rows: Vec<Tensor> = rows.into_iter().map(|r| r.unwrap()).collect();
    Ok(Tensor::stack(&rows, 0)?)
}

fn fourier_config(args: &Args, seed: u64) -> FourierFTConfig {
    FourierFTConfig {
        n_frequency: args.n,
        scaling: args.scaling,
        random_loc_seed: args.random_loc_seed,
        init_weights: args.fourier_init == FourierInit::Zeros,
        init_seed: Some(seed),
        ..Default::default()
    }
}

/// LoRA or FourierFT on query and value, trained together with the head.
fn run_adapter(
    args: &Args,
    method: Method,
    seed: u64,
    train: &[Example],
    eval: &[Example],
) -> Result<RunResult> {
    let dev = Device::Cpu;
    let adapter = match method {
        Method::Lora => Adapter::Lora(LoraConfig {
            r: args.lora_r,
            alpha: args.lora_alpha,
            seed,
        }),
        Method::Fourierft => Adapter::FourierFT(Box::new(fourier_config(args, seed))),
        Method::Head => bail!("head only has no adapter"),
    };
    let lr = match method {
        Method::Lora => args.lr_lora,
        _ => args.lr_fourier,
    };
    let enc = Encoder::from_dir(&args.assets, &adapter)?;
    let mode = match args.fourier_mode {
        FourierMode::Auto => fourierft::ForwardMode::Auto,
        FourierMode::Dense => fourierft::ForwardMode::Dense,
        FourierMode::Spectral => fourierft::ForwardMode::Spectral,
    };
    for (_, layer) in enc.fourier_layers() {
        layer.set_forward_mode(mode);
    }
    let head = Head::new(enc.config.hidden_size, &dev)?;
    let mut opt_adapter = adamw(enc.trainable_vars(), lr, args.weight_decay)?;
    let mut opt_head = adamw(head.vars(), args.lr_head, args.weight_decay)?;
    let lens: Vec<usize> = train.iter().map(|e| e.ids.len()).collect();
    let total = train.len().div_ceil(args.batch) * args.epochs;
    let pb = bar(total, format!("{} seed {seed}", method.label()))?;
    let (mut step, mut loss_ema, mut seen) = (0usize, None::<f64>, 0usize);
    let (mut step_time, mut step_cpu) = (0f64, 0f64);
    let start = Instant::now();
    bert::profile::reset();
    bert::profile::enable(args.profile);
    for epoch in 0..args.epochs {
        let mut epoch_steps = 0;
        for b in epoch_batches(&lens, args.batch, seed, epoch) {
            let (t, cpu) = (Instant::now(), process_cpu_s());
            let (ids, mask, labels) = batch_tensors(train, &b, &dev)?;
            let loss = bert::profile::time("step: forward (all)", || -> Result<Tensor> {
                let logits = head.forward(&enc.embed(&ids, &mask)?)?;
                Ok(candle_nn::loss::cross_entropy(&logits, &labels)?)
            })?;
            let grads = bert::profile::time("step: backward (all)", || loss.backward())?;
            bert::profile::time("optimizer (AdamW)", || -> Result<()> {
                opt_adapter.set_learning_rate(lr_at(lr, step, total));
                opt_head.set_learning_rate(lr_at(args.lr_head, step, total));
                opt_adapter.step(&grads)?;
                opt_head.step(&grads)?;
                Ok(())
            })?;
            let l = loss.to_scalar::<f32>()? as f64;
            step_time += t.elapsed().as_secs_f64();
            step_cpu += process_cpu_s() - cpu;
            step += 1;
            epoch_steps += 1;
            seen += b.len();
            loss_ema = Some(loss_ema.map_or(l, |e| 0.9 * e + 0.1 * l));
            pb.set_message(format!(
                "loss {:.3}  {:.1} ex/s",
                loss_ema.unwrap(),
                seen as f64 / start.elapsed().as_secs_f64()
            ));
            pb.inc(1);
        }
        if bert::profile::enabled() {
            bert::profile::enable(false);
            pb.suspend(|| {
                println!(
                    "profile, {} seed {seed}, epoch {epoch} ({epoch_steps} steps; \"step:\" lines \
                     are totals, the others their parts; subnormals {}):\n{}",
                    method.label(),
                    if fourierft::runtime::thread_flushes() {
                        "flushed to zero"
                    } else {
                        "kept (IEEE)"
                    },
                    bert::profile::report(epoch_steps)
                )
            });
        }
    }
    let train_s = start.elapsed().as_secs_f64();
    pb.finish_and_clear();
    let (acc, logits) = evaluate(&enc, &head, eval, 64, "evaluating")?;
    if method == Method::Fourierft {
        let dir = args.out.join(format!("fourierft-seed{seed}"));
        save_fourierft(&enc, &head, &fourier_config(args, seed), &dir)?;
        if !args.no_merge_check {
            enc.merge()?;
            let (acc_m, logits_m) = evaluate(&enc, &head, eval, 64, "evaluating merged")?;
            enc.unmerge()?;
            let diff = logits
                .iter()
                .zip(&logits_m)
                .map(|(a, b)| (a[0] - b[0]).abs().max((a[1] - b[1]).abs()))
                .fold(0f32, f32::max);
            println!(
                "FourierFT seed {seed}: saved to {}; merged model: accuracy {acc_m:.2}% \
                 (unmerged {acc:.2}%), max |logit difference| {diff:.2e}",
                dir.display()
            );
            ensure!(
                acc_m == acc,
                "merged accuracy {acc_m} differs from unmerged {acc}"
            );
        }
    }
    Ok(RunResult {
        method: method.label().into(),
        seed,
        adapter_params: enc.num_trainable(),
        accuracy: acc,
        train_s,
        step_ms: 1e3 * step_time / step as f64,
        step_cpu_ms: 1e3 * step_cpu / step as f64,
        steps: step,
    })
}

/// Saves the FourierFT adapter in PEFT's format (`adapter_config.json`,
/// `adapter_model.safetensors` with `base_model.model.<module>.fourierft_spectrum`, written by
/// `fourierft::peft::PeftAdapter`) and the classifier head next to it (`head.safetensors`).
fn save_fourierft(enc: &Encoder, head: &Head, cfg: &FourierFTConfig, dir: &Path) -> Result<()> {
    let spectra: BTreeMap<String, Tensor> = enc
        .fourier_layers()
        .into_iter()
        .map(|(name, layer)| {
            let adapter = layer.adapter(fourierft::DEFAULT_ADAPTER)?;
            Ok((name, adapter.spectrum().as_tensor().clone()))
        })
        .collect::<Result<_>>()?;
    let config = FourierFTConfig {
        target_modules: Some(ModuleSelector::Names(vec!["query".into(), "value".into()])),
        base_model_name_or_path: Some("sentence-transformers/all-MiniLM-L6-v2".into()),
        inference_mode: true,
        ..cfg.clone()
    };
    PeftAdapter::new(config, spectra, BTreeMap::new())?.save(dir, fourierft::DEFAULT_ADAPTER)?;
    let head_tensors = HashMap::from([
        ("weight".to_string(), head.w.as_tensor().clone()),
        ("bias".to_string(), head.b.as_tensor().clone()),
    ]);
    candle_core::safetensors::save(&head_tensors, dir.join("head.safetensors"))?;
    Ok(())
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

fn main() -> Result<()> {
    bert::tune_runtime();
    let args = Args::parse();
    ensure!(!args.seeds.is_empty(), "--seeds needs at least one seed");
    let total_start = Instant::now();
    let (train, eval) = load_split(&args)?;
    if args.dump_batches {
        let lens: Vec<usize> = train.iter().map(|e| e.ids.len()).collect();
        let all: Vec<Vec<Vec<Vec<usize>>>> = args
            .seeds
            .iter()
            .map(|&seed| {
                (0..args.epochs)
                    .map(|e| epoch_batches(&lens, args.batch, seed, e))
                    .collect()
            })
            .collect();
        println!("{}", serde_json::to_string(&all)?);
        return Ok(());
    }
    let split_name = match args.eval {
        EvalSplit::Test => "test",
        EvalSplit::Val => "val",
    };
    println!(
        "MiniLM-L6 + Rotten Tomatoes: {} train / {} {split_name} snippets, batch {}, max length {}, \
         {} epoch(s) (head only: {}), seeds {:?}, {} rayon threads",
        train.len(),
        eval.len(),
        args.batch,
        args.max_len,
        args.epochs,
        args.head_epochs,
        args.seeds,
        rayon::current_num_threads()
    );
    let mut results: Vec<RunResult> = Vec::new();
    if args.methods.contains(&Method::Head) {
        let enc = Encoder::from_dir(&args.assets, &Adapter::None)?;
        let t = Instant::now();
        let feats = (
            embed_all(&enc, &train, 64, "embedding train")?,
            embed_all(&enc, &eval, 64, "embedding eval")?,
        );
        println!(
            "head only: embedded {} snippets with the frozen encoder in {:.1} s",
            train.len() + eval.len(),
            t.elapsed().as_secs_f64()
        );
        for &seed in &args.seeds {
            let r = run_head_only(&args, seed, &feats, &train, &eval)?;
            println!("{:>10} seed {seed}: accuracy {:.2}%", r.method, r.accuracy);
            results.push(r);
        }
    }
    // Seed by seed, alternating the methods, so that a change of machine load during the run
    // affects both alike.
    for &seed in &args.seeds {
        for &method in &args.methods {
            if method == Method::Head {
                continue;
            }
            let r = run_adapter(&args, method, seed, &train, &eval)?;
            println!(
                "{:>10} seed {seed}: accuracy {:.2}%, {:.0} s, {:.0} ms/step ({:.0} ms CPU)",
                r.method, r.accuracy, r.train_s, r.step_ms, r.step_cpu_ms
            );
            results.push(r);
        }
    }
    print_table(&args, &results, split_name);
    println!("total time {:.0} s", total_start.elapsed().as_secs_f64());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&results)?)?;
    }
    Ok(())
}

fn print_table(args: &Args, results: &[RunResult], split: &str) {
    println!();
    println!(
        "| method | adapter params | {split} acc % (mean ± std) | per seed | train s/run | step ms \
         | step CPU ms |"
    );
    println!("|---|---:|---:|---|---:|---:|---:|");
    for &method in &args.methods {
        let rs: Vec<&RunResult> = results
            .iter()
            .filter(|r| r.method == method.label())
            .collect();
        if rs.is_empty() {
            continue;
        }
        let accs: Vec<f64> = rs.iter().map(|r| r.accuracy).collect();
        let (m, s) = mean_std(&accs);
        let name = match method {
            Method::Head => "head only".to_string(),
            Method::Lora => format!("LoRA r={}", args.lora_r),
            Method::Fourierft => format!("FourierFT n={}", args.n),
        };
        let per_seed = accs
            .iter()
            .map(|a| format!("{a:.1}"))
            .collect::<Vec<_>>()
            .join(" / ");
        let train_s = rs.iter().map(|r| r.train_s).sum::<f64>() / rs.len() as f64;
        let step_ms = rs.iter().map(|r| r.step_ms).sum::<f64>() / rs.len() as f64;
        let cpu = rs.iter().map(|r| r.step_cpu_ms).sum::<f64>() / rs.len() as f64;
        let cpu = if cpu.is_nan() {
            "–".to_string()
        } else {
            format!("{cpu:.0}")
        };
        println!(
            "| {name} | {} | {m:.2} ± {s:.2} | {per_seed} | {train_s:.1} | {step_ms:.0} | {cpu} |",
            rs[0].adapter_params
        );
    }
    println!(
        "\nsettings: FourierFT n={} scaling={} init={:?} random_loc_seed={} lr_c={} forward={:?}; \
         LoRA r={} alpha={} lr={}; head lr={} (head only: lr={}, {} epochs); \
         AdamW weight_decay={}, linear decay to 0, no warmup; classifier head on the mean-pooled \
         embedding, initialised to zero; adapters on every query and value",
        args.n,
        args.scaling,
        args.fourier_init,
        args.random_loc_seed,
        args.lr_fourier,
        args.fourier_mode,
        args.lora_r,
        args.lora_alpha,
        args.lr_lora,
        args.lr_head,
        args.lr_head_only,
        args.head_epochs,
        args.weight_decay
    );
}
