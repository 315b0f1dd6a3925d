//! PEFT's `adapter_model.bin`: a `torch.save` zip archive of the adapter's state dict, read with
//! candle's pickle machine (`candle_core::pickle::Stack`) and no code execution.
//!
//! candle's reader is made for trusted checkpoints: on hostile bytes it can panic (a `LONG1` of
//! more than 8 bytes overflows a shift), allocate what a length field says (`BINUNICODE`), clone
//! an object tree exponentially through the memo (`BINGET` of a tuple of earlier gets), or nest
//! objects deep enough to overflow the stack when they are dropped. So the pickle is first
//! replayed by [`prescan`], which follows candle's stack machine opcode by opcode but tracks only
//! the size and depth of every object, and refuses the stream before candle sees it when a
//! length runs past the data, an integer is wider than 8 bytes, the objects would hold more nodes
//! than [`work_budget`] allows, or nesting exceeds [`MAX_DEPTH`]. The tensors are then taken from
//! candle's object tree by pattern matching (never by candle's `remove(i)`-based helpers), and
//! each storage is checked against its declared size and dtype, and each view's offset and
//! strides against its storage, before any tensor is built (strided views are gathered).

use super::io::file_error;
use crate::error::Result;
use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::io::{Cursor, Read};
use std::path::Path;

/// Deepest object nesting accepted (a tensor entry of a state dict is about 6 deep).
const MAX_DEPTH: u32 = 64;

/// A tensor of the archive: dtype, shape and its bytes (row-major, little endian).
pub(crate) struct PthTensor {
    pub(crate) dtype: DType,
    pub(crate) shape: Vec<usize>,
    data: Vec<u8>,
}

impl PthTensor {
    /// The tensor on the CPU.
    pub(crate) fn load(&self, path: &Path, name: &str) -> Result<Tensor> {
        Tensor::from_raw_buffer(&self.data, self.dtype, &self.shape, &Device::Cpu).map_err(|e| {
            file_error(
                path,
                format!("tensor {name:?} cannot be read: {}", short(&e.to_string())),
            )
        })
    }
}

/// The state dict stored in `bytes` (a `torch.save` zip archive read from `path`), by key.
///
/// # Errors
/// [`crate::Error::File`] naming `path` (and the key, where there is one) for anything that is not
/// a zip archive with one `*/data.pkl` holding a dict of tensors of supported dtypes whose
/// storages are present, of the declared size, little endian, and hold each tensor's view.
pub(crate) fn read_state_dict(path: &Path, bytes: &[u8]) -> Result<BTreeMap<String, PthTensor>> {
    let err = |m: String| file_error(path, m);
    let len = bytes.len() as u64;
    if bytes.first() == Some(&0x80) {
        return Err(err(
            "a pickle without a zip archive: PyTorch's legacy torch.save format (before 1.6 or \
             _use_new_zipfile_serialization=False) is not supported; load and re-save it with \
             torch.save, or convert it to adapter_model.safetensors"
                .into(),
        ));
    }
    // torch.save archives start at byte 0. The zip crate's default offset detection rejects some
    // valid torch archives ("Invalid Central Directory header"; candle's own reader fails on them).
    let config = zip::read::Config {
        archive_offset: zip::read::ArchiveOffset::Known(0),
    };
    let mut zip = zip::ZipArchive::with_config(config, Cursor::new(bytes)).map_err(|e| {
        err(format!(
            "not a PyTorch (torch.save) zip archive: {}",
            short(&e.to_string())
        ))
    })?;
    let names: Vec<String> = zip
        .file_names()
        .map(|n| n.map(|n| n.into_owned()))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| err(format!("archive entry names: {}", short(&e.to_string()))))?;
    let pickles: Vec<&String> = names
        .iter()
        .filter(|n| {
            n.strip_suffix("/data.pkl")
                .is_some_and(|dir| !dir.is_empty() && !dir.contains('/'))
        })
        .collect();
    let dir = match pickles.as_slice() {
        [one] => one.trim_end_matches("data.pkl").to_string(),
        [] => return Err(err("no <archive>/data.pkl: not a torch.save archive".into())),
        _ => {
            return Err(err(format!(
                "{} data.pkl records ({:?}); torch.save writes one",
                pickles.len(),
                pickles
            )))
        }
    };
    if let Some(order) = entry(&mut zip, path, &format!("{dir}byteorder"), Some(16), len)? {
        if order != b"little" {
            return Err(err(format!(
                "byteorder is {:?}: only little-endian archives are supported",
                String::from_utf8_lossy(&order)
            )));
        }
    }
    let pkl = entry(&mut zip, path, &format!("{dir}data.pkl"), None, len)?
        .ok_or_else(|| err("data.pkl cannot be read".into()))?;
    prescan(&pkl).map_err(|m| err(format!("data.pkl: {m}")))?;
    let mut stack = Stack::empty();
    stack
        .read_loop(&mut Cursor::new(&pkl[..]))
        .map_err(|e| err(format!("data.pkl: {}", short(&e.to_string()))))?;
    let root = stack
        .finalize()
        .map_err(|e| err(format!("data.pkl: {}", short(&e.to_string()))))?;
    let items = match root {
        Object::Dict(items) => items,
        other => {
            return Err(err(format!(
                "data.pkl holds {}, expected a dict of tensors (a state dict)",
                kind(&other)
            )))
        }
    };
    let mut storages: HashMap<String, (DType, Vec<u8>)> = HashMap::new();
    let mut out = BTreeMap::new();
    for (key, value) in items {
        let name = match key {
            Object::Unicode(name) => name,
            other => {
                return Err(err(format!(
                    "state dict key is {}, expected a string",
                    kind(&other)
                )))
            }
        };
        // An OrderedDict's `_metadata` attribute (torch's `state_dict()`), which candle's BUILD
        // merges into the dict's items; torch restores it as an attribute, not a key.
        if name == "_metadata" && matches!(value, Object::Dict(_)) {
            continue;
        }
        let info = tensor_info(value).map_err(|m| err(format!("tensor {name:?}: {m}")))?;
        if !storages.contains_key(&info.key) {
            let data = read_storage(&mut zip, path, &dir, &name, &info, len)?;
            storages.insert(info.key.clone(), (info.dtype, data));
        }
        let (dtype, storage) = &storages[&info.key];
        if *dtype != info.dtype {
            return Err(err(format!(
                "tensor {name:?}: storage {:?} is read as {:?} and {:?}",
                info.key, dtype, info.dtype
            )));
        }
        let data =
            slice_tensor(storage, &info).map_err(|m| err(format!("tensor {name:?}: {m}")))?;
        let t = PthTensor {
            dtype: info.dtype,
            shape: info.shape,
            data,
        };
        if out.insert(name.clone(), t).is_some() {
            return Err(err(format!(
                "tensor {name:?} appears twice in the state dict"
            )));
        }
    }
    Ok(out)
}

/// The bytes of archive entry `name` (`None` if absent), refused above `limit` bytes or, without
/// one, above the archive's own size (a stored entry cannot be larger).
fn entry(
    zip: &mut zip::ZipArchive<Cursor<&[u8]>>,
    path: &Path,
    name: &str,
    limit: Option<u64>,
    archive_len: u64,
) -> Result<Option<Vec<u8>>> {
    let limit = limit.unwrap_or(archive_len);
    let mut file = match zip.by_name(name) {
        Ok(f) => f,
        Err(zip::result::ZipError::FileNotFound) => return Ok(None),
        Err(e) => {
            return Err(file_error(
                path,
                format!("archive entry {name:?}: {}", short(&e.to_string())),
            ))
        }
    };
    if file.size() > limit {
        return Err(file_error(
            path,
            format!(
                "archive entry {name:?} declares {} bytes, more than {limit}",
                file.size()
            ),
        ));
    }
    let mut data = Vec::with_capacity(file.size() as usize);
    (&mut file)
        .take(limit + 1)
        .read_to_end(&mut data)
        .map_err(|e| {
            file_error(
                path,
                format!("archive entry {name:?}: {}", short(&e.to_string())),
            )
        })?;
    if data.len() as u64 != file.size() {
        return Err(file_error(
            path,
            format!(
                "archive entry {name:?} holds {} bytes, declares {}",
                data.len(),
                file.size()
            ),
        ));
    }
    Ok(Some(data))
}

/// What a state-dict value says about its tensor.
struct TensorInfo {
    key: String,
    dtype: DType,
    storage_numel: usize,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

/// Reads storage `info.key` and checks its size against the declared element count.
fn read_storage(
    zip: &mut zip::ZipArchive<Cursor<&[u8]>>,
    path: &Path,
    dir: &str,
    name: &str,
    info: &TensorInfo,
    archive_len: u64,
) -> Result<Vec<u8>> {
    let entry_name = format!("{dir}data/{}", info.key);
    let expected = info
        .storage_numel
        .checked_mul(info.dtype.size_in_bytes())
        .ok_or_else(|| file_error(path, format!("tensor {name:?}: storage size overflows")))?;
    let data = entry(zip, path, &entry_name, None, archive_len)?.ok_or_else(|| {
        file_error(
            path,
            format!("tensor {name:?}: storage {entry_name:?} is missing from the archive"),
        )
    })?;
    if data.len() != expected {
        return Err(file_error(
            path,
            format!(
                "tensor {name:?}: storage {entry_name:?} holds {} bytes, expected {expected} \
                 ({} {:?} values)",
                data.len(),
                info.storage_numel,
                info.dtype
            ),
        ));
    }
    Ok(data)
}

/// The bytes of a tensor (row-major) gathered from its storage by offset and strides, every
/// index checked against the storage's size first.
fn slice_tensor(storage: &[u8], info: &TensorInfo) -> std::result::Result<Vec<u8>, String> {
    let numel = info
        .shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or("its element count overflows")?;
    let size = info.dtype.size_in_bytes();
    if numel == 0 {
        return Ok(Vec::new());
    }
    // The last element a view reaches: offset + Σ (d - 1)·stride.
    let last = info
        .shape
        .iter()
        .zip(&info.stride)
        .try_fold(info.offset, |acc, (&d, &s)| {
            (d - 1).checked_mul(s).and_then(|x| acc.checked_add(x))
        })
        .filter(|&l| l < info.storage_numel)
        .ok_or_else(|| {
            format!(
                "size {:?}, stride {:?} and offset {} run past its storage of {} values",
                info.shape, info.stride, info.offset, info.storage_numel
            )
        })?;
    let contiguous = {
        let mut expected = 1usize;
        let mut ok = true;
        for (&d, &s) in info.shape.iter().zip(&info.stride).rev() {
            ok &= d <= 1 || s == expected;
            expected = expected.saturating_mul(d);
        }
        ok
    };
    if contiguous {
        return Ok(storage[info.offset * size..(last + 1) * size].to_vec());
    }
    // A strided view (torch saves the whole storage): gather element by element.
    let mut out = Vec::with_capacity(numel * size);
    let mut index = vec![0usize; info.shape.len()];
    for _ in 0..numel {
        let at = index
            .iter()
            .zip(&info.stride)
            .fold(info.offset, |acc, (&i, &s)| acc + i * s);
        out.extend_from_slice(&storage[at * size..(at + 1) * size]);
        for (i, &d) in index.iter_mut().zip(&info.shape).rev() {
            *i += 1;
            if *i < d {
                break;
            }
            *i = 0;
        }
    }
    Ok(out)
}

/// The dtype of a torch storage class (`torch.FloatStorage`, ...).
fn storage_dtype(module: &str, class: &str) -> std::result::Result<DType, String> {
    let dtype = match (module, class) {
        ("torch", "FloatStorage") => DType::F32,
        ("torch", "DoubleStorage") => DType::F64,
        ("torch", "HalfStorage") => DType::F16,
        ("torch", "BFloat16Storage") => DType::BF16,
        ("torch", "ByteStorage") => DType::U8,
        ("torch", "ShortStorage") => DType::I16,
        ("torch", "IntStorage") => DType::I32,
        ("torch", "LongStorage") => DType::I64,
        _ => return Err(format!("storage type {module}.{class} is not supported")),
    };
    Ok(dtype)
}

/// A non-negative integer of the pickle.
fn index(o: &Object, what: &str) -> std::result::Result<usize, String> {
    let v = match o {
        Object::Int(v) => i64::from(*v),
        Object::Long(v) => *v,
        other => return Err(format!("{what} is {}, expected an integer", kind(other))),
    };
    usize::try_from(v).map_err(|_| format!("{what} is {v}, expected a non-negative integer"))
}

/// A tuple of non-negative integers.
fn indices(o: &Object, what: &str) -> std::result::Result<Vec<usize>, String> {
    match o {
        Object::Tuple(items) => items.iter().map(|i| index(i, what)).collect(),
        other => Err(format!("{what} is {}, expected a tuple", kind(other))),
    }
}

/// Takes a state-dict value apart: `torch._utils._rebuild_tensor_v2(storage, offset, size,
/// stride, ...)`, possibly inside `torch._utils._rebuild_parameter(tensor, ...)`, with the
/// storage a persistent id `("storage", torch.<Type>Storage, key, location, numel)`.
fn tensor_info(value: Object) -> std::result::Result<TensorInfo, String> {
    let (callable, args) = match value {
        Object::Reduce { callable, args } => (*callable, *args),
        other => return Err(format!("the value is {}, expected a tensor", kind(&other))),
    };
    let (callable, args) = match (callable, args) {
        (
            Object::Class {
                module_name,
                class_name,
            },
            Object::Tuple(mut a),
        ) if module_name == "torch._utils" && class_name == "_rebuild_parameter" => {
            if a.is_empty() {
                return Err("a parameter without a tensor".into());
            }
            match a.swap_remove(0) {
                Object::Reduce { callable, args } => (*callable, *args),
                other => {
                    return Err(format!(
                        "a parameter of {}, expected a tensor",
                        kind(&other)
                    ))
                }
            }
        }
        (callable, args) => (callable, args),
    };
    match &callable {
        Object::Class {
            module_name,
            class_name,
        } if module_name == "torch._utils" && class_name == "_rebuild_tensor_v2" => {}
        Object::Class {
            module_name,
            class_name,
        } => {
            return Err(format!(
                "the value is built by {module_name}.{class_name}, expected \
                 torch._utils._rebuild_tensor_v2"
            ))
        }
        other => {
            return Err(format!(
                "the value is built by {}, expected a tensor",
                kind(other)
            ))
        }
    }
    let Object::Tuple(args) = args else {
        return Err("_rebuild_tensor_v2 arguments are not a tuple".into());
    };
    let [storage, offset, size, stride, ..] = args.as_slice() else {
        return Err(format!(
            "_rebuild_tensor_v2 has {} arguments, expected at least 4",
            args.len()
        ));
    };
    let Object::PersistentLoad(id) = storage else {
        return Err(format!(
            "the storage is {}, expected a persistent id",
            kind(storage)
        ));
    };
    let Object::Tuple(id) = id.as_ref() else {
        return Err("the storage id is not a tuple".into());
    };
    let [Object::Unicode(tag), Object::Class {
        module_name,
        class_name,
    }, Object::Unicode(key), _location, numel] = id.as_slice()
    else {
        return Err("the storage id is not (\"storage\", type, key, location, numel)".into());
    };
    if tag != "storage" {
        return Err(format!(
            "the storage id starts with {tag:?}, expected \"storage\""
        ));
    }
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(format!("storage key {key:?} is not a plain name"));
    }
    let dtype = storage_dtype(module_name, class_name)?;
    let shape = indices(size, "the size")?;
    let stride = indices(stride, "the stride")?;
    if shape.len() != stride.len() {
        return Err(format!(
            "size {shape:?} and stride {stride:?} have different lengths"
        ));
    }
    Ok(TensorInfo {
        key: key.clone(),
        dtype,
        storage_numel: index(numel, "the storage size")?,
        offset: index(offset, "the storage offset")?,
        shape,
        stride,
    })
}

/// How an object is named in errors.
fn kind(o: &Object) -> String {
    match o {
        Object::Class {
            module_name,
            class_name,
        } => format!("class {module_name}.{class_name}"),
        Object::Int(_) | Object::Long(_) => "an integer".into(),
        Object::Float(_) => "a float".into(),
        Object::Unicode(_) => "a string".into(),
        Object::Bool(_) => "a bool".into(),
        Object::None => "None".into(),
        Object::Tuple(_) => "a tuple".into(),
        Object::List(_) => "a list".into(),
        Object::Mark => "a mark".into(),
        Object::Dict(_) => "a dict".into(),
        Object::Reduce { .. } | Object::Build { .. } => "an object".into(),
        Object::PersistentLoad(_) => "a persistent id".into(),
    }
}

/// At most 200 characters of `s` on one line (candle's messages may print whole objects).
fn short(s: &str) -> String {
    let one_line: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    match one_line.char_indices().nth(200) {
        Some((i, _)) => format!("{}...", &one_line[..i]),
        None => one_line,
    }
}

/// How many object nodes (plus string bytes) the objects candle builds from a pickle of `len`
/// bytes may hold: generous for real state dicts (a few nodes per byte), far below what an
/// exponential memo expansion reaches.
fn work_budget(len: usize) -> u64 {
    (len as u64).saturating_mul(16).saturating_add(1 << 16)
}

/// The size (nodes plus string bytes) and nesting depth of an object on candle's stack.
#[derive(Clone, Copy)]
struct Shape {
    size: u64,
    depth: u32,
    mark: bool,
}

impl Shape {
    const LEAF: Shape = Shape {
        size: 1,
        depth: 1,
        mark: false,
    };
}

/// Replays candle's pickle machine (`candle_core::pickle::Stack::read`, same opcodes, same
/// arities, `'d'` read as an empty dict as candle does) on sizes only, and refuses what would
/// make candle panic or over-allocate: see the module docs.
fn prescan(pkl: &[u8]) -> std::result::Result<(), String> {
    let budget = work_budget(pkl.len());
    let mut work = 0u64;
    let mut stack: Vec<Shape> = Vec::new();
    let mut memo: HashMap<u32, Shape> = HashMap::new();
    let mut pos = 0usize;
    let take = |pos: &mut usize, n: usize| -> std::result::Result<&[u8], String> {
        let end = pos
            .checked_add(n)
            .filter(|&e| e <= pkl.len())
            .ok_or_else(|| format!("truncated at byte {}", *pos))?;
        let s = &pkl[*pos..end];
        *pos = end;
        Ok(s)
    };
    let pop = |stack: &mut Vec<Shape>| stack.pop().ok_or("unexpected empty stack".to_string());
    let to_mark = |stack: &mut Vec<Shape>| -> std::result::Result<Shape, String> {
        let at = stack
            .iter()
            .rposition(|s| s.mark)
            .ok_or("marker object not found")?;
        let items = stack.split_off(at + 1);
        stack.pop();
        Ok(combine(&items))
    };
    loop {
        let op = take(&mut pos, 1)?[0];
        let pushed: Option<Shape> = match op {
            0x80 => {
                take(&mut pos, 1)?;
                None
            }
            b'c' => {
                let mut n = 0usize;
                for _ in 0..2 {
                    let rest = &pkl[pos..];
                    let line = rest
                        .iter()
                        .position(|&b| b == b'\n')
                        .map_or(rest.len(), |i| i + 1);
                    n += line;
                    pos += line;
                }
                Some(Shape {
                    size: 1 + n as u64,
                    ..Shape::LEAF
                })
            }
            b'K' => {
                take(&mut pos, 1)?;
                Some(Shape::LEAF)
            }
            b'M' => {
                take(&mut pos, 2)?;
                Some(Shape::LEAF)
            }
            b'J' => {
                take(&mut pos, 4)?;
                Some(Shape::LEAF)
            }
            b'G' => {
                take(&mut pos, 8)?;
                Some(Shape::LEAF)
            }
            0x8a => {
                let n = take(&mut pos, 1)?[0] as usize;
                if n > 8 {
                    return Err(format!(
                        "LONG1 of {n} bytes at byte {}: at most 8 are supported",
                        pos - 2
                    ));
                }
                take(&mut pos, n)?;
                Some(Shape::LEAF)
            }
            b'X' => {
                let len =
                    u32::from_le_bytes(take(&mut pos, 4)?.try_into().map_err(|_| "truncated")?);
                take(&mut pos, len as usize)?;
                Some(Shape {
                    size: 1 + u64::from(len),
                    ..Shape::LEAF
                })
            }
            b'Q' | 0x85 => Some(wrap(&[pop(&mut stack)?])),
            0x86 => {
                let b = pop(&mut stack)?;
                let a = pop(&mut stack)?;
                Some(wrap(&[a, b]))
            }
            0x87 | b'R' | b'b' | 0x81 => {
                let n = if op == 0x87 { 3 } else { 2 };
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(pop(&mut stack)?);
                }
                Some(wrap(&items))
            }
            b't' => Some(wrap(&[to_mark(&mut stack)?])),
            0x88 | 0x89 | b'N' | b'}' | b'd' | b')' | b']' => Some(Shape::LEAF),
            b'(' => Some(Shape {
                mark: true,
                ..Shape::LEAF
            }),
            b'a' | b's' | b'e' | b'u' => {
                let added = match op {
                    b'a' => pop(&mut stack)?,
                    b's' => {
                        let v = pop(&mut stack)?;
                        let k = pop(&mut stack)?;
                        combine(&[k, v])
                    }
                    _ => to_mark(&mut stack)?,
                };
                let last = stack.last_mut().ok_or("unexpected empty stack")?;
                *last = combine(&[*last, wrap(&[added])]);
                work = work.saturating_add(added.size);
                None
            }
            b'h' | b'j' => {
                let id = if op == b'h' {
                    u32::from(take(&mut pos, 1)?[0])
                } else {
                    u32::from_le_bytes(take(&mut pos, 4)?.try_into().map_err(|_| "truncated")?)
                };
                Some(
                    *memo
                        .get(&id)
                        .ok_or_else(|| format!("missing object in memo {id}"))?,
                )
            }
            b'q' | b'r' => {
                let id = if op == b'q' {
                    u32::from(take(&mut pos, 1)?[0])
                } else {
                    u32::from_le_bytes(take(&mut pos, 4)?.try_into().map_err(|_| "truncated")?)
                };
                let last = *stack.last().ok_or("unexpected empty stack")?;
                work = work.saturating_add(last.size);
                memo.insert(id, last);
                None
            }
            b'.' => return Ok(()),
            other => {
                return Err(format!(
                    "unsupported pickle opcode 0x{other:02x} at byte {}",
                    pos - 1
                ))
            }
        };
        if let Some(s) = pushed {
            if s.depth > MAX_DEPTH {
                return Err(format!(
                    "objects nested deeper than {MAX_DEPTH} at byte {pos}"
                ));
            }
            work = work.saturating_add(s.size);
            stack.push(s);
        }
        if let Some(last) = stack.last() {
            if last.depth > MAX_DEPTH {
                return Err(format!(
                    "objects nested deeper than {MAX_DEPTH} at byte {pos}"
                ));
            }
        }
        if work > budget {
            return Err(format!(
                "the pickle expands to more than {budget} objects (memo copies), a pickle bomb"
            ));
        }
    }
}

/// Several objects side by side (not nested).
fn combine(items: &[Shape]) -> Shape {
    Shape {
        size: items.iter().fold(0u64, |s, i| s.saturating_add(i.size)),
        depth: items.iter().map(|i| i.depth).max().unwrap_or(0),
        mark: false,
    }
}

/// An object holding `items`.
fn wrap(items: &[Shape]) -> Shape {
    let c = combine(items);
    Shape {
        size: c.size.saturating_add(1),
        depth: c.depth.saturating_add(1),
        mark: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prescan_refuses_what_candle_cannot_survive() {
        // LONG1 of 40 bytes: candle's shift overflows.
        let mut p = vec![0x80, 2, 0x8a, 40];
        p.extend([0u8; 40]);
        p.push(b'.');
        assert!(prescan(&p).unwrap_err().contains("LONG1"));
        // BINUNICODE claiming 4 GiB.
        let p = [b'X', 0xff, 0xff, 0xff, 0xff, b'.'];
        assert!(prescan(&p).unwrap_err().contains("truncated"));
        // Memo doubling: ] q0 (h0 h0 t q0 ... : 2^k nodes from 5k bytes.
        let mut p = vec![b'N', b'q', 0];
        for _ in 0..64 {
            p.extend([b'h', 0, b'h', 0, 0x86, b'q', 0]);
        }
        assert!(prescan(&p).is_err());
        // Deep nesting: TUPLE1 a thousand times.
        let mut p = vec![b'N'];
        p.extend([0x85; 1000]);
        p.push(b'.');
        assert!(prescan(&p).unwrap_err().contains("deeper"));
        // Nothing but a STOP on an empty stack is fine for the prescan (candle then errors).
        assert!(prescan(b".").is_ok());
    }
}
