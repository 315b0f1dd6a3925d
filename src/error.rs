//! The crate's single error type.

use std::path::PathBuf;

/// Everything that can go wrong in `fourierft`.
///
/// Every variant names the layer, tensor or file involved and, for shape problems, what was
/// expected and what was found, so a message is actionable on its own; messages are one line.
/// Bad files and bad values are errors, never panics (the loaders are fuzzed).
///
/// ```
/// use fourierft::{peft::PeftAdapter, Error};
/// let config = r#"{"peft_type": "FOURIERFT", "n_frequency": -3, "target_modules": ["fc1"]}"#;
/// match PeftAdapter::from_bytes(config, b"") {
///     Err(Error::File { path, message }) => {
///         assert_eq!(path.to_str(), Some("<adapter_config.json>"));
///         assert!(message.starts_with("invalid adapter config: key \"n_frequency\": invalid value"));
///     }
///     other => panic!("{other:?}"),
/// }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The number of spectral entries is impossible for the layer shape.
    #[error("{context}: n_frequency must be in 1..={max} for a {d1}x{d2} layer, found {n}")]
    EntryCount {
        /// Which layer or call asked for the entries.
        context: String,
        /// The requested number of entries.
        n: usize,
        /// The largest possible number of entries (d1·d2).
        max: usize,
        /// Rows of the layer (out_features).
        d1: usize,
        /// Columns of the layer (in_features).
        d2: usize,
    },

    /// An explicit entry lies outside the layer.
    #[error("entry {index} at (row {row}, col {col}) is outside the {d1}x{d2} spectrum")]
    EntryOutOfRange {
        /// Position of the offending entry in the list.
        index: usize,
        /// Its row (u).
        row: usize,
        /// Its column (v).
        col: usize,
        /// Rows of the layer.
        d1: usize,
        /// Columns of the layer.
        d2: usize,
    },

    /// An explicit entry appears twice.
    #[error("entry (row {row}, col {col}) is given twice (at positions {first} and {second})")]
    DuplicateEntry {
        /// Its row (u).
        row: usize,
        /// Its column (v).
        col: usize,
        /// First occurrence.
        first: usize,
        /// Second occurrence.
        second: usize,
    },

    /// A tensor does not have the shape it must have.
    #[error("{what}: expected shape {expected}, found {found}")]
    Shape {
        /// The tensor or input, e.g. `input of FourierLinear(in=768, out=768)`.
        what: String,
        /// The expected shape, in words or dims.
        expected: String,
        /// The shape that was found.
        found: String,
    },

    /// A tensor has a dtype this path cannot use.
    #[error("{what}: expected dtype {expected}, found {found:?}")]
    DType {
        /// The tensor involved.
        what: String,
        /// The accepted dtype(s).
        expected: String,
        /// The dtype that was found.
        found: candle_core::DType,
    },

    /// A configuration value is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// A merge would have produced NaN or infinite weights; nothing was changed.
    #[error("{what}: merging adapter(s) {adapters:?} produces non-finite weights; weights left untouched")]
    NonFinite {
        /// The layer or tensor.
        what: String,
        /// The adapters whose merge was refused.
        adapters: Vec<String>,
    },

    /// No adapter of that name exists on the layer.
    #[error("{what}: no adapter named {name:?} (have {available:?})")]
    UnknownAdapter {
        /// The layer.
        what: String,
        /// The requested name.
        name: String,
        /// The adapters the layer has.
        available: Vec<String>,
    },

    /// An adapter of that name already exists on the layer.
    #[error("{what}: an adapter named {name:?} already exists")]
    AdapterExists {
        /// The layer.
        what: String,
        /// The name.
        name: String,
    },

    /// The operation is not allowed in the layer's current merge state.
    #[error("{what}: {message}")]
    MergeState {
        /// The layer.
        what: String,
        /// What is wrong, e.g. "cannot delete adapter \"a\" while it is merged; unmerge first".
        message: String,
    },

    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A file's content is invalid (corrupt safetensors, bad JSON, missing tensor, ...).
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },

    /// An error from candle itself.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wraps this error into a [`candle_core::Error`] (for `Module::forward` and custom ops),
    /// keeping the message intact.
    pub fn into_candle(self) -> candle_core::Error {
        match self {
            Error::Candle(e) => e,
            other => candle_core::Error::wrap(other),
        }
    }
}

/// Lets `?` turn a crate error into a candle error, e.g. in a model's
/// `fn load(vb: VarBuilder) -> candle_core::Result<Self>` that calls
/// [`inject::linear`](crate::inject::linear); the message is kept (see [`Error::into_candle`]).
impl From<Error> for candle_core::Error {
    fn from(e: Error) -> Self {
        e.into_candle()
    }
}

/// Formats a shape as `[a, b, c]`.
pub(crate) fn dims_str(dims: &[usize]) -> String {
    format!("{dims:?}")
}
