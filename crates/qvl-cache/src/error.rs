use qvl_core::CoreError;
use std::path::PathBuf;

/// Errors of the cache crate, grouped by cause.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    // --- input ------------------------------------------------------------
    /// A line of a trace file is not a valid request record.
    #[error("{path}:{line}: field `{field}`: {reason}")]
    TraceLine {
        /// The trace file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The field that is wrong (`json` when the line is not JSON at all).
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A trace holds no block access at all.
    #[error("trace {0} has no block accesses")]
    EmptyTrace(PathBuf),
    /// A replay was asked for with a capacity that cannot hold a block.
    #[error("invalid capacity: {0}")]
    InvalidCapacity(String),
    /// A policy name that is not known.
    #[error(
        "unknown eviction policy {0:?}: use lru, lfu, arc, s3_fifo, predictive, learned or belady"
    )]
    UnknownPolicy(String),

    // --- environment --------------------------------------------------------
    /// Reading a file failed.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    // --- stores -------------------------------------------------------------
    /// A block store of a level failed.
    #[error(transparent)]
    Store(#[from] CoreError),
}

/// Result with [`CacheError`].
pub type Result<T, E = CacheError> = std::result::Result<T, E>;
