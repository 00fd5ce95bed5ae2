//! The tokenizer.json loader against the Hugging Face `tokenizers` library:
//! small tokenizers in Qwen2/Qwen3 (NFC + split regex), Llama 3 (ignore_merges,
//! BOS template) and SmolLM2 (digits + byte-level regex) styles, with the ids
//! that library gives (tests/data/smollm2/hf_tokenizer_json/make_cases.py).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

use std::path::{Path, PathBuf};

use qvl_model::tokenizer::{ChatMessage, Tokenizer, TokenizerError};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/smollm2/hf_tokenizer_json")
}

#[test]
fn every_style_matches_hugging_face_tokenizers() {
    let cases: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir().join("cases.json")).unwrap()).unwrap();
    for (style, list) in cases.as_object().unwrap() {
        let tok = Tokenizer::from_hf_dir(&dir().join(style)).unwrap();
        for case in list.as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let want: Vec<u32> = case["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let got = tok.encode(text, true);
            assert_eq!(got, want, "{style}: ids of {text:?}");
            assert_eq!(
                tok.decode(&got),
                case["decoded"].as_str().unwrap(),
                "{style}: decode of {text:?}"
            );
        }
    }
}

#[test]
fn hf_dir_reads_tokenizer_config_and_chat_template() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        dir().join("qwen2/tokenizer.json"),
        tmp.path().join("tokenizer.json"),
    )
    .unwrap();
    std::fs::write(
        tmp.path().join("tokenizer_config.json"),
        r#"{"eos_token": "<|im_end|>", "pad_token": {"content": "<|endoftext|>"}, "bos_token": null,
            "chat_template": "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"}"#,
    )
    .unwrap();
    let tok = Tokenizer::from_hf_dir(tmp.path()).unwrap();
    assert_eq!(tok.eos_id(), tok.token_id("<|im_end|>"));
    assert_eq!(tok.pad_id(), tok.token_id("<|endoftext|>"));
    assert_eq!(tok.bos_id(), None);
    let prompt = tok
        .apply_chat_template(&[ChatMessage::user("Hi")], true)
        .unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );

    let err = Tokenizer::from_hf_dir(&tmp.path().join("missing")).unwrap_err();
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}

#[test]
fn unsupported_tokenizer_json_is_named() {
    let err = Tokenizer::from_tokenizer_json(r#"{"model": {"type": "Unigram", "vocab": []}}"#)
        .unwrap_err();
    assert!(matches!(err, TokenizerError::UnsupportedModel(_)), "{err}");
    let err = Tokenizer::from_tokenizer_json("{ not json").unwrap_err();
    assert!(err.to_string().contains("not JSON"), "{err}");
    let base = std::fs::read_to_string(dir().join("smollm2/tokenizer.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&base).unwrap();
    v["normalizer"] = serde_json::json!({"type": "Lowercase"});
    let err = Tokenizer::from_tokenizer_json(&v.to_string()).unwrap_err();
    assert!(err.to_string().contains("Lowercase"), "{err}");
    let mut v: serde_json::Value = serde_json::from_str(&base).unwrap();
    v["pre_tokenizer"] = serde_json::json!({"type": "Metaspace"});
    let err = Tokenizer::from_tokenizer_json(&v.to_string()).unwrap_err();
    assert!(err.to_string().contains("Metaspace"), "{err}");
    let mut v: serde_json::Value = serde_json::from_str(&base).unwrap();
    v["model"]["merges"] = serde_json::json!(["Ġ zzzz-not-a-token"]);
    let err = Tokenizer::from_tokenizer_json(&v.to_string()).unwrap_err();
    assert!(err.to_string().contains("not in the vocabulary"), "{err}");
}
