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
use timing::median_ms;

mod timing;

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
    timing::init_cpu(args.threads)?;
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

    let delta = median_ms(args.runs, 7, || Ok(adapter.delta_weight()?))?;
    let forward = median_ms(args.runs, 7, || Ok(layer.forward(&x)?))?;
    let base_only = median_ms(args.runs, 7, || Ok(base.forward(&x)?))?;
    let params = ParamsAdamW {
        lr: 1e-3,
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut opt = candle_nn::AdamW::new(layer.trainable_vars(), params)?;
    let train = median_ms(args.runs, 7, || {
        let loss = (layer.forward(&x)? - &target)?.sqr()?.mean_all()?;
        opt.backward_step(&loss)?;
        Ok(())
    })?;
    let merge = median_ms(args.runs, 7, || {
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
