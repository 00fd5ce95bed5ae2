//! Least recently used.

use crate::list::KeyList;
use qvl_core::{BlockInfo, BlockKey, EvictionPolicy};

/// Evicts the block read or inserted longest ago. O(1) per operation.
#[derive(Default)]
pub struct Lru {
    order: KeyList<()>,
}

impl Lru {
    /// An empty LRU policy.
    pub fn new() -> Self {
        Self::default()
    }
}

impl EvictionPolicy for Lru {
    fn name(&self) -> &'static str {
        "lru"
    }

    fn on_insert(&mut self, key: BlockKey, _info: &BlockInfo) {
        self.order.push_front(key, ());
    }

    fn on_access(&mut self, key: BlockKey) {
        self.order.move_to_front(&key);
    }

    fn on_remove(&mut self, key: BlockKey) {
        self.order.remove(&key);
    }

    fn evict(&mut self) -> Option<BlockKey> {
        self.order.pop_back().map(|(k, ())| k)
    }

    fn len(&self) -> usize {
        self.order.len()
    }
}
