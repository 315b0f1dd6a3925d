//! Merging an adapter into base weights: one weight ([`PeftAdapter::merged_weight`]) or a whole
//! safetensors file ([`merge_safetensors`]).

use super::adapter::{base_layer_key, spectrum_key, PeftAdapter};
use super::io::{self, file_error, OutTensor};
use super::orientation::{Orientation, StoredShape};
use super::prefix::prefix_hint;
use crate::error::{dims_str, Error, Result};
use crate::layer::{FourierLinear, DEFAULT_ADAPTER};
use candle_core::Tensor;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

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
        let key = spectrum_key(path);
        let spectrum = self.spectrum(path).ok_or_else(|| Error::File {
            path: self.source().unwrap_or(Path::new("adapter")).to_path_buf(),
            message: format!("no tensor {key:?}"),
        })?;
        let what = format!("{name} (adapted by {key})");
        weight.dims2().map_err(|_| Error::Shape {
            what: what.clone(),
            expected: "2 dims".into(),
            found: dims_str(weight.dims()),
        })?;
        io::check_float_dtype(&what, weight.dtype())?;
        let mut config = self.matcher().layer_config(path, fan_in_fan_out);
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
    /// Tensors replaced by the adapter's extra tensors (biases, `modules_to_save`); a stored base
    /// weight of an adapted module is merged, not replaced (see
    /// [`PeftAdapter::stored_base_weight`]).
    pub replaced: Vec<String>,
    /// Tensors copied unchanged.
    pub copied: usize,
}

/// Merges `adapter` into the safetensors file `base` and writes the result to `output`.
///
/// The spectrum of module `<path>` goes into base tensor `<base_prefix><path>.weight` (layout per
/// [`Orientation::new`], see [`merge_safetensors_with`]; `W0` is the adapter's [stored base
/// weight](PeftAdapter::stored_base_weight) when it has one, as PEFT loads it); the adapter's
/// [replacements](PeftAdapter::replacements) replace `<base_prefix><name>`. Merged
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
    merge_safetensors_with(base, adapter, base_prefix, &Orientation::new(), output)
}

/// [`merge_safetensors`] with what is known about the layout of the weights (`(out, in)` or
/// GPT-2's `(in, out)`): an explicit override or the base model's `config.json`, see
/// [`Orientation`].
///
/// # Errors
/// Those of [`merge_safetensors`], and [`Error::Config`] naming a module whose layout cannot
/// be told (see [`Orientation::resolve`]).
pub fn merge_safetensors_with(
    base: &Path,
    adapter: &PeftAdapter,
    base_prefix: &str,
    orientation: &Orientation,
    output: &Path,
) -> Result<MergeSummary> {
    let bytes = io::read(base)?;
    let (tensors, metadata, summary) =
        merge_parsed(base, &bytes, adapter, base_prefix, orientation)?;
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
    let (tensors, metadata, summary) =
        merge_parsed(label, base, adapter, base_prefix, &Orientation::new())?;
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
    orientation: &Orientation,
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

    for path in adapter.spectra().keys() {
        let name = format!("{base_prefix}{path}.weight");
        let view = st.tensor(&name).map_err(|_| {
            let key = spectrum_key(path);
            let names = st.iter().map(|(n, _)| n);
            let hint = match prefix_hint(path, base_prefix, names) {
                h if h.is_empty() => format!(
                    "; nothing in the base is named like this module: check the base prefix \
                     (given {base_prefix:?}) or whether the adapter belongs to this checkpoint"
                ),
                h => h,
            };
            file_error(
                base,
                format!(
                    "no tensor {name:?} for adapted module {path:?} ({}){hint}",
                    adapter.describe(&key)
                ),
            )
        })?;
        let label = format!("tensor {name:?} of {}", base.display());
        let key = spectrum_key(path);
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
        io::check_float_dtype(&what, dtype)?;
        let shape = stored_shape(&st, adapter, base_prefix, path, (*a, *b));
        let others = || {
            let mut all = BTreeMap::new();
            for p in adapter.spectra().keys() {
                if let Ok(v) = st.tensor(&format!("{base_prefix}{p}.weight")) {
                    if let [x, y] = v.shape() {
                        all.insert(
                            p.clone(),
                            stored_shape(&st, adapter, base_prefix, p, (*x, *y)),
                        );
                    }
                }
            }
            Ok(all)
        };
        let ffo = orientation.resolve(path, shape, config_ffo, others)?;
        let w0 = match adapter.stored_base_weight(path) {
            // PEFT loads the stored W0 into the model before merging: it wins over the checkpoint.
            Some(stored) if stored.dims() != view.shape() => {
                return Err(Error::Shape {
                    what: format!(
                        "{} (the stored base weight of {path:?}) against {label}",
                        adapter.describe(&base_layer_key(path, "weight"))
                    ),
                    expected: dims_str(view.shape()),
                    found: dims_str(stored.dims()),
                })
            }
            Some(stored) => stored.to_dtype(dtype)?,
            None => io::load_view(base, &name, &view)?,
        };
        let merged = adapter.merged_weight(path, &w0, ffo, &label)?;
        computed.insert(name.clone(), OutTensor::owned(&merged)?);
        summary.merged.push((name, ffo));
    }

    // A weight the configuration targets must have its spectrum (PEFT would keep a random one);
    // checked after every spectrum found its weight, so a wrong prefix is reported as one.
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

    for (extra, t) in adapter.replacements() {
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

/// [`StoredShape::of`] module `path`, with the base bias read from the safetensors header.
fn stored_shape(
    st: &safetensors::SafeTensors,
    adapter: &PeftAdapter,
    base_prefix: &str,
    path: &str,
    dims: (usize, usize),
) -> StoredShape {
    StoredShape::of(adapter, path, dims, || {
        let bias = st.tensor(&format!("{base_prefix}{path}.bias")).ok()?;
        Some(bias.shape().to_vec())
    })
}
