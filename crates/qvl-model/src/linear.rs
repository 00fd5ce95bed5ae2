//! Linear layers over weights kept in their stored dtype.
//!
//! `y = x W^T (+ b)`: the weight rows are converted to f32 one tile at a
//! time (a few rows, so the tile stays in cache) inside the worker that
//! uses them, and tiles are spread over the rayon pool. Decode (one row of
//! `x`) then streams every weight byte once, which is what bounds it.
//!
//! Weights held as quantized blocks ([`crate::qweight`]) go the same way:
//! prefill dequantizes a tile of rows into the f32 scratch (the values are
//! bit for bit those of the f32 path, so only the weight bytes differ);
//! decode takes dot products straight from the blocks, the int8/int4 values
//! widened to f32 in registers and each block's sum scaled once
//! (`d * sum(x q) + m * sum(x)`), with AVX2 when the CPU has it.

use crate::error::{ModelError, Result};
use crate::qweight::{self, BlockFormat, BLOCK_ELEMS};
use crate::tensor::{convert_bf16, convert_f16, convert_f32, StoredTensor};
use qvl_core::DType;
use rayon::prelude::*;

/// Weight rows converted per tile.
const TILE_ROWS: usize = 16;

/// Up to this many input rows (decode, short chunks) the weights are read
/// straight from their stored bytes inside the dot product, with no tile:
/// each weight byte is then touched once, from RAM, which is what bounds
/// decoding. More rows amortize a converted tile over many dot products.
const DIRECT_MAX_ROWS: usize = 4;

/// A linear layer: `out_features x in_features` weights in their stored
/// dtype and an optional f32 bias.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: StoredTensor,
    bias: Option<Vec<f32>>,
    out_features: usize,
    in_features: usize,
}

impl Linear {
    /// A layer over `weight`, read as `out_features x in_features` whatever
    /// its stored rank (a Conv3d kernel is one), with an optional bias.
    pub fn new(
        weight: StoredTensor,
        bias: Option<&StoredTensor>,
        out_features: usize,
        in_features: usize,
    ) -> Result<Linear> {
        if weight.elements() != out_features * in_features {
            return Err(ModelError::InvalidInput(format!(
                "weight {:?} of shape {:?} is not {out_features} x {in_features}",
                weight.name, weight.shape
            )));
        }
        if !weight.is_float() {
            return Err(ModelError::InvalidInput(format!(
                "weight {:?} is {}, expected f32, f16, bf16 or quantized blocks",
                weight.name, weight.dtype
            )));
        }
        if let Some(format) = weight.block_format() {
            if in_features % BLOCK_ELEMS != 0 {
                return Err(ModelError::InvalidInput(format!(
                    "weight {:?} is {format} blocks of {BLOCK_ELEMS}, but rows of \
                     {in_features} inputs are not whole blocks",
                    weight.name
                )));
            }
        }
        let bias = match bias {
            Some(b) => {
                if b.elements() != out_features {
                    return Err(ModelError::InvalidInput(format!(
                        "bias {:?} of shape {:?} does not have {out_features} elements",
                        b.name, b.shape
                    )));
                }
                Some(b.to_f32_vec()?)
            }
            None => None,
        };
        Ok(Linear {
            weight,
            bias,
            out_features,
            in_features,
        })
    }

    /// Output width.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Input width.
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Bytes of the stored weight (what one decode step reads).
    pub fn weight_bytes(&self) -> usize {
        self.weight.bytes.len()
    }

    /// The block format when the weight is held quantized.
    pub fn block_format(&self) -> Option<BlockFormat> {
        self.weight.block_format()
    }

    /// The stored weight.
    pub fn weight(&self) -> &StoredTensor {
        &self.weight
    }

    /// `x` holds `rows` rows of `in_features`; returns `rows x out_features`.
    pub fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        debug_assert_eq!(x.len(), rows * self.in_features);
        let (n, k) = (self.out_features, self.in_features);
        let bytes = self.weight.bytes.as_slice();
        let dtype = self.weight.dtype;
        let blocks = self.weight.block_format();
        let row_bytes = match blocks {
            Some(f) => k / BLOCK_ELEMS * f.block_bytes(),
            None => dtype.bytes_for(k),
        };
        // Block sums of x: the minimum (or the -8 offset) of int4 blocks
        // multiplies them, once per block instead of once per value.
        let xsums = match blocks {
            Some(BlockFormat::Q4_0 | BlockFormat::Q4_1) if rows <= DIRECT_MAX_ROWS => x
                .chunks_exact(BLOCK_ELEMS)
                .map(|c| c.iter().sum())
                .collect(),
            _ => Vec::new(),
        };
        // Transposed result: each tile owns a contiguous `tile x rows` range,
        // so the workers write disjoint slices with no unsafe code.
        let mut out_t = vec![0f32; n * rows];
        out_t
            .par_chunks_mut(TILE_ROWS * rows)
            .enumerate()
            .for_each_init(Vec::new, |tile, (t, out_chunk)| {
                let row0 = t * TILE_ROWS;
                let nrows = out_chunk.len() / rows;
                let src = &bytes[row0 * row_bytes..(row0 + nrows) * row_bytes];
                match blocks {
                    Some(format) if rows <= DIRECT_MAX_ROWS => {
                        run_direct_blocks(format, src, x, &xsums, rows, k, out_chunk);
                    }
                    Some(format) => {
                        tile.resize(nrows * k, 0.0);
                        format.dequantize(src, tile);
                        multiply_tile(tile, x, rows, k, out_chunk);
                    }
                    None if rows <= DIRECT_MAX_ROWS => {
                        run_direct(dtype, src, tile, x, rows, k, out_chunk);
                    }
                    None => {
                        tile.resize(nrows * k, 0.0);
                        match dtype {
                            DType::Bf16 => convert_bf16(src, tile),
                            DType::F16 => convert_f16(src, tile),
                            // Linear::new accepts float weights only; f32 is the remaining case.
                            _ => convert_f32(src, tile),
                        }
                        multiply_tile(tile, x, rows, k, out_chunk);
                    }
                }
            });
        let mut out = if rows == 1 {
            out_t
        } else {
            let mut out = vec![0f32; n * rows];
            for (j, col) in out_t.chunks_exact(rows).enumerate() {
                for (i, v) in col.iter().enumerate() {
                    out[i * n + j] = *v;
                }
            }
            out
        };
        if let Some(b) = &self.bias {
            for row in out.chunks_exact_mut(n) {
                for (o, b) in row.iter_mut().zip(b) {
                    *o += b;
                }
            }
        }
        out
    }
}

/// Multiplies one tile of f32 weight rows with every row of `x`, using
/// AVX2 where the CPU has it.
fn multiply_tile(tile: &[f32], x: &[f32], rows: usize, k: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above),
            // which is all `tile_avx2` requires.
            unsafe { tile_avx2(tile, x, rows, k, out) };
            return;
        }
    }
    tile_body::<false>(tile, x, rows, k, out);
}

/// Dot products of every row of `x` with quantized weight rows (`src`
/// holds whole rows of `format` blocks), out like [`multiply_tile`].
/// `xsums` holds the block sums of `x` for the int4 formats.
fn run_direct_blocks(
    format: BlockFormat,
    src: &[u8],
    x: &[f32],
    xsums: &[f32],
    rows: usize,
    k: usize,
    out: &mut [f32],
) {
    let nb = k / BLOCK_ELEMS;
    let row_bytes = nb * format.block_bytes();
    let nrows = src.len() / row_bytes;
    let xsum_row = |i: usize| xsums.get(i * nb..(i + 1) * nb).unwrap_or(&[]);
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            for j in 0..nrows {
                let w = &src[j * row_bytes..(j + 1) * row_bytes];
                for i in 0..rows {
                    // SAFETY: AVX2, FMA and F16C are present, checked above; `w`
                    // holds exactly `k / 32` blocks of `format`, the x row `k`
                    // f32 and, for int4, `xsum_row` its `k / 32` block sums
                    // (computed by `forward` whenever it takes this path).
                    out[j * rows + i] =
                        unsafe { avx2::dot_blocks(format, &x[i * k..(i + 1) * k], xsum_row(i), w) };
                }
            }
            return;
        }
    }
    let mut block = [0f32; BLOCK_ELEMS];
    for j in 0..nrows {
        let w = &src[j * row_bytes..(j + 1) * row_bytes];
        for i in 0..rows {
            let xr = &x[i * k..(i + 1) * k];
            let mut sum = 0f32;
            for (b, wb) in w.chunks_exact(format.block_bytes()).enumerate() {
                qweight::dequantize_block(format, wb, &mut block);
                sum += dot(&xr[b * BLOCK_ELEMS..(b + 1) * BLOCK_ELEMS], &block);
            }
            out[j * rows + i] = sum;
        }
    }
}

/// Dot products of every row of `x` with weight rows read from their
/// stored bytes (`src` holds whole rows), out in `rows`-major-per-weight
/// order like [`multiply_tile`].
fn run_direct(
    dtype: DType,
    src: &[u8],
    scratch: &mut Vec<f32>,
    x: &[f32],
    rows: usize,
    k: usize,
    out: &mut [f32],
) {
    let elem = dtype.bytes_for(1);
    let nrows = src.len() / (k * elem);
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            for j in 0..nrows {
                let w = &src[j * k * elem..(j + 1) * k * elem];
                for i in 0..rows {
                    // SAFETY: AVX2, FMA and F16C are present, checked
                    // above; `w` holds exactly `k` elements of `dtype` and the
                    // x row `k` f32, which is what the kernel reads.
                    out[j * rows + i] =
                        unsafe { avx2::dot_stored(dtype, &x[i * k..(i + 1) * k], w) };
                }
            }
            return;
        }
    }
    scratch.resize(k, 0.0);
    for j in 0..nrows {
        let w = &src[j * k * elem..(j + 1) * k * elem];
        match dtype {
            DType::Bf16 => convert_bf16(w, scratch),
            DType::F16 => convert_f16(w, scratch),
            _ => convert_f32(w, scratch),
        }
        for i in 0..rows {
            out[j * rows + i] = dot(&x[i * k..(i + 1) * k], scratch);
        }
    }
}

/// Dot products straight from stored weight bytes with AVX2 intrinsics.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use crate::qweight::{BlockFormat, BLOCK_ELEMS};
    use qvl_core::DType;
    use std::arch::x86_64::*;

    /// 8 signed bytes at `p` widened to 8 f32.
    ///
    /// # Safety
    /// AVX2 must be present and `p..p + 8` readable.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn i8x8_to_ps(p: *const u8) -> __m256 {
        // SAFETY: the caller guarantees 8 readable bytes at `p`; the load is unaligned.
        unsafe { _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i))) }
    }

    /// The low 8 bytes of `v` (values 0..16) widened to 8 f32.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn u8x8_to_ps(v: __m128i) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v))
    }

    /// The f16 at `b[at..at + 2]` (little endian) as f32 with F16C: the
    /// `half` crate's conversion checks the CPU on every call, which cost
    /// the Q4_1 decode kernel a third of its speed (two scales a block).
    #[inline]
    #[target_feature(enable = "f16c")]
    fn f16_at(b: &[u8], at: usize) -> f32 {
        let bits = u16::from_le_bytes([b[at], b[at + 1]]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
    }

    /// `x . w` where `w` holds `x.len() / 32` blocks of `format` and, for
    /// int4 formats, `xsum[b]` is the sum of `x` over block `b`.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `x.len()` must be a multiple
    /// of 32, `w.len()` that many blocks, and `xsum` (int4) one sum per block.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_blocks(format: BlockFormat, x: &[f32], xsum: &[f32], w: &[u8]) -> f32 {
        let nb = x.len() / BLOCK_ELEMS;
        let bb = format.block_bytes();
        debug_assert_eq!(w.len(), nb * bb);
        let xp = x.as_ptr();
        let mut acc = _mm256_setzero_ps();
        // Minimum (Q4_1) or offset (Q4_0) times the block sums of x.
        let mut offset = 0f32;
        let mask = _mm_set1_epi8(0x0f);
        for b in 0..nb {
            let blk = &w[b * bb..(b + 1) * bb];
            // A safe call: this function enables F16C, all `f16_at` needs.
            let d = f16_at(blk, 0);
            // SAFETY: block `b` of x is x[32 b..32 b + 32] (in bounds: b < nb)
            // and `blk` holds one whole block of `format` (`bb` bytes), so
            // every load below reads inside them; all loads are unaligned.
            let s = unsafe {
                let xb = xp.add(b * BLOCK_ELEMS);
                match format {
                    BlockFormat::Q8_0 => {
                        let q = blk.as_ptr().add(2);
                        let mut s = _mm256_mul_ps(_mm256_loadu_ps(xb), i8x8_to_ps(q));
                        s = _mm256_fmadd_ps(_mm256_loadu_ps(xb.add(8)), i8x8_to_ps(q.add(8)), s);
                        s = _mm256_fmadd_ps(_mm256_loadu_ps(xb.add(16)), i8x8_to_ps(q.add(16)), s);
                        _mm256_fmadd_ps(_mm256_loadu_ps(xb.add(24)), i8x8_to_ps(q.add(24)), s)
                    }
                    BlockFormat::Q4_0 | BlockFormat::Q4_1 => {
                        let qoff = if format == BlockFormat::Q4_1 { 4 } else { 2 };
                        let v = _mm_loadu_si128(blk.as_ptr().add(qoff) as *const __m128i);
                        // Low nibbles are values 0..16, high nibbles 16..32.
                        let lo = _mm_and_si128(v, mask);
                        let hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
                        let mut s = _mm256_mul_ps(_mm256_loadu_ps(xb), u8x8_to_ps(lo));
                        s = _mm256_fmadd_ps(
                            _mm256_loadu_ps(xb.add(8)),
                            u8x8_to_ps(_mm_srli_si128(lo, 8)),
                            s,
                        );
                        s = _mm256_fmadd_ps(_mm256_loadu_ps(xb.add(16)), u8x8_to_ps(hi), s);
                        _mm256_fmadd_ps(
                            _mm256_loadu_ps(xb.add(24)),
                            u8x8_to_ps(_mm_srli_si128(hi, 8)),
                            s,
                        )
                    }
                }
            };
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), s, acc);
            match format {
                BlockFormat::Q8_0 => {}
                BlockFormat::Q4_0 => offset -= 8.0 * d * xsum[b],
                BlockFormat::Q4_1 => {
                    let m = f16_at(blk, 2);
                    offset += m * xsum[b];
                }
            }
        }
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` holds 8 f32, the size of one AVX register.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
        lanes.iter().sum::<f32>() + offset
    }

    /// `x . w` where `w` holds `x.len()` elements of `dtype` (f32, f16, bf16).
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `w.len()` must be
    /// `x.len() * dtype size`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_stored(dtype: DType, x: &[f32], w: &[u8]) -> f32 {
        let k = x.len();
        let xp = x.as_ptr();
        let wp = w.as_ptr();
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut i = 0;
        // Each step reads 16 elements: two 8-lane halves into two accumulators.
        while i + 16 <= k {
            // SAFETY: i + 16 <= k, so x[i..i + 16] and the 16 elements of w
            // from element i are in bounds; the loads are unaligned loads.
            unsafe {
                let (w0, w1) = match dtype {
                    DType::Bf16 => {
                        let a = _mm_loadu_si128(wp.add(2 * i) as *const __m128i);
                        let b = _mm_loadu_si128(wp.add(2 * i + 16) as *const __m128i);
                        (
                            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(a), 16)),
                            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16)),
                        )
                    }
                    DType::F16 => {
                        let a = _mm_loadu_si128(wp.add(2 * i) as *const __m128i);
                        let b = _mm_loadu_si128(wp.add(2 * i + 16) as *const __m128i);
                        (_mm256_cvtph_ps(a), _mm256_cvtph_ps(b))
                    }
                    _ => (
                        _mm256_loadu_ps(wp.add(4 * i) as *const f32),
                        _mm256_loadu_ps(wp.add(4 * i + 32) as *const f32),
                    ),
                };
                acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(i)), w0, acc0);
                acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(i + 8)), w1, acc1);
            }
            i += 16;
        }
        let acc = _mm256_add_ps(acc0, acc1);
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` holds 8 f32, the size of one AVX register.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
        let mut sum: f32 = lanes.iter().sum();
        let elem = dtype.bytes_for(1);
        for j in i..k {
            let b = &w[j * elem..(j + 1) * elem];
            let wv = match dtype {
                DType::Bf16 => f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16),
                DType::F16 => half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
                _ => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            };
            sum += x[j] * wv;
        }
        sum
    }
}

/// [`tile_body`] compiled with AVX2 enabled.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2(tile: &[f32], x: &[f32], rows: usize, k: usize, out: &mut [f32]) {
    tile_body::<true>(tile, x, rows, k, out);
}

#[inline(always)]
fn tile_body<const FMA: bool>(tile: &[f32], x: &[f32], rows: usize, k: usize, out: &mut [f32]) {
    let nrows = tile.len() / k;
    out.iter_mut().for_each(|o| *o = 0.0);
    // k in blocks so that the tile's block stays in L1 while every row of
    // x passes over it; 4 x rows by 2 weight rows per register block.
    let mut kb = 0;
    while kb < k {
        let ke = (kb + K_BLOCK).min(k);
        let mut i = 0;
        while i < rows {
            let xr = if i + 4 <= rows { 4 } else { 1 };
            let mut j = 0;
            while j < nrows {
                let wr = if j + 2 <= nrows { 2 } else { 1 };
                match (xr, wr) {
                    (4, 2) => block::<4, 2, FMA>(x, tile, k, kb, ke, i, j, rows, out),
                    (4, _) => block::<4, 1, FMA>(x, tile, k, kb, ke, i, j, rows, out),
                    (_, 2) => block::<1, 2, FMA>(x, tile, k, kb, ke, i, j, rows, out),
                    _ => block::<1, 1, FMA>(x, tile, k, kb, ke, i, j, rows, out),
                }
                j += wr;
            }
            i += xr;
        }
        kb = ke;
    }
}

/// Columns of k per block of the tiled kernel (16 rows x 256 f32 = 16 KiB).
const K_BLOCK: usize = 256;

/// Adds the dot products of x rows `i..i + XR` with tile rows `j..j + WR`
/// over `kb..ke` into `out` (`[weight row][x row]`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn block<const XR: usize, const WR: usize, const FMA: bool>(
    x: &[f32],
    tile: &[f32],
    k: usize,
    kb: usize,
    ke: usize,
    i: usize,
    j: usize,
    rows: usize,
    out: &mut [f32],
) {
    let xs: [&[f32]; XR] = std::array::from_fn(|r| &x[(i + r) * k + kb..(i + r) * k + ke]);
    let ws: [&[f32]; WR] = std::array::from_fn(|c| &tile[(j + c) * k + kb..(j + c) * k + ke]);
    let len = ke - kb;
    let mut acc = [[[0f32; LANES]; WR]; XR];
    let chunks = len / LANES;
    for ch in 0..chunks {
        let o = ch * LANES;
        let wv: [[f32; LANES]; WR] = std::array::from_fn(|c| {
            let mut a = [0f32; LANES];
            a.copy_from_slice(&ws[c][o..o + LANES]);
            a
        });
        for r in 0..XR {
            let xv = &xs[r][o..o + LANES];
            for c in 0..WR {
                for l in 0..LANES {
                    acc[r][c][l] = if FMA {
                        xv[l].mul_add(wv[c][l], acc[r][c][l])
                    } else {
                        acc[r][c][l] + xv[l] * wv[c][l]
                    };
                }
            }
        }
    }
    for r in 0..XR {
        for c in 0..WR {
            let mut sum: f32 = acc[r][c].iter().sum();
            for p in chunks * LANES..len {
                sum += xs[r][p] * ws[c][p];
            }
            out[(j + c) * rows + i + r] += sum;
        }
    }
}

/// Lanes of the accumulators: one AVX register of f32.
const LANES: usize = 8;

/// Dot product with 8 independent accumulators (vectorizes).
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let chunks = n / LANES;
    for c in 0..chunks {
        let (ac, bc) = (
            &a[c * LANES..(c + 1) * LANES],
            &b[c * LANES..(c + 1) * LANES],
        );
        for l in 0..LANES {
            acc[l] += ac[l] * bc[l];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for i in chunks * LANES..n {
        sum += a[i] * b[i];
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], w: &[f32], b: &[f32], rows: usize, n: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0f32; rows * n];
        for i in 0..rows {
            for j in 0..n {
                let mut s = 0f64;
                for p in 0..k {
                    s += f64::from(x[i * k + p]) * f64::from(w[j * k + p]);
                }
                out[i * n + j] = s as f32 + b[j];
            }
        }
        out
    }

    #[test]
    fn matches_naive_for_odd_sizes_and_dtypes() {
        let (rows, n, k) = (5, 37, 29);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let x: Vec<f32> = (0..rows * k)
            .map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0)
            .collect();
        let b: Vec<f32> = (0..n).map(|i| i as f32 * 0.1).collect();
        let bias = StoredTensor::from_f32("b", vec![n], &b).unwrap();
        let lin = Linear::new(
            StoredTensor::from_f32("w", vec![n, k], &w).unwrap(),
            Some(&bias),
            n,
            k,
        )
        .unwrap();
        let want = naive(&x, &w, &b, rows, n, k);
        for (a, e) in lin.forward(&x, rows).iter().zip(&want) {
            assert!((a - e).abs() < 1e-4, "{a} vs {e}");
        }
        // bf16 weights: compare against the same rounded weights.
        let bits: Vec<u16> = w
            .iter()
            .map(|v| half::bf16::from_f32(*v).to_bits())
            .collect();
        let wr: Vec<f32> = bits
            .iter()
            .map(|b| half::bf16::from_bits(*b).to_f32())
            .collect();
        let lin = Linear::new(
            StoredTensor::from_bf16_bits("w", vec![n, k], &bits).unwrap(),
            Some(&bias),
            n,
            k,
        )
        .unwrap();
        let want = naive(&x, &wr, &b, rows, n, k);
        for (a, e) in lin.forward(&x, rows).iter().zip(&want) {
            assert!((a - e).abs() < 1e-4, "{a} vs {e}");
        }
        // Decode shapes: one and three rows read the stored bytes directly.
        let one = lin.forward(&x[..k], 1);
        for (a, e) in one.iter().zip(&want[..n]) {
            assert!((a - e).abs() < 1e-4);
        }
        let three = lin.forward(&x[..3 * k], 3);
        for (a, e) in three.iter().zip(&want[..3 * n]) {
            assert!((a - e).abs() < 1e-4);
        }
        // f16 weights, both paths.
        let f16: Vec<u8> = w
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_bits().to_le_bytes())
            .collect();
        let wr: Vec<f32> = w.iter().map(|v| half::f16::from_f32(*v).to_f32()).collect();
        let t = StoredTensor::new(
            "w",
            DType::F16,
            vec![n, k],
            crate::tensor::Bytes::from_vec(f16),
        )
        .unwrap();
        let lin = Linear::new(t, Some(&bias), n, k).unwrap();
        let want = naive(&x, &wr, &b, rows, n, k);
        for r in [1, rows] {
            for (a, e) in lin.forward(&x[..r * k], r).iter().zip(&want[..r * n]) {
                assert!((a - e).abs() < 1e-4, "{a} vs {e}");
            }
        }
    }

    /// Quantized blocks give what the f32 path gives on the dequantized
    /// values, for decode (direct) and prefill (tiled) shapes alike.
    #[test]
    fn blocks_match_the_f32_path_on_dequantized_weights() {
        let (n, k) = (37, 96);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919) % 211) as f32 / 100.0 - 1.0)
            .collect();
        let x: Vec<f32> = (0..9 * k)
            .map(|i| ((i * 31) % 17) as f32 / 8.0 - 0.9)
            .collect();
        let b: Vec<f32> = (0..n).map(|i| i as f32 * 0.1).collect();
        let bias = StoredTensor::from_f32("b", vec![n], &b).unwrap();
        for format in [BlockFormat::Q8_0, BlockFormat::Q4_0, BlockFormat::Q4_1] {
            let q = qweight::quantize(format, &w).unwrap();
            let mut deq = vec![0f32; n * k];
            format.dequantize(&q, &mut deq);
            let dense = Linear::new(
                StoredTensor::from_f32("w", vec![n, k], &deq).unwrap(),
                Some(&bias),
                n,
                k,
            )
            .unwrap();
            let quant = Linear::new(
                StoredTensor::from_blocks("w", format, vec![n, k], q).unwrap(),
                Some(&bias),
                n,
                k,
            )
            .unwrap();
            assert_eq!(quant.block_format(), Some(format));
            assert_eq!(quant.weight_bytes(), n * k / 32 * format.block_bytes());
            for rows in [1, 3, 9] {
                let want = dense.forward(&x[..rows * k], rows);
                let got = quant.forward(&x[..rows * k], rows);
                let scale = want.iter().map(|v| v.abs()).fold(0f32, f32::max);
                for (a, e) in got.iter().zip(&want) {
                    assert!(
                        (a - e).abs() <= 1e-4 * scale.max(1.0),
                        "{format} rows {rows}: {a} vs {e}"
                    );
                }
                if rows > DIRECT_MAX_ROWS {
                    // Tiled: the same f32 tile, so the same bits.
                    assert_eq!(got, want, "{format}");
                }
            }
            // The scalar fallback agrees with the SIMD kernel.
            let nb = k / 32;
            let src = quant.weight().bytes.as_slice();
            let mut block = [0f32; 32];
            let out: Vec<f32> = src
                .chunks_exact(nb * format.block_bytes())
                .zip(&b)
                .map(|(row, bias)| {
                    let mut sum = 0f32;
                    for (bi, wb) in row.chunks_exact(format.block_bytes()).enumerate() {
                        qweight::dequantize_block(format, wb, &mut block);
                        sum += dot(&x[bi * 32..(bi + 1) * 32], &block);
                    }
                    sum + bias
                })
                .collect();
            let got = quant.forward(&x[..k], 1);
            for (a, e) in got.iter().zip(&out) {
                assert!((a - e).abs() <= 1e-4 * e.abs().max(1.0), "{a} vs {e}");
            }
        }
        // Rows that are not whole blocks are refused with the tensor's name.
        let q = qweight::quantize(BlockFormat::Q8_0, &w[..32 * 3]).unwrap();
        let t = StoredTensor::from_blocks("odd", BlockFormat::Q8_0, vec![3, 32], q).unwrap();
        let err = Linear::new(t, None, 2, 48).unwrap_err().to_string();
        assert!(err.contains("odd"), "{err}");
    }
}
