//! Deployment without code changes: a [`VarBuilder`] backend that serves `W0 + ΔW` for adapted
//! weights, so unmodified models (e.g. `candle_transformers::models::bert::BertModel::load`)
//! load merged weights.

use crate::error::{Error, Result};
use crate::peft::{Orientation, PeftAdapter, StoredShape};
use crate::serve::{extra_tensor, Request, Serve};
use crate::sync::lock;
use candle_core::{DType, Shape, Tensor};
use candle_nn::VarBuilder;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock};

/// A [`SimpleBackend`](candle_nn::var_builder::SimpleBackend) over a base [`VarBuilder`] that merges a [`PeftAdapter`] at load time.
///
/// For module `<path>` of the adapter, a request for `<prefix><path>.weight` returns
/// `W0 + ΔW` (computed in f32 from the base weight, then cast to the requested dtype; `(in, out)`
/// weights per [`Orientation`], see [`with_orientation`](Self::with_orientation)); a request for `<prefix><name>` of one of the adapter's
/// extra tensors (trained biases, `modules_to_save`) returns that tensor; anything else comes
/// from the base unchanged. The model pays nothing at inference time: its weights are plain
/// tensors.
///
/// ```no_run
/// use candle_core::{DType, Device};
/// use candle_nn::VarBuilder;
/// use candle_transformers::models::bert::{BertModel, Config};
/// use fourierft::{backend::MergedBackend, peft::PeftAdapter};
/// # fn main() -> anyhow::Result<()> {
/// let adapter = PeftAdapter::load("my-adapter")?;
/// let base = unsafe {
///     VarBuilder::from_mmaped_safetensors(&["model.safetensors"], DType::F32, &Device::Cpu)?
/// };
/// let merged = MergedBackend::new(base, adapter);
/// let config: Config = serde_json::from_str(&std::fs::read_to_string("config.json")?)?;
/// let model = BertModel::load(merged.var_builder(), &config)?; // unmodified candle-transformers
/// merged.check_all_used()?; // every adapted weight was requested
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct MergedBackend<'a> {
    inner: Merging<'a>,
}

impl<'a> MergedBackend<'a> {
    /// Merges `adapter` into the tensors of `base`; module paths are base tensor names.
    pub fn new(base: VarBuilder<'a>, adapter: PeftAdapter) -> Self {
        Self::with_base_prefix(base, adapter, "")
    }

    /// Like [`new`](Self::new), with module `<path>` found at base tensor `<prefix><path>`
    /// (e.g. prefix `"bert."` when the adapter was trained on a model whose BERT lives at the root).
    pub fn with_base_prefix(base: VarBuilder<'a>, adapter: PeftAdapter, prefix: &str) -> Self {
        let merged = adapter
            .spectra()
            .keys()
            .map(|p| (format!("{prefix}{p}.weight"), p.clone()))
            .collect();
        Self {
            inner: Merging::new(base, Arc::new(adapter), prefix, merged),
        }
    }

    /// Uses what is known about the layout of the weights (an explicit `(in, out)` regex or the
    /// base model's `config.json`) instead of the adapter file's `fan_in_fan_out` alone, which
    /// PEFT writes for the last adapted module only. Without it, a square weight whose layout
    /// the files cannot prove fails to load with an [`Error::Config`] naming it.
    ///
    /// ```
    /// # use candle_core::{DType, Device};
    /// # use candle_nn::{VarBuilder, VarMap};
    /// # use fourierft::{backend::MergedBackend, config::ModuleSelector, peft::*, FourierFTConfig};
    /// # let cfg = FourierFTConfig { n_frequency: 2, target_modules: Some(ModuleSelector::Names(vec!["c_proj".into()])), ..Default::default() };
    /// # let c = candle_core::Tensor::new(&[1f32, 2.0], &Device::Cpu)?;
    /// # let adapter = PeftAdapter::new(cfg, [("h.0.attn.c_proj".to_string(), c)].into(), Default::default())?;
    /// # let base = VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu);
    /// let config = serde_json::json!({"model_type": "gpt2"}); // the base model's config.json
    /// let merged = MergedBackend::new(base, adapter)
    ///     .with_orientation(Orientation::new().with_model_config(&config)?);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn with_orientation(mut self, orientation: Orientation) -> Self {
        self.inner.orientation = Arc::new(orientation);
        self
    }

    /// A [`VarBuilder`] over this backend, with the base's dtype, device and prefix.
    pub fn var_builder(&self) -> VarBuilder<'a> {
        let inner = self.inner.clone();
        let base = inner.base.clone();
        crate::serve::var_builder(&base, |root| Merging {
            base: root,
            ..inner
        })
    }

    /// Builds a model through this backend and checks it ([`check_all_used`](Self::check_all_used))
    /// before returning it: the checked path in one call.
    ///
    /// ```no_run
    /// # use candle_core::{DType, Device};
    /// # use candle_nn::VarBuilder;
    /// # use candle_transformers::models::bert::{BertModel, Config};
    /// # use fourierft::{backend::MergedBackend, peft::PeftAdapter};
    /// # fn main() -> anyhow::Result<()> {
    /// # let base = unsafe { VarBuilder::from_mmaped_safetensors(&["model.safetensors"], DType::F32, &Device::Cpu)? };
    /// # let config: Config = serde_json::from_str(&std::fs::read_to_string("config.json")?)?;
    /// let merged = MergedBackend::new(base, PeftAdapter::load("my-adapter")?);
    /// let bert = merged.load(|vb| BertModel::load(vb, &config))?; // errors if the adapter does not fit
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// The model's own error, or those of [`check_all_used`](Self::check_all_used).
    pub fn load<M>(
        &self,
        build: impl FnOnce(VarBuilder<'a>) -> candle_core::Result<M>,
    ) -> Result<M> {
        let model = build(self.var_builder())?;
        self.check_all_used()?;
        Ok(model)
    }

    /// Checks that every adapted weight and extra tensor of the adapter was requested: a name the
    /// model never asked for means the adapter does not fit it (wrong prefix, wrong model), or that
    /// the model has no module for a tensor the adapter trained in full (a classification head
    /// candle-transformers' models do not build: load it through the same `VarBuilder`). Also
    /// checks that no weight of a module the configuration targets was requested without the
    /// adapter having its spectrum (it was served unmerged).
    ///
    /// # Errors
    /// [`Error::Config`] listing the unused names and what to do; [`Error::File`] naming the
    /// missing spectrum.
    pub fn check_all_used(&self) -> Result<()> {
        self.inner.check_all_used()
    }
}

/// What [`MergedBackend`] serves, and what it records for [`MergedBackend::check_all_used`].
#[derive(Clone)]
struct Merging<'a> {
    /// The base (at its root once wrapped into a `VarBuilder`).
    base: VarBuilder<'a>,
    prefix: String,
    adapter: Arc<PeftAdapter>,
    /// Base weight name → module path, for weights served merged.
    merged: HashMap<String, String>,
    /// Base tensor name → name of the adapter's extra tensor.
    extras: HashMap<String, String>,
    used: Arc<Mutex<BTreeSet<String>>>,
    /// Names the model asked for that were served from the base unchanged (for hints).
    requested: Arc<Mutex<BTreeSet<String>>>,
    /// Weights of targeted modules without a spectrum that were served unmerged, with their
    /// module paths.
    unadapted: Arc<Mutex<BTreeSet<(String, String)>>>,
    /// How adapted weights' layouts are decided.
    orientation: Arc<Orientation>,
    /// Stored shapes of every adapted module, read once when a layout needs them.
    shapes: Arc<OnceLock<BTreeMap<String, StoredShape>>>,
}

impl<'a> Merging<'a> {
    fn new(
        base: VarBuilder<'a>,
        adapter: Arc<PeftAdapter>,
        prefix: &str,
        merged: HashMap<String, String>,
    ) -> Self {
        let extras = adapter
            .extra_tensors()
            .keys()
            .map(|k| (format!("{prefix}{k}"), k.clone()))
            .collect();
        Self {
            base,
            prefix: prefix.to_string(),
            adapter,
            merged,
            extras,
            used: Arc::default(),
            unadapted: Arc::default(),
            requested: Arc::default(),
            orientation: Arc::default(),
            shapes: Arc::default(),
        }
    }

    fn check_all_used(&self) -> Result<()> {
        let used = lock(&self.used);
        let unused = |names: &HashMap<String, String>| -> Vec<String> {
            let mut v: Vec<String> = names
                .keys()
                .filter(|n| !used.contains(*n))
                .cloned()
                .collect();
            v.sort();
            v
        };
        let (weights, extras) = (unused(&self.merged), unused(&self.extras));
        let source = self
            .adapter
            .source()
            .map_or("the adapter".to_string(), |p| p.display().to_string());
        if let Some(first) = weights.first() {
            let requested = lock(&self.requested);
            let hint = self
                .merged
                .get(first)
                .map(|path| {
                    crate::peft::prefix_hint(
                        path,
                        &self.prefix,
                        requested.iter().map(String::as_str),
                    )
                })
                .unwrap_or_default();
            return Err(Error::Config(format!(
                "{source}: the model never asked for the adapted weights {weights:?} (base prefix \
                 {:?}){hint}; the adapter does not fit this model as loaded",
                self.prefix
            )));
        }
        if !extras.is_empty() {
            return Err(Error::Config(format!(
                "{source}: the model never asked for {extras:?}, which the adapter trained in full \
                 (modules_to_save such as a classification head, or biases); build those modules \
                 through the same VarBuilder (e.g. candle_nn::linear(hidden, labels, \
                 vb.pp(\"classifier\")): candle-transformers' models have no task heads), or \
                 check the base prefix ({:?})",
                self.prefix
            )));
        }
        drop(used);
        let unadapted = lock(&self.unadapted);
        match unadapted.iter().next() {
            Some((name, path)) => {
                let context = format!(" (weight {name:?} was loaded without it, unmerged)");
                Err(self.adapter.missing_spectrum(path, &context))
            }
            None => Ok(()),
        }
    }

    fn mark(&self, name: &str) {
        lock(&self.used).insert(name.to_string());
    }

    /// `W0 + ΔW` for base weight `name` of module `path`, given W0.
    fn merge(&self, adapter: &PeftAdapter, name: &str, path: &str, w0: &Tensor) -> Result<Tensor> {
        let ffo = match w0.dims() {
            [a, b] => {
                let shape = self.stored_shape(adapter, path, (*a, *b));
                let others = || Ok(self.all_shapes(adapter).clone());
                let flag = adapter.config().fan_in_fan_out;
                self.orientation.resolve(path, shape, flag, others)?
            }
            _ => adapter.config().fan_in_fan_out,
        };
        adapter.merged_weight(path, w0, ffo, &format!("weight {name:?}"))
    }

    /// [`StoredShape::of`] module `path`, with the base bias read from the base `VarBuilder`.
    fn stored_shape(&self, adapter: &PeftAdapter, path: &str, dims: (usize, usize)) -> StoredShape {
        StoredShape::of(adapter, path, dims, || {
            let name = format!("{}{path}.bias", self.prefix);
            if !self.base.contains_tensor(&name) {
                return None;
            }
            let bias = self.base.get_unchecked_dtype(&name, DType::F32).ok()?;
            Some(bias.dims().to_vec())
        })
    }

    /// The stored shapes of every adapted module found in the base, read once.
    fn all_shapes(&self, adapter: &PeftAdapter) -> &BTreeMap<String, StoredShape> {
        self.shapes.get_or_init(|| {
            let mut all = BTreeMap::new();
            for (name, path) in &self.merged {
                let w = match adapter.stored_base_weight(path) {
                    Some(t) => Some(t.dims().to_vec()),
                    None => self
                        .base
                        .get_unchecked_dtype(name, DType::F32)
                        .ok()
                        .map(|t| t.dims().to_vec()),
                };
                if let Some([a, b]) = w.as_deref() {
                    all.insert(path.clone(), self.stored_shape(adapter, path, (*a, *b)));
                }
            }
            all
        })
    }

    /// The module path of `name` if it is the weight of a module the configuration targets but
    /// the adapter has no spectrum for. Such a weight is served unmerged and
    /// reported by [`check_all_used`](Self::check_all_used).
    fn unloaded_target<'n>(&self, adapter: &PeftAdapter, name: &'n str) -> Option<&'n str> {
        if self.merged.contains_key(name) {
            return None;
        }
        let path = name.strip_prefix(&self.prefix)?.strip_suffix(".weight")?;
        (adapter.matcher().is_target(path) && adapter.spectrum(path).is_none()).then_some(path)
    }

    /// The adapter's extra tensor replacing base tensor `name`, if it has one.
    fn replacement(
        &self,
        name: &str,
        shape: Option<&Shape>,
    ) -> candle_core::Result<Option<Tensor>> {
        match self.extras.get(name) {
            Some(extra) => Ok(Some(extra_tensor(&self.adapter, extra, name, shape)?)),
            None => Ok(None),
        }
    }
}

impl Serve for Merging<'_> {
    fn base(&self) -> &VarBuilder<'_> {
        &self.base
    }

    /// Serves `name` merged if it is an adapted weight, replaced if the adapter trained it in
    /// full, else from the base (read in f32 for merging).
    fn serve(&self, req: Request) -> candle_core::Result<Tensor> {
        let Request {
            name,
            shape,
            dtype,
            device: dev,
            ..
        } = req;
        let adapter = &self.adapter;
        if let Some(path) = self.merged.get(name) {
            let w0 = match adapter.stored_base_weight(path) {
                Some(stored) => {
                    if let Some(shape) = shape.filter(|s| s.dims() != stored.dims()) {
                        return Err(shape_error(adapter, path, name, shape, stored));
                    }
                    stored.to_dtype(DType::F32)?
                }
                None => req.base(DType::F32)?,
            };
            let w = self
                .merge(adapter, name, path, &w0)
                .map_err(Error::into_candle)?;
            self.mark(name);
            return w.to_dtype(dtype)?.to_device(dev);
        }
        if let Some(t) = self.replacement(name, shape)? {
            self.mark(name);
            return t.to_dtype(dtype)?.to_device(dev);
        }
        let t = req.base(dtype)?.to_device(dev)?;
        lock(&self.requested).insert(name.to_string());
        if let Some(path) = self.unloaded_target(adapter, name) {
            lock(&self.unadapted).insert((name.to_string(), path.to_string()));
        }
        Ok(t)
    }

    fn adds(&self, name: &str) -> bool {
        self.extras.contains_key(name)
    }
}

/// The stored base weight of `path` does not have the shape the model asks for.
fn shape_error(
    adapter: &PeftAdapter,
    path: &str,
    name: &str,
    shape: &Shape,
    stored: &Tensor,
) -> candle_core::Error {
    let key = crate::peft::base_layer_key(path, "weight");
    Error::Shape {
        what: format!(
            "{} (stored base weight) for {name:?}",
            adapter.describe(&key)
        ),
        expected: format!("{:?}", shape.dims()),
        found: format!("{:?}", stored.dims()),
    }
    .into_candle()
}
