//! [`AdapterContext`]: the adapter of a whole model and the layers built for it.

use super::backend::ContextBackend;
use super::channel;
use super::trained::TrainedTensors;
use crate::config::{shown_selector, FourierFTConfig};
use crate::error::{Error, Result};
use crate::layer::{FourierLinear, DEFAULT_ADAPTER};
use crate::peft::{spectrum_key, ModuleMatcher, PeftAdapter, KEY_PREFIX};
use crate::sync::lock;
use candle_core::{Tensor, Var};
use candle_nn::VarBuilder;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The adapter of a whole model: its configuration, the [`FourierLinear`] layers built for it and,
/// when loaded from a PEFT directory, the saved spectra to put into them.
///
/// A cheap shared handle (clones share everything). Build the model through
/// [`var_builder`](Self::var_builder), then call [`check`](Self::check); afterwards
/// [`trainable_vars`](Self::trainable_vars) feeds the optimizer, [`merge`](Self::merge) /
/// [`unmerge`](Self::unmerge) act on every layer, and [`save_pretrained`](Self::save_pretrained)
/// writes one PEFT adapter directory. See the [module docs](super) for an example.
#[derive(Debug, Clone)]
pub struct AdapterContext {
    inner: Arc<Inner>,
}

#[derive(Debug)]
pub(super) struct Inner {
    id: u32,
    name: String,
    matcher: ModuleMatcher,
    loaded: Option<Arc<PeftAdapter>>,
    layers: Mutex<BTreeMap<String, FourierLinear>>,
    /// Paths of every linear layer built through this context, adapted or not.
    built: Mutex<Vec<String>>,
    /// The loaded adapter's extra tensors the model asked for, recorded by this context's
    /// backends.
    used: Arc<Mutex<BTreeSet<String>>>,
    /// Tensors trained in full: `modules_to_save` parameters and biases per `bias`.
    trained: Arc<TrainedTensors>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        channel::unregister(self.id);
    }
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
        let trained = Arc::new(TrainedTensors::new(matcher.clone()));
        let id = channel::next_id();
        let inner = Arc::new(Inner {
            id,
            name: name.to_string(),
            trained,
            matcher,
            loaded,
            layers: Mutex::default(),
            built: Mutex::default(),
            used: Arc::default(),
        });
        channel::register(id, &inner);
        Self { inner }
    }

    /// A [`VarBuilder`] over `base` that carries this context: the constructors of this module
    /// adapt the layers it targets, and a loaded adapter's extra tensors (trained biases,
    /// `modules_to_save`) replace the base tensors of the same name. Dtype, device and prefix
    /// are `base`'s.
    pub fn var_builder<'a>(&self, base: VarBuilder<'a>) -> VarBuilder<'a> {
        crate::serve::var_builder(&base, |root| ContextBackend {
            base: root,
            id: self.inner.id,
            loaded: self.inner.loaded.clone(),
            used: self.inner.used.clone(),
            trained: self.inner.trained.clone(),
        })
    }

    /// The context carried by `vb`, if it was made by [`var_builder`](Self::var_builder)
    /// (`inject/channel.rs` says how).
    pub fn from_var_builder(vb: &VarBuilder) -> Option<Self> {
        channel::find(vb).map(|inner| Self { inner })
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
                    "unmatched tensor \"{}\": the model built no targeted linear layer {path:?}",
                    spectrum_key(path)
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
        self.inner.trained.vars()
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

    pub(super) fn record_built(&self, path: &str) {
        lock(&self.inner.built).push(path.to_string());
    }
}
