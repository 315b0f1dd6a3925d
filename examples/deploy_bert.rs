//! Deploys a FourierFT adapter onto an UNMODIFIED candle-transformers `BertModel` (MiniLM-L6),
//! two ways, without touching the model's code:
//!
//! 1. at load time: `fourierft::backend::MergedBackend` is a `VarBuilder` backend that serves
//!    `W0 + ΔW` for the adapted weights to `BertModel::load`;
//! 2. offline: `fourierft merge` (here its library function `fourierft::peft::merge_safetensors`)
//!    writes a merged `model.safetensors` that any loader can use.
//!
//! Both give a plain model: inference costs exactly what the base model costs.
//!
//! Assets: `scripts/fetch-demo-assets.sh` writes MiniLM (`model.safetensors`, `config.json`,
//! `tokenizer.json`) to `target/demo-assets/`. Adapter: `--adapter DIR`, any PEFT FourierFT
//! directory for `sentence-transformers/all-MiniLM-L6-v2` (saved by PEFT, or by
//! `cargo run --release -p fourierft-demo --bin sentiment` (the demo), which writes `target/demo-out/fourierft-seed0` with
//! a sentiment head next to it); by default that one if it exists, else a random demo adapter
//! saved to `target/demo-out/deploy-demo-adapter`.
//!
//! `cargo run --release --example deploy_bert -- [--model-dir DIR] [--adapter DIR]`

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use clap::Parser;
use fourierft::backend::MergedBackend;
use fourierft::config::ModuleSelector;
use fourierft::peft::{merge_safetensors, PeftAdapter};
use fourierft::{FourierFTConfig, SpectralEntries};
use rand::SeedableRng;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Parser)]
#[command(about = "Deploy a FourierFT adapter onto candle-transformers' BertModel (MiniLM-L6)")]
struct Args {
    /// Folder with model.safetensors, config.json, tokenizer.json (scripts/fetch-demo-assets.sh).
    #[arg(long, default_value = "target/demo-assets")]
    model_dir: PathBuf,
    /// A PEFT FourierFT adapter directory (default: target/demo-out/fourierft-seed0 if present,
    /// else a random demo adapter).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The adapter's name (PEFT keeps non-default adapters in ADAPTER/NAME).
    #[arg(long, default_value = "default")]
    adapter_name: String,
    /// Prepended to the adapter's module paths to find MiniLM tensors.
    #[arg(long, default_value = "")]
    base_prefix: String,
    /// Use a random demo adapter even if a trained one exists.
    #[arg(long)]
    random: bool,
    /// Where the demo adapter and the merged checkpoint are written.
    #[arg(long, default_value = "target/demo-out")]
    out: PathBuf,
}

const SENTENCES: [&str; 6] = [
    "A gorgeous, moving film with a career-best performance at its heart.",
    "Sharp, funny and surprisingly tender; I loved every minute of it.",
    "An inventive thriller that keeps you guessing until the very end.",
    "A tedious, overlong mess that squanders a talented cast.",
    "The jokes fall flat and the plot makes no sense whatsoever.",
    "Dull, lifeless and instantly forgettable.",
];

fn main() -> Result<()> {
    let args = Args::parse();
    let dev = Device::Cpu;
    let files =
        ["model.safetensors", "config.json", "tokenizer.json"].map(|f| args.model_dir.join(f));
    if let Some(missing) = files.iter().find(|f| !f.exists()) {
        bail!(
            "{} not found: run scripts/fetch-demo-assets.sh first (or pass --model-dir)",
            missing.display()
        );
    }
    let [weights, config, tokenizer] = files;
    let config: Config = serde_json::from_str(&std::fs::read_to_string(&config)?)?;
    let adapter = adapter(&args, &config)?;
    let c = adapter.config();
    println!(
        "adapter: {} modules, {} coefficients (n_frequency {}, scaling {}, seed {})",
        adapter.spectra().len(),
        adapter.num_coefficients(),
        c.n_frequency,
        c.scaling,
        c.random_loc_seed
    );

    // The base model, and the same unmodified BertModel::load through the merging backend.
    let base_vb =
        VarBuilder::from_buffered_safetensors(std::fs::read(&weights)?, DType::F32, &dev)?;
    let t = Instant::now();
    let base = BertModel::load(base_vb.clone(), &config)?;
    let base_load = t.elapsed();
    let merged =
        MergedBackend::with_base_prefix(base_vb.clone(), adapter.clone(), &args.base_prefix);
    let t = Instant::now();
    let model = BertModel::load(merged.var_builder(), &config)?;
    let merged_load = t.elapsed();
    merged.check_all_used()?; // every adapted weight was requested by the model
    println!(
        "BertModel::load: base {:.0} ms, merged at load time {:.0} ms",
        base_load.as_secs_f64() * 1e3,
        merged_load.as_secs_f64() * 1e3
    );

    // One merged weight against W0 + ΔW computed independently from the entries.
    let (path, spectrum) = adapter.spectra().iter().next().context("empty adapter")?;
    let name = format!("{}{path}.weight", args.base_prefix);
    let h = config.hidden_size;
    let w0 = base_vb.get((h, h), &name)?;
    let entries = SpectralEntries::uniform(h, h, spectrum.elem_count(), c.random_loc_seed)?;
    let dw = fourierft::ops::delta_weight(&entries, spectrum, c.scaling)?;
    let served = merged.var_builder().get((h, h), &name)?;
    println!(
        "check {name}: |served - (W0 + ΔW)| max {:.2e}, |ΔW| max {:.3e}",
        max_abs(&(served - (&w0 + &dw)?)?)?,
        max_abs(&dw)?
    );

    // Route 2: the offline merge (what `fourierft merge` does), loaded like any checkpoint.
    std::fs::create_dir_all(&args.out)?;
    let merged_file = args.out.join("minilm-fourierft-merged.safetensors");
    let t = Instant::now();
    let summary = merge_safetensors(&weights, &adapter, &args.base_prefix, &merged_file)?;
    println!(
        "merge_safetensors: {} weights merged, {} tensors copied -> {} ({:.0} ms)",
        summary.merged.len(),
        summary.copied,
        merged_file.display(),
        t.elapsed().as_secs_f64() * 1e3
    );
    let offline_vb =
        VarBuilder::from_buffered_safetensors(std::fs::read(&merged_file)?, DType::F32, &dev)?;
    let offline = BertModel::load(offline_vb, &config)?;

    // Sentence embeddings (mean pooling, as all-MiniLM-L6-v2 does).
    let (ids, mask) = batch(&tokenizer, &dev)?;
    let types = ids.zeros_like()?;
    let embed = |m: &BertModel| -> Result<(Tensor, f64)> {
        let mut best = f64::INFINITY;
        let mut hidden = None;
        for _ in 0..3 {
            let t = Instant::now();
            hidden = Some(m.forward(&ids, &types, Some(&mask))?);
            best = best.min(t.elapsed().as_secs_f64());
        }
        let hidden = hidden.context("no forward")?;
        Ok((mean_pool(&hidden, &mask)?, best))
    };
    let (e_base, s_base) = embed(&base)?;
    let (e_merged, s_merged) = embed(&model)?;
    let (e_offline, _) = embed(&offline)?;
    println!(
        "forward of {} sentences (best of 3): base {:.1} ms, merged {:.1} ms (plain weights)",
        SENTENCES.len(),
        s_base * 1e3,
        s_merged * 1e3
    );
    println!(
        "load-time merge vs offline merge: max |Δ embedding| = {:.2e}",
        max_abs(&(&e_merged - &e_offline)?)?
    );
    let cos = cosine(&e_base, &e_merged)?;

    let head = adapter
        .source()
        .and_then(|p| p.parent())
        .map(|d| d.join("head.safetensors"));
    let head = match head {
        Some(p) if p.exists() => Some(candle_core::safetensors::load(&p, &dev)?),
        _ => None,
    };
    let p_fresh = |e: &Tensor| -> Result<Option<Vec<f32>>> {
        let Some(head) = &head else { return Ok(None) };
        let logits = e
            .matmul(&head["weight"].t()?)?
            .broadcast_add(&head["bias"])?;
        let p = candle_nn::ops::softmax(&logits, D::Minus1)?;
        Ok(Some(p.narrow(1, 1, 1)?.squeeze(1)?.to_vec1::<f32>()?))
    };
    let (p_base, p_adapted) = (p_fresh(&e_base)?, p_fresh(&e_merged)?);
    println!();
    for (i, s) in SENTENCES.iter().enumerate() {
        let probs = match (&p_base, &p_adapted) {
            (Some(b), Some(a)) => format!("P(fresh) base {:.2} -> adapted {:.2}  ", b[i], a[i]),
            _ => String::new(),
        };
        println!("cos(base, adapted) {:.4}  {probs}{s}", cos[i]);
    }
    if head.is_some() {
        println!("\n(head.safetensors: the sentiment head trained with this adapter by the sentiment example)");
    }
    Ok(())
}

/// The adapter to deploy: `--adapter`, else the sentiment example's, else a random demo one.
fn adapter(args: &Args, config: &Config) -> Result<PeftAdapter> {
    let trained = PathBuf::from("target/demo-out/fourierft-seed0");
    let dir = match &args.adapter {
        Some(dir) => Some(dir.clone()),
        None if !args.random && trained.join("adapter_config.json").exists() => Some(trained),
        None => None,
    };
    if let Some(dir) = dir {
        println!("adapter directory {}", dir.display());
        return Ok(PeftAdapter::load_named(&dir, &args.adapter_name)?);
    }
    // No trained adapter: random coefficients on every query and value, saved in PEFT's format.
    let cfg = FourierFTConfig {
        target_modules: Some(ModuleSelector::Names(vec!["query".into(), "value".into()])),
        n_frequency: 1000,
        scaling: 150.0,
        base_model_name_or_path: Some("sentence-transformers/all-MiniLM-L6-v2".into()),
        ..Default::default()
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let mut spectra = BTreeMap::new();
    for layer in 0..config.num_hidden_layers {
        for m in ["query", "value"] {
            let c: Vec<f32> = (0..cfg.n_frequency)
                .map(|_| rand_distr::Distribution::sample(&rand_distr::StandardNormal, &mut rng))
                .collect();
            let path = format!("encoder.layer.{layer}.attention.self.{m}");
            spectra.insert(path, Tensor::from_vec(c, cfg.n_frequency, &Device::Cpu)?);
        }
    }
    let adapter = PeftAdapter::new(cfg, spectra, BTreeMap::new())?;
    let dir = args.out.join("deploy-demo-adapter");
    adapter.save(&dir, "default")?;
    println!(
        "no trained adapter found (run the sentiment example, or pass --adapter): using random \
         coefficients, saved to {} (try `fourierft inspect {}`)",
        dir.display(),
        dir.display()
    );
    Ok(adapter)
}

/// Token ids and attention mask of SENTENCES, padded with 0.
fn batch(tokenizer: &Path, dev: &Device) -> Result<(Tensor, Tensor)> {
    let mut tok = tokenizers::Tokenizer::from_file(tokenizer).map_err(anyhow::Error::msg)?;
    tok.with_padding(None);
    let enc: Vec<Vec<u32>> = SENTENCES
        .iter()
        .map(|s| {
            Ok(tok
                .encode(*s, true)
                .map_err(anyhow::Error::msg)?
                .get_ids()
                .to_vec())
        })
        .collect::<Result<_>>()?;
    let len = enc.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(enc.len() * len);
    let mut mask = Vec::with_capacity(enc.len() * len);
    for e in &enc {
        for j in 0..len {
            ids.push(e.get(j).copied().unwrap_or(0));
            mask.push(if j < e.len() { 1f32 } else { 0.0 });
        }
    }
    Ok((
        Tensor::from_vec(ids, (enc.len(), len), dev)?,
        Tensor::from_vec(mask, (enc.len(), len), dev)?,
    ))
}

fn mean_pool(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let m = mask.unsqueeze(2)?;
    Ok(hidden
        .broadcast_mul(&m)?
        .sum(1)?
        .broadcast_div(&m.sum(1)?)?)
}

fn cosine(a: &Tensor, b: &Tensor) -> Result<Vec<f32>> {
    let dot = (a * b)?.sum(1)?;
    let norm = (a.sqr()?.sum(1)?.sqrt()? * b.sqr()?.sum(1)?.sqrt()?)?;
    Ok((dot / norm)?.to_vec1::<f32>()?)
}

fn max_abs(t: &Tensor) -> Result<f32> {
    Ok(t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}
