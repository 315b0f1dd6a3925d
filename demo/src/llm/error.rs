//! The error of the GGUF loader.

use std::path::PathBuf;

/// What can be wrong with a GGUF file for [`GgufFile`](super::GgufFile).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LlmError {
    /// The file cannot be opened or read, or is not a GGUF.
    #[error("{}: {message}", path.display())]
    File { path: PathBuf, message: String },
    /// The file ends before a tensor's data does.
    #[error("{}: truncated: tensor {tensor} needs bytes up to {needed}, the file has {found}", path.display())]
    Truncated {
        path: PathBuf,
        tensor: String,
        needed: u64,
        found: u64,
    },
    /// `general.architecture` is not `llama`.
    #[error("{}: general.architecture is {found:?}; only \"llama\" GGUFs can be built as the stock candle-transformers Llama", path.display())]
    NotLlama { path: PathBuf, found: String },
    /// A metadata key the model or the tokenizer needs is absent.
    #[error("{}: metadata key {key} is missing (needed for {needed_for})", path.display())]
    MissingKey {
        path: PathBuf,
        key: String,
        needed_for: &'static str,
    },
    /// A metadata key holds something else than expected.
    #[error("{}: metadata key {key}: expected {expected}, found {found}", path.display())]
    BadKey {
        path: PathBuf,
        key: String,
        expected: String,
        found: String,
    },
    /// A tensor the model needs is absent, or one is present that no Llama weight maps to.
    #[error("{}: tensor {tensor}: {message}", path.display())]
    Tensor {
        path: PathBuf,
        tensor: String,
        message: String,
    },
    /// A tensor of another shape than the metadata implies.
    #[error("{}: tensor {tensor}: expected shape {expected:?}, found {found:?}", path.display())]
    Shape {
        path: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// The tokenizer or chat template the metadata describes cannot be built.
    #[error("{}: tokenizer: {message}", path.display())]
    Tokenizer { path: PathBuf, message: String },
}
