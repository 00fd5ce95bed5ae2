//! The error type of this crate, grouped by cause.

use qvl_core::CoreError;

/// Everything that can go wrong while encoding, decoding or selecting.
#[derive(Debug, thiserror::Error)]
pub enum CompressError {
    // --- input ------------------------------------------------------------
    /// The values, shape or output buffer do not agree.
    #[error("{what}: expected {expected}, got {actual}")]
    ShapeMismatch {
        /// What was checked ("values for shape [4, 8]").
        what: String,
        /// What the shape implies.
        expected: usize,
        /// What was given.
        actual: usize,
    },
    /// A shape that cannot be encoded (too many dims, overflow, a zero
    /// token axis out of range).
    #[error("invalid shape {shape:?}: {reason}")]
    InvalidShape {
        /// The shape given.
        shape: Vec<usize>,
        /// Why it is refused.
        reason: String,
    },
    /// A lossy codec got NaN or infinity, which has no quantized form.
    #[error("{codec}: non-finite value {value} at index {index}")]
    NonFinite {
        /// The codec refusing it.
        codec: &'static str,
        /// Flat index of the first such value.
        index: usize,
        /// The value.
        value: f32,
    },

    /// Values that the target format cannot hold (f16 above 65504).
    #[error("{codec}: {reason}")]
    Unrepresentable {
        /// The codec refusing them.
        codec: &'static str,
        /// Which values and why.
        reason: String,
    },

    // --- encoded bytes ------------------------------------------------------
    /// Encoded bytes that fail a header or length check.
    #[error("malformed {codec} encoding: {reason}")]
    Malformed {
        /// The codec whose bytes were read.
        codec: &'static str,
        /// What did not match.
        reason: String,
    },
    /// A codec id that this build does not know.
    #[error("unknown codec id {0}")]
    UnknownCodec(u16),

    // --- configuration --------------------------------------------------------
    /// A codec parameter or config field out of range.
    #[error("invalid compression setting {field}: {reason}")]
    InvalidConfig {
        /// The field or parameter.
        field: &'static str,
        /// The allowed range and what was given.
        reason: String,
    },

    // --- backends ---------------------------------------------------------------
    /// The SVD did not converge.
    #[error("SVD of a {rows}x{cols} matrix failed: {reason}")]
    Svd {
        /// Rows of the matrix.
        rows: usize,
        /// Columns of the matrix.
        cols: usize,
        /// faer's message.
        reason: String,
    },
    /// zstd failed to compress or decompress.
    #[error("zstd {op} failed: {source}")]
    Zstd {
        /// "compress" or "decompress".
        op: &'static str,
        /// The error zstd reported.
        #[source]
        source: std::io::Error,
    },
}

impl CompressError {
    pub(crate) fn malformed(codec: &'static str, reason: impl Into<String>) -> Self {
        CompressError::Malformed {
            codec,
            reason: reason.into(),
        }
    }

    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Self {
        CompressError::InvalidConfig {
            field,
            reason: reason.into(),
        }
    }
}

impl From<CompressError> for CoreError {
    fn from(e: CompressError) -> Self {
        match e {
            CompressError::UnknownCodec(id) => CoreError::UnknownCodec(format!("codec#{id}")),
            CompressError::Zstd { op, source } => CoreError::io(format!("zstd {op}"), source),
            other => CoreError::InvalidInput(other.to_string()),
        }
    }
}

/// Result with [`CompressError`].
pub type Result<T, E = CompressError> = std::result::Result<T, E>;
