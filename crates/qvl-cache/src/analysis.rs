//! What an online policy can know about reuse, and how much it can gain.
//!
//! Every block access starts a *life* that ends at the block's next access
//! (a reuse) or at the end of the trace. [`Features`] names what an online
//! policy may know when a life starts (read count, last reuse gap, position
//! in the prefix chain, whether it is a prompt's partial tail, the shape of
//! the request it was read in). [`reuse_profile`] reports, per class of
//! lives, how often the block comes back and how late.
//!
//! [`horizon_bound`] bounds what any policy that decides by those classes
//! can reach: the best hit ratio over policies that keep each block of a
//! class for a horizon chosen per class (mixing two horizons where that
//! helps), knowing every class's exact reuse statistics for the whole trace,
//! with the average number of blocks held equal to the capacity. An online
//! policy has to learn those statistics and meet the capacity at every
//! instant, so it stays below the bound (the predictive policy reaches
//! about 90-96% of it); Belady's optimum, which knows each life's outcome,
//! is the bound with [`Features::Oracle`].

use crate::keymap::{KeyMap, KeySet};
use crate::trace::Access;
use serde::Serialize;
use std::collections::HashMap;

/// What the classes of lives are built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Features {
    /// One class: recency only (what LRU knows).
    None,
    /// Reads so far: 0, 1, 2, 3, 4, 5+.
    Reads,
    /// What the predictive policy uses: a partial tail is its own class;
    /// a first access is classed by its position in the chain (log2); a
    /// reread by read count and the last gap (log4).
    Structure,
    /// [`Features::Structure`] for rereads; first accesses by the shape of
    /// their request (known once it has been read): how many leading blocks
    /// it found already seen, and how many new ones it appended (log2 each).
    RequestShape,
    /// Every life (first access or reread) by its read count, last gap
    /// (log4) and the shape of the request it was read in: appended blocks
    /// (log2), known prefix (log2, up to 4) and how full the request's tail
    /// block is (eighths). What the learned policy's model sees, as classes:
    /// 7,000 of them, so the hindsight statistics of the small ones flatter
    /// this bound more than the others'.
    Rich,
    /// Whether the block will be read again: not online (Belady's knowledge).
    Oracle,
}

impl Features {
    /// Every feature set, least informed first.
    pub const ALL: [Features; 6] = [
        Features::None,
        Features::Reads,
        Features::Structure,
        Features::RequestShape,
        Features::Rich,
        Features::Oracle,
    ];
}

/// Reuse statistics of one class of lives.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassProfile {
    /// The class, as a readable label.
    pub class: String,
    /// Lives of the class (block accesses).
    pub lives: u64,
    /// Share of them that end in a reuse.
    pub reused: f64,
    /// Median gap to the reuse, in accesses (0 when none is reused).
    pub median_gap: u64,
}

/// One life: its class and the gap to the next access of the block (None:
/// never read again), with the accesses left in the trace.
struct Life {
    class: String,
    gap: Option<u64>,
    remaining: u64,
}

fn bits(n: u64) -> u32 {
    64 - n.leading_zeros()
}

/// The lives of `accesses`, classed by `features`.
fn lives(accesses: &[Access], features: Features) -> Vec<Life> {
    let n = accesses.len();
    let mut next_use: Vec<Option<u64>> = vec![None; n];
    let mut seen_at: KeyMap<usize> = KeyMap::default();
    for (j, a) in accesses.iter().enumerate().rev() {
        next_use[j] = seen_at.get(&a.key).map(|&later| (later - j) as u64);
        seen_at.insert(a.key, j);
    }
    // Requests: runs of accesses where each continues the previous one.
    let mut request_of = vec![0usize; n];
    let mut requests: Vec<(usize, usize)> = Vec::new(); // (start, len)
    for (j, a) in accesses.iter().enumerate() {
        let continues = j > 0 && a.info.parent == Some(accesses[j - 1].key);
        if !continues {
            requests.push((j, 0));
        }
        let last = requests.len() - 1;
        requests[last].1 += 1;
        request_of[j] = last;
    }
    let full = accesses.iter().map(|a| a.info.bytes).max().unwrap_or(0);
    let mut reads: KeyMap<(u32, usize)> = KeyMap::default();
    // Known prefix of each request: leading blocks seen before it.
    let mut known_prefix = vec![0usize; requests.len()];
    {
        let mut seen = KeySet::default();
        for (r, (start, len)) in requests.iter().enumerate() {
            known_prefix[r] = accesses[*start..start + len]
                .iter()
                .take_while(|a| seen.contains(&a.key))
                .count();
            for a in &accesses[*start..start + len] {
                seen.insert(a.key);
            }
        }
    }
    let mut out = Vec::with_capacity(n);
    for (j, a) in accesses.iter().enumerate() {
        let (count, last) = reads.get(&a.key).copied().unwrap_or((0, j));
        reads.insert(a.key, (count + 1, j));
        let gap = (j - last) as u64;
        let (start, len) = requests[request_of[j]];
        let is_tail = j + 1 == start + len && a.info.bytes < full;
        let prefix = known_prefix[request_of[j]] as u64;
        let appended = len as u64 - prefix;
        let class = match features {
            Features::None => String::new(),
            Features::Reads => format!("reads {}", count.min(5)),
            Features::Oracle => format!("reused {}", next_use[j].is_some()),
            Features::Rich => {
                let tail = accesses[start + len - 1].info.bytes;
                let gap_bucket = if count > 0 { (bits(gap) / 2).min(7) } else { 0 };
                format!(
                    "reads {} gap~4^{gap_bucket} tail {} new~2^{} prefix~2^{}",
                    count.min(3),
                    if full > 0 { tail * 8 / (full + 1) } else { 0 },
                    bits(appended).min(6),
                    bits(prefix).min(3)
                )
            }
            _ if count == 0 && is_tail => "partial tail".into(),
            Features::Structure | Features::RequestShape if count > 0 => {
                format!("reread {} gap~4^{}", count.min(5), (bits(gap) / 2).min(7))
            }
            Features::Structure => {
                format!(
                    "first, position~2^{}",
                    bits(u64::from(a.info.position)).min(7)
                )
            }
            Features::RequestShape => format!(
                "first, prefix~2^{} new~2^{}",
                bits(prefix).min(6),
                bits(appended).min(6)
            ),
        };
        out.push(Life {
            class,
            gap: next_use[j],
            remaining: (n - j) as u64,
        });
    }
    out
}

/// Per class of `features`: lives, share reused, median reuse gap; largest
/// classes first.
pub fn reuse_profile(accesses: &[Access], features: Features) -> Vec<ClassProfile> {
    let mut by_class: HashMap<String, (u64, Vec<u64>)> = HashMap::new();
    for life in lives(accesses, features) {
        let entry = by_class.entry(life.class).or_default();
        entry.0 += 1;
        if let Some(g) = life.gap {
            entry.1.push(g);
        }
    }
    let mut out: Vec<ClassProfile> = by_class
        .into_iter()
        .map(|(class, (lives, mut gaps))| {
            gaps.sort_unstable();
            ClassProfile {
                class,
                lives,
                reused: gaps.len() as f64 / lives as f64,
                median_gap: gaps.get(gaps.len() / 2).copied().unwrap_or(0),
            }
        })
        .collect();
    out.sort_by(|a, b| b.lives.cmp(&a.lives).then(a.class.cmp(&b.class)));
    out
}

/// The best hit ratio of any policy that keeps the blocks of each class of
/// `features` for a horizon chosen per class, with `capacity_blocks` held
/// on average. See the module docs.
pub fn horizon_bound(accesses: &[Access], features: Features, capacity_blocks: usize) -> f64 {
    let n = accesses.len();
    if n == 0 {
        return 0.0;
    }
    let mut by_class: HashMap<String, (Vec<u64>, Vec<u64>)> = HashMap::new();
    for life in lives(accesses, features) {
        let entry = by_class.entry(life.class).or_default();
        match life.gap {
            Some(g) => entry.0.push(g),
            None => entry.1.push(life.remaining),
        }
    }
    // Horizons on a geometric grid, 1 to past the trace's length.
    let mut horizons = vec![1u64];
    while *horizons.last().unwrap_or(&1) < 2 * n as u64 {
        let h = *horizons.last().unwrap_or(&1);
        horizons.push((h * 3 / 2).max(h + 1));
    }
    // Every class's hull segments: (extra block-ticks held, extra hits).
    let mut segments: Vec<(f64, f64)> = Vec::new();
    for (mut gaps, mut censored) in by_class.into_values() {
        gaps.sort_unstable();
        censored.sort_unstable();
        let mut points = vec![(0.0f64, 0.0f64)];
        let (mut g, mut c) = (0usize, 0usize);
        let (mut g_sum, mut c_sum) = (0u64, 0u64);
        for &h in &horizons {
            while g < gaps.len() && gaps[g] <= h {
                g_sum += gaps[g];
                g += 1;
            }
            while c < censored.len() && censored[c] <= h {
                c_sum += censored[c];
                c += 1;
            }
            let held = g_sum + c_sum + h * ((gaps.len() - g) + (censored.len() - c)) as u64;
            points.push((held as f64, g as f64));
        }
        // Upper concave hull from the origin.
        let mut hull: Vec<(f64, f64)> = vec![points[0]];
        for p in points.into_iter().skip(1) {
            while hull.len() >= 2 {
                let (o, a) = (hull[hull.len() - 2], hull[hull.len() - 1]);
                let cross = (a.0 - o.0) * (p.1 - o.1) - (a.1 - o.1) * (p.0 - o.0);
                if cross >= 0.0 {
                    hull.pop();
                } else {
                    break;
                }
            }
            hull.push(p);
        }
        for w in hull.windows(2) {
            let (held, hits) = (w[1].0 - w[0].0, w[1].1 - w[0].1);
            if held > 0.0 && hits > 0.0 {
                segments.push((held, hits));
            }
        }
    }
    // Best hits first; the budget is the capacity held over every tick.
    segments.sort_by(|a, b| (b.1 / b.0).total_cmp(&(a.1 / a.0)));
    let mut budget = capacity_blocks as f64 * n as f64;
    let mut hits = 0.0;
    for (held, gained) in segments {
        if held <= budget {
            budget -= held;
            hits += gained;
        } else {
            hits += gained * budget / held;
            break;
        }
    }
    hits / n as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::Trace;
    use std::path::Path;

    fn trace(lines: &[&[u64]]) -> Vec<Access> {
        let text: String = lines
            .iter()
            .map(|ids| {
                format!(
                    "{{\"timestamp\": 0, \"input_length\": {}, \"output_length\": 1, \"hash_ids\": {:?}}}\n",
                    ids.len() * 512,
                    ids
                )
            })
            .collect();
        Trace::parse(&text, Path::new("t.jsonl"))
            .unwrap()
            .accesses()
    }

    #[test]
    fn oracle_bound_is_every_reuse_once_capacity_allows() {
        // A conversation read three times, with one-off requests between.
        let a = trace(&[
            &[1, 2],
            &[10, 11, 12],
            &[1, 2, 3],
            &[20, 21, 22],
            &[1, 2, 3],
        ]);
        let reuses = 5.0 / a.len() as f64;
        // Holding 3 blocks on average is enough for the oracle.
        let bound = horizon_bound(&a, Features::Oracle, 3);
        assert!((bound - reuses).abs() < 1e-9, "{bound}");
        // No class can beat the oracle; more capacity never hurts.
        for f in Features::ALL {
            let small = horizon_bound(&a, f, 1);
            let large = horizon_bound(&a, f, 3);
            assert!(small <= large + 1e-12 && large <= reuses + 1e-12, "{f:?}");
        }
        assert_eq!(horizon_bound(&[], Features::None, 4), 0.0);
    }

    #[test]
    fn profiles_count_lives_and_reuses() {
        let a = trace(&[&[1, 2], &[1, 2, 3], &[1, 4]]);
        let p = reuse_profile(&a, Features::Reads);
        let first = p.iter().find(|c| c.class == "reads 0").unwrap();
        // Blocks 1, 2, 3, 4 first seen; 1 and 2 come back.
        assert_eq!(first.lives, 4);
        assert!((first.reused - 0.5).abs() < 1e-12);
        let lives: u64 = p.iter().map(|c| c.lives).sum();
        assert_eq!(lives, a.len() as u64);
        // Request shapes: the second request found 2 known blocks, added 1.
        let shape = reuse_profile(&a, Features::RequestShape);
        assert!(
            shape.iter().any(|c| c.class == "first, prefix~2^2 new~2^1"),
            "{shape:?}"
        );
    }
}
