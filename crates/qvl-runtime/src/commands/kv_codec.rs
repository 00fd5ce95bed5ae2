//! `qvl perplexity --kv-codec ...`: the perplexity of a text with the KV
//! cache held int8/int4 (KIVI), against the f32 cache in the same run.

use anyhow::{bail, Context, Result};
use qvl_model::fetch::{self, SMOLLM2};
use qvl_model::llama::GgufTextModel;
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
}

/// Runs the text with the f32 cache and each codec; prints perplexity,
/// its change, KL, top-1 agreement and KV bytes.
pub fn perplexity(args: KvPerplexityArgs) -> Result<ExitCode> {
    let path = match args.model {
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
    let text = std::fs::read_to_string(&args.text)
        .with_context(|| format!("reading the text {}", args.text.display()))?;
    let model =
        GgufTextModel::load(&path).with_context(|| format!("loading {}", path.display()))?;
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
