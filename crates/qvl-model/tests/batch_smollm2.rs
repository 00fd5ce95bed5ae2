//! Batched decoding on the real SmolLM2-135M-Instruct: each sequence of a
//! batch gets the logits it gets decoded alone. Skips (and says so) when the
//! model is not fetched; fetch it with
//! `cargo test -p qvl-model --test gguf_fetch -- --ignored`.

use qvl_model::batch::{BatchConfig, BatchEvent, BatchScheduler, Request};
use qvl_model::fetch::{find_cached, SMOLLM2};
use qvl_model::llama::GgufTextModel;
use qvl_model::ops::argmax;
use qvl_model::text::Logits;

#[test]
fn batched_decode_matches_decoding_alone_on_smollm2() {
    let Some(path) = find_cached(&SMOLLM2) else {
        eprintln!(
            "SKIPPED: SmolLM2 is not fetched (models cache: $QVL_MODELS_DIR, $XDG_CACHE_HOME/qvl/models \
             or ~/.cache/qvl/models). Fetch it with `cargo test -p qvl-model --test gguf_fetch -- --ignored`."
        );
        return;
    };
    let model = GgufTextModel::load(&path).unwrap();
    let vocab = model.decoder().config().vocab_size;
    let prompts = [
        "What is the capital of France?",
        "Write a haiku about rain.",
        "2 + 2 =",
        "Name three colors.",
        "Why is the sky blue? Answer in one sentence.",
    ];
    let mut alone = Vec::new();
    let mut batched = Vec::new();
    let mut next = Vec::new();
    for p in prompts {
        let ids = model.prompt_ids(p).unwrap();
        let mut a = model.new_session();
        let logits = model.prefill(&mut a, &ids, Logits::Last).unwrap();
        let mut b = model.new_session();
        model.prefill(&mut b, &ids, Logits::Last).unwrap();
        next.push(argmax(&logits) as u32);
        alone.push(a);
        batched.push(b);
    }
    let mut worst = 0f32;
    for _step in 0..2 {
        let mut refs: Vec<_> = batched.iter_mut().collect();
        let got = model.decode_batch(&mut refs, &next).unwrap();
        for (i, session) in alone.iter_mut().enumerate() {
            let want = model.decode_step(session, next[i]).unwrap();
            let d = got[i * vocab..(i + 1) * vocab]
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            worst = worst.max(d);
            assert!(d < 1e-4, "sequence {i}: max abs logit diff {d}");
            next[i] = argmax(&want) as u32;
        }
    }
    eprintln!("SmolLM2 batch of 5 vs alone: max abs logit diff {worst:.2e}");

    // The scheduler streams the same greedy replies as generating alone.
    let stops = model.stop_tokens();
    let mut sched = BatchScheduler::new(
        model.decoder(),
        BatchConfig {
            max_batch: 2,
            ..BatchConfig::default()
        },
    )
    .unwrap();
    let mut want = Vec::new();
    for (i, p) in prompts.iter().take(3).enumerate() {
        let ids = model.prompt_ids(p).unwrap();
        let max_tokens = 2 + 2 * i;
        let mut s = model.new_session();
        want.push(
            model
                .generate(&mut s, &ids, max_tokens, true, &mut |_| {})
                .unwrap()
                .tokens,
        );
        sched
            .submit(Request {
                prompt: ids,
                max_tokens,
                stop_tokens: stops.clone(),
            })
            .unwrap();
    }
    let mut streams = vec![Vec::new(); want.len()];
    let stats = sched
        .run(&mut |e| {
            if let BatchEvent::Token { request, token } = e {
                streams[*request].push(*token);
            }
        })
        .unwrap();
    assert_eq!(streams, want);
    assert_eq!(stats.finished.len(), 3);
    assert_eq!(sched.kv_blocks_in_use(), 0);
}
