//! `PeftAdapter`: an adapter directory in PEFT's format, read and written.

use super::io::{self, file_error, OutTensor};
use super::parse::check_spectrum;
use super::target::ModuleMatcher;
use crate::config::FourierFTConfig;
use crate::entries::EntrySampling;
use crate::error::{Error, Result};
use crate::layer::DEFAULT_ADAPTER;
use candle_core::Tensor;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// File name of the adapter configuration.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// File name of the adapter tensors.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// File name of the adapter tensors in PyTorch's pickle format (`torch.save`, PEFT's
/// `save_pretrained(safe_serialization=False)`), read when there is no [`WEIGHTS_FILE`].
pub const BIN_WEIGHTS_FILE: &str = "adapter_model.bin";
/// Prefix of every tensor name in [`WEIGHTS_FILE`].
pub const KEY_PREFIX: &str = "base_model.model.";
/// Suffix of the spectrum tensors: `base_model.model.<module path>.fourierft_spectrum`.
pub const SPECTRUM_SUFFIX: &str = ".fourierft_spectrum";
/// The name of module `path`'s spectrum in [`WEIGHTS_FILE`]:
/// `base_model.model.<path>.fourierft_spectrum`.
pub fn spectrum_key(path: &str) -> String {
    format!("{KEY_PREFIX}{path}{SPECTRUM_SUFFIX}")
}

/// The name under which PEFT saves parameter `param` (e.g. `weight`, `bias`) of the base layer
/// of adapted module `path`: `base_model.model.<path>.base_layer.<param>`.
pub(crate) fn base_layer_key(path: &str, param: &str) -> String {
    format!("{KEY_PREFIX}{path}.base_layer.{param}")
}

/// The PEFT version whose format this crate writes, recorded as `peft_version` when the
/// configuration has none.
pub const PEFT_FORMAT_VERSION: &str = "0.21.2";

/// How errors name the configuration given to [`PeftAdapter::from_bytes`].
const MEMORY_CONFIG: &str = "<adapter_config.json>";
/// How errors name the tensors given to [`PeftAdapter::from_bytes`].
const MEMORY_WEIGHTS: &str = "<adapter_model.safetensors>";
/// How errors name the tensors given to [`PeftAdapter::from_bin_bytes`].
const MEMORY_BIN: &str = "<adapter_model.bin>";

/// A configuration whose `target_modules` is `"all-linear"`, as read from a file or given with
/// spectra, with `target_modules` set to the sorted modules of `spectra`: what PEFT writes (it
/// saves the list it expanded) when it adapted exactly those modules.
pub(super) fn resolve_from_spectra<'a>(
    mut config: FourierFTConfig,
    spectra: impl IntoIterator<Item = &'a str>,
) -> FourierFTConfig {
    if config.is_all_linear() {
        let mut names: Vec<String> = spectra.into_iter().map(str::to_string).collect();
        names.sort();
        names.dedup();
        config.target_modules = Some(crate::config::ModuleSelector::Names(names));
        config.output_head = None;
    }
    config
}

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
    pub(super) matcher: ModuleMatcher,
    pub(super) spectra: BTreeMap<String, Tensor>,
    pub(super) extra: BTreeMap<String, Tensor>,
    pub(super) source: Option<PathBuf>,
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
    /// [`Error::Config`] for an invalid configuration or no spectrum at all; [`Error::Shape`],
    /// [`Error::DType`], [`Error::Config`] for a spectrum that is not a finite F32/F16/BF16/F64
    /// `[n]` tensor for a targeted module.
    pub fn new(
        config: FourierFTConfig,
        spectra: BTreeMap<String, Tensor>,
        extra: BTreeMap<String, Tensor>,
    ) -> Result<Self> {
        // "all-linear" is saved expanded, as PEFT does: to the modules that have a spectrum.
        let config = resolve_from_spectra(config, spectra.keys().map(String::as_str));
        let matcher = ModuleMatcher::new(&config)?;
        if spectra.is_empty() {
            return Err(Error::Config(
                "an adapter needs at least one spectrum (no module was adapted)".into(),
            ));
        }
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

    /// Reads the adapter in directory `dir`: [`CONFIG_FILE`] and [`WEIGHTS_FILE`], or, when there
    /// is no [`WEIGHTS_FILE`], [`BIN_WEIGHTS_FILE`] (PEFT's precedence in `load_peft_weights`;
    /// see [`from_bin_bytes`](Self::from_bin_bytes)).
    ///
    /// Files from any PEFT release read as that release reads them: `layers_to_transform` finds
    /// layer indices with the regexes of the `peft_version` that wrote the file (see
    /// [`ModuleMatcher`]); tensor names without the `base_model.model.` prefix (PEFT's low-level
    /// `get_peft_model_state_dict`, as the transformers integration saves) load like prefixed ones;
    /// a negative `random_loc_seed` is taken modulo 2^64 as torch does; a `target_modules` of
    /// `"all-linear"` (PEFT saves the expanded list instead) targets the modules with spectra.
    ///
    /// Unknown JSON keys are ignored. Tensors named `base_model.model.<path>.fourierft_spectrum`
    /// become spectra; other `base_model.model.*` tensors (trained biases, `modules_to_save`)
    /// become extra tensors named as in the base model (`.base_layer.` and `.modules_to_save.`
    /// dropped from the name; PEFT's `.original_module.` copies skipped).
    ///
    /// Spectra may be stored as F32, F16, BF16 or F64 (PEFT loads any of them into its f32
    /// parameter); they are converted to f32.
    ///
    /// # Errors
    /// A typed error naming the file and tensor for: a missing file ([`Error::Io`]); invalid JSON
    /// or a value of the wrong type (naming the key), an invalid configuration, a `peft_type`
    /// other than `"FOURIERFT"`, unset `target_modules` (PEFT would fill it from the model type;
    /// see [`FourierFTConfig::with_model_type`]), corrupt or truncated safetensors or `.bin`, the
    /// same tensor with and without the `base_model.model.` prefix, a spectrum for a module the
    /// configuration does not target,
    /// non-finite values, no spectrum at all ([`Error::File`]); a spectrum whose shape is not
    /// `[n]` ([`Error::Shape`]) or whose dtype is not a float one ([`Error::DType`]).
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let config_path = dir.join(CONFIG_FILE);
        let text = io::read(&config_path)?;
        // PEFT's load_peft_weights: the safetensors file if it exists, else the pickle.
        let path = dir.join(WEIGHTS_FILE);
        let bin = dir.join(BIN_WEIGHTS_FILE);
        let pickled = !path.exists() && bin.exists();
        let path = if pickled { bin } else { path };
        let bytes = io::read(&path)?;
        Self::parse(
            &text,
            &config_path,
            &bytes,
            &path,
            pickled,
            Some(path.clone()),
        )
    }

    /// Parses an adapter from the contents of its two files: `config_json` as in
    /// [`CONFIG_FILE`] and `safetensors` as in [`WEIGHTS_FILE`], with exactly the rules and
    /// errors of [`load`](Self::load) (which reads the files and calls this). Error messages name
    /// `<adapter_config.json>` and `<adapter_model.safetensors>` as the files; nothing is read from
    /// or written to disk.
    ///
    /// ```
    /// use fourierft::peft::PeftAdapter;
    /// let config = r#"{"peft_type": "FOURIERFT", "n_frequency": 2, "target_modules": ["fc1"]}"#;
    /// let header = br#"{"base_model.model.fc1.fourierft_spectrum":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    /// let mut st = (header.len() as u64).to_le_bytes().to_vec();
    /// st.extend_from_slice(header);
    /// st.extend([1f32, -2.0].iter().flat_map(|x| x.to_le_bytes()));
    /// let adapter = PeftAdapter::from_bytes(config, &st)?;
    /// assert_eq!(adapter.spectrum("fc1").unwrap().to_vec1::<f32>()?, vec![1.0, -2.0]);
    ///
    /// let err = PeftAdapter::from_bytes(config, &st[..st.len() - 1]).unwrap_err();
    /// assert!(err.to_string().starts_with("<adapter_model.safetensors>: not a valid safetensors file"));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// Those of [`load`](Self::load), except [`Error::Io`].
    pub fn from_bytes(config_json: impl AsRef<[u8]>, safetensors: &[u8]) -> Result<Self> {
        Self::parse(
            config_json.as_ref(),
            Path::new(MEMORY_CONFIG),
            safetensors,
            Path::new(MEMORY_WEIGHTS),
            false,
            None,
        )
    }

    /// Like [`from_bytes`](Self::from_bytes), with the tensors as PEFT's [`BIN_WEIGHTS_FILE`]: a
    /// `torch.save` zip archive of the state dict. It is read with candle's pickle reader behind a
    /// validating pass (no Python, no code execution: only the opcodes of a state dict, sizes
    /// checked before any allocation); every tensor gets the checks of the safetensors path.
    /// Error messages name `<adapter_model.bin>`.
    ///
    /// # Errors
    /// Those of [`from_bytes`](Self::from_bytes); [`Error::File`] for an archive that is not a
    /// `torch.save` state dict of contiguous little-endian tensors (PyTorch's legacy non-zip
    /// format included).
    pub fn from_bin_bytes(config_json: impl AsRef<[u8]>, bin: &[u8]) -> Result<Self> {
        Self::parse(
            config_json.as_ref(),
            Path::new(MEMORY_CONFIG),
            bin,
            Path::new(MEMORY_BIN),
            true,
            None,
        )
    }

    /// Writes the adapter in PEFT's layout: into `root` for adapter name `"default"`, else into
    /// `root/<name>` (see [`adapter_dir`]). Returns that directory.
    ///
    /// [`WEIGHTS_FILE`] holds `base_model.model.<path>.fourierft_spectrum` (f32 `[n]`) per module
    /// and the extra tensors (a bias of an adapted module as `<path>.base_layer.bias`), with
    /// metadata `{"format": "pt"}`; [`CONFIG_FILE`] holds the configuration with sorted keys, as
    /// PEFT writes it, with `inference_mode: true` and `peft_version` defaulting to
    /// [`PEFT_FORMAT_VERSION`]. Both files are written to temporary files first and then renamed
    /// into place, so a failed save changes neither.
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
            let key = spectrum_key(path);
            tensors.push((key, OutTensor::owned(t)?));
        }
        for (name, t) in &self.extra {
            let key = match name.rsplit_once('.') {
                Some((module, param)) if self.spectra.contains_key(module) => {
                    base_layer_key(module, param)
                }
                _ => format!("{KEY_PREFIX}{name}"),
            };
            tensors.push((key, OutTensor::owned(t)?));
        }
        let weights_path = dir.join(WEIGHTS_FILE);
        let weights = io::safetensors_bytes(&weights_path, tensors, HashMap::new())?;

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
        // Both files are written before either replaces an existing one.
        io::write_files(&[
            (weights_path, &weights),
            (dir.join(CONFIG_FILE), text.as_bytes()),
        ])?;
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

    /// Every non-spectrum tensor of the adapter, named as in the base model: trained biases,
    /// `modules_to_save` weights, and stored base weights of adapted modules (see
    /// [`stored_base_weight`](Self::stored_base_weight)). [`replacements`](Self::replacements)
    /// and [`stored_base_weight`](Self::stored_base_weight) split them by role.
    pub fn extra_tensors(&self) -> &BTreeMap<String, Tensor> {
        &self.extra
    }

    /// The base weight `W0` of adapted module `path` as stored in the adapter, if it is.
    ///
    /// PEFT saves `base_model.model.<path>.base_layer.weight` when it saves embedding layers
    /// (`save_embedding_layers`, on by default when `lm_head` or `embed_tokens` is targeted).
    /// Loading such an adapter puts that weight into the model, so the merged weight is this
    /// `W0` plus ΔW — never this `W0` alone. This is the one rule for an extra tensor that names
    /// an adapted weight; merging and the merged backend both use it.
    pub fn stored_base_weight(&self, path: &str) -> Option<&Tensor> {
        if !self.spectra.contains_key(path) {
            return None;
        }
        self.extra.get(&format!("{path}.weight"))
    }

    /// The extra tensors that replace the base tensor of the same name (trained biases,
    /// `modules_to_save` weights): [`extra_tensors`](Self::extra_tensors) without stored base
    /// weights of adapted modules, which are merged instead.
    pub fn replacements(&self) -> impl Iterator<Item = (&String, &Tensor)> {
        self.extra
            .iter()
            .filter(|(name, _)| !self.is_stored_base_weight(name))
    }

    /// Whether extra tensor `name` is the stored base weight of an adapted module.
    pub(crate) fn is_stored_base_weight(&self, name: &str) -> bool {
        name.strip_suffix(".weight")
            .is_some_and(|path| self.spectra.contains_key(path))
    }

    /// The file the adapter was read from, if any.
    pub fn source(&self) -> Option<&Path> {
        self.source.as_deref()
    }

    /// The adapter's weights file for error messages: its path, or how
    /// [`from_bytes`](Self::from_bytes) names it.
    pub(crate) fn weights_label(&self) -> PathBuf {
        self.source
            .clone()
            .unwrap_or_else(|| PathBuf::from(MEMORY_WEIGHTS))
    }

    /// The [`Error::File`] for a module the configuration targets but the adapter has no
    /// spectrum for (PEFT would silently keep a random initialisation there); `context` says
    /// where the module was found.
    pub(crate) fn missing_spectrum(&self, path: &str, context: &str) -> Error {
        file_error(
            &self.weights_label(),
            format!(
                "missing tensor \"{}\": the adapter configuration targets module {path:?}{context}",
                spectrum_key(path)
            ),
        )
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
