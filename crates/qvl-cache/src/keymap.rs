//! Hash maps keyed by [`BlockKey`] without rehashing: a key is already 128
//! bits of XXH3, so folding it to 64 bits spreads as well as SipHash would,
//! at a fraction of the cost on the lookup path.

use qvl_core::BlockKey;
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

/// Hasher that folds a `u128` key; other input goes through FNV-1a.
#[derive(Default, Clone, Copy)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // FNV-1a, only reached by non-BlockKey keys.
        let mut h = self.0 ^ 0xcbf2_9ce4_8422_2325;
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = h;
    }

    fn write_u128(&mut self, v: u128) {
        // Multiply the fold so that keys built from small ids in tests (not
        // hashed) still spread over the table's high bits.
        self.0 = ((v as u64) ^ ((v >> 64) as u64) ^ self.0).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// A `HashMap` keyed by block keys.
pub type KeyMap<V> = HashMap<BlockKey, V, BuildHasherDefault<KeyHasher>>;
/// A `HashSet` of block keys.
pub type KeySet = HashSet<BlockKey, BuildHasherDefault<KeyHasher>>;
