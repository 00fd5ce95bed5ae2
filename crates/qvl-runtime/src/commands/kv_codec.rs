//! `qvl perplexity --kv-codec ...`: the perplexity of a text with the KV
//! cache held int8/int4 (KIVI), low rank, sparse or as the selector
//! chooses per layer, against the f32 cache in the same run;
//! `qvl perplexity --weights ...`: with the weight matrices held f32, as
//! the file's own blocks, or re-quantized int8/int4, compared in one run.

use anyhow::{bail, Context, Result};
use qvl_model::fetch::{self, SMOLLM2};
use qvl_model::llama::GgufTextModel;
use qvl_model::{LoadOptions, WeightFormat};
use qvl_runtime::kv_codec::{
    measure_kv_codecs, AutoKvOptions, KvCodecOptions, KvCodecPlan, KvCodecSpec, KvEvalOptions,
};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// What `qvl perplexity` passes when a KV codec is asked for.
pub struct KvPerplexityArgs {
    /// The .gguf model (default: SmolLM2 from the models cache).
    pub model: Option<PathBuf>,
    /// The text file.
    pub text: PathBuf,
    /// The codecs to compare with the f32 cache (`none` entries are skipped).
    pub codecs: Vec<KvCodecSpec>,
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
    /// `auto`: largest relative error of an encoded keys or values slab.
    pub error_budget: f64,
    /// `auto`: layers kept exact (negative counts from the last).
    pub critical_layers: Vec<i64>,
}

/// Parses `--kv-critical-layers`: `none` or comma-separated layer numbers,
/// negative ones counting from the last layer.
pub fn parse_critical_layers(s: &str) -> Result<Vec<i64>, String> {
    let s = s.trim();
    if s.is_empty() || s.eq_ignore_ascii_case("none") {
        return Ok(Vec::new());
    }
    s.split(',')
        .map(|part| {
            part.trim().parse::<i64>().map_err(|_| {
                format!(
                    "critical layer `{}` in `{s}` is not an integer (expected e.g. 0,-1 or none)",
                    part.trim()
                )
            })
        })
        .collect()
}

/// Checks `--kv-error-budget`.
pub fn parse_error_budget(s: &str) -> Result<f64, String> {
    let b: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("KV error budget `{s}` is not a number (e.g. 0.1)"))?;
    if b.is_finite() && b >= 0.0 {
        Ok(b)
    } else {
        Err(format!(
            "KV error budget {b} must be a finite relative error >= 0"
        ))
    }
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
    let codecs: Vec<KvCodecPlan> = args
        .codecs
        .iter()
        .filter(|k| **k != KvCodecSpec::None)
        .map(|&spec| KvCodecPlan {
            spec,
            options: KvCodecOptions {
                group_size: args.group_size,
                key_group_tokens: args.block_tokens,
                sink_tokens: args.sink_tokens,
                recent_tokens: args.recent_tokens,
                ..KvCodecOptions::default()
            },
            auto: AutoKvOptions {
                error_budget: args.error_budget,
                critical_layers: args.critical_layers.clone(),
                ..AutoKvOptions::default()
            },
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
                let layers: Vec<serde_json::Value> = r
                    .layers
                    .iter()
                    .enumerate()
                    .map(|(i, l)| {
                        let choice = r.auto_choices.as_ref().and_then(|c| c.get(i));
                        serde_json::json!({
                            "layer": i,
                            "bits_per_value": l.bits_per_value(),
                            "key_rel_error": l.key_rel_error(),
                            "value_rel_error": l.value_rel_error(),
                            "attn_rel_error": l.attn_rel_error(),
                            "attn_rows": l.attn_rows,
                            "key_codec": choice.map(|c| c[0].clone()),
                            "value_codec": choice.map(|c| c[1].clone()),
                        })
                    })
                    .collect();
                serde_json::json!({
                    "kv_codec": r.spec.to_string(),
                    "codec": r.codec,
                    "perplexity": r.perplexity,
                    "perplexity_rel_change": r.perplexity_rel_change,
                    "nll_mean": r.nll_mean,
                    "kl_mean": r.kl_mean,
                    "kl_max": r.kl_max,
                    "top1_agreement": r.top1_agreement,
                    "attn_rel_error": r.attn_rel_error(),
                    "kv_held_bytes": s.held_bytes,
                    "kv_f16_bytes": s.f16_bytes,
                    "kv_f32_bytes": s.f32_bytes,
                    "encoded_bytes": s.encoded_bytes,
                    "encoded_bits_per_value": s.encoded_bits_per_value(),
                    "quantized_fraction": s.quantized_fraction(),
                    "quantized_bits_per_value": s.quantized_bits_per_value(),
                    "secs": r.secs,
                    "layers": layers,
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
        "{:<12} {:>11} {:>9} {:>9} {:>7} {:>9} {:>12} {:>12} {:>9} {:>7}",
        "kv",
        "perplexity",
        "change",
        "KL",
        "top-1",
        "attn err",
        "KV held B",
        "f16 B",
        "encoded",
        "bits/v"
    );
    for r in &report.runs {
        let s = r.stats;
        println!(
            "{:<12} {:>11.4} {:>+8.4}% {:>9.2e} {:>7.4} {:>9.2e} {:>12} {:>12} {:>8.1}% {:>7.2}",
            r.spec.to_string(),
            r.perplexity,
            100.0 * r.perplexity_rel_change,
            r.kl_mean,
            r.top1_agreement,
            r.attn_rel_error(),
            s.held_bytes,
            s.f16_bytes,
            100.0 * s.quantized_fraction(),
            s.encoded_bits_per_value()
        );
    }
    println!("per layer: bits per value / key error / value error / attention-output error");
    for r in report.runs.iter().filter(|r| !r.layers.is_empty()) {
        println!("{} ({})", r.spec, r.codec);
        for (i, l) in r.layers.iter().enumerate() {
            let choice = r
                .auto_choices
                .as_ref()
                .and_then(|c| c.get(i))
                .map(|c| format!("  K {} V {}", c[0], c[1]))
                .unwrap_or_default();
            println!(
                "  layer {i:>3} {:>6.2} bits  K {:.2e}  V {:.2e}  attn {:.2e}{choice}",
                l.bits_per_value(),
                l.key_rel_error(),
                l.value_rel_error(),
                l.attn_rel_error()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn critical_layers_and_budget_parse_with_clear_errors() {
        assert_eq!(parse_critical_layers("0,-1"), Ok(vec![0, -1]));
        assert_eq!(parse_critical_layers(" 0, 1 ,-2"), Ok(vec![0, 1, -2]));
        assert_eq!(parse_critical_layers("none"), Ok(vec![]));
        let e = parse_critical_layers("0,last").unwrap_err();
        assert!(e.contains("`last`") && e.contains("not an integer"), "{e}");
        assert_eq!(parse_error_budget("0.05"), Ok(0.05));
        assert!(parse_error_budget("-0.1").unwrap_err().contains(">= 0"));
        assert!(parse_error_budget("inf").unwrap_err().contains("finite"));
        assert!(parse_error_budget("lots")
            .unwrap_err()
            .contains("not a number"));
    }
}
