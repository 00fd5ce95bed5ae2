//! `qvl run`, `qvl perplexity` and `qvl golden` on SmolLM2-135M-Instruct.
//! Each test skips (and says why) when the GGUF is not in the models cache;
//! fetch it with `qvl fetch-model smollm2`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

use qvl_model::fetch::{find_cached, SMOLLM2};
use std::path::PathBuf;
use std::process::Command;

fn qvl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qvl"))
}

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../qvl-model/tests/data/smollm2")
}

fn model_or_skip(test: &str) -> Option<PathBuf> {
    let found = find_cached(&SMOLLM2);
    if found.is_none() {
        eprintln!(
            "SKIPPED {test}: SmolLM2 is not in the models cache; fetch it with `qvl fetch-model smollm2`"
        );
    }
    found
}

fn golden_json() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(golden_dir().join("golden.json")).unwrap())
        .unwrap()
}

#[test]
fn run_streams_a_continuation_and_a_memory_report() {
    let Some(model) = model_or_skip("run_streams_a_continuation_and_a_memory_report") else {
        return;
    };
    let out = qvl()
        .args([
            "run",
            "--max-tokens",
            "8",
            "--prompt",
            "Name a colour.",
            "--model",
        ])
        .arg(&model)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        !stdout.trim().is_empty(),
        "no continuation; stderr: {stderr}"
    );
    for key in [
        "peak RSS", "KV cache", "weights", "prefill", "decode", "tokens",
    ] {
        assert!(
            stderr.contains(key),
            "{key} missing from the report: {stderr}"
        );
    }
}

#[test]
fn run_rejects_an_image_for_a_text_model() {
    let Some(model) = model_or_skip("run_rejects_an_image_for_a_text_model") else {
        return;
    };
    let out = qvl()
        .args(["run", "--max-tokens", "1", "--image", "x.png", "--model"])
        .arg(&model)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("takes no --image"));
}

#[test]
fn perplexity_json_matches_the_golden() {
    let Some(model) = model_or_skip("perplexity_json_matches_the_golden") else {
        return;
    };
    let golden = golden_json();
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(&text, golden["text"].as_str().unwrap()).unwrap();
    let out = qvl()
        .args(["perplexity", "--json", "--model"])
        .arg(&model)
        .arg("--text")
        .arg(&text)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let ppl = got["perplexity"].as_f64().unwrap();
    let want = golden["perplexity"].as_f64().unwrap();
    assert!((ppl / want - 1.0).abs() <= 0.005, "{ppl} vs {want}");
    assert_eq!(
        got["tokens"].as_u64().unwrap() as usize,
        golden["input_ids"].as_array().unwrap().len()
    );
    assert!((got["nll_mean"].as_f64().unwrap().exp() - ppl).abs() < 1e-6 * ppl);
}

#[test]
fn golden_smollm2_passes() {
    let Some(model) = model_or_skip("golden_smollm2_passes") else {
        return;
    };
    let out = qvl()
        .args(["golden", "--model"])
        .arg(&model)
        .arg("--golden")
        .arg(golden_dir().join("golden.safetensors"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for check in [
        "token ids",
        "logits_head",
        "top-8 ids",
        "perplexity",
        "greedy",
    ] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(check))
            .unwrap_or_else(|| panic!("{stdout}"));
        assert!(line.contains(" ok "), "{line}");
    }
    assert!(stdout.contains("5 passed, 0 failed"), "{stdout}");
}

/// A byte-level tokenizer.json for the tiny Qwen3-VL checkpoint (vocab 512):
/// the 256 byte tokens, ChatML and vision special tokens at its ids.
fn tiny_tokenizer_json() -> String {
    // GPT-2's bytes_to_unicode: printable bytes stand for themselves, the
    // rest map to 256 + n in byte order.
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut vocab = serde_json::Map::new();
    let mut n = 0;
    for b in 0..256u32 {
        let c = if printable(b) {
            b
        } else {
            n += 1;
            255 + n
        };
        vocab.insert(char::from_u32(c).unwrap().to_string(), b.into());
    }
    let added: Vec<serde_json::Value> = [
        ("<|im_start|>", 256),
        ("<|im_end|>", 257),
        ("<|image_pad|>", 500),
        ("<|vision_start|>", 501),
        ("<|vision_end|>", 502),
    ]
    .iter()
    .map(|(t, id)| serde_json::json!({"id": id, "content": t, "special": true}))
    .collect();
    serde_json::json!({
        "model": {"type": "BPE", "vocab": vocab, "merges": []},
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true},
    })
    .to_string()
}

#[test]
fn run_with_a_qwen3vl_directory_and_an_image() {
    let tiny =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../qvl-model/tests/data/qwen3vl-tiny");
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(tiny.join(f), dir.path().join(f)).unwrap();
    }
    // Without tokenizer.json: a clear error.
    let out = qvl()
        .args(["run", "--max-tokens", "2", "--model"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no tokenizer.json"));

    std::fs::write(dir.path().join("tokenizer.json"), tiny_tokenizer_json()).unwrap();
    let png = dir.path().join("x.png");
    image::RgbImage::from_fn(40, 56, |x, y| {
        image::Rgb([(x * 6) as u8, (y * 4) as u8, 128])
    })
    .save(&png)
    .unwrap();
    let out = qvl()
        .args(["run", "--max-tokens", "4", "--prompt", "hi", "--model"])
        .arg(dir.path())
        .arg("--image")
        .arg(&png)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report = stderr.lines().find(|l| l.starts_with("tokens")).unwrap();
    // The random tiny model may end its turn at once; the prompt holds the
    // chat template, the image placeholders and the text.
    let prompt: usize = report.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(prompt > 20, "{report}");
    assert!(stderr.contains("KV cache"), "{stderr}");
}
