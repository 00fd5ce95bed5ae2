//! Truncated SVD: `X ~ (U_k S_k) V_k^T`, computed with faer.
//!
//! faer is used over nalgebra because its SVD is several times faster on the
//! wide matrices of this workload (the benchmark times both at 128x4096).
//!
//! Payload after the common header: `rank u32`, `factor dtype u8` (0 f32,
//! 1 f16), `A = U_k S_k` as `[rows, rank]`, `B = V_k^T` as `[rank, cols]`.

use crate::error::{CompressError, Result};
use crate::float::{HalfFloat, HalfKind};
use crate::format::{check_len, get_f32s, header_len, put_f32s, rows_cols, write_header, Reader};
use crate::ids;
use crate::stats::{scan_finite, ErrStats};
use qvl_core::{Codec, CodecId, Encoded};

/// How many singular values to keep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RankRule {
    /// `ceil(ratio * min(rows, cols))`, at least 1 (`svd_rank_ratio`).
    Ratio(f64),
    /// The fewest that keep this fraction of the squared Frobenius norm
    /// (sum of kept sigma^2 over the sum of all).
    Energy(f64),
    /// Exactly this many (capped at `min(rows, cols)`).
    Fixed(usize),
}

/// Precision of the stored factors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FactorStorage {
    /// f32 factors.
    F32,
    /// f16 factors: half the bytes, about 1e-3 more relative error.
    F16,
}

/// Low-rank codec for `[.., cols]` tensors viewed as `[rows, cols]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LowRank {
    /// Rank selection.
    pub rule: RankRule,
    /// Factor precision.
    pub factors: FactorStorage,
}

impl LowRank {
    /// A validated low-rank codec.
    pub fn new(rule: RankRule, factors: FactorStorage) -> Result<Self> {
        match rule {
            RankRule::Ratio(r) | RankRule::Energy(r) if !(r > 0.0 && r <= 1.0) => Err(
                CompressError::config("svd_rank_ratio", format!("{r} is not within (0, 1]")),
            ),
            _ => Ok(LowRank { rule, factors }),
        }
    }

    fn rank_for(&self, sigma: &[f32]) -> usize {
        let full = sigma.len();
        let k = match self.rule {
            RankRule::Ratio(r) => (r * full as f64).ceil() as usize,
            RankRule::Fixed(k) => k,
            RankRule::Energy(e) => {
                let total: f64 = sigma.iter().map(|&s| (s as f64) * (s as f64)).sum();
                let mut acc = 0.0;
                let mut k = full;
                for (i, &s) in sigma.iter().enumerate() {
                    acc += (s as f64) * (s as f64);
                    if acc >= e * total {
                        k = i + 1;
                        break;
                    }
                }
                k
            }
        };
        k.clamp(full.min(1), full)
    }

    /// Factors `A = U_k S_k` (`[rows, k]`) and `B = V_k^T` (`[k, cols]`).
    pub(crate) fn factorize(
        &self,
        values: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<(usize, Vec<f32>, Vec<f32>)> {
        let m = faer::MatRef::from_row_major_slice(values, rows, cols);
        let svd = m.thin_svd().map_err(|e| CompressError::Svd {
            rows,
            cols,
            reason: format!("{e:?}"),
        })?;
        let (u, v) = (svd.U(), svd.V());
        let s = svd.S().column_vector();
        let sigma: Vec<f32> = (0..rows.min(cols)).map(|i| s[i]).collect();
        let k = self.rank_for(&sigma);
        let mut a = vec![0f32; rows * k];
        for (i, row) in a.chunks_exact_mut(k.max(1)).enumerate().take(rows) {
            for (j, x) in row.iter_mut().enumerate().take(k) {
                *x = u[(i, j)] * sigma[j];
            }
        }
        let mut b = vec![0f32; k * cols];
        for (j, row) in b.chunks_exact_mut(cols.max(1)).enumerate().take(k) {
            for (c, x) in row.iter_mut().enumerate() {
                *x = v[(c, j)];
            }
        }
        Ok((k, a, b))
    }

    /// `out = A B` for `A: [rows, k]`, `B: [k, cols]`.
    pub(crate) fn reconstruct(
        a: &[f32],
        b: &[f32],
        rows: usize,
        k: usize,
        cols: usize,
        out: &mut [f32],
    ) {
        out.fill(0.0);
        if k == 0 || cols == 0 {
            return;
        }
        for (orow, arow) in out.chunks_exact_mut(cols).zip(a.chunks_exact(k)).take(rows) {
            for (&aij, brow) in arow.iter().zip(b.chunks_exact(cols)) {
                for (o, &bv) in orow.iter_mut().zip(brow) {
                    *o += aij * bv;
                }
            }
        }
    }

    pub(crate) fn decode_bytes(bytes: &[u8], shape: &[usize], out: &mut [f32]) -> Result<()> {
        let n = check_len(shape, out.len(), "output buffer")?;
        let (rows, cols) = rows_cols(shape, n);
        let mut r = Reader::open(bytes, "low-rank", ids::LOW_RANK, shape)?;
        let k = r.u32()? as usize;
        if k > rows.min(cols) {
            return Err(r.err(format!("rank {k} above min({rows}, {cols})")));
        }
        let f16 = match r.u8()? {
            0 => false,
            1 => true,
            other => {
                return Err(r.err(format!(
                    "factor dtype {other} is neither 0 (f32) nor 1 (f16)"
                )))
            }
        };
        let width = if f16 { 2 } else { 4 };
        let a_bytes = r.take_items(rows * k, width)?;
        let b_bytes = r.take_items(k * cols, width)?;
        r.finish()?;
        let read = |bytes: &[u8], len: usize| {
            let mut v = vec![0f32; len];
            if f16 {
                let words: Vec<u16> = bytes
                    .chunks_exact(2)
                    .map(|w| u16::from_le_bytes([w[0], w[1]]))
                    .collect();
                HalfFloat::from_bits(HalfKind::F16, &words, &mut v);
            } else {
                get_f32s(bytes, &mut v);
            }
            v
        };
        let a = read(a_bytes, rows * k);
        let b = read(b_bytes, k * cols);
        Self::reconstruct(&a, &b, rows, k, cols, out);
        Ok(())
    }
}

fn put_factor(out: &mut Vec<u8>, values: &mut [f32], storage: FactorStorage) {
    match storage {
        FactorStorage::F32 => put_f32s(out, values),
        FactorStorage::F16 => {
            let mut words = vec![0u16; values.len()];
            HalfFloat::to_bits(HalfKind::F16, values, &mut words);
            // What decode will see, so that the reported error is the real one.
            HalfFloat::from_bits(HalfKind::F16, &words, values);
            for w in words {
                out.extend_from_slice(&w.to_le_bytes());
            }
        }
    }
}

impl Codec for LowRank {
    fn id(&self) -> CodecId {
        ids::LOW_RANK
    }

    fn name(&self) -> String {
        let rule = match self.rule {
            RankRule::Ratio(r) => format!("r{r}"),
            RankRule::Energy(e) => format!("e{e}"),
            RankRule::Fixed(k) => format!("k{k}"),
        };
        let f = if self.factors == FactorStorage::F16 {
            "-f16"
        } else {
            ""
        };
        format!("svd-{rule}{f}")
    }

    fn is_lossless(&self) -> bool {
        false
    }

    fn encode(&self, values: &[f32], shape: &[usize]) -> qvl_core::Result<Encoded> {
        let n = check_len(shape, values.len(), "values")?;
        scan_finite(values, "low-rank")?;
        let (rows, cols) = rows_cols(shape, n);
        let (k, mut a, mut b) = if n == 0 {
            (0, Vec::new(), Vec::new())
        } else {
            self.factorize(values, rows, cols)?
        };
        let width = if self.factors == FactorStorage::F16 {
            2
        } else {
            4
        };
        let mut bytes =
            Vec::with_capacity(header_len(shape.len()) + 5 + width * (a.len() + b.len()));
        write_header(&mut bytes, ids::LOW_RANK, shape);
        bytes.extend_from_slice(&(k as u32).to_le_bytes());
        bytes.push(if self.factors == FactorStorage::F16 {
            1
        } else {
            0
        });
        put_factor(&mut bytes, &mut a, self.factors);
        put_factor(&mut bytes, &mut b, self.factors);
        let mut back = vec![0f32; n];
        Self::reconstruct(&a, &b, rows, k, cols, &mut back);
        Ok(Encoded {
            codec: ids::LOW_RANK,
            shape: shape.to_vec(),
            report: ErrStats::between(values, &back).report(4 * n, bytes.len()),
            bytes,
        })
    }

    fn decode(&self, bytes: &[u8], shape: &[usize], out: &mut [f32]) -> qvl_core::Result<()> {
        Ok(Self::decode_bytes(bytes, shape, out)?)
    }
}

/// nalgebra's SVD, kept as the benchmark's baseline for faer.
#[cfg(feature = "nalgebra-baseline")]
pub mod baseline {
    /// Rank-`rank` reconstruction of the row-major `[rows, cols]` `values`
    /// through nalgebra's SVD; `None` if it did not converge.
    pub fn nalgebra_low_rank(
        values: &[f32],
        rows: usize,
        cols: usize,
        rank: usize,
    ) -> Option<Vec<f32>> {
        let m = nalgebra::DMatrix::from_row_slice(rows, cols, values);
        let mut svd = m.svd(true, true);
        for i in rank..svd.singular_values.len() {
            svd.singular_values[i] = 0.0;
        }
        let r = svd.recompose().ok()?;
        let mut out = vec![0f32; rows * cols];
        for i in 0..rows {
            for j in 0..cols {
                out[i * cols + j] = r[(i, j)];
            }
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rank-3 matrix plus a little noise.
    fn low_rank_data(rows: usize, cols: usize) -> Vec<f32> {
        let mut v = vec![0f32; rows * cols];
        for i in 0..rows {
            for j in 0..cols {
                let (x, y) = (i as f32 / rows as f32, j as f32 / cols as f32);
                v[i * cols + j] = (3.0 * x).sin() * (2.0 * y).cos()
                    + 0.5 * x * y
                    + 0.2 * (7.0 * y).sin()
                    + 0.001 * (((i * 31 + j * 17) % 13) as f32 - 6.0);
            }
        }
        v
    }

    #[test]
    fn recovers_low_rank_matrices() {
        let (rows, cols) = (24, 40);
        let x = low_rank_data(rows, cols);
        for (rule, bound) in [
            (RankRule::Fixed(3), 0.01),
            (RankRule::Energy(0.9999), 0.01),
            (RankRule::Ratio(0.5), 0.005),
        ] {
            let codec = LowRank::new(rule, FactorStorage::F32).unwrap();
            let e = codec.encode(&x, &[rows, cols]).unwrap();
            assert!(
                e.report.rel_frobenius < bound,
                "{}: {}",
                codec.name(),
                e.report.rel_frobenius
            );
            let mut out = vec![0f32; x.len()];
            codec.decode(&e.bytes, &[rows, cols], &mut out).unwrap();
            let (rel, _) = qvl_core::codec::error_of(&x, &out);
            assert!((rel - e.report.rel_frobenius).abs() < 1e-6);
        }
        let k3 = LowRank::new(RankRule::Fixed(3), FactorStorage::F16)
            .unwrap()
            .encode(&x, &[rows, cols])
            .unwrap();
        assert!(k3.report.ratio() > 9.0, "{}", k3.report.ratio());
        assert!(k3.report.rel_frobenius < 0.01);
    }

    #[test]
    fn malformed_bytes_and_bad_rules_are_errors() {
        assert!(LowRank::new(RankRule::Ratio(0.0), FactorStorage::F32).is_err());
        assert!(LowRank::new(RankRule::Energy(1.5), FactorStorage::F32).is_err());
        let codec = LowRank::new(RankRule::Fixed(2), FactorStorage::F32).unwrap();
        let x = low_rank_data(6, 5);
        let e = codec.encode(&x, &[6, 5]).unwrap();
        let mut out = vec![0f32; 30];
        for cut in 0..e.bytes.len() {
            assert!(codec.decode(&e.bytes[..cut], &[6, 5], &mut out).is_err());
        }
        let mut bad = e.bytes.clone();
        bad[header_len(2)] = 9; // rank above min(6, 5)
        assert!(codec.decode(&bad, &[6, 5], &mut out).is_err());
        assert!(codec.encode(&[f32::INFINITY; 4], &[2, 2]).is_err());
    }

    #[cfg(feature = "nalgebra-baseline")]
    #[test]
    fn nalgebra_baseline_agrees() {
        let x = low_rank_data(12, 20);
        let r = baseline::nalgebra_low_rank(&x, 12, 20, 12).unwrap();
        let (rel, _) = qvl_core::codec::error_of(&x, &r);
        assert!(rel < 1e-4, "{rel}");
    }
}
