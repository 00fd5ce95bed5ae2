//! [`Collector`]: decides when to collect and what to give back.

use crate::reclaim::{MemoryUsage, ReclaimClass, ReclaimGoal, ReclaimHint, Reclaimable};
use crate::registry::{Forecast, TensorRegistry};
use crate::{GcConfig, GcError, Result};
use qvl_core::{MetricEvent, MetricsRecorder};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Polls between two clock reads in [`Collector::poll`].
const POLL_STRIDE: u64 = 32;

/// Why a collection ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// Its interval elapsed.
    Timer,
    /// An allocator was about to grow past the target.
    Pressure,
    /// Asked for directly.
    Manual,
}

/// What one collection did.
#[derive(Debug, Clone, PartialEq)]
pub struct CollectionReport {
    /// Why it ran.
    pub trigger: Trigger,
    /// The goal the allocators and caches were given.
    pub goal: ReclaimGoal,
    /// Usage of all members before.
    pub before: MemoryUsage,
    /// Usage after.
    pub after: MemoryUsage,
    /// Bytes given back (garbage dropped and cache released).
    pub released_bytes: u64,
    /// How long it took.
    pub duration: Duration,
    /// The interval until the next timed collection.
    pub next_interval: Duration,
}

/// Counters of the collector since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CollectorStats {
    /// Collections run, by any trigger.
    pub collections: u64,
    /// Of those, triggered by pressure.
    pub pressure_collections: u64,
    /// Bytes given back in all.
    pub released_bytes: u64,
    /// Time spent collecting, ns.
    pub gc_time_ns: u64,
    /// The current interval, ns.
    pub interval_ns: u64,
}

struct Rate {
    at_ns: u64,
    reserved: u64,
    /// Growth of reserved memory between collections, bytes per ns.
    growth_per_ns: f64,
}

/// The garbage collector of tensor memory.
///
/// Members ([`Reclaimable`]) are registered once; a collection drops
/// garbage (finished KV blocks), then asks caches and allocators to give back
/// memory: under pressure at least the excess over the target
/// (`(1 + target_slack)` times the highest live memory seen), when idle whatever the registry's forecast
/// does not expect to be reused. With `adaptive_enabled` the interval is the
/// time the current growth rate of reserved memory needs to use up the
/// headroom to the target, within `[min_interval, max_interval]`, and an
/// allocator's pressure hook collects before a miss would overshoot.
pub struct Collector {
    config: GcConfig,
    registry: Arc<TensorRegistry>,
    members: RwLock<Vec<Arc<dyn Reclaimable>>>,
    running: Mutex<()>,
    interval_ns: AtomicU64,
    next_due_ns: AtomicU64,
    /// Highest live memory seen: cache below it never raises the peak.
    live_high_water: AtomicU64,
    polls: AtomicU64,
    rate: Mutex<Rate>,
    collections: AtomicU64,
    pressure_collections: AtomicU64,
    released_bytes: AtomicU64,
    gc_time_ns: AtomicU64,
    /// Where every collection is reported as a [`MetricEvent::GcRun`].
    recorder: RwLock<Option<Arc<dyn MetricsRecorder>>>,
}

impl std::fmt::Debug for Collector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Collector")
            .field("config", &self.config)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Collector {
    /// A collector with `config` that forecasts from `registry`.
    pub fn new(config: GcConfig, registry: Arc<TensorRegistry>) -> Result<Arc<Collector>> {
        config.validate()?;
        let interval = config.collection_interval.as_nanos() as u64;
        let now = registry.now_ns();
        Ok(Arc::new(Collector {
            interval_ns: AtomicU64::new(interval),
            next_due_ns: AtomicU64::new(now + interval),
            live_high_water: AtomicU64::new(0),
            config,
            registry,
            members: RwLock::new(Vec::new()),
            running: Mutex::new(()),
            polls: AtomicU64::new(0),
            rate: Mutex::new(Rate {
                at_ns: now,
                reserved: 0,
                growth_per_ns: 0.0,
            }),
            collections: AtomicU64::new(0),
            pressure_collections: AtomicU64::new(0),
            released_bytes: AtomicU64::new(0),
            gc_time_ns: AtomicU64::new(0),
            recorder: RwLock::new(None),
        }))
    }

    /// Reports every collection from now on to `recorder` as a
    /// [`MetricEvent::GcRun`] (bytes given back, time it took).
    pub fn set_recorder(&self, recorder: Arc<dyn MetricsRecorder>) {
        *self
            .recorder
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(recorder);
    }

    /// The config.
    pub fn config(&self) -> &GcConfig {
        &self.config
    }

    /// The registry it forecasts from.
    pub fn registry(&self) -> &Arc<TensorRegistry> {
        &self.registry
    }

    /// Adds a member; members are swept by class (garbage, caches,
    /// allocators), then in registration order.
    pub fn register(&self, member: Arc<dyn Reclaimable>) {
        let mut m = self.members.write().unwrap_or_else(PoisonError::into_inner);
        m.push(member);
        m.sort_by_key(|x| x.class());
    }

    fn members(&self) -> Vec<Arc<dyn Reclaimable>> {
        self.members
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Live and reserved memory of all members together.
    pub fn usage(&self) -> MemoryUsage {
        self.members()
            .iter()
            .fold(MemoryUsage::default(), |acc, m| acc + m.usage())
    }

    /// Counters.
    pub fn stats(&self) -> CollectorStats {
        CollectorStats {
            collections: self.collections.load(Ordering::Relaxed),
            pressure_collections: self.pressure_collections.load(Ordering::Relaxed),
            released_bytes: self.released_bytes.load(Ordering::Relaxed),
            gc_time_ns: self.gc_time_ns.load(Ordering::Relaxed),
            interval_ns: self.interval_ns.load(Ordering::Relaxed),
        }
    }

    /// The most reserved memory the target allows with `live` bytes live:
    /// `(1 + target_slack)` times the highest live memory seen (memory that
    /// was needed once is likely needed again, and keeping it cached never
    /// raises the peak), capped by the budget.
    fn target(&self, live: u64) -> u64 {
        let high = self
            .live_high_water
            .fetch_max(live, Ordering::Relaxed)
            .max(live);
        let t = (high as f64 * (1.0 + self.config.target_slack)) as u64;
        match self.config.memory_budget {
            Some(b) => t
                .min(((b as f64) * self.config.pressure_high) as u64)
                .max(live),
            None => t,
        }
    }

    /// Cheap check for the hot path: collects when the interval is up. The
    /// clock is read once every 32 calls.
    pub fn poll(&self) -> Option<CollectionReport> {
        if !self.config.enabled {
            return None;
        }
        if self.polls.fetch_add(1, Ordering::Relaxed) % POLL_STRIDE != 0 {
            return None;
        }
        if self.registry.now_ns() < self.next_due_ns.load(Ordering::Relaxed) {
            return None;
        }
        self.collect(Trigger::Timer)
    }

    /// An allocator is about to take `need` bytes from the system. With
    /// adaptive collection, collects first when reserved memory would pass
    /// the target; returns the bytes given back.
    pub fn on_pressure(&self, need: u64) -> u64 {
        if !(self.config.enabled && self.config.adaptive_enabled) {
            return 0;
        }
        let u = self.usage();
        let target = self.target(u.live + need);
        if u.reserved + need <= target {
            return 0;
        }
        let excess = u.reserved + need - target;
        self.collect_toward(Trigger::Pressure, Some(excess))
            .map_or(0, |r| r.released_bytes)
    }

    /// A hook for [`CachingAllocator::set_pressure_hook`](crate::CachingAllocator::set_pressure_hook)
    /// that calls [`Collector::on_pressure`] while the collector lives.
    pub fn pressure_hook(self: &Arc<Self>) -> crate::caching::PressureHook {
        let weak: Weak<Collector> = Arc::downgrade(self);
        Arc::new(move |need| {
            if let Some(c) = weak.upgrade() {
                c.on_pressure(need);
            }
        })
    }

    /// Runs a collection now, unless one is already running (then None).
    pub fn collect(&self, trigger: Trigger) -> Option<CollectionReport> {
        self.collect_toward(trigger, None)
    }

    fn collect_toward(
        &self,
        trigger: Trigger,
        need_bytes: Option<u64>,
    ) -> Option<CollectionReport> {
        if !self.config.enabled {
            return None;
        }
        let _running = match self.running.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        let start = Instant::now();
        let members = self.members();
        let before = members
            .iter()
            .fold(MemoryUsage::default(), |acc, m| acc + m.usage());
        let forecast = if self.config.adaptive_enabled {
            self.registry.forecast(self.config.prediction_horizon)
        } else {
            Forecast::default()
        };
        let mut released = 0u64;
        // Garbage first: dropping finished KV blocks returns them to their
        // allocator, which the next step may then release.
        let all = ReclaimHint {
            goal: ReclaimGoal::All,
            forecast: &forecast,
        };
        for m in members
            .iter()
            .filter(|m| m.class() == ReclaimClass::Garbage)
        {
            released += m.reclaim(&all);
        }
        let mid = members
            .iter()
            .fold(MemoryUsage::default(), |acc, m| acc + m.usage());
        let goal = if !self.config.adaptive_enabled {
            ReclaimGoal::All
        } else {
            let excess = mid.reserved.saturating_sub(self.target(mid.live));
            let wanted = need_bytes.unwrap_or(0).max(excess);
            if wanted > 0 {
                ReclaimGoal::Bytes(wanted)
            } else {
                ReclaimGoal::Idle
            }
        };
        let mut left = match goal {
            ReclaimGoal::Bytes(n) => n,
            _ => 0,
        };
        for m in members
            .iter()
            .filter(|m| m.class() != ReclaimClass::Garbage)
        {
            let g = match goal {
                ReclaimGoal::Bytes(_) if left == 0 => ReclaimGoal::Idle,
                ReclaimGoal::Bytes(_) => ReclaimGoal::Bytes(left),
                g => g,
            };
            let hint = ReclaimHint {
                goal: g,
                forecast: &forecast,
            };
            let got = m.reclaim(&hint);
            left = left.saturating_sub(got);
            released += got;
        }
        let after = members
            .iter()
            .fold(MemoryUsage::default(), |acc, m| acc + m.usage());
        let next = self.next_interval(after);
        let now = self.registry.now_ns();
        self.next_due_ns
            .store(now + next.as_nanos() as u64, Ordering::Relaxed);
        let duration = start.elapsed();
        self.collections.fetch_add(1, Ordering::Relaxed);
        if trigger == Trigger::Pressure {
            self.pressure_collections.fetch_add(1, Ordering::Relaxed);
        }
        self.released_bytes.fetch_add(released, Ordering::Relaxed);
        self.gc_time_ns
            .fetch_add(duration.as_nanos() as u64, Ordering::Relaxed);
        if let Some(r) = self
            .recorder
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            r.record(&MetricEvent::GcRun {
                freed: released,
                pause: duration,
            });
        }
        Some(CollectionReport {
            trigger,
            goal,
            before,
            after,
            released_bytes: released,
            duration,
            next_interval: next,
        })
    }

    /// The adaptive interval: time until reserved memory, growing at its
    /// recent rate, reaches the target; shortest under budget pressure.
    fn next_interval(&self, after: MemoryUsage) -> Duration {
        let fixed = self.config.collection_interval;
        if !self.config.adaptive_enabled {
            self.interval_ns
                .store(fixed.as_nanos() as u64, Ordering::Relaxed);
            return fixed;
        }
        let (min, max) = (self.config.min_interval, self.config.max_interval);
        let now = self.registry.now_ns();
        let growth = {
            let mut r = self.rate.lock().unwrap_or_else(PoisonError::into_inner);
            let dt = now.saturating_sub(r.at_ns).max(1) as f64;
            let grown = after.reserved.saturating_sub(r.reserved) as f64 / dt;
            r.growth_per_ns += self.config.ewma_alpha * (grown - r.growth_per_ns);
            r.at_ns = now;
            r.reserved = after.reserved;
            r.growth_per_ns
        };
        let current = Duration::from_nanos(self.interval_ns.load(Ordering::Relaxed));
        let under_budget_pressure = self
            .config
            .memory_budget
            .is_some_and(|b| after.reserved as f64 >= b as f64 * self.config.pressure_high);
        let next = if under_budget_pressure {
            min
        } else if growth <= f64::EPSILON {
            // Calm: back off.
            current.saturating_mul(2)
        } else {
            let headroom = self.target(after.live).saturating_sub(after.reserved) as f64;
            Duration::from_nanos((headroom / growth) as u64)
        };
        let next = next.clamp(min, max);
        self.interval_ns
            .store(next.as_nanos() as u64, Ordering::Relaxed);
        next
    }

    /// Runs timed collections on a background thread until the returned
    /// handle is dropped.
    pub fn spawn(self: &Arc<Self>) -> Result<CollectorThread> {
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (self.clone(), stop.clone());
        let handle = std::thread::Builder::new()
            .name("qvl-gc".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    let now = c.registry.now_ns();
                    let due = c.next_due_ns.load(Ordering::Relaxed);
                    if now >= due {
                        if c.collect(Trigger::Timer).is_none() {
                            // Another collection holds the lock: try again soon.
                            std::thread::park_timeout(c.config.min_interval);
                        }
                    } else {
                        std::thread::park_timeout(Duration::from_nanos(due - now));
                    }
                }
            })
            .map_err(GcError::Spawn)?;
        Ok(CollectorThread {
            stop,
            handle: Some(handle),
        })
    }
}

/// The background collector; dropping it stops and joins the thread.
#[derive(Debug)]
pub struct CollectorThread {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Drop for CollectorThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.thread().unpark();
            // A panicked collector thread has nothing left to clean up.
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CachingAllocator, TensorRegistry};
    use qvl_core::{AllocRequest, BufferAllocator, TensorKind};
    use std::sync::Mutex as StdMutex;

    #[derive(Default)]
    struct Runs(StdMutex<Vec<(u64, Duration)>>);

    impl MetricsRecorder for Runs {
        fn record(&self, event: &MetricEvent) {
            if let MetricEvent::GcRun { freed, pause } = event {
                self.0.lock().unwrap().push((*freed, *pause));
            }
        }
    }

    #[test]
    fn every_collection_is_recorded_with_what_it_freed() {
        let config = GcConfig::default();
        let gc = Collector::new(config.clone(), Arc::new(TensorRegistry::new(&config))).unwrap();
        let pool = Arc::new(CachingAllocator::new());
        gc.register(pool.clone());
        let runs = Arc::new(Runs::default());
        gc.set_recorder(runs.clone());
        drop(
            pool.allocate(&AllocRequest::bytes(1 << 20, TensorKind::Activation))
                .unwrap(),
        );
        let report = gc.collect(Trigger::Manual).unwrap();
        gc.collect(Trigger::Manual).unwrap();
        let runs = runs.0.lock().unwrap();
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0], (report.released_bytes, report.duration));
        assert!(runs[0].0 >= 1 << 20, "{runs:?}");
        assert_eq!(runs[1].0, 0);
    }
}
