//! Codecs: how a tensor is encoded for a slower or smaller tier.
//!
//! Implemented by `qvl-compress` (int8/int4 group quantization, low rank,
//! sparse, zstd, f16/bf16); called by the KV cache on its way out of RAM and
//! by the tier manager. Every encode reports what it cost in accuracy.

use crate::Result;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Identifies an encoding in block headers and metrics. Stable on disk:
/// a value, once given out, keeps its meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CodecId(pub u16);

impl CodecId {
    /// The data is the tensor's bytes in its own dtype.
    pub const RAW: CodecId = CodecId(0);
}

impl fmt::Display for CodecId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "codec#{}", self.0)
    }
}

/// What one encode cost and saved.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct CodecReport {
    /// Bytes of the input (f32 values).
    pub input_bytes: u64,
    /// Bytes of the encoding.
    pub output_bytes: u64,
    /// ||x - decode(encode(x))||_F / ||x||_F (0 for lossless codecs).
    pub rel_frobenius: f64,
    /// max |x - decode(encode(x))|.
    pub max_abs: f64,
}

impl CodecReport {
    /// Compression ratio, input over output (higher is smaller).
    pub fn ratio(&self) -> f64 {
        if self.output_bytes == 0 {
            f64::INFINITY
        } else {
            self.input_bytes as f64 / self.output_bytes as f64
        }
    }
}

/// An encoded tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// The codec that made it.
    pub codec: CodecId,
    /// Shape of the decoded tensor.
    pub shape: Vec<usize>,
    /// The encoding.
    pub bytes: Vec<u8>,
    /// Ratio and error of this encode.
    pub report: CodecReport,
}

/// An encoding of f32 tensors.
pub trait Codec: Send + Sync {
    /// Stable id, written into block headers.
    fn id(&self) -> CodecId;

    /// Human name ("int4-g32-asym").
    fn name(&self) -> String;

    /// Whether decode(encode(x)) == x exactly.
    fn is_lossless(&self) -> bool;

    /// Encodes `values` of `shape` (row-major; the last dimension is the
    /// innermost) and measures the error it introduces.
    fn encode(&self, values: &[f32], shape: &[usize]) -> Result<Encoded>;

    /// Decodes `bytes` made by [`Codec::encode`] for `shape` into `out`.
    /// Malformed bytes give [`crate::CoreError::InvalidInput`], never a panic.
    fn decode(&self, bytes: &[u8], shape: &[usize], out: &mut [f32]) -> Result<()>;
}

/// Relative Frobenius and max-abs error of `approx` against `exact`.
pub fn error_of(exact: &[f32], approx: &[f32]) -> (f64, f64) {
    let (mut diff2, mut norm2, mut max_abs) = (0f64, 0f64, 0f64);
    for (&a, &b) in exact.iter().zip(approx) {
        let d = (a as f64) - (b as f64);
        diff2 += d * d;
        norm2 += (a as f64) * (a as f64);
        max_abs = max_abs.max(d.abs());
    }
    let rel = if norm2 == 0.0 {
        diff2.sqrt()
    } else {
        (diff2 / norm2).sqrt()
    };
    (rel, max_abs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_of_measures_relative_and_max() {
        let (rel, max) = error_of(&[3.0, 4.0], &[3.0, 4.5]);
        assert!((rel - 0.1).abs() < 1e-12);
        assert!((max - 0.5).abs() < 1e-12);
        let r = CodecReport {
            input_bytes: 1000,
            output_bytes: 250,
            ..Default::default()
        };
        assert_eq!(r.ratio(), 4.0);
    }
}
