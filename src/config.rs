//! Adapter configuration: PEFT's `FourierFTConfig`, with its names, defaults and JSON format.

use crate::entries::EntrySampling;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// The only `peft_type` this crate reads and writes.
pub const PEFT_TYPE: &str = "FOURIERFT";

/// Configuration of a FourierFT adapter: PEFT's `FourierFTConfig` (the content of
/// `adapter_config.json`), plus two settings of this crate that are not part of the file format.
///
/// Field names and defaults are PEFT's: `n_frequency = 1000`, `scaling = 150.0`,
/// `random_loc_seed = 777`, `init_weights = false` (standard-normal coefficients; `true` gives
/// zeros, so the adapter starts as the identity), `fan_in_fan_out = false`, `bias = "none"`.
/// The per-layer fields (`n_frequency`, `scaling`, `random_loc_seed`, `init_weights`,
/// `fan_in_fan_out`) are what [`FourierLinear::add_adapter`](crate::FourierLinear::add_adapter)
/// uses; the model-level fields (`target_modules`, `n_frequency_pattern`, ...) are used by
/// [`peft::ModuleMatcher`](crate::peft::ModuleMatcher) and [`inject`](crate::inject). Unknown JSON
/// keys are ignored, as PEFT does.
///
/// ```
/// use fourierft::FourierFTConfig;
/// let cfg = FourierFTConfig { n_frequency: 64, ..Default::default() };
/// assert_eq!((cfg.scaling, cfg.random_loc_seed, cfg.init_weights), (150.0, 777, false));
///
/// let json = r#"{"peft_type": "FOURIERFT", "n_frequency": 90, "target_modules": ["fc1"],
///                "n_frequency_pattern": {"fc2": 50}, "some_future_key": 1}"#;
/// let cfg: FourierFTConfig = serde_json::from_str(json)?;
/// assert_eq!(cfg.n_frequency_pattern, vec![("fc2".to_string(), 50)]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
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
    /// PEFT overrides it per module (`false` for `nn.Linear`, `true` for `Conv1D`), so in a saved
    /// file it only records the kind of the last module PEFT adapted.
    pub fan_in_fan_out: bool,
    /// The modules to adapt: a list of names (a module matches one if its path equals it or ends
    /// with `.name`) or a regular expression that must match the whole path.
    pub target_modules: Option<ModuleSelector>,
    /// Modules never adapted: a list (exact or `.name` suffix) or a full-match regex.
    pub exclude_modules: Option<ModuleSelector>,
    /// Which biases PEFT trains and saves with the adapter.
    pub bias: Bias,
    /// Modules trained in full and saved with the adapter (e.g. a classifier head); never adapted.
    pub modules_to_save: Option<Vec<String>>,
    /// Only adapt modules inside these layer indices (with a list `target_modules` only).
    pub layers_to_transform: Option<OneOrMany<usize>>,
    /// The name(s) of the layer list holding the indices of `layers_to_transform`, e.g. `"layers"`
    /// or `"h"`; by default the first numbered path segment after the first two segments.
    pub layers_pattern: Option<OneOrMany<String>>,
    /// Per-module `n_frequency`, in order: the first key `k` such that the regex `.*\.k$` matches
    /// the module path wins; otherwise a key equal to the path; otherwise `n_frequency`.
    #[serde(with = "ordered_map")]
    pub n_frequency_pattern: Vec<(String, usize)>,
    /// The normalisation of the inverse 2-D DFT (newer PEFT versions); see [`Ifft2Norm`].
    /// Written to JSON only when not the default `"backward"`.
    #[serde(skip_serializing_if = "Ifft2Norm::is_backward")]
    pub ifft2_norm: Ifft2Norm,
    /// Must be `"FOURIERFT"`.
    pub peft_type: String,
    /// PEFT's task type (e.g. `"SEQ_CLS"`), kept as given.
    pub task_type: Option<String>,
    /// Whether the adapter is for inference only; adapters are saved with `true`, as PEFT does.
    pub inference_mode: bool,
    /// The base model the adapter was trained on, kept as given.
    pub base_model_name_or_path: Option<String>,
    /// The revision of the base model, kept as given.
    pub revision: Option<String>,
    /// PEFT's `auto_mapping`, kept as given.
    pub auto_mapping: Option<serde_json::Value>,
    /// The PEFT version that wrote the file, kept as given.
    pub peft_version: Option<String>,
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
            target_modules: None,
            exclude_modules: None,
            bias: Bias::None,
            modules_to_save: None,
            layers_to_transform: None,
            layers_pattern: None,
            n_frequency_pattern: Vec::new(),
            ifft2_norm: Ifft2Norm::Backward,
            peft_type: PEFT_TYPE.to_string(),
            task_type: None,
            inference_mode: false,
            base_model_name_or_path: None,
            revision: None,
            auto_mapping: None,
            peft_version: None,
            entry_sampling: EntrySampling::Uniform,
            init_seed: None,
        }
    }
}

impl FourierFTConfig {
    /// Checks values that do not depend on a layer's shape, with PEFT's rules: `n_frequency >= 1`
    /// (also in `n_frequency_pattern`), finite `scaling`, `peft_type == "FOURIERFT"`, and
    /// `layers_to_transform` / `layers_pattern` only with a list `target_modules`,
    /// `layers_pattern` only with `layers_to_transform`.
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
        if self.peft_type != PEFT_TYPE {
            return Err(Error::Config(format!(
                "peft_type must be {PEFT_TYPE:?}, found {:?}",
                self.peft_type
            )));
        }
        if let Some((key, _)) = self.n_frequency_pattern.iter().find(|(_, n)| *n == 0) {
            return Err(Error::Config(format!(
                "n_frequency_pattern[{key:?}] must be at least 1, found 0"
            )));
        }
        if matches!(self.target_modules, Some(ModuleSelector::Regex(_))) {
            for (key, set) in [
                ("layers_to_transform", self.layers_to_transform.is_some()),
                ("layers_pattern", self.layers_pattern.is_some()),
            ] {
                if set {
                    return Err(Error::Config(format!(
                        "{key} cannot be used when target_modules is a regex string"
                    )));
                }
            }
        }
        if self.layers_pattern.is_some() && self.layers_to_transform.is_none() {
            return Err(Error::Config(
                "layers_pattern requires layers_to_transform".into(),
            ));
        }
        Ok(())
    }

    /// The scale to give the adapter of a `d1 x d2` layer so that ΔW follows
    /// [`ifft2_norm`](Self::ifft2_norm): `scaling · d1·d2 / norm`, where `norm` is
    /// [`Ifft2Norm::divisor`]. Equals `scaling` for the default `"backward"`.
    ///
    /// ```
    /// use fourierft::{config::Ifft2Norm, FourierFTConfig};
    /// let cfg = FourierFTConfig { scaling: 2.0, ifft2_norm: Ifft2Norm::Ortho, ..Default::default() };
    /// assert_eq!(cfg.effective_scaling(4, 9), 2.0 * 6.0);
    /// ```
    pub fn effective_scaling(&self, d1: usize, d2: usize) -> f64 {
        // Written out per norm rather than `scaling·size/divisor`, which is 0/0 for an empty
        // layer (and rounds `scaling` for the default).
        let size = d1 as f64 * d2 as f64;
        match self.ifft2_norm {
            Ifft2Norm::Backward => self.scaling,
            Ifft2Norm::Ortho => self.scaling * size.sqrt(),
            Ifft2Norm::Forward => self.scaling * size,
        }
    }
}

/// PEFT's `target_modules` / `exclude_modules`: a list of names or one regex.
///
/// In JSON a list is `["q", "v"]` and a regex is a string; see
/// [`ModuleMatcher`](crate::peft::ModuleMatcher) for the matching rules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ModuleSelector {
    /// A module matches if its path equals a name or ends with `.name`.
    Names(Vec<String>),
    /// A module matches if the regex matches its whole path.
    Regex(String),
}

/// `target_modules` (or another selector) for error messages: the selector, or `unset`.
pub(crate) fn shown_selector(sel: Option<&ModuleSelector>) -> String {
    sel.map_or_else(|| "unset".to_string(), ToString::to_string)
}

/// As in error messages: `["q", "v"]` for names, `regex "..."` for a regex.
///
/// ```
/// use fourierft::config::ModuleSelector;
/// let names = ModuleSelector::Names(vec!["q".into(), "v".into()]);
/// assert_eq!(names.to_string(), r#"["q", "v"]"#);
/// assert_eq!(ModuleSelector::Regex(r"h\.\d+".into()).to_string(), r#"regex "h\\.\\d+""#);
/// ```
impl std::fmt::Display for ModuleSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModuleSelector::Names(names) => write!(f, "{names:?}"),
            ModuleSelector::Regex(r) => write!(f, "regex {r:?}"),
        }
    }
}

/// PEFT's `bias` setting: which biases are trained and saved with the adapter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bias {
    /// No bias is trained (PEFT's default).
    #[default]
    None,
    /// Every bias of the model is trained and saved.
    All,
    /// The biases of the adapted layers are trained and saved.
    FourierOnly,
}

/// A JSON value that is either one item or a list of items, kept as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    /// A single item.
    One(T),
    /// A list of items.
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    /// The items as a slice.
    pub fn as_slice(&self) -> &[T] {
        match self {
            OneOrMany::One(x) => std::slice::from_ref(x),
            OneOrMany::Many(v) => v,
        }
    }
}

/// The normalisation of the inverse 2-D DFT that turns the sparse spectrum into ΔW, as
/// `torch.fft.ifft2(norm=...)`. PEFT up to 0.21 always uses `"backward"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ifft2Norm {
    /// Divide by `d1·d2` (torch's default).
    #[default]
    Backward,
    /// Divide by `sqrt(d1·d2)`.
    Ortho,
    /// No division.
    Forward,
}

impl Ifft2Norm {
    /// What the inverse DFT divides by for a `d1 x d2` layer: `d1·d2`, `sqrt(d1·d2)` or `1`.
    pub fn divisor(self, d1: usize, d2: usize) -> f64 {
        let size = d1 as f64 * d2 as f64;
        match self {
            Ifft2Norm::Backward => size,
            Ifft2Norm::Ortho => size.sqrt(),
            Ifft2Norm::Forward => 1.0,
        }
    }

    fn is_backward(&self) -> bool {
        *self == Ifft2Norm::Backward
    }
}

/// (De)serialises `Vec<(String, usize)>` as a JSON object in order; `null` reads as empty.
mod ordered_map {
    use serde::de::{MapAccess, Visitor};
    use serde::ser::SerializeMap;
    use serde::{Deserializer, Serializer};
    use std::fmt;

    pub fn serialize<S: Serializer>(v: &[(String, usize)], s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(v.len()))?;
        for (k, n) in v {
            map.serialize_entry(k, n)?;
        }
        map.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(String, usize)>, D::Error> {
        struct Ordered;
        impl<'de> Visitor<'de> for Ordered {
            type Value = Vec<(String, usize)>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object mapping module names or regexes to n_frequency, or null")
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Vec::new())
            }
            fn visit_none<E>(self) -> Result<Self::Value, E> {
                Ok(Vec::new())
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                d.deserialize_map(Ordered)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry::<String, usize>()? {
                    out.push(entry);
                }
                Ok(out)
            }
        }
        d.deserialize_option(Ordered)
    }
}
