//! # qvl-core: the contracts of the qvl memory managers
//!
//! This crate is small on purpose. It holds the vocabulary every qvl crate
//! speaks ([`Tier`], [`DType`], [`TensorKind`], [`TensorMeta`], [`BlockKey`],
//! [`ByteSize`]) and the traits that the managers implement and the runtime
//! composes:
//!
//! | trait | implemented by | called by |
//! |---|---|---|
//! | [`BufferAllocator`] | `qvl-pool` (host, pinned, device pools), the plain system path | the model, the cache, the swap space |
//! | [`BlockStore`] | host store (`qvl-cache`), GPU store (`qvl-pool`/cuda), SSD store (`qvl-swap`) | `qvl-cache`, `qvl-tier`, the model's paged KV cache |
//! | [`EvictionPolicy`] | `qvl-cache` (LRU, LFU, ARC, S3-FIFO, predictive), `qvl-swap` | the cache levels and the swap space |
//! | [`Codec`] | `qvl-compress` | the KV cache on its way to a slower tier, the tier manager |
//! | [`LifetimeTracker`] | `qvl-gc` | the model (tensor creation, use, free) |
//! | [`MetricsRecorder`] | `qvl-metrics` | every manager |
//!
//! Architecture invariant: this crate depends on no other qvl crate and on no
//! heavy external crate. Everything here must be cheap to compile and stable,
//! because every other crate builds on it.
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod alloc;
pub mod bench;
pub mod codec;
mod error;
mod key;
pub mod lifetime;
pub mod metrics;
pub mod policy;
mod size;
pub mod store;
mod types;

pub use alloc::{AllocRequest, AllocatorStats, BufferAllocator, HostBytes, SystemAllocator};
pub use codec::{Codec, CodecId, CodecReport, Encoded};
pub use error::{CoreError, Result};
pub use key::BlockKey;
pub use lifetime::{LifetimeTracker, TensorId, UseSite};
pub use metrics::{MetricEvent, MetricsRecorder, NoopRecorder, PhaseState, PHASE_NAMES};
pub use policy::{BlockInfo, EvictionPolicy};
pub use size::{ByteSize, ParseSizeError};
pub use store::{Block, BlockStore};
pub use types::{DType, TensorKind, TensorMeta, Tier};

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
