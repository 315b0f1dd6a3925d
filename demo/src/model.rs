//! The MiniLM / BERT encoder: embeddings, layers of seven graph nodes, mean pooling.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Module, Tensor, Var, D};
use candle_nn::{Embedding, VarBuilder};
use fourierft::FourierLinear;
use std::path::Path;

use crate::attention::attention;
use crate::config::{Adapter, Config};
use crate::ffn::{ffn_block, residual_norm};
use crate::linear::FrozenLinear;
use crate::norm::LayerNorm;
use crate::profile;
use crate::proj::Proj;

struct Layer {
    query: Proj,
    key: FrozenLinear,
    value: Proj,
    attn_out: FrozenLinear,
    attn_norm: LayerNorm,
    ffn_in: FrozenLinear,
    ffn_out: FrozenLinear,
    ffn_norm: LayerNorm,
}

/// MiniLM / BERT encoder with adapters on query and value.
pub struct Encoder {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    emb_norm: LayerNorm,
    layers: Vec<Layer>,
    heads: usize,
    pub config: Config,
}

impl Encoder {
    /// Loads the encoder from `vb` (keys as in MiniLM's safetensors: `embeddings.*`,
    /// `encoder.layer.{i}.*`), with `adapter` on every query and value.
    pub fn load(vb: VarBuilder, config: &Config, adapter: &Adapter) -> Result<Self> {
        let h = config.hidden_size;
        if !h.is_multiple_of(config.num_attention_heads) {
            bail!("hidden_size {h} is not a multiple of num_attention_heads");
        }
        let eps = config.layer_norm_eps;
        let e = vb.pp("embeddings");
        let emb = |n: usize, name: &str| -> Result<Embedding> {
            Ok(Embedding::new(e.pp(name).get((n, h), "weight")?, h))
        };
        let word = emb(config.vocab_size, "word_embeddings")?;
        let position = emb(config.max_position_embeddings, "position_embeddings")?;
        let token_type = emb(config.type_vocab_size, "token_type_embeddings")?;
        let emb_norm = LayerNorm::load(h, eps, e.pp("LayerNorm"))?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let l = vb.pp(format!("encoder.layer.{i}"));
            let att = l.pp("attention");
            let s = att.pp("self");
            layers.push(Layer {
                query: Proj::load(h, adapter, s.pp("query"))?,
                key: FrozenLinear::load(h, h, s.pp("key"))?,
                value: Proj::load(h, adapter, s.pp("value"))?,
                attn_out: FrozenLinear::load(h, h, att.pp("output").pp("dense"))?,
                attn_norm: LayerNorm::load(h, eps, att.pp("output").pp("LayerNorm"))?,
                ffn_in: FrozenLinear::load(
                    h,
                    config.intermediate_size,
                    l.pp("intermediate").pp("dense"),
                )?,
                ffn_out: FrozenLinear::load(
                    config.intermediate_size,
                    h,
                    l.pp("output").pp("dense"),
                )?,
                ffn_norm: LayerNorm::load(h, eps, l.pp("output").pp("LayerNorm"))?,
            });
        }
        Ok(Self {
            word,
            position,
            token_type,
            emb_norm,
            layers,
            heads: config.num_attention_heads,
            config: config.clone(),
        })
    }

    /// Loads MiniLM from a directory holding `model.safetensors` and `config.json`.
    pub fn from_dir(dir: &Path, adapter: &Adapter) -> Result<Self> {
        let config = Config::from_file(&dir.join("config.json"))?;
        let weights = dir.join("model.safetensors");
        // SAFETY: the file is not modified while mapped (it is a read-only downloaded asset).
        let vb =
            unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &Device::Cpu)? };
        Self::load(vb, &config, adapter)
    }

    /// Last hidden states `(batch, seq, hidden)` for token ids `(batch, seq)` (u32) and an
    /// attention mask `(batch, seq)` (f32, 1 for tokens, 0 for padding).
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let s = ids.dim(1)?;
        let dev = ids.device();
        let positions = Tensor::arange(0u32, s as u32, dev)?;
        let x = self
            .word
            .forward(ids)?
            .broadcast_add(&self.position.forward(&positions)?)?
            .broadcast_add(
                &self
                    .token_type
                    .forward(&Tensor::zeros(1, DType::U32, dev)?)?,
            )?;
        let x = profile::time("embeddings + norm (fwd)", || self.emb_norm.forward(&x))?;
        // The layers work on (b·s, h) rows: every op takes and returns matrices, so no reshape
        // nodes (each would cost the backward a zero-filled buffer and an add).
        let (b, h) = (ids.dim(0)?, x.dim(D::Minus1)?);
        let mut x = x.reshape((b * s, h))?;
        for layer in &self.layers {
            let adapted = |p: &Proj, x: &Tensor| -> candle_core::Result<Tensor> {
                if !profile::enabled() || p.vars().is_empty() {
                    return profile::time("adapted q/v (fwd)", || p.forward(x));
                }
                // Marks around the projection time its backward (see profile::Mark).
                let clock = std::sync::Arc::new(std::sync::Mutex::new(None));
                let mark = |start| profile::Mark {
                    kind: "adapted q/v (bwd)",
                    start,
                    clock: clock.clone(),
                };
                let x = x.apply_op1(mark(false))?;
                let y = profile::time("adapted q/v (fwd)", || p.forward(&x))?;
                y.apply_op1(mark(true))
            };
            let q = adapted(&layer.query, &x)?;
            let k = profile::time("frozen key proj (fwd)", || layer.key.forward(&x))?;
            let v = adapted(&layer.value, &x)?;
            let ctx = profile::time("attention (fwd)", || {
                attention(&q, &k, &v, self.heads, mask)
            })?;
            let a = profile::time("attn out + norm (fwd)", || {
                residual_norm(&layer.attn_out, &layer.attn_norm, &ctx, &x)
            })?;
            // (The block times its two halves for the profile itself.)
            x = ffn_block(&layer.ffn_in, &layer.ffn_out, &layer.ffn_norm, &a)?;
        }
        Ok(x.reshape((b, s, h))?)
    }

    /// Sentence embeddings `(batch, hidden)`: mask-weighted mean of the last hidden states.
    pub fn embed(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        mean_pool(&self.forward(ids, mask)?, mask)
    }

    /// The trainable adapter parameters (empty without adapters).
    pub fn trainable_vars(&self) -> Vec<Var> {
        self.projections()
            .flat_map(|(_, p)| p.vars())
            .collect::<Vec<_>>()
    }

    /// Number of trainable adapter parameters.
    pub fn num_trainable(&self) -> usize {
        self.projections().map(|(_, p)| p.num_trainable()).sum()
    }

    /// (module path, projection) for every query and value, in layer order.
    pub fn projections(&self) -> impl Iterator<Item = (String, &Proj)> {
        self.layers.iter().enumerate().flat_map(|(i, l)| {
            let p = format!("encoder.layer.{i}.attention.self");
            [
                (format!("{p}.query"), &l.query),
                (format!("{p}.value"), &l.value),
            ]
        })
    }

    /// The FourierFT layers (module path, layer handle).
    pub fn fourier_layers(&self) -> Vec<(String, FourierLinear)> {
        self.projections()
            .filter_map(|(n, p)| match p {
                Proj::Fourier(l) => Some((n, l.clone())),
                _ => None,
            })
            .collect()
    }

    /// Every frozen weight the encoder computes with, named as in the safetensors file (for
    /// FourierFT layers: the current weight, which holds ΔW while merged).
    pub fn named_weights(&self) -> Result<Vec<(String, Tensor)>> {
        let dev = Device::Cpu;
        let ln = |name: String, l: &LayerNorm| -> Result<[(String, Tensor); 2]> {
            Ok([
                (
                    format!("{name}.weight"),
                    Tensor::new(l.weight.as_slice(), &dev)?,
                ),
                (
                    format!("{name}.bias"),
                    Tensor::new(l.bias.as_slice(), &dev)?,
                ),
            ])
        };
        let lin = |name: String, l: &FrozenLinear| -> Vec<(String, Tensor)> {
            let mut v = vec![(format!("{name}.weight"), l.weight.clone())];
            v.extend(l.bias.clone().map(|b| (format!("{name}.bias"), b)));
            v
        };
        let e = "embeddings";
        let mut out = vec![
            (
                format!("{e}.word_embeddings.weight"),
                self.word.embeddings().clone(),
            ),
            (
                format!("{e}.position_embeddings.weight"),
                self.position.embeddings().clone(),
            ),
            (
                format!("{e}.token_type_embeddings.weight"),
                self.token_type.embeddings().clone(),
            ),
        ];
        out.extend(ln(format!("{e}.LayerNorm"), &self.emb_norm)?);
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("encoder.layer.{i}");
            for (name, proj) in [("query", &l.query), ("value", &l.value)] {
                let name = format!("{p}.attention.self.{name}");
                match proj {
                    Proj::Frozen(f) => out.extend(lin(name, f)),
                    Proj::Lora(lora) => out.extend(lin(name, &lora.base)),
                    Proj::Fourier(f) => {
                        out.push((format!("{name}.weight"), f.weight()));
                        out.extend(f.bias().map(|b| (format!("{name}.bias"), b)));
                    }
                }
            }
            out.extend(lin(format!("{p}.attention.self.key"), &l.key));
            out.extend(lin(format!("{p}.attention.output.dense"), &l.attn_out));
            out.extend(ln(format!("{p}.attention.output.LayerNorm"), &l.attn_norm)?);
            out.extend(lin(format!("{p}.intermediate.dense"), &l.ffn_in));
            out.extend(lin(format!("{p}.output.dense"), &l.ffn_out));
            out.extend(ln(format!("{p}.output.LayerNorm"), &l.ffn_norm)?);
        }
        Ok(out)
    }

    /// Merges every FourierFT adapter into its weight.
    pub fn merge(&self) -> Result<()> {
        for (_, l) in self.fourier_layers() {
            l.merge()?;
        }
        Ok(())
    }

    /// Takes the FourierFT adapters out of the weights again.
    pub fn unmerge(&self) -> Result<()> {
        for (_, l) in self.fourier_layers() {
            l.unmerge()?;
        }
        Ok(())
    }
}

/// Mask-weighted mean over the sequence: `(b, s, h)`, `(b, s)` → `(b, h)`.
pub fn mean_pool(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let m = mask.unsqueeze(2)?;
    let sum = hidden.broadcast_mul(&m)?.sum(1)?;
    let count = m.sum(1)?.clamp(1e-9, f64::MAX)?;
    Ok(sum.broadcast_div(&count)?)
}

// ---------------------------------------------------------------------------------------------
// Runtime settings

/// The crate's CPU training settings (`fourierft::runtime::init_cpu_training`): candle's
/// elementwise ops on the calling thread instead of a second, spinning pool; freed buffers kept
/// by glibc malloc; subnormal floats flushed to zero on every thread that runs kernels (the
/// backward produces them, and on many Intel CPUs each GEMM operand that is subnormal costs a
/// microcode assist). Call first thing in `main`.
pub fn tune_runtime() {
    fourierft::runtime::init_cpu_training();
}
