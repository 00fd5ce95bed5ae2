//! Magnitude top-k sparsification stored as CSR.
//!
//! Keeps the `ceil(keep_ratio * n)` values of largest magnitude of a
//! `[rows, cols]` view and drops the rest to zero.
//!
//! Payload after the common header: `nnz u64`, `index width u8` (2 or 4),
//! `row_ptr` as `rows + 1` u32, column indices, values (f32).

use crate::error::{CompressError, Result};
use crate::format::{check_len, get_f32s, header_len, put_f32s, rows_cols, write_header, Reader};
use crate::ids;
use crate::stats::{scan_finite, ErrStats};
use qvl_core::{Codec, CodecId, Encoded};

/// Magnitude top-k in CSR.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SparseTopK {
    /// Fraction of values kept, in (0, 1].
    pub keep_ratio: f64,
}

impl SparseTopK {
    /// A validated sparse codec.
    pub fn new(keep_ratio: f64) -> Result<Self> {
        if !(keep_ratio > 0.0 && keep_ratio <= 1.0) {
            return Err(CompressError::config(
                "sparse_keep_ratio",
                format!("{keep_ratio} is not within (0, 1]"),
            ));
        }
        Ok(SparseTopK { keep_ratio })
    }

    pub(crate) fn decode_bytes(bytes: &[u8], shape: &[usize], out: &mut [f32]) -> Result<()> {
        let n = check_len(shape, out.len(), "output buffer")?;
        let (rows, cols) = rows_cols(shape, n);
        let mut r = Reader::open(bytes, "sparse", ids::SPARSE, shape)?;
        let nnz = r.len_u64("nnz")?;
        if nnz > n {
            return Err(r.err(format!("{nnz} non-zeros in {n} values")));
        }
        let width = r.u8()? as usize;
        if width != 2 && width != 4 {
            return Err(r.err(format!("index width {width} is neither 2 nor 4")));
        }
        let ptr_bytes = r.take_items(rows + 1, 4)?;
        let idx_bytes = r.take_items(nnz, width)?;
        let val_bytes = r.take_items(nnz, 4)?;
        r.finish()?;
        let mut vals = vec![0f32; nnz];
        get_f32s(val_bytes, &mut vals);
        out.fill(0.0);
        let ptr = |i: usize| {
            let b = &ptr_bytes[4 * i..4 * i + 4];
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize
        };
        let col = |i: usize| {
            if width == 2 {
                u16::from_le_bytes([idx_bytes[2 * i], idx_bytes[2 * i + 1]]) as usize
            } else {
                let b = &idx_bytes[4 * i..4 * i + 4];
                u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize
            }
        };
        if ptr(0) != 0 || ptr(rows) != nnz {
            return Err(r.err(format!(
                "row pointers run {}..{}, expected 0..{nnz}",
                ptr(0),
                ptr(rows)
            )));
        }
        for row in 0..rows {
            let (start, end) = (ptr(row), ptr(row + 1));
            if start > end || end > nnz {
                return Err(r.err(format!("row {row} spans {start}..{end} of {nnz}")));
            }
            for (i, &v) in vals.iter().enumerate().take(end).skip(start) {
                let c = col(i);
                if c >= cols {
                    return Err(r.err(format!("column {c} in row {row} is beyond {cols}")));
                }
                out[row * cols + c] = v;
            }
        }
        Ok(())
    }
}

impl Codec for SparseTopK {
    fn id(&self) -> CodecId {
        ids::SPARSE
    }

    fn name(&self) -> String {
        format!("sparse-top{}", self.keep_ratio)
    }

    fn is_lossless(&self) -> bool {
        false
    }

    fn encode(&self, values: &[f32], shape: &[usize]) -> qvl_core::Result<Encoded> {
        let n = check_len(shape, values.len(), "values")?;
        scan_finite(values, "sparse")?;
        let (rows, cols) = rows_cols(shape, n);
        let k = ((self.keep_ratio * n as f64).ceil() as usize).min(n);
        // Threshold: the k-th largest magnitude; values above it are kept,
        // values equal to it fill the remaining slots in order.
        let (threshold, mut ties) = if k == 0 {
            (f32::INFINITY, 0)
        } else {
            let mut mags: Vec<f32> = values.iter().map(|v| v.abs()).collect();
            let (_, kth, _) = mags.select_nth_unstable_by(n - k, f32::total_cmp);
            let t = *kth;
            let above = values.iter().filter(|v| v.abs() > t).count();
            (t, k - above)
        };
        if k > u32::MAX as usize {
            return Err(CompressError::InvalidShape {
                shape: shape.to_vec(),
                reason: format!("{k} non-zeros do not fit 32-bit row pointers"),
            }
            .into());
        }
        let width = if cols <= 1 << 16 { 2 } else { 4 };
        let mut ptr = Vec::with_capacity(rows + 1);
        let mut idx = Vec::with_capacity(k * width);
        let mut vals = Vec::with_capacity(k);
        let mut back = vec![0f32; n];
        ptr.push(0u32);
        for r in 0..rows {
            for c in 0..cols {
                let v = values[r * cols + c];
                let a = v.abs();
                let keep = a > threshold
                    || (a == threshold && ties > 0 && {
                        ties -= 1;
                        true
                    });
                if keep {
                    if width == 2 {
                        idx.extend_from_slice(&(c as u16).to_le_bytes());
                    } else {
                        idx.extend_from_slice(&(c as u32).to_le_bytes());
                    }
                    vals.push(v);
                    back[r * cols + c] = v;
                }
            }
            ptr.push(vals.len() as u32);
        }
        let mut bytes = Vec::with_capacity(
            header_len(shape.len()) + 9 + 4 * ptr.len() + idx.len() + 4 * vals.len(),
        );
        write_header(&mut bytes, ids::SPARSE, shape);
        bytes.extend_from_slice(&(vals.len() as u64).to_le_bytes());
        bytes.push(width as u8);
        for p in &ptr {
            bytes.extend_from_slice(&p.to_le_bytes());
        }
        bytes.extend_from_slice(&idx);
        put_f32s(&mut bytes, &vals);
        Ok(Encoded {
            codec: ids::SPARSE,
            shape: shape.to_vec(),
            report: ErrStats::between(values, &back).report(4 * n, bytes.len()),
            bytes,
        })
    }

    fn decode(&self, bytes: &[u8], shape: &[usize], out: &mut [f32]) -> qvl_core::Result<()> {
        Ok(Self::decode_bytes(bytes, shape, out)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_exactly_the_largest_magnitudes() {
        let x: Vec<f32> = (0..40)
            .map(|i| {
                if i % 10 == 3 {
                    5.0 + i as f32
                } else {
                    0.01 * i as f32 - 0.2
                }
            })
            .collect();
        let codec = SparseTopK::new(0.1).unwrap();
        let e = codec.encode(&x, &[4, 10]).unwrap();
        let mut out = vec![0f32; 40];
        codec.decode(&e.bytes, &[4, 10], &mut out).unwrap();
        for (i, (&a, &b)) in x.iter().zip(&out).enumerate() {
            if i % 10 == 3 {
                assert_eq!(a, b);
            } else {
                assert_eq!(b, 0.0);
            }
        }
        assert!(e.report.rel_frobenius < 0.05);
        // Ties: all equal magnitudes, exactly k kept.
        let e = codec.encode(&[1.0; 40], &[40]).unwrap();
        codec.decode(&e.bytes, &[40], &mut out).unwrap();
        assert_eq!(out.iter().filter(|&&v| v != 0.0).count(), 4);
        let full = SparseTopK::new(1.0).unwrap().encode(&x, &[4, 10]).unwrap();
        assert_eq!(full.report.max_abs, 0.0);
    }

    #[test]
    fn malformed_bytes_are_errors() {
        assert!(SparseTopK::new(0.0).is_err());
        let codec = SparseTopK::new(0.5).unwrap();
        let x: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let e = codec.encode(&x, &[3, 4]).unwrap();
        let mut out = vec![0f32; 12];
        for cut in 0..e.bytes.len() {
            assert!(codec.decode(&e.bytes[..cut], &[3, 4], &mut out).is_err());
        }
        let h = header_len(2);
        let mut bad = e.bytes.clone();
        let first_idx = h + 9 + 16;
        bad[first_idx] = 9; // column 9 of 4
        assert!(codec.decode(&bad, &[3, 4], &mut out).is_err());
        let mut bad = e.bytes.clone();
        bad[h + 9 + 4] = 7; // row pointer out of order
        assert!(codec.decode(&bad, &[3, 4], &mut out).is_err());
    }
}
