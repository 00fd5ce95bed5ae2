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
}
