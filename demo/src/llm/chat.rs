//! The chat template of a GGUF (`tokenizer.chat_template`), rendered as transformers renders it:
//! Jinja with `trim_blocks` and `lstrip_blocks`, the special tokens as variables.

use super::{GgufFile, LlmError};
use minijinja::{context, Environment};

/// A GGUF's chat template, ready to render conversations.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
    path: std::path::PathBuf,
}

impl ChatTemplate {
    /// The template of `file` (`tokenizer.chat_template`), with its BOS and EOS tokens.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, LlmError> {
        let src = file
            .string("tokenizer.chat_template", "the chat template")?
            .to_string();
        let token = |key: &str| -> Result<String, LlmError> {
            if !file.metadata().contains_key(key) {
                return Ok(String::new());
            }
            let id = file.count(key, "the chat template")?;
            let tokens = match file.get("tokenizer.ggml.tokens", "the chat template")? {
                candle_core::quantized::gguf_file::Value::Array(a) => a,
                v => return Err(file.bad_key("tokenizer.ggml.tokens", "an array", v)),
            };
            match tokens.get(id) {
                Some(candle_core::quantized::gguf_file::Value::String(s)) => Ok(s.clone()),
                _ => Err(LlmError::BadKey {
                    path: file.path().to_path_buf(),
                    key: key.into(),
                    expected: format!("a token id below {}", tokens.len()),
                    found: id.to_string(),
                }),
            }
        };
        let (bos, eos) = (
            token("tokenizer.ggml.bos_token_id")?,
            token("tokenizer.ggml.eos_token_id")?,
        );
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_template_owned("chat", src)
            .map_err(|e| LlmError::Tokenizer {
                path: file.path().to_path_buf(),
                message: format!("tokenizer.chat_template does not parse: {e}"),
            })?;
        Ok(Self {
            env,
            bos,
            eos,
            path: file.path().to_path_buf(),
        })
    }

    /// The text of a conversation of `(role, content)` messages, ending with the assistant's
    /// turn header when `add_generation_prompt` (as transformers' `apply_chat_template(...,
    /// tokenize=False)`).
    pub fn render(
        &self,
        messages: &[(&str, &str)],
        add_generation_prompt: bool,
    ) -> Result<String, LlmError> {
        let messages: Vec<_> = messages
            .iter()
            .map(|(role, content)| context! { role => role, content => content })
            .collect();
        let tmpl = self.env.get_template("chat").map_err(|e| self.err(e))?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos,
            eos_token => self.eos,
        })
        .map_err(|e| self.err(e))
    }

    /// One user message, then the assistant's turn header.
    pub fn user_prompt(&self, user: &str) -> Result<String, LlmError> {
        self.render(&[("user", user)], true)
    }

    fn err(&self, e: minijinja::Error) -> LlmError {
        LlmError::Tokenizer {
            path: self.path.clone(),
            message: format!("rendering tokenizer.chat_template: {e}"),
        }
    }
}
