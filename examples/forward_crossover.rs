//! Where `ForwardMode::Auto` should switch from Spectral to Dense, measured, next to where its
//! cost model switches: for a few d×d layers with one adapter, the unmerged forward timed in both
//! modes for 1, 2, 4, … tokens. The per-token constant of `ForwardMode`'s cost model
//! (src/layer/mode.rs) is derived from these crossovers.
//!
//! `cargo run --release --example forward_crossover -- --threads 2`
//!
//! Each time is the median of `--runs` (≥ 5) runs after a warm-up.

use anyhow::Result;
use candle_core::{Device, Module, Tensor};
use candle_nn::Linear;
use clap::Parser;
use fourierft::{ForwardMode, FourierFTConfig, FourierLinear};
use timing::median_ms;

mod timing;

#[derive(Parser)]
struct Args {
    /// Layer widths d (each layer is d×d).
    #[arg(long, value_delimiter = ',', default_value = "64,256,1024,2048")]
    dims: Vec<usize>,
    /// Number of spectral coefficients n (at most d²/2).
    #[arg(long, default_value_t = 1000)]
    n: usize,
    /// Largest token count tried.
    #[arg(long, default_value_t = 4096)]
    max_tokens: usize,
    /// Threads for candle's kernels and the FFTs (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Timed runs per point (at least 5).
    #[arg(long, default_value_t = 7)]
    runs: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    timing::init_cpu(args.threads)?;
    let dev = Device::Cpu;
    println!("d n tokens dense_ms spectral_ms auto_picks");
    for &d in &args.dims {
        let n = args.n.min(d * d / 2);
        let base = Linear::new(Tensor::randn(0f32, 0.02, (d, d), &dev)?, None);
        let cfg = FourierFTConfig {
            n_frequency: n,
            init_seed: Some(0),
            ..Default::default()
        };
        let layer = FourierLinear::new(base, &cfg)?;
        let entries = layer.adapter("default")?.entries().clone();
        // The distinct spectrum columns the entries reach, for the dense cost (mode.rs).
        let columns = fourierft::internals::column_groups(&entries).columns.len();
        let (mut measured, mut model) = (None, None);
        let mut tokens = 1;
        while tokens <= args.max_tokens {
            let x = Tensor::randn(0f32, 1.0, (tokens, d), &dev)?;
            layer.set_forward_mode(ForwardMode::Dense);
            let dense = median_ms(&dev, args.runs, 5, || Ok(layer.forward(&x)?))?;
            layer.set_forward_mode(ForwardMode::Spectral);
            let spectral = median_ms(&dev, args.runs, 5, || Ok(layer.forward(&x)?))?;
            let pick = ForwardMode::Auto.resolve(&entries, tokens, &dev);
            println!("{d} {n} {tokens} {dense:.4} {spectral:.4} {pick:?}");
            if measured.is_none() && spectral >= dense {
                measured = Some(tokens);
            }
            if model.is_none() && pick == ForwardMode::Dense {
                model = Some(tokens);
            }
            if let (Some(a), Some(b)) = (measured, model) {
                if tokens >= 2 * a.max(b) {
                    break;
                }
            }
            tokens *= 2;
        }
        println!(
            "# d={d} n={n} columns={columns}: Dense first at least as fast at {measured:?} \
             tokens; the model picks Dense from {model:?}"
        );
    }
    Ok(())
}
