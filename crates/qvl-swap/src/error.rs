use qvl_core::{BlockKey, ByteSize, CoreError, Tier};
use std::path::PathBuf;

/// Errors of the swap space, grouped by cause.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    // --- configuration ----------------------------------------------------
    /// A config value outside its allowed range.
    #[error("swap config: {0}")]
    InvalidConfig(String),

    // --- the swap directory -------------------------------------------------
    /// The swap directory is a symbolic link (refused: it could point
    /// anywhere, including a directory another user controls).
    #[error("swap directory {} is a symbolic link; give the real path", path.display())]
    SymlinkDirectory {
        /// The configured path.
        path: PathBuf,
    },
    /// The swap directory belongs to another user.
    #[error("swap directory {} is owned by uid {owner}, not by this process (uid {me})", path.display())]
    ForeignOwner {
        /// The directory.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// The effective uid of this process.
        me: u32,
    },
    /// The swap path exists and is not a directory.
    #[error("swap path {} exists and is not a directory", path.display())]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },

    // --- capacity -----------------------------------------------------------
    /// The swap file has no free extent large enough.
    #[error("swap file {} is full: need {needed}, {free} free of {capacity}", path.display())]
    OutOfSpace {
        /// The swap file.
        path: PathBuf,
        /// Bytes the write needs.
        needed: ByteSize,
        /// Bytes free (possibly fragmented).
        free: ByteSize,
        /// The file's capacity.
        capacity: ByteSize,
    },
    /// The file system ran out of space (ENOSPC) while preallocating or
    /// writing the swap file.
    #[error("no space left on the device of {} while {what}", path.display())]
    DiskFull {
        /// The swap file.
        path: PathBuf,
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    // --- integrity ----------------------------------------------------------
    /// A stored block failed a check (magic, version, key, length, checksum).
    #[error("corrupt block {key} in {} at offset {offset}: {reason}", path.display())]
    Corrupt {
        /// The block asked for.
        key: BlockKey,
        /// The swap file.
        path: PathBuf,
        /// Where its record starts.
        offset: u64,
        /// What did not match.
        reason: String,
    },
    /// The swap file was removed or replaced behind this process's back.
    #[error("swap file {} is missing or was replaced: {reason}", path.display())]
    MissingFile {
        /// The swap file.
        path: PathBuf,
        /// What was found instead.
        reason: String,
    },

    // --- environment --------------------------------------------------------
    /// Any other I/O error, with the path and operation.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: String,
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The I/O threads are gone (the store is shutting down).
    #[error("swap I/O threads stopped before the request completed")]
    EngineStopped,
}

impl SwapError {
    /// An I/O error on `path`, turned into [`SwapError::DiskFull`] when the OS
    /// says ENOSPC (or EDQUOT), so that a full disk is named as such.
    pub(crate) fn io(what: impl Into<String>, path: impl Into<PathBuf>, e: std::io::Error) -> Self {
        let what = what.into();
        let path = path.into();
        match e.raw_os_error() {
            Some(code) if code == libc::ENOSPC || code == libc::EDQUOT => SwapError::DiskFull {
                path,
                what,
                source: e,
            },
            _ => SwapError::Io {
                what,
                path,
                source: e,
            },
        }
    }
}

impl From<SwapError> for CoreError {
    fn from(e: SwapError) -> CoreError {
        match e {
            SwapError::InvalidConfig(m) => CoreError::InvalidInput(m),
            SwapError::OutOfSpace {
                needed,
                free,
                capacity,
                ..
            } => CoreError::OutOfCapacity {
                tier: Tier::Ssd,
                needed,
                available: free,
                capacity,
            },
            SwapError::Corrupt {
                key,
                path,
                offset,
                reason,
            } => CoreError::Corrupt {
                key,
                tier: Tier::Ssd,
                reason: format!("{} at offset {offset}: {reason}", path.display()),
            },
            SwapError::DiskFull { path, what, source } | SwapError::Io { path, what, source } => {
                CoreError::io(format!("{what} {}", path.display()), source)
            }
            other => {
                let kind = match other {
                    SwapError::MissingFile { .. } => std::io::ErrorKind::NotFound,
                    SwapError::SymlinkDirectory { .. } | SwapError::ForeignOwner { .. } => {
                        std::io::ErrorKind::PermissionDenied
                    }
                    _ => std::io::ErrorKind::Other,
                };
                CoreError::io("swap space", std::io::Error::new(kind, other.to_string()))
            }
        }
    }
}

/// Result with [`SwapError`].
pub type Result<T, E = SwapError> = std::result::Result<T, E>;
