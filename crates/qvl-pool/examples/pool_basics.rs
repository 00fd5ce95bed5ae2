//! A decode step's worth of buffers from a host pool, with a KV slab pool,
//! then the counters and a release back to the OS.
//!
//! Run: `cargo run -p qvl-pool --example pool_basics`

use qvl_core::{AllocRequest, BufferAllocator, TensorKind, TensorMeta};
use qvl_pool::{HostPool, PoolConfig};

const CONFIG: &str = r#"
enabled = true
max_pool_size = "1GiB"

[specialized_pools.kv_cache]
kind = "kv_cache"
shape = [2, 16, 8, 128]   # k and v, 16 tokens, 8 kv heads, head_dim 128
dtype = "f16"
initial = 64
"#;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config: PoolConfig = toml::from_str(CONFIG)?;
    let pool = HostPool::new(&config)?;

    // A KV block: served by the kv_cache slab pool.
    let kv_spec = &config.specialized_pools["kv_cache"];
    let meta = TensorMeta::new(kv_spec.shape.clone(), kv_spec.dtype, TensorKind::KvCache);
    let mut kv_blocks = Vec::new();
    for _ in 0..8 {
        kv_blocks.push(pool.allocate(&AllocRequest::tensor(meta.clone()))?);
    }

    // Activations of one decoder layer for a 512-token prefill: size classes
    // for the small ones, the best-fit arena for the large ones.
    for _step in 0..4 {
        let hidden = pool.allocate(&AllocRequest::bytes(512 * 2048 * 2, TensorKind::Activation))?;
        let mut gate =
            pool.allocate(&AllocRequest::bytes(512 * 6144 * 2, TensorKind::Activation))?;
        gate.fill(1);
        let norm = pool.allocate(&AllocRequest::bytes(2048 * 2, TensorKind::Activation))?;
        drop((hidden, gate, norm));
    }

    // A page-aligned staging buffer, as O_DIRECT reads need.
    let staging =
        pool.allocate(&AllocRequest::bytes(1 << 20, TensorKind::Workspace).with_align(4096))?;
    assert_eq!(staging.as_ptr() as usize % 4096, 0);
    drop(staging);

    let s = pool.stats();
    println!(
        "allocated {} B, reserved {} B (peak {} B), {} allocations, fragmentation {:.1}%",
        s.allocated_bytes,
        s.reserved_bytes,
        s.peak_reserved_bytes,
        s.alloc_count,
        100.0 * s.fragmentation()
    );
    for slab in pool.slab_stats() {
        println!(
            "slab pool {}: {} of {} slots free",
            slab.name, slab.free_slots, slab.total_slots
        );
    }
    drop(kv_blocks);
    let released = pool.release_cached();
    println!(
        "released {released} B to the OS; {} B stay reserved (the KV pool's initial slots)",
        pool.stats().reserved_bytes
    );
    Ok(())
}
