//! # qvl-metrics
//!
//! Metrics collector, performance report, Prometheus text and live dashboard for qvl.
//!
//! This crate depends on `qvl-core` and external crates only, so it can be
//! used on its own. Its implementation is tracked in issue 11; until it
//! lands, the runtime takes the plain path for this phase.
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
