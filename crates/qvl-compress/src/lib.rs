//! # qvl-compress
//!
//! Codecs for f32 tensors behind [`qvl_core::Codec`], each reporting its
//! compression ratio and error, and a [`Selector`] that picks the smallest
//! encoding within an error budget per tensor kind and layer.
//!
//! | codec | id | what |
//! |---|---|---|
//! | [`ExactF32`] | [`ids::EXACT_F32`] | f32 as is (critical layers) |
//! | [`HalfFloat`] | [`ids::F16`], [`ids::BF16`] | 16-bit floats |
//! | [`GroupQuant`] | [`ids::INT8`], [`ids::INT4`] | group-wise int8/int4, symmetric or asymmetric, per token or per channel; [`QuantizedRows`] dequantizes single rows (matmul tiles) |
//! | [`KvBlockCodec`] | [`ids::KV_BLOCK`] | KIVI: quantized middle, exact sink and recent tokens |
//! | [`LowRank`] | [`ids::LOW_RANK`] | truncated SVD (faer) |
//! | [`SparseTopK`] | [`ids::SPARSE`] | magnitude top-k in CSR |
//! | [`ZstdStage`] | [`ids::ZSTD`] | zstd over any codec (SSD tier) |
//!
//! Every encoding starts with a self-describing header (magic, version,
//! codec id, shape) followed by its parameters, so [`decode_any`] can decode
//! bytes without knowing the codec's settings, and decoding malformed bytes
//! returns an error, never a panic.
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
// The kernels index fixed-size lane arrays (`for i in 0..LANES`): that form
// is what the compiler turns into SIMD, so the iterator rewrite is not wanted.
#![allow(clippy::needless_range_loop)]

mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
mod error;
mod float;
mod format;
mod kv;
mod lossless;
mod lowrank;
mod quant;
mod selector;
mod sparse;
mod stats;

pub use config::{CompressionConfig, Method};
pub use error::{CompressError, Result};
pub use float::{ExactF32, HalfFloat, HalfKind};
pub use kv::{kivi_keys, kivi_values, ExactStorage, KvBlockCodec, TokenSpan};
pub use lossless::ZstdStage;
#[cfg(feature = "nalgebra-baseline")]
pub use lowrank::baseline;
pub use lowrank::{FactorStorage, LowRank, RankRule};
pub use quant::{GroupQuant, QuantAxis, QuantBits, QuantizedRows};
pub use selector::{Candidate, KvPart, Selection, Selector, Target};
pub use sparse::SparseTopK;

use qvl_core::CodecId;

/// The stable codec ids of this crate. Once given out, an id keeps its
/// meaning on disk; new codecs take new numbers.
pub mod ids {
    use qvl_core::CodecId;

    /// f32 behind the common header.
    pub const EXACT_F32: CodecId = CodecId(1);
    /// IEEE f16.
    pub const F16: CodecId = CodecId(2);
    /// bfloat16.
    pub const BF16: CodecId = CodecId(3);
    /// Group-wise int8.
    pub const INT8: CodecId = CodecId(4);
    /// Group-wise int4.
    pub const INT4: CodecId = CodecId(5);
    /// KV block: quantized middle, exact sink and recent tokens.
    pub const KV_BLOCK: CodecId = CodecId(6);
    /// Truncated SVD.
    pub const LOW_RANK: CodecId = CodecId(7);
    /// Magnitude top-k in CSR.
    pub const SPARSE: CodecId = CodecId(8);
    /// zstd over another encoding.
    pub const ZSTD: CodecId = CodecId(9);
}

/// Decodes bytes made by any codec of this crate, reading the codec and its
/// parameters from the header; returns the codec id found.
pub fn decode_any(bytes: &[u8], shape: &[usize], out: &mut [f32]) -> Result<CodecId> {
    decode_nested(bytes, shape, out, 0)
}

/// The codec id written in an encoding's header.
pub fn codec_of(bytes: &[u8]) -> Result<CodecId> {
    format::peek_codec(bytes)
}

pub(crate) fn decode_nested(
    bytes: &[u8],
    shape: &[usize],
    out: &mut [f32],
    depth: usize,
) -> Result<CodecId> {
    let id = format::peek_codec(bytes)?;
    match id {
        ids::EXACT_F32 => ExactF32::decode_bytes(bytes, shape, out)?,
        ids::F16 => HalfFloat::decode_kind(HalfKind::F16, bytes, shape, out)?,
        ids::BF16 => HalfFloat::decode_kind(HalfKind::Bf16, bytes, shape, out)?,
        ids::INT8 | ids::INT4 => GroupQuant::decode_bytes(id, bytes, shape, out)?,
        ids::KV_BLOCK => KvBlockCodec::decode_bytes(bytes, shape, out)?,
        ids::LOW_RANK => LowRank::decode_bytes(bytes, shape, out)?,
        ids::SPARSE => SparseTopK::decode_bytes(bytes, shape, out)?,
        ids::ZSTD => ZstdStage::decode_bytes(bytes, shape, out, depth)?,
        CodecId(other) => return Err(CompressError::UnknownCodec(other)),
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use qvl_core::Codec;
    use std::sync::Arc;

    fn every_codec() -> Vec<Arc<dyn Codec>> {
        let q4 = GroupQuant::new(QuantBits::Int4, false, 8, QuantAxis::PerChannel).unwrap();
        let q8 = GroupQuant::new(QuantBits::Int8, true, 4, QuantAxis::PerToken).unwrap();
        vec![
            Arc::new(ExactF32),
            Arc::new(HalfFloat::f16()),
            Arc::new(HalfFloat::bf16()),
            Arc::new(q4),
            Arc::new(q8),
            Arc::new(KvBlockCodec::kivi(q4, 0, 2, 3)),
            Arc::new(LowRank::new(RankRule::Ratio(0.5), FactorStorage::F16).unwrap()),
            Arc::new(SparseTopK::new(0.3).unwrap()),
            Arc::new(ZstdStage::new(Arc::new(q8), 3).unwrap()),
        ]
    }

    #[test]
    fn decode_any_matches_each_codec() {
        let shape = [12, 10];
        let x: Vec<f32> = (0..120)
            .map(|i| ((i * 37) % 23) as f32 / 7.0 - 1.5)
            .collect();
        let mut seen = std::collections::BTreeSet::new();
        for codec in every_codec() {
            let e = codec.encode(&x, &shape).unwrap();
            assert_eq!(codec_of(&e.bytes).unwrap(), codec.id());
            let mut a = vec![0f32; 120];
            let mut b = vec![0f32; 120];
            codec.decode(&e.bytes, &shape, &mut a).unwrap();
            assert_eq!(decode_any(&e.bytes, &shape, &mut b).unwrap(), codec.id());
            assert_eq!(a, b, "{}", codec.name());
            let (rel, max) = qvl_core::codec::error_of(&x, &a);
            assert!(
                (rel - e.report.rel_frobenius).abs() < 1e-6,
                "{}",
                codec.name()
            );
            assert!((max - e.report.max_abs).abs() < 1e-5, "{}", codec.name());
            seen.insert(codec.id());
        }
        assert_eq!(seen.len(), 9, "ids are distinct");
    }

    /// Every codec's bytes, with each single byte flipped and every prefix
    /// cut, decode to an error or to some values, never to a panic.
    #[test]
    fn corrupted_bytes_never_panic() {
        let shape = [6, 8];
        let x: Vec<f32> = (0..48).map(|i| (i as f32 * 0.7).sin()).collect();
        let mut out = vec![0f32; 48];
        for codec in every_codec() {
            let e = codec.encode(&x, &shape).unwrap();
            for cut in 0..e.bytes.len() {
                assert!(
                    decode_any(&e.bytes[..cut], &shape, &mut out).is_err(),
                    "{} cut {cut}",
                    codec.name()
                );
            }
            for i in 0..e.bytes.len() {
                for flip in [0x01u8, 0x80, 0xff] {
                    let mut bad = e.bytes.clone();
                    bad[i] ^= flip;
                    let _ = decode_any(&bad, &shape, &mut out);
                    if let Ok(rows) = QuantizedRows::parse(&bad, &shape) {
                        for r in 0..rows.rows() {
                            let _ = rows.dequantize_row(r, &mut out[..rows.cols()]);
                        }
                    }
                }
            }
        }
        assert!(matches!(
            decode_any(b"QZ\x01\xff\xff\x00", &[], &mut [0.0]),
            Err(CompressError::UnknownCodec(0xffff))
        ));
        assert!(decode_any(b"XX", &[], &mut [0.0]).is_err());
    }
}
