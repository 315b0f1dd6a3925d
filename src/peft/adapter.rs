//! `PeftAdapter`: an adapter directory in PEFT's format, read and written.

use super::io::{self, file_error, OutTensor};
use super::pickle;
use super::target::ModuleMatcher;
use crate::config::{shown_selector, FourierFTConfig, PEFT_TYPE};
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

/// The tensors of a weights file: safetensors or a `torch.save` archive.
enum Weights<'a> {
    SafeTensors(safetensors::SafeTensors<'a>),
    Pickle(BTreeMap<String, pickle::PthTensor>),
}

impl Weights<'_> {
    fn names(&self) -> Vec<&str> {
        match self {
            Weights::SafeTensors(st) => st.iter().map(|(name, _)| name).collect(),
            Weights::Pickle(map) => map.keys().map(String::as_str).collect(),
        }
    }

    /// Declared dtype and shape of tensor `name` (before any data is converted).
    fn layout(&self, path: &Path, name: &str) -> Result<(DType, Vec<usize>)> {
        match self {
            Weights::SafeTensors(st) => {
                let view = st
                    .tensor(name)
                    .map_err(|e| file_error(path, format!("tensor {name:?}: {e}")))?;
                Ok((
                    io::candle_dtype(path, name, view.dtype())?,
                    view.shape().to_vec(),
                ))
            }
            Weights::Pickle(map) => {
                let t = map
                    .get(name)
                    .ok_or_else(|| file_error(path, format!("tensor {name:?} is missing")))?;
                Ok((t.dtype, t.shape.clone()))
            }
        }
    }

    fn load(&self, path: &Path, name: &str) -> Result<Tensor> {
        match self {
            Weights::SafeTensors(st) => {
                let view = st
                    .tensor(name)
                    .map_err(|e| file_error(path, format!("tensor {name:?}: {e}")))?;
                io::load_view(path, name, &view)
            }
            Weights::Pickle(map) => map
                .get(name)
                .ok_or_else(|| file_error(path, format!("tensor {name:?} is missing")))?
                .load(path, name),
        }
    }
}

/// A configuration whose `target_modules` is `"all-linear"`, as read from a file or given with
/// spectra, with `target_modules` set to the sorted modules of `spectra`: what PEFT writes (it
/// saves the list it expanded) when it adapted exactly those modules.
fn resolve_from_spectra<'a>(
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

    /// The shared body of [`load`](Self::load), [`from_bytes`](Self::from_bytes) and
    /// [`from_bin_bytes`](Self::from_bin_bytes); the paths only label errors.
    fn parse(
        text: &[u8],
        config_path: &Path,
        bytes: &[u8],
        path: &Path,
        pickled: bool,
        source: Option<PathBuf>,
    ) -> Result<Self> {
        let config = parse_config(config_path, text)?;
        if config.is_all_linear() {
            // Checked before the tensors are read, with the shorthand's own message.
            config.validate().map_err(|e| match e {
                Error::Config(m) => file_error(config_path, m),
                other => other,
            })?;
        } else {
            ModuleMatcher::new(&config).map_err(|e| match e {
                Error::Config(m) => file_error(config_path, m),
                other => other,
            })?;
        }

        let weights = if pickled {
            Weights::Pickle(pickle::read_state_dict(path, bytes)?)
        } else {
            Weights::SafeTensors(io::parse_safetensors(path, bytes)?)
        };
        // PEFT's names start with `base_model.model.`; PEFT's low-level API
        // (`get_peft_model_state_dict` of a model given to `inject_adapter_in_model`, as the
        // transformers integration saves) writes them without, and `set_peft_model_state_dict`
        // loads both.
        let mut by_module: BTreeMap<&str, &str> = BTreeMap::new();
        let mut names = weights.names();
        // Direct names before `.modules_to_save.` copies, so the direct one wins.
        names.sort_by_key(|&n| {
            let rest = n.strip_prefix(KEY_PREFIX).unwrap_or(n);
            (rest.contains(".modules_to_save."), rest, n)
        });
        for &name in &names {
            let rest = name.strip_prefix(KEY_PREFIX).unwrap_or(name);
            if let Some(other) = by_module.insert(rest, name) {
                return Err(file_error(
                    path,
                    format!(
                        "tensors {other:?} and {name:?} name the same model tensor (with and \
                         without the {KEY_PREFIX:?} prefix)"
                    ),
                ));
            }
        }
        // A file whose target_modules is "all-linear" (PEFT never saves it: it writes the list it
        // expanded) targets the modules it has spectra for.
        let spectrum_modules = by_module
            .keys()
            .filter_map(|r| r.strip_suffix(SPECTRUM_SUFFIX));
        let config = resolve_from_spectra(config, spectrum_modules);
        let matcher = ModuleMatcher::new(&config).map_err(|e| match e {
            Error::Config(m) => file_error(config_path, m),
            other => other,
        })?;

        let mut spectra = BTreeMap::new();
        let mut extra = BTreeMap::new();
        for name in names {
            let rest = name.strip_prefix(KEY_PREFIX).unwrap_or(name);
            if let Some(module) = rest.strip_suffix(SPECTRUM_SUFFIX) {
                // Check the declared dtype and shape before converting any data.
                let what = format!(" in {}", path.display());
                let key = format!("{name}{what}");
                check_target(&matcher, module).map_err(|e| match e {
                    Error::Config(m) => file_error(path, m),
                    other => other,
                })?;
                let (dtype, shape) = weights.layout(path, name)?;
                check_spectrum_layout(&matcher, module, &key, dtype, &shape)?;
                let t = weights.load(path, name)?;
                let t = check_spectrum(&matcher, module, &t, &what).map_err(|e| match e {
                    Error::Config(m) => file_error(path, m),
                    other => other,
                })?;
                spectra.insert(module.to_string(), t);
            } else if rest.contains("fourierft_") {
                return Err(file_error(
                    path,
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
                let t = weights.load(path, name)?;
                if let Some((i, x)) = io::first_non_finite(path, name, &t)? {
                    return Err(file_error(
                        path,
                        format!("tensor {name:?} has a non-finite value ({x}) at flat index {i}"),
                    ));
                }
                extra.insert(base_name, t);
            }
        }
        if spectra.is_empty() {
            return Err(file_error(
                path,
                format!("no {KEY_PREFIX}<module>{SPECTRUM_SUFFIX} tensor: not a FourierFT adapter"),
            ));
        }
        Ok(Self {
            matcher,
            spectra,
            extra,
            source,
        })
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

/// Parses the text of an adapter configuration and checks its `peft_type`; errors name
/// `config_path` and, for a bad value, its key.
fn parse_config(config_path: &Path, text: &[u8]) -> Result<FourierFTConfig> {
    let config: FourierFTConfig = serde_json::from_slice(text).map_err(|e| {
        let culprit = culprit_key(text, &e).map_or(String::new(), |k| format!("key {k:?}: "));
        file_error(config_path, format!("invalid adapter config: {culprit}{e}"))
    })?;
    // serde also reads a struct from a JSON array; PEFT's file is an object.
    let Ok(map) = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(text) else {
        return Err(file_error(
            config_path,
            "invalid adapter config: expected a JSON object",
        ));
    };
    check_unread_keys(config_path, &map)?;
    // PEFT dispatches on `peft_type`, so a file without it is no adapter of any kind.
    if !map.contains_key("peft_type") {
        return Err(file_error(
            config_path,
            format!("peft_type is missing, expected {PEFT_TYPE:?}: not a PEFT adapter config"),
        ));
    }
    if config.peft_type != PEFT_TYPE {
        return Err(file_error(
            config_path,
            format!(
                "peft_type is {:?}, expected {PEFT_TYPE:?}: not a FourierFT adapter",
                config.peft_type
            ),
        ));
    }
    Ok(config)
}

/// Refuses keys that change ΔW but that no PEFT release reads.
///
/// `ifft2_norm` comes from an unmerged PEFT pull request: released PEFT ignores it (with a warning)
/// and always uses `"backward"`, so an adapter trained with another value would compute a ΔW of a
/// different scale in PEFT than where it was trained. `"backward"` (or `null`) means the same as
/// no key and is accepted.
fn check_unread_keys(
    config_path: &Path,
    map: &serde_json::Map<String, serde_json::Value>,
) -> Result<()> {
    match map.get("ifft2_norm") {
        None | Some(serde_json::Value::Null) => Ok(()),
        Some(serde_json::Value::String(s)) if s == "backward" => Ok(()),
        Some(other) => Err(file_error(
            config_path,
            format!(
                "key \"ifft2_norm\" is {other}: no PEFT release reads this key (it always uses \
                 \"backward\", dividing by d1·d2), so this adapter's ΔW has a scale that neither \
                 PEFT nor this crate reproduces; retrain with the default normalisation"
            ),
        )),
    }
}

/// The top-level key in whose value serde_json's error `e` occurred (serde's messages give a
/// position but not the field), found by scanning `text` up to the error's position. `None` for
/// an error at the end of the text (truncation) or outside any key's value.
fn culprit_key(text: &[u8], e: &serde_json::Error) -> Option<String> {
    if e.classify() == serde_json::error::Category::Eof || e.line() == 0 {
        return None;
    }
    // serde_json counts lines from 1 and bytes of the line from 1.
    let line_start = if e.line() == 1 {
        0
    } else {
        let mut newlines = text.iter().enumerate().filter(|(_, &b)| b == b'\n');
        newlines.nth(e.line() - 2)?.0 + 1
    };
    let end = (line_start + e.column()).min(text.len());
    let (mut depth, mut key) = (0usize, None);
    let (mut string_start, mut last_string) = (None, None);
    let mut escaped = false;
    for (i, &b) in text[..end].iter().enumerate() {
        if let Some(start) = string_start {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => {
                    string_start = None;
                    last_string = (depth == 1).then_some((start, i + 1));
                }
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => string_start = Some(i),
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth = depth.saturating_sub(1),
            b':' if depth == 1 => key = last_string.take(),
            b if b.is_ascii_whitespace() => {}
            _ => last_string = None,
        }
    }
    let (start, stop) = key?;
    serde_json::from_slice::<String>(&text[start..stop]).ok()
}

/// [`Error::Config`] unless the configuration targets module `path`.
fn check_target(matcher: &ModuleMatcher, path: &str) -> Result<()> {
    if !matcher.is_target(path) {
        let key = spectrum_key(path);
        return Err(Error::Config(format!(
            "unmatched key {key:?}: module {path:?} is not targeted by the adapter configuration \
             (target_modules {})",
            shown_selector(matcher.config().target_modules.as_ref())
        )));
    }
    Ok(())
}

/// Checks a spectrum's dtype (one of F32, F16, BF16, F64) and shape (`[n]` with `n` from the
/// configuration for module `path`) before any data is converted; `key` names it.
fn check_spectrum_layout(
    matcher: &ModuleMatcher,
    path: &str,
    key: &str,
    dtype: DType,
    dims: &[usize],
) -> Result<()> {
    io::check_float_dtype(key, dtype)?;
    let n = matcher.n_frequency(path);
    if dims != [n] {
        return Err(Error::Shape {
            what: key.to_string(),
            expected: format!("[{n}] (n_frequency of {path:?} per the adapter configuration)"),
            found: dims_str(dims),
        });
    }
    Ok(())
}

/// Checks a spectrum for module `path` and returns it as f32 on the CPU.
fn check_spectrum(matcher: &ModuleMatcher, path: &str, t: &Tensor, what: &str) -> Result<Tensor> {
    let key = format!("{}{what}", spectrum_key(path));
    check_target(matcher, path)?;
    check_spectrum_layout(matcher, path, &key, t.dtype(), t.dims())?;
    let t = t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let v = t.to_vec1::<f32>()?;
    if let Some((i, x)) = v.iter().enumerate().find(|(_, x)| !x.is_finite()) {
        return Err(Error::Config(format!(
            "{key} has a non-finite value ({x}) at index {i}"
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
