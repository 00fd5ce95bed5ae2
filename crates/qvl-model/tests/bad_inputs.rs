//! Malformed checkpoints give errors that name the file and the tensor.

// Test helpers outside #[test] functions fail loudly too.
#![allow(clippy::unwrap_used)]

use qvl_model::{ModelError, Qwen3VlModel};
use std::path::{Path, PathBuf};

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/qwen3vl-tiny")
}

/// A checkpoint directory with the tiny config and `weights` as its only file.
fn dir_with(weights: &[u8], config: Option<String>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let config =
        config.unwrap_or_else(|| std::fs::read_to_string(tiny().join("config.json")).unwrap());
    std::fs::write(dir.path().join("config.json"), config).unwrap();
    std::fs::write(dir.path().join("model.safetensors"), weights).unwrap();
    dir
}

/// A safetensors image from a header JSON and data bytes.
fn raw(header: serde_json::Value, data: &[u8]) -> Vec<u8> {
    let h = header.to_string().into_bytes();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend_from_slice(data);
    out
}

fn load_err(dir: &tempfile::TempDir) -> ModelError {
    match Qwen3VlModel::load(dir.path()) {
        Ok(_) => panic!("loading a bad checkpoint succeeded"),
        Err(e) => e,
    }
}

#[test]
fn truncated_file_names_file_and_tensor() {
    let bytes = std::fs::read(tiny().join("model.safetensors")).unwrap();
    let dir = dir_with(&bytes[..bytes.len() / 2], None);
    let err = load_err(&dir);
    let msg = err.to_string();
    assert!(matches!(err, ModelError::BadSafetensors { .. }), "{msg}");
    assert!(
        msg.contains("model.safetensors") && msg.contains("tensor \"") && msg.contains("truncated"),
        "{msg}"
    );
    // Cut inside the header, and below the length prefix.
    let err = load_err(&dir_with(&bytes[..100], None));
    assert!(err.to_string().contains("past the end"), "{err}");
    let err = load_err(&dir_with(&bytes[..5], None));
    assert!(err.to_string().contains("too short"), "{err}");
}

#[test]
fn offsets_past_the_end_are_rejected() {
    let header = serde_json::json!({"a.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                                    "b.weight": {"dtype": "F32", "shape": [4], "data_offsets": [16, 48]}});
    let err = load_err(&dir_with(&raw(header, &[0u8; 40]), None));
    let msg = err.to_string();
    assert!(
        msg.contains("\"b.weight\"") && msg.contains("past"),
        "{msg}"
    );
    // Offsets that disagree with shape x dtype.
    let header =
        serde_json::json!({"c.weight": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 16]}});
    let msg = load_err(&dir_with(&raw(header, &[0u8; 16]), None)).to_string();
    assert!(
        msg.contains("\"c.weight\"") && msg.contains("needs 8"),
        "{msg}"
    );
    // A header that is not JSON.
    let mut bad = 4u64.to_le_bytes().to_vec();
    bad.extend_from_slice(b"{{{{");
    let msg = load_err(&dir_with(&bad, None)).to_string();
    assert!(msg.contains("not valid JSON"), "{msg}");
}

#[test]
fn unknown_dtype_is_named() {
    let header =
        serde_json::json!({"q.weight": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}});
    let err = load_err(&dir_with(&raw(header, &[0u8; 4]), None));
    match &err {
        ModelError::UnknownDtype { tensor, dtype, .. } => {
            assert_eq!(tensor, "q.weight");
            assert_eq!(dtype, "F8_E4M3");
        }
        other => panic!("wrong error {other}"),
    }
}

#[test]
fn shapes_that_disagree_with_the_config_are_named() {
    let bytes = std::fs::read(tiny().join("model.safetensors")).unwrap();
    let config = std::fs::read_to_string(tiny().join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&config).unwrap();
    v["text_config"]["intermediate_size"] = 360.into();
    let err = load_err(&dir_with(&bytes, Some(v.to_string())));
    match &err {
        ModelError::ShapeMismatch {
            name,
            expected,
            actual,
            ..
        } => {
            assert!(name.contains("mlp.gate_proj"), "{name}");
            assert_eq!(expected, &[360, 128]);
            assert_eq!(actual, &[352, 128]);
        }
        other => panic!("wrong error {other}"),
    }
    // More layers than the checkpoint has: the first missing tensor is named.
    v["text_config"]["intermediate_size"] = 352.into();
    v["text_config"]["num_hidden_layers"] = 5.into();
    let err = load_err(&dir_with(&bytes, Some(v.to_string())));
    assert!(
        matches!(&err, ModelError::MissingTensor { name, .. } if name.contains("layers.4.")),
        "{err}"
    );
}
