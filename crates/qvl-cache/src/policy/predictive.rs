//! Access prediction from history and prefix structure: evict the block
//! with the lowest expected hit density.
//!
//! The policy is an online estimator in the spirit of LHD (Beckmann et al.,
//! NSDI 2018). Every block belongs to a class built from what is known when
//! it is accessed:
//!
//! - its reuse history: how often it was read (remembered across evictions
//!   in a bounded ghost table) and the last gap between two of its reads;
//! - the prefix structure of KV workloads: a block that fills only part of
//!   its tensor (the tail of a prompt) is rarely reused, because the next
//!   turn extends and rehashes it; a block seen for the first time inherits
//!   the history of the chain it continues (its parent's read count), which
//!   tells a new conversation from the n-th turn of an old one.
//!
//! For each class it learns online, from the hits and evictions it observes,
//! how likely a block of a given age is to be read again and how long it
//! will occupy its slot until then. The ratio, expected hits per slot-tick,
//! is the block's hit density; eviction removes the candidate with the
//! lowest. Nothing about the future is used: only past accesses and the
//! structure visible at access time.
//!
//! Cost per operation is O(1): a fixed number of candidates is compared at
//! eviction (a random sample plus the oldest and newest block of each
//! class), and the density tables are rebuilt every few thousand accesses in
//! time proportional to their (fixed) size.

use crate::keymap::KeyMap;
use crate::list::KeyList;
use qvl_core::{BlockInfo, BlockKey, EvictionPolicy, TensorKind};
use std::collections::VecDeque;

/// Age buckets: exact below 16 ticks, then 4 per doubling up to 2^44 ticks
/// (log scale, so the same table serves any capacity and trace length).
const AGE_BUCKETS: usize = 16 + 40 * 4;
/// Random candidates compared at each eviction, besides the class ends.
const SAMPLES: usize = 32;
/// Weight kept by old statistics at each rebuild (exponential forgetting,
/// so the estimate follows a workload that changes).
const DECAY: f64 = 0.9;
/// Rebuild the density tables at least this often, in accesses.
const MIN_REBUILD_INTERVAL: u64 = 4096;
/// Ghost entries remembered per block the level has held at once.
const GHOSTS_PER_BLOCK: usize = 4;

/// Read-count buckets: 0 (first access), 1, 2, 3-4, 5-8, 9+.
const FREQ_BUCKETS: usize = 6;
/// Buckets of the last reuse gap: a quarter of a doubling-of-doubling scale
/// (gap < 4, < 16, < 64, ... ), 8 of them.
const GAP_BUCKETS: usize = 8;
/// Parent read-count buckets for first accesses: no parent known, then the
/// read-count buckets 1.. of the parent.
const ORIGIN_BUCKETS: usize = FREQ_BUCKETS;
/// Classes: partial blocks, first accesses by origin, reread blocks by read
/// count and last gap.
const CLASSES: usize = 1 + ORIGIN_BUCKETS + (FREQ_BUCKETS - 1) * GAP_BUCKETS;
const PARTIAL_CLASS: usize = 0;

fn freq_bucket(reads: u32) -> usize {
    match reads {
        0 => 0,
        1 => 1,
        2 => 2,
        3..=4 => 3,
        5..=8 => 4,
        _ => 5,
    }
}

fn gap_bucket(gap: u64) -> usize {
    // log4 of the gap.
    ((64 - gap.leading_zeros() as usize) / 2).min(GAP_BUCKETS - 1)
}

fn age_bucket(age: u64) -> usize {
    if age < 16 {
        return age as usize;
    }
    let exp = 63 - age.leading_zeros() as usize; // >= 4
    let sub = ((age >> (exp - 2)) & 3) as usize;
    (16 + (exp - 4) * 4 + sub).min(AGE_BUCKETS - 1)
}

/// The first age of a bucket.
fn bucket_start_age(bucket: usize) -> f64 {
    if bucket < 16 {
        return bucket as f64;
    }
    let exp = 4 + (bucket - 16) / 4;
    let sub = ((bucket - 16) % 4) as u64;
    ((4 + sub) << (exp - 2)) as f64
}

/// The age in the middle of a bucket.
fn bucket_mid_age(bucket: usize) -> f64 {
    if bucket + 1 >= AGE_BUCKETS {
        return bucket_start_age(bucket);
    }
    (bucket_start_age(bucket) + bucket_start_age(bucket + 1) - 1.0) / 2.0
}

#[derive(Clone, Copy)]
struct Entry {
    /// Tick of the latest access.
    last: u64,
    /// Index in `resident`.
    slot: u32,
    /// Reads so far (accesses after the first).
    reads: u32,
    class: u8,
    /// Read-count bucket of the chain this block continues, passed down
    /// through blocks first seen together.
    origin: u8,
}

#[derive(Clone, Copy)]
struct Ghost {
    last: u64,
    reads: u32,
    class: u8,
    origin: u8,
}

/// Hit-density eviction over learned classes; see the module docs.
pub struct Predictive {
    tick: u64,
    entries: KeyMap<Entry>,
    /// Resident keys, for uniform sampling.
    resident: Vec<BlockKey>,
    /// Resident keys per class, most recently accessed first.
    class_lists: Vec<KeyList<()>>,
    ghosts: KeyMap<Ghost>,
    ghost_order: VecDeque<(BlockKey, u64)>,
    high_water: usize,
    /// Largest block seen per tensor kind: a smaller block is partial.
    full_bytes: [u64; TensorKind::ALL.len()],
    hits: Vec<[f64; AGE_BUCKETS]>,
    /// Blocks whose ghost expired unread, by class and age at expiry.
    deaths: Vec<[f64; AGE_BUCKETS]>,
    density: Vec<[f64; AGE_BUCKETS]>,
    next_rebuild: u64,
    rebuilds: u32,
    rng: u64,
}

impl Default for Predictive {
    fn default() -> Self {
        Self::new()
    }
}

impl Predictive {
    /// An empty predictive policy.
    pub fn new() -> Self {
        Predictive {
            tick: 0,
            entries: KeyMap::default(),
            resident: Vec::new(),
            class_lists: (0..CLASSES).map(|_| KeyList::new()).collect(),
            ghosts: KeyMap::default(),
            ghost_order: VecDeque::new(),
            high_water: 0,
            full_bytes: [0; TensorKind::ALL.len()],
            hits: vec![[0.0; AGE_BUCKETS]; CLASSES],
            deaths: vec![[0.0; AGE_BUCKETS]; CLASSES],
            density: vec![[0.0; AGE_BUCKETS]; CLASSES],
            next_rebuild: 64,
            rebuilds: 0,
            rng: 0x9e37_79b9_7f4a_7c15,
        }
    }

    fn class_of(reads: u32, gap: u64, origin: u8) -> usize {
        let f = freq_bucket(reads);
        if f == 0 {
            1 + usize::from(origin).min(ORIGIN_BUCKETS - 1)
        } else {
            1 + ORIGIN_BUCKETS + (f - 1) * GAP_BUCKETS + gap_bucket(gap)
        }
    }

    fn set_class(&mut self, key: BlockKey, old: Option<usize>, new: usize) {
        if let Some(old) = old {
            self.class_lists[old].remove(&key);
        }
        self.class_lists[new].push_front(key, ());
    }

    fn advance(&mut self) {
        self.tick += 1;
        if self.tick >= self.next_rebuild {
            self.rebuild();
        }
    }

    /// Recomputes every class's density by age from the decayed reuse
    /// histograms. For a block of age a, keeping it until age h at most
    /// earns the reads that fall in [a, h) and costs the slot-ticks until
    /// its read or h; the density is the best ratio over h (so a class
    /// whose reads come late is not judged by its dead early ages).
    fn rebuild(&mut self) {
        let mids: [f64; AGE_BUCKETS] = std::array::from_fn(bucket_mid_age);
        let ends: [f64; AGE_BUCKETS] = std::array::from_fn(|b| {
            if b + 1 < AGE_BUCKETS {
                bucket_start_age(b + 1)
            } else {
                bucket_start_age(b) * 2.0
            }
        });
        for class in 0..CLASSES {
            let (hits, deaths) = (&mut self.hits[class], &mut self.deaths[class]);
            let events: [f64; AGE_BUCKETS] = std::array::from_fn(|b| hits[b] + deaths[b]);
            let total: f64 = events.iter().sum();
            let density = &mut self.density[class];
            let mut alive_from = total;
            for a in 0..AGE_BUCKETS {
                let start = mids[a];
                let (mut reads, mut ticks, mut alive) = (0.0, 0.0, alive_from);
                let mut best = 0.0f64;
                for h in a..AGE_BUCKETS {
                    reads += hits[h];
                    ticks += events[h] * (mids[h] - start).max(0.0) + 1.0 * events[h];
                    alive -= events[h];
                    if alive < 0.0 {
                        alive = 0.0;
                    }
                    let cost = ticks + alive * (ends[h] - start);
                    if cost > 0.0 {
                        best = best.max(reads / cost);
                    }
                    if alive <= 0.0 {
                        break;
                    }
                }
                density[a] = best;
                alive_from -= events[a];
            }
            for b in 0..AGE_BUCKETS {
                hits[b] *= DECAY;
                deaths[b] *= DECAY;
            }
        }
        // Learn fast at first (64, 128, 256, ... ticks), then settle to
        // rebuilding about once per level's worth of accesses.
        self.rebuilds += 1;
        let steady = MIN_REBUILD_INTERVAL.max(self.high_water as u64);
        let warmup = 64u64 << self.rebuilds.min(20);
        self.next_rebuild = self.tick + warmup.min(steady);
    }

    /// What the policy has learned, one line per class with data: blocks
    /// resident, decayed reads and deaths, and the density at a few ages.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for class in 0..CLASSES {
            let reads: f64 = self.hits[class].iter().sum();
            let deaths: f64 = self.deaths[class].iter().sum();
            if reads + deaths < 1.0 && self.class_lists[class].is_empty() {
                continue;
            }
            let at = |age: u64| self.density[class][age_bucket(age)];
            out += &format!(
                "class {class:2}: resident {:6} reads {:9.1} deaths {:9.1} density@1 {:.2e} @100 {:.2e} @1k {:.2e} @10k {:.2e} @100k {:.2e}\n",
                self.class_lists[class].len(),
                reads,
                deaths,
                at(1),
                at(100),
                at(1000),
                at(10_000),
                at(100_000)
            );
        }
        out
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*: deterministic, so replays are reproducible.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// (density, age) of a resident key; lower density loses, older breaks ties.
    fn score(&self, key: &BlockKey) -> Option<(f64, u64)> {
        let e = self.entries.get(key)?;
        let age = self.tick - e.last;
        Some((self.density[e.class as usize][age_bucket(age)], age))
    }

    fn remember(&mut self, key: BlockKey, e: &Entry) {
        self.ghosts.insert(
            key,
            Ghost {
                last: e.last,
                reads: e.reads,
                class: e.class,
                origin: e.origin,
            },
        );
        self.ghost_order.push_back((key, e.last));
        let limit = GHOSTS_PER_BLOCK * self.high_water.max(1);
        while self.ghost_order.len() > limit {
            let Some((old, last)) = self.ghost_order.pop_front() else {
                break;
            };
            // A key that came back and left again has a newer queue entry;
            // only its latest one drops the ghost.
            if let Some(g) = self.ghosts.get(&old).filter(|g| g.last == last).copied() {
                self.ghosts.remove(&old);
                // Not read again within the ghost horizon: a death at this age.
                let age = self.tick - g.last;
                self.deaths[g.class as usize][age_bucket(age)] += 1.0;
            }
        }
    }

    fn detach(&mut self, key: &BlockKey) -> Option<Entry> {
        let e = self.entries.remove(key)?;
        self.class_lists[e.class as usize].remove(key);
        let slot = e.slot as usize;
        self.resident.swap_remove(slot);
        if let Some(moved) = self.resident.get(slot).copied() {
            if let Some(m) = self.entries.get_mut(&moved) {
                m.slot = e.slot;
            }
        }
        Some(e)
    }
}

impl EvictionPolicy for Predictive {
    fn name(&self) -> &'static str {
        "predictive"
    }

    fn on_insert(&mut self, key: BlockKey, info: &BlockInfo) {
        if self.entries.contains_key(&key) {
            self.detach(&key);
        }
        let kind_index = TensorKind::ALL
            .iter()
            .position(|k| *k == info.kind)
            .unwrap_or(0);
        let full = &mut self.full_bytes[kind_index];
        *full = (*full).max(info.bytes);
        let partial = info.bytes < *full;
        let ghost = self.ghosts.remove(&key);
        let (reads, gap, origin) = match ghost {
            // Seen before: its own history counts, this access included.
            Some(g) => {
                // It would have been a hit had it stayed: the reuse time
                // of its class, whatever this policy did with it.
                let gap = self.tick - g.last;
                self.hits[g.class as usize][age_bucket(gap)] += 1.0;
                (g.reads + 1, gap, g.origin)
            }
            None => {
                // First seen: inherit the history of the chain it continues.
                let parent = info.parent.and_then(|p| {
                    self.entries
                        .get(&p)
                        .map(|e| (e.reads, e.origin))
                        .or_else(|| self.ghosts.get(&p).map(|g| (g.reads, g.origin)))
                });
                let origin = match parent {
                    None => 0,
                    // A parent first seen too passes its own origin down.
                    Some((0, origin)) => origin,
                    Some((reads, _)) => freq_bucket(reads) as u8,
                };
                (0, 0, origin)
            }
        };
        let class = if partial {
            PARTIAL_CLASS
        } else {
            Self::class_of(reads, gap, origin)
        };
        self.high_water = self.high_water.max(self.entries.len() + 1);
        self.entries.insert(
            key,
            Entry {
                last: self.tick,
                slot: self.resident.len() as u32,
                reads,
                class: class as u8,
                origin,
            },
        );
        self.resident.push(key);
        self.set_class(key, None, class);
        self.advance();
    }

    fn on_access(&mut self, key: BlockKey) {
        let tick = self.tick;
        let Some(e) = self.entries.get_mut(&key) else {
            return;
        };
        let age = tick - e.last;
        let old_class = e.class as usize;
        e.reads = e.reads.saturating_add(1);
        e.last = tick;
        let new_class = if old_class == PARTIAL_CLASS {
            PARTIAL_CLASS
        } else {
            Self::class_of(e.reads, age, e.origin)
        };
        e.class = new_class as u8;
        self.hits[old_class][age_bucket(age)] += 1.0;
        self.set_class(key, Some(old_class), new_class);
        self.advance();
    }

    fn on_remove(&mut self, key: BlockKey) {
        self.detach(&key);
    }

    fn evict(&mut self) -> Option<BlockKey> {
        if self.resident.is_empty() {
            return None;
        }
        let mut best: Option<(BlockKey, (f64, u64))> = None;
        let consider = |this: &Self, key: BlockKey, best: &mut Option<(BlockKey, (f64, u64))>| {
            if let Some(s) = this.score(&key) {
                let better = match best {
                    None => true,
                    Some((_, b)) => s.0 < b.0 || (s.0 == b.0 && s.1 > b.1),
                };
                if better {
                    *best = Some((key, s));
                }
            }
        };
        for class in 0..CLASSES {
            if let Some((key, ())) = self.class_lists[class].back() {
                consider(self, key, &mut best);
            }
        }
        for _ in 0..SAMPLES {
            let i = (self.next_random() % self.resident.len() as u64) as usize;
            let key = self.resident[i];
            consider(self, key, &mut best);
        }
        let (victim, _) = best?;
        let e = self.detach(&victim)?;
        self.remember(victim, &e);
        Some(victim)
    }

    fn len(&self) -> usize {
        self.entries.len()
    }
}
