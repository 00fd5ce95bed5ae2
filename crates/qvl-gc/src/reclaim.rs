//! What a collection acts on: anything that can give memory back.

use crate::registry::Forecast;
use qvl_core::BufferAllocator;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// Live and reserved bytes of one member (or of all of them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryUsage {
    /// Bytes in use.
    pub live: u64,
    /// Bytes held (live plus cached).
    pub reserved: u64,
}

impl MemoryUsage {
    /// Bytes held but not in use.
    pub fn cached(&self) -> u64 {
        self.reserved.saturating_sub(self.live)
    }
}

impl std::ops::Add for MemoryUsage {
    type Output = MemoryUsage;
    fn add(self, o: MemoryUsage) -> MemoryUsage {
        MemoryUsage {
            live: self.live + o.live,
            reserved: self.reserved + o.reserved,
        }
    }
}

/// How much a collection asks a member to give back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReclaimGoal {
    /// Idle sweep: give back what the forecast does not expect to reuse.
    Idle,
    /// Pressure: give back at least this many bytes, unexpected sizes first.
    Bytes(u64),
    /// Give back everything unused.
    All,
}

/// The request a member gets: a goal and the registry's forecast.
#[derive(Debug, Clone, Copy)]
pub struct ReclaimHint<'a> {
    /// How much to give back.
    pub goal: ReclaimGoal,
    /// What the registry expects: sizes that will be allocated again soon.
    pub forecast: &'a Forecast,
}

/// The order members are swept in within one collection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ReclaimClass {
    /// Pure garbage (KV blocks of finished requests): always dropped first,
    /// whole.
    Garbage,
    /// Caches of data that could be recomputed or reloaded: trimmed.
    Cache,
    /// Allocators holding freed memory: cached memory released.
    Allocator,
}

/// Something a collection can make give memory back: allocators, caches,
/// the KV blocks of finished requests. Implementations must never free
/// memory that is in use.
pub trait Reclaimable: Send + Sync {
    /// A name for reports ("host pool", "finished kv").
    fn name(&self) -> &str;
    /// When it is swept.
    fn class(&self) -> ReclaimClass {
        ReclaimClass::Allocator
    }
    /// Memory it holds itself; zero when what it holds is counted by an
    /// allocator that is also registered.
    fn usage(&self) -> MemoryUsage {
        MemoryUsage::default()
    }
    /// Gives back unused memory toward `hint.goal`; returns the bytes given back.
    fn reclaim(&self, hint: &ReclaimHint<'_>) -> u64;
}

/// Any [`BufferAllocator`] as a [`Reclaimable`]: its counters are the usage,
/// and [`BufferAllocator::release_cached`] (all or nothing) is the reclaim.
#[derive(Debug)]
pub struct AllocatorReclaim<A> {
    name: String,
    allocator: Arc<A>,
}

impl<A: BufferAllocator> AllocatorReclaim<A> {
    /// Wraps `allocator` under `name`.
    pub fn new(name: impl Into<String>, allocator: Arc<A>) -> Self {
        AllocatorReclaim {
            name: name.into(),
            allocator,
        }
    }
}

impl<A: BufferAllocator> Reclaimable for AllocatorReclaim<A> {
    fn name(&self) -> &str {
        &self.name
    }
    fn usage(&self) -> MemoryUsage {
        let s = self.allocator.stats();
        MemoryUsage {
            live: s.allocated_bytes,
            reserved: s.reserved_bytes,
        }
    }
    fn reclaim(&self, hint: &ReclaimHint<'_>) -> u64 {
        // It cannot choose what to keep: an idle sweep leaves it alone
        // unless it holds cached memory at all.
        let s = self.allocator.stats();
        if hint.goal == ReclaimGoal::Idle && s.reserved_bytes <= s.allocated_bytes {
            return 0;
        }
        self.allocator.release_cached()
    }
}

/// A cache trimmed through two closures: one reports its usage, one trims
/// it toward a goal and returns the bytes freed.
pub struct CacheTrim<U, T> {
    name: String,
    usage: U,
    trim: T,
}

impl<U, T> CacheTrim<U, T>
where
    U: Fn() -> MemoryUsage + Send + Sync,
    T: Fn(&ReclaimHint<'_>) -> u64 + Send + Sync,
{
    /// A cache called `name`.
    pub fn new(name: impl Into<String>, usage: U, trim: T) -> Self {
        CacheTrim {
            name: name.into(),
            usage,
            trim,
        }
    }
}

impl<U, T> Reclaimable for CacheTrim<U, T>
where
    U: Fn() -> MemoryUsage + Send + Sync,
    T: Fn(&ReclaimHint<'_>) -> u64 + Send + Sync,
{
    fn name(&self) -> &str {
        &self.name
    }
    fn class(&self) -> ReclaimClass {
        ReclaimClass::Cache
    }
    fn usage(&self) -> MemoryUsage {
        (self.usage)()
    }
    fn reclaim(&self, hint: &ReclaimHint<'_>) -> u64 {
        (self.trim)(hint)
    }
}

/// The KV blocks of requests, by request id: blocks of running requests are
/// live and untouchable; a finished request's blocks are garbage that the
/// next collection drops (returning them to their allocator).
pub struct KvBlockLedger<B> {
    name: String,
    owns_memory: bool,
    inner: Mutex<Ledger<B>>,
}

struct Ledger<B> {
    running: HashMap<u64, Vec<(B, usize)>>,
    finished: Vec<(B, usize)>,
    running_bytes: u64,
    finished_bytes: u64,
}

impl<B: Send> KvBlockLedger<B> {
    /// An empty ledger. `owns_memory`: the blocks are not counted by a
    /// registered allocator, so the ledger reports them as its usage.
    pub fn new(name: impl Into<String>, owns_memory: bool) -> Self {
        KvBlockLedger {
            name: name.into(),
            owns_memory,
            inner: Mutex::new(Ledger {
                running: HashMap::new(),
                finished: Vec::new(),
                running_bytes: 0,
                finished_bytes: 0,
            }),
        }
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger<B>> {
        // The ledger's maps stay consistent between statements: a panic in
        // a caller's closure leaves them usable.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds `block` of `bytes` to the running request `request`. Adding to
    /// a request that already finished starts it again.
    pub fn push(&self, request: u64, block: B, bytes: usize) {
        let mut l = self.ledger();
        l.running.entry(request).or_default().push((block, bytes));
        l.running_bytes += bytes as u64;
    }

    /// Runs `f` on the blocks of the running request; None if it is not running.
    pub fn with_blocks<R>(
        &self,
        request: u64,
        f: impl FnOnce(&mut [(B, usize)]) -> R,
    ) -> Option<R> {
        let mut l = self.ledger();
        l.running.get_mut(&request).map(|v| f(v))
    }

    /// Marks `request` finished: its blocks become garbage. Returns how many
    /// blocks it had (0 if it was not running).
    pub fn finish(&self, request: u64) -> usize {
        let mut l = self.ledger();
        let Some(blocks) = l.running.remove(&request) else {
            return 0;
        };
        let bytes: u64 = blocks.iter().map(|b| b.1 as u64).sum();
        l.running_bytes -= bytes;
        l.finished_bytes += bytes;
        let n = blocks.len();
        l.finished.extend(blocks);
        n
    }

    /// Takes the running request's blocks back (to export or move them);
    /// the ledger forgets them.
    pub fn take(&self, request: u64) -> Option<Vec<B>> {
        let mut l = self.ledger();
        let blocks = l.running.remove(&request)?;
        l.running_bytes -= blocks.iter().map(|b| b.1 as u64).sum::<u64>();
        Some(blocks.into_iter().map(|b| b.0).collect())
    }

    /// Bytes of running requests' blocks, and of finished ones not yet dropped.
    pub fn bytes(&self) -> (u64, u64) {
        let l = self.ledger();
        (l.running_bytes, l.finished_bytes)
    }

    /// Requests running.
    pub fn running_requests(&self) -> usize {
        self.ledger().running.len()
    }
}

impl<B: Send> Reclaimable for KvBlockLedger<B> {
    fn name(&self) -> &str {
        &self.name
    }
    fn class(&self) -> ReclaimClass {
        ReclaimClass::Garbage
    }
    fn usage(&self) -> MemoryUsage {
        if !self.owns_memory {
            return MemoryUsage::default();
        }
        let (running, finished) = self.bytes();
        MemoryUsage {
            live: running,
            reserved: running + finished,
        }
    }
    fn reclaim(&self, _hint: &ReclaimHint<'_>) -> u64 {
        let garbage = {
            let mut l = self.ledger();
            l.finished_bytes = 0;
            std::mem::take(&mut l.finished)
        };
        // Dropped outside the lock: returning blocks may take the allocator's.
        garbage.into_iter().map(|b| b.1 as u64).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ledger_drops_only_finished_requests() {
        let ledger = KvBlockLedger::new("kv", true);
        ledger.push(1, vec![1u8; 100], 100);
        ledger.push(2, vec![2u8; 100], 100);
        ledger.push(2, vec![2u8; 50], 50);
        assert_eq!(ledger.finish(2), 2);
        assert_eq!(ledger.finish(9), 0);
        assert_eq!(ledger.bytes(), (100, 150));
        let f = Forecast::default();
        let hint = ReclaimHint {
            goal: ReclaimGoal::Idle,
            forecast: &f,
        };
        assert_eq!(ledger.usage().cached(), 150);
        assert_eq!(ledger.reclaim(&hint), 150);
        assert_eq!(ledger.bytes(), (100, 0));
        assert_eq!(ledger.with_blocks(1, |b| b[0].0[0]), Some(1));
        assert!(ledger.with_blocks(2, |_| ()).is_none());
        assert_eq!(ledger.take(1).map(|v| v.len()), Some(1));
        assert_eq!(ledger.running_requests(), 0);
    }
}
