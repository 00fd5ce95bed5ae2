use qvl_core::{ByteSize, CoreError, Tier};

/// Errors of the pools, grouped by cause.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    // --- configuration ----------------------------------------------------
    /// A specialized pool in the configuration cannot be built.
    #[error("pool.specialized_pools.{pool}: {reason}")]
    InvalidConfig {
        /// Name of the specialized pool, as in the configuration.
        pool: String,
        /// What is wrong with it.
        reason: String,
    },

    // --- the request --------------------------------------------------------
    /// The requested alignment is not a power of two.
    #[error("alignment {align} of a {bytes}-byte request is not a power of two")]
    BadAlignment {
        /// The alignment asked for.
        align: usize,
        /// The size asked for.
        bytes: usize,
    },

    // --- the operating system ----------------------------------------------
    /// The address space for the pool could not be reserved.
    #[error("reserving {bytes} of address space for the host pool: {source}")]
    Reserve {
        /// Size of the reservation.
        bytes: ByteSize,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Cached memory could not be given back to the OS.
    #[error("giving {bytes} at offset {offset} back to the OS: {source}")]
    Decommit {
        /// Offset of the range in the pool.
        offset: usize,
        /// Length of the range.
        bytes: ByteSize,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The system allocator itself has no memory left (the pool had already
    /// fallen back to it).
    #[error("the system allocator could not provide {bytes} aligned to {align}")]
    SystemOutOfMemory {
        /// Size asked for.
        bytes: ByteSize,
        /// Alignment asked for.
        align: usize,
    },

    // --- CUDA (feature `cuda`) ---------------------------------------------
    /// No usable CUDA driver or device on this machine.
    #[cfg(feature = "cuda")]
    #[error("CUDA is unavailable: {reason}")]
    CudaUnavailable {
        /// What is missing.
        reason: String,
    },
    /// A CUDA driver call failed.
    #[cfg(feature = "cuda")]
    #[error("CUDA {op} failed: {source}")]
    Cuda {
        /// The driver call and what it was for.
        op: &'static str,
        /// The driver's error.
        #[source]
        source: cudarc::driver::DriverError,
    },
    /// A device or pinned pool has no room left within its limit.
    #[cfg(feature = "cuda")]
    #[error("the {tier} pool is full: need {needed}, {capacity} reserved for it in all")]
    PoolFull {
        /// The pool's tier.
        tier: Tier,
        /// Size asked for.
        needed: ByteSize,
        /// The pool's limit.
        capacity: ByteSize,
    },
    /// A copy between buffers of different sizes, or out of bounds.
    #[cfg(feature = "cuda")]
    #[error("copy of {what}: source has {source_bytes} bytes, destination {dest_bytes}")]
    CopySize {
        /// Which copy.
        what: &'static str,
        /// Bytes of the source.
        source_bytes: usize,
        /// Bytes of the destination.
        dest_bytes: usize,
    },

    // --- integrity ------------------------------------------------------------
    /// A block handed back that the pool does not consider handed out: a
    /// double free or a handle from elsewhere. Caught before any bookkeeping
    /// changes, so the pool stays consistent.
    #[error("invalid free of block {node} (generation {generation}): {reason}")]
    InvalidFree {
        /// Index of the block record named by the handle.
        node: u32,
        /// Generation carried by the handle.
        generation: u32,
        /// What did not match.
        reason: &'static str,
    },
}

impl From<PoolError> for CoreError {
    fn from(err: PoolError) -> CoreError {
        match err {
            e @ (PoolError::InvalidConfig { .. }
            | PoolError::BadAlignment { .. }
            | PoolError::InvalidFree { .. }) => CoreError::InvalidInput(e.to_string()),
            PoolError::Reserve { bytes, source } => CoreError::io(
                format!("reserving {bytes} of address space for the host pool"),
                source,
            ),
            PoolError::Decommit {
                offset,
                bytes,
                source,
            } => CoreError::io(
                format!("giving {bytes} at offset {offset} back to the OS"),
                source,
            ),
            #[cfg(feature = "cuda")]
            PoolError::CudaUnavailable { reason } => CoreError::Unavailable {
                backend: "cuda",
                reason,
            },
            #[cfg(feature = "cuda")]
            e @ PoolError::Cuda { .. } => CoreError::Unavailable {
                backend: "cuda",
                reason: e.to_string(),
            },
            #[cfg(feature = "cuda")]
            e @ PoolError::CopySize { .. } => CoreError::InvalidInput(e.to_string()),
            #[cfg(feature = "cuda")]
            PoolError::PoolFull {
                tier,
                needed,
                capacity,
            } => CoreError::OutOfCapacity {
                tier,
                needed,
                available: ByteSize(0),
                capacity,
            },
            PoolError::SystemOutOfMemory { bytes, .. } => CoreError::OutOfCapacity {
                tier: Tier::HostRam,
                needed: bytes,
                available: ByteSize(0),
                capacity: ByteSize(0),
            },
        }
    }
}
