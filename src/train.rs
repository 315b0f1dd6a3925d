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
//! 1024, 8 layers, 512 tokens, q/v adapted, n = 1000; 2 shared cores, one run after the other):
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
//!   weight (`2 × 4·d1·d2`, one layer at a time).
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
//! silently.
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

use crate::config::{shown_selector, Bias, FourierFTConfig};
use crate::error::{dims_str, Error, Result};
use crate::layer::{FourierLinear, LayerAdapter, DEFAULT_ADAPTER};
use crate::ops::DeltaWeight;
use crate::peft::{ModuleMatcher, PeftAdapter};
use crate::serve::{Request, Serve};
use crate::spectral::fft;
use crate::sync::lock;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, VarBuilder};
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
    /// `init_weights` / `init_seed`, as [`FourierLinear::add_adapter`] does).
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

    /// Serves base tensor `name`: adapted when its module is targeted.
    fn serve(&self, name: &str, t: Tensor) -> Tensor {
        let mut st = self.state();
        if t.rank() == 2 {
            st.requested.push(name.to_string());
        }
        let Some(path) = name.strip_suffix(".weight") else {
            return t.detach();
        };
        if !self.inner.matcher.is_target(path) {
            return t.detach();
        }
        match self.adapt(&mut st, path, name, &t) {
            Ok(w) => w,
            Err(e) => {
                if st.error.is_none() {
                    st.error = Some(e);
                }
                t.detach()
            }
        }
    }

    fn adapt(&self, st: &mut State, path: &str, name: &str, w0: &Tensor) -> Result<Tensor> {
        if let Some(layer) = st.layers.get(path) {
            if layer.weight.dims() != w0.dims() {
                return Err(Error::Shape {
                    what: format!("{path}: adapted weight {name:?} asked for again"),
                    expected: dims_str(layer.weight.dims()),
                    found: dims_str(w0.dims()),
                });
            }
            return Ok(layer.weight.as_tensor().clone());
        }
        if w0.rank() != 2 {
            return Err(Error::Shape {
                what: format!("{path}: targeted weight {name:?} (FourierFT adapts linear layers)"),
                expected: "a 2-D (out_features, in_features) matrix".into(),
                found: dims_str(w0.dims()),
            });
        }
        if w0.dtype() != DType::F32 {
            return Err(Error::DType {
                what: format!("{path}: adapted weight {name:?} (load the base in f32 to train)"),
                expected: "f32".into(),
                found: w0.dtype(),
            });
        }
        let config = FourierFTConfig {
            n_frequency: self.inner.matcher.n_frequency(path),
            fan_in_fan_out: false,
            ..self.config().clone()
        };
        let adapter_name = &self.inner.name;
        let layer = FourierLinear::from_parts(w0.clone(), None, false)?.with_name(path);
        match &self.inner.loaded {
            Some(adapter) => {
                let spectrum = adapter
                    .spectrum(path)
                    .ok_or_else(|| adapter.missing_spectrum(path, ""))?;
                if spectrum.dims() != [config.n_frequency] {
                    return Err(Error::Shape {
                        what: format!(
                            "{path}: saved fourierft_spectrum for the {:?} weight",
                            w0.dims()
                        ),
                        expected: format!("[{}]", config.n_frequency),
                        found: dims_str(spectrum.dims()),
                    });
                }
                layer.add_adapter(
                    adapter_name,
                    &FourierFTConfig {
                        init_weights: true,
                        ..config
                    },
                )?;
                layer.set_spectrum(adapter_name, spectrum)?;
            }
            None => layer.add_adapter(adapter_name, &config)?,
        }
        let adapter = layer.adapter(adapter_name)?;
        let applied = adapter.spectrum().as_tensor().to_vec1::<f32>()?;
        let w = (w0.detach() + adapter.delta_weight()?.to_device(w0.device())?)?;
        let weight = Var::from_tensor(&w)?;
        let served = weight.as_tensor().clone();
        st.layers.insert(
            path.to_string(),
            TrainedLayer {
                weight_name: name.to_string(),
                weight,
                adapter,
                applied,
            },
        );
        Ok(served)
    }

    /// Checks the model built through [`var_builder`](Self::var_builder): nothing went wrong
    /// while serving weights, the configuration matched at least one weight, a loaded adapter's
    /// modules were all loaded, and gradients can flow through candle-nn's fused ops. Call it
    /// once the model is built; the training calls repeat the first three checks.
    ///
    /// # Errors
    /// The recorded serving error ([`Error::Shape`], [`Error::DType`], [`Error::EntryCount`],
    /// [`Error::File`] naming the module); [`Error::Config`] when nothing matched (listing some
    /// weights the model asked for) or when candle-nn's fused ops have no backward;
    /// [`Error::File`] naming a module of a loaded adapter the model never loaded.
    pub fn check(&self) -> Result<()> {
        self.check_state(&self.state())?;
        fused_ops_have_backward()
    }

    fn check_state(&self, st: &State) -> Result<()> {
        if let Some(e) = &st.error {
            return Err(copy_error(e));
        }
        if st.layers.is_empty() {
            let shown: Vec<&String> = st.requested.iter().take(8).collect();
            return Err(Error::Config(format!(
                "target_modules {} matched none of the {} weight matrices the model asked for \
                 (e.g. {shown:?})",
                shown_selector(self.config().target_modules.as_ref()),
                st.requested.len()
            )));
        }
        if let Some(adapter) = &self.inner.loaded {
            if let Some(path) = adapter
                .spectra()
                .keys()
                .find(|p| !st.layers.contains_key(*p))
            {
                return Err(Error::File {
                    path: adapter
                        .source()
                        .map_or_else(|| PathBuf::from("adapter"), Path::to_path_buf),
                    message: format!(
                        "module {path:?} has a saved spectrum but the model never loaded \
                         \"{path}.weight\"; the adapter does not fit this model"
                    ),
                });
            }
        }
        Ok(())
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

    /// `loss.backward()` with each adapted weight's gradient turned into its spectrum's: the
    /// returned store holds `dL/dc` for every spectrum (and no `dL/dW`), ready for
    /// [`Optimizer::step`]. Call [`sync`](Self::sync) after the step.
    ///
    /// # Errors
    /// Those of [`check`](Self::check) (without the fused-op probe); [`Error::MergeState`] when
    /// unmerged or when a spectrum changed since [`sync`](Self::sync); [`Error::Config`] naming
    /// a module no gradient reached (e.g. an unpatched candle-nn).
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        let st = self.state();
        self.ready(&st)?;
        let mut grads = loss.backward()?;
        for (path, layer) in &st.layers {
            let Some(g) = grads.remove(layer.weight.as_tensor()) else {
                return Err(Error::Config(format!(
                    "{path}: no gradient reached {:?}; the loss does not depend on it, or the \
                     model's forward goes through an op without backward (candle-nn 0.11's fused \
                     softmax_last_dim / rms_norm / layer_norm / rope: see fourierft::train)",
                    layer.weight_name
                )));
            };
            let dc = coeff_grad(&layer.adapter, &g)?;
            grads.insert(layer.adapter.spectrum().as_tensor(), dc);
        }
        Ok(grads)
    }

    fn ready(&self, st: &State) -> Result<()> {
        self.check_state(st)?;
        if st.unmerged {
            return Err(Error::MergeState {
                what: format!("adapter {:?}", self.inner.name),
                message: "unmerged: the model runs W0; merge() before training".into(),
            });
        }
        for (path, layer) in &st.layers {
            if layer.adapter.spectrum().as_tensor().to_vec1::<f32>()? != layer.applied {
                return Err(Error::MergeState {
                    what: path.clone(),
                    message: "the spectrum changed since its weight was written; call sync() \
                              after the optimizer step"
                        .into(),
                });
            }
        }
        Ok(())
    }

    /// Writes `W0 + ΔW(c)` for the current spectra into the model's weights (`Var::set`), for
    /// the modules whose spectrum changed. A no-op while unmerged ([`merge`](Self::merge)
    /// writes them then).
    pub fn sync(&self) -> Result<()> {
        let mut st = self.state();
        if st.unmerged {
            return Ok(());
        }
        for layer in st.layers.values_mut() {
            let c = layer.adapter.spectrum().as_tensor().to_vec1::<f32>()?;
            if c != layer.applied {
                let delta: Vec<f32> = c.iter().zip(&layer.applied).map(|(a, b)| a - b).collect();
                add_delta(layer, &delta)?;
                layer.applied = c;
            }
        }
        Ok(())
    }

    /// [`backward`](Self::backward), `opt.step`, [`sync`](Self::sync): one training step.
    pub fn backward_step<O: Optimizer>(&self, opt: &mut O, loss: &Tensor) -> Result<()> {
        let grads = self.backward(loss)?;
        opt.step(&grads)?;
        self.sync()
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

/// Rejects configurations this trainer cannot honour on stock models.
fn supported(config: &FourierFTConfig) -> Result<()> {
    if config.fan_in_fan_out {
        return Err(Error::Config(
            "fan_in_fan_out (GPT-2 Conv1D weights stored (in, out)) is not supported by \
             fourierft::train; use fourierft::inject::conv1d in the model"
                .into(),
        ));
    }
    if config.bias != Bias::None {
        return Err(Error::Config(format!(
            "bias {:?}: fourierft::train trains only the spectra (bias \"none\")",
            config.bias
        )));
    }
    if config
        .modules_to_save
        .as_ref()
        .is_some_and(|m| !m.is_empty())
    {
        return Err(Error::Config(
            "modules_to_save is not supported by fourierft::train".into(),
        ));
    }
    Ok(())
}

/// `W += ΔW(delta)` in place.
fn add_delta(layer: &TrainedLayer, delta: &[f32]) -> Result<()> {
    let w = layer.weight.as_tensor();
    let entries = layer.adapter.entries();
    let scaling = layer.adapter.scaling();
    let new = if w.device().is_cpu() {
        let base = w.flatten_all()?.to_vec1::<f32>()?;
        let v = fft::add_delta_weight(entries, delta, scaling, &base)?;
        Tensor::from_vec(v, w.shape(), w.device())?
    } else {
        let d = Tensor::from_slice(delta, delta.len(), w.device())?;
        (w + DeltaWeight::new(entries.clone()).forward(&d, scaling)?)?
    };
    layer.weight.set(&new)?;
    Ok(())
}

/// `dL/dc` from `dL/dW` (the pruned-FFT gradient of ΔW).
fn coeff_grad(adapter: &LayerAdapter, g: &Tensor) -> Result<Tensor> {
    let spectrum = adapter.spectrum().as_tensor();
    if g.device().is_cpu() {
        let gv = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let dc = fft::delta_weight_grad(adapter.entries(), &gv, adapter.scaling())?;
        return Ok(Tensor::from_vec(dc, dc_len(adapter), spectrum.device())?);
    }
    // Other devices: the delta-weight op's own backward, through a proxy `Σ ΔW ∘ g`.
    let c = Var::from_tensor(spectrum)?;
    let dw =
        DeltaWeight::new(adapter.entries().clone()).forward(c.as_tensor(), adapter.scaling())?;
    let proxy = (dw * g.detach().to_dtype(DType::F32)?)?.sum_all()?;
    let grads = proxy.backward()?;
    grads
        .get(c.as_tensor())
        .cloned()
        .ok_or_else(|| Error::Config("delta-weight op produced no gradient".into()))
}

fn dc_len(adapter: &LayerAdapter) -> usize {
    adapter.entries().len()
}

/// Whether candle-nn's fused ops used by stock models record a backward in this build.
fn fused_ops_have_backward() -> Result<()> {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::new(&[[0.5f32, -1.0, 2.0, 0.25]], &dev)?)?;
    let alpha = Tensor::ones(4, DType::F32, &dev)?;
    let beta = Tensor::zeros(4, DType::F32, &dev)?;
    let probes: [(&str, Tensor); 3] = [
        (
            "softmax_last_dim",
            candle_nn::ops::softmax_last_dim(x.as_tensor())?,
        ),
        (
            "rms_norm",
            candle_nn::ops::rms_norm(x.as_tensor(), &alpha, 1e-5)?,
        ),
        (
            "layer_norm",
            candle_nn::ops::layer_norm(x.as_tensor(), &alpha, &beta, 1e-5)?,
        ),
    ];
    let w = Tensor::new(&[[1.0f32, -2.0, 3.0, 0.5]], &dev)?;
    for (name, y) in probes {
        let reached = (y * &w)?
            .sum_all()?
            .backward()?
            .get(x.as_tensor())
            .is_some();
        if !reached {
            return Err(Error::Config(format!(
                "candle-nn's fused {name} records no backward in this build, so stock models \
                 pass no gradient to their layers; patch candle-nn as this crate's Cargo.toml \
                 does ([patch.crates-io] candle-nn = {{ path = \"vendor/candle-nn\" }})"
            )));
        }
    }
    Ok(())
}

/// The backend behind [`StockTrainer::var_builder`].
struct TrainBackend<'a> {
    base: VarBuilder<'a>,
    trainer: StockTrainer,
}

impl Serve for TrainBackend<'_> {
    fn base(&self) -> &VarBuilder<'_> {
        &self.base
    }

    fn serve(&self, req: Request) -> candle_core::Result<Tensor> {
        let t = req.base(req.dtype)?.to_device(req.device)?;
        Ok(self.trainer.serve(req.name, t))
    }
}
