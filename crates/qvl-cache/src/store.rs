//! The host-memory block store.

use crate::keymap::KeyMap;
use qvl_core::{Block, BlockKey, BlockStore, ByteSize, CoreError, Tier};
use std::sync::{Mutex, MutexGuard};

struct Contents {
    blocks: KeyMap<Block>,
    used: u64,
}

/// Blocks in host RAM, with a byte capacity. Thread-safe: one mutex guards
/// the map and the byte count together, so they always agree. A get shares
/// the block's bytes (`Arc`) and copies nothing.
pub struct HostStore {
    tier: Tier,
    capacity: u64,
    contents: Mutex<Contents>,
}

impl HostStore {
    /// A host-RAM store of `capacity` bytes.
    pub fn new(capacity: ByteSize) -> Self {
        Self::on_tier(Tier::HostRam, capacity)
    }

    /// A host-memory store that reports `tier`: stands in for a GPU or SSD
    /// level in tests and on machines without one.
    pub fn on_tier(tier: Tier, capacity: ByteSize) -> Self {
        HostStore {
            tier,
            capacity: capacity.bytes(),
            contents: Mutex::new(Contents {
                blocks: KeyMap::default(),
                used: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Contents> {
        // A panic while holding the lock cannot leave the map and the count
        // out of step (each update is a single insert or remove plus an
        // addition), so a poisoned lock is still consistent.
        self.contents.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl BlockStore for HostStore {
    fn tier(&self) -> Tier {
        self.tier
    }

    fn put(&self, block: Block) -> qvl_core::Result<()> {
        let size = block.stored_bytes();
        if size > self.capacity {
            return Err(CoreError::TooLarge {
                what: "block",
                size: ByteSize(size),
                tier: self.tier,
                capacity: ByteSize(self.capacity),
            });
        }
        let mut c = self.lock();
        let replaced = c.blocks.get(&block.key).map_or(0, Block::stored_bytes);
        let after = c.used - replaced + size;
        if after > self.capacity {
            return Err(CoreError::OutOfCapacity {
                tier: self.tier,
                needed: ByteSize(size),
                available: ByteSize(self.capacity - (c.used - replaced)),
                capacity: ByteSize(self.capacity),
            });
        }
        c.used = after;
        c.blocks.insert(block.key, block);
        Ok(())
    }

    fn get(&self, key: &BlockKey) -> qvl_core::Result<Option<Block>> {
        Ok(self.lock().blocks.get(key).cloned())
    }

    fn remove(&self, key: &BlockKey) -> qvl_core::Result<bool> {
        let mut c = self.lock();
        match c.blocks.remove(key) {
            Some(b) => {
                c.used -= b.stored_bytes();
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn contains(&self, key: &BlockKey) -> bool {
        self.lock().blocks.contains_key(key)
    }

    fn capacity_bytes(&self) -> u64 {
        self.capacity
    }

    fn used_bytes(&self) -> u64 {
        self.lock().used
    }

    fn len(&self) -> usize {
        self.lock().blocks.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qvl_core::{DType, TensorKind, TensorMeta};

    fn block(id: u64, bytes: usize) -> Block {
        let meta = TensorMeta::new(vec![bytes], DType::U8, TensorKind::KvCache);
        Block::raw(BlockKey::from_id(id), meta, vec![id as u8; bytes])
    }

    #[test]
    fn accounts_bytes_and_refuses_when_full() {
        let s = HostStore::new(ByteSize(100));
        s.put(block(1, 60)).unwrap();
        assert_eq!(s.used_bytes(), 60);
        let err = s.put(block(2, 50)).unwrap_err();
        assert!(matches!(err, CoreError::OutOfCapacity { .. }), "{err}");
        // Replacing a block counts only the difference.
        s.put(block(1, 90)).unwrap();
        assert_eq!((s.used_bytes(), s.len()), (90, 1));
        assert!(matches!(
            s.put(block(3, 101)),
            Err(CoreError::TooLarge { .. })
        ));
        let got = s.get(&BlockKey::from_id(1)).unwrap().unwrap();
        assert_eq!(got.data.len(), 90);
        assert!(s.remove(&BlockKey::from_id(1)).unwrap());
        assert!(!s.remove(&BlockKey::from_id(1)).unwrap());
        assert_eq!((s.used_bytes(), s.free_bytes()), (0, 100));
    }

    #[test]
    fn is_shared_between_threads() {
        let s = std::sync::Arc::new(HostStore::new(ByteSize::kib(64)));
        let handles: Vec<_> = (0..4u64)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for i in 0..100 {
                        let id = t * 1000 + i;
                        s.put(block(id, 16)).unwrap();
                        assert!(s.contains(&BlockKey::from_id(id)));
                        if i % 2 == 0 {
                            s.remove(&BlockKey::from_id(id)).unwrap();
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(s.len(), 200);
        assert_eq!(s.used_bytes(), 200 * 16);
    }
}
