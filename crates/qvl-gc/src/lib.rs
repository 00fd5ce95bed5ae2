//! # qvl-gc
//!
//! Tensor lifetime tracking and prediction, adaptive collection that lowers peak memory.
//!
//! This crate depends on `qvl-core` and external crates only, so it can be
//! used on its own. Its implementation is tracked in issue 10; until it
//! lands, the runtime takes the plain path for this phase.
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
