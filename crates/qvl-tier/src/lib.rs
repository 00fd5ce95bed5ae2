//! # qvl-tier
//!
//! Placement and migration of tensors across GPU, RAM and NVMe by access
//! frequency.
//!
//! A [`TierManager`] stores objects (weights per layer or per tensor, KV
//! blocks, vision embeddings) in a spill file on the SSD tier and keeps RAM
//! copies of the hottest ones under a byte budget ([`TierConfig`]).
//! Placement ([`placement::plan`]) scores objects by decayed access
//! frequency (or recency) and moves them with hysteresis: an object only
//! moves up when its hotness reaches `migration_threshold`, and only
//! displaces residents at most that fraction as hot. Promotions and
//! prefetches run on a background I/O thread and are published whole;
//! readers hold an `Arc` of the copy they got, so a migration never shows
//! them a half-moved object. [`TierManager::prefetch_after`] reads ahead
//! of an ordered stream (layer i+1 while layer i computes, the AirLLM and
//! FlexGen way). [`TierStats`] reports usage per tier, migrations each way,
//! hits per tier and the SSD read rate.
//!
//! This crate depends on `qvl-core` and external crates only.
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

mod buffer;
mod config;
mod error;
mod manager;
pub mod placement;
mod spill;
mod stats;

pub use config::{PlacementPolicy, TierConfig};
pub use error::{Result, TierError};
pub use manager::{ObjectId, Resident, TierManager};
pub use spill::{release_mapped_pages, Extent, SpillFile};
pub use stats::{TierStats, TierUsage};

/// Whether this build has a GPU tier: false, qvl-tier is built without
/// CUDA. A GPU budget is accepted, reported unavailable and ignored.
pub fn gpu_tier_available() -> bool {
    false
}

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
