//! The sentiment demo's encoder on the real MiniLM-L6 (target/demo-assets, fetched by
//! scripts/fetch-demo-assets.sh): agreement with candle-transformers' BertModel, and a few
//! FourierFT training steps (the loss falls, only the coefficients and the head change, merged
//! and unmerged logits agree). The encoder's ops without assets: tests/ops.rs.
//!
//! These tests need the assets, so they are ignored by default: run them with
//! `cargo test -p fourierft-demo --test minilm -- --include-ignored` (README's test command and
//! CI do) after scripts/fetch-demo-assets.sh. Without the assets they fail, naming the script.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder};
use fourierft_demo::{self as bert, Adapter, Encoder};
use std::path::{Path, PathBuf};

const FILES: [&str; 4] = [
    "model.safetensors",
    "config.json",
    "tokenizer.json",
    "rotten_tomatoes.jsonl",
];

/// The assets folder (`FOURIERFT_DEMO_ASSETS`, else the workspace's target/demo-assets, where
/// the fetch script writes them); a panic naming the fetch script when a file is missing.
fn assets() -> PathBuf {
    let dir = std::env::var_os("FOURIERFT_DEMO_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/demo-assets"));
    let missing: Vec<&str> = FILES
        .iter()
        .copied()
        .filter(|f| !dir.join(f).is_file())
        .collect();
    assert!(
        missing.is_empty(),
        "MiniLM demo assets missing in {} ({}): run scripts/fetch-demo-assets.sh",
        dir.display(),
        missing.join(", ")
    );
    dir
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

const SENTENCES: [&str; 4] = [
    "A gorgeous, witty, seductive movie.",
    "The plot is paper-thin and the jokes fall flat, which makes two hours feel like four.",
    "Meh.",
    "An exhilarating, moving and often very funny film that never forgets its characters.",
];

fn batch(dir: &Path, texts: &[&str]) -> Result<(Tensor, Tensor)> {
    let tok = bert::tokenizer(&dir.join("tokenizer.json"), 128)?;
    let ids = bert::encode(&tok, texts)?;
    let seqs: Vec<&[u32]> = ids.iter().map(|v| v.as_slice()).collect();
    bert::pad_batch(&seqs, &Device::Cpu)
}

#[test]
#[ignore = "needs demo assets (scripts/fetch-demo-assets.sh)"]
fn encoder_matches_candle_transformers_bert() -> Result<()> {
    let dir = assets();
    let (ids, mask) = batch(&dir, &SENTENCES)?;
    let lens: Vec<usize> = mask
        .sum(1)?
        .to_vec1::<f32>()?
        .iter()
        .map(|&l| l as usize)
        .collect();
    assert!(
        lens.iter().min() < lens.iter().max(),
        "the batch needs padding"
    );

    let cfg: candle_transformers::models::bert::Config =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
    // SAFETY: the asset file is not modified while mapped.
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )?
    };
    let reference = candle_transformers::models::bert::BertModel::load(vb, &cfg)?;
    let want = reference.forward(&ids, &ids.zeros_like()?, Some(&mask))?;
    let want_pooled = bert::mean_pool(&want, &mask)?;

    // Plain, FourierFT with zero coefficients and LoRA with B = 0 all compute the base model.
    let fourier = fourierft::FourierFTConfig {
        init_weights: true,
        ..Default::default()
    };
    let lora = bert::LoraConfig {
        r: 8,
        alpha: 8.0,
        seed: 0,
    };
    for adapter in [
        Adapter::None,
        Adapter::FourierFT(Box::new(fourier)),
        Adapter::Lora(lora),
    ] {
        let enc = Encoder::from_dir(&dir, &adapter)?;
        let got = enc.forward(&ids, &mask)?;
        // Hidden states at real tokens (padding positions are never used).
        for (b, &len) in lens.iter().enumerate() {
            let d = max_abs_diff(
                &got.get(b)?.narrow(0, 0, len)?,
                &want.get(b)?.narrow(0, 0, len)?,
            )?;
            assert!(d < 2e-4, "{adapter:?}: sentence {b} differs by {d}");
        }
        let d = max_abs_diff(&bert::mean_pool(&got, &mask)?, &want_pooled)?;
        assert!(d < 1e-4, "{adapter:?}: pooled embeddings differ by {d}");
    }
    // Sanity: the embeddings separate the sentences (cosine of a positive and a negative review).
    let e = want_pooled.to_vec2::<f32>()?;
    let cos = |a: &[f32], b: &[f32]| {
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let n = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        dot / (n(a) * n(b))
    };
    assert!(cos(&e[0], &e[3]) > cos(&e[0], &e[1]));
    Ok(())
}

#[test]
#[ignore = "needs demo assets (scripts/fetch-demo-assets.sh)"]
fn fourierft_training_changes_only_coefficients_and_head() -> Result<()> {
    let dir = assets();
    let dev = Device::Cpu;
    // 16 labelled snippets from the corpus.
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("rotten_tomatoes.jsonl"))?
        .lines()
        .take(16)
        .map(serde_json::from_str)
        .collect::<std::result::Result<_, _>>()?;
    let texts: Vec<&str> = rows.iter().map(|r| r["text"].as_str().unwrap()).collect();
    let labels: Vec<u32> = rows
        .iter()
        .map(|r| r["label"].as_u64().unwrap() as u32)
        .collect();
    assert!(labels.contains(&0) && labels.contains(&1));
    let labels = Tensor::new(labels, &dev)?;
    let (ids, mask) = batch(&dir, &texts)?;

    let cfg = fourierft::FourierFTConfig {
        n_frequency: 1000,
        scaling: 150.0,
        init_weights: true,
        ..Default::default()
    };
    let enc = Encoder::from_dir(&dir, &Adapter::FourierFT(Box::new(cfg)))?;
    assert_eq!(enc.fourier_layers().len(), 12);
    assert_eq!(enc.num_trainable(), 12_000);
    let weights_before = enc.named_weights()?;
    // Every weight the encoder uses is the file's.
    let file = candle_core::safetensors::load(dir.join("model.safetensors"), &dev)?;
    for (name, w) in &weights_before {
        let f = file
            .get(name)
            .unwrap_or_else(|| panic!("{name} not in the file"));
        assert_eq!(max_abs_diff(w, f)?, 0.0, "{name}");
    }
    // All but embeddings.position_ids and the unused pooler (pooler.dense.{weight,bias}).
    assert_eq!(weights_before.len(), file.len() - 3);

    let head_w = Var::zeros((2, 384), DType::F32, &dev)?;
    let head_b = Var::zeros(2, DType::F32, &dev)?;
    let logits = |enc: &Encoder| -> Result<Tensor> {
        Ok(enc
            .embed(&ids, &mask)?
            .matmul(&head_w.as_tensor().t()?)?
            .broadcast_add(head_b.as_tensor())?)
    };
    let loss_of = |l: &Tensor| -> Result<f32> {
        Ok(candle_nn::loss::cross_entropy(l, &labels)?.to_scalar::<f32>()?)
    };
    let params = |lr| ParamsAdamW {
        lr,
        weight_decay: 0.0,
        ..Default::default()
    };
    let spectra = enc.trainable_vars();
    let mut opt_c = AdamW::new(spectra.clone(), params(5e-2))?;
    let mut opt_head = AdamW::new(vec![head_w.clone(), head_b.clone()], params(1e-2))?;
    let loss0 = loss_of(&logits(&enc)?)?;
    assert!(
        (loss0 - std::f32::consts::LN_2).abs() < 1e-5,
        "zero head: loss ln 2"
    );
    for _ in 0..8 {
        let loss = candle_nn::loss::cross_entropy(&logits(&enc)?, &labels)?;
        let grads = loss.backward()?;
        for c in &spectra {
            let g = grads
                .get(c.as_tensor())
                .expect("every spectrum gets a gradient");
            assert_eq!(g.dims(), c.dims());
        }
        opt_c.step(&grads)?;
        opt_head.step(&grads)?;
    }
    let trained = logits(&enc)?;
    let loss1 = loss_of(&trained)?;
    assert!(loss1 < loss0 - 0.05, "loss {loss0} -> {loss1}");

    // Only the coefficients and the head changed.
    for c in &spectra {
        assert!(c.as_tensor().abs()?.max(0)?.to_scalar::<f32>()? > 0.0);
    }
    assert!(head_w.as_tensor().abs()?.max_all()?.to_scalar::<f32>()? > 0.0);
    for ((name, before), (_, after)) in weights_before.iter().zip(enc.named_weights()?) {
        assert_eq!(max_abs_diff(before, &after)?, 0.0, "{name} changed");
    }
    // The coefficients matter: without them (adapters disabled) the logits differ.
    for (_, l) in enc.fourier_layers() {
        l.disable_adapters()?;
    }
    let base_only = logits(&enc)?;
    for (_, l) in enc.fourier_layers() {
        l.enable_adapters();
    }
    assert!(max_abs_diff(&base_only, &trained)? > 1e-3);

    // Merged and unmerged logits agree; unmerging restores W0.
    enc.merge()?;
    assert!(enc.fourier_layers().iter().all(|(_, l)| l.is_merged()));
    let merged = logits(&enc)?;
    let scale = trained.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
    let d = max_abs_diff(&merged, &trained)?;
    assert!(d < 1e-4 * scale, "merged logits differ by {d}");
    enc.unmerge()?;
    for ((name, before), (_, after)) in weights_before.iter().zip(enc.named_weights()?) {
        let d = max_abs_diff(before, &after)?;
        assert!(d < 1e-6, "{name} differs by {d} after unmerge");
    }
    Ok(())
}
