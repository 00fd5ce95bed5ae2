//! Placement, migration and concurrency of the tier manager on a real spill file.
#![allow(clippy::unwrap_used)]

use qvl_core::{ByteSize, TensorKind};
use qvl_tier::{ObjectId, TierConfig, TierManager};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

fn manager(dir: &std::path::Path, ram: u64) -> TierManager {
    TierManager::new(TierConfig {
        cpu_ram: ByteSize(ram),
        spill_dir: Some(dir.to_path_buf()),
        half_life_accesses: 64,
        ..TierConfig::default()
    })
    .unwrap()
}

/// Object `i`'s bytes: every byte names the object, so a torn or mixed
/// copy is detectable.
fn payload(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|j| (i * 31 + j % 7) as u8).collect()
}

#[test]
fn hot_objects_move_up_and_similar_ones_do_not_swap() {
    let dir = tempfile::tempdir().unwrap();
    // Five objects of RAM: three kept copies plus two streaming buffers.
    let m = manager(dir.path(), 5 * 8192);
    let ids: Vec<ObjectId> = (0..6)
        .map(|i| m.insert(TensorKind::Weight, &payload(i, 8192)).unwrap())
        .collect();
    m.flush().unwrap();
    // Objects 0..3 are hot; 3..6 are touched once.
    for _ in 0..20 {
        for id in &ids[..3] {
            assert_eq!(&m.get(*id).unwrap()[..], &payload(id.0 as usize, 8192)[..]);
        }
    }
    for id in &ids[3..] {
        m.get(*id).unwrap();
    }
    m.rebalance().unwrap();
    m.wait_idle();
    for id in &ids[..3] {
        assert!(m.is_resident(*id).unwrap(), "{id:?} is hot");
    }
    let before = m.stats();
    // A uniform pattern over all six: similar scores, no ping-pong.
    for _ in 0..10 {
        for id in &ids {
            m.get(*id).unwrap();
        }
        m.rebalance().unwrap();
        m.wait_idle();
    }
    let after = m.stats();
    assert!(
        after.promotions + after.demotions - before.promotions - before.demotions <= 2,
        "{} moves under a uniform pattern",
        after.promotions + after.demotions - before.promotions - before.demotions
    );
    assert!(after.resident_bytes <= 3 * 8192);
    // Now 3..6 become much hotter: they displace 0..3.
    for _ in 0..200 {
        for id in &ids[3..] {
            m.get(*id).unwrap();
        }
    }
    m.rebalance().unwrap();
    m.wait_idle();
    for id in &ids[3..] {
        assert!(m.is_resident(*id).unwrap(), "{id:?} became hot");
    }
    let s = m.stats();
    assert!(s.demotions >= 3 && s.promotions >= 6, "{}", s.summary());
}

#[test]
fn reading_in_order_queues_the_next_read_into_the_freed_buffer() {
    let dir = tempfile::tempdir().unwrap();
    // Depth 1 and no room for kept copies: the layer in use plus one read ahead.
    let m = TierManager::new(TierConfig {
        cpu_ram: ByteSize(2 * 4096),
        prefetch_depth: 1,
        spill_dir: Some(dir.path().to_path_buf()),
        ..TierConfig::default()
    })
    .unwrap();
    let order: Vec<ObjectId> = (0..6)
        .map(|i| m.insert(TensorKind::Weight, &payload(i, 4096)).unwrap())
        .collect();
    for _ in 0..4 {
        for i in 0..order.len() {
            // The previous object was dropped: its buffer takes the read of
            // the next one before this one is waited for.
            let bytes = m.get_in_order(&order, i).unwrap();
            assert_eq!(&bytes[..], &payload(i, 4096)[..]);
        }
    }
    m.wait_idle();
    let s = m.stats();
    // Reads go through the I/O thread; one is on demand only when the
    // thread had not yet taken the last job (room counted for it).
    assert_eq!(s.ssd_hits + s.prefetch_hits, 24, "{}", s.summary());
    assert!(s.prefetch_hits >= 12, "{}", s.summary());
    assert_eq!(s.tiers[1].objects, 0);
    assert!(s.tiers[1].peak <= 2 * 4096, "{}", s.summary());
    assert!(m
        .get_in_order(&order, 6)
        .unwrap_err()
        .to_string()
        .contains("position 6"));
}

#[test]
fn reconfiguring_the_budget_demotes_and_regrows_kept_copies() {
    let dir = tempfile::tempdir().unwrap();
    let m = manager(dir.path(), 8 * 4096);
    let order: Vec<ObjectId> = (0..4)
        .map(|i| m.insert(TensorKind::Weight, &payload(i, 4096)).unwrap())
        .collect();
    let walk = |rounds| {
        for _ in 0..rounds {
            for i in 0..order.len() {
                assert_eq!(
                    &m.get_in_order(&order, i).unwrap()[..],
                    &payload(i, 4096)[..]
                );
            }
        }
        m.wait_idle();
    };
    walk(10);
    assert_eq!(m.stats().tiers[1].objects, 4, "everything fits: all kept");
    // A quarter of the objects, depth 1: the reserve leaves no kept copy.
    m.reconfigure(ByteSize(2 * 4096), 1).unwrap();
    assert_eq!(m.config().cpu_ram, ByteSize(2 * 4096));
    let s = m.stats();
    assert_eq!(
        (s.tiers[1].objects, s.resident_bytes),
        (0, 0),
        "{}",
        s.summary()
    );
    walk(5);
    let s = m.stats();
    assert!(s.tiers[1].used <= 2 * 4096, "{}", s.summary());
    // Static placement (depth 0) with room for three: two kept copies and
    // the buffer of the read in use.
    m.reconfigure(ByteSize(3 * 4096), 0).unwrap();
    walk(10);
    assert_eq!(m.stats().tiers[1].objects, 2, "{}", m.stats().summary());
    assert!(m.reconfigure(ByteSize(4096), 65).is_err());
}

#[test]
fn prefetch_reads_ahead_of_an_ordered_stream() {
    let dir = tempfile::tempdir().unwrap();
    // Room for two kept copies plus the streaming buffers.
    let m = manager(dir.path(), 4 * 4096);
    let order: Vec<ObjectId> = (0..8)
        .map(|i| m.insert(TensorKind::Weight, &payload(i, 4096)).unwrap())
        .collect();
    for _ in 0..5 {
        for (i, id) in order.iter().enumerate() {
            let bytes = m.get(*id).unwrap();
            m.prefetch_after(&order, i).unwrap();
            assert_eq!(&bytes[..], &payload(i, 4096)[..]);
        }
    }
    let s = m.stats();
    assert!(s.prefetch_hits > 20, "{}", s.summary());
    assert!(
        s.tiers[1].peak <= 4 * 4096,
        "peak {} over budget",
        s.tiers[1].peak
    );
}

#[test]
fn no_torn_reads_under_concurrent_migration() {
    let dir = tempfile::tempdir().unwrap();
    let len = 4096 * 3;
    let m = Arc::new(manager(dir.path(), 4 * len as u64));
    let ids: Vec<ObjectId> = (0..12)
        .map(|i| m.insert(TensorKind::KvCache, &payload(i, len)).unwrap())
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let migrator = {
        let (m, stop) = (m.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut rounds = 0;
            while !stop.load(Ordering::Relaxed) {
                m.rebalance().unwrap();
                rounds += 1;
                std::thread::yield_now();
            }
            rounds
        })
    };
    let readers: Vec<_> = (0..3)
        .map(|t| {
            let (m, ids) = (m.clone(), ids.clone());
            std::thread::spawn(move || {
                let mut seed = 0x9E37_79B9u64 + t;
                for _ in 0..400 {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    // Skewed: low ids much hotter, phases shift with t.
                    let pick = ((seed % 64) as usize * (seed % 64) as usize / 341 + t as usize * 3)
                        % ids.len();
                    let id = ids[pick];
                    if seed % 5 == 0 {
                        m.prefetch(id).unwrap();
                    }
                    let got = m.get(id).unwrap();
                    assert_eq!(got.id(), id);
                    assert!(got[..] == payload(pick, len)[..], "torn read of {id:?}");
                }
            })
        })
        .collect();
    for r in readers {
        r.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    assert!(migrator.join().unwrap() > 0);
    m.wait_idle();
    let s = m.stats();
    assert!(s.promotions > 0 && s.demotions > 0, "{}", s.summary());
}

#[test]
fn many_requests_do_not_grow_memory_or_the_spill_file() {
    let dir = tempfile::tempdir().unwrap();
    let m = manager(dir.path(), 64 * 1024);
    let mut peak_span = 0;
    for request in 0..200 {
        // Each request: a vision embedding and some KV blocks, then freed.
        let ids: Vec<ObjectId> = (0..4)
            .map(|b| {
                let kind = if b == 0 {
                    TensorKind::VisionEmbedding
                } else {
                    TensorKind::KvCache
                };
                m.insert(kind, &payload(request + b, 5000 + b * 1000))
                    .unwrap()
            })
            .collect();
        for id in &ids {
            m.get(*id).unwrap();
        }
        for id in ids {
            m.remove(id).unwrap();
        }
        let s = m.stats();
        if request == 10 {
            peak_span = s.tiers[2].used;
        }
        if request > 10 {
            assert!(
                s.tiers[2].used <= peak_span.max(32768),
                "spill grows: {}",
                s.summary()
            );
        }
        assert_eq!(s.resident_bytes, 0);
    }
    m.wait_idle();
    let s = m.stats();
    assert_eq!(
        s.tiers[1].used,
        0,
        "every RAM buffer was released: {}",
        s.summary()
    );
    assert_eq!(s.object_bytes, 0);
    assert!(m
        .get(ObjectId(0))
        .unwrap_err()
        .to_string()
        .contains("unknown tier object 0"));
}
