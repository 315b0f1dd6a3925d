//! The input format of the fuzz targets: length-prefixed parts, so that a seed is made from real
//! files by concatenation (see `make_seeds.py`) and libFuzzer can mutate each part.
//!
//! `load_adapter`: `u32 LE len | adapter_config.json (len bytes) | adapter_model.safetensors`.
//! `load_adapter_bin`: `u32 LE len | adapter_config.json | adapter_model.bin`.
//! `merge`: `u32 LE len | adapter_config.json | u32 LE len | adapter_model.safetensors | base`.

/// Splits off a part prefixed by its length (u32, little endian); `None` if `data` is too short.
pub fn split_prefixed(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = u32::from_le_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let rest = &data[4..];
    (len <= rest.len()).then(|| rest.split_at(len))
}

/// `(config, safetensors)` of a `load_adapter` input.
pub fn split2(data: &[u8]) -> Option<(&[u8], &[u8])> {
    split_prefixed(data)
}

/// `(config, adapter safetensors, base safetensors)` of a `merge` input.
pub fn split3(data: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    let (config, rest) = split_prefixed(data)?;
    let (adapter, base) = split_prefixed(rest)?;
    Some((config, adapter, base))
}
