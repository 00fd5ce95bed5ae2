//! Error accounting shared by the codecs, and the input scan that rejects
//! values a lossy codec cannot represent.

use crate::error::{CompressError, Result};
use qvl_core::CodecReport;

/// Lanes of the vectorized loops: 8 f32 fill one AVX register or two SSE ones.
pub(crate) const LANES: usize = 8;

/// Sums of squared error, squared input and the largest absolute error.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct ErrStats {
    pub(crate) diff2: f64,
    pub(crate) norm2: f64,
    pub(crate) max_abs: f64,
}

impl ErrStats {
    pub(crate) fn merge(&mut self, other: ErrStats) {
        self.diff2 += other.diff2;
        self.norm2 += other.norm2;
        self.max_abs = self.max_abs.max(other.max_abs);
    }

    /// Statistics of `approx` against `exact`.
    pub(crate) fn between(exact: &[f32], approx: &[f32]) -> ErrStats {
        let mut lanes = ErrLanes::default();
        let mut e = exact.chunks_exact(LANES);
        let mut a = approx.chunks_exact(LANES);
        for (xs, ys) in (&mut e).zip(&mut a) {
            for i in 0..LANES {
                lanes.add(i, xs[i], xs[i] - ys[i]);
            }
        }
        for (i, (&x, &y)) in e.remainder().iter().zip(a.remainder()).enumerate() {
            lanes.add(i, x, x - y);
        }
        lanes.flush()
    }

    /// Only the norm of values kept exactly.
    pub(crate) fn exact(values: &[f32]) -> ErrStats {
        let mut lanes = ErrLanes::default();
        let mut c = values.chunks_exact(LANES);
        for xs in &mut c {
            for i in 0..LANES {
                lanes.norm2[i] += xs[i] * xs[i];
            }
        }
        for (i, &x) in c.remainder().iter().enumerate() {
            lanes.norm2[i] += x * x;
        }
        lanes.flush()
    }

    pub(crate) fn report(&self, input_bytes: usize, output_bytes: usize) -> CodecReport {
        let rel = if self.norm2 == 0.0 {
            self.diff2.sqrt()
        } else {
            (self.diff2 / self.norm2).sqrt()
        };
        CodecReport {
            input_bytes: input_bytes as u64,
            output_bytes: output_bytes as u64,
            rel_frobenius: rel,
            max_abs: self.max_abs,
        }
    }
}

/// Per-lane f32 accumulators, flushed to f64 every few thousand values so
/// that the f32 sums stay accurate.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ErrLanes {
    pub(crate) diff2: [f32; LANES],
    pub(crate) norm2: [f32; LANES],
    pub(crate) max_abs: [f32; LANES],
}

impl ErrLanes {
    #[inline(always)]
    pub(crate) fn add(&mut self, lane: usize, x: f32, d: f32) {
        self.diff2[lane] += d * d;
        self.norm2[lane] += x * x;
        let a = d.abs();
        self.max_abs[lane] = if a > self.max_abs[lane] {
            a
        } else {
            self.max_abs[lane]
        };
    }

    /// Adds another set of lanes into these.
    #[inline(always)]
    pub(crate) fn absorb(&mut self, other: &ErrLanes) {
        for i in 0..LANES {
            self.diff2[i] += other.diff2[i];
            self.norm2[i] += other.norm2[i];
            self.max_abs[i] = if other.max_abs[i] > self.max_abs[i] {
                other.max_abs[i]
            } else {
                self.max_abs[i]
            };
        }
    }

    /// Moves the lanes into an [`ErrStats`] and zeroes them.
    #[inline(always)]
    pub(crate) fn flush(&mut self) -> ErrStats {
        let mut s = ErrStats::default();
        for i in 0..LANES {
            s.diff2 += self.diff2[i] as f64;
            s.norm2 += self.norm2[i] as f64;
            s.max_abs = s.max_abs.max(self.max_abs[i] as f64);
        }
        *self = ErrLanes::default();
        s
    }
}

/// Largest |x|; fails on the first NaN or infinity.
#[inline(always)]
pub(crate) fn scan_finite(values: &[f32], codec: &'static str) -> Result<f32> {
    let mut amax = [0f32; LANES];
    let mut bad = [0u32; LANES];
    let mut c = values.chunks_exact(LANES);
    for xs in &mut c {
        for i in 0..LANES {
            let a = xs[i].abs();
            amax[i] = if a > amax[i] { a } else { amax[i] };
            bad[i] |= ((xs[i].to_bits() & 0x7f80_0000) == 0x7f80_0000) as u32;
        }
    }
    let mut any_bad = bad.iter().any(|&b| b != 0);
    let mut m = amax.iter().fold(0f32, |a, &b| a.max(b));
    for &x in c.remainder() {
        any_bad |= !x.is_finite();
        m = m.max(x.abs());
    }
    if any_bad {
        // Invariant: any_bad means some value is not finite.
        let (index, &value) = values
            .iter()
            .enumerate()
            .find(|(_, v)| !v.is_finite())
            .unwrap_or((0, &f32::NAN));
        return Err(CompressError::NonFinite {
            codec,
            index,
            value,
        });
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_finds_non_finite_and_max() {
        let mut v: Vec<f32> = (0..37).map(|i| i as f32 - 20.0).collect();
        assert_eq!(scan_finite(&v, "t").unwrap(), 20.0);
        v[33] = f32::NAN;
        match scan_finite(&v, "t") {
            Err(CompressError::NonFinite { index, .. }) => assert_eq!(index, 33),
            other => panic!("{other:?}"),
        }
        v[33] = 0.0;
        v[3] = f32::INFINITY;
        assert!(scan_finite(&v, "t").is_err());
    }

    #[test]
    fn stats_match_core_error_of() {
        let a: Vec<f32> = (0..29).map(|i| (i as f32).sin()).collect();
        let b: Vec<f32> = a.iter().map(|x| x + 0.01 * x.cos()).collect();
        let s = ErrStats::between(&a, &b).report(1, 1);
        let (rel, max) = qvl_core::codec::error_of(&a, &b);
        assert!((s.rel_frobenius - rel).abs() < 1e-6);
        assert!((s.max_abs - max).abs() < 1e-6);
    }
}
