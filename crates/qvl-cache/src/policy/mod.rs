//! Eviction policies, and the choice among them that configs make.

mod arc;
mod belady;
mod learned;
mod lfu;
mod lru;
mod predictive;
mod s3fifo;

pub use arc::Arc;
pub use belady::Belady;
pub use learned::Learned;
pub use lfu::Lfu;
pub use lru::Lru;
pub use predictive::Predictive;
pub use s3fifo::S3Fifo;

use crate::CacheError;
use qvl_core::EvictionPolicy;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The online eviction policies a cache level can be configured with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyKind {
    /// Least recently used.
    Lru,
    /// Least frequently used.
    Lfu,
    /// Adaptive Replacement Cache.
    Arc,
    /// S3-FIFO.
    S3Fifo,
    /// Hit-density prediction from reuse history and prefix structure.
    #[default]
    Predictive,
    /// Reuse probability from an online-trained model (LRB-style).
    Learned,
}

impl PolicyKind {
    /// Every online policy.
    pub const ALL: [PolicyKind; 6] = [
        PolicyKind::Lru,
        PolicyKind::Lfu,
        PolicyKind::Arc,
        PolicyKind::S3Fifo,
        PolicyKind::Predictive,
        PolicyKind::Learned,
    ];

    /// The name used in configs and reports.
    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Lru => "lru",
            PolicyKind::Lfu => "lfu",
            PolicyKind::Arc => "arc",
            PolicyKind::S3Fifo => "s3_fifo",
            PolicyKind::Predictive => "predictive",
            PolicyKind::Learned => "learned",
        }
    }

    /// A new, empty policy of this kind.
    pub fn build(self) -> Box<dyn EvictionPolicy> {
        match self {
            PolicyKind::Lru => Box::new(Lru::new()),
            PolicyKind::Lfu => Box::new(Lfu::new()),
            PolicyKind::Arc => Box::new(Arc::new()),
            PolicyKind::S3Fifo => Box::new(S3Fifo::new()),
            PolicyKind::Predictive => Box::new(Predictive::new()),
            PolicyKind::Learned => Box::new(Learned::new()),
        }
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for PolicyKind {
    type Err = CacheError;

    /// Accepts the config names, and `s3fifo` / `s3-fifo` for S3-FIFO.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        match lower.as_str() {
            "lru" => Ok(PolicyKind::Lru),
            "lfu" => Ok(PolicyKind::Lfu),
            "arc" => Ok(PolicyKind::Arc),
            "s3_fifo" | "s3fifo" | "s3-fifo" => Ok(PolicyKind::S3Fifo),
            "predictive" => Ok(PolicyKind::Predictive),
            "learned" | "lrb" => Ok(PolicyKind::Learned),
            _ => Err(CacheError::UnknownPolicy(s.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qvl_core::{BlockInfo, BlockKey};

    fn k(i: u64) -> BlockKey {
        BlockKey::from_id(i)
    }

    fn info() -> BlockInfo {
        BlockInfo::kv(512, None, 1)
    }

    /// Runs `ids` through a level of `capacity` blocks; returns the hits.
    fn run(policy: &mut dyn EvictionPolicy, capacity: usize, ids: &[u64]) -> usize {
        let mut resident = std::collections::HashSet::new();
        let mut hits = 0;
        for &id in ids {
            if resident.contains(&id) {
                hits += 1;
                policy.on_access(k(id));
                continue;
            }
            if resident.len() >= capacity {
                let victim = policy.evict().expect("a full level has a victim");
                let victim_id = *resident.iter().find(|r| k(**r) == victim).unwrap();
                resident.remove(&victim_id);
            }
            policy.on_insert(k(id), &info());
            resident.insert(id);
            assert_eq!(policy.len(), resident.len(), "{}", policy.name());
        }
        hits
    }

    #[test]
    fn lru_evicts_least_recent() {
        let mut p = Lru::new();
        for i in 0..3 {
            p.on_insert(k(i), &info());
        }
        p.on_access(k(0));
        assert_eq!(p.evict(), Some(k(1)));
        p.on_remove(k(2));
        assert_eq!(p.evict(), Some(k(0)));
        assert_eq!(p.evict(), None);
    }

    #[test]
    fn lfu_evicts_least_frequent_then_oldest() {
        let mut p = Lfu::new();
        for i in 0..3 {
            p.on_insert(k(i), &info());
        }
        p.on_access(k(0));
        p.on_access(k(0));
        p.on_access(k(1));
        assert_eq!(p.evict(), Some(k(2)));
        assert_eq!(p.evict(), Some(k(1)));
        assert_eq!(p.evict(), Some(k(0)));
        assert!(p.is_empty());
    }

    #[test]
    fn scan_resistant_policies_keep_a_hot_set_through_a_scan() {
        // A hot set of 4 blocks read between long scans of new blocks.
        let mut ids = Vec::new();
        let mut next_cold = 1000;
        for _ in 0..200 {
            ids.extend(0..4);
            for _ in 0..6 {
                ids.push(next_cold);
                next_cold += 1;
            }
        }
        // The hot blocks come back after 9 other blocks: LRU never keeps them.
        let lru_hits = run(&mut Lru::new(), 8, &ids);
        assert_eq!(lru_hits, 0);
        // Policies that remember evicted keys learn to keep them.
        for kind in [PolicyKind::S3Fifo, PolicyKind::Predictive] {
            let hits = run(kind.build().as_mut(), 8, &ids);
            assert!(hits > 400, "{kind}: {hits} hits of 800 hot reads");
        }
    }

    #[test]
    fn every_policy_tracks_inserts_removes_and_evictions() {
        // A skewed mix: a small hot set and a larger warm one.
        let ids: Vec<u64> = (0..2000u64)
            .map(|i| {
                if i % 3 == 0 {
                    i % 5
                } else {
                    10 + (i * 7919) % 40
                }
            })
            .collect();
        for kind in PolicyKind::ALL {
            let mut p = kind.build();
            let hits = run(p.as_mut(), 16, &ids);
            assert!(hits > 0, "{kind}");
            p.on_remove(k(ids[ids.len() - 1]));
            let mut drained = 0;
            while p.evict().is_some() {
                drained += 1;
            }
            assert_eq!(drained, 15, "{kind}");
            assert!(p.is_empty());
        }
    }

    #[test]
    fn belady_matches_the_optimum_on_a_known_sequence() {
        // Capacity 2: a b c a b c ... Belady hits half of the re-reads.
        let ids: Vec<u64> = [1, 2, 3, 1, 2, 3, 1, 2, 3].to_vec();
        let keys: Vec<BlockKey> = ids.iter().map(|i| k(*i)).collect();
        let mut belady = Belady::for_sequence(&keys);
        assert_eq!(run(&mut belady, 2, &ids), 3);
        assert_eq!(run(&mut Lru::new(), 2, &ids), 0);
    }

    #[test]
    fn policy_names_parse() {
        for kind in PolicyKind::ALL {
            assert_eq!(kind.name().parse::<PolicyKind>().unwrap(), kind);
        }
        assert_eq!("S3FIFO".parse::<PolicyKind>().unwrap(), PolicyKind::S3Fifo);
        let err = "mru".parse::<PolicyKind>().unwrap_err();
        assert!(err.to_string().contains("unknown eviction policy \"mru\""));
    }
}
