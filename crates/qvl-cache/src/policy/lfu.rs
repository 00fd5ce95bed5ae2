//! Least frequently used, ties broken by recency.

use crate::keymap::KeyMap;
use crate::list::KeyList;
use qvl_core::{BlockInfo, BlockKey, EvictionPolicy};
use std::collections::BTreeMap;

/// Evicts the block with the fewest reads since it entered, the least
/// recently used among equals. O(log f) per operation, f the number of
/// distinct counts (at most the number of blocks).
#[derive(Default)]
pub struct Lfu {
    counts: KeyMap<u32>,
    buckets: BTreeMap<u32, KeyList<()>>,
}

impl Lfu {
    /// An empty LFU policy.
    pub fn new() -> Self {
        Self::default()
    }

    fn unlink(&mut self, key: &BlockKey, count: u32) {
        if let Some(bucket) = self.buckets.get_mut(&count) {
            bucket.remove(key);
            if bucket.is_empty() {
                self.buckets.remove(&count);
            }
        }
    }
}

impl EvictionPolicy for Lfu {
    fn name(&self) -> &'static str {
        "lfu"
    }

    fn on_insert(&mut self, key: BlockKey, _info: &BlockInfo) {
        if let Some(old) = self.counts.insert(key, 1) {
            self.unlink(&key, old);
        }
        self.buckets.entry(1).or_default().push_front(key, ());
    }

    fn on_access(&mut self, key: BlockKey) {
        let Some(count) = self.counts.get_mut(&key) else {
            return;
        };
        let old = *count;
        *count = old.saturating_add(1);
        let new = *count;
        self.unlink(&key, old);
        self.buckets.entry(new).or_default().push_front(key, ());
    }

    fn on_remove(&mut self, key: BlockKey) {
        if let Some(count) = self.counts.remove(&key) {
            self.unlink(&key, count);
        }
    }

    fn evict(&mut self) -> Option<BlockKey> {
        let mut entry = self.buckets.first_entry()?;
        let (key, ()) = entry.get_mut().pop_back()?;
        if entry.get().is_empty() {
            entry.remove();
        }
        self.counts.remove(&key);
        Some(key)
    }

    fn len(&self) -> usize {
        self.counts.len()
    }
}
