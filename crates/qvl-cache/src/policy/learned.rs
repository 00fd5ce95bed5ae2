//! A learned eviction policy in the spirit of LRB (Song et al., "Learning
//! Relaxed Belady", NSDI 2020): an online-trained model predicts, for each
//! resident block, the chance that it is read again within a window of
//! about the level's reach, and eviction removes the candidate with the
//! lowest prediction among a random sample.
//!
//! - Features, known when a block is accessed: read count, last reuse gap,
//!   position in its prefix chain, whether it is a prompt's partial tail,
//!   the read count of the chain it continues, whether a later request left
//!   its branch, and the shape of the request it was last read in (how many
//!   leading blocks the request found already known, how many it appended,
//!   how full its tail block was: known once the request's run of blocks
//!   ends), crossed with the block's age (log scale).
//! - Model: logistic regression over one-hot buckets of those features,
//!   trained by AdaGrad one labelled sample at a time; nothing is fitted
//!   offline, every weight starts at zero.
//! - Labels (the "relaxed Belady boundary"): every access samples one
//!   resident block with its features and age; once `window` more accesses
//!   have passed, the sample is labelled by whether the block was read in
//!   between. The window is [`WINDOW_PER_BLOCK`] times the most blocks the
//!   level has held, so it scales with the capacity and nothing else.
//!
//! Per operation the cost is O(1): one sample taken, at most a few labels
//! resolved (each a sum over ~16 weights and their update), and at eviction
//! [`SAMPLES`] candidates scored.

use crate::keymap::KeyMap;
use qvl_core::{BlockInfo, BlockKey, EvictionPolicy, TensorKind};
use std::collections::VecDeque;

/// Random candidates scored at each eviction.
const SAMPLES: usize = 64;
/// The label window in accesses per block the level holds: about the time
/// a block can stay in a level that keeps only blocks worth keeping.
const WINDOW_PER_BLOCK: u64 = 1;
/// Ghost entries (evicted blocks still tracked) per block the level holds.
const GHOSTS_PER_BLOCK: usize = 8;
/// AdaGrad step size.
const LEARNING_RATE: f64 = 0.05;
/// A parent that has switched children this often is a shared prefix.
const HUB_SWITCHES: u8 = 2;
/// Longest branch walked when marking a superseded branch.
const MAX_SUPERSEDE_WALK: usize = 4096;

/// Log-scale age buckets (two per doubling).
const AGE_BUCKETS: usize = 48;
const READ_BUCKETS: usize = 6;
const GAP_BUCKETS: usize = 9;
const POSITION_BUCKETS: usize = 8;
/// Request shape buckets: 0..=6 by log2 of the count, 7 while unknown.
const SHAPE_BUCKETS: usize = 8;
const SHAPE_UNKNOWN: u8 = 7;
/// Tail fill in eighths, 8 while unknown.
const TAIL_BUCKETS: usize = 9;
const TAIL_UNKNOWN: u8 = 8;
const KIND_BUCKETS: usize = TensorKind::ALL.len();

// Offsets of the feature groups in the weight vector.
const F_BIAS: usize = 0;
const F_READS: usize = F_BIAS + 1;
const F_GAP: usize = F_READS + READ_BUCKETS;
const F_POSITION: usize = F_GAP + GAP_BUCKETS;
const F_PARTIAL: usize = F_POSITION + POSITION_BUCKETS;
const F_ORIGIN: usize = F_PARTIAL + 2;
const F_SUPERSEDED: usize = F_ORIGIN + READ_BUCKETS;
const F_PREFIX: usize = F_SUPERSEDED + 2;
const F_APPENDED: usize = F_PREFIX + SHAPE_BUCKETS;
const F_TAIL: usize = F_APPENDED + SHAPE_BUCKETS;
const F_KIND: usize = F_TAIL + TAIL_BUCKETS;
const F_AGE: usize = F_KIND + KIND_BUCKETS;
const F_AGE_READS: usize = F_AGE + AGE_BUCKETS;
const F_AGE_APPENDED: usize = F_AGE_READS + AGE_BUCKETS * READ_BUCKETS;
const F_AGE_PARTIAL: usize = F_AGE_APPENDED + AGE_BUCKETS * SHAPE_BUCKETS;
const F_AGE_TAIL: usize = F_AGE_PARTIAL + AGE_BUCKETS * 2;
const F_AGE_PREFIX: usize = F_AGE_TAIL + AGE_BUCKETS * TAIL_BUCKETS;
const F_READS_APPENDED: usize = F_AGE_PREFIX + AGE_BUCKETS * SHAPE_BUCKETS;
const F_TAIL_APPENDED: usize = F_READS_APPENDED + READ_BUCKETS * SHAPE_BUCKETS;
const WEIGHTS: usize = F_TAIL_APPENDED + TAIL_BUCKETS * SHAPE_BUCKETS;
/// Active features per sample: one per group.
const ACTIVE: usize = 19;

fn bits(n: u64) -> u32 {
    64 - n.leading_zeros()
}

fn read_bucket(reads: u32) -> u8 {
    match reads {
        0 => 0,
        1 => 1,
        2 => 2,
        3..=4 => 3,
        5..=8 => 4,
        _ => 5,
    }
}

fn age_bucket(age: u64) -> usize {
    if age < 2 {
        return age as usize;
    }
    let exp = 63 - age.leading_zeros() as usize;
    let half = ((age >> (exp - 1)) & 1) as usize;
    (2 * exp + half).min(AGE_BUCKETS - 1)
}

fn shape_bucket(count: u64) -> u8 {
    bits(count).min(6) as u8
}

/// What the model knows of a block, fixed between its accesses (the age is
/// added at scoring time).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Traits {
    reads: u8,
    gap: u8,
    position: u8,
    partial: bool,
    origin: u8,
    superseded: bool,
    prefix: u8,
    appended: u8,
    tail: u8,
    kind: u8,
}

impl Traits {
    fn active(&self, age: u64) -> [u16; ACTIVE] {
        let a = age_bucket(age);
        let idx = [
            F_BIAS,
            F_READS + usize::from(self.reads),
            F_GAP + usize::from(self.gap),
            F_POSITION + usize::from(self.position),
            F_PARTIAL + usize::from(self.partial),
            F_ORIGIN + usize::from(self.origin),
            F_SUPERSEDED + usize::from(self.superseded),
            F_PREFIX + usize::from(self.prefix),
            F_APPENDED + usize::from(self.appended),
            F_TAIL + usize::from(self.tail),
            F_KIND + usize::from(self.kind),
            F_AGE + a,
            F_AGE_READS + a * READ_BUCKETS + usize::from(self.reads),
            F_AGE_APPENDED + a * SHAPE_BUCKETS + usize::from(self.appended),
            F_AGE_PARTIAL + a * 2 + usize::from(self.partial),
            F_AGE_TAIL + a * TAIL_BUCKETS + usize::from(self.tail),
            F_AGE_PREFIX + a * SHAPE_BUCKETS + usize::from(self.prefix),
            F_READS_APPENDED + usize::from(self.reads) * SHAPE_BUCKETS + usize::from(self.appended),
            F_TAIL_APPENDED + usize::from(self.tail) * SHAPE_BUCKETS + usize::from(self.appended),
        ];
        // Every index is below WEIGHTS (< 2^16) by construction.
        idx.map(|i| i as u16)
    }
}

/// A tracked block, resident or ghost.
#[derive(Clone, Copy)]
struct Meta {
    /// Tick of the latest access.
    last: u64,
    reads: u32,
    traits: Traits,
    /// Stored bytes, for the tail fill of the request it ends.
    bytes: u64,
    parent: Option<BlockKey>,
    last_child: Option<BlockKey>,
    child_switches: u8,
    /// Index in `resident`, or `u32::MAX` for a ghost.
    slot: u32,
}

const GHOST: u32 = u32::MAX;

/// A resident block as sampling and scoring see it, kept beside the map so
/// that evictions read one array instead of a map as large as the ghosts.
#[derive(Clone, Copy)]
struct Slot {
    key: BlockKey,
    last: u64,
    traits: Traits,
}

/// Copies what scoring reads of `m` into its resident slot, if it has one.
fn sync_slot(resident: &mut [Slot], key: BlockKey, m: &Meta) {
    if let Some(slot) = resident.get_mut(m.slot as usize) {
        *slot = Slot {
            key,
            last: m.last,
            traits: m.traits,
        };
    }
}

/// A pending training sample, labelled at `due`.
struct Sample {
    key: BlockKey,
    /// The block's latest access when sampled: a later one is a reuse.
    last: u64,
    active: [u16; ACTIVE],
    due: u64,
}

/// Online logistic regression over sparse one-hot features, AdaGrad steps.
struct Model {
    weights: Vec<f32>,
    squared_gradients: Vec<f32>,
    trained: u64,
}

impl Model {
    fn new() -> Self {
        Model {
            weights: vec![0.0; WEIGHTS],
            squared_gradients: vec![0.0; WEIGHTS],
            trained: 0,
        }
    }

    fn logit(&self, active: &[u16; ACTIVE]) -> f32 {
        active.iter().map(|i| self.weights[usize::from(*i)]).sum()
    }

    fn train(&mut self, active: &[u16; ACTIVE], reused: bool) {
        let z = f64::from(self.logit(active));
        let p = 1.0 / (1.0 + (-z).exp());
        let gradient = (p - f64::from(u8::from(reused))) as f32;
        for i in active {
            let i = usize::from(*i);
            self.squared_gradients[i] += gradient * gradient;
            let step = LEARNING_RATE as f32 / (self.squared_gradients[i].sqrt() + 1e-6);
            self.weights[i] -= step * gradient;
        }
        self.trained += 1;
    }
}

/// Learned eviction: see the module docs.
pub struct Learned {
    tick: u64,
    entries: KeyMap<Meta>,
    resident: Vec<Slot>,
    ghost_order: VecDeque<(BlockKey, u64)>,
    ghosts: usize,
    high_water: usize,
    full_bytes: [u64; TensorKind::ALL.len()],
    model: Model,
    /// Samples waiting for their label, oldest first.
    pending: VecDeque<Sample>,
    /// The run of blocks read so far by the current request, and how many
    /// of its leading blocks were known.
    request: Vec<BlockKey>,
    request_prefix: u64,
    request_leading: bool,
    previous: Option<BlockKey>,
    rng: u64,
}

impl Default for Learned {
    fn default() -> Self {
        Self::new()
    }
}

impl Learned {
    /// An empty learned policy; the model starts untrained.
    pub fn new() -> Self {
        Learned {
            tick: 0,
            entries: KeyMap::default(),
            resident: Vec::new(),
            ghost_order: VecDeque::new(),
            ghosts: 0,
            high_water: 0,
            full_bytes: [0; TensorKind::ALL.len()],
            model: Model::new(),
            pending: VecDeque::new(),
            request: Vec::new(),
            request_prefix: 0,
            request_leading: true,
            previous: None,
            rng: 0x9e37_79b9_7f4a_7c15,
        }
    }

    /// Labelled samples the model has been trained on.
    pub fn trained_samples(&self) -> u64 {
        self.model.trained
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*: deterministic, so replays are reproducible.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn window(&self) -> u64 {
        WINDOW_PER_BLOCK * self.high_water.max(1) as u64
    }

    /// One access of `key` (already updated in `entries`): follows the
    /// request's run of blocks, samples a block for training, resolves due
    /// labels.
    fn after_access(&mut self, key: BlockKey, parent: Option<BlockKey>, known: bool) {
        let continues = parent.is_some() && parent == self.previous;
        if !continues {
            self.end_request();
        }
        if self.request_leading && known {
            self.request_prefix += 1;
        } else {
            self.request_leading = false;
        }
        self.request.push(key);
        self.previous = Some(key);
        self.note_child(key, parent);

        // One training sample per access: a random resident block.
        if !self.resident.is_empty() {
            let i = (self.next_random() % self.resident.len() as u64) as usize;
            let slot = self.resident[i];
            self.pending.push_back(Sample {
                key: slot.key,
                last: slot.last,
                active: slot.traits.active(self.tick - slot.last),
                due: self.tick + self.window(),
            });
        }
        while self.pending.front().is_some_and(|s| s.due <= self.tick) {
            let Some(s) = self.pending.pop_front() else {
                break;
            };
            let reused = self.entries.get(&s.key).is_some_and(|m| m.last > s.last);
            self.model.train(&s.active, reused);
        }
        self.tick += 1;
    }

    /// The current request's run ended: its shape is now known; give it to
    /// every block it read.
    fn end_request(&mut self) {
        if let Some(&tail_key) = self.request.last() {
            let len = self.request.len() as u64;
            let tail = self.entries.get(&tail_key).map_or(TAIL_UNKNOWN, |m| {
                let full = self.full_bytes[usize::from(m.traits.kind)].max(1);
                ((m.bytes * 8).saturating_sub(1) / full).min(7) as u8
            });
            let prefix = shape_bucket(self.request_prefix);
            let appended = shape_bucket(len - self.request_prefix);
            for key in &self.request {
                if let Some(m) = self.entries.get_mut(key) {
                    m.traits.prefix = prefix;
                    m.traits.appended = appended;
                    m.traits.tail = tail;
                    sync_slot(&mut self.resident, *key, m);
                }
            }
        }
        self.request.clear();
        self.request_prefix = 0;
        self.request_leading = true;
    }

    /// `child` was read after `parent`; a parent (no shared hub) that moved
    /// on to another child leaves the previous child's branch superseded.
    fn note_child(&mut self, child: BlockKey, parent: Option<BlockKey>) {
        let Some(p) = parent.and_then(|p| self.entries.get_mut(&p)) else {
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
        let mut next = superseded;
        for _ in 0..MAX_SUPERSEDE_WALK {
            let Some(key) = next else {
                break;
            };
            let Some(m) = self.entries.get_mut(&key) else {
                break;
            };
            if m.traits.superseded {
                break;
            }
            m.traits.superseded = true;
            sync_slot(&mut self.resident, key, m);
            next = m.last_child;
        }
    }

    fn detach(&mut self, key: &BlockKey) -> Option<Meta> {
        let m = *self.entries.get(key)?;
        if m.slot == GHOST {
            return None;
        }
        let slot = m.slot as usize;
        self.resident.swap_remove(slot);
        if let Some(moved) = self.resident.get(slot).map(|s| s.key) {
            if let Some(mm) = self.entries.get_mut(&moved) {
                mm.slot = m.slot;
            }
        }
        Some(m)
    }

    fn make_ghost(&mut self, key: BlockKey) {
        let Some(m) = self.entries.get_mut(&key) else {
            return;
        };
        m.slot = GHOST;
        let last = m.last;
        self.ghosts += 1;
        self.ghost_order.push_back((key, last));
        let limit = GHOSTS_PER_BLOCK * self.high_water.max(1);
        while self.ghosts > limit {
            let Some((old, last)) = self.ghost_order.pop_front() else {
                break;
            };
            // Only the latest queue entry of a ghost drops it.
            if self
                .entries
                .get(&old)
                .is_some_and(|g| g.slot == GHOST && g.last == last)
            {
                self.entries.remove(&old);
                self.ghosts -= 1;
            }
        }
    }
}

impl EvictionPolicy for Learned {
    fn name(&self) -> &'static str {
        "learned"
    }

    fn on_insert(&mut self, key: BlockKey, info: &BlockInfo) {
        let kind = TensorKind::ALL
            .iter()
            .position(|k| *k == info.kind)
            .unwrap_or(0);
        let full = &mut self.full_bytes[kind];
        *full = (*full).max(info.bytes);
        let partial = info.kind == TensorKind::KvCache && info.bytes < *full;
        let tick = self.tick;
        let slot = self.resident.len() as u32;
        let (known, reads, gap, origin, last_child, switches) = match self.entries.get(&key) {
            Some(m) if m.slot != GHOST => {
                // Inserted again while resident: treat as an access.
                self.on_access(key);
                return;
            }
            Some(g) => {
                self.ghosts -= 1;
                (
                    true,
                    g.reads + 1,
                    bits(tick - g.last).div_ceil(2).min(GAP_BUCKETS as u32 - 1) as u8,
                    g.traits.origin,
                    g.last_child,
                    g.child_switches,
                )
            }
            None => {
                let origin = info
                    .parent
                    .and_then(|p| self.entries.get(&p))
                    .map_or(0, |p| {
                        if p.reads == 0 {
                            p.traits.origin
                        } else {
                            read_bucket(p.reads)
                        }
                    });
                (false, 0, 0, origin, None, 0)
            }
        };
        let traits = Traits {
            reads: read_bucket(reads),
            gap,
            position: bits(u64::from(info.position)).min(POSITION_BUCKETS as u32 - 1) as u8,
            partial,
            origin,
            superseded: false,
            prefix: SHAPE_UNKNOWN,
            appended: SHAPE_UNKNOWN,
            tail: TAIL_UNKNOWN,
            kind: kind as u8,
        };
        self.entries.insert(
            key,
            Meta {
                last: tick,
                reads,
                traits,
                bytes: info.bytes,
                parent: info.parent,
                last_child,
                child_switches: switches,
                slot,
            },
        );
        self.resident.push(Slot {
            key,
            last: tick,
            traits,
        });
        self.high_water = self.high_water.max(self.resident.len());
        self.after_access(key, info.parent, known);
    }

    fn on_access(&mut self, key: BlockKey) {
        let tick = self.tick;
        let Some(m) = self.entries.get_mut(&key) else {
            return;
        };
        if m.slot == GHOST {
            return;
        }
        let gap = tick - m.last;
        m.reads = m.reads.saturating_add(1);
        m.last = tick;
        m.traits.reads = read_bucket(m.reads);
        m.traits.gap = bits(gap).div_ceil(2).min(GAP_BUCKETS as u32 - 1) as u8;
        m.traits.superseded = false;
        m.traits.prefix = SHAPE_UNKNOWN;
        m.traits.appended = SHAPE_UNKNOWN;
        m.traits.tail = TAIL_UNKNOWN;
        let parent = m.parent;
        sync_slot(&mut self.resident, key, m);
        self.after_access(key, parent, true);
    }

    fn on_remove(&mut self, key: BlockKey) {
        if self.detach(&key).is_some() {
            self.entries.remove(&key);
        }
    }

    fn evict(&mut self) -> Option<BlockKey> {
        if self.resident.is_empty() {
            return None;
        }
        let mut best: Option<(BlockKey, f32, u64)> = None;
        for _ in 0..SAMPLES.min(self.resident.len()) {
            let i = (self.next_random() % self.resident.len() as u64) as usize;
            let Slot { key, last, traits } = self.resident[i];
            let age = self.tick - last;
            let score = self.model.logit(&traits.active(age));
            let better = match best {
                None => true,
                Some((_, s, a)) => score < s || (score == s && age > a),
            };
            if better {
                best = Some((key, score, age));
            }
        }
        let (victim, _, _) = best?;
        self.detach(&victim)?;
        self.make_ghost(victim);
        Some(victim)
    }

    fn len(&self) -> usize {
        self.resident.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(i: u64) -> BlockKey {
        BlockKey::from_id(i)
    }

    #[test]
    fn feature_indices_stay_in_their_groups() {
        let t = Traits {
            reads: 5,
            gap: 8,
            position: 7,
            partial: true,
            origin: 5,
            superseded: true,
            prefix: SHAPE_UNKNOWN,
            appended: SHAPE_UNKNOWN,
            tail: TAIL_UNKNOWN,
            kind: (KIND_BUCKETS - 1) as u8,
        };
        for age in [0, 1, 2, 3, 1000, u64::MAX] {
            let a = t.active(age);
            assert!(a.iter().all(|i| usize::from(*i) < WEIGHTS), "{a:?}");
            let mut sorted = a.to_vec();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), ACTIVE, "features collide at age {age}");
        }
        let mut prev = 0;
        for age in [0u64, 1, 2, 3, 4, 6, 8, 100, 1 << 30, u64::MAX] {
            let b = age_bucket(age);
            assert!(b >= prev && b < AGE_BUCKETS);
            prev = b;
        }
    }

    #[test]
    fn resident_slots_mirror_the_map() {
        // Chains that branch (superseding), repeat (request shapes) and
        // overflow a level of 8 (evictions, ghosts, returns).
        let mut p = Learned::new();
        let mut resident = std::collections::HashSet::new();
        let mut state = 7u64;
        for _ in 0..500 {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
            let branch = (state >> 40) % 5;
            let len = 1 + (state >> 50) % 6;
            let mut parent = None;
            for pos in 0..len {
                let key = k(branch * 100 + pos + u64::from(pos > 2) * ((state >> 20) % 3) * 10);
                if resident.contains(&key) {
                    p.on_access(key);
                } else {
                    if resident.len() >= 8 {
                        resident.remove(&p.evict().unwrap());
                    }
                    let bytes = if pos + 1 == len { 300 } else { 512 };
                    p.on_insert(key, &BlockInfo::kv(bytes, parent, pos as u32));
                    resident.insert(key);
                }
                parent = Some(key);
            }
        }
        assert_eq!(p.resident.len(), resident.len());
        for (i, slot) in p.resident.iter().enumerate() {
            let m = p.entries[&slot.key];
            assert_eq!(m.slot as usize, i);
            assert_eq!((m.last, m.traits), (slot.last, slot.traits));
            assert!(resident.contains(&slot.key));
        }
    }

    #[test]
    fn learns_that_partial_tails_do_not_come_back() {
        // Full blocks 0..4 are read every round; each round also appends a
        // partial tail that never returns. Capacity 6.
        let mut p = Learned::new();
        let mut resident = std::collections::HashSet::new();
        let mut hits = 0;
        for round in 0..2000u64 {
            let mut parent = None;
            for i in 0..4u64 {
                let key = k(i);
                if resident.contains(&key) {
                    hits += usize::from(round >= 1000);
                    p.on_access(key);
                } else {
                    if resident.len() >= 6 {
                        resident.remove(&p.evict().unwrap());
                    }
                    p.on_insert(key, &BlockInfo::kv(512, parent, i as u32));
                    resident.insert(key);
                }
                parent = Some(key);
            }
            if resident.len() >= 6 {
                resident.remove(&p.evict().unwrap());
            }
            let tail = k(10_000 + round);
            p.on_insert(tail, &BlockInfo::kv(100, parent, 4));
            resident.insert(tail);
            assert_eq!(p.len(), resident.len());
        }
        assert!(p.trained_samples() > 5000);
        // Once trained, the hot blocks are (almost) always kept.
        assert!(hits > 3900, "{hits} of 4000");
        p.on_remove(k(0));
        assert!(!p.entries.contains_key(&k(0)));
        assert!(p.ghosts <= GHOSTS_PER_BLOCK * p.high_water);
    }
}
