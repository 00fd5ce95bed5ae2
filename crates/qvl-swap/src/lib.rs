//! # qvl-swap
//!
//! KV-cache swapping to SSD with async I/O, checksummed blocks and latency control.
//!
//! This crate depends on `qvl-core` and external crates only, so it can be
//! used on its own. Its implementation is tracked in issue 8; until it
//! lands, the runtime takes the plain path for this phase.
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
