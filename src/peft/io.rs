//! File helpers with typed errors: reading, safetensors parsing, atomic writes.

use crate::error::{Error, Result};
use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::{SafeTensors, View};
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Reads a whole file.
pub(crate) fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// A [`Error::File`] for `path`.
pub(crate) fn file_error(path: &Path, message: impl Into<String>) -> Error {
    Error::File {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Parses safetensors bytes read from `path`.
pub(crate) fn parse_safetensors<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes)
        .map_err(|e| file_error(path, format!("not a valid safetensors file: {e}")))
}

/// The `__metadata__` of safetensors bytes (already validated by [`parse_safetensors`]).
pub(crate) fn metadata(path: &Path, bytes: &[u8]) -> Result<HashMap<String, String>> {
    let (_, meta) = SafeTensors::read_metadata(bytes)
        .map_err(|e| file_error(path, format!("not a valid safetensors file: {e}")))?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

/// The candle dtype of safetensors dtype `dtype` of tensor `name`, or an [`Error::File`] naming
/// both when candle has none.
pub(crate) fn candle_dtype(path: &Path, name: &str, dtype: Dtype) -> Result<DType> {
    DType::try_from(dtype).map_err(|_| {
        file_error(
            path,
            format!("tensor {name:?} has dtype {dtype:?}, which candle cannot load"),
        )
    })
}

/// The float dtypes a spectrum may be stored in (PEFT loads any of them into its f32 parameter)
/// and a weight may have to be merged into.
const FLOAT_DTYPES: [DType; 4] = [DType::F32, DType::F16, DType::BF16, DType::F64];

/// [`Error::DType`] for `what` unless `dtype` is one of [`FLOAT_DTYPES`].
pub(crate) fn check_float_dtype(what: &str, dtype: DType) -> Result<()> {
    if !FLOAT_DTYPES.contains(&dtype) {
        return Err(Error::DType {
            what: what.to_string(),
            expected: "F32, F16, BF16 or F64".into(),
            found: dtype,
        });
    }
    Ok(())
}

/// Whether candle can convert `dtype` to and from f32 (the dtypes a weight may have).
pub(crate) fn is_numeric(dtype: DType) -> bool {
    matches!(
        dtype,
        DType::U8
            | DType::U32
            | DType::I16
            | DType::I32
            | DType::I64
            | DType::BF16
            | DType::F16
            | DType::F32
            | DType::F64
            | DType::F8E4M3
    )
}

/// Loads tensor `name` of `path` onto the CPU, keeping its dtype.
pub(crate) fn load_view(path: &Path, name: &str, view: &TensorView<'_>) -> Result<Tensor> {
    candle_dtype(path, name, view.dtype())?;
    view.load(&Device::Cpu).map_err(|e| {
        file_error(
            path,
            format!("tensor {name:?} ({:?}) cannot be read: {e}", view.dtype()),
        )
    })
}

/// Index and value of the first NaN or infinite value of tensor `name` of `path`, if any
/// (never for integer dtypes); an [`Error::File`] naming the tensor if its dtype has no
/// conversion to f32 (the micro-scaling formats candle loads as raw bytes).
pub(crate) fn first_non_finite(
    path: &Path,
    name: &str,
    t: &Tensor,
) -> Result<Option<(usize, f32)>> {
    if !is_numeric(t.dtype()) {
        return Err(file_error(
            path,
            format!(
                "tensor {name:?} has dtype {:?}, which cannot be converted",
                t.dtype()
            ),
        ));
    }
    if !t.dtype().is_float() {
        return Ok(None);
    }
    let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    Ok(v.into_iter().enumerate().find(|(_, x)| !x.is_finite()))
}

/// A tensor to write: borrowed bytes of an input file, or a CPU tensor of this process.
pub(crate) enum OutTensor<'a> {
    /// Copied unchanged from an input file.
    Raw(TensorView<'a>),
    /// Computed here: must be a contiguous CPU tensor.
    Owned {
        dtype: Dtype,
        shape: Vec<usize>,
        data: Vec<u8>,
    },
}

impl OutTensor<'_> {
    /// Converts a tensor (any device, any layout) to bytes in its dtype.
    pub(crate) fn owned(t: &Tensor) -> Result<OutTensor<'static>> {
        let t = t.to_device(&Device::Cpu)?.contiguous()?;
        let data = View::data(&&t).into_owned();
        Ok(OutTensor::Owned {
            dtype: t.dtype().into(),
            shape: t.dims().to_vec(),
            data,
        })
    }
}

impl View for OutTensor<'_> {
    fn dtype(&self) -> Dtype {
        match self {
            OutTensor::Raw(v) => v.dtype(),
            OutTensor::Owned { dtype, .. } => *dtype,
        }
    }

    fn shape(&self) -> &[usize] {
        match self {
            OutTensor::Raw(v) => v.shape(),
            OutTensor::Owned { shape, .. } => shape,
        }
    }

    fn data(&self) -> Cow<'_, [u8]> {
        match self {
            OutTensor::Raw(v) => Cow::Borrowed(v.data()),
            OutTensor::Owned { data, .. } => Cow::Borrowed(data),
        }
    }

    fn data_len(&self) -> usize {
        match self {
            OutTensor::Raw(v) => v.data().len(),
            OutTensor::Owned { data, .. } => data.len(),
        }
    }
}

/// Writes `tensors` as a safetensors file at `path` (atomically), with `metadata` plus
/// `"format": "pt"` when it has no `format`.
pub(crate) fn write_safetensors<'a>(
    path: &Path,
    tensors: Vec<(String, OutTensor<'a>)>,
    mut metadata: HashMap<String, String>,
) -> Result<()> {
    metadata
        .entry("format".into())
        .or_insert_with(|| "pt".into());
    let write = |tmp: &Path| {
        safetensors::serialize_to_file(tensors, Some(metadata), tmp)
            .map_err(|e| file_error(path, format!("cannot write safetensors: {e}")))
    };
    commit(vec![(path, Box::new(write))])
}

/// `tensors` as safetensors bytes, with `metadata` plus `"format": "pt"` when it has no `format`.
pub(crate) fn safetensors_bytes<'a>(
    label: &Path,
    tensors: Vec<(String, OutTensor<'a>)>,
    mut metadata: HashMap<String, String>,
) -> Result<Vec<u8>> {
    metadata
        .entry("format".into())
        .or_insert_with(|| "pt".into());
    safetensors::serialize(tensors, Some(metadata))
        .map_err(|e| file_error(label, format!("cannot write safetensors: {e}")))
}

/// One file of a [`commit`]: its destination and what writes its content to a given path.
type FileWriter<'a> = (&'a Path, Box<dyn FnOnce(&Path) -> Result<()> + 'a>);

/// Writes several files as one step: each to a fresh temporary file next to it, then, once all
/// are written, renames them into place in order. If any write fails, every temporary file is
/// removed and no file is changed; a failing rename (rare: the files were written) removes the
/// temporaries not yet renamed.
pub(crate) fn write_files(files: &[(PathBuf, &[u8])]) -> Result<()> {
    commit(
        files
            .iter()
            .map(|(path, bytes)| -> FileWriter<'_> {
                let write = move |tmp: &Path| {
                    std::fs::write(tmp, bytes).map_err(|source| Error::Io {
                        path: tmp.to_path_buf(),
                        source,
                    })
                };
                (path.as_path(), Box::new(write))
            })
            .collect(),
    )
}

/// The one atomic-write mechanism behind [`write_files`] and [`write_safetensors`].
fn commit(files: Vec<FileWriter<'_>>) -> Result<()> {
    let mut temps: Vec<PathBuf> = Vec::with_capacity(files.len());
    let cleanup = |temps: &[PathBuf]| {
        for t in temps {
            // Best effort: the temporary may not exist if its write failed early.
            let _ = std::fs::remove_file(t);
        }
    };
    let mut paths = Vec::with_capacity(files.len());
    for (path, write) in files {
        let tmp = temp_path(path)?;
        temps.push(tmp.clone());
        if let Err(e) = write(&tmp) {
            cleanup(&temps);
            return Err(e);
        }
        paths.push(path);
    }
    for (i, (path, tmp)) in paths.iter().zip(&temps).enumerate() {
        if let Err(source) = std::fs::rename(tmp, path) {
            cleanup(&temps[i..]);
            return Err(Error::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    }
    Ok(())
}

/// A fresh temporary file name next to `path`.
fn temp_path(path: &Path) -> Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .ok_or_else(|| file_error(path, "output path has no file name"))?
        .to_string_lossy();
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    Ok(dir.join(format!(".{name}.{}.{n}.tmp", std::process::id())))
}
