//! Group-wise integer quantization (int8, int4; symmetric or asymmetric),
//! along either axis of a `[.., rows, cols]` tensor.
//!
//! For a KV tensor laid out `[tokens, channels]`, [`QuantAxis::PerToken`]
//! groups run along the channels of one token (KIVI's choice for values) and
//! [`QuantAxis::PerChannel`] groups run along the tokens of one channel
//! (KIVI's choice for keys, whose outliers sit in fixed channels).
//!
//! Each group stores a scale (and a minimum when asymmetric) as f16, or f32
//! when the tensor's range does not fit f16 well. Codes are one byte each
//! (int8) or two per byte (int4; element `j` of a group shares a byte with
//! element `j + ceil(len/2)`, so packing is a plain element-wise loop).
//!
//! Payload after the common header: `bits u8`, `flags u8` (1 symmetric,
//! 2 per-channel, 4 f32 parameters), `group_size u32`, the codes, the
//! scales, the minimums (asymmetric only). Codes come first so that the
//! encoder writes them in place.

use crate::error::{CompressError, Result};
use crate::format::{check_len, header_len, rows_cols, write_header, Reader};
use crate::ids;
use crate::stats::{scan_finite, ErrLanes, ErrStats, LANES};
use half::f16;
use qvl_core::{Codec, CodecId, Encoded};

/// Bits per code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantBits {
    /// 256 levels, one byte per value.
    Int8,
    /// 16 levels, two values per byte.
    Int4,
}

impl QuantBits {
    /// Bits per code.
    pub fn bits(self) -> u32 {
        match self {
            QuantBits::Int8 => 8,
            QuantBits::Int4 => 4,
        }
    }

    /// From a bit count (4 or 8).
    pub fn from_bits(bits: u32) -> Result<Self> {
        match bits {
            8 => Ok(QuantBits::Int8),
            4 => Ok(QuantBits::Int4),
            other => Err(CompressError::config(
                "quantization_bits",
                format!("{other} is not supported; use 4 or 8"),
            )),
        }
    }

    fn max_code(self) -> f32 {
        ((1u32 << self.bits()) - 1) as f32
    }
}

/// Which axis a group runs along.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantAxis {
    /// Along the innermost dimension: `group_size` neighbouring values of a
    /// row share a scale (per token for `[tokens, channels]`).
    PerToken,
    /// Along the second-innermost dimension: `group_size` neighbouring rows
    /// share one scale per column (per channel for `[tokens, channels]`).
    /// Leading dimensions (heads, batches) are separate slabs.
    PerChannel,
}

const FLAG_SYMMETRIC: u8 = 1;
const FLAG_PER_CHANNEL: u8 = 2;
const FLAG_F32_PARAMS: u8 = 4;
/// Adding 1.5 * 2^23 rounds an f32 in [0, 2^22] to the nearest integer and
/// leaves that integer in the low mantissa bits: branch-free and vectorizable
/// on plain SSE2, unlike `f32::round`.
const ROUND_MAGIC: f32 = 12_582_912.0;
/// Largest allowed group.
const MAX_GROUP: usize = 1 << 16;
/// f16 parameters are used when the tensor's largest |x| lies in this range:
/// scales and minimums then stay normal, finite f16 numbers.
const F16_PARAM_RANGE: (f32, f32) = (1e-2, 3.0e4);

/// Group-wise quantization. See the module docs for the layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GroupQuant {
    /// Bits per code.
    pub bits: QuantBits,
    /// Symmetric (scale only, zero at the middle code) or asymmetric
    /// (scale and minimum: better for skewed groups, 16 more bits per group).
    pub symmetric: bool,
    /// Values per group (even, 2..=65536).
    pub group_size: usize,
    /// Axis of the groups.
    pub axis: QuantAxis,
}

/// Shape as `slabs` of `[rows, cols]`.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    slabs: usize,
    rows: usize,
    cols: usize,
}

impl Geometry {
    fn of(shape: &[usize], elements: usize) -> Geometry {
        if elements == 0 {
            return Geometry {
                slabs: 0,
                rows: 0,
                cols: 0,
            };
        }
        let (all_rows, cols) = rows_cols(shape, elements);
        let rows = if shape.len() >= 2 {
            shape[shape.len() - 2]
        } else {
            1
        };
        Geometry {
            slabs: all_rows / rows,
            rows,
            cols,
        }
    }
}

/// A checked encoding: its settings, codes and parameters.
struct Parsed<'a> {
    quant: GroupQuant,
    geo: Geometry,
    codes: &'a [u8],
    scales: Vec<f32>,
    mins: Vec<f32>,
}

/// An int8/int4 encoding in the per-token layout whose rows can be
/// dequantized one at a time, e.g. a weight tile inside a matmul or the
/// tokens of a KV block that attention is reading, without decoding the
/// whole tensor.
pub struct QuantizedRows<'a> {
    parsed: Parsed<'a>,
    row_code_bytes: usize,
    groups_per_row: usize,
}

impl<'a> QuantizedRows<'a> {
    /// Checks `bytes` (made by [`GroupQuant`] with [`QuantAxis::PerToken`])
    /// for `shape`, viewed as `[rows, cols]` with `cols` the last dimension.
    pub fn parse(bytes: &'a [u8], shape: &[usize]) -> Result<Self> {
        let id = crate::format::peek_codec(bytes)?;
        if id != ids::INT8 && id != ids::INT4 {
            return Err(CompressError::malformed(
                "quantized rows",
                format!("{id} is not int8 or int4"),
            ));
        }
        let n = crate::format::elements_of(shape)?;
        let parsed = GroupQuant::parse(id, bytes, shape, n)?;
        if parsed.quant.axis != QuantAxis::PerToken {
            return Err(CompressError::malformed(
                "quantized rows",
                "per-channel groups span rows; decode the whole tensor instead",
            ));
        }
        let rows = parsed.geo.slabs * parsed.geo.rows;
        let (groups, code_bytes) = (parsed.scales.len(), parsed.codes.len());
        Ok(QuantizedRows {
            row_code_bytes: code_bytes.checked_div(rows).unwrap_or(0),
            groups_per_row: groups.checked_div(rows).unwrap_or(0),
            parsed,
        })
    }

    /// Rows of the `[rows, cols]` view.
    pub fn rows(&self) -> usize {
        self.parsed.geo.slabs * self.parsed.geo.rows
    }

    /// Values per row.
    pub fn cols(&self) -> usize {
        self.parsed.geo.cols
    }

    /// The quantizer's settings, as read from the bytes.
    pub fn quant(&self) -> GroupQuant {
        self.parsed.quant
    }

    /// Dequantizes row `row` into `out` (`cols` values).
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) -> Result<()> {
        let cols = self.cols();
        if row >= self.rows() {
            return Err(CompressError::ShapeMismatch {
                what: format!("row index into {} rows", self.rows()),
                expected: self.rows(),
                actual: row,
            });
        }
        if out.len() != cols {
            return Err(CompressError::ShapeMismatch {
                what: "output row".into(),
                expected: cols,
                actual: out.len(),
            });
        }
        let p = &self.parsed;
        let g = p.quant.group_size;
        let mut at = row * self.row_code_bytes;
        for (gi, grp) in (row * self.groups_per_row..).zip(out.chunks_mut(g)) {
            let (s, lo) = (p.scales[gi], p.mins[gi]);
            let len = grp.len();
            match p.quant.bits {
                QuantBits::Int8 => {
                    dequantize_scalar(&p.codes[at..at + len], lo, s, grp);
                    at += len;
                }
                QuantBits::Int4 => {
                    let packed = len.div_ceil(2);
                    unpack_halves(&p.codes[at..at + packed], lo, s, grp);
                    at += packed;
                }
            }
        }
        Ok(())
    }
}

/// Counts of groups and code bytes of one layout.
fn layout(axis: QuantAxis, bits: QuantBits, g: usize, geo: Geometry) -> (usize, usize) {
    if geo.slabs == 0 {
        return (0, 0);
    }
    let packed = |len: usize| match bits {
        QuantBits::Int8 => len,
        QuantBits::Int4 => (len / g) * (g / 2) + (len % g).div_ceil(2),
    };
    match axis {
        QuantAxis::PerToken => {
            let lines = geo.slabs * geo.rows;
            (lines * geo.cols.div_ceil(g), lines * packed(geo.cols))
        }
        QuantAxis::PerChannel => (
            geo.slabs * geo.rows.div_ceil(g) * geo.cols,
            geo.slabs * geo.cols * packed(geo.rows),
        ),
    }
}

impl GroupQuant {
    /// A validated quantizer.
    pub fn new(
        bits: QuantBits,
        symmetric: bool,
        group_size: usize,
        axis: QuantAxis,
    ) -> Result<Self> {
        if !(2..=MAX_GROUP).contains(&group_size) || group_size % 2 != 0 {
            return Err(CompressError::config(
                "group_size",
                format!("{group_size}: must be even and within 2..={MAX_GROUP}"),
            ));
        }
        Ok(GroupQuant {
            bits,
            symmetric,
            group_size,
            axis,
        })
    }

    /// Nominal bits per value with f16 parameters, ignoring the header and
    /// ragged last groups.
    pub fn bits_per_value(&self) -> f64 {
        let params = if self.symmetric { 16.0 } else { 32.0 };
        self.bits.bits() as f64 + params / self.group_size as f64
    }

    fn flags(&self, f32_params: bool) -> u8 {
        let mut f = 0;
        if self.symmetric {
            f |= FLAG_SYMMETRIC;
        }
        if self.axis == QuantAxis::PerChannel {
            f |= FLAG_PER_CHANNEL;
        }
        if f32_params {
            f |= FLAG_F32_PARAMS;
        }
        f
    }

    fn id_of(bits: QuantBits) -> CodecId {
        match bits {
            QuantBits::Int8 => ids::INT8,
            QuantBits::Int4 => ids::INT4,
        }
    }

    fn label(bits: QuantBits) -> &'static str {
        match bits {
            QuantBits::Int8 => "int8",
            QuantBits::Int4 => "int4",
        }
    }

    /// Scale and minimum of a group spanning `[mn, mx]`, rounded to what is stored.
    #[inline(always)]
    fn group_params(&self, mn: f32, mx: f32, f16_params: bool) -> (f32, f32) {
        let qmax = self.bits.max_code();
        if self.symmetric {
            let half_codes = (1u32 << (self.bits.bits() - 1)) as f32;
            let amax = if -mn > mx { -mn } else { mx };
            let mut s = amax / (half_codes - 1.0);
            if f16_params {
                s = f16_up(s);
            }
            (s, -half_codes * s)
        } else {
            let lo = if f16_params { f16_down(mn) } else { mn };
            let mut s = (mx - lo) / qmax;
            if f16_params {
                s = f16_up(s);
            }
            (s, lo)
        }
    }

    /// Appends the encoding to `bytes` and returns its error statistics.
    pub(crate) fn encode_stats(
        &self,
        values: &[f32],
        shape: &[usize],
        bytes: &mut Vec<u8>,
    ) -> Result<ErrStats> {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above.
            return unsafe { self.encode_stats_avx2(values, shape, bytes) };
        }
        self.encode_stats_impl(values, shape, bytes)
    }

    /// The same loops compiled for AVX2 (8 lanes, byte shuffles that SSE2 lacks).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn encode_stats_avx2(
        &self,
        values: &[f32],
        shape: &[usize],
        bytes: &mut Vec<u8>,
    ) -> Result<ErrStats> {
        self.encode_stats_impl(values, shape, bytes)
    }

    #[inline(always)]
    fn encode_stats_impl(
        &self,
        values: &[f32],
        shape: &[usize],
        bytes: &mut Vec<u8>,
    ) -> Result<ErrStats> {
        let n = check_len(shape, values.len(), "values")?;
        let label = Self::label(self.bits);
        let amax = scan_finite(values, label)?;
        let f16_params = amax == 0.0 || (F16_PARAM_RANGE.0..=F16_PARAM_RANGE.1).contains(&amax);
        let geo = Geometry::of(shape, n);
        let g = self.group_size;
        let (groups, code_bytes) = layout(self.axis, self.bits, g, geo);
        let mut scales = Vec::with_capacity(groups);
        let mut mins = Vec::with_capacity(if self.symmetric { 0 } else { groups });
        let width = if f16_params { 2 } else { 4 };
        let params = if self.symmetric { groups } else { 2 * groups };
        bytes.reserve(header_len(shape.len()) + 6 + code_bytes + width * params);
        write_header(bytes, Self::id_of(self.bits), shape);
        bytes.push(self.bits.bits() as u8);
        bytes.push(self.flags(!f16_params));
        bytes.extend_from_slice(&(g as u32).to_le_bytes());
        // The codes are written in place; the parameters follow them.
        let codes_start = bytes.len();
        bytes.resize(codes_start + code_bytes, 0);
        let codes = &mut bytes[codes_start..];
        let mut stats = ErrStats::default();
        let mut lanes = ErrLanes::default();
        let qmax = self.bits.max_code();
        if n > 0 {
            match self.axis {
                QuantAxis::PerToken => {
                    // Parameters are spread over the row so that one
                    // vectorized loop quantizes the whole row.
                    let cols = geo.cols;
                    let mut lov = vec![0f32; cols];
                    let mut sv = vec![0f32; cols];
                    let mut invv = vec![0f32; cols];
                    let mut qrow = vec![
                        0u8;
                        if self.bits == QuantBits::Int4 {
                            cols
                        } else {
                            0
                        }
                    ];
                    let mut at = 0;
                    for row in values.chunks_exact(cols) {
                        for (((grp, l), sc), iv) in row
                            .chunks(g)
                            .zip(lov.chunks_mut(g))
                            .zip(sv.chunks_mut(g))
                            .zip(invv.chunks_mut(g))
                        {
                            let (mn, mx) = min_max(grp);
                            let (s, lo) = self.group_params(mn, mx, f16_params);
                            scales.push(s);
                            if !self.symmetric {
                                mins.push(lo);
                            }
                            l.fill(lo);
                            sc.fill(s);
                            iv.fill(if s > 0.0 { 1.0 / s } else { 0.0 });
                        }
                        match self.bits {
                            QuantBits::Int8 => {
                                let q = &mut codes[at..at + cols];
                                quantize_vector(row, &lov, &sv, &invv, qmax, q, &mut lanes);
                                at += cols;
                            }
                            QuantBits::Int4 => {
                                quantize_vector(row, &lov, &sv, &invv, qmax, &mut qrow, &mut lanes);
                                for grp in qrow.chunks(g) {
                                    let packed = grp.len().div_ceil(2);
                                    pack_halves(grp, &mut codes[at..at + packed]);
                                    at += packed;
                                }
                            }
                        }
                        stats.merge(lanes.flush());
                    }
                }
                QuantAxis::PerChannel => {
                    let cols = geo.cols;
                    let mut mn = vec![0f32; cols];
                    let mut mx = vec![0f32; cols];
                    let mut sv = vec![0f32; cols];
                    let mut lov = vec![0f32; cols];
                    let mut invv = vec![0f32; cols];
                    let mut scratch = vec![
                        0u8;
                        if self.bits == QuantBits::Int4 {
                            g * cols
                        } else {
                            0
                        }
                    ];
                    let mut at = 0;
                    for slab in values.chunks_exact(geo.rows * cols) {
                        for tile in slab.chunks(g * cols) {
                            let tile_rows = tile.len() / cols;
                            column_min_max(tile, cols, &mut mn, &mut mx);
                            for c in 0..cols {
                                let (s, lo) = self.group_params(mn[c], mx[c], f16_params);
                                sv[c] = s;
                                lov[c] = lo;
                                invv[c] = if s > 0.0 { 1.0 / s } else { 0.0 };
                            }
                            scales.extend_from_slice(&sv);
                            if !self.symmetric {
                                mins.extend_from_slice(&lov);
                            }
                            match self.bits {
                                QuantBits::Int8 => {
                                    for (row, q) in tile
                                        .chunks_exact(cols)
                                        .zip(codes[at..at + tile.len()].chunks_exact_mut(cols))
                                    {
                                        quantize_vector(row, &lov, &sv, &invv, qmax, q, &mut lanes);
                                    }
                                    at += tile.len();
                                }
                                QuantBits::Int4 => {
                                    let q = &mut scratch[..tile.len()];
                                    for (row, qr) in
                                        tile.chunks_exact(cols).zip(q.chunks_exact_mut(cols))
                                    {
                                        quantize_vector(
                                            row, &lov, &sv, &invv, qmax, qr, &mut lanes,
                                        );
                                    }
                                    let pairs = tile_rows.div_ceil(2);
                                    let out = &mut codes[at..at + pairs * cols];
                                    pack_row_halves(q, cols, tile_rows, out);
                                    at += pairs * cols;
                                }
                            }
                            stats.merge(lanes.flush());
                        }
                    }
                }
            }
        }
        for list in [&scales, &mins] {
            if f16_params {
                let mut words = vec![0u16; list.len()];
                crate::float::HalfFloat::to_bits(crate::float::HalfKind::F16, list, &mut words);
                for w in words {
                    bytes.extend_from_slice(&w.to_le_bytes());
                }
            } else {
                crate::format::put_f32s(bytes, list);
            }
        }
        Ok(stats)
    }

    /// Checks an int8/int4 encoding and reads its parameters.
    fn parse<'a>(id: CodecId, bytes: &'a [u8], shape: &[usize], n: usize) -> Result<Parsed<'a>> {
        let bits = if id == ids::INT8 {
            QuantBits::Int8
        } else {
            QuantBits::Int4
        };
        let label = Self::label(bits);
        let mut r = Reader::open(bytes, label, id, shape)?;
        let stored_bits = r.u8()?;
        if stored_bits as u32 != bits.bits() {
            return Err(r.err(format!("{stored_bits} bits stored under the {label} id")));
        }
        let flags = r.u8()?;
        if flags & !(FLAG_SYMMETRIC | FLAG_PER_CHANNEL | FLAG_F32_PARAMS) != 0 {
            return Err(r.err(format!("unknown flags {flags:#x}")));
        }
        let g = r.u32()? as usize;
        let axis = if flags & FLAG_PER_CHANNEL != 0 {
            QuantAxis::PerChannel
        } else {
            QuantAxis::PerToken
        };
        let quant = GroupQuant::new(bits, flags & FLAG_SYMMETRIC != 0, g, axis)
            .map_err(|e| r.err(format!("group size: {e}")))?;
        let geo = Geometry::of(shape, n);
        let (groups, code_bytes) = layout(axis, bits, g, geo);
        let width = if flags & FLAG_F32_PARAMS != 0 { 4 } else { 2 };
        let codes = r.take(code_bytes)?;
        let scales = read_params(r.take_items(groups, width)?, width);
        let mins = if quant.symmetric {
            let half_codes = (1u32 << (bits.bits() - 1)) as f32;
            scales.iter().map(|s| -half_codes * s).collect()
        } else {
            read_params(r.take_items(groups, width)?, width)
        };
        r.finish()?;
        Ok(Parsed {
            quant,
            geo,
            codes,
            scales,
            mins,
        })
    }

    /// Decodes int8 or int4 bytes; every parameter comes from the bytes.
    pub(crate) fn decode_bytes(
        id: CodecId,
        bytes: &[u8],
        shape: &[usize],
        out: &mut [f32],
    ) -> Result<()> {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above.
            return unsafe { Self::decode_bytes_avx2(id, bytes, shape, out) };
        }
        Self::decode_bytes_impl(id, bytes, shape, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn decode_bytes_avx2(
        id: CodecId,
        bytes: &[u8],
        shape: &[usize],
        out: &mut [f32],
    ) -> Result<()> {
        Self::decode_bytes_impl(id, bytes, shape, out)
    }

    #[inline(always)]
    fn decode_bytes_impl(
        id: CodecId,
        bytes: &[u8],
        shape: &[usize],
        out: &mut [f32],
    ) -> Result<()> {
        let n = check_len(shape, out.len(), "output buffer")?;
        let Parsed {
            quant: q,
            geo,
            codes,
            scales,
            mins,
        } = Self::parse(id, bytes, shape, n)?;
        let (bits, axis, g) = (q.bits, q.axis, q.group_size);
        if n == 0 {
            return Ok(());
        }
        match axis {
            QuantAxis::PerToken => {
                let mut at = 0;
                let mut gi = 0;
                for row in out.chunks_exact_mut(geo.cols) {
                    for grp in row.chunks_mut(g) {
                        let (s, lo) = (scales[gi], mins[gi]);
                        gi += 1;
                        let len = grp.len();
                        match bits {
                            QuantBits::Int8 => {
                                dequantize_scalar(&codes[at..at + len], lo, s, grp);
                                at += len;
                            }
                            QuantBits::Int4 => {
                                let packed = len.div_ceil(2);
                                unpack_halves(&codes[at..at + packed], lo, s, grp);
                                at += packed;
                            }
                        }
                    }
                }
            }
            QuantAxis::PerChannel => {
                let cols = geo.cols;
                let mut at = 0;
                let mut pi = 0;
                for slab in out.chunks_exact_mut(geo.rows * cols) {
                    for tile in slab.chunks_mut(g * cols) {
                        let tile_rows = tile.len() / cols;
                        let sv = &scales[pi..pi + cols];
                        let lov = &mins[pi..pi + cols];
                        pi += cols;
                        match bits {
                            QuantBits::Int8 => {
                                let len = tile.len();
                                for (row, c) in tile
                                    .chunks_exact_mut(cols)
                                    .zip(codes[at..at + len].chunks_exact(cols))
                                {
                                    dequantize_vector(c, lov, sv, row);
                                }
                                at += len;
                            }
                            QuantBits::Int4 => {
                                let pairs = tile_rows.div_ceil(2);
                                unpack_row_halves(
                                    &codes[at..at + pairs * cols],
                                    lov,
                                    sv,
                                    cols,
                                    tile_rows,
                                    tile,
                                );
                                at += pairs * cols;
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

impl Codec for GroupQuant {
    fn id(&self) -> CodecId {
        Self::id_of(self.bits)
    }

    fn name(&self) -> String {
        format!(
            "{}-g{}-{}-{}",
            Self::label(self.bits),
            self.group_size,
            if self.symmetric { "sym" } else { "asym" },
            match self.axis {
                QuantAxis::PerToken => "tok",
                QuantAxis::PerChannel => "chan",
            }
        )
    }

    fn is_lossless(&self) -> bool {
        false
    }

    fn encode(&self, values: &[f32], shape: &[usize]) -> qvl_core::Result<Encoded> {
        let mut bytes = Vec::new();
        let stats = self.encode_stats(values, shape, &mut bytes)?;
        Ok(Encoded {
            codec: self.id(),
            shape: shape.to_vec(),
            report: stats.report(4 * values.len(), bytes.len()),
            bytes,
        })
    }

    fn decode(&self, bytes: &[u8], shape: &[usize], out: &mut [f32]) -> qvl_core::Result<()> {
        Ok(Self::decode_bytes(self.id(), bytes, shape, out)?)
    }
}

#[inline(always)]
fn read_params(bytes: &[u8], width: usize) -> Vec<f32> {
    if width == 2 {
        bytes
            .chunks_exact(2)
            .map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
            .collect()
    } else {
        bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }
}

/// Smallest f16 not below `x` (x finite, within f16 range).
#[inline(always)]
fn f16_up(x: f32) -> f32 {
    let a = x.abs();
    if (F16_NORMAL_MIN..=F16_MAX).contains(&a) {
        // Normal f16 range: f16 numbers are the f32 numbers whose low 13
        // mantissa bits are zero, so rounding is a mask.
        let bits = x.to_bits();
        let rounded = if x > 0.0 {
            if bits & 0x1fff != 0 {
                (bits | 0x1fff) + 1
            } else {
                bits
            }
        } else {
            bits & !0x1fff
        };
        return f32::from_bits(rounded);
    }
    f16_up_slow(x)
}

const F16_NORMAL_MIN: f32 = 6.103_515_6e-5;
const F16_MAX: f32 = 65_504.0;

#[inline(never)]
fn f16_up_slow(x: f32) -> f32 {
    let h = f16::from_f32(x);
    if h.to_f32() >= x {
        return h.to_f32();
    }
    let bits = h.to_bits();
    let next = if bits & 0x7fff == 0 {
        1
    } else if bits & 0x8000 == 0 {
        bits + 1
    } else {
        bits - 1
    };
    f16::from_bits(next).to_f32()
}

/// Largest f16 not above `x`.
#[inline(always)]
fn f16_down(x: f32) -> f32 {
    -f16_up(-x)
}

#[inline(always)]
fn min_max(x: &[f32]) -> (f32, f32) {
    let mut mn = [f32::INFINITY; LANES];
    let mut mx = [f32::NEG_INFINITY; LANES];
    let mut c = x.chunks_exact(LANES);
    for xs in &mut c {
        for i in 0..LANES {
            mn[i] = mn[i].min(xs[i]);
            mx[i] = mx[i].max(xs[i]);
        }
    }
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for i in 0..LANES {
        lo = lo.min(mn[i]);
        hi = hi.max(mx[i]);
    }
    for &v in c.remainder() {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    (lo, hi)
}

/// Per-column minimum and maximum of the rows of `tile`.
#[inline(always)]
fn column_min_max(tile: &[f32], cols: usize, mn: &mut [f32], mx: &mut [f32]) {
    let mut rows = tile.chunks_exact(cols);
    if let Some(first) = rows.next() {
        mn.copy_from_slice(first);
        mx.copy_from_slice(first);
    }
    for row in rows {
        for ((a, b), &x) in mn.iter_mut().zip(mx.iter_mut()).zip(row) {
            *a = if x < *a { x } else { *a };
            *b = if x > *b { x } else { *b };
        }
    }
}

/// Code of `x`: round((x - lo) * inv) clamped to [0, qmax].
#[inline(always)]
fn code_of(x: f32, lo: f32, inv: f32, qmax: f32) -> (f32, u8) {
    let t = (x - lo) * inv;
    let t = if t > 0.0 { t } else { 0.0 };
    let t = if t < qmax { t } else { qmax };
    let m = t + ROUND_MAGIC;
    (m - ROUND_MAGIC, (m.to_bits() & 0xff) as u8)
}

/// Quantizes a row with one scale per column; accumulates the error.
#[inline(always)]
fn quantize_vector(
    x: &[f32],
    lo: &[f32],
    s: &[f32],
    inv: &[f32],
    qmax: f32,
    q: &mut [u8],
    acc: &mut ErrLanes,
) {
    let n = x
        .len()
        .min(lo.len())
        .min(s.len())
        .min(inv.len())
        .min(q.len());
    let (x, lo, s, inv, q) = (&x[..n], &lo[..n], &s[..n], &inv[..n], &mut q[..n]);
    let mut lanes = ErrLanes::default();
    let full = n - n % LANES;
    let mut b = 0;
    while b < full {
        let (xs, ls, ss, is) = (
            &x[b..b + LANES],
            &lo[b..b + LANES],
            &s[b..b + LANES],
            &inv[b..b + LANES],
        );
        let qs = &mut q[b..b + LANES];
        for i in 0..LANES {
            let (r, code) = code_of(xs[i], ls[i], is[i], qmax);
            qs[i] = code;
            lanes.add(i, xs[i], xs[i] - (r * ss[i] + ls[i]));
        }
        b += LANES;
    }
    for i in full..n {
        let (r, code) = code_of(x[i], lo[i], inv[i], qmax);
        q[i] = code;
        lanes.add(i - full, x[i], x[i] - (r * s[i] + lo[i]));
    }
    acc.absorb(&lanes);
}

/// Packs codes `j` and `j + ceil(len/2)` into byte `j`.
#[inline(always)]
fn pack_halves(q: &[u8], out: &mut [u8]) {
    let h = q.len().div_ceil(2);
    let (a, b) = q.split_at(h);
    for ((o, &lo), &hi) in out.iter_mut().zip(a).zip(b) {
        *o = lo | (hi << 4);
    }
    if a.len() > b.len() {
        if let (Some(o), Some(&lo)) = (out.get_mut(h - 1), a.last()) {
            *o = lo;
        }
    }
}

/// Packs row `i` and row `i + ceil(rows/2)` of a `[rows, cols]` code tile.
#[inline(always)]
fn pack_row_halves(q: &[u8], cols: usize, rows: usize, out: &mut [u8]) {
    let h = rows.div_ceil(2);
    let (a, b) = q.split_at(h * cols);
    for ((o, ar), br) in out
        .chunks_exact_mut(cols)
        .zip(a.chunks_exact(cols))
        .zip(b.chunks_exact(cols))
    {
        for ((o, &lo), &hi) in o.iter_mut().zip(ar).zip(br) {
            *o = lo | (hi << 4);
        }
    }
    if rows % 2 == 1 {
        let last = (h - 1) * cols;
        out[last..last + cols].copy_from_slice(&a[last..last + cols]);
    }
}

#[inline(always)]
fn dequantize_scalar(q: &[u8], lo: f32, s: f32, out: &mut [f32]) {
    for (o, &c) in out.iter_mut().zip(q) {
        *o = c as f32 * s + lo;
    }
}

#[inline(always)]
fn dequantize_vector(q: &[u8], lo: &[f32], s: &[f32], out: &mut [f32]) {
    for (((o, &c), &l), &sv) in out.iter_mut().zip(q).zip(lo).zip(s) {
        *o = c as f32 * sv + l;
    }
}

#[inline(always)]
fn unpack_halves(q: &[u8], lo: f32, s: f32, out: &mut [f32]) {
    let h = out.len().div_ceil(2);
    let (a, b) = out.split_at_mut(h);
    for ((oa, ob), &c) in a.iter_mut().zip(b.iter_mut()).zip(q) {
        *oa = (c & 0x0f) as f32 * s + lo;
        *ob = (c >> 4) as f32 * s + lo;
    }
    if a.len() > b.len() {
        if let (Some(o), Some(&c)) = (a.last_mut(), q.get(h - 1)) {
            *o = (c & 0x0f) as f32 * s + lo;
        }
    }
}

#[inline(always)]
fn unpack_row_halves(q: &[u8], lo: &[f32], s: &[f32], cols: usize, rows: usize, out: &mut [f32]) {
    let h = rows.div_ceil(2);
    let (a, b) = out.split_at_mut(h * cols);
    for ((ar, br), qr) in a
        .chunks_exact_mut(cols)
        .zip(b.chunks_exact_mut(cols))
        .zip(q.chunks_exact(cols))
    {
        for ((((oa, ob), &c), &l), &sv) in ar.iter_mut().zip(br.iter_mut()).zip(qr).zip(lo).zip(s) {
            *oa = (c & 0x0f) as f32 * sv + l;
            *ob = (c >> 4) as f32 * sv + l;
        }
    }
    if rows % 2 == 1 {
        let last = (h - 1) * cols;
        for (((o, &c), &l), &sv) in a[last..]
            .iter_mut()
            .zip(&q[last..last + cols])
            .zip(lo)
            .zip(s)
        {
            *o = (c & 0x0f) as f32 * sv + l;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn all_variants() -> Vec<GroupQuant> {
        let mut v = Vec::new();
        for bits in [QuantBits::Int8, QuantBits::Int4] {
            for symmetric in [false, true] {
                for axis in [QuantAxis::PerToken, QuantAxis::PerChannel] {
                    for g in [2, 8, 32] {
                        v.push(GroupQuant::new(bits, symmetric, g, axis).unwrap());
                    }
                }
            }
        }
        v
    }

    #[test]
    fn round_trips_within_bounds_on_ragged_shapes() {
        for shape in [
            vec![7, 13],
            vec![3, 33, 17],
            vec![64, 64],
            vec![5],
            vec![1, 1],
            vec![],
        ] {
            let n: usize = shape.iter().product();
            let x = data(n, n as u32);
            for q in all_variants() {
                let e = q.encode(&x, &shape).unwrap();
                let mut out = vec![0f32; n];
                q.decode(&e.bytes, &shape, &mut out).unwrap();
                let (rel, max) = qvl_core::codec::error_of(&x, &out);
                assert!(
                    (rel - e.report.rel_frobenius).abs() < 1e-5,
                    "{} {shape:?}",
                    q.name()
                );
                assert!(
                    (max - e.report.max_abs).abs() < 1e-5,
                    "{} {shape:?}",
                    q.name()
                );
                let bound = if q.bits == QuantBits::Int8 { 0.01 } else { 0.2 };
                assert!(rel < bound, "{} {shape:?}: rel {rel}", q.name());
                // No value is further than one step from where it was.
                let step = 2.0
                    / if q.bits == QuantBits::Int8 {
                        254.0
                    } else {
                        14.0
                    };
                assert!(max <= step, "{} {shape:?}: max {max}", q.name());
            }
        }
    }

    #[test]
    fn int8_is_accurate_and_int4_is_small() {
        let x = data(128 * 64, 3);
        let i8 = GroupQuant::new(QuantBits::Int8, false, 32, QuantAxis::PerToken).unwrap();
        let i4 = GroupQuant::new(QuantBits::Int4, false, 64, QuantAxis::PerToken).unwrap();
        let e8 = i8.encode(&x, &[128, 64]).unwrap();
        let e4 = i4.encode(&x, &[128, 64]).unwrap();
        assert!(
            e8.report.rel_frobenius < 0.005,
            "{}",
            e8.report.rel_frobenius
        );
        assert!(e4.report.rel_frobenius < 0.1, "{}", e4.report.rel_frobenius);
        assert!(e4.report.rel_frobenius > e8.report.rel_frobenius);
        // 4 bits plus two f16 per 64 values: 4.5 bits, 7.1x smaller than f32.
        assert!(e4.report.ratio() > 7.0, "{}", e4.report.ratio());
        assert!(e8.report.ratio() > 3.5, "{}", e8.report.ratio());
        assert!((i4.bits_per_value() - 4.5).abs() < 1e-12);
    }

    #[test]
    fn per_channel_beats_per_token_on_channel_outliers() {
        // Keys: a few channels carry values 20x larger than the rest.
        let (tokens, channels) = (64, 32);
        let mut x = data(tokens * channels, 9);
        for t in 0..tokens {
            for c in [3, 17] {
                x[t * channels + c] += 20.0;
            }
        }
        let tok = GroupQuant::new(QuantBits::Int4, false, 32, QuantAxis::PerToken).unwrap();
        let chan = GroupQuant::new(QuantBits::Int4, false, 32, QuantAxis::PerChannel).unwrap();
        let et = tok.encode(&x, &[tokens, channels]).unwrap();
        let ec = chan.encode(&x, &[tokens, channels]).unwrap();
        assert!(
            ec.report.rel_frobenius < et.report.rel_frobenius / 3.0,
            "chan {} tok {}",
            ec.report.rel_frobenius,
            et.report.rel_frobenius
        );
    }

    #[test]
    fn wide_ranges_use_f32_parameters_and_constants_are_exact() {
        let x: Vec<f32> = (0..64).map(|i| i as f32 * 1e5).collect();
        let q = GroupQuant::new(QuantBits::Int8, false, 16, QuantAxis::PerToken).unwrap();
        let e = q.encode(&x, &[64]).unwrap();
        assert!(e.report.rel_frobenius < 0.01);
        let c = vec![0.75f32; 40];
        let e = q.encode(&c, &[40]).unwrap();
        assert_eq!(e.report.max_abs, 0.0);
        let z = vec![0f32; 40];
        let e = GroupQuant::new(QuantBits::Int4, true, 8, QuantAxis::PerChannel)
            .unwrap()
            .encode(&z, &[5, 8])
            .unwrap();
        assert_eq!(e.report.max_abs, 0.0);
    }

    #[test]
    fn rows_dequantize_one_at_a_time() {
        let x = data(9 * 70, 5);
        for bits in [QuantBits::Int8, QuantBits::Int4] {
            let q = GroupQuant::new(bits, false, 32, QuantAxis::PerToken).unwrap();
            let e = q.encode(&x, &[3, 3, 70]).unwrap();
            let mut whole = vec![0f32; x.len()];
            q.decode(&e.bytes, &[3, 3, 70], &mut whole).unwrap();
            let rows = QuantizedRows::parse(&e.bytes, &[3, 3, 70]).unwrap();
            assert_eq!((rows.rows(), rows.cols()), (9, 70));
            let mut row = vec![0f32; 70];
            for r in (0..9).rev() {
                rows.dequantize_row(r, &mut row).unwrap();
                assert_eq!(row, whole[r * 70..(r + 1) * 70], "{bits:?} row {r}");
            }
            assert!(rows.dequantize_row(9, &mut row).is_err());
            assert!(rows.dequantize_row(0, &mut row[..69]).is_err());
        }
        let chan = GroupQuant::new(QuantBits::Int4, false, 8, QuantAxis::PerChannel).unwrap();
        let e = chan.encode(&x, &[9, 70]).unwrap();
        assert!(QuantizedRows::parse(&e.bytes, &[9, 70]).is_err());
    }

    #[test]
    fn bad_input_and_bytes_are_errors() {
        let q = GroupQuant::new(QuantBits::Int4, false, 8, QuantAxis::PerChannel).unwrap();
        assert!(q.encode(&[1.0, f32::NAN], &[2]).is_err());
        assert!(q.encode(&[1.0; 5], &[2, 3]).is_err());
        assert!(GroupQuant::new(QuantBits::Int4, false, 7, QuantAxis::PerToken).is_err());
        assert!(GroupQuant::new(QuantBits::Int4, false, 0, QuantAxis::PerToken).is_err());
        let x = data(48, 1);
        let e = q.encode(&x, &[6, 8]).unwrap();
        let mut out = vec![0f32; 48];
        for cut in 0..e.bytes.len() {
            assert!(
                q.decode(&e.bytes[..cut], &[6, 8], &mut out).is_err(),
                "cut {cut}"
            );
        }
        let mut longer = e.bytes.clone();
        longer.push(0);
        assert!(q.decode(&longer, &[6, 8], &mut out).is_err());
        assert!(q.decode(&e.bytes, &[8, 6], &mut out).is_err());
        assert!(q.decode(&e.bytes, &[6, 8], &mut out[..40]).is_err());
        // Corrupt the group size and flags.
        let hdr = header_len(2);
        let mut bad = e.bytes.clone();
        bad[hdr + 2] = 3;
        assert!(q.decode(&bad, &[6, 8], &mut out).is_err());
        let mut bad = e.bytes.clone();
        bad[hdr + 1] = 0x80;
        assert!(q.decode(&bad, &[6, 8], &mut out).is_err());
        let mut bad = e.bytes.clone();
        bad[hdr] = 8;
        assert!(q.decode(&bad, &[6, 8], &mut out).is_err());
    }
}
