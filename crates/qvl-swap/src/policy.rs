//! LRU and LFU victim choice over the resident blocks of a swap space.

use crate::config::EvictionPolicyKind;
use qvl_core::{BlockInfo, BlockKey, EvictionPolicy};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Least recently used first.
#[derive(Debug, Default)]
pub struct Lru {
    tick: u64,
    by_age: BTreeMap<u64, BlockKey>,
    age_of: HashMap<BlockKey, u64>,
}

impl EvictionPolicy for Lru {
    fn name(&self) -> &'static str {
        "lru"
    }

    fn on_insert(&mut self, key: BlockKey, _info: &BlockInfo) {
        self.on_remove(key);
        self.tick += 1;
        self.by_age.insert(self.tick, key);
        self.age_of.insert(key, self.tick);
    }

    fn on_access(&mut self, key: BlockKey) {
        if let Some(old) = self.age_of.get(&key).copied() {
            self.by_age.remove(&old);
            self.tick += 1;
            self.by_age.insert(self.tick, key);
            self.age_of.insert(key, self.tick);
        }
    }

    fn on_remove(&mut self, key: BlockKey) {
        if let Some(old) = self.age_of.remove(&key) {
            self.by_age.remove(&old);
        }
    }

    fn evict(&mut self) -> Option<BlockKey> {
        let (_, key) = self.by_age.pop_first()?;
        self.age_of.remove(&key);
        Some(key)
    }

    fn len(&self) -> usize {
        self.age_of.len()
    }
}

/// Least frequently used first; among equals, the least recently used.
#[derive(Debug, Default)]
pub struct Lfu {
    tick: u64,
    order: BTreeSet<(u64, u64, BlockKey)>,
    state: HashMap<BlockKey, (u64, u64)>,
}

impl EvictionPolicy for Lfu {
    fn name(&self) -> &'static str {
        "lfu"
    }

    fn on_insert(&mut self, key: BlockKey, _info: &BlockInfo) {
        self.on_remove(key);
        self.tick += 1;
        self.order.insert((1, self.tick, key));
        self.state.insert(key, (1, self.tick));
    }

    fn on_access(&mut self, key: BlockKey) {
        if let Some((count, tick)) = self.state.get(&key).copied() {
            self.order.remove(&(count, tick, key));
            self.tick += 1;
            self.order.insert((count + 1, self.tick, key));
            self.state.insert(key, (count + 1, self.tick));
        }
    }

    fn on_remove(&mut self, key: BlockKey) {
        if let Some((count, tick)) = self.state.remove(&key) {
            self.order.remove(&(count, tick, key));
        }
    }

    fn evict(&mut self) -> Option<BlockKey> {
        let (_, _, key) = self.order.pop_first()?;
        self.state.remove(&key);
        Some(key)
    }

    fn len(&self) -> usize {
        self.state.len()
    }
}

/// The policy a config names.
pub fn policy_for(kind: EvictionPolicyKind) -> Box<dyn EvictionPolicy> {
    match kind {
        EvictionPolicyKind::Lru => Box::new(Lru::default()),
        EvictionPolicyKind::Lfu => Box::new(Lfu::default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(i: u64) -> BlockKey {
        BlockKey::from_id(i)
    }

    fn info() -> BlockInfo {
        BlockInfo::kv(10, None, 0)
    }

    #[test]
    fn lru_evicts_the_least_recent() {
        let mut p = policy_for(EvictionPolicyKind::Lru);
        for i in 0..3 {
            p.on_insert(k(i), &info());
        }
        p.on_access(k(0));
        assert_eq!(p.evict(), Some(k(1)));
        p.on_remove(k(2));
        assert_eq!(p.evict(), Some(k(0)));
        assert_eq!(p.evict(), None);
        assert!(p.is_empty());
    }

    #[test]
    fn lfu_evicts_the_least_frequent_then_least_recent() {
        let mut p = policy_for(EvictionPolicyKind::Lfu);
        for i in 0..3 {
            p.on_insert(k(i), &info());
        }
        p.on_access(k(0));
        p.on_access(k(0));
        p.on_access(k(1));
        assert_eq!(p.evict(), Some(k(2)));
        assert_eq!(p.evict(), Some(k(1)));
        assert_eq!(p.len(), 1);
        assert_eq!(p.name(), "lfu");
    }
}
