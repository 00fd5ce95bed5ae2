//! Backing memory: where the pool core gets its address space from.
//!
//! The pool core ([`crate::bfc::BfcArena`] and the slot stores) only deals
//! in offsets into one reserved range; it never touches the memory. A backing
//! reserves that range once, commits it as the arena grows and decommits
//! ranges that the pool gives back. [`HostBacking`] does this with `mmap` and
//! `madvise`; a CUDA backend (issue 13) maps device memory into a range
//! reserved with `cuMemAddressReserve` the same way (`cuMemCreate` +
//! `cuMemMap` to commit, `cuMemUnmap` + `cuMemRelease` to decommit), which is
//! what PyTorch's expandable segments do.

use crate::PoolError;
use qvl_core::ByteSize;
use std::ptr::NonNull;

/// Memory that the pool core carves blocks from.
pub trait Backing: Send + 'static {
    /// Base address of the reserved range (a device address for a device
    /// backend). Offsets handed out by the core are relative to it.
    fn base(&self) -> usize;

    /// Bytes of address space reserved: the arena never grows past it.
    fn capacity(&self) -> usize;

    /// Unit of commit and decommit; every block offset and size the core
    /// hands out is a multiple of it.
    fn granule(&self) -> usize;

    /// Makes `[offset, offset + len)` usable. Called as the arena grows.
    fn commit(&mut self, offset: usize, len: usize) -> Result<(), PoolError>;

    /// Gives `[offset, offset + len)` back to the OS or driver; the range
    /// stays reserved and is committed again before reuse.
    fn decommit(&mut self, offset: usize, len: usize) -> Result<(), PoolError>;
}

/// Host memory from one anonymous private mapping.
///
/// The whole capacity is mapped up front with `MAP_NORESERVE`, so only the
/// pages that are touched use RAM; committing is free, and decommitting is
/// `madvise(MADV_DONTNEED)`, which returns the pages to the OS at once.
#[derive(Debug)]
pub struct HostBacking {
    base: NonNull<u8>,
    capacity: usize,
    granule: usize,
}

// SAFETY: HostBacking owns its mapping exclusively; the raw pointer is just
// the mapping's address and is never shared as a reference.
unsafe impl Send for HostBacking {}

impl HostBacking {
    /// Reserves `capacity` bytes of address space (rounded up to whole pages).
    pub fn reserve(capacity: usize) -> Result<HostBacking, PoolError> {
        let granule = page_size().max(4096);
        let capacity = capacity.div_ceil(granule).saturating_mul(granule);
        if capacity == 0 {
            return Ok(HostBacking {
                base: NonNull::<u64>::dangling().cast(),
                capacity: 0,
                granule,
            });
        }
        #[cfg(target_os = "linux")]
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        #[cfg(not(target_os = "linux"))]
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        // SAFETY: an anonymous mapping at an address the kernel picks touches
        // no existing memory; the result is checked for MAP_FAILED below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                capacity,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(PoolError::Reserve {
                bytes: ByteSize(capacity as u64),
                source: std::io::Error::last_os_error(),
            });
        }
        let base = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| PoolError::Reserve {
            bytes: ByteSize(capacity as u64),
            source: std::io::Error::other("mmap returned a null address"),
        })?;
        Ok(HostBacking {
            base,
            capacity,
            granule,
        })
    }
}

impl Backing for HostBacking {
    fn base(&self) -> usize {
        self.base.as_ptr() as usize
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn granule(&self) -> usize {
        self.granule
    }

    fn commit(&mut self, _offset: usize, _len: usize) -> Result<(), PoolError> {
        // Pages of a private anonymous mapping appear on first touch.
        Ok(())
    }

    fn decommit(&mut self, offset: usize, len: usize) -> Result<(), PoolError> {
        if len == 0 {
            return Ok(());
        }
        debug_assert!(offset % self.granule == 0 && len % self.granule == 0);
        debug_assert!(offset + len <= self.capacity);
        // SAFETY: the range lies inside our own mapping (asserted above and
        // guaranteed by the arena, which never hands out ranges past its
        // top); it holds no live buffer, because the arena only decommits
        // free blocks. MADV_DONTNEED on private anonymous memory drops the
        // pages; the next touch maps fresh zero pages.
        let rc = unsafe {
            libc::madvise(
                self.base.as_ptr().add(offset).cast(),
                len,
                libc::MADV_DONTNEED,
            )
        };
        if rc != 0 {
            return Err(PoolError::Decommit {
                offset,
                bytes: ByteSize(len as u64),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

impl Drop for HostBacking {
    fn drop(&mut self) {
        if self.capacity == 0 {
            return;
        }
        // SAFETY: the mapping was created by `reserve` with this address and
        // length; the pool that owns this backing is being dropped, so no
        // buffer into it is alive (every buffer holds the pool alive).
        let rc = unsafe { libc::munmap(self.base.as_ptr().cast(), self.capacity) };
        if rc != 0 {
            tracing::error!(
                "munmap of the {} host pool failed: {}",
                ByteSize(self.capacity as u64),
                std::io::Error::last_os_error()
            );
        }
    }
}

/// The OS page size, 4096 when it cannot be read.
pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size)
        .ok()
        .filter(|s| s.is_power_of_two())
        .unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserves_commits_and_decommits() {
        let mut b = HostBacking::reserve(1 << 20).unwrap();
        assert_eq!(b.capacity(), 1 << 20);
        assert!(b.base() % b.granule() == 0);
        b.commit(0, 8192).unwrap();
        // SAFETY (test): the range is inside the mapping.
        let p = b.base() as *mut u8;
        unsafe { p.add(4096).write(7) };
        assert_eq!(unsafe { p.add(4096).read() }, 7);
        b.decommit(4096, 4096).unwrap();
        // Decommitted private pages read back as zero.
        assert_eq!(unsafe { p.add(4096).read() }, 0);
    }

    #[test]
    fn zero_capacity_is_empty() {
        let b = HostBacking::reserve(0).unwrap();
        assert_eq!(b.capacity(), 0);
    }
}
