//! Measures the disk under the swap directory, so that swap-in bandwidth can
//! be judged against what the same disk streams.

use crate::error::{Result, SwapError};
use crate::file::ActiveIo;
use crate::format::AlignedBuf;
use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::Instant;

/// Best-of-`reps` sequential read bandwidth (bytes/s) of a `bytes`-long
/// file written in `dir`, read with 1 MiB requests in one stream: the
/// disk's streaming figure. O_DIRECT where the file system allows it;
/// otherwise buffered, with the file's cached pages dropped
/// (`posix_fadvise(DONTNEED)`) before each pass. The file is removed.
pub fn sequential_read_bandwidth(dir: &Path, bytes: usize, reps: usize) -> Result<(f64, ActiveIo)> {
    crate::dir::prepare_directory(dir)?;
    let path = dir.join(format!("qvl-seq-probe-{}.tmp", std::process::id()));
    const IO: usize = 1 << 20;
    let bytes = bytes.div_ceil(IO).max(1) * IO;
    let mut buf = AlignedBuf::zeroed(IO);
    for (i, b) in buf.as_mut_slice().iter_mut().enumerate() {
        *b = (i * 131 % 251) as u8;
    }
    let open = |direct: bool| {
        let mut o = OpenOptions::new();
        o.read(true).write(true).create(true).mode(0o600);
        if direct {
            o.custom_flags(libc::O_DIRECT);
        }
        o.open(&path)
    };
    let (file, mode) = match open(true) {
        Ok(f) => (f, ActiveIo::Direct),
        Err(_) => (
            open(false).map_err(|e| SwapError::io("creating the probe file", &path, e))?,
            ActiveIo::Buffered,
        ),
    };
    let run = || -> std::io::Result<f64> {
        for off in (0..bytes).step_by(IO) {
            file.write_all_at(buf.as_slice(), off as u64)?;
        }
        file.sync_all()?;
        let mut read_buf = AlignedBuf::zeroed(IO);
        let mut best = 0f64;
        for _ in 0..reps.max(1) {
            if mode != ActiveIo::Direct {
                // SAFETY: the descriptor is open; the call only drops cached pages.
                unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            }
            let t = Instant::now();
            for off in (0..bytes).step_by(IO) {
                file.read_exact_at(read_buf.as_mut_slice(), off as u64)?;
            }
            best = best.max(bytes as f64 / t.elapsed().as_secs_f64());
        }
        Ok(best)
    };
    let result = run();
    let _ = std::fs::remove_file(&path);
    let bw = result.map_err(|e| SwapError::io("measuring sequential reads of", &path, e))?;
    Ok((bw, mode))
}

/// A file of known size on the swap directory's disk, read sequentially
/// with O_DIRECT in passes that can be interleaved with the work being
/// measured (so that load on a shared machine hits both alike).
///
/// A pass reads `bytes` from where the last pass stopped (wrapping at the
/// end of the file) in `request`-byte requests, with `depth` requests in
/// flight (one thread per request slot taking the next offset in turn):
/// the same request size and queue depth semantics as the swap store's
/// merged reads on its `max_inflight` I/O threads. Its time is the pass's
/// wall time, during which the disk always has a request outstanding, the
/// counterpart of the store's busy time (the union of the times its reads
/// were in flight). Its buffers are the store's kind (huge-page backed,
/// touched once, reused across passes), so that the baseline gets the
/// same per-request cost in the kernel as swap-in.
pub struct SequentialProbe {
    path: std::path::PathBuf,
    file: std::fs::File,
    len: u64,
    cursor: std::sync::atomic::AtomicU64,
    bufs: std::sync::Mutex<Vec<AlignedBuf>>,
}

impl SequentialProbe {
    /// Writes a `bytes`-long file (rounded up to 1 MiB) in `dir` with
    /// O_DIRECT and syncs it. O_DIRECT is required: a buffered baseline
    /// would measure the page cache.
    pub fn create(dir: &Path, bytes: u64) -> Result<SequentialProbe> {
        crate::dir::prepare_directory(dir)?;
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let path = dir.join(format!(
            "qvl-seq-probe-{}-{}.tmp",
            std::process::id(),
            SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        const IO: u64 = 1 << 20;
        let len = bytes.div_ceil(IO).max(1) * IO;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .map_err(|e| SwapError::io("creating the probe file with O_DIRECT", &path, e))?;
        let probe = SequentialProbe {
            path,
            file,
            len,
            cursor: std::sync::atomic::AtomicU64::new(0),
            bufs: std::sync::Mutex::new(Vec::new()),
        };
        let mut buf = AlignedBuf::zeroed(IO as usize);
        for (i, b) in buf.as_mut_slice().iter_mut().enumerate() {
            *b = (i * 131 % 251) as u8;
        }
        for off in (0..len).step_by(IO as usize) {
            probe
                .file
                .write_all_at(buf.as_slice(), off)
                .map_err(|e| SwapError::io("writing the probe file", &probe.path, e))?;
        }
        probe
            .file
            .sync_all()
            .map_err(|e| SwapError::io("syncing the probe file", &probe.path, e))?;
        Ok(probe)
    }

    /// Bytes of the file.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the file is empty (never: at least 1 MiB).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A read buffer of `len` bytes from the pool, or a new huge-page set
    /// (the rest of it pooled).
    fn take_buf(&self, len: usize) -> AlignedBuf {
        let mut bufs = crate::extent::lock(&self.bufs);
        if let Some(at) = bufs.iter().position(|b| b.len() == len) {
            return bufs.swap_remove(at);
        }
        let mut set = AlignedBuf::huge_set(len);
        let mine = set.pop().unwrap_or_else(|| AlignedBuf::zeroed(len));
        bufs.extend(set);
        mine
    }

    /// One pass: reads `bytes` (rounded up to whole requests) sequentially
    /// with `request`-byte requests (a multiple of 4 KiB), `depth` in
    /// flight. Returns the bytes read and the seconds taken.
    pub fn read_pass(&self, bytes: u64, request: usize, depth: usize) -> Result<(u64, f64)> {
        use std::sync::atomic::Ordering;
        let request = (request.div_ceil(crate::format::PAGE).max(1) * crate::format::PAGE) as u64;
        let request = request.min(self.len);
        let count = bytes.div_ceil(request).max(1);
        let next = std::sync::atomic::AtomicU64::new(0);
        let start_at = self.cursor.load(Ordering::Relaxed);
        let slots = (self.len / request).max(1);
        let t = Instant::now();
        let failed: std::sync::Mutex<Option<std::io::Error>> = std::sync::Mutex::new(None);
        std::thread::scope(|scope| {
            for _ in 0..depth.clamp(1, count as usize) {
                scope.spawn(|| {
                    let mut buf = self.take_buf(request as usize);
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= count {
                            break;
                        }
                        let off = ((start_at / request + i) % slots) * request;
                        if let Err(e) = self.file.read_exact_at(buf.as_mut_slice(), off) {
                            *crate::extent::lock(&failed) = Some(e);
                            break;
                        }
                    }
                    crate::extent::lock(&self.bufs).push(buf);
                });
            }
        });
        let secs = t.elapsed().as_secs_f64();
        if let Some(e) = crate::extent::lock(&failed).take() {
            return Err(SwapError::io("reading the probe file", &self.path, e));
        }
        let done = count * request;
        self.cursor.store(
            ((start_at / request + count) % slots) * request,
            Ordering::Relaxed,
        );
        Ok((done, secs))
    }
}

impl Drop for SequentialProbe {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_and_cleans_up() {
        let tmp = tempfile::tempdir().unwrap();
        let (bw, _) = sequential_read_bandwidth(tmp.path(), 2 << 20, 1).unwrap();
        assert!(bw > 0.0);
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    }

    #[test]
    fn probe_passes_wrap_around_and_the_file_goes_on_drop() {
        let tmp = tempfile::tempdir().unwrap();
        let probe = match SequentialProbe::create(tmp.path(), 3 << 20) {
            Ok(p) => p,
            // tmpfs and some others refuse O_DIRECT: nothing to measure.
            Err(e) => {
                assert!(e.to_string().contains("O_DIRECT"), "{e}");
                return;
            }
        };
        assert_eq!(probe.len(), 3 << 20);
        // 5 MiB from a 3 MiB file: wraps; 4 in flight.
        let (bytes, secs) = probe.read_pass(5 << 20, 1 << 20, 4).unwrap();
        assert_eq!(bytes, 5 << 20);
        assert!(secs > 0.0);
        let (bytes, _) = probe.read_pass(1000, 256 << 10, 1).unwrap();
        assert_eq!(bytes, 256 << 10);
        drop(probe);
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    }
}
