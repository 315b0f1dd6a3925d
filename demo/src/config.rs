//! The encoder's configuration: the fields of a BERT `config.json`, and what to attach to the
//! query and value projections.

use anyhow::{bail, Context, Result};
use fourierft::FourierFTConfig;
use serde::Deserialize;
use std::path::Path;

/// The fields of a BERT `config.json` the encoder uses (other keys are ignored).
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: String,
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let cfg: Config = serde_json::from_str(&text)?;
        if cfg.hidden_act != "gelu" {
            bail!(
                "only hidden_act = \"gelu\" is supported, found {:?}",
                cfg.hidden_act
            );
        }
        Ok(cfg)
    }
}

/// A minimal LoRA (PEFT's `LoraConfig` defaults: A Kaiming-uniform, B zero, dropout 0):
/// `y = base(x) + (alpha/r)·(x·Aᵀ)·Bᵀ`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub seed: u64,
}

/// What to attach to the query and value projections.
#[derive(Debug, Clone)]
pub enum Adapter {
    /// Nothing: the encoder is frozen.
    None,
    /// A FourierFT adapter (`fourierft::linear`).
    FourierFT(Box<FourierFTConfig>),
    /// A LoRA adapter.
    Lora(LoraConfig),
}
