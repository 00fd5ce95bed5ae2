//! Buffer allocation: the contract of the pools.
//!
//! Implemented by `qvl-pool` (host, pinned host and CUDA device pools) and by
//! the plain system path ([`SystemAllocator`]); called by the model for
//! activations and KV blocks, by the cache and the swap space for staging
//! buffers. A buffer goes back to where it came from when it is dropped.

use crate::{Result, TensorKind, TensorMeta, Tier};
use serde::{Deserialize, Serialize};

/// What is being allocated: its size, alignment and, when known, the tensor
/// it will hold (pools specialize on kind and shape).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocRequest {
    /// Bytes needed.
    pub bytes: usize,
    /// Required alignment in bytes, a power of two (64 for SIMD, 4096 for O_DIRECT).
    pub align: usize,
    /// Role of the tensor.
    pub kind: TensorKind,
    /// Shape and type, when the caller knows them.
    pub meta: Option<TensorMeta>,
}

impl AllocRequest {
    /// Default alignment: a cache line, enough for any SIMD load.
    pub const DEFAULT_ALIGN: usize = 64;

    /// `bytes` bytes for a tensor of `kind`, cache-line aligned.
    pub fn bytes(bytes: usize, kind: TensorKind) -> Self {
        AllocRequest {
            bytes,
            align: Self::DEFAULT_ALIGN,
            kind,
            meta: None,
        }
    }

    /// Room for the tensor `meta` describes.
    pub fn tensor(meta: TensorMeta) -> Self {
        AllocRequest {
            bytes: meta.byte_len(),
            align: Self::DEFAULT_ALIGN,
            kind: meta.kind,
            meta: Some(meta),
        }
    }

    /// The same request with another alignment.
    pub fn with_align(mut self, align: usize) -> Self {
        self.align = align;
        self
    }
}

/// Counters in the shape users know from `torch.cuda.memory_stats()`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocatorStats {
    /// Bytes handed out and not yet returned.
    pub allocated_bytes: u64,
    /// Bytes held from the OS or driver (allocated plus cached).
    pub reserved_bytes: u64,
    /// Highest `allocated_bytes` seen.
    pub peak_allocated_bytes: u64,
    /// Highest `reserved_bytes` seen.
    pub peak_reserved_bytes: u64,
    /// Number of allocations served.
    pub alloc_count: u64,
    /// Number of buffers returned.
    pub free_count: u64,
    /// Allocations that had to go to the OS or driver (cache misses).
    pub os_alloc_count: u64,
    /// Memory given back to the OS or driver.
    pub os_free_count: u64,
}

impl AllocatorStats {
    /// Share of reserved memory not handed out: 0 is perfect.
    pub fn fragmentation(&self) -> f64 {
        if self.reserved_bytes == 0 {
            0.0
        } else {
            1.0 - self.allocated_bytes as f64 / self.reserved_bytes as f64
        }
    }
}

/// Bytes that the host can read and write directly.
pub trait HostBytes: AsRef<[u8]> + AsMut<[u8]> + Send {}
impl<T: AsRef<[u8]> + AsMut<[u8]> + Send> HostBytes for T {}

/// An allocator of buffers on one tier.
///
/// Implementations must be usable from many threads at once. Dropping a
/// `Buffer` returns it; there is no separate free call, so a buffer cannot
/// be freed twice or leaked by an early return.
pub trait BufferAllocator: Send + Sync {
    /// The buffer handed out. Host allocators hand out [`HostBytes`].
    type Buffer: Send;

    /// Where the buffers live.
    fn tier(&self) -> Tier;

    /// Allocates a buffer of at least `request.bytes` bytes aligned to
    /// `request.align`. Contents are unspecified.
    fn allocate(&self, request: &AllocRequest) -> Result<Self::Buffer>;

    /// Current counters.
    fn stats(&self) -> AllocatorStats;

    /// Gives cached, unused memory back to the OS or driver; returns how many
    /// bytes were released. Called by the garbage collector under pressure.
    fn release_cached(&self) -> u64 {
        0
    }
}

/// The plain path: every allocation is a fresh zeroed `Vec<u8>`, freed on drop.
///
/// This is what the runtime uses when pooling is off; it keeps no counters
/// because it keeps nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemAllocator;

impl BufferAllocator for SystemAllocator {
    type Buffer = Vec<u8>;

    fn tier(&self) -> Tier {
        Tier::HostRam
    }

    fn allocate(&self, request: &AllocRequest) -> Result<Vec<u8>> {
        Ok(vec![0u8; request.bytes])
    }

    fn stats(&self) -> AllocatorStats {
        AllocatorStats::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;

    #[test]
    fn tensor_request_takes_size_from_meta() {
        let meta = TensorMeta::new(vec![16, 2, 64], DType::F16, TensorKind::KvCache);
        let r = AllocRequest::tensor(meta).with_align(4096);
        assert_eq!(r.bytes, 16 * 2 * 64 * 2);
        assert_eq!(r.align, 4096);
        assert_eq!(r.kind, TensorKind::KvCache);
        let buf = SystemAllocator.allocate(&r).unwrap();
        assert_eq!(buf.len(), r.bytes);
    }

    #[test]
    fn fragmentation_is_unused_share_of_reserved() {
        let s = AllocatorStats {
            allocated_bytes: 75,
            reserved_bytes: 100,
            ..Default::default()
        };
        assert!((s.fragmentation() - 0.25).abs() < 1e-12);
        assert_eq!(AllocatorStats::default().fragmentation(), 0.0);
    }
}
