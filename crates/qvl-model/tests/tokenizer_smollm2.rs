//! The GGUF tokenizer of SmolLM2-135M-Instruct against the reference ids
//! (tests/data/smollm2/golden.json, made with Hugging Face transformers).
//!
//! Needs the model in the cache (about 100 MB, not in the repository). When
//! it is absent the tests say so and pass without checking anything:
//! fetch it with `cargo test -p qvl-model --test gguf_fetch -- --ignored`
//! (or `cargo xtask fetch-model smollm2`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

use std::path::{Path, PathBuf};

use qvl_model::fetch::{find_cached, SMOLLM2};
use qvl_model::gguf::GgufFile;
use qvl_model::tokenizer::{ChatMessage, PreTokenizer, Tokenizer};

fn model_or_skip(test: &str) -> Option<PathBuf> {
    let found = find_cached(&SMOLLM2);
    if found.is_none() {
        eprintln!(
            "SKIPPED {test}: SmolLM2 is not fetched (looked in the models cache: $QVL_MODELS_DIR, \
             $XDG_CACHE_HOME/qvl/models or ~/.cache/qvl/models). Fetch it with \
             `cargo test -p qvl-model --test gguf_fetch -- --ignored`."
        );
    }
    found
}

fn golden() -> serde_json::Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/smollm2/golden.json");
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn tokenizer(path: &Path) -> Tokenizer {
    Tokenizer::from_gguf(GgufFile::open(path).unwrap().header()).unwrap()
}

#[test]
fn golden_text_gives_the_reference_ids() {
    let Some(path) = model_or_skip("golden_text_gives_the_reference_ids") else {
        return;
    };
    let tok = tokenizer(&path);
    let g = golden();
    let text = g["text"].as_str().unwrap();
    let want = ids(&g["input_ids"]);
    // The same ids are in golden.safetensors (int64).
    let st_bytes = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/smollm2/golden.safetensors"),
    )
    .unwrap();
    let st = safetensors::SafeTensors::deserialize(&st_bytes).unwrap();
    let from_st: Vec<u32> = st
        .tensor("input_ids")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect();
    assert_eq!(from_st, want);

    let got = tok.encode(text, true);
    assert_eq!(got, want, "token ids differ from the reference");
    assert_eq!(tok.decode(&got), text);
    assert_eq!(
        tok.decode(&ids(&g["greedy_continuation"])),
        g["greedy_text"].as_str().unwrap()
    );
    println!(
        "golden text: {} tokens, all equal to the reference",
        got.len()
    );
}

#[test]
fn special_tokens_metadata_and_chat_template() {
    let Some(path) = model_or_skip("special_tokens_metadata_and_chat_template") else {
        return;
    };
    let tok = tokenizer(&path);
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(
        (tok.bos_id(), tok.eos_id(), tok.unk_id()),
        (Some(1), Some(2), Some(0))
    );
    assert!(!tok.adds_bos());
    assert_eq!(tok.pre_tokenizer(), PreTokenizer::Gpt2);
    let prompt = tok
        .apply_chat_template(&[ChatMessage::user("What is 2+2?")], true)
        .unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = tok.encode(&prompt, true);
    assert_eq!(ids[0], 1, "<|im_start|> is one control token");
    assert_eq!(ids.iter().filter(|&&i| i == 2).count(), 2, "two <|im_end|>");
    assert_eq!(tok.decode(&ids), prompt);
    // Streaming decode reproduces the same text piece by piece.
    let mut d = tok.stream_decoder();
    let streamed: String = ids.iter().map(|&i| d.push(i)).collect::<String>() + &d.finish();
    assert_eq!(streamed, prompt);
    // Digits: one piece per number by default (as transformers loads this GGUF);
    // llama.cpp's `smollm` pre-tokenizer splits them one by one.
    let split = tok
        .clone()
        .with_pre_tokenizer(PreTokenizer::Gpt2DigitsSplit)
        .unwrap();
    let n = "In 2024 it cost 1234567 dollars.";
    assert_eq!(split.decode(&split.encode(n, false)), n);
    assert!(split.encode(n, false).len() >= tok.encode(n, false).len());
}

#[test]
fn varied_texts_match_hugging_face_tokenizers() {
    let Some(path) = model_or_skip("varied_texts_match_hugging_face_tokenizers") else {
        return;
    };
    let tok = tokenizer(&path);
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/smollm2/tokenizer_cases.json");
    let cases: serde_json::Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
    let mut failures = Vec::new();
    for case in cases["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want = ids(&case["ids"]);
        let got = tok.encode(text, true);
        if got != want {
            failures.push(format!("{text:?}\n  ours {got:?}\n  hf   {want:?}"));
        }
        assert_eq!(
            tok.decode(&got),
            case["decoded"].as_str().unwrap(),
            "decode of {text:?}"
        );
    }
    assert!(
        failures.is_empty(),
        "{} texts differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
