//! The swap directory: created private, refused when it is a symlink or
//! someone else's, and cleaned of swap files whose process is gone.

use crate::error::{Result, SwapError};
use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Prefix of every swap file name: `qvl-swap-<pid>-<seq>.swap`.
pub const FILE_PREFIX: &str = "qvl-swap-";
/// Suffix of every swap file name.
pub const FILE_SUFFIX: &str = ".swap";

/// Creates `dir` (mode 0700) if missing and checks that it is a real
/// directory owned by this process's user. Tightens the mode of an existing
/// directory to 0700: swap files hold model activations of user requests.
pub fn prepare_directory(dir: &Path) -> Result<()> {
    match fs::symlink_metadata(dir) {
        Ok(meta) => {
            if meta.file_type().is_symlink() {
                return Err(SwapError::SymlinkDirectory {
                    path: dir.to_path_buf(),
                });
            }
            if !meta.is_dir() {
                return Err(SwapError::NotADirectory {
                    path: dir.to_path_buf(),
                });
            }
            // SAFETY: geteuid has no preconditions and cannot fail.
            let me = unsafe { libc::geteuid() };
            if meta.uid() != me {
                return Err(SwapError::ForeignOwner {
                    path: dir.to_path_buf(),
                    owner: meta.uid(),
                    me,
                });
            }
            if meta.mode() & 0o077 != 0 {
                fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|e| {
                    SwapError::io("making private (0700) the swap directory", dir, e)
                })?;
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| SwapError::io("creating the swap directory", dir, e))?;
            // The umask may have masked bits off; 0700 is what we want exactly.
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                .map_err(|e| SwapError::io("setting mode 0700 on the swap directory", dir, e))?;
            // Re-check: a racing process may have put a symlink there.
            let meta = fs::symlink_metadata(dir)
                .map_err(|e| SwapError::io("inspecting the swap directory", dir, e))?;
            if !meta.is_dir() {
                return Err(SwapError::NotADirectory {
                    path: dir.to_path_buf(),
                });
            }
            Ok(())
        }
        Err(e) => Err(SwapError::io("inspecting the swap directory", dir, e)),
    }
}

/// The pid a swap file name carries, if the name is one of ours.
pub fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(FILE_PREFIX)?;
    let rest = rest
        .strip_suffix(FILE_SUFFIX)
        .or_else(|| rest.strip_suffix(".tmp"))?;
    rest.split('-').next()?.parse().ok()
}

fn process_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Removes swap files in `dir` left by processes that no longer run (a
/// crash, a SIGKILL). Returns the removed paths. Files of live processes,
/// and files that are not ours, are left alone.
pub fn clean_stale_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries =
        fs::read_dir(dir).map_err(|e| SwapError::io("listing the swap directory", dir, e))?;
    let mut removed = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| SwapError::io("listing the swap directory", dir, e))?;
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(owner_pid) else {
            continue;
        };
        if process_alive(pid) {
            continue;
        }
        let path = entry.path();
        match fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            // Another process cleaning at the same time got there first.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(SwapError::io("removing the stale swap file", path, e)),
        }
    }
    if !removed.is_empty() {
        tracing::info!(count = removed.len(), dir = %dir.display(), "removed stale swap files");
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_owner_pid() {
        assert_eq!(owner_pid("qvl-swap-123-4.swap"), Some(123));
        assert_eq!(owner_pid("qvl-swap-123-4.tmp"), Some(123));
        assert_eq!(owner_pid("other-123.swap"), None);
        assert_eq!(owner_pid("qvl-swap-x-4.swap"), None);
    }

    #[test]
    fn creates_private_and_refuses_symlinks_and_files() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        prepare_directory(&dir).unwrap();
        let mode = fs::metadata(&dir).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        let err = prepare_directory(&link).unwrap_err();
        assert!(matches!(err, SwapError::SymlinkDirectory { .. }), "{err}");
        assert!(err.to_string().contains("symbolic link"));
        let file = tmp.path().join("file");
        fs::write(&file, b"x").unwrap();
        assert!(matches!(
            prepare_directory(&file).unwrap_err(),
            SwapError::NotADirectory { .. }
        ));
        // An existing open directory is tightened to 0700.
        let open = tmp.path().join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        prepare_directory(&open).unwrap();
        assert_eq!(fs::metadata(&open).unwrap().mode() & 0o777, 0o700);
    }

    #[test]
    fn refuses_a_directory_of_another_user() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("theirs");
        fs::create_dir(&dir).unwrap();
        // Only root may give a directory away; elsewhere the check is still
        // exercised by a directory that root owns (uid 0 != our uid).
        let foreign = if unsafe { libc::geteuid() } == 0 {
            let c = std::ffi::CString::new(dir.to_str().unwrap()).unwrap();
            // SAFETY: c is a valid NUL-terminated path.
            assert_eq!(unsafe { libc::chown(c.as_ptr(), 4242, 4242) }, 0);
            dir.clone()
        } else {
            PathBuf::from("/")
        };
        let err = prepare_directory(&foreign).unwrap_err();
        assert!(matches!(err, SwapError::ForeignOwner { .. }), "{err}");
        assert!(err.to_string().contains("owned by uid"));
    }

    #[test]
    fn stale_files_of_dead_processes_are_removed() {
        let tmp = tempfile::tempdir().unwrap();
        // pid_max is at most 2^22, so this pid cannot be running.
        let dead = tmp.path().join("qvl-swap-99999999-0.swap");
        let live = tmp
            .path()
            .join(format!("qvl-swap-{}-0.swap", std::process::id()));
        let foreign = tmp.path().join("notes.txt");
        for p in [&dead, &live, &foreign] {
            fs::write(p, b"x").unwrap();
        }
        let removed = clean_stale_files(tmp.path()).unwrap();
        assert_eq!(removed, vec![dead.clone()]);
        assert!(!dead.exists() && live.exists() && foreign.exists());
    }
}
