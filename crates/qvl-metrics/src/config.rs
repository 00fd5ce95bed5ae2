//! Configuration of the collector, the dashboard and its alerts.

use crate::MetricsError;
use qvl_core::{ByteSize, Tier};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

/// The `[metrics]` section: collector and dashboard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// How often the memory gauges are sampled for time-weighted averages.
    pub sample_interval_ms: u64,
    /// The web dashboard.
    pub dashboard: DashboardConfig,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            sample_interval_ms: 100,
            dashboard: DashboardConfig::default(),
        }
    }
}

impl MetricsConfig {
    /// The sampling interval.
    pub fn sample_interval(&self) -> Duration {
        Duration::from_millis(self.sample_interval_ms)
    }

    /// Checks every value's range.
    pub fn validate(&self) -> Result<(), MetricsError> {
        if !(1..=60_000).contains(&self.sample_interval_ms) {
            return Err(MetricsError::InvalidConfig {
                field: "metrics.sample_interval_ms",
                value: self.sample_interval_ms.to_string(),
                reason: "must be between 1 and 60000 milliseconds",
            });
        }
        self.dashboard.validate()
    }
}

/// The `[metrics.dashboard]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct DashboardConfig {
    /// Address to listen on; loopback unless you mean to expose it.
    pub bind: IpAddr,
    /// Port (0 picks a free one).
    pub port: u16,
    /// How often a snapshot is pushed to the page.
    pub update_interval_ms: u64,
    /// When to raise alerts.
    pub alerts: AlertThresholds,
}

impl Default for DashboardConfig {
    fn default() -> Self {
        DashboardConfig {
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 9464,
            update_interval_ms: 1000,
            alerts: AlertThresholds::default(),
        }
    }
}

impl DashboardConfig {
    /// `bind:port`.
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.bind, self.port)
    }

    /// The update interval.
    pub fn update_interval(&self) -> Duration {
        Duration::from_millis(self.update_interval_ms)
    }

    /// Checks every value's range.
    pub fn validate(&self) -> Result<(), MetricsError> {
        if !(50..=60_000).contains(&self.update_interval_ms) {
            return Err(MetricsError::InvalidConfig {
                field: "metrics.dashboard.update_interval_ms",
                value: self.update_interval_ms.to_string(),
                reason: "must be between 50 and 60000 milliseconds",
            });
        }
        self.alerts.validate()
    }
}

/// Thresholds of the dashboard's alerts. Rates are judged over the last
/// `window_seconds`, so that an old good average does not hide a collapse.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct AlertThresholds {
    /// Reserved bytes above which a tier alerts (keys: gpu, host_ram, ssd).
    pub memory_limits: BTreeMap<Tier, ByteSize>,
    /// Cache hit rate (all levels) below which the window alerts.
    pub min_hit_rate: f64,
    /// Lookups the window needs before the hit rate is judged.
    pub min_lookups: u64,
    /// Mean swap latency, in milliseconds, above which the window alerts.
    pub swap_latency_budget_ms: f64,
    /// Swap operations the window needs before the latency is judged.
    pub min_swap_operations: u64,
    /// Length of the window for rates, in seconds.
    pub window_seconds: u64,
}

impl Default for AlertThresholds {
    fn default() -> Self {
        AlertThresholds {
            memory_limits: BTreeMap::new(),
            min_hit_rate: 0.3,
            min_lookups: 100,
            swap_latency_budget_ms: 50.0,
            min_swap_operations: 10,
            window_seconds: 10,
        }
    }
}

impl AlertThresholds {
    /// Checks every value's range.
    pub fn validate(&self) -> Result<(), MetricsError> {
        if !(0.0..=1.0).contains(&self.min_hit_rate) {
            return Err(MetricsError::InvalidConfig {
                field: "metrics.dashboard.alerts.min_hit_rate",
                value: self.min_hit_rate.to_string(),
                reason: "must be a fraction between 0 and 1",
            });
        }
        if !(self.swap_latency_budget_ms.is_finite() && self.swap_latency_budget_ms > 0.0) {
            return Err(MetricsError::InvalidConfig {
                field: "metrics.dashboard.alerts.swap_latency_budget_ms",
                value: self.swap_latency_budget_ms.to_string(),
                reason: "must be a positive number of milliseconds",
            });
        }
        if !(1..=3600).contains(&self.window_seconds) {
            return Err(MetricsError::InvalidConfig {
                field: "metrics.dashboard.alerts.window_seconds",
                value: self.window_seconds.to_string(),
                reason: "must be between 1 and 3600 seconds",
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_loopback_and_valid() {
        let c = MetricsConfig::default();
        c.validate().unwrap();
        assert!(c.dashboard.bind.is_loopback());
    }

    #[test]
    fn parses_json_with_sizes_and_rejects_bad_values() {
        let c: MetricsConfig = serde_json::from_str(
            r#"{"dashboard":{"port":0,"alerts":{"memory_limits":{"gpu":"6GiB"},"min_hit_rate":0.5}}}"#,
        )
        .unwrap();
        assert_eq!(
            c.dashboard.alerts.memory_limits[&Tier::Gpu],
            ByteSize::gib(6)
        );
        assert_eq!(c.dashboard.port, 0);
        c.validate().unwrap();

        let mut bad = c.clone();
        bad.dashboard.alerts.min_hit_rate = 1.5;
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("min_hit_rate") && err.contains("1.5"), "{err}");

        let unknown = serde_json::from_str::<MetricsConfig>(r#"{"dashbord":{}}"#);
        assert!(unknown.unwrap_err().to_string().contains("dashbord"));
    }
}
