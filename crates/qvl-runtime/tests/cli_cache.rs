//! `qvl cache replay` as a user runs it.
use std::process::Command;

fn qvl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qvl"))
}

#[test]
fn replay_json_has_every_policy_and_capacity() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("t.jsonl");
    // Three requests sharing a prefix: blocks 1 and 2 are reused.
    std::fs::write(
        &trace,
        "{\"timestamp\":0,\"input_length\":1024,\"output_length\":10,\"hash_ids\":[1,2]}\n\
         {\"timestamp\":5,\"input_length\":1536,\"output_length\":10,\"hash_ids\":[1,2,3]}\n\
         {\"timestamp\":9,\"input_length\":1024,\"output_length\":10,\"hash_ids\":[1,4]}\n",
    )
    .unwrap();
    let out = qvl()
        .args(["cache", "replay", "--trace"])
        .arg(&trace)
        .args(["--capacity", "50%,3", "--policy", "predictive", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    // predictive, lru and belady at two capacities.
    assert_eq!(rows.len(), 6);
    for row in rows {
        assert_eq!(row["accesses"], 7);
        let hits = row["hits"].as_u64().unwrap();
        assert!((row["hit_ratio"].as_f64().unwrap() - hits as f64 / 7.0).abs() < 1e-12);
    }
    // 50% of 4 unique blocks is 2 blocks.
    assert_eq!(rows[0]["capacity_blocks"], 2);
    assert_eq!(rows[0]["capacity_fraction"], 0.5);
    assert_eq!(rows[3]["capacity_blocks"], 3);
    // Belady is never worse than LRU.
    let hits = |policy: &str, blocks: u64| {
        rows.iter()
            .find(|r| r["policy"] == policy && r["capacity_blocks"] == blocks)
            .unwrap()["hits"]
            .as_u64()
            .unwrap()
    };
    assert!(hits("belady", 2) >= hits("lru", 2));
}

#[test]
fn replay_names_the_bad_line() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("bad.jsonl");
    std::fs::write(
        &trace,
        "{\"timestamp\":0,\"input_length\":512,\"output_length\":1,\"hash_ids\":[1]}\n\
         {\"timestamp\":1,\"input_length\":512,\"output_length\":1,\"hash_ids\":\"x\"}\n",
    )
    .unwrap();
    let out = qvl()
        .args(["cache", "replay", "--trace"])
        .arg(&trace)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.jsonl:2:"), "{err}");
    assert!(err.contains("hash_ids"), "{err}");
}
