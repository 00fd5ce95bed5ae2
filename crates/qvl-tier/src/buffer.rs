//! [`AlignedBuf`]: a page-aligned byte buffer, so the SSD tier can read
//! into it with direct I/O (`O_DIRECT`): the device writes straight into
//! it, with no page-cache copy on the CPU.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

/// Alignment and length granule of direct I/O buffers (a page; covers the
/// 512 or 4096-byte logical blocks of disks).
pub(crate) const IO_ALIGN: usize = 4096;

/// A zero-initialized, `IO_ALIGN`-aligned heap buffer whose capacity is a
/// whole number of pages; `len` bytes of it are the contents.
pub(crate) struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    capacity: usize,
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
        let layout = Layout::from_size_align(capacity, IO_ALIGN).ok()?;
        // SAFETY: the layout has a non-zero size (capacity >= IO_ALIGN).
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw)?;
        Some(AlignedBuf { ptr, len, capacity })
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

impl Drop for AlignedBuf {
    fn drop(&mut self) {
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
}
