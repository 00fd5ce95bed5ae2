//! `SwapConfig`: the `[swapping]` settings this crate acts on.

use crate::error::{Result, SwapError};
use serde::Deserialize;
use std::path::PathBuf;

/// Which resident blocks leave RAM first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum EvictionPolicyKind {
    /// Least recently used first.
    #[default]
    Lru,
    /// Least frequently used first (ties: least recent).
    Lfu,
}

/// How the swap file is read and written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum IoMode {
    /// O_DIRECT with aligned buffers where the file system accepts it,
    /// buffered I/O otherwise (the store reports which one it got).
    #[default]
    Auto,
    /// O_DIRECT or fail: for measurements that must keep the page cache out.
    Direct,
    /// Buffered reads and writes through the page cache.
    Buffered,
    /// Buffered writes, reads copied out of a memory map of the file.
    Mmap,
}

/// Settings of the swap space.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SwapConfig {
    /// Off: nothing is swapped (the owner keeps everything in RAM).
    pub enabled: bool,
    /// Share of the RAM budget, in (0, 1], above which resident blocks are
    /// swapped out. The rest of the budget is the prefetch window.
    pub memory_threshold: f64,
    /// Directory of the swap file; created with mode 0700 if missing.
    pub swap_directory: PathBuf,
    /// Victim choice among resident blocks.
    pub eviction_policy: EvictionPolicyKind,
    /// Most I/O operations in flight at once (also the I/O thread count).
    pub max_inflight: usize,
    /// Direct, buffered or memory-mapped I/O.
    pub io_mode: IoMode,
    /// Bytes of the swap file, preallocated at start (so that a full disk
    /// shows at start-up, not in the middle of a request).
    pub capacity_bytes: u64,
    /// Read latency, in microseconds, above which the latency controller
    /// halves the prefetch depth (it grows back by one per fast read).
    pub target_read_latency_us: u64,
}

impl Default for SwapConfig {
    fn default() -> Self {
        SwapConfig {
            enabled: true,
            memory_threshold: 0.8,
            swap_directory: std::env::temp_dir().join("qvl-swap"),
            eviction_policy: EvictionPolicyKind::Lru,
            max_inflight: 4,
            io_mode: IoMode::Auto,
            capacity_bytes: 1 << 30,
            target_read_latency_us: 20_000,
        }
    }
}

impl SwapConfig {
    /// Defaults with the swap file in `dir`.
    pub fn in_directory(dir: impl Into<PathBuf>) -> SwapConfig {
        SwapConfig {
            swap_directory: dir.into(),
            ..SwapConfig::default()
        }
    }

    /// Checks every value, naming the key at fault.
    pub fn validate(&self) -> Result<()> {
        if !(self.memory_threshold > 0.0 && self.memory_threshold <= 1.0) {
            return Err(SwapError::InvalidConfig(format!(
                "memory_threshold = {} is outside (0, 1]",
                self.memory_threshold
            )));
        }
        if self.max_inflight == 0 || self.max_inflight > 256 {
            return Err(SwapError::InvalidConfig(format!(
                "max_inflight = {} is outside 1..=256",
                self.max_inflight
            )));
        }
        if self.capacity_bytes < crate::format::PAGE as u64 {
            return Err(SwapError::InvalidConfig(format!(
                "capacity_bytes = {} is smaller than one page ({} bytes)",
                self.capacity_bytes,
                crate::format::PAGE
            )));
        }
        if self.swap_directory.as_os_str().is_empty() {
            return Err(SwapError::InvalidConfig(
                "swap_directory is empty".to_string(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deserializes_from_toml_with_defaults() {
        let c: SwapConfig = toml::from_str(
            "enabled = true\nmemory_threshold = 0.5\nswap_directory = \"/tmp/x\"\neviction_policy = \"lfu\"\nmax_inflight = 8\n",
        )
        .unwrap();
        assert_eq!(c.eviction_policy, EvictionPolicyKind::Lfu);
        assert_eq!(c.max_inflight, 8);
        assert_eq!(c.io_mode, IoMode::Auto);
        c.validate().unwrap();
        let bad = SwapConfig {
            memory_threshold: 1.5,
            ..c.clone()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("memory_threshold"));
        let unknown: std::result::Result<SwapConfig, _> = toml::from_str("max_inflights = 3");
        assert!(unknown.is_err());
    }
}
