//! `qvl run --ram-budget / --gpu-budget` (weights streamed through
//! qvl-tier) against the unbudgeted run, on a model written by
//! `qvl gen-model` and on SmolLM2-135M-Instruct (skipped, and says why, when
//! the GGUF is not in the models cache).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

use qvl_model::fetch::{find_cached, SMOLLM2};
use std::path::Path;
use std::process::{Command, Output};

/// `qvl run` with its spill files in `spill` and `extra` arguments.
fn run(model: &Path, spill: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qvl"))
        .env("QVL_SWAPPING__SWAP_DIRECTORY", spill)
        .args(["run", "--max-tokens", "8", "--prompt", "Name a colour."])
        .arg("--model")
        .arg(model)
        .args(extra)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs unbudgeted and under `budget_args`; asserts the same output and a
/// tier report; returns the budgeted run's stderr.
fn assert_budgeted_equals_plain(model: &Path, budget_args: &[&str]) -> String {
    let spill = tempfile::tempdir().unwrap();
    let plain = run(model, spill.path(), &[]);
    assert!(plain.status.success(), "{}", text(&plain.stderr));
    let tiered = run(model, spill.path(), budget_args);
    let stderr = text(&tiered.stderr);
    assert!(tiered.status.success(), "{stderr}");
    assert!(!text(&plain.stdout).trim().is_empty());
    assert_eq!(text(&tiered.stdout), text(&plain.stdout), "{stderr}");
    for key in [
        "weights tier    RAM",
        "weights tier    SSD",
        "migrations",
        "MB/s",
    ] {
        assert!(
            stderr.contains(key),
            "{key} missing from the report: {stderr}"
        );
    }
    // The spill file is removed when the run ends.
    assert_eq!(std::fs::read_dir(spill.path()).unwrap().count(), 0);
    stderr
}

fn gen_model(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("gen.gguf");
    let out = Command::new(env!("CARGO_BIN_EXE_qvl"))
        .args([
            "gen-model",
            "--layers",
            "6",
            "--hidden",
            "256",
            "--intermediate",
            "512",
            "--heads",
            "4",
            "--kv-heads",
            "2",
            "--out",
        ])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("M parameters"));
    path
}

#[test]
fn ram_budget_on_a_generated_model_prints_the_unbudgeted_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let model = gen_model(dir.path());
    // Six layers of 1.5 MiB (f32): a budget of about two.
    let stderr = assert_budgeted_equals_plain(&model, &["--ram-budget", "3.5MiB"]);
    assert!(stderr.contains("/ 3.5 MiB"), "{stderr}");
}

#[test]
fn gpu_budget_without_a_gpu_tier_is_noted_and_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let model = gen_model(dir.path());
    let stderr =
        assert_budgeted_equals_plain(&model, &["--ram-budget", "4MiB", "--gpu-budget", "2GiB"]);
    assert!(
        stderr.contains("the GPU tier is unavailable") && stderr.contains("ignored"),
        "{stderr}"
    );
    // Alone, it is noted and the run is the plain one.
    let spill = tempfile::tempdir().unwrap();
    let out = run(&model, spill.path(), &["--gpu-budget", "2GiB"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("GPU tier is unavailable"));
}

#[test]
fn ram_budget_below_one_layer_is_refused_with_the_size_needed() {
    let dir = tempfile::tempdir().unwrap();
    let model = gen_model(dir.path());
    let spill = tempfile::tempdir().unwrap();
    let out = run(&model, spill.path(), &["--ram-budget", "100KiB"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("--ram-budget 100KiB is smaller than one decoder layer"),
        "{stderr}"
    );
    let bad = run(&model, spill.path(), &["--ram-budget", "64 parsecs"]);
    assert!(!bad.status.success());
    assert!(
        text(&bad.stderr).contains("--ram-budget"),
        "{}",
        text(&bad.stderr)
    );
}

#[test]
fn budgets_are_refused_for_a_qwen3vl_checkpoint() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../qvl-model/tests/data/qwen3vl-tiny");
    let spill = tempfile::tempdir().unwrap();
    let out = run(&dir, spill.path(), &["--ram-budget", "64MiB"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("apply to GGUF models"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn ram_budget_64mib_on_smollm2_prints_the_unbudgeted_tokens() {
    let Some(model) = find_cached(&SMOLLM2) else {
        eprintln!(
            "SKIPPED ram_budget_64mib_on_smollm2_prints_the_unbudgeted_tokens: SmolLM2 is not \
             in the models cache; fetch it with `qvl fetch-model smollm2`"
        );
        return;
    };
    let stderr = assert_budgeted_equals_plain(&model, &["--ram-budget", "64MiB"]);
    assert!(stderr.contains("/ 64.0 MiB"), "{stderr}");
    assert!(stderr.contains("30 layers"), "{stderr}");
}
