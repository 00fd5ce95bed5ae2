//! Prometheus text exposition format, version 0.0.4.
//!
//! Names follow the style of vLLM (`vllm:...`), SGLang and LMCache: a `qvl:`
//! namespace, base units in the name (`_bytes`, `_seconds`), counters ending
//! in `_total`, labels for tier, cache level, direction and tensor kind.

use crate::histogram::{bucket_upper_nanos, HistogramSnapshot, BUCKETS};
use crate::snapshot::Snapshot;
use qvl_core::Tier;
use std::fmt::Write as _;

/// The Content-Type of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Cache level label of a tier: the fastest tier is level 1.
pub fn cache_level_label(tier: Tier) -> &'static str {
    match tier {
        Tier::Gpu => "l1",
        Tier::HostRam => "l2",
        Tier::Ssd => "l3",
    }
}

struct Exposition {
    out: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", format_value(value));
    }

    /// Buckets every other power of two from 2^`lo` ns to 2^`hi` ns, then +Inf.
    fn histogram(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        h: &HistogramSnapshot,
        lo: usize,
        hi: usize,
    ) {
        let bucket_name = format!("{name}_bucket");
        let mut cumulative = 0u64;
        let mut next = 0usize;
        for i in (lo..=hi.min(BUCKETS - 1)).step_by(2) {
            while next <= i {
                cumulative += h.buckets.get(next).copied().unwrap_or(0);
                next += 1;
            }
            let le = format_value(bucket_upper_nanos(i) as f64 / 1e9);
            let mut with_le = labels.to_vec();
            with_le.push(("le", &le));
            self.sample(&bucket_name, &with_le, cumulative as f64);
        }
        let count = h.count();
        let mut with_le = labels.to_vec();
        with_le.push(("le", "+Inf"));
        self.sample(&bucket_name, &with_le, count as f64);
        self.sample(&format!("{name}_sum"), labels, h.sum_nanos as f64 / 1e9);
        self.sample(&format!("{name}_count"), labels, count as f64);
    }
}

fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_string()
    } else if v == f64::INFINITY {
        "+Inf".to_string()
    } else if v == f64::NEG_INFINITY {
        "-Inf".to_string()
    } else {
        format!("{v}")
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Renders a snapshot in the text exposition format.
pub fn render(s: &Snapshot) -> String {
    let mut e = Exposition {
        out: String::with_capacity(16 * 1024),
    };

    e.family(
        "qvl:uptime_seconds",
        "gauge",
        "Seconds since the collector started.",
    );
    e.sample("qvl:uptime_seconds", &[], s.uptime_seconds);

    type TierField = fn(&crate::TierSnapshot) -> f64;
    let tier_gauges: [(&str, &str, TierField); 6] = [
        (
            "qvl:memory_allocated_bytes",
            "Bytes handed out, per tier.",
            |t| t.allocated_bytes as f64,
        ),
        (
            "qvl:memory_reserved_bytes",
            "Bytes held from the system, per tier.",
            |t| t.reserved_bytes as f64,
        ),
        (
            "qvl:memory_peak_allocated_bytes",
            "Highest bytes handed out, per tier.",
            |t| t.peak_allocated_bytes as f64,
        ),
        (
            "qvl:memory_peak_reserved_bytes",
            "Highest bytes held from the system, per tier.",
            |t| t.peak_reserved_bytes as f64,
        ),
        (
            "qvl:memory_average_allocated_bytes",
            "Time-weighted mean of bytes handed out since start, per tier.",
            |t| t.average_allocated_bytes,
        ),
        (
            "qvl:memory_average_reserved_bytes",
            "Time-weighted mean of bytes held since start, per tier.",
            |t| t.average_reserved_bytes,
        ),
    ];
    for (name, help, field) in tier_gauges {
        e.family(name, "gauge", help);
        for t in &s.tiers {
            e.sample(name, &[("tier", t.tier.name())], field(t));
        }
    }
    let tier_counters: [(&str, &str, TierField); 4] = [
        (
            "qvl:allocations_total",
            "Buffers allocated, per tier.",
            |t| t.allocations as f64,
        ),
        (
            "qvl:allocated_bytes_total",
            "Bytes allocated, per tier.",
            |t| t.allocated_bytes_total as f64,
        ),
        ("qvl:frees_total", "Buffers returned, per tier.", |t| {
            t.frees as f64
        }),
        ("qvl:freed_bytes_total", "Bytes returned, per tier.", |t| {
            t.freed_bytes_total as f64
        }),
    ];
    for (name, help, field) in tier_counters {
        e.family(name, "counter", help);
        for t in &s.tiers {
            e.sample(name, &[("tier", t.tier.name())], field(t));
        }
    }
    e.family(
        "qvl:allocation_latency_seconds",
        "histogram",
        "Time an allocation took.",
    );
    e.histogram(
        "qvl:allocation_latency_seconds",
        &[],
        &s.alloc_latency,
        4,
        34,
    );

    e.family(
        "qvl:cache_hits_total",
        "counter",
        "Cache lookups that hit, per level.",
    );
    for c in &s.cache {
        let labels = [
            ("level", cache_level_label(c.tier)),
            ("tier", c.tier.name()),
        ];
        e.sample("qvl:cache_hits_total", &labels, c.hits as f64);
    }
    e.family(
        "qvl:cache_misses_total",
        "counter",
        "Cache lookups that missed (at the last level asked), per level.",
    );
    for c in &s.cache {
        let labels = [
            ("level", cache_level_label(c.tier)),
            ("tier", c.tier.name()),
        ];
        e.sample("qvl:cache_misses_total", &labels, c.misses as f64);
    }
    e.family(
        "qvl:cache_hit_rate",
        "gauge",
        "Hits over lookups since start, per level that saw lookups.",
    );
    for c in &s.cache {
        if let Some(rate) = c.hit_rate() {
            let labels = [
                ("level", cache_level_label(c.tier)),
                ("tier", c.tier.name()),
            ];
            e.sample("qvl:cache_hit_rate", &labels, rate);
        }
    }

    type KindField = fn(&crate::CompressionKindSnapshot) -> f64;
    let kind_series: [(&str, &str, &str, KindField); 5] = [
        (
            "qvl:compressions_total",
            "counter",
            "Tensors encoded, per kind.",
            |c| c.encodes as f64,
        ),
        (
            "qvl:compression_input_bytes_total",
            "counter",
            "Bytes given to the codecs, per kind.",
            |c| c.input_bytes as f64,
        ),
        (
            "qvl:compression_output_bytes_total",
            "counter",
            "Bytes the codecs produced, per kind.",
            |c| c.output_bytes as f64,
        ),
        (
            "qvl:compression_relative_error_mean",
            "gauge",
            "Mean relative Frobenius error of the encodes, per kind.",
            |c| c.mean_relative_error(),
        ),
        (
            "qvl:compression_relative_error_max",
            "gauge",
            "Largest relative Frobenius error of the encodes, per kind.",
            |c| c.relative_error_max,
        ),
    ];
    for (name, kind, help, field) in kind_series {
        e.family(name, kind, help);
        for c in &s.compression {
            e.sample(name, &[("kind", c.kind.name())], field(c));
        }
    }

    let directions = [("out", &s.swap_out), ("in", &s.swap_in)];
    e.family(
        "qvl:swap_operations_total",
        "counter",
        "Swap operations, per direction.",
    );
    for (d, sw) in directions {
        e.sample(
            "qvl:swap_operations_total",
            &[("direction", d)],
            sw.operations as f64,
        );
    }
    e.family(
        "qvl:swap_bytes_total",
        "counter",
        "Bytes moved to or from swap, per direction.",
    );
    for (d, sw) in directions {
        e.sample("qvl:swap_bytes_total", &[("direction", d)], sw.bytes as f64);
    }
    e.family(
        "qvl:swap_latency_seconds",
        "histogram",
        "Time a swap operation took, per direction.",
    );
    for (d, sw) in directions {
        e.histogram(
            "qvl:swap_latency_seconds",
            &[("direction", d)],
            &sw.latency,
            10,
            36,
        );
    }

    e.family(
        "qvl:migrations_total",
        "counter",
        "Objects moved between tiers.",
    );
    for m in &s.migrations {
        let labels = [("from", m.from.name()), ("to", m.to.name())];
        e.sample("qvl:migrations_total", &labels, m.count as f64);
    }
    e.family(
        "qvl:migration_bytes_total",
        "counter",
        "Bytes moved between tiers.",
    );
    for m in &s.migrations {
        let labels = [("from", m.from.name()), ("to", m.to.name())];
        e.sample("qvl:migration_bytes_total", &labels, m.bytes as f64);
    }

    if !s.phases.is_empty() {
        e.family(
            "qvl:phase_state",
            "gauge",
            "State of each pipeline phase: 1 for the state it is in.",
        );
        for p in &s.phases {
            for state in ["on", "off", "failed", "deactivated"] {
                let value = if p.state.as_str() == state { 1.0 } else { 0.0 };
                e.sample(
                    "qvl:phase_state",
                    &[("phase", p.name.as_str()), ("state", state)],
                    value,
                );
            }
        }
        e.family(
            "qvl:phase_overhead_ratio",
            "gauge",
            "Mean measured overhead of each pipeline phase, as a share of step time.",
        );
        for p in &s.phases {
            if let Some(o) = p.overhead {
                e.sample("qvl:phase_overhead_ratio", &[("phase", p.name.as_str())], o);
            }
        }
    }

    e.family("qvl:gc_runs_total", "counter", "Garbage-collector runs.");
    e.sample("qvl:gc_runs_total", &[], s.gc.runs as f64);
    e.family(
        "qvl:gc_freed_bytes_total",
        "counter",
        "Bytes the garbage collector released.",
    );
    e.sample("qvl:gc_freed_bytes_total", &[], s.gc.freed_bytes as f64);
    e.family(
        "qvl:gc_pause_seconds",
        "histogram",
        "Pause of a garbage-collector run.",
    );
    e.histogram("qvl:gc_pause_seconds", &[], &s.gc.pause, 10, 36);
    e.family(
        "qvl:gc_pause_max_seconds",
        "gauge",
        "Longest garbage-collector pause.",
    );
    e.sample("qvl:gc_pause_max_seconds", &[], s.gc.pause_max_seconds);

    e.family("qvl:generation_tokens_total", "counter", "Tokens produced.");
    e.sample("qvl:generation_tokens_total", &[], s.tokens.count as f64);
    e.family(
        "qvl:generation_seconds_total",
        "counter",
        "Seconds spent producing tokens.",
    );
    e.sample(
        "qvl:generation_seconds_total",
        &[],
        s.tokens.elapsed_seconds,
    );
    e.out
}
