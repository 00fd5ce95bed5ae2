//! The reference figures of issue 6 on the shared Mooncake conversation
//! trace: LRU and Belady at 1%, 5%, 10% of the unique blocks (floor), hit
//! ratio over all 288,500 block accesses.

use qvl_cache::trace::{capacity_for_fraction, replay_accesses, ReplayPolicy};
use qvl_cache::{PolicyKind, Trace};
use std::path::PathBuf;

fn trace_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../data/traces/mooncake_conversation_trace.jsonl")
}

#[test]
fn lru_and_belady_reproduce_the_reference_figures() {
    let trace = Trace::load(trace_path()).unwrap();
    let accesses = trace.accesses();
    let unique = trace.unique_blocks();
    assert_eq!((accesses.len(), unique), (288_500, 182_790));
    let reference = [
        (0.01, 1827, 0.0523, 0.2463),
        (0.05, 9139, 0.1954, 0.3664),
        (0.10, 18279, 0.2784, 0.3664),
    ];
    for (fraction, blocks, lru_ref, belady_ref) in reference {
        let capacity = capacity_for_fraction(unique, fraction);
        assert_eq!(capacity, blocks);
        let lru = replay_accesses(&accesses, PolicyKind::Lru.into(), capacity).unwrap();
        assert_eq!(lru.accesses, 288_500);
        assert!(
            (lru.hit_ratio() - lru_ref).abs() < 5e-5,
            "LRU at {fraction}: {}",
            lru.hit_ratio()
        );
        let belady = replay_accesses(&accesses, ReplayPolicy::Belady, capacity).unwrap();
        assert!(
            (belady.hit_ratio() - belady_ref).abs() < 5e-5,
            "Belady at {fraction}: {}",
            belady.hit_ratio()
        );
    }
}

#[test]
fn replay_from_a_path_matches_the_library_replay() {
    let stats = qvl_cache::replay(trace_path(), PolicyKind::Lru.into(), 1827).unwrap();
    assert_eq!(stats.hits, 15_080);
    assert_eq!(stats.policy, "lru");
}

#[test]
fn predictive_beats_lru_by_a_third_at_one_percent() {
    let trace = Trace::load(trace_path()).unwrap();
    let accesses = trace.accesses();
    let capacity = capacity_for_fraction(trace.unique_blocks(), 0.01);
    let lru = replay_accesses(&accesses, PolicyKind::Lru.into(), capacity).unwrap();
    let predictive = replay_accesses(&accesses, PolicyKind::Predictive.into(), capacity).unwrap();
    assert!(
        predictive.hit_ratio() >= 1.3 * lru.hit_ratio(),
        "predictive {} vs LRU {}",
        predictive.hit_ratio(),
        lru.hit_ratio()
    );
}
