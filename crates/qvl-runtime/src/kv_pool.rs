//! KV blocks in buffers of `qvl-pool`: the adapter between the model's
//! paged KV cache ([`KvBlockStorage`]) and a [`HostPool`] slab pool.
//!
//! Each block (all layers, keys and values, f32) is one [`PoolBuffer`] from
//! the pool's specialized pool for this layout ([`kv_slab_config`]), so a
//! sequence's blocks are taken from and returned to fixed-size slots instead
//! of the system allocator; the garbage collector can hand cached slots
//! back to the OS through [`qvl_core::BufferAllocator::release_cached`].
//! With a [`LifetimeTracker`], every block's creation and release is
//! reported (site `kv.block`), so the collector's registry forecasts KV
//! memory like any other tensor.

use qvl_core::{
    AllocRequest, BufferAllocator, DType, LifetimeTracker, TensorId, TensorKind, TensorMeta,
    UseSite,
};
use qvl_model::kv::{KvBlockId, KvBlockStorage, KvLayerView, KvLayout};
use qvl_model::{ModelError, Result};
use qvl_pool::{HostPool, PoolBuffer, SpecializedPoolConfig};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Name of the specialized pool that holds KV blocks.
pub const KV_SLAB_NAME: &str = "kv_blocks_f32";

/// Site under which KV blocks are reported to a lifetime tracker.
const KV_SITE: UseSite = UseSite {
    layer: None,
    op: "kv.block",
};

/// Called with a block's bytes before the storage takes each block from its
/// pool: a collector's [`qvl_gc::Collector::pressure_hook`] then collects
/// first when the pool growing by a block would pass its target. (Every
/// block, not only when the pool looks short of cached memory: free arena
/// memory does not always fit a block.)
pub type KvPressureHook = Arc<dyn Fn(u64) + Send + Sync>;

/// Tensor ids of KV blocks, unique within the process.
static NEXT_TENSOR_ID: AtomicU64 = AtomicU64::new(1 << 48);

/// The shape of one block of `layout` as a tensor.
pub fn kv_block_meta(layout: KvLayout) -> TensorMeta {
    TensorMeta::new(
        vec![
            layout.layers,
            2,
            layout.block_tokens,
            layout.kv_heads,
            layout.head_dim,
        ],
        DType::F32,
        TensorKind::KvCache,
    )
}

/// The specialized pool for blocks of `layout`, with `initial` slots.
pub fn kv_slab_config(layout: KvLayout, initial: usize) -> SpecializedPoolConfig {
    SpecializedPoolConfig::for_tensor(&kv_block_meta(layout), initial)
}

struct PooledBlock {
    buffer: PoolBuffer,
    tensor: TensorId,
}

/// A [`KvBlockStorage`] whose blocks are [`PoolBuffer`]s of a [`HostPool`].
pub struct PooledKvStorage {
    layout: KvLayout,
    pool: Arc<HostPool>,
    tracker: Option<Arc<dyn LifetimeTracker>>,
    pressure: Option<KvPressureHook>,
    blocks: Vec<Option<PooledBlock>>,
    free: Vec<usize>,
    held_bytes: usize,
}

fn kv_err(msg: impl Into<String>) -> ModelError {
    ModelError::KvCache(msg.into())
}

/// The buffer's bytes as f32 values.
fn floats(buffer: &PoolBuffer) -> &[f32] {
    // SAFETY: the buffer was checked at allocation to start 4-byte aligned
    // (requested 64-aligned) and to hold a whole number of f32; every bit
    // pattern is a valid f32, and the shared borrow of the buffer covers the
    // returned slice.
    unsafe { std::slice::from_raw_parts(buffer.as_ptr().cast::<f32>(), buffer.len() / 4) }
}

/// The buffer's bytes as mutable f32 values.
fn floats_mut(buffer: &mut PoolBuffer) -> &mut [f32] {
    let len = buffer.len() / 4;
    // SAFETY: as in `floats`; the exclusive borrow of the buffer makes the
    // returned slice the only access.
    unsafe { std::slice::from_raw_parts_mut(buffer.as_mut_ptr().cast::<f32>(), len) }
}

impl PooledKvStorage {
    /// A storage for blocks of `layout` taken from `pool`; block creation and
    /// release go to `tracker` when given.
    pub fn new(
        layout: KvLayout,
        pool: Arc<HostPool>,
        tracker: Option<Arc<dyn LifetimeTracker>>,
    ) -> PooledKvStorage {
        PooledKvStorage {
            layout,
            pool,
            tracker,
            pressure: None,
            blocks: Vec::new(),
            free: Vec::new(),
            held_bytes: 0,
        }
    }

    /// Calls `hook` before a block would make the pool grow (see
    /// [`KvPressureHook`]).
    pub fn with_pressure_hook(mut self, hook: KvPressureHook) -> PooledKvStorage {
        self.pressure = Some(hook);
        self
    }

    fn block(&self, id: KvBlockId) -> Result<&PooledBlock> {
        self.blocks
            .get(id.0 as usize)
            .and_then(Option::as_ref)
            .ok_or_else(|| kv_err(format!("no block {} in the pooled KV storage", id.0)))
    }
}

impl KvBlockStorage for PooledKvStorage {
    fn layout(&self) -> KvLayout {
        self.layout
    }

    fn allocate(&mut self) -> Result<KvBlockId> {
        let meta = kv_block_meta(self.layout);
        if let Some(hook) = &self.pressure {
            hook(meta.byte_len() as u64);
        }
        let mut buffer = self
            .pool
            .allocate(&AllocRequest::tensor(meta.clone()))
            .map_err(|e| kv_err(format!("KV block from the pool: {e}")))?;
        if buffer.as_ptr().align_offset(4) != 0 || buffer.len() != self.layout.block_floats() * 4 {
            return Err(kv_err(format!(
                "the pool returned a KV buffer of {} bytes at {:p}; need {} bytes aligned to 4",
                buffer.len(),
                buffer.as_ptr(),
                self.layout.block_floats() * 4
            )));
        }
        // Pool buffers come back with old contents; a new block is zero.
        floats_mut(&mut buffer).fill(0.0);
        self.held_bytes += buffer.held_bytes();
        let tensor = TensorId(NEXT_TENSOR_ID.fetch_add(1, Ordering::Relaxed));
        if let Some(t) = &self.tracker {
            t.on_create(tensor, &meta, KV_SITE);
        }
        let block = PooledBlock { buffer, tensor };
        if let Some(i) = self.free.pop() {
            self.blocks[i] = Some(block);
            return Ok(KvBlockId(i as u64));
        }
        self.blocks.push(Some(block));
        Ok(KvBlockId(self.blocks.len() as u64 - 1))
    }

    fn release(&mut self, id: KvBlockId) -> Result<()> {
        let block = self
            .blocks
            .get_mut(id.0 as usize)
            .and_then(Option::take)
            .ok_or_else(|| kv_err(format!("release of unknown block {}", id.0)))?;
        self.held_bytes -= block.buffer.held_bytes();
        if let Some(t) = &self.tracker {
            t.on_free(block.tensor);
        }
        self.free.push(id.0 as usize);
        // Dropping the buffer returns it to its slab.
        Ok(())
    }

    fn write(
        &mut self,
        id: KvBlockId,
        layer: usize,
        slot: usize,
        keys: &[f32],
        values: &[f32],
    ) -> Result<()> {
        let l = self.layout;
        l.check_write(layer, slot, keys, values)?;
        let block = self
            .blocks
            .get_mut(id.0 as usize)
            .and_then(Option::as_mut)
            .ok_or_else(|| kv_err(format!("write to unknown block {}", id.0)))?;
        if let Some(t) = &self.tracker {
            t.on_use(block.tensor);
        }
        let data = floats_mut(&mut block.buffer);
        l.copy_into_block(data, layer, slot, keys, values);
        Ok(())
    }

    fn read(&self, id: KvBlockId, layer: usize) -> Result<KvLayerView<'_>> {
        let l = self.layout;
        if layer >= l.layers {
            return Err(kv_err(format!("layer {layer} out of {}", l.layers)));
        }
        Ok(l.layer_view(floats(&self.block(id)?.buffer), layer))
    }

    fn used_bytes(&self) -> usize {
        self.held_bytes
    }
}

impl Drop for PooledKvStorage {
    fn drop(&mut self) {
        if let Some(t) = &self.tracker {
            for b in self.blocks.iter().flatten() {
                t.on_free(b.tensor);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{generate, tiny_decoder};
    use qvl_model::PagedKvCache;
    use qvl_pool::PoolConfig;

    /// Threads fill and check pooled KV blocks of varied counts while the
    /// adaptive collector runs on its thread and from the pressure hook:
    /// no block a thread holds ever changes under it (the collector never
    /// frees live memory), and over many requests live and reserved
    /// memory stay flat.
    #[test]
    fn collector_never_frees_live_blocks_and_memory_stays_flat() {
        let layout = tiny_decoder().kv_layout(4);
        let pool = Arc::new(HostPool::new(&PoolConfig::default()).unwrap());
        let config = qvl_gc::GcConfig {
            collection_interval: std::time::Duration::from_millis(1),
            min_interval: std::time::Duration::from_micros(200),
            ..qvl_gc::GcConfig::default()
        };
        let registry = Arc::new(qvl_gc::TensorRegistry::new(&config));
        let gc = qvl_gc::Collector::new(config, registry.clone()).unwrap();
        gc.register(Arc::new(qvl_gc::AllocatorReclaim::new(
            "kv pool",
            pool.clone(),
        )));
        let _thread = gc.spawn().unwrap();
        let width = layout.token_width();
        let requests = 60u64;
        let samples: Vec<Vec<(u64, u64)>> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..4u64)
                .map(|t| {
                    let (pool, gc, registry) = (pool.clone(), gc.clone(), registry.clone());
                    scope.spawn(move || {
                        let mut seen = Vec::new();
                        for r in 0..requests {
                            let mut storage = PooledKvStorage::new(
                                layout,
                                pool.clone(),
                                Some(registry.clone() as Arc<dyn LifetimeTracker>),
                            )
                            .with_pressure_hook(gc.pressure_hook());
                            let n = 1 + ((r * 7 + t * 3) % 11) as usize;
                            let mut ids = Vec::new();
                            for b in 0..n {
                                let id = storage.allocate().unwrap();
                                let fill = (t * 1000 + r * 16 + b as u64) as f32;
                                for layer in 0..layout.layers {
                                    for slot in 0..layout.block_tokens {
                                        let k = vec![fill; width];
                                        let v = vec![-fill; width];
                                        storage.write(id, layer, slot, &k, &v).unwrap();
                                    }
                                }
                                ids.push((id, fill));
                                // Give the collector time to run between writes.
                                std::thread::yield_now();
                            }
                            for &(id, fill) in &ids {
                                for layer in 0..layout.layers {
                                    let view = storage.read(id, layer).unwrap();
                                    assert!(view.keys.iter().all(|&x| x == fill));
                                    assert!(view.values.iter().all(|&x| x == -fill));
                                }
                            }
                            drop(storage);
                            let u = gc.usage();
                            seen.push((u.live, u.reserved));
                        }
                        seen
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        gc.collect(qvl_gc::Trigger::Manual);
        let u = gc.usage();
        assert_eq!(u.live, 0, "every block was returned");
        assert_eq!(registry.live_count(), 0);
        assert!(gc.stats().collections > 0);
        // Flat over the run: the second half never needs more than the
        // first half's peak (with one run's rounding of slack).
        let all: Vec<(u64, u64)> = samples.concat();
        let half = all.len() / 2;
        let first = all[..half].iter().map(|s| s.1).max().unwrap();
        let second = all[half..].iter().map(|s| s.1).max().unwrap();
        assert!(
            second <= first + (64 << 10),
            "reserved grew: {first} -> {second}"
        );
        let mut detector = qvl_gc::LeakDetector::new();
        for &(live, reserved) in &samples[0] {
            detector.record(live, reserved);
        }
        assert_eq!(detector.report(0.05).samples, requests as usize);
    }

    #[test]
    fn pressure_hook_is_called_before_every_block() {
        use std::sync::atomic::AtomicU64;
        let dec = tiny_decoder();
        let layout = dec.kv_layout(4);
        let pool = Arc::new(HostPool::new(&PoolConfig::default()).unwrap());
        let calls = Arc::new(AtomicU64::new(0));
        let seen = calls.clone();
        let block_bytes = (layout.block_floats() * 4) as u64;
        let mut storage = PooledKvStorage::new(layout, pool.clone(), None).with_pressure_hook(
            Arc::new(move |need| {
                assert_eq!(need, block_bytes);
                seen.fetch_add(1, Ordering::Relaxed);
            }),
        );
        let a = storage.allocate().unwrap();
        let b = storage.allocate().unwrap();
        assert_eq!(calls.load(Ordering::Relaxed), 2);
        storage.release(a).unwrap();
        let _c = storage.allocate().unwrap();
        assert_eq!(calls.load(Ordering::Relaxed), 3);
        storage.release(b).unwrap();
    }

    #[test]
    fn pooled_blocks_match_host_blocks_and_return_to_the_slab() {
        let dec = tiny_decoder();
        let layout = dec.kv_layout(4);
        let mut cfg = PoolConfig::default();
        cfg.specialized_pools
            .insert(KV_SLAB_NAME.to_string(), kv_slab_config(layout, 2));
        let pool = Arc::new(HostPool::new(&cfg).unwrap());
        let prompt: Vec<u32> = (1..12).collect();
        let mut host = PagedKvCache::in_memory(layout);
        let expected = generate(&dec, &mut host, &prompt, 5, 6);
        let registry = Arc::new(qvl_gc::TensorRegistry::new(&qvl_gc::GcConfig {
            min_tracked_bytes: 0,
            ..qvl_gc::GcConfig::default()
        }));
        let mut pooled = PagedKvCache::new(Box::new(PooledKvStorage::new(
            layout,
            pool.clone(),
            Some(registry.clone()),
        )));
        // Bit-identical: the pool changes where blocks live, not what they hold.
        assert_eq!(generate(&dec, &mut pooled, &prompt, 5, 6), expected);
        let slab = pool
            .slab_stats()
            .into_iter()
            .find(|s| s.name == KV_SLAB_NAME)
            .unwrap();
        let blocks = (prompt.len() + 6).div_ceil(4);
        assert_eq!(slab.total_slots - slab.free_slots, blocks);
        assert_eq!(registry.live_count(), blocks);
        pooled.clear().unwrap();
        let slab = pool
            .slab_stats()
            .into_iter()
            .find(|s| s.name == KV_SLAB_NAME)
            .unwrap();
        assert_eq!(slab.free_slots, slab.total_slots);
        assert_eq!(registry.live_count(), 0);
    }
}
