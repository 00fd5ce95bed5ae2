//! The `qvl config` commands as a user runs them.
use std::process::Command;

fn qvl() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qvl"));
    // Keep the test independent of the caller's environment.
    for (k, _) in std::env::vars() {
        if k.starts_with("QVL_") {
            c.env_remove(k);
        }
    }
    c
}

#[test]
fn show_names_the_source_of_each_value() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("qvl.toml");
    std::fs::write(&file, "[caching]\ngpu_cache_size = \"256MiB\"\n").unwrap();
    let out = qvl()
        .args(["config", "show", "--config"])
        .arg(&file)
        .env("QVL_SWAPPING__MEMORY_THRESHOLD", "0.9")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let line = |key: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{key} =")))
            .unwrap_or_else(|| panic!("no {key} in\n{text}"))
            .to_string()
    };
    assert!(line("gpu_cache_size").contains("\"256MiB\""));
    assert!(line("gpu_cache_size").ends_with(&format!("# {}", file.display())));
    assert!(line("memory_threshold").contains("0.9"));
    assert!(
        line("memory_threshold").ends_with("# environment variable QVL_SWAPPING__MEMORY_THRESHOLD")
    );
    assert!(line("cpu_cache_size").ends_with("# default"));
}

#[test]
fn check_accepts_shipped_profiles_and_rejects_bad_files() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    for profile in ["configs/default.toml", "configs/laptop-sm61.toml"] {
        let out = qvl()
            .args(["config", "check"])
            .arg(root.join(profile))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{profile}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[swapping]\nmemory_threshold = 1.5\n").unwrap();
    let out = qvl().args(["config", "check"]).arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(
        err.trim(),
        format!(
            "error: `swapping.memory_threshold` = 1.5 in {} is out of range: allowed 0.0 to 1.0",
            file.display()
        )
    );
}

#[test]
fn env_override_is_validated_and_named() {
    let out = qvl()
        .args(["config", "show"])
        .env("QVL_TIERING__MIGRATION_THRESHOLD", "2")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("`tiering.migration_threshold` = 2 in environment variable QVL_TIERING__MIGRATION_THRESHOLD is out of range"),
        "{err}"
    );
}
