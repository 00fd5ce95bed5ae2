//! # qvl-cache
//!
//! Hierarchical L1 GPU / L2 CPU / L3 SSD cache of KV blocks and tensors, with eviction policies and access prediction.
//!
//! This crate depends on `qvl-core` and external crates only, so it can be
//! used on its own. Its implementation is tracked in issue 6; until it
//! lands, the runtime takes the plain path for this phase.
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
