//! The fuzz corpora on stable: every committed corpus file and crash
//! regression under `fuzz/` goes through its parser harness (the same code
//! the cargo-fuzz targets run), then a bounded number of deterministic
//! mutations of every seed. No input may panic.
//!
//! `cargo xtask fuzz` runs the ignored `mutate_for_a_while` for a time
//! budget when cargo-fuzz is not installed; `write_generated_seeds` writes
//! the seeds that need the project's encoders (swap records, JPEG).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

#[path = "../../../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod harness;

use harness::{mutate, Rng, TARGETS};
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// Files of `fuzz/<kind>/<target>/`, sorted (empty when the directory is missing).
fn files(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = fuzz_dir().join(kind).join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".to_string())
}

/// Runs `f(data)`; a panic comes back as its message.
fn run_one(f: fn(&[u8]), data: &[u8]) -> Result<(), String> {
    catch_unwind(AssertUnwindSafe(|| f(data))).map_err(|p| panic_message(&*p))
}

/// Silences the default panic hook while `body` runs (the failures are
/// collected and reported together instead).
fn quietly<T>(body: impl FnOnce() -> T) -> T {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let out = body();
    std::panic::set_hook(previous);
    out
}

#[test]
fn every_corpus_file_and_crash_regression_parses_without_panic() {
    let mut failures = Vec::new();
    let mut counts = BTreeMap::new();
    quietly(|| {
        for (name, f) in TARGETS {
            let corpus = files("corpus", name);
            let regressions = files("regressions", name);
            counts.insert(*name, (corpus.len(), regressions.len()));
            for path in corpus.iter().chain(&regressions) {
                let data = std::fs::read(path).unwrap();
                if let Err(msg) = run_one(*f, &data) {
                    failures.push(format!("{}: {msg}", path.display()));
                }
            }
        }
    });
    for (name, (c, r)) in &counts {
        println!("{name}: {c} corpus files, {r} regressions replayed");
        assert!(*c > 0, "fuzz/corpus/{name} is empty");
    }
    assert!(failures.is_empty(), "panics:\n{}", failures.join("\n"));
}

/// Mutates the corpus of `target` for `budget` (or `max_execs` inputs);
/// returns (executions, crashing inputs with their messages).
fn mutation_loop(
    target: &str,
    f: fn(&[u8]),
    seed: u64,
    budget: Duration,
    max_execs: u64,
) -> (u64, Vec<(Vec<u8>, String)>) {
    let seeds: Vec<Vec<u8>> = files("corpus", target)
        .iter()
        .chain(&files("regressions", target))
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    assert!(!seeds.is_empty(), "no seeds for {target}");
    let max_len = seeds.iter().map(Vec::len).max().unwrap_or(0) * 2 + 64;
    let mut rng = Rng::new(seed);
    let mut crashes = Vec::new();
    let start = Instant::now();
    let mut execs = 0u64;
    // Inputs that parsed become seeds too, a little like coverage feedback
    // without the coverage: mutations pile up instead of always restarting.
    let mut pool = seeds.clone();
    while execs < max_execs && start.elapsed() < budget {
        let base = &pool[rng.below(pool.len())];
        let other = &seeds[rng.below(seeds.len())];
        let input = mutate(base, other, &mut rng, max_len);
        execs += 1;
        match run_one(f, &input) {
            Ok(()) => {
                if rng.below(64) == 0 && pool.len() < 256 {
                    pool.push(input);
                }
            }
            Err(msg) => crashes.push((input, msg)),
        }
    }
    (execs, crashes)
}

fn report_crashes(target: &str, crashes: &[(Vec<u8>, String)]) -> Vec<String> {
    let dir = fuzz_dir().join("artifacts").join(target);
    let mut out = Vec::new();
    for (input, msg) in crashes.iter().take(20) {
        let name = format!("crash-stable-{:016x}", xxh(input));
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(dir.join(&name), input);
        out.push(format!(
            "{target}: {msg} (input saved as fuzz/artifacts/{target}/{name})"
        ));
    }
    out
}

fn xxh(data: &[u8]) -> u64 {
    // FNV-1a: names files, nothing more.
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A fixed number of mutations per target, the same every run: cheap
/// enough for every `cargo test`.
#[test]
fn bounded_mutations_of_every_seed_never_panic() {
    let mut failures = Vec::new();
    quietly(|| {
        for (i, (name, f)) in TARGETS.iter().enumerate() {
            let (execs, crashes) =
                mutation_loop(name, *f, 0x5eed + i as u64, Duration::from_secs(3600), 400);
            assert_eq!(execs, 400);
            failures.extend(report_crashes(name, &crashes));
        }
    });
    assert!(failures.is_empty(), "panics:\n{}", failures.join("\n"));
}

/// The stable fuzzing loop: `QVL_FUZZ_SECONDS` (default 10) per target,
/// targets from `QVL_FUZZ_TARGETS` (comma-separated, default all), seed
/// from `QVL_FUZZ_SEED`. Prints one `fuzz-stable <target>: <n> execs`
/// line per target and saves crashing inputs under `fuzz/artifacts/`.
#[test]
#[ignore = "time-bounded fuzzing; run by `cargo xtask fuzz` without cargo-fuzz"]
fn mutate_for_a_while() {
    let secs: f64 = std::env::var("QVL_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10.0);
    let seed: u64 = std::env::var("QVL_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    let wanted: Option<Vec<String>> = std::env::var("QVL_FUZZ_TARGETS")
        .ok()
        .filter(|s| !s.is_empty())
        .map(|s| s.split(',').map(str::to_string).collect());
    let mut failures = Vec::new();
    quietly(|| {
        for (i, (name, f)) in TARGETS.iter().enumerate() {
            if wanted
                .as_ref()
                .is_some_and(|w| !w.iter().any(|n| n == name))
            {
                continue;
            }
            let (execs, crashes) = mutation_loop(
                name,
                *f,
                seed ^ (i as u64) << 40,
                Duration::from_secs_f64(secs),
                u64::MAX,
            );
            println!(
                "fuzz-stable {name}: {execs} execs in {secs:.0} s, {} crashes (seed {seed})",
                crashes.len()
            );
            failures.extend(report_crashes(name, &crashes));
        }
    });
    assert!(failures.is_empty(), "panics:\n{}", failures.join("\n"));
}

/// Writes the seeds that need the project's own encoders: swap records
/// (with a valid checksum) and a JPEG.
#[test]
#[ignore = "writes fuzz/corpus; run once when the formats change"]
fn write_generated_seeds() {
    use qvl_core::{BlockKey, CodecId};
    use qvl_swap::format::{encode_header, record_pages, RecordHeader, HEADER_LEN, PAGE};
    let dir = fuzz_dir().join("corpus/swap_record");
    std::fs::create_dir_all(&dir).unwrap();
    for (i, len) in [0usize, 1, 100, PAGE - HEADER_LEN, 5000]
        .into_iter()
        .enumerate()
    {
        let payload: Vec<u8> = (0..len).map(|j| (j * 31 + i) as u8).collect();
        let h = RecordHeader {
            codec: CodecId(i as u16),
            key: BlockKey::from_id(1000 + i as u64),
            payload_len: len as u64,
            generation: 7 + i as u64,
        };
        // Records on disk are padded to whole pages; keep seeds short
        // except one, so the fuzzer stays fast.
        let total = if i == 4 {
            record_pages(len) * PAGE
        } else {
            HEADER_LEN + len
        };
        let mut rec = vec![0u8; total];
        rec[HEADER_LEN..HEADER_LEN + len].copy_from_slice(&payload);
        encode_header(&h, &payload, &mut rec);
        std::fs::write(dir.join(format!("seed-record-{i}")), &rec).unwrap();
    }
    std::fs::write(dir.join("seed-name-stale"), "qvl-swap-4242-3.swap").unwrap();

    let dir = fuzz_dir().join("corpus/image");
    let img = image::RgbImage::from_fn(12, 9, |x, y| {
        image::Rgb([(x * 20) as u8, (y * 25) as u8, ((x + y) * 9) as u8])
    });
    for (name, q) in [("seed-jpeg-q90", 90u8), ("seed-jpeg-q20", 20)] {
        let mut bytes = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, q)
            .encode_image(&img)
            .unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}
