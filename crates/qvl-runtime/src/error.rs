use std::path::PathBuf;

/// Errors of the runtime, grouped by cause.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    // --- configuration ---------------------------------------------------
    /// A config file named on the command line does not exist.
    #[error("config file {} not found", path.display())]
    ConfigNotFound {
        /// The path as given.
        path: PathBuf,
    },
    /// A config file exists but cannot be read or parsed as TOML.
    #[error("cannot read config file {}: {reason}", path.display())]
    ConfigUnreadable {
        /// The file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// A key that no section has.
    #[error("unknown key `{key}`{origin}; {hint}")]
    UnknownKey {
        /// Full dotted key as written.
        key: String,
        /// " in <source>", or empty when unknown.
        origin: String,
        /// "did you mean `x`?" or the list of valid keys.
        hint: String,
    },
    /// A value of the wrong type.
    #[error("wrong type for `{key}`{origin}: expected {expected}, found {found}")]
    WrongType {
        /// Full dotted key.
        key: String,
        /// " in <source>".
        origin: String,
        /// The type the key takes.
        expected: String,
        /// What was written.
        found: String,
    },
    /// A value of the right type that is not allowed (bad unit, unknown variant).
    #[error("invalid value for `{key}`{origin}: {reason}")]
    InvalidValue {
        /// Full dotted key.
        key: String,
        /// " in <source>".
        origin: String,
        /// Why.
        reason: String,
    },
    /// A number outside its allowed range.
    #[error("`{key}` = {value}{origin} is out of range: allowed {allowed}")]
    OutOfRange {
        /// Full dotted key.
        key: String,
        /// The value as written.
        value: String,
        /// " in <source>".
        origin: String,
        /// The range, in words ("0.0 to 1.0").
        allowed: String,
    },

    // --- environment -----------------------------------------------------
    /// A directory qvl must own cannot be made private, or is not.
    #[error("directory {}: {reason}", path.display())]
    UnsafeDirectory {
        /// The directory.
        path: PathBuf,
        /// What is wrong ("is a symlink", "belongs to uid 1001").
        reason: String,
    },
    /// An I/O error with its context.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Result with [`RuntimeError`].
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;
