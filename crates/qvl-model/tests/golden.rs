//! The Qwen3-VL golden cases computed with Hugging Face transformers.

use qvl_model::golden::{check_qwen3vl, preprocessed_images};
use qvl_model::{ImageInput, Qwen3VlModel, SafetensorsFile};
use std::path::Path;

/// The tiny checkpoint and the 64x96 test image, preprocessed.
fn tiny_model_and_image() -> qvl_model::Result<(Qwen3VlModel, ImageInput)> {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let model = Qwen3VlModel::load(&data.join("qwen3vl-tiny"))?;
    let path = data.join("images/images.safetensors");
    let input = preprocessed_images(&SafetensorsFile::open(&path)?, &path, "exact_64x96")?;
    Ok((model, input))
}

#[test]
fn every_golden_case_matches_transformers() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/qwen3vl-tiny");
    let outcomes = check_qwen3vl(&dir, &dir.join("golden.safetensors")).unwrap();
    let names: Vec<&str> = outcomes.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names.len(), 3, "{names:?}");
    for o in &outcomes {
        println!(
            "{}: max abs diff {:.3e} (tolerance {}), greedy {:?} vs {:?}",
            o.name, o.max_abs_diff, o.tolerance, o.greedy, o.expected_greedy
        );
    }
    for o in &outcomes {
        assert!(o.pass, "case {} failed: {o:?}", o.name);
    }
}

#[test]
fn a_preprocessed_image_runs_through_the_tiny_model() {
    use qvl_model::{generate, Logits};
    let (model, input) = tiny_model_and_image().unwrap();
    let mut prompt = vec![10, 11];
    prompt.extend(model.image_placeholder(input.grid_thw[0]));
    prompt.extend([12, 13]);
    // 64x96 pixels: 4x6 patches, 6 merged tokens between start and end.
    assert_eq!(prompt.len(), 2 + 8 + 2);
    let a = generate(&model, &prompt, Some(&input), 5).unwrap();
    assert_eq!(a.len(), 5);
    // Last-row logits of a full prefill equal the last-only prefill (up to
    // summation order: one row takes the direct kernel, many the tiled one).
    let vocab = model.config().text.vocab_size;
    let all = model
        .prefill(&mut model.new_session(), &prompt, Some(&input), Logits::All)
        .unwrap();
    let last = model
        .prefill(
            &mut model.new_session(),
            &prompt,
            Some(&input),
            Logits::Last,
        )
        .unwrap();
    let row = &all[(prompt.len() - 1) * vocab..];
    let diff = row
        .iter()
        .zip(&last)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(diff < 1e-4, "{diff}");
    assert_eq!(a[0] as usize, qvl_model::ops::argmax(&last));
}

/// What `qvl run` relies on to recompute a request after its KV storage
/// failed: one prefill of the prompt (with its image) and the tokens
/// generated so far gives the logits that decoding them one by one gave.
#[test]
fn one_prefill_of_a_prompt_and_its_reply_equals_decoding_the_reply() {
    use qvl_model::{generate, Logits};
    let (model, input) = tiny_model_and_image().unwrap();
    let mut prompt = vec![10, 11];
    prompt.extend(model.image_placeholder(input.grid_thw[0]));
    prompt.extend([12, 13]);
    let reply = generate(&model, &prompt, Some(&input), 6).unwrap();
    let mut session = model.new_session();
    let mut stepped = model
        .prefill(&mut session, &prompt, Some(&input), Logits::Last)
        .unwrap();
    for &t in &reply[..4] {
        stepped = model.decode_step(&mut session, t).unwrap();
    }
    let all: Vec<u32> = prompt.iter().chain(&reply[..4]).copied().collect();
    let mut again = model.new_session();
    let recomputed = model
        .prefill(&mut again, &all, Some(&input), Logits::Last)
        .unwrap();
    let diff = stepped
        .iter()
        .zip(&recomputed)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(diff < 1e-4, "{diff}");
    assert_eq!(qvl_model::ops::argmax(&recomputed) as u32, reply[4]);
    // Decoding goes on from the recomputed session as from the first.
    let next = model.decode_step(&mut again, reply[4]).unwrap();
    assert_eq!(qvl_model::ops::argmax(&next) as u32, reply[5]);
}

/// `qvl run` prefills long prompts in chunks to show progress: chunks that
/// cut through an image's rows give the logits of one pass, and progress
/// hears every chunk, ending at the whole prompt.
#[test]
fn a_prefill_in_chunks_with_progress_equals_one_pass() {
    use qvl_model::Logits;
    let (model, input) = tiny_model_and_image().unwrap();
    let mut prompt = vec![10, 11];
    prompt.extend(model.image_placeholder(input.grid_thw[0]));
    prompt.extend([12, 13, 14, 15, 16]);
    let one_pass = model
        .prefill(&mut model.new_session(), &prompt, Some(&input), Logits::All)
        .unwrap();
    let mut heard = Vec::new();
    let mut session = model.new_session();
    let chunked = model
        .prefill_with_progress(
            &mut session,
            &prompt,
            Some(&input),
            Logits::All,
            5,
            &mut |done, total| heard.push((done, total)),
        )
        .unwrap();
    let n = prompt.len();
    assert_eq!(heard, vec![(5, n), (10, n), (n, n)]);
    assert_eq!(chunked.len(), one_pass.len());
    let diff = chunked
        .iter()
        .zip(&one_pass)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(diff < 1e-4, "{diff}");
    // The session goes on from the chunked prefill as from one pass.
    let a = model.decode_step(&mut session, 20).unwrap();
    let b = {
        let mut s = model.new_session();
        model
            .prefill(&mut s, &prompt, Some(&input), Logits::Last)
            .unwrap();
        model.decode_step(&mut s, 20).unwrap()
    };
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    assert!(diff < 1e-4, "{diff}");
}
