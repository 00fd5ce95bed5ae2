//! The swap space by hand: batched writes, async reads decoded on the I/O
//! threads, and a damaged record caught by its checksum.
//!
//! `cargo run -p qvl-swap --example swap_basics [DIR]`

use qvl_core::{Block, BlockKey, BlockStore, DType, TensorKind, TensorMeta};
use qvl_swap::{Decoder, SsdStore, SwapConfig};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("qvl-swap-example"));
    let store = SsdStore::open(&SwapConfig {
        capacity_bytes: 16 << 20,
        ..SwapConfig::in_directory(&dir)
    })?;
    println!(
        "swap file {} ({} I/O)",
        store.path().display(),
        store.io().name()
    );

    // Eight 64 KiB "KV chunks" of f32, written in one I/O.
    let meta = TensorMeta::new(vec![16384], DType::F32, TensorKind::KvCache);
    let blocks: Vec<Block> = (0..8u64)
        .map(|i| {
            let data: Vec<u8> = (0..16384u32)
                .flat_map(|j| (j as f32 * 0.5 + i as f32).to_le_bytes())
                .collect();
            Block::raw(BlockKey::from_id(i), meta.clone(), data)
        })
        .collect();
    store.put_batch(blocks.clone())?;

    // Read them back asynchronously; the closure runs on the I/O threads.
    let first_value: Decoder<f32> = Arc::new(|_meta, _codec, payload| {
        Ok(f32::from_le_bytes([
            payload[0], payload[1], payload[2], payload[3],
        ]))
    });
    let tickets: Vec<_> = blocks
        .iter()
        .filter_map(|b| store.read_async(&b.key, false, Arc::clone(&first_value)))
        .collect();
    for (i, t) in tickets.into_iter().enumerate() {
        println!("block {i}: first value {}", t.wait()?);
    }

    // Damage one byte of block 3's record: the read fails, naming it.
    let key = BlockKey::from_id(3);
    if let Some(offset) = store.record_offset(&key) {
        let f = std::fs::OpenOptions::new().write(true).open(store.path())?;
        f.write_all_at(&[0xAB], offset + 1000)?;
        f.sync_all()?;
    }
    match store.get(&key) {
        Ok(_) => println!("unexpected: damaged block read back"),
        Err(e) => println!("damaged block refused: {e}"),
    }
    let s = store.stats();
    println!(
        "{} blocks written, {} read, {} integrity failures, {:.0} MB/s while reading",
        s.blocks_written,
        s.blocks_read,
        s.integrity_failures,
        s.engine.bytes as f64 / s.engine.busy_secs.max(1e-9) / 1e6
    );
    Ok(())
}
