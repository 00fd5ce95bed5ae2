//! The preallocated swap file: positional reads and writes, O_DIRECT when
//! the file system allows it, an optional memory map, and a fault hook.
//!
//! One preallocated file rather than a file per block: one descriptor, no
//! create/unlink per block (each is a journaled metadata operation on
//! ext4/xfs), records on page boundaries for O_DIRECT, neighbouring records
//! in neighbouring extents, and a full disk shows up once at start-up when
//! the space is reserved with `posix_fallocate`, not in the middle of a
//! request.

use crate::config::IoMode;
use crate::dir::{FILE_PREFIX, FILE_SUFFIX};
use crate::error::{Result, SwapError};
use crate::extent::lock;
use crate::format::PAGE;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// The I/O path a swap file ended up with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActiveIo {
    /// O_DIRECT: no page cache on either path.
    Direct,
    /// Buffered reads and writes through the page cache.
    Buffered,
    /// Buffered writes, reads from a memory map.
    Mmap,
}

impl ActiveIo {
    /// Lowercase name for reports.
    pub fn name(self) -> &'static str {
        match self {
            ActiveIo::Direct => "o_direct",
            ActiveIo::Buffered => "buffered",
            ActiveIo::Mmap => "mmap",
        }
    }
}

/// Injected faults, for tests of the error paths that a healthy disk does
/// not produce on demand.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultPlan {
    /// Bytes that may still be written; a write beyond fails with ENOSPC,
    /// as a full file system would.
    pub write_budget: Option<u64>,
}

static FILE_SEQ: AtomicU64 = AtomicU64::new(0);

/// An open swap file; removed from disk on drop.
pub struct SwapFile {
    path: PathBuf,
    file: File,
    io: ActiveIo,
    capacity: u64,
    identity: (u64, u64),
    map: Option<memmap2::Mmap>,
    faults: Mutex<FaultPlan>,
}

fn open(path: &Path, direct: bool, create: bool) -> std::io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(true).mode(0o600);
    if create {
        o.create_new(true);
    }
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path)
}

impl SwapFile {
    /// Creates a new swap file of `capacity` bytes (rounded up to pages)
    /// in `dir` (already prepared) and reserves its space.
    pub fn create(dir: &Path, capacity: u64, mode: IoMode) -> Result<SwapFile> {
        let capacity = capacity.div_ceil(PAGE as u64) * PAGE as u64;
        let seq = FILE_SEQ.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!(
            "{FILE_PREFIX}{}-{seq}{FILE_SUFFIX}",
            std::process::id()
        ));
        let want_direct = matches!(mode, IoMode::Auto | IoMode::Direct);
        let mut file = open(&path, false, true)
            .map_err(|e| SwapError::io("creating the swap file", &path, e))?;
        let mut guard = RemoveOnError(Some(path.clone()));
        // SAFETY: the descriptor is open for the lifetime of `file`.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, capacity as libc::off_t) };
        if rc != 0 {
            return Err(SwapError::io(
                format!("reserving {capacity} bytes for the swap file"),
                &path,
                std::io::Error::from_raw_os_error(rc),
            ));
        }
        let mut io = match mode {
            IoMode::Mmap => ActiveIo::Mmap,
            IoMode::Buffered => ActiveIo::Buffered,
            _ => ActiveIo::Buffered,
        };
        if want_direct {
            match open(&path, true, false).and_then(|f| probe_direct(&f).map(|()| f)) {
                Ok(f) => {
                    file = f;
                    io = ActiveIo::Direct;
                }
                Err(e) if mode == IoMode::Direct => {
                    return Err(SwapError::io(
                        "opening the swap file with O_DIRECT (io_mode = direct)",
                        &path,
                        e,
                    ))
                }
                Err(e) => {
                    tracing::info!(path = %path.display(), error = %e, "O_DIRECT refused; using buffered I/O");
                }
            }
        }
        let map = if io == ActiveIo::Mmap {
            // SAFETY: the file is private to this process (created with
            // create_new, mode 0600, in a 0700 directory) and never
            // truncated by it; records are only read after their write
            // completed, so the mapped bytes are not changed under a reader.
            let m = unsafe { memmap2::Mmap::map(&file) }
                .map_err(|e| SwapError::io("memory-mapping the swap file", &path, e))?;
            Some(m)
        } else {
            None
        };
        let meta = file
            .metadata()
            .map_err(|e| SwapError::io("inspecting the swap file", &path, e))?;
        guard.0 = None;
        Ok(SwapFile {
            path,
            file,
            io,
            capacity,
            identity: (meta.dev(), meta.ino()),
            map,
            faults: Mutex::new(FaultPlan::default()),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The I/O path in use.
    pub fn io(&self) -> ActiveIo {
        self.io
    }

    /// Bytes reserved.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Replaces the injected faults.
    pub fn set_faults(&self, plan: FaultPlan) {
        *lock(&self.faults) = plan;
    }

    /// Checks that the path still names this file: a swap file deleted or
    /// replaced by someone else is an error, even though the open
    /// descriptor would go on reading the old inode.
    pub fn check_present(&self) -> Result<()> {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == self.identity => Ok(()),
            Ok(_) => Err(SwapError::MissingFile {
                path: self.path.clone(),
                reason: "another file now has its name".to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(SwapError::MissingFile {
                path: self.path.clone(),
                reason: "it was deleted".to_string(),
            }),
            Err(e) => Err(SwapError::io("inspecting the swap file", &self.path, e)),
        }
    }

    /// Writes `data` (page-aligned, whole pages) at `offset`.
    pub fn write_at(&self, data: &[u8], offset: u64) -> Result<()> {
        {
            let mut f = lock(&self.faults);
            if let Some(left) = f.write_budget.as_mut() {
                if (data.len() as u64) > *left {
                    *left = 0;
                    return Err(SwapError::io(
                        format!("writing {} bytes at offset {offset} of", data.len()),
                        &self.path,
                        std::io::Error::from_raw_os_error(libc::ENOSPC),
                    ));
                }
                *left -= data.len() as u64;
            }
        }
        self.file.write_all_at(data, offset).map_err(|e| {
            SwapError::io(
                format!("writing {} bytes at offset {offset} of", data.len()),
                &self.path,
                e,
            )
        })
    }

    /// Reads `buf.len()` bytes at `offset`; a short read (the file was
    /// truncated) is an error naming how much was there.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    return Err(SwapError::MissingFile {
                        path: self.path.clone(),
                        reason: format!(
                            "it ends before offset {} (truncated?)",
                            offset + buf.len() as u64
                        ),
                    })
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(SwapError::io(
                        format!("reading {} bytes at offset {offset} of", buf.len()),
                        &self.path,
                        e,
                    ))
                }
            }
        }
        Ok(())
    }

    /// The mapped bytes `offset..offset + len` (mmap mode only). A range
    /// past the end of the map (the file shrank) is an error.
    pub fn mapped(&self, offset: u64, len: usize) -> Result<Option<&[u8]>> {
        let Some(map) = &self.map else {
            return Ok(None);
        };
        // A file truncated under the map would raise SIGBUS on access;
        // check its current length first.
        let now = self
            .file
            .metadata()
            .map_err(|e| SwapError::io("inspecting the swap file", &self.path, e))?
            .len();
        let end = offset + len as u64;
        if end > now || end > map.len() as u64 {
            return Err(SwapError::MissingFile {
                path: self.path.clone(),
                reason: format!("it ends at {now}, before offset {end} (truncated?)"),
            });
        }
        Ok(Some(&map[offset as usize..end as usize]))
    }
}

/// Tries one aligned write and read at offset 0: some file systems accept
/// O_DIRECT at open and refuse it at the first I/O.
fn probe_direct(f: &File) -> std::io::Result<()> {
    let mut buf = crate::format::AlignedBuf::zeroed(PAGE);
    f.write_all_at(buf.as_slice(), 0)?;
    f.read_exact_at(buf.as_mut_slice(), 0)
}

struct RemoveOnError(Option<PathBuf>);

impl Drop for RemoveOnError {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for SwapFile {
    fn drop(&mut self) {
        // Only remove the file if it is still ours (not a replacement).
        if self.check_present().is_ok() {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!(path = %self.path.display(), error = %e, "could not remove the swap file");
            }
        }
    }
}
