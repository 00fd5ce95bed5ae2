//! The SSD tier: one spill file of immutable extents, read with positioned
//! reads (`pread`) into owned buffers, with direct I/O (`O_DIRECT`) where
//! the file system takes it. Every extent's XXH3-64 is kept in RAM when it
//! is written and checked on every read: bytes that changed on the disk
//! (a damaged file, something else writing it) are an error, never data.

use crate::buffer::AlignedBuf;
use crate::error::{Result, TierError};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

/// A byte range of the spill file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Start in the file.
    pub offset: u64,
    /// Length.
    pub len: u64,
}

/// The spill file: extents are allocated first-fit from freed ones, else
/// appended; the file is removed on drop.
pub struct SpillFile {
    file: File,
    path: PathBuf,
    free: Mutex<SpaceMap>,
    /// Offset of each written extent -> its length and XXH3-64.
    sums: Mutex<HashMap<u64, (u64, u64)>>,
    dirty: AtomicBool,
    drop_page_cache: bool,
    bytes_written: AtomicU64,
    /// The file opened again with O_DIRECT: reads go from the device into
    /// the (page-aligned) buffer with no page-cache copy on the CPU.
    direct: Option<File>,
    /// Cleared when the file system refuses a direct read (EINVAL).
    direct_ok: AtomicBool,
}

#[derive(Default)]
struct SpaceMap {
    end: u64,
    holes: Vec<Extent>,
}

/// Extents start on this boundary so page-cache drops cover whole pages.
const ALIGN: u64 = 4096;

impl SpillFile {
    /// A new spill file in `dir`.
    pub fn create(dir: &Path, drop_page_cache: bool) -> Result<SpillFile> {
        let io = |what: &str, e| TierError::Io {
            what: what.to_string(),
            path: dir.to_path_buf(),
            source: e,
        };
        std::fs::create_dir_all(dir).map_err(|e| io("creating", e))?;
        let name = format!(
            "qvl-tier-{}-{}.spill",
            std::process::id(),
            SPILL_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let path = dir.join(name);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| TierError::Io {
                what: "creating spill file".to_string(),
                path: path.clone(),
                source: e,
            })?;
        Ok(SpillFile {
            file,
            path,
            free: Mutex::new(SpaceMap::default()),
            sums: Mutex::new(HashMap::new()),
            dirty: AtomicBool::new(false),
            drop_page_cache,
            bytes_written: AtomicU64::new(0),
            direct: None,
            direct_ok: AtomicBool::new(false),
        })
    }

    /// Reads through direct I/O from now on where the file system allows
    /// it (not tmpfs, say); returns whether it does. Reads then bypass
    /// the page cache, which therefore cannot serve them from RAM.
    pub fn use_direct_io(&mut self) -> bool {
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&self.path);
        self.direct = opened.ok();
        self.direct_ok
            .store(self.direct.is_some(), Ordering::Release);
        self.direct.is_some()
    }

    /// Whether reads go through direct I/O.
    pub fn direct_io(&self) -> bool {
        self.direct.is_some() && self.direct_ok.load(Ordering::Acquire)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes the file spans (including holes).
    pub fn len(&self) -> u64 {
        self.space().end
    }

    /// Whether nothing was ever written.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes written since creation.
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written.load(Ordering::Relaxed)
    }

    fn space(&self) -> MutexGuard<'_, SpaceMap> {
        // A panic while holding this lock leaves the map consistent (every
        // update is a single push, remove or assignment), so poison is ignored.
        self.free.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sums(&self) -> MutexGuard<'_, HashMap<u64, (u64, u64)>> {
        // Single inserts and removes: poison leaves the map consistent.
        self.sums.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks bytes read from `offset` against what was written there.
    fn verify(&self, offset: u64, data: &[u8]) -> Result<()> {
        let written = self.sums().get(&offset).copied();
        let got = xxhash_rust::xxh3::xxh3_64(data);
        match written {
            Some((len, sum)) if len == data.len() as u64 && sum == got => Ok(()),
            Some((len, sum)) => Err(TierError::Corrupt {
                path: self.path.clone(),
                offset,
                len: data.len() as u64,
                reason: if len == data.len() as u64 {
                    format!(
                        "checksum mismatch: written with XXH3 {sum:016x}, the bytes read give {got:016x}"
                    )
                } else {
                    format!("{len} bytes were written there, not {}", data.len())
                },
            }),
            None => Err(TierError::Corrupt {
                path: self.path.clone(),
                offset,
                len: data.len() as u64,
                reason: "nothing was written there".to_string(),
            }),
        }
    }

    /// Reserves an extent of `len` bytes, failing when the file would pass `limit` (0: none).
    pub fn allocate(&self, len: u64, limit: u64) -> Result<Extent> {
        let rounded = len.div_ceil(ALIGN).max(1) * ALIGN;
        let mut space = self.space();
        if let Some(i) = space.holes.iter().position(|h| h.len >= rounded) {
            let hole = space.holes[i];
            if hole.len == rounded {
                space.holes.swap_remove(i);
            } else {
                space.holes[i] = Extent {
                    offset: hole.offset + rounded,
                    len: hole.len - rounded,
                };
            }
            return Ok(Extent {
                offset: hole.offset,
                len,
            });
        }
        if limit > 0 && space.end + rounded > limit {
            return Err(TierError::Config(format!(
                "the SSD tier budget of {limit} bytes is full ({} used, {len} more asked)",
                space.end
            )));
        }
        let offset = space.end;
        space.end += rounded;
        Ok(Extent { offset, len })
    }

    /// Returns an extent's space for reuse, merging neighbouring holes.
    pub fn release(&self, extent: Extent) {
        self.sums().remove(&extent.offset);
        let rounded = extent.len.div_ceil(ALIGN).max(1) * ALIGN;
        let mut space = self.space();
        let mut hole = Extent {
            offset: extent.offset,
            len: rounded,
        };
        space.holes.retain(|h| {
            if h.offset + h.len == hole.offset {
                hole = Extent {
                    offset: h.offset,
                    len: h.len + hole.len,
                };
                false
            } else if hole.offset + hole.len == h.offset {
                hole.len += h.len;
                false
            } else {
                true
            }
        });
        if hole.offset + hole.len == space.end {
            space.end = hole.offset;
        } else {
            space.holes.push(hole);
        }
    }

    /// Writes `data` at `extent` (the whole extent: reads check it whole).
    pub fn write(&self, extent: Extent, data: &[u8]) -> Result<()> {
        // Forgotten first: a failed write leaves no checksum that the bytes
        // on disk could match by chance.
        self.sums().remove(&extent.offset);
        self.file.write_all_at(data, extent.offset).map_err(|e| {
            self.io_error(
                format!("writing {} bytes at {} of", data.len(), extent.offset),
                e,
            )
        })?;
        self.dirty.store(true, Ordering::Release);
        self.bytes_written
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let sum = xxhash_rust::xxh3::xxh3_64(data);
        self.sums().insert(extent.offset, (data.len() as u64, sum));
        Ok(())
    }

    /// Makes written data durable and, when configured, drops it from the
    /// page cache (dirty pages cannot be dropped, hence the sync first).
    pub fn flush(&self) -> Result<()> {
        if self.dirty.swap(false, Ordering::AcqRel) {
            self.file
                .sync_data()
                .map_err(|e| self.io_error("syncing".to_string(), e))?;
            if self.drop_page_cache {
                self.drop_cached(0, self.len());
            }
        }
        Ok(())
    }

    /// Reads `extent` into `out` (exactly `extent.len` bytes) and checks
    /// them against what was written ([`TierError::Corrupt`] otherwise).
    pub fn read_into(&self, extent: Extent, out: &mut [u8]) -> Result<()> {
        if self.dirty.load(Ordering::Acquire) {
            self.flush()?;
        }
        self.file.read_exact_at(out, extent.offset).map_err(|e| {
            self.io_error(
                format!("reading {} bytes at {} of", out.len(), extent.offset),
                e,
            )
        })?;
        if self.drop_page_cache {
            self.drop_cached(extent.offset, extent.len);
        }
        self.verify(extent.offset, out)
    }

    /// Reads `extent` into `buf` (its length set to `extent.len`): a
    /// direct read of whole pages when enabled (the capacity of `buf` is
    /// whole pages), else a buffered one.
    pub(crate) fn read_into_buf(&self, extent: Extent, buf: &mut AlignedBuf) -> Result<()> {
        // Lengths fit in usize: they came from in-memory slices.
        let len = extent.len as usize;
        buf.set_len(len);
        if let (Some(direct), true) = (&self.direct, self.direct_io()) {
            if self.dirty.load(Ordering::Acquire) {
                self.flush()?;
            }
            let want = len.next_multiple_of(ALIGN as usize).min(buf.capacity());
            match read_whole_pages(direct, &mut buf.whole_mut()[..want], extent.offset, len) {
                Ok(()) => return self.verify(extent.offset, buf),
                // The file system does not take direct reads after all:
                // buffered reads from now on.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.direct_ok.store(false, Ordering::Release);
                }
                Err(e) => {
                    return Err(self.io_error(
                        format!("reading {len} bytes (direct I/O) at {} of", extent.offset),
                        e,
                    ))
                }
            }
        }
        self.read_into(extent, buf)
    }

    fn drop_cached(&self, offset: u64, len: u64) {
        let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return;
        };
        // SAFETY: posix_fadvise only reads its integer arguments; the fd is
        // owned by `self.file` and open for the duration of the call. It is
        // advice: failure leaves the cache as it was, so the result is ignored.
        unsafe {
            libc::posix_fadvise(self.file.as_raw_fd(), off, len, libc::POSIX_FADV_DONTNEED);
        }
    }

    fn io_error(&self, what: String, source: std::io::Error) -> TierError {
        TierError::Io {
            what,
            path: self.path.clone(),
            source,
        }
    }
}

impl Drop for SpillFile {
    fn drop(&mut self) {
        // Best effort: a spill file left behind is only wasted space in a temp dir.
        let _ = std::fs::remove_file(&self.path);
    }
}

static SPILL_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Fills `out` from `offset` of a direct-I/O file, stopping early only at
/// the end of the file; fails when fewer than `need` bytes came.
fn read_whole_pages(file: &File, out: &mut [u8], offset: u64, need: usize) -> std::io::Result<()> {
    let mut done = 0;
    while done < out.len() {
        match file.read_at(&mut out[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if done < need {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("the file ended after {done} of {need} bytes"),
        ));
    }
    Ok(())
}

/// Drops this process's pages of `bytes`, a range of a read-only file
/// mapping, once its contents were copied to the SSD tier: the next access
/// reads them from the file again. Without it, a model copied layer by layer
/// out of its mapped file keeps the whole file resident (RSS) beside the
/// RAM budget. Only whole pages inside the range are dropped.
///
/// `bytes` must belong to a read-only mapping of a file (as a memory-mapped
/// weight file is); for anonymous memory the pages would read back as zeros.
pub fn release_mapped_pages(bytes: &[u8]) -> std::io::Result<()> {
    const PAGE: usize = 4096;
    let start = bytes.as_ptr() as usize;
    let first = start.next_multiple_of(PAGE);
    let end = (start + bytes.len()) / PAGE * PAGE;
    if end <= first {
        return Ok(());
    }
    // SAFETY: the range lies inside `bytes`, so it is mapped; MADV_DONTNEED
    // on a read-only file mapping only drops pages, which the kernel reads
    // back from the unchanged file on the next access, so every reference
    // into the mapping keeps seeing the same bytes.
    let rc = unsafe { libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_DONTNEED) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_mapped_pages_read_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weights.bin");
        let data: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file = File::open(&path).unwrap();
        // SAFETY: the file is private to this test and not modified while mapped.
        let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
        assert_eq!(&map[..], &data[..]);
        release_mapped_pages(&map[100..40_000]).unwrap();
        release_mapped_pages(&map[10..20]).unwrap(); // no whole page: nothing to do
        assert_eq!(&map[..], &data[..]);
    }

    #[test]
    fn direct_reads_equal_buffered_reads_including_the_last_extent() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = SpillFile::create(dir.path(), true).unwrap();
        let direct = f.use_direct_io();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 13 % 251) as u8).collect();
        let a = f.allocate(4096 * 3, 0).unwrap();
        let b = f.allocate(data.len() as u64, 0).unwrap(); // ends mid-page, at EOF
        f.write(a, &vec![5u8; 4096 * 3]).unwrap();
        f.write(b, &data).unwrap();
        let mut buf = AlignedBuf::zeroed(data.len()).unwrap();
        f.read_into_buf(b, &mut buf).unwrap();
        assert_eq!(&buf[..], &data[..]);
        f.read_into_buf(a, &mut buf).unwrap();
        assert_eq!(buf.len(), 4096 * 3);
        assert!(buf.iter().all(|&x| x == 5));
        // Direct I/O where the file system has it (tmpfs has not); a file
        // system that opens with O_DIRECT keeps taking the reads.
        if direct {
            assert!(f.direct_io());
        }
    }

    #[test]
    fn reuses_freed_space_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let f = SpillFile::create(dir.path(), true).unwrap();
        let a = f.allocate(5000, 0).unwrap();
        let b = f.allocate(100, 0).unwrap();
        f.write(a, &vec![7u8; 5000]).unwrap();
        f.write(b, &[9u8; 100]).unwrap();
        let mut out = vec![0u8; 100];
        f.read_into(b, &mut out).unwrap();
        assert!(out.iter().all(|&x| x == 9));
        let end = f.len();
        f.release(a);
        let c = f.allocate(4000, 0).unwrap();
        assert_eq!(c.offset, a.offset, "first fit reuses the hole");
        assert_eq!(f.len(), end);
        f.release(b);
        f.release(c);
        assert_eq!(f.len(), 0, "freeing everything shrinks the file span");
        assert!(f
            .allocate(1 << 20, 4096)
            .unwrap_err()
            .to_string()
            .contains("full"));
        let path = f.path().to_path_buf();
        drop(f);
        assert!(!path.exists());
    }

    #[test]
    fn bytes_changed_on_disk_are_an_error_on_every_read_path() {
        let dir = tempfile::tempdir().unwrap();
        for direct in [false, true] {
            let mut f = SpillFile::create(dir.path(), true).unwrap();
            if direct && !f.use_direct_io() {
                continue; // tmpfs: buffered only, checked above
            }
            let data: Vec<u8> = (0..10_000u32).map(|i| (i * 31 % 251) as u8).collect();
            let a = f.allocate(data.len() as u64, 0).unwrap();
            f.write(a, &data).unwrap();
            f.flush().unwrap();
            let mut buf = AlignedBuf::zeroed(data.len()).unwrap();
            f.read_into_buf(a, &mut buf).unwrap();
            assert_eq!(&buf[..], &data[..]);
            // Something else writes one byte of the file.
            let other = std::fs::OpenOptions::new()
                .write(true)
                .open(f.path())
                .unwrap();
            other
                .write_all_at(&[data[1234] ^ 0xff], a.offset + 1234)
                .unwrap();
            other.sync_all().unwrap();
            let err = f.read_into_buf(a, &mut buf).unwrap_err().to_string();
            assert!(err.contains("checksum mismatch"), "{err}");
            assert!(err.contains(&f.path().display().to_string()), "{err}");
            let mut out = vec![0u8; data.len()];
            let err = f.read_into(a, &mut out).unwrap_err().to_string();
            assert!(err.contains("checksum mismatch"), "{err}");
            // Rewritten, the extent reads back again; released, nothing of
            // it is taken for data.
            f.write(a, &data).unwrap();
            f.read_into(a, &mut out).unwrap();
            assert_eq!(out, data);
            f.release(a);
            let err = f.read_into(a, &mut out).unwrap_err().to_string();
            assert!(err.contains("nothing was written there"), "{err}");
        }
    }
}
