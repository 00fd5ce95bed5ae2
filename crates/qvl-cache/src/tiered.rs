//! The hierarchical cache: levels of block stores, fastest first.

use crate::config::CacheConfig;
use crate::keymap::KeyMap;
use crate::store::HostStore;
use crate::{PolicyKind, Result};
use qvl_core::{
    Block, BlockInfo, BlockKey, BlockStore, ByteSize, CoreError, EvictionPolicy, MetricEvent,
    MetricsRecorder, Tier,
};
use serde::Serialize;
use std::sync::{Arc, Mutex, MutexGuard};

/// One level: a store and the policy that picks its victims.
struct Level {
    store: Box<dyn BlockStore>,
    policy: Box<dyn EvictionPolicy>,
}

/// Counters of a [`TieredCache`], per level where it matters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CacheStats {
    /// Lookups through [`TieredCache::get`].
    pub lookups: u64,
    /// Lookups served by each level, fastest first.
    pub hits: Vec<u64>,
    /// Blocks moved to the first level by a hit or a prefetch.
    pub promotions: u64,
    /// Blocks moved one level down by an eviction.
    pub demotions: u64,
    /// Blocks evicted from the last level, gone from the cache.
    pub dropped: u64,
    /// Blocks promoted by [`TieredCache::prefetch`].
    pub prefetched: u64,
}

impl CacheStats {
    /// Lookups that found no block.
    pub fn misses(&self) -> u64 {
        self.lookups - self.hits.iter().sum::<u64>()
    }

    /// Share of lookups served by any level.
    pub fn hit_ratio(&self) -> f64 {
        if self.lookups == 0 {
            0.0
        } else {
            self.hits.iter().sum::<u64>() as f64 / self.lookups as f64
        }
    }
}

struct Inner {
    levels: Vec<Level>,
    /// What is known of every block held at any level, for the policies of
    /// the levels it moves through.
    infos: KeyMap<BlockInfo>,
    stats: CacheStats,
}

/// A cache of blocks over levels of byte capacity (L1 GPU, L2 host RAM,
/// L3 SSD, or any subset), fastest first.
///
/// A hit in a lower level promotes the block to the first level; a block
/// evicted from a level is demoted to the next one, and dropped from the
/// last. Every level has its own policy instance. Thread-safe: one mutex
/// guards the levels, so a block is in exactly one level at any time.
///
/// With a recorder ([`TieredCache::with_recorder`]), every lookup reports a
/// [`MetricEvent::CacheLookup`] per level it probed, fastest first: a miss
/// for each level that did not hold the block, a hit for the one that did.
/// A level's hit ratio is then the share of the lookups reaching it that it
/// served. Events are sent after the lock is released.
pub struct TieredCache {
    inner: Mutex<Inner>,
    /// The tier of each level, fastest first (fixed at construction).
    tiers: Vec<Tier>,
    recorder: Option<Arc<dyn MetricsRecorder>>,
}

impl TieredCache {
    /// A cache over `stores`, fastest first, each with a new policy of `kind`.
    pub fn new(kind: PolicyKind, stores: Vec<Box<dyn BlockStore>>) -> Self {
        let levels = stores
            .into_iter()
            .map(|store| Level {
                store,
                policy: kind.build(),
            })
            .collect::<Vec<_>>();
        let stats = CacheStats {
            hits: vec![0; levels.len()],
            ..CacheStats::default()
        };
        let tiers = levels.iter().map(|l| l.store.tier()).collect();
        TieredCache {
            inner: Mutex::new(Inner {
                levels,
                infos: KeyMap::default(),
                stats,
            }),
            tiers,
            recorder: None,
        }
    }

    /// The same cache, reporting lookups to `recorder` (see the type docs).
    pub fn with_recorder(mut self, recorder: Arc<dyn MetricsRecorder>) -> Self {
        self.recorder = Some(recorder);
        self
    }

    /// Sets or clears the recorder that lookups are reported to.
    pub fn set_recorder(&mut self, recorder: Option<Arc<dyn MetricsRecorder>>) {
        self.recorder = recorder;
    }

    /// Reports a lookup answered by `level` (None: a miss everywhere).
    fn record_lookup(&self, level: Option<usize>) {
        let Some(recorder) = &self.recorder else {
            return;
        };
        let probed = level.map_or(self.tiers.len(), |l| l + 1);
        for (i, tier) in self.tiers[..probed].iter().enumerate() {
            recorder.record(&MetricEvent::CacheLookup {
                tier: *tier,
                hit: Some(i) == level,
            });
        }
    }

    /// The cache a config describes: `gpu` as L1 and `ssd` as L3 where the
    /// caller has them (the CUDA and swap crates make them), a [`HostStore`]
    /// of `cpu_cache_size` as L2. Levels of size 0 are left out.
    pub fn from_config(
        config: &CacheConfig,
        gpu: Option<Box<dyn BlockStore>>,
        ssd: Option<Box<dyn BlockStore>>,
    ) -> Self {
        let mut stores: Vec<Box<dyn BlockStore>> = Vec::new();
        if let Some(gpu) = gpu.filter(|_| config.gpu_cache_size.bytes() > 0) {
            stores.push(gpu);
        }
        if config.cpu_cache_size.bytes() > 0 {
            stores.push(Box::new(HostStore::new(config.cpu_cache_size)));
        }
        if let Some(ssd) = ssd.filter(|_| config.ssd_cache_size.bytes() > 0) {
            stores.push(ssd);
        }
        TieredCache::new(config.eviction_policy, stores)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every mutation below keeps the block in some level or drops it
        // whole; a panic in a store cannot leave the maps half-updated in a
        // way later calls rely on, so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The tiers of the levels, fastest first.
    pub fn tiers(&self) -> Vec<Tier> {
        self.tiers.clone()
    }

    /// Stores `block` in the first level that can hold it, demoting what it
    /// displaces. A block with the key already cached is replaced.
    pub fn put(&self, block: Block, info: BlockInfo) -> Result<()> {
        let mut inner = self.lock();
        inner.detach(&block.key)?;
        inner.infos.insert(block.key, info);
        inner.insert_from(0, block)
    }

    /// The block with `key`, promoted to the first level, or None.
    pub fn get(&self, key: &BlockKey) -> Result<Option<Block>> {
        Ok(self.lookup(key)?.map(|(_, block)| block))
    }

    /// Like [`TieredCache::get`], with the index of the level that held the
    /// block (0 = fastest) before its promotion.
    pub fn lookup(&self, key: &BlockKey) -> Result<Option<(usize, Block)>> {
        let found = self.lock().lookup(key)?;
        self.record_lookup(found.as_ref().map(|(level, _)| *level));
        Ok(found)
    }

    /// Prefetch hint: the blocks a request is about to read (its prefix
    /// chain). Those found in lower levels are promoted to the first level
    /// now, in order, as long as they fit in it without displacing each
    /// other. Returns how many were promoted.
    pub fn prefetch(&self, keys: &[BlockKey]) -> Result<usize> {
        let mut inner = self.lock();
        let Some(first_capacity) = inner.levels.first().map(|l| l.store.capacity_bytes()) else {
            return Ok(0);
        };
        let mut budget = first_capacity;
        let mut promoted = 0;
        for key in keys {
            let Some((level, block)) = inner.find(key)? else {
                continue;
            };
            let size = block.stored_bytes();
            if size > budget {
                break;
            }
            budget -= size;
            if level > 0 {
                inner.promote(level, block)?;
                inner.stats.prefetched += 1;
                promoted += 1;
            } else {
                inner.levels[0].policy.on_access(*key);
            }
        }
        Ok(promoted)
    }

    /// Removes the block from whichever level holds it; returns whether one did.
    pub fn remove(&self, key: &BlockKey) -> Result<bool> {
        let mut inner = self.lock();
        let found = inner.detach(key)?;
        inner.infos.remove(key);
        Ok(found)
    }

    /// The index of the level holding `key` (0 = fastest), if any.
    pub fn level_of(&self, key: &BlockKey) -> Option<usize> {
        self.lock()
            .levels
            .iter()
            .position(|l| l.store.contains(key))
    }

    /// Bytes held per level, fastest first.
    pub fn used_bytes(&self) -> Vec<ByteSize> {
        self.lock()
            .levels
            .iter()
            .map(|l| ByteSize(l.store.used_bytes()))
            .collect()
    }

    /// A copy of the counters.
    pub fn stats(&self) -> CacheStats {
        self.lock().stats.clone()
    }
}

impl Inner {
    fn lookup(&mut self, key: &BlockKey) -> Result<Option<(usize, Block)>> {
        self.stats.lookups += 1;
        let Some((level, block)) = self.find(key)? else {
            return Ok(None);
        };
        self.stats.hits[level] += 1;
        if level == 0 {
            self.levels[0].policy.on_access(*key);
        } else {
            self.promote(level, block.clone())?;
        }
        Ok(Some((level, block)))
    }

    fn find(&self, key: &BlockKey) -> Result<Option<(usize, Block)>> {
        // One store call per level probed: `get` answers absence too.
        for (i, level) in self.levels.iter().enumerate() {
            if let Some(block) = level.store.get(key)? {
                return Ok(Some((i, block)));
            }
        }
        Ok(None)
    }

    /// Moves a block found in `level` to the first level.
    fn promote(&mut self, level: usize, block: Block) -> Result<()> {
        self.levels[level].store.remove(&block.key)?;
        // A promotion is a read at that level: its policy learns the reuse
        // before the block leaves.
        self.levels[level].policy.on_access(block.key);
        self.levels[level].policy.on_remove(block.key);
        self.stats.promotions += 1;
        self.insert_from(0, block)
    }

    /// Removes `key` from every level (it is in at most one).
    fn detach(&mut self, key: &BlockKey) -> Result<bool> {
        for level in &mut self.levels {
            if level.store.remove(key)? {
                level.policy.on_remove(*key);
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Puts `block` in the first level from `start` on that can ever hold it,
    /// evicting (and demoting) to make room. Dropped when none can.
    fn insert_from(&mut self, start: usize, block: Block) -> Result<()> {
        let size = block.stored_bytes();
        let Some(level) =
            (start..self.levels.len()).find(|&i| self.levels[i].store.capacity_bytes() >= size)
        else {
            if start == 0 {
                // Not even the largest level could hold it: tell the caller.
                let (tier, capacity) = self
                    .levels
                    .iter()
                    .map(|l| (l.store.tier(), l.store.capacity_bytes()))
                    .max_by_key(|(_, c)| *c)
                    .unwrap_or((Tier::HostRam, 0));
                self.infos.remove(&block.key);
                return Err(CoreError::TooLarge {
                    what: "block",
                    size: ByteSize(size),
                    tier,
                    capacity: ByteSize(capacity),
                }
                .into());
            }
            self.stats.dropped += 1;
            self.infos.remove(&block.key);
            return Ok(());
        };
        while self.levels[level].store.free_bytes() < size {
            let Some(victim) = self.levels[level].policy.evict() else {
                // The policy tracks nothing, yet the store is full: the store
                // is shared with someone else. Skip this level.
                return self.insert_from(level + 1, block);
            };
            let evicted = self.levels[level].store.get(&victim)?;
            self.levels[level].store.remove(&victim)?;
            if let Some(evicted) = evicted {
                self.stats.demotions += u64::from(level + 1 < self.levels.len());
                self.insert_from(level + 1, evicted)?;
            }
        }
        let key = block.key;
        self.levels[level].store.put(block)?;
        let info = self
            .infos
            .get(&key)
            .copied()
            .unwrap_or_else(|| BlockInfo::kv(size, None, 0));
        self.levels[level].policy.on_insert(key, &info);
        Ok(())
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

    fn three_levels(kind: PolicyKind) -> TieredCache {
        TieredCache::new(
            kind,
            vec![
                Box::new(HostStore::on_tier(Tier::Gpu, ByteSize(200))),
                Box::new(HostStore::new(ByteSize(300))),
                Box::new(HostStore::on_tier(Tier::Ssd, ByteSize(400))),
            ],
        )
    }

    fn info() -> BlockInfo {
        BlockInfo::kv(100, None, 0)
    }

    #[test]
    fn demotes_down_the_levels_and_drops_from_the_last() {
        let c = three_levels(PolicyKind::Lru);
        assert_eq!(c.tiers(), vec![Tier::Gpu, Tier::HostRam, Tier::Ssd]);
        for id in 0..10 {
            c.put(block(id, 100), info()).unwrap();
        }
        // 2 + 3 + 4 blocks fit: the oldest is dropped, the newest are in L1.
        assert_eq!(c.level_of(&BlockKey::from_id(0)), None);
        assert_eq!(c.level_of(&BlockKey::from_id(1)), Some(2));
        assert_eq!(c.level_of(&BlockKey::from_id(5)), Some(1));
        assert_eq!(c.level_of(&BlockKey::from_id(9)), Some(0));
        assert_eq!(
            c.used_bytes(),
            vec![ByteSize(200), ByteSize(300), ByteSize(400)]
        );
        let s = c.stats();
        assert_eq!(s.dropped, 1);
        assert_eq!(s.demotions, 8 + 5);
    }

    #[test]
    fn a_hit_below_promotes_to_the_first_level() {
        let c = three_levels(PolicyKind::Predictive);
        for id in 0..9 {
            c.put(block(id, 100), info()).unwrap();
        }
        let l3 = BlockKey::from_id(0);
        assert_eq!(c.level_of(&l3), Some(2));
        let got = c.get(&l3).unwrap().unwrap();
        assert_eq!(got.data[0], 0);
        assert_eq!(c.level_of(&l3), Some(0));
        assert!(c.get(&BlockKey::from_id(99)).unwrap().is_none());
        let s = c.stats();
        assert_eq!(
            (s.lookups, s.hits.clone(), s.misses()),
            (2, vec![0, 0, 1], 1)
        );
        assert_eq!(s.promotions, 1);
        // Nothing was lost by the promotion: 9 blocks in 9 slots.
        assert!((0..9).all(|id| c.level_of(&BlockKey::from_id(id)).is_some()));
    }

    #[test]
    fn prefetch_promotes_a_chain_within_the_first_level() {
        let c = three_levels(PolicyKind::Lru);
        for id in 0..9 {
            c.put(block(id, 100), info()).unwrap();
        }
        let chain: Vec<BlockKey> = (0..4).map(BlockKey::from_id).collect();
        // L1 holds two blocks: only the chain's first two are promoted.
        assert_eq!(c.prefetch(&chain).unwrap(), 2);
        assert_eq!(c.level_of(&chain[0]), Some(0));
        assert_eq!(c.level_of(&chain[1]), Some(0));
        assert_eq!(c.stats().prefetched, 2);
    }

    #[test]
    fn oversized_blocks_skip_small_levels_or_fail_clearly() {
        let c = three_levels(PolicyKind::Arc);
        c.put(block(1, 250), info()).unwrap();
        assert_eq!(c.level_of(&BlockKey::from_id(1)), Some(1));
        let err = c.put(block(2, 500), info()).unwrap_err();
        assert!(
            err.to_string().contains("larger than the ssd capacity"),
            "{err}"
        );
        assert!(c.remove(&BlockKey::from_id(1)).unwrap());
        assert_eq!(c.level_of(&BlockKey::from_id(1)), None);
    }

    #[test]
    fn from_config_builds_the_levels_it_is_given() {
        let config = CacheConfig {
            gpu_cache_size: ByteSize(100),
            cpu_cache_size: ByteSize::kib(1),
            ssd_cache_size: ByteSize(0),
            eviction_policy: PolicyKind::S3Fifo,
        };
        let gpu = Box::new(HostStore::on_tier(Tier::Gpu, config.gpu_cache_size));
        let ssd = Box::new(HostStore::on_tier(Tier::Ssd, ByteSize::kib(4)));
        let c = TieredCache::from_config(&config, Some(gpu), Some(ssd));
        // The SSD level has size 0 in the config: left out.
        assert_eq!(c.tiers(), vec![Tier::Gpu, Tier::HostRam]);
    }

    #[test]
    fn concurrent_readers_and_writers_keep_levels_consistent() {
        let c = std::sync::Arc::new(three_levels(PolicyKind::Predictive));
        let handles: Vec<_> = (0..4u64)
            .map(|t| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for i in 0..200 {
                        let id = (t * 7 + i) % 30;
                        if c.get(&BlockKey::from_id(id)).unwrap().is_none() {
                            c.put(block(id, 100), info()).unwrap();
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let used: u64 = c.used_bytes().iter().map(|b| b.bytes()).sum();
        let held = (0..30)
            .filter(|id| c.level_of(&BlockKey::from_id(*id)).is_some())
            .count();
        assert_eq!(used, held as u64 * 100);
        assert_eq!(c.stats().lookups, 800);
    }

    /// Collects every event it is given.
    #[derive(Default)]
    struct Events(Mutex<Vec<(Tier, bool)>>);

    impl MetricsRecorder for Events {
        fn record(&self, event: &MetricEvent) {
            if let MetricEvent::CacheLookup { tier, hit } = event {
                self.0.lock().unwrap().push((*tier, *hit));
            }
        }
    }

    #[test]
    fn lookups_report_a_hit_or_miss_per_level_probed() {
        let events = Arc::new(Events::default());
        let c = three_levels(PolicyKind::Lru).with_recorder(events.clone());
        for id in 0..9 {
            c.put(block(id, 100), info()).unwrap();
        }
        // Puts are not lookups.
        assert!(events.0.lock().unwrap().is_empty());
        let in_l1 = BlockKey::from_id(8);
        let in_l3 = BlockKey::from_id(0);
        assert_eq!(c.level_of(&in_l3), Some(2));
        c.get(&in_l1).unwrap().unwrap();
        c.get(&in_l3).unwrap().unwrap();
        assert!(c.get(&BlockKey::from_id(99)).unwrap().is_none());
        let (gpu, ram, ssd) = (Tier::Gpu, Tier::HostRam, Tier::Ssd);
        assert_eq!(
            *events.0.lock().unwrap(),
            vec![
                (gpu, true),
                (gpu, false),
                (ram, false),
                (ssd, true),
                (gpu, false),
                (ram, false),
                (ssd, false),
            ]
        );
        // The events agree with the cache's own counters.
        let s = c.stats();
        let hits = events.0.lock().unwrap().iter().filter(|e| e.1).count() as u64;
        assert_eq!(hits, s.hits.iter().sum::<u64>());

        // Without a recorder nothing is sent; a recorder can be cleared.
        let mut quiet = three_levels(PolicyKind::Lru).with_recorder(events.clone());
        quiet.set_recorder(None);
        quiet.get(&in_l1).unwrap();
        assert_eq!(events.0.lock().unwrap().len(), 7);
    }
}
