//! Mooncake-format traces and their replay through one cache level.
//!
//! A Mooncake trace is JSON Lines, one request per line:
//! `{"timestamp": 0, "input_length": 6758, "output_length": 500, "hash_ids": [0, 1, ...]}`.
//! `hash_ids` names the prompt's blocks of [`BLOCK_TOKENS`] tokens, chained:
//! two requests with the same prefix share the ids of its blocks.
//!
//! A replay looks every block of every request up in order (one lookup per
//! block access); a miss inserts the block, evicting by the policy when the
//! level is full. Capacity is counted in blocks.

use crate::keymap::KeySet;
use crate::policy::{Belady, PolicyKind};
use crate::{CacheError, Result};
use qvl_core::{BlockInfo, BlockKey, EvictionPolicy};
use serde::Serialize;
use serde_json::Value;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

/// Tokens per block in Mooncake traces.
pub const BLOCK_TOKENS: u64 = 512;

/// One request of a trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceRequest {
    /// Arrival time in milliseconds.
    pub timestamp: u64,
    /// Prompt length in tokens.
    pub input_length: u64,
    /// Generated tokens.
    pub output_length: u64,
    /// Ids of the prompt's blocks, first block first.
    pub hash_ids: Vec<u64>,
}

/// One block access of a replay: the block's key and what a policy may know
/// about it when it is accessed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    /// The block.
    pub key: BlockKey,
    /// Its size (one byte per token: only relative sizes matter in a
    /// replay), parent and position in the request's chain.
    pub info: BlockInfo,
}

/// A parsed trace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trace {
    /// Requests in file order.
    pub requests: Vec<TraceRequest>,
}

impl Trace {
    /// Reads and parses a trace file.
    pub fn load(path: impl AsRef<Path>) -> Result<Trace> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| CacheError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Trace::parse(&text, path)
    }

    /// Parses trace text; `path` names the source in errors. Blank lines are
    /// skipped.
    pub fn parse(text: &str, path: &Path) -> Result<Trace> {
        let mut requests = Vec::new();
        for (index, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            requests.push(parse_line(line, index + 1, path)?);
        }
        Ok(Trace { requests })
    }

    /// The first `n` requests.
    pub fn prefix(&self, n: usize) -> Trace {
        Trace {
            requests: self.requests.iter().take(n).cloned().collect(),
        }
    }

    /// Every block access in order, with its chain structure.
    pub fn accesses(&self) -> Vec<Access> {
        let mut out = Vec::with_capacity(self.requests.iter().map(|r| r.hash_ids.len()).sum());
        for r in &self.requests {
            let mut parent = None;
            for (i, id) in r.hash_ids.iter().enumerate() {
                let key = BlockKey::from_id(*id);
                // The last block of a prompt is usually filled only in part.
                let tokens = r
                    .input_length
                    .saturating_sub(i as u64 * BLOCK_TOKENS)
                    .clamp(1, BLOCK_TOKENS);
                let position = u32::try_from(i).unwrap_or(u32::MAX);
                out.push(Access {
                    key,
                    info: BlockInfo::kv(tokens, parent, position),
                });
                parent = Some(key);
            }
        }
        out
    }

    /// Number of distinct blocks.
    pub fn unique_blocks(&self) -> usize {
        let mut seen = KeySet::default();
        for r in &self.requests {
            for id in &r.hash_ids {
                seen.insert(BlockKey::from_id(*id));
            }
        }
        seen.len()
    }
}

fn parse_line(line: &str, line_no: usize, path: &Path) -> Result<TraceRequest> {
    let bad = |field: &'static str, reason: String| CacheError::TraceLine {
        path: path.to_path_buf(),
        line: line_no,
        field,
        reason,
    };
    let value: Value =
        serde_json::from_str(line).map_err(|e| bad("json", format!("not a JSON object: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(bad("json", "expected a JSON object".into()));
    };
    let number = |field: &'static str| -> Result<u64> {
        match obj.get(field) {
            None => Err(bad(field, "missing".into())),
            Some(v) => v
                .as_u64()
                .or_else(|| {
                    // Timestamps are sometimes written as whole floats.
                    v.as_f64()
                        .filter(|f| *f >= 0.0 && f.fract() == 0.0 && *f < u64::MAX as f64)
                        .map(|f| f as u64)
                })
                .ok_or_else(|| bad(field, format!("expected a non-negative integer, got {v}"))),
        }
    };
    let timestamp = number("timestamp")?;
    let input_length = number("input_length")?;
    let output_length = number("output_length")?;
    let ids = match obj.get("hash_ids") {
        None => return Err(bad("hash_ids", "missing".into())),
        Some(Value::Array(ids)) => ids,
        Some(v) => {
            return Err(bad(
                "hash_ids",
                format!("expected an array of ids, got {v}"),
            ))
        }
    };
    let hash_ids = ids
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_u64().ok_or_else(|| {
                bad(
                    "hash_ids",
                    format!("element {i}: expected a non-negative integer, got {v}"),
                )
            })
        })
        .collect::<Result<Vec<u64>>>()?;
    Ok(TraceRequest {
        timestamp,
        input_length,
        output_length,
        hash_ids,
    })
}

/// A policy a replay can run: any online policy, or Belady's offline optimum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplayPolicy {
    /// An online policy.
    Online(PolicyKind),
    /// Belady's MIN, which reads the whole trace ahead.
    Belady,
}

impl ReplayPolicy {
    /// The name in reports.
    pub fn name(self) -> &'static str {
        match self {
            ReplayPolicy::Online(kind) => kind.name(),
            ReplayPolicy::Belady => "belady",
        }
    }
}

impl fmt::Display for ReplayPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ReplayPolicy {
    type Err = CacheError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().eq_ignore_ascii_case("belady") {
            Ok(ReplayPolicy::Belady)
        } else {
            s.parse().map(ReplayPolicy::Online)
        }
    }
}

impl From<PolicyKind> for ReplayPolicy {
    fn from(kind: PolicyKind) -> Self {
        ReplayPolicy::Online(kind)
    }
}

/// The outcome of one replay.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplayStats {
    /// Policy name.
    pub policy: String,
    /// Capacity of the level in blocks.
    pub capacity_blocks: usize,
    /// Block lookups.
    pub accesses: u64,
    /// Lookups that found the block.
    pub hits: u64,
    /// Wall time of the replay loop in seconds (lookups, inserts, evictions).
    pub seconds: f64,
}

impl ReplayStats {
    /// hits / accesses (0 for an empty replay).
    pub fn hit_ratio(&self) -> f64 {
        if self.accesses == 0 {
            0.0
        } else {
            self.hits as f64 / self.accesses as f64
        }
    }

    /// Block lookups per second of the replay loop.
    pub fn lookups_per_second(&self) -> f64 {
        self.accesses as f64 / self.seconds.max(1e-9)
    }

    /// One row of `qvl cache replay --json`: policy, capacity_blocks,
    /// capacity_fraction (null for a capacity given in blocks), accesses,
    /// hits, hit_ratio.
    pub fn to_json_row(&self, capacity_fraction: Option<f64>) -> Value {
        serde_json::json!({
            "policy": self.policy,
            "capacity_blocks": self.capacity_blocks,
            "capacity_fraction": capacity_fraction,
            "accesses": self.accesses,
            "hits": self.hits,
            "hit_ratio": self.hit_ratio(),
        })
    }
}

/// A replay capacity as written on a command line: `5%` (a fraction of the
/// trace's unique blocks, floored) or `9139` (blocks).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Capacity {
    /// A fraction of the unique blocks, in (0, 1].
    Fraction(f64),
    /// A number of blocks.
    Blocks(usize),
}

impl Capacity {
    /// The capacity in blocks for a trace with `unique_blocks` distinct blocks.
    pub fn blocks(self, unique_blocks: usize) -> usize {
        match self {
            Capacity::Fraction(f) => capacity_for_fraction(unique_blocks, f),
            Capacity::Blocks(n) => n,
        }
    }

    /// The fraction, if the capacity was given as one.
    pub fn fraction(self) -> Option<f64> {
        match self {
            Capacity::Fraction(f) => Some(f),
            Capacity::Blocks(_) => None,
        }
    }

    /// Parses a comma-separated list such as `1%,5%,10%` or `1827,9139`.
    pub fn parse_list(list: &str) -> Result<Vec<Capacity>> {
        list.split(',').map(str::parse).collect()
    }
}

impl FromStr for Capacity {
    type Err = CacheError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let bad = |why: &str| CacheError::InvalidCapacity(format!("{t:?}: {why}"));
        if let Some(percent) = t.strip_suffix('%') {
            let p: f64 = percent
                .trim()
                .parse()
                .map_err(|_| bad("expected a percentage such as 5%"))?;
            if !(p > 0.0 && p <= 100.0) {
                return Err(bad("a percentage must be in (0, 100]"));
            }
            Ok(Capacity::Fraction(p / 100.0))
        } else {
            let n: usize = t
                .parse()
                .map_err(|_| bad("expected a percentage such as 5% or a number of blocks"))?;
            if n == 0 {
                return Err(bad("a capacity must be at least one block"));
            }
            Ok(Capacity::Blocks(n))
        }
    }
}

/// The capacity in blocks for a fraction of the unique blocks: floor.
pub fn capacity_for_fraction(unique_blocks: usize, fraction: f64) -> usize {
    (fraction * unique_blocks as f64).floor() as usize
}

/// Replays `accesses` through one level holding `capacity_blocks` blocks.
pub fn replay_accesses(
    accesses: &[Access],
    policy: ReplayPolicy,
    capacity_blocks: usize,
) -> Result<ReplayStats> {
    if capacity_blocks == 0 {
        return Err(CacheError::InvalidCapacity(
            "a replay needs a capacity of at least one block".into(),
        ));
    }
    let mut boxed: Box<dyn EvictionPolicy> = match policy {
        ReplayPolicy::Online(kind) => kind.build(),
        ReplayPolicy::Belady => {
            let keys: Vec<BlockKey> = accesses.iter().map(|a| a.key).collect();
            Box::new(Belady::for_sequence(&keys))
        }
    };
    let mut resident = KeySet::default();
    resident.reserve(capacity_blocks + 1);
    let mut hits = 0u64;
    let start = Instant::now();
    for a in accesses {
        if resident.contains(&a.key) {
            hits += 1;
            boxed.on_access(a.key);
            continue;
        }
        if resident.len() >= capacity_blocks {
            match boxed.evict() {
                Some(victim) => {
                    resident.remove(&victim);
                }
                None => {
                    return Err(CacheError::InvalidCapacity(format!(
                        "policy {} has no victim with {} blocks resident",
                        boxed.name(),
                        resident.len()
                    )))
                }
            }
        }
        boxed.on_insert(a.key, &a.info);
        resident.insert(a.key);
    }
    Ok(ReplayStats {
        policy: policy.name().to_string(),
        capacity_blocks,
        accesses: accesses.len() as u64,
        hits,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Cost of serving one block from each level of a tiered replay, and of a
/// miss (recomputing the block), in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LevelCosts {
    /// Per level, fastest first: the time to make a block there usable.
    pub hit_ms: Vec<f64>,
    /// The time to recompute a block that no level holds.
    pub miss_ms: f64,
}

impl Default for LevelCosts {
    /// Estimates for a 512-token KV block of a 2B model (about 56 MiB in
    /// bf16) on the reference laptop: in GPU memory already; over PCIe 3
    /// from RAM (about 5 ms); from NVMe, then over PCIe (about 25 ms);
    /// recomputed by prefill (about 200 ms).
    fn default() -> Self {
        LevelCosts {
            hit_ms: vec![0.0, 5.0, 25.0],
            miss_ms: 200.0,
        }
    }
}

/// The outcome of a tiered replay.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TieredReplayStats {
    /// Policy name.
    pub policy: String,
    /// Capacity of each level in blocks, fastest first.
    pub level_blocks: Vec<usize>,
    /// Block lookups.
    pub accesses: u64,
    /// Lookups served by each level.
    pub hits: Vec<u64>,
    /// Latency-weighted cost of all lookups, in milliseconds.
    pub cost_ms: f64,
    /// The same cost had every lookup missed (no cache).
    pub no_cache_cost_ms: f64,
}

impl TieredReplayStats {
    /// Share of lookups each level served.
    pub fn level_hit_ratios(&self) -> Vec<f64> {
        let n = self.accesses.max(1) as f64;
        self.hits.iter().map(|h| *h as f64 / n).collect()
    }
}

/// Replays `accesses` through a [`crate::TieredCache`] of host-memory levels
/// holding `level_blocks` full blocks each (a block's bytes are its tokens),
/// with a policy of `kind` per level: a get per access, a put on a miss.
pub fn replay_tiered(
    accesses: &[Access],
    kind: PolicyKind,
    level_blocks: &[usize],
    costs: &LevelCosts,
) -> Result<TieredReplayStats> {
    use crate::{HostStore, TieredCache};
    use qvl_core::{Block, BlockStore, ByteSize, DType, TensorKind, TensorMeta, Tier};
    if level_blocks.is_empty() || level_blocks.contains(&0) {
        return Err(CacheError::InvalidCapacity(format!(
            "a tiered replay needs levels of at least one block, got {level_blocks:?}"
        )));
    }
    if costs.hit_ms.len() < level_blocks.len() {
        return Err(CacheError::InvalidCapacity(format!(
            "{} levels but hit costs for only {}",
            level_blocks.len(),
            costs.hit_ms.len()
        )));
    }
    let tiers = [Tier::Gpu, Tier::HostRam, Tier::Ssd];
    let stores: Vec<Box<dyn BlockStore>> = level_blocks
        .iter()
        .enumerate()
        .map(|(i, blocks)| {
            let tier = tiers[i.min(tiers.len() - 1)];
            Box::new(HostStore::on_tier(
                tier,
                ByteSize(*blocks as u64 * BLOCK_TOKENS),
            )) as Box<dyn BlockStore>
        })
        .collect();
    let cache = TieredCache::new(kind, stores);
    // One shared zero payload per block size: the replay measures placement,
    // not copying.
    let mut payloads: std::collections::HashMap<u64, std::sync::Arc<[u8]>> = Default::default();
    let mut cost_ms = 0.0;
    for a in accesses {
        if let Some((level, _)) = cache.lookup(&a.key)? {
            cost_ms += costs.hit_ms[level];
            continue;
        }
        cost_ms += costs.miss_ms;
        let bytes = a.info.bytes.max(1);
        let data = payloads
            .entry(bytes)
            .or_insert_with(|| vec![0u8; bytes as usize].into())
            .clone();
        let meta = TensorMeta::new(vec![bytes as usize], DType::U8, TensorKind::KvCache);
        cache.put(
            Block {
                key: a.key,
                meta,
                codec: qvl_core::CodecId::RAW,
                data,
            },
            a.info,
        )?;
    }
    let stats = cache.stats();
    Ok(TieredReplayStats {
        policy: kind.name().to_string(),
        level_blocks: level_blocks.to_vec(),
        accesses: stats.lookups,
        hits: stats.hits,
        cost_ms,
        no_cache_cost_ms: accesses.len() as f64 * costs.miss_ms,
    })
}

/// Replays the Mooncake trace at `trace_path` with `policy` through one level
/// of `capacity_blocks` blocks.
pub fn replay(
    trace_path: impl AsRef<Path>,
    policy: ReplayPolicy,
    capacity_blocks: usize,
) -> Result<ReplayStats> {
    let path: PathBuf = trace_path.as_ref().to_path_buf();
    let trace = Trace::load(&path)?;
    let accesses = trace.accesses();
    if accesses.is_empty() {
        return Err(CacheError::EmptyTrace(path));
    }
    replay_accesses(&accesses, policy, capacity_blocks)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Trace> {
        Trace::parse(text, Path::new("t.jsonl"))
    }

    #[test]
    fn parses_requests_and_chains_blocks() {
        let t = parse(
            "{\"timestamp\": 0, \"input_length\": 1000, \"output_length\": 5, \"hash_ids\": [0, 1]}\n\n\
             {\"timestamp\": 3000.0, \"input_length\": 1536, \"output_length\": 7, \"hash_ids\": [0, 1, 2]}\n",
        )
        .unwrap();
        assert_eq!(t.requests.len(), 2);
        assert_eq!(t.requests[1].timestamp, 3000);
        assert_eq!(t.unique_blocks(), 3);
        let a = t.accesses();
        assert_eq!(a.len(), 5);
        assert_eq!(a[0].info.parent, None);
        assert_eq!(a[1].info.parent, Some(BlockKey::from_id(0)));
        assert_eq!(a[1].info.position, 1);
        // The partial tail of the first prompt: 1000 - 512 tokens.
        assert_eq!(a[1].info.bytes, 488);
        assert_eq!(a[4].info.bytes, 512);
    }

    #[test]
    fn bad_lines_name_line_and_field() {
        let cases = [
            ("{\"timestamp\": 0, \"input_length\": 1, \"output_length\": 1}", "t.jsonl:2: field `hash_ids`: missing"),
            ("{\"timestamp\": -1, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": []}", "t.jsonl:2: field `timestamp`: expected a non-negative integer, got -1"),
            ("{\"timestamp\": 0, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": [1, \"x\"]}", "t.jsonl:2: field `hash_ids`: element 1: expected a non-negative integer, got \"x\""),
            ("{\"timestamp\": 0, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": 4}", "t.jsonl:2: field `hash_ids`: expected an array of ids, got 4"),
            ("[1, 2]", "t.jsonl:2: field `json`: expected a JSON object"),
            ("{\"timestamp\": 0,", "t.jsonl:2: field `json`: not a JSON object"),
        ];
        let good =
            "{\"timestamp\": 0, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": [1]}\n";
        for (line, want) in cases {
            let err = parse(&format!("{good}{line}\n")).unwrap_err().to_string();
            assert!(err.starts_with(want), "got {err:?}, want {want:?}");
        }
    }

    #[test]
    fn tiered_replay_serves_from_lower_levels() {
        // Blocks 0..6 twice: 2 fit in L1, 4 more in L2; the second round hits.
        let line = |ts: u64| {
            format!("{{\"timestamp\": {ts}, \"input_length\": 3072, \"output_length\": 1, \"hash_ids\": [0, 1, 2, 3, 4, 5]}}\n")
        };
        let t = parse(&(line(0) + &line(1))).unwrap();
        let s = replay_tiered(
            &t.accesses(),
            PolicyKind::Lru,
            &[2, 4],
            &LevelCosts::default(),
        )
        .unwrap();
        assert_eq!(s.accesses, 12);
        assert_eq!(s.hits.iter().sum::<u64>(), 6);
        assert!(s.hits[1] > 0, "{:?}", s.hits);
        assert!(s.cost_ms < s.no_cache_cost_ms);
        assert!((s.level_hit_ratios().iter().sum::<f64>() - 0.5).abs() < 1e-12);
        assert!(replay_tiered(
            &t.accesses(),
            PolicyKind::Lru,
            &[2, 0],
            &LevelCosts::default()
        )
        .is_err());
    }

    #[test]
    fn capacities_parse_as_fractions_or_blocks() {
        let list = Capacity::parse_list("1%, 5%,9139").unwrap();
        assert_eq!(list[0], Capacity::Fraction(0.01));
        assert_eq!(list[1].blocks(182_790), 9139);
        assert_eq!(list[2], Capacity::Blocks(9139));
        assert_eq!(list[2].fraction(), None);
        for bad in ["0", "0%", "150%", "x%", "-3", ""] {
            let err = bad.parse::<Capacity>().unwrap_err().to_string();
            assert!(err.starts_with("invalid capacity"), "{bad}: {err}");
        }
    }

    #[test]
    fn replay_counts_hits_and_rejects_zero_capacity() {
        let t = parse(
            "{\"timestamp\": 0, \"input_length\": 1024, \"output_length\": 1, \"hash_ids\": [0, 1]}\n\
             {\"timestamp\": 1, \"input_length\": 1024, \"output_length\": 1, \"hash_ids\": [0, 2]}\n\
             {\"timestamp\": 2, \"input_length\": 1024, \"output_length\": 1, \"hash_ids\": [0, 1]}\n",
        )
        .unwrap();
        let a = t.accesses();
        let lru = replay_accesses(&a, PolicyKind::Lru.into(), 2).unwrap();
        // 0 hits twice; 1 was evicted by 2 (LRU keeps 0 and 2).
        assert_eq!((lru.hits, lru.accesses), (2, 6));
        let row = lru.to_json_row(Some(0.5));
        assert_eq!(row["hit_ratio"], serde_json::json!(2.0 / 6.0));
        assert_eq!(row["capacity_fraction"], serde_json::json!(0.5));
        let belady = replay_accesses(&a, ReplayPolicy::Belady, 2).unwrap();
        assert_eq!(belady.hits, 2);
        assert!(replay_accesses(&a, ReplayPolicy::Belady, 0).is_err());
        assert_eq!(
            "Belady".parse::<ReplayPolicy>().unwrap(),
            ReplayPolicy::Belady
        );
        let err = replay("/nonexistent/trace.jsonl", ReplayPolicy::Belady, 1).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("reading /nonexistent/trace.jsonl"));
    }
}
