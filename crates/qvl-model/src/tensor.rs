//! Stored tensors: bytes in their stored dtype, shared with the file they
//! were mapped from (or owned), and the conversions to f32 the kernels need.

use crate::error::{ModelError, Result};
use crate::qweight::{self, BlockFormat, BLOCK_ELEMS};
use qvl_core::DType;
use std::fmt;
use std::sync::Arc;

/// Something that owns bytes: a memory map, a vector.
pub trait ByteOwner: Send + Sync {
    /// The owned bytes.
    fn bytes(&self) -> &[u8];
}

impl ByteOwner for memmap2::Mmap {
    fn bytes(&self) -> &[u8] {
        self
    }
}

impl ByteOwner for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }
}

/// A shared, immutable byte range of an owner (a mapped file, a vector).
#[derive(Clone)]
pub struct Bytes {
    owner: Arc<dyn ByteOwner>,
    start: usize,
    len: usize,
}

impl Bytes {
    /// The range `start..start + len` of `owner`; None when it is out of bounds.
    pub fn new(owner: Arc<dyn ByteOwner>, start: usize, len: usize) -> Option<Bytes> {
        let end = start.checked_add(len)?;
        (end <= owner.bytes().len()).then_some(Bytes { owner, start, len })
    }

    /// Bytes owned by a new vector.
    pub fn from_vec(data: Vec<u8>) -> Bytes {
        let len = data.len();
        Bytes {
            owner: Arc::new(data),
            start: 0,
            len,
        }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // `new` checked the range against the owner, whose bytes never change.
        &self.owner.bytes()[self.start..self.start + self.len]
    }

    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the range is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bytes({} bytes)", self.len)
    }
}

/// A tensor as stored: name, dtype, shape and its bytes (little endian).
#[derive(Clone, Debug)]
pub struct StoredTensor {
    /// Name in its source.
    pub name: String,
    /// Element type as stored.
    pub dtype: DType,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// The data.
    pub bytes: Bytes,
    /// Set when the bytes are quantized blocks (scales inline; `dtype` is
    /// then the packed values' type, `I8` or `I4Packed`).
    blocks: Option<BlockFormat>,
}

impl StoredTensor {
    /// A tensor over `bytes`, checking that the byte count fits shape and dtype.
    pub fn new(
        name: impl Into<String>,
        dtype: DType,
        shape: Vec<usize>,
        bytes: Bytes,
    ) -> Result<Self> {
        let name = name.into();
        let elements = checked_elements(&shape).ok_or_else(|| {
            ModelError::InvalidInput(format!("tensor {name:?}: shape {shape:?} overflows"))
        })?;
        if dtype.bytes_for(elements) != bytes.len() {
            return Err(ModelError::InvalidInput(format!(
                "tensor {name:?}: {} bytes do not hold {elements} {dtype} elements of shape {shape:?}",
                bytes.len()
            )));
        }
        Ok(StoredTensor {
            name,
            dtype,
            shape,
            bytes,
            blocks: None,
        })
    }

    /// A matrix of quantized `format` blocks (rows in whole blocks).
    pub fn from_blocks(
        name: impl Into<String>,
        format: BlockFormat,
        shape: Vec<usize>,
        data: Vec<u8>,
    ) -> Result<Self> {
        let name = name.into();
        let bytes = Bytes::from_vec(data);
        qweight::check_block_bytes(&name, format, &shape, &bytes)?;
        Ok(StoredTensor {
            name,
            dtype: format.value_dtype(),
            shape,
            bytes,
            blocks: Some(format),
        })
    }

    /// The block format when the bytes are quantized blocks.
    pub fn block_format(&self) -> Option<BlockFormat> {
        self.blocks
    }

    /// An f32 tensor owning `values`.
    pub fn from_f32(name: impl Into<String>, shape: Vec<usize>, values: &[f32]) -> Result<Self> {
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        StoredTensor::new(name, DType::F32, shape, Bytes::from_vec(data))
    }

    /// A bf16 tensor owning `bits` (raw bfloat16 bit patterns).
    pub fn from_bf16_bits(
        name: impl Into<String>,
        shape: Vec<usize>,
        bits: &[u16],
    ) -> Result<Self> {
        let data: Vec<u8> = bits.iter().flat_map(|v| v.to_le_bytes()).collect();
        StoredTensor::new(name, DType::Bf16, shape, Bytes::from_vec(data))
    }

    /// Number of elements.
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the kernels read it as float values: f32, f16, bf16, or
    /// quantized blocks (dequantized per tile).
    pub fn is_float(&self) -> bool {
        self.blocks.is_some() || matches!(self.dtype, DType::F32 | DType::F16 | DType::Bf16)
    }

    /// Converts elements `start..start + out.len()` to f32 into `out`.
    pub fn read_f32_into(&self, start: usize, out: &mut [f32]) -> Result<()> {
        let end = start + out.len();
        if end > self.elements() {
            return Err(ModelError::InvalidInput(format!(
                "tensor {:?}: elements {start}..{end} past its {} elements",
                self.name,
                self.elements()
            )));
        }
        let b = self.bytes.as_slice();
        if let Some(format) = self.blocks {
            // Whole blocks covering the range, then the part asked for.
            let (first, last) = (start / BLOCK_ELEMS, end.div_ceil(BLOCK_ELEMS));
            let bb = format.block_bytes();
            let mut block = [0f32; BLOCK_ELEMS];
            let mut at = 0;
            for k in first..last {
                qweight::dequantize_block(format, &b[k * bb..(k + 1) * bb], &mut block);
                let lo = start.max(k * BLOCK_ELEMS) - k * BLOCK_ELEMS;
                let hi = end.min((k + 1) * BLOCK_ELEMS) - k * BLOCK_ELEMS;
                out[at..at + hi - lo].copy_from_slice(&block[lo..hi]);
                at += hi - lo;
            }
            return Ok(());
        }
        match self.dtype {
            DType::F32 => convert_f32(&b[start * 4..end * 4], out),
            DType::Bf16 => convert_bf16(&b[start * 2..end * 2], out),
            DType::F16 => convert_f16(&b[start * 2..end * 2], out),
            other => {
                return Err(ModelError::InvalidInput(format!(
                    "tensor {:?} is {other}, expected a float type",
                    self.name
                )))
            }
        }
        Ok(())
    }

    /// The whole tensor as f32.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        let mut out = vec![0.0; self.elements()];
        self.read_f32_into(0, &mut out)?;
        Ok(out)
    }

    /// The whole tensor as i64 (from i64 or i32 storage).
    pub fn to_i64_vec(&self) -> Result<Vec<i64>> {
        let b = self.bytes.as_slice();
        match self.dtype {
            DType::I64 => Ok(b
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect()),
            DType::I32 => Ok(b
                .chunks_exact(4)
                .map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect()),
            other => Err(ModelError::InvalidInput(format!(
                "tensor {:?} is {other}, expected an integer type",
                self.name
            ))),
        }
    }
}

/// Product of the dimensions, None on overflow.
pub(crate) fn checked_elements(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// Little-endian f32 bytes to f32.
#[inline(always)]
pub(crate) fn convert_f32(bytes: &[u8], out: &mut [f32]) {
    for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
}

/// Little-endian bf16 bytes to f32 (exact: bf16 is the upper half of f32).
#[inline(always)]
pub(crate) fn convert_bf16(bytes: &[u8], out: &mut [f32]) {
    for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        *o = f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16);
    }
}

/// Little-endian f16 bytes to f32.
#[inline(always)]
pub(crate) fn convert_f16(bytes: &[u8], out: &mut [f32]) {
    for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        *o = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_round_trip() {
        let vals = [1.5f32, -2.25, 0.0, 3.0e-3];
        let t = StoredTensor::from_f32("a", vec![2, 2], &vals).unwrap();
        assert_eq!(t.to_f32_vec().unwrap(), vals);
        let bits: Vec<u16> = vals
            .iter()
            .map(|v| half::bf16::from_f32(*v).to_bits())
            .collect();
        let t = StoredTensor::from_bf16_bits("b", vec![4], &bits).unwrap();
        let back = t.to_f32_vec().unwrap();
        for (a, b) in vals.iter().zip(&back) {
            assert!((a - b).abs() <= a.abs() / 128.0);
        }
        let f16: Vec<u8> = vals
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_bits().to_le_bytes())
            .collect();
        let t = StoredTensor::new("c", DType::F16, vec![4], Bytes::from_vec(f16)).unwrap();
        assert_eq!(t.to_f32_vec().unwrap()[1], -2.25);
    }

    #[test]
    fn wrong_byte_count_is_an_error() {
        let err = StoredTensor::new("x", DType::F32, vec![3], Bytes::from_vec(vec![0; 8]));
        assert!(err.unwrap_err().to_string().contains("\"x\""));
        assert!(Bytes::new(Arc::new(vec![0u8; 4]), 2, 3).is_none());
    }
}
