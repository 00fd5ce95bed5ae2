//! Many threads allocating, writing, checking and freeing at once, some
//! buffers freed on another thread than the one that made them. Each buffer
//! is filled with a tag unique to it and checked before it is freed, so two
//! live buffers sharing bytes would be caught. Bounded in operations, not
//! time, so it is quick and deterministic in load.
// Helpers of a test: a failed allocation is a failed test.
#![allow(clippy::unwrap_used)]

use qvl_core::{AllocRequest, BufferAllocator, ByteSize, DType, TensorKind, TensorMeta};
use qvl_pool::{HostPool, PoolBuffer, PoolConfig, SpecializedPoolConfig};
use std::collections::BTreeMap;
use std::sync::mpsc;

const THREADS: usize = 8;
const OPS_PER_THREAD: usize = 6_000;

fn kv_meta() -> TensorMeta {
    TensorMeta::new(vec![2, 16, 8, 128], DType::F16, TensorKind::KvCache)
}

fn config(max: ByteSize) -> PoolConfig {
    let mut specialized = BTreeMap::new();
    specialized.insert(
        "kv_cache".to_string(),
        SpecializedPoolConfig::for_tensor(&kv_meta(), 16),
    );
    PoolConfig {
        enabled: true,
        max_pool_size: max,
        specialized_pools: specialized,
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn request(rng: &mut Rng) -> AllocRequest {
    match rng.next() % 10 {
        0 => AllocRequest::tensor(kv_meta()),
        1 => AllocRequest::bytes(
            (rng.next() % (4 << 20)) as usize + 1,
            TensorKind::Activation,
        ),
        2 => AllocRequest::bytes((rng.next() % 100_000) as usize + 1, TensorKind::Workspace)
            .with_align(4096),
        _ => AllocRequest::bytes((rng.next() % 300_000) as usize, TensorKind::Activation),
    }
}

/// Byte positions written and checked: the ends and a stride through the
/// middle, enough to see an overlap without writing whole megabytes.
fn probes(len: usize) -> impl Iterator<Item = usize> {
    let step = (len / 64).max(1);
    (0..len).step_by(step).chain(len.saturating_sub(8)..len)
}

fn fill(buf: &mut PoolBuffer, tag: u64) {
    let bytes = tag.to_le_bytes();
    for i in probes(buf.len()) {
        buf[i] = bytes[i % 8];
    }
}

fn check(buf: &PoolBuffer, tag: u64) {
    let bytes = tag.to_le_bytes();
    for i in probes(buf.len()) {
        assert_eq!(
            buf[i],
            bytes[i % 8],
            "buffer {tag:#x} was overwritten at byte {i}"
        );
    }
}

fn run_threads(pool: &HostPool) {
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..THREADS)
        .map(|_| mpsc::channel::<(PoolBuffer, u64)>())
        .unzip();
    // Plain threads joined one by one rather than a scope: joining waits for
    // the thread's thread-local destructors too, which hand its cache back.
    let workers: Vec<_> = receivers
        .into_iter()
        .enumerate()
        .map(|(t, inbox)| {
            let pool = pool.clone();
            let peer = senders[(t + 1) % THREADS].clone();
            std::thread::spawn(move || {
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((t as u64 + 1) * 0x1234_5678_9abc));
                let mut live: Vec<(PoolBuffer, u64)> = Vec::new();
                for op in 0..OPS_PER_THREAD {
                    // Take buffers sent by the neighbour: they are freed here.
                    while let Ok((buf, tag)) = inbox.try_recv() {
                        check(&buf, tag);
                        live.push((buf, tag));
                    }
                    let r = rng.next() % 8;
                    if live.len() < 4 || r < 4 {
                        let mut buf = pool.allocate(&request(&mut rng)).unwrap();
                        let tag = ((t as u64) << 48) | op as u64;
                        fill(&mut buf, tag);
                        live.push((buf, tag));
                    } else if r == 4 {
                        let i = rng.next() as usize % live.len();
                        let item = live.swap_remove(i);
                        // The neighbour may already be gone: then free here.
                        if let Err(mpsc::SendError(item)) = peer.send(item) {
                            check(&item.0, item.1);
                        }
                    } else {
                        let i = rng.next() as usize % live.len();
                        let (buf, tag) = live.swap_remove(i);
                        check(&buf, tag);
                    }
                    if live.len() > 64 {
                        for (buf, tag) in live.drain(..32) {
                            check(&buf, tag);
                        }
                    }
                    if op % 2_000 == 1_999 && t == 0 {
                        pool.release_cached();
                    }
                }
                drop(peer);
                for (buf, tag) in live {
                    check(&buf, tag);
                }
                // Buffers still in flight to us arrive until every sender is gone.
                while let Ok((buf, tag)) = inbox.recv_timeout(std::time::Duration::from_millis(200))
                {
                    check(&buf, tag);
                }
            })
        })
        .collect();
    drop(senders);
    for worker in workers {
        worker.join().unwrap();
    }
}

#[test]
fn many_threads_keep_buffers_apart_and_accounts_balanced() {
    let max = ByteSize::mib(256);
    let pool = HostPool::new(&config(max)).unwrap();
    run_threads(&pool);
    let s = pool.stats();
    assert_eq!(
        s.allocated_bytes, 0,
        "every byte handed out came back: {s:?}"
    );
    assert_eq!(s.alloc_count, s.free_count);
    assert!(s.alloc_count >= (THREADS * OPS_PER_THREAD / 3) as u64);
    assert!(s.peak_allocated_bytes <= s.peak_reserved_bytes);
    pool.release_cached();
    let s = pool.stats();
    // The worker threads have exited, so their caches came back; only the
    // KV pool's initial slots stay.
    assert!(s.reserved_bytes <= max.bytes());
    assert_eq!(s.reserved_bytes, 16 * (64 << 10), "{s:?}");
    let kv = &pool.slab_stats()[0];
    assert_eq!(kv.free_slots, kv.total_slots);
}

#[test]
fn a_tight_limit_falls_back_without_failing() {
    // 8 MiB cannot hold the threads' live sets: the system allocator serves
    // the rest, and nothing fails.
    let max = ByteSize::mib(8);
    let pool = HostPool::new(&config(max)).unwrap();
    run_threads(&pool);
    let s = pool.stats();
    assert_eq!(s.allocated_bytes, 0, "{s:?}");
    assert!(
        s.os_alloc_count > 1,
        "the system allocator served some: {s:?}"
    );
    pool.release_cached();
    assert!(pool.stats().reserved_bytes <= max.bytes());
}
