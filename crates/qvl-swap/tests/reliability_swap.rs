//! Reliability of the swap space beyond `store_faults.rs`: many SIGKILLs at
//! random points of a write with a live neighbour store in the same
//! directory, a full file system after start-up, injected ENOSPC in the
//! middle of batches, a read-only file system, permission denied, and a
//! swap directory that is a symlink or someone else's. Every case ends
//! with a clear error naming the path, or with every block read back exact.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

use qvl_core::{Block, BlockKey, BlockStore, DType, TensorKind, TensorMeta};
use qvl_swap::format::PAGE;
use qvl_swap::{FaultPlan, IoMode, SsdStore, SwapConfig, SwapError};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn config(dir: &Path) -> SwapConfig {
    SwapConfig {
        capacity_bytes: 4 << 20,
        io_mode: IoMode::Auto,
        max_inflight: 2,
        ..SwapConfig::in_directory(dir)
    }
}

/// A block whose every byte depends on its id and version, so a block read
/// back with another's bytes, another version's or a mix is caught.
fn block(id: u64, version: u64, len: usize) -> Block {
    let data: Vec<u8> = (0..len)
        .map(|i| (i as u64 * 31 + id.wrapping_mul(7) + version.wrapping_mul(13)) as u8)
        .collect();
    Block::raw(
        BlockKey::from_id(id),
        TensorMeta::new(vec![len], DType::U8, TensorKind::KvCache),
        data,
    )
}

struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn names_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

/// The child side of the crash test: writes (batches, streamed batches,
/// replacements, removals) until killed.
fn crash_child(dir: &Path) -> ! {
    let store = SsdStore::open(&config(dir)).unwrap();
    println!("ready");
    let mut i = 0u64;
    loop {
        let _ = store.put_batch(
            (0..4)
                .map(|j| block(i * 4 + j, i, 9_000 + j as usize * 3_000))
                .collect(),
        );
        let _ = store.put_streamed(
            (0..3)
                .map(|j| (j as u32, block(1_000_000 + j, i, 5_000)))
                .collect(),
        );
        if i % 6 == 5 {
            for j in 0..24 {
                let _ = store.remove(&BlockKey::from_id((i - 5) * 4 + j));
            }
        }
        i += 1;
    }
}

const CRASH_ROUNDS: u64 = 30;

/// SIGKILL at random points of a writing process, 30 times; a neighbour
/// store that stays alive in the same directory the whole time. After each
/// kill a new store removes the dead process's file (and a leftover
/// temporary file) but not the neighbour's, starts empty, and every read
/// of the neighbour's blocks and of its own returns the exact bytes.
#[test]
fn repeated_sigkills_mid_write_lose_nothing_and_leave_no_stale_files() {
    if let Ok(dir) = std::env::var("QVL_RELIABILITY_CRASH_CHILD") {
        crash_child(Path::new(&dir));
    }
    let tmp = tempfile::tempdir().unwrap();
    let neighbour = SsdStore::open(&config(tmp.path())).unwrap();
    let kept: Vec<Block> = (0..12).map(|i| block(50_000 + i, 1, 7_000)).collect();
    neighbour.put_batch(kept.clone()).unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut stale_removed = 0;
    for round in 0..CRASH_ROUNDS {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "repeated_sigkills_mid_write_lose_nothing_and_leave_no_stale_files",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("QVL_RELIABILITY_CRASH_CHILD", tmp.path())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = child.stdout.take().unwrap();
        let mut seen = Vec::new();
        let mut b = [0u8; 64];
        while !String::from_utf8_lossy(&seen).contains("ready") {
            use std::io::Read;
            let n = out.read(&mut b).unwrap();
            assert!(n > 0, "child exited before opening its store");
            seen.extend_from_slice(&b[..n]);
        }
        std::thread::sleep(std::time::Duration::from_micros(rng.below(60_000)));
        child.kill().unwrap(); // SIGKILL
        let pid = child.id();
        child.wait().unwrap();
        // A temporary file of the dead process, as a crash during creation leaves.
        let tmp_file = tmp.path().join(format!("qvl-swap-{pid}-9.tmp"));
        std::fs::write(&tmp_file, b"half-made").unwrap();
        // A file that is not ours is never touched.
        let foreign = tmp.path().join("notes.txt");
        if round == 0 {
            std::fs::write(&foreign, b"mine").unwrap();
        }
        let before = names_in(tmp.path()).len();

        let store = SsdStore::open(&config(tmp.path())).unwrap();
        let mut expected = vec![
            foreign.clone(),
            neighbour.path().to_path_buf(),
            store.path().to_path_buf(),
        ];
        expected.sort();
        assert_eq!(
            names_in(tmp.path()),
            expected,
            "round {round}: stale files stay"
        );
        stale_removed += before + 1 - expected.len();
        assert!(store.is_empty());
        assert_eq!(store.get(&BlockKey::from_id(0)).unwrap(), None);
        let mine: Vec<Block> = (0..4)
            .map(|i| block(i, round, 6_000 + i as usize))
            .collect();
        store.put_batch(mine.clone()).unwrap();
        for (from, blocks) in [(&store, &mine), (&neighbour, &kept)] {
            for b in blocks {
                assert!(
                    from.get(&b.key).unwrap().as_ref() == Some(b),
                    "round {round}: wrong bytes"
                );
            }
        }
    }
    assert_eq!(
        stale_removed as u64,
        2 * CRASH_ROUNDS,
        "one swap file and one .tmp per kill"
    );
    assert_eq!(neighbour.stats().integrity_failures, 0);
    assert_eq!(
        std::fs::read(tmp.path().join("notes.txt")).unwrap(),
        b"mine"
    );
}

/// Mounts a tmpfs of `size` at `dir` (root only); None when not allowed.
fn tmpfs(dir: &Path, size: &str, extra: &str) -> Option<Mount> {
    std::fs::create_dir_all(dir).unwrap();
    let opts = if extra.is_empty() {
        format!("size={size}")
    } else {
        format!("size={size},{extra}")
    };
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &opts, "tmpfs"])
        .arg(dir)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then(|| Mount(dir.to_path_buf()))
}

struct Mount(PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// The file system fills up after the store opened: the swap file's space
/// was reserved at start-up, so writes and reads go on and lose nothing.
#[test]
fn a_file_system_that_fills_after_start_up_loses_no_block() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("mnt");
    let Some(_mount) = tmpfs(&mnt, "2m", "") else {
        eprintln!("skipped: cannot mount a tmpfs (not root?)");
        return;
    };
    let cfg = SwapConfig {
        capacity_bytes: 1 << 20,
        ..config(&mnt.join("swap"))
    };
    let store = SsdStore::open(&cfg).unwrap();
    // Fill the rest of the file system until ENOSPC.
    let filler = mnt.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let chunk = vec![7u8; 64 << 10];
    let err = loop {
        use std::io::Write;
        if let Err(e) = f.write_all(&chunk).and_then(|()| f.sync_all()) {
            break e;
        }
    };
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    let blocks: Vec<Block> = (0..40).map(|i| block(i, 0, 20_000)).collect();
    store.put_batch(blocks[..20].to_vec()).unwrap();
    for b in &blocks[20..] {
        store.put(b.clone()).unwrap();
    }
    for b in &blocks {
        assert!(
            store.get(&b.key).unwrap().as_ref() == Some(b),
            "wrong bytes"
        );
    }
    // Replacements on a full disk keep working too.
    for i in 0..10 {
        store.put(block(i, 1, 20_000)).unwrap();
    }
    for i in 0..10 {
        assert_eq!(
            store.get(&BlockKey::from_id(i)).unwrap(),
            Some(block(i, 1, 20_000))
        );
    }
}

/// ENOSPC injected at every byte budget of a batch: each failed batch
/// publishes nothing, frees its pages, and every block stored before reads
/// back exact; with the fault gone the same batch succeeds.
#[test]
fn injected_enospc_at_every_point_of_a_batch_keeps_every_old_block() {
    let tmp = tempfile::tempdir().unwrap();
    let store = SsdStore::open(&config(tmp.path())).unwrap();
    let old: Vec<Block> = (0..8).map(|i| block(i, 0, 5_000)).collect();
    store.put_batch(old.clone()).unwrap();
    let used = store.used_bytes();
    let mut faults = 0;
    for budget in (0..12).map(|i| i * PAGE as u64 / 2) {
        store.set_faults(FaultPlan {
            write_budget: Some(budget),
        });
        // Replacements of half the old blocks and new blocks, in one batch.
        let batch: Vec<Block> = (4..12).map(|i| block(i, 1, 5_000)).collect();
        match store.put_batch(batch) {
            Err(e) => {
                assert!(matches!(e, SwapError::DiskFull { .. }), "{e}");
                assert!(
                    e.to_string().contains(&tmp.path().display().to_string()),
                    "{e}"
                );
                faults += 1;
                assert_eq!(store.used_bytes(), used, "budget {budget}: pages leaked");
                for b in &old {
                    assert_eq!(
                        store.get(&b.key).unwrap().as_ref(),
                        Some(b),
                        "budget {budget}"
                    );
                }
                assert_eq!(store.get(&BlockKey::from_id(11)).unwrap(), None);
            }
            Ok(()) => panic!("a budget of {budget} bytes cannot hold 8 records"),
        }
    }
    assert_eq!(faults, 12);
    store.set_faults(FaultPlan::default());
    let batch: Vec<Block> = (4..12).map(|i| block(i, 1, 5_000)).collect();
    store.put_batch(batch.clone()).unwrap();
    for b in old[..4].iter().chain(&batch) {
        assert_eq!(store.get(&b.key).unwrap().as_ref(), Some(b));
    }
    assert_eq!(store.stats().integrity_failures, 0);
}

#[test]
fn a_read_only_file_system_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("ro");
    let Some(_mount) = tmpfs(&mnt, "1m", "ro") else {
        eprintln!("skipped: cannot mount a tmpfs (not root?)");
        return;
    };
    let err = SsdStore::open(&config(&mnt)).err().expect("read-only");
    let text = err.to_string();
    assert!(text.contains(&mnt.display().to_string()), "{text}");
    assert!(text.to_lowercase().contains("read-only"), "{text}");
}

/// The child side of the permission test: opens a store and prints the
/// outcome.
fn permission_child(dir: &Path) -> ! {
    match SsdStore::open(&config(dir)) {
        Ok(_) => println!("OPENED"),
        Err(e) => println!("ERROR: {e}"),
    }
    std::process::exit(0)
}

/// An unprivileged process (uid 65534) cannot use a swap directory inside
/// a private directory of root, nor root's own swap directory: a clear
/// "permission denied" naming the path, and root's swap file is untouched.
#[test]
fn permission_denied_is_a_clear_error() {
    if let Ok(dir) = std::env::var("QVL_RELIABILITY_PERM_CHILD") {
        permission_child(Path::new(&dir));
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to run a child as another user");
        return;
    }
    // World-traversable parent so that only the inner directory refuses.
    let parent = tempfile::Builder::new()
        .prefix("qvl-perm")
        .tempdir_in("/tmp")
        .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(parent.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let private = parent.path().join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let roots = SsdStore::open(&config(&parent.path().join("roots"))).unwrap();
    let b = block(1, 0, 3_000);
    roots.put(b.clone()).unwrap();
    let exe = std::env::current_exe().unwrap();
    for (dir, expect) in [
        (private.join("swap"), "Permission denied"),
        (parent.path().join("roots"), "owned by uid 0"),
    ] {
        let out = Command::new(&exe)
            .args([
                "--exact",
                "permission_denied_is_a_clear_error",
                "--nocapture",
            ])
            .env("QVL_RELIABILITY_PERM_CHILD", &dir)
            .uid(65534)
            .gid(65534)
            .output();
        let Ok(out) = out else {
            eprintln!("skipped: cannot start a child as uid 65534");
            return;
        };
        let text = String::from_utf8_lossy(&out.stdout);
        if !text.contains("ERROR") && !text.contains("OPENED") {
            eprintln!(
                "skipped: the test binary is not runnable as uid 65534: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return;
        }
        let line = text
            .lines()
            .find(|l| l.starts_with("ERROR"))
            .unwrap_or_else(|| panic!("uid 65534 opened {}: {text}", dir.display()));
        assert!(line.contains(expect), "{line}");
        assert!(line.contains(&dir.display().to_string()), "{line}");
    }
    assert_eq!(roots.get(&b.key).unwrap(), Some(b));
}

#[test]
fn a_symlinked_or_foreign_swap_directory_is_refused_and_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let real = tmp.path().join("real");
    std::fs::create_dir(&real).unwrap();
    std::fs::write(real.join("keep.bin"), b"data").unwrap();
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let err = SsdStore::open(&config(&link))
        .err()
        .expect("symlink refused");
    assert!(matches!(err, SwapError::SymlinkDirectory { .. }), "{err}");
    assert!(
        err.to_string().contains(&link.display().to_string()),
        "{err}"
    );
    assert_eq!(
        names_in(&real),
        vec![real.join("keep.bin")],
        "nothing written through the link"
    );
    // A dangling link is refused the same way, and nothing is created.
    let dangling = tmp.path().join("dangling");
    std::os::unix::fs::symlink(tmp.path().join("missing"), &dangling).unwrap();
    assert!(matches!(
        SsdStore::open(&config(&dangling)).err(),
        Some(SwapError::SymlinkDirectory { .. })
    ));
    assert!(!tmp.path().join("missing").exists());
    // A file where the directory should be.
    let file = tmp.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    assert!(matches!(
        SsdStore::open(&config(&file)).err(),
        Some(SwapError::NotADirectory { .. })
    ));
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
    // Someone else's directory (chown needs root).
    let foreign = tmp.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("qvl-swap-1-0.swap"), b"theirs").unwrap();
    if std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).is_ok() {
        let err = SsdStore::open(&config(&foreign))
            .err()
            .expect("foreign refused");
        assert!(
            matches!(err, SwapError::ForeignOwner { owner: 65534, .. }),
            "{err}"
        );
        assert!(
            err.to_string().contains(&foreign.display().to_string()),
            "{err}"
        );
        // Its files, even ones named like stale swap files, stay.
        assert_eq!(
            std::fs::read(foreign.join("qvl-swap-1-0.swap")).unwrap(),
            b"theirs"
        );
    } else {
        eprintln!("skipped the foreign-owner case: chown needs root");
    }
}
