//! `qvl-bench gc`: peak reserved memory of a caching allocator on a mix of
//! requests of varied length, with collection off, on a fixed interval and
//! adaptive (qvl-gc), against the offline optimum.
//!
//! The trace is what `qvl_model::TextDecoder::forward` allocates, derived
//! from the Qwen3-VL-2B text config (hidden 2048, 16 heads, 8 KV heads,
//! head_dim 128, intermediate 6144, vocab 151936, 28 layers, f32
//! activations as the model computes them): per forward the hidden state
//! and rope tables, per layer the normed input, q/k/v, attention output,
//! o_proj, the second norm, MLP gate/up/down (each projection of more than
//! one row also allocates its transposed output and frees it), the final
//! norm row and the logits; KV blocks of 16 tokens (all layers, keys and
//! values, f32: the model's `KvLayout`) as the context grows, freed when the
//! request ends. Requests of varied prompt and output length run three at a
//! time (continuous batching, one sequence per forward), so lifetimes
//! interleave as in a server.
//!
//! Replay: every allocation comes from `qvl_gc::CachingAllocator` (size
//! classes, freed buffers kept for reuse, as a pool does) and is filled
//! completely, as a kernel writes its output; so fresh pages after a release
//! cost their page faults, and the time is a lower bound of a forward's
//! work (the real one also reads the weights), which makes the throughput
//! criterion strict. Modes: off (nothing is ever released), fixed (qvl-gc,
//! `adaptive_enabled = false`, everything cached released every 10 ms),
//! adaptive (qvl-gc defaults: the tensor registry tracks every tensor of
//! 64 KiB and more, the forecast keeps recurring sizes, the pressure hook
//! collects before a miss would pass 1.03 x the highest live so far). Modes run round-robin;
//! the throughput criterion uses each mode's median pass.
//!
//! The optimum: the peak of live bytes of the trace (no allocator can hold
//! less), and the arena size of the greedy-by-size offset plan (as TFLite
//! plans a graph's activations) computed offline on the whole trace.

use crate::BenchOptions;
use anyhow::{Context, Result};
use qvl_core::bench::{BenchReport, Criterion};
use qvl_core::{
    AllocRequest, BufferAllocator, DType, LifetimeTracker, TensorId, TensorKind, TensorMeta,
    UseSite,
};
use qvl_gc::{CachedBuffer, CachingAllocator, Collector, GcConfig, TensorRegistry};
use qvl_model::kv::{KvLayout, DEFAULT_BLOCK_TOKENS};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

const HIDDEN: usize = 2048;
const HEADS: usize = 16;
const KV_HEADS: usize = 8;
const HEAD_DIM: usize = 128;
const INTERMEDIATE: usize = 6144;
const VOCAB: usize = 151_936;
const LAYERS: usize = 28;
const F32: usize = 4;
const CONCURRENT: usize = 3;

#[derive(Debug, Clone, Copy)]
enum Op {
    Alloc {
        slot: u32,
        bytes: usize,
        kind: TensorKind,
        site: UseSite,
    },
    Free {
        slot: u32,
    },
}

#[derive(Default)]
struct Trace {
    ops: Vec<Op>,
    next_slot: u32,
    tokens: u64,
}

impl Trace {
    fn alloc(
        &mut self,
        bytes: usize,
        kind: TensorKind,
        layer: Option<u32>,
        op: &'static str,
    ) -> u32 {
        let slot = self.next_slot;
        self.next_slot += 1;
        self.ops.push(Op::Alloc {
            slot,
            bytes,
            kind,
            site: UseSite { layer, op },
        });
        slot
    }

    fn free(&mut self, slot: u32) {
        self.ops.push(Op::Free { slot });
    }

    /// A projection of `rows` rows to `width` outputs: the transposed
    /// result, then (for more than one row) the row-major copy.
    fn linear(&mut self, rows: usize, width: usize, layer: u32, op: &'static str) -> u32 {
        let bytes = rows * width * F32;
        let t = self.alloc(bytes, TensorKind::Activation, Some(layer), op);
        if rows == 1 {
            return t;
        }
        let out = self.alloc(bytes, TensorKind::Activation, Some(layer), op);
        self.free(t);
        out
    }

    /// One forward of `n` tokens of a request whose cache holds `blocks`.
    fn forward(&mut self, n: usize, context: usize, blocks: &mut Vec<u32>, block_bytes: usize) {
        let act = TensorKind::Activation;
        let hidden = self.alloc(n * HIDDEN * F32, act, None, "embed");
        let cos = self.alloc(
            n * HEAD_DIM / 2 * F32,
            TensorKind::Workspace,
            None,
            "rope.cos",
        );
        let sin = self.alloc(
            n * HEAD_DIM / 2 * F32,
            TensorKind::Workspace,
            None,
            "rope.sin",
        );
        while blocks.len() * DEFAULT_BLOCK_TOKENS < context + n {
            let b = self.alloc(block_bytes, TensorKind::KvCache, None, "kv.block");
            blocks.push(b);
        }
        for l in 0..LAYERS as u32 {
            let x = self.alloc(n * HIDDEN * F32, act, Some(l), "attn.norm");
            let q = self.linear(n, HEADS * HEAD_DIM, l, "attn.q");
            let k = self.linear(n, KV_HEADS * HEAD_DIM, l, "attn.k");
            let v = self.linear(n, KV_HEADS * HEAD_DIM, l, "attn.v");
            let attn = self.alloc(n * HEADS * HEAD_DIM * F32, act, Some(l), "attn.out");
            let o = self.linear(n, HIDDEN, l, "attn.o");
            let x2 = self.alloc(n * HIDDEN * F32, act, Some(l), "mlp.norm");
            let gate = self.linear(n, INTERMEDIATE, l, "mlp.gate");
            let up = self.linear(n, INTERMEDIATE, l, "mlp.up");
            let down = self.linear(n, HIDDEN, l, "mlp.down");
            // Rust drops a scope's locals in reverse order.
            for s in [down, up, gate, x2, o, attn, v, k, q, x] {
                self.free(s);
            }
        }
        let last = if n > 1 {
            let last = self.alloc(HIDDEN * F32, act, None, "final.norm");
            self.free(hidden);
            last
        } else {
            hidden
        };
        let logits = self.alloc(VOCAB * F32, act, None, "lm_head");
        self.free(last);
        self.free(sin);
        self.free(cos);
        self.free(logits);
        self.tokens += n as u64;
    }
}

/// xorshift64*: deterministic request mix.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

struct Request {
    prompt: usize,
    output: usize,
    done: usize,
    blocks: Vec<u32>,
}

/// `requests` requests, prompts of `min_prompt..=max_prompt` tokens and
/// outputs of `min_out..=max_out`, `CONCURRENT` at a time.
fn build_trace(requests: usize, prompt: (usize, usize), output: (usize, usize)) -> Trace {
    let layout = KvLayout {
        layers: LAYERS,
        kv_heads: KV_HEADS,
        head_dim: HEAD_DIM,
        block_tokens: DEFAULT_BLOCK_TOKENS,
    };
    let block_bytes = layout.block_floats() * F32;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut t = Trace::default();
    let mut waiting: Vec<Request> = (0..requests)
        .map(|_| Request {
            prompt: prompt.0 + rng.below((prompt.1 - prompt.0 + 1) as u64) as usize,
            output: output.0 + rng.below((output.1 - output.0 + 1) as u64) as usize,
            done: 0,
            blocks: Vec::new(),
        })
        .rev()
        .collect();
    let mut running: Vec<Request> = Vec::new();
    while !waiting.is_empty() || !running.is_empty() {
        while running.len() < CONCURRENT {
            let Some(mut r) = waiting.pop() else { break };
            t.forward(r.prompt, 0, &mut r.blocks, block_bytes);
            running.push(r);
        }
        for r in running.iter_mut() {
            let context = r.prompt + r.done;
            t.forward(1, context, &mut r.blocks, block_bytes);
            r.done += 1;
        }
        running.retain_mut(|r| {
            if r.done < r.output {
                return true;
            }
            for &b in r.blocks.iter().rev() {
                t.ops.push(Op::Free { slot: b });
            }
            false
        });
    }
    t
}

/// Live intervals [start, end) in op indices, and sizes.
fn intervals(trace: &Trace) -> Vec<(usize, usize, usize)> {
    let mut iv = vec![(0usize, usize::MAX, 0usize); trace.next_slot as usize];
    for (i, op) in trace.ops.iter().enumerate() {
        match *op {
            Op::Alloc { slot, bytes, .. } => iv[slot as usize] = (i, trace.ops.len(), bytes),
            Op::Free { slot } => iv[slot as usize].1 = i,
        }
    }
    iv
}

fn peak_live(trace: &Trace) -> u64 {
    let iv = intervals(trace);
    let (mut live, mut peak) = (0u64, 0u64);
    for op in &trace.ops {
        match *op {
            Op::Alloc { bytes, .. } => {
                live += bytes as u64;
                peak = peak.max(live);
            }
            Op::Free { slot } => live -= iv[slot as usize].2 as u64,
        }
    }
    peak
}

/// Greedy-by-size offset plan (TFLite's arena planner, Pisarchyk and Lee
/// 2020): tensors by decreasing size, each into the smallest gap between
/// the already placed tensors that overlap it in time, else above them.
/// Returns the arena size.
fn greedy_by_size_arena(trace: &Trace) -> u64 {
    const BUCKET: usize = 512;
    let iv = intervals(trace);
    let mut order: Vec<usize> = (0..iv.len()).collect();
    order.sort_by(|&a, &b| iv[b].2.cmp(&iv[a].2).then(iv[a].0.cmp(&iv[b].0)));
    let buckets = trace.ops.len() / BUCKET + 1;
    let mut index: Vec<Vec<u32>> = vec![Vec::new(); buckets];
    let mut offset = vec![0u64; iv.len()];
    let mut seen = vec![u32::MAX; iv.len()];
    let mut arena = 0u64;
    let mut around: Vec<(u64, u64)> = Vec::new();
    for (q, &t) in order.iter().enumerate() {
        let (s, e, size) = iv[t];
        let size = size as u64;
        around.clear();
        for bucket in &index[s / BUCKET..=(e.saturating_sub(1)) / BUCKET] {
            for &o in bucket {
                let o = o as usize;
                if seen[o] == q as u32 {
                    continue;
                }
                seen[o] = q as u32;
                let (os, oe, osize) = iv[o];
                if os < e && s < oe {
                    around.push((offset[o], offset[o] + osize as u64));
                }
            }
        }
        around.sort_unstable();
        let (mut best, mut best_gap, mut prev_end) = (None, u64::MAX, 0u64);
        for &(start, end) in &around {
            if start > prev_end {
                let gap = start - prev_end;
                if gap >= size && gap < best_gap {
                    best = Some(prev_end);
                    best_gap = gap;
                }
            }
            prev_end = prev_end.max(end);
        }
        let at = best.unwrap_or(prev_end);
        offset[t] = at;
        arena = arena.max(at + size);
        for bucket in &mut index[s / BUCKET..=(e.saturating_sub(1)) / BUCKET] {
            bucket.push(t as u32);
        }
    }
    arena
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Off,
    Fixed,
    Adaptive,
}

#[derive(Debug, Clone, Copy, Default)]
struct Pass {
    seconds: f64,
    peak_reserved: u64,
    peak_allocated: u64,
    gc_seconds: f64,
    collections: u64,
    pressure_collections: u64,
    released: u64,
    os_allocs: u64,
}

fn replay(trace: &Trace, mode: Mode) -> Result<Pass> {
    let pool = Arc::new(CachingAllocator::new());
    let config = match mode {
        Mode::Off => None,
        Mode::Fixed => Some(GcConfig {
            adaptive_enabled: false,
            collection_interval: Duration::from_millis(10),
            ..GcConfig::default()
        }),
        Mode::Adaptive => Some(GcConfig::default()),
    };
    let registry = Arc::new(TensorRegistry::new(&config.clone().unwrap_or_default()));
    let gc = match config {
        Some(c) => {
            let gc = Collector::new(c, registry.clone()).context("gc config")?;
            gc.register(pool.clone());
            pool.set_pressure_hook(Some(gc.pressure_hook()));
            Some(gc)
        }
        None => None,
    };
    let mut slots: Vec<Option<CachedBuffer>> = Vec::new();
    slots.resize_with(trace.next_slot as usize, || None);
    let start = Instant::now();
    for op in &trace.ops {
        match *op {
            Op::Alloc {
                slot,
                bytes,
                kind,
                site,
            } => {
                let mut buf = pool
                    .allocate(&AllocRequest::bytes(bytes, kind))
                    .with_context(|| format!("allocating {bytes} bytes"))?;
                buf.as_mut().fill(slot as u8);
                if let Some(gc) = &gc {
                    let meta = TensorMeta::new(vec![bytes], DType::U8, kind);
                    registry.on_create(TensorId(slot as u64), &meta, site);
                    gc.poll();
                }
                slots[slot as usize] = Some(buf);
            }
            Op::Free { slot } => {
                slots[slot as usize] = None;
                if gc.is_some() {
                    registry.on_free(TensorId(slot as u64));
                }
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let s = pool.stats();
    let g = gc.as_ref().map(|g| g.stats()).unwrap_or_default();
    Ok(Pass {
        seconds,
        peak_reserved: s.peak_reserved_bytes,
        peak_allocated: s.peak_allocated_bytes,
        gc_seconds: g.gc_time_ns as f64 / 1e9,
        collections: g.collections,
        pressure_collections: g.pressure_collections,
        released: g.released_bytes,
        os_allocs: s.os_alloc_count,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// Runs the benchmark.
pub fn run(opts: &BenchOptions) -> Result<BenchReport> {
    let (requests, prompt, output, reps) = if opts.quick {
        (12, (16, 320), (8, 24), 3)
    } else {
        (30, (16, 768), (16, 64), 3)
    };
    let trace = build_trace(requests, prompt, output);
    let optimum = peak_live(&trace);
    let plan_start = Instant::now();
    let arena = greedy_by_size_arena(&trace);
    let plan_seconds = plan_start.elapsed().as_secs_f64();
    let modes = [Mode::Off, Mode::Fixed, Mode::Adaptive];
    let mut passes: Vec<Vec<Pass>> = vec![Vec::new(); modes.len()];
    for _ in 0..reps {
        for (i, &m) in modes.iter().enumerate() {
            passes[i].push(replay(&trace, m)?);
        }
    }
    let summary: Vec<(Pass, f64)> = passes
        .iter()
        .map(|ps| {
            let secs = median(ps.iter().map(|p| p.seconds).collect());
            let worst_reserved = ps.iter().map(|p| p.peak_reserved).max().unwrap_or(0);
            let p = Pass {
                seconds: secs,
                peak_reserved: worst_reserved,
                gc_seconds: median(ps.iter().map(|p| p.gc_seconds).collect()),
                ..ps[ps.len() / 2]
            };
            (p, trace.tokens as f64 / secs)
        })
        .collect();
    let (off, fixed, adaptive) = (summary[0], summary[1], summary[2]);
    let mut report = BenchReport::new("gc");
    report.criteria.push(Criterion::lower_is_better(
        "adaptive peak reserved vs the optimum (peak live); within 5%",
        "bytes",
        adaptive.0.peak_reserved as f64,
        optimum as f64,
        1.0 / 1.05,
    ));
    report.criteria.push(Criterion::lower_is_better(
        "adaptive peak reserved vs collection off; at least 15% lower",
        "bytes",
        adaptive.0.peak_reserved as f64,
        off.0.peak_reserved as f64,
        1.0 / 0.85,
    ));
    report.criteria.push(Criterion::higher_is_better(
        "adaptive throughput vs collection off; within 3%",
        "tokens/s",
        adaptive.1,
        off.1,
        0.97,
    ));
    let row = |name: &str, (p, tps): (Pass, f64)| {
        json!({
            "mode": name,
            "peak_reserved_mib": mib(p.peak_reserved),
            "peak_allocated_mib": mib(p.peak_allocated),
            "reserved_over_optimum": p.peak_reserved as f64 / optimum as f64,
            "seconds_median": p.seconds,
            "tokens_per_s": tps,
            "gc_seconds": p.gc_seconds,
            "gc_share": p.gc_seconds / p.seconds,
            "collections": p.collections,
            "pressure_collections": p.pressure_collections,
            "released_mib": mib(p.released),
            "os_allocs": p.os_allocs,
        })
    };
    let allocs = trace
        .ops
        .iter()
        .filter(|o| matches!(o, Op::Alloc { .. }))
        .count();
    report.details = json!({
        "workload": {
            "model": "Qwen3-VL-2B text widths, 28 layers, f32 activations, KV blocks of 16 tokens",
            "requests": requests,
            "prompt_tokens": [prompt.0, prompt.1],
            "output_tokens": [output.0, output.1],
            "concurrent": CONCURRENT,
            "tokens": trace.tokens,
            "allocations": allocs,
            "passes_per_mode": reps,
        },
        "optimum": {
            "peak_live_mib": mib(optimum),
            "greedy_by_size_arena_mib": mib(arena),
            "greedy_over_peak_live": arena as f64 / optimum as f64,
            "plan_seconds": plan_seconds,
        },
        "modes": [row("off", off), row("fixed_10ms", fixed), row("adaptive", adaptive)],
        "note": "peak reserved is the worst pass; times are medians; every buffer is filled as a kernel writes its output",
    });
    Ok(report)
}
