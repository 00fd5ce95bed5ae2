//! The cache's section of the runtime configuration.

use crate::PolicyKind;
use qvl_core::ByteSize;
use serde::{Deserialize, Serialize};

/// Sizes of the three levels and the eviction policy they use. A level of
/// size 0 is left out. Embedded in the runtime's figment config.
///
/// ```toml
/// gpu_cache_size = "512MiB"
/// cpu_cache_size = "2GiB"
/// ssd_cache_size = "16GiB"
/// eviction_policy = "predictive"   # lru, lfu, arc, s3_fifo, predictive, learned
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// L1: GPU memory for cached blocks.
    pub gpu_cache_size: ByteSize,
    /// L2: host RAM for cached blocks.
    pub cpu_cache_size: ByteSize,
    /// L3: SSD space for cached blocks.
    pub ssd_cache_size: ByteSize,
    /// The policy of every level.
    pub eviction_policy: PolicyKind,
}

impl Default for CacheConfig {
    /// Sized for the reference machine (8-16 GB RAM, a small GPU, NVMe).
    fn default() -> Self {
        CacheConfig {
            gpu_cache_size: ByteSize::mib(512),
            cpu_cache_size: ByteSize::gib(2),
            ssd_cache_size: ByteSize::gib(16),
            eviction_policy: PolicyKind::Predictive,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes_and_snake_case_policies() {
        let c: CacheConfig = toml::from_str(
            "gpu_cache_size = \"256MiB\"\ncpu_cache_size = 1048576\nssd_cache_size = \"8GiB\"\neviction_policy = \"s3_fifo\"\n",
        )
        .unwrap();
        assert_eq!(c.gpu_cache_size, ByteSize::mib(256));
        assert_eq!(c.cpu_cache_size, ByteSize::mib(1));
        assert_eq!(c.ssd_cache_size, ByteSize::gib(8));
        assert_eq!(c.eviction_policy, PolicyKind::S3Fifo);
        let learned: CacheConfig = toml::from_str("eviction_policy = \"learned\"").unwrap();
        assert_eq!(learned.eviction_policy, PolicyKind::Learned);
        let partial: CacheConfig = toml::from_str("eviction_policy = \"lru\"").unwrap();
        assert_eq!(
            partial.cpu_cache_size,
            CacheConfig::default().cpu_cache_size
        );
        let err = toml::from_str::<CacheConfig>("eviction_policy = \"mru\"").unwrap_err();
        assert!(err.to_string().contains("unknown variant `mru`"), "{err}");
        let err = toml::from_str::<CacheConfig>("gpu_size = \"1GiB\"").unwrap_err();
        assert!(
            err.to_string().contains("unknown field `gpu_size`"),
            "{err}"
        );
    }
}
