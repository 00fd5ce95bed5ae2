//! Phase 5 (qvl-tier): decode tokens/s of a generated model on disk with
//! its layer weights streamed through a RAM budget of 1x, 1/2 and 1/4 of
//! their size, against all weights in RAM, against static placement (the
//! first layers that fit resident, the rest read on demand with no
//! prefetch), and against the SSD-bandwidth bound (bytes streamed per token
//! over the read bandwidth measured in the same run through the same read
//! path); then a long session of many requests with memory sampled; then
//! SmolLM2-135M (GGUF, dequantized to f32 layers) under the 64 MiB budget
//! of `qvl run --ram-budget 64MiB`, when the GGUF is in the models cache.

use crate::BenchOptions;
use anyhow::{Context, Result};
use qvl_core::bench::{BenchReport, Criterion};
use qvl_core::{ByteSize, DType};
use qvl_model::checkpoint::write_safetensors;
use qvl_model::fetch::{find_cached, SMOLLM2};
use qvl_model::llama::{GgufTextModel, StreamedLayers};
use qvl_model::ops::Activation;
use qvl_model::random::{decoder_tensor_shapes, random_weights};
use qvl_model::text::{DecoderTensorNames, Logits, TextDecoder};
use qvl_model::{DecoderConfig, LoadOptions, RopeConfig, RopeKind, SafetensorsFile, WeightFormat};
use qvl_runtime::config::TieringConfig;
use qvl_runtime::weights_tier::{self, TieredLayers};
use qvl_tier::TierConfig;
use serde_json::json;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// Layers read ahead by the tiered runs: what `qvl run` uses.
const PREFETCH_DEPTH: usize = weights_tier::RUN_PREFETCH_DEPTH;
/// Rounds of the SmolLM2 tiered and static measurements (best kept).
const ROUNDS: usize = 2;
/// Request size of the sequential disk probe (about a layer segment).
const SEQ_REQUEST: usize = 4 << 20;
/// Requests in flight in the sequential disk probe (the tier's I/O threads).
const SEQ_DEPTH: usize = 4;

/// The disk's own streaming rate beside the tier's read path: large
/// sequential O_DIRECT requests, as many in flight as the tier's I/O
/// threads. The bounds take the higher rate, so a slow probe of the tier's
/// own path cannot make a bound easy to meet.
struct DiskProbe {
    file: qvl_swap::probe::SequentialProbe,
    pass_bytes: u64,
}

impl DiskProbe {
    fn create(dir: &Path, quick: bool) -> Result<DiskProbe> {
        let pass_bytes: u64 = if quick { 128 << 20 } else { 512 << 20 };
        let file = qvl_swap::probe::SequentialProbe::create(dir, pass_bytes)
            .context("creating the sequential read probe")?;
        Ok(DiskProbe { file, pass_bytes })
    }

    /// One pass; bytes per second.
    fn rate(&self) -> Result<f64> {
        let (bytes, secs) = self
            .file
            .read_pass(self.pass_bytes, SEQ_REQUEST, SEQ_DEPTH)
            .context("reading the sequential probe")?;
        Ok(bytes as f64 / secs.max(1e-9))
    }
}

fn generated_config(quick: bool) -> DecoderConfig {
    let (layers, hidden, inter) = if quick {
        (8, 512, 2048)
    } else {
        (16, 1024, 4096)
    };
    DecoderConfig {
        vocab_size: 4096,
        hidden_size: hidden,
        intermediate_size: inter,
        num_layers: layers,
        num_heads: hidden / 64,
        num_kv_heads: hidden / 256,
        head_dim: 64,
        rms_norm_eps: 1e-6,
        rope: RopeConfig {
            theta: 1_000_000.0,
            kind: RopeKind::Plain,
        },
        qk_norm: true,
        attention_bias: false,
        tie_word_embeddings: false,
        hidden_act: Activation::Silu,
    }
}

/// Greedy decode of `steps` tokens after a short prompt; returns tokens/s
/// of the decode steps and the tokens.
fn decode(decoder: &TextDecoder, steps: usize) -> Result<(f64, Vec<u32>)> {
    let mut cache = decoder.new_cache();
    let prompt = [11u32, 42, 7, 99];
    let pos: Vec<[i64; 3]> = (0..prompt.len() as i64).map(|p| [p; 3]).collect();
    let mut logits = decoder.forward(
        &mut cache,
        decoder.embed(&prompt)?,
        &prompt,
        &pos,
        None,
        Logits::Last,
    )?;
    let mut out = Vec::new();
    let start = Instant::now();
    for step in 0..steps {
        let token = argmax(&logits);
        out.push(token);
        let p = (prompt.len() + step) as i64;
        logits = decoder.forward(
            &mut cache,
            decoder.embed(&[token])?,
            &[token],
            &[[p; 3]],
            None,
            Logits::Last,
        )?;
    }
    Ok((steps as f64 / start.elapsed().as_secs_f64(), out))
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i as u32)
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// One measured decode under a placement.
struct Sample {
    tokens_per_s: f64,
    /// SSD bytes read per token (the prefill of 4 tokens counted as one).
    streamed_per_token: f64,
    /// SSD bytes per second while reads ran, in this decode.
    read_rate: f64,
    tokens: Vec<u32>,
}

/// Sets the tier to `budget` and `depth` (0: static placement), lets
/// placement settle over two warm-up tokens, then decodes `steps` tokens.
fn measure(
    decoder: &TextDecoder,
    layers: &TieredLayers,
    budget: u64,
    depth: usize,
    steps: usize,
) -> Result<Sample> {
    let m = layers.manager();
    layers
        .reconfigure(ByteSize(budget), depth)
        .context("reconfiguring the tier")?;
    decode(decoder, 2)?;
    m.wait_idle();
    let before = layers.stats();
    let (tokens_per_s, tokens) = decode(decoder, steps)?;
    m.wait_idle();
    let after = layers.stats();
    let bytes = (after.ssd_read_bytes - before.ssd_read_bytes) as f64;
    let nanos = (after.ssd_read_nanos - before.ssd_read_nanos) as f64;
    Ok(Sample {
        tokens_per_s,
        streamed_per_token: bytes / (steps + 1) as f64,
        read_rate: if nanos > 0.0 {
            bytes / nanos * 1e9
        } else {
            0.0
        },
        tokens,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The placements measured for each budget, one sample each per round.
#[derive(Clone, Copy, PartialEq)]
enum Side {
    Tiered,
    Static,
    AllInRam,
}

/// Runs the benchmark.
pub fn run(opts: &BenchOptions) -> Result<BenchReport> {
    let quick = opts.quick;
    let steps = if quick { 8 } else { 16 };
    // A multiple of the three sides: each side leads and follows alike.
    let rounds = 3;
    let cfg = generated_config(quick);
    let names = DecoderTensorNames::hugging_face("model", "lm_head.weight");
    let dir = opts.out_dir.join("tier-data");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("generated.safetensors");
    {
        let w = random_weights(&decoder_tensor_shapes(&cfg, &names), DType::Bf16, 5)
            .context("generating weights")?;
        write_safetensors(&path, &w.tensors()).context("writing the generated model")?;
    }
    let src = SafetensorsFile::open(&path).context("opening the generated model")?;

    let resident = TextDecoder::load(cfg.clone(), &src, &names)?;
    decode(&resident, 2)?; // page in the mapped weights
    let weight_bytes = resident.weight_bytes_per_token();

    // One spill file for every budget and placement: the manager is
    // reconfigured between runs, so tiered, static and all-in-RAM rounds
    // interleave on the same data and the same disk blocks.
    let tier = TierConfig {
        cpu_ram: ByteSize(u64::MAX / 4),
        prefetch_depth: PREFETCH_DEPTH,
        spill_dir: Some(dir.to_path_buf()),
        ..TierConfig::default()
    };
    let (decoder, layers) = TieredLayers::load_decoder(cfg.clone(), &src, &names, tier)
        .context("loading the tiered decoder")?;
    let image_bytes = layers.image_bytes();
    let direct_io = layers.manager().direct_io();
    let disk = DiskProbe::create(&dir, quick)?;

    let mut rows = Vec::new();
    let mut criteria = Vec::new();
    let mut ram_all = Vec::new();
    for (label, num, den) in [("1", 1, 1), ("1/2", 1, 2), ("1/4", 1, 4)] {
        let budget = image_bytes * num / den;
        // With nothing to read a token takes milliseconds: more tokens and
        // rounds keep scheduling noise out of the ratio.
        let (steps, rounds) = if den == 1 {
            (steps * 4, rounds * 2)
        } else {
            (steps, rounds)
        };
        let mut ram_tokens = None;
        let mut tiered = Vec::new();
        let mut stat = Vec::new();
        let mut ram = Vec::new();
        let mut probes = Vec::new();
        let mut seq_probes = Vec::new();
        let sides = [Side::Tiered, Side::Static, Side::AllInRam];
        for round in 0..rounds {
            // Each round starts with another side, so load drifts on the
            // shared machine hit every side alike.
            for k in 0..sides.len() {
                match sides[(round + k) % sides.len()] {
                    Side::Tiered => {
                        tiered.push(measure(&decoder, &layers, budget, PREFETCH_DEPTH, steps)?)
                    }
                    Side::Static => stat.push(measure(&decoder, &layers, budget, 0, steps)?),
                    Side::AllInRam => {
                        let (tps, tokens) = decode(&resident, steps)?;
                        ram.push(tps);
                        ram_tokens.get_or_insert(tokens);
                    }
                }
            }
            if den > 1 {
                probes.push(
                    layers
                        .manager()
                        .measure_read_bandwidth()
                        .context("measuring read bandwidth")?,
                );
                seq_probes.push(disk.rate()?);
            }
        }
        let want = ram_tokens.as_ref().context("an all-in-RAM round ran")?;
        let same = tiered.iter().chain(&stat).all(|s| &s.tokens == want);
        let med = |v: &[Sample], f: fn(&Sample) -> f64| median(v.iter().map(f).collect());
        let tiered_tps = med(&tiered, |s| s.tokens_per_s);
        let static_tps = med(&stat, |s| s.tokens_per_s);
        let ram_tps = median(ram.clone());
        // Each round measures the sides back to back: their ratio within a
        // round sees one load level, so the median ratio is steadier than
        // the ratio of medians on a shared machine.
        let vs_static = median(
            tiered
                .iter()
                .zip(&stat)
                .map(|(t, s)| t.tokens_per_s / s.tokens_per_s)
                .collect(),
        );
        let vs_ram = median(
            tiered
                .iter()
                .zip(&ram)
                .map(|(t, r)| t.tokens_per_s / r)
                .collect(),
        );
        ram_all.extend(ram.iter().copied());
        let streamed = med(&tiered, |s| s.streamed_per_token);
        let static_streamed = med(&stat, |s| s.streamed_per_token);
        // The bound: bytes streamed per token over the read bandwidth, the
        // highest of the best probe of the tier's read path (every object
        // read through it, as many reads in flight), the disk's best
        // sequential O_DIRECT pass, and the median rate of the stream's own
        // reads: an upper bound should not be lowered by noise.
        let probe_bw = probes.iter().copied().fold(0.0, f64::max);
        let seq_bw = seq_probes.iter().copied().fold(0.0, f64::max);
        let stream_bw = med(&tiered, |s| s.read_rate);
        let bw = probe_bw.max(seq_bw).max(stream_bw);
        let bound = if streamed > 0.0 {
            bw / streamed
        } else {
            f64::INFINITY
        };
        rows.push(json!({
            "budget": label,
            "budget_bytes": budget,
            "tiered_tokens_per_s": tiered_tps,
            "static_tokens_per_s": static_tps,
            "tiered_vs_static_median_round_ratio": vs_static,
            "tiered_vs_all_in_ram_median_round_ratio": vs_ram,
            "all_in_ram_tokens_per_s": ram_tps,
            "tiered_samples": tiered.iter().map(|s| s.tokens_per_s).collect::<Vec<_>>(),
            "static_samples": stat.iter().map(|s| s.tokens_per_s).collect::<Vec<_>>(),
            "all_in_ram_samples": ram,
            "streamed_bytes_per_token": streamed,
            "static_streamed_bytes_per_token": static_streamed,
            "read_bandwidth_bytes_per_s": bw,
            "probe_read_bandwidth_bytes_per_s": probes,
            "sequential_o_direct_bytes_per_s": seq_probes,
            "stream_read_bandwidth_bytes_per_s": stream_bw,
            "bound_tokens_per_s": bound,
            "tokens_equal_all_in_ram": same,
            "decode_steps": steps,
            "rounds": rounds,
            "ram_peak_bytes_since_reconfigured": layers.stats().tiers[1].peak,
        }));
        println!(
            "budget {label}: tiered {tiered_tps:.2} tok/s, static {static_tps:.2} (per round {vs_static:.2}x), all-in-RAM {ram_tps:.2} (per round {vs_ram:.2}x), bound {bound:.2} ({:.0} MB/token at {:.0} MB/s; static reads {:.0} MB/token), medians of {rounds}",
            streamed / 1e6,
            bw / 1e6,
            static_streamed / 1e6,
        );
        criteria.push(Criterion::higher_is_better(
            format!("budget {label}: output equals all-in-RAM"),
            "bool",
            f64::from(u8::from(same)),
            1.0,
            1.0,
        ));
        if den == 1 {
            criteria.push(Criterion::higher_is_better(
                "budget 1x: tiered vs all in RAM (median of per-round ratios)",
                "ratio",
                vs_ram,
                1.0,
                0.9,
            ));
            continue;
        }
        if den == 4 {
            criteria.push(Criterion::higher_is_better(
                "budget 1/4: tiered vs SSD-bandwidth bound",
                "tokens/s",
                tiered_tps,
                bound,
                0.7,
            ));
        }
        criteria.push(Criterion::higher_is_better(
            format!("budget {label}: tiered vs static placement (median of per-round ratios)"),
            "ratio",
            vs_static,
            1.0,
            1.0,
        ));
    }
    let ram_tps = median(ram_all);
    drop(resident);
    layers.reconfigure(ByteSize(image_bytes / 4), PREFETCH_DEPTH)?;

    // Long session: many short requests on the 1/4-budget decoder.
    let requests = if quick { 12 } else { 40 };
    let mut rss = Vec::new();
    let mut ram_used = Vec::new();
    for r in 0..requests {
        decode(&decoder, 3)?;
        layers.manager().wait_idle();
        if r == 1 {
            // Placement settled after the budget change: the peak from here.
            layers.manager().reset_peak();
        }
        if r >= 2 {
            rss.push(rss_bytes());
            ram_used.push(layers.stats().tiers[1].used);
        }
    }
    let first_rss = *rss.first().context("samples")? as f64;
    let max_rss = rss.iter().copied().max().unwrap_or(0) as f64;
    let s = layers.stats();
    let budget = s.tiers[1].budget as f64;
    criteria.push(Criterion::lower_is_better(
        format!("long session ({requests} requests): max RSS vs RSS after warm-up"),
        "bytes",
        max_rss,
        first_rss,
        0.97,
    ));
    criteria.push(Criterion::lower_is_better(
        "long session: peak accounted RAM after warm-up vs budget",
        "bytes",
        s.tiers[1].peak as f64,
        budget,
        1.0,
    ));

    let smollm2 = match find_cached(&SMOLLM2) {
        Some(p) => smollm2_rows(&p, &dir, quick, &mut criteria)?,
        None => json!({
            "skipped": "SmolLM2-135M-Instruct is not in the models cache; fetch it with `qvl fetch-model smollm2`"
        }),
    };

    let mut report = BenchReport::new("tier");
    report.criteria = criteria;
    report.details = json!({
        "command": format!("cargo run --release -p qvl-bench -- tier{}", if quick { " --quick" } else { "" }),
        "model": {
            "layers": cfg.num_layers, "hidden": cfg.hidden_size,
            "intermediate": cfg.intermediate_size, "dtype": "bf16",
            "layer_weight_bytes_per_token": weight_bytes,
            "layer_image_bytes": image_bytes,
            "file": path.display().to_string(),
        },
        "decode_steps": steps,
        "rounds": rounds,
        "prefetch_depth": PREFETCH_DEPTH,
        "direct_io": direct_io,
        "all_in_ram_tokens_per_s": ram_tps,
        "budgets": rows,
        "smollm2": smollm2,
        "long_session": {
            "requests": requests,
            "rss_bytes": rss,
            "ram_used_bytes": ram_used,
            "final_stats": s,
        },
        "notes": "One spill file; the same tier manager is reconfigured (RAM budget, prefetch depth) between runs. Static placement = prefetch_depth 0: the first layers that fit stay resident (hysteresis keeps them), the rest are read on demand every token. Tiered = prefetch_depth as qvl run uses it, the next layer's read queued before the reader waits (get_in_order). Reads are direct I/O (O_DIRECT) where the file system takes it, else pread with posix_fadvise(DONTNEED): the page cache never serves them. Tiered, static and all-in-RAM rounds interleave, the first side rotating per round; numbers are medians. The bound is the median tiered bytes per token over the highest of the best read probe (same read path, same run), the disk's best sequential O_DIRECT pass (4 MiB requests, 4 in flight, same run) and the stream's own read rate.",
    });
    drop(decoder);
    drop(layers);
    let _ = std::fs::remove_file(&path);
    Ok(report)
}

/// SmolLM2 with its layers streamed under the `qvl run --ram-budget 64MiB`
/// budget: `[tiering]` defaults mapped by `weights_tier::tier_config`,
/// prefetch `depth` (0: static placement).
fn smollm2_tiered(
    path: &Path,
    budget: u64,
    depth: usize,
    dir: &Path,
    options: &LoadOptions,
) -> Result<(GgufTextModel, Arc<TieredLayers>)> {
    let tier = TierConfig {
        cpu_ram: ByteSize(budget),
        prefetch_depth: depth,
        spill_dir: Some(dir.to_path_buf()),
        ..weights_tier::tier_config(&TieringConfig::default()).context("tiering is on")?
    };
    let mut built = None;
    let model = GgufTextModel::load_with_options_and(path, options, |cfg, weights, names| {
        let layers = Arc::new(TieredLayers::build(cfg, weights, names, tier)?);
        built = Some(layers.clone());
        Ok(Some(StreamedLayers {
            weight_bytes: layers.weight_bytes(),
            provider: layers,
        }))
    })
    .with_context(|| format!("loading {} under a budget", path.display()))?;
    Ok((model, built.context("the layers were built")?))
}

/// Greedy tokens/s of `steps` decode steps after a short prompt, after one
/// warm-up request; the tokens; SSD bytes read per token (prefill counted
/// as one) when `layers` stream.
fn smollm2_decode(
    model: &GgufTextModel,
    layers: Option<&TieredLayers>,
    steps: usize,
) -> Result<(f64, Vec<u32>, f64)> {
    let ids = model.prompt_ids("Why is the sky blue?")?;
    let mut warm = model.new_session();
    model.generate(&mut warm, &ids, 2, false, &mut |_| {})?;
    let read = || {
        layers.map_or(0, |l| {
            l.manager().wait_idle();
            l.stats().ssd_read_bytes
        })
    };
    let before = read();
    let mut session = model.new_session();
    let g = model.generate(&mut session, &ids, steps + 1, false, &mut |_| {})?;
    let streamed = (read() - before) as f64 / (g.decode_steps + 1) as f64;
    Ok((g.decode_tokens_per_s(), g.tokens, streamed))
}

/// The SmolLM2 row: tiered and static under 64 MiB against all in RAM and
/// against the bandwidth bound; adds its criteria.
fn smollm2_rows(
    path: &Path,
    dir: &Path,
    quick: bool,
    criteria: &mut Vec<Criterion>,
) -> Result<serde_json::Value> {
    let steps = if quick { 4 } else { 12 };
    let budget = ByteSize::mib(64).bytes();
    let f32 = LoadOptions::default();
    let resident = GgufTextModel::load(path).context("loading SmolLM2")?;
    let (ram_tps, ram_tokens, _) = smollm2_decode(&resident, None, steps)?;
    drop(resident);
    let rounds = if quick { 1 } else { ROUNDS };
    let (mut best, mut best_static) = (
        None::<(f64, Vec<u32>, f64, Arc<TieredLayers>)>,
        None::<(f64, Vec<u32>)>,
    );
    for _ in 0..rounds {
        let (model, layers) = smollm2_tiered(path, budget, PREFETCH_DEPTH, dir, &f32)?;
        let (tps, tokens, streamed) = smollm2_decode(&model, Some(&layers), steps)?;
        if best.as_ref().is_none_or(|b| tps > b.0) {
            best = Some((tps, tokens, streamed, layers));
        }
        drop(model);
        if quick {
            continue; // --quick: the tiered run only (each load streams 405 MiB out)
        }
        let (model, layers) = smollm2_tiered(path, budget, 0, dir, &f32)?;
        let (tps, tokens, _) = smollm2_decode(&model, Some(&layers), steps)?;
        if best_static.as_ref().is_none_or(|b| tps > b.0) {
            best_static = Some((tps, tokens));
        }
    }
    let (tps, tokens, streamed, layers) = best.context("a tiered round ran")?;
    let static_tps = best_static.as_ref().map(|b| b.0);
    let mut bw = 0f64;
    for _ in 0..3 {
        bw = bw.max(layers.manager().measure_read_bandwidth()?);
    }
    bw = bw.max(layers.stats().ssd_read_bandwidth());
    let disk = DiskProbe::create(dir, quick)?;
    for _ in 0..2 {
        bw = bw.max(disk.rate()?);
    }
    drop(disk);
    let bound = bw / streamed.max(1.0);
    let same = tokens == ram_tokens && best_static.is_none_or(|b| b.1 == ram_tokens);
    let s = layers.stats();
    let images = layers.image_bytes();
    println!(
        "SmolLM2 at 64 MiB ({:.0} MiB of f32 layers, {:.1}x the budget): tiered {:.2} tok/s, static {}, all-in-RAM {:.2}, bound {:.2} ({:.0} MB/token at {:.0} MB/s), peak RAM {:.1} MiB, tokens equal: {same}",
        images as f64 / 1048576.0,
        images as f64 / budget as f64,
        tps,
        static_tps.map_or("- (not run with --quick)".to_string(), |t| format!("{t:.2}")),
        ram_tps,
        bound,
        streamed / 1e6,
        bw / 1e6,
        s.tiers[1].peak as f64 / 1048576.0
    );
    criteria.push(Criterion::higher_is_better(
        "SmolLM2 at 64 MiB: output equals all-in-RAM",
        "bool",
        f64::from(u8::from(same)),
        1.0,
        1.0,
    ));
    criteria.push(Criterion::higher_is_better(
        "SmolLM2 at 64 MiB: tiered vs SSD-bandwidth bound",
        "tokens/s",
        tps,
        bound,
        0.7,
    ));
    // The file's own Q4_1 blocks, resident and streamed: a sixth of the bytes.
    let native = LoadOptions::new(WeightFormat::Native);
    let resident = GgufTextModel::load_with_options(path, &native)?;
    let (native_ram_tps, native_ram_tokens, _) = smollm2_decode(&resident, None, steps)?;
    drop(resident);
    let (model, native_layers) = smollm2_tiered(path, budget, PREFETCH_DEPTH, dir, &native)?;
    let (native_tps, native_tokens, native_streamed) =
        smollm2_decode(&model, Some(&native_layers), steps)?;
    drop(model);
    let native_same = native_tokens == native_ram_tokens;
    let ns = native_layers.stats();
    println!(
        "SmolLM2 native Q4_1 blocks at 64 MiB ({:.1} MiB of layers): tiered {:.2} tok/s (f32 layers {:.2}), all-in-RAM native {:.2}, {:.1} MB read per token, {} of 30 layers kept, tokens equal: {native_same}",
        native_layers.image_bytes() as f64 / 1048576.0,
        native_tps,
        tps,
        native_ram_tps,
        native_streamed / 1e6,
        ns.tiers[1].objects
    );
    criteria.push(Criterion::higher_is_better(
        "SmolLM2 native blocks at 64 MiB: output equals all-in-RAM native",
        "bool",
        f64::from(u8::from(native_same)),
        1.0,
        1.0,
    ));
    criteria.push(Criterion::higher_is_better(
        "SmolLM2 at 64 MiB: native Q4_1 layers vs f32 layers",
        "tokens/s",
        native_tps,
        tps,
        1.0,
    ));
    Ok(json!({
        "native": {
            "layer_image_bytes": native_layers.image_bytes(),
            "tiered_tokens_per_s": native_tps,
            "all_in_ram_tokens_per_s": native_ram_tps,
            "streamed_bytes_per_token": native_streamed,
            "tokens_equal_all_in_ram": native_same,
            "stats": ns,
        },
        "model": path.display().to_string(),
        "budget_bytes": budget,
        "layer_image_bytes": images,
        "decode_steps": steps,
        "tiered_tokens_per_s": tps,
        "static_tokens_per_s": static_tps,
        "all_in_ram_tokens_per_s": ram_tps,
        "streamed_bytes_per_token": streamed,
        "read_bandwidth_bytes_per_s": bw,
        "bound_tokens_per_s": bound,
        "tokens_equal_all_in_ram": same,
        "ram_peak_bytes": s.tiers[1].peak,
        "stats": s,
    }))
}
