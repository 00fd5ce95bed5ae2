//! The one error type of this crate, grouped by cause.

use std::path::PathBuf;

/// What went wrong in the tier manager.
#[derive(Debug, thiserror::Error)]
pub enum TierError {
    /// The configuration is unusable.
    #[error("invalid tier config: {0}")]
    Config(String),
    /// Reading or writing the SSD tier failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// The operation ("reading 4096 bytes at 8192 of").
        what: String,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Bytes read back from the spill file are not the bytes written there.
    #[error("corrupt spill file {path} at offset {offset} ({len} bytes): {reason}")]
    Corrupt {
        /// The spill file.
        path: PathBuf,
        /// Where the extent starts.
        offset: u64,
        /// Bytes read.
        len: u64,
        /// What did not match.
        reason: String,
    },
    /// A RAM buffer for a read could not be allocated.
    #[error("cannot allocate a {0}-byte read buffer")]
    OutOfMemory(u64),
    /// An object id this manager never handed out, or one removed already.
    #[error("unknown tier object {0}")]
    UnknownObject(u64),
    /// The background I/O thread is gone (it panicked or the manager shut down).
    #[error("the tier I/O thread stopped: {0}")]
    Stopped(String),
}

/// Results of this crate.
pub type Result<T> = std::result::Result<T, TierError>;
