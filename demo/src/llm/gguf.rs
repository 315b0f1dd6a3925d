//! GGUF → the stock candle-transformers Llama: metadata, checks, dequantization, names.

use super::LlmError;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::llama::Config;
use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

/// A GGUF file's header and metadata, checked: the architecture is `llama`, every tensor's data
/// lies inside the file, and every tensor maps to a Hugging Face Llama weight.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    content: Content,
}

/// A Llama from a GGUF: the stock model's configuration and its weights, dequantized to f32
/// under Hugging Face names.
#[derive(Debug, Clone)]
pub struct GgufLlama {
    /// The configuration for `candle_transformers::models::llama::Llama::load`.
    pub config: Config,
    /// `model.embed_tokens.weight`, `model.layers.{i}.self_attn.q_proj.weight`, … (f32).
    pub tensors: HashMap<String, Tensor>,
}

impl GgufLlama {
    /// A `VarBuilder` over the weights (the tensors are shared, not copied).
    pub fn var_builder(&self, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_tensors(self.tensors.clone(), DType::F32, device)
    }
}

/// How a weight's rows are stored: llama.cpp interleaves each head's query and key rows for its
/// rotary kernel.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Rows {
    AsStored,
    /// Permuted per attention head.
    Query,
    /// Permuted per key/value head.
    Key,
}

impl GgufFile {
    /// Reads `path`'s header and metadata (no tensor data) and checks it; see [`GgufFile`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self, LlmError> {
        let path = path.as_ref().to_path_buf();
        let file_err = |message: String| LlmError::File {
            path: path.clone(),
            message,
        };
        let mut f = File::open(&path).map_err(|e| file_err(format!("cannot open: {e}")))?;
        let len = f
            .metadata()
            .map_err(|e| file_err(format!("cannot stat: {e}")))?
            .len();
        let content = Content::read(&mut BufReader::new(&mut f))
            .map_err(|e| file_err(format!("not a readable GGUF file: {e}")))?;
        let file = Self {
            path: path.clone(),
            content,
        };
        let arch = file.string("general.architecture", "the model architecture")?;
        if arch != "llama" {
            return Err(LlmError::NotLlama {
                path,
                found: arch.to_string(),
            });
        }
        let mut names: Vec<&String> = file.content.tensor_infos.keys().collect();
        names.sort();
        for name in names {
            let info = &file.content.tensor_infos[name];
            let elems = info.shape.elem_count();
            let block = info.ggml_dtype.block_size();
            if !elems.is_multiple_of(block) {
                return Err(file.tensor_err(
                    name,
                    format!("{elems} elements is not a whole number of {block}-element blocks"),
                ));
            }
            let needed = file.content.tensor_data_offset
                + info.offset
                + (elems / block * info.ggml_dtype.type_size()) as u64;
            if needed > len {
                return Err(LlmError::Truncated {
                    path,
                    tensor: name.clone(),
                    needed,
                    found: len,
                });
            }
            if hf_name(name).is_none() {
                return Err(file.tensor_err(
                    name,
                    "no Hugging Face Llama weight maps to this tensor (an architecture variant this loader does not know)".into(),
                ));
            }
        }
        Ok(file)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The metadata (`general.*`, `llama.*`, `tokenizer.*`).
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    pub(super) fn get(&self, key: &str, needed_for: &'static str) -> Result<&Value, LlmError> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| LlmError::MissingKey {
                path: self.path.clone(),
                key: key.into(),
                needed_for,
            })
    }

    pub(super) fn bad_key(&self, key: &str, expected: &str, found: &Value) -> LlmError {
        LlmError::BadKey {
            path: self.path.clone(),
            key: key.into(),
            expected: expected.into(),
            found: describe(found),
        }
    }

    /// A string value.
    pub fn string(&self, key: &str, needed_for: &'static str) -> Result<&str, LlmError> {
        match self.get(key, needed_for)? {
            Value::String(s) => Ok(s),
            v => Err(self.bad_key(key, "a string", v)),
        }
    }

    /// A non-negative integer value (any of GGUF's integer types).
    pub fn count(&self, key: &str, needed_for: &'static str) -> Result<usize, LlmError> {
        let v = self.get(key, needed_for)?;
        as_count(v).ok_or_else(|| self.bad_key(key, "a non-negative integer", v))
    }

    fn float(&self, key: &str, needed_for: &'static str) -> Result<f64, LlmError> {
        match self.get(key, needed_for)? {
            Value::F32(x) => Ok(*x as f64),
            Value::F64(x) => Ok(*x),
            v => Err(self.bad_key(key, "a float", v)),
        }
    }

    fn optional<T>(&self, key: &str, read: Result<T, LlmError>) -> Result<Option<T>, LlmError> {
        if self.content.metadata.contains_key(key) {
            read.map(Some)
        } else {
            Ok(None)
        }
    }

    fn tensor_err(&self, tensor: &str, message: String) -> LlmError {
        LlmError::Tensor {
            path: self.path.clone(),
            tensor: tensor.into(),
            message,
        }
    }

    /// The stock Llama's configuration from the `llama.*` keys, as transformers maps them
    /// (`rope.freq_base` defaults to 10 000, `attention.head_count_kv` to the head count; the
    /// LM head is tied to the embedding when the file has no `output.weight`).
    pub fn llama_config(&self) -> Result<Config, LlmError> {
        const FOR: &str = "the Llama configuration";
        let hidden = self.count("llama.embedding_length", FOR)?;
        let heads = self.count("llama.attention.head_count", FOR)?;
        let kv = self
            .optional(
                "llama.attention.head_count_kv",
                self.count("llama.attention.head_count_kv", FOR),
            )?
            .unwrap_or(heads);
        if heads == 0 || kv == 0 || !hidden.is_multiple_of(heads) || !heads.is_multiple_of(kv) {
            return Err(LlmError::BadKey {
                path: self.path.clone(),
                key: "llama.attention.head_count".into(),
                expected: format!(
                    "a head count dividing the hidden size {hidden} and divisible by the key/value head count"
                ),
                found: format!("{heads} heads, {kv} key/value heads"),
            });
        }
        let head_dim = hidden / heads;
        if let Some(rot) = self.optional(
            "llama.rope.dimension_count",
            self.count("llama.rope.dimension_count", FOR),
        )? {
            if rot != head_dim {
                return Err(LlmError::BadKey {
                    path: self.path.clone(),
                    key: "llama.rope.dimension_count".into(),
                    expected: format!("the head dimension {head_dim} (partial rotary embeddings are not supported)"),
                    found: rot.to_string(),
                });
            }
        }
        if let Some(key) = self
            .content
            .metadata
            .keys()
            .find(|k| k.starts_with("llama.rope.scaling"))
        {
            let v = &self.content.metadata[key];
            return Err(self.bad_key(key, "no rope scaling (not supported here)", v));
        }
        let embed = self.info("token_embd.weight")?;
        let vocab = match self.optional("llama.vocab_size", self.count("llama.vocab_size", FOR))? {
            Some(v) => v,
            None => embed.first().copied().unwrap_or(0),
        };
        let eos = self.optional(
            "tokenizer.ggml.eos_token_id",
            self.count("tokenizer.ggml.eos_token_id", FOR),
        )?;
        let bos = self.optional(
            "tokenizer.ggml.bos_token_id",
            self.count("tokenizer.ggml.bos_token_id", FOR),
        )?;
        Ok(Config {
            hidden_size: hidden,
            intermediate_size: self.count("llama.feed_forward_length", FOR)?,
            vocab_size: vocab,
            num_hidden_layers: self.count("llama.block_count", FOR)?,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            use_flash_attn: false,
            rms_norm_eps: self.float("llama.attention.layer_norm_rms_epsilon", FOR)?,
            rope_theta: self
                .optional(
                    "llama.rope.freq_base",
                    self.float("llama.rope.freq_base", FOR),
                )?
                .unwrap_or(10_000.0) as f32,
            bos_token_id: bos.map(|b| b as u32),
            eos_token_id: eos
                .map(|e| candle_transformers::models::llama::LlamaEosToks::Single(e as u32)),
            rope_scaling: None,
            max_position_embeddings: self.count("llama.context_length", FOR)?,
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
        })
    }

    fn info(&self, name: &str) -> Result<Vec<usize>, LlmError> {
        self.content
            .tensor_infos
            .get(name)
            .map(|i| i.shape.dims().to_vec())
            .ok_or_else(|| self.tensor_err(name, "missing".into()))
    }

    /// Every tensor dequantized to f32 under its Hugging Face name, with the configuration; the
    /// shapes are checked against the configuration and no weight the model loads is missing.
    pub fn llama(&self, device: &Device) -> Result<GgufLlama, LlmError> {
        let config = self.llama_config()?;
        let expected = expected_shapes(&config);
        let mut reader = BufReader::new(File::open(&self.path).map_err(|e| LlmError::File {
            path: self.path.clone(),
            message: format!("cannot open: {e}"),
        })?);
        let mut tensors = HashMap::with_capacity(expected.len());
        let mut names: Vec<&String> = self.content.tensor_infos.keys().collect();
        names.sort();
        for name in names {
            let (hf, rows) =
                hf_name(name).ok_or_else(|| self.tensor_err(name, "unknown".into()))?;
            let want = expected.get(&hf).ok_or_else(|| {
                self.tensor_err(
                    name,
                    format!(
                        "{hf} is not a weight of this {}-layer Llama",
                        config.num_hidden_layers
                    ),
                )
            })?;
            let found = self.content.tensor_infos[name].shape.dims().to_vec();
            if &found != want {
                return Err(LlmError::Shape {
                    path: self.path.clone(),
                    tensor: name.clone(),
                    expected: want.clone(),
                    found,
                });
            }
            let candle = |e: candle_core::Error| self.tensor_err(name, e.to_string());
            let q = self
                .content
                .tensor(&mut reader, name, &Device::Cpu)
                .map_err(candle)?;
            let mut w = q.dequantize(&Device::Cpu).map_err(candle)?;
            match rows {
                Rows::AsStored => {}
                Rows::Query => w = unpermute(&w, config.num_attention_heads).map_err(candle)?,
                Rows::Key => w = unpermute(&w, config.num_key_value_heads).map_err(candle)?,
            }
            tensors.insert(hf, w.to_device(device).map_err(candle)?);
        }
        if let Some(missing) = expected.keys().filter(|k| !tensors.contains_key(*k)).min() {
            return Err(self.tensor_err(
                &gguf_name_of(missing),
                format!("missing (the model loads {missing})"),
            ));
        }
        Ok(GgufLlama { config, tensors })
    }
}

/// Whole-model tensors: GGUF name, Hugging Face name.
const GLOBAL: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// Per-layer tensors (`blk.{i}.` / `model.layers.{i}.`): GGUF name, Hugging Face name, rows.
const LAYER: [(&str, &str, Rows); 9] = [
    ("attn_norm.weight", "input_layernorm.weight", Rows::AsStored),
    (
        "ffn_norm.weight",
        "post_attention_layernorm.weight",
        Rows::AsStored,
    ),
    ("attn_q.weight", "self_attn.q_proj.weight", Rows::Query),
    ("attn_k.weight", "self_attn.k_proj.weight", Rows::Key),
    ("attn_v.weight", "self_attn.v_proj.weight", Rows::AsStored),
    (
        "attn_output.weight",
        "self_attn.o_proj.weight",
        Rows::AsStored,
    ),
    ("ffn_gate.weight", "mlp.gate_proj.weight", Rows::AsStored),
    ("ffn_up.weight", "mlp.up_proj.weight", Rows::AsStored),
    ("ffn_down.weight", "mlp.down_proj.weight", Rows::AsStored),
];

/// The Hugging Face name of a GGUF tensor, and how its rows are stored.
fn hf_name(gguf: &str) -> Option<(String, Rows)> {
    if let Some((_, hf)) = GLOBAL.iter().find(|(g, _)| *g == gguf) {
        return Some((hf.to_string(), Rows::AsStored));
    }
    let (layer, rest) = gguf.strip_prefix("blk.")?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (_, hf, rows) = LAYER.iter().find(|(g, _, _)| *g == rest)?;
    Some((format!("model.layers.{layer}.{hf}"), *rows))
}

/// The GGUF name of a Hugging Face weight name (for messages).
fn gguf_name_of(hf: &str) -> String {
    if let Some((g, _)) = GLOBAL.iter().find(|(_, h)| *h == hf) {
        return g.to_string();
    }
    let found = hf
        .strip_prefix("model.layers.")
        .and_then(|r| r.split_once('.'))
        .and_then(|(i, rest)| {
            let (g, _, _) = LAYER.iter().find(|(_, h, _)| *h == rest)?;
            Some(format!("blk.{i}.{g}"))
        });
    found.unwrap_or_else(|| hf.to_string())
}

/// Every weight the stock Llama loads, with its shape.
fn expected_shapes(c: &Config) -> HashMap<String, Vec<usize>> {
    let (h, hd) = (c.hidden_size, c.hidden_size / c.num_attention_heads);
    let (q, kv, ff) = (
        c.num_attention_heads * hd,
        c.num_key_value_heads * hd,
        c.intermediate_size,
    );
    let mut m = HashMap::new();
    m.insert("model.embed_tokens.weight".into(), vec![c.vocab_size, h]);
    m.insert("model.norm.weight".into(), vec![h]);
    if !c.tie_word_embeddings {
        m.insert("lm_head.weight".into(), vec![c.vocab_size, h]);
    }
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}.");
        for (name, shape) in [
            ("input_layernorm.weight", vec![h]),
            ("post_attention_layernorm.weight", vec![h]),
            ("self_attn.q_proj.weight", vec![q, h]),
            ("self_attn.k_proj.weight", vec![kv, h]),
            ("self_attn.v_proj.weight", vec![kv, h]),
            ("self_attn.o_proj.weight", vec![h, q]),
            ("mlp.gate_proj.weight", vec![ff, h]),
            ("mlp.up_proj.weight", vec![ff, h]),
            ("mlp.down_proj.weight", vec![h, ff]),
        ] {
            m.insert(format!("{p}{name}"), shape);
        }
    }
    m
}

/// Undoes llama.cpp's rotary permutation of a `(heads·head_dim, in)` query or key weight: each
/// head's rows are stored as `(head_dim/2, 2)` pairs; Hugging Face's layout is `(2, head_dim/2)`.
pub(crate) fn unpermute(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (out, inn) = w.dims2()?;
    w.reshape((heads, out / heads / 2, 2, inn))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inn))
}

fn as_count(v: &Value) -> Option<usize> {
    match *v {
        Value::U8(x) => Some(x as usize),
        Value::U16(x) => Some(x as usize),
        Value::U32(x) => Some(x as usize),
        Value::U64(x) => usize::try_from(x).ok(),
        Value::I8(x) => usize::try_from(x).ok(),
        Value::I16(x) => usize::try_from(x).ok(),
        Value::I32(x) => usize::try_from(x).ok(),
        Value::I64(x) => usize::try_from(x).ok(),
        _ => None,
    }
}

/// A short description of a metadata value for messages.
pub(super) fn describe(v: &Value) -> String {
    match v {
        Value::String(s) if s.len() > 60 => format!("a string of {} bytes", s.len()),
        Value::String(s) => format!("{s:?}"),
        Value::Array(a) => format!("an array of {} values", a.len()),
        other => format!("{other:?}"),
    }
}
