//! [`TierConfig`]: budgets per tier and the migration policy.

use crate::error::{Result, TierError};
use qvl_core::ByteSize;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// How an object's hotness is scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PlacementPolicy {
    /// Access counts decayed exponentially with the number of accesses
    /// since (frequency with a recency bias).
    #[default]
    AccessFrequency,
    /// Recency only: the score is the decay factor since the last access.
    Recency,
}

/// Budgets and policy of a [`crate::TierManager`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TierConfig {
    /// GPU memory budget. Without a CUDA build it is reported unavailable
    /// and nothing is placed there.
    pub gpu_hbm: ByteSize,
    /// Host RAM budget: resident objects plus prefetch and streaming buffers.
    pub cpu_ram: ByteSize,
    /// SSD budget for the spill file (0: unlimited).
    pub nvme_ssd: ByteSize,
    /// Hotness in [0, 1] (score over the hottest score) an object needs to
    /// move up; an object only displaces a resident one that is at most
    /// this fraction as hot (the hysteresis that stops ping-pong).
    pub migration_threshold: f64,
    /// How hotness is scored.
    pub policy: PlacementPolicy,
    /// Accesses after which an unused object's score halves.
    pub half_life_accesses: u32,
    /// Read-ahead room, in largest objects, the RAM budget reserves for an
    /// ordered stream beside what its reader holds; reads ahead go as far
    /// as the room allows (0: no prefetch, every miss read on demand).
    pub prefetch_depth: usize,
    /// Drop the page cache for SSD ranges after writing and reading them
    /// (posix_fadvise DONTNEED), so the OS cache does not act as a hidden,
    /// unbudgeted RAM tier and SSD reads really come from the device.
    pub drop_page_cache: bool,
    /// Read the SSD tier with direct I/O (`O_DIRECT`) where the file
    /// system takes it: the device fills the page-aligned buffer itself,
    /// sparing the CPU the page-cache copy (the compute of a streamed
    /// layer then overlaps its neighbour's read), and the page cache
    /// cannot serve reads from unbudgeted RAM.
    pub direct_io: bool,
    /// Directory of the spill file (the SSD tier); the system temp dir when None.
    pub spill_dir: Option<PathBuf>,
}

impl Default for TierConfig {
    fn default() -> Self {
        TierConfig {
            gpu_hbm: ByteSize(0),
            cpu_ram: ByteSize::gib(1),
            nvme_ssd: ByteSize(0),
            migration_threshold: 0.7,
            policy: PlacementPolicy::AccessFrequency,
            half_life_accesses: 256,
            prefetch_depth: 1,
            drop_page_cache: true,
            direct_io: true,
            spill_dir: None,
        }
    }
}

impl TierConfig {
    /// The default config with a RAM budget of `cpu_ram`.
    pub fn with_ram_budget(cpu_ram: ByteSize) -> TierConfig {
        TierConfig {
            cpu_ram,
            ..TierConfig::default()
        }
    }

    /// Checks the values, naming the first bad one.
    pub fn validate(&self) -> Result<()> {
        if !(self.migration_threshold > 0.0 && self.migration_threshold <= 1.0) {
            return Err(TierError::Config(format!(
                "migration_threshold must be in (0, 1], got {}",
                self.migration_threshold
            )));
        }
        if self.half_life_accesses == 0 {
            return Err(TierError::Config(
                "half_life_accesses must be at least 1".to_string(),
            ));
        }
        if self.prefetch_depth > 64 {
            return Err(TierError::Config(format!(
                "prefetch_depth {} is more than 64 objects ahead",
                self.prefetch_depth
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_from_json_with_units_and_rejects_bad_threshold() {
        let c: TierConfig =
            serde_json::from_str(r#"{"cpu_ram": "64MiB", "policy": "recency"}"#).unwrap();
        assert_eq!(c.cpu_ram, ByteSize::mib(64));
        assert_eq!(c.policy, PlacementPolicy::Recency);
        assert_eq!(c.migration_threshold, 0.7);
        c.validate().unwrap();
        let bad = TierConfig {
            migration_threshold: 1.5,
            ..TierConfig::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("1.5"));
        assert!(serde_json::from_str::<TierConfig>(r#"{"ram": 1}"#).is_err());
    }
}
