//! `qvl cache replay`: hit ratios of eviction policies on a block trace.
use anyhow::{bail, Context, Result};
use qvl_cache::analysis::{horizon_bound, Features};
use qvl_cache::trace::{self, Capacity, LevelCosts, ReplayPolicy, Trace};
use std::path::Path;
use std::process::ExitCode;

/// Options of `qvl cache replay`.
pub struct ReplayArgs<'a> {
    /// The Mooncake-format JSONL trace.
    pub trace: &'a Path,
    /// "1%,5%,10%" or block counts.
    pub capacity: &'a str,
    /// Comma-separated policies; LRU and Belady are always added.
    pub policies: &'a str,
    /// Print one JSON array instead of a table.
    pub json: bool,
    /// Replay the three-level cache instead of one level.
    pub tiers: bool,
}

/// Replays the trace once per (policy, capacity) and prints the hit ratios.
pub fn replay(args: ReplayArgs<'_>) -> Result<ExitCode> {
    let loaded = Trace::load(args.trace)?;
    let accesses = loaded.accesses();
    let unique = loaded.unique_blocks();
    let capacities = Capacity::parse_list(args.capacity)?;
    let mut policies: Vec<ReplayPolicy> = Vec::new();
    for name in args
        .policies
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let p: ReplayPolicy = name.parse().with_context(|| format!("--policy {name:?}"))?;
        if !policies.contains(&p) {
            policies.push(p);
        }
    }
    // LRU and Belady frame every table: the baseline and the optimum.
    for p in ["lru", "belady"] {
        let p: ReplayPolicy = p.parse()?;
        if !policies.contains(&p) {
            policies.push(p);
        }
    }
    if args.tiers {
        return replay_tiers(&accesses, unique, &capacities, &policies, args.json);
    }
    eprintln!(
        "{}: {} accesses, {} unique blocks",
        args.trace.display(),
        accesses.len(),
        unique
    );
    let mut rows = Vec::new();
    for cap in &capacities {
        let blocks = cap.blocks(unique);
        for &policy in &policies {
            let stats = trace::replay_accesses(&accesses, policy, blocks)
                .with_context(|| format!("replaying {policy} at {blocks} blocks"))?;
            rows.push((cap.fraction(), stats));
        }
    }
    if args.json {
        let json: Vec<_> = rows.iter().map(|(f, s)| s.to_json_row(*f)).collect();
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:>10} {:>9} {:<12} {:>10} {:>9} {:>10} {:>10}",
        "capacity", "blocks", "policy", "hits", "hit ratio", "vs lru", "gap closed"
    );
    let ratio_of = |fraction: &Option<f64>, blocks: usize, policy: &str| {
        rows.iter()
            .find(|(f, r)| f == fraction && r.capacity_blocks == blocks && r.policy == policy)
            .map_or(f64::NAN, |(_, r)| r.hit_ratio())
    };
    for (fraction, s) in &rows {
        let lru = ratio_of(fraction, s.capacity_blocks, "lru");
        let belady = ratio_of(fraction, s.capacity_blocks, "belady");
        let cap = fraction.map_or_else(
            || s.capacity_blocks.to_string(),
            |f| format!("{}%", f * 100.0),
        );
        println!(
            "{:>10} {:>9} {:<12} {:>10} {:>9.4} {:>9.3}x {:>10.3}",
            cap,
            s.capacity_blocks,
            s.policy,
            s.hits,
            s.hit_ratio(),
            s.hit_ratio() / lru,
            (s.hit_ratio() - lru) / (belady - lru)
        );
    }
    // What any policy deciding by such classes could reach, knowing their
    // statistics in hindsight: the ceiling for online class-based policies
    // (Rich: the learned policy's features as 7,000 classes, a loose one).
    println!("gap closed: share of the LRU-to-Belady gap. Bound of policies that decide by block classes, with hindsight on the classes' reuse statistics:");
    for cap in &capacities {
        let blocks = cap.blocks(unique);
        let bounds: Vec<String> = [Features::Structure, Features::RequestShape, Features::Rich]
            .iter()
            .map(|f| format!("{f:?} {:.4}", horizon_bound(&accesses, *f, blocks)))
            .collect();
        println!(
            "{:>10} {:>9} {}",
            cap_label(*cap),
            blocks,
            bounds.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn cap_label(cap: Capacity) -> String {
    match cap {
        Capacity::Fraction(f) => format!("{}%", f * 100.0),
        Capacity::Blocks(n) => n.to_string(),
    }
}

/// Three levels sized 1x, 4x and 15x the capacity (L1 GPU, L2 RAM, L3 SSD).
fn replay_tiers(
    accesses: &[trace::Access],
    unique: usize,
    capacities: &[Capacity],
    policies: &[ReplayPolicy],
    json: bool,
) -> Result<ExitCode> {
    let costs = LevelCosts::default();
    let mut out = Vec::new();
    for cap in capacities {
        let l1 = cap.blocks(unique);
        let levels = [l1, l1 * 4, l1 * 15];
        for policy in policies {
            let ReplayPolicy::Online(kind) = policy else {
                continue; // Belady is a one-level oracle.
            };
            let s = trace::replay_tiered(accesses, *kind, &levels, &costs)?;
            out.push(s);
        }
    }
    if out.is_empty() {
        bail!("--tiers needs at least one online policy");
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<12} {:>24} {:>26} {:>10}",
        "policy", "blocks L1/L2/L3", "hit ratio L1/L2/L3", "cost"
    );
    for s in &out {
        let r = s.level_hit_ratios();
        let blocks = s
            .level_blocks
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join("/");
        let ratios = r
            .iter()
            .map(|x| format!("{x:.4}"))
            .collect::<Vec<_>>()
            .join("/");
        println!(
            "{:<12} {:>24} {:>26} {:>9.3}x",
            s.policy,
            blocks,
            ratios,
            s.cost_ms / s.no_cache_cost_ms
        );
    }
    println!(
        "cost: latency-weighted, relative to no cache (hit costs {:?} ms, miss {} ms: estimates)",
        costs.hit_ms, costs.miss_ms
    );
    Ok(ExitCode::SUCCESS)
}
