//! A synthetic multi-turn chat workload in the Mooncake trace format, to
//! check policies on a workload other than the shared trace.
//!
//! Conversations start at random times under one of a few shared system
//! prompts (popularity skewed). Each turn's prompt is the conversation so
//! far: system prompt, earlier turns, the model's answers, the new user
//! message. The next turn follows after a think time drawn from a log-normal
//! distribution; a conversation ends after a geometric number of turns.
//! Some turns edit and resend an earlier message, branching the prefix tree.

use crate::trace::{Trace, TraceRequest, BLOCK_TOKENS};
use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Shape of a synthetic workload.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChatWorkload {
    /// Requests to generate.
    pub requests: usize,
    /// Shared system prompts.
    pub system_prompts: usize,
    /// Mean turns per conversation (geometric).
    pub mean_turns: f64,
    /// New conversations per second.
    pub arrivals_per_second: f64,
    /// Median think time between turns, seconds (log-normal).
    pub median_think_seconds: f64,
    /// Spread of the think time (sigma of its logarithm).
    pub think_sigma: f64,
    /// Share of turns that edit an earlier message instead of appending.
    pub branch_share: f64,
    /// Seed of the generator.
    pub seed: u64,
}

impl Default for ChatWorkload {
    fn default() -> Self {
        ChatWorkload {
            requests: 20_000,
            system_prompts: 8,
            mean_turns: 2.5,
            arrivals_per_second: 2.0,
            median_think_seconds: 90.0,
            think_sigma: 1.2,
            branch_share: 0.1,
            seed: 7,
        }
    }
}

struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn normal(&mut self) -> f64 {
        // Box-Muller.
        let u = self.unit().max(1e-12);
        let v = self.unit();
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }

    fn exponential(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.unit()).ln()
    }

    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}

struct Conversation {
    /// Full blocks of the conversation so far (system prompt included).
    blocks: Vec<u64>,
    /// Tokens in the partial last block.
    tail_tokens: u64,
    turns_left: u32,
}

impl ChatWorkload {
    /// Generates the workload.
    pub fn generate(&self) -> Trace {
        let mut rng = Rng(self.seed);
        let mut next_id = 0u64;
        let mut fresh = |n: u64| -> Vec<u64> {
            let ids = (next_id..next_id + n).collect();
            next_id += n;
            ids
        };
        let systems: Vec<Vec<u64>> = (0..self.system_prompts.max(1))
            .map(|_| fresh(rng.range(1, 6)))
            .collect();
        let mut conversations: Vec<Conversation> = Vec::new();
        // (time in ms, conversation index; usize::MAX = a new conversation)
        let mut events = BinaryHeap::new();
        events.push(Reverse((0u64, usize::MAX)));
        let mut requests = Vec::with_capacity(self.requests);
        let continue_p = 1.0 - 1.0 / self.mean_turns.max(1.0);
        while requests.len() < self.requests {
            let Some(Reverse((now, which))) = events.pop() else {
                break;
            };
            let index = if which == usize::MAX {
                let gap = rng.exponential(1000.0 / self.arrivals_per_second);
                events.push(Reverse((now + gap as u64, usize::MAX)));
                // Zipf-like choice: prompt k with weight 1/(k+1).
                let weights: f64 = (0..systems.len()).map(|k| 1.0 / (k as f64 + 1.0)).sum();
                let mut pick = rng.unit() * weights;
                let mut system = 0;
                for k in 0..systems.len() {
                    pick -= 1.0 / (k as f64 + 1.0);
                    if pick <= 0.0 {
                        system = k;
                        break;
                    }
                }
                let mut turns = 1;
                while rng.unit() < continue_p && turns < 64 {
                    turns += 1;
                }
                conversations.push(Conversation {
                    blocks: systems[system].clone(),
                    tail_tokens: 0,
                    turns_left: turns,
                });
                conversations.len() - 1
            } else {
                which
            };
            let conv = &mut conversations[index];
            // Edit an earlier message: cut the history back, then go on.
            if conv.blocks.len() > 8 && rng.unit() < self.branch_share {
                let keep = rng.range(4, conv.blocks.len() as u64 - 1) as usize;
                conv.blocks.truncate(keep);
                conv.tail_tokens = 0;
            }
            // The new user message (and the previous answer) extend the tail.
            let added = rng.range(50, 3000);
            let total = conv.tail_tokens + added;
            conv.blocks.extend(fresh(total / BLOCK_TOKENS));
            conv.tail_tokens = total % BLOCK_TOKENS;
            let mut hash_ids = conv.blocks.clone();
            let mut input_length = hash_ids.len() as u64 * BLOCK_TOKENS;
            if conv.tail_tokens > 0 {
                // The partial tail is rehashed every turn: a fresh id.
                hash_ids.extend(fresh(1));
                input_length += conv.tail_tokens;
            }
            let output_length = rng.range(20, 800);
            requests.push(TraceRequest {
                timestamp: now,
                input_length,
                output_length,
                hash_ids,
            });
            // The answer joins the history before the next message.
            let answered = conv.tail_tokens + output_length;
            conv.blocks.extend(fresh(answered / BLOCK_TOKENS));
            conv.tail_tokens = answered % BLOCK_TOKENS;
            conv.turns_left -= 1;
            if conv.turns_left > 0 {
                let think = self.median_think_seconds * (self.think_sigma * rng.normal()).exp();
                events.push(Reverse((now + (think * 1000.0) as u64, index)));
            }
        }
        Trace { requests }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_chained_multi_turn_requests() {
        let w = ChatWorkload {
            requests: 500,
            ..ChatWorkload::default()
        };
        let t = w.generate();
        assert_eq!(t.requests.len(), 500);
        assert!(t
            .requests
            .windows(2)
            .all(|p| p[0].timestamp <= p[1].timestamp));
        for r in &t.requests {
            assert_eq!(
                r.hash_ids.len() as u64,
                r.input_length.div_ceil(BLOCK_TOKENS)
            );
        }
        // Blocks are shared across requests (prefixes), but not all of them.
        let unique = t.unique_blocks();
        let accesses = t.accesses().len();
        assert!(
            unique < accesses && unique * 4 > accesses,
            "{unique} of {accesses}"
        );
        // Deterministic for a seed.
        assert_eq!(w.generate(), t);
    }
}
