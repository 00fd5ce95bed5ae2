//! The Qwen3-VL golden cases computed with Hugging Face transformers.

use qvl_model::golden::check_qwen3vl;
use std::path::Path;

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
