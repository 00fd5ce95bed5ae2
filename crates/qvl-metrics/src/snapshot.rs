//! What a [`Collector`](crate::Collector) holds at one moment, and the
//! performance report derived from it.

use crate::histogram::HistogramSnapshot;
use qvl_core::{PhaseState, TensorKind, Tier};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// Memory of one tier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TierSnapshot {
    /// The tier.
    pub tier: Tier,
    /// Bytes handed out now.
    pub allocated_bytes: u64,
    /// Bytes held from the system now (never below `allocated_bytes`).
    pub reserved_bytes: u64,
    /// Highest allocated bytes seen (exact at Memory events, sampled otherwise).
    pub peak_allocated_bytes: u64,
    /// Highest reserved bytes seen.
    pub peak_reserved_bytes: u64,
    /// Time-weighted mean of allocated bytes since the collector started.
    pub average_allocated_bytes: f64,
    /// Time-weighted mean of reserved bytes since the collector started.
    pub average_reserved_bytes: f64,
    /// Alloc events.
    pub allocations: u64,
    /// Bytes of all Alloc events.
    pub allocated_bytes_total: u64,
    /// Free events.
    pub frees: u64,
    /// Bytes of all Free events.
    pub freed_bytes_total: u64,
}

/// Lookups answered (or missed last) at one cache level.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheLevelSnapshot {
    /// The level, named by its tier.
    pub tier: Tier,
    /// Hits.
    pub hits: u64,
    /// Misses.
    pub misses: u64,
}

impl Snapshot {
    /// Cache hits at any level, and lookups. A lookup reports one
    /// `CacheLookup` per level it probed, fastest first, so the number of
    /// lookups is what the fastest level probed saw; summing every level
    /// would count a miss in L1 followed by a hit in L2 as two lookups.
    pub fn cache_hits_and_lookups(&self) -> (u64, u64) {
        let hits = self.cache.iter().map(|c| c.hits).sum();
        let lookups = self
            .cache
            .iter()
            .min_by_key(|c| c.tier)
            .map_or(0, |c| c.hits + c.misses);
        (hits, lookups)
    }
}

impl CacheLevelSnapshot {
    pub(crate) fn new(tier: Tier, hits: u64, misses: u64) -> Self {
        CacheLevelSnapshot { tier, hits, misses }
    }

    /// hits / (hits + misses), or None before the first lookup.
    pub fn hit_rate(&self) -> Option<f64> {
        ratio(self.hits, self.hits + self.misses)
    }
}

/// Encodes of one tensor kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompressionKindSnapshot {
    /// Role of the tensors.
    pub kind: TensorKind,
    /// Compress events.
    pub encodes: u64,
    /// Bytes in.
    pub input_bytes: u64,
    /// Bytes out.
    pub output_bytes: u64,
    /// Sum of the valid relative errors.
    pub relative_error_sum: f64,
    /// Largest relative error.
    pub relative_error_max: f64,
    /// Events whose error was negative or not a number (left out of the sums).
    pub invalid_errors: u64,
}

impl CompressionKindSnapshot {
    /// Mean relative error over the events with a valid error (0 when none).
    pub fn mean_relative_error(&self) -> f64 {
        let valid = self.encodes.saturating_sub(self.invalid_errors);
        if valid == 0 {
            0.0
        } else {
            self.relative_error_sum / valid as f64
        }
    }
}

/// Swap traffic in one direction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SwapDirectionSnapshot {
    /// Operations.
    pub operations: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// Latency of the operations.
    pub latency: HistogramSnapshot,
}

/// Migrations from one tier to another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationSnapshot {
    /// Where the objects were.
    pub from: Tier,
    /// Where they went.
    pub to: Tier,
    /// Migrations.
    pub count: u64,
    /// Bytes moved.
    pub bytes: u64,
}

/// Garbage-collector runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GcSnapshot {
    /// Runs.
    pub runs: u64,
    /// Bytes released.
    pub freed_bytes: u64,
    /// Longest pause.
    pub pause_max_seconds: f64,
    /// Pause times.
    pub pause: HistogramSnapshot,
}

/// A pipeline phase as the runtime last reported it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseSnapshot {
    /// 1 pool, 2 cache, 3 compression, 4 swapping, 5 tiering, 6 gc.
    pub phase: u8,
    /// "pool", "cache", ...
    pub name: String,
    /// On, off, failed to start, or switched off at run time.
    pub state: PhaseState,
    /// Mean measured overhead as a share of step time, when measured.
    pub overhead: Option<f64>,
    /// Its overhead budget, in the same unit.
    pub budget: f64,
}

/// Produced tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokensSnapshot {
    /// Tokens.
    pub count: u64,
    /// Time spent producing them (sum of the Tokens events' durations).
    pub elapsed_seconds: f64,
}

/// Everything a collector holds at one moment. Counters are totals since the
/// collector started; rates are left to the reader (two snapshots).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Wall-clock time of the snapshot, milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// Seconds since the collector started.
    pub uptime_seconds: f64,
    /// Memory per tier, fastest first.
    pub tiers: Vec<TierSnapshot>,
    /// Time allocations took.
    pub alloc_latency: HistogramSnapshot,
    /// Cache lookups per level.
    pub cache: Vec<CacheLevelSnapshot>,
    /// Encodes per tensor kind.
    pub compression: Vec<CompressionKindSnapshot>,
    /// Swap writes.
    pub swap_out: SwapDirectionSnapshot,
    /// Swap reads.
    pub swap_in: SwapDirectionSnapshot,
    /// Migrations per direction (only directions that happened).
    pub migrations: Vec<MigrationSnapshot>,
    /// Collector runs.
    pub gc: GcSnapshot,
    /// Produced tokens.
    pub tokens: TokensSnapshot,
    /// The runtime's pipeline phases that reported a state, in phase order.
    #[serde(default)]
    pub phases: Vec<PhaseSnapshot>,
}

impl Snapshot {
    /// Memory of `tier`.
    pub fn tier(&self, tier: Tier) -> Option<&TierSnapshot> {
        self.tiers.iter().find(|t| t.tier == tier)
    }

    /// Lookups at cache level `tier`.
    pub fn cache_level(&self, tier: Tier) -> Option<&CacheLevelSnapshot> {
        self.cache.iter().find(|c| c.tier == tier)
    }

    /// Encodes of `kind`.
    pub fn compression_kind(&self, kind: TensorKind) -> Option<&CompressionKindSnapshot> {
        self.compression.iter().find(|c| c.kind == kind)
    }

    /// The performance report of this snapshot.
    pub fn report(&self) -> PerformanceReport {
        PerformanceReport::from_snapshot(self)
    }
}

fn ratio(num: u64, den: u64) -> Option<f64> {
    (den > 0).then(|| num as f64 / den as f64)
}

/// Average and peak memory of a tier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryReport {
    /// The tier.
    pub tier: Tier,
    /// Time-weighted mean of allocated bytes.
    pub average_allocated_bytes: f64,
    /// Highest allocated bytes.
    pub peak_allocated_bytes: u64,
    /// Time-weighted mean of reserved bytes.
    pub average_reserved_bytes: f64,
    /// Highest reserved bytes.
    pub peak_reserved_bytes: u64,
}

/// The performance report of a run: average and peak memory, cache hit
/// rate, compression savings, swap operations, GC frequency and tokens/s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PerformanceReport {
    /// Seconds the run lasted (collector uptime).
    pub duration_seconds: f64,
    /// Memory per tier that saw any use.
    pub memory: Vec<MemoryReport>,
    /// Allocations over all tiers.
    pub allocations: u64,
    /// Mean allocation time in seconds.
    pub alloc_latency_mean_seconds: f64,
    /// 99th percentile allocation time (bucket upper bound) in seconds.
    pub alloc_latency_p99_seconds: f64,
    /// Hits over all lookups (each lookup is one event), None without lookups.
    pub cache_hit_rate: Option<f64>,
    /// Hit rate per level that saw lookups.
    pub cache_hit_rate_per_level: Vec<(Tier, f64)>,
    /// Bytes given to the codecs.
    pub compression_input_bytes: u64,
    /// Bytes they produced.
    pub compression_output_bytes: u64,
    /// 1 - output/input, None without encodes.
    pub compression_savings: Option<f64>,
    /// input/output, None without encodes.
    pub compression_ratio: Option<f64>,
    /// Mean relative error over all encodes with a valid error.
    pub compression_mean_relative_error: f64,
    /// Largest relative error.
    pub compression_max_relative_error: f64,
    /// Swap writes.
    pub swap_out_operations: u64,
    /// Swap reads.
    pub swap_in_operations: u64,
    /// Bytes written to swap.
    pub swap_out_bytes: u64,
    /// Bytes read from swap.
    pub swap_in_bytes: u64,
    /// Mean swap latency (both directions) in seconds.
    pub swap_latency_mean_seconds: f64,
    /// 99th percentile swap latency (bucket upper bound) in seconds.
    pub swap_latency_p99_seconds: f64,
    /// Migrations over all directions.
    pub migrations: u64,
    /// Bytes migrated.
    pub migration_bytes: u64,
    /// GC runs.
    pub gc_runs: u64,
    /// GC runs per minute of the run.
    pub gc_runs_per_minute: f64,
    /// Mean GC pause in seconds.
    pub gc_pause_mean_seconds: f64,
    /// Longest GC pause in seconds.
    pub gc_pause_max_seconds: f64,
    /// Bytes the GC released.
    pub gc_freed_bytes: u64,
    /// Tokens produced.
    pub tokens: u64,
    /// Tokens per second of generation time (sum of the Tokens events' durations).
    pub tokens_per_second: Option<f64>,
    /// Tokens per second of the whole run (wall clock).
    pub tokens_per_second_wall: Option<f64>,
}

impl PerformanceReport {
    /// Derives the report from a snapshot.
    pub fn from_snapshot(s: &Snapshot) -> PerformanceReport {
        let memory = s
            .tiers
            .iter()
            .filter(|t| t.peak_reserved_bytes > 0 || t.allocations > 0)
            .map(|t| MemoryReport {
                tier: t.tier,
                average_allocated_bytes: t.average_allocated_bytes,
                peak_allocated_bytes: t.peak_allocated_bytes,
                average_reserved_bytes: t.average_reserved_bytes,
                peak_reserved_bytes: t.peak_reserved_bytes,
            })
            .collect();
        let (hits, lookups) = s.cache_hits_and_lookups();
        let input: u64 = s.compression.iter().map(|c| c.input_bytes).sum();
        let output: u64 = s.compression.iter().map(|c| c.output_bytes).sum();
        let valid: u64 = s
            .compression
            .iter()
            .map(|c| c.encodes.saturating_sub(c.invalid_errors))
            .sum();
        let error_sum: f64 = s.compression.iter().map(|c| c.relative_error_sum).sum();
        let mut swap_latency = s.swap_out.latency.clone();
        for (dst, src) in swap_latency
            .buckets
            .iter_mut()
            .zip(&s.swap_in.latency.buckets)
        {
            *dst += src;
        }
        swap_latency.sum_nanos = swap_latency
            .sum_nanos
            .saturating_add(s.swap_in.latency.sum_nanos);
        let minutes = s.uptime_seconds / 60.0;
        PerformanceReport {
            duration_seconds: s.uptime_seconds,
            memory,
            allocations: s.tiers.iter().map(|t| t.allocations).sum(),
            alloc_latency_mean_seconds: s.alloc_latency.mean_seconds(),
            alloc_latency_p99_seconds: s.alloc_latency.quantile_upper_seconds(0.99),
            cache_hit_rate: ratio(hits, lookups),
            cache_hit_rate_per_level: s
                .cache
                .iter()
                .filter_map(|c| c.hit_rate().map(|r| (c.tier, r)))
                .collect(),
            compression_input_bytes: input,
            compression_output_bytes: output,
            // Negative when the codecs expanded the data.
            compression_savings: (input > 0).then(|| 1.0 - output as f64 / input as f64),
            compression_ratio: (output > 0).then(|| input as f64 / output as f64),
            compression_mean_relative_error: if valid == 0 {
                0.0
            } else {
                error_sum / valid as f64
            },
            compression_max_relative_error: s
                .compression
                .iter()
                .map(|c| c.relative_error_max)
                .fold(0.0, f64::max),
            swap_out_operations: s.swap_out.operations,
            swap_in_operations: s.swap_in.operations,
            swap_out_bytes: s.swap_out.bytes,
            swap_in_bytes: s.swap_in.bytes,
            swap_latency_mean_seconds: swap_latency.mean_seconds(),
            swap_latency_p99_seconds: swap_latency.quantile_upper_seconds(0.99),
            migrations: s.migrations.iter().map(|m| m.count).sum(),
            migration_bytes: s.migrations.iter().map(|m| m.bytes).sum(),
            gc_runs: s.gc.runs,
            gc_runs_per_minute: if minutes > 0.0 {
                s.gc.runs as f64 / minutes
            } else {
                0.0
            },
            gc_pause_mean_seconds: s.gc.pause.mean_seconds(),
            gc_pause_max_seconds: s.gc.pause_max_seconds,
            gc_freed_bytes: s.gc.freed_bytes,
            tokens: s.tokens.count,
            tokens_per_second: (s.tokens.elapsed_seconds > 0.0)
                .then(|| s.tokens.count as f64 / s.tokens.elapsed_seconds),
            tokens_per_second_wall: (s.uptime_seconds > 0.0 && s.tokens.count > 0)
                .then(|| s.tokens.count as f64 / s.uptime_seconds),
        }
    }

    /// The report as pretty JSON.
    pub fn to_json(&self) -> String {
        // Serializing plain numbers, strings and enums cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// The report as a two-column text table.
    pub fn table(&self) -> String {
        let mut rows: Vec<(String, String)> = Vec::new();
        let mut row = |k: &str, v: String| rows.push((k.to_string(), v));
        row("duration", format!("{:.1} s", self.duration_seconds));
        for m in &self.memory {
            row(
                &format!("memory {} allocated avg / peak", m.tier),
                format!(
                    "{} / {}",
                    human_bytes(m.average_allocated_bytes),
                    human_bytes(m.peak_allocated_bytes as f64)
                ),
            );
            row(
                &format!("memory {} reserved avg / peak", m.tier),
                format!(
                    "{} / {}",
                    human_bytes(m.average_reserved_bytes),
                    human_bytes(m.peak_reserved_bytes as f64)
                ),
            );
        }
        row(
            "allocations (mean / p99 time)",
            format!(
                "{} ({} / <= {})",
                self.allocations,
                human_seconds(self.alloc_latency_mean_seconds),
                human_seconds(self.alloc_latency_p99_seconds)
            ),
        );
        row("cache hit rate", percent(self.cache_hit_rate));
        for (tier, rate) in &self.cache_hit_rate_per_level {
            row(&format!("cache hit rate {tier}"), percent(Some(*rate)));
        }
        row(
            "compression in -> out",
            format!(
                "{} -> {}",
                human_bytes(self.compression_input_bytes as f64),
                human_bytes(self.compression_output_bytes as f64)
            ),
        );
        row(
            "compression savings (ratio)",
            match (self.compression_savings, self.compression_ratio) {
                (Some(s), Some(r)) => format!("{} ({r:.2}x)", percent(Some(s))),
                (Some(s), None) => percent(Some(s)),
                _ => "-".to_string(),
            },
        );
        row(
            "compression rel. error mean / max",
            format!(
                "{:.4} / {:.4}",
                self.compression_mean_relative_error, self.compression_max_relative_error
            ),
        );
        row(
            "swap out / in operations",
            format!("{} / {}", self.swap_out_operations, self.swap_in_operations),
        );
        row(
            "swap out / in bytes",
            format!(
                "{} / {}",
                human_bytes(self.swap_out_bytes as f64),
                human_bytes(self.swap_in_bytes as f64)
            ),
        );
        row(
            "swap latency mean / p99",
            format!(
                "{} / <= {}",
                human_seconds(self.swap_latency_mean_seconds),
                human_seconds(self.swap_latency_p99_seconds)
            ),
        );
        row(
            "migrations",
            format!(
                "{} ({})",
                self.migrations,
                human_bytes(self.migration_bytes as f64)
            ),
        );
        row(
            "gc runs (per minute)",
            format!("{} ({:.2}/min)", self.gc_runs, self.gc_runs_per_minute),
        );
        row(
            "gc pause mean / max",
            format!(
                "{} / {}",
                human_seconds(self.gc_pause_mean_seconds),
                human_seconds(self.gc_pause_max_seconds)
            ),
        );
        row("gc freed", human_bytes(self.gc_freed_bytes as f64));
        row("tokens", self.tokens.to_string());
        row(
            "tokens/s (generation / wall)",
            format!(
                "{} / {}",
                self.tokens_per_second
                    .map_or("-".to_string(), |r| format!("{r:.2}")),
                self.tokens_per_second_wall
                    .map_or("-".to_string(), |r| format!("{r:.2}"))
            ),
        );
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut out = String::from("== qvl performance report\n");
        for (k, v) in rows {
            let _ = writeln!(out, "{k:<width$}  {v}");
        }
        out
    }
}

fn percent(r: Option<f64>) -> String {
    r.map_or("-".to_string(), |r| format!("{:.1}%", r * 100.0))
}

/// Bytes with a binary unit ("1.50 GiB").
pub fn human_bytes(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes;
    let mut unit = 0;
    while v.abs() >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.2} {}", UNITS[unit])
    }
}

/// Seconds with a fitting unit ("12.0 us").
pub fn human_seconds(s: f64) -> String {
    if s == 0.0 {
        "0".to_string()
    } else if s < 1e-6 {
        format!("{:.0} ns", s * 1e9)
    } else if s < 1e-3 {
        format!("{:.1} us", s * 1e6)
    } else if s < 1.0 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

#[cfg(test)]
mod tests {
    use crate::Collector;
    use qvl_core::{MetricEvent, MetricsRecorder, TensorKind, Tier};
    use std::time::Duration;

    #[test]
    fn report_math_on_known_inputs() {
        let c = Collector::new();
        let t0 = c.started();
        // Four lookups: two hit L1; of the two that reach L2, one hits.
        for hit in [true, true, false, false] {
            c.record(&MetricEvent::CacheLookup {
                tier: Tier::Gpu,
                hit,
            });
        }
        for hit in [true, false] {
            c.record(&MetricEvent::CacheLookup {
                tier: Tier::HostRam,
                hit,
            });
        }
        c.record(&MetricEvent::Compress {
            kind: TensorKind::KvCache,
            input_bytes: 1000,
            output_bytes: 250,
            rel_error: 0.01,
        });
        c.record(&MetricEvent::Compress {
            kind: TensorKind::Weight,
            input_bytes: 1000,
            output_bytes: 750,
            rel_error: 0.03,
        });
        for ms in [1, 3] {
            c.record(&MetricEvent::Swap {
                out: true,
                bytes: 100,
                latency: Duration::from_millis(ms),
            });
        }
        c.record(&MetricEvent::Swap {
            out: false,
            bytes: 50,
            latency: Duration::from_millis(2),
        });
        for p in [10, 30] {
            c.record(&MetricEvent::GcRun {
                freed: 500,
                pause: Duration::from_millis(p),
            });
        }
        c.record(&MetricEvent::Tokens {
            count: 30,
            elapsed: Duration::from_secs(2),
        });
        c.record(&MetricEvent::Migration {
            from: Tier::Gpu,
            to: Tier::HostRam,
            bytes: 4096,
        });
        let r = c.snapshot_at(t0 + Duration::from_secs(60)).report();
        assert_eq!(r.cache_hit_rate, Some(0.75));
        assert_eq!(
            r.cache_hit_rate_per_level,
            vec![(Tier::Gpu, 0.5), (Tier::HostRam, 0.5)]
        );
        assert_eq!(r.compression_savings, Some(0.5));
        assert_eq!(r.compression_ratio, Some(2.0));
        assert!((r.compression_mean_relative_error - 0.02).abs() < 1e-12);
        assert_eq!(r.compression_max_relative_error, 0.03);
        assert_eq!((r.swap_out_operations, r.swap_in_operations), (2, 1));
        assert_eq!((r.swap_out_bytes, r.swap_in_bytes), (200, 50));
        assert!((r.swap_latency_mean_seconds - 0.002).abs() < 1e-12);
        assert_eq!(r.gc_runs, 2);
        assert!((r.gc_runs_per_minute - 2.0).abs() < 1e-9);
        assert!((r.gc_pause_mean_seconds - 0.02).abs() < 1e-12);
        assert!((r.gc_pause_max_seconds - 0.03).abs() < 1e-12);
        assert_eq!(r.gc_freed_bytes, 1000);
        assert_eq!(r.tokens_per_second, Some(15.0));
        assert_eq!(r.tokens_per_second_wall, Some(0.5));
        assert_eq!((r.migrations, r.migration_bytes), (1, 4096));

        let table = r.table();
        assert!(table.contains("cache hit rate gpu"), "{table}");
        assert!(table.contains("75.0%"), "{table}");
        assert!(table.contains("50.0% (2.00x)"), "{table}");
        let back: super::PerformanceReport = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn a_lookup_probing_two_levels_counts_once() {
        let c = Collector::new();
        // Lookup 1: L1 miss, L2 hit. Lookup 2: L1 hit. Lookup 3: misses both.
        for (tier, hit) in [
            (Tier::Gpu, false),
            (Tier::HostRam, true),
            (Tier::Gpu, true),
            (Tier::Gpu, false),
            (Tier::HostRam, false),
        ] {
            c.record(&MetricEvent::CacheLookup { tier, hit });
        }
        let snapshot = c.snapshot();
        assert_eq!(snapshot.cache_hits_and_lookups(), (2, 3));
        let report = snapshot.report();
        assert_eq!(report.cache_hit_rate, Some(2.0 / 3.0));
        let per_level: Vec<(Tier, f64)> = report.cache_hit_rate_per_level.clone();
        assert_eq!(
            per_level,
            vec![(Tier::Gpu, 1.0 / 3.0), (Tier::HostRam, 0.5)]
        );
    }

    #[test]
    fn empty_report_has_no_rates() {
        let r = Collector::new().snapshot().report();
        assert_eq!(r.cache_hit_rate, None);
        assert_eq!(r.compression_savings, None);
        assert_eq!(r.tokens_per_second, None);
        assert!(r.memory.is_empty());
        assert!(r.table().contains("cache hit rate"));
    }

    #[test]
    fn human_units() {
        assert_eq!(super::human_bytes(512.0), "512 B");
        assert_eq!(super::human_bytes(1536.0 * 1024.0 * 1024.0), "1.50 GiB");
        assert_eq!(super::human_seconds(12e-6), "12.0 us");
    }
}
