//! A GGUF v3 reader: metadata, tensor infos, alignment, memory-mapped tensor
//! data, and dequantization of the common ggml block formats to `f32`.
//!
//! The parser never trusts the file: every length, count and offset is
//! checked against the bytes that are actually there before anything is
//! allocated, so a hostile or truncated file gives a [`GgufError`] naming what
//! was wrong and where, never a panic or a huge allocation.
//!
//! Layout reminder (all little endian): magic `GGUF`, `u32` version,
//! `u64` tensor count, `u64` metadata count, the metadata key/values, the
//! tensor infos (name, `u32` n_dims, `u64` dims, `u32` ggml type, `u64`
//! offset relative to the data section), padding to `general.alignment`
//! (default 32), then the tensor data.
//!
//! Dimensions are kept in ggml order: `dims[0]` is the fastest-varying one
//! (the length of a row). A matrix with `dims = [576, 49152]` has 49152 rows
//! of 576 values; [`TensorInfo::shape`] gives the row-major (PyTorch) order.
//!
//! # RoPE row order of llama q/k weights
//!
//! `convert_hf_to_gguf.py` permutes the rows of `attn_q` / `attn_k` of the
//! `llama` architecture (and its relatives) so that llama.cpp can apply RoPE
//! to *adjacent pairs* `(2i, 2i+1)` of each head. Hugging Face applies RoPE to
//! *halves* (`i` and `i + head_dim/2`, "rotate_half"). Two equivalent ways to
//! run such a file: keep the GGUF row order and rotate adjacent pairs, or
//! restore the Hugging Face row order with [`unpermute_qk_rows`] and rotate
//! halves. Within one head, GGUF row `2i + half` holds Hugging Face row
//! `half * head_dim/2 + i` (see [`hf_row_of_gguf_row`]). Only q and k are
//! permuted (v, o and the MLP are not), and only for llama-style
//! architectures: `qwen2`/`qwen3`/`qwen3vl` files keep the Hugging Face order
//! (llama.cpp runs them with NeoX-style half rotation).

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;

/// Everything that can go wrong reading a GGUF file, grouped by cause.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    // --- the file system ---
    /// The file could not be opened or mapped.
    #[error("cannot read GGUF file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    // --- the container format ---
    /// The first four bytes are not `GGUF`.
    #[error("not a GGUF file: the magic is {found:?}, expected \"GGUF\"")]
    BadMagic {
        /// The first bytes found (fewer than 4 when the file is shorter).
        found: Vec<u8>,
    },
    /// A GGUF version this reader does not understand.
    #[error("unsupported GGUF version {version} (this reader reads versions 2 and 3)")]
    UnsupportedVersion {
        /// The version in the header.
        version: u32,
    },
    /// The file ends before the structure being read does.
    #[error("GGUF file truncated while reading {what} at byte {offset}: need {needed} bytes, {available} left")]
    Truncated {
        /// What was being read.
        what: String,
        /// Where it starts.
        offset: u64,
        /// Bytes it needs.
        needed: u64,
        /// Bytes the file still has.
        available: u64,
    },
    /// A count or length that cannot fit in the rest of the file.
    #[error(
        "implausible {what} at byte {offset}: {count} (the file has only {available} bytes left)"
    )]
    ImplausibleCount {
        /// What was counted.
        what: String,
        /// Where the count is.
        offset: u64,
        /// The value read.
        count: u64,
        /// Bytes left in the file.
        available: u64,
    },
    /// A string that is not UTF-8.
    #[error("{what} at byte {offset} is not valid UTF-8")]
    InvalidUtf8 {
        /// What the string is.
        what: String,
        /// Where it starts.
        offset: u64,
    },
    /// A metadata value type id outside the GGUF specification.
    #[error("metadata key {key:?} has unknown value type {type_id} (at byte {offset})")]
    UnknownValueType {
        /// The key.
        key: String,
        /// The type id read.
        type_id: u32,
        /// Where the type id is.
        offset: u64,
    },
    /// Arrays nested deeper than any real file uses.
    #[error("metadata key {key:?} nests arrays deeper than {max} levels")]
    NestingTooDeep {
        /// The key.
        key: String,
        /// The limit.
        max: usize,
    },
    /// `general.alignment` is zero, not a power of two, or not a `u32`.
    #[error("invalid general.alignment {value}: it must be a non-zero power of two")]
    BadAlignment {
        /// The value found (as text, since its type may be wrong too).
        value: String,
    },
    /// The same tensor name appears twice.
    #[error("tensor {name:?} appears more than once")]
    DuplicateTensor {
        /// The name.
        name: String,
    },

    // --- a tensor's description ---
    /// A ggml type id this reader does not know the block layout of.
    #[error("tensor {tensor:?} has unknown or unsupported ggml type id {type_id}")]
    UnknownTensorType {
        /// The tensor.
        tensor: String,
        /// The type id.
        type_id: u32,
    },
    /// A shape that is not usable (too many dims, zero, overflow, partial block).
    #[error("tensor {tensor:?} has an invalid shape {dims:?}: {reason}")]
    BadShape {
        /// The tensor.
        tensor: String,
        /// Its dims in ggml order.
        dims: Vec<u64>,
        /// Why it is invalid.
        reason: String,
    },
    /// Tensor data that is misaligned or extends past the end of the file.
    #[error("tensor {tensor:?}: data at offset {offset} (+{size} bytes) {reason} (data section starts at {data_start}, file is {file_len} bytes)")]
    TensorOutOfBounds {
        /// The tensor.
        tensor: String,
        /// Its offset relative to the data section.
        offset: u64,
        /// Its size in bytes.
        size: u64,
        /// Where the data section starts.
        data_start: u64,
        /// The file length.
        file_len: u64,
        /// What is wrong.
        reason: &'static str,
    },

    // --- looking things up ---
    /// A metadata key that is not in the file.
    #[error("GGUF metadata has no key {key:?}")]
    MissingKey {
        /// The key.
        key: String,
    },
    /// A metadata key whose value has another type.
    #[error("GGUF metadata key {key:?} is {found}, expected {expected}")]
    WrongType {
        /// The key.
        key: String,
        /// The type wanted.
        expected: &'static str,
        /// The type found.
        found: &'static str,
    },
    /// A tensor name that is not in the file.
    #[error("GGUF file has no tensor {name:?}")]
    MissingTensor {
        /// The name.
        name: String,
    },

    // --- dequantization ---
    /// The ggml type is known but this crate cannot dequantize it.
    #[error("dequantization of {ty} is not implemented")]
    DequantUnsupported {
        /// The type.
        ty: GgmlType,
    },
    /// Source and destination lengths do not describe the same blocks.
    #[error("dequantize {ty}: {src_bytes} source bytes and {dst_len} outputs do not match (block = {block_elems} values in {block_bytes} bytes)")]
    DequantLength {
        /// The type.
        ty: GgmlType,
        /// Source length in bytes.
        src_bytes: usize,
        /// Destination length in values.
        dst_len: usize,
        /// Values per block.
        block_elems: usize,
        /// Bytes per block.
        block_bytes: usize,
    },
    /// Rows of q/k weights that cannot be split into heads as asked.
    #[error("cannot un-permute {rows} rows into {n_heads} heads of head_dim {head_dim} (head_dim must be even and rows = heads * head_dim)")]
    BadRopePermutation {
        /// Rows in the tensor.
        rows: usize,
        /// Heads asked for.
        n_heads: usize,
        /// Head dimension asked for.
        head_dim: usize,
    },
}

/// Result of this module.
pub type Result<T, E = GgufError> = std::result::Result<T, E>;

/// The ggml tensor types this reader knows the block layout of.
///
/// Every known type can be located and size-checked; [`GgmlType::can_dequantize`]
/// tells which ones convert to `f32`.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// 32 values: f16 scale, 16 bytes of 4-bit values offset by 8.
    Q4_0,
    /// 32 values: f16 scale, f16 min, 16 bytes of 4-bit values.
    Q4_1,
    /// 32 values, 5-bit with a scale.
    Q5_0,
    /// 32 values, 5-bit with a scale and a min.
    Q5_1,
    /// 32 values: f16 scale, 32 signed bytes.
    Q8_0,
    /// 32 values: f16 scale, f16 sum, 32 signed bytes.
    Q8_1,
    /// K-quant, 2-bit super-blocks of 256.
    Q2_K,
    /// K-quant, 3-bit super-blocks of 256.
    Q3_K,
    /// K-quant, 4-bit super-blocks of 256 with 6-bit scales and mins.
    Q4_K,
    /// K-quant, 5-bit super-blocks of 256.
    Q5_K,
    /// K-quant, 6-bit super-blocks of 256 with 8-bit scales.
    Q6_K,
    /// K-quant, 8-bit super-blocks of 256 (used for activations).
    Q8_K,
    /// 8-bit integer.
    I8,
    /// 16-bit integer.
    I16,
    /// 32-bit integer.
    I32,
    /// 64-bit integer.
    I64,
    /// 64-bit float.
    F64,
    /// bfloat16.
    BF16,
}

impl GgmlType {
    /// The type for a ggml type id, if this reader knows its layout.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            9 => Self::Q8_1,
            10 => Self::Q2_K,
            11 => Self::Q3_K,
            12 => Self::Q4_K,
            13 => Self::Q5_K,
            14 => Self::Q6_K,
            15 => Self::Q8_K,
            24 => Self::I8,
            25 => Self::I16,
            26 => Self::I32,
            27 => Self::I64,
            28 => Self::F64,
            30 => Self::BF16,
            _ => return None,
        })
    }

    /// The ggml type id.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q8_1 => 9,
            Self::Q2_K => 10,
            Self::Q3_K => 11,
            Self::Q4_K => 12,
            Self::Q5_K => 13,
            Self::Q6_K => 14,
            Self::Q8_K => 15,
            Self::I8 => 24,
            Self::I16 => 25,
            Self::I32 => 26,
            Self::I64 => 27,
            Self::F64 => 28,
            Self::BF16 => 30,
        }
    }

    /// Values per block (1 for plain types).
    pub fn block_elems(self) -> usize {
        match self {
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 | Self::Q8_1 => 32,
            Self::Q2_K | Self::Q3_K | Self::Q4_K | Self::Q5_K | Self::Q6_K | Self::Q8_K => 256,
            _ => 1,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::I8 => 1,
            Self::I64 | Self::F64 => 8,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Q8_1 => 36,
            Self::Q2_K => 84,
            Self::Q3_K => 110,
            Self::Q4_K => 144,
            Self::Q5_K => 176,
            Self::Q6_K => 210,
            Self::Q8_K => 292,
        }
    }

    /// Bytes taken by `n_elems` values (which must be a whole number of blocks).
    pub fn bytes_for(self, n_elems: usize) -> Option<usize> {
        if n_elems % self.block_elems() != 0 {
            return None;
        }
        (n_elems / self.block_elems()).checked_mul(self.block_bytes())
    }

    /// Whether [`dequantize`] converts this type.
    pub fn can_dequantize(self) -> bool {
        matches!(
            self,
            Self::F32
                | Self::F16
                | Self::BF16
                | Self::Q8_0
                | Self::Q4_0
                | Self::Q4_1
                | Self::Q4_K
                | Self::Q6_K
        )
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetadataValue {
    /// `u8`.
    U8(u8),
    /// `i8`.
    I8(i8),
    /// `u16`.
    U16(u16),
    /// `i16`.
    I16(i16),
    /// `u32`.
    U32(u32),
    /// `i32`.
    I32(i32),
    /// `f32`.
    F32(f32),
    /// `bool`.
    Bool(bool),
    /// UTF-8 string.
    String(String),
    /// Array of values of one type.
    Array(Vec<MetadataValue>),
    /// `u64`.
    U64(u64),
    /// `i64`.
    I64(i64),
    /// `f64`.
    F64(f64),
}

impl MetadataValue {
    /// A short name of the value's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::U8(_) => "u8",
            Self::I8(_) => "i8",
            Self::U16(_) => "u16",
            Self::I16(_) => "i16",
            Self::U32(_) => "u32",
            Self::I32(_) => "i32",
            Self::F32(_) => "f32",
            Self::Bool(_) => "bool",
            Self::String(_) => "string",
            Self::Array(_) => "array",
            Self::U64(_) => "u64",
            Self::I64(_) => "i64",
            Self::F64(_) => "f64",
        }
    }

    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer, if it is an integer that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Self::I8(v) => Some(v.into()),
            Self::I16(v) => Some(v.into()),
            Self::I32(v) => Some(v.into()),
            Self::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a float, if it is a float or an integer.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v.into()),
            Self::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// The value as a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// The value as a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as an array.
    pub fn as_array(&self) -> Option<&[MetadataValue]> {
        match self {
            Self::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor's description from the header.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// The tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions in ggml order (`dims[0]` is the row length).
    pub dims: Vec<u64>,
    /// Storage type.
    pub ty: GgmlType,
    /// Offset of the data relative to the data section.
    pub offset: u64,
    /// Size of the data in bytes.
    pub size_bytes: u64,
}

impl TensorInfo {
    /// Number of values.
    pub fn n_elems(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Dimensions in row-major (PyTorch) order: the reverse of [`TensorInfo::dims`].
    pub fn shape(&self) -> Vec<usize> {
        // Dims were checked at parse time to fit in usize (their product does).
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Length of one row (`dims[0]`).
    pub fn row_len(&self) -> usize {
        self.dims.first().map_or(1, |&d| d as usize)
    }

    /// Number of rows (the product of all dims but the first).
    pub fn n_rows(&self) -> usize {
        self.dims.iter().skip(1).product::<u64>() as usize
    }

    /// Bytes of one row in the storage type.
    pub fn row_bytes(&self) -> usize {
        self.row_len() / self.ty.block_elems() * self.ty.block_bytes()
    }
}

/// The parsed header: metadata and tensor infos, with the data section located.
#[derive(Debug, Clone)]
pub struct GgufHeader {
    /// GGUF version (2 or 3).
    pub version: u32,
    /// Metadata in file order.
    pub metadata: Vec<(String, MetadataValue)>,
    /// Tensors in file order.
    pub tensors: Vec<TensorInfo>,
    /// Data alignment (`general.alignment`, default 32).
    pub alignment: u64,
    /// Absolute offset of the data section.
    pub data_start: u64,
    metadata_index: HashMap<String, usize>,
    tensor_index: HashMap<String, usize>,
}

/// The default `general.alignment`.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The deepest array nesting accepted in metadata.
const MAX_ARRAY_NESTING: usize = 8;
/// ggml's GGML_MAX_DIMS.
const MAX_DIMS: u32 = 4;

impl GgufHeader {
    /// Parses and validates the header of a whole GGUF file held in `bytes`.
    ///
    /// Checks that every tensor's data is aligned and lies inside `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let mut cur = Cursor { bytes, pos: 0 };
        let magic = cur.peek_prefix(4);
        if magic != b"GGUF" {
            return Err(GgufError::BadMagic {
                found: magic.to_vec(),
            });
        }
        cur.pos = 4;
        let version = cur.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion { version });
        }
        let n_tensors = cur.u64("tensor count")?;
        let n_kv = cur.u64("metadata count")?;
        // A key/value needs at least 8 (key length) + 4 (type) + 1 bytes; a
        // tensor info at least 8 + 4 + 8 + 4 + 8. This bounds the allocations.
        let n_kv = cur.bounded_count(n_kv, 13, "metadata count")?;
        let n_tensors = cur.bounded_count(n_tensors, 32, "tensor count")?;

        let mut metadata = Vec::with_capacity(n_kv);
        let mut metadata_index = HashMap::with_capacity(n_kv);
        for _ in 0..n_kv {
            let key = cur.string("metadata key")?;
            let type_offset = cur.pos as u64;
            let type_id = cur.u32("metadata value type")?;
            let value = cur.value(&key, type_id, type_offset, 0)?;
            // A repeated key keeps the last value, as gguf-py does.
            metadata_index.insert(key.clone(), metadata.len());
            metadata.push((key, value));
        }

        let alignment = match metadata_index.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(&i) => match &metadata[i].1 {
                MetadataValue::U32(a) if a.is_power_of_two() => u64::from(*a),
                other => {
                    return Err(GgufError::BadAlignment {
                        value: format!("{other:?}"),
                    })
                }
            },
        };

        let mut tensors = Vec::with_capacity(n_tensors);
        let mut tensor_index = HashMap::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let info = cur.tensor_info()?;
            if tensor_index
                .insert(info.name.clone(), tensors.len())
                .is_some()
            {
                return Err(GgufError::DuplicateTensor { name: info.name });
            }
            tensors.push(info);
        }

        let file_len = bytes.len() as u64;
        let header_end = cur.pos as u64;
        let data_start = header_end.div_ceil(alignment) * alignment;
        for t in &tensors {
            let oob = |reason| GgufError::TensorOutOfBounds {
                tensor: t.name.clone(),
                offset: t.offset,
                size: t.size_bytes,
                data_start,
                file_len,
                reason,
            };
            if t.offset % alignment != 0 {
                return Err(oob("is not a multiple of general.alignment"));
            }
            let end = data_start
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(t.size_bytes))
                .ok_or_else(|| oob("overflows"))?;
            if end > file_len {
                return Err(oob("ends past the end of the file"));
            }
        }
        Ok(Self {
            version,
            metadata,
            tensors,
            alignment,
            data_start,
            metadata_index,
            tensor_index,
        })
    }

    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&MetadataValue> {
        self.metadata_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// A metadata value by key, or [`GgufError::MissingKey`].
    pub fn require(&self, key: &str) -> Result<&MetadataValue> {
        self.get(key).ok_or_else(|| GgufError::MissingKey {
            key: key.to_string(),
        })
    }

    /// A metadata string.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.require(key)?;
        v.as_str().ok_or_else(|| wrong_type(key, "string", v))
    }

    /// A metadata non-negative integer of any width.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self.require(key)?;
        v.as_u64()
            .ok_or_else(|| wrong_type(key, "non-negative integer", v))
    }

    /// A metadata number (float or integer).
    pub fn get_f64(&self, key: &str) -> Result<f64> {
        let v = self.require(key)?;
        v.as_f64().ok_or_else(|| wrong_type(key, "number", v))
    }

    /// A metadata bool.
    pub fn get_bool(&self, key: &str) -> Result<bool> {
        let v = self.require(key)?;
        v.as_bool().ok_or_else(|| wrong_type(key, "bool", v))
    }

    /// A metadata array.
    pub fn get_array(&self, key: &str) -> Result<&[MetadataValue]> {
        let v = self.require(key)?;
        v.as_array().ok_or_else(|| wrong_type(key, "array", v))
    }

    /// A tensor's info by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }
}

fn wrong_type(key: &str, expected: &'static str, found: &MetadataValue) -> GgufError {
    GgufError::WrongType {
        key: key.to_string(),
        expected,
        found: found.type_name(),
    }
}

/// A bounds-checked little-endian reader over the file bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn peek_prefix(&self, n: usize) -> &'a [u8] {
        &self.bytes[..n.min(self.bytes.len())]
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                what: what.to_string(),
                offset: self.pos as u64,
                needed: n as u64,
                available: self.remaining() as u64,
            });
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Checks that `count` items of at least `min_item_bytes` each can fit in
    /// the rest of the file, so that allocating
    /// `count` slots is bounded by the file size.
    fn bounded_count(&self, count: u64, min_item_bytes: u64, what: &str) -> Result<usize> {
        let available = self.remaining() as u64;
        match count.checked_mul(min_item_bytes) {
            Some(need) if need <= available => Ok(count as usize),
            _ => Err(GgufError::ImplausibleCount {
                what: what.to_string(),
                offset: self.pos as u64,
                count,
                available,
            }),
        }
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len_offset = self.pos as u64;
        let len = self.u64(what)?;
        if len > self.remaining() as u64 {
            return Err(GgufError::ImplausibleCount {
                what: format!("length of {what}"),
                offset: len_offset,
                count: len,
                available: self.remaining() as u64,
            });
        }
        let start = self.pos as u64;
        let raw = self.take(len as usize, what)?;
        String::from_utf8(raw.to_vec()).map_err(|_| GgufError::InvalidUtf8 {
            what: what.to_string(),
            offset: start,
        })
    }

    fn value(
        &mut self,
        key: &str,
        type_id: u32,
        type_offset: u64,
        depth: usize,
    ) -> Result<MetadataValue> {
        let what = || format!("value of {key:?}");
        Ok(match type_id {
            0 => MetadataValue::U8(self.array::<1>(&what())?[0]),
            1 => MetadataValue::I8(i8::from_le_bytes(self.array(&what())?)),
            2 => MetadataValue::U16(u16::from_le_bytes(self.array(&what())?)),
            3 => MetadataValue::I16(i16::from_le_bytes(self.array(&what())?)),
            4 => MetadataValue::U32(u32::from_le_bytes(self.array(&what())?)),
            5 => MetadataValue::I32(i32::from_le_bytes(self.array(&what())?)),
            6 => MetadataValue::F32(f32::from_le_bytes(self.array(&what())?)),
            7 => MetadataValue::Bool(self.array::<1>(&what())?[0] != 0),
            8 => MetadataValue::String(self.string(&what())?),
            9 => {
                if depth >= MAX_ARRAY_NESTING {
                    return Err(GgufError::NestingTooDeep {
                        key: key.to_string(),
                        max: MAX_ARRAY_NESTING,
                    });
                }
                let elem_type_offset = self.pos as u64;
                let elem_type = self.u32(&what())?;
                let min_elem = match elem_type {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    _ => {
                        return Err(GgufError::UnknownValueType {
                            key: key.to_string(),
                            type_id: elem_type,
                            offset: elem_type_offset,
                        })
                    }
                };
                let count = self.u64(&what())?;
                let count =
                    self.bounded_count(count, min_elem, &format!("array length of {key:?}"))?;
                let mut items = Vec::with_capacity(count);
                for _ in 0..count {
                    items.push(self.value(key, elem_type, elem_type_offset, depth + 1)?);
                }
                MetadataValue::Array(items)
            }
            10 => MetadataValue::U64(u64::from_le_bytes(self.array(&what())?)),
            11 => MetadataValue::I64(i64::from_le_bytes(self.array(&what())?)),
            12 => MetadataValue::F64(f64::from_le_bytes(self.array(&what())?)),
            _ => {
                return Err(GgufError::UnknownValueType {
                    key: key.to_string(),
                    type_id,
                    offset: type_offset,
                })
            }
        })
    }

    fn tensor_info(&mut self) -> Result<TensorInfo> {
        let name = self.string("tensor name")?;
        let n_dims = self.u32(&format!("n_dims of tensor {name:?}"))?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(GgufError::BadShape {
                tensor: name,
                dims: vec![],
                reason: format!("{n_dims} dimensions (must be 1..={MAX_DIMS})"),
            });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(self.u64(&format!("dims of tensor {name:?}"))?);
        }
        let type_id = self.u32(&format!("type of tensor {name:?}"))?;
        let offset = self.u64(&format!("offset of tensor {name:?}"))?;
        let ty = GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnknownTensorType {
            tensor: name.clone(),
            type_id,
        })?;
        let bad = |reason: String| GgufError::BadShape {
            tensor: name.clone(),
            dims: dims.clone(),
            reason,
        };
        if dims.contains(&0) {
            return Err(bad("a dimension is zero".into()));
        }
        let n_elems = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| usize::try_from(n).is_ok())
            .ok_or_else(|| bad("the number of values overflows".into()))?;
        if dims[0] % ty.block_elems() as u64 != 0 {
            return Err(bad(format!(
                "the row length is not a multiple of the {ty} block of {}",
                ty.block_elems()
            )));
        }
        let size_bytes = ty
            .bytes_for(n_elems as usize)
            .ok_or_else(|| bad("the byte size overflows".into()))? as u64;
        Ok(TensorInfo {
            name,
            dims,
            ty,
            offset,
            size_bytes,
        })
    }
}

/// A memory-mapped GGUF file with its parsed header.
pub struct GgufFile {
    path: PathBuf,
    map: Mmap,
    header: GgufHeader,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("bytes", &self.map.len())
            .field("tensors", &self.header.tensors.len())
            .field("metadata", &self.header.metadata.len())
            .finish()
    }
}

impl GgufFile {
    /// Maps the file and parses its header.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let io = |source| GgufError::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        // SAFETY: the map is read-only and private to this process; like every
        // mmap-based model loader we rely on the file not being truncated or
        // rewritten while it is mapped (the data would change under us, but
        // Rust-visible memory stays valid until the map is dropped).
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let header = GgufHeader::parse(&map)?;
        Ok(Self { path, map, header })
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The parsed header.
    pub fn header(&self) -> &GgufHeader {
        &self.header
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// A tensor's info, or [`GgufError::MissingTensor`].
    pub fn tensor_info(&self, name: &str) -> Result<&TensorInfo> {
        self.header
            .tensor(name)
            .ok_or_else(|| GgufError::MissingTensor {
                name: name.to_string(),
            })
    }

    /// The stored bytes of a tensor (bounds were checked when parsing).
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        tensor_slice(&self.map, &self.header, info)
    }

    /// The stored bytes of rows `rows` of a tensor (a row is `dims[0]`
    /// values), e.g. to dequantize one tile of a weight inside a matmul.
    pub fn tensor_rows(&self, info: &TensorInfo, rows: std::ops::Range<usize>) -> Result<&[u8]> {
        if rows.start > rows.end || rows.end > info.n_rows() {
            return Err(GgufError::BadShape {
                tensor: info.name.clone(),
                dims: info.dims.clone(),
                reason: format!("rows {rows:?} asked of {} rows", info.n_rows()),
            });
        }
        let rb = info.row_bytes();
        Ok(&self.tensor_data(info)[rows.start * rb..rows.end * rb])
    }

    /// A tensor converted to `f32`, in ggml order (row after row).
    pub fn dequantize_tensor(&self, name: &str) -> Result<Vec<f32>> {
        let info = self.tensor_info(name)?;
        let mut out = vec![0f32; info.n_elems() as usize];
        dequantize(info.ty, self.tensor_data(info), &mut out)?;
        Ok(out)
    }
}

/// The bytes of `info` inside `file` (the whole file the header was parsed from).
///
/// The header validated the range against that file; for another slice the
/// range is clamped, so a mismatched slice gives a short result, never a panic.
pub fn tensor_slice<'a>(file: &'a [u8], header: &GgufHeader, info: &TensorInfo) -> &'a [u8] {
    let start = (header.data_start + info.offset) as usize;
    let end = start.saturating_add(info.size_bytes as usize);
    file.get(start..end).unwrap_or(&[])
}

// ---------------------------------------------------------------------------
// Dequantization.

/// Converts whole blocks of `ty` in `src` to `f32` in `dst`.
///
/// `dst.len()` must be a multiple of the block size and `src` exactly the
/// bytes of those blocks. Works on any block-aligned part of a tensor, so a
/// matmul can convert one tile of a row at a time.
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<()> {
    let (be, bb) = (ty.block_elems(), ty.block_bytes());
    if dst.len() % be != 0 || dst.len() / be * bb != src.len() {
        return Err(GgufError::DequantLength {
            ty,
            src_bytes: src.len(),
            dst_len: dst.len(),
            block_elems: be,
            block_bytes: bb,
        });
    }
    match ty {
        GgmlType::F32 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            }
        }
        GgmlType::F16 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = f16::from_le_bytes([s[0], s[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = bf16::from_le_bytes([s[0], s[1]]).to_f32();
            }
        }
        GgmlType::Q8_0 => blocks(src, dst, dequantize_block_q8_0),
        GgmlType::Q4_0 => blocks(src, dst, dequantize_block_q4_0),
        GgmlType::Q4_1 => blocks(src, dst, dequantize_block_q4_1),
        GgmlType::Q4_K => blocks(src, dst, dequantize_block_q4_k),
        GgmlType::Q6_K => blocks(src, dst, dequantize_block_q6_k),
        _ => return Err(GgufError::DequantUnsupported { ty }),
    }
    Ok(())
}

fn blocks<const BB: usize, const BE: usize>(
    src: &[u8],
    dst: &mut [f32],
    f: fn(&[u8; BB], &mut [f32; BE]),
) {
    for (s, d) in src.chunks_exact(BB).zip(dst.chunks_exact_mut(BE)) {
        // chunks_exact yields exactly BB / BE items, so both conversions succeed.
        if let (Ok(s), Ok(d)) = (s.try_into(), d.try_into()) {
            f(s, d);
        }
    }
}

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// One Q8_0 block (34 bytes: f16 scale, 32 × i8) to 32 values.
#[inline]
pub fn dequantize_block_q8_0(src: &[u8; 34], dst: &mut [f32; 32]) {
    let d = f16_at(src, 0);
    for (o, &q) in dst.iter_mut().zip(&src[2..]) {
        *o = f32::from(q as i8) * d;
    }
}

/// One Q4_0 block (18 bytes: f16 scale, 16 bytes of nibbles offset by 8) to 32 values.
///
/// Low nibbles are values 0..16, high nibbles values 16..32.
#[inline]
pub fn dequantize_block_q4_0(src: &[u8; 18], dst: &mut [f32; 32]) {
    let d = f16_at(src, 0);
    for (j, &q) in src[2..].iter().enumerate() {
        dst[j] = (f32::from(q & 0x0f) - 8.0) * d;
        dst[j + 16] = (f32::from(q >> 4) - 8.0) * d;
    }
}

/// One Q4_1 block (20 bytes: f16 scale, f16 min, 16 bytes of nibbles) to 32 values.
#[inline]
pub fn dequantize_block_q4_1(src: &[u8; 20], dst: &mut [f32; 32]) {
    let d = f16_at(src, 0);
    let m = f16_at(src, 2);
    for (j, &q) in src[4..].iter().enumerate() {
        dst[j] = f32::from(q & 0x0f) * d + m;
        dst[j + 16] = f32::from(q >> 4) * d + m;
    }
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K/Q5_K super-block.
#[inline]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// One Q4_K super-block (144 bytes: f16 d, f16 dmin, 12 bytes of packed
/// 6-bit scales/mins, 128 bytes of nibbles) to 256 values.
pub fn dequantize_block_q4_k(src: &[u8; 144], dst: &mut [f32; 256]) {
    let d = f16_at(src, 0);
    let dmin = f16_at(src, 2);
    let scales = &src[4..16];
    let qs = &src[16..];
    for chunk in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, m1) = (d * f32::from(sc1), dmin * f32::from(m1));
        let (d2, m2) = (d * f32::from(sc2), dmin * f32::from(m2));
        let q = &qs[chunk * 32..chunk * 32 + 32];
        let out = &mut dst[chunk * 64..chunk * 64 + 64];
        for l in 0..32 {
            out[l] = d1 * f32::from(q[l] & 0x0f) - m1;
            out[l + 32] = d2 * f32::from(q[l] >> 4) - m2;
        }
    }
}

/// One Q6_K super-block (210 bytes: 128 bytes low nibbles, 64 bytes high
/// bits, 16 × i8 scales, f16 d) to 256 values.
pub fn dequantize_block_q6_k(src: &[u8; 210], dst: &mut [f32; 256]) {
    let d = f16_at(src, 208);
    for half in 0..2 {
        let ql = &src[half * 64..half * 64 + 64];
        let qh = &src[128 + half * 32..128 + half * 32 + 32];
        let sc = &src[192 + half * 8..192 + half * 8 + 8];
        let out = &mut dst[half * 128..half * 128 + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            let s = |k: usize| d * f32::from(sc[is + k] as i8);
            out[l] = s(0) * q1 as f32;
            out[l + 32] = s(2) * q2 as f32;
            out[l + 64] = s(4) * q3 as f32;
            out[l + 96] = s(6) * q4 as f32;
        }
    }
}

// ---------------------------------------------------------------------------
// llama-family hyperparameters and the q/k RoPE permutation.

/// Decoder hyperparameters of a llama-family GGUF (`llama`, `qwen2`, `qwen3`,
/// `qwen3vl`, ...), read from `<architecture>.*` metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaHyperparams {
    /// `general.architecture`.
    pub architecture: String,
    /// Decoder layers (`block_count`).
    pub n_layers: usize,
    /// Hidden size (`embedding_length`).
    pub hidden_size: usize,
    /// MLP width (`feed_forward_length`).
    pub intermediate_size: usize,
    /// Query heads (`attention.head_count`).
    pub n_heads: usize,
    /// Key/value heads (`attention.head_count_kv`, default = heads).
    pub n_kv_heads: usize,
    /// Head dimension (`attention.key_length`, else `rope.dimension_count`
    /// when it is smaller, else hidden / heads).
    pub head_dim: usize,
    /// Dimensions rotated by RoPE (`rope.dimension_count`, default head_dim).
    pub rope_dim: usize,
    /// RoPE base (`rope.freq_base`, default 10000).
    pub rope_theta: f64,
    /// RMSNorm epsilon (`attention.layer_norm_rms_epsilon`).
    pub rms_norm_eps: f64,
    /// Vocabulary size (`vocab_size`, else the tokenizer's token count).
    pub vocab_size: usize,
    /// Training context (`context_length`).
    pub context_length: usize,
    /// Whether the output projection reuses the token embedding (no `output.weight`).
    pub tied_embeddings: bool,
    /// Whether `attn_q`/`attn_k` rows are permuted for adjacent-pair RoPE
    /// (see the module docs): true for `llama`-style architectures.
    pub qk_rows_permuted: bool,
    /// M-RoPE sections (`rope.dimension_sections`, Qwen-VL files); empty when absent.
    pub rope_sections: Vec<usize>,
}

impl LlamaHyperparams {
    /// Reads the hyperparameters from a parsed header.
    pub fn from_header(h: &GgufHeader) -> Result<Self> {
        let arch = h.get_str("general.architecture")?.to_string();
        let key = |k: &str| format!("{arch}.{k}");
        let usize_of = |k: &str| h.get_u64(&key(k)).map(|v| v as usize);
        let n_layers = usize_of("block_count")?;
        let hidden_size = usize_of("embedding_length")?;
        let intermediate_size = usize_of("feed_forward_length")?;
        let n_heads = usize_of("attention.head_count")?;
        let n_kv_heads = match h.get(&key("attention.head_count_kv")) {
            Some(_) => usize_of("attention.head_count_kv")?,
            None => n_heads,
        };
        if n_heads == 0 || n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
            return Err(GgufError::BadShape {
                tensor: key("attention.head_count"),
                dims: vec![n_heads as u64, n_kv_heads as u64],
                reason: "heads must be non-zero and a multiple of the kv heads".into(),
            });
        }
        let head_dim = match h.get(&key("attention.key_length")) {
            Some(_) => usize_of("attention.key_length")?,
            None => hidden_size / n_heads,
        };
        let rope_dim = match h.get(&key("rope.dimension_count")) {
            Some(_) => usize_of("rope.dimension_count")?,
            None => head_dim,
        };
        let rope_theta = match h.get(&key("rope.freq_base")) {
            Some(_) => h.get_f64(&key("rope.freq_base"))?,
            None => 10_000.0,
        };
        let rms_norm_eps = h.get_f64(&key("attention.layer_norm_rms_epsilon"))?;
        let vocab_size = match h.get(&key("vocab_size")) {
            Some(_) => usize_of("vocab_size")?,
            None => h.get_array("tokenizer.ggml.tokens")?.len(),
        };
        let context_length = usize_of("context_length")?;
        let tied_embeddings = h.tensor("output.weight").is_none();
        let rope_sections = match h.get(&key("rope.dimension_sections")) {
            None => Vec::new(),
            Some(v) => v
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_u64().map(|x| x as usize))
                        .collect()
                })
                .ok_or_else(|| wrong_type(&key("rope.dimension_sections"), "array", v))?,
        };
        let qk_rows_permuted = matches!(
            arch.as_str(),
            "llama" | "mistral" | "granite" | "smollm3" | "deci" | "olmo2"
        );
        Ok(Self {
            architecture: arch,
            n_layers,
            hidden_size,
            intermediate_size,
            n_heads,
            n_kv_heads,
            head_dim,
            rope_dim,
            rope_theta,
            rms_norm_eps,
            vocab_size,
            context_length,
            tied_embeddings,
            qk_rows_permuted,
            rope_sections,
        })
    }
}

/// For a llama q/k weight in GGUF row order: the Hugging Face row that GGUF
/// row `gguf_row` holds. Within each head, GGUF row `2i + half` is Hugging
/// Face row `half * head_dim/2 + i`.
pub fn hf_row_of_gguf_row(gguf_row: usize, head_dim: usize) -> usize {
    let head = gguf_row / head_dim;
    let r = gguf_row % head_dim;
    head * head_dim + (r % 2) * (head_dim / 2) + r / 2
}

/// Reorders the rows of a llama `attn_q`/`attn_k` weight from GGUF order
/// (adjacent-pair RoPE) to Hugging Face order (rotate-half RoPE).
///
/// Works on stored bytes (`row_bytes` per row, any ggml type, since whole
/// rows move) or on `f32` data viewed as bytes. `n_heads` is the number of
/// heads of this projection (kv heads for `attn_k`).
pub fn unpermute_qk_rows(
    src: &[u8],
    row_bytes: usize,
    n_heads: usize,
    head_dim: usize,
) -> Result<Vec<u8>> {
    let rows = src.len().checked_div(row_bytes).unwrap_or(0);
    if row_bytes == 0
        || head_dim % 2 != 0
        || rows != n_heads * head_dim
        || rows * row_bytes != src.len()
    {
        return Err(GgufError::BadRopePermutation {
            rows,
            n_heads,
            head_dim,
        });
    }
    let mut out = vec![0u8; src.len()];
    for g in 0..rows {
        let hf = hf_row_of_gguf_row(g, head_dim);
        out[hf * row_bytes..(hf + 1) * row_bytes]
            .copy_from_slice(&src[g * row_bytes..(g + 1) * row_bytes]);
    }
    Ok(out)
}

/// The Hugging Face parameter name of a llama/qwen GGUF tensor
/// (`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`), or
/// `None` for names outside the decoder's usual set.
pub fn hf_tensor_name(gguf_name: &str) -> Option<String> {
    let global = match gguf_name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(g) = global {
        return Some(g.to_string());
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match part {
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "attn_q.bias" => "self_attn.q_proj.bias",
        "attn_k.bias" => "self_attn.k_proj.bias",
        "attn_v.bias" => "self_attn.v_proj.bias",
        "attn_q_norm.weight" => "self_attn.q_norm.weight",
        "attn_k_norm.weight" => "self_attn.k_norm.weight",
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}
