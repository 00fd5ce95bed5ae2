//! Streams 16 "layers" of 4 MiB through a RAM budget of a quarter of them,
//! three passes, and prints what the tier manager did.

use qvl_core::{ByteSize, TensorKind};
use qvl_tier::{ObjectId, TierConfig, TierManager};
use std::time::Instant;

fn main() -> Result<(), qvl_tier::TierError> {
    let layer_bytes = 4usize << 20;
    let layers = 16;
    let budget = ByteSize((layers * layer_bytes / 4) as u64);
    let mgr = TierManager::new(TierConfig::with_ram_budget(budget))?;
    let order: Vec<ObjectId> = (0..layers)
        .map(|i| mgr.insert(TensorKind::Weight, &vec![i as u8; layer_bytes]))
        .collect::<Result<_, _>>()?;
    mgr.flush()?;
    let bound = mgr.measure_read_bandwidth()?;
    println!(
        "SSD read bandwidth (same read path): {:.0} MB/s",
        bound / 1e6
    );
    for pass in 0..3 {
        let start = Instant::now();
        let mut checksum = 0u64;
        for (i, id) in order.iter().enumerate() {
            let bytes = mgr.get(*id)?;
            mgr.prefetch_after(&order, i)?;
            // Stand-in for the layer's compute: touch every byte.
            checksum += bytes.iter().map(|&b| u64::from(b)).sum::<u64>();
        }
        println!(
            "pass {pass}: {:.1} ms, checksum {checksum}",
            start.elapsed().as_secs_f64() * 1e3
        );
    }
    println!("{}", mgr.stats().summary());
    Ok(())
}
