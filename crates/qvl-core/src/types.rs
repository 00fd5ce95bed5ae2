use serde::{Deserialize, Serialize};
use std::fmt;

/// A level of the memory hierarchy, fastest first.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    /// GPU memory (HBM or GDDR).
    Gpu,
    /// Host RAM (pageable or pinned).
    HostRam,
    /// Local SSD (NVMe), through files.
    Ssd,
}

impl Tier {
    /// Every tier, fastest first.
    pub const ALL: [Tier; 3] = [Tier::Gpu, Tier::HostRam, Tier::Ssd];

    /// The next slower tier, where an evicted object is demoted to.
    pub fn slower(self) -> Option<Tier> {
        match self {
            Tier::Gpu => Some(Tier::HostRam),
            Tier::HostRam => Some(Tier::Ssd),
            Tier::Ssd => None,
        }
    }

    /// Short lowercase name, as used in configs and metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            Tier::Gpu => "gpu",
            Tier::HostRam => "ram",
            Tier::Ssd => "ssd",
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Element type of a tensor, as stored.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DType {
    /// IEEE 754 single precision.
    F32,
    /// IEEE 754 half precision.
    F16,
    /// bfloat16 (8-bit exponent, 7-bit mantissa).
    Bf16,
    /// Signed 8-bit integer (quantized values; scales stored beside them).
    I8,
    /// Unsigned 8-bit integer (raw pixels, bytes).
    U8,
    /// Two signed 4-bit values packed per byte (quantized values).
    I4Packed,
    /// 32-bit signed integer (token ids, positions).
    I32,
    /// 64-bit signed integer.
    I64,
}

impl DType {
    /// Bits one element occupies.
    pub fn bits(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 32,
            DType::F16 | DType::Bf16 => 16,
            DType::I8 | DType::U8 => 8,
            DType::I4Packed => 4,
            DType::I64 => 64,
        }
    }

    /// Bytes that `elements` elements occupy, rounded up to whole bytes.
    pub fn bytes_for(self, elements: usize) -> usize {
        (elements * self.bits()).div_ceil(8)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
            DType::I8 => "i8",
            DType::U8 => "u8",
            DType::I4Packed => "i4x2",
            DType::I32 => "i32",
            DType::I64 => "i64",
        };
        f.write_str(s)
    }
}

/// What a tensor is for. Managers specialize on it: KV blocks get slabs and
/// swapping, weights get streaming, activations get arena reuse.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TensorKind {
    /// Model parameters: read-only, long-lived, large.
    Weight,
    /// Keys and values of attention, in paged blocks.
    KvCache,
    /// Intermediate results of a forward pass: short-lived.
    Activation,
    /// Output of the vision encoder, reusable across requests with the same image.
    VisionEmbedding,
    /// Scratch space of kernels (dequantization tiles, softmax rows).
    Workspace,
}

impl TensorKind {
    /// Every kind.
    pub const ALL: [TensorKind; 5] = [
        TensorKind::Weight,
        TensorKind::KvCache,
        TensorKind::Activation,
        TensorKind::VisionEmbedding,
        TensorKind::Workspace,
    ];

    /// Short lowercase name, as used in configs and metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            TensorKind::Weight => "weight",
            TensorKind::KvCache => "kv_cache",
            TensorKind::Activation => "activation",
            TensorKind::VisionEmbedding => "vision_embedding",
            TensorKind::Workspace => "workspace",
        }
    }
}

impl fmt::Display for TensorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Shape, type and role of a tensor: what managers need to size, place and
/// encode it, without its data.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TensorMeta {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Element type as stored.
    pub dtype: DType,
    /// Role of the tensor.
    pub kind: TensorKind,
    /// Decoder (or vision) layer the tensor belongs to, if any.
    pub layer: Option<u32>,
}

impl TensorMeta {
    /// Metadata of a tensor with no layer.
    pub fn new(shape: impl Into<Vec<usize>>, dtype: DType, kind: TensorKind) -> Self {
        TensorMeta {
            shape: shape.into(),
            dtype,
            kind,
            layer: None,
        }
    }

    /// The same metadata, attached to `layer`.
    pub fn with_layer(mut self, layer: u32) -> Self {
        self.layer = Some(layer);
        self
    }

    /// Number of elements (1 for a scalar).
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes of the data in its stored type.
    pub fn byte_len(&self) -> usize {
        self.dtype.bytes_for(self.elements())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_len_rounds_packed_int4_up() {
        let m = TensorMeta::new(vec![3, 5], DType::I4Packed, TensorKind::KvCache);
        assert_eq!(m.elements(), 15);
        assert_eq!(m.byte_len(), 8);
        let m = TensorMeta::new(vec![2, 16], DType::Bf16, TensorKind::Weight).with_layer(3);
        assert_eq!(m.byte_len(), 64);
        assert_eq!(m.layer, Some(3));
    }

    #[test]
    fn tiers_demote_in_order() {
        assert_eq!(Tier::Gpu.slower(), Some(Tier::HostRam));
        assert_eq!(Tier::HostRam.slower(), Some(Tier::Ssd));
        assert_eq!(Tier::Ssd.slower(), None);
        assert!(Tier::Gpu < Tier::Ssd);
    }
}
