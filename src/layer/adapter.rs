//! One adapter ([`LayerAdapter`]) and a layer's set of them: adding, activating, disabling,
//! deleting, replacing coefficients, and the trainable parameters they make.

use super::handle::FourierLinear;
use crate::config::FourierFTConfig;
use crate::entries::SpectralEntries;
use crate::error::{dims_str, Error, Result};
use crate::ops::DeltaWeight;
use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use std::sync::Arc;

/// One named adapter of a [`FourierLinear`] (a snapshot handle returned by
/// [`FourierLinear::adapter`]): its shared entries, trainable coefficients and `scaling`. Not to
/// be confused with [`PeftAdapter`](crate::PeftAdapter), a whole adapter directory for a model.
#[derive(Debug, Clone)]
pub struct LayerAdapter {
    pub(super) op: DeltaWeight,
    pub(super) spectrum: Var,
    pub(super) scaling: f64,
}

impl LayerAdapter {
    /// The adapter's entry positions (shared by layers of the same shape and seed).
    pub fn entries(&self) -> &Arc<SpectralEntries> {
        self.op.entries()
    }

    /// The trainable coefficients c (PEFT's `fourierft_spectrum`), f32 `[n]`.
    pub fn spectrum(&self) -> &Var {
        &self.spectrum
    }

    /// The scale, as applied: `ΔW = scaling/(d1·d2)·Re(IDFT2(E∘c))` (PEFT's `scaling`).
    pub fn scaling(&self) -> f64 {
        self.scaling
    }

    /// ΔW, f32 `(out_features, in_features)`, differentiable in the spectrum.
    pub fn delta_weight(&self) -> Result<Tensor> {
        self.op.forward(self.spectrum.as_tensor(), self.scaling)
    }
}

impl FourierLinear {
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
        let adapter = LayerAdapter {
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
    pub fn adapter(&self, name: &str) -> Result<LayerAdapter> {
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
    pub fn delete_adapter(&self, name: &str) -> Result<LayerAdapter> {
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
