//! [`CachingAllocator`]: a small size-class caching host allocator that
//! keeps freed buffers for reuse, as a pool does, and gives back exactly
//! what a collection asks.
//!
//! `qvl-pool` is the production pool; this one exists so that qvl-gc can be
//! used, tested and benchmarked on its own, and because it honours a
//! [`ReclaimHint`] block by block (keep the sizes the forecast expects,
//! release the rest) where `release_cached` is all or nothing.

use crate::reclaim::{MemoryUsage, ReclaimClass, ReclaimGoal, ReclaimHint, Reclaimable};
use qvl_core::{AllocRequest, AllocatorStats, BufferAllocator, CoreError, Tier};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

/// Sizes up to this use eight classes per doubling; above, whole pages.
const SMALL_LIMIT: usize = 256 * 1024;
const PAGE: usize = 4096;
/// Alignment `vec![0u8; n]` already gives on every supported allocator.
const NATURAL_ALIGN: usize = 16;

/// The size class (bytes actually held) of a request of `bytes`.
pub fn class_of(bytes: usize) -> usize {
    let s = bytes.max(64);
    if s > SMALL_LIMIT {
        return s.div_ceil(PAGE) * PAGE;
    }
    let floor_pow2 = 1usize << (usize::BITS - 1 - (s - 1).leading_zeros());
    let step = (floor_pow2 / 8).max(8);
    s.div_ceil(step) * step
}

/// Called on a cache miss with the bytes about to be taken from the system.
pub type PressureHook = Arc<dyn Fn(u64) + Send + Sync>;

#[derive(Default)]
struct State {
    free: BTreeMap<usize, Vec<Vec<u8>>>,
    /// Per class, the tick of its latest take or return: trims release the
    /// classes untouched longest first.
    touched: HashMap<usize, u64>,
    tick: u64,
    cached_bytes: u64,
    stats: AllocatorStats,
}

struct Inner {
    state: Mutex<State>,
    pressure: RwLock<Option<PressureHook>>,
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        // Every update of State completes before the guard drops, so a
        // poisoned lock still guards consistent counters.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A host allocator with one free list per size class.
#[derive(Clone)]
pub struct CachingAllocator {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CachingAllocator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachingAllocator")
            .field("stats", &self.stats())
            .finish()
    }
}

impl Default for CachingAllocator {
    fn default() -> Self {
        Self::new()
    }
}

/// A buffer of a [`CachingAllocator`]; dropping it returns it to the cache.
pub struct CachedBuffer {
    data: Vec<u8>,
    offset: usize,
    len: usize,
    class: usize,
    home: Arc<Inner>,
}

impl std::fmt::Debug for CachedBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedBuffer")
            .field("len", &self.len)
            .field("class", &self.class)
            .finish()
    }
}

impl CachedBuffer {
    /// Bytes the allocator holds for this buffer (its size class).
    pub fn class_bytes(&self) -> usize {
        self.class
    }
}

impl AsRef<[u8]> for CachedBuffer {
    fn as_ref(&self) -> &[u8] {
        &self.data[self.offset..self.offset + self.len]
    }
}

impl AsMut<[u8]> for CachedBuffer {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.data[self.offset..self.offset + self.len]
    }
}

impl Drop for CachedBuffer {
    fn drop(&mut self) {
        let data = std::mem::take(&mut self.data);
        let mut s = self.home.state();
        s.stats.allocated_bytes -= self.class as u64;
        s.stats.free_count += 1;
        s.cached_bytes += self.class as u64;
        s.free.entry(self.class).or_default().push(data);
        s.tick += 1;
        let tick = s.tick;
        s.touched.insert(self.class, tick);
    }
}

impl CachingAllocator {
    /// An empty allocator.
    pub fn new() -> CachingAllocator {
        CachingAllocator {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                pressure: RwLock::new(None),
            }),
        }
    }

    /// Sets the hook called before a miss takes memory from the system (the
    /// collector's [`Collector::pressure_hook`](crate::Collector::pressure_hook)).
    pub fn set_pressure_hook(&self, hook: Option<PressureHook>) {
        *self
            .inner
            .pressure
            .write()
            .unwrap_or_else(PoisonError::into_inner) = hook;
    }

    /// Bytes held free for reuse.
    pub fn cached_bytes(&self) -> u64 {
        self.inner.state().cached_bytes
    }

    /// Gives cached buffers back toward `goal`, keeping classes in `keep`
    /// unless the goal cannot be met otherwise; returns the bytes given back.
    fn trim(&self, goal: ReclaimGoal, keep: &HashSet<usize>) -> u64 {
        let (freed, released) = {
            let mut s = self.inner.state();
            let mut out: Vec<Vec<u8>> = Vec::new();
            let mut freed = 0u64;
            let want = match goal {
                ReclaimGoal::Idle | ReclaimGoal::All => u64::MAX,
                ReclaimGoal::Bytes(n) => n,
            };
            // Unexpected sizes first, untouched longest first; then, for
            // pressure or All, the expected ones.
            let passes: &[bool] = match goal {
                ReclaimGoal::Idle => &[false],
                _ => &[false, true],
            };
            for &take_kept in passes {
                let mut classes: Vec<(u64, usize)> = s
                    .free
                    .keys()
                    .filter(|c| keep.contains(c) == take_kept)
                    .map(|&c| (s.touched.get(&c).copied().unwrap_or(0), c))
                    .collect();
                classes.sort_unstable();
                let classes = classes.into_iter().map(|(_, c)| c);
                for class in classes {
                    while freed < want {
                        let Some(buf) = s.free.get_mut(&class).and_then(Vec::pop) else {
                            break;
                        };
                        freed += class as u64;
                        out.push(buf);
                    }
                    if s.free.get(&class).is_some_and(Vec::is_empty) {
                        s.free.remove(&class);
                        s.touched.remove(&class);
                    }
                }
            }
            s.cached_bytes -= freed;
            s.stats.reserved_bytes -= freed;
            s.stats.os_free_count += out.len() as u64;
            (freed, out)
        };
        // Freed outside the lock: unmapping large buffers takes time.
        drop(released);
        freed
    }
}

impl BufferAllocator for CachingAllocator {
    type Buffer = CachedBuffer;

    fn tier(&self) -> Tier {
        Tier::HostRam
    }

    fn allocate(&self, request: &AllocRequest) -> qvl_core::Result<CachedBuffer> {
        if !request.align.is_power_of_two() || request.align > PAGE {
            return Err(CoreError::InvalidInput(format!(
                "caching allocator: alignment {} of a {}-byte request is not a power of two up to {PAGE}",
                request.align, request.bytes
            )));
        }
        let class = class_of(request.bytes);
        let pad = if request.align > NATURAL_ALIGN {
            request.align
        } else {
            0
        };
        let hit = {
            let mut s = self.inner.state();
            let buf = s.free.get_mut(&class).and_then(Vec::pop);
            if let Some(b) = &buf {
                s.cached_bytes -= class as u64;
                if b.len() >= class + pad {
                    s.stats.alloc_count += 1;
                    s.stats.allocated_bytes += class as u64;
                    s.stats.peak_allocated_bytes =
                        s.stats.peak_allocated_bytes.max(s.stats.allocated_bytes);
                } else {
                    // Held for a smaller alignment: give it back, take a new one.
                    s.stats.reserved_bytes -= class as u64;
                    s.stats.os_free_count += 1;
                }
            }
            buf
        };
        let data = match hit {
            Some(b) if b.len() >= class + pad => b,
            _ => {
                let hook = self
                    .inner
                    .pressure
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone();
                if let Some(hook) = hook {
                    hook(class as u64);
                }
                let b = vec![0u8; class + pad];
                let mut s = self.inner.state();
                s.stats.alloc_count += 1;
                s.stats.os_alloc_count += 1;
                s.stats.allocated_bytes += class as u64;
                s.stats.reserved_bytes += class as u64;
                s.stats.peak_allocated_bytes =
                    s.stats.peak_allocated_bytes.max(s.stats.allocated_bytes);
                s.stats.peak_reserved_bytes =
                    s.stats.peak_reserved_bytes.max(s.stats.reserved_bytes);
                b
            }
        };
        let offset = if pad == 0 {
            0
        } else {
            let addr = data.as_ptr() as usize;
            addr.next_multiple_of(request.align) - addr
        };
        Ok(CachedBuffer {
            data,
            offset,
            len: request.bytes,
            class,
            home: self.inner.clone(),
        })
    }

    fn stats(&self) -> AllocatorStats {
        self.inner.state().stats
    }

    fn release_cached(&self) -> u64 {
        self.trim(ReclaimGoal::All, &HashSet::new())
    }
}

impl Reclaimable for CachingAllocator {
    fn name(&self) -> &str {
        "caching allocator"
    }
    fn class(&self) -> ReclaimClass {
        ReclaimClass::Allocator
    }
    fn usage(&self) -> MemoryUsage {
        let s = self.stats();
        MemoryUsage {
            live: s.allocated_bytes,
            reserved: s.reserved_bytes,
        }
    }
    fn reclaim(&self, hint: &ReclaimHint<'_>) -> u64 {
        let keep: HashSet<usize> = hint
            .forecast
            .reuse_sizes
            .iter()
            .map(|&b| class_of(b))
            .collect();
        self.trim(hint.goal, &keep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Forecast;
    use qvl_core::TensorKind;

    #[test]
    fn classes_are_tight() {
        assert_eq!(class_of(1), 64);
        assert_eq!(class_of(1000), 1024);
        assert_eq!(class_of(4096), 4096);
        assert_eq!(class_of(4097), 4608);
        assert_eq!(class_of(300_000), 300_000usize.div_ceil(4096) * 4096);
        for b in [
            1usize, 63, 65, 777, 5000, 100_000, 262_144, 262_145, 9_999_999,
        ] {
            let c = class_of(b);
            assert!(c >= b && class_of(c) == c, "{b} -> {c}");
            assert!((c - b) as f64 <= (b as f64 / 8.0).max(64.0), "{b} -> {c}");
        }
    }

    #[test]
    fn freed_buffers_are_reused_and_released_on_request() {
        let a = CachingAllocator::new();
        let r = AllocRequest::bytes(10_000, TensorKind::Activation);
        let mut b = a.allocate(&r).unwrap();
        b.as_mut().fill(7);
        assert_eq!(b.as_ref().len(), 10_000);
        drop(b);
        let b = a.allocate(&r).unwrap();
        let s = a.stats();
        assert_eq!((s.os_alloc_count, s.alloc_count), (1, 2));
        assert_eq!(s.reserved_bytes, class_of(10_000) as u64);
        drop(b);
        assert_eq!(a.cached_bytes(), class_of(10_000) as u64);
        assert_eq!(a.release_cached(), class_of(10_000) as u64);
        assert_eq!(a.stats().reserved_bytes, 0);
        assert_eq!(a.stats().allocated_bytes, 0);
    }

    #[test]
    fn trim_keeps_forecast_sizes_unless_pressed() {
        let a = CachingAllocator::new();
        let small = a
            .allocate(&AllocRequest::bytes(8192, TensorKind::Activation))
            .unwrap();
        let big = a
            .allocate(&AllocRequest::bytes(1 << 20, TensorKind::Activation))
            .unwrap();
        drop((small, big));
        let f = Forecast {
            reuse_sizes: vec![8192],
            ..Forecast::default()
        };
        let idle = ReclaimHint {
            goal: ReclaimGoal::Idle,
            forecast: &f,
        };
        assert_eq!(a.reclaim(&idle), 1 << 20);
        assert_eq!(a.cached_bytes(), 8192);
        let press = ReclaimHint {
            goal: ReclaimGoal::Bytes(1),
            forecast: &f,
        };
        assert_eq!(a.reclaim(&press), 8192);
        assert_eq!(a.stats().reserved_bytes, 0);
    }

    #[test]
    fn alignment_is_honoured_and_bad_alignment_named() {
        let a = CachingAllocator::new();
        let b = a
            .allocate(&AllocRequest::bytes(5000, TensorKind::Workspace).with_align(4096))
            .unwrap();
        assert_eq!(b.as_ref().as_ptr() as usize % 4096, 0);
        assert_eq!(b.as_ref().len(), 5000);
        let err = a
            .allocate(&AllocRequest::bytes(10, TensorKind::Workspace).with_align(3))
            .unwrap_err();
        assert!(err.to_string().contains("alignment 3"), "{err}");
    }
}
