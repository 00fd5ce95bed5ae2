//! [`GcConfig`]: when and how hard the collector works.

use crate::{GcError, Result};
use serde::{de, Deserialize, Deserializer};
use std::time::Duration;

/// Settings of the collector, as read from the `[gc]` table of a config.
///
/// Durations accept a number of milliseconds (`250`) or a string with a
/// unit (`"250ms"`, `"2s"`, `"500us"`, `"1m"`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GcConfig {
    /// Collect at all. Off: the registry still tracks, nothing is released.
    pub enabled: bool,
    /// Time between collections; with `adaptive_enabled` only the start value.
    #[serde(deserialize_with = "duration")]
    pub collection_interval: Duration,
    /// Let the interval follow memory pressure and allocation rate, and
    /// collect when an allocator is about to grow past the target.
    pub adaptive_enabled: bool,
    /// Shortest adaptive interval.
    #[serde(deserialize_with = "duration")]
    pub min_interval: Duration,
    /// Longest adaptive interval (a calm system is still swept this often).
    #[serde(deserialize_with = "duration")]
    pub max_interval: Duration,
    /// Target: reserved memory at most `1 + target_slack` times the highest
    /// live memory seen. 0.03 keeps peak reserved within 3% of peak live.
    pub target_slack: f64,
    /// Optional memory budget in bytes: reserved above `pressure_high` of it
    /// is high pressure (collect at the shortest interval).
    pub memory_budget: Option<u64>,
    /// Share of `memory_budget` that counts as high pressure.
    pub pressure_high: f64,
    /// A cached size that a site is predicted to allocate again within this
    /// horizon is kept by idle collections.
    #[serde(deserialize_with = "duration")]
    pub prediction_horizon: Duration,
    /// Tensors smaller than this are counted but not tracked one by one, so
    /// that the decode step's many small tensors cost one atomic add.
    pub min_tracked_bytes: usize,
    /// Weight of the newest sample in the per-site moving averages (0..=1).
    pub ewma_alpha: f64,
}

impl Default for GcConfig {
    fn default() -> Self {
        GcConfig {
            enabled: true,
            collection_interval: Duration::from_millis(100),
            adaptive_enabled: true,
            min_interval: Duration::from_millis(1),
            max_interval: Duration::from_secs(1),
            target_slack: 0.03,
            memory_budget: None,
            pressure_high: 0.9,
            prediction_horizon: Duration::from_millis(50),
            min_tracked_bytes: 64 * 1024,
            ewma_alpha: 0.2,
        }
    }
}

impl GcConfig {
    /// Checks every range; call after deserializing.
    pub fn validate(&self) -> Result<()> {
        let bad = |field, value: String, reason| GcError::InvalidConfig {
            field,
            value,
            reason,
        };
        if self.collection_interval.is_zero() {
            return Err(bad(
                "collection_interval",
                format!("{:?}", self.collection_interval),
                "must be above zero",
            ));
        }
        if self.min_interval.is_zero() {
            return Err(bad(
                "min_interval",
                format!("{:?}", self.min_interval),
                "must be above zero",
            ));
        }
        if self.min_interval > self.max_interval {
            return Err(GcError::IntervalBounds {
                min: self.min_interval,
                max: self.max_interval,
            });
        }
        if !(0.0..=10.0).contains(&self.target_slack) {
            return Err(bad(
                "target_slack",
                self.target_slack.to_string(),
                "must be within 0..=10",
            ));
        }
        if !(self.pressure_high > 0.0 && self.pressure_high <= 1.0) {
            return Err(bad(
                "pressure_high",
                self.pressure_high.to_string(),
                "must be within (0, 1]",
            ));
        }
        if !(self.ewma_alpha > 0.0 && self.ewma_alpha <= 1.0) {
            return Err(bad(
                "ewma_alpha",
                self.ewma_alpha.to_string(),
                "must be within (0, 1]",
            ));
        }
        if self.memory_budget == Some(0) {
            return Err(bad("memory_budget", "0".into(), "must be above zero"));
        }
        Ok(())
    }
}

/// Parses "250ms", "2s", "500us", "1.5m" or a bare number of milliseconds.
pub fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. 250ms, 2s)"))?;
    let secs = match unit.trim() {
        "" | "ms" => value / 1e3,
        "us" | "µs" => value / 1e6,
        "ns" => value / 1e9,
        "s" => value,
        "m" | "min" => value * 60.0,
        other => return Err(format!("unknown duration unit {other:?} in {text:?}")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{text:?} is not a duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Duration, D::Error> {
    struct Visitor;
    impl de::Visitor<'_> for Visitor {
        type Value = Duration;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("milliseconds or a string like \"250ms\" or \"2s\"")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<Duration, E> {
            Ok(Duration::from_millis(v))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<Duration, E> {
            u64::try_from(v)
                .map(Duration::from_millis)
                .map_err(|_| E::custom(format!("negative duration {v}")))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> std::result::Result<Duration, E> {
            if v.is_finite() && v >= 0.0 {
                Ok(Duration::from_secs_f64(v / 1e3))
            } else {
                Err(E::custom(format!("invalid duration {v}")))
            }
        }
        fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Duration, E> {
            parse_duration(v).map_err(E::custom)
        }
    }
    d.deserialize_any(Visitor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_and_without_units() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("500us").unwrap(), Duration::from_micros(500));
        assert_eq!(parse_duration("40").unwrap(), Duration::from_millis(40));
        assert!(parse_duration("3 parsecs").unwrap_err().contains("unit"));
        assert!(parse_duration("fast").is_err());
    }

    #[test]
    fn config_reads_from_toml_and_json() {
        let c: GcConfig = toml::from_str(
            "enabled = true\ncollection_interval = \"20ms\"\nadaptive_enabled = false\ntarget_slack = 0.05",
        )
        .unwrap();
        assert_eq!(c.collection_interval, Duration::from_millis(20));
        assert!(!c.adaptive_enabled);
        assert_eq!(c.target_slack, 0.05);
        c.validate().unwrap();
        let c: GcConfig = serde_json::from_str(r#"{"collection_interval": 75}"#).unwrap();
        assert_eq!(c.collection_interval, Duration::from_millis(75));
        assert!(c.enabled && c.adaptive_enabled);
    }

    #[test]
    fn bad_values_are_named() {
        let err = toml::from_str::<GcConfig>("collection_interval = \"soon\"").unwrap_err();
        assert!(err.to_string().contains("soon"), "{err}");
        let err = toml::from_str::<GcConfig>("colection_interval = 5").unwrap_err();
        assert!(err.to_string().contains("colection_interval"), "{err}");
        let c = GcConfig {
            target_slack: -1.0,
            ..GcConfig::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("target_slack"));
        let c = GcConfig {
            min_interval: Duration::from_secs(5),
            ..GcConfig::default()
        };
        assert!(matches!(c.validate(), Err(GcError::IntervalBounds { .. })));
    }
}
