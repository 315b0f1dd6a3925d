//! Model-level injection: build any candle model so that every linear layer whose module path
//! the adapter configuration targets becomes a [`FourierLinear`], without FourierFT code in the
//! model.
//!
//! The model uses [`linear`] (or [`linear_no_bias`], [`linear_b`], [`conv1d`]) where it would use
//! `candle_nn::linear`; everything else stays as it is. An [`AdapterContext`] travels inside the
//! [`VarBuilder`] made by [`AdapterContext::var_builder`]; the constructors find it there and
//! consult it with the layer's path (`vb.prefix()`). With a plain `VarBuilder` they build plain
//! `candle_nn::Linear` layers, exactly like `candle_nn::linear`.
//!
//! ```
//! use candle_core::{DType, Device, Module, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use fourierft::config::ModuleSelector;
//! use fourierft::inject::{self, AdaptableLinear, AdapterContext};
//! use fourierft::FourierFTConfig;
//!
//! // A model written once, with no FourierFT code besides `inject::linear`.
//! struct Mlp { fc1: AdaptableLinear, fc2: AdaptableLinear }
//! impl Mlp {
//!     fn new(vb: VarBuilder) -> candle_core::Result<Self> {
//!         let fc1 = inject::linear(8, 16, vb.pp("fc1"))?;
//!         let fc2 = inject::linear(16, 4, vb.pp("fc2"))?;
//!         Ok(Self { fc1, fc2 })
//!     }
//!     fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
//!         self.fc2.forward(&self.fc1.forward(x)?.relu()?)
//!     }
//! }
//!
//! let config = FourierFTConfig {
//!     target_modules: Some(ModuleSelector::Names(vec!["fc1".into()])),
//!     n_frequency: 32,
//!     init_seed: Some(0),
//!     ..Default::default()
//! };
//! let ctx = AdapterContext::new(config)?;
//! let varmap = VarMap::new(); // or the pretrained weights
//! let base = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let model = Mlp::new(ctx.var_builder(base))?;
//! ctx.check()?; // the configuration matched something, and a loaded adapter fits the model
//! assert_eq!(ctx.layer_paths(), vec!["fc1"]);
//! assert_eq!(ctx.trainable_vars().len(), 1); // give these to the optimizer
//! let y = model.forward(&Tensor::ones((2, 8), DType::F32, &Device::Cpu)?)?;
//! ctx.merge()?; // whole model; ctx.unmerge() takes it out again
//! # let dir = std::env::temp_dir().join(format!("fourierft-inject-doc-{}", std::process::id()));
//! ctx.save_pretrained(&dir)?; // a PEFT adapter directory
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::backend::{AdapterBackend, CONTEXT_KEY};
use crate::config::{shown_selector, FourierFTConfig};
use crate::error::{Error, Result};
use crate::layer::{FourierLinear, DEFAULT_ADAPTER};
use crate::peft::{ModuleMatcher, PeftAdapter, KEY_PREFIX, SPECTRUM_SUFFIX};
use candle_core::{DType, Module, Tensor, Var};
use candle_nn::{Linear, VarBuilder};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};

/// The adapter of a whole model: its configuration, the [`FourierLinear`] layers built for it and,
/// when loaded from a PEFT directory, the saved spectra to put into them.
///
/// A cheap shared handle (clones share everything). Build the model through
/// [`var_builder`](Self::var_builder), then call [`check`](Self::check); afterwards
/// [`trainable_vars`](Self::trainable_vars) feeds the optimizer, [`merge`](Self::merge) /
/// [`unmerge`](Self::unmerge) act on every layer, and [`save_pretrained`](Self::save_pretrained)
/// writes one PEFT adapter directory. See the [module docs](self) for an example.
#[derive(Debug, Clone)]
pub struct AdapterContext {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    id: u32,
    name: String,
    matcher: ModuleMatcher,
    loaded: Option<Arc<PeftAdapter>>,
    layers: Mutex<BTreeMap<String, FourierLinear>>,
    /// Paths of every linear layer built through this context, adapted or not.
    built: Mutex<Vec<String>>,
    /// Extra tensors served by this context's backends.
    used: Arc<Mutex<BTreeSet<String>>>,
    /// Tensors trained in full: `modules_to_save` parameters and biases per `bias`.
    trained: Arc<TrainedTensors>,
}

/// The tensors a context trains in full besides the spectra, as PEFT decides them
/// ([`ModuleMatcher::trains_in_full`]): every parameter of a `modules_to_save` module (e.g. a
/// classification head) and, with `bias = "all"` / `"fourier_only"`, biases. The model asks for
/// them through the context's [`VarBuilder`] like any weight and gets a [`Var`]'s tensor, so any
/// candle model trains them without code changes.
#[derive(Debug)]
pub(crate) struct TrainedTensors {
    matcher: ModuleMatcher,
    vars: Mutex<BTreeMap<String, Var>>,
}

impl TrainedTensors {
    /// Whether model tensor `name` is trained in full.
    pub(crate) fn trains(&self, name: &str) -> bool {
        self.matcher.trains_in_full(name)
    }

    /// The `Var` of tensor `name`, made from `init` on first request; a second request (e.g. a
    /// tied weight) gets the same `Var`.
    pub(crate) fn var(
        &self,
        name: &str,
        dtype: DType,
        device: &candle_core::Device,
        init: impl FnOnce(DType) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Var> {
        let mut vars = lock(&self.vars);
        if let Some(v) = vars.get(name) {
            return Ok(v.clone());
        }
        let v = Var::from_tensor(&init(dtype)?.to_device(device)?)?;
        vars.insert(name.to_string(), v.clone());
        Ok(v)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        registry().remove(&self.id);
    }
}

fn registry() -> MutexGuard<'static, HashMap<u32, Weak<Inner>>> {
    static REGISTRY: OnceLock<Mutex<HashMap<u32, Weak<Inner>>>> = OnceLock::new();
    REGISTRY
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl AdapterContext {
    /// A new adapter named `"default"` with `config` (its coefficients initialised per
    /// `init_weights` / `init_seed` as layers are built).
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid configuration or one without `target_modules`.
    pub fn new(config: FourierFTConfig) -> Result<Self> {
        Self::with_name(DEFAULT_ADAPTER, config)
    }

    /// Like [`new`](Self::new), with adapter name `name` (the name of the adapter on every layer,
    /// and its subdirectory when saved, as in PEFT).
    ///
    /// With `task_type` `"SEQ_CLS"`, `classifier` and `score` are added to `modules_to_save`, as
    /// PEFT's `PeftModelForSequenceClassification` does, so the head trains and is saved.
    pub fn with_name(name: &str, mut config: FourierFTConfig) -> Result<Self> {
        if config.task_type.as_deref() == Some("SEQ_CLS") {
            let heads = config.modules_to_save.get_or_insert_with(Vec::new);
            for head in ["classifier", "score"] {
                if !heads.iter().any(|h| h == head) {
                    heads.push(head.to_string());
                }
            }
        }
        Ok(Self::build(name, ModuleMatcher::new(&config)?, None))
    }

    /// The adapter saved in PEFT directory `dir`, named `"default"`.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        Ok(Self::from_adapter(DEFAULT_ADAPTER, PeftAdapter::load(dir)?))
    }

    /// Adapter `name` saved under `root` in PEFT's layout (`root` for `"default"`, else
    /// `root/name`).
    pub fn load_named(root: impl AsRef<Path>, name: &str) -> Result<Self> {
        Ok(Self::from_adapter(
            name,
            PeftAdapter::load_named(root, name)?,
        ))
    }

    /// A context whose layers take their spectra from `adapter`.
    pub fn from_adapter(name: &str, adapter: PeftAdapter) -> Self {
        let matcher = adapter.matcher().clone();
        Self::build(name, matcher, Some(Arc::new(adapter)))
    }

    fn build(name: &str, matcher: ModuleMatcher, loaded: Option<Arc<PeftAdapter>>) -> Self {
        static NEXT_ID: AtomicU32 = AtomicU32::new(1);
        let trained = Arc::new(TrainedTensors {
            matcher: matcher.clone(),
            vars: Mutex::default(),
        });
        let inner = Arc::new(Inner {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            name: name.to_string(),
            trained,
            matcher,
            loaded,
            layers: Mutex::default(),
            built: Mutex::default(),
            used: Arc::default(),
        });
        registry().insert(inner.id, Arc::downgrade(&inner));
        Self { inner }
    }

    /// A [`VarBuilder`] over `base` that carries this context: the constructors of this module
    /// adapt the layers it targets, and a loaded adapter's extra tensors (trained biases,
    /// `modules_to_save`) replace the base tensors of the same name. Dtype, device and prefix
    /// are `base`'s.
    pub fn var_builder<'a>(&self, base: VarBuilder<'a>) -> VarBuilder<'a> {
        AdapterBackend::new(
            base,
            self.inner.loaded.clone(),
            "",
            HashMap::new(),
            Some(self.inner.id),
        )
        .with_used(self.inner.used.clone())
        .with_trained(self.inner.trained.clone())
        .into_var_builder()
    }

    /// The context carried by `vb`, if it was made by [`var_builder`](Self::var_builder).
    pub fn from_var_builder(vb: &VarBuilder) -> Option<Self> {
        if !vb.contains_tensor(CONTEXT_KEY) {
            return None;
        }
        let id = vb
            .get_unchecked_dtype(CONTEXT_KEY, DType::U32)
            .ok()?
            .to_scalar::<u32>()
            .ok()?;
        let inner = registry().get(&id)?.upgrade()?;
        Some(Self { inner })
    }

    /// The adapter's name.
    pub fn adapter_name(&self) -> &str {
        &self.inner.name
    }

    /// The adapter configuration.
    pub fn config(&self) -> &FourierFTConfig {
        self.inner.matcher.config()
    }

    /// The adapter loaded from a directory, if any.
    pub fn loaded(&self) -> Option<&PeftAdapter> {
        self.inner.loaded.as_deref()
    }

    /// Whether the layer at `path` is adapted (per the configuration's matching rules).
    pub fn is_target(&self, path: &str) -> bool {
        self.inner.matcher.is_target(path)
    }

    /// Wraps a layer's frozen weight (`(out, in)`, or `(in, out)` with `fan_in_fan_out`) and bias
    /// into a [`FourierLinear`] named `path` carrying this context's adapter, registers it and
    /// returns it. Building the same path twice returns the same (shared) layer.
    ///
    /// # Errors
    /// [`Error::File`] if a loaded adapter has no spectrum for `path`; the errors of
    /// [`FourierLinear::add_adapter`] (e.g. [`Error::EntryCount`] for `n > d1·d2`).
    pub fn adapt(
        &self,
        path: &str,
        weight: Tensor,
        bias: Option<Tensor>,
        fan_in_fan_out: bool,
    ) -> Result<FourierLinear> {
        let name = &self.inner.name;
        let layer = FourierLinear::from_parts(weight, bias, fan_in_fan_out)?.with_name(path);
        let mut layers = lock(&self.inner.layers);
        if let Some(existing) = layers.get(path) {
            let same = (
                existing.in_features(),
                existing.out_features(),
                existing.fan_in_fan_out(),
            ) == (layer.in_features(), layer.out_features(), fan_in_fan_out);
            if !same {
                return Err(Error::Config(format!(
                    "{path}: built twice with different shapes or layouts"
                )));
            }
            return Ok(existing.clone());
        }
        let mut config = self.inner.matcher.layer_config(path, fan_in_fan_out);
        match &self.inner.loaded {
            Some(adapter) => {
                let spectrum = adapter
                    .spectrum(path)
                    .ok_or_else(|| adapter.missing_spectrum(path, ""))?;
                config.init_weights = true;
                layer.add_adapter(name, &config)?;
                layer.set_spectrum(name, spectrum)?;
            }
            None => layer.add_adapter(name, &config)?,
        }
        layers.insert(path.to_string(), layer.clone());
        Ok(layer)
    }

    /// Checks the model built through this context against the adapter: at least one layer was
    /// adapted; with a loaded adapter, every saved spectrum found its layer and every extra tensor
    /// was loaded by the model. Call it once the model is built.
    ///
    /// # Errors
    /// [`Error::Config`] when nothing matched (listing some layer paths that were built);
    /// [`Error::File`] naming the first unmatched tensor.
    pub fn check(&self) -> Result<()> {
        let layers = lock(&self.inner.layers);
        if layers.is_empty() {
            return Err(self.nothing_matched());
        }
        let Some(adapter) = &self.inner.loaded else {
            return Ok(());
        };
        let source = adapter
            .source()
            .unwrap_or(Path::new("adapter"))
            .to_path_buf();
        if let Some(path) = adapter.spectra().keys().find(|p| !layers.contains_key(*p)) {
            return Err(Error::File {
                path: source,
                message: format!(
                    "unmatched tensor \"{KEY_PREFIX}{path}{SPECTRUM_SUFFIX}\": the model built no \
                     targeted linear layer {path:?}"
                ),
            });
        }
        let used = lock(&self.inner.used);
        if let Some(name) = adapter.extra_tensors().keys().find(|n| !used.contains(*n)) {
            return Err(Error::File {
                path: source,
                message: format!(
                    "unmatched tensor \"{KEY_PREFIX}{name}\": the model never loaded {name:?}"
                ),
            });
        }
        Ok(())
    }

    /// The [`Error::Config`] for a configuration that matched no layer built so far.
    fn nothing_matched(&self) -> Error {
        let built = lock(&self.inner.built);
        let shown: Vec<&String> = built.iter().take(8).collect();
        Error::Config(format!(
            "target_modules {} matched none of the {} linear layers built through \
             fourierft::inject (e.g. {shown:?}); did the model use inject::linear with the \
             context's VarBuilder?",
            shown_selector(self.config().target_modules.as_ref()),
            built.len()
        ))
    }

    /// The adapted layers, or the error of [`check`](Self::check) when there is none.
    fn matched_layers(&self) -> Result<Vec<FourierLinear>> {
        let layers = self.layers();
        if layers.is_empty() {
            return Err(self.nothing_matched());
        }
        Ok(layers)
    }

    /// Paths of the adapted layers, sorted.
    pub fn layer_paths(&self) -> Vec<String> {
        lock(&self.inner.layers).keys().cloned().collect()
    }

    /// The adapted layer at `path`.
    pub fn layer(&self, path: &str) -> Option<FourierLinear> {
        lock(&self.inner.layers).get(path).cloned()
    }

    /// The adapted layers (shared handles), sorted by path.
    pub fn layers(&self) -> Vec<FourierLinear> {
        lock(&self.inner.layers).values().cloned().collect()
    }

    /// The parameters to give the optimizer: the spectra of every adapted layer, then the
    /// tensors trained in full ([`trained_tensors`](Self::trained_tensors)). Empty when the
    /// configuration matched no layer, which [`check`](Self::check) reports as an error.
    pub fn trainable_vars(&self) -> Vec<Var> {
        let spectra = self.spectra_by_path().into_iter().map(|(_, v)| v);
        spectra
            .chain(self.trained_tensors().into_values())
            .collect()
    }

    /// The tensors trained in full besides the spectra, by model tensor name: the parameters of
    /// `modules_to_save` modules (e.g. a classifier head) and, per `bias`, biases — those the
    /// model asked for through [`var_builder`](Self::var_builder). Saved with the adapter.
    pub fn trained_tensors(&self) -> BTreeMap<String, Var> {
        lock(&self.inner.trained.vars).clone()
    }

    /// Number of trainable values: spectral coefficients plus tensors trained in full.
    pub fn num_trainable(&self) -> usize {
        self.trainable_vars().iter().map(|v| v.elem_count()).sum()
    }

    fn spectra_by_path(&self) -> Vec<(String, Var)> {
        let name = &self.inner.name;
        lock(&self.inner.layers)
            .iter()
            .filter_map(|(p, l)| Some((p.clone(), l.adapter(name).ok()?.spectrum().clone())))
            .collect()
    }

    /// Merges the adapter into every layer's weight ([`FourierLinear::merge`]). Non-finite
    /// results are not checked: NaN or infinite coefficients make NaN or infinite weights, which
    /// [`unmerge`](Self::unmerge) cannot undo; use [`safe_merge`](Self::safe_merge) to refuse them.
    ///
    /// # Errors
    /// [`Error::Config`] if the configuration matched no layer (as [`check`](Self::check)).
    pub fn merge(&self) -> Result<()> {
        self.merge_all(false)
    }

    /// Like [`merge`](Self::merge), refusing non-finite results: on [`Error::NonFinite`] the
    /// layers merged by this call are unmerged again, so the model is left as it was.
    pub fn safe_merge(&self) -> Result<()> {
        self.merge_all(true)
    }

    fn merge_all(&self, safe: bool) -> Result<()> {
        let layers = self.matched_layers()?;
        // Only the layers this call merges are rolled back; ones merged before stay merged.
        let mut merged_here: Vec<&FourierLinear> = Vec::new();
        for layer in &layers {
            if layer.is_merged() {
                continue;
            }
            let result = if safe {
                layer.safe_merge()
            } else {
                layer.merge()
            };
            if let Err(e) = result {
                for done in merged_here {
                    done.unmerge()?;
                }
                return Err(e);
            }
            merged_here.push(layer);
        }
        Ok(())
    }

    /// Takes the adapter out of every layer's weight again.
    pub fn unmerge(&self) -> Result<()> {
        self.layers().iter().try_for_each(FourierLinear::unmerge)
    }

    /// The adapter as it is now: the configuration, each layer's current spectrum, the current
    /// values of the tensors trained in full, and any other extra tensors a loaded adapter had.
    ///
    /// # Errors
    /// [`Error::Config`] if the configuration matched no layer (as [`check`](Self::check)).
    pub fn to_adapter(&self) -> Result<PeftAdapter> {
        self.matched_layers()?;
        let spectra: BTreeMap<String, Tensor> = self
            .spectra_by_path()
            .into_iter()
            .map(|(p, v)| (p, v.as_tensor().clone()))
            .collect();
        let mut extra = self
            .loaded()
            .map(|a| a.extra_tensors().clone())
            .unwrap_or_default();
        for (name, var) in self.trained_tensors() {
            extra.insert(name, var.as_tensor().detach());
        }
        PeftAdapter::new(self.config().clone(), spectra, extra)
    }

    /// Saves the adapter as a PEFT directory under `root` (adapter `"default"` in `root`, others
    /// in `root/<name>`), loadable by `PeftModel.from_pretrained`. Returns the directory written.
    ///
    /// # Errors
    /// Those of [`to_adapter`](Self::to_adapter) and [`PeftAdapter::save`]; nothing is written
    /// when the configuration matched no layer.
    pub fn save_pretrained(&self, root: impl AsRef<Path>) -> Result<PathBuf> {
        self.to_adapter()?.save(root, &self.inner.name)
    }

    fn record_built(&self, path: &str) {
        lock(&self.inner.built).push(path.to_string());
    }
}

/// A linear layer built by this module's constructors: a plain [`Linear`] or, where the adapter
/// targets it, a [`FourierLinear`].
#[derive(Debug, Clone)]
pub enum AdaptableLinear {
    /// Not adapted: exactly what `candle_nn::linear` builds.
    Base(Linear),
    /// Adapted.
    Fourier(FourierLinear),
}

impl AdaptableLinear {
    /// The adapted layer, if this one is adapted.
    pub fn fourier(&self) -> Option<&FourierLinear> {
        match self {
            AdaptableLinear::Fourier(l) => Some(l),
            AdaptableLinear::Base(_) => None,
        }
    }
}

impl Module for AdaptableLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            AdaptableLinear::Base(l) => l.forward(x),
            AdaptableLinear::Fourier(l) => l.forward(x),
        }
    }
}

/// `candle_nn::linear(in_dim, out_dim, vb)`, adapted when `vb` carries an [`AdapterContext`] that
/// targets `vb.prefix()`. Weight `(out_dim, in_dim)` and bias `[out_dim]` come from `vb` with
/// `candle_nn::linear`'s initialisation hints.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<AdaptableLinear> {
    build(in_dim, out_dim, true, false, vb)
}

/// Like [`linear`] without a bias.
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<AdaptableLinear> {
    build(in_dim, out_dim, false, false, vb)
}

/// Like [`linear`], with or without a bias.
pub fn linear_b(
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    vb: VarBuilder,
) -> Result<AdaptableLinear> {
    build(in_dim, out_dim, bias, false, vb)
}

/// A GPT-2 style `Conv1D` (transformers' `Conv1D(nf=out_dim, nx=in_dim)`): `y = x·W + b` with the
/// weight stored `(in_dim, out_dim)` and a bias `[out_dim]`. Adapted with `fan_in_fan_out`
/// whatever the configuration says, as PEFT does.
pub fn conv1d(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<AdaptableLinear> {
    build(in_dim, out_dim, true, true, vb)
}

fn build(
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    fan_in_fan_out: bool,
    vb: VarBuilder,
) -> Result<AdaptableLinear> {
    let (weight, bias) = crate::layer::base_parts(in_dim, out_dim, bias, fan_in_fan_out, &vb)?;
    let path = vb.prefix();
    if let Some(ctx) = AdapterContext::from_var_builder(&vb) {
        ctx.record_built(&path);
        if ctx.is_target(&path) {
            return Ok(AdaptableLinear::Fourier(ctx.adapt(
                &path,
                weight,
                bias,
                fan_in_fan_out,
            )?));
        }
    }
    let weight = if fan_in_fan_out { weight.t()? } else { weight };
    Ok(AdaptableLinear::Base(Linear::new(weight, bias)))
}
