//! The one error type of qvl-gc.

use std::time::Duration;

/// Errors of the collector, grouped by cause.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    // --- configuration ------------------------------------------------------
    /// A config value is out of its range.
    #[error("gc config: {field} = {value} is invalid: {reason}")]
    InvalidConfig {
        /// The config key ("collection_interval", "target_slack").
        field: &'static str,
        /// The value as given.
        value: String,
        /// What the value must be.
        reason: &'static str,
    },
    /// The interval bounds contradict each other.
    #[error("gc config: min_interval {min:?} is above max_interval {max:?}")]
    IntervalBounds {
        /// The lower bound.
        min: Duration,
        /// The upper bound.
        max: Duration,
    },

    // --- environment ---------------------------------------------------------
    /// The background collector thread could not be started.
    #[error("starting the gc thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// Result with [`GcError`].
pub type Result<T> = std::result::Result<T, GcError>;
