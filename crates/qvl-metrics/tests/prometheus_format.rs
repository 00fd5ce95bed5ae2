//! The `/metrics` text parses as Prometheus exposition format 0.0.4.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

use qvl_core::{MetricEvent, MetricsRecorder, TensorKind, Tier};
use qvl_metrics::{prometheus, Collector};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

#[derive(Debug)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

fn valid_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(is_name_start) && chars.all(is_name_char)
}

fn valid_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "NaN" => Ok(f64::NAN),
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        _ => s
            .parse::<f64>()
            .map_err(|e| format!("bad value {s:?}: {e}")),
    }
}

/// Parses one sample line: name, optional {labels}, value, optional timestamp.
fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(['{', ' '])
        .ok_or_else(|| format!("no value in {line:?}"))?;
    let name = &line[..name_end];
    if !valid_metric_name(name) {
        return Err(format!("bad metric name {name:?}"));
    }
    let bytes = line.as_bytes();
    let mut i = name_end;
    let mut labels = Vec::new();
    if bytes[i] == b'{' {
        i += 1;
        while bytes.get(i) != Some(&b'}') {
            let eq = line[i..].find('=').ok_or("label without =")? + i;
            let lname = &line[i..eq];
            if !valid_label_name(lname) {
                return Err(format!("bad label name {lname:?}"));
            }
            if bytes.get(eq + 1) != Some(&b'"') {
                return Err(format!("label value of {lname} not quoted"));
            }
            i = eq + 2;
            let mut value = String::new();
            loop {
                match bytes.get(i) {
                    None => return Err("unterminated label value".into()),
                    Some(b'\\') => {
                        match bytes.get(i + 1) {
                            Some(b'\\') => value.push('\\'),
                            Some(b'"') => value.push('"'),
                            Some(b'n') => value.push('\n'),
                            other => return Err(format!("bad escape {other:?}")),
                        }
                        i += 2;
                    }
                    Some(b'"') => break,
                    Some(_) => {
                        let c = line[i..].chars().next().ok_or("bad utf-8")?;
                        value.push(c);
                        i += c.len_utf8();
                    }
                }
            }
            labels.push((lname.to_string(), value));
            i += 1;
            match bytes.get(i) {
                Some(b',') => i += 1,
                Some(b'}') => {}
                other => return Err(format!("expected , or }} after a label, got {other:?}")),
            }
        }
        i += 1;
    }
    let rest = &line[i..];
    if !rest.starts_with(' ') {
        return Err(format!("no space before the value in {line:?}"));
    }
    let mut fields = rest.split(' ').filter(|s| !s.is_empty());
    let value = parse_value(fields.next().ok_or("no value")?)?;
    if let Some(ts) = fields.next() {
        ts.parse::<i64>()
            .map_err(|e| format!("bad timestamp {ts:?}: {e}"))?;
    }
    if fields.next().is_some() {
        return Err(format!("trailing text in {line:?}"));
    }
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Checks the whole text; returns the samples per family.
fn check_exposition(text: &str) -> BTreeMap<String, (String, Vec<Sample>)> {
    assert!(text.ends_with('\n'), "the text must end with a newline");
    let mut families: BTreeMap<String, (String, Vec<Sample>)> = BTreeMap::new();
    let mut helped = std::collections::HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let at = n + 1;
        if let Some(comment) = line.strip_prefix('#') {
            let parts: Vec<&str> = comment.trim_start().splitn(3, ' ').collect();
            match parts.first() {
                Some(&"HELP") => {
                    assert!(valid_metric_name(parts[1]), "line {at}: {line}");
                    assert!(
                        helped.insert(parts[1].to_string()),
                        "line {at}: second HELP"
                    );
                }
                Some(&"TYPE") => {
                    let kind = parts.get(2).copied().unwrap_or("");
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                        "line {at}: bad type in {line}"
                    );
                    assert!(
                        !families.contains_key(parts[1]),
                        "line {at}: TYPE after samples or twice"
                    );
                    families.insert(parts[1].to_string(), (kind.to_string(), Vec::new()));
                }
                _ => {}
            }
            continue;
        }
        if line.is_empty() {
            continue;
        }
        let sample = parse_sample(line).unwrap_or_else(|e| panic!("line {at}: {e}: {line}"));
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                let base = sample.name.strip_suffix(suffix)?;
                (families.get(base).map(|f| f.0.as_str()) == Some("histogram"))
                    .then(|| base.to_string())
            })
            .unwrap_or_else(|| sample.name.clone());
        let entry = families
            .get_mut(&family)
            .unwrap_or_else(|| panic!("line {at}: sample of {family} before its TYPE"));
        if entry.0 == "counter" {
            assert!(sample.value >= 0.0, "line {at}: negative counter");
        }
        entry.1.push(sample);
    }
    for (name, (kind, samples)) in &families {
        assert!(helped.contains(name), "{name} has no HELP");
        if kind == "histogram" {
            check_histogram(name, samples);
        }
    }
    families
}

fn check_histogram(name: &str, samples: &[Sample]) {
    // Group by the labels other than le.
    let mut groups: HashMap<Vec<(String, String)>, Vec<&Sample>> = HashMap::new();
    for s in samples {
        let key: Vec<_> = s
            .labels
            .iter()
            .filter(|(k, _)| k != "le")
            .cloned()
            .collect();
        groups.entry(key).or_default().push(s);
    }
    assert!(!groups.is_empty(), "{name}: no series");
    for (labels, series) in groups {
        let buckets: Vec<(f64, f64)> = series
            .iter()
            .filter(|s| s.name.ends_with("_bucket"))
            .map(|s| {
                let le = s
                    .labels
                    .iter()
                    .find(|(k, _)| k == "le")
                    .unwrap_or_else(|| panic!("{name}{labels:?}: bucket without le"));
                (parse_value(&le.1).unwrap(), s.value)
            })
            .collect();
        assert!(buckets.len() >= 2, "{name}{labels:?}: too few buckets");
        for pair in buckets.windows(2) {
            assert!(pair[0].0 < pair[1].0, "{name}{labels:?}: le not increasing");
            assert!(
                pair[0].1 <= pair[1].1,
                "{name}{labels:?}: buckets not cumulative"
            );
        }
        let last = buckets.last().unwrap();
        assert_eq!(last.0, f64::INFINITY, "{name}{labels:?}: no +Inf bucket");
        let count = series
            .iter()
            .find(|s| s.name == format!("{name}_count"))
            .unwrap_or_else(|| panic!("{name}{labels:?}: no _count"));
        assert_eq!(
            count.value, last.1,
            "{name}{labels:?}: _count != +Inf bucket"
        );
        assert!(
            series.iter().any(|s| s.name == format!("{name}_sum")),
            "{name}{labels:?}: no _sum"
        );
    }
}

fn busy_collector() -> Collector {
    let c = Collector::new();
    for i in 0..100u64 {
        c.record(&MetricEvent::Alloc {
            tier: Tier::HostRam,
            kind: TensorKind::Activation,
            bytes: 4096,
            latency: Duration::from_nanos(50 + i * 37),
        });
        c.record(&MetricEvent::CacheLookup {
            tier: if i % 3 == 0 { Tier::Gpu } else { Tier::HostRam },
            hit: i % 5 != 0,
        });
        c.record(&MetricEvent::Swap {
            out: i % 2 == 0,
            bytes: 65536,
            latency: Duration::from_micros(20 + i * 300),
        });
    }
    c.record(&MetricEvent::Memory {
        tier: Tier::Gpu,
        allocated: 1 << 30,
        reserved: 3 << 29,
    });
    c.record(&MetricEvent::Migration {
        from: Tier::Gpu,
        to: Tier::Ssd,
        bytes: 1 << 20,
    });
    c.record(&MetricEvent::GcRun {
        freed: 1 << 20,
        pause: Duration::from_micros(700),
    });
    c.record(&MetricEvent::Compress {
        kind: TensorKind::KvCache,
        input_bytes: 1 << 16,
        output_bytes: 1 << 14,
        rel_error: 0.012,
    });
    c.record(&MetricEvent::Tokens {
        count: 64,
        elapsed: Duration::from_secs(2),
    });
    c
}

#[test]
fn exposition_parses_and_histograms_are_complete() {
    let c = busy_collector();
    let text = prometheus::render(&c.snapshot());
    let families = check_exposition(&text);
    for required in [
        "qvl:memory_allocated_bytes",
        "qvl:memory_reserved_bytes",
        "qvl:memory_peak_allocated_bytes",
        "qvl:cache_hits_total",
        "qvl:cache_misses_total",
        "qvl:swap_latency_seconds",
        "qvl:allocation_latency_seconds",
        "qvl:migrations_total",
        "qvl:gc_runs_total",
        "qvl:generation_tokens_total",
        "qvl:compression_output_bytes_total",
    ] {
        assert!(families.contains_key(required), "missing {required}");
    }
    assert!(
        text.contains("qvl:memory_allocated_bytes{tier=\"gpu\"} 1073741824\n"),
        "{text}"
    );
    assert!(
        text.contains("qvl:cache_hits_total{level=\"l1\",tier=\"gpu\"} "),
        "{text}"
    );
    assert!(
        text.contains("qvl:swap_operations_total{direction=\"out\"} 50\n"),
        "{text}"
    );
    assert!(
        text.contains("qvl:swap_latency_seconds_count{direction=\"in\"} 50\n"),
        "{text}"
    );
    assert!(
        text.contains("qvl:allocation_latency_seconds_count 100\n"),
        "{text}"
    );
    assert!(
        text.contains("qvl:migrations_total{from=\"gpu\",to=\"ssd\"} 1\n"),
        "{text}"
    );
    // Counter families end in _total; units are base units.
    for (name, (kind, _)) in &families {
        assert!(name.starts_with("qvl:"), "{name}");
        if kind == "counter" {
            assert!(name.ends_with("_total"), "{name}");
        }
        assert!(!name.contains("_ms") && !name.contains("_kb"), "{name}");
    }
}

#[test]
fn empty_collector_exposition_parses() {
    let text = prometheus::render(&Collector::new().snapshot());
    check_exposition(&text);
}

#[test]
fn the_checker_rejects_broken_text() {
    assert!(parse_sample("qvl:x{tier=\"gpu\" 1").is_err());
    assert!(parse_sample("9bad 1").is_err());
    assert!(parse_sample("qvl:x one").is_err());
    assert!(parse_sample("qvl:x{le=unquoted} 1").is_err());
    let ok = parse_sample("qvl:x{a=\"1\",b=\"q\\\"\"} 2.5 1700000000000").unwrap();
    assert_eq!(ok.labels.len(), 2);
    assert_eq!(ok.labels[1].1, "q\"");
    let not_cumulative = "# HELP h x\n# TYPE h histogram\nh_bucket{le=\"1\"} 5\nh_bucket{le=\"+Inf\"} 3\nh_sum 1\nh_count 3\n";
    let result = std::panic::catch_unwind(|| check_exposition(not_cumulative));
    assert!(result.is_err(), "non-cumulative buckets passed");
}
