//! [`TensorRegistry`]: the [`LifetimeTracker`] of qvl.

use crate::predictor::{LifetimePrediction, SiteModel};
use crate::GcConfig;
use qvl_core::{LifetimeTracker, TensorId, TensorKind, TensorMeta, UseSite};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

const SHARDS: usize = 16;
/// Counters of the filter that lets `on_free` of an untracked id return
/// after one atomic load.
const FILTER_SLOTS: usize = 1 << 16;

/// One live tensor the registry tracks.
#[derive(Debug, Clone)]
struct LiveTensor {
    site: Arc<Mutex<SiteModel>>,
    bytes: usize,
    kind: TensorKind,
    created_ns: u64,
    last_use_ns: u64,
}

/// Lifetime statistics of one site, as a snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteStats {
    /// The site.
    pub site: UseSite,
    /// Tensors created there.
    pub created: u64,
    /// Of those, freed.
    pub freed: u64,
    /// Bytes live now.
    pub live_bytes: u64,
    /// Size of the latest tensor.
    pub last_size: usize,
    /// Predicted lifetime of the next tensor.
    pub lifetime: Option<LifetimePrediction>,
    /// Median of the recent lifetimes, ns.
    pub lifetime_p50_ns: Option<u64>,
    /// 90th percentile of the recent lifetimes, ns.
    pub lifetime_p90_ns: Option<u64>,
    /// Mean time between creations, ns.
    pub interarrival_ns: Option<f64>,
}

/// What the registry expects of the next `horizon`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Forecast {
    /// Bytes of tracked tensors live now.
    pub live_bytes: u64,
    /// Of those, bytes predicted to be freed within the horizon (reusable soon).
    pub soon_free_bytes: u64,
    /// Sizes (bytes, ascending, distinct) that sites are predicted to
    /// allocate again within the horizon: cached blocks of these sizes are
    /// worth keeping.
    pub reuse_sizes: Vec<usize>,
    /// Bytes of live tracked tensors by kind.
    pub live_by_kind: Vec<(TensorKind, u64)>,
}

impl Forecast {
    /// Whether a cached block of `bytes` will likely be reused soon.
    pub fn reuses(&self, bytes: usize) -> bool {
        self.reuse_sizes.binary_search(&bytes).is_ok()
    }
}

/// Tracks tensors from creation to free and learns lifetimes per site.
///
/// Thread-safe and cheap: tensors below `min_tracked_bytes` cost one atomic
/// add on creation and one atomic load on free; tracked ones take a lock on
/// one of 16 shards and on their site's model.
#[derive(Debug)]
pub struct TensorRegistry {
    epoch: Instant,
    min_tracked_bytes: usize,
    alpha: f64,
    shards: Box<[Mutex<HashMap<TensorId, LiveTensor>>]>,
    filter: Box<[AtomicU32]>,
    sites: RwLock<HashMap<UseSite, Arc<Mutex<SiteModel>>>>,
    live_bytes: AtomicU64,
    peak_live_bytes: AtomicU64,
    tracked_created: AtomicU64,
    untracked_created: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a registry lock leaves plain counters behind,
    // still usable: observations are statistics, not invariants.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn mix(id: TensorId) -> u64 {
    // splitmix64 finalizer: sequential ids spread over shards and slots.
    let mut z = id.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl TensorRegistry {
    /// A registry with the tracking threshold and averaging weight of `config`.
    pub fn new(config: &GcConfig) -> TensorRegistry {
        TensorRegistry {
            epoch: Instant::now(),
            min_tracked_bytes: config.min_tracked_bytes,
            alpha: config.ewma_alpha,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            filter: (0..FILTER_SLOTS).map(|_| AtomicU32::new(0)).collect(),
            sites: RwLock::new(HashMap::new()),
            live_bytes: AtomicU64::new(0),
            peak_live_bytes: AtomicU64::new(0),
            tracked_created: AtomicU64::new(0),
            untracked_created: AtomicU64::new(0),
        }
    }

    /// Nanoseconds since the registry was made: the clock of every lifetime.
    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn shard(&self, h: u64) -> &Mutex<HashMap<TensorId, LiveTensor>> {
        &self.shards[(h as usize) % SHARDS]
    }

    fn slot(&self, h: u64) -> &AtomicU32 {
        &self.filter[((h >> 32) as usize) % FILTER_SLOTS]
    }

    fn site_model(&self, site: UseSite) -> Arc<Mutex<SiteModel>> {
        if let Some(m) = self
            .sites
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&site)
        {
            return m.clone();
        }
        self.sites
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(site)
            .or_insert_with(|| Arc::new(Mutex::new(SiteModel::new(self.alpha))))
            .clone()
    }

    /// Bytes of tracked tensors live now.
    pub fn live_bytes(&self) -> u64 {
        self.live_bytes.load(Ordering::Relaxed)
    }

    /// Highest `live_bytes` seen.
    pub fn peak_live_bytes(&self) -> u64 {
        self.peak_live_bytes.load(Ordering::Relaxed)
    }

    /// Tracked tensors live now.
    pub fn live_count(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    /// Tensors created, tracked and below the threshold.
    pub fn created_counts(&self) -> (u64, u64) {
        (
            self.tracked_created.load(Ordering::Relaxed),
            self.untracked_created.load(Ordering::Relaxed),
        )
    }

    /// Whether `id` is tracked and live.
    pub fn is_live(&self, id: TensorId) -> bool {
        let h = mix(id);
        self.slot(h).load(Ordering::Relaxed) != 0 && lock(self.shard(h)).contains_key(&id)
    }

    /// How long the live tensor `id` has lived, and since its last use.
    pub fn age_of(&self, id: TensorId) -> Option<(Duration, Duration)> {
        let now = self.now_ns();
        lock(self.shard(mix(id))).get(&id).map(|t| {
            (
                Duration::from_nanos(now.saturating_sub(t.created_ns)),
                Duration::from_nanos(now.saturating_sub(t.last_use_ns)),
            )
        })
    }

    /// Lifetime statistics of every site seen, most live bytes first.
    pub fn site_stats(&self) -> Vec<SiteStats> {
        let sites: Vec<(UseSite, Arc<Mutex<SiteModel>>)> = self
            .sites
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(s, m)| (*s, m.clone()))
            .collect();
        let mut out: Vec<SiteStats> = sites
            .into_iter()
            .map(|(site, m)| {
                let m = lock(&m);
                SiteStats {
                    site,
                    created: m.created,
                    freed: m.freed,
                    live_bytes: m.live_bytes,
                    last_size: m.last_size,
                    lifetime: m.predicted_lifetime(),
                    lifetime_p50_ns: m.lifetime_quantile(0.5),
                    lifetime_p90_ns: m.lifetime_quantile(0.9),
                    interarrival_ns: m.interarrival_ns(),
                }
            })
            .collect();
        out.sort_by(|a, b| {
            b.live_bytes
                .cmp(&a.live_bytes)
                .then(b.created.cmp(&a.created))
        });
        out
    }

    /// The predicted lifetime at `site`.
    pub fn predict(&self, site: UseSite) -> Option<LifetimePrediction> {
        let m = self
            .sites
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&site)
            .cloned()?;
        let p = lock(&m).predicted_lifetime();
        p
    }

    /// What the next `horizon` likely brings: memory freed soon, and sizes
    /// that will be allocated again. Scans the live tensors: meant for the
    /// collector, not the forward pass.
    pub fn forecast(&self, horizon: Duration) -> Forecast {
        let now = self.now_ns();
        let horizon_ns = horizon.as_nanos() as u64;
        let mut f = Forecast::default();
        let mut by_kind: HashMap<TensorKind, u64> = HashMap::new();
        for shard in self.shards.iter() {
            let live: Vec<LiveTensor> = lock(shard).values().cloned().collect();
            for t in live {
                f.live_bytes += t.bytes as u64;
                *by_kind.entry(t.kind).or_default() += t.bytes as u64;
                let expected = lock(&t.site).predicted_lifetime();
                if let Some(p) = expected {
                    if t.created_ns as f64 + p.expected_ns <= (now + horizon_ns) as f64 {
                        f.soon_free_bytes += t.bytes as u64;
                    }
                }
            }
        }
        let models: Vec<Arc<Mutex<SiteModel>>> = self
            .sites
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        for m in models {
            let m = lock(&m);
            if m.creates_within(now, horizon_ns) {
                f.reuse_sizes.push(m.last_size);
            }
        }
        f.reuse_sizes.sort_unstable();
        f.reuse_sizes.dedup();
        f.live_by_kind = by_kind.into_iter().collect();
        f.live_by_kind.sort();
        f
    }
}

impl LifetimeTracker for TensorRegistry {
    fn on_create(&self, id: TensorId, meta: &TensorMeta, site: UseSite) {
        let bytes = meta.byte_len();
        if bytes < self.min_tracked_bytes {
            self.untracked_created.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let now = self.now_ns();
        let model = self.site_model(site);
        lock(&model).observe_create(now, bytes);
        let h = mix(id);
        let previous = lock(self.shard(h)).insert(
            id,
            LiveTensor {
                site: model,
                bytes,
                kind: meta.kind,
                created_ns: now,
                last_use_ns: now,
            },
        );
        match previous {
            // An id reused without a free: the old tensor's life ends here.
            Some(old) => {
                lock(&old.site).observe_free(now.saturating_sub(old.created_ns), old.bytes);
                self.live_bytes
                    .fetch_sub(old.bytes as u64, Ordering::Relaxed);
            }
            None => {
                self.slot(h).fetch_add(1, Ordering::Relaxed);
            }
        }
        let live = self.live_bytes.fetch_add(bytes as u64, Ordering::Relaxed) + bytes as u64;
        self.peak_live_bytes.fetch_max(live, Ordering::Relaxed);
        self.tracked_created.fetch_add(1, Ordering::Relaxed);
    }

    fn on_use(&self, id: TensorId) {
        let h = mix(id);
        if self.slot(h).load(Ordering::Relaxed) == 0 {
            return;
        }
        let now = self.now_ns();
        // Falling behind drops the observation rather than waiting.
        if let Ok(mut shard) = self.shard(h).try_lock() {
            if let Some(t) = shard.get_mut(&id) {
                t.last_use_ns = now;
            }
        }
    }

    fn on_free(&self, id: TensorId) {
        let h = mix(id);
        if self.slot(h).load(Ordering::Relaxed) == 0 {
            return;
        }
        let Some(t) = lock(self.shard(h)).remove(&id) else {
            return;
        };
        self.slot(h).fetch_sub(1, Ordering::Relaxed);
        let now = self.now_ns();
        lock(&t.site).observe_free(now.saturating_sub(t.created_ns), t.bytes);
        self.live_bytes.fetch_sub(t.bytes as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qvl_core::DType;

    fn meta(bytes: usize) -> TensorMeta {
        TensorMeta::new(vec![bytes], DType::U8, TensorKind::Activation)
    }

    const SITE: UseSite = UseSite {
        layer: Some(3),
        op: "mlp.up",
    };

    #[test]
    fn tracks_life_and_learns_per_site() {
        let r = TensorRegistry::new(&GcConfig {
            min_tracked_bytes: 1024,
            ..GcConfig::default()
        });
        for i in 0..20u64 {
            r.on_create(TensorId(i), &meta(4096), SITE);
            r.on_use(TensorId(i));
            assert!(r.is_live(TensorId(i)));
            assert_eq!(r.live_bytes(), 4096);
            r.on_free(TensorId(i));
            assert!(!r.is_live(TensorId(i)));
        }
        // Below the threshold: counted, not tracked.
        r.on_create(TensorId(100), &meta(16), SITE);
        r.on_free(TensorId(100));
        // Unknown ids are ignored.
        r.on_free(TensorId(12345));
        assert_eq!(r.created_counts(), (20, 1));
        assert_eq!(r.live_bytes(), 0);
        assert_eq!(r.peak_live_bytes(), 4096);
        let stats = r.site_stats();
        assert_eq!(stats.len(), 1);
        assert_eq!(stats[0].site, SITE);
        assert_eq!((stats[0].created, stats[0].freed), (20, 20));
        assert!(stats[0].lifetime.is_some() && stats[0].lifetime_p90_ns.is_some());
        assert!(r.predict(SITE).is_some());
    }

    #[test]
    fn forecast_names_recurring_sizes_and_soon_free_memory() {
        let r = TensorRegistry::new(&GcConfig {
            min_tracked_bytes: 1,
            ..GcConfig::default()
        });
        let kv = UseSite {
            layer: None,
            op: "kv.block",
        };
        for i in 0..10u64 {
            r.on_create(TensorId(i), &meta(8192), SITE);
            r.on_free(TensorId(i));
        }
        r.on_create(TensorId(50), &meta(8192), SITE);
        r.on_create(TensorId(60), &meta(1 << 20), kv);
        let f = r.forecast(Duration::from_secs(5));
        assert!(f.reuses(8192), "{f:?}");
        assert!(!f.reuses(1 << 20), "one creation is no rhythm: {f:?}");
        assert_eq!(f.live_bytes, 8192 + (1 << 20));
        // The short-lived site's live tensor is predicted free soon; the KV
        // block has no history yet.
        assert_eq!(f.soon_free_bytes, 8192);
        assert_eq!(r.live_count(), 2);
        assert!(r.age_of(TensorId(60)).is_some());
    }

    #[test]
    fn many_threads_keep_counts_exact() {
        let r = Arc::new(TensorRegistry::new(&GcConfig {
            min_tracked_bytes: 100,
            ..GcConfig::default()
        }));
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let r = r.clone();
                s.spawn(move || {
                    for i in 0..2000u64 {
                        let id = TensorId(t * 1_000_000 + i);
                        let bytes = if i % 2 == 0 { 50 } else { 500 };
                        r.on_create(id, &meta(bytes), SITE);
                        r.on_use(id);
                        r.on_free(id);
                    }
                });
            }
        });
        assert_eq!(r.live_bytes(), 0);
        assert_eq!(r.live_count(), 0);
        assert_eq!(r.created_counts(), (4000, 4000));
        let s = &r.site_stats()[0];
        assert_eq!((s.created, s.freed), (4000, 4000));
    }
}
