//! `PeftAdapter`: an adapter directory in PEFT's format, read and written.

use super::io::{self, file_error, OutTensor};
use super::target::ModuleMatcher;
use crate::config::{FourierFTConfig, PEFT_TYPE};
use crate::entries::EntrySampling;
use crate::error::{dims_str, Error, Result};
use crate::layer::DEFAULT_ADAPTER;
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// File name of the adapter configuration.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// File name of the adapter tensors.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// Prefix of every tensor name in [`WEIGHTS_FILE`].
pub const KEY_PREFIX: &str = "base_model.model.";
/// Suffix of the spectrum tensors: `base_model.model.<module path>.fourierft_spectrum`.
pub const SPECTRUM_SUFFIX: &str = ".fourierft_spectrum";
/// The PEFT version whose format this crate writes, recorded as `peft_version` when the
/// configuration has none.
pub const PEFT_FORMAT_VERSION: &str = "0.21.2";

/// A FourierFT adapter as PEFT stores it: the configuration and, per adapted module, its
/// spectrum (`[n]` coefficients), plus the other tensors PEFT may save with it (trained biases
/// with `bias != "none"`, `modules_to_save` weights).
///
/// Entry positions are not stored: they are regenerated bit-exactly from `random_loc_seed` and
/// each layer's shape. Every constructor validates: the spectra are finite f32 `[n]` tensors with
/// `n` as the configuration says for their module, and each module is one the configuration
/// targets.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use fourierft::config::ModuleSelector;
/// use fourierft::peft::PeftAdapter;
/// use fourierft::FourierFTConfig;
/// let cfg = FourierFTConfig {
///     n_frequency: 3,
///     target_modules: Some(ModuleSelector::Names(vec!["fc1".into()])),
///     ..Default::default()
/// };
/// let spectrum = Tensor::new(&[1f32, -2.0, 0.5], &Device::Cpu)?;
/// let adapter = PeftAdapter::new(cfg, [("fc1".to_string(), spectrum)].into(), Default::default())?;
/// let dir = std::env::temp_dir().join(format!("fourierft-doc-{}", std::process::id()));
/// adapter.save(&dir, "default")?;
/// let back = PeftAdapter::load(&dir)?;
/// assert_eq!(back.spectrum("fc1").unwrap().to_vec1::<f32>()?, vec![1.0, -2.0, 0.5]);
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct PeftAdapter {
    matcher: ModuleMatcher,
    spectra: BTreeMap<String, Tensor>,
    extra: BTreeMap<String, Tensor>,
    source: Option<PathBuf>,
}

/// Where PEFT keeps adapter `name` under `root`: `root` itself for `"default"`, else `root/name`.
pub fn adapter_dir(root: impl AsRef<Path>, name: &str) -> PathBuf {
    let root = root.as_ref();
    if name == DEFAULT_ADAPTER {
        root.to_path_buf()
    } else {
        root.join(name)
    }
}

impl PeftAdapter {
    /// An adapter from a configuration and tensors.
    ///
    /// `spectra` maps module paths (e.g. `encoder.layer.0.attention.self.query`) to coefficients
    /// (any float dtype, stored as f32 on the CPU); `extra` maps base-model tensor names (e.g.
    /// `classifier.weight`, `fc1.bias`) to tensors that replace the base model's.
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid configuration; [`Error::Shape`], [`Error::DType`],
    /// [`Error::Config`] for a spectrum that is not a finite float `[n]` tensor for a targeted
    /// module.
    pub fn new(
        config: FourierFTConfig,
        spectra: BTreeMap<String, Tensor>,
        extra: BTreeMap<String, Tensor>,
    ) -> Result<Self> {
        let matcher = ModuleMatcher::new(&config)?;
        let spectra = spectra
            .into_iter()
            .map(|(path, t)| {
                let t = check_spectrum(&matcher, &path, &t, "")?;
                Ok((path, t))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            matcher,
            spectra,
            extra,
            source: None,
        })
    }

    /// Reads adapter `name` saved under `root` the way PEFT's `save_pretrained` lays it out
    /// (see [`adapter_dir`]).
    pub fn load_named(root: impl AsRef<Path>, name: &str) -> Result<Self> {
        Self::load(adapter_dir(root, name))
    }

    /// Reads the adapter in directory `dir` ([`CONFIG_FILE`] and [`WEIGHTS_FILE`]).
    ///
    /// Unknown JSON keys are ignored. Tensors named `base_model.model.<path>.fourierft_spectrum`
    /// become spectra; other `base_model.model.*` tensors (trained biases, `modules_to_save`)
    /// become extra tensors named as in the base model (`.base_layer.` and `.modules_to_save.`
    /// dropped from the name; PEFT's `.original_module.` copies skipped).
    ///
    /// # Errors
    /// A typed error naming the file and tensor for: a missing file ([`Error::Io`]); invalid JSON,
    /// a `peft_type` other than `"FOURIERFT"`, corrupt safetensors, a tensor name without the
    /// `base_model.model.` prefix, a spectrum for a module the configuration does not target,
    /// non-finite values, no spectrum at all ([`Error::File`]); a spectrum whose shape is not
    /// `[n]` ([`Error::Shape`]).
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let config_path = dir.join(CONFIG_FILE);
        let text = io::read(&config_path)?;
        let config: FourierFTConfig = serde_json::from_slice(&text)
            .map_err(|e| file_error(&config_path, format!("invalid adapter config: {e}")))?;
        if config.peft_type != PEFT_TYPE {
            return Err(file_error(
                &config_path,
                format!(
                    "peft_type is {:?}, expected {PEFT_TYPE:?}: not a FourierFT adapter",
                    config.peft_type
                ),
            ));
        }
        let matcher = ModuleMatcher::new(&config).map_err(|e| match e {
            Error::Config(m) => file_error(&config_path, m),
            other => other,
        })?;

        let path = dir.join(WEIGHTS_FILE);
        let bytes = io::read(&path)?;
        let st = io::parse_safetensors(&path, &bytes)?;
        let mut spectra = BTreeMap::new();
        let mut extra = BTreeMap::new();
        let mut names: Vec<&str> = st.iter().map(|(name, _)| name).collect();
        // Direct names before `.modules_to_save.` copies, so the direct one wins.
        names.sort_by_key(|n| (n.contains(".modules_to_save."), *n));
        for name in names {
            let view = st
                .tensor(name)
                .map_err(|e| file_error(&path, format!("tensor {name:?}: {e}")))?;
            let rest = name.strip_prefix(KEY_PREFIX).ok_or_else(|| {
                file_error(
                    &path,
                    format!("unexpected tensor {name:?}: names must start with {KEY_PREFIX:?}"),
                )
            })?;
            if let Some(module) = rest.strip_suffix(SPECTRUM_SUFFIX) {
                let t = io::load_view(&path, name, &view)?;
                let what = format!(" in {}", path.display());
                let t = check_spectrum(&matcher, module, &t, &what).map_err(|e| match e {
                    Error::Config(m) => file_error(&path, m),
                    other => other,
                })?;
                spectra.insert(module.to_string(), t);
            } else if rest.contains("fourierft_") {
                return Err(file_error(
                    &path,
                    format!(
                        "unexpected tensor {name:?}: FourierFT tensors must be named \
                         {KEY_PREFIX}<module>{SPECTRUM_SUFFIX}"
                    ),
                ));
            } else if !rest.contains(".original_module.") {
                let base_name = rest
                    .replace(".modules_to_save.", ".")
                    .replace(".base_layer.", ".");
                if extra.contains_key(&base_name) {
                    continue;
                }
                let t = io::load_view(&path, name, &view)?;
                if let Some((i, x)) = io::first_non_finite(&t)? {
                    return Err(file_error(
                        &path,
                        format!("tensor {name:?} has a non-finite value ({x}) at flat index {i}"),
                    ));
                }
                extra.insert(base_name, t);
            }
        }
        if spectra.is_empty() {
            return Err(file_error(
                &path,
                format!("no {KEY_PREFIX}<module>{SPECTRUM_SUFFIX} tensor: not a FourierFT adapter"),
            ));
        }
        Ok(Self {
            matcher,
            spectra,
            extra,
            source: Some(path),
        })
    }

    /// Writes the adapter in PEFT's layout: into `root` for adapter name `"default"`, else into
    /// `root/<name>` (see [`adapter_dir`]). Returns that directory.
    ///
    /// [`WEIGHTS_FILE`] holds `base_model.model.<path>.fourierft_spectrum` (f32 `[n]`) per module
    /// and the extra tensors (a bias of an adapted module as `<path>.base_layer.bias`), with
    /// metadata `{"format": "pt"}`; [`CONFIG_FILE`] holds the configuration with sorted keys, as
    /// PEFT writes it, with `inference_mode: true` and `peft_version` defaulting to
    /// [`PEFT_FORMAT_VERSION`]. Each file is written to a temporary file and renamed.
    ///
    /// # Errors
    /// [`Error::Config`] if the configuration's `entry_sampling` is not PEFT's uniform sampling
    /// (the file format cannot record it); [`Error::Io`] / [`Error::File`] if writing fails.
    pub fn save(&self, root: impl AsRef<Path>, name: &str) -> Result<PathBuf> {
        if self.config().entry_sampling != EntrySampling::Uniform {
            return Err(Error::Config(format!(
                "entry_sampling {:?} cannot be saved in PEFT's format, which regenerates entries \
                 with uniform sampling from random_loc_seed",
                self.config().entry_sampling
            )));
        }
        let dir = adapter_dir(root, name);
        std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
            path: dir.clone(),
            source,
        })?;
        let mut tensors = Vec::with_capacity(self.spectra.len() + self.extra.len());
        for (path, t) in &self.spectra {
            let key = format!("{KEY_PREFIX}{path}{SPECTRUM_SUFFIX}");
            tensors.push((key, OutTensor::owned(t)?));
        }
        for (name, t) in &self.extra {
            let key = match name.rsplit_once('.') {
                Some((module, param)) if self.spectra.contains_key(module) => {
                    format!("{KEY_PREFIX}{module}.base_layer.{param}")
                }
                _ => format!("{KEY_PREFIX}{name}"),
            };
            tensors.push((key, OutTensor::owned(t)?));
        }
        io::write_safetensors(&dir.join(WEIGHTS_FILE), tensors, HashMap::new())?;

        let mut config = self.config().clone();
        config.inference_mode = true;
        if config.peft_version.is_none() {
            config.peft_version = Some(PEFT_FORMAT_VERSION.into());
        }
        let json = sorted_json(&serde_json::to_value(&config).map_err(|e| {
            Error::Config(format!("cannot serialise the adapter configuration: {e}"))
        })?);
        let text = serde_json::to_string_pretty(&json).map_err(|e| {
            Error::Config(format!("cannot serialise the adapter configuration: {e}"))
        })?;
        io::write_bytes(&dir.join(CONFIG_FILE), text.as_bytes())?;
        Ok(dir)
    }

    /// The configuration.
    pub fn config(&self) -> &FourierFTConfig {
        self.matcher.config()
    }

    /// The compiled matching rules of the configuration.
    pub fn matcher(&self) -> &ModuleMatcher {
        &self.matcher
    }

    /// The spectra by module path, f32 `[n]` on the CPU.
    pub fn spectra(&self) -> &BTreeMap<String, Tensor> {
        &self.spectra
    }

    /// The spectrum of the module at `path`.
    pub fn spectrum(&self, path: &str) -> Option<&Tensor> {
        self.spectra.get(path)
    }

    /// Tensors that replace base-model tensors of the same name (trained biases,
    /// `modules_to_save`).
    pub fn extra_tensors(&self) -> &BTreeMap<String, Tensor> {
        &self.extra
    }

    /// The file the adapter was read from, if any.
    pub fn source(&self) -> Option<&Path> {
        self.source.as_deref()
    }

    /// Describes tensor `key` of this adapter for error messages.
    pub(crate) fn describe(&self, key: &str) -> String {
        match &self.source {
            Some(p) => format!("tensor {key:?} of {}", p.display()),
            None => format!("tensor {key:?} of the adapter"),
        }
    }

    /// Number of spectral coefficients over all modules.
    pub fn num_coefficients(&self) -> usize {
        self.spectra.values().map(|t| t.elem_count()).sum()
    }
}

/// Checks a spectrum for module `path` and returns it as f32 on the CPU.
fn check_spectrum(matcher: &ModuleMatcher, path: &str, t: &Tensor, what: &str) -> Result<Tensor> {
    let key = format!("{KEY_PREFIX}{path}{SPECTRUM_SUFFIX}");
    if !matcher.is_target(path) {
        return Err(Error::Config(format!(
            "unmatched key {key:?}: module {path:?} is not targeted by the adapter configuration \
             (target_modules {:?})",
            matcher.config().target_modules
        )));
    }
    if !t.dtype().is_float() {
        return Err(Error::DType {
            what: format!("{key}{what}"),
            expected: "a float dtype".into(),
            found: t.dtype(),
        });
    }
    let n = matcher.n_frequency(path);
    if t.dims() != [n] {
        return Err(Error::Shape {
            what: format!("{key}{what}"),
            expected: format!("[{n}] (n_frequency of {path:?} per the adapter configuration)"),
            found: dims_str(t.dims()),
        });
    }
    let t = t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    if let Some((i, x)) = io::first_non_finite(&t)? {
        return Err(Error::Config(format!(
            "{key}{what} has a non-finite value ({x}) at index {i}"
        )));
    }
    Ok(t)
}

/// `v` with every object's keys sorted (PEFT writes `json.dumps(..., sort_keys=True)`).
fn sorted_json(v: &serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(map) => {
            let sorted: BTreeMap<&String, serde_json::Value> =
                map.iter().map(|(k, v)| (k, sorted_json(v))).collect();
            serde_json::Value::Object(sorted.into_iter().map(|(k, v)| (k.clone(), v)).collect())
        }
        serde_json::Value::Array(items) => {
            serde_json::Value::Array(items.iter().map(sorted_json).collect())
        }
        other => other.clone(),
    }
}
