//! The collector: a [`MetricsRecorder`] built from per-thread shards of
//! relaxed atomics, so that recording never locks and never allocates.

use crate::histogram::{nanos, AtomicHistogram, HistogramSnapshot};
use crate::snapshot::{
    CacheLevelSnapshot, CompressionKindSnapshot, GcSnapshot, MigrationSnapshot, PhaseSnapshot,
    Snapshot, SwapDirectionSnapshot, TierSnapshot, TokensSnapshot,
};
use qvl_core::{MetricEvent, MetricsRecorder, PhaseState, TensorKind, Tier, PHASE_NAMES};
use std::cell::Cell;
use std::sync::atomic::{
    AtomicBool, AtomicI64, AtomicU32, AtomicU64,
    Ordering::{Acquire, Relaxed, Release},
};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Shards a thread can own. While at most this many threads record at once,
/// each owns a shard of every collector and updates it with plain atomic
/// loads and stores (no read-modify-write, no shared cache line). Further
/// threads share one extra shard, updated with atomic read-modify-writes:
/// slower, still exact.
const OWNED_SHARDS: usize = 32;
/// Index of the shared shard.
const SHARED_SHARD: usize = OWNED_SHARDS;
const TIERS: usize = Tier::ALL.len();
const KINDS: usize = TensorKind::ALL.len();

fn tier_index(tier: Tier) -> usize {
    match tier {
        Tier::Gpu => 0,
        Tier::HostRam => 1,
        Tier::Ssd => 2,
    }
}

fn kind_index(kind: TensorKind) -> usize {
    match kind {
        TensorKind::Weight => 0,
        TensorKind::KvCache => 1,
        TensorKind::Activation => 2,
        TensorKind::VisionEmbedding => 3,
        TensorKind::Workspace => 4,
    }
}

/// Bit `i` set: owned shard `i` is free to claim. Process-wide, so that a
/// thread owns the same index in every collector.
static FREE_SLOTS: AtomicU32 = AtomicU32::new(u32::MAX);
const UNCLAIMED: usize = usize::MAX;

/// A thread's claim on an owned shard index, handed back when it exits.
struct SlotClaim(Cell<usize>);

impl Drop for SlotClaim {
    fn drop(&mut self) {
        let slot = self.0.get();
        if slot < OWNED_SHARDS {
            // Release: the next owner's Acquire claim sees this thread's stores.
            FREE_SLOTS.fetch_or(1 << slot, Release);
        }
    }
}

thread_local! {
    static SLOT: SlotClaim = const { SlotClaim(Cell::new(UNCLAIMED)) };
}

/// Claims the lowest free owned index, or the shared shard when none is free.
fn claim_slot() -> usize {
    let mut free = FREE_SLOTS.load(Relaxed);
    while free != 0 {
        let slot = free.trailing_zeros() as usize;
        match FREE_SLOTS.compare_exchange_weak(free, free & !(1 << slot), Acquire, Relaxed) {
            Ok(_) => return slot,
            Err(now) => free = now,
        }
    }
    SHARED_SHARD
}

/// This thread's shard index: owned (< OWNED_SHARDS) or the shared one.
#[inline]
fn this_thread_slot() -> usize {
    SLOT.try_with(|claim| {
        let slot = claim.0.get();
        if slot != UNCLAIMED {
            return slot;
        }
        let slot = claim_slot();
        claim.0.set(slot);
        slot
    })
    // During thread teardown the claim is gone: use the shared shard.
    .unwrap_or(SHARED_SHARD)
}

fn counters<const N: usize>() -> [AtomicU64; N] {
    std::array::from_fn(|_| AtomicU64::new(0))
}

/// How a shard is updated: by its only writer, or by many.
pub(crate) trait Update {
    /// `cell += v`.
    fn add(cell: &AtomicU64, v: u64);
    /// `cell = max(cell, v)`.
    fn max(cell: &AtomicU64, v: u64);
    /// `cell += v` for an f64 stored as bits.
    fn add_f64(cell: &AtomicU64, v: f64);
}

/// The owning thread is the only writer: a load and a store suffice, and
/// readers still see whole values (the cells are atomics).
pub(crate) struct OwnedUpdate;

impl Update for OwnedUpdate {
    #[inline(always)]
    fn add(cell: &AtomicU64, v: u64) {
        cell.store(cell.load(Relaxed).wrapping_add(v), Relaxed);
    }
    #[inline(always)]
    fn max(cell: &AtomicU64, v: u64) {
        if v > cell.load(Relaxed) {
            cell.store(v, Relaxed);
        }
    }
    #[inline(always)]
    fn add_f64(cell: &AtomicU64, v: f64) {
        cell.store((f64::from_bits(cell.load(Relaxed)) + v).to_bits(), Relaxed);
    }
}

/// Many writers: atomic read-modify-writes.
pub(crate) struct SharedUpdate;

impl Update for SharedUpdate {
    #[inline(always)]
    fn add(cell: &AtomicU64, v: u64) {
        cell.fetch_add(v, Relaxed);
    }
    #[inline(always)]
    fn max(cell: &AtomicU64, v: u64) {
        cell.fetch_max(v, Relaxed);
    }
    #[inline(always)]
    fn add_f64(cell: &AtomicU64, v: f64) {
        let mut current = cell.load(Relaxed);
        loop {
            let next = (f64::from_bits(current) + v).to_bits();
            match cell.compare_exchange_weak(current, next, Relaxed, Relaxed) {
                Ok(_) => return,
                Err(seen) => current = seen,
            }
        }
    }
}

/// One thread's counters (or, for the shared shard, those of the threads
/// beyond [`OWNED_SHARDS`]). Aligned to 128 bytes so that two shards never
/// share a cache line (or an adjacent-line prefetch pair).
#[repr(align(128))]
#[derive(Debug)]
struct Shard {
    allocs: [AtomicU64; TIERS],
    alloc_bytes: [AtomicU64; TIERS],
    frees: [AtomicU64; TIERS],
    free_bytes: [AtomicU64; TIERS],
    alloc_latency: AtomicHistogram,
    cache_hits: [AtomicU64; TIERS],
    cache_misses: [AtomicU64; TIERS],
    compressions: [AtomicU64; KINDS],
    compress_input: [AtomicU64; KINDS],
    compress_output: [AtomicU64; KINDS],
    /// Sum of relative errors per kind, as f64 bits.
    compress_error_sum: [AtomicU64; KINDS],
    /// Largest relative error per kind, as f64 bits (non-negative floats
    /// order like their bits).
    compress_error_max: [AtomicU64; KINDS],
    /// Compress events per kind whose error was negative or not finite.
    compress_error_invalid: [AtomicU64; KINDS],
    /// Index 0: swap out (writes), 1: swap in (reads).
    swap_ops: [AtomicU64; 2],
    swap_bytes: [AtomicU64; 2],
    swap_latency: [AtomicHistogram; 2],
    migrations: [AtomicU64; TIERS * TIERS],
    migration_bytes: [AtomicU64; TIERS * TIERS],
    gc_runs: AtomicU64,
    gc_freed: AtomicU64,
    gc_pause: AtomicHistogram,
    gc_pause_max_nanos: AtomicU64,
    tokens: AtomicU64,
    token_nanos: AtomicU64,
}

impl Default for Shard {
    fn default() -> Self {
        Shard {
            allocs: counters(),
            alloc_bytes: counters(),
            frees: counters(),
            free_bytes: counters(),
            alloc_latency: AtomicHistogram::default(),
            cache_hits: counters(),
            cache_misses: counters(),
            compressions: counters(),
            compress_input: counters(),
            compress_output: counters(),
            compress_error_sum: counters(),
            compress_error_max: counters(),
            compress_error_invalid: counters(),
            swap_ops: counters(),
            swap_bytes: counters(),
            swap_latency: [AtomicHistogram::default(), AtomicHistogram::default()],
            migrations: counters(),
            migration_bytes: counters(),
            gc_runs: AtomicU64::new(0),
            gc_freed: AtomicU64::new(0),
            gc_pause: AtomicHistogram::default(),
            gc_pause_max_nanos: AtomicU64::new(0),
            tokens: AtomicU64::new(0),
            token_nanos: AtomicU64::new(0),
        }
    }
}

/// What the managers last reported with [`MetricEvent::Memory`] for a tier.
#[derive(Debug, Default)]
struct TierGauge {
    has_sample: AtomicBool,
    sampled_allocated: AtomicU64,
    sampled_reserved: AtomicU64,
    /// Net Alloc-minus-Free bytes at the time of the sample, so that later
    /// Alloc/Free events move the gauge until the next sample.
    net_at_sample: AtomicI64,
    peak_allocated: AtomicU64,
    peak_reserved: AtomicU64,
}

/// What the runtime last reported with [`MetricEvent::Phase`] for a phase.
#[derive(Debug, Default)]
struct PhaseGauge {
    /// 0: never reported; else 1 + the state's index in [`PHASE_STATES`].
    state: AtomicU32,
    /// f64 bits of the mean overhead (NaN: not measured).
    overhead: AtomicU64,
    /// f64 bits of the overhead budget.
    budget: AtomicU64,
}

const PHASE_STATES: [PhaseState; 4] = [
    PhaseState::On,
    PhaseState::Off,
    PhaseState::Failed,
    PhaseState::Deactivated,
];

/// Time-weighted memory accounting, advanced by [`Collector::sample_at`].
#[derive(Debug)]
struct SamplerState {
    last: Instant,
    last_allocated: [u64; TIERS],
    last_reserved: [u64; TIERS],
    /// Byte-seconds per tier since the collector started.
    allocated_integral: [f64; TIERS],
    reserved_integral: [f64; TIERS],
}

/// Collects every [`MetricEvent`] into sharded atomic counters.
///
/// Share it as `Arc<Collector>` (or `Arc<dyn MetricsRecorder>`) with every
/// manager; read it with [`Collector::snapshot`].
#[derive(Debug)]
pub struct Collector {
    shards: Box<[Shard]>,
    gauges: [TierGauge; TIERS],
    phases: [PhaseGauge; PHASE_NAMES.len()],
    started: Instant,
    started_unix_ms: u64,
    sampler: Mutex<SamplerState>,
}

impl Default for Collector {
    fn default() -> Self {
        Collector::new()
    }
}

impl Collector {
    /// An empty collector; its clock (uptime, averages) starts now.
    pub fn new() -> Collector {
        let started = Instant::now();
        Collector {
            shards: (0..=OWNED_SHARDS).map(|_| Shard::default()).collect(),
            gauges: std::array::from_fn(|_| TierGauge::default()),
            phases: std::array::from_fn(|_| PhaseGauge::default()),
            started,
            started_unix_ms: unix_ms(SystemTime::now()),
            sampler: Mutex::new(SamplerState {
                last: started,
                last_allocated: [0; TIERS],
                last_reserved: [0; TIERS],
                allocated_integral: [0.0; TIERS],
                reserved_integral: [0.0; TIERS],
            }),
        }
    }

    /// When the collector started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Starts a thread that samples the memory gauges every `interval`, for
    /// the time-weighted averages and the peaks of tiers that only report
    /// Alloc/Free events. It stops when the returned guard is dropped (or the
    /// collector is).
    pub fn start_sampler(self: &Arc<Self>, interval: Duration) -> std::io::Result<SamplerGuard> {
        let weak: Weak<Collector> = Arc::downgrade(self);
        let stop = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let stop_thread = Arc::clone(&stop);
        let interval = interval.max(Duration::from_millis(1));
        let thread = std::thread::Builder::new()
            .name("qvl-metrics-sampler".into())
            .spawn(move || {
                let (flag, wake) = &*stop_thread;
                let mut stopped = match flag.lock() {
                    Ok(g) => g,
                    Err(_) => return,
                };
                loop {
                    match wake.wait_timeout(stopped, interval) {
                        Ok((g, _)) => stopped = g,
                        Err(_) => return,
                    }
                    if *stopped {
                        return;
                    }
                    match weak.upgrade() {
                        Some(collector) => collector.sample_at(Instant::now()),
                        None => return,
                    }
                }
            })?;
        Ok(SamplerGuard {
            stop,
            thread: Some(thread),
        })
    }

    /// Current (allocated, reserved) of a tier: the last Memory sample moved
    /// by the Alloc/Free events since, or the Alloc/Free net alone when the
    /// tier never sent a sample. Reserved is never below allocated.
    fn current_memory(&self, tier: usize) -> (u64, u64) {
        let net = self.net_alloc_bytes(tier);
        let g = &self.gauges[tier];
        if g.has_sample.load(Relaxed) {
            let base = g.sampled_allocated.load(Relaxed) as i64;
            let moved = net - g.net_at_sample.load(Relaxed);
            let allocated = (base + moved).max(0) as u64;
            let reserved = g.sampled_reserved.load(Relaxed).max(allocated);
            (allocated, reserved)
        } else {
            let allocated = net.max(0) as u64;
            (allocated, allocated)
        }
    }

    fn net_alloc_bytes(&self, tier: usize) -> i64 {
        let (mut allocated, mut freed) = (0u64, 0u64);
        for s in self.shards.iter() {
            allocated = allocated.wrapping_add(s.alloc_bytes[tier].load(Relaxed));
            freed = freed.wrapping_add(s.free_bytes[tier].load(Relaxed));
        }
        allocated.wrapping_sub(freed) as i64
    }

    /// Advances the time-weighted averages to `now` and updates the peaks.
    /// The sampler thread calls this; so does every snapshot.
    pub fn sample_at(&self, now: Instant) {
        let current: [(u64, u64); TIERS] = std::array::from_fn(|t| self.current_memory(t));
        for (t, &(allocated, reserved)) in current.iter().enumerate() {
            self.gauges[t].peak_allocated.fetch_max(allocated, Relaxed);
            self.gauges[t].peak_reserved.fetch_max(reserved, Relaxed);
        }
        // A poisoned lock only means a sampler panicked mid-update of plain
        // numbers; the numbers stay usable.
        let mut s = self.sampler.lock().unwrap_or_else(|p| p.into_inner());
        if now < s.last {
            return;
        }
        let dt = now.duration_since(s.last).as_secs_f64();
        for (t, &(allocated, reserved)) in current.iter().enumerate() {
            // Sample and hold: the value seen at the last sample held until now.
            s.allocated_integral[t] += s.last_allocated[t] as f64 * dt;
            s.reserved_integral[t] += s.last_reserved[t] as f64 * dt;
            s.last_allocated[t] = allocated;
            s.last_reserved[t] = reserved;
        }
        s.last = now;
    }

    /// Everything recorded so far, with rates and averages up to now.
    pub fn snapshot(&self) -> Snapshot {
        self.snapshot_at(Instant::now())
    }

    /// Everything recorded so far, with the clock read as `now` (tests and
    /// replays use this to get exact averages).
    pub fn snapshot_at(&self, now: Instant) -> Snapshot {
        self.sample_at(now);
        let uptime = now.saturating_duration_since(self.started).as_secs_f64();
        let (allocated_integral, reserved_integral, sampled_for) = {
            let s = self.sampler.lock().unwrap_or_else(|p| p.into_inner());
            (
                s.allocated_integral,
                s.reserved_integral,
                s.last.saturating_duration_since(self.started).as_secs_f64(),
            )
        };
        let sum = |f: &dyn Fn(&Shard) -> u64| -> u64 {
            self.shards
                .iter()
                .fold(0u64, |acc, s| acc.wrapping_add(f(s)))
        };

        let tiers = Tier::ALL
            .iter()
            .map(|&tier| {
                let t = tier_index(tier);
                let (allocated, reserved) = self.current_memory(t);
                let g = &self.gauges[t];
                let average = |integral: f64| {
                    if sampled_for > 0.0 {
                        integral / sampled_for
                    } else {
                        0.0
                    }
                };
                TierSnapshot {
                    tier,
                    allocated_bytes: allocated,
                    reserved_bytes: reserved,
                    peak_allocated_bytes: g.peak_allocated.load(Relaxed).max(allocated),
                    peak_reserved_bytes: g.peak_reserved.load(Relaxed).max(reserved),
                    average_allocated_bytes: average(allocated_integral[t]),
                    average_reserved_bytes: average(reserved_integral[t]),
                    allocations: sum(&|s| s.allocs[t].load(Relaxed)),
                    allocated_bytes_total: sum(&|s| s.alloc_bytes[t].load(Relaxed)),
                    frees: sum(&|s| s.frees[t].load(Relaxed)),
                    freed_bytes_total: sum(&|s| s.free_bytes[t].load(Relaxed)),
                }
            })
            .collect();

        let mut alloc_latency = HistogramSnapshot::default();
        for s in self.shards.iter() {
            s.alloc_latency.add_into(&mut alloc_latency);
        }

        let cache = Tier::ALL
            .iter()
            .map(|&tier| {
                let t = tier_index(tier);
                CacheLevelSnapshot::new(
                    tier,
                    sum(&|s| s.cache_hits[t].load(Relaxed)),
                    sum(&|s| s.cache_misses[t].load(Relaxed)),
                )
            })
            .collect();

        let compression = TensorKind::ALL
            .iter()
            .map(|&kind| {
                let k = kind_index(kind);
                let error_sum: f64 = self
                    .shards
                    .iter()
                    .map(|s| f64::from_bits(s.compress_error_sum[k].load(Relaxed)))
                    .sum();
                let error_max = self
                    .shards
                    .iter()
                    .map(|s| f64::from_bits(s.compress_error_max[k].load(Relaxed)))
                    .fold(0.0, f64::max);
                CompressionKindSnapshot {
                    kind,
                    encodes: sum(&|s| s.compressions[k].load(Relaxed)),
                    input_bytes: sum(&|s| s.compress_input[k].load(Relaxed)),
                    output_bytes: sum(&|s| s.compress_output[k].load(Relaxed)),
                    relative_error_sum: error_sum,
                    relative_error_max: error_max,
                    invalid_errors: sum(&|s| s.compress_error_invalid[k].load(Relaxed)),
                }
            })
            .collect();

        let swap_direction = |d: usize| {
            let mut latency = HistogramSnapshot::default();
            for s in self.shards.iter() {
                s.swap_latency[d].add_into(&mut latency);
            }
            SwapDirectionSnapshot {
                operations: sum(&|s| s.swap_ops[d].load(Relaxed)),
                bytes: sum(&|s| s.swap_bytes[d].load(Relaxed)),
                latency,
            }
        };

        let mut migrations = Vec::new();
        for from in Tier::ALL {
            for to in Tier::ALL {
                let i = tier_index(from) * TIERS + tier_index(to);
                let count = sum(&|s| s.migrations[i].load(Relaxed));
                if count > 0 {
                    migrations.push(MigrationSnapshot {
                        from,
                        to,
                        count,
                        bytes: sum(&|s| s.migration_bytes[i].load(Relaxed)),
                    });
                }
            }
        }

        let mut gc_pause = HistogramSnapshot::default();
        for s in self.shards.iter() {
            s.gc_pause.add_into(&mut gc_pause);
        }
        let gc = GcSnapshot {
            runs: sum(&|s| s.gc_runs.load(Relaxed)),
            freed_bytes: sum(&|s| s.gc_freed.load(Relaxed)),
            pause_max_seconds: self
                .shards
                .iter()
                .map(|s| s.gc_pause_max_nanos.load(Relaxed))
                .max()
                .unwrap_or(0) as f64
                / 1e9,
            pause: gc_pause,
        };

        let tokens = TokensSnapshot {
            count: sum(&|s| s.tokens.load(Relaxed)),
            elapsed_seconds: sum(&|s| s.token_nanos.load(Relaxed)) as f64 / 1e9,
        };

        let phases = self
            .phases
            .iter()
            .enumerate()
            .filter_map(|(i, g)| {
                let state = g.state.load(Relaxed);
                let state = *PHASE_STATES.get((state as usize).checked_sub(1)?)?;
                let overhead = f64::from_bits(g.overhead.load(Relaxed));
                Some(PhaseSnapshot {
                    phase: i as u8 + 1,
                    name: PHASE_NAMES[i].to_string(),
                    state,
                    overhead: overhead.is_finite().then_some(overhead),
                    budget: f64::from_bits(g.budget.load(Relaxed)),
                })
            })
            .collect();

        let elapsed_ms = u64::try_from(now.saturating_duration_since(self.started).as_millis())
            .unwrap_or(u64::MAX);
        Snapshot {
            unix_ms: self.started_unix_ms.saturating_add(elapsed_ms),
            uptime_seconds: uptime,
            tiers,
            alloc_latency,
            cache,
            compression,
            swap_out: swap_direction(0),
            swap_in: swap_direction(1),
            migrations,
            gc,
            tokens,
            phases,
        }
    }
}

impl MetricsRecorder for Collector {
    #[inline]
    fn record(&self, event: &MetricEvent) {
        let slot = this_thread_slot();
        if slot < OWNED_SHARDS {
            self.record_into::<OwnedUpdate>(&self.shards[slot], event);
        } else {
            self.record_into::<SharedUpdate>(&self.shards[SHARED_SHARD], event);
        }
    }
}

impl Collector {
    #[inline(always)]
    fn record_into<U: Update>(&self, shard: &Shard, event: &MetricEvent) {
        match *event {
            MetricEvent::Alloc {
                tier,
                bytes,
                latency,
                ..
            } => {
                let t = tier_index(tier);
                U::add(&shard.allocs[t], 1);
                U::add(&shard.alloc_bytes[t], bytes);
                shard.alloc_latency.record::<U>(nanos(latency));
            }
            MetricEvent::Free { tier, bytes } => {
                let t = tier_index(tier);
                U::add(&shard.frees[t], 1);
                U::add(&shard.free_bytes[t], bytes);
            }
            MetricEvent::Memory {
                tier,
                allocated,
                reserved,
            } => {
                // Sampled, not a hot path: reading the net over all shards is fine.
                let t = tier_index(tier);
                let g = &self.gauges[t];
                g.net_at_sample.store(self.net_alloc_bytes(t), Relaxed);
                g.sampled_allocated.store(allocated, Relaxed);
                g.sampled_reserved.store(reserved, Relaxed);
                g.has_sample.store(true, Relaxed);
                g.peak_allocated.fetch_max(allocated, Relaxed);
                g.peak_reserved.fetch_max(reserved.max(allocated), Relaxed);
            }
            MetricEvent::CacheLookup { tier, hit } => {
                let t = tier_index(tier);
                if hit {
                    U::add(&shard.cache_hits[t], 1);
                } else {
                    U::add(&shard.cache_misses[t], 1);
                }
            }
            MetricEvent::Compress {
                kind,
                input_bytes,
                output_bytes,
                rel_error,
            } => {
                let k = kind_index(kind);
                U::add(&shard.compressions[k], 1);
                U::add(&shard.compress_input[k], input_bytes);
                U::add(&shard.compress_output[k], output_bytes);
                if rel_error.is_finite() && rel_error >= 0.0 {
                    U::add_f64(&shard.compress_error_sum[k], rel_error);
                    U::max(&shard.compress_error_max[k], rel_error.to_bits());
                } else {
                    U::add(&shard.compress_error_invalid[k], 1);
                }
            }
            MetricEvent::Swap {
                out,
                bytes,
                latency,
            } => {
                let d = if out { 0 } else { 1 };
                U::add(&shard.swap_ops[d], 1);
                U::add(&shard.swap_bytes[d], bytes);
                shard.swap_latency[d].record::<U>(nanos(latency));
            }
            MetricEvent::Migration { from, to, bytes } => {
                let i = tier_index(from) * TIERS + tier_index(to);
                U::add(&shard.migrations[i], 1);
                U::add(&shard.migration_bytes[i], bytes);
            }
            MetricEvent::GcRun { freed, pause } => {
                let p = nanos(pause);
                U::add(&shard.gc_runs, 1);
                U::add(&shard.gc_freed, freed);
                shard.gc_pause.record::<U>(p);
                U::max(&shard.gc_pause_max_nanos, p);
            }
            MetricEvent::Phase {
                phase,
                state,
                overhead,
                budget,
            } => {
                // Rare (once per step at most): a shared gauge, not a shard.
                if let Some(g) = (phase as usize)
                    .checked_sub(1)
                    .and_then(|i| self.phases.get(i))
                {
                    let index = PHASE_STATES.iter().position(|s| *s == state).unwrap_or(0);
                    g.state.store(index as u32 + 1, Relaxed);
                    g.overhead.store(overhead.to_bits(), Relaxed);
                    g.budget.store(budget.to_bits(), Relaxed);
                }
            }
            MetricEvent::Tokens { count, elapsed } => {
                U::add(&shard.tokens, count);
                U::add(&shard.token_nanos, nanos(elapsed));
            }
        }
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Stops the sampler thread of [`Collector::start_sampler`] when dropped.
#[derive(Debug)]
pub struct SamplerGuard {
    stop: Arc<(Mutex<bool>, std::sync::Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for SamplerGuard {
    fn drop(&mut self) {
        let (flag, wake) = &*self.stop;
        if let Ok(mut stopped) = flag.lock() {
            *stopped = true;
        }
        wake.notify_all();
        if let Some(thread) = self.thread.take() {
            // The thread only loops on a condvar; a panic there has already
            // been reported by the panic hook, nothing to add.
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc(tier: Tier, bytes: u64, latency_ns: u64) -> MetricEvent {
        MetricEvent::Alloc {
            tier,
            kind: TensorKind::KvCache,
            bytes,
            latency: Duration::from_nanos(latency_ns),
        }
    }

    #[test]
    fn many_threads_give_exact_totals() {
        let c = Arc::new(Collector::new());
        let threads = 8;
        let per_thread = 20_000u64;
        std::thread::scope(|scope| {
            for t in 0..threads {
                let c = Arc::clone(&c);
                scope.spawn(move || {
                    for i in 0..per_thread {
                        c.record(&alloc(Tier::HostRam, 64, 100 + i % 7));
                        c.record(&MetricEvent::CacheLookup {
                            tier: Tier::Gpu,
                            hit: (i + t) % 4 != 0,
                        });
                        c.record(&MetricEvent::Swap {
                            out: i % 2 == 0,
                            bytes: 4096,
                            latency: Duration::from_micros(10),
                        });
                        c.record(&MetricEvent::Compress {
                            kind: TensorKind::KvCache,
                            input_bytes: 100,
                            output_bytes: 25,
                            rel_error: 0.5,
                        });
                        c.record(&MetricEvent::Tokens {
                            count: 1,
                            elapsed: Duration::from_millis(1),
                        });
                        c.record(&MetricEvent::Free {
                            tier: Tier::HostRam,
                            bytes: 64,
                        });
                    }
                });
            }
        });
        let n = threads * per_thread;
        let s = c.snapshot();
        let ram = s.tier(Tier::HostRam).unwrap();
        assert_eq!(ram.allocations, n);
        assert_eq!(ram.allocated_bytes_total, 64 * n);
        assert_eq!(ram.frees, n);
        assert_eq!(ram.allocated_bytes, 0);
        assert_eq!(s.alloc_latency.count(), n);
        let gpu = s.cache_level(Tier::Gpu).unwrap();
        assert_eq!(gpu.hits + gpu.misses, n);
        assert_eq!(gpu.misses, n / 4);
        assert_eq!(s.swap_out.operations + s.swap_in.operations, n);
        assert_eq!(s.swap_out.bytes, 4096 * n / 2);
        assert_eq!(s.swap_out.latency.count(), n / 2);
        assert_eq!(s.swap_out.latency.sum_nanos, 10_000 * n / 2);
        let kv = s.compression_kind(TensorKind::KvCache).unwrap();
        assert_eq!(kv.encodes, n);
        assert_eq!(kv.input_bytes, 100 * n);
        // 0.5 is exact in binary, so the float sum is exact too.
        assert_eq!(kv.relative_error_sum, 0.5 * n as f64);
        assert_eq!(s.tokens.count, n);
        assert_eq!(s.tokens.elapsed_seconds, n as f64 * 1e-3);
    }

    #[test]
    fn more_threads_than_owned_shards_stay_exact() {
        let c = Arc::new(Collector::new());
        let threads = OWNED_SHARDS + 8;
        let per_thread = 2_000u64;
        // All alive at once, so that some must use the shared shard.
        let barrier = Arc::new(std::sync::Barrier::new(threads));
        std::thread::scope(|scope| {
            for _ in 0..threads {
                let c = Arc::clone(&c);
                let barrier = Arc::clone(&barrier);
                scope.spawn(move || {
                    barrier.wait();
                    for _ in 0..per_thread {
                        c.record(&MetricEvent::GcRun {
                            freed: 3,
                            pause: Duration::from_nanos(5),
                        });
                    }
                    barrier.wait();
                });
            }
        });
        let s = c.snapshot();
        let n = threads as u64 * per_thread;
        assert_eq!(s.gc.runs, n);
        assert_eq!(s.gc.freed_bytes, 3 * n);
        assert_eq!(s.gc.pause.count(), n);
        assert_eq!(s.gc.pause.sum_nanos, 5 * n);
        // Some threads found no free owned shard and shared one.
        let shared = c.shards[SHARED_SHARD].gc_runs.load(Relaxed);
        assert!(shared > 0, "no thread used the shared shard");
    }

    #[test]
    fn exited_threads_hand_their_shard_to_new_ones() {
        let c = Arc::new(Collector::new());
        for round in 0..(3 * OWNED_SHARDS as u64) {
            let c2 = Arc::clone(&c);
            std::thread::spawn(move || {
                c2.record(&MetricEvent::Tokens {
                    count: round,
                    elapsed: Duration::from_nanos(1),
                })
            })
            .join()
            .unwrap();
        }
        let n = 3 * OWNED_SHARDS as u64;
        assert_eq!(c.snapshot().tokens.count, n * (n - 1) / 2);
    }

    #[test]
    fn memory_samples_move_with_alloc_and_free_and_keep_peaks() {
        let c = Collector::new();
        c.record(&MetricEvent::Memory {
            tier: Tier::HostRam,
            allocated: 1000,
            reserved: 4000,
        });
        c.record(&alloc(Tier::HostRam, 500, 10));
        let s = c.snapshot();
        let ram = s.tier(Tier::HostRam).unwrap();
        assert_eq!(ram.allocated_bytes, 1500);
        assert_eq!(ram.reserved_bytes, 4000);
        assert_eq!(ram.peak_allocated_bytes, 1500);
        c.record(&MetricEvent::Free {
            tier: Tier::HostRam,
            bytes: 1200,
        });
        c.record(&MetricEvent::Memory {
            tier: Tier::HostRam,
            allocated: 300,
            reserved: 2000,
        });
        let ram = c.snapshot().tier(Tier::HostRam).unwrap().clone();
        assert_eq!(ram.allocated_bytes, 300);
        assert_eq!(ram.reserved_bytes, 2000);
        assert_eq!(ram.peak_allocated_bytes, 1500);
        assert_eq!(ram.peak_reserved_bytes, 4000);
        // A tier without samples follows Alloc/Free alone.
        c.record(&alloc(Tier::Gpu, 700, 10));
        let gpu = c.snapshot().tier(Tier::Gpu).unwrap().clone();
        assert_eq!((gpu.allocated_bytes, gpu.reserved_bytes), (700, 700));
    }

    #[test]
    fn averages_are_time_weighted() {
        let c = Collector::new();
        let t0 = c.started();
        // 0 bytes for the first second, 100 for two, 400 for one.
        c.sample_at(t0 + Duration::from_secs(1));
        c.record(&MetricEvent::Memory {
            tier: Tier::Gpu,
            allocated: 100,
            reserved: 200,
        });
        c.sample_at(t0 + Duration::from_secs(1));
        c.sample_at(t0 + Duration::from_secs(3));
        c.record(&MetricEvent::Memory {
            tier: Tier::Gpu,
            allocated: 400,
            reserved: 400,
        });
        c.sample_at(t0 + Duration::from_secs(3));
        let s = c.snapshot_at(t0 + Duration::from_secs(4));
        let gpu = s.tier(Tier::Gpu).unwrap();
        assert!((gpu.average_allocated_bytes - (100.0 * 2.0 + 400.0) / 4.0).abs() < 1e-9);
        assert!((gpu.average_reserved_bytes - (200.0 * 2.0 + 400.0) / 4.0).abs() < 1e-9);
        assert_eq!(gpu.peak_allocated_bytes, 400);
        assert!((s.uptime_seconds - 4.0).abs() < 1e-9);
    }

    #[test]
    fn sampler_thread_advances_and_stops() {
        let c = Arc::new(Collector::new());
        c.record(&MetricEvent::Memory {
            tier: Tier::Ssd,
            allocated: 1 << 20,
            reserved: 1 << 20,
        });
        let guard = c.start_sampler(Duration::from_millis(5)).unwrap();
        std::thread::sleep(Duration::from_millis(40));
        drop(guard);
        let before = c.sampler.lock().unwrap().last;
        std::thread::sleep(Duration::from_millis(20));
        let after = c.sampler.lock().unwrap().last;
        assert!(before > c.started(), "the sampler took no sample");
        assert_eq!(
            before, after,
            "the sampler kept running after its guard was dropped"
        );
    }

    #[test]
    fn bad_compression_errors_are_counted_not_summed() {
        let c = Collector::new();
        for e in [f64::NAN, -1.0, 0.25] {
            c.record(&MetricEvent::Compress {
                kind: TensorKind::Weight,
                input_bytes: 10,
                output_bytes: 5,
                rel_error: e,
            });
        }
        let s = c.snapshot();
        let w = s.compression_kind(TensorKind::Weight).unwrap();
        assert_eq!(w.encodes, 3);
        assert_eq!(w.relative_error_sum, 0.25);
        assert_eq!(w.relative_error_max, 0.25);
        assert_eq!(w.invalid_errors, 2);
        assert_eq!(w.mean_relative_error(), 0.25);
    }
}
