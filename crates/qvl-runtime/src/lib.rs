//! # qvl-runtime
//!
//! The configuration (figment: defaults < TOML file < `QVL_<SECTION>__<KEY>`
//! environment variables) and the phased pipeline that wires the qvl memory
//! managers around the model. The `qvl` binary is built from this crate.
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod config;
pub mod config_reference;
mod error;
pub mod gen_model;
pub mod hardware;
pub mod kv_codec;
pub mod kv_pool;
pub mod kv_swap;
pub mod pipeline;
#[cfg(test)]
mod test_support;
pub mod weights_tier;

pub use config::{Config, ConfigSources, LoadedConfig};
pub use error::{Result, RuntimeError};
pub use hardware::{Hardware, Profile};
pub use pipeline::{Phase, PhaseSelection, PhaseState, PhaseStatus, Pipeline, PipelineOptions};
