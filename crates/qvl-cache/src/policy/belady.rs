//! Belady's MIN: the offline optimum, for benchmarks only.

use crate::keymap::KeyMap;
use qvl_core::{BlockInfo, BlockKey, EvictionPolicy};
use std::collections::BinaryHeap;

/// Evicts the resident block whose next access lies farthest in the future.
///
/// As every policy here, it must admit the block that missed (the victim is
/// chosen among the blocks already resident); this is how the reference
/// figures of issue 6 were computed. The optimum with bypass, which may
/// refuse the new block, is marginally higher (0.2464 instead of 0.2463 on
/// the Mooncake trace at 1%).
///
/// It must be told the future: the access sequence it will see, as the
/// index of each access's next access to the same key (`u64::MAX` for
/// never). Each `on_insert` or `on_access` call consumes one access of the
/// sequence in order. O(log n) per operation (a max-heap with lazy deletion).
pub struct Belady {
    next_use: Vec<u64>,
    cursor: usize,
    /// Next use of each resident key, as recorded at its latest access.
    resident: KeyMap<u64>,
    heap: BinaryHeap<(u64, BlockKey)>,
}

impl Belady {
    /// A policy for the access sequence `keys`, replayed in order.
    pub fn for_sequence(keys: &[BlockKey]) -> Self {
        let mut next_use = vec![u64::MAX; keys.len()];
        let mut seen: KeyMap<u64> = KeyMap::default();
        for (i, key) in keys.iter().enumerate().rev() {
            if let Some(&n) = seen.get(key) {
                next_use[i] = n;
            }
            seen.insert(*key, i as u64);
        }
        Belady {
            next_use,
            cursor: 0,
            resident: KeyMap::default(),
            heap: BinaryHeap::new(),
        }
    }

    fn touch(&mut self, key: BlockKey) {
        // Past the known sequence the key counts as never used again.
        let next = self.next_use.get(self.cursor).copied().unwrap_or(u64::MAX);
        self.cursor += 1;
        self.resident.insert(key, next);
        self.heap.push((next, key));
    }
}

impl EvictionPolicy for Belady {
    fn name(&self) -> &'static str {
        "belady"
    }

    fn on_insert(&mut self, key: BlockKey, _info: &BlockInfo) {
        self.touch(key);
    }

    fn on_access(&mut self, key: BlockKey) {
        self.touch(key);
    }

    fn on_remove(&mut self, key: BlockKey) {
        // The heap entry goes stale and is skipped at eviction.
        self.resident.remove(&key);
    }

    fn evict(&mut self) -> Option<BlockKey> {
        while let Some((next, key)) = self.heap.pop() {
            if self.resident.get(&key) == Some(&next) {
                self.resident.remove(&key);
                return Some(key);
            }
        }
        None
    }

    fn len(&self) -> usize {
        self.resident.len()
    }
}
