//! One module per subcommand group; each returns the process exit code.
pub mod batch;
pub mod cache;
pub mod config;
pub mod kv_codec;
pub mod model;
pub mod run;
