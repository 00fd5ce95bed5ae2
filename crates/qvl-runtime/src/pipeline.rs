//! The phased pipeline: the six memory managers built from the config in
//! phase order around one model, each optional, each measured.
//!
//! | phase | manager | what it does in a run |
//! |---|---|---|
//! | 1 pool | `qvl-pool` [`HostPool`] | KV blocks are slots of a slab pool ([`PooledKvStorage`]) |
//! | 2 cache | `qvl-cache` [`TieredCache`] | full prompt blocks are kept across requests, keyed by [`qvl_core::BlockKey`] chains; a later prompt with the same prefix imports them instead of computing them |
//! | 3 compression | `qvl-compress` | KV blocks held KIVI int8/int4 ([`CodecKvStorage`]); with swapping, swapped chunks leave encoded |
//! | 4 swapping | `qvl-swap` | with a KV budget, KV blocks past it go to SSD ([`SwappingKvStorage`]) |
//! | 5 tiering | `qvl-tier` | layer weights streamed under a RAM budget (set up by the caller with the model; reported here) |
//! | 6 gc | `qvl-gc` | a background [`qvl_gc::Collector`] drops finished requests' KV and releases the pool's cached memory |
//!
//! A phase that is off, or whose manager fails to start, leaves the
//! original path in place; the reason is logged and kept in
//! [`Pipeline::statuses`]. During a run the pipeline measures what each
//! manager costs per decode step ([`Pipeline::end_step`]): time inside the
//! KV storage for pool, compression and swapping, collector pause time for
//! gc, lookup/import/export time per request for the cache. A manager over
//! its `overhead_budget` for [`DEACTIVATE_AFTER_STEPS`] consecutive steps is
//! switched off at run time: the KV storage moves its blocks to the plain
//! path between two calls ([`PhasedKvStorage`]), a layer of all blocks at
//! a time ([`qvl_model::kv::copy_blocks`], so a swapped context comes back
//! in merged reads; nothing moves if a read fails), the collector thread stops,
//! the cache stops being consulted. The switch is logged and reported.

use crate::config::{self, CachePolicy, Config, SwapPolicy};
use crate::hardware::Hardware;
use crate::kv_codec::{CodecKvStorage, KvCodecKind, KvCodecMonitor, KvCodecOptions};
use crate::kv_pool::{kv_slab_config, PooledKvStorage, KV_SLAB_NAME};
use crate::kv_swap::{KvSwapMonitor, SwappingKvStorage};
use qvl_cache::{CacheConfig, PolicyKind, TieredCache};
use qvl_core::{BlockInfo, BlockKey, ByteSize, MetricEvent, MetricsRecorder, TensorKind, Tier};
use qvl_model::kv::{HostKvStorage, KvBlockId, KvBlockStorage, KvLayerView, KvLayout};
use qvl_model::{ModelError, PagedKvCache};
use qvl_pool::{HostPool, PoolConfig, SpecializedPoolConfig};
use std::any::Any;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Consecutive decode steps over budget after which a manager is switched off.
pub const DEACTIVATE_AFTER_STEPS: u32 = 8;

/// The six phases, in the order they are built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    /// 1: pools for tensor buffers.
    Pool,
    /// 2: the hierarchical cache.
    Cache,
    /// 3: compression.
    Compression,
    /// 4: KV swapping to SSD.
    Swapping,
    /// 5: tiering of weights.
    Tiering,
    /// 6: garbage collection.
    Gc,
}

impl Phase {
    /// All phases in build order.
    pub const ALL: [Phase; 6] = [
        Phase::Pool,
        Phase::Cache,
        Phase::Compression,
        Phase::Swapping,
        Phase::Tiering,
        Phase::Gc,
    ];

    /// The phase's number, 1 to 6.
    pub fn number(self) -> usize {
        self as usize + 1
    }

    /// Short name ("pool", "cache", ...).
    pub fn name(self) -> &'static str {
        match self {
            Phase::Pool => "pool",
            Phase::Cache => "cache",
            Phase::Compression => "compression",
            Phase::Swapping => "swapping",
            Phase::Tiering => "tiering",
            Phase::Gc => "gc",
        }
    }

    fn of_number(n: usize) -> Option<Phase> {
        Phase::ALL.get(n.checked_sub(1)?).copied()
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.number(), self.name())
    }
}

/// Which phases a run asks for: `qvl run --phases 1-6`, `1,3,4`, `2-4,6`,
/// `all` or `none`. Overrides the `enabled` keys of the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PhaseSelection([bool; 6]);

impl PhaseSelection {
    /// Every phase.
    pub fn all() -> PhaseSelection {
        PhaseSelection([true; 6])
    }

    /// No phase: the original path everywhere.
    pub fn none() -> PhaseSelection {
        PhaseSelection([false; 6])
    }

    /// The phases whose `enabled` key is true in `config`.
    pub fn from_config(config: &Config) -> PhaseSelection {
        PhaseSelection([
            config.memory_pooling.enabled,
            config.caching.enabled,
            config.compression.enabled,
            config.swapping.enabled,
            config.tiering.enabled,
            config.garbage_collection.enabled,
        ])
    }

    /// Whether `phase` is selected.
    pub fn contains(&self, phase: Phase) -> bool {
        self.0[phase as usize]
    }

    /// The same selection with `phase` on or off.
    pub fn with(mut self, phase: Phase, on: bool) -> PhaseSelection {
        self.0[phase as usize] = on;
        self
    }

    /// Writes the selection into the `enabled` keys of `config`.
    pub fn apply_to(&self, config: &mut Config) {
        config.memory_pooling.enabled = self.contains(Phase::Pool);
        config.caching.enabled = self.contains(Phase::Cache);
        config.compression.enabled = self.contains(Phase::Compression);
        config.swapping.enabled = self.contains(Phase::Swapping);
        config.tiering.enabled = self.contains(Phase::Tiering);
        config.garbage_collection.enabled = self.contains(Phase::Gc);
    }
}

impl fmt::Display for PhaseSelection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let on: Vec<String> = Phase::ALL
            .iter()
            .filter(|p| self.contains(**p))
            .map(|p| p.number().to_string())
            .collect();
        if on.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&on.join(","))
        }
    }
}

impl FromStr for PhaseSelection {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let help = "phases are numbered 1 (pool), 2 (cache), 3 (compression), 4 (swapping), \
                    5 (tiering), 6 (gc); write a range (1-6), a list (1,3,4), both (2-4,6), all or none";
        let text = s.trim().to_ascii_lowercase();
        match text.as_str() {
            "none" | "" => return Ok(PhaseSelection::none()),
            "all" => return Ok(PhaseSelection::all()),
            _ => {}
        }
        let number = |part: &str| -> Result<Phase, String> {
            let n: usize = part
                .trim()
                .parse()
                .map_err(|_| format!("invalid phase `{}` in `{s}`: {help}", part.trim()))?;
            Phase::of_number(n).ok_or_else(|| format!("no phase {n} in `{s}`: {help}"))
        };
        let mut sel = PhaseSelection::none();
        for part in text.split(',') {
            match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (number(a)?, number(b)?);
                    if a > b {
                        return Err(format!(
                            "range `{}` in `{s}` runs backwards; write {}-{}",
                            part.trim(),
                            b.number(),
                            a.number()
                        ));
                    }
                    for p in Phase::ALL.iter().filter(|p| **p >= a && **p <= b) {
                        sel = sel.with(*p, true);
                    }
                }
                None => sel = sel.with(number(part)?, true),
            }
        }
        Ok(sel)
    }
}

pub use qvl_core::PhaseState;

/// One phase's line of the report.
#[derive(Debug, Clone, PartialEq)]
pub struct PhaseStatus {
    /// The phase.
    pub phase: Phase,
    /// Its state.
    pub state: PhaseState,
    /// Why it is in that state, or what it does.
    pub reason: String,
    /// Its `overhead_budget` (share of step time).
    pub budget: f64,
    /// Mean measured overhead (share of step or request time), when measured.
    pub overhead: Option<f64>,
    /// Highest measured overhead of one step or request.
    pub overhead_max: Option<f64>,
}

/// What the caller knows besides the config.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    /// `--phases`: overrides the `enabled` keys when given.
    pub phases: Option<PhaseSelection>,
    /// RAM for the KV cache (`--kv-budget`); swapping needs it.
    pub kv_budget: Option<ByteSize>,
    /// The shape of the model's KV blocks.
    pub kv_layout: KvLayout,
    /// Most tokens one request may hold (prompt plus generation), to size
    /// the swap file.
    pub max_context_tokens: usize,
}

/// Counters of the KV storage of the current request, shared with the
/// pipeline.
#[derive(Default)]
struct StorageProbe {
    /// Time inside the storage's calls (allocate, release, write, read).
    busy_ns: AtomicU64,
    /// Of that, time in allocate and release: the pool's own work (writes
    /// and reads of pooled blocks are the plain path's copies).
    alloc_ns: AtomicU64,
    /// Set by the pipeline: move the blocks to the plain path at the next
    /// mutable call.
    fall_back: AtomicBool,
    /// Set by the storage once it has moved.
    fell_back: AtomicBool,
}

/// The KV storage the pipeline hands a request: the managers' storage
/// behind stable block ids, timed, and able to move every block to the
/// plain path (pooled or host f32) mid-run.
pub struct PhasedKvStorage {
    inner: Box<dyn KvBlockStorage>,
    plain: Option<Box<dyn KvBlockStorage>>,
    /// Outer id -> inner id.
    ids: Vec<Option<KvBlockId>>,
    free: Vec<usize>,
    probe: Arc<StorageProbe>,
}

impl PhasedKvStorage {
    fn new(
        inner: Box<dyn KvBlockStorage>,
        plain: Option<Box<dyn KvBlockStorage>>,
        probe: Arc<StorageProbe>,
    ) -> PhasedKvStorage {
        PhasedKvStorage {
            inner,
            plain,
            ids: Vec::new(),
            free: Vec::new(),
            probe,
        }
    }

    fn inner_id(&self, id: KvBlockId) -> qvl_model::Result<KvBlockId> {
        self.ids
            .get(id.0 as usize)
            .copied()
            .flatten()
            .ok_or_else(|| ModelError::KvCache(format!("no block {} in the KV storage", id.0)))
    }

    /// Moves every block to the plain storage, if asked to and not done.
    fn maybe_fall_back(&mut self) -> qvl_model::Result<()> {
        if !self.probe.fall_back.load(Ordering::Relaxed) {
            return Ok(());
        }
        let Some(mut plain) = self.plain.take() else {
            return Ok(());
        };
        let old: Vec<KvBlockId> = self.ids.iter().flatten().copied().collect();
        // A layer at a time (merged reads from a swap space); nothing moves
        // on an error, and the next call tries again.
        let new = match qvl_model::kv::copy_blocks(self.inner.as_ref(), plain.as_mut(), &old) {
            Ok(new) => new,
            Err(e) => {
                self.plain = Some(plain);
                return Err(e);
            }
        };
        for (slot, id) in self.ids.iter_mut().flatten().zip(new) {
            *slot = id;
        }
        let mut left = std::mem::replace(&mut self.inner, plain);
        self.probe.fell_back.store(true, Ordering::Relaxed);
        // Every block is copied: releasing them from the storage left
        // behind frees its space now, and a failure there loses nothing.
        for &id in &old {
            if let Err(e) = left.release(id) {
                tracing::warn!("releasing KV block {} after the switch to RAM: {e}", id.0);
            }
        }
        Ok(())
    }

    fn timed<R>(probe: &StorageProbe, f: impl FnOnce() -> R) -> R {
        Self::timed_as(probe, false, f)
    }

    fn timed_as<R>(probe: &StorageProbe, alloc: bool, f: impl FnOnce() -> R) -> R {
        let t = Instant::now();
        let r = f();
        let ns = t.elapsed().as_nanos() as u64;
        probe.busy_ns.fetch_add(ns, Ordering::Relaxed);
        if alloc {
            probe.alloc_ns.fetch_add(ns, Ordering::Relaxed);
        }
        r
    }
}

impl KvBlockStorage for PhasedKvStorage {
    fn layout(&self) -> KvLayout {
        self.inner.layout()
    }

    fn allocate(&mut self) -> qvl_model::Result<KvBlockId> {
        self.maybe_fall_back()?;
        let probe = Arc::clone(&self.probe);
        let inner = Self::timed_as(&probe, true, || self.inner.allocate())?;
        if let Some(i) = self.free.pop() {
            self.ids[i] = Some(inner);
            return Ok(KvBlockId(i as u64));
        }
        self.ids.push(Some(inner));
        Ok(KvBlockId(self.ids.len() as u64 - 1))
    }

    fn release(&mut self, id: KvBlockId) -> qvl_model::Result<()> {
        let inner = self.inner_id(id)?;
        let probe = Arc::clone(&self.probe);
        Self::timed_as(&probe, true, || self.inner.release(inner))?;
        self.ids[id.0 as usize] = None;
        self.free.push(id.0 as usize);
        Ok(())
    }

    fn write(
        &mut self,
        id: KvBlockId,
        layer: usize,
        slot: usize,
        keys: &[f32],
        values: &[f32],
    ) -> qvl_model::Result<()> {
        self.maybe_fall_back()?;
        let inner = self.inner_id(id)?;
        let probe = Arc::clone(&self.probe);
        Self::timed(&probe, || {
            self.inner.write(inner, layer, slot, keys, values)
        })
    }

    fn read(&self, id: KvBlockId, layer: usize) -> qvl_model::Result<KvLayerView<'_>> {
        let inner = self.inner_id(id)?;
        Self::timed(&self.probe, || self.inner.read(inner, layer))
    }

    fn read_layer(
        &self,
        ids: &[KvBlockId],
        layer: usize,
    ) -> qvl_model::Result<Vec<KvLayerView<'_>>> {
        let inner = ids
            .iter()
            .map(|id| self.inner_id(*id))
            .collect::<qvl_model::Result<Vec<_>>>()?;
        Self::timed(&self.probe, || self.inner.read_layer(&inner, layer))
    }

    fn used_bytes(&self) -> usize {
        self.inner.used_bytes()
    }

    fn write_window_blocks(&self) -> Option<usize> {
        self.inner.write_window_blocks()
    }

    fn observe_attention(
        &self,
        layer: usize,
        queries: &[f32],
        heads: usize,
        scale: f32,
        output: &[f32],
    ) {
        self.inner
            .observe_attention(layer, queries, heads, scale, output);
    }
}

/// Which manager owns the KV storage of a request (its time is theirs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KvOwner {
    Host,
    Pool,
    Codec,
    Swap,
}

impl KvOwner {
    fn phase(self) -> Option<Phase> {
        match self {
            KvOwner::Host => None,
            KvOwner::Pool => Some(Phase::Pool),
            KvOwner::Codec => Some(Phase::Compression),
            KvOwner::Swap => Some(Phase::Swapping),
        }
    }
}

/// Running overhead of one phase.
#[derive(Debug, Default, Clone, Copy)]
struct Overhead {
    sum: f64,
    last: f64,
    max: f64,
    samples: u64,
    over_in_a_row: u32,
}

impl Overhead {
    fn add(&mut self, share: f64, budget: f64) -> bool {
        self.sum += share;
        self.last = share;
        self.max = self.max.max(share);
        self.samples += 1;
        if share > budget {
            self.over_in_a_row += 1;
        } else {
            self.over_in_a_row = 0;
        }
        self.over_in_a_row >= DEACTIVATE_AFTER_STEPS
    }

    fn mean(&self) -> Option<f64> {
        (self.samples > 0).then(|| self.sum / self.samples as f64)
    }
}

/// The KV blocks of finished requests, kept for the collector to drop.
type FinishedKv = qvl_gc::KvBlockLedger<Box<dyn Any + Send>>;

/// The garbage collection phase at run time.
struct GcRuntime {
    collector: Arc<qvl_gc::Collector>,
    ledger: Arc<FinishedKv>,
    thread: Option<qvl_gc::CollectorThread>,
    last_gc_ns: u64,
}

/// The prefix cache phase at run time.
struct PrefixCache {
    cache: TieredCache,
    tiers: Vec<Tier>,
    /// Tokens reused from the cache, over all requests.
    reused_tokens: usize,
    /// Blocks exported into the cache.
    stored_blocks: usize,
    /// Time spent in lookups, imports and exports of the current request.
    busy: Duration,
    request_started: Option<Instant>,
}

/// The managers of one run, built from the config in phase order.
pub struct Pipeline {
    config: Config,
    layout: KvLayout,
    recorder: Arc<dyn MetricsRecorder>,
    statuses: Vec<PhaseStatus>,
    overheads: [Overhead; 6],
    pool: Option<Arc<HostPool>>,
    cache: Option<PrefixCache>,
    codec: Option<KvCodecOptions>,
    swap: Option<(qvl_swap::SwapConfig, usize)>,
    gc: Option<GcRuntime>,
    tracker: Option<Arc<qvl_gc::TensorRegistry>>,
    /// The current request's KV storage.
    probe: Option<(Arc<StorageProbe>, KvOwner, u64)>,
    codec_monitor: Option<(KvCodecMonitor, crate::kv_codec::KvCodecStats)>,
    swap_monitors: Vec<KvSwapMonitor>,
    next_request: u64,
    /// Requests recomputed after their KV storage failed.
    kv_recoveries: usize,
}

impl fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pipeline")
            .field("statuses", &self.statuses)
            .finish()
    }
}

impl Pipeline {
    /// Builds every selected manager in phase order. Never fails: a manager
    /// that cannot start leaves its phase on the original path with the
    /// reason logged and recorded.
    pub fn build(
        config: &Config,
        hardware: &Hardware,
        options: &PipelineOptions,
        recorder: Arc<dyn MetricsRecorder>,
    ) -> Pipeline {
        let mut config = config.clone();
        let selection = options
            .phases
            .unwrap_or_else(|| PhaseSelection::from_config(&config));
        selection.apply_to(&mut config);
        let budget = |p: Phase| match p {
            Phase::Pool => config.memory_pooling.overhead_budget,
            Phase::Cache => config.caching.overhead_budget,
            Phase::Compression => config.compression.overhead_budget,
            Phase::Swapping => config.swapping.overhead_budget,
            Phase::Tiering => config.tiering.overhead_budget,
            Phase::Gc => config.garbage_collection.overhead_budget,
        };
        let statuses = Phase::ALL
            .iter()
            .map(|&phase| PhaseStatus {
                phase,
                state: PhaseState::Off,
                reason: "not selected (--phases or `enabled = false`)".to_string(),
                budget: budget(phase),
                overhead: None,
                overhead_max: None,
            })
            .collect();
        let mut p = Pipeline {
            layout: options.kv_layout,
            recorder,
            statuses,
            overheads: [Overhead::default(); 6],
            pool: None,
            cache: None,
            codec: None,
            swap: None,
            gc: None,
            tracker: None,
            probe: None,
            codec_monitor: None,
            swap_monitors: Vec::new(),
            next_request: 0,
            kv_recoveries: 0,
            config,
        };
        // When compression or swapping will hold the KV blocks, the pool only
        // serves the plain path they fall back to: pre-making its KV slots
        // would reserve memory nothing uses (235 MB for Qwen3-VL-2B's 64).
        let kv_held_elsewhere = selection.contains(Phase::Compression)
            || (selection.contains(Phase::Swapping) && options.kv_budget.is_some());
        for phase in Phase::ALL {
            if !selection.contains(phase) {
                continue;
            }
            let result = match phase {
                Phase::Pool => p.build_pool(kv_held_elsewhere),
                Phase::Cache => p.build_cache(),
                Phase::Compression => p.build_compression(),
                Phase::Swapping => p.build_swap(hardware, options),
                Phase::Tiering => Err(
                    "no --ram-budget: the weights stay in RAM as loaded (nothing to tier)"
                        .to_string(),
                )
                .map_err(|r| (PhaseState::Off, r)),
                Phase::Gc => p.build_gc(),
            };
            match result {
                Ok(what) => p.set_status(phase, PhaseState::On, what),
                Err((state, reason)) => {
                    if state == PhaseState::Failed {
                        tracing::warn!(phase = %phase, "{reason}; the original path runs");
                    } else {
                        tracing::info!(phase = %phase, "{reason}");
                    }
                    p.set_status(phase, state, reason);
                }
            }
        }
        if let (Some(options), true) = (p.codec, p.swap.is_some()) {
            let reason = format!(
                "KV chunks leave RAM encoded {} (group quantization per token, group {}) when \
                 swapped; resident blocks stay f32 (the swapping storage holds the KV)",
                options.kind, options.group_size
            );
            p.set_status(Phase::Compression, PhaseState::On, reason);
        }
        if let Some(pool) = &p.pool {
            let what = match (p.codec.is_some(), p.swap.is_some()) {
                (_, true) => "on; KV blocks are held by the swapping storage, the pool serves the plain path it falls back to",
                (true, false) => "on; KV blocks are held encoded by the compression storage, the pool serves the plain path it falls back to",
                (false, false) => "KV blocks are slots of the pool's kv_blocks_f32 slab",
            };
            let slots = pool
                .slab_stats()
                .iter()
                .find(|s| s.name == KV_SLAB_NAME)
                .map_or(0, |s| s.total_slots);
            p.set_status(
                Phase::Pool,
                PhaseState::On,
                format!("{what} ({slots} slots made at start)"),
            );
        }
        tracing::info!(profile = %hardware.profile, "pipeline: {}", p.summary());
        p
    }

    /// The phases' states, in phase order.
    pub fn statuses(&self) -> Vec<PhaseStatus> {
        let mut out = self.statuses.clone();
        for s in &mut out {
            let o = &self.overheads[s.phase as usize];
            s.overhead = o.mean();
            s.overhead_max = (o.samples > 0).then_some(o.max);
        }
        out
    }

    /// Whether `phase` is on now.
    pub fn is_on(&self, phase: Phase) -> bool {
        self.statuses[phase as usize].state == PhaseState::On
    }

    /// Sets a phase's state and reason (the caller's own phases, such as
    /// tiering, which is set up with the model).
    pub fn set_status(&mut self, phase: Phase, state: PhaseState, reason: impl Into<String>) {
        let s = &mut self.statuses[phase as usize];
        s.state = state;
        s.reason = reason.into();
        self.report_phase(phase);
    }

    /// Sends a phase's state and mean overhead to the metrics recorder (the
    /// dashboard shows them; a deactivation raises an alert there).
    fn report_phase(&self, phase: Phase) {
        let overhead = self.overheads[phase as usize].mean().unwrap_or(f64::NAN);
        self.recorder.record(&MetricEvent::Phase {
            phase: phase.number() as u8,
            state: self.statuses[phase as usize].state,
            overhead,
            budget: self.statuses[phase as usize].budget,
        });
    }

    /// "pool on, cache on, ..." for logs.
    pub fn summary(&self) -> String {
        self.statuses
            .iter()
            .map(|s| format!("{} {}", s.phase.name(), s.state.as_str()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Starts the host pool; `kv_held_elsewhere` skips pre-making KV slots.
    fn build_pool(&mut self, kv_held_elsewhere: bool) -> Result<String, (PhaseState, String)> {
        let c = &self.config.memory_pooling;
        let mut specialized_pools = std::collections::BTreeMap::new();
        for (name, s) in &c.specialized_pools {
            specialized_pools.insert(
                name.clone(),
                SpecializedPoolConfig {
                    kind: s.kind,
                    shape: s.shape.clone(),
                    dtype: s.dtype,
                    initial: s.initial_count,
                },
            );
        }
        // This model's blocks, as many as the configured KV pool pre-makes
        // when the pool holds the KV (it grows on demand otherwise).
        let initial = if kv_held_elsewhere {
            0
        } else {
            c.specialized_pools
                .values()
                .filter(|s| s.kind == TensorKind::KvCache)
                .map(|s| s.initial_count)
                .max()
                .unwrap_or(0)
        };
        specialized_pools.insert(
            KV_SLAB_NAME.to_string(),
            kv_slab_config(self.layout, initial),
        );
        let cfg = PoolConfig {
            enabled: true,
            max_pool_size: c.max_pool_size,
            specialized_pools,
        };
        let pool = HostPool::with_recorder(&cfg, Arc::clone(&self.recorder))
            .map_err(|e| (PhaseState::Failed, format!("the pool did not start: {e}")))?;
        self.pool = Some(Arc::new(pool));
        Ok(String::new())
    }

    fn build_cache(&mut self) -> Result<String, (PhaseState, String)> {
        let c = &self.config.caching;
        let policy = match c.eviction_policy {
            CachePolicy::Lru => PolicyKind::Lru,
            CachePolicy::Lfu => PolicyKind::Lfu,
            CachePolicy::Arc => PolicyKind::Arc,
            CachePolicy::S3Fifo => PolicyKind::S3Fifo,
            CachePolicy::Predictive => PolicyKind::Predictive,
            CachePolicy::Learned => PolicyKind::Learned,
        };
        let cfg = CacheConfig {
            gpu_cache_size: c.gpu_cache_size,
            cpu_cache_size: c.cpu_cache_size,
            ssd_cache_size: c.ssd_cache_size,
            eviction_policy: policy,
        };
        if cfg.cpu_cache_size.bytes() == 0 {
            return Err((
                PhaseState::Off,
                "caching.cpu_cache_size is 0 and there is no GPU or SSD level on this path"
                    .to_string(),
            ));
        }
        // The host level only: the GPU level needs the CUDA store (not
        // built here), and no SSD store is wired into the prefix cache yet.
        let cache = TieredCache::from_config(&cfg, None, None);
        let tiers = cache.tiers();
        self.cache = Some(PrefixCache {
            cache,
            tiers,
            reused_tokens: 0,
            stored_blocks: 0,
            busy: Duration::ZERO,
            request_started: None,
        });
        Ok(format!(
            "prefix KV blocks kept in a {} host level ({policy:?}) across requests",
            cfg.cpu_cache_size
        ))
    }

    fn build_compression(&mut self) -> Result<String, (PhaseState, String)> {
        let c = &self.config.compression;
        if !c
            .methods
            .contains(&crate::config::CompressionMethod::Quantization)
        {
            return Err((
                PhaseState::Off,
                "compression.methods has no `quantization`, the only method the KV path uses"
                    .to_string(),
            ));
        }
        let kind = if c.quantization_bits == 4 {
            KvCodecKind::Int4
        } else {
            KvCodecKind::Int8
        };
        let options = KvCodecOptions::of(kind);
        // Building one storage checks the options against this layout.
        CodecKvStorage::new(self.layout, options).map_err(|e| {
            (
                PhaseState::Failed,
                format!("the KV codec did not start: {e}"),
            )
        })?;
        self.codec = Some(options);
        Ok(format!(
            "KV blocks held KIVI {kind} (keys per channel, values per token; {} sink and {} recent tokens exact)",
            options.sink_tokens, options.recent_tokens
        ))
    }

    fn build_swap(
        &mut self,
        hardware: &Hardware,
        options: &PipelineOptions,
    ) -> Result<String, (PhaseState, String)> {
        let Some(budget) = options.kv_budget else {
            return Err((
                PhaseState::Off,
                "no --kv-budget: the KV cache fits in RAM, nothing to swap".to_string(),
            ));
        };
        let c = &self.config.swapping;
        let dir = c
            .swap_directory
            .clone()
            .unwrap_or_else(config::default_swap_directory);
        let token_bytes = self.layout.block_floats() * 4 / self.layout.block_tokens.max(1);
        // Twice the largest context, plus slack for blocks replaced while
        // their old record is still being read.
        let want = (2 * options.max_context_tokens * token_bytes + (16 << 20)) as u64;
        let capacity = match hardware.disk_free {
            Some(free) if free / 2 < want => {
                return Err((
                    PhaseState::Failed,
                    format!(
                        "{} has {} free; the swap file needs {}",
                        hardware.disk_path.display(),
                        ByteSize(free),
                        ByteSize(want)
                    ),
                ))
            }
            _ => want,
        };
        let cfg = qvl_swap::SwapConfig {
            enabled: true,
            memory_threshold: c.memory_threshold.max(0.05),
            swap_directory: dir,
            eviction_policy: match c.eviction_policy {
                SwapPolicy::Lru => qvl_swap::EvictionPolicyKind::Lru,
                SwapPolicy::Lfu => qvl_swap::EvictionPolicyKind::Lfu,
            },
            capacity_bytes: capacity.next_multiple_of(1 << 20),
            ..qvl_swap::SwapConfig::default()
        };
        // Open a store now so that a bad directory or a full disk shows at
        // start-up; each request opens its own.
        let storage = self
            .open_swap_storage(&cfg, budget.bytes() as usize)
            .map_err(|e| {
                (
                    PhaseState::Failed,
                    format!("the swap space did not start: {e}"),
                )
            })?;
        let io = storage.store().io().name();
        drop(storage);
        self.swap = Some((cfg.clone(), budget.bytes() as usize));
        Ok(format!(
            "KV past {} of RAM swapped to {} ({io} I/O)",
            budget,
            cfg.swap_directory.display()
        ))
    }

    fn open_swap_storage(
        &self,
        cfg: &qvl_swap::SwapConfig,
        budget: usize,
    ) -> qvl_model::Result<SwappingKvStorage> {
        let store = qvl_swap::SsdStore::open(cfg)
            .and_then(|s| s.with_recorder(Arc::clone(&self.recorder)))
            .map_err(|e| ModelError::KvCache(format!("opening the swap space: {e}")))?;
        let mut storage = SwappingKvStorage::with_store(self.layout, store, cfg, budget)?;
        if let Some(options) = self.codec {
            // The in-RAM codec's KIVI layout (keys per channel, sinks
            // exact), not per-token groups over keys and values alike.
            storage = storage.with_kivi(&options)?;
        }
        Ok(storage)
    }

    fn build_gc(&mut self) -> Result<String, (PhaseState, String)> {
        let c = &self.config.garbage_collection;
        let cfg = qvl_gc::GcConfig {
            enabled: true,
            collection_interval: c.collection_interval.0,
            adaptive_enabled: c.adaptive_enabled,
            memory_budget: self.config.hardware.ram.map(|r| r.bytes()),
            ..qvl_gc::GcConfig::default()
        };
        let registry = Arc::new(qvl_gc::TensorRegistry::new(&cfg));
        let collector = qvl_gc::Collector::new(cfg, Arc::clone(&registry)).map_err(|e| {
            (
                PhaseState::Failed,
                format!("the collector did not start: {e}"),
            )
        })?;
        collector.set_recorder(Arc::clone(&self.recorder));
        let mut members = Vec::new();
        // Pooled blocks are counted by the pool; the ledger owns the rest.
        let ledger = Arc::new(FinishedKv::new(
            "finished requests' KV",
            self.pool.is_none(),
        ));
        collector.register(ledger.clone());
        members.push("finished requests' KV");
        if let Some(pool) = &self.pool {
            collector.register(Arc::new(qvl_gc::AllocatorReclaim::new(
                "host pool",
                Arc::clone(pool),
            )));
            members.push("host pool (release cached)");
        }
        let thread = collector.spawn().map_err(|e| {
            (
                PhaseState::Failed,
                format!("the collector thread did not start: {e}"),
            )
        })?;
        self.tracker = Some(registry);
        self.gc = Some(GcRuntime {
            collector,
            ledger,
            thread: Some(thread),
            last_gc_ns: 0,
        });
        Ok(format!(
            "collector every {} ({}), over: {}",
            c.collection_interval,
            if c.adaptive_enabled {
                "adaptive"
            } else {
                "fixed"
            },
            members.join(", ")
        ))
    }

    /// The plain KV storage: pooled when the pool is on, else host f32.
    fn plain_storage(&self) -> (Box<dyn KvBlockStorage>, KvOwner) {
        match (&self.pool, self.is_on(Phase::Pool)) {
            (Some(pool), true) => {
                let mut storage = PooledKvStorage::new(
                    self.layout,
                    Arc::clone(pool),
                    self.tracker
                        .clone()
                        .map(|t| t as Arc<dyn qvl_core::LifetimeTracker>),
                );
                // With the collector running, a block that would grow the
                // pool past its target first makes it collect.
                if let Some(gc) = self.gc.as_ref().filter(|g| g.thread.is_some()) {
                    storage = storage.with_pressure_hook(gc.collector.pressure_hook());
                }
                (Box::new(storage), KvOwner::Pool)
            }
            _ => (Box::new(HostKvStorage::new(self.layout)), KvOwner::Host),
        }
    }

    /// A KV cache for a new request, held by the managers that are on:
    /// swapping (with the codec for swapped chunks when compression is on)
    /// when a KV budget was given, else the KV codec, else pooled blocks,
    /// else plain f32 blocks in RAM. A manager that fails here leaves its
    /// phase on the original path for this and later requests.
    pub fn new_kv_cache(&mut self) -> PagedKvCache {
        let probe = Arc::new(StorageProbe::default());
        self.codec_monitor = None;
        let mut chosen: Option<(Box<dyn KvBlockStorage>, KvOwner)> = None;
        if let (Some((cfg, budget)), true) = (self.swap.clone(), self.is_on(Phase::Swapping)) {
            match self.open_swap_storage(&cfg, budget) {
                Ok(s) => {
                    self.swap_monitors.push(s.monitor());
                    chosen = Some((Box::new(s), KvOwner::Swap));
                }
                Err(e) => self.fail(Phase::Swapping, format!("the swap space did not open: {e}")),
            }
        }
        if chosen.is_none() && self.is_on(Phase::Compression) {
            if let Some(options) = self.codec {
                match CodecKvStorage::new(self.layout, options) {
                    Ok(s) => {
                        let m = s.monitor();
                        self.codec_monitor = Some((m, Default::default()));
                        chosen = Some((Box::new(s), KvOwner::Codec));
                    }
                    Err(e) => self.fail(Phase::Compression, format!("the KV codec failed: {e}")),
                }
            }
        }
        let (inner, owner, plain) = match chosen {
            Some((inner, owner)) => {
                let (plain, _) = self.plain_storage();
                (inner, owner, Some(plain))
            }
            None => {
                let (inner, owner) = self.plain_storage();
                let plain = (owner == KvOwner::Pool)
                    .then(|| Box::new(HostKvStorage::new(self.layout)) as Box<dyn KvBlockStorage>);
                (inner, owner, plain)
            }
        };
        self.probe = Some((Arc::clone(&probe), owner, 0));
        PagedKvCache::new(Box::new(PhasedKvStorage::new(inner, plain, probe)))
    }

    /// The current request's KV storage failed with `error` (a damaged,
    /// missing or truncated swap file, a full disk): marks the manager that
    /// held the KV failed, for this request and later ones, and returns its
    /// phase and a fresh cache on the path that remains (the next manager
    /// that is on, else plain RAM). The caller recomputes the request into it (its
    /// prompt and the tokens generated so far); nothing is read from the
    /// failed storage again. Gives `error` back when it is not a KV storage
    /// error or no manager held the KV (the plain path itself failed).
    pub fn recover_kv(&mut self, error: ModelError) -> Result<(Phase, PagedKvCache), ModelError> {
        let phase = match (&error, &self.probe) {
            (ModelError::KvCache(_), Some((_, owner, _))) => owner.phase(),
            _ => None,
        };
        let Some(phase) = phase else {
            return Err(error);
        };
        self.kv_recoveries += 1;
        self.fail(
            phase,
            format!("its KV storage failed mid-request ({error}); the request was recomputed without it"),
        );
        Ok((phase, self.new_kv_cache()))
    }

    /// How many times a request's KV was recomputed after its storage
    /// failed ([`Pipeline::recover_kv`]).
    pub fn kv_recoveries(&self) -> usize {
        self.kv_recoveries
    }

    fn fail(&mut self, phase: Phase, reason: String) {
        tracing::warn!(phase = %phase, "{reason}; the original path runs");
        self.set_status(phase, PhaseState::Failed, reason);
    }

    fn deactivate(&mut self, phase: Phase) {
        let o = self.overheads[phase as usize];
        let budget = self.statuses[phase as usize].budget;
        let reason = format!(
            "switched off at run time: over its {:.1}% budget for {} steps in a row (last {:.1}%, mean {:.1}% of step time)",
            100.0 * budget,
            o.over_in_a_row,
            100.0 * o.last,
            100.0 * o.sum / o.samples.max(1) as f64,
        );
        tracing::warn!(phase = %phase, "{reason}");
        self.set_status(phase, PhaseState::Deactivated, reason);
        match phase {
            Phase::Gc => {
                if let Some(gc) = &mut self.gc {
                    gc.thread = None;
                }
            }
            Phase::Pool | Phase::Compression | Phase::Swapping => {
                if let Some((probe, owner, _)) = &self.probe {
                    if owner.phase() == Some(phase) {
                        probe.fall_back.store(true, Ordering::Relaxed);
                    }
                }
            }
            Phase::Cache | Phase::Tiering => {}
        }
    }

    /// Prefix cache, before the prefill of a request: imports the longest run
    /// of `prompt`'s full blocks found in the cache into `cache` (which must
    /// be empty), up to `cacheable` tokens (where the first image
    /// placeholder is; image tokens are not keyed by their image) and
    /// always leaving one token to compute. `import` appends a block (the
    /// model's session knows its positions). Returns the tokens imported.
    pub fn begin_request(
        &mut self,
        prompt: &[u32],
        cacheable: usize,
        import: &mut dyn FnMut(&[u32], &qvl_core::Block) -> qvl_model::Result<()>,
    ) -> qvl_model::Result<usize> {
        if let Some(pc) = &mut self.cache {
            pc.request_started = Some(Instant::now());
            pc.busy = Duration::ZERO;
        }
        if !self.is_on(Phase::Cache) {
            return Ok(0);
        }
        let Some(pc) = &mut self.cache else {
            return Ok(0);
        };
        let t = Instant::now();
        let bt = self.layout.block_tokens;
        let limit = cacheable.min(prompt.len().saturating_sub(1));
        let mut parent = None;
        let mut done = 0;
        while done + bt <= limit {
            let tokens = &prompt[done..done + bt];
            let key = BlockKey::chained(parent, tokens, &[]);
            let found = pc
                .cache
                .lookup(&key)
                .map_err(|e| ModelError::KvCache(format!("prefix cache lookup: {e}")))?;
            let tier = match &found {
                Some((level, _)) => pc.tiers.get(*level).copied(),
                None => pc.tiers.last().copied(),
            }
            .unwrap_or(Tier::HostRam);
            self.recorder.record(&MetricEvent::CacheLookup {
                tier,
                hit: found.is_some(),
            });
            let Some((_, block)) = found else { break };
            import(tokens, &block)?;
            parent = Some(key);
            done += bt;
        }
        pc.reused_tokens += done;
        pc.busy += t.elapsed();
        Ok(done)
    }

    /// Ends a decode step that took `step`: measures each manager's share
    /// of it, feeds the collector, and switches off managers over budget.
    pub fn end_step(&mut self, step: Duration) {
        let step_ns = step.as_nanos().max(1) as f64;
        let mut shares: Vec<(Phase, f64)> = Vec::new();
        if let Some((probe, owner, last)) = &mut self.probe {
            let busy = if *owner == KvOwner::Pool {
                probe.alloc_ns.load(Ordering::Relaxed)
            } else {
                probe.busy_ns.load(Ordering::Relaxed)
            };
            let delta = busy.saturating_sub(*last) as f64;
            *last = busy;
            if probe.fell_back.load(Ordering::Relaxed) {
                // The storage moved to the plain path: its time is the
                // pool's when pooled, nobody's otherwise.
                *owner = if self.pool.is_some() && *owner != KvOwner::Pool {
                    KvOwner::Pool
                } else {
                    KvOwner::Host
                };
                *last = if *owner == KvOwner::Pool {
                    probe.alloc_ns.load(Ordering::Relaxed)
                } else {
                    0
                };
                probe.fell_back.store(false, Ordering::Relaxed);
                probe.fall_back.store(false, Ordering::Relaxed);
            } else if let Some(phase) = owner.phase() {
                shares.push((phase, delta / step_ns));
            }
        }
        if let Some(gc) = &mut self.gc {
            if gc.thread.is_some() {
                let ns = gc.collector.stats().gc_time_ns;
                shares.push((Phase::Gc, ns.saturating_sub(gc.last_gc_ns) as f64 / step_ns));
                gc.last_gc_ns = ns;
            }
        }
        self.record_codec();
        for (phase, share) in shares {
            let budget = self.statuses[phase as usize].budget;
            if self.overheads[phase as usize].add(share.min(1.0), budget) && self.is_on(phase) {
                self.deactivate(phase);
            } else {
                self.report_phase(phase);
            }
        }
    }

    /// Compression events from the codec storage's counters since the last step.
    fn record_codec(&mut self) {
        let Some((monitor, last)) = &mut self.codec_monitor else {
            return;
        };
        let now = monitor.stats();
        let slabs = now.encoded_slabs.saturating_sub(last.encoded_slabs);
        if slabs > 0 {
            let input = now.encoded_values.saturating_sub(last.encoded_values) as u64 * 4;
            let output = now.encoded_bytes.saturating_sub(last.encoded_bytes) as u64;
            self.recorder.record(&MetricEvent::Compress {
                kind: TensorKind::KvCache,
                input_bytes: input,
                output_bytes: output,
                // The storage does not decode what it encodes to measure
                // the error; quality is measured by `qvl perplexity
                // --kv-codec` and the e2e bench.
                rel_error: f64::NAN,
            });
        }
        *last = now;
    }

    /// Ends a request: keeps its full prompt blocks (up to `cacheable`
    /// tokens) in the prefix cache, then hands its KV cache to the collector
    /// as a finished request's garbage (or drops it when gc is off).
    pub fn end_request(
        &mut self,
        kv: PagedKvCache,
        prompt: &[u32],
        cacheable: usize,
    ) -> qvl_model::Result<()> {
        self.record_codec();
        let cache_on = self.is_on(Phase::Cache);
        let mut cache_share = None;
        if let (Some(pc), true) = (&mut self.cache, cache_on) {
            let t = Instant::now();
            let bt = self.layout.block_tokens;
            let keys = kv.block_keys();
            let limit = cacheable.min(prompt.len()) / bt;
            let mut parent = None;
            for (i, key) in keys.iter().enumerate().take(limit) {
                // Blocks already cached were imported or stored earlier.
                if pc.cache.level_of(key).is_none() {
                    let block = kv.export_block(i)?;
                    let info = BlockInfo::kv(block.stored_bytes(), parent, i as u32);
                    pc.cache
                        .put(block, info)
                        .map_err(|e| ModelError::KvCache(format!("prefix cache put: {e}")))?;
                    pc.stored_blocks += 1;
                }
                parent = Some(*key);
            }
            pc.busy += t.elapsed();
            if let Some(start) = pc.request_started.take() {
                cache_share = Some(pc.busy.as_secs_f64() / start.elapsed().as_secs_f64().max(1e-9));
            }
        }
        if let Some(share) = cache_share {
            let budget = self.statuses[Phase::Cache as usize].budget;
            let o = &mut self.overheads[Phase::Cache as usize];
            o.add(share, budget);
            // Per request: one request over budget is enough to stop.
            if share > budget {
                o.over_in_a_row = o.over_in_a_row.max(1);
                self.deactivate(Phase::Cache);
            }
        }
        self.probe = None;
        let request = self.next_request;
        self.next_request += 1;
        match &self.gc {
            Some(gc) if gc.thread.is_some() => {
                let bytes = kv.used_bytes();
                gc.ledger.push(request, Box::new(kv), bytes);
                gc.ledger.finish(request);
            }
            _ => drop(kv),
        }
        Ok(())
    }

    /// One line per phase: number, name, state, overhead against budget, reason.
    pub fn report_table(&self) -> String {
        let mut out = String::from("--- qvl run: phases ---\n");
        out.push_str(&format!(
            "{:<15} {:<11} {:>9} {:>9} {:>8}  {}\n",
            "phase", "state", "overhead", "max", "budget", "what / why"
        ));
        for s in self.statuses() {
            let pct = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.2}%", 100.0 * v));
            out.push_str(&format!(
                "{:<15} {:<11} {:>9} {:>9} {:>7.1}%  {}\n",
                s.phase.to_string(),
                s.state.as_str(),
                pct(s.overhead),
                pct(s.overhead_max),
                100.0 * s.budget,
                s.reason
            ));
        }
        out.push_str(&self.activity());
        out
    }

    /// What the managers did, one line each.
    pub fn activity(&self) -> String {
        let mut out = String::new();
        if let Some(pool) = &self.pool {
            let s = qvl_core::BufferAllocator::stats(pool.as_ref());
            out.push_str(&format!(
                "pool            {} allocations, peak {} allocated / {} reserved, {} now reserved\n",
                s.alloc_count,
                ByteSize(s.peak_allocated_bytes),
                ByteSize(s.peak_reserved_bytes),
                ByteSize(s.reserved_bytes)
            ));
        }
        if let Some(pc) = &self.cache {
            let s = pc.cache.stats();
            out.push_str(&format!(
                "cache           {} lookups, {} hits ({:.0}%), {} prompt tokens reused, {} blocks stored\n",
                s.lookups,
                s.lookups - s.misses(),
                100.0 * s.hit_ratio(),
                pc.reused_tokens,
                pc.stored_blocks
            ));
        }
        if let Some((m, _)) = &self.codec_monitor {
            let s = m.stats();
            let slabs = s.encoded_slabs + s.open_slabs;
            if s.encoded_slabs == 0 {
                // Short requests never leave the exact recent window: say
                // so instead of a ratio of f32 bytes to f16 bytes.
                out.push_str(&format!(
                    "compression     last request: none of its {slabs} slabs encoded yet (all still in the exact window of recent tokens), KV held {}\n",
                    ByteSize(s.held_bytes as u64)
                ));
            } else {
                out.push_str(&format!(
                    "compression     last request: {} of {slabs} slabs encoded at {:.2} bits/value ({:.2}x smaller than f16), KV held {} ({:.2}x smaller than f32)\n",
                    s.encoded_slabs,
                    s.encoded_bits_per_value(),
                    s.encoded_ratio_vs_f16(),
                    ByteSize(s.held_bytes as u64),
                    s.ratio_vs_f32()
                ));
            }
        }
        if !self.swap_monitors.is_empty() {
            let (mut outs, mut reads, mut stall, mut peak) = (0, 0, 0.0, 0);
            for m in &self.swap_monitors {
                let s = m.stats();
                outs += s.swap_outs;
                reads += s.prefetch_hits + s.demand_reads;
                stall += s.stall_secs;
                peak = peak.max(s.peak_ram_bytes);
            }
            out.push_str(&format!(
                "swapping        {outs} blocks out, {reads} chunks in, {stall:.3} s waited, KV RAM peak {}\n",
                ByteSize(peak as u64)
            ));
        }
        if let Some(gc) = &self.gc {
            let s = gc.collector.stats();
            out.push_str(&format!(
                "gc              {} collections, {} released, {:.3} ms collecting\n",
                s.collections,
                ByteSize(s.released_bytes),
                s.gc_time_ns as f64 * 1e-6
            ));
        }
        out
    }

    /// Runs one collection now (after the last request), when gc is on.
    pub fn collect_now(&self) -> Option<u64> {
        let gc = self.gc.as_ref()?;
        gc.thread.as_ref()?;
        gc.collector
            .collect(qvl_gc::Trigger::Manual)
            .map(|r| r.released_bytes)
    }

    /// The pool, when on.
    pub fn pool(&self) -> Option<&Arc<HostPool>> {
        self.pool.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::tiny_decoder;
    use qvl_model::ops::argmax;
    use qvl_model::text::Logits;
    use qvl_model::TextDecoder;

    #[test]
    fn phases_parse_ranges_lists_and_none() {
        let p = |s: &str| s.parse::<PhaseSelection>();
        assert_eq!(p("1-6").unwrap(), PhaseSelection::all());
        assert_eq!(p("none").unwrap(), PhaseSelection::none());
        assert_eq!(p("all").unwrap(), PhaseSelection::all());
        let s = p("1,3,4").unwrap();
        assert_eq!(s.to_string(), "1,3,4");
        assert!(s.contains(Phase::Compression) && !s.contains(Phase::Cache));
        assert_eq!(p("2-4,6").unwrap().to_string(), "2,3,4,6");
        assert_eq!(
            p("7").unwrap_err(),
            "no phase 7 in `7`: phases are numbered 1 (pool), 2 (cache), 3 (compression), \
             4 (swapping), 5 (tiering), 6 (gc); write a range (1-6), a list (1,3,4), both (2-4,6), all or none"
        );
        assert!(p("1,x")
            .unwrap_err()
            .starts_with("invalid phase `x` in `1,x`"));
        assert!(p("4-2").unwrap_err().contains("runs backwards; write 2-4"));
        assert!(p("0").unwrap_err().starts_with("no phase 0"));
    }

    fn tiny_config(swap_dir: &std::path::Path) -> Config {
        let mut c = Config::default();
        c.swapping.swap_directory = Some(swap_dir.to_path_buf());
        c.garbage_collection.collection_interval =
            crate::config::HumanDuration(Duration::from_millis(1));
        // The tiny decoder's steps take microseconds, so any manager's
        // bookkeeping is a large share of them: no switching off here
        // (the deactivation test sets its own budget).
        c.memory_pooling.overhead_budget = 1.0;
        c.caching.overhead_budget = 1.0;
        c.compression.overhead_budget = 1.0;
        c.swapping.overhead_budget = 1.0;
        c.garbage_collection.overhead_budget = 1.0;
        c
    }

    fn options(dec: &TextDecoder, phases: &str, kv_budget: Option<ByteSize>) -> PipelineOptions {
        PipelineOptions {
            phases: Some(phases.parse().unwrap()),
            kv_budget,
            kv_layout: dec.kv_layout(4),
            max_context_tokens: 64,
        }
    }

    /// Every logit row of `got` within `tolerance` of `expected`'s.
    fn assert_close(got: &[Vec<f32>], expected: &[Vec<f32>], tolerance: f32, phases: &str) {
        assert_eq!(got.len(), expected.len(), "phases {phases}: rows differ");
        for (g, e) in got.iter().zip(expected) {
            assert_eq!(g.len(), e.len());
            let worst = g
                .iter()
                .zip(e)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                worst <= tolerance,
                "phases {phases}: logits differ by {worst}"
            );
        }
    }

    /// Runs `prompts` one after another through `pipeline`; returns each
    /// request's greedy tokens and logits rows.
    fn run(
        dec: &TextDecoder,
        pipeline: &mut Pipeline,
        prompts: &[Vec<u32>],
        steps: usize,
    ) -> Vec<(Vec<u32>, Vec<Vec<f32>>)> {
        let mut out = Vec::new();
        for prompt in prompts {
            let mut kv = pipeline.new_kv_cache();
            let reused = pipeline
                .begin_request(prompt, prompt.len(), &mut |tokens, block| {
                    kv.import_block(tokens, block)
                })
                .unwrap();
            let rest = &prompt[reused..];
            let positions: Vec<[i64; 3]> = (reused as i64..prompt.len() as i64)
                .map(|i| [i; 3])
                .collect();
            let hidden = dec.embed(rest).unwrap();
            let mut logits = dec
                .forward(&mut kv, hidden, rest, &positions, None, Logits::Last)
                .unwrap();
            let mut rows = vec![logits.clone()];
            let mut tokens = Vec::new();
            for pos in (prompt.len() as i64..).take(steps) {
                let next = argmax(&logits) as u32;
                tokens.push(next);
                let t = Instant::now();
                let hidden = dec.embed(&[next]).unwrap();
                logits = dec
                    .forward(&mut kv, hidden, &[next], &[[pos; 3]], None, Logits::Last)
                    .unwrap();
                pipeline.end_step(t.elapsed());
                rows.push(logits.clone());
            }
            pipeline.end_request(kv, prompt, prompt.len()).unwrap();
            out.push((tokens, rows));
        }
        out
    }

    fn prompts() -> Vec<Vec<u32>> {
        // A shared 10-token prefix (two full blocks of 4), then different tails.
        let prefix: Vec<u32> = (10..20).collect();
        (0..3)
            .map(|r| {
                let mut p = prefix.clone();
                p.extend((0..3 + r).map(|i| 100 + 7 * r as u32 + i as u32));
                p
            })
            .collect()
    }

    #[test]
    fn lossless_phases_give_the_same_tokens_as_none() {
        let dec = tiny_decoder();
        let tmp = tempfile::tempdir().unwrap();
        let config = tiny_config(tmp.path());
        let hw = Hardware::detect(&config);
        let noop = Arc::new(qvl_core::NoopRecorder);
        let mut base = Pipeline::build(&config, &hw, &options(&dec, "none", None), noop.clone());
        assert!(Phase::ALL.iter().all(|p| !base.is_on(*p)));
        let expected = run(&dec, &mut base, &prompts(), 8);
        // Each lossless phase alone, then all of them, with a KV budget of
        // 3 blocks so that swapping really swaps.
        let block = dec.kv_layout(4).block_floats() * 4;
        let budget = Some(ByteSize((3 * block) as u64));
        for phases in ["1", "2", "4", "6", "1,2,4,5,6"] {
            let recorder = Arc::new(qvl_metrics::Collector::new());
            let mut p = Pipeline::build(
                &config,
                &hw,
                &options(&dec, phases, budget),
                recorder.clone(),
            );
            let got = run(&dec, &mut p, &prompts(), 8);
            // Swapping prefills in chunks that stay resident under its RAM
            // budget, which sums attention in another order (logits move by
            // about 1e-6); every other lossless phase is bit-exact.
            let tolerance = if phases.contains('4') { 1e-4 } else { 0.0 };
            for (g, e) in got.iter().zip(&expected) {
                assert_eq!(g.0, e.0, "phases {phases}: tokens differ");
                assert_close(&g.1, &e.1, tolerance, phases);
            }
            let statuses = p.statuses();
            for phase in Phase::ALL {
                let s = &statuses[phase as usize];
                let selected = phases.parse::<PhaseSelection>().unwrap().contains(phase);
                if phase == Phase::Tiering {
                    assert_eq!(s.state, PhaseState::Off, "{}", s.reason);
                } else {
                    assert_eq!(
                        s.state == PhaseState::On,
                        selected,
                        "phases {phases}: {phase} is {:?}: {}",
                        s.state,
                        s.reason
                    );
                }
            }
            let snap = recorder.snapshot();
            if phases.contains('2') {
                // Two later prompts reuse the two shared blocks.
                assert!(
                    p.activity().contains("16 prompt tokens reused"),
                    "{}",
                    p.activity()
                );
                let hits: u64 = snap.cache.iter().map(|c| c.hits).sum();
                assert_eq!(hits, 4);
            }
            if phases.contains('4') {
                assert!(snap.swap_out.operations > 0, "swapping never swapped");
            }
            if phases.contains('6') {
                p.collect_now();
                assert!(p.activity().contains("collections"));
                assert!(snap.gc.runs > 0 || recorder.snapshot().gc.runs > 0);
            }
        }
    }

    #[test]
    fn compression_differs_by_a_bounded_amount() {
        let dec = tiny_decoder();
        let tmp = tempfile::tempdir().unwrap();
        let mut config = tiny_config(tmp.path());
        config.compression.quantization_bits = 8;
        let hw = Hardware::detect(&config);
        let noop = Arc::new(qvl_core::NoopRecorder);
        let mut base = Pipeline::build(&config, &hw, &options(&dec, "none", None), noop.clone());
        let long: Vec<Vec<u32>> = vec![(1..60).collect()];
        let expected = run(&dec, &mut base, &long, 6);
        let recorder = Arc::new(qvl_metrics::Collector::new());
        let mut p = Pipeline::build(&config, &hw, &options(&dec, "3", None), recorder.clone());
        assert!(p.is_on(Phase::Compression));
        let got = run(&dec, &mut p, &long, 6);
        let max_diff = got[0]
            .1
            .iter()
            .flatten()
            .zip(expected[0].1.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            max_diff > 0.0,
            "int8 KV changed nothing: is the codec in the path?"
        );
        assert!(max_diff < 0.05, "int8 KV moved a logit by {max_diff}");
        let snap = recorder.snapshot();
        assert!(snap.compression.iter().any(|c| c.encodes > 0));
    }

    #[test]
    fn the_pool_pre_makes_kv_slots_only_when_it_holds_the_kv() {
        let dec = tiny_decoder();
        let tmp = tempfile::tempdir().unwrap();
        let config = tiny_config(tmp.path());
        let hw = Hardware::detect(&config);
        let kv_slots = |phases: &str| {
            let p = Pipeline::build(
                &config,
                &hw,
                &options(&dec, phases, None),
                Arc::new(qvl_core::NoopRecorder),
            );
            let pool = p.pool.as_ref().expect("phase 1 is on");
            pool.slab_stats()
                .iter()
                .find(|s| s.name == KV_SLAB_NAME)
                .map(|s| s.total_slots)
                .unwrap()
        };
        let configured = config.memory_pooling.specialized_pools["kv_cache"].initial_count;
        assert!(configured > 0);
        assert_eq!(kv_slots("1"), configured);
        // Compression holds the KV: nothing pre-made, the pool grows on demand.
        assert_eq!(kv_slots("1,3"), 0);
    }

    #[test]
    fn a_manager_that_fails_to_start_falls_back_with_its_reason() {
        let dec = tiny_decoder();
        let tmp = tempfile::tempdir().unwrap();
        // The swap directory is a file: the swap space cannot start.
        let file = tmp.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let config = tiny_config(&file);
        let hw = Hardware::detect(&config);
        let block = dec.kv_layout(4).block_floats() * 4;
        let mut p = Pipeline::build(
            &config,
            &hw,
            &options(&dec, "4", Some(ByteSize((3 * block) as u64))),
            Arc::new(qvl_core::NoopRecorder),
        );
        let s = &p.statuses()[Phase::Swapping as usize];
        assert_eq!(s.state, PhaseState::Failed);
        assert!(
            s.reason.starts_with("the swap space did not start"),
            "{}",
            s.reason
        );
        assert!(
            p.report_table()
                .lines()
                .any(|l| l.starts_with("4 swapping") && l.contains(" failed ")),
            "{}",
            p.report_table()
        );
        // The request still runs, on plain host blocks.
        let mut base = Pipeline::build(
            &config,
            &hw,
            &options(&dec, "none", None),
            Arc::new(qvl_core::NoopRecorder),
        );
        assert_eq!(
            run(&dec, &mut p, &prompts()[..1], 4)[0].0,
            run(&dec, &mut base, &prompts()[..1], 4)[0].0
        );
        // Swapping without a budget is off, with the reason.
        let p = Pipeline::build(
            &config,
            &hw,
            &options(&dec, "4", None),
            Arc::new(qvl_core::NoopRecorder),
        );
        let s = &p.statuses()[Phase::Swapping as usize];
        assert_eq!(s.state, PhaseState::Off);
        assert!(s.reason.starts_with("no --kv-budget"), "{}", s.reason);
    }

    #[test]
    fn swapping_switched_off_mid_run_loses_no_kv() {
        let dec = tiny_decoder();
        let tmp = tempfile::tempdir().unwrap();
        let mut config = tiny_config(tmp.path());
        let hw = Hardware::detect(&config);
        let noop = Arc::new(qvl_core::NoopRecorder);
        // 39 prompt tokens in blocks of 4 and a budget of 3 blocks: most
        // blocks are on SSD when the swap space is switched off, and their
        // layers come back through merged reads.
        let long: Vec<Vec<u32>> = vec![(1..40).collect()];
        let steps = DEACTIVATE_AFTER_STEPS as usize + 6;
        let mut base = Pipeline::build(&config, &hw, &options(&dec, "none", None), noop.clone());
        let expected = run(&dec, &mut base, &long, steps);
        config.swapping.overhead_budget = 1e-9;
        let block = dec.kv_layout(4).block_floats() * 4;
        let budget = Some(ByteSize((3 * block) as u64));
        let mut p = Pipeline::build(&config, &hw, &options(&dec, "4", budget), noop);
        let got = run(&dec, &mut p, &long, steps);
        let s = &p.statuses()[Phase::Swapping as usize];
        assert_eq!(s.state, PhaseState::Deactivated, "{}", s.reason);
        // Swapping is lossless and the move to RAM copies exact f32: every
        // token and every logit row, before and after the switch, match
        // (up to the order the chunked prefill sums attention in).
        assert_eq!(got[0].0, expected[0].0);
        assert_close(&got[0].1, &expected[0].1, 1e-4, "4");
    }

    /// Overwrites every swap file under `dir` with garbage, keeping its length.
    fn damage_swap_files(dir: &std::path::Path) -> usize {
        let mut damaged = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if !name.starts_with(qvl_swap::dir::FILE_PREFIX) {
                continue;
            }
            let len = std::fs::metadata(&path).unwrap().len() as usize;
            let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            std::os::unix::fs::FileExt::write_all_at(&f, &vec![0x5a; len], 0).unwrap();
            f.sync_all().unwrap();
            damaged += 1;
        }
        damaged
    }

    #[test]
    fn a_damaged_swap_file_mid_request_is_recomputed_without_swapping() {
        let dec = tiny_decoder();
        let tmp = tempfile::tempdir().unwrap();
        let config = tiny_config(tmp.path());
        let hw = Hardware::detect(&config);
        let noop = Arc::new(qvl_core::NoopRecorder);
        let prompt: Vec<u32> = (1..40).collect();
        let steps = 12;
        let mut base = Pipeline::build(&config, &hw, &options(&dec, "none", None), noop.clone());
        let expected = run(&dec, &mut base, std::slice::from_ref(&prompt), steps);
        let (expected_tokens, expected_rows) = &expected[0];

        // 39 prompt tokens in blocks of 4 and a budget of 3 blocks: most
        // blocks live on SSD, and every step reads them back.
        let block = dec.kv_layout(4).block_floats() * 4;
        let budget = Some(ByteSize((3 * block) as u64));
        let mut p = Pipeline::build(&config, &hw, &options(&dec, "4", budget), noop);
        let mut kv = p.new_kv_cache();
        let positions: Vec<[i64; 3]> = (0..prompt.len() as i64).map(|i| [i; 3]).collect();
        let hidden = dec.embed(&prompt).unwrap();
        let mut logits = dec
            .forward(&mut kv, hidden, &prompt, &positions, None, Logits::Last)
            .unwrap();
        let mut rows = vec![logits.clone()];
        let mut tokens = Vec::new();
        let mut failure = None;
        for step in 0..steps {
            if step == 3 {
                assert!(damage_swap_files(tmp.path()) > 0, "no swap file to damage");
            }
            let next = argmax(&logits) as u32;
            tokens.push(next);
            let pos = (prompt.len() + step) as i64;
            let hidden = dec.embed(&[next]).unwrap();
            logits = match dec.forward(&mut kv, hidden, &[next], &[[pos; 3]], None, Logits::Last) {
                Ok(l) => l,
                Err(e) => {
                    failure = Some(e.to_string());
                    // What a caller does: a fresh cache, then the prompt and
                    // every token so far again.
                    let (phase, cache) = p.recover_kv(e).unwrap();
                    assert_eq!(phase, Phase::Swapping);
                    kv = cache;
                    let all: Vec<u32> = prompt.iter().chain(&tokens).copied().collect();
                    let positions: Vec<[i64; 3]> = (0..all.len() as i64).map(|i| [i; 3]).collect();
                    let hidden = dec.embed(&all).unwrap();
                    dec.forward(&mut kv, hidden, &all, &positions, None, Logits::Last)
                        .unwrap()
                }
            };
            rows.push(logits.clone());
        }
        let failure = failure.expect("the damaged swap file was never read");
        assert!(
            failure.contains("checksum") || failure.contains("corrupt"),
            "{failure}"
        );
        assert_eq!(p.kv_recoveries(), 1);
        let s = &p.statuses()[Phase::Swapping as usize];
        assert_eq!(s.state, PhaseState::Failed, "{}", s.reason);
        assert!(s.reason.contains("recomputed"), "{}", s.reason);
        // No wrong KV was used: the tokens and logits are those of the run
        // that never swapped (up to the order prefill sums attention in).
        assert_eq!(&tokens, expected_tokens);
        assert_close(&rows, expected_rows, 1e-4, "4, recovered");
        // The request now runs on plain RAM: a failure there has nothing
        // to fall back to, and other errors are never taken for KV faults.
        assert!(p.recover_kv(ModelError::KvCache("plain".into())).is_err());
        assert!(p.recover_kv(ModelError::InvalidInput("x".into())).is_err());
    }

    #[test]
    fn a_manager_over_budget_is_switched_off_mid_run() {
        let dec = tiny_decoder();
        let tmp = tempfile::tempdir().unwrap();
        let mut config = tiny_config(tmp.path());
        // Any measurable time is over a budget this small.
        config.compression.overhead_budget = 1e-9;
        let hw = Hardware::detect(&config);
        let noop = Arc::new(qvl_core::NoopRecorder);
        let long: Vec<Vec<u32>> = vec![(1..40).collect()];
        let steps = DEACTIVATE_AFTER_STEPS as usize + 6;
        let mut p = Pipeline::build(&config, &hw, &options(&dec, "1,3", None), noop.clone());
        let got = run(&dec, &mut p, &long, steps);
        let s = &p.statuses()[Phase::Compression as usize];
        assert_eq!(s.state, PhaseState::Deactivated, "{}", s.reason);
        assert!(
            s.reason.starts_with("switched off at run time"),
            "{}",
            s.reason
        );
        assert!(s.overhead.unwrap() > 1e-9);
        assert!(p.report_table().contains("deactivated"));
        // After the switch the blocks are plain f32: the run went on, and a
        // second request starts on the plain path too.
        assert_eq!(got[0].0.len(), steps);
        let again = run(&dec, &mut p, &long, 2);
        assert_eq!(again[0].0.len(), 2);
        assert_eq!(p.statuses()[Phase::Pool as usize].state, PhaseState::On);
    }
}
