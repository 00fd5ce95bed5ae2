//! Monitoring: usage per tier, migrations each way, hits per tier, I/O rate.

use qvl_core::Tier;
use serde::Serialize;
use std::sync::atomic::AtomicU64;

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) promotions: AtomicU64,
    pub(crate) demotions: AtomicU64,
    pub(crate) ram_hits: AtomicU64,
    pub(crate) prefetch_hits: AtomicU64,
    pub(crate) prefetch_late: AtomicU64,
    pub(crate) ssd_hits: AtomicU64,
    pub(crate) prefetch_issued: AtomicU64,
    pub(crate) prefetch_skipped: AtomicU64,
    pub(crate) ssd_read_bytes: AtomicU64,
    pub(crate) ssd_read_nanos: AtomicU64,
}

/// Budget and use of one tier.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TierUsage {
    /// The tier.
    pub tier: Tier,
    /// Its budget in bytes (0 for the SSD tier: unlimited).
    pub budget: u64,
    /// Bytes held now: for RAM every live buffer (kept copies, prefetched
    /// and streaming buffers still held by readers); for SSD the spill file span.
    pub used: u64,
    /// Highest `used` seen.
    pub peak: u64,
    /// Objects with a copy in this tier.
    pub objects: usize,
    /// False for the GPU tier without a CUDA build.
    pub available: bool,
}

/// A snapshot of a [`crate::TierManager`]'s counters.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TierStats {
    /// GPU, RAM, SSD.
    pub tiers: Vec<TierUsage>,
    /// Bytes of the RAM copies the manager keeps.
    pub resident_bytes: u64,
    /// Bytes of freed read buffers kept for reuse (part of the RAM use).
    pub pooled_bytes: u64,
    /// Bytes of all objects, as RAM would hold them (whole pages).
    pub object_bytes: u64,
    /// Migrations SSD -> RAM.
    pub promotions: u64,
    /// Migrations RAM -> SSD (the RAM copy dropped; the SSD copy stays).
    pub demotions: u64,
    /// Reads served from a kept RAM copy.
    pub ram_hits: u64,
    /// Reads served from a prefetched buffer.
    pub prefetch_hits: u64,
    /// Of those, reads that had to wait for the prefetch to finish.
    pub prefetch_late: u64,
    /// Reads that went to the SSD on demand.
    pub ssd_hits: u64,
    /// Prefetch reads started.
    pub prefetch_issued: u64,
    /// Prefetches not started because the RAM budget had no room.
    pub prefetch_skipped: u64,
    /// Bytes read from the SSD tier (demand, prefetch and promotion).
    pub ssd_read_bytes: u64,
    /// Time spent in those reads, in nanoseconds.
    pub ssd_read_nanos: u64,
    /// Bytes written to the SSD tier.
    pub ssd_write_bytes: u64,
    /// Seconds since the manager started.
    pub elapsed_secs: f64,
}

impl TierStats {
    /// Usage of `tier`.
    pub fn tier(&self, tier: Tier) -> Option<&TierUsage> {
        self.tiers.iter().find(|t| t.tier == tier)
    }

    /// Bytes per second of the SSD reads while they ran.
    pub fn ssd_read_bandwidth(&self) -> f64 {
        self.ssd_read_bytes as f64 / (self.ssd_read_nanos as f64 * 1e-9).max(1e-9)
    }

    /// A one-line summary.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        for t in &self.tiers {
            if !t.available {
                s.push_str(&format!(
                    "{}: unavailable (budget {} B); ",
                    t.tier, t.budget
                ));
            } else {
                s.push_str(&format!(
                    "{}: {} / {} B (peak {}, {} objects); ",
                    t.tier, t.used, t.budget, t.peak, t.objects
                ));
            }
        }
        s.push_str(&format!(
            "promotions {}, demotions {}, hits ram {} prefetch {} ssd {}, read {} B at {:.0} MB/s",
            self.promotions,
            self.demotions,
            self.ram_hits,
            self.prefetch_hits,
            self.ssd_hits,
            self.ssd_read_bytes,
            self.ssd_read_bandwidth() / 1e6
        ));
        s
    }
}
