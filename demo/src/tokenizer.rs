//! The MiniLM tokenizer and padded batches.

use anyhow::Result;
use candle_core::{Device, Tensor};
use std::path::Path;

/// The MiniLM tokenizer with padding off and truncation at `max_len` tokens.
pub fn tokenizer(path: &Path, max_len: usize) -> Result<tokenizers::Tokenizer> {
    let mut tok = tokenizers::Tokenizer::from_file(path)
        .map_err(|e| anyhow::anyhow!("loading {}: {e}", path.display()))?;
    tok.with_padding(None);
    tok.with_truncation(Some(tokenizers::TruncationParams {
        max_length: max_len,
        ..Default::default()
    }))
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(tok)
}

/// Token ids of each text (with [CLS] … [SEP]).
pub fn encode(tok: &tokenizers::Tokenizer, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
    let enc = tok
        .encode_batch(texts.to_vec(), true)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(enc.into_iter().map(|e| e.get_ids().to_vec()).collect())
}

/// Pads sequences to the longest one: ids `(b, s)` u32 (pad id 0) and mask `(b, s)` f32.
pub fn pad_batch(seqs: &[&[u32]], dev: &Device) -> Result<(Tensor, Tensor)> {
    let s = seqs.iter().map(|q| q.len()).max().unwrap_or(0);
    let mut ids = vec![0u32; seqs.len() * s];
    let mut mask = vec![0f32; seqs.len() * s];
    for (i, q) in seqs.iter().enumerate() {
        ids[i * s..i * s + q.len()].copy_from_slice(q);
        mask[i * s..i * s + q.len()].fill(1.0);
    }
    Ok((
        Tensor::from_vec(ids, (seqs.len(), s), dev)?,
        Tensor::from_vec(mask, (seqs.len(), s), dev)?,
    ))
}
