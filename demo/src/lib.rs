//! The sentiment demo's BERT training engine (not part of the `fourierft` library): MiniLM-L6
//! (all-MiniLM-L6-v2) from its safetensors, with trainable adapters on the attention's query and
//! value projections. The demo itself is `src/bin/sentiment` (`scripts/demo.sh`).
//!
//! Built for training on CPU with candle 0.11, where every pass over memory, every
//! graph node (candle zero-fills and accumulates a gradient buffer per node) and every
//! weight-sized GEMM shows in the step time. Per layer the graph has seven nodes:
//! - query and value ([`Proj`]), and the key through `fourierft::ops::frozen_linear`, whose
//!   backward computes dL/dx only, never a gradient for the frozen weight;
//! - attention as one custom op ([`attention()`]): per sequence and head, small GEMMs
//!   (the `gemm` crate, on strided views of the `(b, s, h)` tensors, so no head split or
//!   merge copies) around a fused masked softmax, with a hand-written backward from the saved
//!   probabilities; sequences run in parallel ([`attention_composed`] is the same from candle
//!   ops, for tests);
//! - attention output + residual + layer norm as one op ([`residual_norm`]), and the whole
//!   feed-forward sub-block — first projection, GELU (erf form), second projection, residual,
//!   layer norm — as one op ([`ffn_block`]; its halves exist alone as [`linear_gelu`] and
//!   [`residual_norm`], which the tests compare it with), each with a hand-written backward
//!   (candle's fused `LayerNorm` has no backward; [`LayerNorm::forward_composed`] and [`gelu`]
//!   are the single-step versions the tests compare with);
//! - the sentence embedding is the mask-weighted mean of the last hidden states.
//!
//! Query and value are [`Proj::Fourier`], [`Proj::Lora`] (a minimal LoRA, the baseline) or
//! [`Proj::Frozen`]. The custom ops run on the CPU only.
//!
//! Modules: [`config`] (config.json, adapters), [`model`] (the encoder), [`proj`] (adapted
//! projections), [`attention`], [`ffn`] (GELU and the fused sub-blocks), [`norm`] (layer norm),
//! [`linear`] (frozen linear), [`tokenizer`], [`profile`] (`--profile`), [`run`] (what the
//! demos' training runs share), [`llm`] (a GGUF Llama as the stock candle-transformers model, for
//! the LLM demo `src/bin/llm_sentiment`); inside: `kernels`
//! (elementwise f32 kernels), `gemm` (the products on strided views), `storage` (tensor data).

pub mod attention;
pub mod config;
pub mod ffn;
mod gemm;
mod kernels;
pub mod linear;
pub mod llm;
pub mod model;
pub mod norm;
pub mod profile;
pub mod proj;
pub mod run;
mod storage;
pub mod tokenizer;

pub use attention::{attention, attention_composed};
pub use config::{Adapter, Config, LoraConfig};
pub use ffn::{ffn_block, gelu, linear_gelu, residual_norm};
pub use linear::FrozenLinear;
pub use model::{mean_pool, tune_runtime, Encoder};
pub use norm::LayerNorm;
pub use proj::{LoraLinear, Proj};
pub use tokenizer::{encode, pad_batch, tokenizer};
