//! Alerts for abnormal conditions: memory above its limit, a collapsing
//! cache hit rate, swap latency over budget. Judged on each dashboard tick
//! over a sliding window, shown on the page and logged with `tracing`.

use crate::config::AlertThresholds;
use crate::histogram::HistogramSnapshot;
use crate::snapshot::{human_bytes, Snapshot};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// What an alert is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// A tier holds more memory than its limit.
    Memory,
    /// The cache hit rate over the window fell below its minimum.
    HitRate,
    /// Swap operations over the window took longer than the budget.
    SwapLatency,
    /// A pipeline phase was switched off at run time for costing more than
    /// its overhead budget.
    PhaseDeactivated,
}

/// An active alert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    /// Stable id ("memory.gpu", "cache.hit_rate", "swap.latency").
    pub id: String,
    /// What it is about.
    pub kind: AlertKind,
    /// For people.
    pub message: String,
    /// The measured value (bytes, fraction, or seconds).
    pub value: f64,
    /// The threshold it crossed, in the same unit.
    pub threshold: f64,
    /// When it started, milliseconds since the Unix epoch.
    pub since_unix_ms: u64,
}

/// Judges snapshots against thresholds and remembers which alerts are active.
#[derive(Debug)]
pub struct AlertEngine {
    thresholds: AlertThresholds,
    window: VecDeque<(Instant, Snapshot)>,
    active: BTreeMap<String, Alert>,
}

impl AlertEngine {
    /// An engine with no history.
    pub fn new(thresholds: AlertThresholds) -> AlertEngine {
        AlertEngine {
            thresholds,
            window: VecDeque::new(),
            active: BTreeMap::new(),
        }
    }

    /// The alerts active after the last evaluation.
    pub fn active(&self) -> Vec<Alert> {
        self.active.values().cloned().collect()
    }

    /// Adds `snapshot` (taken at `now`) to the window, judges it and returns
    /// the active alerts. Alerts that start are logged as warnings, alerts
    /// that clear as info.
    pub fn evaluate(&mut self, snapshot: &Snapshot, now: Instant) -> Vec<Alert> {
        let window = Duration::from_secs(self.thresholds.window_seconds);
        // Keep the newest snapshot at least `window` old as the baseline.
        while self.window.len() >= 2 && now.saturating_duration_since(self.window[1].0) >= window {
            self.window.pop_front();
        }
        let mut firing: BTreeMap<String, Alert> = BTreeMap::new();
        let mut fire = |id: String, kind, message: String, value, threshold| {
            firing.insert(
                id.clone(),
                Alert {
                    id,
                    kind,
                    message,
                    value,
                    threshold,
                    since_unix_ms: snapshot.unix_ms,
                },
            );
        };

        for tier in &snapshot.tiers {
            if let Some(limit) = self.thresholds.memory_limits.get(&tier.tier) {
                if tier.reserved_bytes > limit.bytes() {
                    fire(
                        format!("memory.{}", tier.tier.name()),
                        AlertKind::Memory,
                        format!(
                            "{} memory {} is above its limit {}",
                            tier.tier,
                            human_bytes(tier.reserved_bytes as f64),
                            human_bytes(limit.bytes() as f64)
                        ),
                        tier.reserved_bytes as f64,
                        limit.bytes() as f64,
                    );
                }
            }
        }

        let base = self.window.front().map(|(_, s)| s);
        let hits = |s: &Snapshot| s.cache_hits_and_lookups().0;
        let lookups = |s: &Snapshot| s.cache_hits_and_lookups().1;
        let window_hits = hits(snapshot).saturating_sub(base.map_or(0, hits));
        let window_lookups = lookups(snapshot).saturating_sub(base.map_or(0, lookups));
        if window_lookups >= self.thresholds.min_lookups.max(1) {
            let rate = window_hits as f64 / window_lookups as f64;
            if rate < self.thresholds.min_hit_rate {
                fire(
                    "cache.hit_rate".to_string(),
                    AlertKind::HitRate,
                    format!(
                        "cache hit rate {:.1}% over the last {} lookups is below {:.1}%",
                        rate * 100.0,
                        window_lookups,
                        self.thresholds.min_hit_rate * 100.0
                    ),
                    rate,
                    self.thresholds.min_hit_rate,
                );
            }
        }

        let swap = |s: &Snapshot| merged(&s.swap_out.latency, &s.swap_in.latency);
        let window_swap = match base {
            Some(b) => swap(snapshot).since(&swap(b)),
            None => swap(snapshot),
        };
        if window_swap.count() >= self.thresholds.min_swap_operations.max(1) {
            let mean = window_swap.mean_seconds();
            let budget = self.thresholds.swap_latency_budget_ms * 1e-3;
            if mean > budget {
                fire(
                    "swap.latency".to_string(),
                    AlertKind::SwapLatency,
                    format!(
                        "mean swap latency {:.2} ms over the last {} operations is above the budget {:.2} ms",
                        mean * 1e3,
                        window_swap.count(),
                        budget * 1e3
                    ),
                    mean,
                    budget,
                );
            }
        }

        for phase in &snapshot.phases {
            if phase.state == qvl_core::PhaseState::Deactivated {
                let overhead = phase.overhead.unwrap_or(0.0);
                fire(
                    format!("phase.{}", phase.name),
                    AlertKind::PhaseDeactivated,
                    format!(
                        "phase {} {} was switched off at run time: its overhead ({:.1}% of step time on average) passed its {:.1}% budget; the original path runs",
                        phase.phase,
                        phase.name,
                        overhead * 100.0,
                        phase.budget * 100.0
                    ),
                    overhead,
                    phase.budget,
                );
            }
        }

        for (id, alert) in &firing {
            if !self.active.contains_key(id) {
                tracing::warn!(alert = %id, value = alert.value, threshold = alert.threshold, "{}", alert.message);
            }
        }
        for id in self.active.keys() {
            if !firing.contains_key(id) {
                tracing::info!(alert = %id, "alert cleared");
            }
        }
        // Keep the start time of alerts that go on.
        for (id, alert) in firing.iter_mut() {
            if let Some(old) = self.active.get(id) {
                alert.since_unix_ms = old.since_unix_ms;
            }
        }
        self.active = firing;
        self.window.push_back((now, snapshot.clone()));
        self.active()
    }
}

/// Sum of two histograms (used for both swap directions).
fn merged(a: &HistogramSnapshot, b: &HistogramSnapshot) -> HistogramSnapshot {
    let mut h = a.clone();
    for (dst, src) in h.buckets.iter_mut().zip(&b.buckets) {
        *dst += src;
    }
    h.sum_nanos = h.sum_nanos.saturating_add(b.sum_nanos);
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Collector;
    use qvl_core::{ByteSize, MetricEvent, MetricsRecorder, PhaseState, Tier};

    fn thresholds() -> AlertThresholds {
        let mut t = AlertThresholds {
            min_hit_rate: 0.5,
            min_lookups: 10,
            swap_latency_budget_ms: 5.0,
            min_swap_operations: 2,
            window_seconds: 10,
            ..AlertThresholds::default()
        };
        t.memory_limits.insert(Tier::Gpu, ByteSize(1000));
        t
    }

    #[test]
    fn raises_and_clears_each_alert() {
        let c = Collector::new();
        let t0 = c.started();
        let mut engine = AlertEngine::new(thresholds());
        // A good first window: all hits, fast swaps, memory under its limit.
        for _ in 0..20 {
            c.record(&MetricEvent::CacheLookup {
                tier: Tier::Gpu,
                hit: true,
            });
            c.record(&MetricEvent::Swap {
                out: true,
                bytes: 1,
                latency: Duration::from_millis(1),
            });
        }
        c.record(&MetricEvent::Memory {
            tier: Tier::Gpu,
            allocated: 900,
            reserved: 900,
        });
        let at = |s| t0 + Duration::from_secs(s);
        assert!(engine.evaluate(&c.snapshot_at(at(1)), at(1)).is_empty());

        // Then the hit rate collapses, swaps slow down, memory grows.
        for _ in 0..40 {
            c.record(&MetricEvent::CacheLookup {
                tier: Tier::Gpu,
                hit: false,
            });
            c.record(&MetricEvent::Swap {
                out: false,
                bytes: 1,
                latency: Duration::from_millis(100),
            });
        }
        c.record(&MetricEvent::Memory {
            tier: Tier::Gpu,
            allocated: 2000,
            reserved: 2000,
        });
        let alerts = engine.evaluate(&c.snapshot_at(at(12)), at(12));
        let ids: Vec<_> = alerts.iter().map(|a| a.id.as_str()).collect();
        assert_eq!(ids, ["cache.hit_rate", "memory.gpu", "swap.latency"]);
        // The window is the last 10 s: 40 misses of 40 lookups.
        assert_eq!(alerts[0].value, 0.0);
        assert_eq!(alerts[1].value, 2000.0);
        assert!((alerts[2].value - 0.1).abs() < 1e-9);

        // Recovery: memory back under, hits return, no slow swaps in window.
        c.record(&MetricEvent::Memory {
            tier: Tier::Gpu,
            allocated: 10,
            reserved: 10,
        });
        for _ in 0..100 {
            c.record(&MetricEvent::CacheLookup {
                tier: Tier::Gpu,
                hit: true,
            });
        }
        let alerts = engine.evaluate(&c.snapshot_at(at(30)), at(30));
        assert!(alerts.is_empty(), "{alerts:?}");
    }

    #[test]
    fn too_few_samples_raise_nothing() {
        let c = Collector::new();
        let mut engine = AlertEngine::new(thresholds());
        c.record(&MetricEvent::CacheLookup {
            tier: Tier::Gpu,
            hit: false,
        });
        assert!(engine.evaluate(&c.snapshot(), Instant::now()).is_empty());
    }

    #[test]
    fn a_deactivated_phase_is_shown_and_alerts() {
        let c = Collector::new();
        let mut engine = AlertEngine::new(thresholds());
        let phase = |phase: u8, state, overhead: f64| MetricEvent::Phase {
            phase,
            state,
            overhead,
            budget: 0.05,
        };
        c.record(&phase(1, PhaseState::On, f64::NAN));
        c.record(&phase(6, PhaseState::On, 0.01));
        let snapshot = c.snapshot();
        let states: Vec<_> = snapshot
            .phases
            .iter()
            .map(|p| (p.phase, p.name.as_str(), p.state, p.overhead))
            .collect();
        assert_eq!(
            states,
            [
                (1, "pool", PhaseState::On, None),
                (6, "gc", PhaseState::On, Some(0.01))
            ]
        );
        assert!(engine.evaluate(&snapshot, Instant::now()).is_empty());

        c.record(&phase(6, PhaseState::Deactivated, 0.2));
        let snapshot = c.snapshot();
        let alerts = engine.evaluate(&snapshot, Instant::now());
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].id, "phase.gc");
        assert_eq!(alerts[0].kind, AlertKind::PhaseDeactivated);
        assert!(alerts[0].message.contains("20.0%") && alerts[0].message.contains("5.0% budget"));
        let text = crate::prometheus::render(&snapshot);
        assert!(
            text.contains("qvl:phase_state{phase=\"gc\",state=\"deactivated\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("qvl:phase_state{phase=\"pool\",state=\"on\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("qvl:phase_overhead_ratio{phase=\"gc\"} 0.2"),
            "{text}"
        );
        // The dashboard's JSON round-trips.
        let json = serde_json::to_string(&snapshot).unwrap();
        let back: Snapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back.phases, snapshot.phases);
    }
}
