use serde::{Deserialize, Serialize};
use std::fmt;
use xxhash_rust::xxh3::Xxh3;

/// Content hash of a paged KV block, chained over its parent.
///
/// As in vLLM's prefix caching, a block's key covers the key of the block
/// before it, the block's own token ids, and extra keys that change what the
/// tokens mean (an image hash for image placeholder tokens, a LoRA id). Two
/// requests that share a prefix therefore share the keys of its full blocks,
/// and a key identifies the whole prefix up to and including its block.
///
/// 128 bits of XXH3: collisions are negligible for any realistic number of
/// blocks (about 2^64 blocks before a birthday collision is likely).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BlockKey(pub u128);

impl BlockKey {
    /// Domain separator so that a root block never equals a child block with
    /// the same tokens.
    const ROOT_PARENT: u128 = 0x716c_765f_726f_6f74_5f62_6c6f_636b_2121;

    /// The key of a block whose parent is `parent` (None for the first block
    /// of a sequence), holding `tokens`, with `extra` keys (image hashes).
    pub fn chained(parent: Option<BlockKey>, tokens: &[u32], extra: &[u64]) -> BlockKey {
        let mut h = Xxh3::new();
        h.update(&parent.map_or(Self::ROOT_PARENT, |p| p.0).to_le_bytes());
        h.update(&(tokens.len() as u64).to_le_bytes());
        for t in tokens {
            h.update(&t.to_le_bytes());
        }
        h.update(&(extra.len() as u64).to_le_bytes());
        for e in extra {
            h.update(&e.to_le_bytes());
        }
        BlockKey(h.digest128())
    }

    /// A key for an opaque id from outside (a trace's block id, a weight
    /// tensor's index). Hashed so that such keys spread like content keys.
    pub fn from_id(id: u64) -> BlockKey {
        BlockKey(xxhash_rust::xxh3::xxh3_128(&id.to_le_bytes()))
    }

    /// A key for arbitrary bytes (an image's pixels, a tensor name).
    pub fn of_bytes(bytes: &[u8]) -> BlockKey {
        BlockKey(xxhash_rust::xxh3::xxh3_128(bytes))
    }

    /// The key as 16 little-endian bytes (for on-disk headers).
    pub fn to_le_bytes(self) -> [u8; 16] {
        self.0.to_le_bytes()
    }

    /// Inverse of [`BlockKey::to_le_bytes`].
    pub fn from_le_bytes(bytes: [u8; 16]) -> BlockKey {
        BlockKey(u128::from_le_bytes(bytes))
    }
}

impl fmt::Display for BlockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for BlockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The first 12 hex digits are enough to tell keys apart in logs.
        write!(f, "BlockKey({:012x}…)", self.0 >> 80)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_covers_parent_tokens_and_extra() {
        let a = BlockKey::chained(None, &[1, 2, 3], &[]);
        assert_eq!(a, BlockKey::chained(None, &[1, 2, 3], &[]));
        let b = BlockKey::chained(Some(a), &[4, 5, 6], &[]);
        // Same tokens under another parent are another prefix.
        let other_root = BlockKey::chained(None, &[9], &[]);
        assert_ne!(b, BlockKey::chained(Some(other_root), &[4, 5, 6], &[]));
        // A root block differs from a child block with equal tokens.
        assert_ne!(
            BlockKey::chained(None, &[4, 5, 6], &[]),
            BlockKey::chained(Some(a), &[4, 5, 6], &[])
        );
        // Image placeholder tokens with different images differ.
        assert_ne!(
            BlockKey::chained(None, &[500, 500], &[7]),
            BlockKey::chained(None, &[500, 500], &[8])
        );
        // Token boundaries matter: [1,2] + [] is not [1] + [2].
        assert_ne!(
            BlockKey::chained(None, &[1, 2], &[]),
            BlockKey::chained(None, &[1], &[2])
        );
    }

    #[test]
    fn bytes_round_trip() {
        let k = BlockKey::from_id(42);
        assert_eq!(BlockKey::from_le_bytes(k.to_le_bytes()), k);
        assert_eq!(k.to_string().len(), 32);
    }
}
