//! The tokenizer a GGUF's `tokenizer.ggml.*` metadata describes, built as transformers builds it
//! for the same file (byte-level BPE: the file's vocabulary and merges, GPT-2's pre-tokenizer
//! split, the file's control tokens as special tokens).

use super::gguf::describe;
use super::{GgufFile, LlmError};
use candle_core::quantized::gguf_file::Value;
use std::collections::{HashMap, HashSet};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

const FOR: &str = "the tokenizer";

/// `tokenizer.ggml.pre` values whose text split is GPT-2's byte-level regex in transformers'
/// GGUF conversion (others there get their own split, which this loader does not build).
const GPT2_SPLIT_PRE: [&str; 3] = ["default", "gpt2", "smollm"];

/// llama.cpp's token types.
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// GPT-2's byte → printable character table (the alphabet byte-level vocabularies are spelled in).
pub fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if printable {
            b as char
        } else {
            extra += 1;
            char::from_u32(255 + extra).unwrap_or('\0')
        };
    }
    table
}

impl GgufFile {
    /// The tokenizer of this file: byte-level BPE with its vocabulary and merges, GPT-2's
    /// pre-tokenizer split (no prefix space), its control tokens (`<|im_start|>`, …) as special
    /// tokens and its user-defined tokens as added tokens; nothing added around the text.
    ///
    /// # Errors
    /// [`LlmError::MissingKey`] / [`LlmError::BadKey`] for absent or malformed
    /// `tokenizer.ggml.{model,tokens,merges,token_type}`; [`LlmError::Tokenizer`] for a tokenizer
    /// other than byte-level BPE with GPT-2's split, or one asking for a BOS/EOS token around
    /// every text (not built here).
    pub fn tokenizer(&self) -> Result<Tokenizer, LlmError> {
        let model = self.string("tokenizer.ggml.model", FOR)?;
        let unsupported = |message: String| LlmError::Tokenizer {
            path: self.path().to_path_buf(),
            message,
        };
        if model != "gpt2" {
            return Err(unsupported(format!(
                "tokenizer.ggml.model is {model:?}; only byte-level BPE (\"gpt2\") is built here"
            )));
        }
        if self.metadata().contains_key("tokenizer.ggml.pre") {
            let pre = self.string("tokenizer.ggml.pre", FOR)?;
            if !GPT2_SPLIT_PRE.contains(&pre) {
                return Err(unsupported(format!(
                    "tokenizer.ggml.pre is {pre:?}; only {GPT2_SPLIT_PRE:?} (GPT-2's split) are built here"
                )));
            }
        }
        for key in [
            "tokenizer.ggml.add_bos_token",
            "tokenizer.ggml.add_eos_token",
        ] {
            match self.metadata().get(key) {
                None | Some(Value::Bool(false)) => {}
                Some(Value::Bool(true)) => {
                    return Err(unsupported(format!(
                        "{key} is true; adding special tokens around every text is not built here"
                    )))
                }
                Some(v) => return Err(self.bad_key(key, "a bool", v)),
            }
        }
        let tokens = self.strings("tokenizer.ggml.tokens")?;
        let merges = self.strings("tokenizer.ggml.merges")?;
        let types: Vec<i64> = if self.metadata().contains_key("tokenizer.ggml.token_type") {
            let key = "tokenizer.ggml.token_type";
            let values = self.array(key)?;
            let types = values
                .iter()
                .map(|v| match *v {
                    Value::I32(t) => Some(t as i64),
                    Value::U32(t) => Some(t as i64),
                    Value::I64(t) => Some(t),
                    _ => None,
                })
                .collect::<Option<Vec<i64>>>()
                .ok_or_else(|| self.bad_key(key, "an array of integers", &values[0]))?;
            if types.len() != tokens.len() {
                return Err(LlmError::BadKey {
                    path: self.path().to_path_buf(),
                    key: key.into(),
                    expected: format!("{} values (one per token)", tokens.len()),
                    found: format!("{} values", types.len()),
                });
            }
            types
        } else {
            Vec::new()
        };

        let spelling = bytes_to_unicode();
        let alphabet: HashSet<char> = spelling.iter().copied().collect();
        let spelled = |t: &str| t.chars().all(|c| alphabet.contains(&c));
        let vocab: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let t = if spelled(t) {
                    t.to_string()
                } else {
                    t.bytes().map(|b| spelling[b as usize]).collect()
                };
                (t, i as u32)
            })
            .collect();
        let merges = merges
            .iter()
            .map(|m| match m.split_once(' ') {
                Some((a, b)) if !b.contains(' ') => Ok((a.to_string(), b.to_string())),
                _ => Err(LlmError::BadKey {
                    path: self.path().to_path_buf(),
                    key: "tokenizer.ggml.merges".into(),
                    expected: "merges of two tokens separated by one space".into(),
                    found: format!("{m:?}"),
                }),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(
                vocab
                    .iter()
                    .map(|(t, &i)| (t.clone(), i))
                    .collect::<tokenizers::models::bpe::Vocab>(),
                merges,
            )
            .build()
            .map_err(|e| unsupported(format!("building the BPE model: {e}")))?;
        let mut tok = Tokenizer::new(bpe);
        tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        tok.with_decoder(Some(ByteLevelDecoder::default()));
        let of_type = |ty: i64| {
            tokens
                .iter()
                .zip(&types)
                .filter(move |(_, &t)| t == ty)
                .map(|(s, _)| s.as_str())
        };
        // A control token outside the byte alphabet is a mislabel (its id's vocabulary entry is
        // respelled above); transformers skips it too.
        let control: Vec<AddedToken> = of_type(CONTROL)
            .filter(|t| spelled(t))
            .map(|t| AddedToken::from(t.to_string(), true))
            .collect();
        tok.add_special_tokens(control)
            .map_err(|e| unsupported(format!("adding the control tokens: {e}")))?;
        let user: Vec<AddedToken> = of_type(USER_DEFINED)
            .filter(|t| vocab.contains_key(*t))
            .map(|t| AddedToken::from(t.to_string(), false).normalized(false))
            .collect();
        tok.add_tokens(user)
            .map_err(|e| unsupported(format!("adding the user-defined tokens: {e}")))?;
        Ok(tok)
    }

    fn array(&self, key: &str) -> Result<&Vec<Value>, LlmError> {
        match self.get(key, FOR)? {
            Value::Array(a) if !a.is_empty() => Ok(a),
            v => Err(self.bad_key(key, "a non-empty array", v)),
        }
    }

    fn strings(&self, key: &str) -> Result<Vec<String>, LlmError> {
        self.array(key)?
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                v => Err(LlmError::BadKey {
                    path: self.path().to_path_buf(),
                    key: key.into(),
                    expected: "an array of strings".into(),
                    found: format!("an element {}", describe(v)),
                }),
            })
            .collect()
    }
}
