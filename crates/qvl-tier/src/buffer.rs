//! [`AlignedBuf`]: a page-aligned byte buffer, so the SSD tier can read
//! into it with direct I/O (`O_DIRECT`): the device writes straight into
//! it, with no page-cache copy on the CPU.
//!
//! Buffers of 2 MiB and more start on a 2 MiB boundary and ask for
//! transparent huge pages: a direct read then pins one page per 2 MiB
//! instead of 512, which is what limited the tier's reads to about a third
//! of the disk's sequential rate on the dev VM.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

/// Alignment and length granule of direct I/O buffers (a page; covers the
/// 512 or 4096-byte logical blocks of disks).
pub(crate) const IO_ALIGN: usize = 4096;

/// Size and alignment of a transparent huge page (x86-64, aarch64 with 4
/// KiB base pages).
const HUGE_PAGE: usize = 2 << 20;

/// A zero-initialized, `IO_ALIGN`-aligned buffer whose capacity is a
/// whole number of pages; `len` bytes of it are the contents.
pub(crate) struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    capacity: usize,
    /// Made by `mmap` (unmapped on drop) rather than the allocator.
    mapped: bool,
}

// SAFETY: AlignedBuf owns its allocation exclusively (like Vec<u8>); the
// raw pointer is never shared outside borrows tied to &self / &mut self.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out &[u8]; mutation needs &mut self.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A buffer of `len` zero bytes, its capacity rounded up to whole pages.
    /// None when the size overflows the address space or allocation fails.
    pub(crate) fn zeroed(len: usize) -> Option<AlignedBuf> {
        let capacity = len.max(1).checked_next_multiple_of(IO_ALIGN)?;
        if capacity >= HUGE_PAGE {
            if let Some(ptr) = map_huge_aligned(capacity) {
                return Some(AlignedBuf {
                    ptr,
                    len,
                    capacity,
                    mapped: true,
                });
            }
        }
        let layout = Layout::from_size_align(capacity, IO_ALIGN).ok()?;
        // SAFETY: the layout has a non-zero size (capacity >= IO_ALIGN).
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw)?;
        Some(AlignedBuf {
            ptr,
            len,
            capacity,
            mapped: false,
        })
    }

    /// Bytes allocated (a multiple of `IO_ALIGN`).
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Sets the length of the contents; `len` must not pass the capacity.
    /// The bytes were initialized at allocation (zeroed) or by earlier use.
    pub(crate) fn set_len(&mut self, len: usize) {
        self.len = len.min(self.capacity);
    }

    /// The whole allocation, for a read that covers whole pages.
    pub(crate) fn whole_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr points to `capacity` initialized bytes (zeroed at
        // allocation) owned by self, borrowed mutably for &mut self's lifetime.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.capacity) }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: len <= capacity, the bytes are initialized and owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, borrowed mutably through &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} of {} bytes)", self.len, self.capacity)
    }
}

/// A private anonymous mapping of `capacity` bytes (a multiple of
/// `IO_ALIGN`) starting on a 2 MiB boundary, advised to use huge pages and
/// touched once, so the page faults happen here and not under a read. None
/// when the mapping fails (the caller falls back to the allocator).
fn map_huge_aligned(capacity: usize) -> Option<NonNull<u8>> {
    let over = capacity.checked_add(HUGE_PAGE)?;
    // SAFETY: a fresh private anonymous mapping; no existing memory is
    // touched; the result is checked against MAP_FAILED.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            over,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return None;
    }
    let start = (base as usize).next_multiple_of(HUGE_PAGE);
    let head = start - base as usize;
    let tail = over - head - capacity;
    // SAFETY: both ranges lie inside the mapping just made and outside
    // [start, start + capacity), the part kept; both are page-aligned
    // (mmap returns page-aligned addresses; HUGE_PAGE and capacity are
    // multiples of the page size).
    unsafe {
        if head > 0 {
            libc::munmap(base, head);
        }
        if tail > 0 {
            libc::munmap((start + capacity) as *mut libc::c_void, tail);
        }
    }
    let raw = start as *mut u8;
    // SAFETY: [raw, raw + capacity) is our mapping; madvise only changes
    // how the kernel backs it (best effort, error ignored); the touches
    // write zeros into bytes we own.
    unsafe {
        libc::madvise(raw.cast(), capacity, libc::MADV_HUGEPAGE);
        for off in (0..capacity).step_by(IO_ALIGN) {
            std::ptr::write_volatile(raw.add(off), 0);
        }
    }
    NonNull::new(raw)
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.mapped {
            // SAFETY: ptr..ptr+capacity is the mapping `map_huge_aligned`
            // kept for this buffer, unmapped exactly once, here.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.capacity) };
            return;
        }
        // Invariant: this layout was valid when the buffer was allocated.
        if let Ok(layout) = Layout::from_size_align(self.capacity, IO_ALIGN) {
            // SAFETY: ptr was allocated by alloc_zeroed with this same layout
            // and is freed exactly once, here.
            unsafe { dealloc(self.ptr.as_ptr(), layout) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_zeroed_and_resizable_within_capacity() {
        let mut b = AlignedBuf::zeroed(5000).unwrap();
        assert_eq!(b.as_ptr() as usize % IO_ALIGN, 0);
        assert_eq!(b.capacity(), 8192);
        assert_eq!(b.len(), 5000);
        assert!(b.iter().all(|&x| x == 0));
        b[4999] = 7;
        b.set_len(100);
        assert_eq!(b.len(), 100);
        b.set_len(1 << 20);
        assert_eq!(b.len(), 8192, "never past the capacity");
        assert_eq!(b[4999], 7);
        assert_eq!(b.whole_mut().len(), 8192);
    }

    #[test]
    fn large_buffers_start_on_a_huge_page_and_are_independent() {
        let len = 3 * HUGE_PAGE + 5000;
        let mut a = AlignedBuf::zeroed(len).unwrap();
        let mut b = AlignedBuf::zeroed(len).unwrap();
        for buf in [&a, &b] {
            assert!(buf.mapped);
            assert_eq!(buf.as_ptr() as usize % HUGE_PAGE, 0);
            assert_eq!(buf.capacity(), len.next_multiple_of(IO_ALIGN));
            assert!(buf.iter().all(|&x| x == 0));
        }
        a.whole_mut().fill(1);
        b.whole_mut().fill(2);
        drop(a);
        assert!(b.whole_mut().iter().all(|&x| x == 2));
    }
}
