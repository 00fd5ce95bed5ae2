use crate::{BlockKey, ByteSize, Tier};

/// Errors of the contract layer, grouped by cause.
///
/// Manager crates have their own error enums; they convert into this one at
/// the trait boundary so that the runtime can compose stores and codecs from
/// different crates behind one error type.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    // --- capacity -------------------------------------------------------
    /// A store or allocator has no room for the request, even after eviction.
    #[error("{tier} is full: need {needed}, {available} available of {capacity}")]
    OutOfCapacity {
        /// The tier that is full.
        tier: Tier,
        /// Bytes the request needs.
        needed: ByteSize,
        /// Bytes still free.
        available: ByteSize,
        /// Total capacity of the store.
        capacity: ByteSize,
    },
    /// The request is larger than the store could ever hold.
    #[error("{what} of {size} is larger than the {tier} capacity {capacity}")]
    TooLarge {
        /// What was too large ("block", "buffer").
        what: &'static str,
        /// Its size.
        size: ByteSize,
        /// The tier.
        tier: Tier,
        /// The whole capacity.
        capacity: ByteSize,
    },

    // --- data integrity ---------------------------------------------------
    /// Stored data failed a check: a checksum, a header, a length.
    #[error("corrupt block {key} in {tier}: {reason}")]
    Corrupt {
        /// Key of the block.
        key: BlockKey,
        /// Where it was stored.
        tier: Tier,
        /// What did not match.
        reason: String,
    },
    /// Input to a codec or store does not have the shape or type it claims.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A codec id that this build does not know.
    #[error("unknown codec {0}")]
    UnknownCodec(String),

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
    /// A backend that is not available in this build or on this machine
    /// (no CUDA driver, feature not compiled in).
    #[error("{backend} is unavailable: {reason}")]
    Unavailable {
        /// The backend ("cuda", "o_direct").
        backend: &'static str,
        /// Why.
        reason: String,
    },
}

impl CoreError {
    /// Wraps an I/O error with the context that makes it actionable.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        CoreError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Result with [`CoreError`].
pub type Result<T, E = CoreError> = std::result::Result<T, E>;
