//! # qvl-pool: pools for tensor buffers
//!
//! [`HostPool`] implements [`qvl_core::BufferAllocator`] for host RAM. It
//! serves the allocation stream of inference (activations from 512 B to
//! hundreds of MiB, KV blocks, staging buffers) from memory it keeps, so
//! that a forward pass stops paying the system allocator and the OS for
//! fresh pages on every tensor. A request goes to:
//!
//! 1. a **specialized pool** when its kind and size match one configured in
//!    [`PoolConfig::specialized_pools`] (KV blocks): fixed-size slots, O(1)
//!    take and return;
//! 2. a **size class** when it is at most 256 KiB: eight classes per
//!    doubling from 512 B, slots cut from runs, with a per-thread cache in
//!    front so that most takes and returns touch no lock;
//! 3. the **best-fit arena** ([`bfc::BfcArena`]) otherwise: blocks in
//!    whole pages (so 4 KiB alignment for O_DIRECT comes free), split on
//!    allocation and merged with free neighbours on return, in one range that
//!    grows at its top;
//! 4. the **system allocator** when the pool is disabled, when it has reached
//!    `max_pool_size`, or for alignments beyond a page: the pool never fails
//!    where the system allocator would succeed.
//!
//! [`BufferAllocator::release_cached`](qvl_core::BufferAllocator::release_cached)
//! gives cached memory back to the OS. Counters come as
//! [`qvl_core::AllocatorStats`], and every allocation and free is reported to
//! an optional [`qvl_core::MetricsRecorder`].
//!
//! The arena and the slot stores work on offsets through the [`Backing`]
//! trait and never touch memory, so a CUDA device backend (issue 13) reuses
//! them as they are: with the `cuda` feature, [`cuda::DevicePool`] and
//! [`cuda::PinnedPool`] do, with frees ordered on CUDA streams.
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod backing;
pub mod bfc;
// Pure bookkeeping of the CUDA backings, tested without a GPU too.
#[cfg(any(feature = "cuda", test))]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
mod chunks;
mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
mod error;
mod host;
pub mod size_class;
mod slots;

pub use backing::{Backing, HostBacking};
pub use config::{PoolConfig, SpecializedPoolConfig};
pub use error::PoolError;
pub use host::{HostPool, PoolBuffer, SlabPoolStats};
