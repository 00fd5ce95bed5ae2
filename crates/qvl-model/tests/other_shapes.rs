//! A Qwen3-VL checkpoint of other shapes than the golden one (heads, KV
//! heads, layers, DeepStack indexes, vision depth, patch size), written
//! from Rust as sharded bf16 safetensors: it must load and run, and the
//! batched prefill must agree with token-by-token decoding.

// Test helpers outside #[test] functions fail loudly too.
#![allow(clippy::unwrap_used)]

use qvl_core::DType;
use qvl_model::checkpoint::write_safetensors;
use qvl_model::random::{qwen3vl_tensor_shapes, random_weights};
use qvl_model::{generate, ImageInput, Logits, Qwen3VlConfig, Qwen3VlModel};
use std::path::Path;

fn config_json() -> serde_json::Value {
    serde_json::json!({
        "model_type": "qwen3_vl",
        "image_token_id": 290, "video_token_id": 293,
        "vision_start_token_id": 291, "vision_end_token_id": 292,
        "tie_word_embeddings": false,
        "text_config": {
            "hidden_size": 96, "intermediate_size": 200, "num_hidden_layers": 5,
            "num_attention_heads": 6, "num_key_value_heads": 3, "head_dim": 16,
            "vocab_size": 300, "rms_norm_eps": 1e-6, "hidden_act": "silu",
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                "mrope_section": [4, 2, 2], "mrope_interleaved": true}
        },
        "vision_config": {
            "depth": 4, "hidden_size": 48, "intermediate_size": 100, "num_heads": 3,
            "num_position_embeddings": 36, "deepstack_visual_indexes": [1, 3],
            "patch_size": 8, "temporal_patch_size": 2, "spatial_merge_size": 2,
            "in_channels": 3, "out_hidden_size": 96, "hidden_act": "gelu_pytorch_tanh"
        }
    })
}

/// Writes config.json and two bf16 shards with an index into `dir`.
fn write_checkpoint(dir: &Path) -> Qwen3VlConfig {
    let json = config_json();
    std::fs::write(dir.join("config.json"), json.to_string()).unwrap();
    let cfg = Qwen3VlConfig::from_json(&json, &dir.join("config.json")).unwrap();
    let shapes = qwen3vl_tensor_shapes(&cfg);
    let weights = random_weights(&shapes, DType::Bf16, 42).unwrap();
    let mut tensors = weights.tensors();
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    let (a, b) = tensors.split_at(tensors.len() / 2);
    let mut map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", a),
        ("model-00002-of-00002.safetensors", b),
    ] {
        write_safetensors(&dir.join(file), part).unwrap();
        for t in part {
            map.insert(t.name.clone(), file.into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    cfg
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Deterministic pseudo-random pixels.
fn pixels(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            (((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) % 1000) as f32 / 500.0
                - 1.0
        })
        .collect()
}

#[test]
fn other_shapes_load_run_and_agree_with_stepwise_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_checkpoint(dir.path());
    let model = Qwen3VlModel::load(dir.path()).unwrap();
    let vocab = cfg.text.vocab_size;

    // Text only: one batch against a short prefill plus single steps, with
    // blocks of 4 tokens so that steps cross block boundaries.
    let ids: Vec<u32> = (0..19).map(|i| (i * 37 + 5) % 280).collect();
    let mut s = model.new_session_with_blocks(4);
    let all = model.prefill(&mut s, &ids, None, Logits::All).unwrap();
    assert_eq!(all.len(), ids.len() * vocab);
    assert!(all.iter().all(|v| v.is_finite()));
    let mut s2 = model.new_session_with_blocks(4);
    let mut step = model
        .prefill(&mut s2, &ids[..5], None, Logits::All)
        .unwrap();
    for &t in &ids[5..] {
        step.extend(model.decode_step(&mut s2, t).unwrap());
    }
    let d = max_diff(&all, &step);
    assert!(d < 1e-4, "batched vs stepwise text logits differ by {d}");

    // Prefix reuse: the first four blocks move to a fresh session as
    // qvl_core blocks; only the last three tokens are computed there.
    let mut s3 = model.new_session_with_blocks(4);
    for b in 0..4 {
        let block = s.cache.export_block(b).unwrap();
        s3.import_text_block(&ids[b * 4..b * 4 + 4], &block)
            .unwrap();
    }
    let tail = model
        .prefill(&mut s3, &ids[16..], None, Logits::Last)
        .unwrap();
    let d = max_diff(&all[18 * vocab..], &tail);
    assert!(d < 1e-4, "logits after imported blocks differ by {d}");

    // Two images of different shapes (8 + 4 merged tokens).
    let grids = vec![[1usize, 4, 8], [1, 4, 4]];
    let patches: usize = grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
    let images = ImageInput {
        pixel_values: pixels(patches * cfg.vision.patch_dim(), 7),
        grid_thw: grids.clone(),
    };
    let mut ids = vec![3u32, 9, 291];
    ids.extend(std::iter::repeat_n(290, 8));
    ids.extend([292, 14, 15, 291]);
    ids.extend(std::iter::repeat_n(290, 4));
    ids.extend([292, 40, 41, 42, 43, 44]);
    let prefix = ids.len() - 5;
    let mut s = model.new_session();
    let all = model
        .prefill(&mut s, &ids, Some(&images), Logits::All)
        .unwrap();
    let mut s2 = model.new_session_with_blocks(3);
    let mut step = model
        .prefill(&mut s2, &ids[..prefix], Some(&images), Logits::All)
        .unwrap();
    for &t in &ids[prefix..] {
        step.extend(model.decode_step(&mut s2, t).unwrap());
    }
    let d = max_diff(&all, &step);
    assert!(d < 1e-4, "batched vs stepwise image logits differ by {d}");

    // The pixels reach the logits (vision tokens and DeepStack are used).
    let other = ImageInput {
        pixel_values: pixels(patches * cfg.vision.patch_dim(), 99),
        grid_thw: grids,
    };
    let mut s3 = model.new_session();
    let changed = model
        .prefill(&mut s3, &ids, Some(&other), Logits::Last)
        .unwrap();
    assert!(max_diff(&all[(ids.len() - 1) * vocab..], &changed) > 1e-3);

    // Greedy generation gives the requested number of in-vocabulary tokens.
    let out = generate(&model, &ids, Some(&images), 6).unwrap();
    assert_eq!(out.len(), 6);
    assert!(out.iter().all(|&t| (t as usize) < vocab));

    // The placeholder helper gives the run the grid needs.
    assert_eq!(model.image_placeholder([1, 4, 8]), ids[2..12].to_vec());

    // A placeholder count that does not fit the grids is an error.
    let err = model.prefill(
        &mut model.new_session(),
        &ids[..6],
        Some(&images),
        Logits::Last,
    );
    assert!(err.is_err());
}
