//! `qvl-bench`: the per-phase benchmarks behind `cargo xtask bench <phase>`.
//!
//! Each phase module measures its optimization against the plain path in the
//! same run and returns a [`BenchReport`]; this binary writes it to
//! `<out>/<phase>.json` and prints it as a table.
#![deny(missing_docs)]

mod cache;
mod compress;
mod e2e;
mod gc;
mod gpu_codec;
mod metrics;
mod model;
mod pool;
mod report;
mod swap;
mod tier;

use anyhow::{bail, Context, Result};
use qvl_core::bench::BenchReport;
use std::path::PathBuf;

/// Options every phase benchmark gets.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Small sizes and few repetitions, for CI.
    pub quick: bool,
    /// Where reports go (target/qvl-bench by default).
    pub out_dir: PathBuf,
    /// The repository root (for data files such as traces).
    pub repo_root: PathBuf,
}

/// The system allocator, except that the gc benchmark routes the model's
/// large allocations into a pool while it measures (see `gc::route`).
#[global_allocator]
static GLOBAL: gc::route::ModelAllocRouter = gc::route::ModelAllocRouter;

type PhaseFn = fn(&BenchOptions) -> Result<BenchReport>;

/// Every phase: name, what it measures, its function (None until its issue lands).
const PHASES: &[(&str, &str, Option<PhaseFn>)] = &[
    (
        "model",
        "prefill and decode tokens/s against the memory-bandwidth bound",
        Some(model::run),
    ),
    (
        "pool",
        "allocation time and reserved memory against the system allocator",
        Some(pool::run),
    ),
    (
        "gpu-codec",
        "GPU int8/int4 quantize and dequantize against the CPU codec (feature cuda)",
        Some(gpu_codec::run),
    ),
    (
        "cache",
        "hit ratio on the Mooncake trace against LRU and Belady",
        Some(cache::run),
    ),
    (
        "compress",
        "KV compression ratio, error and codec GB/s",
        Some(compress::run),
    ),
    (
        "swap",
        "long-context decode throughput with KV swapped to SSD",
        Some(swap::run),
    ),
    (
        "tier",
        "tokens/s with weights streamed under RAM budgets",
        Some(tier::run),
    ),
    (
        "gc",
        "peak reserved memory against the offline optimum",
        Some(gc::run),
    ),
    ("metrics", "cost per recorded event", Some(metrics::run)),
    (
        "e2e",
        "Qwen3-VL with an image and SmolLM2: all phases off, lossless, all on",
        Some(e2e::run),
    ),
];

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mut phase = None;
    let mut quick = false;
    let repo_root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .context("benches/ has no parent directory")?;
    let mut out_dir = repo_root.join("target/qvl-bench");
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--out" => out_dir = PathBuf::from(args.next().context("--out needs a directory")?),
            "-h" | "--help" => {
                print_help();
                return Ok(());
            }
            _ if phase.is_none() && !arg.starts_with('-') => phase = Some(arg),
            _ => bail!("unexpected argument {arg:?}; see --help"),
        }
    }
    let Some(phase) = phase else {
        print_help();
        bail!("name a phase, or `all`");
    };
    let opts = BenchOptions {
        quick,
        out_dir,
        repo_root,
    };
    let selected: Vec<_> = if phase == "all" {
        PHASES.iter().collect()
    } else {
        match PHASES.iter().find(|(name, _, _)| *name == phase) {
            Some(p) => vec![p],
            None => bail!(
                "unknown phase {phase:?}; phases: {}, all",
                PHASES.iter().map(|p| p.0).collect::<Vec<_>>().join(", ")
            ),
        }
    };
    let run_all = phase == "all";
    let mut failed = Vec::new();
    let mut errors = Vec::new();
    let mut entries = Vec::new();
    for (name, _, run) in selected {
        let mut entry = report::PhaseEntry {
            phase: name.to_string(),
            plan_criterion: report::plan_criterion(name).to_string(),
            status: "not implemented".to_string(),
            error: None,
            seconds: 0.0,
            report: None,
        };
        let Some(run) = run else {
            if !run_all {
                bail!("the {name} benchmark is not implemented yet");
            }
            eprintln!("bench {name}: not implemented yet, skipped");
            entries.push(entry);
            continue;
        };
        let start = std::time::Instant::now();
        let outcome = run(&opts).with_context(|| format!("bench {name} failed"));
        entry.seconds = start.elapsed().as_secs_f64();
        match outcome {
            Ok(report) => {
                let path = report.write_json(&opts.out_dir).with_context(|| {
                    format!("writing the {name} report under {}", opts.out_dir.display())
                })?;
                print!("{}", report.table());
                println!("report: {}\n", path.display());
                if !report.all_pass() {
                    failed.push(*name);
                }
                entry.status = "ran".to_string();
                entry.report = Some(report);
            }
            // One phase's failure must not hide the others' results in
            // `all`; it still fails the command at the end.
            Err(e) if run_all => {
                eprintln!("bench {name}: {e:#}\n");
                entry.status = "failed".to_string();
                entry.error = Some(format!("{e:#}"));
                errors.push(*name);
            }
            Err(e) => return Err(e),
        }
        entries.push(entry);
    }
    if run_all {
        let generated = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut combined = report::CombinedReport {
            generated_utc: report::iso_utc(generated),
            quick,
            machine: qvl_core::bench::MachineInfo::detect(),
            phases: entries,
            charts: Vec::new(),
        };
        let md = report::write(&mut combined, &opts.out_dir)?;
        let (pass, total) = combined.pass_count();
        println!(
            "phase report: {} ({pass} of {total} criteria pass; report.json and {} charts beside it)",
            md.display(),
            combined.charts.len()
        );
    }
    if !failed.is_empty() {
        eprintln!("criteria not met in: {}", failed.join(", "));
    }
    if !errors.is_empty() {
        bail!("benchmarks that failed to run: {}", errors.join(", "));
    }
    Ok(())
}

fn print_help() {
    println!("qvl-bench <phase>|all [--quick] [--out DIR]\n\nPhases:");
    for (name, what, run) in PHASES {
        let state = if run.is_some() {
            ""
        } else {
            " (not implemented yet)"
        };
        println!("  {name:<9} {what}{state}");
    }
}
