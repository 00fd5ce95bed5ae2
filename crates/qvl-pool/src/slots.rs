//! Equal-sized slots cut from arena blocks ("runs"): the store behind each
//! size class and each specialized (KV block) pool. Taking and returning a
//! slot is a pop and a push on a stack of offsets: O(1).
//!
//! Runs are never split up again while any of their slots is out. A run whose
//! slots are all back is handed back to the arena by [`SlotStore::reclaim`],
//! which the pool calls before growing and when releasing memory.

use crate::backing::Backing;
use crate::bfc::{BfcArena, Block, BlockHandle};
use crate::PoolError;
use std::collections::{BTreeMap, HashMap};

#[derive(Debug, Clone, Copy)]
struct Run {
    handle: BlockHandle,
    slots: usize,
}

/// Free slots of one size, and the runs they come from.
#[derive(Debug)]
pub struct SlotStore {
    slot: usize,
    run_bytes: usize,
    /// Offsets of free slots; the last one is taken next.
    free: Vec<usize>,
    /// Runs by offset.
    runs: BTreeMap<usize, Run>,
    /// Slots in all runs.
    total_slots: usize,
}

impl SlotStore {
    /// A store of `slot`-byte slots cut from runs of about `run_bytes`.
    pub fn new(slot: usize, run_bytes: usize) -> SlotStore {
        SlotStore {
            slot,
            run_bytes: run_bytes.max(slot),
            free: Vec::new(),
            runs: BTreeMap::new(),
            total_slots: 0,
        }
    }

    /// Bytes of one slot.
    pub fn slot_bytes(&self) -> usize {
        self.slot
    }

    /// Slots in all runs.
    pub fn total_slots(&self) -> usize {
        self.total_slots
    }

    /// Free slots held here (not counting those in thread caches).
    pub fn free_slots(&self) -> usize {
        self.free.len()
    }

    /// Takes one free slot, if any.
    pub fn pop(&mut self) -> Option<usize> {
        self.free.pop()
    }

    /// Returns a slot.
    pub fn push(&mut self, offset: usize) {
        self.free.push(offset);
    }

    /// Bytes to ask the arena for when adding a run of at least `min_slots` slots.
    pub fn run_request(&self, min_slots: usize) -> usize {
        self.run_bytes.max(min_slots.saturating_mul(self.slot))
    }

    /// Cuts `block`, handed out by the arena for [`Self::run_request`], into slots.
    pub fn add_run(&mut self, block: Block) {
        let slots = block.size / self.slot;
        self.runs.insert(
            block.offset,
            Run {
                handle: block.handle,
                slots,
            },
        );
        self.total_slots += slots;
        // Reverse order: slots are taken from the run's start first.
        self.free
            .extend((0..slots).rev().map(|i| block.offset + i * self.slot));
    }

    /// Hands every run whose slots are all free back to `arena`, keeping at
    /// least `keep_slots` slots. Returns the bytes handed back.
    pub fn reclaim<B: Backing>(
        &mut self,
        arena: &mut BfcArena<B>,
        keep_slots: usize,
    ) -> Result<usize, PoolError> {
        if self.free.is_empty() || self.total_slots <= keep_slots {
            return Ok(0);
        }
        let mut free_per_run: HashMap<usize, usize> = HashMap::new();
        for &offset in &self.free {
            if let Some((&run_offset, _)) = self.runs.range(..=offset).next_back() {
                *free_per_run.entry(run_offset).or_default() += 1;
            }
        }
        let mut empty: Vec<usize> = free_per_run
            .into_iter()
            .filter(|(run_offset, free)| {
                self.runs.get(run_offset).is_some_and(|r| r.slots == *free)
            })
            .map(|(run_offset, _)| run_offset)
            .collect();
        if empty.is_empty() {
            return Ok(0);
        }
        // Give back the highest runs first: the arena's top shrinks sooner.
        empty.sort_unstable_by(|a, b| b.cmp(a));
        let mut returned = Vec::new();
        let mut total = self.total_slots;
        for run_offset in empty {
            let Some(run) = self.runs.get(&run_offset).copied() else {
                continue;
            };
            if total - run.slots < keep_slots {
                continue;
            }
            total -= run.slots;
            returned.push((run_offset, run));
        }
        if returned.is_empty() {
            return Ok(0);
        }
        returned.sort_unstable_by_key(|(offset, _)| *offset);
        let slot = self.slot;
        let in_returned = |offset: usize| {
            let i = returned.partition_point(|(run_offset, _)| *run_offset <= offset);
            i > 0 && {
                let (run_offset, run) = returned[i - 1];
                offset < run_offset + run.slots * slot
            }
        };
        self.free.retain(|&offset| !in_returned(offset));
        let mut bytes = 0;
        for (run_offset, run) in returned {
            self.runs.remove(&run_offset);
            self.total_slots -= run.slots;
            bytes += arena.free(run.handle)?;
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backing::HostBacking;

    #[test]
    fn take_return_and_reclaim_empty_runs() {
        let mut arena = BfcArena::new(HostBacking::reserve(1 << 26).unwrap());
        let mut store = SlotStore::new(64 << 10, 1 << 20);
        assert!(store.pop().is_none());
        let grow = |store: &mut SlotStore, arena: &mut BfcArena<HostBacking>| {
            let block = arena.alloc(store.run_request(1)).unwrap().unwrap();
            store.add_run(block);
        };
        grow(&mut store, &mut arena);
        assert_eq!(store.total_slots(), 16);
        let taken: Vec<usize> = (0..20)
            .map(|_| {
                store.pop().unwrap_or_else(|| {
                    grow(&mut store, &mut arena);
                    store.pop().unwrap()
                })
            })
            .collect();
        assert_eq!(store.total_slots(), 32);
        assert_eq!(taken[0], 0);
        assert_eq!(taken[1], 64 << 10);
        // Every slot is distinct.
        let mut sorted = taken.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 20);
        // Return the first run's 16 slots: only that run is empty.
        for &o in &taken[..16] {
            store.push(o);
        }
        assert_eq!(store.reclaim(&mut arena, 0).unwrap(), 1 << 20);
        assert_eq!(store.total_slots(), 16);
        assert_eq!(store.free_slots(), 12);
        for &o in &taken[16..] {
            store.push(o);
        }
        // Keep at least 16 slots: nothing more goes back.
        assert_eq!(store.reclaim(&mut arena, 16).unwrap(), 0);
        assert_eq!(store.reclaim(&mut arena, 0).unwrap(), 1 << 20);
        assert_eq!(arena.stats().allocated, 0);
    }
}
