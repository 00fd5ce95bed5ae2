//! Weights held quantized: group-wise int8 / int4 blocks that the matmul
//! dequantizes per tile (or per register, for decode) instead of f32.
//!
//! The block layouts are GGUF's: `Q8_0` (32 values, f16 scale, symmetric
//! int8: 8.5 bits per weight), `Q4_0` (32 values, f16 scale, symmetric int4:
//! 4.5 bits) and `Q4_1` (32 values, f16 scale and f16 minimum, asymmetric
//! int4: 5 bits). GGUF files keep their own blocks as they are
//! ([`WeightFormat::Native`], no re-quantization error at all); other
//! sources are quantized to `Q8_0` ([`WeightFormat::Q8`]) or `Q4_1`
//! ([`WeightFormat::Q4`]) at load, or per matrix under an error budget
//! ([`WeightFormat::Budget`]).
//!
//! The per-matrix choice under a budget is made here by a small policy that
//! mirrors `[compression]` of the runtime config (`error_budget`,
//! `critical_layers`): qvl-model is the base layer and does not depend on
//! qvl-compress, whose `Selector` makes the same decision for KV blocks.
//! Every quantized matrix can report a [`MetricEvent::Compress`] to a
//! [`MetricsRecorder`].

use crate::checkpoint::WeightSource;
use crate::error::{ModelError, Result};
use crate::tensor::{Bytes, StoredTensor};
use qvl_core::{DType, MetricEvent, MetricsRecorder, TensorKind};
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

/// Values per quantization block (group size) of every block format.
pub const BLOCK_ELEMS: usize = 32;

/// A block layout of quantized weights (GGUF's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockFormat {
    /// f16 scale + 32 x i8.
    Q8_0,
    /// f16 scale + 32 x 4-bit (value - 8).
    Q4_0,
    /// f16 scale + f16 minimum + 32 x 4-bit.
    Q4_1,
}

impl BlockFormat {
    /// Bytes of one block of [`BLOCK_ELEMS`] values.
    pub fn block_bytes(self) -> usize {
        match self {
            BlockFormat::Q8_0 => 34,
            BlockFormat::Q4_0 => 18,
            BlockFormat::Q4_1 => 20,
        }
    }

    /// Bits per weight, scales included.
    pub fn bits_per_weight(self) -> f64 {
        self.block_bytes() as f64 * 8.0 / BLOCK_ELEMS as f64
    }

    /// The [`DType`] of the packed values ([`DType::I8`] or [`DType::I4Packed`]).
    pub fn value_dtype(self) -> DType {
        match self {
            BlockFormat::Q8_0 => DType::I8,
            BlockFormat::Q4_0 | BlockFormat::Q4_1 => DType::I4Packed,
        }
    }

    /// Bytes of `elements` values (a multiple of [`BLOCK_ELEMS`]), or None.
    pub fn bytes_for(self, elements: usize) -> Option<usize> {
        (elements % BLOCK_ELEMS == 0).then(|| elements / BLOCK_ELEMS * self.block_bytes())
    }

    /// Dequantizes whole blocks: `src` holds `dst.len() / 32` blocks.
    pub fn dequantize(self, src: &[u8], dst: &mut [f32]) {
        let bb = self.block_bytes();
        for (s, d) in src.chunks_exact(bb).zip(dst.chunks_exact_mut(BLOCK_ELEMS)) {
            dequantize_block(self, s, d);
        }
    }
}

impl fmt::Display for BlockFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BlockFormat::Q8_0 => "q8_0",
            BlockFormat::Q4_0 => "q4_0",
            BlockFormat::Q4_1 => "q4_1",
        })
    }
}

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// One block (`src.len() == block_bytes`) to 32 values, exactly as GGUF's
/// reference dequantization computes them.
#[inline(always)]
pub(crate) fn dequantize_block(format: BlockFormat, src: &[u8], dst: &mut [f32]) {
    match format {
        BlockFormat::Q8_0 => {
            let d = f16_at(src, 0);
            for (o, &q) in dst.iter_mut().zip(&src[2..34]) {
                *o = f32::from(q as i8) * d;
            }
        }
        BlockFormat::Q4_0 => {
            let d = f16_at(src, 0);
            for (j, &q) in src[2..18].iter().enumerate() {
                dst[j] = (f32::from(q & 0x0f) - 8.0) * d;
                dst[j + 16] = (f32::from(q >> 4) - 8.0) * d;
            }
        }
        BlockFormat::Q4_1 => {
            let d = f16_at(src, 0);
            let m = f16_at(src, 2);
            for (j, &q) in src[4..20].iter().enumerate() {
                dst[j] = f32::from(q & 0x0f) * d + m;
                dst[j + 16] = f32::from(q >> 4) * d + m;
            }
        }
    }
}

/// Quantizes `values` (a multiple of 32 long) to `format` blocks.
///
/// Each value is rounded against the scale as stored (f16), so the
/// dequantized value is the nearest level the block can hold.
pub fn quantize(format: BlockFormat, values: &[f32]) -> Result<Vec<u8>> {
    let bytes = format.bytes_for(values.len()).ok_or_else(|| {
        ModelError::InvalidInput(format!(
            "{} values do not fill whole {format} blocks of {BLOCK_ELEMS}",
            values.len()
        ))
    })?;
    let mut out = Vec::with_capacity(bytes);
    for block in values.chunks_exact(BLOCK_ELEMS) {
        match format {
            BlockFormat::Q8_0 => {
                let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = half::f16::from_f32(amax / 127.0);
                let inv = if d.to_f32() > 0.0 {
                    1.0 / d.to_f32()
                } else {
                    0.0
                };
                out.extend_from_slice(&d.to_bits().to_le_bytes());
                out.extend(
                    block
                        .iter()
                        .map(|v| (v * inv).round().clamp(-127.0, 127.0) as i8 as u8),
                );
            }
            BlockFormat::Q4_0 => {
                // The largest magnitude maps to -8 (the wider side), as GGUF does.
                let max = block
                    .iter()
                    .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                let d = half::f16::from_f32(max / -8.0);
                let inv = if d.to_f32() != 0.0 {
                    1.0 / d.to_f32()
                } else {
                    0.0
                };
                out.extend_from_slice(&d.to_bits().to_le_bytes());
                let q = |v: f32| ((v * inv).round() + 8.0).clamp(0.0, 15.0) as u8;
                for (lo, hi) in block[..16].iter().zip(&block[16..]) {
                    out.push(q(*lo) | (q(*hi) << 4));
                }
            }
            BlockFormat::Q4_1 => {
                let (lo, hi) = block
                    .iter()
                    .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                        (a.min(v), b.max(v))
                    });
                let d = half::f16::from_f32((hi - lo) / 15.0);
                let m = half::f16::from_f32(lo);
                let inv = if d.to_f32() > 0.0 {
                    1.0 / d.to_f32()
                } else {
                    0.0
                };
                out.extend_from_slice(&d.to_bits().to_le_bytes());
                out.extend_from_slice(&m.to_bits().to_le_bytes());
                let mf = m.to_f32();
                let q = |v: f32| ((v - mf) * inv).round().clamp(0.0, 15.0) as u8;
                for (lo, hi) in block[..16].iter().zip(&block[16..]) {
                    out.push(q(*lo) | (q(*hi) << 4));
                }
            }
        }
    }
    Ok(out)
}

/// Relative Frobenius error `||a - b|| / ||a||` (0 for a zero `a` equal to `b`).
pub fn relative_error(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let d = f64::from(*x) - f64::from(*y);
        num += d * d;
        den += f64::from(*x) * f64::from(*x);
    }
    if den == 0.0 {
        if num == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        (num / den).sqrt()
    }
}

/// How a model's weight matrices are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum WeightFormat {
    /// f32 for GGUF (dequantized at load, as before), the stored float
    /// dtype (bf16, f16, f32) for Hugging Face checkpoints.
    #[default]
    F32,
    /// Group-wise int8 (`Q8_0`: g=32, f16 scale).
    Q8,
    /// Group-wise int4 (`Q4_1`: g=32, f16 scale and minimum).
    Q4,
    /// The file's own blocks as they are (GGUF `Q8_0`/`Q4_0`/`Q4_1`; other
    /// GGUF types are dequantized to f32); the stored dtype otherwise.
    Native,
    /// Per matrix: `Q4_1` if its relative error is within the budget, else
    /// `Q8_0` if that is, else exact; critical layers exact.
    Budget(f64),
}

impl WeightFormat {
    /// The names the CLI accepts.
    pub const NAMES: &'static str = "f32, q8, q4, native, budget:<error>";
}

impl fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WeightFormat::F32 => f.write_str("f32"),
            WeightFormat::Q8 => f.write_str("q8"),
            WeightFormat::Q4 => f.write_str("q4"),
            WeightFormat::Native => f.write_str("native"),
            WeightFormat::Budget(b) => write!(f, "budget:{b}"),
        }
    }
}

impl FromStr for WeightFormat {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            ModelError::InvalidInput(format!(
                "weight format {s:?} is not one of {}",
                WeightFormat::NAMES
            ))
        };
        Ok(match s {
            "f32" => WeightFormat::F32,
            "q8" | "int8" => WeightFormat::Q8,
            "q4" | "int4" => WeightFormat::Q4,
            "native" => WeightFormat::Native,
            other => {
                let budget: f64 = other
                    .strip_prefix("budget:")
                    .ok_or_else(bad)?
                    .parse()
                    .map_err(|_| bad())?;
                if !(budget.is_finite() && budget >= 0.0) {
                    return Err(bad());
                }
                WeightFormat::Budget(budget)
            }
        })
    }
}

/// How to load a model's weights.
#[derive(Clone, Default)]
pub struct LoadOptions {
    /// How weight matrices are held.
    pub weights: WeightFormat,
    /// Layers kept exact under [`WeightFormat::Budget`] (negative counts
    /// from the end, as `compression.critical_layers`); empty: none.
    pub critical_layers: Vec<i64>,
    /// Receives a [`MetricEvent::Compress`] per quantized matrix.
    pub recorder: Option<Arc<dyn MetricsRecorder>>,
}

impl fmt::Debug for LoadOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadOptions")
            .field("weights", &self.weights)
            .field("critical_layers", &self.critical_layers)
            .field("recorder", &self.recorder.is_some())
            .finish()
    }
}

impl LoadOptions {
    /// Options holding weights as `weights`, first and last layer exact
    /// (only used by [`WeightFormat::Budget`]).
    pub fn new(weights: WeightFormat) -> Self {
        LoadOptions {
            weights,
            critical_layers: vec![0, -1],
            recorder: None,
        }
    }
}

/// What was chosen for one matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct MatrixChoice {
    /// Tensor name.
    pub name: String,
    /// Decoder (or vision) layer parsed from the name, if any.
    pub layer: Option<usize>,
    /// The block format, or None when kept in its float dtype.
    pub format: Option<BlockFormat>,
    /// Bytes as held before (stored float dtype).
    pub input_bytes: usize,
    /// Bytes as held now.
    pub output_bytes: usize,
    /// Relative Frobenius error against the source values (0 when exact).
    pub rel_error: f64,
    /// Why: "uniform", "embedding or head kept q8", "critical layer",
    /// "within budget", "nothing within budget", "not quantizable".
    pub reason: &'static str,
}

/// Totals of a load: which formats matrices got and what that saved.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WeightReport {
    /// One entry per matrix the loader asked for.
    pub matrices: Vec<MatrixChoice>,
}

impl WeightReport {
    /// Bytes of the matrices as stored in the source.
    pub fn input_bytes(&self) -> usize {
        self.matrices.iter().map(|m| m.input_bytes).sum()
    }

    /// Bytes of the matrices as held.
    pub fn output_bytes(&self) -> usize {
        self.matrices.iter().map(|m| m.output_bytes).sum()
    }

    /// Largest relative error of any matrix.
    pub fn max_rel_error(&self) -> f64 {
        self.matrices
            .iter()
            .map(|m| m.rel_error)
            .fold(0.0, f64::max)
    }

    /// Matrices held in `format` (None: kept float).
    pub fn count(&self, format: Option<BlockFormat>) -> usize {
        self.matrices.iter().filter(|m| m.format == format).count()
    }
}

/// The layer index in a parameter name (`...layers.3.` / `...blocks.3.` /
/// GGUF `blk.3.`), if any.
pub fn layer_of(name: &str) -> Option<usize> {
    let parts: Vec<&str> = name.split('.').collect();
    parts.windows(2).find_map(|w| {
        matches!(w[0], "layers" | "blocks" | "blk")
            .then(|| w[1].parse().ok())
            .flatten()
    })
}

/// Whether a tensor is a matrix the matmul (or embedding lookup) reads and
/// that may be held quantized: a 2-D `.weight` with rows in whole blocks,
/// not a norm or a position table.
pub fn is_quantizable_matrix(name: &str, shape: &[usize]) -> bool {
    shape.len() == 2
        && shape[1] % BLOCK_ELEMS == 0
        && name.ends_with(".weight")
        && !name.contains("norm")
        && !name.contains("pos_embed")
        && !name.contains("patch_embed")
}

/// Whether a tensor is the token embedding or the output head (`lm_head`,
/// GGUF `token_embd` / `output`): the matrix every token's logits go
/// through, tied to the embedding in small models. [`WeightFormat::Q4`]
/// holds it as `Q8_0`, as llama.cpp's q4 mixes keep it at 6 bits or more:
/// int4 there cost SmolLM2 +8.8% perplexity.
pub fn is_embedding_or_head(name: &str) -> bool {
    name.contains("embed_tokens")
        || name.contains("lm_head")
        || name.starts_with("token_embd")
        || name == "output.weight"
}

/// A [`WeightSource`] that hands out the matrices of another one quantized
/// as [`LoadOptions`] asks, and records what it chose.
pub struct QuantizingSource<'a> {
    inner: &'a dyn WeightSource,
    options: LoadOptions,
    num_layers: usize,
    report: Mutex<WeightReport>,
}

impl<'a> QuantizingSource<'a> {
    /// Wraps `inner`, a model of `num_layers` layers (critical layers
    /// counted from the end need it).
    pub fn new(inner: &'a dyn WeightSource, options: LoadOptions, num_layers: usize) -> Self {
        QuantizingSource {
            inner,
            options,
            num_layers,
            report: Mutex::new(WeightReport::default()),
        }
    }

    /// What was chosen for every matrix served so far.
    pub fn report(&self) -> WeightReport {
        // A poisoned lock only means a thread panicked mid-push; the list is valid.
        self.report
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn is_critical(&self, layer: Option<usize>) -> bool {
        let Some(layer) = layer else { return false };
        self.options.critical_layers.iter().any(|&c| {
            let resolved = if c < 0 { self.num_layers as i64 + c } else { c };
            resolved == layer as i64
        })
    }

    fn choose(&self, t: StoredTensor) -> Result<StoredTensor> {
        let layer = layer_of(&t.name);
        let input_bytes = t.bytes.len();
        let keep = |reason| MatrixChoice {
            name: t.name.clone(),
            layer,
            format: None,
            input_bytes,
            output_bytes: input_bytes,
            rel_error: 0.0,
            reason,
        };
        let (choice, out) = if t.block_format().is_some() {
            (keep("already quantized"), t)
        } else if !is_quantizable_matrix(&t.name, &t.shape) || !t.is_float() {
            (keep("not quantizable"), t)
        } else {
            match self.options.weights {
                WeightFormat::F32 | WeightFormat::Native => (keep("uniform"), t),
                WeightFormat::Q8 | WeightFormat::Q4 => {
                    let head = is_embedding_or_head(&t.name);
                    let format = if self.options.weights == WeightFormat::Q8 || head {
                        BlockFormat::Q8_0
                    } else {
                        BlockFormat::Q4_1
                    };
                    let values = t.to_f32_vec()?;
                    let (q, err) = quantize_measured(format, &values)?;
                    self.emit(input_bytes, q.len(), err);
                    let reason = if head && format != BlockFormat::Q4_1 {
                        "embedding or head kept q8"
                    } else {
                        "uniform"
                    };
                    let choice = MatrixChoice {
                        output_bytes: q.len(),
                        format: Some(format),
                        rel_error: err,
                        ..keep(reason)
                    };
                    let out = StoredTensor::from_blocks(&t.name, format, t.shape.clone(), q)?;
                    (choice, out)
                }
                WeightFormat::Budget(budget) => {
                    if self.is_critical(layer) {
                        (keep("critical layer"), t)
                    } else {
                        let values = t.to_f32_vec()?;
                        let mut picked = None;
                        for format in [BlockFormat::Q4_1, BlockFormat::Q8_0] {
                            let (q, err) = quantize_measured(format, &values)?;
                            if err <= budget {
                                picked = Some((format, q, err));
                                break;
                            }
                        }
                        match picked {
                            Some((format, q, err)) => {
                                self.emit(input_bytes, q.len(), err);
                                let choice = MatrixChoice {
                                    output_bytes: q.len(),
                                    format: Some(format),
                                    rel_error: err,
                                    ..keep("within budget")
                                };
                                let out =
                                    StoredTensor::from_blocks(&t.name, format, t.shape.clone(), q)?;
                                (choice, out)
                            }
                            None => (keep("nothing within budget"), t),
                        }
                    }
                }
            }
        };
        self.report
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .matrices
            .push(choice);
        Ok(out)
    }

    fn emit(&self, input_bytes: usize, output_bytes: usize, rel_error: f64) {
        if let Some(r) = &self.options.recorder {
            r.record(&MetricEvent::Compress {
                kind: TensorKind::Weight,
                input_bytes: input_bytes as u64,
                output_bytes: output_bytes as u64,
                rel_error,
            });
        }
    }
}

/// Quantizes and measures the relative error of the dequantized values.
pub fn quantize_measured(format: BlockFormat, values: &[f32]) -> Result<(Vec<u8>, f64)> {
    let q = quantize(format, values)?;
    let mut back = vec![0f32; values.len()];
    format.dequantize(&q, &mut back);
    Ok((q, relative_error(values, &back)))
}

impl WeightSource for QuantizingSource<'_> {
    fn tensor(&self, name: &str) -> Result<Option<StoredTensor>> {
        match self.inner.tensor(name)? {
            Some(t) => self.choose(t).map(Some),
            None => Ok(None),
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.inner.contains(name)
    }

    fn describe(&self) -> String {
        format!(
            "{} ({} weights)",
            self.inner.describe(),
            self.options.weights
        )
    }
}

/// A quantized matrix in `format` over `bytes`, checked against `shape`.
pub(crate) fn check_block_bytes(
    name: &str,
    format: BlockFormat,
    shape: &[usize],
    bytes: &Bytes,
) -> Result<()> {
    let cols = shape.last().copied().unwrap_or(1);
    let elements: usize = shape.iter().product();
    let want = if cols % BLOCK_ELEMS == 0 {
        format.bytes_for(elements)
    } else {
        None
    };
    match want {
        Some(w) if w == bytes.len() => Ok(()),
        _ => Err(ModelError::InvalidInput(format!(
            "tensor {name:?}: {} bytes are not {format} blocks of shape {shape:?} \
             (rows must be whole blocks of {BLOCK_ELEMS})",
            bytes.len()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::MemoryWeights;

    fn values(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919) % 1013) as f32 / 500.0 - 1.0 + if i % 97 == 0 { 4.0 } else { 0.0 })
            .collect()
    }

    #[test]
    fn quantize_round_trips_within_the_format_error() {
        let x = values(32 * 40);
        for (format, bound) in [
            (BlockFormat::Q8_0, 0.01),
            (BlockFormat::Q4_1, 0.12),
            (BlockFormat::Q4_0, 0.2),
        ] {
            let (q, err) = quantize_measured(format, &x).unwrap();
            assert_eq!(q.len(), 40 * format.block_bytes());
            assert!(err > 0.0 && err < bound, "{format}: {err}");
            // Matches GGUF's reference dequantization bit for bit.
            let ty = match format {
                BlockFormat::Q8_0 => crate::gguf::GgmlType::Q8_0,
                BlockFormat::Q4_0 => crate::gguf::GgmlType::Q4_0,
                BlockFormat::Q4_1 => crate::gguf::GgmlType::Q4_1,
            };
            let mut a = vec![0f32; x.len()];
            let mut b = vec![0f32; x.len()];
            format.dequantize(&q, &mut a);
            crate::gguf::dequantize(ty, &q, &mut b).unwrap();
            assert_eq!(a, b);
            // Re-quantizing dequantized values is (nearly) lossless.
            let (_, again) = quantize_measured(format, &a).unwrap();
            assert!(again < 1e-3, "{format}: {again}");
        }
        assert!(quantize(BlockFormat::Q8_0, &x[..31]).is_err());
        let zeros = quantize_measured(BlockFormat::Q4_1, &[0.0; 32]).unwrap();
        assert_eq!(zeros.1, 0.0);
    }

    #[test]
    fn parses_formats_and_layers() {
        assert_eq!("q4".parse::<WeightFormat>().unwrap(), WeightFormat::Q4);
        assert_eq!(
            "budget:0.05".parse::<WeightFormat>().unwrap(),
            WeightFormat::Budget(0.05)
        );
        let err = "q3".parse::<WeightFormat>().unwrap_err().to_string();
        assert!(err.contains("q3") && err.contains("native"), "{err}");
        assert!("budget:-1".parse::<WeightFormat>().is_err());
        assert_eq!(layer_of("model.layers.12.mlp.up_proj.weight"), Some(12));
        assert_eq!(layer_of("blk.3.attn_q.weight"), Some(3));
        assert_eq!(layer_of("lm_head.weight"), None);
        assert!(is_quantizable_matrix("a.q_proj.weight", &[8, 64]));
        assert!(!is_quantizable_matrix("a.norm.weight", &[64]));
        assert!(!is_quantizable_matrix("a.q_proj.weight", &[8, 60]));
    }

    #[test]
    fn budget_policy_keeps_critical_layers_and_picks_by_error() {
        let x = values(64 * 64);
        let mut w = MemoryWeights::new();
        for l in 0..3 {
            w.insert(
                StoredTensor::from_f32(format!("m.layers.{l}.q_proj.weight"), vec![64, 64], &x)
                    .unwrap(),
            );
        }
        w.insert(StoredTensor::from_f32("m.layers.1.norm.weight", vec![64], &x[..64]).unwrap());
        let recorded = Arc::new(Mutex::new(Vec::new()));
        struct Rec(Arc<Mutex<Vec<MetricEvent>>>);
        impl MetricsRecorder for Rec {
            fn record(&self, e: &MetricEvent) {
                self.0.lock().unwrap().push(*e);
            }
        }
        // A budget between the int8 and int4 errors: int8 for the middle layer.
        let (_, e8) = quantize_measured(BlockFormat::Q8_0, &x).unwrap();
        let (_, e4) = quantize_measured(BlockFormat::Q4_1, &x).unwrap();
        assert!(e8 < e4);
        let options = LoadOptions {
            weights: WeightFormat::Budget((e8 + e4) / 2.0),
            critical_layers: vec![0, -1],
            recorder: Some(Arc::new(Rec(recorded.clone()))),
        };
        let src = QuantizingSource::new(&w, options, 3);
        let t0 = src.tensor("m.layers.0.q_proj.weight").unwrap().unwrap();
        let t1 = src.tensor("m.layers.1.q_proj.weight").unwrap().unwrap();
        let t2 = src.tensor("m.layers.2.q_proj.weight").unwrap().unwrap();
        let n = src.tensor("m.layers.1.norm.weight").unwrap().unwrap();
        assert_eq!(t0.block_format(), None);
        assert_eq!(t1.block_format(), Some(BlockFormat::Q8_0));
        assert_eq!(t2.block_format(), None);
        assert_eq!(n.block_format(), None);
        let report = src.report();
        assert_eq!(report.count(Some(BlockFormat::Q8_0)), 1);
        assert_eq!(report.matrices[0].reason, "critical layer");
        assert!((report.max_rel_error() - e8).abs() < 1e-12);
        let events = recorded.lock().unwrap();
        assert_eq!(events.len(), 1);
        assert!(matches!(
            events[0],
            MetricEvent::Compress { kind: TensorKind::Weight, input_bytes: 16384, output_bytes, .. }
                if output_bytes == 128 * 34
        ));
        // A generous budget takes int4 everywhere but the critical layers.
        let src = QuantizingSource::new(&w, LoadOptions::new(WeightFormat::Budget(1.0)), 3);
        let t1 = src.tensor("m.layers.1.q_proj.weight").unwrap().unwrap();
        assert_eq!(t1.block_format(), Some(BlockFormat::Q4_1));
        // Dequantized rows read back as the block values.
        let back = t1.to_f32_vec().unwrap();
        assert!(relative_error(&x, &back) < 0.12);
    }

    #[test]
    fn q4_keeps_the_embedding_and_head_at_q8() {
        let x = values(64 * 64);
        let mut w = MemoryWeights::new();
        for name in [
            "model.embed_tokens.weight",
            "lm_head.weight",
            "model.layers.0.mlp.up_proj.weight",
        ] {
            w.insert(StoredTensor::from_f32(name, vec![64, 64], &x).unwrap());
        }
        let src = QuantizingSource::new(&w, LoadOptions::new(WeightFormat::Q4), 1);
        let format = |n: &str| src.tensor(n).unwrap().unwrap().block_format();
        assert_eq!(format("model.embed_tokens.weight"), Some(BlockFormat::Q8_0));
        assert_eq!(format("lm_head.weight"), Some(BlockFormat::Q8_0));
        assert_eq!(
            format("model.layers.0.mlp.up_proj.weight"),
            Some(BlockFormat::Q4_1)
        );
        let r = src.report();
        assert_eq!(r.matrices[0].reason, "embedding or head kept q8");
        assert_eq!(r.matrices[2].reason, "uniform");
        assert!(is_embedding_or_head("token_embd.weight") && is_embedding_or_head("output.weight"));
        assert!(!is_embedding_or_head("blk.0.attn_output.weight"));
    }
}
