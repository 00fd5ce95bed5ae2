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
//! For each class it learns online the hazard of a reuse at each age: reuses
//! seen at that age (while resident, or as a ghost coming back) over the
//! block-ticks that tracked blocks of the class spent at that age. Blocks are
//! tracked while resident and, after eviction, as ghosts; exposure is
//! credited as it accrues, so long reuse gaps are not under-counted. From the
//! hazard it derives, for a block of a given age, the best ratio of expected
//! reuses to expected slot-ticks over any horizon it could be kept for: its
//! hit density. Eviction removes the candidate with the lowest. Nothing about
//! the future is used: only past accesses and the structure visible at access
//! time.
//!
//! Cost per operation is O(1): a fixed number of candidates is compared at
//! eviction (a random sample plus the oldest block of each class), and the
//! tables are rebuilt about once per level-size of accesses, in time
//! proportional to the tracked keys and the (fixed) table size.

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
const GHOSTS_PER_BLOCK: usize = 8;

/// Read-count buckets: 0 (first access), 1, 2, 3-4, 5-8, 9+.
const FREQ_BUCKETS: usize = 6;
/// Buckets of the last reuse gap, log4 scale (< 4, < 16, < 64, ...).
const GAP_BUCKETS: usize = 8;
/// Parent read-count buckets for first accesses: no parent known, then the
/// read-count buckets 1.. of the parent.
const ORIGIN_BUCKETS: usize = FREQ_BUCKETS;
/// Classes: partial blocks, superseded branches, first accesses by origin
/// and position, reread blocks by read count and last gap (all KV blocks),
/// then the other tensor kinds by read count.
const CLASSES: usize = OTHER_KINDS_CLASS + (TensorKind::ALL.len() - 1) * FREQ_BUCKETS;
/// First class of tensors other than KV blocks (vision embeddings, weights),
/// whose reuse has nothing to do with prompt chains.
const OTHER_KINDS_CLASS: usize =
    FIRST_CHAIN_CLASS + ORIGIN_BUCKETS * POSITION_BUCKETS + (FREQ_BUCKETS - 1) * GAP_BUCKETS;
/// Position buckets for first accesses, log2 scale: blocks deep in a long
/// prompt are shared by fewer later requests than blocks near its start.
const POSITION_BUCKETS: usize = 8;

fn position_bucket(position: u32) -> usize {
    ((32 - position.leading_zeros()) as usize).min(POSITION_BUCKETS - 1)
}
const PARTIAL_CLASS: usize = 0;
/// Blocks on a superseded branch: a later request read their parent and went
/// on to another child (the conversation continued differently).
const SUPERSEDED_CLASS: usize = 1;
const FIRST_CHAIN_CLASS: usize = 2;
/// A parent that has switched children this often is a shared prefix (a
/// system prompt under many conversations): switching again supersedes nothing.
const HUB_SWITCHES: u8 = 2;
/// Longest branch walked when marking a superseded branch (bounds the worst
/// case; the walk stops earlier at blocks no longer tracked).
const MAX_SUPERSEDE_WALK: usize = 4096;

/// Index of [`TensorKind::KvCache`] in [`TensorKind::ALL`].
const KV_KIND: usize = 1;

fn kind_index(kind: TensorKind) -> usize {
    TensorKind::ALL
        .iter()
        .position(|k| *k == kind)
        .unwrap_or(KV_KIND)
}

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
fn bucket_start(bucket: usize) -> u64 {
    if bucket < 16 {
        return bucket as u64;
    }
    let exp = 4 + (bucket - 16) / 4;
    let sub = ((bucket - 16) % 4) as u64;
    (4 + sub) << (exp - 2)
}

/// The first age past a bucket.
fn bucket_end(bucket: usize) -> u64 {
    if bucket + 1 < AGE_BUCKETS {
        bucket_start(bucket + 1)
    } else {
        u64::MAX
    }
}

/// Per-class statistics, as decayed sums per age bucket.
#[derive(Clone)]
struct ClassStats {
    /// Reuses observed at each age.
    reuses: [f64; AGE_BUCKETS],
    /// Block-ticks tracked blocks spent at each age (folded in at rebuild).
    exposure: [f64; AGE_BUCKETS],
    /// Lives that spanned whole buckets, as a difference array over buckets
    /// (+1 where a span starts, -1 past its end), so that crediting a span is
    /// O(1) however many buckets it covers.
    whole_spans: [f64; AGE_BUCKETS + 1],
    /// Reuses that hit (not decayed), for [`Predictive::describe`].
    resident_reuses: u64,
    /// Reuses that came back after eviction (not decayed).
    ghost_reuses: u64,
}

impl ClassStats {
    fn new() -> Self {
        ClassStats {
            reuses: [0.0; AGE_BUCKETS],
            exposure: [0.0; AGE_BUCKETS],
            whole_spans: [0.0; AGE_BUCKETS + 1],
            resident_reuses: 0,
            ghost_reuses: 0,
        }
    }

    /// Credits the ticks of ages [from, to) to their buckets: the partial
    /// buckets at both ends directly, the whole ones between as a span.
    fn credit(&mut self, from: u64, to: u64) {
        if to <= from {
            return;
        }
        let first = age_bucket(from);
        let last = age_bucket(to - 1);
        if first == last {
            self.exposure[first] += (to - from) as f64;
            return;
        }
        self.exposure[first] += (bucket_end(first) - from) as f64;
        self.exposure[last] += (to - bucket_start(last)) as f64;
        if last > first + 1 {
            self.whole_spans[first + 1] += 1.0;
            self.whole_spans[last] -= 1.0;
        }
    }

    /// Adds the whole-bucket spans to the exposure.
    fn fold_spans(&mut self) {
        let mut open = 0.0;
        for b in 0..AGE_BUCKETS {
            open += self.whole_spans[b];
            if open != 0.0 {
                self.exposure[b] += open * (bucket_end(b) - bucket_start(b)) as f64;
            }
            self.whole_spans[b] = 0.0;
        }
        self.whole_spans[AGE_BUCKETS] = 0.0;
    }
}

/// Where a tracked block is in its life: class, latest access, exposure
/// credited so far.
#[derive(Clone, Copy)]
struct Life {
    /// Tick of the latest access.
    last: u64,
    /// Age up to which exposure has been credited.
    credited: u64,
    /// Reads so far (accesses after the first).
    reads: u32,
    class: u8,
    /// Index of the tensor kind in [`TensorKind::ALL`].
    kind: u8,
    /// Read-count bucket of the chain this block continues, passed down
    /// through blocks first seen together.
    origin: u8,
    /// Times the child read after this block changed.
    child_switches: u8,
    /// The block before it in its chain.
    parent: Option<BlockKey>,
    /// The child read after it most recently.
    last_child: Option<BlockKey>,
}

/// A resident key as the eviction scan sees it.
#[derive(Clone, Copy)]
struct Slot {
    key: BlockKey,
    last: u64,
    class: u8,
}

#[derive(Clone, Copy)]
struct Entry {
    life: Life,
    /// Index in `resident`.
    slot: u32,
}

/// Hit-density eviction over learned classes; see the module docs.
pub struct Predictive {
    tick: u64,
    entries: KeyMap<Entry>,
    /// Resident keys with what scoring needs, for uniform sampling without
    /// map lookups.
    resident: Vec<Slot>,
    /// Resident keys per class, most recently accessed first, with the tick
    /// of their latest access.
    class_lists: Vec<KeyList<u64>>,
    /// Evicted keys still tracked, oldest first in `ghost_order`.
    ghosts: KeyMap<Life>,
    ghost_order: VecDeque<(BlockKey, u64)>,
    high_water: usize,
    /// Largest block seen per tensor kind: a smaller block is partial.
    full_bytes: [u64; TensorKind::ALL.len()],
    stats: Vec<ClassStats>,
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
            stats: vec![ClassStats::new(); CLASSES],
            density: vec![[0.0; AGE_BUCKETS]; CLASSES],
            next_rebuild: 64,
            rebuilds: 0,
            rng: 0x9e37_79b9_7f4a_7c15,
        }
    }

    /// The class of a block with `reads` reads and the latest `gap` between
    /// two of them; for a first access, by its chain's `origin` (the
    /// parent's read-count bucket) and its position.
    fn class_of(kind: u8, reads: u32, gap: u64, origin: u8, position: u32) -> usize {
        let f = freq_bucket(reads);
        if usize::from(kind) != KV_KIND {
            // Kinds other than KV sort after it in TensorKind::ALL order.
            let other = usize::from(kind) - usize::from(usize::from(kind) > KV_KIND);
            return OTHER_KINDS_CLASS + other * FREQ_BUCKETS + f;
        }
        if f == 0 {
            FIRST_CHAIN_CLASS
                + usize::from(origin).min(ORIGIN_BUCKETS - 1) * POSITION_BUCKETS
                + position_bucket(position)
        } else {
            FIRST_CHAIN_CLASS
                + ORIGIN_BUCKETS * POSITION_BUCKETS
                + (f - 1) * GAP_BUCKETS
                + gap_bucket(gap)
        }
    }

    fn advance(&mut self) {
        self.tick += 1;
        if self.tick >= self.next_rebuild {
            self.rebuild();
        }
    }

    /// Ends a life with a reuse at its current age: credits the rest of its
    /// exposure and counts the reuse.
    fn record_reuse(stats: &mut [ClassStats], life: &Life, now: u64) {
        let age = now - life.last;
        let s = &mut stats[life.class as usize];
        // The tick of the reuse itself was spent at risk too.
        s.credit(life.credited, age + 1);
        s.reuses[age_bucket(age)] += 1.0;
    }

    /// Credits accrued exposure of every tracked block, then recomputes each
    /// class's density by age: for a block of age a, keeping it until age h
    /// at most earns the expected reuses in [a, h) and costs the expected
    /// slot-ticks until its reuse or h; the density is the best ratio over h
    /// (so a class whose reuses come late is not judged by its quiet early
    /// ages).
    fn rebuild(&mut self) {
        let now = self.tick;
        let stats = &mut self.stats;
        for life in self
            .entries
            .values_mut()
            .map(|e| &mut e.life)
            .chain(self.ghosts.values_mut())
        {
            let age = now - life.last;
            stats[life.class as usize].credit(life.credited, age);
            life.credited = age;
        }
        for class in 0..CLASSES {
            let s = &mut self.stats[class];
            s.fold_spans();
            // Per bucket: chance of a reuse for a block entering it, and
            // expected ticks spent in it.
            let mut p_reuse = [0.0f64; AGE_BUCKETS];
            let mut ticks = [0.0f64; AGE_BUCKETS];
            let mut known = AGE_BUCKETS;
            for b in 0..AGE_BUCKETS {
                if s.exposure[b] < 1.0 {
                    known = b;
                    break;
                }
                let width = (bucket_end(b) - bucket_start(b)) as f64;
                let hazard = s.reuses[b] / s.exposure[b];
                let p = 1.0 - (-hazard * width).exp();
                p_reuse[b] = p;
                ticks[b] = if hazard > 0.0 { p / hazard } else { width };
            }
            for (a, density) in self.density[class].iter_mut().enumerate() {
                let (mut reads, mut cost, mut alive) = (0.0, 0.0, 1.0);
                let mut best = 0.0f64;
                for (p, t) in p_reuse[a.min(known)..known]
                    .iter()
                    .zip(&ticks[a.min(known)..known])
                {
                    reads += alive * p;
                    cost += alive * t;
                    alive *= 1.0 - p;
                    if cost > 0.0 {
                        best = best.max(reads / cost);
                    }
                    if alive < 1e-6 {
                        break;
                    }
                }
                *density = best;
            }
            s.reuses.iter_mut().for_each(|r| *r *= DECAY);
            s.exposure.iter_mut().for_each(|e| *e *= DECAY);
        }
        // Learn fast at first (64, 128, 256, ... ticks), then settle to
        // rebuilding about once per level's worth of accesses.
        self.rebuilds += 1;
        let steady = MIN_REBUILD_INTERVAL.max(self.high_water as u64);
        let warmup = 64u64 << self.rebuilds.min(20);
        self.next_rebuild = self.tick + warmup.min(steady);
    }

    /// The tracked life of `key`, resident or ghost.
    fn life_mut(&mut self, key: &BlockKey) -> Option<&mut Life> {
        match self.entries.get_mut(key) {
            Some(e) => Some(&mut e.life),
            None => self.ghosts.get_mut(key),
        }
    }

    /// `child` was read after `parent`. When the parent's previous child
    /// differs and the parent is no shared hub, the previous child's branch
    /// was not continued: mark it superseded.
    fn note_child(&mut self, child: BlockKey, parent: Option<BlockKey>) {
        let Some(parent) = parent else {
            return;
        };
        let Some(p) = self.life_mut(&parent) else {
            return;
        };
        let superseded = match p.last_child {
            Some(old) if old != child => {
                let hub = p.child_switches >= HUB_SWITCHES;
                p.child_switches = p.child_switches.saturating_add(1);
                (!hub).then_some(old)
            }
            _ => None,
        };
        p.last_child = Some(child);
        if let Some(old) = superseded {
            self.supersede(old);
        }
    }

    /// Moves the branch from `start` down its latest children to the
    /// superseded class, stopping at blocks untracked or already there.
    fn supersede(&mut self, start: BlockKey) {
        let now = self.tick;
        let mut next = Some(start);
        for _ in 0..MAX_SUPERSEDE_WALK {
            let Some(key) = next else {
                break;
            };
            let (stats, class_lists) = (&mut self.stats, &mut self.class_lists);
            let (life, slot) = match self.entries.get_mut(&key) {
                Some(e) => (&mut e.life, Some(e.slot as usize)),
                None => match self.ghosts.get_mut(&key) {
                    Some(g) => (g, None),
                    None => break,
                },
            };
            let old = life.class as usize;
            if old == SUPERSEDED_CLASS || old == PARTIAL_CLASS {
                break;
            }
            // Close the old class's exposure; the new class counts from here.
            let age = now - life.last;
            stats[old].credit(life.credited, age);
            life.credited = age;
            life.class = SUPERSEDED_CLASS as u8;
            next = life.last_child;
            if let Some(slot) = slot {
                class_lists[old].remove(&key);
                class_lists[SUPERSEDED_CLASS].push_front(key, life.last);
                self.resident[slot].class = SUPERSEDED_CLASS as u8;
            }
        }
    }

    /// What the policy has learned, one line per class with data: blocks
    /// resident, decayed reuses and exposure, and the density at a few ages.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for class in 0..CLASSES {
            let reuses: f64 = self.stats[class].reuses.iter().sum();
            let exposure: f64 = self.stats[class].exposure.iter().sum();
            if exposure < 1.0 && self.class_lists[class].is_empty() {
                continue;
            }
            let at = |age: u64| self.density[class][age_bucket(age)];
            out += &format!(
                "class {class:3}: resident {:6} hits {:6} returns {:6} reuses {:9.1} exposure {:10.3e} density@1 {:.2e} @100 {:.2e} @1k {:.2e} @10k {:.2e} @100k {:.2e}\n",
                self.class_lists[class].len(),
                self.stats[class].resident_reuses,
                self.stats[class].ghost_reuses,
                reuses,
                exposure,
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

    /// (density, age) of a resident block; lower density loses, older
    /// breaks ties.
    fn score(&self, class: usize, last: u64) -> (f64, u64) {
        let age = self.tick - last;
        (self.density[class][age_bucket(age)], age)
    }

    fn remember(&mut self, key: BlockKey, life: Life) {
        self.ghosts.insert(key, life);
        self.ghost_order.push_back((key, life.last));
        let limit = GHOSTS_PER_BLOCK * self.high_water.max(1);
        while self.ghost_order.len() > limit {
            let Some((old, last)) = self.ghost_order.pop_front() else {
                break;
            };
            // A key that came back and left again has a newer queue entry;
            // only its latest one drops the ghost.
            if let Some(g) = self.ghosts.get(&old).filter(|g| g.last == last).copied() {
                self.ghosts.remove(&old);
                // Tracked up to now without a reuse: censored here.
                let age = self.tick - g.last;
                self.stats[g.class as usize].credit(g.credited, age);
            }
        }
    }

    fn detach(&mut self, key: &BlockKey) -> Option<Entry> {
        let e = self.entries.remove(key)?;
        self.class_lists[e.life.class as usize].remove(key);
        let slot = e.slot as usize;
        self.resident.swap_remove(slot);
        if let Some(moved) = self.resident.get(slot).map(|s| s.key) {
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
        let kind = kind_index(info.kind);
        let full = &mut self.full_bytes[kind];
        *full = (*full).max(info.bytes);
        // Only a KV block can be a prompt's partly filled tail.
        let partial = kind == KV_KIND && info.bytes < *full;
        let (reads, gap, origin) = match self.ghosts.remove(&key) {
            Some(g) => {
                // It would have been a hit had it stayed: a reuse of its
                // class, whatever this policy did with it.
                Self::record_reuse(&mut self.stats, &g, self.tick);
                self.stats[g.class as usize].ghost_reuses += 1;
                (g.reads + 1, self.tick - g.last, g.origin)
            }
            None => {
                // First seen: inherit the history of the chain it continues.
                let parent = info.parent.and_then(|p| {
                    self.entries
                        .get(&p)
                        .map(|e| e.life)
                        .or_else(|| self.ghosts.get(&p).copied())
                });
                let origin = match parent {
                    None => 0,
                    // A parent first seen too passes its own origin down.
                    Some(p) if p.reads == 0 => p.origin,
                    Some(p) => freq_bucket(p.reads) as u8,
                };
                (0, 0, origin)
            }
        };
        let class = if partial {
            PARTIAL_CLASS
        } else {
            Self::class_of(kind as u8, reads, gap, origin, info.position)
        };
        self.high_water = self.high_water.max(self.entries.len() + 1);
        let life = Life {
            last: self.tick,
            credited: 0,
            reads,
            class: class as u8,
            kind: kind as u8,
            origin,
            child_switches: 0,
            parent: info.parent,
            last_child: None,
        };
        self.entries.insert(
            key,
            Entry {
                life,
                slot: self.resident.len() as u32,
            },
        );
        self.resident.push(Slot {
            key,
            last: self.tick,
            class: class as u8,
        });
        self.class_lists[class].push_front(key, self.tick);
        self.note_child(key, info.parent);
        self.advance();
    }

    fn on_access(&mut self, key: BlockKey) {
        let tick = self.tick;
        let Some(e) = self.entries.get_mut(&key) else {
            return;
        };
        Self::record_reuse(&mut self.stats, &e.life, tick);
        self.stats[e.life.class as usize].resident_reuses += 1;
        let life = &mut e.life;
        let gap = tick - life.last;
        let old_class = life.class as usize;
        life.reads = life.reads.saturating_add(1);
        life.last = tick;
        life.credited = 0;
        let new_class = if old_class == PARTIAL_CLASS {
            PARTIAL_CLASS
        } else {
            Self::class_of(life.kind, life.reads, gap, life.origin, 0)
        };
        life.class = new_class as u8;
        let parent = life.parent;
        self.resident[e.slot as usize] = Slot {
            key,
            last: tick,
            class: new_class as u8,
        };
        self.class_lists[old_class].remove(&key);
        self.class_lists[new_class].push_front(key, tick);
        self.note_child(key, parent);
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
        let mut consider = |key: BlockKey, score: (f64, u64)| {
            let better = match &best {
                None => true,
                Some((_, b)) => score.0 < b.0 || (score.0 == b.0 && score.1 > b.1),
            };
            if better {
                best = Some((key, score));
            }
        };
        for class in 0..CLASSES {
            if let Some((key, last)) = self.class_lists[class].back() {
                consider(key, self.score(class, *last));
            }
        }
        for _ in 0..SAMPLES {
            let i = (self.next_random() % self.resident.len() as u64) as usize;
            let slot = self.resident[i];
            consider(slot.key, self.score(slot.class as usize, slot.last));
        }
        let (victim, _) = best?;
        let e = self.detach(&victim)?;
        self.remember(victim, e.life);
        Some(victim)
    }

    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(i: u64) -> BlockKey {
        BlockKey::from_id(i)
    }

    #[test]
    fn kinds_have_their_own_classes() {
        assert_eq!(TensorKind::ALL[KV_KIND], TensorKind::KvCache);
        assert!(CLASSES <= usize::from(u8::MAX) + 1);
        let mut seen = std::collections::HashSet::new();
        for kind in TensorKind::ALL {
            for reads in [0, 1, 5, 100] {
                let c = Predictive::class_of(kind_index(kind) as u8, reads, 100, 5, 3);
                assert!(c < CLASSES);
                assert!(seen.insert(c), "{kind} {reads}");
            }
        }
        // A small vision embedding is not a partial block.
        let mut p = Predictive::new();
        p.on_insert(k(1), &BlockInfo::kv(512, None, 0));
        let small = BlockInfo {
            bytes: 10,
            kind: TensorKind::VisionEmbedding,
            parent: None,
            position: 0,
        };
        p.on_insert(k(2), &small);
        assert_ne!(p.entries[&k(2)].life.class as usize, PARTIAL_CLASS);
    }

    #[test]
    fn buckets_cover_ages_in_order() {
        let mut prev = 0;
        for age in [
            0u64,
            1,
            15,
            16,
            17,
            31,
            32,
            1000,
            1 << 20,
            1 << 40,
            u64::MAX / 2,
        ] {
            let b = age_bucket(age);
            assert!(b >= prev && b < AGE_BUCKETS, "age {age}");
            assert!(
                bucket_start(b) <= age.min(bucket_start(AGE_BUCKETS - 1)),
                "age {age}"
            );
            prev = b;
        }
        for b in 0..AGE_BUCKETS - 1 {
            assert_eq!(age_bucket(bucket_start(b)), b);
            assert_eq!(bucket_end(b), bucket_start(b + 1));
        }
    }

    #[test]
    fn spans_credit_the_same_exposure_as_tick_by_tick() {
        let mut fast = ClassStats::new();
        let mut slow = ClassStats::new();
        for (from, to) in [(0u64, 5u64), (3, 100), (17, 18), (40, 5000), (5000, 5001)] {
            fast.credit(from, to);
            for age in from..to {
                slow.exposure[age_bucket(age)] += 1.0;
            }
        }
        fast.fold_spans();
        assert_eq!(fast.exposure, slow.exposure);
    }

    #[test]
    fn partial_and_superseded_blocks_go_first() {
        let mut p = Predictive::new();
        // Train: full blocks come back, partial tails never do.
        let mut resident = std::collections::HashSet::new();
        for round in 0..300u64 {
            for i in 0..4u64 {
                let key = k(i);
                let bytes = 512;
                if resident.contains(&key) {
                    p.on_access(key);
                } else {
                    if resident.len() >= 6 {
                        let v = p.evict().unwrap();
                        resident.remove(&v);
                    }
                    p.on_insert(key, &BlockInfo::kv(bytes, None, i as u32));
                    resident.insert(key);
                }
            }
            let tail = k(10_000 + round);
            if resident.len() >= 6 {
                let v = p.evict().unwrap();
                resident.remove(&v);
            }
            p.on_insert(tail, &BlockInfo::kv(100, Some(k(3)), 4));
            resident.insert(tail);
        }
        // The hot full blocks stayed; every eviction took a tail.
        assert!((0..4).all(|i| resident.contains(&k(i))));

        // A branch: 20 -> 21 -> 22, then a request reads 20 and goes to 23.
        let mut q = Predictive::new();
        q.on_insert(k(20), &BlockInfo::kv(512, None, 0));
        q.on_insert(k(21), &BlockInfo::kv(512, Some(k(20)), 1));
        q.on_insert(k(22), &BlockInfo::kv(512, Some(k(21)), 2));
        q.on_access(k(20));
        q.on_insert(k(23), &BlockInfo::kv(512, Some(k(20)), 1));
        for key in [k(21), k(22)] {
            assert_eq!(
                q.entries[&key].life.class as usize, SUPERSEDED_CLASS,
                "{key:?}"
            );
        }
        assert_ne!(q.entries[&k(23)].life.class as usize, SUPERSEDED_CLASS);
        // Read again, a superseded block leaves the class.
        q.on_access(k(21));
        assert_ne!(q.entries[&k(21)].life.class as usize, SUPERSEDED_CLASS);
    }

    #[test]
    fn ghosts_stay_bounded() {
        let mut p = Predictive::new();
        for i in 0..10_000u64 {
            if p.len() >= 16 {
                p.evict().unwrap();
            }
            p.on_insert(k(i), &BlockInfo::kv(512, None, 0));
        }
        assert_eq!(p.len(), 16);
        assert!(p.ghosts.len() <= GHOSTS_PER_BLOCK * 16);
        assert!(p.ghost_order.len() <= GHOSTS_PER_BLOCK * 16);
    }
}
