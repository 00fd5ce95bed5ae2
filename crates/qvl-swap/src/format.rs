//! On-disk record of one block, and page-aligned buffers for O_DIRECT.
//!
//! A record is a 64-byte header followed by the payload, padded to whole
//! pages so that every record starts and ends on a page boundary (what
//! O_DIRECT needs):
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | magic `QVLSWAP\0` |
//! | 8..10 | format version (2) |
//! | 10..12 | codec id |
//! | 12..16 | reserved (0) |
//! | 16..32 | block key (u128 LE) |
//! | 32..40 | payload length |
//! | 40..48 | generation (write sequence number) |
//! | 48..56 | CRC-32C of bytes 0..48 and the payload (u32, zero-extended) |
//! | 56..64 | reserved (0) |
//!
//! A *bare* record (what [`crate::SsdStore::put_streamed`] writes, the KV
//! swap path) is the payload alone, padded to whole pages: the header's
//! fields and the checksum stay in the store's in-memory index, which is
//! the only place a record is ever looked up from (a swap file is never
//! reopened: stale files are removed at start-up). The checksum still
//! covers the header's fields and the payload ([`bare_checksum`]), so a
//! torn, stale, misplaced or damaged record fails it. Why: a KV chunk is a
//! whole number of pages (32 KiB for 16 tokens of 2 x 128 f32 heads), and
//! a 64-byte inline header would add a page to each, 12.5 % more bytes to
//! read and neighbouring chunks that no longer tile a 1 MiB read.
//!
//! Version 2 replaced XXH3-64 with CRC-32C ([`crate::crc32c`]): on bytes
//! just DMA-ed from disk (cache-cold) SSE4.2's `crc32` in three lanes runs
//! at the memory's rate, XXH3's portable SSE2 build well under it, and the
//! checksum was most of the I/O threads' CPU. Version 1 records are
//! rejected ("format version 1"); stale files are removed at start-up, so
//! none is ever read back.

use crate::crc32c::Crc32c;
use qvl_core::{BlockKey, CodecId};
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

/// Alignment and allocation unit of the swap file.
pub const PAGE: usize = 4096;
/// Bytes of a record header.
pub const HEADER_LEN: usize = 64;
/// Magic at the start of every record.
pub const MAGIC: [u8; 8] = *b"QVLSWAP\0";
/// The format version this build writes and reads.
pub const VERSION: u16 = 2;

/// The fields of a record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// Codec of the payload.
    pub codec: CodecId,
    /// Key of the block.
    pub key: BlockKey,
    /// Payload bytes.
    pub payload_len: u64,
    /// Write sequence number: tells a current record from an old one left
    /// in a reused extent.
    pub generation: u64,
}

/// Pages a record with `payload_len` bytes of payload occupies.
pub fn record_pages(payload_len: usize) -> usize {
    (HEADER_LEN + payload_len).div_ceil(PAGE)
}

/// CRC-32C of the header's fields and the payload, zero-extended into the
/// format's 64-bit slot.
fn checksum(head: &[u8], payload: &[u8]) -> u64 {
    let mut h = Crc32c::new();
    h.update(head);
    h.update(payload);
    u64::from(h.finish())
}

/// Pages a bare record (payload only) with `payload_len` bytes occupies.
pub fn bare_record_pages(payload_len: usize) -> usize {
    payload_len.div_ceil(PAGE).max(1)
}

fn header_fields(h: &RecordHeader, payload_len: usize) -> [u8; 48] {
    let mut out = [0u8; 48];
    out[0..8].copy_from_slice(&MAGIC);
    out[8..10].copy_from_slice(&VERSION.to_le_bytes());
    out[10..12].copy_from_slice(&h.codec.0.to_le_bytes());
    out[16..32].copy_from_slice(&h.key.to_le_bytes());
    out[32..40].copy_from_slice(&(payload_len as u64).to_le_bytes());
    out[40..48].copy_from_slice(&h.generation.to_le_bytes());
    out
}

/// The checksum of a bare record: CRC-32C over the header's fields (as a
/// headed record would store them) and the payload, so that it binds the
/// bytes to the key and generation the index expects.
pub fn bare_checksum(h: &RecordHeader, payload: &[u8]) -> u64 {
    checksum(&header_fields(h, payload.len()), payload)
}

/// Checks a bare record read from disk against the index's header and
/// checksum and returns its payload.
pub fn verify_bare<'a>(
    record: &'a [u8],
    expect: &RecordHeader,
    stored: u64,
) -> Result<&'a [u8], String> {
    let len = expect.payload_len;
    if len > record.len() as u64 {
        return Err(format!(
            "payload of {len} bytes runs past the {} bytes read",
            record.len()
        ));
    }
    let payload = &record[..len as usize];
    let actual = bare_checksum(expect, payload);
    if stored != actual {
        return Err(format!(
            "checksum mismatch: the index holds {stored:08x}, the bytes read give {actual:08x} (torn, stale or damaged record)"
        ));
    }
    Ok(payload)
}

/// Writes the header for `payload` into `out[..HEADER_LEN]`.
pub fn encode_header(h: &RecordHeader, payload: &[u8], out: &mut [u8]) {
    let out = &mut out[..HEADER_LEN];
    out.fill(0);
    out[0..48].copy_from_slice(&header_fields(h, payload.len()));
    let sum = checksum(&out[0..48], payload);
    out[48..56].copy_from_slice(&sum.to_le_bytes());
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Checks a record read from disk against what the index expects and
/// returns its payload. Any mismatch is a reason string, never a panic.
pub fn verify_record<'a>(record: &'a [u8], expect: &RecordHeader) -> Result<&'a [u8], String> {
    if record.len() < HEADER_LEN {
        return Err(format!(
            "record of {} bytes is shorter than a header",
            record.len()
        ));
    }
    let head = &record[..HEADER_LEN];
    if head[0..8] != MAGIC {
        return Err(format!("bad magic {:02x?}", &head[0..8]));
    }
    let version = u16::from_le_bytes([head[8], head[9]]);
    if version != VERSION {
        return Err(format!(
            "format version {version}, this build reads {VERSION}"
        ));
    }
    let codec = CodecId(u16::from_le_bytes([head[10], head[11]]));
    let mut key = [0u8; 16];
    key.copy_from_slice(&head[16..32]);
    let key = BlockKey::from_le_bytes(key);
    let len = le_u64(&head[32..40]);
    let generation = le_u64(&head[40..48]);
    if key != expect.key {
        return Err(format!("record holds block {key}"));
    }
    if generation != expect.generation {
        return Err(format!(
            "record is generation {generation}, the index expects {} (a stale record)",
            expect.generation
        ));
    }
    if codec != expect.codec || len != expect.payload_len {
        return Err(format!(
            "record says {codec} / {len} bytes, the index expects {} / {} bytes",
            expect.codec, expect.payload_len
        ));
    }
    // Saturating: a length near u64::MAX must be a reason, not an overflow.
    let end = (HEADER_LEN as u64).saturating_add(len);
    if end > record.len() as u64 {
        return Err(format!(
            "payload of {len} bytes runs past the {} bytes read",
            record.len()
        ));
    }
    let payload = &record[HEADER_LEN..end as usize];
    let stored = le_u64(&head[48..56]);
    let actual = checksum(&head[0..48], payload);
    if stored != actual {
        return Err(format!(
            "checksum mismatch: stored {stored:08x}, computed {actual:08x}"
        ));
    }
    Ok(payload)
}

/// A zeroed buffer aligned to [`PAGE`], whose length is a multiple of
/// [`PAGE`]: what O_DIRECT reads and writes need. From the heap
/// ([`AlignedBuf::zeroed`]) or carved from a huge-page mapping
/// ([`AlignedBuf::huge_set`]).
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    /// Unmapped (not deallocated) on drop.
    mapped: bool,
}

/// Size and alignment of a transparent huge page on x86-64 and aarch64
/// with 4 KiB pages.
const HUGE_PAGE: usize = 2 << 20;

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out &[u8]; mutation needs &mut self.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of at least `len` bytes (rounded up to whole pages,
    /// at least one page).
    pub fn zeroed(len: usize) -> AlignedBuf {
        let len = len.div_ceil(PAGE).max(1) * PAGE;
        let layout = Self::layout(len);
        // SAFETY: layout has a non-zero size (at least one page).
        let raw = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        AlignedBuf {
            ptr,
            len,
            mapped: false,
        }
    }

    /// Buffers of `each` bytes (a whole number of pages) carved from one
    /// anonymous mapping aligned to 2 MiB, advised for transparent huge
    /// pages, locked in RAM where the limits allow it, and touched now.
    /// Why: an O_DIRECT read pins, maps and marks dirty every page of its
    /// buffer; on 2 MiB pages that is one page per read instead of 256
    /// (and one scatter-gather segment, so the request is not split), and
    /// the page faults happen here, once, not on the read path. Falls back
    /// to [`AlignedBuf::zeroed`] when the mapping fails; huge pages and
    /// locking are best effort (the buffers work without them).
    pub fn huge_set(each: usize) -> Vec<AlignedBuf> {
        let each = each.div_ceil(PAGE).max(1) * PAGE;
        let region = each.div_ceil(HUGE_PAGE) * HUGE_PAGE;
        let count = region / each;
        let over = region + HUGE_PAGE;
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
            return vec![AlignedBuf::zeroed(each)];
        }
        let start = (base as usize).next_multiple_of(HUGE_PAGE);
        let head = start - base as usize;
        let tail = over - head - region;
        // SAFETY: both ranges lie inside the mapping just made and outside
        // [start, start + region), which is all that is kept; page-aligned
        // (mmap returns page-aligned addresses, HUGE_PAGE is a multiple of
        // PAGE).
        unsafe {
            if head > 0 {
                libc::munmap(base, head);
            }
            if tail > 0 {
                libc::munmap((start + region) as *mut libc::c_void, tail);
            }
        }
        let raw = start as *mut u8;
        // SAFETY: [raw, raw + region) is our mapping; madvise and mlock
        // only change how the kernel backs it (errors ignored: best
        // effort); the touches write zeros into bytes we own.
        unsafe {
            libc::madvise(raw.cast(), region, libc::MADV_HUGEPAGE);
            libc::mlock(raw.cast(), region);
            for off in (0..region).step_by(PAGE) {
                std::ptr::write_volatile(raw.add(off), 0);
            }
        }
        (0..count)
            .filter_map(|n| {
                // SAFETY: n * each < region, inside the mapping.
                let p = unsafe { raw.add(n * each) };
                NonNull::new(p).map(|ptr| AlignedBuf {
                    ptr,
                    len: each,
                    mapped: true,
                })
            })
            .collect()
    }

    fn layout(len: usize) -> Layout {
        // Invariant: PAGE is a power of two and len is a multiple of it far
        // below isize::MAX for any buffer the store makes.
        #[allow(clippy::expect_used)]
        Layout::from_size_align(len, PAGE).expect("page-aligned layout")
    }

    /// Length in bytes (a multiple of [`PAGE`]).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty (never: at least one page).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr points to len initialized (zeroed) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.mapped {
            // SAFETY: [ptr, ptr + len) is a page-aligned piece of a mapping
            // made in `huge_set` that only this buffer owns; unmapping a
            // piece of a mapping (or of a huge page) is allowed.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        } else {
            // SAFETY: ptr was allocated in `zeroed` with exactly this layout.
            unsafe { dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(payload: &[u8]) -> RecordHeader {
        RecordHeader {
            codec: CodecId(3),
            key: BlockKey::from_id(9),
            payload_len: payload.len() as u64,
            generation: 17,
        }
    }

    #[test]
    fn records_round_trip_and_every_field_is_checked() {
        let payload: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
        let h = header(&payload);
        let mut rec = AlignedBuf::zeroed(HEADER_LEN + payload.len());
        assert_eq!(rec.len(), record_pages(payload.len()) * PAGE);
        assert_eq!(rec.as_slice().as_ptr() as usize % PAGE, 0);
        encode_header(&h, &payload, rec.as_mut_slice());
        rec.as_mut_slice()[HEADER_LEN..HEADER_LEN + payload.len()].copy_from_slice(&payload);
        assert_eq!(verify_record(rec.as_slice(), &h).unwrap(), &payload[..]);

        let other_key = RecordHeader {
            key: BlockKey::from_id(10),
            ..h
        };
        assert!(verify_record(rec.as_slice(), &other_key)
            .unwrap_err()
            .contains("holds block"));
        let old = RecordHeader {
            generation: 16,
            ..h
        };
        assert!(verify_record(rec.as_slice(), &old)
            .unwrap_err()
            .contains("stale"));
        // One flipped payload bit fails the checksum.
        let mut bad = rec.as_slice().to_vec();
        bad[HEADER_LEN + 100] ^= 0x10;
        assert!(verify_record(&bad, &h).unwrap_err().contains("checksum"));
        // A version 1 record (XXH3 checksum) is refused by its version.
        let mut v1 = rec.as_slice().to_vec();
        v1[8..10].copy_from_slice(&1u16.to_le_bytes());
        assert_eq!(
            verify_record(&v1, &h).unwrap_err(),
            "format version 1, this build reads 2"
        );
        // The stored checksum is the CRC-32C of fields and payload,
        // zero-extended.
        let stored = le_u64(&rec.as_slice()[48..56]);
        let mut all = rec.as_slice()[..48].to_vec();
        all.extend_from_slice(&payload);
        assert_eq!(stored, u64::from(crate::crc32c::crc32c(&all)));
        // A torn record (zeros where the header should be) fails on the magic.
        let zeros = vec![0u8; PAGE];
        assert!(verify_record(&zeros, &h).unwrap_err().contains("magic"));
        // Truncated input is an error, not a panic.
        assert!(verify_record(&rec.as_slice()[..10], &h).is_err());
        assert!(verify_record(&rec.as_slice()[..HEADER_LEN + 10], &h)
            .unwrap_err()
            .contains("runs past"));
    }

    #[test]
    fn huge_sets_are_aligned_writable_and_independent() {
        let mut set = AlignedBuf::huge_set(1 << 20);
        assert_eq!(set.len(), 2);
        for (n, b) in set.iter_mut().enumerate() {
            assert_eq!(b.len(), 1 << 20);
            assert_eq!(b.as_slice().as_ptr() as usize % PAGE, 0);
            assert!(b.as_slice().iter().all(|&x| x == 0));
            b.as_mut_slice().fill(n as u8 + 1);
        }
        // Dropping one half leaves the other intact.
        let second = set.pop().unwrap();
        drop(set);
        assert!(second.as_slice().iter().all(|&x| x == 2));
        // Sizes that do not divide 2 MiB get whole pages of their own.
        let odd = AlignedBuf::huge_set(3 * PAGE + 1);
        assert!(odd.iter().all(|b| b.len() == 4 * PAGE));
        assert_eq!(odd.len(), (2 << 20) / (4 * PAGE));
    }

    #[test]
    fn bare_records_bind_payload_key_and_generation() {
        let payload: Vec<u8> = (0..PAGE as u32 * 2).map(|i| (i * 13) as u8).collect();
        let h = header(&payload);
        assert_eq!(bare_record_pages(payload.len()), 2);
        assert_eq!(bare_record_pages(1), 1);
        let sum = bare_checksum(&h, &payload);
        assert_eq!(verify_bare(&payload, &h, sum).unwrap(), &payload[..]);
        // Padding after the payload is not covered (and not returned).
        let mut padded = payload.clone();
        padded.extend_from_slice(&[7u8; 100]);
        assert_eq!(verify_bare(&padded, &h, sum).unwrap(), &payload[..]);
        // The same bytes under another key or generation fail.
        for other in [
            RecordHeader {
                key: BlockKey::from_id(10),
                ..h
            },
            RecordHeader {
                generation: 16,
                ..h
            },
        ] {
            assert!(verify_bare(&payload, &other, sum)
                .unwrap_err()
                .contains("checksum mismatch"));
        }
        // A flipped bit, a torn read (zeros in the second page), a short read.
        let mut bad = payload.clone();
        bad[5000] ^= 1;
        assert!(verify_bare(&bad, &h, sum).is_err());
        let mut torn = payload.clone();
        torn[PAGE..].fill(0);
        assert!(verify_bare(&torn, &h, sum).is_err());
        assert!(verify_bare(&payload[..100], &h, sum)
            .unwrap_err()
            .contains("runs past"));
    }
}
