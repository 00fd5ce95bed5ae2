//! Model configs: the generic decoder config every text architecture maps
//! onto, the Qwen3-VL vision config, and parsing of Hugging Face `config.json`.

use crate::error::{ModelError, Result};
use crate::ops::Activation;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// How positions rotate queries and keys.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeKind {
    /// Plain 1D RoPE over the text position (llama, qwen3).
    Plain,
    /// Multimodal RoPE: the frequency pairs are split between the temporal,
    /// height and width position ids (`section` pairs each).
    MRope {
        /// Pairs for t, h, w; they sum to `head_dim / 2`.
        section: [usize; 3],
        /// Interleaved layout (Qwen3-VL: t h w t h w ...) instead of chunks
        /// (Qwen2-VL: t t .. h h .. w w ..).
        interleaved: bool,
    },
}

/// Rotary position embedding settings.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    /// Base of the frequencies.
    pub theta: f64,
    /// Which position ids feed which frequencies.
    pub kind: RopeKind,
}

/// A pre-norm decoder-only transformer with GQA, RoPE and a SwiGLU MLP: the
/// text side of Qwen3-VL, and (with `qk_norm` off, plain RoPE) llama and
/// qwen3 models from other weight formats.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderConfig {
    /// Vocabulary size (rows of the embedding and the lm head).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (divides `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// Rotary embedding.
    pub rope: RopeConfig,
    /// Per-head RMSNorm of queries and keys before RoPE (qwen3).
    pub qk_norm: bool,
    /// Biases on the q/k/v/o projections.
    pub attention_bias: bool,
    /// The lm head is the embedding matrix.
    pub tie_word_embeddings: bool,
    /// MLP activation (SiLU for SwiGLU).
    pub hidden_act: Activation,
}

impl DecoderConfig {
    /// Checks the relations between the sizes.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |reason: String| ModelError::BadConfig {
            path: path.to_path_buf(),
            reason,
        };
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
        ] {
            if v == 0 {
                return Err(bad(format!("{name} is 0")));
            }
        }
        if self.num_heads % self.num_kv_heads != 0 {
            return Err(bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_heads, self.num_kv_heads
            )));
        }
        if self.head_dim % 2 != 0 {
            return Err(bad(format!(
                "head_dim {} is odd; RoPE needs pairs",
                self.head_dim
            )));
        }
        if let RopeKind::MRope { section, .. } = &self.rope.kind {
            let sum: usize = section.iter().sum();
            if sum != self.head_dim / 2 {
                return Err(bad(format!(
                    "mrope_section {section:?} sums to {sum}, head_dim / 2 is {}",
                    self.head_dim / 2
                )));
            }
        }
        Ok(())
    }
}

/// The Qwen3-VL vision encoder's config.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    /// Blocks.
    pub depth: usize,
    /// Width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Image channels.
    pub in_channels: usize,
    /// Patch side in pixels.
    pub patch_size: usize,
    /// Frames per temporal patch.
    pub temporal_patch_size: usize,
    /// Side of the square of patches merged into one token.
    pub spatial_merge_size: usize,
    /// Width of the merged tokens (the text hidden size).
    pub out_hidden_size: usize,
    /// Learned position embeddings (a square grid).
    pub num_position_embeddings: usize,
    /// Blocks whose outputs feed the DeepStack mergers, in order.
    pub deepstack_visual_indexes: Vec<usize>,
    /// MLP activation.
    pub hidden_act: Activation,
    /// Base of the 2D rotary frequencies.
    pub rope_theta: f64,
}

impl VisionConfig {
    /// Values in one flattened patch (`C x T x P x P`).
    pub fn patch_dim(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// Width of one head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Side of the position embedding grid.
    pub fn grid_side(&self) -> usize {
        (self.num_position_embeddings as f64).sqrt().round() as usize
    }
}

/// The whole Qwen3-VL config.
#[derive(Debug, Clone, PartialEq)]
pub struct Qwen3VlConfig {
    /// The text decoder.
    pub text: DecoderConfig,
    /// The vision encoder.
    pub vision: VisionConfig,
    /// Placeholder token of image patches.
    pub image_token_id: u32,
    /// Placeholder token of video patches.
    pub video_token_id: u32,
    /// Token opening an image.
    pub vision_start_token_id: u32,
    /// Token closing an image.
    pub vision_end_token_id: u32,
}

/// Reads fields of one JSON object with errors that name the field.
struct Fields<'a> {
    obj: &'a Value,
    scope: &'a str,
    path: &'a Path,
}

impl Fields<'_> {
    fn err(&self, reason: String) -> ModelError {
        ModelError::BadConfig {
            path: self.path.to_path_buf(),
            reason,
        }
    }

    fn usize_or(&self, key: &str, default: Option<usize>) -> Result<usize> {
        match self.obj.get(key) {
            Some(Value::Number(n)) => n.as_u64().map(|v| v as usize).ok_or_else(|| {
                self.err(format!(
                    "{}.{key} is not a non-negative integer",
                    self.scope
                ))
            }),
            Some(Value::Null) | None => {
                default.ok_or_else(|| self.err(format!("{}.{key} is missing", self.scope)))
            }
            Some(_) => Err(self.err(format!("{}.{key} is not a number", self.scope))),
        }
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.usize_or(key, None)
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.obj.get(key) {
            Some(Value::Number(n)) => n
                .as_f64()
                .ok_or_else(|| self.err(format!("{}.{key} is not a number", self.scope))),
            Some(Value::Null) | None => Ok(default),
            Some(_) => Err(self.err(format!("{}.{key} is not a number", self.scope))),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.obj.get(key) {
            Some(Value::Bool(b)) => Ok(*b),
            Some(Value::Null) | None => Ok(default),
            Some(_) => Err(self.err(format!("{}.{key} is not a boolean", self.scope))),
        }
    }

    fn activation_or(&self, key: &str, default: Activation) -> Result<Activation> {
        match self.obj.get(key) {
            Some(Value::String(s)) => Activation::from_name(s).ok_or_else(|| {
                self.err(format!(
                    "{}.{key}: unsupported activation {s:?}",
                    self.scope
                ))
            }),
            None | Some(Value::Null) => Ok(default),
            Some(_) => Err(self.err(format!("{}.{key} is not a string", self.scope))),
        }
    }
}

impl Qwen3VlConfig {
    /// Reads `config.json` from a checkpoint directory.
    pub fn from_dir(dir: &Path) -> Result<Qwen3VlConfig> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| ModelError::io(format!("reading {}", path.display()), e))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| ModelError::BadConfig {
            path: path.clone(),
            reason: format!("not valid JSON: {e}"),
        })?;
        Qwen3VlConfig::from_json(&value, &path)
    }

    /// Parses a Hugging Face `Qwen3VLConfig` (`path` names it in errors).
    pub fn from_json(value: &Value, path: &Path) -> Result<Qwen3VlConfig> {
        let top = Fields {
            obj: value,
            scope: "config",
            path,
        };
        let text_obj = value
            .get("text_config")
            .ok_or_else(|| top.err("text_config is missing".to_string()))?;
        let vision_obj = value
            .get("vision_config")
            .ok_or_else(|| top.err("vision_config is missing".to_string()))?;
        let t = Fields {
            obj: text_obj,
            scope: "text_config",
            path,
        };
        let hidden_size = t.usize("hidden_size")?;
        let num_heads = t.usize("num_attention_heads")?;
        if num_heads == 0 {
            return Err(t.err("text_config.num_attention_heads is 0".to_string()));
        }
        // Newer configs put RoPE settings in rope_parameters, older ones in
        // rope_theta + rope_scaling.
        let rope_params = text_obj
            .get("rope_parameters")
            .filter(|v| v.is_object())
            .or_else(|| text_obj.get("rope_scaling").filter(|v| v.is_object()));
        let theta = match rope_params.and_then(|p| p.get("rope_theta")) {
            Some(v) => v
                .as_f64()
                .ok_or_else(|| t.err("rope_theta is not a number".to_string()))?,
            None => t.f64_or("rope_theta", 10_000.0)?,
        };
        let rope_kind = match rope_params.and_then(|p| p.get("mrope_section")) {
            Some(Value::Array(a)) => {
                let s: Vec<usize> = a
                    .iter()
                    .map(|v| v.as_u64().map(|v| v as usize))
                    .collect::<Option<_>>()
                    .ok_or_else(|| t.err("mrope_section holds a non-integer".to_string()))?;
                let [s0, s1, s2] = s[..] else {
                    return Err(t.err(format!("mrope_section {s:?} must have 3 entries")));
                };
                let interleaved = rope_params
                    .and_then(|p| p.get("mrope_interleaved"))
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                RopeKind::MRope {
                    section: [s0, s1, s2],
                    interleaved,
                }
            }
            Some(_) => return Err(t.err("mrope_section is not an array".to_string())),
            None => RopeKind::Plain,
        };
        let tie = match value.get("tie_word_embeddings") {
            Some(Value::Bool(b)) => *b,
            _ => t.bool_or("tie_word_embeddings", false)?,
        };
        let text = DecoderConfig {
            vocab_size: t.usize("vocab_size")?,
            hidden_size,
            intermediate_size: t.usize("intermediate_size")?,
            num_layers: t.usize("num_hidden_layers")?,
            num_heads,
            num_kv_heads: t.usize_or("num_key_value_heads", Some(num_heads))?,
            head_dim: t.usize_or("head_dim", Some(hidden_size / num_heads))?,
            rms_norm_eps: t.f64_or("rms_norm_eps", 1e-6)? as f32,
            rope: RopeConfig {
                theta,
                kind: rope_kind,
            },
            qk_norm: true,
            attention_bias: t.bool_or("attention_bias", false)?,
            tie_word_embeddings: tie,
            hidden_act: t.activation_or("hidden_act", Activation::Silu)?,
        };
        text.validate(path)?;

        let v = Fields {
            obj: vision_obj,
            scope: "vision_config",
            path,
        };
        let deepstack = match vision_obj.get("deepstack_visual_indexes") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_u64().map(|v| v as usize))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| v.err("deepstack_visual_indexes holds a non-integer".to_string()))?,
            None | Some(Value::Null) => Vec::new(),
            Some(_) => return Err(v.err("deepstack_visual_indexes is not an array".to_string())),
        };
        let vision_theta = vision_obj
            .get("rope_parameters")
            .and_then(|p| p.get("rope_theta"))
            .and_then(Value::as_f64)
            .unwrap_or(10_000.0);
        let vision = VisionConfig {
            depth: v.usize("depth")?,
            hidden_size: v.usize("hidden_size")?,
            intermediate_size: v.usize("intermediate_size")?,
            num_heads: v.usize("num_heads")?,
            in_channels: v.usize_or("in_channels", Some(3))?,
            patch_size: v.usize_or("patch_size", Some(16))?,
            temporal_patch_size: v.usize_or("temporal_patch_size", Some(2))?,
            spatial_merge_size: v.usize_or("spatial_merge_size", Some(2))?,
            out_hidden_size: v.usize_or("out_hidden_size", Some(hidden_size))?,
            num_position_embeddings: v.usize("num_position_embeddings")?,
            deepstack_visual_indexes: deepstack,
            hidden_act: v.activation_or("hidden_act", Activation::GeluTanh)?,
            rope_theta: vision_theta,
        };
        let cfg = Qwen3VlConfig {
            text,
            vision,
            image_token_id: top.usize_or("image_token_id", Some(151_655))? as u32,
            video_token_id: top.usize_or("video_token_id", Some(151_656))? as u32,
            vision_start_token_id: top.usize_or("vision_start_token_id", Some(151_652))? as u32,
            vision_end_token_id: top.usize_or("vision_end_token_id", Some(151_653))? as u32,
        };
        cfg.validate_vision(path)?;
        Ok(cfg)
    }

    fn validate_vision(&self, path: &Path) -> Result<()> {
        let v = &self.vision;
        let bad = |reason: String| ModelError::BadConfig {
            path: PathBuf::from(path),
            reason,
        };
        if v.num_heads == 0 || v.hidden_size % v.num_heads != 0 {
            return Err(bad(format!(
                "vision hidden_size {} is not a multiple of num_heads {}",
                v.hidden_size, v.num_heads
            )));
        }
        if v.head_dim() % 4 != 0 {
            return Err(bad(format!(
                "vision head_dim {} must be a multiple of 4 for the 2D rotary",
                v.head_dim()
            )));
        }
        let side = v.grid_side();
        if side * side != v.num_position_embeddings || side == 0 {
            return Err(bad(format!(
                "num_position_embeddings {} is not a square",
                v.num_position_embeddings
            )));
        }
        if v.spatial_merge_size == 0 || v.patch_size == 0 || v.temporal_patch_size == 0 {
            return Err(bad("vision patch or merge size is 0".to_string()));
        }
        if let Some(i) = v.deepstack_visual_indexes.iter().find(|&&i| i >= v.depth) {
            return Err(bad(format!(
                "deepstack_visual_indexes holds {i}, the vision encoder has {} blocks",
                v.depth
            )));
        }
        if v.deepstack_visual_indexes.len() > self.text.num_layers {
            return Err(bad(format!(
                "{} deepstack indexes but only {} text layers",
                v.deepstack_visual_indexes.len(),
                self.text.num_layers
            )));
        }
        if v.out_hidden_size != self.text.hidden_size {
            return Err(bad(format!(
                "vision out_hidden_size {} differs from the text hidden_size {}",
                v.out_hidden_size, self.text.hidden_size
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_tiny_config() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/qwen3vl-tiny");
        let c = Qwen3VlConfig::from_dir(&dir).unwrap();
        assert_eq!(c.text.num_kv_heads, 2);
        assert_eq!(
            c.text.rope.kind,
            RopeKind::MRope {
                section: [6, 5, 5],
                interleaved: true
            }
        );
        assert!(c.text.tie_word_embeddings);
        assert_eq!(c.vision.deepstack_visual_indexes, [0, 1, 2]);
        assert_eq!(c.vision.patch_dim(), 1536);
        assert_eq!(c.vision.hidden_act, Activation::GeluTanh);
    }

    #[test]
    fn bad_sizes_are_named() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/qwen3vl-tiny");
        let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
        let mut v: Value = serde_json::from_str(&text).unwrap();
        v["text_config"]["num_key_value_heads"] = 3.into();
        let err = Qwen3VlConfig::from_json(&v, Path::new("c.json")).unwrap_err();
        assert!(err.to_string().contains("num_key_value_heads"), "{err}");
        v["text_config"]["num_key_value_heads"] = 2.into();
        v["vision_config"]["deepstack_visual_indexes"] = serde_json::json!([0, 7]);
        let err = Qwen3VlConfig::from_json(&v, Path::new("c.json")).unwrap_err();
        assert!(err.to_string().contains("deepstack"), "{err}");
    }
}
