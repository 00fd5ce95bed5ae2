//! Weights held quantized on real models: SmolLM2 with its own Q4_1 blocks
//! kept (perplexity equal to the f32-dequantized run), and the tiny Qwen3-VL
//! checkpoint quantized per matrix under an error budget (logits within a
//! reported bound). SmolLM2 tests skip, saying so, when the GGUF is absent.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

use qvl_model::fetch::{find_cached, SMOLLM2};
use qvl_model::llama::GgufTextModel;
use qvl_model::qweight::{BlockFormat, QuantizingSource};
use qvl_model::{
    HfCheckpoint, LoadOptions, Logits, Qwen3VlConfig, Qwen3VlModel, WeightFormat, WeightSource,
};
use std::path::Path;

fn golden_text() -> String {
    let json = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/smollm2/golden.json"),
    )
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    v["text"].as_str().unwrap().to_string()
}

#[test]
fn smollm2_native_q4_1_blocks_match_the_f32_run() {
    let Some(path) = find_cached(&SMOLLM2) else {
        eprintln!(
            "SKIPPED: SmolLM2 is not fetched (models cache: $QVL_MODELS_DIR, $XDG_CACHE_HOME/qvl/models \
             or ~/.cache/qvl/models). Fetch it with `cargo test -p qvl-model --test gguf_fetch -- --ignored`."
        );
        return;
    };
    let text = golden_text();
    let f32_model = GgufTextModel::load(&path).unwrap();
    let base = f32_model.perplexity_of_text(&text).unwrap();
    let f32_bytes = f32_model.weight_bytes();
    // Decode logits (the direct kernel) of the f32 model, for comparison.
    let ids = f32_model.tokenizer().encode(&text, true);
    let mut s = f32_model.new_session();
    f32_model.prefill(&mut s, &ids[..8], Logits::Last).unwrap();
    let f32_step = f32_model.decode_step(&mut s, ids[8]).unwrap();
    drop(f32_model);

    let native =
        GgufTextModel::load_with_options(&path, &LoadOptions::new(WeightFormat::Native)).unwrap();
    let p = native.perplexity_of_text(&text).unwrap();
    let rel = (p.perplexity / base.perplexity - 1.0).abs();
    eprintln!(
        "f32: ppl {:.5}, {} MiB; native: ppl {:.5}, {} MiB ({:.2e} relative)",
        base.perplexity,
        f32_bytes >> 20,
        p.perplexity,
        native.weight_bytes() >> 20,
        rel
    );
    assert!(
        rel <= 1e-3,
        "native {} vs f32 {}",
        p.perplexity,
        base.perplexity
    );
    assert!(
        native.weight_bytes() < 110 << 20,
        "{}",
        native.weight_bytes()
    );
    assert!(f32_bytes > 500 << 20, "{f32_bytes}");
    let layer0 = native.decoder().config().num_layers;
    assert_eq!(layer0, 30);
    let mut s = native.new_session();
    native.prefill(&mut s, &ids[..8], Logits::Last).unwrap();
    let step = native.decode_step(&mut s, ids[8]).unwrap();
    let scale = f32_step.iter().map(|v| v.abs()).fold(0f32, f32::max);
    let max_diff = step
        .iter()
        .zip(&f32_step)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    eprintln!("decode logits: max |native - f32| {max_diff:.2e} (max |logit| {scale:.1})");
    assert!(max_diff <= 1e-4 * scale, "{max_diff}");

    // Re-quantized to int8 from the dequantized values: near the f32 run.
    let q8 = GgufTextModel::load_with_options(&path, &LoadOptions::new(WeightFormat::Q8)).unwrap();
    let p8 = q8.perplexity_of_text(&text).unwrap();
    let report = q8.weight_report();
    eprintln!(
        "q8: ppl {:.5} ({:+.3}%), {} MiB, {} matrices, max rel error {:.4}",
        p8.perplexity,
        100.0 * (p8.perplexity / base.perplexity - 1.0),
        q8.weight_bytes() >> 20,
        report.matrices.len(),
        report.max_rel_error()
    );
    assert_eq!(report.count(Some(BlockFormat::Q8_0)), 30 * 7 + 1);
    assert!((p8.perplexity / base.perplexity - 1.0).abs() < 0.01);
}

#[test]
fn qwen3vl_tiny_budget_quantization_keeps_logits_close() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/qwen3vl-tiny");
    let ckpt = HfCheckpoint::open(&dir).unwrap();
    let config = Qwen3VlConfig::from_json(ckpt.config(), &dir.join("config.json")).unwrap();
    let exact = Qwen3VlModel::from_source(config.clone(), &ckpt).unwrap();
    let ids: Vec<u32> = (0..24).map(|i| (i * 37 + 5) % 480).collect();
    let logits_of = |m: &Qwen3VlModel| {
        let mut s = m.new_session();
        let mut out = m.prefill(&mut s, &ids[..20], None, Logits::All).unwrap();
        for &t in &ids[20..] {
            out.extend(m.decode_step(&mut s, t).unwrap());
        }
        out
    };
    let want = logits_of(&exact);
    let scale = want.iter().map(|v| v.abs()).fold(0f32, f32::max);
    let layers = config.text.num_layers;
    // Bounds on max |logit diff| / max |logit|, measured (random weights
    // compound the error more than trained ones): budget 0.1 0.22, budget
    // 0.01 0.023, uniform q8 0.031, uniform q4 0.38.
    let mut diffs = Vec::new();
    for (format, bound) in [
        (WeightFormat::Budget(0.1), 0.3),
        (WeightFormat::Budget(0.01), 0.04),
        (WeightFormat::Q8, 0.05),
        (WeightFormat::Q4, 0.5),
    ] {
        let src = QuantizingSource::new(&ckpt, LoadOptions::new(format), layers);
        let model = Qwen3VlModel::from_source(config.clone(), &src as &dyn WeightSource).unwrap();
        let report = src.report();
        let got = logits_of(&model);
        let max_diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!(
            "{format}: {} q4_1, {} q8_0, {} exact matrices; {} -> {} bytes; max weight error {:.4}; \
             max |logit diff| {max_diff:.4} = {:.4} of max |logit| {scale:.3}",
            report.count(Some(BlockFormat::Q4_1)),
            report.count(Some(BlockFormat::Q8_0)),
            report.count(None),
            report.input_bytes(),
            report.output_bytes(),
            report.max_rel_error(),
            max_diff / scale,
        );
        assert!(report.output_bytes() < report.input_bytes());
        assert!(
            max_diff <= bound * scale,
            "{format}: {max_diff} > {bound} x {scale}"
        );
        diffs.push(max_diff);
        if let WeightFormat::Budget(b) = format {
            assert!(report.max_rel_error() <= b);
            // First and last decoder layers stay exact.
            for m in &report.matrices {
                if m.name.contains("language_model.layers.0.")
                    || m.name
                        .contains(&format!("language_model.layers.{}.", layers - 1))
                {
                    assert_eq!(m.format, None, "{}", m.name);
                }
            }
        }
    }
    // A tighter budget, and exact critical layers, give closer logits.
    assert!(diffs[1] < diffs[0] && diffs[1] < diffs[2] && diffs[2] < diffs[3]);
}
