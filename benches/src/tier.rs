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

/// Layers read ahead by the tiered runs.
const PREFETCH_DEPTH: usize = 2;
/// Rounds of each tiered and static measurement (best kept).
const ROUNDS: usize = 2;

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

struct Run {
    tokens_per_s: f64,
    streamed_per_token: f64,
    tokens: Vec<u32>,
    layers: Arc<TieredLayers>,
    decoder: TextDecoder,
}

fn tiered(
    cfg: &DecoderConfig,
    src: &SafetensorsFile,
    names: &DecoderTensorNames,
    budget: u64,
    prefetch_depth: usize,
    dir: &Path,
    steps: usize,
) -> Result<Run> {
    let tier = TierConfig {
        cpu_ram: ByteSize(budget),
        prefetch_depth,
        spill_dir: Some(dir.to_path_buf()),
        ..TierConfig::default()
    };
    let (decoder, layers) = TieredLayers::load_decoder(cfg.clone(), src, names, tier)
        .context("loading the tiered decoder")?;
    // Warm-up: placement settles on the first tokens.
    decode(&decoder, 2)?;
    layers.manager().wait_idle();
    let before = layers.stats().ssd_read_bytes;
    let (tokens_per_s, tokens) = decode(&decoder, steps)?;
    layers.manager().wait_idle();
    // The prefill of 4 tokens also streams once: count it as a token.
    let streamed = (layers.stats().ssd_read_bytes - before) as f64 / (steps + 1) as f64;
    Ok(Run {
        tokens_per_s,
        streamed_per_token: streamed,
        tokens,
        layers,
        decoder,
    })
}

/// Runs the benchmark.
pub fn run(opts: &BenchOptions) -> Result<BenchReport> {
    let quick = opts.quick;
    let steps = 16;
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
    let (mut ram_tps, ram_tokens) = decode(&resident, steps)?;
    for _ in 1..ROUNDS {
        ram_tps = ram_tps.max(decode(&resident, steps)?.0);
    }
    let weight_bytes = resident.weight_bytes_per_token();
    drop(resident);

    // Budgets are fractions of the layer images (what the tier holds).
    let probe = tiered(&cfg, &src, &names, u64::MAX / 4, 1, &dir, 1)?;
    let image_bytes = probe.layers.image_bytes();
    drop(probe);

    let mut rows = Vec::new();
    let mut criteria = Vec::new();
    let mut quarter = None;
    let mut static_quarter = None;
    for (label, num, den) in [("1", 1, 1), ("1/2", 1, 2), ("1/4", 1, 4)] {
        let budget = image_bytes * num / den;
        // Two rounds, alternating, best of each: the machine is shared and
        // a single run is noisy. Depth 2 keeps the I/O queue non-empty
        // across the reader's wake-ups.
        let mut run = tiered(&cfg, &src, &names, budget, PREFETCH_DEPTH, &dir, steps)?;
        let mut stat = tiered(&cfg, &src, &names, budget, 0, &dir, steps)?;
        for _ in 1..ROUNDS {
            let again = tiered(&cfg, &src, &names, budget, PREFETCH_DEPTH, &dir, steps)?;
            if again.tokens_per_s > run.tokens_per_s {
                run = again;
            }
            let again = tiered(&cfg, &src, &names, budget, 0, &dir, steps)?;
            if again.tokens_per_s > stat.tokens_per_s {
                stat = again;
            }
        }
        // The best of three passes: the bound must not be lowered by a
        // noisy pass on a shared disk.
        let mut bw = 0f64;
        for _ in 0..3 {
            bw = bw.max(
                run.layers
                    .manager()
                    .measure_read_bandwidth()
                    .context("measuring read bandwidth")?,
            );
        }
        // The rate the stream's own reads ran at counts too (on a
        // virtualized disk the probe alone can come out low): the higher
        // rate gives the stricter bound.
        let probe_bw = bw;
        bw = bw.max(run.layers.stats().ssd_read_bandwidth());
        let bound = if run.streamed_per_token > 0.0 {
            bw / run.streamed_per_token
        } else {
            f64::INFINITY
        };
        let same = run.tokens == ram_tokens && stat.tokens == ram_tokens;
        let s = run.layers.stats();
        rows.push(json!({
            "budget": label,
            "budget_bytes": budget,
            "tiered_tokens_per_s": run.tokens_per_s,
            "static_tokens_per_s": stat.tokens_per_s,
            "all_in_ram_tokens_per_s": ram_tps,
            "streamed_bytes_per_token": run.streamed_per_token,
            "static_streamed_bytes_per_token": stat.streamed_per_token,
            "read_bandwidth_bytes_per_s": bw,
            "probe_read_bandwidth_bytes_per_s": probe_bw,
            "bound_tokens_per_s": bound,
            "tokens_equal_all_in_ram": same,
            "ram_peak_bytes": s.tiers[1].peak,
            "stats": s,
        }));
        println!(
            "budget {label}: tiered {:.2} tok/s, static {:.2}, all-in-RAM {:.2}, bound {:.2} ({:.0} MB/token at {:.0} MB/s), peak RAM {:.0}/{:.0} MB",
            run.tokens_per_s,
            stat.tokens_per_s,
            ram_tps,
            bound,
            run.streamed_per_token / 1e6,
            bw / 1e6,
            s.tiers[1].peak as f64 / 1e6,
            budget as f64 / 1e6
        );
        criteria.push(Criterion::higher_is_better(
            format!("budget {label}: output equals all-in-RAM"),
            "bool",
            f64::from(u8::from(same)),
            1.0,
            1.0,
        ));
        if den == 4 {
            quarter = Some((run, bound));
            static_quarter = Some(stat.tokens_per_s);
        } else if den == 1 {
            criteria.push(Criterion::higher_is_better(
                "budget 1x: tiered vs all in RAM",
                "tokens/s",
                run.tokens_per_s,
                ram_tps,
                0.9,
            ));
        }
    }
    let (run, bound) = quarter.context("the 1/4 budget ran")?;
    let static_tps = static_quarter.context("the static run ran")?;
    criteria.push(Criterion::higher_is_better(
        "budget 1/4: tiered vs SSD-bandwidth bound",
        "tokens/s",
        run.tokens_per_s,
        bound,
        0.7,
    ));
    criteria.push(Criterion::higher_is_better(
        "budget 1/4: tiered vs static placement",
        "tokens/s",
        run.tokens_per_s,
        static_tps,
        1.0,
    ));

    // Long session: many short requests on the 1/4-budget decoder.
    let requests = if quick { 12 } else { 40 };
    let mut rss = Vec::new();
    let mut ram_used = Vec::new();
    for r in 0..requests {
        decode(&run.decoder, 3)?;
        run.layers.manager().wait_idle();
        if r >= 2 {
            rss.push(rss_bytes());
            ram_used.push(run.layers.stats().tiers[1].used);
        }
    }
    let first_rss = *rss.first().context("samples")? as f64;
    let max_rss = rss.iter().copied().max().unwrap_or(0) as f64;
    let s = run.layers.stats();
    let budget = s.tiers[1].budget as f64;
    criteria.push(Criterion::lower_is_better(
        format!("long session ({requests} requests): max RSS vs RSS after warm-up"),
        "bytes",
        max_rss,
        first_rss,
        0.97,
    ));
    criteria.push(Criterion::lower_is_better(
        "long session: peak accounted RAM vs budget",
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
        "all_in_ram_tokens_per_s": ram_tps,
        "budgets": rows,
        "smollm2": smollm2,
        "long_session": {
            "requests": requests,
            "rss_bytes": rss,
            "ram_used_bytes": ram_used,
            "final_stats": s,
        },
        "notes": "static placement = same tier manager with prefetch_depth 0: the first layers that fit stay resident (hysteresis keeps them), the rest are read on demand every token. Reads are pread with posix_fadvise(DONTNEED) after each read, so the page cache does not serve them; the bandwidth bound is measured with the same reads in the same run.",
    });
    drop(run);
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
