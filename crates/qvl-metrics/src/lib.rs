//! # qvl-metrics
//!
//! Metrics collector, performance report, Prometheus text and live dashboard
//! for qvl.
//!
//! - [`Collector`] implements [`qvl_core::MetricsRecorder`]: every manager
//!   records into it through the trait. Recording is a few relaxed atomic
//!   adds on a per-thread shard: no lock, no allocation.
//! - [`Collector::snapshot`] reads everything; [`Snapshot::report`] derives
//!   the [`PerformanceReport`] (average and peak memory, cache hit rate,
//!   compression savings, swap operations, GC frequency, tokens/s), printed
//!   with [`PerformanceReport::table`] or [`PerformanceReport::to_json`].
//! - [`prometheus::render`] writes the Prometheus text format (`qvl:` names).
//! - [`Dashboard::serve`] runs the web dashboard (live charts over
//!   server-sent events, alerts, `/metrics`, `/api/snapshot`).
//!
//! This crate depends on `qvl-core` and external crates only.
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod alerts;
mod collector;
mod config;
pub mod dashboard;
mod error;
pub mod histogram;
pub mod prometheus;
mod snapshot;

pub use alerts::{Alert, AlertEngine, AlertKind};
pub use collector::{Collector, SamplerGuard};
pub use config::{AlertThresholds, DashboardConfig, MetricsConfig};
pub use dashboard::{Dashboard, DashboardHandle};
pub use error::MetricsError;
pub use histogram::HistogramSnapshot;
pub use snapshot::{
    human_bytes, human_seconds, CacheLevelSnapshot, CompressionKindSnapshot, GcSnapshot,
    MemoryReport, MigrationSnapshot, PerformanceReport, PhaseSnapshot, Snapshot,
    SwapDirectionSnapshot, TierSnapshot, TokensSnapshot,
};

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
