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
    /// The scale of ΔW (α in the paper): `ΔW = scaling/(d1·d2)·Re(IDFT2(E∘c))`.
    pub scaling: f64,
    /// Seed of the entry positions (same seed and shape ⇒ same positions, as in PEFT).
    ///
    /// A negative JSON value (PEFT writes what it was given; `torch.Generator().manual_seed`
    /// accepts `-2^63 ..= 2^64-1`) reads as torch maps it: modulo 2^64, so `-5` is `2^64 - 5`.
    #[serde(deserialize_with = "torch_seed::deserialize")]
    pub random_loc_seed: u64,
    /// `false`: coefficients start standard normal (PEFT's default); `true`: zeros.
    pub init_weights: bool,
    /// `true` for GPT-2 style Conv1D weights stored `(in, out)`; merge then adds ΔWᵀ.
    /// PEFT overrides it per module (`false` for `nn.Linear`, `true` for `Conv1D`), so in a saved
    /// file it only records the kind of the last module PEFT adapted.
    pub fan_in_fan_out: bool,
    /// The modules to adapt: a list of names (a module matches one if its path equals it or ends
    /// with `.name`) or a regular expression that must match the whole path.
    ///
    /// PEFT's two shorthands are resolved as PEFT resolves them: `"all-linear"` (any case) is every
    /// linear layer but the model's output layer (set [`output_head`](Self::output_head), or call
    /// [`expand_all_linear`](Self::expand_all_linear)); unset (`None`) is PEFT's default for the
    /// model type ([`with_model_type`](Self::with_model_type)). An adapter read from or written to
    /// a PEFT directory holds the expanded list, as PEFT writes it.
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
    /// For `target_modules = "all-linear"`: the path of the model's output layer, which PEFT
    /// leaves out (its `get_output_embeddings()`, e.g. `"lm_head"`); `""` for a model without one
    /// (a `SEQ_CLS` model's top-level `score` / `classifier` is then left out, as in PEFT). Only
    /// used while the shorthand is unexpanded. Not part of PEFT's file format.
    #[serde(skip)]
    pub output_head: Option<String>,
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
            peft_type: PEFT_TYPE.to_string(),
            task_type: None,
            inference_mode: false,
            base_model_name_or_path: None,
            revision: None,
            auto_mapping: None,
            peft_version: None,
            entry_sampling: EntrySampling::Uniform,
            output_head: None,
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
        // PEFT tests `layers_pattern` for truth: an empty string or list needs no indices.
        let has_pattern = match &self.layers_pattern {
            None => false,
            Some(OneOrMany::One(p)) => !p.is_empty(),
            Some(OneOrMany::Many(v)) => !v.is_empty(),
        };
        if has_pattern && self.layers_to_transform.is_none() {
            return Err(Error::Config(
                "layers_pattern requires layers_to_transform".into(),
            ));
        }
        Ok(())
    }
}

/// PEFT's `INCLUDE_LINEAR_LAYERS_SHORTHAND`.
pub const ALL_LINEAR: &str = "all-linear";

/// The heads PEFT leaves out of `"all-linear"` for a `SEQ_CLS` model without output embeddings
/// (`SEQ_CLS_HEAD_NAMES`, top-level modules).
const SEQ_CLS_HEAD_NAMES: [&str; 2] = ["score", "classifier"];

/// PEFT's default `target_modules` for FourierFT by `model_type`
/// (`TRANSFORMERS_MODELS_TO_FOURIERFT_TARGET_MODULES_MAPPING` of PEFT 0.21.2: LoRA's table with
/// `gpt2` and `gpt_bigcode` set to `mlp.c_proj`). A string is a regex.
const DEFAULT_TARGETS: &[(&str, &[&str])] = &[
    ("t5", &["q", "v"]),
    ("mt5", &["q", "v"]),
    ("bart", &["q_proj", "v_proj"]),
    ("gpt2", &["mlp.c_proj"]),
    ("bloom", &["query_key_value"]),
    ("blip-2", &["q", "v", "q_proj", "v_proj"]),
    ("opt", &["q_proj", "v_proj"]),
    ("gptj", &["q_proj", "v_proj"]),
    ("gpt_neox", &["query_key_value"]),
    ("gpt_neo", &["q_proj", "v_proj"]),
    ("bert", &["query", "value"]),
    ("roberta", &["query", "value"]),
    ("xlm-roberta", &["query", "value"]),
    ("electra", &["query", "value"]),
    ("deberta-v2", &["query_proj", "value_proj"]),
    ("deberta", &["in_proj"]),
    ("layoutlm", &["query", "value"]),
    ("llama", &["q_proj", "v_proj"]),
    ("llama4", &["q_proj", "v_proj"]),
    ("chatglm", &["query_key_value"]),
    ("gpt_bigcode", &["mlp.c_proj"]),
    ("mpt", &["Wqkv"]),
    ("RefinedWebModel", &["query_key_value"]),
    ("RefinedWeb", &["query_key_value"]),
    ("falcon", &["query_key_value"]),
    ("btlm", &["c_proj", "c_attn"]),
    ("codegen", &["qkv_proj"]),
    ("mistral", &["q_proj", "v_proj"]),
    ("mixtral", &["q_proj", "v_proj"]),
    ("stablelm", &["q_proj", "v_proj"]),
    ("phi", &["q_proj", "v_proj", "fc1", "fc2"]),
    ("gemma", &["q_proj", "v_proj"]),
    ("gemma2", &["q_proj", "v_proj"]),
    ("gemma3_text", &["q_proj", "v_proj"]),
    ("qwen2", &["q_proj", "v_proj"]),
    ("qwen3", &["q_proj", "v_proj"]),
    ("nemotron_h", &["q_proj", "k_proj", "v_proj", "o_proj"]),
    ("rwkv", &["key", "value", "receptance", "output"]),
    (
        "rwkv7",
        &["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
    ),
];

/// PEFT's default FourierFT `target_modules` for a transformers `model_type` (the `model_type` of
/// the base model's `config.json`), or `None` for a model type PEFT has no default for.
///
/// ```
/// use fourierft::config::{default_target_modules, ModuleSelector};
/// let names = |v: &[&str]| ModuleSelector::Names(v.iter().map(|s| s.to_string()).collect());
/// assert_eq!(default_target_modules("llama"), Some(names(&["q_proj", "v_proj"])));
/// assert_eq!(default_target_modules("gpt2"), Some(names(&["mlp.c_proj"])));
/// assert_eq!(default_target_modules("my_model"), None);
/// ```
pub fn default_target_modules(model_type: &str) -> Option<ModuleSelector> {
    if model_type == "gemma4" {
        return Some(ModuleSelector::Regex(
            r".*language_model\..*\.(q_proj|v_proj)".into(),
        ));
    }
    DEFAULT_TARGETS
        .iter()
        .find(|(t, _)| *t == model_type)
        .map(|(_, names)| ModuleSelector::Names(names.iter().map(|n| n.to_string()).collect()))
}

impl FourierFTConfig {
    /// Whether `target_modules` is PEFT's `"all-linear"` shorthand (compared case-insensitively,
    /// as PEFT does).
    pub fn is_all_linear(&self) -> bool {
        matches!(&self.target_modules, Some(ModuleSelector::Regex(s)) if s.eq_ignore_ascii_case(ALL_LINEAR))
    }

    /// Fills an unset `target_modules` with PEFT's default for `model_type` (the base model's
    /// `config.json` `model_type`), as PEFT's `_prepare_adapter_config` does; a set one is kept.
    ///
    /// # Errors
    /// [`Error::Config`] when `target_modules` is unset and PEFT has no default for `model_type`
    /// (PEFT raises "Please specify `target_modules` in `peft_config`").
    ///
    /// ```
    /// use fourierft::{config::ModuleSelector, FourierFTConfig};
    /// let cfg = FourierFTConfig::default().with_model_type("bert")?;
    /// assert_eq!(cfg.target_modules, Some(ModuleSelector::Names(vec!["query".into(), "value".into()])));
    /// assert!(FourierFTConfig::default().with_model_type("my_model").is_err());
    /// # Ok::<(), fourierft::Error>(())
    /// ```
    pub fn with_model_type(mut self, model_type: &str) -> Result<Self> {
        if self.target_modules.is_none() {
            let targets = default_target_modules(model_type).ok_or_else(|| {
                Error::Config(format!(
                    "target_modules is not set and PEFT has no FourierFT default for model_type                      {model_type:?}: list the modules to adapt"
                ))
            })?;
            self.target_modules = Some(targets);
        }
        Ok(self)
    }

    /// Expands `target_modules = "all-linear"` as PEFT's `_maybe_include_all_linear_layers` does,
    /// given the paths of every linear layer of the model (`nn.Linear` and GPT-2 `Conv1D`) and the
    /// path of its output layer (`get_output_embeddings()`, e.g. `"lm_head"`; `None` when it has
    /// none): every linear layer but the output layer and, for a `SEQ_CLS` model without one, its
    /// top-level `score` or `classifier`. The result is the sorted list PEFT writes into
    /// `adapter_config.json`. Any other `target_modules` is returned unchanged.
    ///
    /// ```
    /// use fourierft::{config::ModuleSelector, FourierFTConfig};
    /// let cfg = FourierFTConfig { target_modules: Some(ModuleSelector::Regex("all-linear".into())), ..Default::default() };
    /// let cfg = cfg.expand_all_linear(["layers.0.q", "layers.0.v", "lm_head"], Some("lm_head"));
    /// assert_eq!(cfg.target_modules, Some(ModuleSelector::Names(vec!["layers.0.q".into(), "layers.0.v".into()])));
    /// ```
    pub fn expand_all_linear<I, S>(&self, linear_paths: I, output_head: Option<&str>) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut out = self.clone();
        if !self.is_all_linear() {
            return out;
        }
        let mut names: Vec<String> = linear_paths
            .into_iter()
            .map(|p| p.as_ref().to_string())
            .collect();
        let seq_cls_head = output_head.is_none() && self.task_type.as_deref() == Some("SEQ_CLS");
        let head: Option<&str> = SEQ_CLS_HEAD_NAMES
            .iter()
            .copied()
            .find(|h| seq_cls_head && names.iter().any(|n| n == h));
        names.retain(|n| Some(n.as_str()) != output_head && Some(n.as_str()) != head);
        names.sort();
        names.dedup();
        out.target_modules = Some(ModuleSelector::Names(names));
        out.output_head = None;
        out
    }

    /// Whether `path` is left out of `"all-linear"` as the model's output layer, per
    /// [`output_head`](Self::output_head) (`None` when that is unset).
    pub(crate) fn is_output_head(&self, path: &str) -> Option<bool> {
        let head = self.output_head.as_deref()?;
        Some(if head.is_empty() {
            self.task_type.as_deref() == Some("SEQ_CLS") && SEQ_CLS_HEAD_NAMES.contains(&path)
        } else {
            path == head
        })
    }
}

/// PEFT's `target_modules` / `exclude_modules`: a list of names or one regex.
///
/// In JSON a list is `["q", "v"]` and a regex is a string; see
/// [`ModuleMatcher`](crate::peft::ModuleMatcher) for the matching rules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
#[non_exhaustive]
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
#[non_exhaustive]
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

/// Reads `random_loc_seed` as torch's `manual_seed` takes it: any integer in `-2^63 ..= 2^64-1`,
/// negative values modulo 2^64 (two's complement).
mod torch_seed {
    use serde::de::{Error, Visitor};
    use serde::Deserializer;
    use std::fmt;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        struct Seed;
        impl Visitor<'_> for Seed {
            type Value = u64;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an integer in -2^63 ..= 2^64-1 (torch's manual_seed range)")
            }
            fn visit_u64<E: Error>(self, v: u64) -> Result<u64, E> {
                Ok(v)
            }
            fn visit_i64<E: Error>(self, v: i64) -> Result<u64, E> {
                // torch: "Negative inputs are remapped to positive values" modulo 2^64.
                Ok(v as u64)
            }
        }
        d.deserialize_i64(Seed)
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
