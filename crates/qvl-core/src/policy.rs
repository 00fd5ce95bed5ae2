//! Eviction policies: which block leaves a full level.
//!
//! Implemented by `qvl-cache` (LRU, LFU, ARC, S3-FIFO, predictive) and used
//! by the cache levels and the swap space. A policy tracks keys only; the
//! store holds the data.

use crate::{BlockKey, TensorKind};

/// What a policy may know about a block when it enters: its size and its
/// place in a prefix chain (the structure KV workloads offer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockInfo {
    /// Stored bytes.
    pub bytes: u64,
    /// Role of the block.
    pub kind: TensorKind,
    /// The block before it in its sequence, if any.
    pub parent: Option<BlockKey>,
    /// Index of the block in its sequence (0 for the first block).
    pub position: u32,
}

impl BlockInfo {
    /// A KV block of `bytes` at `position` under `parent`.
    pub fn kv(bytes: u64, parent: Option<BlockKey>, position: u32) -> Self {
        BlockInfo {
            bytes,
            kind: TensorKind::KvCache,
            parent,
            position,
        }
    }
}

/// Chooses victims among the blocks of one level.
///
/// The owner calls `on_insert` when a block enters, `on_access` on every hit,
/// `on_remove` when a block leaves for another reason than eviction, and
/// `evict` when it needs room. `evict` forgets the key it returns.
pub trait EvictionPolicy: Send {
    /// Short name for configs and reports ("lru", "arc").
    fn name(&self) -> &'static str;

    /// A block entered the level.
    fn on_insert(&mut self, key: BlockKey, info: &BlockInfo);

    /// A block of the level was read.
    fn on_access(&mut self, key: BlockKey);

    /// A block left the level (removed by its owner, not evicted).
    fn on_remove(&mut self, key: BlockKey);

    /// Picks the next victim and stops tracking it; None when empty.
    fn evict(&mut self) -> Option<BlockKey>;

    /// Number of resident blocks tracked.
    fn len(&self) -> usize;

    /// Whether no block is tracked.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
