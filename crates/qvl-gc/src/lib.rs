//! # qvl-gc: adaptive garbage collection of tensor memory
//!
//! A forward pass makes and frees hundreds of tensors; a caching pool keeps
//! what is freed so the next pass does not pay the OS again. Kept memory is
//! not free memory: with requests of varied length every new size grows the
//! pool, and peak reserved memory drifts far above the peak of what is ever
//! live. This crate bounds that drift:
//!
//! - [`TensorRegistry`] implements [`qvl_core::LifetimeTracker`]: creation,
//!   last use, free, size, kind and site (layer and op) of each tensor, and
//!   lifetime statistics per site ([`SiteStats`]).
//! - [`SiteModel`] predicts per site (EWMA with mean deviation, recent
//!   quantiles) how long tensors live and when the site allocates again;
//!   [`TensorRegistry::forecast`] turns that into the memory freed soon and
//!   the sizes worth keeping cached.
//! - [`Collector`] collects: it drops the KV blocks of finished requests
//!   ([`KvBlockLedger`]), trims caches ([`CacheTrim`]) and releases cached
//!   allocator memory ([`AllocatorReclaim`] for any
//!   [`qvl_core::BufferAllocator`], [`CachingAllocator`] block by block),
//!   never what is live. Its interval follows memory pressure and the growth
//!   rate of reserved memory, and an allocator's pressure hook collects
//!   before a miss would pass the target: `(1 + target_slack)` times the
//!   highest live memory seen, so cache never raises the peak.
//! - [`LeakDetector`] checks that memory stays flat over many requests.
//!
//! ```
//! use qvl_core::{AllocRequest, BufferAllocator, DType, LifetimeTracker, TensorId, TensorKind, TensorMeta, UseSite};
//! use qvl_gc::{CachingAllocator, Collector, GcConfig, TensorRegistry, Trigger};
//! use std::sync::Arc;
//!
//! let config = GcConfig::default();
//! let registry = Arc::new(TensorRegistry::new(&config));
//! let pool = Arc::new(CachingAllocator::new());
//! let gc = Collector::new(config, registry.clone())?;
//! gc.register(pool.clone());
//! pool.set_pressure_hook(Some(gc.pressure_hook()));
//!
//! let meta = TensorMeta::new(vec![512, 2048], DType::F32, TensorKind::Activation);
//! let site = UseSite { layer: Some(0), op: "attn.q" };
//! let buf = pool.allocate(&AllocRequest::tensor(meta.clone()))?;
//! registry.on_create(TensorId(1), &meta, site);
//! drop(buf);
//! registry.on_free(TensorId(1));
//! let report = gc.collect(Trigger::Manual).expect("no other collection runs");
//! assert_eq!(report.after.reserved, 0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod caching;
mod collector;
mod config;
mod error;
mod leak;
pub mod predictor;
mod reclaim;
mod registry;

pub use caching::{CachedBuffer, CachingAllocator};
pub use collector::{CollectionReport, Collector, CollectorStats, CollectorThread, Trigger};
pub use config::{parse_duration, GcConfig};
pub use error::{GcError, Result};
pub use leak::{LeakDetector, LeakReport};
pub use predictor::{LifetimePrediction, SiteModel};
pub use reclaim::{
    AllocatorReclaim, CacheTrim, KvBlockLedger, MemoryUsage, ReclaimClass, ReclaimGoal,
    ReclaimHint, Reclaimable,
};
pub use registry::{Forecast, SiteStats, TensorRegistry};

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
