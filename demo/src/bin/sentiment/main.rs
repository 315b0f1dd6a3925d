//! Fine-tunes MiniLM-L6 (all-MiniLM-L6-v2) for Rotten Tomatoes sentiment on CPU and compares,
//! on the same split, batches, seeds and budget:
//! - head only: a linear classifier on frozen, cached sentence embeddings;
//! - LoRA r=8 on every query and value (a minimal LoRA, the baseline);
//! - FourierFT on every query and value (`fourierft::linear`).
//!
//! Assets: `scripts/fetch-demo-assets.sh` (or run everything with `scripts/demo.sh`).
//!
//! `cargo run --release -p fourierft-demo --bin sentiment -- --help`
//!
//! scripts/peft_sentiment.py runs the same job with transformers + PEFT and prints the same table
//! (the same batches: `--dump-batches` on both prints them for a `diff`).
//!
//! Timing: "step ms" is the wall time of a training step (batch building, forward, backward,
//! AdamW), "step CPU ms" the CPU time of the process over it (all threads) — the work, which
//! other load on a shared machine disturbs less. `fourierft_demo::tune_runtime` applies the crate's CPU
//! training settings at start (`fourierft::runtime::init_cpu_training`: `CANDLE_NUM_THREADS=1`
//! and `RAYON_NUM_THREADS` unless set, glibc keeps freed buffers, subnormals flushed to zero;
//! docs/PERFORMANCE.md). `--profile` prints the time per op kind for the first epoch.
//!
//! Files: `data.rs` (the split, batches and their order), `train.rs` (one run per method and
//! seed), this file (flags, the loop over methods and seeds, the table).

mod data;
mod train;

use anyhow::{ensure, Result};
use clap::{Parser, ValueEnum};
use fourierft_demo::run::mean_std;
use fourierft_demo::{Adapter, Encoder};
use std::path::PathBuf;
use std::time::Instant;

use data::{epoch_batches, load_split};
use train::{embed_all, run_adapter, run_head_only, RunResult};

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

fn main() -> Result<()> {
    fourierft_demo::tune_runtime();
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
