//! Merging an adapter into base weights: one weight ([`PeftAdapter::merged_weight`]) or a whole
//! safetensors file ([`merge_safetensors`]).

use super::adapter::{PeftAdapter, KEY_PREFIX, SPECTRUM_SUFFIX};
use super::io::{self, file_error, OutTensor};
use crate::error::{dims_str, Error, Result};
use crate::layer::{FourierLinear, DEFAULT_ADAPTER};
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::Path;

/// Whether a weight of shape `dims` is stored `(in, out)` (GPT-2 Conv1D) rather than `(out, in)`.
///
/// PEFT decides per module from its Python type and rewrites the configuration's
/// `fan_in_fan_out` as it goes, so a saved file only records the kind of the last adapted module.
/// From files alone: a non-square weight with a bias is `(out, in)` if the bias has `dims.0`
/// entries and `(in, out)` if it has `dims.1`; otherwise the configuration's value is used.
///
/// ```
/// use fourierft::peft::resolve_fan_in_fan_out;
/// assert!(resolve_fan_in_fan_out(false, (16, 40), Some(40))); // Conv1D(nf=40, nx=16)
/// assert!(!resolve_fan_in_fan_out(true, (24, 16), Some(24))); // Linear(16 -> 24)
/// assert!(resolve_fan_in_fan_out(true, (16, 16), Some(16))); // square: the config decides
/// ```
pub fn resolve_fan_in_fan_out(
    config_value: bool,
    dims: (usize, usize),
    bias_len: Option<usize>,
) -> bool {
    match bias_len {
        Some(n) if dims.0 != dims.1 && n == dims.0 => false,
        Some(n) if dims.0 != dims.1 && n == dims.1 => true,
        _ => config_value,
    }
}

impl PeftAdapter {
    /// The merged weight `W0 + ΔW` (or `W0 + ΔWᵀ` when `fan_in_fan_out`) of the module at `path`,
    /// in `weight`'s dtype and on its device, computed by the crate's own
    /// [`FourierLinear::safe_merge`]. `name` labels the weight in error messages.
    ///
    /// # Errors
    /// [`Error::File`] if the adapter has no spectrum for `path`; [`Error::Shape`] /
    /// [`Error::DType`] for a weight that is not a 2-D float tensor; [`Error::EntryCount`] if the
    /// spectrum has more entries than the weight; [`Error::NonFinite`] if the result is not finite.
    pub fn merged_weight(
        &self,
        path: &str,
        weight: &Tensor,
        fan_in_fan_out: bool,
        name: &str,
    ) -> Result<Tensor> {
        let key = format!("{KEY_PREFIX}{path}{SPECTRUM_SUFFIX}");
        let spectrum = self.spectrum(path).ok_or_else(|| Error::File {
            path: self.source().unwrap_or(Path::new("adapter")).to_path_buf(),
            message: format!("no tensor {key:?}"),
        })?;
        let what = format!("{name} (adapted by {key})");
        let (a, b) = weight.dims2().map_err(|_| Error::Shape {
            what: what.clone(),
            expected: "2 dims".into(),
            found: dims_str(weight.dims()),
        })?;
        if !weight.dtype().is_float() {
            return Err(Error::DType {
                what,
                expected: "a float dtype".into(),
                found: weight.dtype(),
            });
        }
        let (d1, d2) = if fan_in_fan_out { (b, a) } else { (a, b) };
        let mut config = self.matcher().layer_config(path, d1, d2, fan_in_fan_out);
        config.init_weights = true;
        let layer =
            FourierLinear::from_parts(weight.clone(), None, fan_in_fan_out)?.with_name(what);
        layer.add_adapter(DEFAULT_ADAPTER, &config)?;
        layer.set_spectrum(DEFAULT_ADAPTER, spectrum)?;
        layer.safe_merge()?;
        Ok(layer.weight())
    }
}

/// What [`merge_safetensors`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MergeSummary {
    /// Weights that received `ΔW`, with whether they were treated as `(in, out)`.
    pub merged: Vec<(String, bool)>,
    /// Tensors replaced by the adapter's extra tensors (biases, `modules_to_save`).
    pub replaced: Vec<String>,
    /// Tensors copied unchanged.
    pub copied: usize,
}

/// Merges `adapter` into the safetensors file `base` and writes the result to `output`.
///
/// The spectrum of module `<path>` goes into base tensor `<base_prefix><path>.weight` (layout per
/// [`resolve_fan_in_fan_out`]); the adapter's extra tensors replace `<base_prefix><name>`. Merged
/// and replaced tensors keep the base tensor's dtype; every other tensor is copied byte for byte,
/// and the base metadata is kept (with `"format": "pt"` added if absent). `output` is written to a
/// temporary file in its directory and renamed, so on any error it is not created or changed.
///
/// # Errors
/// [`Error::Io`] / [`Error::File`] for unreadable or corrupt files, [`Error::File`] for an adapter
/// module or extra tensor with no matching base tensor, [`Error::Shape`] for mismatched shapes,
/// [`Error::EntryCount`] for `n > d1·d2`, [`Error::NonFinite`] for a non-finite result.
pub fn merge_safetensors(
    base: &Path,
    adapter: &PeftAdapter,
    base_prefix: &str,
    output: &Path,
) -> Result<MergeSummary> {
    let bytes = io::read(base)?;
    let st = io::parse_safetensors(base, &bytes)?;
    let metadata = io::metadata(base, &bytes)?;
    let config_ffo = adapter.config().fan_in_fan_out;
    let mut summary = MergeSummary::default();
    let mut computed: HashMap<String, OutTensor<'static>> = HashMap::new();

    for path in adapter.spectra().keys() {
        let name = format!("{base_prefix}{path}.weight");
        let view = st.tensor(&name).map_err(|_| {
            let key = format!("{KEY_PREFIX}{path}{SPECTRUM_SUFFIX}");
            file_error(
                base,
                format!(
                    "no tensor {name:?} for adapted module {path:?} ({}); check the base prefix",
                    adapter.describe(&key)
                ),
            )
        })?;
        let w0 = io::load_view(base, &name, &view)?;
        let bias_len = st
            .tensor(&format!("{base_prefix}{path}.bias"))
            .ok()
            .and_then(|b| match b.shape() {
                [n] => Some(*n),
                _ => None,
            });
        let ffo = match w0.dims() {
            [a, b] => resolve_fan_in_fan_out(config_ffo, (*a, *b), bias_len),
            _ => config_ffo,
        };
        let label = format!("tensor {name:?} of {}", base.display());
        let merged = adapter.merged_weight(path, &w0, ffo, &label)?;
        computed.insert(name.clone(), OutTensor::owned(&merged)?);
        summary.merged.push((name, ffo));
    }

    for (extra, t) in adapter.extra_tensors() {
        let name = format!("{base_prefix}{extra}");
        let what = adapter.describe(extra);
        let view = st.tensor(&name).map_err(|_| {
            file_error(
                base,
                format!("no tensor {name:?} to replace with {what}; check the base prefix"),
            )
        })?;
        if view.shape() != t.dims() {
            return Err(Error::Shape {
                what: format!("{what} replacing tensor {name:?} of {}", base.display()),
                expected: dims_str(view.shape()),
                found: dims_str(t.dims()),
            });
        }
        let dtype = io::load_view(base, &name, &view)?.dtype();
        computed.insert(name.clone(), OutTensor::owned(&t.to_dtype(dtype)?)?);
        summary.replaced.push(name);
    }

    let mut tensors = Vec::with_capacity(st.len());
    for (name, view) in st.iter() {
        match computed.remove(name) {
            Some(t) => tensors.push((name.to_string(), t)),
            None => {
                summary.copied += 1;
                tensors.push((name.to_string(), OutTensor::Raw(view)));
            }
        }
    }
    io::write_safetensors(output, tensors, metadata)?;
    Ok(summary)
}
