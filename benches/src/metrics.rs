//! `qvl-bench metrics`: cost per recorded event of the qvl-metrics collector
//! against the no-op recorder and a naive `Mutex<HashMap>` collector.
//!
//! Method: every recorder is called through `&dyn MetricsRecorder` (as the
//! managers call it) on the same cycle of eight hot-path events (alloc, free,
//! two cache lookups, swap, compress, migration, tokens); each event is
//! passed through `black_box`. Single thread: one thread records N events,
//! the cost is wall time / N. All cores: one thread per logical core records
//! N events each after a barrier, timing itself; the cost is the slowest
//! thread's time / N, i.e. the time each thread spends per event while all
//! record at once. Recorders run round-robin, several rounds; the median
//! round counts. The naive collector keeps the same information (counters,
//! byte sums, latency buckets) in a `HashMap<(&str, u32), u64>` behind one
//! `Mutex`, as a first implementation would. After the run the collector's
//! totals are checked against the number of events recorded.

use crate::BenchOptions;
use anyhow::{ensure, Result};
use qvl_core::bench::{BenchReport, Criterion};
use qvl_core::{MetricEvent, MetricsRecorder, NoopRecorder, TensorKind, Tier};
use qvl_metrics::Collector;
use serde_json::json;
use std::collections::HashMap;
use std::hint::black_box;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

/// The event cycle: what the managers record on their hot paths.
fn events() -> [MetricEvent; 8] {
    [
        MetricEvent::Alloc {
            tier: Tier::HostRam,
            kind: TensorKind::KvCache,
            bytes: 65_536,
            latency: Duration::from_nanos(850),
        },
        MetricEvent::Free {
            tier: Tier::HostRam,
            bytes: 65_536,
        },
        MetricEvent::CacheLookup {
            tier: Tier::Gpu,
            hit: true,
        },
        MetricEvent::CacheLookup {
            tier: Tier::HostRam,
            hit: false,
        },
        MetricEvent::Swap {
            out: true,
            bytes: 65_536,
            latency: Duration::from_micros(120),
        },
        MetricEvent::Compress {
            kind: TensorKind::KvCache,
            input_bytes: 65_536,
            output_bytes: 17_408,
            rel_error: 0.0125,
        },
        MetricEvent::Migration {
            from: Tier::Gpu,
            to: Tier::HostRam,
            bytes: 65_536,
        },
        MetricEvent::Tokens {
            count: 1,
            elapsed: Duration::from_millis(25),
        },
    ]
}

/// The naive collector: one lock around a map of named counters.
#[derive(Default)]
struct MutexCollector {
    counters: Mutex<HashMap<(&'static str, u32), u64>>,
    floats: Mutex<HashMap<(&'static str, u32), f64>>,
}

fn log2_bucket(nanos: u64) -> u32 {
    64 - nanos.leading_zeros()
}

impl MetricsRecorder for MutexCollector {
    fn record(&self, event: &MetricEvent) {
        let Ok(mut c) = self.counters.lock() else {
            return;
        };
        let mut add = |name: &'static str, label: u32, v: u64| {
            *c.entry((name, label)).or_insert(0) += v;
        };
        match *event {
            MetricEvent::Alloc {
                tier,
                bytes,
                latency,
                ..
            } => {
                let ns = latency.as_nanos() as u64;
                add("allocs", tier as u32, 1);
                add("alloc_bytes", tier as u32, bytes);
                add("alloc_latency_bucket", log2_bucket(ns), 1);
                add("alloc_latency_sum", 0, ns);
            }
            MetricEvent::Free { tier, bytes } => {
                add("frees", tier as u32, 1);
                add("free_bytes", tier as u32, bytes);
            }
            MetricEvent::Memory {
                tier,
                allocated,
                reserved,
            } => {
                c.insert(("allocated", tier as u32), allocated);
                c.insert(("reserved", tier as u32), reserved);
            }
            MetricEvent::CacheLookup { tier, hit } => {
                add(if hit { "hits" } else { "misses" }, tier as u32, 1);
            }
            MetricEvent::Compress {
                kind,
                input_bytes,
                output_bytes,
                rel_error,
            } => {
                add("compressions", kind as u32, 1);
                add("compress_in", kind as u32, input_bytes);
                add("compress_out", kind as u32, output_bytes);
                drop(c);
                if let Ok(mut f) = self.floats.lock() {
                    *f.entry(("compress_error", kind as u32)).or_insert(0.0) += rel_error;
                }
            }
            MetricEvent::Swap {
                out,
                bytes,
                latency,
            } => {
                let ns = latency.as_nanos() as u64;
                add("swap_ops", out as u32, 1);
                add("swap_bytes", out as u32, bytes);
                add("swap_latency_bucket", log2_bucket(ns), 1);
                add("swap_latency_sum", out as u32, ns);
            }
            MetricEvent::Migration { from, to, bytes } => {
                add("migrations", from as u32 * 3 + to as u32, 1);
                add("migration_bytes", from as u32 * 3 + to as u32, bytes);
            }
            MetricEvent::GcRun { freed, pause } => {
                add("gc_runs", 0, 1);
                add("gc_freed", 0, freed);
                add("gc_pause", 0, pause.as_nanos() as u64);
            }
            MetricEvent::Phase { phase, .. } => add("phase", u32::from(phase), 1),
            MetricEvent::Tokens { count, elapsed } => {
                add("tokens", 0, count);
                add("token_nanos", 0, elapsed.as_nanos() as u64);
            }
        }
    }
}

fn record_n(recorder: &dyn MetricsRecorder, events: &[MetricEvent; 8], n: usize) {
    for i in 0..n {
        recorder.record(black_box(&events[i % 8]));
    }
}

/// ns per event, one thread.
fn single_thread(recorder: &dyn MetricsRecorder, n: usize) -> f64 {
    let events = events();
    let start = Instant::now();
    record_n(black_box(recorder), &events, n);
    start.elapsed().as_nanos() as f64 / n as f64
}

/// ns per event per thread, `threads` threads recording at once: each
/// thread times its own N events after the barrier and the slowest counts
/// (timing from the spawning thread would miss work done before it is
/// scheduled again on a busy machine).
fn all_threads(recorder: Arc<dyn MetricsRecorder>, threads: usize, n: usize) -> f64 {
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let recorder = Arc::clone(&recorder);
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                let events = events();
                barrier.wait();
                let start = Instant::now();
                record_n(black_box(&*recorder), &events, n);
                start.elapsed()
            })
        })
        .collect();
    let slowest = handles
        .into_iter()
        // A recording thread cannot panic short of a bug; it then counts as instant.
        .map(|h| h.join().unwrap_or_default())
        .max()
        .unwrap_or_default();
    slowest.as_nanos() as f64 / n as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs the benchmark.
pub fn run(opts: &BenchOptions) -> Result<BenchReport> {
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .max(2);
    let (n, rounds) = if opts.quick {
        (400_000, 3)
    } else {
        (4_000_000, 7)
    };
    let noop: Arc<dyn MetricsRecorder> = Arc::new(NoopRecorder);
    let collector = Arc::new(Collector::new());
    let collector_dyn: Arc<dyn MetricsRecorder> = collector.clone();
    let naive: Arc<dyn MetricsRecorder> = Arc::new(MutexCollector::default());

    let mut single: [Vec<f64>; 3] = Default::default();
    let mut multi: [Vec<f64>; 3] = Default::default();
    // Warm-up: fault in the shards and the map.
    for r in [&noop, &collector_dyn, &naive] {
        single_thread(&**r, n / 10);
    }
    let mut collector_events = n / 10;
    for _ in 0..rounds {
        for (i, r) in [&noop, &collector_dyn, &naive].into_iter().enumerate() {
            single[i].push(single_thread(&**r, n));
            multi[i].push(all_threads(Arc::clone(r), threads, n));
        }
        collector_events += n + threads * n;
    }
    let single: Vec<f64> = single.into_iter().map(median).collect();
    let multi: Vec<f64> = multi.into_iter().map(median).collect();

    // The collector counted every event: 1 Tokens event per cycle of 8.
    let snapshot = collector.snapshot();
    let expected_tokens = (collector_events / 8) as u64;
    ensure!(
        snapshot.tokens.count == expected_tokens,
        "the collector counted {} tokens, expected {expected_tokens}",
        snapshot.tokens.count
    );
    let expected_lookups = (collector_events / 8 * 2) as u64;
    let lookups: u64 = snapshot.cache.iter().map(|c| c.hits + c.misses).sum();
    ensure!(
        lookups == expected_lookups,
        "the collector counted {lookups} lookups, expected {expected_lookups}"
    );

    let mut report = BenchReport::new("metrics");
    report.criteria.push(Criterion::lower_is_better(
        format!("ns/event/thread, {threads} threads recording: collector vs Mutex<HashMap>"),
        "ns/event",
        multi[1],
        multi[2],
        5.0,
    ));
    report.criteria.push(Criterion::lower_is_better(
        "ns/event, 1 thread: collector vs 50 ns budget (baseline is the budget)",
        "ns/event",
        single[1],
        50.0,
        1.0,
    ));
    report.criteria.push(Criterion::lower_is_better(
        "ns/event, 1 thread: collector vs Mutex<HashMap>",
        "ns/event",
        single[1],
        single[2],
        1.0,
    ));
    report.details = json!({
        "method": "each recorder called through &dyn MetricsRecorder on a cycle of 8 hot-path events \
                   (alloc, free, 2 cache lookups, swap, compress, migration, tokens); median of rounds; \
                   all-threads cost = wall time until the last thread finishes / events per thread",
        "events_per_thread": n,
        "rounds": rounds,
        "threads": threads,
        "single_thread_ns_per_event": {
            "noop": single[0], "collector": single[1], "mutex_hashmap": single[2],
            "collector_minus_noop": single[1] - single[0],
        },
        "all_threads_ns_per_event_per_thread": {
            "noop": multi[0], "collector": multi[1], "mutex_hashmap": multi[2],
            "collector_minus_noop": multi[1] - multi[0],
        },
        "all_threads_events_per_second": {
            "collector": threads as f64 * 1e9 / multi[1],
            "mutex_hashmap": threads as f64 * 1e9 / multi[2],
        },
        "collector_events_checked": collector_events,
    });
    Ok(report)
}
