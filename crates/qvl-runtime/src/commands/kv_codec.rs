//! `qvl perplexity --kv-codec ...`: the perplexity of a text with the KV
//! cache held int8/int4 (KIVI), against the f32 cache in the same run;
//! `qvl perplexity --weights ...`: with the weight matrices held f32, as
//! the file's own blocks, or re-quantized int8/int4, compared in one run.

use anyhow::{bail, Context, Result};
use qvl_model::fetch::{self, SMOLLM2};
use qvl_model::llama::GgufTextModel;
use qvl_model::{LoadOptions, WeightFormat};
use qvl_runtime::kv_codec::{measure_kv_codecs, KvCodecKind, KvCodecOptions, KvEvalOptions};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// What `qvl perplexity` passes when a KV codec is asked for.
pub struct KvPerplexityArgs {
    /// The .gguf model (default: SmolLM2 from the models cache).
    pub model: Option<PathBuf>,
    /// The text file.
    pub text: PathBuf,
    /// The codecs to compare with the f32 cache (`none` entries are skipped).
    pub codecs: Vec<KvCodecKind>,
    /// Channels per value group.
    pub group_size: usize,
    /// Tokens per KV block (and per key group).
    pub block_tokens: usize,
    /// Newest tokens kept f32.
    pub recent_tokens: usize,
    /// First tokens kept exact.
    pub sink_tokens: usize,
    /// Print JSON.
    pub json: bool,
    /// How the model's weights are held.
    pub weights: WeightFormat,
}

/// Runs the text with the f32 cache and each codec; prints perplexity,
/// its change, KL, top-1 agreement and KV bytes.
pub fn perplexity(args: KvPerplexityArgs) -> Result<ExitCode> {
    let path = gguf_path(args.model)?;
    let text = std::fs::read_to_string(&args.text)
        .with_context(|| format!("reading the text {}", args.text.display()))?;
    let model = GgufTextModel::load_with_options(&path, &LoadOptions::new(args.weights))
        .with_context(|| format!("loading {}", path.display()))?;
    let ids = model.tokenizer().encode(&text, true);
    let codecs: Vec<KvCodecOptions> = args
        .codecs
        .iter()
        .filter(|k| **k != KvCodecKind::None)
        .map(|&kind| KvCodecOptions {
            kind,
            group_size: args.group_size,
            key_group_tokens: args.block_tokens,
            sink_tokens: args.sink_tokens,
            recent_tokens: args.recent_tokens,
            ..KvCodecOptions::default()
        })
        .collect();
    let eval = KvEvalOptions {
        block_tokens: args.block_tokens,
        ..KvEvalOptions::default()
    };
    let report = measure_kv_codecs(&model, &ids, &codecs, eval)?;
    print_report(&report, &path, args.json);
    Ok(ExitCode::SUCCESS)
}

/// The .gguf to run: `model`, or SmolLM2 from the models cache.
fn gguf_path(model: Option<PathBuf>) -> Result<PathBuf> {
    let path = match model {
        Some(p) => p,
        None => fetch::find_cached(&SMOLLM2).with_context(|| {
            format!(
                "{} is not in the models cache: run `qvl fetch-model smollm2` or pass --model PATH",
                SMOLLM2.file_name
            )
        })?,
    };
    if path.is_dir() {
        bail!(
            "{} is a directory; `qvl perplexity` runs GGUF models (a .gguf file)",
            path.display()
        );
    }
    Ok(path)
}

/// One weight format's run of [`weights_perplexity`].
#[derive(Debug, Clone, PartialEq)]
pub struct WeightsRun {
    /// The format.
    pub weights: WeightFormat,
    /// Perplexity of the text.
    pub perplexity: f64,
    /// Change against the first format's perplexity.
    pub perplexity_rel_change: f64,
    /// Resident weight bytes.
    pub weight_bytes: usize,
    /// Bits per weight of the layers' matrices and the lm head.
    pub bits_per_weight: f64,
    /// Largest relative error of a re-quantized matrix (0 when none was).
    pub max_rel_error: f64,
    /// Seconds to load.
    pub load_secs: f64,
    /// Seconds to score the text.
    pub secs: f64,
}

/// Scores the text in `text_file` with the weights held as each of
/// `formats` (the first is the baseline), one model at a time.
pub fn weights_perplexity(
    model: Option<PathBuf>,
    text_file: &Path,
    formats: &[WeightFormat],
    json: bool,
) -> Result<ExitCode> {
    let path = gguf_path(model)?;
    let text = std::fs::read_to_string(text_file)
        .with_context(|| format!("reading the text {}", text_file.display()))?;
    let mut runs: Vec<WeightsRun> = Vec::new();
    let mut tokens = 0;
    for &weights in formats {
        let t = std::time::Instant::now();
        let model = GgufTextModel::load_with_options(&path, &LoadOptions::new(weights))
            .with_context(|| format!("loading {} with {weights} weights", path.display()))?;
        let load_secs = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        let p = model.perplexity_of_text(&text)?;
        let secs = t.elapsed().as_secs_f64();
        tokens = p.tokens;
        let base = runs.first().map_or(p.perplexity, |r| r.perplexity);
        let d = model.decoder();
        let c = d.config();
        let per_layer = c.num_heads * c.head_dim * c.hidden_size * 2
            + c.num_kv_heads * c.head_dim * c.hidden_size * 2
            + 3 * c.hidden_size * c.intermediate_size;
        let params = per_layer * c.num_layers + c.vocab_size * c.hidden_size;
        runs.push(WeightsRun {
            weights,
            perplexity: p.perplexity,
            perplexity_rel_change: p.perplexity / base - 1.0,
            weight_bytes: model.weight_bytes(),
            bits_per_weight: d.weight_bytes_per_token() as f64 * 8.0 / params as f64,
            max_rel_error: model.weight_report().max_rel_error(),
            load_secs,
            secs,
        });
    }
    if json {
        let list: Vec<serde_json::Value> = runs
            .iter()
            .map(|r| {
                serde_json::json!({
                    "weights": r.weights.to_string(),
                    "perplexity": r.perplexity,
                    "perplexity_rel_change": r.perplexity_rel_change,
                    "weight_bytes": r.weight_bytes,
                    "bits_per_weight": r.bits_per_weight,
                    "max_rel_error": r.max_rel_error,
                    "load_secs": r.load_secs,
                    "secs": r.secs,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "model": path.display().to_string(),
                "tokens": tokens,
                "runs": list,
            })
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!("{} tokens of {}", tokens, text_file.display());
    println!(
        "{:<12} {:>11} {:>9} {:>10} {:>8} {:>10} {:>8} {:>8}",
        "weights", "perplexity", "change", "MiB", "bits/w", "max err", "load s", "score s"
    );
    for r in &runs {
        println!(
            "{:<12} {:>11.4} {:>+8.4}% {:>10.1} {:>8.2} {:>10.4} {:>8.2} {:>8.2}",
            r.weights.to_string(),
            r.perplexity,
            100.0 * r.perplexity_rel_change,
            r.weight_bytes as f64 / (1 << 20) as f64,
            r.bits_per_weight,
            r.max_rel_error,
            r.load_secs,
            r.secs
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn print_report(report: &qvl_runtime::kv_codec::KvQualityReport, model: &Path, json: bool) {
    if json {
        let runs: Vec<serde_json::Value> = report
            .runs
            .iter()
            .map(|r| {
                let s = r.stats;
                serde_json::json!({
                    "kv_codec": r.kind.as_str(),
                    "codec": r.codec,
                    "perplexity": r.perplexity,
                    "perplexity_rel_change": r.perplexity_rel_change,
                    "nll_mean": r.nll_mean,
                    "kl_mean": r.kl_mean,
                    "kl_max": r.kl_max,
                    "top1_agreement": r.top1_agreement,
                    "kv_held_bytes": s.held_bytes,
                    "kv_f16_bytes": s.f16_bytes,
                    "kv_f32_bytes": s.f32_bytes,
                    "encoded_bytes": s.encoded_bytes,
                    "quantized_fraction": s.quantized_fraction(),
                    "quantized_bits_per_value": s.quantized_bits_per_value(),
                    "secs": r.secs,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "model": model.display().to_string(),
                "tokens": report.tokens,
                "block_tokens": report.eval.block_tokens,
                "chunk_tokens": report.eval.chunk_tokens,
                "runs": runs,
            })
        );
        return;
    }
    println!(
        "{} tokens, KV blocks of {} tokens, prefill chunks of {}",
        report.tokens, report.eval.block_tokens, report.eval.chunk_tokens
    );
    println!(
        "{:<6} {:>11} {:>9} {:>10} {:>7} {:>12} {:>12} {:>10} {:>10}",
        "kv", "perplexity", "change", "KL", "top-1", "KV held B", "f16 B", "quantized", "bits/q"
    );
    for r in &report.runs {
        let s = r.stats;
        println!(
            "{:<6} {:>11.4} {:>+8.4}% {:>10.2e} {:>7.4} {:>12} {:>12} {:>9.1}% {:>10.2}",
            r.kind.as_str(),
            r.perplexity,
            100.0 * r.perplexity_rel_change,
            r.kl_mean,
            r.top1_agreement,
            s.held_bytes,
            s.f16_bytes,
            100.0 * s.quantized_fraction(),
            s.quantized_bits_per_value()
        );
    }
}
