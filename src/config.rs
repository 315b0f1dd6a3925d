//! Adapter configuration, with PEFT's names and defaults.

use crate::entries::EntrySampling;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// Configuration of a FourierFT adapter.
///
/// Field names and defaults are PEFT's `FourierFTConfig`: `n_frequency = 1000`,
/// `scaling = 150.0`, `random_loc_seed = 777`, `init_weights = false` (standard-normal
/// coefficients; `true` gives zeros, so the adapter starts as the identity), `fan_in_fan_out = false`.
///
/// ```
/// use fourierft::FourierFTConfig;
/// let cfg = FourierFTConfig { n_frequency: 64, ..Default::default() };
/// assert_eq!((cfg.scaling, cfg.random_loc_seed, cfg.init_weights), (150.0, 777, false));
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FourierFTConfig {
    /// Number of trainable spectral coefficients n per layer.
    pub n_frequency: usize,
    /// The scale alpha of ΔW.
    pub scaling: f64,
    /// Seed of the entry positions (same seed and shape ⇒ same positions, as in PEFT).
    pub random_loc_seed: u64,
    /// `false`: coefficients start standard normal (PEFT's default); `true`: zeros.
    pub init_weights: bool,
    /// `true` for GPT-2 style Conv1D weights stored `(in, out)`; merge then adds ΔWᵀ.
    pub fan_in_fan_out: bool,
    /// How entry positions are chosen; PEFT's uniform `randperm` by default.
    /// Not part of PEFT's file format.
    #[serde(skip)]
    pub entry_sampling: EntrySampling,
    /// Seed of the coefficient initialisation (`init_weights = false`), mixed with the layer's
    /// name and the adapter's name. `None`: non-deterministic, like torch's global generator.
    /// Not part of PEFT's file format.
    #[serde(skip)]
    pub init_seed: Option<u64>,
}

impl Default for FourierFTConfig {
    fn default() -> Self {
        Self {
            n_frequency: 1000,
            scaling: 150.0,
            random_loc_seed: 777,
            init_weights: false,
            fan_in_fan_out: false,
            entry_sampling: EntrySampling::Uniform,
            init_seed: None,
        }
    }
}

impl FourierFTConfig {
    /// Checks values that do not depend on a layer's shape.
    pub fn validate(&self) -> Result<()> {
        if self.n_frequency == 0 {
            return Err(Error::Config(
                "n_frequency must be at least 1, found 0".into(),
            ));
        }
        if !self.scaling.is_finite() {
            return Err(Error::Config(format!(
                "scaling must be finite, found {}",
                self.scaling
            )));
        }
        Ok(())
    }
}
