//! # qvl-runtime
//!
//! Configuration and the phased pipeline that wires the qvl managers.
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
