//! `qvl-bench pool`: qvl-pool against glibc malloc and mimalloc on the
//! allocation stream of Qwen3-VL-2B inference.
//!
//! The stream is derived from the decoder's forward pass (hidden 2048, 16
//! heads, 8 KV heads, head_dim 128, intermediate 6144, vocab 151936, 28
//! layers): per layer the activations of a prefill of N tokens and of each
//! decode step (norms, q/k/v, q/k after norm and rope, attention scores,
//! attention output, o_proj, residuals, MLP gate/up/act/down), the logits and
//! sampling buffers, and 64 KiB KV blocks (16 tokens x 8 KV heads x 128 x
//! k,v x f16) allocated per layer as each context grows and freed when its
//! request ends. Requests of varied prompt and output length run two at a
//! time (continuous batching), so lifetimes interleave as in a server.
//!
//! Method: every allocator replays the same stream; after each allocation one
//! byte per 4 KiB page is written (volatile), so the OS cost of fresh pages
//! counts for every allocator, as it would for a kernel filling the tensor.
//! Passes run round-robin (glibc, mimalloc, qvl-pool, ...) in one process;
//! the criterion uses the median pass. Alignment is 64 bytes for all (what
//! tensors need; glibc serves it through its memalign path, so a plain
//! 16-byte malloc run is reported beside it). p50/p99 come from a separate
//! pass timing each call with `Instant` (clock overhead included, the same
//! for all). Peak live bytes are the requested bytes of the stream; the
//! pool's peak reserved comes from its own counters.

use crate::BenchOptions;
use anyhow::{Context, Result};
use qvl_core::bench::{BenchReport, Criterion};
use qvl_core::{AllocRequest, BufferAllocator, ByteSize, DType, TensorKind, TensorMeta};
use qvl_pool::{HostPool, PoolBuffer, PoolConfig, SpecializedPoolConfig};
use serde_json::json;
use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::ptr::NonNull;
use std::time::{Duration, Instant};

const HIDDEN: usize = 2048;
const HEADS: usize = 16;
const KV_HEADS: usize = 8;
const HEAD_DIM: usize = 128;
const INTERMEDIATE: usize = 6144;
const VOCAB: usize = 151_936;
const LAYERS: usize = 28;
/// bf16 activations.
const ACT: usize = 2;
const BLOCK_TOKENS: usize = 16;
const ALIGN: usize = 64;
const PAGE: usize = 4096;

fn kv_block_meta() -> TensorMeta {
    TensorMeta::new(
        vec![2, BLOCK_TOKENS, KV_HEADS, HEAD_DIM],
        DType::F16,
        TensorKind::KvCache,
    )
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Alloc {
        slot: u32,
        bytes: usize,
        kind: TensorKind,
    },
    Free {
        slot: u32,
    },
}

/// The allocation stream, with slots reused so that the replay table stays small.
#[derive(Default)]
struct Trace {
    ops: Vec<Op>,
    spare: Vec<u32>,
    slots: u32,
    live: usize,
    peak_live: usize,
    sizes: Vec<usize>,
    allocs: usize,
    bytes_total: usize,
}

impl Trace {
    fn alloc(&mut self, bytes: usize, kind: TensorKind) -> u32 {
        let slot = self.spare.pop().unwrap_or_else(|| {
            self.slots += 1;
            self.sizes.push(0);
            self.slots - 1
        });
        self.sizes[slot as usize] = bytes;
        self.live += bytes;
        self.peak_live = self.peak_live.max(self.live);
        self.allocs += 1;
        self.bytes_total += bytes;
        self.ops.push(Op::Alloc { slot, bytes, kind });
        slot
    }

    fn free(&mut self, slot: u32) {
        self.live -= self.sizes[slot as usize];
        self.spare.push(slot);
        self.ops.push(Op::Free { slot });
    }

    fn act(&mut self, bytes: usize) -> u32 {
        self.alloc(bytes, TensorKind::Activation)
    }

    /// One forward pass over `n` new tokens whose context ends at `ctx`
    /// tokens; grows `kv` (per-layer block lists) to cover the context.
    fn forward(&mut self, n: usize, ctx: usize, kv: &mut [Vec<u32>]) {
        let ids = self.act(n * 4);
        let mut hidden = self.act(n * HIDDEN * ACT);
        self.free(ids);
        let q_bytes = n * HEADS * HEAD_DIM * ACT;
        let kv_bytes = n * KV_HEADS * HEAD_DIM * ACT;
        for blocks in kv.iter_mut() {
            let xn = self.act(n * HIDDEN * ACT);
            let q = self.act(q_bytes);
            let k = self.act(kv_bytes);
            let v = self.act(kv_bytes);
            let qn = self.act(q_bytes);
            self.free(q);
            let kn = self.act(kv_bytes);
            self.free(k);
            while blocks.len() * BLOCK_TOKENS < ctx {
                let block = self.alloc(kv_block_meta().byte_len(), TensorKind::KvCache);
                blocks.push(block);
            }
            self.free(kn);
            self.free(v);
            // Prefill: one head's score tile at a time; decode: all heads.
            let scores = if n > 1 { n * ctx * 4 } else { HEADS * ctx * 4 };
            let scores = self.alloc(scores, TensorKind::Workspace);
            let attn = self.act(n * HIDDEN * ACT);
            self.free(scores);
            self.free(qn);
            self.free(xn);
            let o = self.act(n * HIDDEN * ACT);
            self.free(attn);
            let h = self.act(n * HIDDEN * ACT);
            self.free(hidden);
            self.free(o);
            hidden = h;
            let pn = self.act(n * HIDDEN * ACT);
            let gate = self.act(n * INTERMEDIATE * ACT);
            let up = self.act(n * INTERMEDIATE * ACT);
            let a = self.act(n * INTERMEDIATE * ACT);
            self.free(gate);
            self.free(up);
            let down = self.act(n * HIDDEN * ACT);
            self.free(a);
            self.free(pn);
            let h = self.act(n * HIDDEN * ACT);
            self.free(hidden);
            self.free(down);
            hidden = h;
        }
        // Final norm and logits for the last token only, then sampling.
        let last = self.act(HIDDEN * ACT);
        self.free(hidden);
        let logits = self.act(VOCAB * 4);
        let probs = self.alloc(VOCAB * 4, TensorKind::Workspace);
        self.free(logits);
        self.free(last);
        self.free(probs);
    }

    /// Requests `(prompt, output)` served two at a time.
    fn serve(requests: &[(usize, usize)]) -> Trace {
        struct Active {
            ctx: usize,
            left: usize,
            kv: Vec<Vec<u32>>,
        }
        let mut t = Trace::default();
        let mut pending = requests.iter().copied();
        let mut active: Vec<Active> = Vec::new();
        loop {
            while active.len() < 2 {
                let Some((prompt, output)) = pending.next() else {
                    break;
                };
                let mut kv = vec![Vec::new(); LAYERS];
                t.forward(prompt, prompt, &mut kv);
                active.push(Active {
                    ctx: prompt,
                    left: output,
                    kv,
                });
            }
            if active.is_empty() {
                break;
            }
            for a in &mut active {
                a.ctx += 1;
                a.left -= 1;
                t.forward(1, a.ctx, &mut a.kv);
            }
            let mut i = 0;
            while i < active.len() {
                if active[i].left == 0 {
                    let done = active.swap_remove(i);
                    for block in done.kv.into_iter().flatten() {
                        t.free(block);
                    }
                } else {
                    i += 1;
                }
            }
        }
        t
    }
}

/// An allocator under test.
trait Subject {
    type Buf;
    fn name(&self) -> &'static str;
    fn alloc(&self, bytes: usize, kind: TensorKind) -> Result<Self::Buf>;
    fn ptr(buf: &mut Self::Buf) -> *mut u8;
    fn free(&self, buf: Self::Buf);
}

/// A `GlobalAlloc` (glibc through `System`, or mimalloc) at a fixed alignment.
struct Raw<A: GlobalAlloc> {
    name: &'static str,
    alloc: A,
    align: usize,
}

impl<A: GlobalAlloc> Subject for Raw<A> {
    type Buf = (NonNull<u8>, Layout);
    fn name(&self) -> &'static str {
        self.name
    }
    fn alloc(&self, bytes: usize, _kind: TensorKind) -> Result<Self::Buf> {
        let layout = Layout::from_size_align(bytes.max(1), self.align)?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { self.alloc.alloc(layout) };
        let ptr =
            NonNull::new(ptr).with_context(|| format!("{} failed for {bytes} B", self.name))?;
        Ok((ptr, layout))
    }
    fn ptr(buf: &mut Self::Buf) -> *mut u8 {
        buf.0.as_ptr()
    }
    fn free(&self, (ptr, layout): Self::Buf) {
        // SAFETY: `ptr` came from this allocator's `alloc` with `layout`,
        // and each buffer is freed once.
        unsafe { self.alloc.dealloc(ptr.as_ptr(), layout) }
    }
}

struct Pool {
    name: &'static str,
    pool: HostPool,
}

impl Subject for Pool {
    type Buf = PoolBuffer;
    fn name(&self) -> &'static str {
        self.name
    }
    fn alloc(&self, bytes: usize, kind: TensorKind) -> Result<PoolBuffer> {
        let request = if kind == TensorKind::KvCache {
            AllocRequest::tensor(kv_block_meta())
        } else {
            AllocRequest::bytes(bytes, kind)
        };
        Ok(self.pool.allocate(&request)?)
    }
    fn ptr(buf: &mut PoolBuffer) -> *mut u8 {
        buf.as_mut_ptr()
    }
    fn free(&self, buf: PoolBuffer) {
        drop(buf);
    }
}

/// Writes one byte per page (and the last byte) as a kernel filling the
/// tensor would first do.
fn touch(ptr: *mut u8, bytes: usize) {
    let mut offset = 0;
    while offset < bytes {
        // SAFETY: `offset < bytes` and the buffer holds at least `bytes` bytes.
        unsafe { ptr.add(offset).write_volatile(1) };
        offset += PAGE;
    }
    if bytes > 0 {
        // SAFETY: as above, the last byte of the buffer.
        unsafe { ptr.add(bytes - 1).write_volatile(1) };
    }
}

/// Replays the trace once; returns its duration.
fn replay<S: Subject>(
    subject: &S,
    trace: &Trace,
    table: &mut Vec<Option<S::Buf>>,
    do_touch: bool,
) -> Result<Duration> {
    table.clear();
    table.resize_with(trace.slots as usize, || None);
    let start = Instant::now();
    for op in &trace.ops {
        match *op {
            Op::Alloc { slot, bytes, kind } => {
                let mut buf = subject.alloc(bytes, kind)?;
                if do_touch {
                    touch(S::ptr(&mut buf), bytes);
                }
                table[slot as usize] = Some(buf);
            }
            Op::Free { slot } => {
                if let Some(buf) = table[slot as usize].take() {
                    subject.free(buf);
                }
            }
        }
    }
    Ok(start.elapsed())
}

/// Replays the trace timing each call: alloc+free latency per buffer, in ns.
fn replay_latencies<S: Subject>(subject: &S, trace: &Trace) -> Result<Vec<u64>> {
    let mut table: Vec<Option<(S::Buf, u64)>> = Vec::new();
    table.resize_with(trace.slots as usize, || None);
    let mut out = Vec::with_capacity(trace.allocs);
    for op in &trace.ops {
        match *op {
            Op::Alloc { slot, bytes, kind } => {
                let t = Instant::now();
                let mut buf = subject.alloc(bytes, kind)?;
                let ns = t.elapsed().as_nanos() as u64;
                touch(S::ptr(&mut buf), bytes);
                table[slot as usize] = Some((buf, ns));
            }
            Op::Free { slot } => {
                if let Some((buf, alloc_ns)) = table[slot as usize].take() {
                    let t = Instant::now();
                    subject.free(buf);
                    out.push(alloc_ns + t.elapsed().as_nanos() as u64);
                }
            }
        }
    }
    out.sort_unstable();
    Ok(out)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Timings {
    touched: Vec<f64>,
    untouched: Vec<f64>,
}

/// Runs a round of the subject: one touched and one untouched pass.
fn round<S: Subject>(s: &S, trace: &Trace, t: &mut Timings) -> Result<()> {
    let mut table = Vec::new();
    let per_op = |d: Duration| d.as_nanos() as f64 / trace.allocs as f64;
    t.touched.push(per_op(replay(s, trace, &mut table, true)?));
    t.untouched
        .push(per_op(replay(s, trace, &mut table, false)?));
    Ok(())
}

fn pool_config(kv_slab: bool) -> PoolConfig {
    let mut specialized = BTreeMap::new();
    if kv_slab {
        specialized.insert(
            "kv_cache".to_string(),
            SpecializedPoolConfig::for_tensor(&kv_block_meta(), 0),
        );
    }
    PoolConfig {
        enabled: true,
        max_pool_size: ByteSize::gib(16),
        specialized_pools: specialized,
    }
}

/// Runs the benchmark.
pub fn run(opts: &BenchOptions) -> Result<BenchReport> {
    let requests: Vec<(usize, usize)> = if opts.quick {
        vec![(300, 24), (1024, 16), (96, 40), (640, 20), (180, 12)]
    } else {
        vec![
            (512, 96),
            (2048, 64),
            (128, 160),
            (1536, 48),
            (300, 128),
            (4096, 32),
            (64, 200),
            (900, 80),
            (2500, 40),
            (200, 120),
        ]
    };
    let rounds = 3;
    let trace = Trace::serve(&requests);

    let glibc = Raw {
        name: "glibc malloc",
        alloc: System,
        align: ALIGN,
    };
    let glibc16 = Raw {
        name: "glibc malloc (16-byte align)",
        alloc: System,
        align: 16,
    };
    let mimalloc = Raw {
        name: "mimalloc",
        alloc: mimalloc::MiMalloc,
        align: ALIGN,
    };
    let pool = Pool {
        name: "qvl-pool",
        pool: HostPool::new(&pool_config(true))?,
    };
    let pool_no_slab = Pool {
        name: "qvl-pool (no KV slab)",
        pool: HostPool::new(&pool_config(false))?,
    };

    let new_timings = || Timings {
        touched: Vec::new(),
        untouched: Vec::new(),
    };
    let (mut t_glibc, mut t_glibc16, mut t_mi, mut t_pool, mut t_pool_ns) = (
        new_timings(),
        new_timings(),
        new_timings(),
        new_timings(),
        new_timings(),
    );
    for _ in 0..rounds {
        round(&glibc, &trace, &mut t_glibc)?;
        round(&mimalloc, &trace, &mut t_mi)?;
        round(&pool, &trace, &mut t_pool)?;
        round(&glibc16, &trace, &mut t_glibc16)?;
        round(&pool_no_slab, &trace, &mut t_pool_ns)?;
    }
    let lat_glibc = replay_latencies(&glibc, &trace)?;
    let lat_mi = replay_latencies(&mimalloc, &trace)?;
    let lat_pool = replay_latencies(&pool, &trace)?;

    let pool_stats = pool.pool.stats();
    let pool_ns_stats = pool_no_slab.pool.stats();
    let peak_live = trace.peak_live as f64;
    let mib = |b: f64| b / (1u64 << 20) as f64;

    let med = |t: &Timings| (median(t.touched.clone()), median(t.untouched.clone()));
    let (glibc_ns, glibc_raw) = med(&t_glibc);
    let (mi_ns, mi_raw) = med(&t_mi);
    let (pool_ns, pool_raw) = med(&t_pool);

    let mut report = BenchReport::new("pool");
    report.criteria.push(Criterion::lower_is_better(
        "alloc+touch+free time, qvl-pool vs glibc malloc (target: 20% lower)",
        "ns/alloc",
        pool_ns,
        glibc_ns,
        1.25,
    ));
    report.criteria.push(Criterion::lower_is_better(
        "alloc+touch+free time, qvl-pool vs mimalloc (on par: within 10%)",
        "ns/alloc",
        pool_ns,
        mi_ns,
        0.9,
    ));
    report.criteria.push(Criterion::lower_is_better(
        "peak reserved (value) vs peak live bytes (baseline), at most 1.10x",
        "MiB",
        mib(pool_stats.peak_reserved_bytes as f64),
        mib(peak_live),
        1.0 / 1.10,
    ));

    let timing = |name: &str, t: &Timings, lat: Option<&[u64]>| {
        let mut v = json!({
            "allocator": name,
            "touched_ns_per_alloc_median": median(t.touched.clone()),
            "touched_ns_per_alloc_first_pass": t.touched[0],
            "touched_ns_per_alloc_all": t.touched,
            "untouched_ns_per_alloc_median": median(t.untouched.clone()),
            "untouched_ns_per_alloc_all": t.untouched,
        });
        if let Some(lat) = lat {
            v["alloc_plus_free_call_ns_p50"] = json!(percentile(lat, 0.5));
            v["alloc_plus_free_call_ns_p99"] = json!(percentile(lat, 0.99));
            v["alloc_plus_free_call_ns_max"] = json!(percentile(lat, 1.0));
        }
        v
    };
    let stats_json = |s: &qvl_core::AllocatorStats| {
        json!({
            "peak_reserved_bytes": s.peak_reserved_bytes,
            "peak_allocated_bytes": s.peak_allocated_bytes,
            "reserved_bytes_at_end": s.reserved_bytes,
            "allocated_bytes_at_end": s.allocated_bytes,
            "alloc_count": s.alloc_count,
            "os_alloc_count": s.os_alloc_count,
            "os_free_count": s.os_free_count,
            "fragmentation_at_end": s.fragmentation(),
            "peak_reserved_over_peak_live": s.peak_reserved_bytes as f64 / peak_live,
            "peak_allocated_over_peak_live": s.peak_allocated_bytes as f64 / peak_live,
        })
    };
    let released = pool.pool.release_cached();
    report.details = json!({
        "method": "replay of a Qwen3-VL-2B-shaped decoder allocation stream; one volatile byte write per 4 KiB page after each allocation; passes round-robin across allocators in one process, median pass reported; 64-byte alignment; p50/p99 from a separate pass timing each alloc and free call with Instant (includes clock overhead)",
        "model": {"hidden": HIDDEN, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                  "intermediate": INTERMEDIATE, "vocab": VOCAB, "layers": LAYERS,
                  "activation_bytes": ACT, "kv_block_bytes": kv_block_meta().byte_len()},
        "requests_prompt_output": requests,
        "concurrent_requests": 2,
        "trace": {"allocs": trace.allocs, "bytes_allocated_total": trace.bytes_total,
                  "peak_live_bytes": trace.peak_live, "rounds": rounds},
        "ratios": {
            "glibc_over_pool_touched": glibc_ns / pool_ns,
            "mimalloc_over_pool_touched": mi_ns / pool_ns,
            "glibc_over_pool_untouched": glibc_raw / pool_raw,
            "mimalloc_over_pool_untouched": mi_raw / pool_raw,
            "pool_peak_reserved_over_peak_live": pool_stats.peak_reserved_bytes as f64 / peak_live,
        },
        "timings": [
            timing(glibc.name(), &t_glibc, Some(&lat_glibc)),
            timing(mimalloc.name(), &t_mi, Some(&lat_mi)),
            timing(pool.name(), &t_pool, Some(&lat_pool)),
            timing(glibc16.name(), &t_glibc16, None),
            timing(pool_no_slab.name(), &t_pool_ns, None),
        ],
        "pool_stats": stats_json(&pool_stats),
        "pool_no_slab_stats": stats_json(&pool_ns_stats),
        "pool_released_at_end_bytes": released,
        "pool_reserved_after_release_bytes": pool.pool.stats().reserved_bytes,
    });
    report.details["gpu"] = gpu_rows(opts, &mut report)?;
    Ok(report)
}

/// The GPU rows: the device pool against `cuMemAlloc`/`cuMemFree` and
/// `cuMemAllocAsync`/`cuMemFreeAsync` on the same allocation stream, and
/// pinned against pageable copy bandwidth with the PCIe bound beside them.
/// Without the `cuda` feature or without a GPU the report says why instead.
fn gpu_rows(opts: &BenchOptions, report: &mut BenchReport) -> Result<serde_json::Value> {
    #[cfg(feature = "cuda")]
    {
        gpu::rows(opts, report)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (opts, report);
        Ok(
            json!({"skipped": "built without --features cuda; `cargo xtask gpu-check` runs the GPU rows"}),
        )
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use qvl_pool::cuda::{
        self, CudaPoolConfig, CudaPoolMode, DeviceBuffer, DevicePool, PinnedPool, Transfer,
    };
    use std::sync::Arc;

    struct Device {
        name: &'static str,
        pool: DevicePool,
    }

    impl Device {
        /// Replays the trace without touching memory (the device's pages are
        /// mapped when the pool commits them; a kernel's first write costs
        /// nothing extra); returns ns per alloc+free.
        fn replay(&self, trace: &Trace, table: &mut Vec<Option<DeviceBuffer>>) -> Result<f64> {
            table.clear();
            table.resize_with(trace.slots as usize, || None);
            let start = Instant::now();
            for op in &trace.ops {
                match *op {
                    Op::Alloc { slot, bytes, kind } => {
                        table[slot as usize] =
                            Some(self.pool.allocate(&AllocRequest::bytes(bytes, kind))?);
                    }
                    Op::Free { slot } => drop(table[slot as usize].take()),
                }
            }
            Ok(start.elapsed().as_nanos() as f64 / trace.allocs as f64)
        }
    }

    pub(super) fn rows(opts: &BenchOptions, report: &mut BenchReport) -> Result<serde_json::Value> {
        let ctx = match cuda::probe(0) {
            Ok(ctx) => ctx,
            Err(e) => {
                println!("bench pool: GPU rows skipped: {e}");
                return Ok(json!({"skipped": e.to_string()}));
            }
        };
        let stream = ctx.new_stream()?;
        // The quick request mix keeps cuMemAlloc's passes to seconds.
        let trace = Trace::serve(&[(300, 24), (1024, 16), (96, 40), (640, 20), (180, 12)]);
        let config = |mode| CudaPoolConfig {
            max_pool_size: ByteSize((trace.peak_live as u64 * 2).max(1 << 30)),
            mode,
        };
        let subjects = [
            ("cuMemAlloc/cuMemFree", CudaPoolMode::Driver),
            ("cuMemAllocAsync/cuMemFreeAsync", CudaPoolMode::DriverAsync),
            ("qvl-pool device pool", CudaPoolMode::Pool),
        ]
        .map(|(name, mode)| -> Result<Device> {
            Ok(Device {
                name,
                pool: DevicePool::new(&ctx, &stream, &config(mode))?,
            })
        });
        let [driver, driver_async, pool] = subjects;
        let (driver, driver_async, pool) = (driver?, driver_async?, pool?);
        let rounds = if opts.quick { 2 } else { 3 };
        let mut table = Vec::new();
        let mut times: [Vec<f64>; 3] = Default::default();
        for _ in 0..rounds {
            for (i, d) in [&driver, &driver_async, &pool].iter().enumerate() {
                times[i].push(d.replay(&trace, &mut table)?);
                stream.synchronize()?;
            }
        }
        let [t_driver, t_async, t_pool] = times.clone().map(median);
        let stats = pool.pool.stats();
        let peak_live = trace.peak_live as f64;
        let mib = |b: f64| b / (1u64 << 20) as f64;
        report.criteria.push(Criterion::lower_is_better(
            "GPU alloc+free per tensor, device pool vs cuMemAlloc/cuMemFree (target: 100x faster)",
            "ns/alloc",
            t_pool,
            t_driver,
            100.0,
        ));
        report.criteria.push(Criterion::lower_is_better(
            "GPU alloc+free per tensor, device pool vs cuMemAllocAsync/cuMemFreeAsync (no slower)",
            "ns/alloc",
            t_pool,
            t_async,
            1.0,
        ));
        report.criteria.push(Criterion::lower_is_better(
            "GPU peak reserved (value) vs peak live bytes (baseline), at most 1.10x",
            "MiB",
            mib(stats.peak_reserved_bytes as f64),
            mib(peak_live),
            1.0 / 1.10,
        ));
        let copies = copy_rows(opts, &ctx, &stream, report)?;
        Ok(json!({
            "device": ctx.name()?,
            "method": "the quick request mix of the host rows, replayed without touching memory; the three allocators round-robin, median pass; the pool's peak reserved counts mapped 2 MiB chunks",
            "trace": {"allocs": trace.allocs, "peak_live_bytes": trace.peak_live},
            "ns_per_alloc_free": {
                driver.name: times[0], driver_async.name: times[1], pool.name: times[2],
            },
            "pool_stats": {
                "peak_reserved_bytes": stats.peak_reserved_bytes,
                "peak_reserved_over_peak_live": stats.peak_reserved_bytes as f64 / peak_live,
                "os_alloc_count": stats.os_alloc_count,
                "released_at_end_bytes": pool.pool.release_cached(),
            },
            "copies": copies,
        }))
    }

    /// Pinned against pageable host memory, both directions, GB/s.
    fn copy_rows(
        opts: &BenchOptions,
        ctx: &Arc<cuda::CudaContext>,
        stream: &Arc<cuda::CudaStream>,
        report: &mut BenchReport,
    ) -> Result<serde_json::Value> {
        let bytes = if opts.quick { 16 << 20 } else { 256 << 20 };
        let reps = if opts.quick { 3 } else { 9 };
        let cfg = CudaPoolConfig {
            max_pool_size: ByteSize((bytes as u64) * 2),
            mode: CudaPoolMode::Pool,
        };
        let device = DevicePool::new(ctx, stream, &cfg)?;
        let pinned = PinnedPool::new(ctx, stream, &cfg)?;
        let req = AllocRequest::bytes(bytes, TensorKind::Activation);
        let mut dev = device.allocate(&req)?;
        let mut host_pinned = pinned.allocate(&req)?;
        host_pinned.fill(3);
        let mut pageable = vec![3u8; bytes];
        let transfer = Transfer::new(Arc::clone(stream));
        let gbps = |d: Duration| bytes as f64 / d.as_secs_f64() / 1e9;
        let mut t: [Vec<f64>; 4] = Default::default();
        for _ in 0..reps {
            let s = Instant::now();
            transfer.to_device(&mut host_pinned, &mut dev)?.wait()?;
            t[0].push(gbps(s.elapsed()));
            let s = Instant::now();
            transfer.to_device_pageable(&pageable, &mut dev)?;
            t[1].push(gbps(s.elapsed()));
            let s = Instant::now();
            transfer.to_host(&mut dev, &mut host_pinned)?.wait()?;
            t[2].push(gbps(s.elapsed()));
            let s = Instant::now();
            transfer.to_host_pageable(&mut dev, &mut pageable)?;
            t[3].push(gbps(s.elapsed()));
        }
        let [h2d_pinned, h2d_pageable, d2h_pinned, d2h_pageable] = t.clone().map(median);
        report.criteria.push(Criterion::higher_is_better(
            "host-to-device copy, pinned pool vs pageable memory",
            "GB/s",
            h2d_pinned,
            h2d_pageable,
            1.0,
        ));
        report.criteria.push(Criterion::higher_is_better(
            "device-to-host copy, pinned pool vs pageable memory",
            "GB/s",
            d2h_pinned,
            d2h_pageable,
            1.0,
        ));
        let link = cuda::pci_link(ctx);
        if let Some(link) = link {
            report.criteria.push(Criterion::higher_is_better(
                "host-to-device pinned copy vs the PCIe link bound (target: 70%)",
                "GB/s",
                h2d_pinned,
                link.bound_gb_per_s(),
                0.7,
            ));
        }
        Ok(json!({
            "bytes_per_copy": bytes, "reps": reps,
            "gb_per_s_runs": {"h2d_pinned": t[0], "h2d_pageable": t[1], "d2h_pinned": t[2], "d2h_pageable": t[3]},
            "pcie_link": link.map(|l| json!({"gt_per_s": l.gt_per_s, "width": l.width, "bound_gb_per_s": l.bound_gb_per_s()})),
        }))
    }
}
