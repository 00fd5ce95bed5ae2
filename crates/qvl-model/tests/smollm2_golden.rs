//! SmolLM2-135M-Instruct (Q4_1 GGUF) end to end against the transformers
//! reference in tests/data/smollm2: token ids, logits, top-8 ids,
//! perplexity and greedy continuation. Skips (and says so) when the model
//! is not fetched; fetch it with `qvl fetch-model smollm2`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

use qvl_model::fetch::{find_cached, SMOLLM2};
use qvl_model::llama::{check_smollm2_model, is_smollm2_golden, GgufTextModel, StopReason};
use std::path::PathBuf;
use std::sync::OnceLock;

fn golden_file() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/smollm2/golden.safetensors")
}

/// The model, loaded once for all tests of this file.
fn model_or_skip(test: &str) -> Option<&'static GgufTextModel> {
    static MODEL: OnceLock<Option<GgufTextModel>> = OnceLock::new();
    let model = MODEL
        .get_or_init(|| find_cached(&SMOLLM2).map(|p| GgufTextModel::load(&p).unwrap()))
        .as_ref();
    if model.is_none() {
        eprintln!(
            "SKIPPED {test}: SmolLM2 is not fetched (models cache: $QVL_MODELS_DIR, \
             $XDG_CACHE_HOME/qvl/models or ~/.cache/qvl/models). Fetch it with `qvl fetch-model smollm2`."
        );
    }
    model
}

#[test]
fn smollm2_matches_the_transformers_golden() {
    let Some(model) = model_or_skip("smollm2_matches_the_transformers_golden") else {
        return;
    };
    assert!(is_smollm2_golden(&golden_file()));
    let report = check_smollm2_model(model, &golden_file()).unwrap();
    for c in report.checks() {
        eprintln!(
            "{:<12} {} {}",
            c.name,
            if c.pass { "ok  " } else { "FAIL" },
            c.detail
        );
    }
    assert!(report.ids_match, "{report:?}");
    assert!(report.max_logit_diff <= 2e-3, "{}", report.max_logit_diff);
    assert!(report.top8_compared > 0 && report.top8_equal == report.top8_compared);
    assert!(
        report.perplexity_rel_diff() <= 0.005,
        "{} vs {}",
        report.perplexity,
        report.reference_perplexity
    );
    assert_eq!(report.greedy, report.expected_greedy);
    assert!(report.pass());
}

#[test]
fn chat_generation_streams_and_stops_at_im_end() {
    let Some(model) = model_or_skip("chat_generation_streams_and_stops_at_im_end") else {
        return;
    };
    let ids = model.prompt_ids("What is the capital of France?").unwrap();
    let mut session = model.new_session();
    let mut decoder = model.tokenizer().stream_decoder();
    let mut streamed = String::new();
    let out = model
        .generate(&mut session, &ids, 48, true, &mut |t| {
            streamed.push_str(&decoder.push(t))
        })
        .unwrap();
    streamed.push_str(&decoder.finish());
    eprintln!("{streamed:?} ({:?})", out.stop);
    assert_eq!(streamed, model.tokenizer().decode(&out.tokens));
    assert!(streamed.contains("Paris"), "{streamed:?}");
    if let StopReason::Eos(id) = out.stop {
        assert!(model.stop_tokens().contains(&id));
        assert!(out.tokens.len() < 48);
    }
    assert_eq!(session.len(), ids.len() + out.decode_steps);
}

#[test]
fn perplexity_is_chunk_independent_and_rejects_one_token() {
    let Some(model) = model_or_skip("perplexity_is_chunk_independent_and_rejects_one_token") else {
        return;
    };
    let text = "The quick brown fox jumps over the lazy dog. It was a sunny day.";
    let p = model.perplexity_of_text(text).unwrap();
    assert_eq!(p.nll.len(), p.tokens - 1);
    assert!(p.perplexity.is_finite() && p.perplexity > 1.0);
    assert!((p.perplexity - p.nll_mean.exp()).abs() < 1e-9);
    assert!(model.perplexity(&[504]).is_err());
}
