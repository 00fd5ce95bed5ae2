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
