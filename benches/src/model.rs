//! `model`: prefill and decode speed of a Qwen3-VL-2B-shaped text decoder
//! (real widths, random bf16 weights, fewer layers), against the bounds
//! measured in the same run:
//!
//! - decode tokens/s against the memory-bandwidth bound: one decode step
//!   reads every weight byte once, so it cannot beat
//!   `RAM read bandwidth / weight bytes per token`;
//! - batched prefill tokens/s against feeding the same prompt one token at
//!   a time (the plain path without batching);
//! - batched decode (several sequences per forward) at batch 1, 2, 4, 8 and
//!   a request stream through the continuous-batching scheduler
//!   ([`batch`]).

use crate::BenchOptions;
use anyhow::{Context, Result};
use qvl_core::bench::{BenchReport, Criterion};
use qvl_core::DType;
use qvl_model::config::{DecoderConfig, RopeConfig, RopeKind};
use qvl_model::ops::{argmax, Activation};
use qvl_model::random::{decoder_tensor_shapes, random_weights};
use qvl_model::text::{ForwardInput, PROGRESS_CHUNK_TOKENS};
use qvl_model::{DecoderTensorNames, Logits, TextDecoder};
use std::time::Instant;

mod batch;

/// Qwen3-VL-2B's text widths with `layers` decoder layers.
fn qwen3vl_2b_text(layers: usize) -> DecoderConfig {
    DecoderConfig {
        vocab_size: 151_936,
        hidden_size: 2048,
        intermediate_size: 6144,
        num_layers: layers,
        num_heads: 16,
        num_kv_heads: 8,
        head_dim: 128,
        rms_norm_eps: 1e-6,
        rope: RopeConfig {
            theta: 5_000_000.0,
            kind: RopeKind::MRope {
                section: [24, 20, 20],
                interleaved: true,
            },
        },
        qk_norm: true,
        attention_bias: false,
        tie_word_embeddings: true,
        hidden_act: Activation::Silu,
    }
}

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Best-of-`reps` read bandwidth (bytes/s) of summing a `bytes`-sized
/// buffer with every core, the access pattern of a decode step.
fn read_bandwidth(bytes: usize, reps: usize) -> (f64, f64) {
    let words = bytes / 8;
    let threads = threads();
    let buf: Vec<u64> = (0..words as u64).collect();
    let mut best_par = f64::MAX;
    let mut best_copy = f64::MAX;
    let mut dst = vec![0u64; words];
    for _ in 0..reps {
        let t = Instant::now();
        let per = words.div_ceil(threads);
        let s: u64 = std::thread::scope(|scope| {
            let handles: Vec<_> = buf
                .chunks(per)
                .map(|c| scope.spawn(move || c.iter().fold(0u64, |a, &b| a.wrapping_add(b))))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(0))
                .fold(0, u64::wrapping_add)
        });
        std::hint::black_box(s);
        best_par = best_par.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        dst.copy_from_slice(&buf);
        std::hint::black_box(&dst);
        best_copy = best_copy.min(t.elapsed().as_secs_f64());
    }
    // memcpy moves each byte twice (read and write).
    (bytes as f64 / best_par, 2.0 * bytes as f64 / best_copy)
}

/// Runs the benchmark.
pub fn run(opts: &BenchOptions) -> Result<BenchReport> {
    let (layers, prompt_len, decode_steps, stepwise_len) = if opts.quick {
        (2, 64, 8, 16)
    } else {
        (4, 256, 32, 32)
    };
    let cfg = qwen3vl_2b_text(layers);
    let names = DecoderTensorNames::qwen3_vl();
    let t = Instant::now();
    let weights = random_weights(&decoder_tensor_shapes(&cfg, &names), DType::Bf16, 7)
        .context("generating random weights")?;
    let gen_s = t.elapsed().as_secs_f64();
    let decoder =
        TextDecoder::load(cfg.clone(), &weights, &names).context("loading the decoder")?;
    let bytes_per_token = decoder.weight_bytes_per_token();

    let bw_bytes = if opts.quick { 512 << 20 } else { 1 << 30 };
    let (read_bw_before, copy_bw) = read_bandwidth(bw_bytes, 5);

    let prompt: Vec<u32> = (0..prompt_len as u32)
        .map(|i| (i * 7919 + 13) % 150_000)
        .collect();
    let positions: Vec<[i64; 3]> = (0..prompt_len as i64).map(|p| [p; 3]).collect();

    // Batched prefill (one warm-up run so page faults of the weights are not timed).
    {
        let mut cache = decoder.new_cache();
        let n = 8.min(prompt_len);
        decoder.forward(
            &mut cache,
            decoder.embed(&prompt[..n])?,
            &prompt[..n],
            &positions[..n],
            None,
            Logits::Last,
        )?;
    }
    let mut cache = decoder.new_cache();
    let t = Instant::now();
    let logits = decoder.forward(
        &mut cache,
        decoder.embed(&prompt)?,
        &prompt,
        &positions,
        None,
        Logits::Last,
    )?;
    let prefill_s = t.elapsed().as_secs_f64();
    let prefill_tps = prompt_len as f64 / prefill_s;

    // Greedy decode after the prompt.
    let mut next = argmax(&logits) as u32;
    let t = Instant::now();
    for step in 0..decode_steps {
        let pos = (prompt_len + step) as i64;
        let l = decoder.forward(
            &mut cache,
            decoder.embed(&[next])?,
            &[next],
            &[[pos; 3]],
            None,
            Logits::Last,
        )?;
        next = argmax(&l) as u32;
    }
    let decode_s = t.elapsed().as_secs_f64();
    let decode_tps = decode_steps as f64 / decode_s;

    // Bandwidth again after decoding; the best of both is the bound (other
    // load on the machine only ever lowers a measurement).
    let (read_bw_after, _) = read_bandwidth(bw_bytes, 5);
    let read_bw = read_bw_before.max(read_bw_after);
    let bound_tps = read_bw / bytes_per_token as f64;

    // Baseline for prefill: the same prompt one token at a time.
    let mut cache = decoder.new_cache();
    let t = Instant::now();
    for i in 0..stepwise_len {
        decoder.forward(
            &mut cache,
            decoder.embed(&prompt[i..=i])?,
            &prompt[i..=i],
            &positions[i..=i],
            None,
            Logits::Last,
        )?;
    }
    let stepwise_tps = stepwise_len as f64 / t.elapsed().as_secs_f64();

    // Prefill in the chunks `qvl run` uses to show progress, against one
    // pass over the same long prompt; alternated, best of two each (one
    // each when quick).
    let long_len = 4 * PROGRESS_CHUNK_TOKENS;
    let long_prompt: Vec<u32> = (0..long_len as u32)
        .map(|i| (i * 7919 + 13) % 150_000)
        .collect();
    let long_positions: Vec<[i64; 3]> = (0..long_len as i64).map(|p| [p; 3]).collect();
    let (mut one_pass_s, mut chunked_s) = (f64::MAX, f64::MAX);
    let mut chunked_logits = Vec::new();
    let mut one_pass_logits = Vec::new();
    for _ in 0..if opts.quick { 1 } else { 2 } {
        let mut cache = decoder.new_cache();
        let t = Instant::now();
        one_pass_logits = decoder.forward(
            &mut cache,
            decoder.embed(&long_prompt)?,
            &long_prompt,
            &long_positions,
            None,
            Logits::Last,
        )?;
        one_pass_s = one_pass_s.min(t.elapsed().as_secs_f64());
        let mut cache = decoder.new_cache();
        let t = Instant::now();
        chunked_logits = decoder.forward_with_progress(
            &mut cache,
            ForwardInput {
                hidden: decoder.embed(&long_prompt)?,
                tokens: &long_prompt,
                positions: &long_positions,
                deepstack: None,
            },
            Logits::Last,
            PROGRESS_CHUNK_TOKENS,
            &mut |_, _| {},
        )?;
        chunked_s = chunked_s.min(t.elapsed().as_secs_f64());
    }
    let chunked_max_diff = chunked_logits
        .iter()
        .zip(&one_pass_logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);

    let mut report = BenchReport::new("model");
    report.criteria.push(Criterion::higher_is_better(
        format!(
            "prefill of {long_len} tokens in chunks of {PROGRESS_CHUNK_TOKENS} (qvl run's progress) vs one pass"
        ),
        "tokens/s",
        long_len as f64 / chunked_s,
        long_len as f64 / one_pass_s,
        0.95,
    ));
    report.criteria.push(Criterion::higher_is_better(
        "decode tokens/s vs memory-bandwidth bound",
        "tokens/s",
        decode_tps,
        bound_tps,
        0.5,
    ));
    report.criteria.push(Criterion::higher_is_better(
        "batched prefill vs token-by-token",
        "tokens/s",
        prefill_tps,
        stepwise_tps,
        2.0,
    ));
    report.details = serde_json::json!({
        "model": "Qwen3-VL-2B text widths, random bf16 weights",
        "layers": layers,
        "hidden_size": cfg.hidden_size,
        "heads": cfg.num_heads,
        "kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
        "weight_bytes_per_token": bytes_per_token,
        "ram_read_bandwidth_gb_s": read_bw / 1e9,
        "ram_read_bandwidth_before_after_gb_s": [read_bw_before / 1e9, read_bw_after / 1e9],
        "ram_memcpy_bandwidth_gb_s": copy_bw / 1e9,
        "decode_bound_tokens_per_s": bound_tps,
        "decode_tokens_per_s": decode_tps,
        "decode_effective_gb_s": decode_tps * bytes_per_token as f64 / 1e9,
        "decode_steps": decode_steps,
        "prefill_tokens": prompt_len,
        "long_prefill_tokens": long_len,
        "long_prefill_one_pass_seconds": one_pass_s,
        "long_prefill_chunked_seconds": chunked_s,
        "long_prefill_chunked_max_abs_logit_diff": chunked_max_diff,
        "prefill_seconds": prefill_s,
        "prefill_tokens_per_s": prefill_tps,
        "token_by_token_tokens_per_s": stepwise_tps,
        "token_by_token_tokens": stepwise_len,
        "weight_generation_seconds": gen_s,
        "threads": threads(),
    });
    // The batch part loads its own model: free this one first.
    drop((decoder, weights, cache));
    let (criteria, details) = batch::run(opts).context("batched decoding")?;
    report.criteria.extend(criteria);
    report.details["batch"] = details;
    Ok(report)
}
