//! S3-FIFO (Yang et al., SOSP 2023): three static FIFO queues.

use crate::list::KeyList;
use qvl_core::{BlockInfo, BlockKey, EvictionPolicy};

/// Share of the resident blocks the small probationary queue may hold.
const SMALL_SHARE: f64 = 0.1;
/// Reads a block needs in the small queue to be promoted to the main queue.
const PROMOTE_AFTER: u8 = 2;
/// Reads counted per block (2 bits in the paper).
const MAX_FREQ: u8 = 3;

/// S3-FIFO: new blocks enter a small FIFO; those read again move to the main
/// FIFO, the others leave and are remembered in a ghost FIFO, whose keys go
/// straight to main when they come back. Main reinserts read blocks
/// (CLOCK-like). O(1) amortized per operation.
///
/// The ghost queue holds at most as many keys as the level has held blocks.
#[derive(Default)]
pub struct S3Fifo {
    small: KeyList<u8>,
    main: KeyList<u8>,
    ghost: KeyList<()>,
    high_water: usize,
}

impl S3Fifo {
    /// An empty S3-FIFO policy.
    pub fn new() -> Self {
        Self::default()
    }

    fn remember(&mut self, key: BlockKey) {
        self.ghost.push_front(key, ());
        while self.ghost.len() > self.high_water.max(1) {
            self.ghost.pop_back();
        }
    }
}

impl EvictionPolicy for S3Fifo {
    fn name(&self) -> &'static str {
        "s3_fifo"
    }

    fn on_insert(&mut self, key: BlockKey, _info: &BlockInfo) {
        if self.ghost.remove(&key).is_some() {
            self.main.push_front(key, 0);
        } else {
            self.small.push_front(key, 0);
        }
        self.high_water = self.high_water.max(self.len());
    }

    fn on_access(&mut self, key: BlockKey) {
        if let Some(f) = self.small.get_mut(&key) {
            *f = (*f + 1).min(MAX_FREQ);
        } else if let Some(f) = self.main.get_mut(&key) {
            *f = (*f + 1).min(MAX_FREQ);
        }
    }

    fn on_remove(&mut self, key: BlockKey) {
        if self.small.remove(&key).is_none() {
            self.main.remove(&key);
        }
    }

    fn evict(&mut self) -> Option<BlockKey> {
        loop {
            let small_over = self.small.len() as f64 >= SMALL_SHARE * self.len() as f64;
            if !self.small.is_empty() && (small_over || self.main.is_empty()) {
                let (key, freq) = self.small.pop_back()?;
                if freq >= PROMOTE_AFTER {
                    self.main.push_front(key, 0);
                    continue;
                }
                self.remember(key);
                return Some(key);
            }
            let (key, freq) = self.main.pop_back()?;
            if freq > 0 {
                self.main.push_front(key, freq - 1);
                continue;
            }
            return Some(key);
        }
    }

    fn len(&self) -> usize {
        self.small.len() + self.main.len()
    }
}
