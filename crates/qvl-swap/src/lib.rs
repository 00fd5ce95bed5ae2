//! # qvl-swap
//!
//! KV-cache swapping to SSD: a checksummed, crash-safe swap space with
//! asynchronous I/O and latency control, and the policies that decide what
//! leaves RAM.
//!
//! - [`SsdStore`] is the SSD tier's [`qvl_core::BlockStore`]: one
//!   preallocated file in a private directory (see [`file`] for why one file
//!   and not a file per block), records with a header and a CRC-32C checksum
//!   verified on every read, O_DIRECT where the file system allows it,
//!   buffered or memory-mapped reads otherwise, and reads on a bounded pool
//!   of I/O threads ([`engine`]) with a latency controller.
//! - [`policy::Lru`] and [`policy::Lfu`] choose victims among resident blocks.
//! - [`SwapConfig`] is the `[swapping]` section.
//!
//! The model-side adapter (a paged KV storage that keeps a RAM budget of
//! blocks and swaps the rest through this crate) lives in
//! `qvl-runtime::kv_swap`, because this crate depends on `qvl-core` only.
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod config;
pub mod crc32c;
pub mod dir;
pub mod engine;
mod error;
pub mod extent;
pub mod file;
pub mod format;
pub mod policy;
pub mod probe;
mod store;

pub use config::{EvictionPolicyKind, IoMode, SwapConfig};
pub use engine::{EngineSnapshot, Ticket};
pub use error::{Result, SwapError};
pub use file::{ActiveIo, FaultPlan};
pub use policy::policy_for;
pub use store::{
    DecodeFn, Decoder, LandedRead, LandedRecord, LandedTicket, LandedUnverified, SsdStore,
    StoreStats, MAX_MERGED_READ,
};

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
