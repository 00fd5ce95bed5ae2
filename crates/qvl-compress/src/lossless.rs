//! zstd as a lossless stage over any codec, for the SSD tier.
//!
//! Payload after the common header: `inner length u64`, the zstd frame of
//! the inner encoding (which is self-describing and decoded by
//! [`crate::decode_any`]).

use crate::error::{CompressError, Result};
use crate::format::{check_len, header_len, write_header, Reader};
use crate::ids;
use qvl_core::{Codec, CodecId, Encoded};
use std::sync::Arc;

/// Nesting limit of zstd stages, so that crafted bytes cannot recurse deeply.
pub(crate) const MAX_NESTING: usize = 4;

/// zstd over the bytes of another codec.
#[derive(Clone)]
pub struct ZstdStage {
    /// The codec whose bytes are compressed.
    pub inner: Arc<dyn Codec>,
    /// zstd level (1 fast .. 19 small; negative levels are faster still).
    pub level: i32,
}

impl std::fmt::Debug for ZstdStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ZstdStage({}, level {})", self.inner.name(), self.level)
    }
}

/// Largest inner encoding accepted for `elements` values: every codec here
/// stays below 12 bytes per value plus its headers.
fn inner_limit(elements: usize) -> usize {
    elements.saturating_mul(12).saturating_add(1 << 16)
}

impl ZstdStage {
    /// zstd at `level` over `inner`.
    pub fn new(inner: Arc<dyn Codec>, level: i32) -> Result<Self> {
        if !(-7..=22).contains(&level) {
            return Err(CompressError::config(
                "zstd_level",
                format!("{level} is not within -7..=22"),
            ));
        }
        Ok(ZstdStage { inner, level })
    }

    pub(crate) fn decode_bytes(
        bytes: &[u8],
        shape: &[usize],
        out: &mut [f32],
        depth: usize,
    ) -> Result<()> {
        let n = check_len(shape, out.len(), "output buffer")?;
        let mut r = Reader::open(bytes, "zstd", ids::ZSTD, shape)?;
        if depth >= MAX_NESTING {
            return Err(r.err(format!("more than {MAX_NESTING} nested zstd stages")));
        }
        let inner_len = r.len_u64("inner length")?;
        if inner_len > inner_limit(n) {
            return Err(r.err(format!(
                "inner length {inner_len} is implausible for {n} values"
            )));
        }
        let frame = r.rest();
        let inner =
            zstd::bulk::decompress(frame, inner_len).map_err(|source| CompressError::Zstd {
                op: "decompress",
                source,
            })?;
        if inner.len() != inner_len {
            return Err(r.err(format!(
                "frame holds {} bytes, header says {inner_len}",
                inner.len()
            )));
        }
        crate::decode_nested(&inner, shape, out, depth + 1)?;
        Ok(())
    }
}

impl Codec for ZstdStage {
    fn id(&self) -> CodecId {
        ids::ZSTD
    }

    fn name(&self) -> String {
        format!("zstd{}[{}]", self.level, self.inner.name())
    }

    fn is_lossless(&self) -> bool {
        self.inner.is_lossless()
    }

    fn encode(&self, values: &[f32], shape: &[usize]) -> qvl_core::Result<Encoded> {
        let inner = self.inner.encode(values, shape)?;
        let frame = zstd::bulk::compress(&inner.bytes, self.level).map_err(|source| {
            CompressError::Zstd {
                op: "compress",
                source,
            }
        })?;
        let mut bytes = Vec::with_capacity(header_len(shape.len()) + 8 + frame.len());
        write_header(&mut bytes, ids::ZSTD, shape);
        bytes.extend_from_slice(&(inner.bytes.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&frame);
        let mut report = inner.report;
        report.output_bytes = bytes.len() as u64;
        Ok(Encoded {
            codec: ids::ZSTD,
            shape: shape.to_vec(),
            bytes,
            report,
        })
    }

    fn decode(&self, bytes: &[u8], shape: &[usize], out: &mut [f32]) -> qvl_core::Result<()> {
        Ok(Self::decode_bytes(bytes, shape, out, 0)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::float::ExactF32;
    use crate::quant::{GroupQuant, QuantAxis, QuantBits};

    #[test]
    fn compresses_redundant_data_losslessly() {
        let x: Vec<f32> = (0..4096).map(|i| (i % 16) as f32).collect();
        let z = ZstdStage::new(Arc::new(ExactF32), 3).unwrap();
        assert!(z.is_lossless());
        let e = z.encode(&x, &[64, 64]).unwrap();
        assert!(e.report.ratio() > 20.0, "{}", e.report.ratio());
        let mut out = vec![0f32; 4096];
        z.decode(&e.bytes, &[64, 64], &mut out).unwrap();
        assert_eq!(out, x);
        // Over a lossy codec: same error as the inner codec.
        let q = GroupQuant::new(QuantBits::Int4, false, 32, QuantAxis::PerToken).unwrap();
        let zq = ZstdStage::new(Arc::new(q), 1).unwrap();
        let eq = zq.encode(&x, &[64, 64]).unwrap();
        let plain = q.encode(&x, &[64, 64]).unwrap();
        assert_eq!(eq.report.rel_frobenius, plain.report.rel_frobenius);
        zq.decode(&eq.bytes, &[64, 64], &mut out).unwrap();
        assert_eq!(
            qvl_core::codec::error_of(&x, &out).0,
            plain.report.rel_frobenius
        );
    }

    #[test]
    fn malformed_frames_and_bombs_are_errors() {
        let x: Vec<f32> = (0..256).map(|i| i as f32).collect();
        let z = ZstdStage::new(Arc::new(ExactF32), 3).unwrap();
        let e = z.encode(&x, &[256]).unwrap();
        let mut out = vec![0f32; 256];
        for cut in 0..e.bytes.len() {
            assert!(z.decode(&e.bytes[..cut], &[256], &mut out).is_err());
        }
        let mut bad = e.bytes.clone();
        let h = header_len(1);
        bad[h + 7] = 0x7f; // an absurd inner length
        assert!(z.decode(&bad, &[256], &mut out).is_err());
        // Nesting zstd in zstd is fine up to the limit, then refused.
        let mut codec: Arc<dyn Codec> = Arc::new(ExactF32);
        for _ in 0..MAX_NESTING + 1 {
            codec = Arc::new(ZstdStage::new(codec, 1).unwrap());
        }
        let e = codec.encode(&x, &[256]).unwrap();
        assert!(codec.decode(&e.bytes, &[256], &mut out).is_err());
        assert!(ZstdStage::new(Arc::new(ExactF32), 40).is_err());
    }
}
