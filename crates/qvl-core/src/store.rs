//! Block stores: one per tier, holding whole blocks by key.
//!
//! Implemented by the host store (`qvl-cache`), the GPU store (`cuda`
//! feature) and the SSD swap space (`qvl-swap`); called by the cache levels,
//! the tier manager and the model's paged KV cache.

use crate::{BlockKey, CodecId, Result, TensorMeta, Tier};
use std::sync::Arc;

/// A block as it travels between tiers: its key, what it decodes to, the
/// codec it is encoded with, and its stored bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Block {
    /// Content key.
    pub key: BlockKey,
    /// Shape and type of the decoded tensor.
    pub meta: TensorMeta,
    /// How `data` is encoded ([`CodecId::RAW`] when it is the tensor's bytes as is).
    pub codec: CodecId,
    /// The stored bytes, shared so that a get from RAM copies nothing.
    pub data: Arc<[u8]>,
}

impl Block {
    /// A block holding `data` as is.
    pub fn raw(key: BlockKey, meta: TensorMeta, data: impl Into<Arc<[u8]>>) -> Block {
        Block {
            key,
            meta,
            codec: CodecId::RAW,
            data: data.into(),
        }
    }

    /// Bytes this block occupies in a store.
    pub fn stored_bytes(&self) -> u64 {
        self.data.len() as u64
    }
}

/// A keyed store of blocks on one tier with a byte capacity.
///
/// Stores do not choose victims: a full store refuses a put with
/// [`crate::CoreError::OutOfCapacity`], and its owner (a cache level, the
/// swap manager) evicts by its [`crate::EvictionPolicy`] and retries. Every
/// method takes `&self`; implementations are safe to share between threads.
pub trait BlockStore: Send + Sync {
    /// The tier this store's bytes live on.
    fn tier(&self) -> Tier;

    /// Stores `block`, replacing a block with the same key.
    fn put(&self, block: Block) -> Result<()>;

    /// The block with `key`, or None. A store that finds a block damaged
    /// returns [`crate::CoreError::Corrupt`], never wrong bytes.
    fn get(&self, key: &BlockKey) -> Result<Option<Block>>;

    /// Removes the block; returns whether it was there.
    fn remove(&self, key: &BlockKey) -> Result<bool>;

    /// Whether a block with `key` is stored.
    fn contains(&self, key: &BlockKey) -> bool;

    /// Total bytes the store may hold.
    fn capacity_bytes(&self) -> u64;

    /// Bytes held now.
    fn used_bytes(&self) -> u64;

    /// Number of blocks held.
    fn len(&self) -> usize;

    /// Whether no block is held.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes still free.
    fn free_bytes(&self) -> u64 {
        self.capacity_bytes().saturating_sub(self.used_bytes())
    }
}
