//! Wrap a Linear, train only the spectral coefficients on synthetic data, merge, check.
//!
//! `cargo run --release --example quickstart`

use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Linear, Optimizer, ParamsAdamW};
use fourierft::{FourierFTConfig, FourierLinear};
use indicatif::{ProgressBar, ProgressStyle};

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let (d_in, d_out, batch) = (256, 256, 64);

    // A "pretrained" layer and a target that differs from it by a low-frequency update.
    let w0 = Tensor::randn(0f32, 0.05, (d_out, d_in), &dev)?;
    let base = Linear::new(w0.clone(), Some(Tensor::zeros(d_out, DType::F32, &dev)?));
    let j = Tensor::arange(0f32, d_out as f32, &dev)?.unsqueeze(1)?;
    let k = Tensor::arange(0f32, d_in as f32, &dev)?.unsqueeze(0)?;
    let phase = (j.broadcast_add(&k)? * (2.0 * std::f64::consts::PI / d_in as f64))?;
    let target_w = (&w0 + (phase.cos()? * 0.02)?)?;

    let config = FourierFTConfig {
        n_frequency: 200,
        scaling: 150.0,
        init_weights: true,
        init_seed: Some(0),
        ..Default::default()
    };
    let layer = FourierLinear::new(base, &config)?;
    println!(
        "FourierLinear {}x{}: {} trainable coefficients, {} frozen parameters ({:.2}%)",
        d_out,
        d_in,
        layer.num_trainable(),
        layer.num_frozen(),
        100.0 * layer.num_trainable() as f64 / layer.num_frozen() as f64
    );

    let mut opt = candle_nn::AdamW::new(
        layer.trainable_vars(),
        ParamsAdamW {
            lr: 0.05,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let steps = 150;
    let bar = ProgressBar::new(steps);
    bar.set_style(ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}")?);
    for step in 0..steps {
        let x = Tensor::randn(0f32, 1.0, (batch, d_in), &dev)?;
        let y = x.matmul(&target_w.t()?)?;
        let loss = (layer.forward(&x)? - y)?.sqr()?.mean_all()?;
        opt.backward_step(&loss)?;
        if step % 10 == 0 || step + 1 == steps {
            bar.set_message(format!("loss {:.3e}", loss.to_scalar::<f32>()?));
        }
        bar.inc(1);
    }
    bar.finish();

    let x = Tensor::randn(0f32, 1.0, (8, d_in), &dev)?;
    let unmerged = layer.forward(&x)?;
    layer.merge()?;
    let merged = layer.forward(&x)?;
    let diff = (&merged - &unmerged)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    let scale = unmerged.abs()?.max_all()?.to_scalar::<f32>()?;
    println!("merged vs unmerged: max |diff| = {diff:.2e} (output scale {scale:.2e})");
    let w_diff = (layer.weight() - &w0)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    println!("merged weight moved from W0 by up to {w_diff:.3e}; W0 itself was never trained");
    anyhow::ensure!(
        diff <= 1e-5 * scale.max(1.0),
        "merged output differs from unmerged"
    );
    Ok(())
}
