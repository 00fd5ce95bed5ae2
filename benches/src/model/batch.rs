//! Batched decoding in the `model` phase: aggregate decode tokens/s at
//! batch sizes 1, 2, 4 and 8 on one model in one run (SmolLM2-135M when the
//! GGUF is cached, else random weights of its widths), and a mixed-length
//! request stream through the continuous-batching scheduler against
//! serving the same requests one at a time.

use crate::BenchOptions;
use anyhow::{Context, Result};
use qvl_core::bench::Criterion;
use qvl_core::DType;
use qvl_model::batch::{self, BatchConfig, BatchRunStats, BatchScheduler, Request};
use qvl_model::config::{DecoderConfig, RopeConfig, RopeKind};
use qvl_model::fetch::{find_cached, SMOLLM2};
use qvl_model::llama::GgufTextModel;
use qvl_model::ops::Activation;
use qvl_model::random::{decoder_tensor_shapes, random_weights};
use qvl_model::{DecoderTensorNames, Logits, PagedKvCache, TextDecoder};
use std::time::Instant;

/// The batch sizes measured.
const BATCH_SIZES: [usize; 4] = [1, 2, 4, 8];

/// SmolLM2-135M's widths with `layers` layers (the fallback model).
fn smollm2_widths(layers: usize) -> DecoderConfig {
    DecoderConfig {
        vocab_size: 49_152,
        hidden_size: 576,
        intermediate_size: 1536,
        num_layers: layers,
        num_heads: 9,
        num_kv_heads: 3,
        head_dim: 64,
        rms_norm_eps: 1e-5,
        rope: RopeConfig {
            theta: 100_000.0,
            kind: RopeKind::Plain,
        },
        qk_norm: false,
        attention_bias: false,
        tie_word_embeddings: true,
        hidden_act: Activation::Silu,
    }
}

/// The decoder measured and what it is.
enum Model {
    Gguf(Box<GgufTextModel>),
    Random(Box<TextDecoder>),
}

impl Model {
    fn decoder(&self) -> &TextDecoder {
        match self {
            Model::Gguf(m) => m.decoder(),
            Model::Random(d) => d,
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => 0.5 * (v[n / 2 - 1] + v[n / 2]),
    }
}

/// A deterministic prompt of `len` ids for sequence `seed`.
fn prompt(seed: usize, len: usize, vocab: usize) -> Vec<u32> {
    (0..len)
        .map(|i| ((i * 7919 + seed * 104_729 + 13) % (vocab - 1)) as u32 + 1)
        .collect()
}

/// A cache holding `prompt`.
fn prefilled(dec: &TextDecoder, prompt: &[u32]) -> Result<PagedKvCache> {
    let mut cache = dec.new_cache();
    let pos: Vec<[i64; 3]> = (0..prompt.len() as i64).map(|i| [i; 3]).collect();
    dec.forward(
        &mut cache,
        dec.embed(prompt)?,
        prompt,
        &pos,
        None,
        Logits::Last,
    )?;
    Ok(cache)
}

/// Per-request latencies of a scheduler run: (median, max) seconds from
/// submission to finishing, and the median time to the first token.
fn latencies(stats: &BatchRunStats) -> (f64, f64, f64) {
    let mut total: Vec<f64> = stats.finished.iter().map(|f| f.total_secs).collect();
    let mut first: Vec<f64> = stats.finished.iter().map(|f| f.first_token_secs).collect();
    let max = total.iter().copied().fold(0.0, f64::max);
    (median(&mut total), max, median(&mut first))
}

/// Runs the batch measurements; returns the criteria and the details.
pub fn run(opts: &BenchOptions) -> Result<(Vec<Criterion>, serde_json::Value)> {
    let t = Instant::now();
    let (model, model_name) = match find_cached(&SMOLLM2) {
        Some(path) => (
            Model::Gguf(Box::new(
                GgufTextModel::load(&path)
                    .with_context(|| format!("loading {}", path.display()))?,
            )),
            format!("SmolLM2-135M-Instruct ({})", path.display()),
        ),
        None => {
            let layers = if opts.quick { 8 } else { 30 };
            let cfg = smollm2_widths(layers);
            let names = DecoderTensorNames::hugging_face("model", "lm_head.weight");
            let weights = random_weights(&decoder_tensor_shapes(&cfg, &names), DType::F32, 3)
                .context("generating random weights")?;
            (
                Model::Random(Box::new(TextDecoder::load(cfg, &weights, &names)?)),
                format!(
                    "SmolLM2-135M widths, {layers} layers, random f32 weights (GGUF not cached)"
                ),
            )
        }
    };
    let load_s = t.elapsed().as_secs_f64();
    let dec = model.decoder();
    let vocab = dec.config().vocab_size;
    let (rounds, steps_per_round, prompt_len) = if opts.quick { (2, 3, 24) } else { (4, 6, 64) };

    // One set of sequences per batch size, so every size sees the same
    // context lengths; sizes take turns round by round (load on the
    // machine hits them alike) and each step is timed on its own.
    let mut sets: Vec<Vec<PagedKvCache>> = Vec::new();
    for &b in &BATCH_SIZES {
        let set = (0..b)
            .map(|s| prefilled(dec, &prompt(s, prompt_len, vocab)))
            .collect::<Result<Vec<_>>>()?;
        sets.push(set);
    }
    let mut step_secs: Vec<Vec<f64>> = vec![Vec::new(); BATCH_SIZES.len()];
    for _round in 0..rounds {
        for (si, set) in sets.iter_mut().enumerate() {
            let tokens: Vec<u32> = (0..set.len()).map(|s| (s * 31 + 7) as u32).collect();
            for _ in 0..steps_per_round {
                let mut refs: Vec<&mut PagedKvCache> = set.iter_mut().collect();
                let t = Instant::now();
                let logits = batch::decode_step(dec, &mut refs, &tokens)?;
                step_secs[si].push(t.elapsed().as_secs_f64());
                std::hint::black_box(logits);
            }
        }
    }
    drop(sets);
    let per_size: Vec<(usize, f64, f64)> = BATCH_SIZES
        .iter()
        .zip(step_secs.iter_mut())
        .map(|(&b, secs)| {
            let step = median(secs);
            (b, step, b as f64 / step)
        })
        .collect();
    let tps1 = per_size[0].2;
    let tps8 = per_size[3].2;

    // A mixed-length request stream: joining as others leave, batched
    // against one at a time (the same scheduler with max_batch 1).
    let n_requests = if opts.quick { 8 } else { 16 };
    let requests: Vec<Request> = (0..n_requests)
        .map(|i| Request {
            prompt: prompt(100 + i, 8 + (i * 13) % 41, vocab),
            max_tokens: if opts.quick {
                2 + (i * 5) % 9
            } else {
                4 + (i * 7) % 29
            },
            stop_tokens: Vec::new(),
        })
        .collect();
    let serve = |max_batch: usize| -> Result<BatchRunStats> {
        let mut sched = BatchScheduler::new(
            dec,
            BatchConfig {
                max_batch,
                ..BatchConfig::default()
            },
        )?;
        for r in &requests {
            sched.submit(r.clone())?;
        }
        Ok(sched.run(&mut |_| {})?)
    };
    let stream_rounds = if opts.quick { 1 } else { 2 };
    let (mut batched_tps, mut single_tps) = (Vec::new(), Vec::new());
    let (mut batched, mut single) = (None, None);
    for _ in 0..stream_rounds {
        let b = serve(8)?;
        batched_tps.push(b.tokens_per_s());
        batched = Some(b);
        let s = serve(1)?;
        single_tps.push(s.tokens_per_s());
        single = Some(s);
    }
    let (batched, single) = (
        batched.context("no batched run")?,
        single.context("no single run")?,
    );
    let (stream_tps, single_stream_tps) = (median(&mut batched_tps), median(&mut single_tps));
    let (b_p50, b_max, b_ttft) = latencies(&batched);
    let (s_p50, s_max, s_ttft) = latencies(&single);

    let criteria = vec![
        Criterion::higher_is_better(
            "batched decode: batch 8 vs batch 1 aggregate",
            "tokens/s",
            tps8,
            tps1,
            1.0,
        ),
        Criterion::higher_is_better(
            "continuous batching (max 8) vs one request at a time",
            "tokens/s",
            stream_tps,
            single_stream_tps,
            1.0,
        ),
    ];
    let details = serde_json::json!({
        "model": model_name,
        "load_seconds": load_s,
        "prompt_tokens_per_sequence": prompt_len,
        "timed_steps_per_batch_size": rounds * steps_per_round,
        "per_batch_size": per_size.iter().map(|&(b, step, tps)| serde_json::json!({
            "batch": b,
            "median_step_ms": step * 1e3,
            "tokens_per_s": tps,
            "ratio_vs_batch_1": tps / tps1,
        })).collect::<Vec<_>>(),
        "request_stream": {
            "requests": n_requests,
            "prompt_tokens": batched.prompt_tokens,
            "generated_tokens": batched.generated_tokens,
            "batched_max_8": {
                "tokens_per_s": stream_tps,
                "seconds": batched.secs,
                "steps": batched.steps,
                "peak_batch": batched.peak_batch,
                "peak_kv_blocks": batched.peak_kv_blocks,
                "latency_median_s": b_p50,
                "latency_max_s": b_max,
                "first_token_median_s": b_ttft,
            },
            "one_at_a_time": {
                "tokens_per_s": single_stream_tps,
                "seconds": single.secs,
                "steps": single.steps,
                "latency_median_s": s_p50,
                "latency_max_s": s_max,
                "first_token_median_s": s_ttft,
            },
        },
    });
    Ok((criteria, details))
}
