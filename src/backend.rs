//! Deployment without code changes: a [`VarBuilder`] backend that serves `W0 + ΔW` for adapted
//! weights, so unmodified models (e.g. `candle_transformers::models::bert::BertModel::load`)
//! load merged weights.

use crate::error::{Error, Result};
use crate::peft::{resolve_fan_in_fan_out, PeftAdapter};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

/// A [`SimpleBackend`] over a base [`VarBuilder`] that merges a [`PeftAdapter`] at load time.
///
/// For module `<path>` of the adapter, a request for `<prefix><path>.weight` returns
/// `W0 + ΔW` (computed in f32 from the base weight, then cast to the requested dtype; `(in, out)`
/// weights per [`resolve_fan_in_fan_out`]); a request for `<prefix><name>` of one of the adapter's
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
    inner: AdapterBackend<'a>,
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
            inner: AdapterBackend::new(base, Some(Arc::new(adapter)), prefix, merged, None),
        }
    }

    /// A [`VarBuilder`] over this backend, with the base's dtype, device and prefix.
    pub fn var_builder(&self) -> VarBuilder<'a> {
        self.inner.clone().into_var_builder()
    }

    /// Checks that every adapted weight and extra tensor of the adapter was requested: a name the
    /// model never asked for means the adapter does not fit it (wrong prefix, wrong model). Also
    /// checks that no weight of a module the configuration targets was requested without the
    /// adapter having its spectrum (it was served unmerged).
    ///
    /// # Errors
    /// [`Error::Config`] listing the unused names; [`Error::File`] naming the missing spectrum.
    pub fn check_all_used(&self) -> Result<()> {
        self.inner.check_all_used()
    }
}

/// The backend shared by [`MergedBackend`] and [`crate::inject::AdapterContext`].
#[derive(Clone)]
pub(crate) struct AdapterBackend<'a> {
    base: VarBuilder<'a>,
    prefix: String,
    adapter: Option<Arc<PeftAdapter>>,
    /// Base weight name → module path, for weights served merged.
    merged: HashMap<String, String>,
    /// Base tensor name → name of the adapter's extra tensor.
    extras: HashMap<String, String>,
    used: Arc<Mutex<BTreeSet<String>>>,
    /// Weights of targeted modules without a spectrum that were served unmerged, with their
    /// module paths.
    unadapted: Arc<Mutex<BTreeSet<(String, String)>>>,
    /// A context id answered to [`CONTEXT_KEY`] requests.
    context: Option<u32>,
}

/// The tensor name under which a context backend answers its context id.
pub(crate) const CONTEXT_KEY: &str = "__fourierft_adapter_context__";

impl<'a> AdapterBackend<'a> {
    pub(crate) fn new(
        base: VarBuilder<'a>,
        adapter: Option<Arc<PeftAdapter>>,
        prefix: &str,
        merged: HashMap<String, String>,
        context: Option<u32>,
    ) -> Self {
        let extras = adapter
            .iter()
            .flat_map(|a| a.extra_tensors().keys())
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
            context,
        }
    }

    /// Records served names in `used` (shared with other backends) instead of a fresh set.
    pub(crate) fn with_used(self, used: Arc<Mutex<BTreeSet<String>>>) -> Self {
        Self { used, ..self }
    }

    pub(crate) fn into_var_builder(self) -> VarBuilder<'a> {
        let (dtype, device, prefix) = (
            self.base.dtype(),
            self.base.device().clone(),
            self.base.prefix(),
        );
        let vb = VarBuilder::from_backend(
            Box::new(Self {
                base: self.base.root(),
                ..self
            }),
            dtype,
            device,
        );
        if prefix.is_empty() {
            vb
        } else {
            vb.set_prefix(prefix)
        }
    }

    pub(crate) fn check_all_used(&self) -> Result<()> {
        let used = lock(&self.used);
        let unused: BTreeSet<&String> = self
            .merged
            .keys()
            .chain(self.extras.keys())
            .filter(|n| !used.contains(*n))
            .collect();
        if unused.is_empty() {
            let unadapted = lock(&self.unadapted);
            return match (unadapted.iter().next(), &self.adapter) {
                (Some((name, path)), Some(adapter)) => {
                    let context = format!(" (weight {name:?} was loaded without it, unmerged)");
                    Err(adapter.missing_spectrum(path, &context))
                }
                _ => Ok(()),
            };
        }
        let source = self
            .adapter
            .as_ref()
            .and_then(|a| a.source())
            .map_or("the adapter".to_string(), |p| p.display().to_string());
        Err(Error::Config(format!(
            "{source}: the model never loaded {unused:?} (base prefix {:?}); the adapter does not \
             fit this model",
            self.prefix
        )))
    }

    fn mark(&self, name: &str) {
        lock(&self.used).insert(name.to_string());
    }

    /// `W0 + ΔW` for base weight `name` of module `path`, given W0.
    fn merge(&self, adapter: &PeftAdapter, name: &str, path: &str, w0: &Tensor) -> Result<Tensor> {
        let bias_name = format!("{}{path}.bias", self.prefix);
        let bias_len = match self.extras.get(&bias_name) {
            Some(extra) => adapter
                .extra_tensors()
                .get(extra)
                .map(|t| t.dims().to_vec()),
            None if self.base.contains_tensor(&bias_name) => self
                .base
                .get_unchecked_dtype(&bias_name, DType::F32)
                .ok()
                .map(|t| t.dims().to_vec()),
            None => None,
        };
        let bias_len = match bias_len.as_deref() {
            Some([n]) => Some(*n),
            _ => None,
        };
        let ffo = match w0.dims() {
            [a, b] => resolve_fan_in_fan_out(adapter.config().fan_in_fan_out, (*a, *b), bias_len),
            _ => adapter.config().fan_in_fan_out,
        };
        adapter.merged_weight(path, w0, ffo, &format!("weight {name:?}"))
    }

    /// The module path of `name` if it is the weight of a module the configuration targets but
    /// the adapter has no spectrum for (only for merged backends: a context adapts such layers
    /// itself and reports a missing spectrum there). Such a weight is served unmerged and
    /// reported by [`check_all_used`](Self::check_all_used).
    fn unloaded_target<'n>(&self, adapter: &PeftAdapter, name: &'n str) -> Option<&'n str> {
        if self.context.is_some() || self.merged.contains_key(name) {
            return None;
        }
        let path = name.strip_prefix(&self.prefix)?.strip_suffix(".weight")?;
        (adapter.matcher().is_target(path) && adapter.spectrum(path).is_none()).then_some(path)
    }

    /// Serves `name` from the adapter if it is adapted or replaced; `load_base` fetches the base
    /// tensor (in f32 for merging).
    fn serve(
        &self,
        name: &str,
        shape: Option<&Shape>,
        dtype: DType,
        dev: &Device,
        load_base: impl Fn(DType) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        if let Some(id) = self.context.filter(|_| is_context_key(name)) {
            return Tensor::new(id, &Device::Cpu);
        }
        let adapter = match &self.adapter {
            Some(a) => a,
            None => return load_base(dtype)?.to_device(dev),
        };
        if let Some(path) = self.merged.get(name) {
            let w0 = load_base(DType::F32)?;
            let w = self
                .merge(adapter, name, path, &w0)
                .map_err(Error::into_candle)?;
            self.mark(name);
            return w.to_dtype(dtype)?.to_device(dev);
        }
        if let Some(extra) = self.extras.get(name) {
            let t = adapter
                .extra_tensors()
                .get(extra)
                .ok_or_else(|| candle_core::Error::msg(format!("missing extra tensor {extra}")))?;
            if let Some(shape) = shape {
                if t.dims() != shape.dims() {
                    return Err(Error::Shape {
                        what: format!("{} replacing {name:?}", adapter.describe(extra)),
                        expected: format!("{:?}", shape.dims()),
                        found: format!("{:?}", t.dims()),
                    }
                    .into_candle());
                }
            }
            self.mark(name);
            return t.to_dtype(dtype)?.to_device(dev);
        }
        let t = load_base(dtype)?.to_device(dev)?;
        if let Some(path) = self.unloaded_target(adapter, name) {
            lock(&self.unadapted).insert((name.to_string(), path.to_string()));
        }
        Ok(t)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whether `name` (a full path) asks for the context id.
fn is_context_key(name: &str) -> bool {
    name.strip_suffix(CONTEXT_KEY)
        .is_some_and(|head| head.is_empty() || head.ends_with('.'))
}

impl SimpleBackend for AdapterBackend<'_> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.serve(name, Some(&s), dtype, dev, |dt| {
            self.base.get_with_hints_dtype(s.clone(), name, h, dt)
        })
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.serve(name, None, dtype, dev, |dt| {
            self.base.get_unchecked_dtype(name, dt)
        })
    }

    fn contains_tensor(&self, name: &str) -> bool {
        (self.context.is_some() && is_context_key(name))
            || self.extras.contains_key(name)
            || self.base.contains_tensor(name)
    }
}
