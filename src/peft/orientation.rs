//! Whether an adapted weight is stored `(out, in)` (`nn.Linear`) or `(in, out)` (GPT-2's
//! `Conv1D`): decided from what is known, never guessed.
//!
//! The rules are documented on [`Orientation`].

use super::adapter::PeftAdapter;
use crate::error::{Error, Result};
use regex::Regex;
use std::collections::BTreeMap;
use std::path::Path;

/// `model_type`s (as in a Hugging Face `config.json`) whose transformers implementation stores
/// some weights as `Conv1D` (`(in, out)`).
pub const CONV1D_MODEL_TYPES: [&str; 5] = [
    "gpt2",
    "openai-gpt",
    "imagegpt",
    "decision_transformer",
    "clvp",
];

/// The last path segments of the `Conv1D` modules in those models.
pub const CONV1D_MODULES: [&str; 4] = ["c_attn", "c_proj", "c_fc", "q_attn"];

/// The shape of a base weight as stored, and the length of its 1-D bias if it has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredShape {
    /// The weight's two dimensions as stored.
    pub dims: (usize, usize),
    /// The number of entries of the module's bias, if it has a 1-D bias.
    pub bias_len: Option<usize>,
}

impl StoredShape {
    /// The layout evidence of adapted module `path`: its weight's stored `dims` and the length of
    /// its 1-D bias — the adapter's trained bias when it has one (it replaces the base's), else the
    /// base's, whose dims `base_bias` reads (called only then).
    pub fn of(
        adapter: &PeftAdapter,
        path: &str,
        dims: (usize, usize),
        base_bias: impl FnOnce() -> Option<Vec<usize>>,
    ) -> Self {
        let bias = match adapter.extra_tensors().get(&format!("{path}.bias")) {
            Some(t) => Some(t.dims().to_vec()),
            None => base_bias(),
        };
        let bias_len = match bias.as_deref() {
            Some([n]) => Some(*n),
            _ => None,
        };
        Self { dims, bias_len }
    }

    /// What the bias proves: `Some(true)` for `(in, out)`, `Some(false)` for `(out, in)`, `None`
    /// when it proves nothing (square weight, no bias, or a bias of neither length).
    fn bias_says(self) -> Option<bool> {
        let (a, b) = self.dims;
        match self.bias_len {
            Some(n) if a != b && n == a => Some(false),
            Some(n) if a != b && n == b => Some(true),
            _ => None,
        }
    }
}

/// How a merge learns each adapted weight's layout.
///
/// PEFT decides `fan_in_fan_out` per module from the module's Python type and writes it into the
/// one shared configuration as it goes, so a saved `adapter_config.json` records only the kind of
/// the *last* module it adapted. A GPT-2 adapter that targets `c_attn`, `c_proj` and an untied
/// `lm_head` says `false`, although `c_attn` and `c_proj` are `Conv1D`. Adding ΔW to a square
/// `Conv1D` weight without transposing it is wrong and no shape check notices, so each module's
/// layout comes from, in order:
///
/// 1. an explicit override ([`Orientation::with_fan_in_fan_out`], the CLI's `--fan-in-fan-out`);
/// 2. the base model's `config.json` ([`Orientation::with_model_config`]): in the model types
///    listed in [`CONV1D_MODEL_TYPES`] the modules named in [`CONV1D_MODULES`] are `Conv1D`,
///    everything else (and every module of any other model type) is `nn.Linear`;
/// 3. the bias: a non-square weight's bias has `out` entries, and a weight without a bias is
///    `nn.Linear` (transformers' `Conv1D` always has one, and PEFT only flags `Conv1D`);
/// 4. the file's flag where the module's name agrees with it: `false` for a name that is not a
///    `Conv1D` name, `true` for one that is (every transformers `Conv1D` has such a name).
///
/// Anything else is an [`Error::Config`] naming the module and what to pass.
///
/// ```
/// use fourierft::peft::Orientation;
/// let gpt2 = Orientation::new().with_model_config(&serde_json::json!({"model_type": "gpt2"}))?;
/// assert_eq!(gpt2.model_type(), Some("gpt2"));
/// let manual = Orientation::new().with_fan_in_fan_out(r".*\.(c_attn|c_proj)")?;
/// assert!(manual.overrides("h.0.attn.c_proj") == Some(true));
/// assert!(manual.overrides("lm_head") == Some(false));
/// # Ok::<(), fourierft::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct Orientation {
    fan_in_fan_out: Option<(String, Regex)>,
    model_type: Option<String>,
}

impl Orientation {
    /// Nothing known beyond the files: rules 3 and 4 of [`Orientation`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Modules whose path the regex matches in full are stored `(in, out)`; all others
    /// `(out, in)`.
    ///
    /// # Errors
    /// [`Error::Config`] if the regex does not compile.
    pub fn with_fan_in_fan_out(mut self, regex: &str) -> Result<Self> {
        let compiled = Regex::new(&format!(r"\A(?:{regex})\z")).map_err(|e| {
            Error::Config(format!(
                "--fan-in-fan-out: cannot compile regex {regex:?}: {e}"
            ))
        })?;
        self.fan_in_fan_out = Some((regex.to_string(), compiled));
        Ok(self)
    }

    /// Uses the base model's `config.json`: its `model_type`, else the model type its first
    /// `architectures` entry names (`"GPT2LMHeadModel"` ⇒ `gpt2`).
    ///
    /// # Errors
    /// [`Error::Config`] if the JSON has neither key.
    pub fn with_model_config(mut self, config: &serde_json::Value) -> Result<Self> {
        let model_type = config.get("model_type").and_then(|v| v.as_str());
        let from_arch = || {
            let arch = config.get("architectures")?.as_array()?.first()?.as_str()?;
            let known = [
                ("GPT2", "gpt2"),
                ("OpenAIGPT", "openai-gpt"),
                ("ImageGPT", "imagegpt"),
            ];
            let (_, t) = known.iter().find(|(p, _)| arch.starts_with(p))?;
            Some(*t)
        };
        let t =
            match model_type {
                Some(t) => t.to_string(),
                None => match config.get("architectures").and_then(|v| v.as_array()) {
                    Some(a) if !a.is_empty() => from_arch().unwrap_or("unknown").to_string(),
                    _ => return Err(Error::Config(
                        "the base model's config.json has no \"model_type\" or \"architectures\""
                            .into(),
                    )),
                },
            };
        self.model_type = Some(t);
        Ok(self)
    }

    /// [`with_model_config`](Self::with_model_config) from a `config.json` file.
    ///
    /// # Errors
    /// [`Error::Io`] if it cannot be read, [`Error::File`] if it is not JSON or lacks the keys.
    pub fn with_model_config_file(self, path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let file_err = |message: String| Error::File {
            path: path.to_path_buf(),
            message,
        };
        let json: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| file_err(format!("not JSON: {e}")))?;
        self.with_model_config(&json).map_err(|e| match e {
            Error::Config(m) => file_err(m),
            other => other,
        })
    }

    /// The model type taken from a `config.json`, if one was given.
    pub fn model_type(&self) -> Option<&str> {
        self.model_type.as_deref()
    }

    /// What the explicit override says for `path`, if one was given.
    pub fn overrides(&self, path: &str) -> Option<bool> {
        self.fan_in_fan_out.as_ref().map(|(_, r)| r.is_match(path))
    }

    /// What the model type says for `path`, if one is known.
    fn model_says(&self, path: &str) -> Option<bool> {
        let t = self.model_type.as_deref()?;
        Some(CONV1D_MODEL_TYPES.contains(&t) && is_conv1d_name(path))
    }

    /// Whether the weight of module `path`, stored with `shape`, is `(in, out)`.
    ///
    /// `flag` is the adapter file's `fan_in_fan_out`; `others` lists the stored shapes of every
    /// adapted module (called only for an ambiguous layer, to say in the error whether another
    /// layer proves that the flag is not global).
    ///
    /// # Errors
    /// [`Error::Config`] naming the module when the layout is ambiguous, or when what is known
    /// (override, model type) contradicts the weight's own bias.
    pub fn resolve(
        &self,
        path: &str,
        shape: StoredShape,
        flag: bool,
        others: impl FnOnce() -> Result<BTreeMap<String, StoredShape>>,
    ) -> Result<bool> {
        let (a, b) = shape.dims;
        let known = self
            .overrides(path)
            .map(|v| (v, "--fan-in-fan-out"))
            .or_else(|| self.model_says(path).map(|v| (v, "the model type")));
        if let Some((value, source)) = known {
            if let Some(by_bias) = shape.bias_says().filter(|&v| v != value) {
                return Err(Error::Config(format!(
                    "module {path:?}: {source} says its {a}x{b} weight is stored {}, but its bias \
                     of {} entries says {}",
                    layout(value),
                    shape.bias_len.unwrap_or_default(),
                    layout(by_bias)
                )));
            }
            return Ok(value);
        }
        if let Some(value) = shape.bias_says() {
            return Ok(value);
        }
        // transformers' Conv1D always has a bias, and PEFT sets fan_in_fan_out for Conv1D only.
        if shape.bias_len.is_none() {
            return Ok(false);
        }
        // Every Conv1D of transformers carries one of the CONV1D_MODULES names, so the flag
        // decides where it agrees with the name; a Conv1D-like name with `false` (or another
        // name with `true`) is where PEFT's last-module flag misleads.
        if is_conv1d_name(path) == flag {
            return Ok(flag);
        }
        let contradiction = others()?
            .into_iter()
            .find(|(_, s)| s.bias_says().is_some_and(|v| v != flag));
        let why = match contradiction {
            Some((other, s)) => format!(
                "the adapter's fan_in_fan_out={flag} records only the last module PEFT adapted, \
                 module {other:?} ({}x{} with a bias of {}) is stored {}, so the file mixes both \
                 kinds, and {path:?} is named like a {} module",
                s.dims.0,
                s.dims.1,
                s.bias_len.unwrap_or_default(),
                layout(!flag),
                conv1d_or_linear(!flag)
            ),
            None => format!(
                "the adapter's fan_in_fan_out={flag} records only the last module PEFT adapted, \
                 and {path:?} is named like a {} module",
                conv1d_or_linear(!flag)
            ),
        };
        Err(Error::Config(format!(
            "cannot tell whether the {a}x{b} weight of module {path:?} is stored (out, in) \
             (nn.Linear) or (in, out) (GPT-2 Conv1D): {why}; give the base model's config.json \
             (--base-config) or the (in, out) modules as a regex (--fan-in-fan-out)"
        )))
    }
}

fn conv1d_or_linear(fan_in_fan_out: bool) -> &'static str {
    if fan_in_fan_out {
        "GPT-2 Conv1D"
    } else {
        "nn.Linear"
    }
}

/// Whether the last segment of `path` is one of [`CONV1D_MODULES`].
fn is_conv1d_name(path: &str) -> bool {
    let last = path.rsplit('.').next().unwrap_or(path);
    CONV1D_MODULES.contains(&last)
}

fn layout(fan_in_fan_out: bool) -> &'static str {
    if fan_in_fan_out {
        "(in, out)"
    } else {
        "(out, in)"
    }
}
