//! `FourierLinear`: a frozen linear layer plus one or more FourierFT adapters.

use crate::config::FourierFTConfig;
use crate::entries::SpectralEntries;
use crate::error::{dims_str, Error, Result};
use crate::ops::{add_to_frozen, fourier_linear, frozen_linear, spectral_linear, DeltaWeight};
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{Linear, VarBuilder};
use rand::SeedableRng;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// One adapter: shared entries, trainable coefficients, a scale.
#[derive(Debug, Clone)]
pub struct Adapter {
    op: DeltaWeight,
    spectrum: Var,
    scaling: f64,
}

impl Adapter {
    /// The adapter's entry positions (shared by layers of the same shape and seed).
    pub fn entries(&self) -> &Arc<SpectralEntries> {
        self.op.entries()
    }

    /// The trainable coefficients c (PEFT's `fourierft_spectrum`), f32 `[n]`.
    pub fn spectrum(&self) -> &Var {
        &self.spectrum
    }

    /// The scale alpha, as applied: `ΔW = alpha/(d1·d2)·Re(IDFT2(E∘c))` (PEFT's `scaling`).
    pub fn scaling(&self) -> f64 {
        self.scaling
    }

    /// ΔW, f32 `(out_features, in_features)`, differentiable in the spectrum.
    pub fn delta_weight(&self) -> Result<Tensor> {
        self.op.forward(self.spectrum.as_tensor(), self.scaling)
    }
}

/// A linear layer `y = x·W0ᵀ + b` whose weight W0 (and bias) stay frozen, plus FourierFT adapters:
/// `y = x·(W0 + Σ_active ΔW_a)ᵀ + b`, with `ΔW_a = alpha_a/(d1·d2)·Re(IDFT2(E_a∘c_a))`.
///
/// Only the adapters' spectra are [`Var`]s ([`FourierLinear::trainable_vars`]); W0 is detached
/// and never changed by training. Like a [`Var`], a `FourierLinear` is a handle: clones share the
/// same weight and adapters, so a model-level helper can merge the layers a model owns. [`merge`](FourierLinear::merge) folds the active adapters into
/// the weight for inference; [`unmerge`](FourierLinear::unmerge) takes them out again.
///
/// ```
/// use candle_core::{Device, Module, Tensor};
/// use fourierft::{FourierFTConfig, FourierLinear};
/// let dev = Device::Cpu;
/// let base = candle_nn::Linear::new(Tensor::randn(0f32, 0.1, (8, 12), &dev)?, None);
/// let cfg = FourierFTConfig { n_frequency: 20, init_seed: Some(0), ..Default::default() };
/// let layer = FourierLinear::new(base, &cfg)?;
/// let x = Tensor::randn(0f32, 1.0, (3, 12), &dev)?;
/// let y = layer.forward(&x)?;
/// layer.merge()?;
/// let y_merged = layer.forward(&x)?;
/// assert!((y - y_merged)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-4);
/// assert_eq!(layer.num_trainable(), 20);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct FourierLinear {
    name: String,
    in_features: usize,
    out_features: usize,
    fan_in_fan_out: bool,
    state: Arc<RwLock<State>>,
}

/// The mutable part of a layer, shared by all handles (clones) of it.
#[derive(Debug)]
struct State {
    /// W0 as stored: `(out, in)`, or `(in, out)` with `fan_in_fan_out`. Holds the merged
    /// adapters while merged.
    weight: Tensor,
    bias: Option<Tensor>,
    adapters: BTreeMap<String, Adapter>,
    active: Vec<String>,
    disabled: bool,
    merged: Vec<String>,
    mode: ForwardMode,
}

/// The name PEFT gives an adapter when none is given.
pub const DEFAULT_ADAPTER: &str = "default";

impl FourierLinear {
    /// Wraps `linear` (weight `(out, in)`) and attaches an adapter named `"default"`.
    pub fn new(linear: Linear, config: &FourierFTConfig) -> Result<Self> {
        let weight = linear.weight().clone();
        let layer = Self::from_parts(weight, linear.bias().cloned(), config.fan_in_fan_out)?;
        layer.add_adapter(DEFAULT_ADAPTER, config)?;
        Ok(layer)
    }

    /// Wraps a weight and bias without any adapter. The weight is `(out, in)`, or `(in, out)`
    /// when `fan_in_fan_out` (GPT-2's Conv1D layout). Both are detached: never trained.
    pub fn from_parts(weight: Tensor, bias: Option<Tensor>, fan_in_fan_out: bool) -> Result<Self> {
        let (a, b) = weight.dims2().map_err(|_| Error::Shape {
            what: "weight of a FourierLinear".into(),
            expected: "2 dims".into(),
            found: dims_str(weight.dims()),
        })?;
        let (out_features, in_features) = if fan_in_fan_out { (b, a) } else { (a, b) };
        if let Some(bias) = &bias {
            if bias.dims() != [out_features] {
                return Err(Error::Shape {
                    what: "bias of a FourierLinear".into(),
                    expected: format!("[{out_features}]"),
                    found: dims_str(bias.dims()),
                });
            }
        }
        Ok(Self {
            name: format!("FourierLinear(in={in_features}, out={out_features})"),
            in_features,
            out_features,
            fan_in_fan_out,
            state: Arc::new(RwLock::new(State {
                weight: weight.detach(),
                // A bias that is a `Var` (trained, e.g. PEFT's `bias = "all"`) keeps its
                // identity so it gets a gradient; anything else is frozen.
                bias: bias.map(|b| if b.is_variable() { b } else { b.detach() }),
                adapters: BTreeMap::new(),
                active: Vec::new(),
                disabled: false,
                merged: Vec::new(),
                mode: ForwardMode::Auto,
            })),
        })
    }

    /// Sets the name used in error messages and in seeding (e.g. the module path).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    // A panic while holding the lock cannot leave the state torn (every update is one
    // assignment), so a poisoned lock is recovered.
    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The layer's name (its module path when built through [`linear`]).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Input width (d2).
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Output width (d1).
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Whether the weight is stored `(in, out)`.
    pub fn fan_in_fan_out(&self) -> bool {
        self.fan_in_fan_out
    }

    /// The current weight: W0, or W0 plus the merged adapters while merged.
    pub fn weight(&self) -> Tensor {
        self.read().weight.clone()
    }

    /// The frozen bias.
    pub fn bias(&self) -> Option<Tensor> {
        self.read().bias.clone()
    }

    /// Adds an adapter named `name`, with entries sampled per `config` (shared with every layer of
    /// the same shape and seed) and coefficients initialised per `config.init_weights`.
    /// It becomes active if no adapter was active.
    pub fn add_adapter(&self, name: &str, config: &FourierFTConfig) -> Result<()> {
        config.validate()?;
        if config.fan_in_fan_out != self.fan_in_fan_out {
            return Err(Error::Config(format!(
                "{}: adapter {name:?} has fan_in_fan_out = {} but the layer was built with {}",
                self.name, config.fan_in_fan_out, self.fan_in_fan_out
            )));
        }
        if self.read().adapters.contains_key(name) {
            return Err(Error::AdapterExists {
                what: self.name.clone(),
                name: name.into(),
            });
        }
        let (d1, d2) = (self.out_features, self.in_features);
        let n = config.n_frequency;
        let sampling = &config.entry_sampling;
        let entries = SpectralEntries::sample(d1, d2, n, config.random_loc_seed, sampling)
            .map_err(|e| match e {
                Error::EntryCount { n, max, d1, d2, .. } => Error::EntryCount {
                    context: format!("{} adapter {name:?}", self.name),
                    n,
                    max,
                    d1,
                    d2,
                },
                other => other,
            })?;
        let device = self.read().weight.device().clone();
        let spectrum = if config.init_weights {
            Var::zeros(n, DType::F32, &device)?
        } else {
            Var::from_tensor(&standard_normal(
                n,
                config.init_seed,
                &self.name,
                name,
                &device,
            )?)?
        };
        let adapter = Adapter {
            op: DeltaWeight::new(entries),
            spectrum,
            scaling: config.scaling,
        };
        let mut st = self.write();
        if st.adapters.contains_key(name) {
            return Err(Error::AdapterExists {
                what: self.name.clone(),
                name: name.into(),
            });
        }
        st.adapters.insert(name.to_string(), adapter);
        if st.active.is_empty() {
            st.active.push(name.to_string());
        }
        Ok(())
    }

    /// The adapter named `name` (a handle: its spectrum is the layer's own [`Var`]).
    pub fn adapter(&self, name: &str) -> Result<Adapter> {
        let st = self.read();
        st.adapters
            .get(name)
            .cloned()
            .ok_or_else(|| self.unknown(&st, name))
    }

    /// Names of all adapters, sorted.
    pub fn adapter_names(&self) -> Vec<String> {
        self.read().adapters.keys().cloned().collect()
    }

    /// Names of the active adapters, in activation order.
    pub fn active_adapters(&self) -> Vec<String> {
        self.read().active.clone()
    }

    /// Makes exactly these adapters active (an empty list deactivates all).
    /// Not allowed while merged.
    pub fn set_active_adapters(&self, names: &[&str]) -> Result<()> {
        let mut st = self.write();
        self.ensure_unmerged(&st, "change the active adapters")?;
        if let Some(missing) = names.iter().find(|n| !st.adapters.contains_key(**n)) {
            return Err(self.unknown(&st, missing));
        }
        st.active.clear();
        for n in names {
            if !st.active.iter().any(|a| a == n) {
                st.active.push(n.to_string());
            }
        }
        Ok(())
    }

    /// Turns all adapters off (the layer computes the base output only). Not allowed while merged.
    pub fn disable_adapters(&self) -> Result<()> {
        let mut st = self.write();
        self.ensure_unmerged(&st, "disable adapters")?;
        st.disabled = true;
        Ok(())
    }

    /// Turns the active adapters back on.
    pub fn enable_adapters(&self) {
        self.write().disabled = false;
    }

    /// Whether adapters are disabled.
    pub fn adapters_disabled(&self) -> bool {
        self.read().disabled
    }

    /// Removes an adapter (and deactivates it). Not allowed while it is merged.
    pub fn delete_adapter(&self, name: &str) -> Result<Adapter> {
        let mut st = self.write();
        if st.merged.iter().any(|m| m == name) {
            return Err(Error::MergeState {
                what: self.name.clone(),
                message: format!(
                    "cannot delete adapter {name:?} while it is merged; unmerge first"
                ),
            });
        }
        let adapter = st
            .adapters
            .remove(name)
            .ok_or_else(|| self.unknown(&st, name))?;
        st.active.retain(|a| a != name);
        Ok(adapter)
    }

    /// Replaces the coefficients of adapter `name` (e.g. loaded from a file); shape `[n]`, any
    /// float dtype (stored as f32). Not allowed while merged.
    pub fn set_spectrum(&self, name: &str, values: &Tensor) -> Result<()> {
        let st = self.read();
        self.ensure_unmerged(&st, "replace a spectrum")?;
        let adapter = st
            .adapters
            .get(name)
            .ok_or_else(|| self.unknown(&st, name))?;
        let n = adapter.entries().len();
        if values.dims() != [n] {
            return Err(Error::Shape {
                what: format!("fourierft_spectrum of {} adapter {name:?}", self.name),
                expected: format!("[{n}]"),
                found: dims_str(values.dims()),
            });
        }
        let values = values.to_dtype(DType::F32)?.to_device(st.weight.device())?;
        adapter.spectrum.set(&values)?;
        Ok(())
    }

    /// The spectra of the active adapters: the only parameters to train.
    pub fn trainable_vars(&self) -> Vec<Var> {
        let st = self.read();
        st.active
            .iter()
            .filter_map(|a| st.adapters.get(a))
            .map(|a| a.spectrum.clone())
            .collect()
    }

    /// Number of trainable parameters: the coefficients of the active adapters, i.e. the
    /// element count of [`trainable_vars`](Self::trainable_vars).
    pub fn num_trainable(&self) -> usize {
        self.trainable_vars().iter().map(|v| v.elem_count()).sum()
    }

    /// Number of frozen parameters (weight and bias).
    pub fn num_frozen(&self) -> usize {
        let st = self.read();
        st.weight.elem_count() + st.bias.as_ref().map_or(0, |b| b.elem_count())
    }

    /// `weight + Σ ΔW` over the active adapters, differentiable in their spectra only (ΔW summed
    /// in f32 and cast to the weight's dtype once).
    fn effective_weight(&self, st: &State) -> Result<Tensor> {
        let mut sum: Option<Tensor> = None;
        for name in &st.active {
            let adapter = st
                .adapters
                .get(name)
                .ok_or_else(|| self.unknown(st, name))?;
            let dw = adapter.delta_weight()?;
            sum = Some(match sum {
                None => dw,
                Some(s) => (s + dw)?,
            });
        }
        let Some(dw) = sum else {
            return Ok(st.weight.clone());
        };
        let dw = if self.fan_in_fan_out { dw.t()? } else { dw };
        add_to_frozen(&dw.to_device(st.weight.device())?, &st.weight)
    }

    /// `weight + sign·Σ ΔW` over `names`, outside the autograd graph (merge and unmerge). For an
    /// f32 CPU weight each adapter is added in one fused pass, without a ΔW buffer.
    fn merged_weight(&self, st: &State, names: &[String], sign: f64) -> Result<Tensor> {
        // Work on the (out, in) view; fan_in_fan_out weights are transposed back at the end.
        let mut w = self.weight_out_in(&st.weight)?;
        for name in names {
            let adapter = st
                .adapters
                .get(name)
                .ok_or_else(|| self.unknown(st, name))?;
            let c = adapter.spectrum.as_tensor();
            w = adapter.op.add_to(&w, c, sign * adapter.scaling)?;
        }
        Ok(if self.fan_in_fan_out {
            w.t()?.contiguous()?
        } else {
            w
        })
    }

    /// Folds the active, not yet merged adapters into the weight. Forward then uses the merged
    /// weight only. Non-finite values are not checked: see [`safe_merge`](Self::safe_merge).
    pub fn merge(&self) -> Result<()> {
        self.merge_checked(false)
    }

    /// Like [`merge`](Self::merge), but returns [`Error::NonFinite`] and leaves the weight
    /// untouched if the merged weight has any NaN or infinite value.
    pub fn safe_merge(&self) -> Result<()> {
        self.merge_checked(true)
    }

    fn merge_checked(&self, check: bool) -> Result<()> {
        let mut st = self.write();
        if st.disabled {
            return Err(Error::MergeState {
                what: self.name.clone(),
                message: "cannot merge while adapters are disabled".into(),
            });
        }
        let todo: Vec<String> = st
            .active
            .iter()
            .filter(|a| !st.merged.contains(a))
            .cloned()
            .collect();
        if todo.is_empty() {
            return Ok(());
        }
        let merged = self.merged_weight(&st, &todo, 1.0)?;
        if check && !all_finite(&merged)? {
            return Err(Error::NonFinite {
                what: self.name.clone(),
                adapters: todo,
            });
        }
        st.weight = merged;
        st.merged.extend(todo);
        Ok(())
    }

    /// Takes every merged adapter out of the weight again (W = W − Σ ΔW, with the current
    /// coefficients).
    pub fn unmerge(&self) -> Result<()> {
        let mut st = self.write();
        if st.merged.is_empty() {
            return Ok(());
        }
        st.weight = self.merged_weight(&st, &st.merged, -1.0)?;
        st.merged.clear();
        Ok(())
    }

    /// Whether any adapter is merged into the weight.
    pub fn is_merged(&self) -> bool {
        !self.read().merged.is_empty()
    }

    /// Names of the merged adapters.
    pub fn merged_adapters(&self) -> Vec<String> {
        self.read().merged.clone()
    }

    /// How the unmerged forward computes the adapters' contribution.
    pub fn forward_mode(&self) -> ForwardMode {
        self.read().mode
    }

    /// Sets how the unmerged forward computes the adapters' contribution.
    pub fn set_forward_mode(&self, mode: ForwardMode) {
        self.write().mode = mode;
    }

    /// Checks `x` is `(..., in_features)` with at least 2 dims, in the weight's dtype; returns the
    /// number of tokens.
    fn check_input(&self, x: &Tensor) -> Result<usize> {
        let dims = x.dims();
        if dims.len() < 2 || dims[dims.len() - 1] != self.in_features {
            return Err(Error::Shape {
                what: format!("input of {}", self.name),
                expected: format!("(batch, [seq,] {})", self.in_features),
                found: dims_str(dims),
            });
        }
        let dtype = self.read().weight.dtype();
        if x.dtype() != dtype {
            return Err(Error::DType {
                what: format!("input of {}", self.name),
                expected: format!("{dtype:?} (the dtype of its weight)"),
                found: x.dtype(),
            });
        }
        Ok(dims[..dims.len() - 1].iter().product())
    }

    /// The weight as `(out, in)` (a transposed view for `fan_in_fan_out`).
    fn weight_out_in(&self, weight: &Tensor) -> Result<Tensor> {
        Ok(if self.fan_in_fan_out {
            weight.t()?
        } else {
            weight.clone()
        })
    }

    /// The frozen base `x·W0ᵀ + b` (W0 including merged adapters), for `x` `(tokens, in)`.
    fn base_forward(&self, st: &State, x2: &Tensor) -> Result<Tensor> {
        let (fused, trained) = split_bias(st);
        let y = frozen_linear(x2, &self.weight_out_in(&st.weight)?, fused)?;
        add_bias(y, trained)
    }

    /// `x·ΔWᵀ` of one adapter for `x` `(tokens, in)`, by `mode` (Auto resolved here).
    fn adapter_forward(&self, adapter: &Adapter, x2: &Tensor, mode: ForwardMode) -> Result<Tensor> {
        let tokens = x2.dim(0)?;
        let entries = adapter.entries();
        if mode.resolve(entries, tokens, x2.device()) == ForwardMode::Spectral {
            spectral_linear(entries, adapter.spectrum.as_tensor(), adapter.scaling, x2)
        } else {
            let dw = adapter.delta_weight()?.to_dtype(x2.dtype())?;
            Ok(x2.matmul(&dw.t()?)?)
        }
    }

    /// The forward pass with a typed error: `x` has shape `(..., in_features)` with at least 2 dims.
    ///
    /// Merged, disabled or without active adapters: the frozen base only (its backward computes
    /// `dL/dx` only). Otherwise, per [`ForwardMode`]: `Dense` multiplies by `W0 + Σ ΔW` (ΔW
    /// materialised once per call); `Spectral` adds each adapter's `x·ΔWᵀ` computed in
    /// O(d log d) per token to the frozen base; `Auto` picks the cheaper.
    pub fn try_forward(&self, x: &Tensor) -> Result<Tensor> {
        let tokens = self.check_input(x)?;
        let x2 = x.reshape((tokens, self.in_features))?;
        let st = self.read();
        let active: Vec<&Adapter> = st
            .active
            .iter()
            .filter_map(|a| st.adapters.get(a))
            .collect();
        let y = if st.disabled || !st.merged.is_empty() || active.is_empty() {
            self.base_forward(&st, &x2)?
        } else if crate::ops::half::is_half(st.weight.dtype()) {
            // f16/bf16: each adapter's x·ΔWᵀ in f32, added to the rounded base (`ops::half`).
            let base = self.base_forward(&st, &x2)?;
            let x32 = x2.to_dtype(DType::F32)?;
            let parts = active.iter().map(|a| self.adapter_forward(a, &x32, st.mode));
            crate::ops::half::add_in_f32(&base, parts)?
        } else if ForwardMode::resolve_all(st.mode, &active, tokens, x.device())
            == ForwardMode::Dense
        {
            if let [a] = active[..] {
                let w = self.weight_out_in(&st.weight)?;
                let (c, alpha) = (a.spectrum.as_tensor(), a.scaling);
                let (fused, trained) = split_bias(&st);
                let y = fourier_linear(&x2, &w, fused, a.entries(), c, alpha)?;
                add_bias(y, trained)?
            } else {
                // One GEMM with W0 + ΔW: its weight gradient is exactly what ΔW's backward needs.
                let w = self.weight_out_in(&self.effective_weight(&st)?)?;
                let mut y = x2.matmul(&w.t()?)?;
                if let Some(b) = &st.bias {
                    y = y.broadcast_add(b)?;
                }
                y
            }
        } else {
            let mut y = self.base_forward(&st, &x2)?;
            for a in active {
                y = (y + self.adapter_forward(a, &x2, ForwardMode::Spectral)?)?;
            }
            y
        };
        let mut out_dims = x.dims().to_vec();
        let last = out_dims.len() - 1;
        out_dims[last] = self.out_features;
        Ok(y.reshape(out_dims)?)
    }

    /// Forward for a batch whose rows use different adapters: row `b` of `x` (shape
    /// `(batch, ..., in_features)`) gets adapter `adapters[b]`, or none for `None`, without
    /// merging — one base model serving many adapters at once. Ignores the active set; not
    /// allowed while merged.
    ///
    /// ```
    /// use candle_core::{Device, Module, Tensor};
    /// use fourierft::{FourierFTConfig, FourierLinear};
    /// let dev = Device::Cpu;
    /// let base = candle_nn::Linear::new(Tensor::randn(0f32, 0.1, (6, 4), &dev)?, None);
    /// let layer = FourierLinear::new(base, &FourierFTConfig { n_frequency: 5, ..Default::default() })?;
    /// layer.add_adapter("b", &FourierFTConfig { n_frequency: 3, random_loc_seed: 1, ..Default::default() })?;
    /// let x = Tensor::randn(0f32, 1.0, (3, 4), &dev)?;
    /// let y = layer.forward_mixed(&x, &[Some("default"), None, Some("b")])?;
    /// assert_eq!(y.dims(), &[3, 6]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn forward_mixed(&self, x: &Tensor, adapters: &[Option<&str>]) -> Result<Tensor> {
        let tokens = self.check_input(x)?;
        let batch = x.dim(0)?;
        if adapters.len() != batch {
            return Err(Error::Shape {
                what: format!("adapter list of a mixed batch for {}", self.name),
                expected: format!("{batch} entries (one per row of the input)"),
                found: format!("{} entries", adapters.len()),
            });
        }
        let st = self.read();
        self.ensure_unmerged(&st, "run a mixed-adapter batch")?;
        let x2 = x.reshape((tokens, self.in_features))?;
        let mut y = self.base_forward(&st, &x2)?;
        let per_row = tokens / batch.max(1);
        let mut names: Vec<&str> = adapters.iter().flatten().copied().collect();
        names.sort_unstable();
        names.dedup();
        for name in names {
            let adapter = st
                .adapters
                .get(name)
                .ok_or_else(|| self.unknown(&st, name))?;
            // Token indices of the rows that use this adapter.
            let idx: Vec<u32> = (0..batch)
                .filter(|&b| adapters[b] == Some(name))
                .flat_map(|b| (b * per_row..(b + 1) * per_row).map(|t| t as u32))
                .collect();
            let len = idx.len();
            let idx = Tensor::from_vec(idx, len, x.device())?;
            let xs = x2.index_select(&idx, 0)?;
            let delta = self.adapter_forward(adapter, &xs, st.mode)?;
            y = y.index_add(&idx, &delta, 0)?;
        }
        let mut out_dims = x.dims().to_vec();
        let last = out_dims.len() - 1;
        out_dims[last] = self.out_features;
        Ok(y.reshape(out_dims)?)
    }

    fn unknown(&self, st: &State, name: &str) -> Error {
        Error::UnknownAdapter {
            what: self.name.clone(),
            name: name.into(),
            available: st.adapters.keys().cloned().collect(),
        }
    }

    fn ensure_unmerged(&self, st: &State, action: &str) -> Result<()> {
        if !st.merged.is_empty() {
            return Err(Error::MergeState {
                what: self.name.clone(),
                message: format!(
                    "cannot {action} while adapters {:?} are merged; unmerge first",
                    st.merged
                ),
            });
        }
        Ok(())
    }
}

impl Module for FourierLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.try_forward(x).map_err(Error::into_candle)
    }
}

/// Whether every value of `t` is finite.
fn all_finite(t: &Tensor) -> Result<bool> {
    let t = t.to_dtype(DType::F32)?;
    // 0·x is 0 for finite x and NaN for ±inf or NaN.
    let s = t.affine(0.0, 0.0)?.sum_all()?.to_scalar::<f32>()?;
    Ok(s == 0.0)
}

/// Standard-normal coefficients; seeded from `seed`, the layer and the adapter name when given.
fn standard_normal(
    n: usize,
    seed: Option<u64>,
    layer: &str,
    adapter: &str,
    device: &Device,
) -> Result<Tensor> {
    match seed {
        None => Ok(Tensor::randn(0f32, 1f32, n, device)?),
        Some(seed) => {
            // FNV-1a over the names, so same-shaped layers start differently but reproducibly.
            let mix = layer
                .bytes()
                .chain([0u8])
                .chain(adapter.bytes())
                .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                    (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
                });
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ mix);
            let v: Vec<f32> = (0..n)
                .map(|_| rand_distr::Distribution::sample(&rand_distr::StandardNormal, &mut rng))
                .collect();
            Ok(Tensor::from_vec(v, n, device)?)
        }
    }
}

/// Builds a [`FourierLinear`] like `candle_nn::linear(in_dim, out_dim, vb)`: W0 (`weight`,
/// `(out, in)` or `(in, out)` with `fan_in_fan_out`) and `bias` come from `vb`, and an adapter
/// named `"default"` is attached. The layer is named after `vb`'s prefix.
///
/// ```
/// use candle_core::{DType, Device};
/// use candle_nn::{VarBuilder, VarMap};
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// let cfg = fourierft::FourierFTConfig { n_frequency: 16, ..Default::default() };
/// let layer = fourierft::linear(32, 24, &cfg, vb.pp("fc1"))?;
/// assert_eq!((layer.name(), layer.num_trainable()), ("fc1", 16));
/// # Ok::<(), fourierft::Error>(())
/// ```
pub fn linear(
    in_dim: usize,
    out_dim: usize,
    config: &FourierFTConfig,
    vb: VarBuilder,
) -> Result<FourierLinear> {
    linear_b(in_dim, out_dim, true, config, vb)
}

/// Like [`linear`] without a bias.
pub fn linear_no_bias(
    in_dim: usize,
    out_dim: usize,
    config: &FourierFTConfig,
    vb: VarBuilder,
) -> Result<FourierLinear> {
    linear_b(in_dim, out_dim, false, config, vb)
}

/// Like [`linear`], with or without a bias.
pub fn linear_b(
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    config: &FourierFTConfig,
    vb: VarBuilder,
) -> Result<FourierLinear> {
    let (weight, bias) = base_parts(in_dim, out_dim, bias, config.fan_in_fan_out, &vb)?;
    let layer =
        FourierLinear::from_parts(weight, bias, config.fan_in_fan_out)?.with_name(vb.prefix());
    layer.add_adapter(DEFAULT_ADAPTER, config)?;
    Ok(layer)
}

/// The base weight (`(out, in)`, or `(in, out)` with `fan_in_fan_out`) and optional bias from
/// `vb`, with `candle_nn::linear`'s initialisers when `vb` creates them.
pub(crate) fn base_parts(
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    fan_in_fan_out: bool,
    vb: &VarBuilder,
) -> Result<(Tensor, Option<Tensor>)> {
    let shape = if fan_in_fan_out {
        (in_dim, out_dim)
    } else {
        (out_dim, in_dim)
    };
    let weight = vb.get_with_hints(shape, "weight", candle_nn::init::DEFAULT_KAIMING_NORMAL)?;
    let bias = if bias {
        let bound = 1. / (in_dim as f64).sqrt();
        let init = candle_nn::Init::Uniform {
            lo: -bound,
            up: bound,
        };
        Some(vb.get_with_hints(out_dim, "bias", init)?)
    } else {
        None
    };
    Ok((weight, bias))
}

/// The bias split by whether it trains: a frozen bias is fused into the frozen/adapted ops
/// (which give it no gradient), a trained one (a [`Var`], e.g. with PEFT's `bias = "all"`) is
/// added afterwards so that it gets its gradient.
fn split_bias(st: &State) -> (Option<&Tensor>, Option<&Tensor>) {
    match &st.bias {
        Some(b) if b.is_variable() => (None, Some(b)),
        other => (other.as_ref(), None),
    }
}

/// `y + b` for a trained bias `b`, else `y`.
fn add_bias(y: Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    Ok(match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// How [`FourierLinear`]'s unmerged forward computes the adapters' contribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ForwardMode {
    /// Materialise ΔW (pruned real FFT on CPU, tensor ops on GPU) and multiply by `W0 + ΔW`.
    Dense,
    /// `x·ΔWᵀ` per token in O(d log d) without forming ΔW (CPU only), added to the frozen base.
    Spectral,
    /// Spectral on CPU when it needs fewer operations than materialising ΔW, else Dense.
    #[default]
    Auto,
}

impl ForwardMode {
    /// Relative cost of a length-`len` real FFT, in units where a complex multiply-add is 1.
    fn fft_cost(len: usize) -> f64 {
        let l = len.max(2) as f64;
        0.5 * l * l.log2()
    }

    /// Estimated cost of the spectral product for `tokens` tokens with these entries. The
    /// per-token constant is the measured fixed overhead (copies, plan dispatch) at small d.
    fn spectral_cost(entries: &SpectralEntries, tokens: usize) -> f64 {
        let (d1, d2) = entries.shape();
        let per_token = Self::fft_cost(d1) + Self::fft_cost(d2) + entries.len() as f64 + 2000.0;
        tokens as f64 * per_token
    }

    /// Estimated cost of materialising ΔW with these entries (and adding it to the weight): one
    /// complex transform of length d1 per half-spectrum bin the entries reach, one real transform
    /// of length d2 per row of the top half (see [`crate::spectral::fft`]).
    fn dense_cost(entries: &SpectralEntries) -> f64 {
        let (d1, d2) = entries.shape();
        let bins = entries.column_groups().columns.len().min(d2 / 2 + 1);
        let rows = d1 / 2 + 1;
        bins as f64 * Self::fft_cost(d1) * 2.0 + rows as f64 * (Self::fft_cost(d2) + d2 as f64)
    }

    /// The concrete mode for one adapter.
    fn resolve(self, entries: &SpectralEntries, tokens: usize, device: &Device) -> Self {
        match self {
            ForwardMode::Auto if !device.is_cpu() => ForwardMode::Dense,
            ForwardMode::Auto
                if Self::spectral_cost(entries, tokens) < Self::dense_cost(entries) =>
            {
                ForwardMode::Spectral
            }
            ForwardMode::Auto => ForwardMode::Dense,
            other => other,
        }
    }

    /// The concrete mode for several adapters forwarded together.
    fn resolve_all(self, adapters: &[&Adapter], tokens: usize, device: &Device) -> Self {
        match self {
            ForwardMode::Auto if !device.is_cpu() => ForwardMode::Dense,
            ForwardMode::Auto => {
                let (s, d) = adapters.iter().fold((0.0, 0.0), |(s, d), a| {
                    (
                        s + Self::spectral_cost(a.entries(), tokens),
                        d + Self::dense_cost(a.entries()),
                    )
                });
                if s < d {
                    ForwardMode::Spectral
                } else {
                    ForwardMode::Dense
                }
            }
            other => other,
        }
    }
}
