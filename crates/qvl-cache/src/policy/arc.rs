//! Adaptive Replacement Cache (Megiddo and Modha, FAST 2003).

use crate::list::KeyList;
use qvl_core::{BlockInfo, BlockKey, EvictionPolicy};

/// ARC: a recency list T1 and a frequency list T2, with ghost lists B1 and
/// B2 of recently evicted keys that steer the target size of T1. O(1) per
/// operation.
///
/// The level's capacity is taken as the most blocks it has held at once, so
/// the policy works with byte-sized levels; the ghost lists together never
/// hold more keys than that.
#[derive(Default)]
pub struct Arc {
    t1: KeyList<()>,
    t2: KeyList<()>,
    b1: KeyList<()>,
    b2: KeyList<()>,
    /// Target size of T1, in blocks.
    target_t1: f64,
    high_water: usize,
}

impl Arc {
    /// An empty ARC policy.
    pub fn new() -> Self {
        Self::default()
    }

    fn trim_ghosts(&mut self) {
        let c = self.high_water.max(1);
        while self.t1.len() + self.b1.len() > c && !self.b1.is_empty() {
            self.b1.pop_back();
        }
        while self.t1.len() + self.t2.len() + self.b1.len() + self.b2.len() > 2 * c
            && !self.b2.is_empty()
        {
            self.b2.pop_back();
        }
    }
}

impl EvictionPolicy for Arc {
    fn name(&self) -> &'static str {
        "arc"
    }

    fn on_insert(&mut self, key: BlockKey, _info: &BlockInfo) {
        let c = self.high_water.max(1) as f64;
        if self.b1.remove(&key).is_some() {
            let delta = (self.b2.len() as f64 / self.b1.len().max(1) as f64).max(1.0);
            self.target_t1 = (self.target_t1 + delta).min(c);
            self.t2.push_front(key, ());
        } else if self.b2.remove(&key).is_some() {
            let delta = (self.b1.len() as f64 / self.b2.len().max(1) as f64).max(1.0);
            self.target_t1 = (self.target_t1 - delta).max(0.0);
            self.t2.push_front(key, ());
        } else {
            self.t1.push_front(key, ());
        }
        self.high_water = self.high_water.max(self.t1.len() + self.t2.len());
        self.trim_ghosts();
    }

    fn on_access(&mut self, key: BlockKey) {
        if self.t1.remove(&key).is_some() {
            self.t2.push_front(key, ());
        } else {
            self.t2.move_to_front(&key);
        }
    }

    fn on_remove(&mut self, key: BlockKey) {
        if self.t1.remove(&key).is_none() {
            self.t2.remove(&key);
        }
    }

    fn evict(&mut self) -> Option<BlockKey> {
        let from_t1 =
            !self.t1.is_empty() && (self.t1.len() as f64 > self.target_t1 || self.t2.is_empty());
        let key = if from_t1 {
            let (key, ()) = self.t1.pop_back()?;
            self.b1.push_front(key, ());
            key
        } else {
            let (key, ()) = self.t2.pop_back()?;
            self.b2.push_front(key, ());
            key
        };
        self.trim_ghosts();
        Some(key)
    }

    fn len(&self) -> usize {
        self.t1.len() + self.t2.len()
    }
}
