//! # qvl-cache
//!
//! Hierarchical L1 GPU / L2 CPU / L3 SSD cache of KV blocks and tensors, with
//! eviction policies and access prediction.
//!
//! - [`TieredCache`]: three levels of byte capacity, each a
//!   [`qvl_core::BlockStore`] with its own [`qvl_core::EvictionPolicy`];
//!   promotion to L1 on a hit, demotion L1 → L2 → L3 → dropped on eviction,
//!   and prefetch hints that promote a request's chain ahead of use.
//! - [`HostStore`]: the host-memory block store.
//! - [`policy`]: LRU, LFU, ARC, S3-FIFO, the predictive policy, and Belady's
//!   offline optimum for benchmarks.
//! - [`trace`]: Mooncake trace parsing and replay ([`trace::replay`]);
//!   [`synthetic`]: a generated multi-turn chat workload in the same format.
//!
//! This crate depends on `qvl-core` and external crates only.
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

pub mod analysis;
mod config;
mod error;
#[cfg(feature = "cuda")]
pub mod gpu_store;
mod keymap;
mod list;
pub mod policy;
mod store;
pub mod synthetic;
mod tiered;
pub mod trace;

pub use config::CacheConfig;
pub use error::{CacheError, Result};
pub use policy::PolicyKind;
pub use store::HostStore;
pub use tiered::{CacheStats, TieredCache};
pub use trace::{replay, ReplayPolicy, ReplayStats, Trace};
