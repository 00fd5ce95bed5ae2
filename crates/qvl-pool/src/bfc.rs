//! Best-fit with coalescing over one growable range (TensorFlow's BFC
//! allocator on PyTorch's expandable segments).
//!
//! The arena is a row of blocks in address order, each free or handed out,
//! linked to its neighbours. An allocation takes the smallest free block that
//! fits (lowest address among equals) and splits off the rest; a free merges
//! the block with free neighbours, so large blocks come back whole. When no
//! free block fits, the arena grows at its top, extending a free last block
//! instead of leaving it behind. Because the whole pool is one range,
//! memory freed by any tensor can serve any later tensor, which keeps
//! reserved memory close to the peak of live bytes.
//!
//! The arena deals in offsets only and never touches the memory, so the same
//! code serves host memory and, later, device memory (see [`Backing`]).

use crate::backing::Backing;
use crate::PoolError;
use std::collections::BTreeSet;

const NONE: u32 = u32::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Free,
    Allocated,
    /// A record not describing any block; its index is on the spare list.
    Vacant,
}

#[derive(Debug, Clone)]
struct Node {
    offset: usize,
    size: usize,
    prev: u32,
    next: u32,
    state: State,
    /// Free and given back to the OS (counts as not reserved).
    released: bool,
    /// Bumped at every hand-out, so that a stale handle is recognised.
    generation: u32,
}

/// Names one handed-out block; returned to [`BfcArena::free`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockHandle {
    node: u32,
    generation: u32,
}

/// A block handed out: its handle, offset and (rounded) size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    /// Give this back to free the block.
    pub handle: BlockHandle,
    /// Offset from the backing's base.
    pub offset: usize,
    /// Size in bytes, a multiple of the granule.
    pub size: usize,
}

/// Counters of an arena.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ArenaStats {
    /// Bytes committed from the backing and not given back.
    pub reserved: usize,
    /// Bytes in handed-out blocks.
    pub allocated: usize,
    /// Free blocks.
    pub free_blocks: usize,
    /// Size of the largest free block (its bytes can serve one request).
    pub largest_free: usize,
    /// Commits from the backing (growths).
    pub commits: u64,
    /// Decommits to the backing.
    pub decommits: u64,
}

/// Best-fit, coalescing allocator over one growable range of a [`Backing`].
#[derive(Debug)]
pub struct BfcArena<B: Backing> {
    backing: B,
    granule: usize,
    nodes: Vec<Node>,
    spare: Vec<u32>,
    /// Free blocks whose pages are committed, by (size, offset): the first at
    /// or above a size is the best fit.
    free_committed: BTreeSet<(usize, usize, u32)>,
    /// Free blocks given back to the OS, likewise.
    free_released: BTreeSet<(usize, usize, u32)>,
    /// The block ending at `top`, or NONE when the arena is empty.
    tail: u32,
    /// End of the carved part of the range.
    top: usize,
    /// Bytes below `top` in free blocks given back to the OS.
    released: usize,
    allocated: usize,
    commits: u64,
    decommits: u64,
}

impl<B: Backing> BfcArena<B> {
    /// An empty arena over `backing`.
    pub fn new(backing: B) -> Self {
        let granule = backing.granule();
        BfcArena {
            backing,
            granule,
            nodes: Vec::new(),
            spare: Vec::new(),
            free_committed: BTreeSet::new(),
            free_released: BTreeSet::new(),
            tail: NONE,
            top: 0,
            released: 0,
            allocated: 0,
            commits: 0,
            decommits: 0,
        }
    }

    /// The backing memory.
    pub fn backing(&self) -> &B {
        &self.backing
    }

    /// Unit that every block offset and size is a multiple of.
    pub fn granule(&self) -> usize {
        self.granule
    }

    /// Current counters.
    pub fn stats(&self) -> ArenaStats {
        ArenaStats {
            reserved: self.top - self.released,
            allocated: self.allocated,
            free_blocks: self.free_committed.len() + self.free_released.len(),
            largest_free: self
                .free_committed
                .last()
                .map_or(0, |e| e.0)
                .max(self.free_released.last().map_or(0, |e| e.0)),
            commits: self.commits,
            decommits: self.decommits,
        }
    }

    /// `bytes` rounded up to the granule, or None on overflow.
    pub fn round(&self, bytes: usize) -> Option<usize> {
        let bytes = bytes.max(1);
        bytes
            .checked_add(self.granule - 1)
            .map(|b| b / self.granule * self.granule)
    }

    /// Whether `bytes` more could be carved at the top.
    fn room_at_top(&self, bytes: usize) -> bool {
        self.top
            .checked_add(bytes)
            .is_some_and(|end| end <= self.backing.capacity())
    }

    /// Hands out a block of at least `bytes` from free blocks only, without
    /// growing. None when no free block is large enough.
    pub fn alloc_cached(&mut self, bytes: usize) -> Option<Block> {
        let size = self.round(bytes)?;
        // Best fit over both sets; on a tie in size, committed pages win.
        let committed = self.free_committed.range((size, 0, 0)..).next();
        let released = self.free_released.range((size, 0, 0)..).next();
        let &(_, _, idx) = match (committed, released) {
            (Some(c), Some(r)) if r.0 < c.0 => r,
            (Some(c), _) => c,
            (None, r) => r?,
        };
        let n = self.node(idx);
        if n.released {
            // The part handed out is committed again before use (a no-op on
            // the host, a map on a device). When that fails the block stays
            // released and the caller grows or falls back.
            let offset = n.offset;
            if self.backing.commit(offset, size).is_err() {
                return None;
            }
            self.commits += 1;
        }
        Some(self.take(idx, size))
    }

    /// Hands out a block of at least `bytes`, growing the arena when no free
    /// block fits. Ok(None) when the range is full: the caller falls back.
    pub fn alloc(&mut self, bytes: usize) -> Result<Option<Block>, PoolError> {
        if let Some(block) = self.alloc_cached(bytes) {
            return Ok(Some(block));
        }
        let Some(size) = self.round(bytes) else {
            return Ok(None);
        };
        let tail_free = self.tail != NONE && self.node(self.tail).state == State::Free;
        let need = if tail_free {
            size - self.node(self.tail).size
        } else {
            size
        };
        if !self.room_at_top(need) {
            return Ok(None);
        }
        self.backing.commit(self.top, need)?;
        self.commits += 1;
        self.top += need;
        if tail_free {
            let tail = self.tail;
            let (old_size, released) = {
                let n = self.node(tail);
                (n.size, n.released)
            };
            if released {
                // The old part comes back into use with the new one.
                let offset = self.node(tail).offset;
                if let Err(e) = self.backing.commit(offset, old_size) {
                    self.top -= need;
                    // Best effort: the new part was committed just above.
                    let _ = self.backing.decommit(self.top, need);
                    return Err(e);
                }
                self.commits += 1;
                self.released -= old_size;
            }
            self.remove_free(tail);
            let n = self.node_mut(tail);
            n.released = false;
            n.size += need;
            self.insert_free(tail);
            Ok(Some(self.take(tail, size)))
        } else {
            let idx = self.new_node(Node {
                offset: self.top - need,
                size,
                prev: self.tail,
                next: NONE,
                state: State::Free,
                released: false,
                generation: 0,
            });
            if self.tail != NONE {
                let tail = self.tail;
                self.node_mut(tail).next = idx;
            }
            self.tail = idx;
            self.insert_free(idx);
            Ok(Some(self.take(idx, size)))
        }
    }

    /// Marks free block `idx` handed out, splitting off what exceeds `size`.
    fn take(&mut self, idx: u32, size: usize) -> Block {
        let n = self.node(idx).clone();
        debug_assert!(n.state == State::Free && n.size >= size);
        self.remove_free(idx);
        if n.released {
            self.released -= size;
        }
        if n.size > size {
            // Sizes are multiples of the granule, so the rest is at least one.
            let rest = self.new_node(Node {
                offset: n.offset + size,
                size: n.size - size,
                prev: idx,
                next: n.next,
                state: State::Free,
                released: n.released,
                generation: 0,
            });
            if n.next != NONE {
                self.node_mut(n.next).prev = rest;
            } else {
                self.tail = rest;
            }
            self.insert_free(rest);
            self.node_mut(idx).next = rest;
        }
        let node = self.node_mut(idx);
        node.size = size;
        node.state = State::Allocated;
        node.released = false;
        node.generation = node.generation.wrapping_add(1);
        let generation = node.generation;
        self.allocated += size;
        Block {
            handle: BlockHandle {
                node: idx,
                generation,
            },
            offset: n.offset,
            size,
        }
    }

    /// Takes a block back, merging it with free neighbours. A handle that is
    /// not handed out (freed twice, or never from this arena) is refused and
    /// changes nothing. Returns the block's size.
    pub fn free(&mut self, handle: BlockHandle) -> Result<usize, PoolError> {
        let invalid = |reason| PoolError::InvalidFree {
            node: handle.node,
            generation: handle.generation,
            reason,
        };
        let n = self
            .nodes
            .get(handle.node as usize)
            .ok_or_else(|| invalid("no such block in this arena"))?;
        if n.state != State::Allocated {
            return Err(invalid("the block is not handed out (double free?)"));
        }
        if n.generation != handle.generation {
            return Err(invalid("the block was freed and handed out again since"));
        }
        let mut idx = handle.node;
        let size = n.size;
        self.allocated -= size;
        self.node_mut(idx).state = State::Free;
        let prev = self.node(idx).prev;
        if prev != NONE && self.node(prev).state == State::Free && self.recommit_if_released(prev) {
            self.absorb_next(prev);
            idx = prev;
        }
        let next = self.node(idx).next;
        if next != NONE && self.node(next).state == State::Free && self.recommit_if_released(next) {
            self.absorb_next(idx);
        }
        self.insert_free(idx);
        Ok(size)
    }

    /// Commits free block `idx` again when it was given back, because a
    /// merged block counts as committed. False when that fails: the caller
    /// leaves the blocks unmerged, which wastes nothing.
    fn recommit_if_released(&mut self, idx: u32) -> bool {
        let n = self.node(idx);
        if !n.released {
            return true;
        }
        let (offset, size) = (n.offset, n.size);
        match self.backing.commit(offset, size) {
            Ok(()) => {
                self.commits += 1;
                true
            }
            Err(e) => {
                tracing::debug!("not merging a released block: committing it failed: {e}");
                false
            }
        }
    }

    /// Merges the block after `idx` into `idx`; both are free. Removes both
    /// from the free set (the caller re-inserts the merged block); the merged
    /// block counts as not released.
    fn absorb_next(&mut self, idx: u32) {
        let a = self.node(idx).clone();
        let b_idx = a.next;
        let b = self.node(b_idx).clone();
        self.remove_free(idx);
        self.remove_free(b_idx);
        // A released part comes back as cached: it will be touched again.
        if a.released {
            self.released -= a.size;
        }
        if b.released {
            self.released -= b.size;
        }
        {
            let m = self.node_mut(idx);
            m.size += b.size;
            m.next = b.next;
            m.released = false;
        }
        if b.next != NONE {
            self.node_mut(b.next).prev = idx;
        } else {
            self.tail = idx;
        }
        self.retire(b_idx);
    }

    /// Gives every free block back to the backing: the free block at the top
    /// shrinks the arena, the others stay in place, decommitted. Returns the
    /// bytes newly given back.
    pub fn release(&mut self) -> Result<usize, PoolError> {
        let mut freed = 0;
        if self.tail != NONE && self.node(self.tail).state == State::Free {
            let tail = self.tail;
            let n = self.node(tail).clone();
            if !n.released {
                self.backing.decommit(n.offset, n.size)?;
                self.decommits += 1;
                freed += n.size;
            } else {
                self.released -= n.size;
            }
            self.remove_free(tail);
            self.top = n.offset;
            self.tail = n.prev;
            if n.prev != NONE {
                self.node_mut(n.prev).next = NONE;
            }
            self.retire(tail);
        }
        Ok(freed + self.decommit_free()?)
    }

    /// Decommits every committed free block.
    fn decommit_free(&mut self) -> Result<usize, PoolError> {
        let blocks: Vec<u32> = self.free_committed.iter().map(|&(_, _, idx)| idx).collect();
        let mut freed = 0;
        for idx in blocks {
            let (offset, size) = (self.node(idx).offset, self.node(idx).size);
            self.backing.decommit(offset, size)?;
            self.decommits += 1;
            self.remove_free(idx);
            self.node_mut(idx).released = true;
            self.insert_free(idx);
            self.released += size;
            freed += size;
        }
        Ok(freed)
    }

    /// Files free block `idx` under its size, offset and state.
    fn insert_free(&mut self, idx: u32) {
        let n = &self.nodes[idx as usize];
        let key = (n.size, n.offset, idx);
        if n.released {
            self.free_released.insert(key);
        } else {
            self.free_committed.insert(key);
        }
    }

    /// Unfiles free block `idx`; call before changing its size, offset or state.
    fn remove_free(&mut self, idx: u32) {
        let n = &self.nodes[idx as usize];
        let key = (n.size, n.offset, idx);
        if n.released {
            self.free_released.remove(&key);
        } else {
            self.free_committed.remove(&key);
        }
    }

    fn node(&self, idx: u32) -> &Node {
        &self.nodes[idx as usize]
    }

    fn node_mut(&mut self, idx: u32) -> &mut Node {
        &mut self.nodes[idx as usize]
    }

    fn new_node(&mut self, node: Node) -> u32 {
        if let Some(idx) = self.spare.pop() {
            let generation = self.nodes[idx as usize].generation;
            self.nodes[idx as usize] = Node { generation, ..node };
            idx
        } else {
            // More than 4 billion live block records cannot fit in memory.
            let idx = u32::try_from(self.nodes.len()).unwrap_or(NONE - 1);
            self.nodes.push(node);
            idx
        }
    }

    fn retire(&mut self, idx: u32) {
        let n = self.node_mut(idx);
        n.state = State::Vacant;
        n.prev = NONE;
        n.next = NONE;
        self.spare.push(idx);
    }

    /// Checks the block list against the counters; for tests.
    #[cfg(test)]
    fn check(&self) {
        let mut idx = if self.tail == NONE {
            NONE
        } else {
            let mut i = self.tail;
            while self.node(i).prev != NONE {
                i = self.node(i).prev;
            }
            i
        };
        let (mut offset, mut allocated, mut released, mut free) = (0, 0, 0, 0);
        let mut last_free = false;
        while idx != NONE {
            let n = self.node(idx);
            assert_eq!(n.offset, offset, "blocks must tile the arena");
            match n.state {
                State::Allocated => {
                    allocated += n.size;
                    last_free = false;
                }
                State::Free => {
                    assert!(!last_free, "adjacent free blocks must be merged");
                    let set = if n.released {
                        &self.free_released
                    } else {
                        &self.free_committed
                    };
                    assert!(set.contains(&(n.size, n.offset, idx)));
                    free += 1;
                    if n.released {
                        released += n.size;
                    }
                    last_free = true;
                }
                State::Vacant => panic!("vacant node linked"),
            }
            offset += n.size;
            idx = n.next;
        }
        assert_eq!(offset, self.top);
        assert_eq!(allocated, self.allocated);
        assert_eq!(released, self.released);
        assert_eq!(free, self.free_committed.len() + self.free_released.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backing::HostBacking;

    fn arena(cap: usize) -> BfcArena<HostBacking> {
        BfcArena::new(HostBacking::reserve(cap).unwrap())
    }

    #[test]
    fn splits_and_merges_back_whole() {
        let mut a = arena(1 << 24);
        let g = a.granule();
        let x = a.alloc(3 * g).unwrap().unwrap();
        let y = a.alloc(g + 1).unwrap().unwrap();
        let z = a.alloc(g).unwrap().unwrap();
        assert_eq!(y.size, 2 * g);
        assert_eq!((x.offset, y.offset, z.offset), (0, 3 * g, 5 * g));
        a.check();
        a.free(x.handle).unwrap();
        a.free(z.handle).unwrap();
        a.check();
        // A 2-granule request best-fits into the 3-granule hole, not the tail.
        let w = a.alloc(2 * g).unwrap().unwrap();
        assert_eq!(w.offset, 0);
        a.free(w.handle).unwrap();
        a.free(y.handle).unwrap();
        a.check();
        let s = a.stats();
        assert_eq!(s.allocated, 0);
        assert_eq!(s.free_blocks, 1);
        assert_eq!(s.largest_free, 6 * g);
        // The whole arena serves one request that spans all old blocks.
        let big = a.alloc(6 * g).unwrap().unwrap();
        assert_eq!(big.offset, 0);
        assert_eq!(a.stats().reserved, 6 * g);
        a.free(big.handle).unwrap();
    }

    #[test]
    fn grows_by_extending_a_free_tail() {
        let mut a = arena(1 << 24);
        let g = a.granule();
        let x = a.alloc(g).unwrap().unwrap();
        let y = a.alloc(2 * g).unwrap().unwrap();
        a.free(y.handle).unwrap();
        let z = a.alloc(5 * g).unwrap().unwrap();
        assert_eq!(z.offset, g);
        assert_eq!(a.stats().reserved, 6 * g);
        a.check();
        a.free(x.handle).unwrap();
        a.free(z.handle).unwrap();
        a.check();
    }

    #[test]
    fn double_free_and_stale_handles_are_refused() {
        let mut a = arena(1 << 20);
        let x = a.alloc(10).unwrap().unwrap();
        a.free(x.handle).unwrap();
        let err = a.free(x.handle).unwrap_err();
        assert!(err.to_string().contains("double free"), "{err}");
        let y = a.alloc(10).unwrap().unwrap();
        assert_eq!(y.handle.node, x.handle.node);
        // The old handle names the same record, reused: refused by generation.
        let err = a.free(x.handle).unwrap_err();
        assert!(err.to_string().contains("handed out again"), "{err}");
        let foreign = BlockHandle {
            node: 999,
            generation: 1,
        };
        assert!(a.free(foreign).is_err());
        a.check();
        a.free(y.handle).unwrap();
        a.check();
    }

    #[test]
    fn full_range_reports_none() {
        let mut a = arena(1 << 16);
        let x = a.alloc(1 << 16).unwrap().unwrap();
        assert!(a.alloc(1).unwrap().is_none());
        a.free(x.handle).unwrap();
        assert!(a.alloc(1).unwrap().is_some());
    }

    #[test]
    fn release_shrinks_top_and_decommits_holes() {
        let mut a = arena(1 << 24);
        let g = a.granule();
        let x = a.alloc(4 * g).unwrap().unwrap();
        let y = a.alloc(g).unwrap().unwrap();
        let z = a.alloc(8 * g).unwrap().unwrap();
        a.free(x.handle).unwrap();
        a.free(z.handle).unwrap();
        assert_eq!(a.stats().reserved, 13 * g);
        assert_eq!(a.release().unwrap(), 12 * g);
        a.check();
        let s = a.stats();
        assert_eq!(s.reserved, g);
        assert_eq!(s.allocated, g);
        assert_eq!(a.release().unwrap(), 0);
        // Reusing part of a released hole counts it as reserved again.
        let w = a.alloc(g).unwrap().unwrap();
        assert_eq!(w.offset, 0);
        assert_eq!(a.stats().reserved, 2 * g);
        a.check();
        a.free(w.handle).unwrap();
        a.free(y.handle).unwrap();
        a.check();
        a.release().unwrap();
        assert_eq!(a.stats().reserved, 0);
        a.check();
    }

    #[test]
    fn random_interleaving_keeps_invariants() {
        let mut a = arena(1 << 30);
        let mut live: Vec<Block> = Vec::new();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for step in 0..4000 {
            let r = next();
            if live.is_empty() || r % 3 != 0 {
                let bytes = (next() % (1 << 20)) as usize + 1;
                live.push(a.alloc(bytes).unwrap().unwrap());
            } else {
                let i = (r as usize / 3) % live.len();
                let b = live.swap_remove(i);
                a.free(b.handle).unwrap();
            }
            if step % 500 == 0 {
                a.check();
                a.release().unwrap();
                a.check();
            }
        }
        for b in live.drain(..) {
            a.free(b.handle).unwrap();
        }
        a.check();
        assert_eq!(a.stats().allocated, 0);
        a.release().unwrap();
        assert_eq!(a.stats().reserved, 0);
    }
}
