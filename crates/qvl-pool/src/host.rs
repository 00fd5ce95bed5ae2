//! The host pool: size classes with thread caches for small buffers, a
//! best-fit arena for large ones, slab pools for configured tensor shapes,
//! and the system allocator behind them all.

use crate::backing::{Backing, HostBacking};
use crate::bfc::{BfcArena, Block, BlockHandle};
use crate::size_class::{
    class_of, class_size, run_bytes, thread_cache_slots, NUM_CLASSES, SMALL_MAX,
};
use crate::slots::SlotStore;
use crate::{PoolConfig, PoolError};
use qvl_core::{
    AllocRequest, AllocatorStats, BufferAllocator, ByteSize, MetricEvent, MetricsRecorder,
    TensorKind, Tier,
};
use std::alloc::Layout;
use std::cell::RefCell;
use std::ptr::NonNull;
use std::sync::atomic::{
    AtomicU64,
    Ordering::{AcqRel, Relaxed},
};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Instant;

/// Empty runs are reclaimed before the arena grows, but at most once per
/// this many misses of the arena: a reclaim scans every free slot.
const RECLAIM_EVERY: usize = 16;
/// Alignment every buffer has at least.
const MIN_ALIGN: usize = AllocRequest::DEFAULT_ALIGN;

/// Gives each pool an id that thread caches are keyed by; never reused.
static NEXT_POOL_ID: AtomicU64 = AtomicU64::new(1);

/// A pool of host buffers, shared by cloning (all clones are one pool).
///
/// Buffers go back to the pool when dropped, from any thread. See the crate
/// documentation for how requests are routed.
#[derive(Clone)]
pub struct HostPool {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for HostPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostPool")
            .field("config", &self.shared.config)
            .field("stats", &self.stats())
            .finish()
    }
}

/// Occupancy of one specialized pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlabPoolStats {
    /// Name from the configuration.
    pub name: String,
    /// Role of its tensors.
    pub kind: TensorKind,
    /// Bytes of one tensor.
    pub tensor_bytes: usize,
    /// Slots made so far.
    pub total_slots: usize,
    /// Slots free.
    pub free_slots: usize,
}

struct SlabPool {
    name: String,
    kind: TensorKind,
    /// Bytes of the tensors it serves (the request must match exactly).
    tensor_bytes: usize,
    /// Largest alignment its slots guarantee.
    align: usize,
    /// Slots kept through [`BufferAllocator::release_cached`].
    initial: usize,
    store: SlotStore,
}

#[derive(Debug, Clone, Copy)]
struct SlabRoute {
    kind: TensorKind,
    tensor_bytes: usize,
    align: usize,
}

struct Inner {
    arena: BfcArena<HostBacking>,
    classes: Vec<SlotStore>,
    slabs: Vec<SlabPool>,
    /// Arena misses since empty runs were last reclaimed.
    blocks_since_reclaim: usize,
}

/// Operation counts of one thread, written only by that thread (a plain
/// load and store, no locked instruction) and summed by `stats`.
#[derive(Default)]
struct ThreadCounts {
    allocs: AtomicU64,
    frees: AtomicU64,
}

impl ThreadCounts {
    fn bump(counter: &AtomicU64) {
        // Single writer: a read-modify-write needs no atomicity.
        counter.store(counter.load(Relaxed) + 1, Relaxed);
    }
}

#[derive(Default)]
struct Counters {
    allocated: AtomicU64,
    peak_allocated: AtomicU64,
    arena_reserved: AtomicU64,
    system_bytes: AtomicU64,
    peak_reserved: AtomicU64,
    /// Allocations and frees counted here only by threads without a cache
    /// (exiting); the others count in their [`ThreadCounts`].
    alloc_count: AtomicU64,
    free_count: AtomicU64,
    system_allocs: AtomicU64,
    system_frees: AtomicU64,
}

struct Shared {
    /// This pool, weakly: what thread caches hold.
    weak: Weak<Shared>,
    id: u64,
    config: PoolConfig,
    base: usize,
    granule: usize,
    /// What each slab pool serves, readable without the lock.
    routes: Vec<SlabRoute>,
    inner: Mutex<Inner>,
    counters: Counters,
    /// Every thread's counts, kept after the thread exits.
    thread_counts: Mutex<Vec<Arc<ThreadCounts>>>,
    recorder: Option<Arc<dyn MetricsRecorder>>,
}

/// Where a buffer came from, so that dropping it returns it there.
#[derive(Debug, Clone, Copy)]
enum Origin {
    Class(u8),
    Slab(u16),
    Block(BlockHandle),
    System { align: usize },
}

/// A buffer from a [`HostPool`]; returned to it when dropped.
///
/// Derefs to its bytes. The contents of a fresh buffer are unspecified
/// (zero or left over from an earlier buffer).
pub struct PoolBuffer {
    ptr: NonNull<u8>,
    len: usize,
    /// Bytes it occupies in the pool (its class, slot or block size).
    held: usize,
    origin: Origin,
    /// The pool, kept alive while any of its buffers is out: the first
    /// buffer of a pool with none out takes a strong reference for all of
    /// them, the last one returned drops it (see `Shared::count_alloc` and
    /// `Shared::give_back`). No reference count per buffer: that would be
    /// two more atomic operations on every allocation and free.
    pool: NonNull<Shared>,
}

// SAFETY: a PoolBuffer owns its byte range exclusively (the pool hands each
// range to one buffer at a time), so moving it to another thread or sharing
// `&PoolBuffer` (read-only bytes) is as safe as for a Vec<u8>. Returning it
// from another thread is supported by the pool.
unsafe impl Send for PoolBuffer {}
// SAFETY: see Send; `&PoolBuffer` only gives shared access to the bytes.
unsafe impl Sync for PoolBuffer {}

impl PoolBuffer {
    /// Bytes requested.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether zero bytes were requested.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes the buffer occupies in the pool (at least [`Self::len`]).
    pub fn held_bytes(&self) -> usize {
        self.held
    }

    /// Whether the buffer came from the pool (false: the system allocator).
    pub fn is_pooled(&self) -> bool {
        !matches!(self.origin, Origin::System { .. })
    }

    /// Address of the first byte.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Mutable address of the first byte.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl std::fmt::Debug for PoolBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolBuffer")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .field("held", &self.held)
            .field("origin", &self.origin)
            .finish()
    }
}

impl std::ops::Deref for PoolBuffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr..ptr+len` is owned by this buffer, inside memory that
        // stays mapped while the pool (held by `self.pool`) lives; its bytes
        // are initialized: fresh pages are zero-filled by the OS or the
        // system allocator (alloc_zeroed), reused ones hold bytes written
        // through earlier buffers.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for PoolBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for PoolBuffer {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl AsMut<[u8]> for PoolBuffer {
    fn as_mut(&mut self) -> &mut [u8] {
        self
    }
}

impl Drop for PoolBuffer {
    fn drop(&mut self) {
        Shared::give_back(self.pool, self.ptr, self.held, self.origin);
    }
}

impl HostPool {
    /// A pool as `config` describes; specialized pools get their initial
    /// slots now.
    pub fn new(config: &PoolConfig) -> Result<HostPool, PoolError> {
        Self::build(config, None)
    }

    /// The same, reporting every allocation and free to `recorder`.
    pub fn with_recorder(
        config: &PoolConfig,
        recorder: Arc<dyn MetricsRecorder>,
    ) -> Result<HostPool, PoolError> {
        Self::build(config, Some(recorder))
    }

    fn build(
        config: &PoolConfig,
        recorder: Option<Arc<dyn MetricsRecorder>>,
    ) -> Result<HostPool, PoolError> {
        config.validate()?;
        let capacity = if config.enabled {
            config.max_pool_size.as_usize()
        } else {
            0
        };
        let backing = HostBacking::reserve(capacity)?;
        let base = backing.base();
        let mut arena = BfcArena::new(backing);
        let granule = arena.granule();
        let classes = (0..NUM_CLASSES)
            .map(|c| SlotStore::new(class_size(c), run_bytes(class_size(c), granule)))
            .collect();
        let mut slabs = Vec::new();
        if config.enabled {
            for (name, spec) in &config.specialized_pools {
                let tensor_bytes = spec.slot_bytes(name)?;
                let stride = if tensor_bytes >= granule {
                    tensor_bytes.div_ceil(granule) * granule
                } else {
                    tensor_bytes.div_ceil(MIN_ALIGN) * MIN_ALIGN
                };
                let align = (1usize << stride.trailing_zeros()).min(granule);
                let run = (stride * 16).min(2 << 20).max(stride);
                let mut store = SlotStore::new(stride, run);
                if spec.initial > 0 {
                    let bytes = stride.saturating_mul(spec.initial);
                    let block = arena
                        .alloc(bytes)?
                        .ok_or_else(|| PoolError::InvalidConfig {
                            pool: name.clone(),
                            reason: format!(
                                "{} initial slots of {} need {}, more than max_pool_size {}",
                                spec.initial,
                                ByteSize(tensor_bytes as u64),
                                ByteSize(bytes as u64),
                                config.max_pool_size
                            ),
                        })?;
                    store.add_run(block);
                }
                slabs.push(SlabPool {
                    name: name.clone(),
                    kind: spec.kind,
                    tensor_bytes,
                    align,
                    initial: spec.initial,
                    store,
                });
            }
        }
        if slabs.len() > usize::from(u16::MAX) {
            return Err(PoolError::InvalidConfig {
                pool: "*".into(),
                reason: format!("{} specialized pools; at most 65535", slabs.len()),
            });
        }
        let routes = slabs
            .iter()
            .map(|s| SlabRoute {
                kind: s.kind,
                tensor_bytes: s.tensor_bytes,
                align: s.align,
            })
            .collect();
        let shared = Arc::new_cyclic(|weak| Shared {
            weak: weak.clone(),
            id: NEXT_POOL_ID.fetch_add(1, Relaxed),
            routes,
            config: config.clone(),
            base,
            granule,
            inner: Mutex::new(Inner {
                arena,
                classes,
                slabs,
                blocks_since_reclaim: RECLAIM_EVERY,
            }),
            counters: Counters::default(),
            thread_counts: Mutex::new(Vec::new()),
            recorder,
        });
        {
            let inner = shared.lock();
            shared.note_reserved(&inner);
        }
        Ok(HostPool { shared })
    }

    /// The configuration the pool was built with.
    pub fn config(&self) -> &PoolConfig {
        &self.shared.config
    }

    /// Occupancy of each specialized pool, in name order.
    pub fn slab_stats(&self) -> Vec<SlabPoolStats> {
        let inner = self.shared.lock();
        inner
            .slabs
            .iter()
            .map(|s| SlabPoolStats {
                name: s.name.clone(),
                kind: s.kind,
                tensor_bytes: s.tensor_bytes,
                total_slots: s.store.total_slots(),
                free_slots: s.store.free_slots(),
            })
            .collect()
    }

    /// Hands the free buffers that this thread keeps for quick reuse back to
    /// the shared pool (done automatically when the thread exits).
    pub fn flush_thread_cache(&self) {
        tls::with_cache(&self.shared, |cache| {
            let mut inner = self.shared.lock();
            cache.drain_into(&mut inner);
        });
    }

    /// Sends the current memory counters to the recorder, if there is one.
    pub fn record_memory(&self) {
        if let Some(recorder) = &self.shared.recorder {
            let s = self.stats();
            recorder.record(&MetricEvent::Memory {
                tier: Tier::HostRam,
                allocated: s.allocated_bytes,
                reserved: s.reserved_bytes,
            });
        }
    }
}

impl BufferAllocator for HostPool {
    type Buffer = PoolBuffer;

    fn tier(&self) -> Tier {
        Tier::HostRam
    }

    fn allocate(&self, request: &AllocRequest) -> qvl_core::Result<PoolBuffer> {
        if !request.align.is_power_of_two() {
            return Err(PoolError::BadAlignment {
                align: request.align,
                bytes: request.bytes,
            }
            .into());
        }
        let started = self.shared.recorder.as_ref().map(|_| Instant::now());
        let buffer = self.shared.allocate(request)?;
        if let (Some(recorder), Some(started)) = (&self.shared.recorder, started) {
            recorder.record(&MetricEvent::Alloc {
                tier: Tier::HostRam,
                kind: request.kind,
                bytes: buffer.held as u64,
                latency: started.elapsed(),
            });
        }
        Ok(buffer)
    }

    fn stats(&self) -> AllocatorStats {
        let c = &self.shared.counters;
        let (allocs, frees) = self
            .shared
            .thread_counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .fold((0, 0), |(a, f), t| {
                (a + t.allocs.load(Relaxed), f + t.frees.load(Relaxed))
            });
        let (commits, decommits) = {
            let inner = self.shared.lock();
            let s = inner.arena.stats();
            (s.commits, s.decommits)
        };
        let allocated = c.allocated.load(Relaxed);
        let reserved = c.arena_reserved.load(Relaxed) + c.system_bytes.load(Relaxed);
        AllocatorStats {
            allocated_bytes: allocated,
            reserved_bytes: reserved,
            // A peak is raised just after its counter, so a snapshot taken
            // in between would show less than the current value; the peak
            // is at least what was just read.
            peak_allocated_bytes: c.peak_allocated.load(Relaxed).max(allocated),
            peak_reserved_bytes: c.peak_reserved.load(Relaxed).max(reserved),
            alloc_count: c.alloc_count.load(Relaxed) + allocs,
            free_count: c.free_count.load(Relaxed) + frees,
            os_alloc_count: commits + c.system_allocs.load(Relaxed),
            os_free_count: decommits + c.system_frees.load(Relaxed),
        }
    }

    /// Flushes this thread's cache, hands empty runs of the size classes and
    /// slab pools (beyond their initial slots) back to the arena, then gives
    /// every free arena block back to the OS. Buffers kept by other threads'
    /// caches stay cached (at most about 128 KiB per class and thread).
    fn release_cached(&self) -> u64 {
        self.flush_thread_cache();
        let released = {
            let mut inner = self.shared.lock();
            let result = inner.reclaim_runs(true).and_then(|_| inner.arena.release());
            self.shared.note_reserved(&inner);
            match result {
                Ok(bytes) => bytes as u64,
                Err(err) => {
                    tracing::warn!("releasing cached host memory: {err}");
                    0
                }
            }
        };
        self.record_memory();
        released
    }
}

impl Inner {
    /// Hands runs whose slots are all free back to the arena; slab pools
    /// keep their initial slots when `keep_initial`.
    fn reclaim_runs(&mut self, keep_initial: bool) -> Result<usize, PoolError> {
        let mut bytes = 0;
        for store in &mut self.classes {
            bytes += store.reclaim(&mut self.arena, 0)?;
        }
        for slab in &mut self.slabs {
            let keep = if keep_initial { slab.initial } else { 0 };
            bytes += slab.store.reclaim(&mut self.arena, keep)?;
        }
        Ok(bytes)
    }

    /// A block of at least `bytes`: a cached one, else one made by handing
    /// empty runs back, else one from growing the arena. None when the arena
    /// is full. `long_lived` blocks (runs of slots) are placed high.
    fn alloc_block(&mut self, bytes: usize, pool: &Shared) -> Result<Option<Block>, PoolError> {
        let cached = |arena: &mut BfcArena<HostBacking>| arena.alloc_cached(bytes);
        if let Some(block) = cached(&mut self.arena) {
            return Ok(Some(block));
        }
        // Memory stuck in empty runs is what makes reserved exceed live, so
        // before growing, reclaim them, with this thread's cached slots back
        // in their runs. (Taking the thread cache under the lock is safe: no
        // path holding a thread cache waits for anything this thread holds.)
        // Not at every miss: runs taken back for a large block and then
        // needed again by their class would bounce between the two, each
        // time paying for the scan, instead of the arena growing once.
        self.blocks_since_reclaim += 1;
        if self.blocks_since_reclaim >= RECLAIM_EVERY {
            self.blocks_since_reclaim = 0;
            tls::with_cache(pool, |cache| cache.drain_into(self));
            if self.reclaim_runs(true)? > 0 {
                if let Some(block) = cached(&mut self.arena) {
                    return Ok(Some(block));
                }
            }
        }
        if let Some(block) = self.arena.alloc(bytes)? {
            return Ok(Some(block));
        }
        if self.reclaim_runs(false)? > 0 {
            return self.arena.alloc(bytes);
        }
        Ok(None)
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while the lock was held cannot leave the bookkeeping half
        // changed in a way that matters more than losing the pool: go on.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes the arena's reserved bytes and updates the peak.
    fn note_reserved(&self, inner: &Inner) {
        let c = &self.counters;
        let arena = inner.arena.stats().reserved as u64;
        c.arena_reserved.store(arena, Relaxed);
        c.peak_reserved
            .fetch_max(arena + c.system_bytes.load(Relaxed), Relaxed);
    }

    /// The specialized pool serving `request`: same kind, same byte size,
    /// an alignment its slots provide.
    fn slab_for(&self, request: &AllocRequest) -> Option<usize> {
        self.routes.iter().position(|r| {
            r.kind == request.kind && r.tensor_bytes == request.bytes && request.align <= r.align
        })
    }

    fn allocate(self: &Arc<Self>, request: &AllocRequest) -> Result<PoolBuffer, PoolError> {
        let bytes = request.bytes;
        let align = request.align.max(MIN_ALIGN);
        if !self.config.enabled || align > self.granule {
            return self.system(bytes, align);
        }
        if !self.routes.is_empty() {
            if let Some(slab) = self.slab_for(request) {
                let mut inner = self.lock();
                if let Some(offset) = self.slab_take(&mut inner, slab)? {
                    let stride = inner.slabs[slab].store.slot_bytes();
                    drop(inner);
                    // Checked in `build`: at most u16::MAX slab pools.
                    return Ok(self.pooled(offset, bytes, stride, Origin::Slab(slab as u16)));
                }
                drop(inner);
                return self.system(bytes, align);
            }
        }
        if bytes <= SMALL_MAX {
            let class = class_of(bytes.max(1));
            let held = class_size(class);
            if held % align == 0 {
                // NUM_CLASSES is below 256 (a const assertion in size_class).
                let origin = Origin::Class(class as u8);
                if let Some(offset) = tls::pop(self, class) {
                    return Ok(self.pooled(offset, bytes, held, origin));
                }
                if let Some(offset) = self.refill(class)? {
                    return Ok(self.pooled(offset, bytes, held, origin));
                }
                return self.system(bytes, align);
            }
        }
        let block = {
            let mut inner = self.lock();
            let block = inner.alloc_block(bytes, self)?;
            self.note_reserved(&inner);
            block
        };
        match block {
            Some(block) => {
                Ok(self.pooled(block.offset, bytes, block.size, Origin::Block(block.handle)))
            }
            None => self.system(bytes, align),
        }
    }

    /// Takes a batch of slots of `class` from the shared store (adding a run
    /// when it is empty): one is returned, the rest go to this thread's cache.
    fn refill(self: &Arc<Self>, class: usize) -> Result<Option<usize>, PoolError> {
        let batch_len = (thread_cache_slots(class_size(class)) / 2).max(1);
        let mut batch = [0usize; 64];
        let mut taken = 0;
        {
            let mut inner = self.lock();
            if inner.classes[class].free_slots() == 0 {
                let want = inner.classes[class].run_request(batch_len);
                let block = inner.alloc_block(want, self)?;
                self.note_reserved(&inner);
                match block {
                    Some(block) => inner.classes[class].add_run(block),
                    None => return Ok(None),
                }
            }
            let store = &mut inner.classes[class];
            while taken < batch_len.min(batch.len()) {
                let Some(offset) = store.pop() else { break };
                batch[taken] = offset;
                taken += 1;
            }
        }
        if taken == 0 {
            return Ok(None);
        }
        let first = batch[0];
        let rest = &batch[1..taken];
        if !rest.is_empty() && !tls::fill(self, class, rest) {
            // No thread cache (thread shutting down): return them.
            let mut inner = self.lock();
            for &offset in rest {
                inner.classes[class].push(offset);
            }
        }
        Ok(Some(first))
    }

    fn slab_take(
        self: &Arc<Self>,
        inner: &mut Inner,
        slab: usize,
    ) -> Result<Option<usize>, PoolError> {
        if let Some(offset) = inner.slabs[slab].store.pop() {
            return Ok(Some(offset));
        }
        let want = inner.slabs[slab].store.run_request(1);
        let block = inner.alloc_block(want, self)?;
        self.note_reserved(inner);
        Ok(block.and_then(|block| {
            let store = &mut inner.slabs[slab].store;
            store.add_run(block);
            store.pop()
        }))
    }

    fn pooled(
        self: &Arc<Self>,
        offset: usize,
        len: usize,
        held: usize,
        origin: Origin,
    ) -> PoolBuffer {
        self.count_alloc(held);
        let addr = self.base + offset;
        PoolBuffer {
            // The arena's base is a non-null mapping address, so base+offset
            // within the mapping is non-null too.
            ptr: NonNull::new(addr as *mut u8).unwrap_or(NonNull::dangling()),
            len,
            held,
            origin,
            pool: NonNull::from(&**self),
        }
    }

    fn system(self: &Arc<Self>, bytes: usize, align: usize) -> Result<PoolBuffer, PoolError> {
        let layout = Layout::from_size_align(bytes.max(1), align).map_err(|_| {
            PoolError::SystemOutOfMemory {
                bytes: ByteSize(bytes as u64),
                align,
            }
        })?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or(PoolError::SystemOutOfMemory {
            bytes: ByteSize(bytes as u64),
            align,
        })?;
        let c = &self.counters;
        c.system_allocs.fetch_add(1, Relaxed);
        let system = c.system_bytes.fetch_add(layout.size() as u64, Relaxed) + layout.size() as u64;
        c.peak_reserved
            .fetch_max(system + c.arena_reserved.load(Relaxed), Relaxed);
        self.count_alloc(layout.size());
        Ok(PoolBuffer {
            ptr,
            len: bytes,
            held: layout.size(),
            origin: Origin::System { align },
            pool: NonNull::from(&**self),
        })
    }

    /// Counts a buffer handed out; the first one out takes the buffers'
    /// strong reference to the pool.
    fn count_alloc(self: &Arc<Self>, held: usize) {
        let c = &self.counters;
        let before = c.allocated.fetch_add(held as u64, Relaxed);
        if before == 0 {
            // SAFETY: `self` is a live Arc, so the count is at least one;
            // the reference taken here is dropped by the `give_back` that
            // brings `allocated` back to zero (every buffer holds at least
            // one byte, so zero means none is out).
            unsafe { Arc::increment_strong_count(Arc::as_ptr(self)) };
        }
        let now = before + held as u64;
        if now > c.peak_allocated.load(Relaxed) {
            c.peak_allocated.fetch_max(now, Relaxed);
        }
        if tls::with_cache(self, |cache| ThreadCounts::bump(&cache.counts.allocs)).is_none() {
            c.alloc_count.fetch_add(1, Relaxed);
        }
    }

    /// Takes a buffer back. Everything that touches the pool happens before
    /// the last step, which may drop the pool (the last buffer of a pool
    /// whose handles are all gone).
    fn give_back(pool: NonNull<Shared>, ptr: NonNull<u8>, held: usize, origin: Origin) {
        let last_out = {
            // SAFETY: a buffer is out, so its pool holds the buffers' strong
            // reference (taken in `count_alloc`) and is alive.
            let shared = unsafe { pool.as_ref() };
            shared.take_back(ptr, held, origin)
        };
        if last_out {
            // SAFETY: this was the last buffer out; the reference it drops
            // is the one `count_alloc` took, and nothing here uses the pool
            // after it.
            unsafe { Arc::decrement_strong_count(pool.as_ptr()) };
        }
    }

    /// Returns a buffer's memory and counts it; true when it was the last
    /// buffer out.
    fn take_back(&self, ptr: NonNull<u8>, held: usize, origin: Origin) -> bool {
        let offset = (ptr.as_ptr() as usize).wrapping_sub(self.base);
        match origin {
            Origin::Class(class) => {
                let class = usize::from(class);
                if !tls::push(self, class, offset) {
                    self.lock().classes[class].push(offset);
                }
            }
            Origin::Slab(slab) => self.lock().slabs[usize::from(slab)].store.push(offset),
            Origin::Block(handle) => {
                let mut inner = self.lock();
                if let Err(err) = inner.arena.free(handle) {
                    // Unreachable through the safe API (a buffer is dropped
                    // once); refused without touching the arena if it happens.
                    tracing::error!("host pool: {err}");
                    debug_assert!(false, "host pool: {err}");
                    return false;
                }
            }
            Origin::System { align } => {
                // The layout was valid when the buffer was allocated.
                if let Ok(layout) = Layout::from_size_align(held, align) {
                    // SAFETY: `ptr` came from `alloc_zeroed` with this layout
                    // (held is the layout's size) and is freed exactly once,
                    // here in the buffer's drop.
                    unsafe { std::alloc::dealloc(ptr.as_ptr(), layout) };
                }
                let c = &self.counters;
                c.system_bytes.fetch_sub(held as u64, Relaxed);
                c.system_frees.fetch_add(1, Relaxed);
            }
        }
        let c = &self.counters;
        if tls::with_cache(self, |cache| ThreadCounts::bump(&cache.counts.frees)).is_none() {
            c.free_count.fetch_add(1, Relaxed);
        }
        if let Some(recorder) = &self.recorder {
            recorder.record(&MetricEvent::Free {
                tier: Tier::HostRam,
                bytes: held as u64,
            });
        }
        // AcqRel: this thread's uses of the pool happen before whichever
        // thread brings the count to zero and may drop the pool.
        c.allocated.fetch_sub(held as u64, AcqRel) == held as u64
    }
}

/// Per-thread caches of free size-class slots, one per pool the thread uses.
mod tls {
    use super::*;

    pub(super) struct ThreadCache {
        pool_id: u64,
        pool: Weak<Shared>,
        pub(super) counts: Arc<ThreadCounts>,
        bins: Vec<Vec<usize>>,
    }

    impl ThreadCache {
        pub(super) fn drain_into(&mut self, inner: &mut Inner) {
            for (class, bin) in self.bins.iter_mut().enumerate() {
                for offset in bin.drain(..) {
                    inner.classes[class].push(offset);
                }
            }
        }
    }

    impl Drop for ThreadCache {
        fn drop(&mut self) {
            // The thread is exiting (or the pool is gone, and then there is
            // nothing to return to).
            if let Some(pool) = self.pool.upgrade() {
                let mut inner = pool.lock();
                self.drain_into(&mut inner);
            }
        }
    }

    thread_local! {
        static CACHES: RefCell<Vec<ThreadCache>> = const { RefCell::new(Vec::new()) };
    }

    /// Runs `f` on this thread's cache for `pool`, making it if needed. None
    /// when the thread's caches are unavailable (the thread is exiting).
    ///
    /// Lock order: a thread may lock the pool while holding its cache, never
    /// the reverse (nothing here runs under the pool's lock).
    pub(super) fn with_cache<R>(pool: &Shared, f: impl FnOnce(&mut ThreadCache) -> R) -> Option<R> {
        CACHES
            .try_with(|caches| {
                let mut caches = caches.try_borrow_mut().ok()?;
                let index = match caches.iter().position(|c| c.pool_id == pool.id) {
                    Some(i) => i,
                    None => {
                        // Forget caches of pools that are gone; their drop
                        // finds no pool and locks nothing.
                        caches.retain(|c| c.pool.strong_count() > 0);
                        let counts = Arc::new(ThreadCounts::default());
                        pool.thread_counts
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(Arc::clone(&counts));
                        caches.push(ThreadCache {
                            counts,
                            pool_id: pool.id,
                            pool: pool.weak.clone(),
                            bins: (0..NUM_CLASSES).map(|_| Vec::new()).collect(),
                        });
                        caches.len() - 1
                    }
                };
                Some(f(&mut caches[index]))
            })
            .ok()
            .flatten()
    }

    pub(super) fn pop(pool: &Shared, class: usize) -> Option<usize> {
        with_cache(pool, |c| c.bins[class].pop()).flatten()
    }

    /// Puts `offsets` of `class` into this thread's cache; false when there is none.
    pub(super) fn fill(pool: &Shared, class: usize, offsets: &[usize]) -> bool {
        with_cache(pool, |c| c.bins[class].extend_from_slice(offsets)).is_some()
    }

    /// Returns one slot to this thread's cache, handing half of the bin to the
    /// shared store when it is full; false when there is no cache.
    pub(super) fn push(pool: &Shared, class: usize, offset: usize) -> bool {
        with_cache(pool, |c| {
            let bin = &mut c.bins[class];
            bin.push(offset);
            let limit = thread_cache_slots(class_size(class));
            if bin.len() > limit {
                let keep = limit / 2;
                let mut inner = pool.lock();
                for offset in bin.drain(keep..) {
                    inner.classes[class].push(offset);
                }
            }
        })
        .is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SpecializedPoolConfig;
    use qvl_core::{DType, TensorMeta};
    use std::collections::BTreeMap;
    use std::sync::atomic::AtomicUsize;

    fn pool(max: ByteSize) -> HostPool {
        HostPool::new(&PoolConfig {
            max_pool_size: max,
            ..PoolConfig::default()
        })
        .unwrap()
    }

    fn act(bytes: usize) -> AllocRequest {
        AllocRequest::bytes(bytes, TensorKind::Activation)
    }

    #[test]
    fn small_buffers_are_aligned_distinct_and_reused() {
        let p = pool(ByteSize::mib(64));
        let mut a = p.allocate(&act(1000)).unwrap();
        let b = p.allocate(&act(1000)).unwrap();
        assert_eq!(a.len(), 1000);
        assert_eq!(a.held_bytes(), 1024);
        assert!(a.is_pooled());
        assert_ne!(a.as_ptr(), b.as_ptr());
        assert_eq!(a.as_ptr() as usize % 64, 0);
        a.fill(0xAB);
        assert!(a.iter().all(|&x| x == 0xAB));
        let addr = a.as_ptr();
        drop(a);
        // The thread cache hands the same slot back first.
        let c = p.allocate(&act(970)).unwrap();
        assert_eq!(c.as_ptr(), addr);
        drop((b, c));
        let s = p.stats();
        assert_eq!(s.allocated_bytes, 0);
        assert_eq!(s.alloc_count, 3);
        assert_eq!(s.free_count, 3);
    }

    #[test]
    fn large_and_page_aligned_buffers_come_from_the_arena() {
        let p = pool(ByteSize::mib(64));
        let big = p.allocate(&act(3 << 20)).unwrap();
        assert!(big.is_pooled());
        assert_eq!(big.held_bytes(), 3 << 20);
        let direct = p.allocate(&act(1000).with_align(4096)).unwrap();
        assert_eq!(direct.as_ptr() as usize % 4096, 0);
        assert_eq!(direct.held_bytes(), 4096);
        let s = p.stats();
        assert_eq!(s.allocated_bytes, (3 << 20) + 4096);
        assert_eq!(s.reserved_bytes, (3 << 20) + 4096);
        drop(big);
        drop(direct);
        assert_eq!(p.stats().allocated_bytes, 0);
        assert_eq!(p.release_cached(), (3 << 20) + 4096);
        assert_eq!(p.stats().reserved_bytes, 0);
        assert_eq!(p.stats().peak_reserved_bytes, (3 << 20) + 4096);
    }

    #[test]
    fn exhausted_pool_falls_back_to_the_system() {
        let p = pool(ByteSize::mib(1));
        let a = p.allocate(&act(768 << 10)).unwrap();
        assert!(a.is_pooled());
        let b = p.allocate(&act(768 << 10)).unwrap();
        assert!(!b.is_pooled(), "past max_pool_size the system serves");
        assert!(b.iter().all(|&x| x == 0));
        // Alignments beyond a page also go to the system.
        let c = p.allocate(&act(100).with_align(1 << 16)).unwrap();
        assert_eq!(c.as_ptr() as usize % (1 << 16), 0);
        assert!(!c.is_pooled());
        let s = p.stats();
        assert!(s.reserved_bytes <= (1 << 20) + (768 << 10) + (1 << 16));
        drop((a, b, c));
        let s = p.stats();
        assert_eq!(s.allocated_bytes, 0);
        assert_eq!(s.os_alloc_count - s.os_free_count, 1, "the arena's commit");
    }

    #[test]
    fn disabled_pool_is_the_plain_path() {
        let p = HostPool::new(&PoolConfig {
            enabled: false,
            ..PoolConfig::default()
        })
        .unwrap();
        let a = p.allocate(&act(5000)).unwrap();
        assert!(!a.is_pooled());
        assert_eq!(a.len(), 5000);
        assert!(a.iter().all(|&x| x == 0), "zeroed like SystemAllocator");
        assert_eq!(p.stats().reserved_bytes, 5000);
        drop(a);
        assert_eq!(p.stats().reserved_bytes, 0);
    }

    #[test]
    fn bad_alignment_is_a_clear_error() {
        let p = pool(ByteSize::mib(1));
        let err = p.allocate(&act(10).with_align(48)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid input: alignment 48 of a 10-byte request is not a power of two"
        );
    }

    fn kv_meta() -> TensorMeta {
        TensorMeta::new(vec![2, 16, 8, 128], DType::F16, TensorKind::KvCache)
    }

    fn kv_pool(initial: usize) -> HostPool {
        let mut specialized = BTreeMap::new();
        specialized.insert(
            "kv_cache".to_string(),
            SpecializedPoolConfig::for_tensor(&kv_meta(), initial),
        );
        HostPool::new(&PoolConfig {
            max_pool_size: ByteSize::mib(256),
            specialized_pools: specialized,
            ..PoolConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn kv_blocks_come_from_their_slab_pool() {
        let p = kv_pool(8);
        let stats = &p.slab_stats()[0];
        assert_eq!((stats.total_slots, stats.free_slots), (8, 8));
        assert_eq!(p.stats().reserved_bytes, 8 * (64 << 10));
        let blocks: Vec<_> = (0..20)
            .map(|_| p.allocate(&AllocRequest::tensor(kv_meta())).unwrap())
            .collect();
        assert!(blocks
            .iter()
            .all(|b| b.held_bytes() == 64 << 10 && b.is_pooled()));
        let stats = &p.slab_stats()[0];
        assert_eq!(stats.total_slots - stats.free_slots, 20);
        // An activation of the same size does not take KV slots.
        let a = p.allocate(&act(64 << 10)).unwrap();
        assert_eq!(
            p.slab_stats()[0].total_slots - p.slab_stats()[0].free_slots,
            20
        );
        drop(a);
        drop(blocks);
        assert_eq!(p.slab_stats()[0].free_slots, p.slab_stats()[0].total_slots);
        p.release_cached();
        // The initial slots stay.
        assert_eq!(p.slab_stats()[0].total_slots, 8);
        assert_eq!(p.stats().allocated_bytes, 0);
    }

    #[test]
    fn initial_slots_beyond_the_limit_are_a_config_error() {
        let mut specialized = BTreeMap::new();
        specialized.insert(
            "kv".to_string(),
            SpecializedPoolConfig::for_tensor(&kv_meta(), 100),
        );
        let err = HostPool::new(&PoolConfig {
            max_pool_size: ByteSize::mib(1),
            specialized_pools: specialized,
            ..PoolConfig::default()
        })
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "pool.specialized_pools.kv: 100 initial slots of 64KiB need 6.2MiB, more than max_pool_size 1MiB"
        );
    }

    #[test]
    fn empty_runs_serve_large_blocks_before_the_arena_grows() {
        let p = pool(ByteSize::mib(64));
        let small: Vec<_> = (0..1024).map(|_| p.allocate(&act(4096)).unwrap()).collect();
        let reserved = p.stats().reserved_bytes;
        assert!(reserved >= 4 << 20);
        drop(small);
        // The runs are empty (partly in this thread's cache): a large block
        // takes their memory instead of growing the arena.
        let big = p.allocate(&act(3 << 20)).unwrap();
        assert!(big.is_pooled());
        assert_eq!(p.stats().reserved_bytes, reserved);
        drop(big);
        assert_eq!(p.stats().allocated_bytes, 0);
    }

    #[test]
    fn release_returns_everything_cached() {
        let p = pool(ByteSize::mib(512));
        let bufs: Vec<_> = (0..2000)
            .map(|i| p.allocate(&act(512 + (i * 997) % (600 << 10))).unwrap())
            .collect();
        assert!(p.stats().reserved_bytes >= p.stats().allocated_bytes);
        drop(bufs);
        let s = p.stats();
        assert_eq!(s.allocated_bytes, 0);
        assert!(s.reserved_bytes > 0);
        let released = p.release_cached();
        assert_eq!(released, s.reserved_bytes);
        assert_eq!(p.stats().reserved_bytes, 0);
    }

    #[derive(Default)]
    struct CountingRecorder {
        allocs: AtomicUsize,
        frees: AtomicUsize,
        memory: AtomicUsize,
    }

    impl MetricsRecorder for CountingRecorder {
        fn record(&self, event: &MetricEvent) {
            match event {
                MetricEvent::Alloc { tier, .. } => {
                    assert_eq!(*tier, Tier::HostRam);
                    self.allocs.fetch_add(1, Relaxed);
                }
                MetricEvent::Free { .. } => {
                    self.frees.fetch_add(1, Relaxed);
                }
                MetricEvent::Memory { .. } => {
                    self.memory.fetch_add(1, Relaxed);
                }
                _ => {}
            }
        }
    }

    #[test]
    fn events_reach_the_recorder() {
        let recorder = Arc::new(CountingRecorder::default());
        let p = HostPool::with_recorder(&PoolConfig::default(), recorder.clone()).unwrap();
        drop(p.allocate(&act(100)).unwrap());
        drop(p.allocate(&act(1 << 20)).unwrap());
        p.release_cached();
        assert_eq!(recorder.allocs.load(Relaxed), 2);
        assert_eq!(recorder.frees.load(Relaxed), 2);
        assert_eq!(recorder.memory.load(Relaxed), 1);
    }

    #[test]
    fn the_pool_lives_exactly_as_long_as_its_handles_and_buffers() {
        let recorder = Arc::new(CountingRecorder::default());
        let p = HostPool::with_recorder(&PoolConfig::default(), recorder.clone()).unwrap();
        let small = p.allocate(&act(100)).unwrap();
        let large = p.allocate(&act(1 << 20)).unwrap();
        drop(p);
        // Buffers keep the pool (and so its recorder) alive.
        assert_eq!(Arc::strong_count(&recorder), 2);
        drop(small);
        assert_eq!(Arc::strong_count(&recorder), 2);
        drop(large);
        // The last buffer back drops the pool.
        assert_eq!(Arc::strong_count(&recorder), 1);
        // A pool whose buffers all came back lives on with its handle.
        let p = HostPool::with_recorder(&PoolConfig::default(), recorder.clone()).unwrap();
        for _ in 0..3 {
            drop(p.allocate(&act(100)).unwrap());
        }
        assert_eq!(Arc::strong_count(&recorder), 2);
        drop(p);
        assert_eq!(Arc::strong_count(&recorder), 1);
    }

    #[test]
    fn buffers_outlive_the_pool_handle_and_cross_threads() {
        let p = pool(ByteSize::mib(64));
        let mut buf = p.allocate(&act(2000)).unwrap();
        buf[1999] = 9;
        drop(p);
        let back = std::thread::spawn(move || {
            assert_eq!(buf[1999], 9);
            drop(buf);
        });
        back.join().unwrap();
    }
}
