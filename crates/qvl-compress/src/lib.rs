//! # qvl-compress
//!
//! Adaptive compression of tensors (quantization, low rank, sparse, lossless) under an error budget.
//!
//! This crate depends on `qvl-core` and external crates only, so it can be
//! used on its own. Its implementation is tracked in issue 7; until it
//! lands, the runtime takes the plain path for this phase.
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
