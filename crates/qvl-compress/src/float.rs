//! Lossless f32 and the 16-bit float conversions (f16, bf16).

use crate::error::{CompressError, Result};
use crate::format::{check_len, get_f32s, header_len, put_f32s, write_header, Reader};
use crate::ids;
use crate::stats::ErrStats;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use half::{bf16, f16};
use qvl_core::{Codec, CodecId, Encoded};

/// f32 kept as is, behind the common header. What the selector uses for
/// critical layers.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExactF32;

impl ExactF32 {
    pub(crate) fn decode_bytes(bytes: &[u8], shape: &[usize], out: &mut [f32]) -> Result<()> {
        let n = check_len(shape, out.len(), "output buffer")?;
        let mut r = Reader::open(bytes, "exact-f32", ids::EXACT_F32, shape)?;
        let payload = r.take_items(n, 4)?;
        r.finish()?;
        get_f32s(payload, out);
        Ok(())
    }
}

impl Codec for ExactF32 {
    fn id(&self) -> CodecId {
        ids::EXACT_F32
    }
    fn name(&self) -> String {
        "exact-f32".into()
    }
    fn is_lossless(&self) -> bool {
        true
    }
    fn encode(&self, values: &[f32], shape: &[usize]) -> qvl_core::Result<Encoded> {
        let n = check_len(shape, values.len(), "values")?;
        let mut bytes = Vec::with_capacity(header_len(shape.len()) + 4 * n);
        write_header(&mut bytes, ids::EXACT_F32, shape);
        put_f32s(&mut bytes, values);
        let report = ErrStats::exact(values).report(4 * n, bytes.len());
        Ok(Encoded {
            codec: ids::EXACT_F32,
            shape: shape.to_vec(),
            bytes,
            report,
        })
    }
    fn decode(&self, bytes: &[u8], shape: &[usize], out: &mut [f32]) -> qvl_core::Result<()> {
        Ok(Self::decode_bytes(bytes, shape, out)?)
    }
}

/// Which 16-bit float format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HalfKind {
    /// IEEE half: 10-bit mantissa, range up to 65504.
    F16,
    /// bfloat16: 7-bit mantissa, the range of f32.
    Bf16,
}

/// Conversion to f16 or bf16 (round to nearest even), the cheap 2x codec
/// and the baseline storage that the quantizers are compared with.
#[derive(Debug, Clone, Copy)]
pub struct HalfFloat {
    /// Target format.
    pub kind: HalfKind,
}

impl HalfFloat {
    /// f16 conversion.
    pub fn f16() -> Self {
        HalfFloat {
            kind: HalfKind::F16,
        }
    }
    /// bf16 conversion.
    pub fn bf16() -> Self {
        HalfFloat {
            kind: HalfKind::Bf16,
        }
    }

    fn id_of(kind: HalfKind) -> CodecId {
        match kind {
            HalfKind::F16 => ids::F16,
            HalfKind::Bf16 => ids::BF16,
        }
    }

    fn label(kind: HalfKind) -> &'static str {
        match kind {
            HalfKind::F16 => "f16",
            HalfKind::Bf16 => "bf16",
        }
    }

    /// Converts `values` to 16-bit words, round to nearest even (SIMD
    /// through `half` where the CPU has F16C). Converts as many as the
    /// shorter of the two slices holds.
    pub fn to_bits(kind: HalfKind, values: &[f32], words: &mut [u16]) {
        let n = values.len().min(words.len());
        let (values, words) = (&values[..n], &mut words[..n]);
        match kind {
            HalfKind::F16 => {
                let dst: &mut [f16] = words.reinterpret_cast_mut();
                dst.convert_from_f32_slice(values);
            }
            HalfKind::Bf16 => {
                let dst: &mut [bf16] = words.reinterpret_cast_mut();
                dst.convert_from_f32_slice(values);
            }
        }
    }

    /// Converts 16-bit words back to f32, as many as the shorter slice holds.
    pub fn from_bits(kind: HalfKind, words: &[u16], out: &mut [f32]) {
        let n = words.len().min(out.len());
        let (words, out) = (&words[..n], &mut out[..n]);
        match kind {
            HalfKind::F16 => {
                let src: &[f16] = words.reinterpret_cast();
                src.convert_to_f32_slice(out);
            }
            HalfKind::Bf16 => {
                let src: &[bf16] = words.reinterpret_cast();
                src.convert_to_f32_slice(out);
            }
        }
    }

    pub(crate) fn decode_kind(
        kind: HalfKind,
        bytes: &[u8],
        shape: &[usize],
        out: &mut [f32],
    ) -> Result<()> {
        let label = Self::label(kind);
        let n = check_len(shape, out.len(), "output buffer")?;
        let mut r = Reader::open(bytes, label, Self::id_of(kind), shape)?;
        let payload = r.take_items(n, 2)?;
        r.finish()?;
        let words: Vec<u16> = payload
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect();
        Self::from_bits(kind, &words, out);
        Ok(())
    }
}

/// Appends 16-bit words as little-endian bytes.
fn words_to_le_bytes(words: &[u16], out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + 2 * words.len(), 0);
    for (dst, w) in out[start..].chunks_exact_mut(2).zip(words) {
        dst.copy_from_slice(&w.to_le_bytes());
    }
}

impl Codec for HalfFloat {
    fn id(&self) -> CodecId {
        Self::id_of(self.kind)
    }
    fn name(&self) -> String {
        Self::label(self.kind).into()
    }
    fn is_lossless(&self) -> bool {
        false
    }
    fn encode(&self, values: &[f32], shape: &[usize]) -> qvl_core::Result<Encoded> {
        let n = check_len(shape, values.len(), "values")?;
        let mut words = vec![0u16; n];
        Self::to_bits(self.kind, values, &mut words);
        let mut back = vec![0f32; n];
        Self::from_bits(self.kind, &words, &mut back);
        let mut bytes = Vec::with_capacity(header_len(shape.len()) + 2 * n);
        write_header(&mut bytes, self.id(), shape);
        words_to_le_bytes(&words, &mut bytes);
        let report = ErrStats::between(values, &back).report(4 * n, bytes.len());
        if !report.rel_frobenius.is_finite() && values.iter().all(|v| v.is_finite()) {
            // f16 overflows above 65504: say so instead of storing infinities.
            return Err(CompressError::Unrepresentable {
                codec: Self::label(self.kind),
                reason: format!(
                    "values outside the format's range (max |x| {})",
                    values.iter().fold(0f32, |a, v| a.max(v.abs()))
                ),
            }
            .into());
        }
        Ok(Encoded {
            codec: self.id(),
            shape: shape.to_vec(),
            bytes,
            report,
        })
    }
    fn decode(&self, bytes: &[u8], shape: &[usize], out: &mut [f32]) -> qvl_core::Result<()> {
        Ok(Self::decode_kind(self.kind, bytes, shape, out)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_round_trips_bit_for_bit() {
        let v: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin() * 1e3).collect();
        let e = ExactF32.encode(&v, &[5, 10]).unwrap();
        assert_eq!(e.report.rel_frobenius, 0.0);
        let mut out = vec![0f32; 50];
        ExactF32.decode(&e.bytes, &[5, 10], &mut out).unwrap();
        assert_eq!(out, v);
        assert!(ExactF32
            .decode(&e.bytes[..e.bytes.len() - 1], &[5, 10], &mut out)
            .is_err());
    }

    #[test]
    fn half_formats_are_close_and_half_the_size() {
        let v: Vec<f32> = (0..64).map(|i| (i as f32 * 0.11).cos() * 3.0).collect();
        for codec in [HalfFloat::f16(), HalfFloat::bf16()] {
            let e = codec.encode(&v, &[64]).unwrap();
            assert!(e.report.ratio() > 1.8, "{}", codec.name());
            let bound = if codec.kind == HalfKind::F16 {
                1e-3
            } else {
                8e-3
            };
            assert!(e.report.rel_frobenius < bound, "{}", codec.name());
            let mut out = vec![0f32; 64];
            codec.decode(&e.bytes, &[64], &mut out).unwrap();
            let (rel, _) = qvl_core::codec::error_of(&v, &out);
            assert!((rel - e.report.rel_frobenius).abs() < 1e-9);
        }
        assert!(HalfFloat::f16().encode(&[1e6], &[1]).is_err());
        assert!(HalfFloat::bf16().encode(&[1e6], &[1]).is_ok());
    }
}
