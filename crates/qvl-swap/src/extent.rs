//! First-fit allocator of page extents in the preallocated swap file.
//!
//! Extents are handed out as [`Extent`] guards shared through `Arc`: the
//! index holds one, every reader in flight clones it, and the pages return
//! to the free list only when the last holder drops it. A block replaced or
//! removed while a read of it is running therefore never has its pages
//! reused under that read.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Free page ranges, start page -> length in pages, coalesced.
#[derive(Debug)]
pub struct ExtentAllocator {
    free: BTreeMap<u64, u64>,
    free_pages: u64,
    total_pages: u64,
}

impl ExtentAllocator {
    /// An allocator over `total_pages` pages, all free.
    pub fn new(total_pages: u64) -> ExtentAllocator {
        let mut free = BTreeMap::new();
        if total_pages > 0 {
            free.insert(0, total_pages);
        }
        ExtentAllocator {
            free,
            free_pages: total_pages,
            total_pages,
        }
    }

    /// Pages free (possibly in pieces).
    pub fn free_pages(&self) -> u64 {
        self.free_pages
    }

    /// Pages in all.
    pub fn total_pages(&self) -> u64 {
        self.total_pages
    }

    /// The first free run of `pages` pages, or None.
    pub fn allocate(&mut self, pages: u64) -> Option<u64> {
        let (&start, &len) = self.free.iter().find(|(_, &len)| len >= pages)?;
        self.free.remove(&start);
        if len > pages {
            self.free.insert(start + pages, len - pages);
        }
        self.free_pages -= pages;
        Some(start)
    }

    /// Returns `pages` pages at `start`, merging with free neighbours.
    pub fn release(&mut self, start: u64, pages: u64) {
        let mut start = start;
        let mut pages = pages;
        self.free_pages += pages;
        if let Some((&prev, &plen)) = self.free.range(..start).next_back() {
            if prev + plen == start {
                self.free.remove(&prev);
                start = prev;
                pages += plen;
            }
        }
        if let Some(&nlen) = self.free.get(&(start + pages)) {
            self.free.remove(&(start + pages));
            pages += nlen;
        }
        self.free.insert(start, pages);
    }
}

/// Pages of the swap file held by one record; freed on drop.
#[derive(Debug)]
pub struct Extent {
    /// First page.
    pub start_page: u64,
    /// Length in pages.
    pub pages: u64,
    allocator: Arc<Mutex<ExtentAllocator>>,
}

impl Extent {
    /// Allocates `pages` pages from `allocator`, or None when no free run
    /// is long enough.
    pub fn allocate(allocator: &Arc<Mutex<ExtentAllocator>>, pages: u64) -> Option<Extent> {
        let start = lock(allocator).allocate(pages)?;
        Some(Extent {
            start_page: start,
            pages,
            allocator: Arc::clone(allocator),
        })
    }

    /// Takes ownership of `pages` pages at `start`, already taken from
    /// `allocator` (one piece of a larger run split per record).
    pub fn adopt(allocator: &Arc<Mutex<ExtentAllocator>>, start: u64, pages: u64) -> Extent {
        Extent {
            start_page: start,
            pages,
            allocator: Arc::clone(allocator),
        }
    }

    /// Byte offset of the extent in the file.
    pub fn offset(&self) -> u64 {
        self.start_page * crate::format::PAGE as u64
    }

    /// Byte length of the extent.
    pub fn byte_len(&self) -> usize {
        self.pages as usize * crate::format::PAGE
    }
}

impl Drop for Extent {
    fn drop(&mut self) {
        lock(&self.allocator).release(self.start_page, self.pages);
    }
}

/// Locks a mutex, going on with the data if another thread panicked while
/// holding it (the allocator's state is updated in single statements, so a
/// panic elsewhere cannot leave it half-changed).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_fit_splits_and_coalesces() {
        let mut a = ExtentAllocator::new(10);
        assert_eq!(a.allocate(3), Some(0));
        assert_eq!(a.allocate(3), Some(3));
        assert_eq!(a.allocate(5), None);
        assert_eq!(a.allocate(4), Some(6));
        assert_eq!(a.free_pages(), 0);
        a.release(3, 3);
        a.release(0, 3);
        // 0..6 merged into one run.
        assert_eq!(a.allocate(6), Some(0));
        a.release(0, 6);
        a.release(6, 4);
        assert_eq!(a.free_pages(), 10);
        assert_eq!(a.allocate(10), Some(0));
    }

    #[test]
    fn extents_free_on_last_drop() {
        let alloc = Arc::new(Mutex::new(ExtentAllocator::new(4)));
        let e = Arc::new(Extent::allocate(&alloc, 4).unwrap());
        let reader = Arc::clone(&e);
        drop(e);
        assert_eq!(lock(&alloc).free_pages(), 0);
        drop(reader);
        assert_eq!(lock(&alloc).free_pages(), 4);
    }
}
