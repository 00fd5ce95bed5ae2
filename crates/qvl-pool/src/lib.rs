//! # qvl-pool
//!
//! Pools for tensor buffers (host, pinned host, CUDA device), specialized by tensor kind and shape.
//!
//! This crate depends on `qvl-core` and external crates only, so it can be
//! used on its own. Its implementation is tracked in issue 5; until it
//! lands, the runtime takes the plain path for this phase.
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
