//! `swap`: greedy decode over a long context with the KV cache held to a
//! RAM budget of the full size, 1/2, 1/4 and 1/8 of it (the rest swapped
//! to SSD through `qvl-swap`), against the same decode with the whole KV
//! cache in RAM, in the same run; on a 2B-shaped decoder (random bf16
//! weights) and on the real SmolLM2-135M (skipped with a note when its
//! GGUF is not in the models cache). And the SSD's read bandwidth during
//! swap-in against the same disk's sequential O_DIRECT read, measured in
//! the same run.
//!
//! Interleaving: decode alternates one step on each cache (the order
//! flipping every step), and after each pair of steps the sequential
//! baseline reads as many bytes as that swap step read, so that load on
//! the shared machine hits every side alike. Both caches must produce the
//! same tokens.
//!
//! Bandwidth semantics: swap-in bandwidth is the bytes its reads moved
//! over the union of the times they were in flight (the disk's busy time
//! for swap-in); the baseline reads a file as long as the swapped KV,
//! sequentially, in requests of the store's longest merged read (1 MiB)
//! with as many in flight as the store has I/O threads (`max_inflight`),
//! over its wall time; a queue-depth-1 pass is in the details too.
//!
//! Page cache: the swap file and the baseline file are both read with
//! O_DIRECT (the report says which I/O path the store got).
//!
//! Checksum: the swap format's CRC-32C (on this build's path: SSE4.2 in
//! three lanes, or the table fallback) against XXH3-64 (what format v1
//! used), on cache-cold bytes as the I/O threads see them: one buffer of
//! 256 MiB (quick: 64 MiB) filled once, then hashed in 1 MiB pieces walking
//! forward, so each piece was last touched a whole buffer ago; the hashes
//! alternate over several rounds (the order flipping each round) and the
//! medians are compared. Hot rates (one 1 MiB piece hashed repeatedly) and
//! the software CRC are in the details.
//!
//! Prefill: a SmolLM2 prompt into a swapping cache at a 1/4 budget, in
//! chunks that stay resident (`TextDecoder::forward`) against one pass.
//! The bench syncs the disk first, and after that baseline's writes.
//!
//! Switch-off: the runtime's move of a swapped context back to RAM when it
//! switches swapping off mid-request (`qvl_model::kv::copy_blocks`, a layer
//! of all blocks per call) against a read per block and layer, on a
//! SmolLM2-shaped context at a 1/8 budget, alternating, medians of rounds.
//!
//! The context is filled with synthetic keys and values (deterministic
//! random numbers) rather than by a prefill of the prompt: a prefill of
//! this length would take minutes on two cores and measures nothing this
//! phase is about. Decode then runs the model over that context.

use crate::BenchOptions;
use anyhow::{bail, Context, Result};
use qvl_core::bench::{BenchReport, Criterion};
use qvl_core::DType;
use qvl_model::config::{DecoderConfig, RopeConfig, RopeKind};
use qvl_model::kv::{HostKvStorage, KvBlockId, KvBlockStorage, KvLayout, PagedKvCache};
use qvl_model::llama::GgufTextModel;
use qvl_model::ops::{argmax, Activation};
use qvl_model::random::{decoder_tensor_shapes, random_weights};
use qvl_model::{DecoderTensorNames, Logits, TextDecoder};
use qvl_runtime::kv_swap::SwappingKvStorage;
use qvl_swap::probe::SequentialProbe;
use qvl_swap::{EvictionPolicyKind, IoMode, SwapConfig, MAX_MERGED_READ};
use std::path::Path;
use std::time::Instant;
/// A decoder with Qwen3-family proportions, small enough for two cores:
/// KV per token per layer is 2 x 256 f32 (kv_heads * head_dim = 256).
fn decoder_config(layers: usize, hidden: usize, intermediate: usize) -> DecoderConfig {
    DecoderConfig {
        vocab_size: 16_384,
        hidden_size: hidden,
        intermediate_size: intermediate,
        num_layers: layers,
        num_heads: 8,
        num_kv_heads: 2,
        head_dim: 128,
        rms_norm_eps: 1e-6,
        rope: RopeConfig {
            theta: 1_000_000.0,
            kind: RopeKind::Plain,
        },
        qk_norm: true,
        attention_bias: false,
        tie_word_embeddings: true,
        hidden_act: Activation::Silu,
    }
}

/// Deterministic values in [-1, 1).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// Fills `caches` with the same `tokens` tokens of synthetic KV, one block
/// at a time (as a chunked prefill would).
fn fill(caches: &mut [&mut PagedKvCache], layout: KvLayout, tokens: usize) -> Result<()> {
    let w = layout.token_width();
    let bt = layout.block_tokens;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut done = 0;
    while done < tokens {
        let n = bt.min(tokens - done);
        for c in caches.iter_mut() {
            c.reserve(n)?;
        }
        for layer in 0..layout.layers {
            let k: Vec<f32> = (0..n * w).map(|_| rng.next()).collect();
            let v: Vec<f32> = (0..n * w).map(|_| rng.next()).collect();
            for c in caches.iter_mut() {
                c.write_layer(layer, &k, &v)?;
            }
        }
        let ids: Vec<u32> = (done..done + n)
            .map(|i| (i * 7919 % 16_000) as u32)
            .collect();
        for c in caches.iter_mut() {
            c.commit(&ids)?;
        }
        done += n;
    }
    Ok(())
}

/// The store's I/O threads, and so the baseline's queue depth.
const MAX_INFLIGHT: usize = 8;
/// Tokens per KV block.
const BLOCK_TOKENS: usize = 16;

/// One model's sweep over the budgets.
struct Sweep {
    model: String,
    layers: usize,
    context: usize,
    steps: usize,
    kv_bytes: usize,
    runs: Vec<Measured>,
}

impl Sweep {
    fn at(&self, divisor: usize) -> Result<&Measured> {
        self.runs
            .iter()
            .find(|r| r.divisor == divisor)
            .with_context(|| format!("no run of {} at 1/{divisor}", self.model))
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "model": self.model,
            "layers": self.layers,
            "context_tokens": self.context,
            "kv_bytes": self.kv_bytes,
            "decode_steps": self.steps,
            "runs": self.runs.iter().map(|r| r.json(self.steps)).collect::<Vec<_>>(),
        })
    }
}

/// Runs the benchmark.
pub fn run(opts: &BenchOptions) -> Result<BenchReport> {
    let swap_dir = opts.out_dir.join("swap-space");
    // Writes left by what ran before (a build, another bench) would be
    // flushed while swap-in reads: the decode then stalls on a disk busy
    // with someone else's writes.
    settle_disk();
    // First, while the machine is otherwise idle and before the decoders
    // take their memory.
    let sums = checksum_rates(opts.quick);
    // Budgets: all in RAM (the full size plus the prefetch window, so that
    // nothing is swapped), 1/2, 1/4, 1/8 of the context's KV.
    let divisors: &[usize] = &[1, 2, 4, 8];

    // 2B-shaped: Qwen3-VL-2B widths (hidden 2048, MLP 6144) and KV heads of
    // 2 x 128, 16 layers (so that the prefetch window, two layers, fits in
    // 1/8 of the KV). Full: 2048 tokens of context (64 MiB of f32 KV).
    // Quick: hidden 1024, MLP 2816, 512 tokens (16 MiB).
    let (hidden, intermediate, context, steps) = if opts.quick {
        (1024, 2816, 512, 12)
    } else {
        (2048, 6144, 2048, 32)
    };
    let cfg = decoder_config(16, hidden, intermediate);
    let names = DecoderTensorNames::qwen3_vl();
    let weights = random_weights(&decoder_tensor_shapes(&cfg, &names), DType::Bf16, 5)
        .context("generating random weights")?;
    let decoder =
        TextDecoder::load(cfg.clone(), &weights, &names).context("loading the decoder")?;
    drop(weights);
    let shaped = sweep(
        &format!("2B-shaped decoder (hidden {hidden}, MLP {intermediate}, 16 layers, 2 KV heads x 128), random bf16 weights"),
        &decoder,
        context,
        steps,
        divisors,
        &swap_dir,
    )?;
    drop(decoder);

    // The real model: SmolLM2-135M (30 layers, 3 KV heads x 64).
    let gguf = std::env::var_os("QVL_MODELS_DIR")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/qvl/models")))
        .map(|d| d.join("SmolLM2-135M-Instruct.Q4_1.gguf"));
    let (smol, smol_note) = match gguf.filter(|p| p.is_file()) {
        Some(path) => {
            let model = GgufTextModel::load(&path)
                .with_context(|| format!("loading {}", path.display()))?;
            let (context, steps) = if opts.quick { (512, 12) } else { (1024, 32) };
            let s = sweep(
                &format!("SmolLM2-135M-Instruct Q4_1 ({})", path.display()),
                model.decoder(),
                context,
                steps,
                divisors,
                &swap_dir,
            )?;
            let p = prefill_under_budget(model.decoder(), &swap_dir, opts.quick)?;
            (Some((s, p)), None)
        }
        None => (
            None,
            Some("SmolLM2-135M-Instruct.Q4_1.gguf is not in the models cache (cargo xtask fetch-model); its sweep was skipped".to_string()),
        ),
    };

    let switch_off = switch_off_copy(&swap_dir, opts.quick)?;
    let (smol, prefill) = match smol {
        Some((s, p)) => (Some(s), Some(p)),
        None => (None, None),
    };

    let mut report = BenchReport::new("swap");
    report.criteria.push(Criterion::higher_is_better(
        format!(
            "checksum: CRC-32C (this build's path: {}) vs XXH3-64 (xxhash-rust), GB/s over cache-cold data",
            qvl_swap::crc32c::implementation()
        ),
        "GB/s, median of walks over the buffer in 1 MiB pieces",
        sums.crc_cold,
        sums.xxh3_cold,
        1.0,
    ));
    for s in std::iter::once(&shaped).chain(smol.as_ref()) {
        let m = s.at(8)?;
        report.criteria.push(Criterion::higher_is_better(
            format!(
                "{}: decode throughput, KV budget 1/8 of context (rest on SSD) vs all in RAM",
                s.model.split(" (").next().unwrap_or(&s.model)
            ),
            "swap/RAM, median step pair",
            m.pair_ratio,
            1.0,
            0.90,
        ));
    }
    let m = shaped.at(8)?;
    report.criteria.push(Criterion::higher_is_better(
        "2B-shaped, 1/8: SSD read bandwidth during swap-in vs sequential O_DIRECT read (1 MiB requests, same queue depth, beside the decode)",
        "MB/s",
        m.read_bytes as f64 / m.busy_s.max(1e-9) / 1e6,
        m.seq_bytes as f64 / m.seq_s.max(1e-9) / 1e6,
        0.80,
    ));
    report.criteria.push(Criterion::lower_is_better(
        format!(
            "switching swap off mid-request: moving a SmolLM2-shaped context ({} tokens, 1/8 in RAM) back to RAM a layer at a time vs a read per block and layer",
            switch_off.context
        ),
        "seconds, median",
        switch_off.layered_s,
        switch_off.chunked_s,
        1.0,
    ));
    if let Some(p) = &prefill {
        report.criteria.push(Criterion::lower_is_better(
            format!(
                "SmolLM2 prefill of {} tokens, KV budget 1/4 (rest on SSD): in chunks that stay resident vs one pass",
                p.tokens
            ),
            "seconds, median",
            p.chunked_s,
            p.one_pass_s,
            1.0,
        ));
    }
    report.details = serde_json::json!({
        "prefill": prefill.as_ref().map(PrefillUnderBudget::json),
        "switch_off": switch_off.json(),
        "checksum": sums.json(),
        "sweeps": std::iter::once(&shaped).chain(smol.as_ref()).map(Sweep::json).collect::<Vec<_>>(),
        "skipped": smol_note,
        "block_tokens": BLOCK_TOKENS,
        "max_inflight": MAX_INFLIGHT,
        "merged_read_bytes": MAX_MERGED_READ,
        "budgets": "1/1 is the full KV (context and decoded tokens) plus the prefetch window, so nothing is swapped; 1/d is the full KV over d; the prefetch window is two layers of the context (or the budget less one block), the rest holds resident blocks",
        "throughput": "throughput_ratio is the median over step pairs of (all-in-RAM step seconds / swapping step seconds): the two steps of a pair run back to back, so load bursts of the shared machine hit both; tokens/s of totals and medians are beside it",
        "bandwidth": "swap-in: bytes over the union of the times its reads were in flight; baseline (sequential_mb_s): a file as long as the KV read sequentially with O_DIRECT in 1 MiB requests, max_inflight in flight, over its wall time, while a third all-in-RAM cache decodes one step (untimed) after each pair, so that the decode's CPU load delays the baseline's reads as it delays swap-in; sequential_idle_mb_s: the same between steps, with the CPU idle",
        "page_cache": "swap file and baseline read with O_DIRECT (a virtual disk may still be cached by its host, which affects both alike: same disk, similar file sizes)",
        "swap_io_cpu": "CPU seconds of the store's I/O threads (reads; checksums and conversion only of encoded chunks), from /proc/self/task",
        "verify": "verify_seconds: wall time attention's layer reads spent checking the checksums of landed raw chunks, on the compute threads",
        "ceiling": "throughput_ratio_ceiling_from_disk = all-in-RAM median step / (swap-in bytes per token at the idle sequential rate), at most 1: the best ratio any overlap of I/O and compute can reach on this disk",
    });
    Ok(report)
}

/// Hash rates in GB/s of the swap checksum and its baseline.
struct ChecksumRates {
    buffer_bytes: usize,
    rounds: usize,
    crc_cold: f64,
    crc_sw_cold: f64,
    xxh3_cold: f64,
    crc_hot: f64,
    crc_sw_hot: f64,
    xxh3_hot: f64,
}

impl ChecksumRates {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "crc32c_path": qvl_swap::crc32c::implementation(),
            "buffer_bytes": self.buffer_bytes,
            "piece_bytes": CHECKSUM_PIECE,
            "rounds": self.rounds,
            "cold_gb_s": {
                "crc32c": self.crc_cold,
                "crc32c_software": self.crc_sw_cold,
                "xxh3_64": self.xxh3_cold,
            },
            "hot_gb_s": {
                "crc32c": self.crc_hot,
                "crc32c_software": self.crc_sw_hot,
                "xxh3_64": self.xxh3_hot,
            },
            "ratio_cold_crc32c_over_xxh3": self.crc_cold / self.xxh3_cold.max(1e-9),
            "profile": "xxhash-rust is built with the profile's debug assertions (the ci profile has them on), which slow it much more than the CRC; compare release builds for production rates",
            "method": "cold: the buffer is filled once, then each hash walks it forward in 1 MiB pieces (each piece last touched a whole buffer earlier), the three hashes alternating with the order flipped each round; hot: one 1 MiB piece hashed 64 times after a warm-up; medians over rounds; the checksum values are consumed so nothing is optimized away",
        })
    }
}

/// The piece the checksum benchmark hashes at a time: the store's longest
/// merged read.
const CHECKSUM_PIECE: usize = 1 << 20;

/// Measures [`ChecksumRates`].
fn checksum_rates(quick: bool) -> ChecksumRates {
    use qvl_swap::crc32c::{crc32c, crc32c_software};
    use std::hint::black_box;
    use xxhash_rust::xxh3::xxh3_64;

    let (bytes, rounds) = if quick { (64 << 20, 5) } else { (256 << 20, 9) };
    let mut buf = vec![0u8; bytes];
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    for w in buf.chunks_exact_mut(8) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        w.copy_from_slice(&s.to_le_bytes());
    }
    let hashes: [fn(&[u8]) -> u64; 3] = [
        |d| u64::from(crc32c(d)),
        |d| u64::from(crc32c_software(d)),
        xxh3_64,
    ];
    // GB/s of one hash walking the whole buffer.
    let walk = |h: fn(&[u8]) -> u64| {
        let t = Instant::now();
        let mut acc = 0u64;
        for piece in buf.chunks(CHECKSUM_PIECE) {
            acc ^= h(black_box(piece));
        }
        black_box(acc);
        bytes as f64 / t.elapsed().as_secs_f64() / 1e9
    };
    // GB/s of one hash over the same piece, in cache.
    let hot = |h: fn(&[u8]) -> u64| {
        let piece = &buf[..CHECKSUM_PIECE];
        let mut acc = h(piece);
        let reps = 64;
        let t = Instant::now();
        for _ in 0..reps {
            acc ^= h(black_box(piece));
        }
        black_box(acc);
        (reps * CHECKSUM_PIECE) as f64 / t.elapsed().as_secs_f64() / 1e9
    };
    let mut cold: [Vec<f64>; 3] = Default::default();
    let mut warm: [Vec<f64>; 3] = Default::default();
    for round in 0..rounds {
        let mut order = [0, 1, 2];
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            cold[i].push(walk(hashes[i]));
        }
        for i in order {
            warm[i].push(hot(hashes[i]));
        }
    }
    let [c0, c1, c2] = &mut cold;
    let [w0, w1, w2] = &mut warm;
    ChecksumRates {
        buffer_bytes: bytes,
        rounds,
        crc_cold: median(c0),
        crc_sw_cold: median(c1),
        xxh3_cold: median(c2),
        crc_hot: median(w0),
        crc_sw_hot: median(w1),
        xxh3_hot: median(w2),
    }
}

/// Every budget for one model: the context filled afresh for each.
/// The swap space every part of this bench opens: `kv_bytes` of KV over
/// `layers` layers, LRU, O_DIRECT where the file system allows.
fn swap_config(
    swap_dir: &Path,
    layers: usize,
    kv_bytes: usize,
    memory_threshold: f64,
) -> SwapConfig {
    SwapConfig {
        enabled: true,
        memory_threshold,
        swap_directory: swap_dir.to_path_buf(),
        eviction_policy: EvictionPolicyKind::Lru,
        max_inflight: MAX_INFLIGHT,
        io_mode: IoMode::Auto,
        // Each layer's stream reserves up to 4 MiB ahead.
        capacity_bytes: kv_bytes as u64 * 5 / 4 + (layers as u64 + 2) * (4 << 20),
        target_read_latency_us: 50_000,
    }
}

/// Writes every dirty page out and flushes the disk's cache (`sync(2)`),
/// so that a measurement does not read through write-back it did not make.
fn settle_disk() {
    // SAFETY: sync(2) takes no arguments, touches no memory of ours and
    // cannot fail.
    unsafe { libc::sync() };
}

/// A prompt prefilled into a swapping KV cache, both ways.
struct PrefillUnderBudget {
    tokens: usize,
    chunk_tokens: usize,
    chunked_s: f64,
    one_pass_s: f64,
    rounds: usize,
}

impl PrefillUnderBudget {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "tokens": self.tokens,
            "chunk_tokens": self.chunk_tokens,
            "rounds": self.rounds,
            "chunked_s": self.chunked_s,
            "one_pass_s": self.one_pass_s,
            "method": "each round prefills the same prompt into a fresh swapping KV cache (RAM budget 1/4 of the prompt's KV): once through TextDecoder::forward, which runs the prompt in chunks that stay resident (PagedKvCache::write_window_tokens), once as one pass (forward_batch of the one sequence, what forward did before), alternating which goes first; medians over rounds; the last logits of both must agree within 1e-3",
        })
    }
}

/// Times a prefill under a KV budget: chunks that fit it against one pass,
/// whose blocks leave and come back at every layer.
fn prefill_under_budget(
    decoder: &TextDecoder,
    swap_dir: &Path,
    quick: bool,
) -> Result<PrefillUnderBudget> {
    let tokens: usize = if quick { 192 } else { 384 };
    let rounds = if quick { 1 } else { 3 };
    let layout = decoder.kv_layout(BLOCK_TOKENS);
    let ids: Vec<u32> = (0..tokens as u32)
        .map(|i| 100 + i * 7919 % 16_000)
        .collect();
    let positions: Vec<[i64; 3]> = (0..tokens as i64).map(|i| [i; 3]).collect();
    let kv_bytes = tokens.div_ceil(BLOCK_TOKENS) * layout.block_floats() * 4;
    let budget = kv_bytes / 4;
    let config = swap_config(swap_dir, layout.layers, kv_bytes, 0.75);
    let (mut chunked, mut one_pass) = (Vec::new(), Vec::new());
    let mut chunk_tokens = 0;
    for round in 0..rounds {
        let mut last = Vec::new();
        for chunks in [round % 2 == 0, round % 2 != 0] {
            let storage = SwappingKvStorage::new(layout, &config, budget)
                .context("opening the swapping KV storage")?;
            let mut cache = PagedKvCache::new(Box::new(storage));
            chunk_tokens = cache.write_window_tokens().unwrap_or(tokens);
            let hidden = decoder.embed(&ids)?;
            let t = Instant::now();
            let logits = if chunks {
                decoder.forward(&mut cache, hidden, &ids, &positions, None, Logits::Last)?
            } else {
                let mut seqs = [qvl_model::BatchSequence {
                    cache: &mut cache,
                    tokens: &ids,
                    positions: &positions,
                }];
                decoder.forward_batch(&mut seqs, hidden, Logits::Last)?
            };
            let secs = t.elapsed().as_secs_f64();
            if chunks {
                chunked.push(secs);
            } else {
                one_pass.push(secs);
            }
            last.push(logits);
        }
        let worst = last[0]
            .iter()
            .zip(&last[1])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        if worst > 1e-3 {
            bail!("prefill in chunks and in one pass disagree: logits differ by {worst}");
        }
    }
    // The one-pass baseline wrote the KV out and in at every layer: let the
    // disk take those writes now, not during the next measurement.
    settle_disk();
    Ok(PrefillUnderBudget {
        tokens,
        chunk_tokens,
        chunked_s: median(&mut chunked),
        one_pass_s: median(&mut one_pass),
        rounds,
    })
}

/// What moving a swapped context back to RAM costs, both ways.
struct SwitchOff {
    context: usize,
    layered_s: f64,
    chunked_s: f64,
    blocks: usize,
    swapped_blocks: usize,
    rounds: usize,
}

impl SwitchOff {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "layout": "SmolLM2-135M: 30 layers, 3 KV heads x 64, f32",
            "context_tokens": self.context,
            "blocks": self.blocks,
            "swapped_blocks": self.swapped_blocks,
            "rounds": self.rounds,
            "layer_at_a_time_s": self.layered_s,
            "read_per_block_and_layer_s": self.chunked_s,
            "method": "each round fills a fresh swapping storage (budget 1/8 of the KV, as the 1/8 sweep) and copies every block into RAM storage, once with qvl_model::kv::copy_blocks (what the runtime does when it switches swapping off: one read_layer call per layer, merged reads) and once with a read per block and layer (what it did before), alternating which goes first; every view verified; medians over rounds",
        })
    }
}

/// Times the runtime's switch-off copy (`kv::copy_blocks`) against a read
/// per block and layer, on a context mostly on SSD.
fn switch_off_copy(swap_dir: &Path, quick: bool) -> Result<SwitchOff> {
    let layout = KvLayout {
        layers: 30,
        kv_heads: 3,
        head_dim: 64,
        block_tokens: BLOCK_TOKENS,
    };
    let context = if quick { 512 } else { 1024 };
    let rounds = if quick { 2 } else { 5 };
    let blocks = context / BLOCK_TOKENS;
    let block_bytes = layout.block_floats() * 4;
    let kv_bytes = blocks * block_bytes;
    let budget = kv_bytes / 8;
    let window = (kv_bytes / layout.layers * 2).min(budget - block_bytes);
    let threshold = (budget - window) as f64 / budget as f64;
    let config = swap_config(swap_dir, layout.layers, kv_bytes, threshold);
    let (mut layered, mut chunked) = (Vec::new(), Vec::new());
    let mut swapped_blocks = 0;
    for round in 0..rounds {
        for per_layer in [round % 2 == 0, round % 2 != 0] {
            let mut from = SwappingKvStorage::new(layout, &config, budget)
                .context("opening the swapping KV storage")?;
            let mut rng = Rng(0x5EED_0000 + round as u64);
            let width = BLOCK_TOKENS * layout.token_width();
            let mut ids = Vec::with_capacity(blocks);
            for _ in 0..blocks {
                let id = from.allocate()?;
                for layer in 0..layout.layers {
                    let k: Vec<f32> = (0..width).map(|_| rng.next()).collect();
                    let v: Vec<f32> = (0..width).map(|_| rng.next()).collect();
                    from.write(id, layer, 0, &k, &v)?;
                }
                ids.push(id);
            }
            swapped_blocks = from.stats().swapped_blocks;
            let mut to = HostKvStorage::new(layout);
            let t = Instant::now();
            if per_layer {
                qvl_model::kv::copy_blocks(&from, &mut to, &ids)?;
                layered.push(t.elapsed().as_secs_f64());
            } else {
                copy_chunk_by_chunk(&from, &mut to, &ids)?;
                chunked.push(t.elapsed().as_secs_f64());
            }
        }
    }
    Ok(SwitchOff {
        context,
        layered_s: median(&mut layered),
        chunked_s: median(&mut chunked),
        blocks,
        swapped_blocks,
        rounds,
    })
}

/// The baseline of [`switch_off_copy`]: a read per block and layer.
fn copy_chunk_by_chunk(
    from: &dyn KvBlockStorage,
    to: &mut dyn KvBlockStorage,
    ids: &[KvBlockId],
) -> Result<()> {
    for &id in ids {
        let new = to.allocate()?;
        for layer in 0..from.layout().layers {
            let view = from.read(id, layer)?;
            view.verify()?;
            to.write(new, layer, 0, &view.keys, &view.values)?;
        }
    }
    Ok(())
}

fn sweep(
    model: &str,
    decoder: &TextDecoder,
    context: usize,
    steps: usize,
    divisors: &[usize],
    swap_dir: &Path,
) -> Result<Sweep> {
    let layout = decoder.kv_layout(BLOCK_TOKENS);
    let kv_bytes = context * layout.layers * 2 * layout.token_width() * 4;
    let probe = SequentialProbe::create(swap_dir, kv_bytes as u64)
        .context("writing the sequential-read baseline file")?;
    let mut runs = Vec::new();
    for &div in divisors {
        runs.push(
            measure(
                decoder, layout, context, steps, kv_bytes, div, swap_dir, &probe,
            )
            .with_context(|| format!("{model}: decode with a KV budget of 1/{div}"))?,
        );
    }
    Ok(Sweep {
        model: model.to_string(),
        layers: layout.layers,
        context,
        steps,
        kv_bytes,
        runs,
    })
}

/// The median of `v` (0 when empty).
fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// CPU seconds used so far by this process's threads named `qvl-swap-io-*`
/// (their scheduler run time, in ns, from /proc/self/task/*/schedstat).
fn swap_io_cpu_secs() -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    let mut ns = 0u64;
    for t in tasks.flatten() {
        let is_io = std::fs::read_to_string(t.path().join("comm"))
            .is_ok_and(|c| c.starts_with("qvl-swap-io"));
        if !is_io {
            continue;
        }
        if let Ok(stat) = std::fs::read_to_string(t.path().join("schedstat")) {
            ns += stat
                .split_whitespace()
                .next()
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    ns as f64 * 1e-9
}

/// One decode comparison at a KV budget of `1/divisor` of the context.
struct Measured {
    divisor: usize,
    budget: usize,
    memory_threshold: f64,
    io_mode: &'static str,
    host_s: f64,
    swap_s: f64,
    /// Median seconds of one decode step, all in RAM and swapping.
    host_median_s: f64,
    swap_median_s: f64,
    read_bytes: u64,
    busy_s: f64,
    reads: u64,
    peak_running: usize,
    /// Median over step pairs of (all-in-RAM step time / swapping step time).
    pair_ratio: f64,
    seq_bytes: u64,
    seq_s: f64,
    seq_idle_bytes: u64,
    seq_idle_s: f64,
    io_cpu_s: f64,
    stall_s: f64,
    fetch_s: f64,
    verify_s: f64,
    prefetch_hits: u64,
    demand_reads: u64,
    peak_ram: usize,
    resident_blocks: usize,
    swapped_blocks: usize,
    fill_s: f64,
    fill_bytes_written: u64,
    throttles: u64,
    ewma_latency_us: f64,
    integrity_failures: u64,
    lent_chunks: u64,
    copied_chunks: u64,
}

impl Measured {
    fn json(&self, steps: usize) -> serde_json::Value {
        let mb_s = |bytes: u64, s: f64| bytes as f64 / s.max(1e-9) / 1e6;
        // The disk alone bounds the swapping step: it cannot be shorter
        // than the time to read a step's bytes at the sequential rate.
        let disk_s = if self.seq_idle_bytes > 0 {
            self.read_bytes as f64 / steps as f64 * self.seq_idle_s / self.seq_idle_bytes as f64
        } else {
            0.0
        };
        let ceiling = if disk_s > 0.0 {
            (self.host_median_s / disk_s).min(1.0)
        } else {
            1.0
        };
        serde_json::json!({
            "budget_fraction": format!("1/{}", self.divisor),
            "ram_budget_bytes": self.budget,
            "memory_threshold": self.memory_threshold,
            "io_mode": self.io_mode,
            "host_tokens_per_s": steps as f64 / self.host_s,
            "swap_tokens_per_s": steps as f64 / self.swap_s,
            "throughput_ratio_of_totals": self.host_s / self.swap_s,
            "host_median_tokens_per_s": 1.0 / self.host_median_s,
            "swap_median_tokens_per_s": 1.0 / self.swap_median_s,
            "throughput_ratio": self.pair_ratio,
            "swap_in_bytes": self.read_bytes,
            "swap_in_bytes_per_token": self.read_bytes as f64 / steps as f64,
            "swap_in_busy_seconds": self.busy_s,
            "swap_in_mb_s": mb_s(self.read_bytes, self.busy_s),
            "swap_in_reads": self.reads,
            "swap_in_mean_read_bytes": self.read_bytes as f64 / self.reads.max(1) as f64,
            "swap_in_peak_reads_in_flight": self.peak_running,
            "sequential_mb_s": mb_s(self.seq_bytes, self.seq_s),
            "sequential_idle_mb_s": mb_s(self.seq_idle_bytes, self.seq_idle_s),
            "bandwidth_ratio": if self.read_bytes > 0 { mb_s(self.read_bytes, self.busy_s) / mb_s(self.seq_bytes, self.seq_s) } else { f64::NAN },
            "swap_io_cpu_seconds": self.io_cpu_s,
            "swap_io_cpu_ms_per_token": self.io_cpu_s * 1e3 / steps as f64,
            "stall_seconds": self.stall_s,
            "fetch_seconds": self.fetch_s,
            "verify_seconds": self.verify_s,
            "swap_minus_host_seconds": self.swap_s - self.host_s,
            "prefetch_hits": self.prefetch_hits,
            "demand_reads": self.demand_reads,
            "peak_kv_ram_bytes": self.peak_ram,
            "resident_blocks": self.resident_blocks,
            "swapped_blocks": self.swapped_blocks,
            "fill_seconds": self.fill_s,
            "swap_out_bytes_during_fill": self.fill_bytes_written,
            "throttles": self.throttles,
            "ewma_read_latency_us": self.ewma_latency_us,
            "integrity_failures": self.integrity_failures,
            "lent_chunks": self.lent_chunks,
            "copied_chunks": self.copied_chunks,
            "disk_seconds_per_token_at_idle_sequential": disk_s,
            "throughput_ratio_ceiling_from_disk": ceiling,
            "tokens_equal": true,
        })
    }
}

/// Fills a swapping cache and an in-RAM cache with the same context, then
/// decodes `steps` tokens on each, alternating, with a pass of the
/// sequential baseline after each pair; checks the tokens agree.
#[allow(clippy::too_many_arguments)]
fn measure(
    decoder: &TextDecoder,
    layout: KvLayout,
    context: usize,
    steps: usize,
    kv_bytes: usize,
    divisor: usize,
    swap_dir: &Path,
    probe: &SequentialProbe,
) -> Result<Measured> {
    let layers = layout.layers;
    // The prefetch window: two layers of the context (attention reads a
    // layer at a time, and the next one is read meanwhile), or all of the
    // budget but the block decode writes into. The rest holds resident
    // blocks.
    let block_bytes = layout.block_floats() * 4;
    let two_layers = kv_bytes / layers * 2;
    let budget = if divisor == 1 {
        // Everything fits: the context, the decoded tokens and a spare
        // block besides the window.
        let tokens = context + steps + 1 + BLOCK_TOKENS;
        tokens.div_ceil(BLOCK_TOKENS) * block_bytes + two_layers
    } else {
        kv_bytes / divisor
    };
    let window = two_layers.min(budget - block_bytes);
    let memory_threshold = (budget - window) as f64 / budget as f64;
    let config = swap_config(swap_dir, layers, kv_bytes, memory_threshold);
    let storage = SwappingKvStorage::new(layout, &config, budget)
        .context("opening the swapping KV storage")?;
    let monitor = storage.monitor();
    let io_mode = storage.store().io().name();
    let mut swapped = PagedKvCache::new(Box::new(storage));
    let mut host = PagedKvCache::new(Box::new(HostKvStorage::new(layout)));
    // A third, all-in-RAM cache that decodes beside the baseline probe
    // (untimed): the probe's reads then compete with the same decode CPU
    // load as swap-in does.
    let mut beside = PagedKvCache::new(Box::new(HostKvStorage::new(layout)));
    let t = Instant::now();
    fill(&mut [&mut host, &mut swapped, &mut beside], layout, context)?;
    let fill_s = t.elapsed().as_secs_f64();
    let after_fill = monitor.stats();

    // One warm-up step each (page faults of the weights, thread pools).
    let mut next = [1u32, 1u32];
    let mut pos = context as i64;
    let step = |cache: &mut PagedKvCache, token: u32, pos: i64| -> Result<(u32, f64)> {
        let t = Instant::now();
        let logits = decoder.forward(
            cache,
            decoder.embed(&[token])?,
            &[token],
            &[[pos; 3]],
            None,
            Logits::Last,
        )?;
        Ok((argmax(&logits) as u32, t.elapsed().as_secs_f64()))
    };
    let mut beside_next = step(&mut beside, next[0], pos)?.0;
    let mut beside_pos = pos + 1;
    next[0] = step(&mut host, next[0], pos)?.0;
    next[1] = step(&mut swapped, next[1], pos)?.0;
    pos += 1;
    let before = monitor.stats();
    let cpu_before = swap_io_cpu_secs();
    let (mut host_s, mut swap_s, mut io_cpu_s) = (0f64, 0f64, 0f64);
    let (mut seq_bytes, mut seq_s, mut seq_idle_bytes, mut seq_idle_s) = (0u64, 0f64, 0u64, 0f64);
    let mut tokens = (Vec::new(), Vec::new());
    let (mut host_steps, mut swap_steps) = (Vec::new(), Vec::new());
    let mut last_read = before.store.engine.bytes;
    for i in 0..steps {
        // Alternate which goes first, so neither always runs on a cache
        // warmed by the other.
        let order = if i % 2 == 0 { [0, 1] } else { [1, 0] };
        for which in order {
            if which == 0 {
                let (t, s) = step(&mut host, next[0], pos)?;
                next[0] = t;
                host_s += s;
                host_steps.push(s);
                tokens.0.push(t);
            } else {
                let (t, s) = step(&mut swapped, next[1], pos)?;
                next[1] = t;
                swap_s += s;
                swap_steps.push(s);
                tokens.1.push(t);
            }
        }
        // The I/O threads' CPU time is taken before the probe runs.
        io_cpu_s = swap_io_cpu_secs() - cpu_before;
        let read_now = monitor.stats().store.engine.bytes;
        let step_bytes = read_now - last_read;
        last_read = read_now;
        if step_bytes > 0 {
            // The baseline, under the same conditions as swap-in: read
            // sequentially while the model decodes (a step of the third
            // cache, not timed), so that the decode's CPU load delays its
            // reads as it delays swap-in.
            let stop = std::sync::atomic::AtomicBool::new(false);
            let (b, s, t) = std::thread::scope(|scope| -> Result<(u64, f64, u32)> {
                let reader = scope.spawn(|| -> Result<(u64, f64)> {
                    let (mut bytes, mut secs) = (0u64, 0f64);
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let (b, s) = probe.read_pass(
                            (MAX_INFLIGHT * MAX_MERGED_READ) as u64,
                            MAX_MERGED_READ,
                            MAX_INFLIGHT,
                        )?;
                        bytes += b;
                        secs += s;
                    }
                    Ok((bytes, secs))
                });
                let t = step(&mut beside, beside_next, beside_pos);
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                let (b, s) = reader
                    .join()
                    .map_err(|_| anyhow::anyhow!("the probe thread panicked"))??;
                Ok((b, s, t?.0))
            })?;
            seq_bytes += b;
            seq_s += s;
            beside_next = t;
            beside_pos += 1;
            // And on an idle machine (between steps), for the details.
            let (b, s) = probe.read_pass(step_bytes / 4, MAX_MERGED_READ, MAX_INFLIGHT)?;
            seq_idle_bytes += b;
            seq_idle_s += s;
        }
        pos += 1;
    }
    let after = monitor.stats();
    if tokens.0 != tokens.1 {
        bail!(
            "decode over swapped KV produced other tokens than in RAM: {:?} vs {:?}",
            tokens.1,
            tokens.0
        );
    }
    Ok(Measured {
        divisor,
        budget,
        memory_threshold: config.memory_threshold,
        io_mode,
        host_s,
        swap_s,
        pair_ratio: median(
            &mut host_steps
                .iter()
                .zip(&swap_steps)
                .map(|(h, s)| h / s)
                .collect::<Vec<_>>(),
        ),
        host_median_s: median(&mut host_steps),
        swap_median_s: median(&mut swap_steps),
        read_bytes: after.store.engine.bytes - before.store.engine.bytes,
        busy_s: after.store.engine.busy_secs - before.store.engine.busy_secs,
        reads: after.store.engine.ops - before.store.engine.ops,
        peak_running: after.store.engine.peak_running,
        seq_bytes,
        seq_s,
        seq_idle_bytes,
        seq_idle_s,
        io_cpu_s,
        stall_s: after.stall_secs - before.stall_secs,
        fetch_s: after.fetch_secs - before.fetch_secs,
        verify_s: after.verify_secs - before.verify_secs,
        prefetch_hits: after.prefetch_hits - before.prefetch_hits,
        demand_reads: after.demand_reads - before.demand_reads,
        peak_ram: after.peak_ram_bytes,
        resident_blocks: after.resident_blocks,
        swapped_blocks: after.swapped_blocks,
        fill_s,
        fill_bytes_written: after_fill.store.bytes_written,
        throttles: after.store.engine.throttles,
        ewma_latency_us: after.store.engine.ewma_latency_us,
        integrity_failures: after.store.integrity_failures,
        lent_chunks: after.lent_chunks - before.lent_chunks,
        copied_chunks: after.copied_chunks - before.copied_chunks,
    })
}
