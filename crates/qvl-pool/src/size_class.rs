//! Size classes for buffers up to [`SMALL_MAX`]: eight per doubling from
//! 512 B, so a buffer wastes at most one eighth of its class (tensor sizes,
//! being products of powers of two and small factors, mostly land exactly).
//! Larger buffers go to the best-fit arena, rounded to a page.

/// Smallest class.
pub const SMALL_MIN: usize = 512;
/// Largest size served from size classes.
pub const SMALL_MAX: usize = 256 << 10;
/// Classes per doubling.
const STEPS_LOG2: u32 = 3;
/// log2 of [`SMALL_MIN`].
const MIN_LOG2: u32 = 9;
/// Number of classes: one for 512 B, then eight per doubling up to 256 KiB.
pub const NUM_CLASSES: usize = 1 + ((18 - MIN_LOG2) << STEPS_LOG2) as usize;
// Buffers store their class in a u8.
const _: () = assert!(NUM_CLASSES <= 256);

/// The class serving `bytes` (`1..=SMALL_MAX`).
pub fn class_of(bytes: usize) -> usize {
    debug_assert!(bytes <= SMALL_MAX);
    if bytes <= SMALL_MIN {
        return 0;
    }
    let v = bytes - 1;
    let b = usize::BITS - 1 - v.leading_zeros();
    let m = v >> (b - STEPS_LOG2);
    (((b - MIN_LOG2) << STEPS_LOG2) as usize) + (m - (1 << STEPS_LOG2)) + 1
}

/// Bytes of one buffer of `class`.
pub fn class_size(class: usize) -> usize {
    if class == 0 {
        return SMALL_MIN;
    }
    let c = class - 1;
    let b = MIN_LOG2 + (c >> STEPS_LOG2) as u32;
    let m = (1 << STEPS_LOG2) + (c & ((1 << STEPS_LOG2) - 1));
    (m + 1) << (b - STEPS_LOG2)
}

/// Bytes of a run, the arena block that a class cuts into equal slots:
/// at least 64 KiB and eight slots, whole pages.
pub fn run_bytes(slot: usize, page: usize) -> usize {
    (slot * 8).max(64 << 10).div_ceil(page) * page
}

/// Slots a thread keeps for one class before handing half back: about
/// 128 KiB worth, between 2 and 64.
pub fn thread_cache_slots(slot: usize) -> usize {
    ((128 << 10) / slot).clamp(2, 64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_cover_every_size_tightly() {
        assert_eq!(class_size(NUM_CLASSES - 1), SMALL_MAX);
        let mut prev = 0;
        for c in 0..NUM_CLASSES {
            let s = class_size(c);
            assert!(s > prev, "classes must grow");
            assert_eq!(s % 64, 0, "slots keep 64-byte alignment");
            assert_eq!(class_of(s), c);
            assert_eq!(class_of(prev + 1), c);
            if c > 0 {
                // At most one eighth wasted.
                assert!((s - (prev + 1)) * 8 <= prev + 1, "class {c}");
            }
            prev = s;
        }
        assert_eq!(class_of(1), 0);
        assert_eq!(class_size(class_of(4096)), 4096);
        assert_eq!(class_size(class_of(12288)), 12288);
        assert_eq!(class_size(class_of(4097)), 4608);
    }

    #[test]
    fn runs_hold_at_least_eight_slots() {
        for c in 0..NUM_CLASSES {
            let s = class_size(c);
            let r = run_bytes(s, 4096);
            assert!(r / s >= 8);
            assert_eq!(r % 4096, 0);
        }
    }
}
