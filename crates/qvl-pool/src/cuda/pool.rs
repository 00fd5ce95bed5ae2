//! The CUDA pools: an arena over a CUDA backing, frees ordered on streams.

use super::backings::{CudaBacking, DeviceBacking, PinnedBacking};
use super::{driver, CudaContext, CudaStream};
use crate::bfc::{BfcArena, BlockHandle};
use crate::PoolError;
use cudarc::driver::sys;
use qvl_core::{
    AllocRequest, AllocatorStats, BufferAllocator, ByteSize, MetricEvent, MetricsRecorder,
};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// Alignment `cuMemAlloc` and `cuMemHostAlloc` guarantee.
const DRIVER_ALIGN: usize = 256;

/// Where a CUDA pool's buffers come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CudaPoolMode {
    /// From the pool's arena: no driver call once memory is mapped.
    #[default]
    Pool,
    /// One driver allocation per buffer (`cuMemAlloc`/`cuMemFree`,
    /// `cuMemHostAlloc`/`cuMemFreeHost`): the plain path, and the baseline.
    Driver,
    /// Device only: `cuMemAllocAsync`/`cuMemFreeAsync` on the home stream,
    /// the driver's own stream-ordered pool (pinned pools treat it as
    /// [`CudaPoolMode::Driver`]).
    DriverAsync,
}

/// Settings of a [`CudaPool`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaPoolConfig {
    /// Address space reserved for the arena; the pool never holds more.
    /// Physical memory is mapped (device) or pinned (host) only as used.
    pub max_pool_size: ByteSize,
    /// Pool or plain driver allocations.
    pub mode: CudaPoolMode,
}

impl Default for CudaPoolConfig {
    fn default() -> Self {
        CudaPoolConfig {
            max_pool_size: ByteSize::gib(2),
            mode: CudaPoolMode::Pool,
        }
    }
}

/// A pool of device memory ([`DeviceBacking`]).
pub type DevicePool = CudaPool<DeviceBacking>;
/// A pool of pinned host memory ([`PinnedBacking`]).
pub type PinnedPool = CudaPool<PinnedBacking>;
/// A buffer of device memory.
pub type DeviceBuffer = CudaBuffer<DeviceBacking>;
/// A buffer of pinned host memory; derefs to its bytes.
pub type PinnedBuffer = CudaBuffer<PinnedBacking>;

/// A pool of CUDA memory with a home stream, shared by cloning.
pub struct CudaPool<B: CudaBacking> {
    shared: Arc<Shared<B>>,
}

impl<B: CudaBacking> Clone for CudaPool<B> {
    fn clone(&self) -> Self {
        CudaPool {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<B: CudaBacking> std::fmt::Debug for CudaPool<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaPool")
            .field("memory", &B::NAME)
            .field("config", &self.shared.config)
            .field("stats", &self.stats())
            .finish()
    }
}

/// A block freed while work on other streams may still use it.
struct PendingFree {
    handle: BlockHandle,
    events: Vec<sys::CUevent>,
}

struct State<B: CudaBacking> {
    arena: Option<BfcArena<B>>,
    pending: Vec<PendingFree>,
    spare_events: Vec<sys::CUevent>,
}

#[derive(Default)]
struct Counters {
    allocated: AtomicU64,
    peak_allocated: AtomicU64,
    driver_bytes: AtomicU64,
    peak_reserved: AtomicU64,
    alloc_count: AtomicU64,
    free_count: AtomicU64,
    driver_allocs: AtomicU64,
    driver_frees: AtomicU64,
}

struct Shared<B: CudaBacking> {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    config: CudaPoolConfig,
    /// Base address and granule of the arena (0 without one).
    base: usize,
    granule: usize,
    state: Mutex<State<B>>,
    counters: Counters,
    recorder: Option<Arc<dyn MetricsRecorder>>,
}

// SAFETY: the raw CUevents in `state` are driver handles, used only under
// the mutex; the driver allows using them from any thread with the context
// bound, which every call here does first.
unsafe impl<B: CudaBacking> Send for Shared<B> {}
// SAFETY: see Send; all mutable state is behind the mutex or atomics.
unsafe impl<B: CudaBacking> Sync for Shared<B> {}

#[derive(Debug, Clone, Copy)]
enum Origin {
    Block(BlockHandle),
    /// A driver allocation starting at `raw` (the buffer may start later,
    /// for alignment).
    Driver {
        raw: usize,
    },
}

/// A buffer from a [`CudaPool`]; goes back to it when dropped, in stream
/// order (see the module docs).
pub struct CudaBuffer<B: CudaBacking> {
    addr: usize,
    len: usize,
    held: usize,
    origin: Origin,
    /// Streams other than the home stream that used the buffer.
    streams: Vec<Arc<CudaStream>>,
    pool: Arc<Shared<B>>,
}

impl<B: CudaBacking> std::fmt::Debug for CudaBuffer<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBuffer")
            .field("memory", &B::NAME)
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("len", &self.len)
            .field("held", &self.held)
            .field("origin", &self.origin)
            .finish()
    }
}

impl<B: CudaBacking> CudaBuffer<B> {
    /// Bytes requested.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether zero bytes were requested.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes the buffer occupies in the pool.
    pub fn held_bytes(&self) -> usize {
        self.held
    }

    /// Whether it came from the arena (false: straight from the driver).
    pub fn is_pooled(&self) -> bool {
        matches!(self.origin, Origin::Block(_))
    }

    /// Address of the first byte (a device address for device buffers, a
    /// host address for pinned ones; both valid in CUDA's unified space).
    pub fn addr(&self) -> usize {
        self.addr
    }

    /// Marks the buffer as used by work queued on `stream`: its memory is
    /// reused only after that work, when the buffer is dropped. Nothing to do
    /// for the pool's home stream.
    pub fn record_stream(&mut self, stream: &Arc<CudaStream>) {
        if **stream != *self.pool.stream && !self.streams.iter().any(|s| **s == **stream) {
            self.streams.push(Arc::clone(stream));
        }
    }

    /// The home stream of the pool it came from.
    pub fn home_stream(&self) -> &Arc<CudaStream> {
        &self.pool.stream
    }
}

impl CudaBuffer<DeviceBacking> {
    /// The device address, as kernels and copies take it.
    pub fn device_ptr(&self) -> sys::CUdeviceptr {
        self.addr as sys::CUdeviceptr
    }
}

impl std::ops::Deref for CudaBuffer<PinnedBacking> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `addr..addr+len` is owned by this buffer and stays mapped
        // while the pool (held by `self.pool`) lives. Its bytes are
        // initialized: pool pages start as zero pages, driver allocations
        // are zeroed when made, reused bytes were written before.
        unsafe { std::slice::from_raw_parts(self.addr as *const u8, self.len) }
    }
}

impl std::ops::DerefMut for CudaBuffer<PinnedBacking> {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.addr as *mut u8, self.len) }
    }
}

impl AsRef<[u8]> for CudaBuffer<PinnedBacking> {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl AsMut<[u8]> for CudaBuffer<PinnedBacking> {
    fn as_mut(&mut self) -> &mut [u8] {
        self
    }
}

impl<B: CudaBacking> Drop for CudaBuffer<B> {
    fn drop(&mut self) {
        let streams = std::mem::take(&mut self.streams);
        self.pool
            .give_back(self.held, self.origin, self.addr, &streams);
    }
}

impl<B: CudaBacking> CudaPool<B> {
    /// A pool on `ctx`'s device whose buffers are stream-ordered on `stream`.
    pub fn new(
        ctx: &Arc<CudaContext>,
        stream: &Arc<CudaStream>,
        config: &CudaPoolConfig,
    ) -> Result<Self, PoolError> {
        Self::build(ctx, stream, config, None)
    }

    /// The same, reporting every allocation and free to `recorder`.
    pub fn with_recorder(
        ctx: &Arc<CudaContext>,
        stream: &Arc<CudaStream>,
        config: &CudaPoolConfig,
        recorder: Arc<dyn MetricsRecorder>,
    ) -> Result<Self, PoolError> {
        Self::build(ctx, stream, config, Some(recorder))
    }

    fn build(
        ctx: &Arc<CudaContext>,
        stream: &Arc<CudaStream>,
        config: &CudaPoolConfig,
        recorder: Option<Arc<dyn MetricsRecorder>>,
    ) -> Result<Self, PoolError> {
        let arena = match config.mode {
            CudaPoolMode::Pool => Some(BfcArena::new(B::reserve(
                ctx,
                config.max_pool_size.as_usize(),
            )?)),
            CudaPoolMode::Driver | CudaPoolMode::DriverAsync => None,
        };
        let (base, granule) = arena
            .as_ref()
            .map_or((0, DRIVER_ALIGN), |a| (a.backing().base(), a.granule()));
        Ok(CudaPool {
            shared: Arc::new(Shared {
                ctx: Arc::clone(ctx),
                stream: Arc::clone(stream),
                config: config.clone(),
                base,
                granule,
                state: Mutex::new(State {
                    arena,
                    pending: Vec::new(),
                    spare_events: Vec::new(),
                }),
                counters: Counters::default(),
                recorder,
            }),
        })
    }

    /// The home stream.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.shared.stream
    }

    /// The context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.shared.ctx
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &CudaPoolConfig {
        &self.shared.config
    }

    /// Frees still waiting for work on other streams.
    pub fn pending_frees(&self) -> usize {
        self.shared.lock().pending.len()
    }

    /// Sends the current memory counters to the recorder, if there is one.
    pub fn record_memory(&self) {
        if let Some(recorder) = &self.shared.recorder {
            let s = self.stats();
            recorder.record(&MetricEvent::Memory {
                tier: B::TIER,
                allocated: s.allocated_bytes,
                reserved: s.reserved_bytes,
            });
        }
    }
}

impl<B: CudaBacking> BufferAllocator for CudaPool<B> {
    type Buffer = CudaBuffer<B>;

    fn tier(&self) -> qvl_core::Tier {
        B::TIER
    }

    fn allocate(&self, request: &AllocRequest) -> qvl_core::Result<CudaBuffer<B>> {
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
                tier: B::TIER,
                kind: request.kind,
                bytes: buffer.held as u64,
                latency: started.elapsed(),
            });
        }
        Ok(buffer)
    }

    fn stats(&self) -> AllocatorStats {
        let c = &self.shared.counters;
        let mapped = self
            .shared
            .lock()
            .arena
            .as_ref()
            .map_or(0, |a| a.backing().mapped_bytes() as u64);
        let (commits, decommits) = self
            .shared
            .lock()
            .arena
            .as_ref()
            .map_or((0, 0), |a| (a.stats().commits, a.stats().decommits));
        let allocated = c.allocated.load(Relaxed);
        let reserved = mapped + c.driver_bytes.load(Relaxed);
        AllocatorStats {
            allocated_bytes: allocated,
            reserved_bytes: reserved,
            // Raised just after their counters (see the host pool).
            peak_allocated_bytes: c.peak_allocated.load(Relaxed).max(allocated),
            peak_reserved_bytes: c.peak_reserved.load(Relaxed).max(reserved),
            alloc_count: c.alloc_count.load(Relaxed),
            free_count: c.free_count.load(Relaxed),
            os_alloc_count: commits + c.driver_allocs.load(Relaxed),
            os_free_count: decommits + c.driver_frees.load(Relaxed),
        }
    }

    /// Waits for pending frees and for the home stream (memory about to be
    /// unmapped may still be in use by queued work), then gives every free
    /// block back to the driver. Returns the physical bytes released.
    fn release_cached(&self) -> u64 {
        let mut state = self.shared.lock();
        self.shared.collect_pending(&mut state, true);
        if state.arena.is_none() {
            return 0;
        }
        if let Err(e) = self.shared.stream.synchronize() {
            tracing::error!("not releasing {} memory: stream sync failed: {e}", B::NAME);
            return 0;
        }
        let Some(arena) = state.arena.as_mut() else {
            return 0;
        };
        let before = arena.backing().mapped_bytes();
        if let Err(e) = arena.release() {
            tracing::error!("releasing cached {} memory: {e}", B::NAME);
        }
        let after = arena.backing().mapped_bytes();
        drop(state);
        self.record_memory();
        before.saturating_sub(after) as u64
    }
}

impl<B: CudaBacking> Shared<B> {
    fn lock(&self) -> MutexGuard<'_, State<B>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn note_reserved(&self, state: &State<B>) {
        let mapped = state
            .arena
            .as_ref()
            .map_or(0, |a| a.backing().mapped_bytes() as u64);
        let reserved = mapped + self.counters.driver_bytes.load(Relaxed);
        self.counters.peak_reserved.fetch_max(reserved, Relaxed);
    }

    fn allocate(self: &Arc<Self>, request: &AllocRequest) -> Result<CudaBuffer<B>, PoolError> {
        let mode = self.config.mode;
        let natural = if mode == CudaPoolMode::Pool {
            self.granule
        } else {
            DRIVER_ALIGN
        };
        let extra = request.align.saturating_sub(natural);
        let bytes = request
            .bytes
            .checked_add(extra)
            .ok_or(PoolError::PoolFull {
                tier: B::TIER,
                needed: ByteSize(request.bytes as u64),
                capacity: self.config.max_pool_size,
            })?;
        let (raw, held, origin) = match mode {
            CudaPoolMode::Pool => {
                let block = self.take_block(bytes)?;
                (
                    self.base + block.offset,
                    block.size,
                    Origin::Block(block.handle),
                )
            }
            CudaPoolMode::Driver | CudaPoolMode::DriverAsync => {
                let stream = self.driver_stream();
                let raw = B::driver_alloc(&self.ctx, bytes, stream)?;
                if B::TIER == qvl_core::Tier::HostRam {
                    // SAFETY: a fresh host allocation of `bytes` bytes;
                    // zeroed so that the buffer's bytes are initialized.
                    unsafe { std::ptr::write_bytes(raw as *mut u8, 0, bytes) };
                }
                let c = &self.counters;
                c.driver_bytes.fetch_add(bytes as u64, Relaxed);
                c.driver_allocs.fetch_add(1, Relaxed);
                self.note_reserved(&self.lock());
                (raw, bytes, Origin::Driver { raw })
            }
        };
        let addr = raw.next_multiple_of(request.align.max(1));
        let c = &self.counters;
        let now = c.allocated.fetch_add(held as u64, Relaxed) + held as u64;
        c.peak_allocated.fetch_max(now, Relaxed);
        c.alloc_count.fetch_add(1, Relaxed);
        Ok(CudaBuffer {
            addr,
            len: request.bytes,
            held,
            origin,
            streams: Vec::new(),
            pool: Arc::clone(self),
        })
    }

    fn driver_stream(&self) -> Option<sys::CUstream> {
        (self.config.mode == CudaPoolMode::DriverAsync && B::TIER == qvl_core::Tier::Gpu)
            .then(|| self.stream.cu_stream())
    }

    /// A block from the arena: after collecting finished frees, from cached
    /// blocks or by growing; when full, after waiting for pending frees.
    fn take_block(&self, bytes: usize) -> Result<crate::bfc::Block, PoolError> {
        let mut state = self.lock();
        if !state.pending.is_empty() {
            self.collect_pending(&mut state, false);
        }
        for attempt in 0..2 {
            let grown = match state.arena.as_mut() {
                Some(arena) => arena.alloc(bytes),
                None => Ok(None),
            };
            match grown {
                Ok(Some(block)) => {
                    self.note_reserved(&state);
                    return Ok(block);
                }
                Ok(None) | Err(_) if attempt == 0 && !state.pending.is_empty() => {
                    self.collect_pending(&mut state, true);
                }
                Ok(None) => break,
                Err(e) => return Err(e),
            }
        }
        Err(PoolError::PoolFull {
            tier: B::TIER,
            needed: ByteSize(bytes as u64),
            capacity: self.config.max_pool_size,
        })
    }

    /// Returns pending blocks whose events have completed (all of them,
    /// waiting, when `wait`).
    fn collect_pending(&self, state: &mut State<B>, wait: bool) {
        if state.pending.is_empty() || driver::bind(&self.ctx).is_err() {
            return;
        }
        let mut i = 0;
        while i < state.pending.len() {
            let done = state.pending[i].events.iter().all(|&ev| {
                // SAFETY: the event was created and recorded by `give_back`
                // and is destroyed only after leaving the pending list.
                let r = unsafe {
                    if wait {
                        sys::cuEventSynchronize(ev)
                    } else {
                        sys::cuEventQuery(ev)
                    }
                };
                match r {
                    sys::CUresult::CUDA_SUCCESS => true,
                    sys::CUresult::CUDA_ERROR_NOT_READY => false,
                    other => {
                        // An event that failed cannot say the work is done;
                        // keep the block (leaked) rather than reuse it early.
                        tracing::error!("querying a pending free's event: {other:?}");
                        false
                    }
                }
            });
            if done {
                let p = state.pending.swap_remove(i);
                state.spare_events.extend(p.events);
                if let Some(arena) = state.arena.as_mut() {
                    if let Err(e) = arena.free(p.handle) {
                        tracing::error!("returning a stream-ordered free: {e}");
                    }
                }
            } else {
                i += 1;
            }
        }
    }

    fn give_back(&self, held: usize, origin: Origin, addr: usize, streams: &[Arc<CudaStream>]) {
        let _ = addr;
        match origin {
            Origin::Block(handle) => {
                let mut state = self.lock();
                if streams.is_empty() {
                    if let Some(arena) = state.arena.as_mut() {
                        if let Err(e) = arena.free(handle) {
                            tracing::error!("returning a {} buffer: {e}", B::NAME);
                        }
                    }
                } else {
                    match self.record_events(&mut state, streams) {
                        Ok(events) => state.pending.push(PendingFree { handle, events }),
                        Err(e) => {
                            // Without events, wait for the streams instead.
                            tracing::warn!("recording a free on its streams: {e}; waiting");
                            let waited = streams.iter().all(|s| s.synchronize().is_ok());
                            if waited {
                                if let Some(arena) = state.arena.as_mut() {
                                    let _ = arena.free(handle);
                                }
                            } else {
                                tracing::error!(
                                    "a {} block stays out: its streams failed",
                                    B::NAME
                                );
                            }
                        }
                    }
                }
            }
            Origin::Driver { raw } => {
                for s in streams {
                    if let Err(e) = s.synchronize() {
                        tracing::error!("waiting for a stream before a driver free: {e}");
                    }
                }
                let stream = self.driver_stream();
                // SAFETY: `raw` came from `driver_alloc` with the same stream
                // choice; other streams were waited for above, work on the
                // home stream is ordered before cuMemFreeAsync (and cuMemFree
                // waits for the device).
                if let Err(e) = unsafe { B::driver_free(&self.ctx, raw, stream) } {
                    tracing::error!("freeing a {} buffer: {e}", B::NAME);
                }
                let c = &self.counters;
                c.driver_bytes.fetch_sub(held as u64, Relaxed);
                c.driver_frees.fetch_add(1, Relaxed);
            }
        }
        let c = &self.counters;
        c.allocated.fetch_sub(held as u64, Relaxed);
        c.free_count.fetch_add(1, Relaxed);
        if let Some(recorder) = &self.recorder {
            recorder.record(&MetricEvent::Free {
                tier: B::TIER,
                bytes: held as u64,
            });
        }
    }

    /// One event recorded on each stream, from the spare list when it can.
    fn record_events(
        &self,
        state: &mut State<B>,
        streams: &[Arc<CudaStream>],
    ) -> Result<Vec<sys::CUevent>, PoolError> {
        driver::bind(&self.ctx)?;
        let mut events = Vec::with_capacity(streams.len());
        for s in streams {
            let ev = match state.spare_events.pop() {
                Some(ev) => ev,
                None => cudarc::driver::result::event::create(
                    sys::CUevent_flags::CU_EVENT_DISABLE_TIMING,
                )
                .map_err(|e| driver::err("cuEventCreate", e))?,
            };
            // SAFETY: a live event of this context and a live stream (held
            // by the buffer until now).
            if let Err(e) = unsafe { cudarc::driver::result::event::record(ev, s.cu_stream()) } {
                state.spare_events.push(ev);
                state.spare_events.extend(events);
                return Err(driver::err("cuEventRecord", e));
            }
            events.push(ev);
        }
        Ok(events)
    }
}

impl<B: CudaBacking> Drop for Shared<B> {
    fn drop(&mut self) {
        let mut state = std::mem::replace(
            self.state.get_mut().unwrap_or_else(|e| e.into_inner()),
            State {
                arena: None,
                pending: Vec::new(),
                spare_events: Vec::new(),
            },
        );
        self.collect_pending(&mut state, true);
        if driver::bind(&self.ctx).is_err() {
            return;
        }
        // Queued work on the home stream may still use the memory.
        if let Err(e) = self.stream.synchronize() {
            tracing::error!("dropping the {} pool: stream sync failed: {e}", B::NAME);
        }
        let leftover = state.pending.drain(..).flat_map(|p| p.events);
        for ev in state.spare_events.drain(..).chain(leftover) {
            // SAFETY: events made by this pool, no longer referenced.
            let _ = unsafe { cudarc::driver::result::event::destroy(ev) };
        }
        // The arena and its backing drop here, after the stream is idle.
        drop(state);
    }
}
