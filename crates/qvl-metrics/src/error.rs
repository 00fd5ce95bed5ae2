use std::net::SocketAddr;

/// Why a metrics operation failed, grouped by cause.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// A configuration value is out of its range.
    #[error("metrics config: `{field}` = {value}: {reason}")]
    InvalidConfig {
        /// The key, as written in the config (`dashboard.alerts.min_hit_rate`).
        field: &'static str,
        /// The value given.
        value: String,
        /// What it must be.
        reason: &'static str,
    },
    /// The dashboard could not listen on its address.
    #[error("dashboard: cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// What the system said.
        source: std::io::Error,
    },
    /// Another I/O failure of the dashboard (runtime or thread start).
    #[error("dashboard: {what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// What the system said.
        source: std::io::Error,
    },
    /// The dashboard's server stopped with an error or did not stop in time.
    #[error("dashboard server: {0}")]
    Server(String),
}
