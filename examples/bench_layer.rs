//! One FourierFT layer (d×d, no bias, f32) timed line by line; `scripts/peft_layer_bench.py`
//! prints the same lines for Hugging Face PEFT.
//!
//! `cargo run --release --example bench_layer -- --dim 4096 --n 1000 --batch 64 --threads 2`
//!
//! Each `*_ms` line is the median of `--runs` (≥ 7) timed runs after a warm-up.

use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Linear, Optimizer, ParamsAdamW};
use clap::Parser;
use fourierft::{FourierFTConfig, FourierLinear};
use std::time::Instant;

#[derive(Parser)]
struct Args {
    /// Layer width d (the layer is d×d).
    #[arg(long, default_value_t = 4096)]
    dim: usize,
    /// Number of spectral coefficients n.
    #[arg(long, default_value_t = 1000)]
    n: usize,
    /// Tokens per forward.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Threads for candle's kernels and the FFTs (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Timed runs per line (at least 7).
    #[arg(long, default_value_t = 9)]
    runs: usize,
}

fn median_ms<T>(runs: usize, mut f: impl FnMut() -> Result<T>) -> Result<f64> {
    f()?; // warm-up
    let mut t: Vec<f64> = (0..runs.max(7))
        .map(|_| {
            let start = Instant::now();
            f().map(|_| start.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<Result<_>>()?;
    t.sort_by(|a, b| a.total_cmp(b));
    Ok(t[t.len() / 2])
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(t) = args.threads {
        // candle's CPU kernels read RAYON_NUM_THREADS; the FFTs use rayon's global pool.
        std::env::set_var("RAYON_NUM_THREADS", t.to_string());
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()?;
    }
    // The crate's CPU training settings (docs/PERFORMANCE.md): candle's elementwise ops on the
    // calling thread, freed buffers reused, subnormals flushed. FOURIERFT_SUBNORMALS=ieee,
    // FOURIERFT_MALLOC=default and CANDLE_NUM_THREADS=N undo each one.
    fourierft::runtime::init_cpu_training();
    let (d, dev) = (args.dim, Device::Cpu);
    let base = Linear::new(Tensor::randn(0f32, 0.02, (d, d), &dev)?, None);
    let cfg = FourierFTConfig {
        n_frequency: args.n,
        init_seed: Some(0),
        ..Default::default()
    };
    let layer = FourierLinear::new(base.clone(), &cfg)?;
    let adapter = layer.adapter("default")?;
    let x = Tensor::randn(0f32, 1.0, (args.batch, d), &dev)?;
    let target = Tensor::randn(0f32, 1.0, (args.batch, d), &dev)?;

    let delta = median_ms(args.runs, || Ok(adapter.delta_weight()?))?;
    let forward = median_ms(args.runs, || Ok(layer.forward(&x)?))?;
    let base_only = median_ms(args.runs, || Ok(base.forward(&x)?))?;
    let params = ParamsAdamW {
        lr: 1e-3,
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut opt = candle_nn::AdamW::new(layer.trainable_vars(), params)?;
    let train = median_ms(args.runs, || {
        let loss = (layer.forward(&x)? - &target)?.sqr()?.mean_all()?;
        opt.backward_step(&loss)?;
        Ok(())
    })?;
    let merge = median_ms(args.runs, || {
        layer.merge()?;
        layer.unmerge()?;
        Ok(())
    })? / 2.0;
    assert_eq!(layer.weight().dtype(), DType::F32);

    println!("delta_weight_ms {delta:.3}");
    println!("forward_ms {forward:.3}");
    println!("base_only_forward_ms {base_only:.3}");
    println!("train_step_ms {train:.3}");
    println!("merge_ms {merge:.3}");
    println!("peak_rss_mb {:.1}", peak_rss_mb());
    Ok(())
}
