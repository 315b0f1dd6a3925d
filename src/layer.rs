//! `FourierLinear`: a frozen linear layer plus one or more FourierFT adapters.

use crate::config::FourierFTConfig;
use crate::entries::SpectralEntries;
use crate::error::{dims_str, Error, Result};
use crate::ops::DeltaWeight;
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{Linear, VarBuilder};
use rand::SeedableRng;
use std::collections::BTreeMap;
use std::sync::Arc;

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

    /// The scale alpha.
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
/// and never changed by training. [`merge`](FourierLinear::merge) folds the active adapters into
/// the weight for inference; [`unmerge`](FourierLinear::unmerge) takes them out again.
///
/// ```
/// use candle_core::{Device, Module, Tensor};
/// use fourierft::{FourierFTConfig, FourierLinear};
/// let dev = Device::Cpu;
/// let base = candle_nn::Linear::new(Tensor::randn(0f32, 0.1, (8, 12), &dev)?, None);
/// let cfg = FourierFTConfig { n_frequency: 20, init_seed: Some(0), ..Default::default() };
/// let mut layer = FourierLinear::new(base, &cfg)?;
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
    /// W0 as stored: `(out, in)`, or `(in, out)` with `fan_in_fan_out`. Holds the merged
    /// adapters while merged.
    weight: Tensor,
    bias: Option<Tensor>,
    in_features: usize,
    out_features: usize,
    fan_in_fan_out: bool,
    adapters: BTreeMap<String, Adapter>,
    active: Vec<String>,
    disabled: bool,
    merged: Vec<String>,
}

/// The name PEFT gives an adapter when none is given.
pub const DEFAULT_ADAPTER: &str = "default";

impl FourierLinear {
    /// Wraps `linear` (weight `(out, in)`) and attaches an adapter named `"default"`.
    pub fn new(linear: Linear, config: &FourierFTConfig) -> Result<Self> {
        let weight = linear.weight().clone();
        let mut layer = Self::from_parts(weight, linear.bias().cloned(), config.fan_in_fan_out)?;
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
            weight: weight.detach(),
            bias: bias.map(|b| b.detach()),
            in_features,
            out_features,
            fan_in_fan_out,
            adapters: BTreeMap::new(),
            active: Vec::new(),
            disabled: false,
            merged: Vec::new(),
        })
    }

    /// Sets the name used in error messages and in seeding (e.g. the module path).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
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
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The frozen bias.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Adds an adapter named `name`, with entries sampled per `config` (shared with every layer of
    /// the same shape and seed) and coefficients initialised per `config.init_weights`.
    /// It becomes active if no adapter was active.
    pub fn add_adapter(&mut self, name: &str, config: &FourierFTConfig) -> Result<()> {
        config.validate()?;
        if self.adapters.contains_key(name) {
            return Err(Error::AdapterExists {
                what: self.name.clone(),
                name: name.into(),
            });
        }
        if config.fan_in_fan_out != self.fan_in_fan_out {
            return Err(Error::Config(format!(
                "{}: adapter {name:?} has fan_in_fan_out = {} but the layer was built with {}",
                self.name, config.fan_in_fan_out, self.fan_in_fan_out
            )));
        }
        let (d1, d2) = (self.out_features, self.in_features);
        let n = config.n_frequency;
        let entries =
            SpectralEntries::sample(d1, d2, n, config.random_loc_seed, &config.entry_sampling)
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
        let device = self.weight.device();
        let spectrum = if config.init_weights {
            Var::zeros(n, DType::F32, device)?
        } else {
            Var::from_tensor(&standard_normal(
                n,
                config.init_seed,
                &self.name,
                name,
                device,
            )?)?
        };
        let adapter = Adapter {
            op: DeltaWeight::new(entries),
            spectrum,
            scaling: config.scaling,
        };
        self.adapters.insert(name.to_string(), adapter);
        if self.active.is_empty() {
            self.active.push(name.to_string());
        }
        Ok(())
    }

    /// The adapter named `name`.
    pub fn adapter(&self, name: &str) -> Result<&Adapter> {
        self.adapters.get(name).ok_or_else(|| self.unknown(name))
    }

    /// Names of all adapters, sorted.
    pub fn adapter_names(&self) -> Vec<&str> {
        self.adapters.keys().map(String::as_str).collect()
    }

    /// Names of the active adapters, in activation order.
    pub fn active_adapters(&self) -> &[String] {
        &self.active
    }

    /// Makes exactly these adapters active (an empty list deactivates all).
    /// Not allowed while merged.
    pub fn set_active_adapters(&mut self, names: &[&str]) -> Result<()> {
        self.ensure_unmerged("change the active adapters")?;
        for n in names {
            self.adapter(n)?;
        }
        self.active = names.iter().map(|s| s.to_string()).collect();
        self.active.dedup();
        Ok(())
    }

    /// Turns all adapters off (the layer computes the base output only). Not allowed while merged.
    pub fn disable_adapters(&mut self) -> Result<()> {
        self.ensure_unmerged("disable adapters")?;
        self.disabled = true;
        Ok(())
    }

    /// Turns the active adapters back on.
    pub fn enable_adapters(&mut self) {
        self.disabled = false;
    }

    /// Whether adapters are disabled.
    pub fn adapters_disabled(&self) -> bool {
        self.disabled
    }

    /// Removes an adapter (and deactivates it). Not allowed while it is merged.
    pub fn delete_adapter(&mut self, name: &str) -> Result<Adapter> {
        if self.merged.iter().any(|m| m == name) {
            return Err(self.merge_state(format!(
                "cannot delete adapter {name:?} while it is merged; unmerge first"
            )));
        }
        let adapter = self
            .adapters
            .remove(name)
            .ok_or_else(|| self.unknown(name))?;
        self.active.retain(|a| a != name);
        Ok(adapter)
    }

    /// Replaces the coefficients of adapter `name` (e.g. loaded from a file); f32 `[n]`.
    pub fn set_spectrum(&mut self, name: &str, values: &Tensor) -> Result<()> {
        let what = format!("{} adapter {name:?}", self.name);
        self.ensure_unmerged("replace a spectrum")?;
        let adapter = self.adapter(name)?;
        let n = adapter.entries().len();
        if values.dims() != [n] {
            return Err(Error::Shape {
                what: format!("fourierft_spectrum of {what}"),
                expected: format!("[{n}]"),
                found: dims_str(values.dims()),
            });
        }
        let values = values
            .to_dtype(DType::F32)?
            .to_device(self.weight.device())?;
        adapter.spectrum.set(&values)?;
        Ok(())
    }

    /// The spectra of the active adapters: the only parameters to train.
    pub fn trainable_vars(&self) -> Vec<Var> {
        self.active
            .iter()
            .filter_map(|a| self.adapters.get(a))
            .map(|a| a.spectrum.clone())
            .collect()
    }

    /// Number of trainable parameters (coefficients of all adapters).
    pub fn num_trainable(&self) -> usize {
        self.adapters.values().map(|a| a.entries().len()).sum()
    }

    /// Number of frozen parameters (weight and bias).
    pub fn num_frozen(&self) -> usize {
        self.weight.elem_count() + self.bias.as_ref().map_or(0, |b| b.elem_count())
    }

    /// Sum of ΔW over `names`, f32 in the weight's storage layout.
    fn delta_sum(&self, names: &[String]) -> Result<Option<Tensor>> {
        let mut sum: Option<Tensor> = None;
        for name in names {
            let dw = self.adapter(name)?.delta_weight()?;
            sum = Some(match sum {
                None => dw,
                Some(s) => (s + dw)?,
            });
        }
        Ok(match sum {
            Some(s) if self.fan_in_fan_out => Some(s.t()?.contiguous()?),
            other => other,
        })
    }

    /// `weight + sign·Σ ΔW`, computed in f32 and cast back to the weight's dtype once.
    fn shifted_weight(&self, names: &[String], sign: f64) -> Result<Tensor> {
        match self.delta_sum(names)? {
            None => Ok(self.weight.clone()),
            Some(dw) => {
                let w = self.weight.to_dtype(DType::F32)?;
                let dw = dw.to_device(w.device())?;
                let out = if sign > 0.0 { (w + dw)? } else { (w - dw)? };
                Ok(out.to_dtype(self.weight.dtype())?)
            }
        }
    }

    /// Folds the active, not yet merged adapters into the weight. Forward then uses the merged
    /// weight only. Non-finite values are not checked: see [`safe_merge`](Self::safe_merge).
    pub fn merge(&mut self) -> Result<()> {
        self.merge_checked(false)
    }

    /// Like [`merge`](Self::merge), but returns [`Error::NonFinite`] and leaves the weight
    /// untouched if the merged weight has any NaN or infinite value.
    pub fn safe_merge(&mut self) -> Result<()> {
        self.merge_checked(true)
    }

    fn merge_checked(&mut self, check: bool) -> Result<()> {
        if self.disabled {
            return Err(self.merge_state("cannot merge while adapters are disabled".into()));
        }
        let todo: Vec<String> = self
            .active
            .iter()
            .filter(|a| !self.merged.contains(a))
            .cloned()
            .collect();
        if todo.is_empty() {
            return Ok(());
        }
        let merged = self.shifted_weight(&todo, 1.0)?;
        if check && !all_finite(&merged)? {
            return Err(Error::NonFinite {
                what: self.name.clone(),
                adapters: todo,
            });
        }
        self.weight = merged;
        self.merged.extend(todo);
        Ok(())
    }

    /// Takes every merged adapter out of the weight again (W = W − Σ ΔW, with the current
    /// coefficients).
    pub fn unmerge(&mut self) -> Result<()> {
        if self.merged.is_empty() {
            return Ok(());
        }
        self.weight = self.shifted_weight(&self.merged, -1.0)?;
        self.merged.clear();
        Ok(())
    }

    /// Whether any adapter is merged into the weight.
    pub fn is_merged(&self) -> bool {
        !self.merged.is_empty()
    }

    /// Names of the merged adapters.
    pub fn merged_adapters(&self) -> &[String] {
        &self.merged
    }

    /// The forward pass with a typed error: `x` has shape `(..., in_features)` with at least 2 dims.
    pub fn try_forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        if dims.len() < 2 || dims[dims.len() - 1] != self.in_features {
            return Err(Error::Shape {
                what: format!("input of {}", self.name),
                expected: format!("(batch, [seq,] {})", self.in_features),
                found: dims_str(dims),
            });
        }
        let weight = if self.disabled || self.is_merged() {
            self.weight.clone()
        } else {
            self.shifted_weight(&self.active, 1.0)?
        };
        let lead: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((lead, self.in_features))?;
        let w = if self.fan_in_fan_out {
            weight
        } else {
            weight.t()?
        };
        let mut y = x2.matmul(&w)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        let mut out_dims = dims.to_vec();
        out_dims[dims.len() - 1] = self.out_features;
        Ok(y.reshape(out_dims)?)
    }

    fn unknown(&self, name: &str) -> Error {
        Error::UnknownAdapter {
            what: self.name.clone(),
            name: name.into(),
            available: self.adapters.keys().cloned().collect(),
        }
    }

    fn merge_state(&self, message: String) -> Error {
        Error::MergeState {
            what: self.name.clone(),
            message,
        }
    }

    fn ensure_unmerged(&self, action: &str) -> Result<()> {
        if self.is_merged() {
            return Err(self.merge_state(format!(
                "cannot {action} while adapters {:?} are merged; unmerge first",
                self.merged
            )));
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
    let shape = if config.fan_in_fan_out {
        (in_dim, out_dim)
    } else {
        (out_dim, in_dim)
    };
    let init = candle_nn::init::DEFAULT_KAIMING_NORMAL;
    let weight = vb.get_with_hints(shape, "weight", init)?;
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
    let mut layer =
        FourierLinear::from_parts(weight, bias, config.fan_in_fan_out)?.with_name(vb.prefix());
    layer.add_adapter(DEFAULT_ADAPTER, config)?;
    Ok(layer)
}
