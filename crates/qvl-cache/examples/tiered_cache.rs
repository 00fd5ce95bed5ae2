//! A three-level cache of KV blocks, then a trace replay.
//!
//! ```text
//! cargo run --release -p qvl-cache --example tiered_cache [TRACE.jsonl]
//! ```
//!
//! Host-memory stores stand in for the GPU and SSD levels here (the CUDA and
//! swap crates provide the real ones); the cache works with any store.

use qvl_cache::trace::{capacity_for_fraction, replay_accesses, ReplayPolicy};
use qvl_cache::{HostStore, PolicyKind, TieredCache, Trace};
use qvl_core::{Block, BlockInfo, BlockKey, ByteSize, DType, TensorKind, TensorMeta, Tier};
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // 1. A cache of 16 KiB blocks: 4 fit in L1, 8 in L2, 16 in L3.
    const BLOCK: usize = 16 << 10;
    let cache = TieredCache::new(
        PolicyKind::Predictive,
        vec![
            Box::new(HostStore::on_tier(Tier::Gpu, ByteSize((4 * BLOCK) as u64))),
            Box::new(HostStore::new(ByteSize((8 * BLOCK) as u64))),
            Box::new(HostStore::on_tier(Tier::Ssd, ByteSize((16 * BLOCK) as u64))),
        ],
    );
    // Two conversations of 12 blocks each, keyed by chained content hashes.
    let meta = TensorMeta::new(vec![BLOCK / 2], DType::F16, TensorKind::KvCache);
    let mut chains = Vec::new();
    for conversation in 0..2u32 {
        let mut parent = None;
        let mut chain = Vec::new();
        for position in 0..12u32 {
            let tokens: Vec<u32> = (0..16)
                .map(|t| conversation * 1000 + position * 16 + t)
                .collect();
            let key = BlockKey::chained(parent, &tokens, &[]);
            let block = Block::raw(key, meta.clone(), vec![position as u8; BLOCK]);
            cache.put(block, BlockInfo::kv(BLOCK as u64, parent, position))?;
            parent = Some(key);
            chain.push(key);
        }
        chains.push(chain);
    }
    let used: Vec<String> = cache.used_bytes().iter().map(ToString::to_string).collect();
    println!("levels {:?}, bytes used {used:?}", cache.tiers());

    // 2. The first conversation comes back: announce its chain, then read it.
    let promoted = cache.prefetch(&chains[0])?;
    let first = chains[0][0];
    println!(
        "prefetch promoted {promoted} blocks; first block now in level {:?}",
        cache.level_of(&first)
    );
    for key in &chains[0] {
        cache.get(key)?;
    }
    let stats = cache.stats();
    println!(
        "lookups {}, hits per level {:?}, hit ratio {:.2}, demotions {}, dropped {}",
        stats.lookups,
        stats.hits,
        stats.hit_ratio(),
        stats.demotions,
        stats.dropped
    );

    // 3. Replay a Mooncake trace at 1% of its unique blocks.
    let path = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../data/traces/mooncake_conversation_trace.jsonl")
        });
    let trace = Trace::load(&path)?;
    let accesses = trace.accesses();
    let capacity = capacity_for_fraction(trace.unique_blocks(), 0.01).max(1);
    for policy in [
        ReplayPolicy::Online(PolicyKind::Lru),
        ReplayPolicy::Online(PolicyKind::Predictive),
        ReplayPolicy::Belady,
    ] {
        let s = replay_accesses(&accesses, policy, capacity)?;
        println!(
            "{:<10} at {capacity} blocks: hit ratio {:.4} ({} of {} lookups)",
            s.policy,
            s.hit_ratio(),
            s.hits,
            s.accesses
        );
    }
    Ok(())
}
