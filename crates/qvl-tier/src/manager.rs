//! [`TierManager`]: objects on the SSD tier (the spill file) with copies in
//! RAM placed by hotness, a background I/O thread for promotions and
//! prefetches, and counters.

use crate::buffer::{AlignedBuf, IO_ALIGN};
use crate::config::TierConfig;
use crate::error::{Result, TierError};
use crate::placement::{plan, AccessStats, Candidate};
use crate::spill::{Extent, SpillFile};
use crate::stats::{Counters, TierStats, TierUsage};
use qvl_core::{MetricEvent, MetricsRecorder, TensorKind, Tier};
use std::collections::HashMap;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

/// Handle of an object in a [`TierManager`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectId(pub u64);

/// Bytes charged against a tier's budget for as long as they live.
#[derive(Debug, Default)]
pub(crate) struct Usage {
    used: AtomicU64,
    peak: AtomicU64,
    /// Freed read buffers kept for the next read (still charged): reusing
    /// them spares the page faults and zeroing of a fresh allocation.
    pool: Mutex<Vec<AlignedBuf>>,
    pooled: AtomicU64,
    pool_cap: AtomicU64,
}

impl Usage {
    /// A page-aligned buffer for `len` bytes, charged: a pooled one of
    /// exactly its page count (already charged, its pages faulted in), else
    /// a new one, pooled buffers freed first (largest first) while the
    /// charge would pass `budget`. With `refuse`, None instead of a charge
    /// past `budget` (a read ahead waits for room; a reader does not).
    fn take(&self, len: usize, budget: u64, refuse: bool) -> Result<Option<(AlignedBuf, u64)>> {
        let need = ram_bytes(len as u64);
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = pool.iter().position(|b| b.capacity() as u64 == need) {
            let mut buf = pool.swap_remove(i);
            self.pooled.fetch_sub(need, Ordering::AcqRel);
            // The read overwrites the contents.
            buf.set_len(len);
            return Ok(Some((buf, need)));
        }
        if refuse && self.used() - self.pooled() + need > budget {
            return Ok(None);
        }
        pool.sort_by_key(|b| b.capacity());
        while self.used() + need > budget {
            let Some(b) = pool.pop() else { break };
            let cap = b.capacity() as u64;
            self.pooled.fetch_sub(cap, Ordering::AcqRel);
            self.used.fetch_sub(cap, Ordering::AcqRel);
        }
        drop(pool);
        let buf = AlignedBuf::zeroed(len).ok_or(TierError::OutOfMemory(need))?;
        let charged = buf.capacity() as u64;
        self.charge(charged);
        Ok(Some((buf, charged)))
    }

    /// Takes back a buffer: pooled when there is room, else freed.
    fn give_back(&self, buf: AlignedBuf, charged: u64) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if self.pooled.load(Ordering::Acquire) + charged <= self.pool_cap.load(Ordering::Acquire) {
            self.pooled.fetch_add(charged, Ordering::AcqRel);
            pool.push(buf);
        } else {
            drop(pool);
            drop(buf);
            self.used.fetch_sub(charged, Ordering::AcqRel);
        }
    }

    /// Frees every pooled buffer.
    fn clear_pool(&self) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        for b in pool.drain(..) {
            let cap = b.capacity() as u64;
            self.pooled.fetch_sub(cap, Ordering::AcqRel);
            self.used.fetch_sub(cap, Ordering::AcqRel);
        }
    }

    /// Charged bytes of pooled buffers.
    fn pooled(&self) -> u64 {
        self.pooled.load(Ordering::Acquire)
    }

    fn charge(&self, bytes: u64) {
        let now = self.used.fetch_add(bytes, Ordering::AcqRel) + bytes;
        self.peak.fetch_max(now, Ordering::AcqRel);
    }
    pub(crate) fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }
    pub(crate) fn peak(&self) -> u64 {
        self.peak.load(Ordering::Acquire)
    }
}

/// An object's bytes in RAM. Readers hold it through an `Arc`: a migration
/// or removal only drops the manager's reference, so a reader never sees a
/// half-moved object, and the bytes stay charged to the RAM tier until the
/// last reader lets go.
pub struct Resident {
    id: ObjectId,
    /// None only while being dropped (handed back to the pool).
    data: Option<AlignedBuf>,
    charged: u64,
    usage: Arc<Usage>,
}

impl Resident {
    /// The object this is a copy of.
    pub fn id(&self) -> ObjectId {
        self.id
    }
}

impl Deref for Resident {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.data.as_deref().unwrap_or(&[])
    }
}

impl AsRef<[u8]> for Resident {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl Drop for Resident {
    fn drop(&mut self) {
        if let Some(buf) = self.data.take() {
            self.usage.give_back(buf, self.charged);
        }
    }
}

impl std::fmt::Debug for Resident {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Resident({:?}, {} bytes)", self.id, self.len())
    }
}

struct Object {
    kind: TensorKind,
    extent: Extent,
    /// The RAM copy the manager keeps (placed by hotness).
    ram: Option<Arc<Resident>>,
    /// A prefetched copy, handed to the next reader.
    staged: Option<Arc<Resident>>,
    /// A read of this object is in flight (only one at a time).
    loading: bool,
    access: AccessStats,
}

struct State {
    objects: HashMap<u64, Object>,
    next_id: u64,
    tick: u64,
    since_rebalance: u64,
    total_bytes: u64,
    largest: u64,
    /// Bytes of the RAM copies the manager keeps (not transient buffers).
    resident_bytes: u64,
}

struct Shared {
    /// The config as created; `cpu_ram` and `prefetch_depth` are read from
    /// the two fields below, which [`TierManager::reconfigure`] changes.
    config: TierConfig,
    ram_budget: AtomicU64,
    prefetch_depth: AtomicUsize,
    stream_hold: AtomicU64,
    spill: SpillFile,
    ram: Arc<Usage>,
    state: Mutex<State>,
    loaded: Condvar,
    counters: Counters,
    recorder: Option<Arc<dyn MetricsRecorder>>,
    started: Instant,
}

/// What a prefetch request found.
#[derive(Debug)]
enum Prefetch {
    /// A read was claimed, with its (charged) buffer.
    Started(Resident),
    /// Kept in RAM: nothing to read.
    Resident,
    /// Prefetched or being read already.
    Underway,
    /// The RAM budget has no room for it now.
    NoRoom,
}

enum Job {
    Promote(u64),
    /// The object and the charged buffer to read it into.
    Prefetch(u64, Resident),
}

/// Places objects (weights per layer or tensor, KV blocks, vision
/// embeddings) on the SSD tier with RAM copies of the hottest ones under
/// the RAM budget, migrates them in the background as access patterns
/// change, and reads ahead for ordered streams (layer-ahead prefetch).
pub struct TierManager {
    shared: Arc<Shared>,
    jobs: Option<Sender<Job>>,
    io_threads: Vec<JoinHandle<()>>,
}

impl TierManager {
    /// A manager with `config`, its spill file in `config.spill_dir`.
    pub fn new(config: TierConfig) -> Result<TierManager> {
        Self::with_recorder(config, None)
    }

    /// A manager that also reports migrations, lookups and I/O to `recorder`.
    pub fn with_recorder(
        config: TierConfig,
        recorder: Option<Arc<dyn MetricsRecorder>>,
    ) -> Result<TierManager> {
        config.validate()?;
        let dir = config.spill_dir.clone().unwrap_or_else(std::env::temp_dir);
        let mut spill = SpillFile::create(&dir, config.drop_page_cache)?;
        if config.direct_io {
            spill.use_direct_io();
        }
        let shared = Arc::new(Shared {
            ram_budget: AtomicU64::new(config.cpu_ram.bytes()),
            prefetch_depth: AtomicUsize::new(config.prefetch_depth),
            stream_hold: AtomicU64::new(0),
            config,
            spill,
            ram: Arc::new(Usage::default()),
            state: Mutex::new(State {
                objects: HashMap::new(),
                next_id: 0,
                tick: 0,
                since_rebalance: 0,
                total_bytes: 0,
                largest: 0,
                resident_bytes: 0,
            }),
            loaded: Condvar::new(),
            counters: Counters::default(),
            recorder,
            started: Instant::now(),
        });
        let (tx, rx) = channel();
        let rx = Arc::new(Mutex::new(rx));
        let mut io_threads = Vec::with_capacity(IO_THREADS);
        for i in 0..IO_THREADS {
            let (worker, rx) = (shared.clone(), rx.clone());
            let thread = std::thread::Builder::new()
                .name(format!("qvl-tier-io{i}"))
                .spawn(move || io_loop(&worker, &rx))
                .map_err(|e| TierError::Stopped(format!("cannot start an I/O thread: {e}")))?;
            io_threads.push(thread);
        }
        Ok(TierManager {
            shared,
            jobs: Some(tx),
            io_threads,
        })
    }

    /// The config, with the RAM budget and prefetch depth in force now.
    pub fn config(&self) -> TierConfig {
        TierConfig {
            cpu_ram: qvl_core::ByteSize(self.shared.budget()),
            prefetch_depth: self.shared.depth(),
            ..self.shared.config.clone()
        }
    }

    /// Whether SSD reads go through direct I/O (asked for by
    /// `TierConfig::direct_io` and taken by the file system).
    pub fn direct_io(&self) -> bool {
        self.shared.spill.direct_io()
    }

    /// Changes the RAM budget and the prefetch depth, then replans: kept
    /// copies over the new budget are demoted at once (readers keep theirs),
    /// and reads ahead and pooled read buffers are freed. A session can shrink or grow its
    /// weights' RAM as other work needs memory, without a new spill file.
    pub fn reconfigure(&self, cpu_ram: qvl_core::ByteSize, prefetch_depth: usize) -> Result<()> {
        TierConfig {
            cpu_ram,
            prefetch_depth,
            ..self.shared.config.clone()
        }
        .validate()?;
        let mut st = self.shared.lock();
        // Reads ahead were planned under the old budget: let them go (a
        // reader that holds one keeps it).
        let staged: Vec<Arc<Resident>> = st
            .objects
            .values_mut()
            .filter_map(|o| o.staged.take())
            .collect();
        drop(staged);
        self.shared
            .ram_budget
            .store(cpu_ram.bytes(), Ordering::Release);
        self.shared
            .prefetch_depth
            .store(prefetch_depth, Ordering::Release);
        self.shared
            .ram
            .pool_cap
            .store(self.shared.stream_reserve(&st), Ordering::Release);
        self.shared.ram.clear_pool();
        self.reset_peak();
        self.rebalance_locked(st)
    }

    /// Whether a GPU tier is usable: false in this build (no CUDA); a GPU
    /// budget is accepted and reported as unavailable.
    pub fn gpu_available(&self) -> bool {
        crate::gpu_tier_available()
    }

    /// Stores `data` as a new object on the SSD tier. Placement may later
    /// copy it into RAM.
    pub fn insert(&self, kind: TensorKind, data: &[u8]) -> Result<ObjectId> {
        let len = data.len() as u64;
        let extent = self
            .shared
            .spill
            .allocate(len, self.shared.config.nvme_ssd.bytes())?;
        if let Err(e) = self.shared.spill.write(extent, data) {
            self.shared.spill.release(extent);
            return Err(e);
        }
        let mut st = self.shared.lock();
        let id = st.next_id;
        st.next_id += 1;
        st.total_bytes += ram_bytes(len);
        st.largest = st.largest.max(ram_bytes(len));
        // Room to recycle the streaming buffers the budget reserves.
        self.shared
            .ram
            .pool_cap
            .store(self.shared.stream_reserve(&st), Ordering::Release);
        st.objects.insert(
            id,
            Object {
                kind,
                extent,
                ram: None,
                staged: None,
                loading: false,
                access: AccessStats::default(),
            },
        );
        Ok(ObjectId(id))
    }

    /// Drops an object from every tier. Readers holding its bytes keep them.
    pub fn remove(&self, id: ObjectId) -> Result<()> {
        let mut st = self.shared.lock();
        let obj = st
            .objects
            .remove(&id.0)
            .ok_or(TierError::UnknownObject(id.0))?;
        st.total_bytes -= ram_bytes(obj.extent.len);
        if obj.ram.is_some() {
            st.resident_bytes -= ram_bytes(obj.extent.len);
        }
        let emptied = st.objects.is_empty();
        if emptied {
            st.largest = 0;
        }
        drop(st);
        self.shared.spill.release(obj.extent);
        drop(obj);
        if emptied {
            self.shared.ram.clear_pool();
        }
        Ok(())
    }

    /// Makes inserted data durable (and drops it from the page cache when
    /// configured), so later reads come from the device.
    pub fn flush(&self) -> Result<()> {
        self.shared.spill.flush()
    }

    /// The bytes of `id`: the RAM copy, a prefetched copy or a read from
    /// the SSD tier, in that order. Records the access for placement.
    pub fn get(&self, id: ObjectId) -> Result<Arc<Resident>> {
        let sh = &self.shared;
        let mut st = sh.lock();
        st.tick += 1;
        st.since_rebalance += 1;
        let now = st.tick;
        let (policy, half_life) = (sh.config.policy, sh.half_life(&st));
        let obj = st
            .objects
            .get_mut(&id.0)
            .ok_or(TierError::UnknownObject(id.0))?;
        obj.access.touch(now, policy, half_life);
        let mut waited = false;
        loop {
            let obj = st
                .objects
                .get_mut(&id.0)
                .ok_or(TierError::UnknownObject(id.0))?;
            if let Some(r) = &obj.ram {
                let r = r.clone();
                sh.counters.ram_hits.fetch_add(1, Ordering::Relaxed);
                sh.record_lookup(Tier::HostRam, true);
                self.maybe_rebalance(st);
                return Ok(r);
            }
            if let Some(r) = obj.staged.take() {
                sh.counters.prefetch_hits.fetch_add(1, Ordering::Relaxed);
                if waited {
                    sh.counters.prefetch_late.fetch_add(1, Ordering::Relaxed);
                }
                sh.record_lookup(Tier::HostRam, true);
                let r = sh.adopt(&mut st, id.0, r);
                self.maybe_rebalance(st);
                return Ok(r);
            }
            if !obj.loading {
                break;
            }
            waited = true;
            st = sh
                .loaded
                .wait(st)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        let obj = st
            .objects
            .get_mut(&id.0)
            .ok_or(TierError::UnknownObject(id.0))?;
        obj.loading = true;
        let extent = obj.extent;
        drop(st);
        let read = sh.read_new(id.0, extent);
        let mut st = sh.lock();
        if let Some(obj) = st.objects.get_mut(&id.0) {
            obj.loading = false;
        }
        sh.loaded.notify_all();
        let r = read?;
        sh.counters.ssd_hits.fetch_add(1, Ordering::Relaxed);
        sh.record_lookup(Tier::Ssd, true);
        let r = sh.adopt(&mut st, id.0, r);
        self.maybe_rebalance(st);
        Ok(r)
    }

    /// Starts reading `id` into a RAM buffer in the background unless it is
    /// in RAM, prefetched or being read already, or the RAM budget has no
    /// room for it. Returns whether a read was started.
    pub fn prefetch(&self, id: ObjectId) -> Result<bool> {
        let mut st = self.shared.lock();
        let claimed = self.shared.claim_prefetch(&mut st, id.0)?;
        drop(st);
        match claimed {
            Prefetch::Started(buf) => {
                self.send(Job::Prefetch(id.0, buf))?;
                Ok(true)
            }
            Prefetch::Resident | Prefetch::Underway | Prefetch::NoRoom => Ok(false),
        }
    }

    /// Read-ahead over a stream read in `order` (weights tensor by tensor
    /// or layer by layer, wrapping to the start for the next token): after
    /// position `at`, starts reading the next objects not in RAM, in order,
    /// as far as the RAM budget has room (the streaming reserve is the
    /// reader's `stream_hold` plus `prefetch_depth` largest objects), and
    /// stops at the first that does not fit, so reads land in the order
    /// they are needed. Nothing with `prefetch_depth` 0.
    pub fn prefetch_after(&self, order: &[ObjectId], at: usize) -> Result<()> {
        self.read_ahead(order, at + 1, order.len().saturating_sub(1))
    }

    /// Starts reads of up to `count` objects of `order` from position
    /// `from` on (wrapping), in order, until one has no room.
    fn read_ahead(&self, order: &[ObjectId], from: usize, count: usize) -> Result<()> {
        if self.shared.depth() == 0 || order.is_empty() {
            return Ok(());
        }
        let mut jobs = Vec::new();
        {
            let mut st = self.shared.lock();
            if st.resident_bytes >= st.total_bytes {
                return Ok(()); // everything is kept: nothing to read
            }
            for step in 0..count {
                let id = order[(from + step) % order.len()];
                match self.shared.claim_prefetch(&mut st, id.0)? {
                    Prefetch::Started(buf) => jobs.push(Job::Prefetch(id.0, buf)),
                    Prefetch::NoRoom => break,
                    Prefetch::Resident | Prefetch::Underway => {}
                }
            }
        }
        for job in jobs {
            self.send(job)?;
        }
        Ok(())
    }

    /// Sets the RAM a reader of an ordered stream holds at once (a decoder
    /// layer made of several objects): the streaming reserve is this plus
    /// `prefetch_depth` largest objects. 0 means the largest object.
    pub fn set_stream_hold(&self, hold: qvl_core::ByteSize) {
        let st = self.shared.lock();
        self.shared
            .stream_hold
            .store(hold.bytes(), Ordering::Release);
        self.shared
            .ram
            .pool_cap
            .store(self.shared.stream_reserve(&st), Ordering::Release);
    }

    /// Forgets the RAM tier's peak: from now on it is the peak since this
    /// call (after a change of budget, say).
    pub fn reset_peak(&self) {
        self.shared
            .ram
            .peak
            .store(self.shared.ram.used(), Ordering::Release);
    }

    /// The bytes of `order[at]` for a reader that walks `order` cyclically
    /// (decoder weights, token after token) and holds at most `stream_hold`
    /// bytes of it (the objects of its current layer). With prefetch on, it
    /// first starts the reads of `order[at]` (unless one is underway) and
    /// of the objects after it, as far as the room allows
    /// ([`TierManager::prefetch_after`]): buffers the reader just let go
    /// take them, so the I/O thread has its next read queued before it
    /// finishes the current one and never waits for the reader to wake
    /// up. Then it [`TierManager::get`]s `order[at]`.
    pub fn get_in_order(&self, order: &[ObjectId], at: usize) -> Result<Arc<Resident>> {
        let id = *order.get(at).ok_or_else(|| {
            TierError::Config(format!(
                "position {at} asked of an order of {} objects",
                order.len()
            ))
        })?;
        // From `at` itself: a later object never takes the room it needs.
        self.read_ahead(order, at, order.len())?;
        self.get(id)
    }

    /// What `id` holds.
    pub fn kind(&self, id: ObjectId) -> Result<TensorKind> {
        let st = self.shared.lock();
        st.objects
            .get(&id.0)
            .map(|o| o.kind)
            .ok_or(TierError::UnknownObject(id.0))
    }

    /// Whether the manager keeps a RAM copy of every one of `ids` now.
    pub fn all_resident(&self, ids: &[ObjectId]) -> Result<bool> {
        let st = self.shared.lock();
        for id in ids {
            let obj = st
                .objects
                .get(&id.0)
                .ok_or(TierError::UnknownObject(id.0))?;
            if obj.ram.is_none() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Whether the manager keeps a RAM copy of `id` now.
    pub fn is_resident(&self, id: ObjectId) -> Result<bool> {
        let st = self.shared.lock();
        st.objects
            .get(&id.0)
            .map(|o| o.ram.is_some())
            .ok_or(TierError::UnknownObject(id.0))
    }

    /// Plans placement now and applies it: demotions at once (readers keep
    /// their copies), promotions through the I/O thread.
    pub fn rebalance(&self) -> Result<()> {
        let st = self.shared.lock();
        self.rebalance_locked(st)
    }

    fn maybe_rebalance(&self, st: MutexGuard<'_, State>) {
        let every = (st.objects.len() as u64).max(16);
        if st.since_rebalance >= every {
            // A failed rebalance (I/O thread gone) surfaces on the next
            // explicit call; reads themselves succeeded.
            let _ = self.rebalance_locked(st);
        }
    }

    fn rebalance_locked(&self, mut st: MutexGuard<'_, State>) -> Result<()> {
        let sh = &self.shared;
        st.since_rebalance = 0;
        let now = st.tick;
        let (policy, half_life) = (sh.config.policy, sh.half_life(&st));
        let candidates: Vec<Candidate> = st
            .objects
            .iter()
            .filter(|(_, o)| !o.loading || o.ram.is_some())
            .map(|(&id, o)| Candidate {
                id,
                bytes: ram_bytes(o.extent.len),
                score: o.access.score_at(now, policy, half_life),
                resident: o.ram.is_some(),
            })
            .collect();
        let budget = sh.resident_budget(&st);
        let p = plan(&candidates, budget, sh.config.migration_threshold);
        for id in &p.demote {
            if let Some(o) = st.objects.get_mut(id) {
                if o.ram.take().is_some() {
                    let bytes = ram_bytes(o.extent.len);
                    st.resident_bytes -= bytes;
                    sh.counters.demotions.fetch_add(1, Ordering::Relaxed);
                    sh.record(MetricEvent::Migration {
                        from: Tier::HostRam,
                        to: Tier::Ssd,
                        bytes,
                    });
                }
            }
        }
        let mut promote = Vec::new();
        for id in p.promote {
            if let Some(o) = st.objects.get_mut(&id) {
                if let Some(staged) = o.staged.take() {
                    // Already read ahead: keep that copy, no second read.
                    sh.adopt_as_resident(&mut st, id, staged);
                } else if !o.loading {
                    o.loading = true;
                    promote.push(id);
                }
            }
        }
        drop(st);
        for id in promote {
            self.send(Job::Promote(id))?;
        }
        Ok(())
    }

    /// Reads every object through the SSD read path (direct or positioned
    /// reads, page cache dropped when configured), once or, for a small
    /// tier, several times up to 256 MiB, with as many reads in flight as
    /// the I/O threads keep, and returns bytes per second: the bandwidth
    /// bound of streaming, measured with the same I/O.
    pub fn measure_read_bandwidth(&self) -> Result<f64> {
        self.flush()?;
        let extents: Vec<Extent> = {
            let st = self.shared.lock();
            let mut e: Vec<Extent> = st.objects.values().map(|o| o.extent).collect();
            e.sort_by_key(|e| e.offset);
            // Passes over small tiers until 256 MiB: a probe of a few
            // milliseconds would be mostly start-up and noise.
            let bytes: u64 = e.iter().map(|x| x.len).sum::<u64>().max(1);
            let passes = (PROBE_BYTES / bytes).clamp(1, 64) as usize;
            let one = e.clone();
            for _ in 1..passes {
                e.extend_from_slice(&one);
            }
            e
        };
        let largest = extents.iter().map(|e| e.len).max().unwrap_or(0);
        let spill = &self.shared.spill;
        let start = Instant::now();
        let bytes = std::thread::scope(|scope| {
            let readers: Vec<_> = (0..IO_THREADS)
                .map(|t| {
                    let mine: Vec<Extent> = extents
                        .iter()
                        .skip(t)
                        .step_by(IO_THREADS)
                        .copied()
                        .collect();
                    scope.spawn(move || -> Result<u64> {
                        let mut buf =
                            AlignedBuf::zeroed(usize::try_from(largest).unwrap_or(usize::MAX))
                                .ok_or(TierError::OutOfMemory(largest))?;
                        let mut bytes = 0;
                        for e in mine {
                            spill.read_into_buf(e, &mut buf)?;
                            bytes += e.len;
                        }
                        Ok(bytes)
                    })
                })
                .collect();
            let mut total = 0;
            for r in readers {
                total += r.join().map_err(|_| {
                    TierError::Stopped("a bandwidth probe thread panicked".into())
                })??;
            }
            Ok::<u64, TierError>(total)
        })?;
        Ok(bytes as f64 / start.elapsed().as_secs_f64().max(1e-9))
    }

    /// Waits until no promotion or prefetch is in flight.
    pub fn wait_idle(&self) {
        let mut st = self.shared.lock();
        while st.objects.values().any(|o| o.loading) {
            st = self
                .shared
                .loaded
                .wait(st)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    /// Counters and per-tier usage now.
    pub fn stats(&self) -> TierStats {
        let sh = &self.shared;
        let st = sh.lock();
        let c = &sh.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let ram_objects = st.objects.values().filter(|o| o.ram.is_some()).count();
        TierStats {
            tiers: vec![
                TierUsage {
                    tier: Tier::Gpu,
                    budget: sh.config.gpu_hbm.bytes(),
                    used: 0,
                    peak: 0,
                    objects: 0,
                    available: false,
                },
                TierUsage {
                    tier: Tier::HostRam,
                    budget: sh.budget(),
                    used: sh.ram.used(),
                    peak: sh.ram.peak(),
                    objects: ram_objects,
                    available: true,
                },
                TierUsage {
                    tier: Tier::Ssd,
                    budget: sh.config.nvme_ssd.bytes(),
                    used: sh.spill.len(),
                    peak: sh.spill.len(),
                    objects: st.objects.len(),
                    available: true,
                },
            ],
            resident_bytes: st.resident_bytes,
            pooled_bytes: sh.ram.pooled(),
            object_bytes: st.total_bytes,
            promotions: load(&c.promotions),
            demotions: load(&c.demotions),
            ram_hits: load(&c.ram_hits),
            prefetch_hits: load(&c.prefetch_hits),
            prefetch_late: load(&c.prefetch_late),
            ssd_hits: load(&c.ssd_hits),
            prefetch_issued: load(&c.prefetch_issued),
            prefetch_skipped: load(&c.prefetch_skipped),
            ssd_read_bytes: load(&c.ssd_read_bytes),
            ssd_read_nanos: load(&c.ssd_read_nanos),
            ssd_write_bytes: sh.spill.bytes_written(),
            elapsed_secs: sh.started.elapsed().as_secs_f64(),
        }
    }

    fn send(&self, job: Job) -> Result<()> {
        let tx = self
            .jobs
            .as_ref()
            .ok_or_else(|| TierError::Stopped("the manager is shutting down".to_string()))?;
        tx.send(job)
            .map_err(|_| TierError::Stopped("the I/O thread exited".to_string()))
    }
}

impl Drop for TierManager {
    fn drop(&mut self) {
        // Closing the channel ends the I/O loop.
        self.jobs = None;
        for t in self.io_threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Shared {
    fn budget(&self) -> u64 {
        self.ram_budget.load(Ordering::Acquire)
    }

    /// The half-life of scores in accesses: the configured one, and at
    /// least four sweeps over every object, so that objects read once per
    /// sweep (weights, token after token) score alike wherever they sit in
    /// the sweep and placement does not churn between them.
    fn half_life(&self, st: &State) -> u32 {
        let sweeps = u32::try_from(st.objects.len().saturating_mul(4)).unwrap_or(u32::MAX);
        self.config.half_life_accesses.max(sweeps)
    }

    /// Marks `id` as being read ahead when it is not in RAM or underway and
    /// the RAM budget has room for its buffer (counted in flight until the
    /// I/O thread charges the buffer); the caller sends the job.
    fn claim_prefetch(&self, st: &mut State, id: u64) -> Result<Prefetch> {
        let obj = st
            .objects
            .get_mut(&id)
            .ok_or(TierError::UnknownObject(id))?;
        if obj.ram.is_some() {
            return Ok(Prefetch::Resident);
        }
        if obj.staged.is_some() || obj.loading {
            return Ok(Prefetch::Underway);
        }
        // Lengths fit in usize: they came from in-memory slices.
        let Some((data, charged)) = self
            .ram
            .take(obj.extent.len as usize, self.budget(), true)?
        else {
            self.counters
                .prefetch_skipped
                .fetch_add(1, Ordering::Relaxed);
            return Ok(Prefetch::NoRoom);
        };
        obj.loading = true;
        self.counters
            .prefetch_issued
            .fetch_add(1, Ordering::Relaxed);
        Ok(Prefetch::Started(Resident {
            id: ObjectId(id),
            data: Some(data),
            charged,
            usage: self.ram.clone(),
        }))
    }

    fn depth(&self) -> usize {
        self.prefetch_depth.load(Ordering::Acquire)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // State updates are small and complete under the lock; a panic in a
        // reader does not leave it half-updated, so poison is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// RAM for kept copies: the whole budget when every object fits, else
    /// the budget less room for the buffers of streaming (the one being
    /// used plus `prefetch_depth` read ahead).
    fn resident_budget(&self, st: &State) -> u64 {
        let budget = self.budget();
        if st.total_bytes <= budget {
            budget
        } else {
            budget.saturating_sub(self.stream_reserve(st))
        }
    }

    /// RAM for streaming when objects do not all fit: what a reader holds
    /// at once (`stream_hold`, else the largest object) plus
    /// `prefetch_depth` largest objects read ahead.
    fn stream_reserve(&self, st: &State) -> u64 {
        let hold = match self.stream_hold.load(Ordering::Acquire) {
            0 => st.largest,
            h => ram_bytes(h),
        };
        hold + st.largest * self.depth() as u64
    }

    /// Reads `id` on demand into a new charged buffer (a reader or a
    /// promotion: never refused, pooled buffers freed to stay in budget).
    fn read_new(&self, id: u64, extent: Extent) -> Result<Arc<Resident>> {
        // Lengths fit in usize: they came from in-memory slices.
        let len = extent.len as usize;
        let (data, charged) = self
            .ram
            .take(len, self.budget(), false)?
            .ok_or(TierError::OutOfMemory(extent.len))?;
        self.read_into(
            extent,
            Resident {
                id: ObjectId(id),
                data: Some(data),
                charged,
                usage: self.ram.clone(),
            },
        )
    }

    /// Reads `extent` into `into`'s buffer (charged already; handed back
    /// when the read fails).
    fn read_into(&self, extent: Extent, mut into: Resident) -> Result<Arc<Resident>> {
        let start = Instant::now();
        match into.data.as_mut() {
            Some(buf) => self.spill.read_into_buf(extent, buf)?,
            None => return Err(TierError::OutOfMemory(extent.len)),
        }
        let took = start.elapsed();
        self.counters
            .ssd_read_nanos
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
        self.counters
            .ssd_read_bytes
            .fetch_add(extent.len, Ordering::Relaxed);
        self.record(MetricEvent::Swap {
            out: false,
            bytes: extent.len,
            latency: took,
        });
        Ok(Arc::new(into))
    }

    /// Keeps `r` as the RAM copy of `id` when it is hot enough and fits the
    /// resident budget (no second read for a promotion); returns it.
    fn adopt(&self, st: &mut State, id: u64, r: Arc<Resident>) -> Arc<Resident> {
        let now = st.tick;
        let (policy, half_life) = (self.config.policy, self.half_life(st));
        let hottest = st
            .objects
            .values()
            .map(|o| o.access.score_at(now, policy, half_life))
            .fold(0.0, f64::max);
        let Some(obj) = st.objects.get(&id) else {
            return r;
        };
        let hot = hottest > 0.0
            && obj.access.score_at(now, policy, half_life) / hottest
                >= self.config.migration_threshold;
        if obj.ram.is_none()
            && hot
            && st.resident_bytes + ram_bytes(obj.extent.len) <= self.resident_budget(st)
        {
            self.adopt_as_resident(st, id, r.clone());
        }
        r
    }

    fn adopt_as_resident(&self, st: &mut State, id: u64, r: Arc<Resident>) {
        if let Some(obj) = st.objects.get_mut(&id) {
            let bytes = ram_bytes(obj.extent.len);
            obj.ram = Some(r);
            st.resident_bytes += bytes;
            self.counters.promotions.fetch_add(1, Ordering::Relaxed);
            self.record(MetricEvent::Migration {
                from: Tier::Ssd,
                to: Tier::HostRam,
                bytes,
            });
        }
    }

    fn record(&self, event: MetricEvent) {
        if let Some(r) = &self.recorder {
            r.record(&event);
        }
    }

    fn record_lookup(&self, tier: Tier, hit: bool) {
        self.record(MetricEvent::CacheLookup { tier, hit });
    }
}

/// RAM an object of `len` bytes takes: read buffers are whole pages.
fn ram_bytes(len: u64) -> u64 {
    len.max(1).next_multiple_of(IO_ALIGN as u64)
}

/// Reads the background jobs: several threads, so reads are in flight on
/// the device while a thread waits to be scheduled (on a loaded machine a
/// wake-up can take milliseconds), and a deeper queue lets an NVMe (or
/// virtio) disk reach its bandwidth.
const IO_THREADS: usize = 4;

/// Bytes a bandwidth probe reads at least (when the tier holds fewer).
const PROBE_BYTES: u64 = 256 << 20;

fn io_loop(sh: &Shared, jobs: &Mutex<Receiver<Job>>) {
    loop {
        // Poison: a panicking I/O thread held the receiver; it is intact.
        let job = jobs.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let Ok(job) = job else { break };
        let (id, promote, buffer) = match job {
            Job::Promote(id) => (id, true, None),
            Job::Prefetch(id, buf) => (id, false, Some(buf)),
        };
        let extent = sh.lock().objects.get(&id).map(|o| o.extent);
        let Some(extent) = extent else {
            // The object is gone: its buffer (if any) goes back on drop.
            continue;
        };
        let read = match buffer {
            Some(buf) => sh.read_into(extent, buf),
            None => sh.read_new(id, extent),
        };
        let mut st = sh.lock();
        if let Some(obj) = st.objects.get_mut(&id) {
            obj.loading = false;
            if let Ok(r) = read {
                if promote {
                    // Published whole, under the lock: readers see the old
                    // state or the finished copy, never a partial one.
                    if st.resident_bytes + ram_bytes(extent.len) <= sh.resident_budget(&st) {
                        sh.adopt_as_resident(&mut st, id, r);
                    }
                } else {
                    obj.staged = Some(r);
                }
            }
            // A failed background read is retried as a demand read by the
            // next reader, which then reports the error.
        }
        drop(st);
        sh.loaded.notify_all();
    }
}
