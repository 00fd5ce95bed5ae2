//! Requests of varied length on a caching allocator, with collection off,
//! on a fixed interval, and adaptive: peak reserved against peak live.
//!
//! `cargo run -p qvl-gc --example varied_requests`

use qvl_core::{
    AllocRequest, BufferAllocator, DType, LifetimeTracker, TensorId, TensorKind, TensorMeta,
    UseSite,
};
use qvl_gc::{CachingAllocator, Collector, GcConfig, TensorRegistry};
use std::sync::Arc;
use std::time::{Duration, Instant};

const HIDDEN: usize = 1024;
const INTERMEDIATE: usize = 3072;
const LAYERS: u32 = 4;

/// One forward of `n` tokens: per layer a normed input, q, the MLP gate and
/// up projections, each filled (as a kernel writes its output) and freed.
fn forward(
    pool: &CachingAllocator,
    registry: &TensorRegistry,
    gc: Option<&Collector>,
    n: usize,
    ids: &mut u64,
) -> qvl_core::Result<()> {
    for layer in 0..LAYERS {
        let mut live = Vec::new();
        for (op, width) in [
            ("norm", HIDDEN),
            ("attn.q", HIDDEN),
            ("mlp.gate", INTERMEDIATE),
            ("mlp.up", INTERMEDIATE),
        ] {
            let meta = TensorMeta::new(vec![n, width], DType::F32, TensorKind::Activation)
                .with_layer(layer);
            let mut buf = pool.allocate(&AllocRequest::tensor(meta.clone()))?;
            buf.as_mut().fill(1);
            *ids += 1;
            registry.on_create(
                TensorId(*ids),
                &meta,
                UseSite {
                    layer: Some(layer),
                    op,
                },
            );
            live.push((TensorId(*ids), buf));
        }
        for (id, buf) in live {
            drop(buf);
            registry.on_free(id);
        }
        if let Some(gc) = gc {
            gc.poll();
        }
    }
    Ok(())
}

fn run(name: &str, config: Option<GcConfig>) -> Result<(), Box<dyn std::error::Error>> {
    let cfg = config.clone().unwrap_or_default();
    let registry = Arc::new(TensorRegistry::new(&cfg));
    let pool = Arc::new(CachingAllocator::new());
    let gc = match config {
        Some(c) => {
            let gc = Collector::new(c, registry.clone())?;
            gc.register(pool.clone());
            pool.set_pressure_hook(Some(gc.pressure_hook()));
            Some(gc)
        }
        None => None,
    };
    let start = Instant::now();
    let mut ids = 0;
    for r in 0..40usize {
        let prompt = 16 + (r * 97) % 400;
        forward(&pool, &registry, gc.as_deref(), prompt, &mut ids)?;
        for _ in 0..16 {
            forward(&pool, &registry, gc.as_deref(), 1, &mut ids)?;
        }
    }
    let s = pool.stats();
    println!(
        "{name:<9} peak reserved {:>7.1} MiB  peak live {:>7.1} MiB  ratio {:.3}  collections {:>4}  {:.0} ms",
        s.peak_reserved_bytes as f64 / 1048576.0,
        s.peak_allocated_bytes as f64 / 1048576.0,
        s.peak_reserved_bytes as f64 / s.peak_allocated_bytes as f64,
        gc.as_ref().map_or(0, |g| g.stats().collections),
        start.elapsed().as_secs_f64() * 1e3
    );
    if let Some(gc) = gc {
        let top = gc.registry().site_stats();
        if let Some(s) = top.first() {
            println!(
                "          busiest site {:?}: {} created, lifetime {:?}",
                s.site, s.created, s.lifetime
            );
        }
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    run("off", None)?;
    run(
        "fixed",
        Some(GcConfig {
            adaptive_enabled: false,
            collection_interval: Duration::from_millis(5),
            ..GcConfig::default()
        }),
    )?;
    run("adaptive", Some(GcConfig::default()))?;
    Ok(())
}
