//! Load: many threads on the buffer pool, the tiered cache (RAM over a
//! real SSD swap store) and a second swap store at once, for a bounded
//! time (`QVL_LOAD_SECS`, default 2 s). Each thread owns its keys and
//! tags, so every read can be checked exactly; a monitor thread checks the
//! accounting while they run. At the end: every live block reads back
//! exact, nothing was dropped, and after freeing everything every byte
//! counter is back to zero (bytes accounted, no lost or leaked block).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

use qvl_cache::{HostStore, PolicyKind, TieredCache};
use qvl_core::{
    AllocRequest, Block, BlockInfo, BlockKey, BlockStore, BufferAllocator, ByteSize, DType,
    TensorKind, TensorMeta, Tier,
};
use qvl_pool::{HostPool, PoolConfig};
use qvl_swap::{IoMode, SsdStore, SwapConfig};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

fn block(id: u64, version: u64, len: usize) -> Block {
    let data: Vec<u8> = (0..len)
        .map(|i| (i as u64 ^ id.wrapping_mul(0x9e37) ^ version.wrapping_mul(131)) as u8)
        .collect();
    Block::raw(
        BlockKey::from_id(id),
        TensorMeta::new(vec![len], DType::U8, TensorKind::KvCache),
        data,
    )
}

const CACHE_THREADS: u64 = 4;
const KEYS_PER_THREAD: u64 = 24;
const BLOCK_MAX: usize = 12_000;

fn load_secs() -> f64 {
    std::env::var("QVL_LOAD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0)
}

#[test]
fn pool_cache_and_swap_under_load_account_every_byte_and_lose_no_block() {
    let tmp = tempfile::tempdir().unwrap();
    let swap_cfg = |sub: &str| SwapConfig {
        capacity_bytes: 16 << 20,
        io_mode: IoMode::Auto,
        ..SwapConfig::in_directory(tmp.path().join(sub))
    };
    let pool = HostPool::new(&PoolConfig {
        max_pool_size: ByteSize::mib(64),
        ..PoolConfig::default()
    })
    .unwrap();
    let ssd = SsdStore::open(&swap_cfg("cache")).unwrap();
    let ram_capacity = 96 << 10;
    // L1 holds a few blocks, so puts demote to the SSD level and gets
    // promote back all the time; the SSD level holds every live block
    // (4 threads x 24 keys x 12 KB < 16 MiB minus page rounding).
    let cache = Arc::new(TieredCache::new(
        PolicyKind::Lru,
        vec![
            Box::new(HostStore::new(ByteSize(ram_capacity))),
            Box::new(ssd.clone()),
        ],
    ));
    let swap = SsdStore::open(&swap_cfg("direct")).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let deadline = Duration::from_secs_f64(load_secs());
    let started = Instant::now();

    let live = std::thread::scope(|s| {
        // Pool: allocate, tag, check, free; some buffers freed by another thread.
        let (tx, rx) = std::sync::mpsc::channel::<(qvl_pool::PoolBuffer, u8)>();
        for t in 0..3u64 {
            let (pool, stop, ops, tx) = (
                pool.clone(),
                Arc::clone(&stop),
                Arc::clone(&ops),
                tx.clone(),
            );
            s.spawn(move || {
                let mut rng = Rng(0xabc + t);
                let mut held = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let max = if rng.below(8) == 0 { 2 << 20 } else { 64 << 10 };
                    let bytes = 1 + rng.below(max) as usize;
                    let mut buf = pool
                        .allocate(&AllocRequest::bytes(bytes, TensorKind::Activation))
                        .unwrap();
                    let tag = rng.below(256) as u8;
                    buf.fill(tag);
                    held.push((buf, tag));
                    if held.len() > 16 {
                        let (buf, tag) = held.swap_remove(rng.below(held.len() as u64) as usize);
                        assert!(buf.iter().all(|&b| b == tag), "pool buffer overwritten");
                        if rng.below(2) == 0 {
                            tx.send((buf, tag)).unwrap();
                        }
                    }
                    ops.fetch_add(1, Ordering::Relaxed);
                }
                for (buf, tag) in held {
                    assert!(buf.iter().all(|&b| b == tag), "pool buffer overwritten");
                }
            });
        }
        drop(tx);
        s.spawn(move || {
            for (buf, tag) in rx {
                assert!(buf.iter().all(|&b| b == tag), "pool buffer overwritten");
            }
        });

        // Cache: each thread puts, gets (exact version), removes its own keys.
        let cache_workers: Vec<_> = (0..CACHE_THREADS)
            .map(|t| {
                let (cache, stop, ops) = (Arc::clone(&cache), Arc::clone(&stop), Arc::clone(&ops));
                s.spawn(move || {
                    let mut rng = Rng(0x5151 + t);
                    let mut versions: HashMap<u64, (u64, usize)> = HashMap::new();
                    let mut version = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let id = t * 1000 + rng.below(KEYS_PER_THREAD);
                        match rng.below(10) {
                            0..=3 => {
                                version += 1;
                                let len = 1 + rng.below(BLOCK_MAX as u64) as usize;
                                let b = block(id, version, len);
                                cache.put(b, BlockInfo::kv(len as u64, None, 0)).unwrap();
                                versions.insert(id, (version, len));
                            }
                            4 => {
                                let removed = cache.remove(&BlockKey::from_id(id)).unwrap();
                                assert_eq!(removed, versions.remove(&id).is_some(), "key {id}");
                            }
                            _ => {
                                let got = cache.get(&BlockKey::from_id(id)).unwrap();
                                match versions.get(&id) {
                                    Some(&(v, len)) => {
                                        assert_eq!(got, Some(block(id, v, len)), "key {id}")
                                    }
                                    None => assert_eq!(got, None, "key {id} came back"),
                                }
                            }
                        }
                        ops.fetch_add(1, Ordering::Relaxed);
                    }
                    versions
                })
            })
            .collect();

        // Swap: batches, single puts, reads and removals on a second store.
        let swap_workers: Vec<_> = (0..2u64)
            .map(|t| {
                let (swap, stop, ops) = (swap.clone(), Arc::clone(&stop), Arc::clone(&ops));
                s.spawn(move || {
                    let mut rng = Rng(0x7777 + t);
                    let mut versions: HashMap<u64, (u64, usize)> = HashMap::new();
                    let mut version = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        match rng.below(6) {
                            0 => {
                                version += 1;
                                let first = rng.below(32);
                                let batch: Vec<Block> = (0..4)
                                    .map(|k| {
                                        let id = 100_000 * (t + 1) + (first + k) % 32;
                                        let len = 1 + rng.below(BLOCK_MAX as u64) as usize;
                                        versions.insert(id, (version, len));
                                        block(id, version, len)
                                    })
                                    .collect();
                                swap.put_batch(batch).unwrap();
                            }
                            1 => {
                                let id = 100_000 * (t + 1) + rng.below(32);
                                let removed = swap.remove(&BlockKey::from_id(id)).unwrap();
                                assert_eq!(removed, versions.remove(&id).is_some());
                            }
                            _ => {
                                let id = 100_000 * (t + 1) + rng.below(32);
                                let got = swap.get(&BlockKey::from_id(id)).unwrap();
                                match versions.get(&id) {
                                    Some(&(v, len)) => {
                                        assert_eq!(got, Some(block(id, v, len)), "swap key {id}")
                                    }
                                    None => assert_eq!(got, None),
                                }
                            }
                        }
                        ops.fetch_add(1, Ordering::Relaxed);
                    }
                    versions
                })
            })
            .collect();

        // Monitor: accounting invariants while everything runs.
        let (pool_m, cache_m, stop_m) = (pool.clone(), Arc::clone(&cache), Arc::clone(&stop));
        let monitor = s.spawn(move || {
            let mut checks = 0u64;
            while !stop_m.load(Ordering::Relaxed) {
                let p = pool_m.stats();
                assert!(p.allocated_bytes <= p.peak_allocated_bytes);
                assert!(p.free_count <= p.alloc_count);
                let used = cache_m.used_bytes();
                assert!(
                    used[0].bytes() <= ram_capacity,
                    "L1 over capacity: {used:?}"
                );
                assert!(used[1].bytes() <= 16 << 20, "SSD over capacity: {used:?}");
                checks += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            checks
        });

        while started.elapsed() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, Ordering::Relaxed);
        let checks = monitor.join().unwrap();
        assert!(checks > 0);
        let cache_live: Vec<HashMap<u64, (u64, usize)>> = cache_workers
            .into_iter()
            .map(|w| w.join().unwrap())
            .collect();
        let swap_live: Vec<HashMap<u64, (u64, usize)>> = swap_workers
            .into_iter()
            .map(|w| w.join().unwrap())
            .collect();
        (cache_live, swap_live)
    });
    let (cache_live, swap_live) = live;
    let total_ops = ops.load(Ordering::Relaxed);
    println!(
        "load: {total_ops} operations in {:.1} s; cache {:?}; swap {:?}",
        started.elapsed().as_secs_f64(),
        cache.stats(),
        swap.stats()
    );
    assert!(total_ops > 100, "the load barely ran: {total_ops}");

    // Pool: every byte came back.
    let p = pool.stats();
    assert_eq!(p.allocated_bytes, 0, "{p:?}");
    assert_eq!(p.alloc_count, p.free_count, "{p:?}");
    pool.release_cached();
    assert!(pool.stats().reserved_bytes <= ByteSize::mib(64).bytes());

    // Cache: nothing dropped, every live block exact, then empty to zero.
    assert_eq!(
        cache.stats().dropped,
        0,
        "a block was lost: {:?}",
        cache.stats()
    );
    let tiers = cache.tiers();
    assert_eq!(tiers, vec![Tier::HostRam, Tier::Ssd]);
    let live_bytes: u64 = cache_live
        .iter()
        .flat_map(|m| m.values())
        .map(|&(_, len)| len as u64)
        .sum();
    let used: u64 = cache.used_bytes().iter().map(|b| b.bytes()).sum();
    assert!(
        used >= live_bytes,
        "cache accounts {used} bytes for {live_bytes} live"
    );
    for m in &cache_live {
        for (&id, &(v, len)) in m {
            assert_eq!(
                cache.get(&BlockKey::from_id(id)).unwrap(),
                Some(block(id, v, len))
            );
            assert!(cache.remove(&BlockKey::from_id(id)).unwrap());
        }
    }
    assert!(
        cache.used_bytes().iter().all(|b| b.bytes() == 0),
        "{:?}",
        cache.used_bytes()
    );
    assert_eq!((ssd.len(), ssd.used_bytes()), (0, 0));
    assert_eq!(ssd.stats().integrity_failures, 0);

    // Swap: every live block exact, then every page freed.
    for m in &swap_live {
        for (&id, &(v, len)) in m {
            assert_eq!(
                swap.get(&BlockKey::from_id(id)).unwrap(),
                Some(block(id, v, len))
            );
            assert!(swap.remove(&BlockKey::from_id(id)).unwrap());
        }
    }
    assert_eq!((swap.len(), swap.used_bytes()), (0, 0));
    assert_eq!(swap.stats().integrity_failures, 0);
}
