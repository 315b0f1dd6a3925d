//! Reading an adapter: the weights file (safetensors or a `torch.save` archive), the
//! configuration's text, and the checks every loaded spectrum passes.

use super::adapter::{
    resolve_from_spectra, spectrum_key, PeftAdapter, KEY_PREFIX, SPECTRUM_SUFFIX,
};
use super::io::{self, file_error};
use super::pickle;
use super::target::ModuleMatcher;
use crate::config::{shown_selector, FourierFTConfig, PEFT_TYPE};
use crate::error::{dims_str, Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The tensors of a weights file: safetensors or a `torch.save` archive.
pub(super) enum Weights<'a> {
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

impl PeftAdapter {
    /// The shared body of [`load`](Self::load), [`from_bytes`](Self::from_bytes) and
    /// [`from_bin_bytes`](Self::from_bin_bytes); the paths only label errors.
    pub(super) fn parse(
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
}

/// Parses the text of an adapter configuration and checks its `peft_type`; errors name
/// `config_path` and, for a bad value, its key.
pub(super) fn parse_config(config_path: &Path, text: &[u8]) -> Result<FourierFTConfig> {
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
pub(super) fn check_unread_keys(
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
pub(super) fn culprit_key(text: &[u8], e: &serde_json::Error) -> Option<String> {
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
pub(super) fn check_target(matcher: &ModuleMatcher, path: &str) -> Result<()> {
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
pub(super) fn check_spectrum_layout(
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
pub(super) fn check_spectrum(
    matcher: &ModuleMatcher,
    path: &str,
    t: &Tensor,
    what: &str,
) -> Result<Tensor> {
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
