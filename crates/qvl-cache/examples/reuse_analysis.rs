//! Where the hits are in a trace, and how far an online policy can get.
//!
//! ```text
//! cargo run --release -p qvl-cache --example reuse_analysis [TRACE.jsonl]
//! ```
//!
//! Prints the reuse profile of the trace by the classes the predictive
//! policy uses, then, at 1% and 5% of the unique blocks, LRU, the predictive
//! policy and Belady next to the bound of any policy deciding by each
//! feature set (`qvl_cache::analysis`). Without a trace it analyzes the
//! synthetic chat workload.

use qvl_cache::analysis::{horizon_bound, reuse_profile, Features};
use qvl_cache::synthetic::ChatWorkload;
use qvl_cache::trace::{capacity_for_fraction, replay_accesses, ReplayPolicy};
use qvl_cache::{PolicyKind, Trace};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let trace = match std::env::args().nth(1) {
        Some(path) => Trace::load(path)?,
        None => ChatWorkload::default().generate(),
    };
    let accesses = trace.accesses();
    let unique = trace.unique_blocks();
    println!("{} accesses, {unique} unique blocks", accesses.len());
    println!("\nlargest classes of lives (structure features):");
    println!(
        "{:<32} {:>8} {:>7} {:>10}",
        "class", "lives", "reused", "median gap"
    );
    for c in reuse_profile(&accesses, Features::Structure)
        .iter()
        .take(16)
    {
        println!(
            "{:<32} {:>8} {:>7.3} {:>10}",
            c.class, c.lives, c.reused, c.median_gap
        );
    }
    for fraction in [0.01, 0.05] {
        let capacity = capacity_for_fraction(unique, fraction).max(1);
        let ratio = |p: ReplayPolicy| -> Result<f64, qvl_cache::CacheError> {
            Ok(replay_accesses(&accesses, p, capacity)?.hit_ratio())
        };
        let lru = ratio(PolicyKind::Lru.into())?;
        let predictive = ratio(PolicyKind::Predictive.into())?;
        let belady = ratio(ReplayPolicy::Belady)?;
        println!(
            "\n{}% ({capacity} blocks): lru {lru:.4}, predictive {predictive:.4}, belady {belady:.4}",
            fraction * 100.0
        );
        for f in Features::ALL {
            let bound = horizon_bound(&accesses, f, capacity);
            println!(
                "  bound by {:<14} {bound:.4} ({:.2}x lru, gap closed {:.2})",
                format!("{f:?}"),
                bound / lru,
                (bound - lru) / (belady - lru)
            );
        }
    }
    Ok(())
}
