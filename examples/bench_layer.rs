//! One FourierFT layer (d×d, no bias) timed line by line; `scripts/peft_layer_bench.py`
//! prints the same lines for Hugging Face PEFT.
//!
//! `cargo run --release --example bench_layer -- --dim 4096 --n 1000 --batch 64 --threads 2`
//! On a GPU: `cargo run --release --features cuda --example bench_layer -- --device cuda`
//! (`--dtype bf16` for a bf16 base weight and input; the spectrum stays f32).
//!
//! Each `*_ms` line is the median of `--runs` (≥ 7) timed runs after a warm-up; on a GPU each run
//! ends with a device synchronisation, so the time is the work's, not the launch's.

use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Linear, Optimizer, ParamsAdamW};
use clap::Parser;
use fourierft::{FourierFTConfig, FourierLinear};
use rand::{Rng, SeedableRng};
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
    /// Device: cpu, cuda or metal (the last two need the crate's `cuda` / `metal` feature).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// dtype of the base weight and the input: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
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
    let dev = match args.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0)?,
        "metal" => Device::new_metal(0)?,
        other => anyhow::bail!("--device {other}: expected cpu, cuda or metal"),
    };
    let dtype = match args.dtype.as_str() {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        other => anyhow::bail!("--dtype {other}: expected f32, bf16 or f16"),
    };
    let d = args.dim;
    // Seeded, so every run (and every device) times the same numbers.
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let mut randn = |rows: usize, std: f32| -> Result<Tensor> {
        let normal = rand_distr::Normal::new(0f32, std)?;
        let v: Vec<f32> = (0..rows * d).map(|_| rng.sample(normal)).collect();
        Ok(Tensor::from_vec(v, (rows, d), &dev)?.to_dtype(dtype)?)
    };
    let base = Linear::new(randn(d, 0.02)?, None);
    let cfg = FourierFTConfig {
        n_frequency: args.n,
        init_seed: Some(0),
        ..Default::default()
    };
    let layer = FourierLinear::new(base.clone(), &cfg)?;
    let adapter = layer.adapter("default")?;
    let x = randn(args.batch, 1.0)?;
    let target = randn(args.batch, 1.0)?;

    let delta = median_ms(&dev, args.runs, 7, || Ok(adapter.delta_weight()?))?;
    let forward = median_ms(&dev, args.runs, 7, || Ok(layer.forward(&x)?))?;
    let base_only = median_ms(&dev, args.runs, 7, || Ok(base.forward(&x)?))?;
    let params = ParamsAdamW {
        lr: 1e-3,
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut opt = candle_nn::AdamW::new(layer.trainable_vars(), params)?;
    let train = median_ms(&dev, args.runs, 7, || {
        let loss = (layer.forward(&x)? - &target)?
            .to_dtype(DType::F32)?
            .sqr()?
            .mean_all()?;
        opt.backward_step(&loss)?;
        Ok(())
    })?;
    let merge = median_ms(&dev, args.runs, 7, || {
        layer.merge()?;
        layer.unmerge()?;
        Ok(())
    })? / 2.0;
    anyhow::ensure!(
        layer.weight().dtype() == dtype,
        "merge changed the weight's dtype"
    );

    println!("delta_weight_ms {delta:.3}");
    println!("forward_ms {forward:.3}");
    println!("base_only_forward_ms {base_only:.3}");
    println!("train_step_ms {train:.3}");
    println!("merge_ms {merge:.3}");
    println!("peak_rss_mb {:.1}", peak_rss_mb());
    Ok(())
}
