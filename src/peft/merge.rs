//! Merging an adapter into base weights: one weight ([`PeftAdapter::merged_weight`]) or a whole
//! safetensors file ([`merge_safetensors`]).

use super::adapter::{PeftAdapter, KEY_PREFIX, SPECTRUM_SUFFIX};
use super::io::{self, file_error, OutTensor};
use crate::error::{dims_str, Error, Result};
use crate::layer::{FourierLinear, DEFAULT_ADAPTER};
use candle_core::{DType, Tensor};
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
        check_weight_dtype(&what, weight.dtype())?;
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
/// The merge is safe: a result with NaN or infinite values is refused.
///
/// # Errors
/// [`Error::Io`] / [`Error::File`] for unreadable or corrupt files, [`Error::File`] for an adapter
/// module or extra tensor with no matching base tensor, [`Error::Shape`] for mismatched shapes
/// (e.g. a base weight that is not a matrix), [`Error::DType`] for a base weight that is not
/// F32, F16, BF16 or F64, [`Error::EntryCount`] for `n > d1·d2`, [`Error::NonFinite`] for a
/// non-finite result.
pub fn merge_safetensors(
    base: &Path,
    adapter: &PeftAdapter,
    base_prefix: &str,
    output: &Path,
) -> Result<MergeSummary> {
    let bytes = io::read(base)?;
    let (tensors, metadata, summary) = merge_parsed(base, &bytes, adapter, base_prefix)?;
    io::write_safetensors(output, tensors, metadata)?;
    Ok(summary)
}

/// [`merge_safetensors`] in memory: merges `adapter` into the safetensors bytes `base` and returns
/// the merged file's bytes. Errors name the base `<base safetensors>`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use fourierft::config::ModuleSelector;
/// use fourierft::peft::{merge_safetensors_bytes, PeftAdapter};
/// use fourierft::FourierFTConfig;
/// let cfg = FourierFTConfig {
///     n_frequency: 2,
///     target_modules: Some(ModuleSelector::Names(vec!["fc".into()])),
///     ..Default::default()
/// };
/// let spectrum = Tensor::new(&[1f32, -1.0], &Device::Cpu)?;
/// let adapter = PeftAdapter::new(cfg, [("fc".to_string(), spectrum)].into(), Default::default())?;
/// let w0 = Tensor::zeros((3, 4), candle_core::DType::F32, &Device::Cpu)?;
/// let mut base = std::collections::HashMap::new();
/// base.insert("fc.weight".to_string(), w0);
/// let bytes = safetensors::serialize(base.iter().map(|(k, v)| (k.clone(), v)), None)?;
/// let (merged, summary) = merge_safetensors_bytes(&bytes, &adapter, "")?;
/// assert_eq!(summary.merged, vec![("fc.weight".to_string(), false)]);
/// let out = candle_core::safetensors::load_buffer(&merged, &Device::Cpu)?;
/// assert_eq!(out["fc.weight"].dims(), &[3, 4]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// Those of [`merge_safetensors`], except [`Error::Io`].
pub fn merge_safetensors_bytes(
    base: &[u8],
    adapter: &PeftAdapter,
    base_prefix: &str,
) -> Result<(Vec<u8>, MergeSummary)> {
    let label = Path::new(MEMORY_BASE);
    let (tensors, metadata, summary) = merge_parsed(label, base, adapter, base_prefix)?;
    Ok((io::safetensors_bytes(label, tensors, metadata)?, summary))
}

/// How errors name the base given to [`merge_safetensors_bytes`].
const MEMORY_BASE: &str = "<base safetensors>";

/// The tensors (merged, replaced or borrowed from `bytes`) and metadata of the merged file;
/// `base` labels errors.
#[allow(clippy::type_complexity)]
fn merge_parsed<'a>(
    base: &Path,
    bytes: &'a [u8],
    adapter: &PeftAdapter,
    base_prefix: &str,
) -> Result<(
    Vec<(String, OutTensor<'a>)>,
    HashMap<String, String>,
    MergeSummary,
)> {
    let st = io::parse_safetensors(base, bytes)?;
    let metadata = io::metadata(base, bytes)?;
    let config_ffo = adapter.config().fan_in_fan_out;
    let mut summary = MergeSummary::default();
    let mut computed: HashMap<String, OutTensor<'static>> = HashMap::new();

    // A weight the configuration targets must have its spectrum (PEFT would keep a random one).
    for (name, view) in st.iter() {
        let module = name
            .strip_prefix(base_prefix)
            .and_then(|rest| rest.strip_suffix(".weight"));
        if let Some(path) = module {
            let targeted = view.shape().len() == 2 && adapter.matcher().is_target(path);
            if targeted && adapter.spectrum(path).is_none() {
                let context = format!(" (tensor {name:?} of {})", base.display());
                return Err(adapter.missing_spectrum(path, &context));
            }
        }
    }

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
        let label = format!("tensor {name:?} of {}", base.display());
        let key = format!("{KEY_PREFIX}{path}{SPECTRUM_SUFFIX}");
        let what = format!("{label} (adapted by {key})");
        // Shape and dtype come from the header: check them before converting any data.
        let [a, b] = view.shape() else {
            return Err(Error::Shape {
                what,
                expected: "2 dims".into(),
                found: dims_str(view.shape()),
            });
        };
        let dtype = io::candle_dtype(base, &name, view.dtype())?;
        check_weight_dtype(&what, dtype)?;
        let bias_len = st
            .tensor(&format!("{base_prefix}{path}.bias"))
            .ok()
            .and_then(|b| match b.shape() {
                [n] => Some(*n),
                _ => None,
            });
        let ffo = resolve_fan_in_fan_out(config_ffo, (*a, *b), bias_len);
        let w0 = io::load_view(base, &name, &view)?;
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
        let dtype = io::candle_dtype(base, &name, view.dtype())?;
        if !io::is_numeric(dtype) || !io::is_numeric(t.dtype()) {
            return Err(Error::DType {
                what: format!("{what} replacing tensor {name:?} of {}", base.display()),
                expected: "a dtype candle can convert".into(),
                found: if io::is_numeric(dtype) {
                    t.dtype()
                } else {
                    dtype
                },
            });
        }
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
    Ok((tensors, metadata, summary))
}

/// The dtypes a weight may have to be merged into.
const WEIGHT_DTYPES: [DType; 4] = [DType::F32, DType::F16, DType::BF16, DType::F64];

/// [`Error::DType`] unless `dtype` is one of [`WEIGHT_DTYPES`].
fn check_weight_dtype(what: &str, dtype: DType) -> Result<()> {
    if !WEIGHT_DTYPES.contains(&dtype) {
        return Err(Error::DType {
            what: what.to_string(),
            expected: "F32, F16, BF16 or F64".into(),
            found: dtype,
        });
    }
    Ok(())
}
