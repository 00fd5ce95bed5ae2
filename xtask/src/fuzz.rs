//! `cargo xtask fuzz`: every parser's fuzz target for a time budget.
//!
//! With cargo-fuzz installed (`cargo install cargo-fuzz`), each target in
//! `fuzz/fuzz_targets/` runs under libFuzzer (`RUSTC_BOOTSTRAP=1` lets the
//! stable compiler take the `-Z` flags cargo-fuzz passes), starting from
//! the committed corpus `fuzz/corpus/<target>`; new inputs go to a scratch
//! corpus under the target directory and, on a full run, the ones that add
//! coverage are merged into the committed corpus. Without cargo-fuzz (or
//! with `--stable`), the corpus replay and a time-bounded random-mutation
//! loop run as ordinary tests on stable. Any crash fails the task and names
//! the saved input.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// Seconds per target of `--quick` (CI) and of a plain run.
const QUICK_SECS: u64 = 10;
const DEFAULT_SECS: u64 = 120;

struct Options {
    secs: u64,
    quick: bool,
    stable: bool,
    sanitizer: String,
    targets: Vec<String>,
}

fn parse(args: &[String], all: &[String]) -> Result<Options> {
    let mut o = Options {
        secs: DEFAULT_SECS,
        quick: false,
        stable: false,
        sanitizer: "address".to_string(),
        targets: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => {
                o.quick = true;
                o.secs = QUICK_SECS;
            }
            "--seconds" => {
                let v = it.next().context("--seconds needs a number")?;
                o.secs = v
                    .parse()
                    .with_context(|| format!("--seconds {v:?} is not a whole number"))?;
            }
            "--stable" => o.stable = true,
            "--sanitizer" => {
                o.sanitizer = it
                    .next()
                    .context("--sanitizer needs address or none")?
                    .clone();
            }
            t if all.iter().any(|n| n == t) => o.targets.push(t.to_string()),
            other => bail!(
                "unknown fuzz option or target {other:?}; targets: {}",
                all.join(", ")
            ),
        }
    }
    if o.targets.is_empty() {
        o.targets = all.to_vec();
    }
    Ok(o)
}

/// Target names: the files of `fuzz/fuzz_targets/`.
fn targets(root: &Path) -> Result<Vec<String>> {
    let dir = root.join("fuzz/fuzz_targets");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_suffix(".rs").map(str::to_string)
        })
        .collect();
    names.sort();
    Ok(names)
}

fn cargo_fuzz_installed() -> bool {
    Command::new("cargo")
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Entry point of `cargo xtask fuzz`.
pub fn run(args: &[String]) -> Result<()> {
    let root = super::repo_root();
    let all = targets(&root)?;
    let o = parse(args, &all)?;
    if !o.stable && cargo_fuzz_installed() {
        with_cargo_fuzz(&root, &o)
    } else {
        if !o.stable {
            println!(
                "note: cargo-fuzz is not installed; install it with `cargo install cargo-fuzz` \
                 (it runs on stable with RUSTC_BOOTSTRAP=1, which this task sets). \
                 Falling back to the corpus replay and the stable mutation loop."
            );
        }
        stable(&o)
    }
}

struct Outcome {
    target: String,
    execs: Option<u64>,
    secs: f64,
    crash: Option<String>,
}

fn with_cargo_fuzz(root: &Path, o: &Options) -> Result<()> {
    let target_dir =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let work = target_dir.join("qvl-fuzz");
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    println!(
        "==> cargo fuzz build ({} targets, sanitizer {})",
        o.targets.len(),
        o.sanitizer
    );
    let start = Instant::now();
    let status = fuzz_cmd(root, o, "build")
        .status()
        .context("cannot start cargo fuzz build")?;
    if !status.success() {
        bail!("cargo fuzz build failed ({status})");
    }
    println!(
        "<== cargo fuzz build: {:.1}s",
        start.elapsed().as_secs_f64()
    );
    let mut outcomes = Vec::new();
    for t in &o.targets {
        let scratch = work.join("corpus").join(t);
        std::fs::create_dir_all(&scratch)?;
        let artifacts = root.join("fuzz/artifacts").join(t);
        std::fs::create_dir_all(&artifacts)?;
        let log = work.join(format!("{t}.log"));
        let mut cmd = fuzz_cmd(root, o, "run");
        cmd.arg(t)
            .arg(&scratch)
            .arg(root.join("fuzz/corpus").join(t))
            .arg("--")
            .arg(format!("-max_total_time={}", o.secs))
            .arg("-timeout=10")
            .arg("-rss_limit_mb=2048")
            .arg("-print_final_stats=1")
            .arg(format!("-artifact_prefix={}/", artifacts.display()));
        println!("==> fuzz {t} for {} s", o.secs);
        let start = Instant::now();
        let out = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .with_context(|| format!("cannot start cargo fuzz run {t}"))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(&log, &text)?;
        let execs = final_stat(&text, "stat::number_of_executed_units:");
        let crash = if out.status.success() {
            None
        } else {
            Some(
                text.lines()
                    .find(|l| l.contains("Test unit written to"))
                    .map_or_else(
                        || format!("exit {} (log {})", out.status, log.display()),
                        |l| l.trim().to_string(),
                    ),
            )
        };
        let secs = start.elapsed().as_secs_f64();
        println!(
            "<== fuzz {t}: {} execs in {secs:.0} s{}",
            execs.map_or("?".to_string(), |n| n.to_string()),
            crash
                .as_ref()
                .map_or(String::new(), |c| format!(", CRASH: {c}"))
        );
        if crash.is_none() && !o.quick {
            // Keep only inputs that add coverage to the committed corpus.
            let status = fuzz_cmd(root, o, "run")
                .arg(t)
                .arg(root.join("fuzz/corpus").join(t))
                .arg(&scratch)
                .args(["--", "-merge=1"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()?;
            if !status.success() {
                println!("note: merging {t}'s new inputs into fuzz/corpus failed ({status})");
            }
        }
        outcomes.push(Outcome {
            target: t.clone(),
            execs,
            secs,
            crash,
        });
    }
    summarize(&work, &outcomes)
}

fn fuzz_cmd(root: &Path, o: &Options, sub: &str) -> Command {
    let mut c = Command::new("cargo");
    c.current_dir(root).env("RUSTC_BOOTSTRAP", "1").args([
        "fuzz",
        sub,
        "--sanitizer",
        &o.sanitizer,
    ]);
    c
}

/// The number after `key` in libFuzzer's final stats.
fn final_stat(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix(key))
        .and_then(|v| v.trim().parse().ok())
}

fn summarize(work: &Path, outcomes: &[Outcome]) -> Result<()> {
    println!("\n{:<20} {:>12} {:>8}  result", "target", "execs", "secs");
    let mut rows = Vec::new();
    for o in outcomes {
        println!(
            "{:<20} {:>12} {:>8.0}  {}",
            o.target,
            o.execs.map_or("?".to_string(), |n| n.to_string()),
            o.secs,
            o.crash.as_deref().unwrap_or("no crash")
        );
        rows.push(serde_json::json!({
            "target": o.target, "execs": o.execs, "secs": o.secs, "crash": o.crash,
        }));
    }
    let path = work.join("summary.json");
    std::fs::write(&path, serde_json::to_string_pretty(&rows)?)?;
    println!("summary: {}", path.display());
    let crashed: Vec<&str> = outcomes
        .iter()
        .filter(|o| o.crash.is_some())
        .map(|o| o.target.as_str())
        .collect();
    if !crashed.is_empty() {
        bail!(
            "fuzzing found crashes in {}; inputs under fuzz/artifacts/ (copy each to fuzz/regressions/<target>/ once fixed)",
            crashed.join(", ")
        );
    }
    Ok(())
}

fn stable(o: &Options) -> Result<()> {
    let mut replay = super::cargo();
    replay.args([
        "test",
        "-p",
        "qvl-runtime",
        "--test",
        "reliability_fuzz_corpus",
    ]);
    super::step("fuzz corpus replay (stable)", replay)?;
    let mut mutate = super::cargo();
    mutate
        .args([
            "test",
            "-p",
            "qvl-runtime",
            "--test",
            "reliability_fuzz_corpus",
            "--",
            "--ignored",
            "--exact",
            "mutate_for_a_while",
            "--nocapture",
        ])
        .env("QVL_FUZZ_SECONDS", o.secs.to_string())
        .env("QVL_FUZZ_TARGETS", o.targets.join(","));
    super::step(
        &format!("fuzz mutation loop (stable, {} s per target)", o.secs),
        mutate,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzer_final_stats() {
        let log = "#1024 DONE cov: 10\nstat::number_of_executed_units: 123456\nstat::average_exec_per_sec:     12345\n";
        assert_eq!(
            final_stat(log, "stat::number_of_executed_units:"),
            Some(123456)
        );
        assert_eq!(
            final_stat("nothing", "stat::number_of_executed_units:"),
            None
        );
    }

    #[test]
    fn options_pick_time_and_targets() {
        let all = vec!["gguf".to_string(), "image".to_string()];
        let o = parse(&["--quick".into(), "image".into()], &all).unwrap();
        assert_eq!(
            (o.secs, o.targets.clone()),
            (QUICK_SECS, vec!["image".to_string()])
        );
        let o = parse(&["--seconds".into(), "3".into()], &all).unwrap();
        assert_eq!((o.secs, o.targets.len()), (3, 2));
        assert!(parse(&["nope".into()], &all).is_err());
    }
}
