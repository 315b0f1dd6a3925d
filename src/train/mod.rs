//! Training a FourierFT adapter on an **unmodified** model (e.g. `candle_transformers`' `llama`,
//! `qwen2`, `bert`): no fork, no FourierFT code in the model.
//!
//! ```no_run
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder};
//! use candle_transformers::models::llama::{Cache, Llama, LlamaConfig};
//! use fourierft::{config::ModuleSelector, train::StockTrainer, FourierFTConfig};
//! # fn main() -> anyhow::Result<()> {
//! let dev = Device::Cpu;
//! let cfg: LlamaConfig = serde_json::from_str(&std::fs::read_to_string("config.json")?)?;
//! let cfg = cfg.into_config(false);
//! let base = unsafe { VarBuilder::from_mmaped_safetensors(&["model.safetensors"], DType::F32, &dev)? };
//! let trainer = StockTrainer::new(FourierFTConfig {
//!     target_modules: Some(ModuleSelector::Names(vec!["q_proj".into(), "v_proj".into()])),
//!     ..Default::default()
//! })?;
//! let model = Llama::load(trainer.var_builder(base), &cfg)?; // the stock model, built once
//! trainer.check()?; // matched something, shapes fit, gradients can reach the layers
//! let mut opt = AdamW::new(trainer.trainable_vars(), ParamsAdamW { lr: 1e-2, ..Default::default() })?;
//! # let (ids, target) = (Tensor::zeros((1, 8), DType::U32, &dev)?, Tensor::zeros(1, DType::U32, &dev)?);
//! let mut cache = Cache::new(false, DType::F32, &cfg, &dev)?;
//! let logits = model.forward(&ids, 0, &mut cache)?; // last position
//! let loss = candle_nn::loss::cross_entropy(&logits, &target)?;
//! trainer.backward_step(&mut opt, &loss)?; // dL/dW -> dL/dc, AdamW on c, W <- W0 + ΔW(c)
//! trainer.save_pretrained("adapter")?; // PEFT directory
//! # Ok(()) }
//! ```
//!
//! # Design: weights as `Var`s refreshed in place
//!
//! [`StockTrainer::var_builder`] wraps the base `VarBuilder` in a backend. For every weight whose
//! module the configuration targets it serves a [`Var`] holding `W0 + ΔW(c)`; every other tensor
//! is served as the base hands it out, detached (no gradient, no copy). The model is built
//! **once** — caches, rotary tables and all — and trains like any candle model: its forward is
//! the stock forward with plain weights. After `loss.backward()`,
//! [`backward`](StockTrainer::backward) turns each adapted weight's `dL/dW` into `dL/dc` with
//! the pruned-FFT gradient (`spectral::fft::delta_weight_grad`: no dense spectrum),
//! replacing `dL/dW` in the gradient store; the optimizer steps the spectra `c`; and
//! [`sync`](StockTrainer::sync) writes the new weights into the `Var`s with `Var::set` as
//! `W += ΔW(c_new − c_applied)` (ΔW is linear in c), so `W0` needs no second copy.
//!
//! The alternative, a backend that hands the model `W0 + ΔW(c)` as an autograd-graph tensor and
//! a model rebuilt every step, does the same arithmetic (the matmul backward forms `dL/dW`
//! either way, and the delta-weight op's backward is the same pruned FFT), plus an add node per
//! adapted weight per step (a fresh `d1×d2` weight, and a backward that zero-fills a gradient for
//! `W0` as well). Measured on the stock Llama of `examples/finetune_llama.rs --bench` (hidden
//! 1024, 8 layers, 512 tokens, q/v adapted, n = 1000; 2 shared cores, one run after the other,
//! before the patched candle-nn `Linear` stopped forming frozen weights' gradients):
//! graph tensors 18.8 s / 3745 MB peak RSS per step, `Var`s refreshed in place 17.5 s / 3719 MB.
//! Rebuilding the model is cheap (`Llama::load` from a `VarMap`: 0.1 ms), but it also rebuilds
//! caches every step, and any backend error at a rebuild panics inside models whose `load`
//! unwraps (candle-transformers' `Llama::load`). Refreshing in place keeps the stock training
//! loop: build once, `backward_step` after each loss.
//!
//! # Memory (per adapted layer with `n` coefficients, `d1×d2` weight)
//!
//! - state kept: the spectrum `c` (`4n` bytes), the coefficients currently in the weight
//!   (`4n`), the entry positions (`8n`, shared by layers of the same shape and seed); the
//!   optimizer adds its moments (`8n` for AdamW). `W0` is not copied: the `Var` *is* the
//!   weight (the base `VarBuilder`'s own tensor is not kept).
//! - transient per step: `dL/dW` (`4·d1·d2`, formed by candle's matmul backward and dropped in
//!   [`backward`](StockTrainer::backward)) and, in [`sync`](StockTrainer::sync), `ΔW` and the new
//!   weight (`2 × 4·d1·d2`, one layer per rayon thread: the layers are converted and
//!   refreshed in parallel).
//!
//! Rounding: `W` accumulates one f32 rounding of `ΔW(Δc)` per step (relative ~1e-7 each);
//! [`unmerge`](StockTrainer::unmerge) gives back `W0` to that accuracy.
//!
//! # candle-nn's fused ops
//!
//! Stock candle-transformers models call `candle_nn::ops::softmax_last_dim`, the fused
//! `rms_norm` / `layer_norm` and `rotary_emb::rope`. In candle-nn 0.11 these record no backward
//! op, so no gradient reaches any layer below them. This repository patches candle-nn
//! (`vendor/candle-nn`, `[patch.crates-io]` in `Cargo.toml`; upstream PRs #3526, #3724, #3823);
//! a project using this module needs the same patch. Without it [`check`](StockTrainer::check)
//! and [`backward`](StockTrainer::backward) return an error — a layer is never left untrained
//! silently. The patch also makes `candle_nn::Linear` with a frozen weight form only `dL/dx` in
//! the backward: candle-core's matmul backward would form, and keep until `backward` returns, a
//! `dL/dW` for every frozen weight (on the stock Llama above: 1.4 GB of peak memory and a third
//! of the backward's GEMM work).
//!
//! # Errors
//!
//! The backend never fails a model's `load` for adapter reasons (some models unwrap inside
//! `load`): it serves the base weight unadapted, records the problem, and
//! [`check`](StockTrainer::check) — and every later training call — returns it as a typed
//! [`Error`] naming the module: a configuration that matched no weight the model asked for, a
//! targeted weight that cannot be adapted (not 2-D, not f32, fewer elements than `n`, a loaded
//! spectrum of another length, the same module asked for with two shapes), or a loaded adapter
//! whose modules the model never loaded.

mod serving;
mod step;

use serving::{supported, TrainBackend};
use step::add_delta;

use crate::config::FourierFTConfig;
use crate::error::{Error, Result};
use crate::layer::{LayerAdapter, DEFAULT_ADAPTER};
use crate::peft::{ModuleMatcher, PeftAdapter};
use crate::sync::lock;
use candle_core::{Tensor, Var};
use candle_nn::VarBuilder;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// A FourierFT adapter trained on an unmodified model: a [`VarBuilder`] backend serving adapted
/// weights as [`Var`]s, plus the spectra, the gradient conversion and the weight refresh. See the
/// [module docs](self).
///
/// A cheap shared handle (clones share everything).
#[derive(Debug, Clone)]
pub struct StockTrainer {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    name: String,
    matcher: ModuleMatcher,
    loaded: Option<Arc<PeftAdapter>>,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    layers: BTreeMap<String, TrainedLayer>,
    /// Names of the 2-D tensors the model asked for (for "nothing matched" messages).
    requested: Vec<String>,
    /// The first problem met while serving weights.
    error: Option<Error>,
    /// Whether the weights hold `W0` (after [`StockTrainer::unmerge`]).
    unmerged: bool,
}

#[derive(Debug)]
struct TrainedLayer {
    weight_name: String,
    weight: Var,
    adapter: LayerAdapter,
    /// The coefficients whose ΔW the weight holds (when merged).
    applied: Vec<f32>,
}

/// A copy of an error recorded by the backend (the crate's errors are not `Clone`).
fn copy_error(e: &Error) -> Error {
    match e {
        Error::Shape {
            what,
            expected,
            found,
        } => Error::Shape {
            what: what.clone(),
            expected: expected.clone(),
            found: found.clone(),
        },
        Error::DType {
            what,
            expected,
            found,
        } => Error::DType {
            what: what.clone(),
            expected: expected.clone(),
            found: *found,
        },
        Error::EntryCount {
            context,
            n,
            max,
            d1,
            d2,
        } => Error::EntryCount {
            context: context.clone(),
            n: *n,
            max: *max,
            d1: *d1,
            d2: *d2,
        },
        Error::File { path, message } => Error::File {
            path: path.clone(),
            message: message.clone(),
        },
        other => Error::Config(other.to_string()),
    }
}

impl StockTrainer {
    /// A new adapter named `"default"` with `config` (coefficients initialised per
    /// `init_weights` / `init_seed`, as [`FourierLinear::add_adapter`](crate::FourierLinear::add_adapter) does).
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid configuration, one without `target_modules`, or one
    /// asking for what stock models cannot train here: `fan_in_fan_out` (GPT-2 `Conv1D`
    /// weights), trained biases (`bias != "none"`) or `modules_to_save`.
    pub fn new(config: FourierFTConfig) -> Result<Self> {
        Self::with_name(DEFAULT_ADAPTER, config)
    }

    /// Like [`new`](Self::new), with adapter name `name` (its subdirectory when saved, as in
    /// PEFT).
    pub fn with_name(name: &str, config: FourierFTConfig) -> Result<Self> {
        supported(&config)?;
        Ok(Self::build(name, ModuleMatcher::new(&config)?, None))
    }

    /// Continues training the adapter saved in PEFT directory `dir` (named `"default"`).
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        Self::from_adapter(DEFAULT_ADAPTER, PeftAdapter::load(dir)?)
    }

    /// Continues training `adapter` (its spectra are the starting point), named `name`.
    ///
    /// # Errors
    /// As [`new`](Self::new); [`Error::Config`] when the adapter carries extra tensors (trained
    /// biases, `modules_to_save`), which this trainer does not train.
    pub fn from_adapter(name: &str, adapter: PeftAdapter) -> Result<Self> {
        supported(adapter.config())?;
        if let Some(extra) = adapter.extra_tensors().keys().next() {
            return Err(Error::Config(format!(
                "{}: extra tensor {extra:?} (trained bias or modules_to_save) is not supported \
                 by fourierft::train",
                adapter
                    .source()
                    .map_or("adapter".into(), |p| p.display().to_string())
            )));
        }
        let matcher = adapter.matcher().clone();
        Ok(Self::build(name, matcher, Some(Arc::new(adapter))))
    }

    fn build(name: &str, matcher: ModuleMatcher, loaded: Option<Arc<PeftAdapter>>) -> Self {
        Self {
            inner: Arc::new(Inner {
                name: name.to_string(),
                matcher,
                loaded,
                state: Mutex::default(),
            }),
        }
    }

    /// A [`VarBuilder`] over `base` (dtype, device and prefix are `base`'s) that serves the
    /// weights of targeted modules as trainable `W0 + ΔW(c)` and everything else detached.
    /// Module paths are the tensor names without `.weight` (e.g.
    /// `model.layers.0.self_attn.q_proj`), as in PEFT adapters of the same HF model.
    pub fn var_builder<'a>(&self, base: VarBuilder<'a>) -> VarBuilder<'a> {
        crate::serve::var_builder(&base, |root| TrainBackend {
            base: root,
            trainer: self.clone(),
        })
    }

    /// The adapter's name.
    pub fn adapter_name(&self) -> &str {
        &self.inner.name
    }

    /// The adapter configuration.
    pub fn config(&self) -> &FourierFTConfig {
        self.inner.matcher.config()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.inner.state)
    }

    /// Paths of the adapted modules, sorted.
    pub fn layer_paths(&self) -> Vec<String> {
        self.state().layers.keys().cloned().collect()
    }

    /// The spectra of every adapted module, sorted by path: the parameters to give the
    /// optimizer.
    pub fn trainable_vars(&self) -> Vec<Var> {
        self.state()
            .layers
            .values()
            .map(|l| l.adapter.spectrum().clone())
            .collect()
    }

    /// The adapted modules' weights (`<path>.weight` → the model's `Var`, holding `W0 + ΔW`
    /// while merged).
    pub fn weights(&self) -> Vec<(String, Tensor)> {
        self.state()
            .layers
            .values()
            .map(|l| (l.weight_name.clone(), l.weight.as_tensor().detach()))
            .collect()
    }

    /// Number of trainable coefficients over all modules.
    pub fn num_trainable(&self) -> usize {
        self.state().layers.values().map(|l| l.applied.len()).sum()
    }

    /// Bytes of training state this adapter keeps for the module at `path` (spectrum, applied
    /// coefficients and entry positions; see the [module docs](self#memory-per-adapted-layer-with-n-coefficients-d1d2-weight)),
    /// or `None` when it is not adapted.
    pub fn state_bytes(&self, path: &str) -> Option<usize> {
        self.state().layers.get(path).map(|l| 16 * l.applied.len())
    }

    /// Puts `ΔW(c)` (current spectra) back into the weights after [`unmerge`](Self::unmerge).
    /// The model built through this trainer runs merged weights from the start, so on a merged
    /// trainer this only syncs: after training the model *is* the merged model (export it with
    /// [`weights`](Self::weights)).
    ///
    /// # Errors
    /// [`Error::Config`] etc. as [`check`](Self::check) when no module was adapted.
    pub fn merge(&self) -> Result<()> {
        {
            let mut st = self.state();
            self.check_state(&st)?;
            if st.unmerged {
                for layer in st.layers.values_mut() {
                    let c = layer.adapter.spectrum().as_tensor().to_vec1::<f32>()?;
                    add_delta(layer, &c)?;
                    layer.applied = c;
                }
                st.unmerged = false;
                return Ok(());
            }
        }
        self.sync()
    }

    /// Takes `ΔW` out of every adapted weight: the model runs the base weights `W0` (to the
    /// rounding of the in-place updates). Training calls fail until [`merge`](Self::merge).
    pub fn unmerge(&self) -> Result<()> {
        let mut st = self.state();
        self.check_state(&st)?;
        if st.unmerged {
            return Ok(());
        }
        for layer in st.layers.values_mut() {
            let neg: Vec<f32> = layer.applied.iter().map(|x| -x).collect();
            add_delta(layer, &neg)?;
        }
        st.unmerged = true;
        Ok(())
    }

    /// Whether the weights hold `W0 + ΔW` (true unless [`unmerge`](Self::unmerge)d).
    pub fn is_merged(&self) -> bool {
        !self.state().unmerged
    }

    /// The adapter as it is now: the configuration and every module's current spectrum.
    pub fn to_adapter(&self) -> Result<PeftAdapter> {
        let st = self.state();
        self.check_state(&st)?;
        let spectra = st
            .layers
            .iter()
            .map(|(p, l)| (p.clone(), l.adapter.spectrum().as_tensor().detach()))
            .collect();
        PeftAdapter::new(self.config().clone(), spectra, BTreeMap::new())
    }

    /// Saves the adapter as a PEFT directory under `root` (adapter `"default"` in `root`, others
    /// in `root/<name>`), loadable by `PeftModel.from_pretrained`. Returns the directory.
    pub fn save_pretrained(&self, root: impl AsRef<Path>) -> Result<PathBuf> {
        self.to_adapter()?.save(root, &self.inner.name)
    }
}
