//! [`TierManager`]: objects on the SSD tier (the spill file) with copies in
//! RAM placed by hotness, a background I/O thread for promotions and
//! prefetches, and counters.

use crate::config::TierConfig;
use crate::error::{Result, TierError};
use crate::placement::{plan, AccessStats, Candidate};
use crate::spill::{Extent, SpillFile};
use crate::stats::{Counters, TierStats, TierUsage};
use qvl_core::{MetricEvent, MetricsRecorder, TensorKind, Tier};
use std::collections::HashMap;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
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
    pool: Mutex<Vec<Vec<u8>>>,
    pooled: AtomicU64,
    pool_cap: AtomicU64,
    /// Bytes of prefetches asked for and not yet read (their buffers are
    /// not charged yet, but the budget must count them).
    inflight: AtomicU64,
}

impl Usage {
    /// A buffer of `len` bytes, charged: a pooled one when one is large
    /// enough (already charged), else a new one (pooled ones that are too
    /// small are freed first, so the charge stays within what was asked).
    fn buffer(&self, len: usize) -> (Vec<u8>, u64) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = pool.iter().position(|b| b.capacity() >= len) {
            let mut buf = pool.swap_remove(i);
            let charged = buf.capacity() as u64;
            self.pooled.fetch_sub(charged, Ordering::AcqRel);
            // Only a grown part is zeroed; the read overwrites all of it.
            buf.resize(len, 0);
            return (buf, charged);
        }
        for b in pool.drain(..) {
            let cap = b.capacity() as u64;
            self.pooled.fetch_sub(cap, Ordering::AcqRel);
            self.used.fetch_sub(cap, Ordering::AcqRel);
        }
        drop(pool);
        let buf = vec![0u8; len];
        let charged = buf.capacity() as u64;
        self.charge(charged);
        (buf, charged)
    }

    /// Takes back a buffer: pooled when there is room, else freed.
    fn give_back(&self, buf: Vec<u8>, charged: u64) {
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

    /// Charged bytes a new read can reuse.
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
    data: Vec<u8>,
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
        &self.data
    }
}

impl AsRef<[u8]> for Resident {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for Resident {
    fn drop(&mut self) {
        self.usage
            .give_back(std::mem::take(&mut self.data), self.charged);
    }
}

impl std::fmt::Debug for Resident {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Resident({:?}, {} bytes)", self.id, self.data.len())
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
    config: TierConfig,
    spill: SpillFile,
    ram: Arc<Usage>,
    state: Mutex<State>,
    loaded: Condvar,
    counters: Counters,
    recorder: Option<Arc<dyn MetricsRecorder>>,
    started: Instant,
}

enum Job {
    Promote(u64),
    /// The object and the bytes counted in flight for it.
    Prefetch(u64, u64),
}

/// Places objects (weights per layer or tensor, KV blocks, vision
/// embeddings) on the SSD tier with RAM copies of the hottest ones under
/// the RAM budget, migrates them in the background as access patterns
/// change, and reads ahead for ordered streams (layer-ahead prefetch).
pub struct TierManager {
    shared: Arc<Shared>,
    jobs: Option<Sender<Job>>,
    io_thread: Option<JoinHandle<()>>,
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
        let spill = SpillFile::create(&dir, config.drop_page_cache)?;
        let shared = Arc::new(Shared {
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
        let worker = shared.clone();
        let io_thread = std::thread::Builder::new()
            .name("qvl-tier-io".to_string())
            .spawn(move || io_loop(&worker, &rx))
            .map_err(|e| TierError::Stopped(format!("cannot start the I/O thread: {e}")))?;
        Ok(TierManager {
            shared,
            jobs: Some(tx),
            io_thread: Some(io_thread),
        })
    }

    /// The config.
    pub fn config(&self) -> &TierConfig {
        &self.shared.config
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
        st.total_bytes += len;
        st.largest = st.largest.max(len);
        // Room to recycle the streaming buffers the budget reserves.
        self.shared.ram.pool_cap.store(
            st.largest * (self.shared.config.prefetch_depth as u64 + 1),
            Ordering::Release,
        );
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
        st.total_bytes -= obj.extent.len;
        if obj.ram.is_some() {
            st.resident_bytes -= obj.extent.len;
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
        let (policy, half_life) = (sh.config.policy, sh.config.half_life_accesses);
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
        let read = sh.read(id.0, extent, 0);
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
        let sh = &self.shared;
        let mut st = sh.lock();
        let obj = st
            .objects
            .get_mut(&id.0)
            .ok_or(TierError::UnknownObject(id.0))?;
        if obj.ram.is_some() || obj.staged.is_some() || obj.loading {
            return Ok(false);
        }
        let len = obj.extent.len;
        let inflight = sh.ram.inflight.load(Ordering::Acquire);
        let reusable = sh.ram.pooled().saturating_sub(inflight).min(len);
        if sh.ram.used() + inflight + len - reusable > sh.config.cpu_ram.bytes() {
            sh.counters.prefetch_skipped.fetch_add(1, Ordering::Relaxed);
            return Ok(false);
        }
        obj.loading = true;
        sh.ram.inflight.fetch_add(len, Ordering::AcqRel);
        drop(st);
        sh.counters.prefetch_issued.fetch_add(1, Ordering::Relaxed);
        self.send(Job::Prefetch(id.0, len))?;
        Ok(true)
    }

    /// Layer-ahead prefetch over a stream read in `order` (weights layer by
    /// layer, wrapping to the start for the next token): after position
    /// `at` was read, starts reading the next `prefetch_depth` objects that
    /// are not in RAM.
    pub fn prefetch_after(&self, order: &[ObjectId], at: usize) -> Result<()> {
        let depth = self.shared.config.prefetch_depth;
        if depth == 0 || order.is_empty() {
            return Ok(());
        }
        let mut found = 0;
        for step in 1..order.len() {
            let id = order[(at + step) % order.len()];
            if self.is_resident(id)? {
                continue;
            }
            self.prefetch(id)?;
            found += 1;
            if found == depth {
                break;
            }
        }
        Ok(())
    }

    /// What `id` holds.
    pub fn kind(&self, id: ObjectId) -> Result<TensorKind> {
        let st = self.shared.lock();
        st.objects
            .get(&id.0)
            .map(|o| o.kind)
            .ok_or(TierError::UnknownObject(id.0))
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
        let (policy, half_life) = (sh.config.policy, sh.config.half_life_accesses);
        let candidates: Vec<Candidate> = st
            .objects
            .iter()
            .filter(|(_, o)| !o.loading || o.ram.is_some())
            .map(|(&id, o)| Candidate {
                id,
                bytes: o.extent.len,
                score: o.access.score_at(now, policy, half_life),
                resident: o.ram.is_some(),
            })
            .collect();
        let budget = sh.resident_budget(&st);
        let p = plan(&candidates, budget, sh.config.migration_threshold);
        for id in &p.demote {
            if let Some(o) = st.objects.get_mut(id) {
                if o.ram.take().is_some() {
                    let bytes = o.extent.len;
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

    /// Reads every object once through the SSD read path (positioned reads,
    /// page cache dropped when configured) and returns bytes per second:
    /// the bandwidth bound of streaming, measured with the same I/O.
    pub fn measure_read_bandwidth(&self) -> Result<f64> {
        self.flush()?;
        let extents: Vec<Extent> = {
            let st = self.shared.lock();
            let mut e: Vec<Extent> = st.objects.values().map(|o| o.extent).collect();
            e.sort_by_key(|e| e.offset);
            e
        };
        let largest = extents.iter().map(|e| e.len).max().unwrap_or(0);
        let mut buf = vec![0u8; usize::try_from(largest).unwrap_or(usize::MAX)];
        let start = Instant::now();
        let mut bytes = 0u64;
        for e in extents {
            // Lengths fit in usize: they came from in-memory slices.
            let out = &mut buf[..e.len as usize];
            self.shared.spill.read_into(e, out)?;
            bytes += e.len;
        }
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
                    budget: sh.config.cpu_ram.bytes(),
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
        if let Some(t) = self.io_thread.take() {
            let _ = t.join();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // State updates are small and complete under the lock; a panic in a
        // reader does not leave it half-updated, so poison is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// RAM for kept copies: the whole budget when every object fits, else
    /// the budget less room for the buffers of streaming (the one being
    /// used plus `prefetch_depth` read ahead).
    fn resident_budget(&self, st: &State) -> u64 {
        let budget = self.config.cpu_ram.bytes();
        if st.total_bytes <= budget {
            budget
        } else {
            let reserve = st.largest * (self.config.prefetch_depth as u64 + 1);
            budget.saturating_sub(reserve)
        }
    }

    /// Reads an object's extent into a new charged buffer.
    /// Reads `id` into a charged buffer; `inflight` is what a prefetch
    /// counted for it, released as soon as the buffer is charged (counting
    /// both while the read runs would leave no room for the next prefetch).
    fn read(&self, id: u64, extent: Extent, inflight: u64) -> Result<Arc<Resident>> {
        // Lengths fit in usize: they came from in-memory slices.
        let len = extent.len as usize;
        let (data, charged) = self.ram.buffer(len);
        self.ram.inflight.fetch_sub(inflight, Ordering::AcqRel);
        let mut resident = Resident {
            id: ObjectId(id),
            data,
            charged,
            usage: self.ram.clone(),
        };
        let start = Instant::now();
        self.spill.read_into(extent, &mut resident.data)?;
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
        Ok(Arc::new(resident))
    }

    /// Keeps `r` as the RAM copy of `id` when it is hot enough and fits the
    /// resident budget (no second read for a promotion); returns it.
    fn adopt(&self, st: &mut State, id: u64, r: Arc<Resident>) -> Arc<Resident> {
        let now = st.tick;
        let (policy, half_life) = (self.config.policy, self.config.half_life_accesses);
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
            && st.resident_bytes + obj.extent.len <= self.resident_budget(st)
        {
            self.adopt_as_resident(st, id, r.clone());
        }
        r
    }

    fn adopt_as_resident(&self, st: &mut State, id: u64, r: Arc<Resident>) {
        if let Some(obj) = st.objects.get_mut(&id) {
            let bytes = obj.extent.len;
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

fn io_loop(sh: &Shared, jobs: &Receiver<Job>) {
    while let Ok(job) = jobs.recv() {
        let (id, promote, inflight) = match job {
            Job::Promote(id) => (id, true, 0),
            Job::Prefetch(id, len) => (id, false, len),
        };
        let extent = sh.lock().objects.get(&id).map(|o| o.extent);
        let Some(extent) = extent else {
            // The object is gone: nothing will be charged for it.
            sh.ram.inflight.fetch_sub(inflight, Ordering::AcqRel);
            continue;
        };
        let read = sh.read(id, extent, inflight);
        let mut st = sh.lock();
        if let Some(obj) = st.objects.get_mut(&id) {
            obj.loading = false;
            if let Ok(r) = read {
                if promote {
                    // Published whole, under the lock: readers see the old
                    // state or the finished copy, never a partial one.
                    if st.resident_bytes + extent.len <= sh.resident_budget(&st) {
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
