//! Tensor lifetime tracking: the contract of the garbage collector.
//!
//! Implemented by `qvl-gc`; called by the model when it creates, uses and
//! frees tensors. The tracker learns per-site lifetimes and tells the pools
//! which memory will soon be reusable.

use crate::TensorMeta;
use serde::{Deserialize, Serialize};

/// Identity of one tensor instance, unique within a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TensorId(pub u64);

/// Where in the model a tensor is made: lifetimes are predicted per site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct UseSite {
    /// Layer index, or None outside the layers (embeddings, lm_head).
    pub layer: Option<u32>,
    /// The operation ("attn.q", "mlp.up", "kv.block").
    pub op: &'static str,
}

/// Observes the life of tensors.
///
/// Calls are cheap and never fail: a tracker that falls behind drops
/// observations rather than stalling the forward pass.
pub trait LifetimeTracker: Send + Sync {
    /// A tensor was created at `site`.
    fn on_create(&self, id: TensorId, meta: &TensorMeta, site: UseSite);
    /// A tensor was read or written.
    fn on_use(&self, id: TensorId);
    /// A tensor was freed.
    fn on_free(&self, id: TensorId);
}
