//! One training run per (method, seed): head only on cached embeddings, or LoRA / FourierFT on
//! query and value trained with the head; evaluation and saving the FourierFT adapter.

use anyhow::{bail, ensure, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use fourierft::config::ModuleSelector;
use fourierft::peft::PeftAdapter;
use fourierft::FourierFTConfig;
use fourierft_demo::run::{lr_at, process_cpu_s, progress_bar as bar};
use fourierft_demo::{profile, Adapter, Encoder, LoraConfig};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Instant;

use crate::data::{batch_tensors, epoch_batches, eval_batches, Example};
use crate::{Args, FourierInit, FourierMode, Method};

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
pub(crate) struct RunResult {
    pub(crate) method: String,
    pub(crate) seed: u64,
    pub(crate) adapter_params: usize,
    pub(crate) accuracy: f64,
    pub(crate) train_s: f64,
    pub(crate) step_ms: f64,
    /// CPU time of the whole process per step (all threads): the work, robust to other load.
    pub(crate) step_cpu_ms: f64,
    pub(crate) steps: usize,
}

/// Head only: embeddings of the frozen encoder are computed once; the head trains on them.
pub(crate) fn run_head_only(
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

pub(crate) fn embed_all(
    enc: &Encoder,
    data: &[Example],
    batch: usize,
    msg: &str,
) -> Result<Tensor> {
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
pub(crate) fn run_adapter(
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
    profile::reset();
    profile::enable(args.profile);
    for epoch in 0..args.epochs {
        let mut epoch_steps = 0;
        for b in epoch_batches(&lens, args.batch, seed, epoch) {
            let (t, cpu) = (Instant::now(), process_cpu_s());
            let (ids, mask, labels) = batch_tensors(train, &b, &dev)?;
            let loss = profile::time("step: forward (all)", || -> Result<Tensor> {
                let logits = head.forward(&enc.embed(&ids, &mask)?)?;
                Ok(candle_nn::loss::cross_entropy(&logits, &labels)?)
            })?;
            let grads = profile::time("step: backward (all)", || loss.backward())?;
            profile::time("optimizer (AdamW)", || -> Result<()> {
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
        if profile::enabled() {
            profile::enable(false);
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
                    profile::report(epoch_steps)
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
