//! CRC-32C (Castagnoli: reflected polynomial `0x82F63B78`, initial value
//! and final xor `!0`), the swap format's checksum.
//!
//! Why not XXH3: the swap path hashes data just DMA-ed from disk, which is
//! cache-cold, and xxhash-rust's portable build (SSE2) reaches only about
//! 7 GB/s on such data; SSE4.2's `crc32` instruction runs at the memory's
//! rate. The instruction has a latency of 3 cycles and a throughput of one
//! per cycle, so one dependency chain would run at a third of that: large
//! inputs are split into three lanes hashed together, whose registers are
//! then joined with precomputed "append n zero bytes" operators (a raw CRC
//! register is linear over GF(2): `reg(r, A || B) = shift_|B|(reg(r, A)) ^
//! reg(0, B)`). Other CPUs, or x86-64 without SSE4.2, use a slicing-by-8
//! table ([`crc32c_software`]); both paths give the same values.

/// The reflected Castagnoli polynomial.
const POLY: u32 = 0x82F6_3B78;

/// Slicing-by-8 tables: `TABLES[0]` is the bytewise table, `TABLES[k][b]`
/// the register after `b` followed by `k` zero bytes.
static TABLES: [[u32; 256]; 8] = make_tables();

const fn make_tables() -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    let mut b = 0;
    while b < 256 {
        let mut r = b as u32;
        let mut i = 0;
        while i < 8 {
            r = if r & 1 != 0 { (r >> 1) ^ POLY } else { r >> 1 };
            i += 1;
        }
        t[0][b] = r;
        b += 1;
    }
    let mut k = 1;
    while k < 8 {
        let mut b = 0;
        while b < 256 {
            let prev = t[k - 1][b];
            t[k][b] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            b += 1;
        }
        k += 1;
    }
    t
}

/// The raw register after `data`, bytewise (no init, no final xor).
fn sw_bytes(mut r: u32, data: &[u8]) -> u32 {
    for &b in data {
        r = (r >> 8) ^ TABLES[0][((r ^ b as u32) & 0xff) as usize];
    }
    r
}

/// The raw register after `data`, slicing-by-8.
fn sw_update(mut r: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let lo = r ^ u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        r = TABLES[7][(lo & 0xff) as usize]
            ^ TABLES[6][((lo >> 8) & 0xff) as usize]
            ^ TABLES[5][((lo >> 16) & 0xff) as usize]
            ^ TABLES[4][(lo >> 24) as usize]
            ^ TABLES[3][c[4] as usize]
            ^ TABLES[2][c[5] as usize]
            ^ TABLES[1][c[6] as usize]
            ^ TABLES[0][c[7] as usize];
    }
    sw_bytes(r, chunks.remainder())
}

/// An incremental CRC-32C: `update` in any splits gives the same `finish`
/// as one [`crc32c`] over the concatenation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crc32c {
    /// The raw (inverted) register.
    state: u32,
}

impl Default for Crc32c {
    fn default() -> Self {
        Self::new()
    }
}

impl Crc32c {
    /// An empty checksum.
    pub fn new() -> Crc32c {
        Crc32c { state: !0 }
    }

    /// Appends `data`, on the fastest path this CPU has.
    pub fn update(&mut self, data: &[u8]) {
        self.state = raw_update(self.state, data);
    }

    /// Appends `data` on the table-driven path (whatever the CPU): the
    /// fallback, public for tests and benchmarks.
    pub fn update_software(&mut self, data: &[u8]) {
        self.state = sw_update(self.state, data);
    }

    /// The CRC-32C of everything appended so far.
    pub fn finish(&self) -> u32 {
        !self.state
    }
}

/// The CRC-32C of `data` (`crc32c(b"123456789") == 0xE306_9283`).
pub fn crc32c(data: &[u8]) -> u32 {
    let mut c = Crc32c::new();
    c.update(data);
    c.finish()
}

/// The CRC-32C of `data` on the table-driven path (slicing-by-8).
pub fn crc32c_software(data: &[u8]) -> u32 {
    let mut c = Crc32c::new();
    c.update_software(data);
    c.finish()
}

/// Which path [`crc32c`] takes on this CPU, for reports.
pub fn implementation() -> &'static str {
    if hw::available() {
        "sse4.2 crc32, 3 lanes"
    } else {
        "software, slicing-by-8"
    }
}

fn raw_update(r: u32, data: &[u8]) -> u32 {
    hw::update(r, data)
}

/// A linear operator on raw registers, "append `n` zero bytes", as four
/// byte-indexed tables.
struct Shift([[u32; 256]; 4]);

impl Shift {
    /// The operator for `n` zero bytes, from its images of the 32 unit
    /// registers (each computed with the bytewise table).
    fn zeros(n: usize) -> Shift {
        let zeros = vec![0u8; n];
        Shift::from_images(std::array::from_fn(|i| sw_bytes(1 << i, &zeros)))
    }

    /// `self` applied twice.
    fn squared(&self) -> Shift {
        Shift::from_images(std::array::from_fn(|i| self.apply(self.apply(1 << i))))
    }

    fn from_images(img: [u32; 32]) -> Shift {
        let mut t = [[0u32; 256]; 4];
        for (k, tk) in t.iter_mut().enumerate() {
            for (b, e) in tk.iter_mut().enumerate() {
                *e = (0..8)
                    .filter(|j| b & (1 << j) != 0)
                    .fold(0, |acc, j| acc ^ img[8 * k + j]);
            }
        }
        Shift(t)
    }

    #[inline]
    fn apply(&self, r: u32) -> u32 {
        self.0[0][(r & 0xff) as usize]
            ^ self.0[1][((r >> 8) & 0xff) as usize]
            ^ self.0[2][((r >> 16) & 0xff) as usize]
            ^ self.0[3][(r >> 24) as usize]
    }
}

#[cfg(target_arch = "x86_64")]
mod hw {
    use super::Shift;
    use std::arch::x86_64::{_mm_crc32_u64, _mm_crc32_u8};
    use std::sync::OnceLock;

    /// Bytes per lane of the long blocks (3 x 4 KiB per block): long
    /// enough that joining the lanes (8 table lookups) is noise.
    const LONG: usize = 4096;
    /// Bytes per lane of the short blocks, for what is left after the long
    /// ones (a 32 KiB KV chunk leaves 8 KiB): short enough that at most
    /// 3 x 256 bytes run on one chain.
    const SHORT: usize = 256;

    /// "Append LONG / 2 LONG / SHORT / 2 SHORT zero bytes".
    struct Shifts {
        long: Shift,
        long2: Shift,
        short: Shift,
        short2: Shift,
    }

    fn shifts() -> &'static Shifts {
        static S: OnceLock<Shifts> = OnceLock::new();
        S.get_or_init(|| {
            let long = Shift::zeros(LONG);
            let short = Shift::zeros(SHORT);
            Shifts {
                long2: long.squared(),
                long,
                short2: short.squared(),
                short,
            }
        })
    }

    pub(super) fn available() -> bool {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| std::arch::is_x86_feature_detected!("sse4.2"))
    }

    /// The raw register after `data`: SSE4.2 where the CPU has it, the
    /// tables otherwise.
    pub(super) fn update(r: u32, data: &[u8]) -> u32 {
        if !available() {
            return super::sw_update(r, data);
        }
        let s = shifts();
        // SAFETY: `available()` just said this CPU has SSE4.2, the one
        // feature `update_sse42` is compiled for.
        unsafe { update_sse42(r, data, s) }
    }

    /// An 8-byte chunk as a little-endian word. A cast to `&[u8; 8]`, not
    /// `copy_from_slice`: with debug assertions on (the `ci` profile) the
    /// copy keeps an overlap check per word that halves the loop's speed.
    #[inline(always)]
    fn word(w: &[u8]) -> u64 {
        // Invariant: callers pass chunks of `chunks_exact(8)`, so the
        // conversion cannot fail and the fallback arm is dead code.
        <&[u8; 8]>::try_from(w).map_or(0, |a| u64::from_le_bytes(*a))
    }

    /// Three lanes of `lane` bytes each from `block` (3 x `lane` bytes),
    /// joined onto `r`. A safe `target_feature` function: only callable
    /// without `unsafe` from code compiled for SSE4.2 (`update_sse42`).
    #[target_feature(enable = "sse4.2")]
    #[inline]
    fn three_lanes<const LANE: usize>(r: u32, block: &[u8], one: &Shift, two: &Shift) -> u32 {
        // Whole words, zipped: the loop then has no bounds checks.
        let (a, rest) = block.split_at(LANE);
        let (b, c) = rest.split_at(LANE);
        let (a, b, c) = (
            a.chunks_exact(8),
            b.chunks_exact(8),
            c[..LANE].chunks_exact(8),
        );
        let (mut ra, mut rb, mut rc) = (r as u64, 0u64, 0u64);
        for ((wa, wb), wc) in a.zip(b).zip(c) {
            ra = _mm_crc32_u64(ra, word(wa));
            rb = _mm_crc32_u64(rb, word(wb));
            rc = _mm_crc32_u64(rc, word(wc));
        }
        two.apply(ra as u32) ^ one.apply(rb as u32) ^ rc as u32
    }

    /// The raw register after `data`: aligned head bytewise, long then short
    /// three-lane blocks, the tail on one chain. Inside, the intrinsics
    /// and `three_lanes` need no `unsafe`: this function is compiled for
    /// SSE4.2, which is what makes calling it unsafe.
    ///
    /// # Safety
    /// The CPU must support SSE4.2.
    #[target_feature(enable = "sse4.2")]
    unsafe fn update_sse42(mut r: u32, mut data: &[u8], s: &Shifts) -> u32 {
        // Head: single bytes up to an 8-byte boundary, so that the lanes'
        // loads are aligned.
        let head = data.as_ptr().align_offset(8).min(data.len());
        for &b in &data[..head] {
            r = _mm_crc32_u8(r, b);
        }
        data = &data[head..];
        let mut blocks = data.chunks_exact(3 * LONG);
        for block in &mut blocks {
            r = three_lanes::<LONG>(r, block, &s.long, &s.long2);
        }
        data = blocks.remainder();
        let mut blocks = data.chunks_exact(3 * SHORT);
        for block in &mut blocks {
            r = three_lanes::<SHORT>(r, block, &s.short, &s.short2);
        }
        data = blocks.remainder();
        // Tail: one chain of words, then bytes.
        let mut words = data.chunks_exact(8);
        let mut r64 = r as u64;
        for w in &mut words {
            r64 = _mm_crc32_u64(r64, word(w));
        }
        r = r64 as u32;
        for &b in words.remainder() {
            r = _mm_crc32_u8(r, b);
        }
        r
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod hw {
    pub(super) fn available() -> bool {
        false
    }

    pub(super) fn update(r: u32, data: &[u8]) -> u32 {
        super::sw_update(r, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random bytes.
    fn bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 24) as u8
            })
            .collect()
    }

    /// Bit-at-a-time reference, straight from the definition.
    fn reference(data: &[u8]) -> u32 {
        let mut r = !0u32;
        for &b in data {
            r ^= b as u32;
            for _ in 0..8 {
                r = if r & 1 != 0 { (r >> 1) ^ POLY } else { r >> 1 };
            }
        }
        !r
    }

    #[test]
    fn check_values() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c_software(b"123456789"), 0xE306_9283);
        assert_eq!(reference(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
        // RFC 3720 (iSCSI) B.4: 32 bytes of zeros, of 0xff, ascending.
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
        let asc: Vec<u8> = (0..32).collect();
        assert_eq!(crc32c(&asc), 0x46DD_794E);
    }

    #[test]
    fn fast_path_equals_software_for_every_length_and_offset() {
        let data = bytes(140_000, 7);
        let (l, s) = (4096, 256);
        let mut lens: Vec<usize> = (0..300).collect();
        for m in [l, s] {
            for k in 1..=4 {
                lens.extend([3 * m * k - 1, 3 * m * k, 3 * m * k + 1]);
            }
        }
        lens.extend([3 * l + 3 * s, 3 * l + 3 * s + 7, 32_768, 65_536, 69_999]);
        lens.extend((300..70_000).step_by(997));
        for &n in &lens {
            for off in [0, 1, 3, 7, 8, 13] {
                let d = &data[off..off + n];
                let sw = crc32c_software(d);
                assert_eq!(crc32c(d), sw, "length {n}, offset {off}");
                if n < 2000 {
                    assert_eq!(reference(d), sw, "length {n}, offset {off}");
                }
            }
        }
        // Software path against the reference on a long input too.
        assert_eq!(crc32c_software(&data), reference(&data));
    }

    #[test]
    fn incremental_updates_equal_one_shot() {
        let data = bytes(70_000, 11);
        let whole = crc32c(&data);
        let mut seed = 99u64;
        for _ in 0..50 {
            let mut c = Crc32c::new();
            let mut sw = Crc32c::new();
            let mut at = 0;
            while at < data.len() {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                // Mostly short pieces, sometimes long ones over the lanes.
                let max = if seed % 4 == 0 { 40_000 } else { 100 };
                let n = ((seed >> 20) as usize % max).min(data.len() - at);
                c.update(&data[at..at + n]);
                sw.update_software(&data[at..at + n]);
                at += n;
            }
            assert_eq!(c.finish(), whole);
            assert_eq!(sw.finish(), whole);
        }
    }

    #[test]
    fn shift_operators_append_zero_bytes() {
        for n in [1, 5, 256, 4096] {
            let s = Shift::zeros(n);
            let s2 = s.squared();
            let zeros = vec![0u8; 2 * n];
            for r in [1u32, 0xdead_beef, !0, 0x8000_0000] {
                assert_eq!(s.apply(r), sw_bytes(r, &zeros[..n]));
                assert_eq!(s2.apply(r), sw_bytes(r, &zeros));
            }
        }
    }
}
