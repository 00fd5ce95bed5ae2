//! Metrics recording: how every manager reports what it does.
//!
//! Implemented by `qvl-metrics` (the collector); called by every manager on
//! its hot paths, so implementations must be cheap (atomics, per-thread
//! shards) and must never block.

use crate::{TensorKind, Tier};
use std::time::Duration;

/// One observation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MetricEvent {
    /// A buffer was allocated.
    Alloc {
        /// Tier of the buffer.
        tier: Tier,
        /// Role of the tensor.
        kind: TensorKind,
        /// Bytes.
        bytes: u64,
        /// Time the allocation took.
        latency: Duration,
    },
    /// A buffer was returned.
    Free {
        /// Tier of the buffer.
        tier: Tier,
        /// Bytes.
        bytes: u64,
    },
    /// Memory held per tier, sampled.
    Memory {
        /// The tier.
        tier: Tier,
        /// Bytes handed out.
        allocated: u64,
        /// Bytes held from the system.
        reserved: u64,
    },
    /// One level of a cache probed by a lookup. A lookup reports one event
    /// per level it probed, fastest first: a miss for each level that did not
    /// hold the block and a hit for the one that did, so each level's hit
    /// ratio is the share of the lookups reaching it that it served.
    CacheLookup {
        /// The level probed.
        tier: Tier,
        /// Whether it hit.
        hit: bool,
    },
    /// A tensor was encoded.
    Compress {
        /// Role of the tensor.
        kind: TensorKind,
        /// Bytes in.
        input_bytes: u64,
        /// Bytes out.
        output_bytes: u64,
        /// Relative Frobenius error.
        rel_error: f64,
    },
    /// A block was written to or read from swap.
    Swap {
        /// True for a write (swap out), false for a read (swap in).
        out: bool,
        /// Bytes moved.
        bytes: u64,
        /// Time the I/O took.
        latency: Duration,
    },
    /// An object moved between tiers.
    Migration {
        /// Where it was.
        from: Tier,
        /// Where it is now.
        to: Tier,
        /// Bytes moved.
        bytes: u64,
    },
    /// The collector ran.
    GcRun {
        /// Bytes released.
        freed: u64,
        /// Time it took.
        pause: Duration,
    },
    /// A phase of the runtime's pipeline changed state, or reports its
    /// measured overhead (sent at start-up, on every change and once per
    /// decode step by the runtime).
    Phase {
        /// The phase's number: 1 pool, 2 cache, 3 compression, 4 swapping,
        /// 5 tiering, 6 gc.
        phase: u8,
        /// Its state now.
        state: PhaseState,
        /// Mean measured overhead, as a share of step (or request) time;
        /// NaN before it was measured.
        overhead: f64,
        /// The phase's overhead budget, in the same unit.
        budget: f64,
    },
    /// Tokens were produced.
    Tokens {
        /// How many.
        count: u64,
        /// Time they took.
        elapsed: Duration,
    },
}

/// Where a phase of the pipeline stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PhaseState {
    /// Built and in the run path.
    On,
    /// Not asked for, or nothing for it to do: the original path runs.
    Off,
    /// Asked for but its manager failed to start: the original path runs.
    Failed,
    /// Switched off at run time for costing more than its overhead budget.
    Deactivated,
}

impl PhaseState {
    /// The word in reports ("on", "off", "failed", "deactivated").
    pub fn as_str(self) -> &'static str {
        match self {
            PhaseState::On => "on",
            PhaseState::Off => "off",
            PhaseState::Failed => "failed",
            PhaseState::Deactivated => "deactivated",
        }
    }
}

/// The names of the six phases, by number - 1.
pub const PHASE_NAMES: [&str; 6] = ["pool", "cache", "compression", "swapping", "tiering", "gc"];

/// Receives observations.
pub trait MetricsRecorder: Send + Sync {
    /// Records one event. Must not block.
    fn record(&self, event: &MetricEvent);
}

/// Discards everything: the recorder of a manager used without metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopRecorder;

impl MetricsRecorder for NoopRecorder {
    fn record(&self, _event: &MetricEvent) {}
}
