//! Checks against reference outputs of Hugging Face transformers.
//!
//! A golden file is a safetensors file with, per case, `<case>.input_ids`
//! (i64), `<case>.logits` (f32, `len x vocab`) and for image cases
//! `<case>.pixel_values` and `<case>.image_grid_thw`; `golden.json` beside
//! it lists the cases, their greedy continuations and the tolerance.

use crate::checkpoint::SafetensorsFile;
use crate::error::{ModelError, Result};
use crate::ops::argmax;
use crate::qwen3vl::{ImageInput, Qwen3VlModel};
use crate::text::Logits;
use std::path::Path;

/// The result of one golden case.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseOutcome {
    /// Case name ("text", "image", ...).
    pub name: String,
    /// Largest absolute difference of the logits over every position.
    pub max_abs_diff: f32,
    /// The tolerance the difference must stay within.
    pub tolerance: f32,
    /// The continuation the reference generated.
    pub expected_greedy: Vec<u32>,
    /// The continuation generated here.
    pub greedy: Vec<u32>,
    /// Whether both continuations are equal.
    pub greedy_match: bool,
    /// Whether the case is within tolerance and the continuations match.
    pub pass: bool,
}

/// Runs every case of `golden_file` (with `golden.json` beside it) against
/// the Qwen3-VL checkpoint in `model_dir`.
pub fn check_qwen3vl(model_dir: &Path, golden_file: &Path) -> Result<Vec<CaseOutcome>> {
    let model = Qwen3VlModel::load(model_dir)?;
    check_model(&model, golden_file)
}

/// The preprocessed images of `name` in a safetensors file the golden
/// scripts wrote (`{name}.pixel_values` and `{name}.image_grid_thw`, the
/// Hugging Face image processor's output); `path` names the file in errors.
pub fn preprocessed_images(file: &SafetensorsFile, path: &Path, name: &str) -> Result<ImageInput> {
    let grids = file
        .expect_tensor(&format!("{name}.image_grid_thw"))?
        .to_i64_vec()?;
    if grids.is_empty() || grids.len() % 3 != 0 || grids.iter().any(|&g| g <= 0) {
        return Err(ModelError::BadGolden {
            path: path.to_path_buf(),
            reason: format!("{name}: image_grid_thw {grids:?} is not n x 3 positive"),
        });
    }
    Ok(ImageInput {
        pixel_values: file
            .expect_tensor(&format!("{name}.pixel_values"))?
            .to_f32_vec()?,
        grid_thw: grids
            .chunks_exact(3)
            .map(|g| [g[0] as usize, g[1] as usize, g[2] as usize])
            .collect(),
    })
}

/// [`check_qwen3vl`] with a model already loaded.
pub fn check_model(model: &Qwen3VlModel, golden_file: &Path) -> Result<Vec<CaseOutcome>> {
    let bad = |reason: String| ModelError::BadGolden {
        path: golden_file.to_path_buf(),
        reason,
    };
    let json_path = golden_file.with_file_name("golden.json");
    let text = std::fs::read_to_string(&json_path)
        .map_err(|e| ModelError::io(format!("reading {}", json_path.display()), e))?;
    let meta: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| bad(format!("{} is not JSON: {e}", json_path.display())))?;
    let tolerance = meta
        .pointer("/tolerance/logits_max_abs")
        .and_then(|v| v.as_f64())
        .unwrap_or(1e-3) as f32;
    let cases = meta
        .get("cases")
        .and_then(|c| c.as_object())
        .ok_or_else(|| bad("golden.json has no cases object".to_string()))?;
    let file = SafetensorsFile::open(golden_file)?;
    let vocab = model.config().text.vocab_size;
    let mut outcomes = Vec::new();
    for (name, case) in cases {
        let ids: Vec<u32> = file
            .expect_tensor(&format!("{name}.input_ids"))?
            .to_i64_vec()?
            .into_iter()
            .map(|v| {
                u32::try_from(v).map_err(|_| bad(format!("case {name}: token id {v} out of range")))
            })
            .collect::<Result<_>>()?;
        let expected_logits = file.expect_tensor(&format!("{name}.logits"))?;
        if expected_logits.shape != [ids.len(), vocab] {
            return Err(bad(format!(
                "case {name}: logits shape {:?}, expected [{}, {vocab}]",
                expected_logits.shape,
                ids.len()
            )));
        }
        let expected_logits = expected_logits.to_f32_vec()?;
        let images = match file.get(&format!("{name}.pixel_values")) {
            Some(_) => Some(preprocessed_images(&file, golden_file, name)?),
            None => None,
        };
        let expected_greedy: Vec<u32> = case
            .get("greedy_continuation")
            .and_then(|g| g.as_array())
            .ok_or_else(|| bad(format!("case {name} has no greedy_continuation")))?
            .iter()
            .map(|v| v.as_u64().map(|v| v as u32))
            .collect::<Option<_>>()
            .ok_or_else(|| {
                bad(format!(
                    "case {name}: greedy_continuation holds a non-integer"
                ))
            })?;

        let mut session = model.new_session();
        let logits = model.prefill(&mut session, &ids, images.as_ref(), Logits::All)?;
        let max_abs_diff = logits
            .iter()
            .zip(&expected_logits)
            .map(|(a, b)| (a - b).abs())
            .fold(
                0f32,
                |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
            );
        let mut greedy = Vec::with_capacity(expected_greedy.len());
        let mut last = logits[(ids.len() - 1) * vocab..].to_vec();
        while greedy.len() < expected_greedy.len() {
            let next = argmax(&last) as u32;
            greedy.push(next);
            if greedy.len() < expected_greedy.len() {
                last = model.decode_step(&mut session, next)?;
            }
        }
        let greedy_match = greedy == expected_greedy;
        outcomes.push(CaseOutcome {
            name: name.clone(),
            max_abs_diff,
            tolerance,
            expected_greedy,
            greedy,
            greedy_match,
            pass: greedy_match && max_abs_diff <= tolerance,
        });
    }
    Ok(outcomes)
}
