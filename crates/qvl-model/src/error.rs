use std::path::PathBuf;

/// Errors of qvl-model, grouped by cause.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    // --- environment -----------------------------------------------------
    /// An I/O error, with the path or operation that failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, and on which path.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    // --- malformed files -------------------------------------------------
    /// A safetensors file whose header or data does not hold together.
    #[error("{}: {reason}", path.display())]
    BadSafetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the tensor where one is concerned.
        reason: String,
    },
    /// A tensor with an element type this crate cannot read.
    #[error("{}: tensor {tensor:?} has unknown or unsupported dtype {dtype:?}", path.display())]
    UnknownDtype {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The dtype string as written in the header.
        dtype: String,
    },
    /// A config file that is missing fields or holds impossible values.
    #[error("config {}: {reason}", path.display())]
    BadConfig {
        /// The config file (or the checkpoint directory).
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// A GGUF file that cannot be read or holds what the model cannot use.
    #[error("GGUF {}: {source}", path.display())]
    Gguf {
        /// The file.
        path: PathBuf,
        /// What the reader found wrong.
        #[source]
        source: crate::gguf::GgufError,
    },
    /// A tokenizer that cannot be built from its file.
    #[error("tokenizer of {}: {source}", path.display())]
    Tokenizer {
        /// The file the tokenizer came from.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: crate::tokenizer::TokenizerError,
    },

    // --- checkpoint does not fit the model -------------------------------
    /// A tensor the model needs is in no file of the checkpoint.
    #[error("tensor {name:?} is missing from {source_desc}")]
    MissingTensor {
        /// The tensor name.
        name: String,
        /// Where it was looked for.
        source_desc: String,
    },
    /// A tensor whose shape does not match what the config implies.
    #[error(
        "tensor {name:?} in {source_desc} has shape {actual:?}, the config implies {expected:?}"
    )]
    ShapeMismatch {
        /// The tensor name.
        name: String,
        /// Where it came from.
        source_desc: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape stored.
        actual: Vec<usize>,
    },

    // --- bad requests ----------------------------------------------------
    /// Inputs that do not fit the model (token ids, image grids, pixel shapes).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A KV cache operation that cannot be done (unknown block, full store).
    #[error("kv cache: {0}")]
    KvCache(String),
    /// A golden file that lacks a case's tensors or metadata.
    #[error("golden {}: {reason}", path.display())]
    BadGolden {
        /// The golden file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl ModelError {
    /// Wraps an I/O error with the context that makes it actionable.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        ModelError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Result with [`ModelError`].
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
