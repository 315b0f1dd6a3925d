//! A Llama-architecture LLM from a GGUF file, as the **stock** `candle_transformers` Llama: the
//! model of the LLM demo (`src/bin/llm_sentiment`, SmolLM2-135M-Instruct).
//!
//! - [`GgufFile`] reads the header and metadata once (candle's own GGUF reader) and checks the
//!   file before anything is dequantized: a Llama, every tensor inside the file, every tensor
//!   known;
//! - [`GgufFile::llama`] dequantizes every tensor to f32 and renames it to the Hugging Face Llama
//!   name (`blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight`), undoing llama.cpp's
//!   rotary permutation of the query and key rows, so `candle_transformers::models::llama::Llama`
//!   (and a PEFT adapter's module names) see the checkpoint transformers would load;
//! - [`GgufFile::tokenizer`] builds the byte-level BPE tokenizer the metadata describes
//!   (`tokenizer.ggml.*`) the way transformers does for the same file, and [`ChatTemplate`]
//!   renders its chat template (minijinja).
//!
//! Every problem is an [`LlmError`] naming the file and the key or tensor, never a panic.

mod chat;
mod error;
mod gguf;
mod tokenizer;

pub use chat::ChatTemplate;
pub use error::LlmError;
pub use gguf::{GgufFile, GgufLlama};
pub use tokenizer::bytes_to_unicode;
