//! The [`FourierLinear`] handle: its shared state, constructors and plain accessors.

use super::adapter::LayerAdapter;
use super::mode::ForwardMode;
use crate::config::FourierFTConfig;
use crate::error::{dims_str, Error, Result};
use candle_core::Tensor;
use candle_nn::Linear;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// A linear layer `y = x·W0ᵀ + b` whose weight W0 (and bias) stay frozen, plus FourierFT adapters:
/// `y = x·(W0 + Σ_active ΔW_a)ᵀ + b`, with `ΔW_a = alpha_a/(d1·d2)·Re(IDFT2(E_a∘c_a))`.
///
/// Only the adapters' spectra are [`Var`](candle_core::Var)s ([`FourierLinear::trainable_vars`]); W0 is detached
/// and never changed by training. Like a [`Var`](candle_core::Var), a `FourierLinear` is a handle: clones share the
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
    pub(super) name: String,
    pub(super) in_features: usize,
    pub(super) out_features: usize,
    pub(super) fan_in_fan_out: bool,
    pub(super) state: Arc<RwLock<State>>,
}

/// The mutable part of a layer, shared by all handles (clones) of it.
#[derive(Debug)]
pub(super) struct State {
    /// W0 as stored: `(out, in)`, or `(in, out)` with `fan_in_fan_out`. Holds the merged
    /// adapters while merged.
    pub(super) weight: Tensor,
    pub(super) bias: Option<Tensor>,
    pub(super) adapters: BTreeMap<String, LayerAdapter>,
    pub(super) active: Vec<String>,
    pub(super) disabled: bool,
    pub(super) merged: Vec<String>,
    pub(super) mode: ForwardMode,
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
    pub(super) fn read(&self) -> RwLockReadGuard<'_, State> {
        crate::sync::read(&self.state)
    }

    pub(super) fn write(&self) -> RwLockWriteGuard<'_, State> {
        crate::sync::write(&self.state)
    }

    /// The layer's name (its module path when built through [`linear`](super::linear)).
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

    /// Number of frozen parameters (weight and bias).
    pub fn num_frozen(&self) -> usize {
        let st = self.read();
        st.weight.elem_count() + st.bias.as_ref().map_or(0, |b| b.elem_count())
    }

    /// How the unmerged forward computes the adapters' contribution.
    pub fn forward_mode(&self) -> ForwardMode {
        self.read().mode
    }

    /// Sets how the unmerged forward computes the adapters' contribution.
    pub fn set_forward_mode(&self, mode: ForwardMode) {
        self.write().mode = mode;
    }

    pub(super) fn unknown(&self, st: &State, name: &str) -> Error {
        Error::UnknownAdapter {
            what: self.name.clone(),
            name: name.into(),
            available: st.adapters.keys().cloned().collect(),
        }
    }

    pub(super) fn ensure_unmerged(&self, st: &State, action: &str) -> Result<()> {
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
