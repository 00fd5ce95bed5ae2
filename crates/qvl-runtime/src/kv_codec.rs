//! KV blocks held encoded (KIVI int8/int4 of `qvl-compress`, or any
//! [`Codec`]): the adapter between the model's paged KV cache
//! ([`KvBlockStorage`]) and the codecs, plus a perplexity run that measures
//! what the encoding costs on a real GGUF model.
//!
//! - The unit of encoding is one layer of one block: keys `[block_tokens,
//!   kv_heads * head_dim]` and values of the same shape, token axis 0.
//!   Keys are quantized per channel (groups along tokens, at most a block
//!   long), values per token (groups along channels), as KIVI does.
//! - A block's layer stays f32 while it is written and while any of its
//!   tokens is among the `recent_tokens` newest of that layer; then it is
//!   encoded once and attention decodes it block by block on every read.
//!   The first `sink_tokens` of the sequence stay exact (f32) inside the
//!   first block's encoding.
//! - Sequence positions come from allocation order: a storage serves one
//!   [`PagedKvCache`](qvl_model::kv::PagedKvCache), which allocates its
//!   blocks in sequence order and releases them all at once (`clear`).
//!
//! Bytes held ([`KvBlockStorage::used_bytes`]) count open blocks at their
//! full f32 allocation and encoded layers at their encoded length;
//! [`CodecKvStorage::stats`] compares them with the f32 and f16 caches of
//! the same blocks and counts the values actually quantized.

use qvl_compress::{
    CompressionConfig, ExactStorage, FactorStorage, GroupQuant, HalfFloat, HalfKind, KvBlockCodec,
    LowRank, Method, QuantAxis, QuantBits, RankRule, Selector, SparseTopK, Target, TokenSpan,
};
use qvl_core::{Codec, MetricEvent, MetricsRecorder, TensorKind};
use qvl_model::kv::PagedKvCache;
use qvl_model::kv::{HostKvStorage, KvBlockId, KvBlockStorage, KvLayerView, KvLayout};
use qvl_model::llama::{GgufTextModel, TextSession};
use qvl_model::{Logits, ModelError, Result};
use rayon::prelude::*;
use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Which encoding the KV cache uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvCodecKind {
    /// f32 blocks, nothing encoded ([`HostKvStorage`]).
    None,
    /// KIVI int8.
    Int8,
    /// KIVI int4.
    Int4,
}

impl KvCodecKind {
    /// The spelling on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            KvCodecKind::None => "none",
            KvCodecKind::Int8 => "int8",
            KvCodecKind::Int4 => "int4",
        }
    }
}

impl fmt::Display for KvCodecKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KvCodecKind {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "none" | "f32" => Ok(KvCodecKind::None),
            "int8" | "q8" => Ok(KvCodecKind::Int8),
            "int4" | "q4" => Ok(KvCodecKind::Int4),
            other => Err(format!(
                "unknown KV codec `{other}`: expected none, int8 or int4"
            )),
        }
    }
}

/// A KV cache encoding as `qvl perplexity --kv-codec` spells it: the KIVI
/// quantizers, low rank, sparse, or the selector choosing per layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KvCodecSpec {
    /// f32 blocks, nothing encoded.
    None,
    /// KIVI int8.
    Int8,
    /// KIVI int4.
    Int4,
    /// Truncated SVD of each layer slab (`[block_tokens, kv_width]`)
    /// keeping this fraction of the rank, factors in f16 (`svd:R`).
    Svd(f64),
    /// Magnitude top-k of each layer slab keeping this fraction of the
    /// values, in CSR (`sparse:R`).
    Sparse(f64),
    /// `qvl-compress`'s selector: per layer and for keys and values apart,
    /// the smallest encoding within an error budget; critical layers exact.
    Auto,
}

impl KvCodecSpec {
    /// The spellings accepted, for error messages.
    pub const NAMES: &'static str = "none, int8, int4, svd:R, sparse:R (R in (0, 1]) or auto";

    /// The KIVI kind, for int8/int4.
    pub fn kivi_kind(self) -> Option<KvCodecKind> {
        match self {
            KvCodecSpec::Int8 => Some(KvCodecKind::Int8),
            KvCodecSpec::Int4 => Some(KvCodecKind::Int4),
            _ => None,
        }
    }
}

impl From<KvCodecKind> for KvCodecSpec {
    fn from(kind: KvCodecKind) -> Self {
        match kind {
            KvCodecKind::None => KvCodecSpec::None,
            KvCodecKind::Int8 => KvCodecSpec::Int8,
            KvCodecKind::Int4 => KvCodecSpec::Int4,
        }
    }
}

impl fmt::Display for KvCodecSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvCodecSpec::None => f.write_str("none"),
            KvCodecSpec::Int8 => f.write_str("int8"),
            KvCodecSpec::Int4 => f.write_str("int4"),
            KvCodecSpec::Svd(r) => write!(f, "svd:{r}"),
            KvCodecSpec::Sparse(r) => write!(f, "sparse:{r}"),
            KvCodecSpec::Auto => f.write_str("auto"),
        }
    }
}

impl FromStr for KvCodecSpec {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let lower = s.trim().to_ascii_lowercase();
        let (name, arg) = match lower.split_once(':') {
            Some((n, a)) => (n, Some(a)),
            None => (lower.as_str(), None),
        };
        let ratio = |what: &str| -> std::result::Result<f64, String> {
            let Some(arg) = arg else {
                return Err(format!(
                    "KV codec `{s}` needs a ratio: {name}:R with R in (0, 1], e.g. {name}:0.5 ({what})"
                ));
            };
            let r: f64 = arg.parse().map_err(|_| {
                format!("KV codec `{s}`: the {what} `{arg}` is not a number (expected {name}:R with R in (0, 1])")
            })?;
            if r > 0.0 && r <= 1.0 {
                Ok(r)
            } else {
                Err(format!(
                    "KV codec `{s}`: the {what} {r} is not within (0, 1]"
                ))
            }
        };
        let no_arg = |spec: KvCodecSpec| match arg {
            None => Ok(spec),
            Some(a) => Err(format!(
                "KV codec `{s}`: `{name}` takes no argument, got `:{a}`"
            )),
        };
        match name {
            "none" | "f32" => no_arg(KvCodecSpec::None),
            "int8" | "q8" => no_arg(KvCodecSpec::Int8),
            "int4" | "q4" => no_arg(KvCodecSpec::Int4),
            "auto" => no_arg(KvCodecSpec::Auto),
            "svd" => Ok(KvCodecSpec::Svd(ratio("rank ratio")?)),
            "sparse" => Ok(KvCodecSpec::Sparse(ratio("fraction kept")?)),
            other => Err(format!(
                "unknown KV codec `{other}`: expected {}",
                Self::NAMES
            )),
        }
    }
}

/// How [`KvCodecSpec::Auto`] chooses.
#[derive(Debug, Clone, PartialEq)]
pub struct AutoKvOptions {
    /// Largest relative Frobenius error of an encoded keys or values slab.
    pub error_budget: f64,
    /// Layers kept exact (negative counts from the last layer).
    pub critical_layers: Vec<i64>,
    /// Rank ratio of the SVD candidate.
    pub svd_rank_ratio: f64,
    /// Fraction kept by the sparse candidate.
    pub sparse_keep_ratio: f64,
}

impl Default for AutoKvOptions {
    fn default() -> Self {
        AutoKvOptions {
            error_budget: 0.1,
            critical_layers: vec![0, -1],
            svd_rank_ratio: 0.25,
            sparse_keep_ratio: 0.1,
        }
    }
}

/// Everything a [`CodecKvStorage`] needs: the encoding, the KIVI settings
/// (group sizes, sinks, recent window; `options.kind` is taken from
/// `spec`) and the selector's settings for `auto`.
#[derive(Debug, Clone, PartialEq)]
pub struct KvCodecPlan {
    /// The encoding.
    pub spec: KvCodecSpec,
    /// Group sizes, sinks and the recent window.
    pub options: KvCodecOptions,
    /// Used by [`KvCodecSpec::Auto`].
    pub auto: AutoKvOptions,
}

impl KvCodecPlan {
    /// `spec` with the default settings.
    pub fn of(spec: KvCodecSpec) -> Self {
        KvCodecPlan {
            spec,
            options: KvCodecOptions::default(),
            auto: AutoKvOptions::default(),
        }
    }
}

/// How a [`CodecKvStorage`] quantizes (KIVI axes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCodecOptions {
    /// The encoding.
    pub kind: KvCodecKind,
    /// Channels per group for values.
    pub group_size: usize,
    /// Tokens per group for keys (capped at the block length).
    pub key_group_tokens: usize,
    /// Symmetric (scale only) instead of asymmetric (scale and minimum).
    pub symmetric: bool,
    /// First tokens of the sequence kept exact (attention sinks).
    pub sink_tokens: usize,
    /// Newest tokens kept exact (their blocks stay f32).
    pub recent_tokens: usize,
    /// Sinks stored as f16 (exact for an f16 cache, half the bytes)
    /// instead of f32.
    pub sinks_f16: bool,
}

impl Default for KvCodecOptions {
    fn default() -> Self {
        KvCodecOptions {
            kind: KvCodecKind::Int4,
            group_size: 64,
            key_group_tokens: 128,
            symmetric: false,
            sink_tokens: 4,
            recent_tokens: 32,
            sinks_f16: true,
        }
    }
}

impl KvCodecOptions {
    /// The defaults with `kind`.
    pub fn of(kind: KvCodecKind) -> Self {
        KvCodecOptions {
            kind,
            ..Self::default()
        }
    }
}

/// The codecs of one layer slab.
#[derive(Clone)]
enum SlabCodec {
    /// KIVI: keys per channel, values per token, sinks exact.
    Kivi {
        keys: KvBlockCodec,
        values: KvBlockCodec,
    },
    /// Any codec, same for keys and values, the slab treated as a whole.
    Plain(Arc<dyn Codec>),
    /// The selector's choice per layer and for keys and values apart.
    Auto(Arc<Selector>),
}

/// Sink tokens of a slab encoded by a plain codec, kept beside it.
enum ExactRows {
    F32(Vec<f32>),
    F16(Vec<u16>),
}

impl ExactRows {
    fn new(values: &[f32], f16: bool) -> ExactRows {
        if f16 {
            let mut words = vec![0u16; values.len()];
            HalfFloat::to_bits(HalfKind::F16, values, &mut words);
            ExactRows::F16(words)
        } else {
            ExactRows::F32(values.to_vec())
        }
    }

    fn bytes(&self) -> usize {
        match self {
            ExactRows::F32(v) => 4 * v.len(),
            ExactRows::F16(v) => 2 * v.len(),
        }
    }

    /// Writes the rows over the start of `out`.
    fn restore(&self, out: &mut [f32]) {
        match self {
            ExactRows::F32(v) => out[..v.len()].copy_from_slice(v),
            ExactRows::F16(v) => HalfFloat::from_bits(HalfKind::F16, v, &mut out[..v.len()]),
        }
    }
}

/// One layer of one block.
enum Slab {
    /// Written or recent: f32, `block_tokens * token_width` each.
    Open { keys: Vec<f32>, values: Vec<f32> },
    /// Encoded bytes; `quantized` values (keys and values) went through
    /// the quantizer, the rest is exact.
    Encoded {
        keys: Vec<u8>,
        values: Vec<u8>,
        quantized: usize,
        exact_bytes: usize,
        /// Sink tokens (keys, values) kept beside a plain codec's bytes.
        sinks: Option<(ExactRows, ExactRows)>,
    },
}

struct BlockSlot {
    /// Index of the block in the sequence.
    position: usize,
    layers: Vec<Slab>,
    /// With the attention probe on: every layer's keys and values as
    /// written (f32), not counted as held.
    shadow: Vec<(Vec<f32>, Vec<f32>)>,
}

/// Per layer: what was encoded and what it cost in accuracy.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct KvLayerStats {
    /// Bytes of the encoded slabs of this layer (sinks included).
    pub encoded_bytes: usize,
    /// Values (keys and values) in them.
    pub encoded_values: usize,
    /// Squared error and squared norm of the keys of the encoded slabs.
    pub key_err2: f64,
    /// See `key_err2`.
    pub key_ref2: f64,
    /// Squared error and squared norm of the values.
    pub value_err2: f64,
    /// See `value_err2`.
    pub value_ref2: f64,
    /// Squared difference between attention over the decoded and over the
    /// exact keys and values, same queries (attention probe on).
    pub attn_err2: f64,
    /// Squared norm of attention over the exact keys and values.
    pub attn_ref2: f64,
    /// Query rows (token x head) the probe compared.
    pub attn_rows: usize,
}

impl KvLayerStats {
    /// Bits per value of the encoded slabs.
    pub fn bits_per_value(&self) -> f64 {
        8.0 * self.encoded_bytes as f64 / self.encoded_values.max(1) as f64
    }

    /// Relative Frobenius error of the encoded keys.
    pub fn key_rel_error(&self) -> f64 {
        (self.key_err2 / self.key_ref2.max(f64::MIN_POSITIVE)).sqrt()
    }

    /// Relative Frobenius error of the encoded values.
    pub fn value_rel_error(&self) -> f64 {
        (self.value_err2 / self.value_ref2.max(f64::MIN_POSITIVE)).sqrt()
    }

    /// Relative error of the attention output (all probed rows).
    pub fn attn_rel_error(&self) -> f64 {
        (self.attn_err2 / self.attn_ref2.max(f64::MIN_POSITIVE)).sqrt()
    }
}

/// What a [`CodecKvStorage`] holds, against f32 and f16 caches of the same
/// blocks.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct KvCodecStats {
    /// Blocks allocated.
    pub blocks: usize,
    /// Layer slabs (one layer of one block) encoded.
    pub encoded_slabs: usize,
    /// Layer slabs still f32 (being written or recent).
    pub open_slabs: usize,
    /// Bytes held: open slabs at f32 plus encoded bytes.
    pub held_bytes: usize,
    /// Bytes of the encoded slabs.
    pub encoded_bytes: usize,
    /// Bytes an f32 cache of the same blocks holds.
    pub f32_bytes: usize,
    /// Bytes an f16 cache of the same blocks would hold.
    pub f16_bytes: usize,
    /// Values (keys and values) of the tokens written, per layer summed.
    pub written_values: usize,
    /// Values in encoded slabs.
    pub encoded_values: usize,
    /// Values that went through the quantizer (not sinks, not recent).
    pub quantized_values: usize,
    /// Bytes of the exact (sink) values inside encoded slabs.
    pub exact_bytes: usize,
}

impl KvCodecStats {
    /// f16 bytes of the blocks over bytes held.
    pub fn ratio_vs_f16(&self) -> f64 {
        self.f16_bytes as f64 / self.held_bytes.max(1) as f64
    }

    /// f32 bytes of the blocks over bytes held.
    pub fn ratio_vs_f32(&self) -> f64 {
        self.f32_bytes as f64 / self.held_bytes.max(1) as f64
    }

    /// f16 bytes of the encoded slabs over their encoded bytes (the ratio a
    /// long context approaches).
    pub fn encoded_ratio_vs_f16(&self) -> f64 {
        2.0 * self.encoded_values as f64 / self.encoded_bytes.max(1) as f64
    }

    /// Bits per value of the encoded slabs.
    pub fn encoded_bits_per_value(&self) -> f64 {
        8.0 * self.encoded_bytes as f64 / self.encoded_values.max(1) as f64
    }

    /// Bits per quantized value: encoded bytes without the exact sinks
    /// (codes, scales, minimums, headers), the rate a long context
    /// approaches.
    pub fn quantized_bits_per_value(&self) -> f64 {
        8.0 * self.encoded_bytes.saturating_sub(self.exact_bytes) as f64
            / self.quantized_values.max(1) as f64
    }

    /// Fraction of the written KV values that were quantized.
    pub fn quantized_fraction(&self) -> f64 {
        self.quantized_values as f64 / self.written_values.max(1) as f64
    }
}

/// KV blocks encoded once they are full and out of the recent window,
/// decoded layer by layer when attention reads them.
pub struct CodecKvStorage {
    layout: KvLayout,
    codec: SlabCodec,
    sink_tokens: usize,
    recent_tokens: usize,
    blocks: Vec<Option<BlockSlot>>,
    free: Vec<usize>,
    /// Live slots in sequence order.
    order: Vec<usize>,
    /// Tokens written per layer.
    layer_len: Vec<usize>,
    /// Per layer: sequence index of the first block not encoded yet.
    next_encode: Vec<usize>,
    counters: Arc<Counters>,
    /// Receives a `Compress` event per encoded keys or values slab.
    recorder: Option<Arc<dyn MetricsRecorder>>,
    /// Sinks of plain codecs kept as f16 (else f32).
    sinks_f16: bool,
    /// Keep an exact shadow and measure attention against it.
    probe: bool,
}

/// The storage's counters, shared with its [`KvCodecMonitor`].
#[derive(Default)]
struct Counters {
    blocks: AtomicUsize,
    held_bytes: AtomicUsize,
    encoded_bytes: AtomicUsize,
    encoded_slabs: AtomicUsize,
    quantized_values: AtomicUsize,
    exact_bytes: AtomicUsize,
    /// Tokens written, summed over layers.
    layer_tokens: AtomicUsize,
    /// Per layer (grown on first use).
    layers: Mutex<Vec<KvLayerStats>>,
}

impl Counters {
    /// Runs `f` on layer `layer`'s tally.
    fn with_layer(&self, layer: usize, f: impl FnOnce(&mut KvLayerStats)) {
        // A poisoned lock only means a thread panicked mid-update; the sums stay usable.
        let mut layers = self.layers.lock().unwrap_or_else(|p| p.into_inner());
        if layers.len() <= layer {
            layers.resize(layer + 1, KvLayerStats::default());
        }
        f(&mut layers[layer]);
    }

    fn layer_stats(&self, num_layers: usize) -> Vec<KvLayerStats> {
        let mut out = self
            .layers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        out.resize(num_layers.max(out.len()), KvLayerStats::default());
        out
    }

    fn add(field: &AtomicUsize, n: usize) {
        field.fetch_add(n, Ordering::Relaxed);
    }

    fn sub(field: &AtomicUsize, n: usize) {
        field.fetch_sub(n, Ordering::Relaxed);
    }

    fn stats(&self, layout: KvLayout) -> KvCodecStats {
        let get = |f: &AtomicUsize| f.load(Ordering::Relaxed);
        let blocks = get(&self.blocks);
        let encoded_slabs = get(&self.encoded_slabs);
        let half = layout.block_tokens * layout.token_width();
        KvCodecStats {
            blocks,
            encoded_slabs,
            open_slabs: (blocks * layout.layers).saturating_sub(encoded_slabs),
            held_bytes: get(&self.held_bytes),
            encoded_bytes: get(&self.encoded_bytes),
            f32_bytes: blocks * layout.block_floats() * 4,
            f16_bytes: blocks * layout.block_floats() * 2,
            written_values: 2 * get(&self.layer_tokens) * layout.token_width(),
            encoded_values: encoded_slabs * 2 * half,
            quantized_values: get(&self.quantized_values),
            exact_bytes: get(&self.exact_bytes),
        }
    }
}

/// Reads a [`CodecKvStorage`]'s counters after the storage went into a
/// cache.
#[derive(Clone)]
pub struct KvCodecMonitor {
    layout: KvLayout,
    counters: Arc<Counters>,
    selector: Option<Arc<Selector>>,
}

impl KvCodecMonitor {
    /// What the storage holds now.
    pub fn stats(&self) -> KvCodecStats {
        self.counters.stats(self.layout)
    }

    /// Per layer: bytes, errors and (with the probe) attention error.
    pub fn layer_stats(&self) -> Vec<KvLayerStats> {
        self.counters.layer_stats(self.layout.layers)
    }

    /// With `auto`: the codec chosen last for each layer's keys and values.
    pub fn auto_choices(&self) -> Option<Vec<[String; 2]>> {
        let sel = self.selector.as_ref()?;
        let name = |t: Target| {
            if sel.is_critical(t.layer) {
                "exact (critical layer)".to_string()
            } else {
                sel.chosen(&t).map_or_else(|| "-".to_string(), |c| c.name())
            }
        };
        Some(
            (0..self.layout.layers as u32)
                .map(|l| [name(Target::keys(l)), name(Target::values(l))])
                .collect(),
        )
    }
}

fn kv_err(msg: impl Into<String>) -> ModelError {
    ModelError::KvCache(msg.into())
}

impl CodecKvStorage {
    /// A storage quantizing with KIVI int8/int4 as `options` say; `None`
    /// is refused (use [`HostKvStorage`]).
    pub fn new(layout: KvLayout, options: KvCodecOptions) -> Result<CodecKvStorage> {
        let bits = match options.kind {
            KvCodecKind::Int8 => QuantBits::Int8,
            KvCodecKind::Int4 => QuantBits::Int4,
            KvCodecKind::None => {
                return Err(ModelError::InvalidInput(
                    "CodecKvStorage needs int8 or int4; `none` is HostKvStorage".to_string(),
                ))
            }
        };
        // Key groups run along the tokens of one block; keep them even.
        let key_group = (options.key_group_tokens.min(layout.block_tokens) & !1).max(2);
        let quant = |group: usize, axis: QuantAxis| {
            GroupQuant::new(bits, options.symmetric, group, axis)
                .map_err(|e| ModelError::InvalidInput(format!("KV codec group size {group}: {e}")))
        };
        // Sinks are applied by position here; the recent window by keeping
        // whole blocks open, so the codec itself keeps no recent tokens.
        let exact = if options.sinks_f16 {
            ExactStorage::F16
        } else {
            ExactStorage::F32
        };
        let keys = KvBlockCodec {
            exact,
            ..KvBlockCodec::kivi(
                quant(key_group, QuantAxis::PerChannel)?,
                0,
                options.sink_tokens,
                0,
            )
        };
        let values = KvBlockCodec {
            exact,
            ..KvBlockCodec::kivi(
                quant(options.group_size, QuantAxis::PerToken)?,
                0,
                options.sink_tokens,
                0,
            )
        };
        Ok(Self::with_codec(
            layout,
            SlabCodec::Kivi { keys, values },
            options.sink_tokens,
            options.recent_tokens,
        ))
    }

    /// A storage for `plan`: KIVI for int8/int4, or a plain codec (SVD,
    /// sparse) or the selector (`auto`) over each layer slab, with the
    /// plan's sink tokens kept exact beside the encoding; `none` is
    /// refused (use [`HostKvStorage`]).
    pub fn from_plan(layout: KvLayout, plan: &KvCodecPlan) -> Result<CodecKvStorage> {
        let o = plan.options;
        let bad = |e: String| ModelError::InvalidInput(format!("KV codec {}: {e}", plan.spec));
        let codec = match plan.spec {
            KvCodecSpec::None => {
                return Err(ModelError::InvalidInput(
                    "CodecKvStorage needs a codec; `none` is HostKvStorage".to_string(),
                ))
            }
            KvCodecSpec::Int8 | KvCodecSpec::Int4 => {
                let kind = plan.spec.kivi_kind().unwrap_or(KvCodecKind::Int4);
                return CodecKvStorage::new(layout, KvCodecOptions { kind, ..o });
            }
            KvCodecSpec::Svd(r) => SlabCodec::Plain(Arc::new(
                LowRank::new(RankRule::Ratio(r), FactorStorage::F16)
                    .map_err(|e| bad(e.to_string()))?,
            )),
            KvCodecSpec::Sparse(r) => SlabCodec::Plain(Arc::new(
                SparseTopK::new(r).map_err(|e| bad(e.to_string()))?,
            )),
            KvCodecSpec::Auto => {
                let a = &plan.auto;
                let config = CompressionConfig {
                    enabled: true,
                    methods: vec![Method::Quant, Method::F16, Method::Svd, Method::Sparse],
                    quantization_bits: vec![4, 8],
                    symmetric: o.symmetric,
                    group_size: o.group_size,
                    svd_rank_ratio: a.svd_rank_ratio,
                    sparse_keep_ratio: a.sparse_keep_ratio,
                    error_budget: a.error_budget,
                    critical_layers: a.critical_layers.clone(),
                    // Sinks and the recent window are the storage's business.
                    kv_sink_tokens: 0,
                    kv_recent_tokens: 0,
                    ..CompressionConfig::default()
                };
                let selector =
                    Selector::new(config, layout.layers as u32).map_err(|e| bad(e.to_string()))?;
                SlabCodec::Auto(Arc::new(selector))
            }
        };
        let mut storage = Self::with_codec(layout, codec, o.sink_tokens, o.recent_tokens);
        storage.sinks_f16 = o.sinks_f16;
        Ok(storage)
    }

    /// Keeps an exact f32 copy of every block beside the encoding (not
    /// counted as held) and, on every attention, computes attention over
    /// it with the same queries: [`KvLayerStats::attn_rel_error`].
    pub fn with_attention_probe(mut self) -> CodecKvStorage {
        self.probe = true;
        self
    }

    /// A storage encoding each full layer slab with `codec` (any
    /// `qvl_core::Codec`; sinks are then whatever the codec makes of them).
    pub fn with_plain_codec(
        layout: KvLayout,
        codec: Arc<dyn Codec>,
        recent_tokens: usize,
    ) -> CodecKvStorage {
        Self::with_codec(layout, SlabCodec::Plain(codec), 0, recent_tokens)
    }

    fn with_codec(
        layout: KvLayout,
        codec: SlabCodec,
        sink_tokens: usize,
        recent_tokens: usize,
    ) -> CodecKvStorage {
        CodecKvStorage {
            layout,
            codec,
            sink_tokens,
            recent_tokens,
            blocks: Vec::new(),
            free: Vec::new(),
            order: Vec::new(),
            layer_len: vec![0; layout.layers],
            next_encode: vec![0; layout.layers],
            counters: Arc::default(),
            recorder: None,
            sinks_f16: true,
            probe: false,
        }
    }

    /// Records a [`MetricEvent::Compress`] (kind `KvCache`, bytes in and
    /// out, relative error) for every keys or values slab encoded.
    pub fn with_recorder(mut self, recorder: Arc<dyn MetricsRecorder>) -> CodecKvStorage {
        self.recorder = Some(recorder);
        self
    }

    /// The codec's name, for reports.
    pub fn codec_name(&self) -> String {
        match &self.codec {
            SlabCodec::Kivi { keys, values } => {
                format!("keys {} values {}", keys.name(), values.name())
            }
            SlabCodec::Plain(c) => c.name(),
            SlabCodec::Auto(s) => format!(
                "auto (budget {}, critical layers {:?})",
                s.config().error_budget,
                s.config().critical_layers
            ),
        }
    }

    fn half(&self) -> usize {
        self.layout.block_tokens * self.layout.token_width()
    }

    /// What the storage holds now.
    pub fn stats(&self) -> KvCodecStats {
        self.counters.stats(self.layout)
    }

    /// A handle on the counters that outlives handing the storage to a
    /// cache.
    pub fn monitor(&self) -> KvCodecMonitor {
        KvCodecMonitor {
            layout: self.layout,
            counters: Arc::clone(&self.counters),
            selector: match &self.codec {
                SlabCodec::Auto(s) => Some(Arc::clone(s)),
                _ => None,
            },
        }
    }

    fn slot_mut(&mut self, id: KvBlockId) -> Result<&mut BlockSlot> {
        self.blocks
            .get_mut(id.0 as usize)
            .and_then(Option::as_mut)
            .ok_or_else(|| kv_err(format!("no block {} in the codec KV storage", id.0)))
    }

    /// Encodes layer `layer` of the blocks that left its recent window.
    fn encode_aged(&mut self, layer: usize) -> Result<()> {
        let bt = self.layout.block_tokens;
        let seq_len = self.layer_len[layer];
        while let Some(&slot) = self.order.get(self.next_encode[layer]) {
            let position = self.next_encode[layer];
            if (position + 1) * bt + self.recent_tokens > seq_len {
                break;
            }
            self.encode_slab(slot, position, layer, seq_len)?;
            self.next_encode[layer] += 1;
        }
        Ok(())
    }

    fn encode_slab(
        &mut self,
        slot: usize,
        position: usize,
        layer: usize,
        seq_len: usize,
    ) -> Result<()> {
        let l = self.layout;
        let w = l.token_width();
        let shape = [l.block_tokens, w];
        let first_token = position * l.block_tokens;
        let sinks = self
            .sink_tokens
            .saturating_sub(first_token)
            .min(l.block_tokens);
        let codec = self.codec.clone();
        let half = self.half();
        let sinks_f16 = self.sinks_f16;
        let block = self.blocks[slot]
            .as_mut()
            .ok_or_else(|| kv_err(format!("block slot {slot} in sequence order is free")))?;
        let Slab::Open { keys, values } = &block.layers[layer] else {
            return Err(kv_err(format!(
                "layer {layer} of block {position} is encoded twice"
            )));
        };
        let span = TokenSpan {
            first_token,
            seq_len,
        };
        let encode_err = |what: &str, e: String| {
            kv_err(format!(
                "encoding the {what} of layer {layer}, block {position}: {e}"
            ))
        };
        let (kb, vb, quantized, exact_bytes, reports, sink_rows) = match &codec {
            SlabCodec::Kivi {
                keys: kc,
                values: vc,
            } => {
                let k = kc
                    .encode_span(keys, &shape, span)
                    .map_err(|e| encode_err("keys", e.to_string()))?;
                let v = vc
                    .encode_span(values, &shape, span)
                    .map_err(|e| encode_err("values", e.to_string()))?;
                let width = if kc.exact == ExactStorage::F16 { 2 } else { 4 };
                (
                    k.bytes,
                    v.bytes,
                    2 * (l.block_tokens - sinks) * w,
                    2 * sinks * w * width,
                    [k.report, v.report],
                    None,
                )
            }
            SlabCodec::Plain(_) | SlabCodec::Auto(_) => {
                // Sink rows go beside the encoding, exact; the codec sees
                // zeros there so they do not steer its scales or factors.
                let n = sinks * w;
                let (k_in, v_in, sink_rows) = if n > 0 {
                    let mut k = keys.clone();
                    let mut v = values.clone();
                    k[..n].fill(0.0);
                    v[..n].fill(0.0);
                    let rows = (
                        ExactRows::new(&keys[..n], sinks_f16),
                        ExactRows::new(&values[..n], sinks_f16),
                    );
                    (Cow::Owned(k), Cow::Owned(v), Some(rows))
                } else {
                    (Cow::Borrowed(&keys[..]), Cow::Borrowed(&values[..]), None)
                };
                let (k, v) = match &codec {
                    SlabCodec::Auto(sel) => (
                        sel.encode(Target::keys(layer as u32), &k_in, &shape),
                        sel.encode(Target::values(layer as u32), &v_in, &shape),
                    ),
                    SlabCodec::Plain(c) => (c.encode(&k_in, &shape), c.encode(&v_in, &shape)),
                    SlabCodec::Kivi { .. } => {
                        return Err(kv_err("a KIVI slab reached the plain-codec path"))
                    }
                };
                let k = k.map_err(|e| encode_err("keys", e.to_string()))?;
                let v = v.map_err(|e| encode_err("values", e.to_string()))?;
                let lossy = |c: qvl_core::CodecId| {
                    c != qvl_compress::ids::EXACT_F32 && c != qvl_compress::ids::ZSTD
                };
                let q = (usize::from(lossy(k.codec)) + usize::from(lossy(v.codec))) * (half - n);
                let exact = sink_rows.as_ref().map_or(0, |(a, b)| a.bytes() + b.bytes());
                (k.bytes, v.bytes, q, exact, [k.report, v.report], sink_rows)
            }
        };
        if let Some(r) = &self.recorder {
            for report in reports {
                r.record(&MetricEvent::Compress {
                    kind: TensorKind::KvCache,
                    input_bytes: report.input_bytes,
                    output_bytes: report.output_bytes,
                    rel_error: report.rel_frobenius,
                });
            }
        }
        // The error of this slab as attention will read it back.
        let err2 = |bytes: &[u8], exact: &[f32], rows: Option<&ExactRows>, what: &str| {
            let mut back = vec![0f32; half];
            qvl_compress::decode_any(bytes, &shape, &mut back)
                .map_err(|e| encode_err(what, format!("decoding back: {e}")))?;
            if let Some(rows) = rows {
                rows.restore(&mut back);
            }
            let mut e2 = 0f64;
            let mut r2 = 0f64;
            for (&a, &b) in exact.iter().zip(&back) {
                e2 += ((a - b) as f64).powi(2);
                r2 += (a as f64).powi(2);
            }
            Ok::<_, ModelError>((e2, r2))
        };
        // With the probe: the exact error, decoding back. Without (the
        // serving path, timed by the benchmark): from the codec's own
        // report, which for plain codecs also counts its error on the
        // zeroed sink rows (restored exactly on read): an upper bound.
        let skip = if sink_rows.is_some() { sinks * w } else { 0 };
        let from_report = |r: &qvl_core::CodecReport, exact: &[f32]| {
            let sq = |v: &[f32]| sum_of_squares(v);
            // The codec saw zeros in place of the sink rows.
            let (seen, all) = (sq(&exact[skip..]), sq(exact));
            (r.rel_frobenius.powi(2) * seen, all)
        };
        let ((ke2, kr2), (ve2, vr2)) = if self.probe {
            (
                err2(&kb, keys, sink_rows.as_ref().map(|r| &r.0), "keys")?,
                err2(&vb, values, sink_rows.as_ref().map(|r| &r.1), "values")?,
            )
        } else {
            (
                from_report(&reports[0], keys),
                from_report(&reports[1], values),
            )
        };
        let bytes =
            kb.len() + vb.len() + sink_rows.as_ref().map_or(0, |(a, b)| a.bytes() + b.bytes());
        block.layers[layer] = Slab::Encoded {
            keys: kb,
            values: vb,
            quantized,
            exact_bytes,
            sinks: sink_rows,
        };
        let c = &self.counters;
        Counters::add(&c.held_bytes, bytes);
        Counters::sub(&c.held_bytes, 2 * half * 4);
        Counters::add(&c.encoded_bytes, bytes);
        Counters::add(&c.encoded_slabs, 1);
        Counters::add(&c.quantized_values, quantized);
        Counters::add(&c.exact_bytes, exact_bytes);
        c.with_layer(layer, |t| {
            t.encoded_bytes += bytes;
            t.encoded_values += 2 * half;
            t.key_err2 += ke2;
            t.key_ref2 += kr2;
            t.value_err2 += ve2;
            t.value_ref2 += vr2;
        });
        Ok(())
    }
}

impl KvBlockStorage for CodecKvStorage {
    fn layout(&self) -> KvLayout {
        self.layout
    }

    fn allocate(&mut self) -> Result<KvBlockId> {
        let half = self.half();
        let block = BlockSlot {
            position: self.order.len(),
            layers: (0..self.layout.layers)
                .map(|_| Slab::Open {
                    keys: vec![0f32; half],
                    values: vec![0f32; half],
                })
                .collect(),
            shadow: if self.probe {
                (0..self.layout.layers)
                    .map(|_| (vec![0f32; half], vec![0f32; half]))
                    .collect()
            } else {
                Vec::new()
            },
        };
        let slot = match self.free.pop() {
            Some(i) => {
                self.blocks[i] = Some(block);
                i
            }
            None => {
                self.blocks.push(Some(block));
                self.blocks.len() - 1
            }
        };
        self.order.push(slot);
        Counters::add(&self.counters.blocks, 1);
        Counters::add(&self.counters.held_bytes, self.layout.block_floats() * 4);
        Ok(KvBlockId(slot as u64))
    }

    fn release(&mut self, id: KvBlockId) -> Result<()> {
        let half = self.half();
        let slot = id.0 as usize;
        let block = self
            .blocks
            .get_mut(slot)
            .and_then(Option::take)
            .ok_or_else(|| kv_err(format!("release of unknown block {}", id.0)))?;
        let c = Arc::clone(&self.counters);
        Counters::sub(&c.blocks, 1);
        for (layer, slab) in block.layers.iter().enumerate() {
            match slab {
                Slab::Open { .. } => Counters::sub(&c.held_bytes, 2 * half * 4),
                Slab::Encoded {
                    keys,
                    values,
                    quantized,
                    exact_bytes,
                    sinks,
                } => {
                    let b = keys.len()
                        + values.len()
                        + sinks.as_ref().map_or(0, |(k, v)| k.bytes() + v.bytes());
                    c.with_layer(layer, |t| {
                        t.encoded_bytes -= b;
                        t.encoded_values -= 2 * half;
                    });
                    Counters::sub(&c.held_bytes, b);
                    Counters::sub(&c.encoded_bytes, b);
                    Counters::sub(&c.encoded_slabs, 1);
                    Counters::sub(&c.quantized_values, *quantized);
                    Counters::sub(&c.exact_bytes, *exact_bytes);
                }
            }
            if block.position < self.next_encode[layer] {
                self.next_encode[layer] -= 1;
            }
        }
        self.order.remove(block.position);
        for (position, &s) in self.order.iter().enumerate().skip(block.position) {
            if let Some(b) = self.blocks[s].as_mut() {
                b.position = position;
            }
        }
        // Tokens written beyond the remaining blocks are gone with them.
        let cap = self.order.len() * self.layout.block_tokens;
        self.layer_len.iter_mut().for_each(|n| *n = (*n).min(cap));
        c.layer_tokens
            .store(self.layer_len.iter().sum(), Ordering::Relaxed);
        self.free.push(slot);
        Ok(())
    }

    fn write(
        &mut self,
        id: KvBlockId,
        layer: usize,
        slot: usize,
        keys: &[f32],
        values: &[f32],
    ) -> Result<()> {
        let l = self.layout;
        let w = l.token_width();
        let tokens = l.check_write(layer, slot, keys, values)?;
        let block = self.slot_mut(id)?;
        let position = block.position;
        if let Some((sk, sv)) = block.shadow.get_mut(layer) {
            sk[slot * w..slot * w + keys.len()].copy_from_slice(keys);
            sv[slot * w..slot * w + values.len()].copy_from_slice(values);
        }
        match &mut block.layers[layer] {
            Slab::Open {
                keys: kd,
                values: vd,
            } => {
                kd[slot * w..slot * w + keys.len()].copy_from_slice(keys);
                vd[slot * w..slot * w + values.len()].copy_from_slice(values);
            }
            Slab::Encoded { .. } => {
                return Err(kv_err(format!(
                "write to layer {layer} of block {} (sequence block {position}), already encoded: \
                     only the newest {} tokens can be rewritten",
                id.0, self.recent_tokens
            )))
            }
        }
        let end = position * l.block_tokens + slot + tokens;
        if end > self.layer_len[layer] {
            Counters::add(&self.counters.layer_tokens, end - self.layer_len[layer]);
            self.layer_len[layer] = end;
        }
        self.encode_aged(layer)
    }

    fn read(&self, id: KvBlockId, layer: usize) -> Result<KvLayerView<'_>> {
        let l = self.layout;
        if layer >= l.layers {
            return Err(kv_err(format!("layer {layer} out of {}", l.layers)));
        }
        let block = self
            .blocks
            .get(id.0 as usize)
            .and_then(Option::as_ref)
            .ok_or_else(|| kv_err(format!("no block {} in the codec KV storage", id.0)))?;
        match &block.layers[layer] {
            Slab::Open { keys, values } => Ok(KvLayerView {
                keys: Cow::Borrowed(keys),
                values: Cow::Borrowed(values),
                check: None,
            }),
            Slab::Encoded {
                keys,
                values,
                sinks,
                ..
            } => {
                let shape = [l.block_tokens, l.token_width()];
                let decode = |bytes: &[u8], rows: Option<&ExactRows>, what: &str| {
                    let mut out = vec![0f32; self.half()];
                    qvl_compress::decode_any(bytes, &shape, &mut out).map_err(|e| {
                        kv_err(format!(
                            "decoding the {what} of layer {layer}, block {}: {e}",
                            id.0
                        ))
                    })?;
                    if let Some(rows) = rows {
                        rows.restore(&mut out);
                    }
                    Ok::<_, ModelError>(out)
                };
                Ok(KvLayerView {
                    keys: Cow::Owned(decode(keys, sinks.as_ref().map(|s| &s.0), "keys")?),
                    values: Cow::Owned(decode(values, sinks.as_ref().map(|s| &s.1), "values")?),
                    check: None,
                })
            }
        }
    }

    fn used_bytes(&self) -> usize {
        self.counters.held_bytes.load(Ordering::Relaxed)
    }

    fn observe_attention(
        &self,
        layer: usize,
        queries: &[f32],
        heads: usize,
        scale: f32,
        output: &[f32],
    ) {
        if !self.probe || layer >= self.layout.layers {
            return;
        }
        let l = self.layout;
        let (hd, w) = (l.head_dim, l.token_width());
        let n = queries.len() / (heads * hd).max(1);
        let total = self.layer_len[layer];
        if n == 0 || n > total || heads % l.kv_heads != 0 || output.len() != queries.len() {
            return;
        }
        let group = heads / l.kv_heads;
        let first = total - n;
        let shadow: Vec<&(Vec<f32>, Vec<f32>)> = self
            .order
            .iter()
            .filter_map(|&s| self.blocks[s].as_ref()?.shadow.get(layer))
            .collect();
        let key = |t: usize, kvh: usize| {
            let (b, slot) = (t / l.block_tokens, t % l.block_tokens);
            &shadow[b].0[slot * w + kvh * hd..slot * w + (kvh + 1) * hd]
        };
        let value = |t: usize, kvh: usize| {
            let (b, slot) = (t / l.block_tokens, t % l.block_tokens);
            &shadow[b].1[slot * w + kvh * hd..slot * w + (kvh + 1) * hd]
        };
        if shadow.len() * l.block_tokens < total {
            return;
        }
        // Exact attention per (token, head), in parallel; sums in f64.
        let (err2, ref2) = (0..n * heads)
            .into_par_iter()
            .map(|qh| {
                let (i, h) = (qh / heads, qh % heads);
                let q = &queries[qh * hd..(qh + 1) * hd];
                let kvh = h / group;
                let visible = first + i + 1;
                let scores: Vec<f32> = (0..visible)
                    .map(|t| q.iter().zip(key(t, kvh)).map(|(a, b)| a * b).sum::<f32>() * scale)
                    .collect();
                let max = scores.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let mut acc = vec![0f64; hd];
                let mut sum = 0f64;
                for (t, &sc) in scores.iter().enumerate() {
                    let p = ((sc - max) as f64).exp();
                    sum += p;
                    for (a, &v) in acc.iter_mut().zip(value(t, kvh)) {
                        *a += p * v as f64;
                    }
                }
                let got = &output[qh * hd..(qh + 1) * hd];
                acc.iter().zip(got).fold((0f64, 0f64), |(e, r), (&a, &g)| {
                    let exact = a / sum;
                    (e + (exact - g as f64).powi(2), r + exact * exact)
                })
            })
            .reduce(|| (0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
        self.counters.with_layer(layer, |t| {
            t.attn_err2 += err2;
            t.attn_ref2 += ref2;
            t.attn_rows += n * heads;
        });
    }
}

// ---------------------------------------------------------------------------
// Perplexity of a GGUF model with the KV cache encoded.

/// How [`measure_kv_codecs`] runs the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvEvalOptions {
    /// Tokens per KV block (the quantization unit along tokens for keys).
    pub block_tokens: usize,
    /// Tokens per prefill call. Older tokens are quantized as soon as they
    /// leave the recent window of the tokens written so far, so a chunk of
    /// `c` tokens quantizes at most `c` tokens more than token-by-token
    /// decoding would; 1 is exactly decoding.
    pub chunk_tokens: usize,
}

impl Default for KvEvalOptions {
    fn default() -> Self {
        KvEvalOptions {
            block_tokens: 128,
            chunk_tokens: 16,
        }
    }
}

/// One cache encoding's result over a text, against the f32 cache.
#[derive(Debug, Clone, PartialEq)]
pub struct KvCodecRun {
    /// The encoding.
    pub spec: KvCodecSpec,
    /// The codec in full ("none" for f32).
    pub codec: String,
    /// Perplexity of the text.
    pub perplexity: f64,
    /// Mean negative log-likelihood (nats).
    pub nll_mean: f64,
    /// `perplexity / baseline - 1`.
    pub perplexity_rel_change: f64,
    /// Mean KL(baseline || this) of the next-token distributions (nats).
    pub kl_mean: f64,
    /// Largest per-token KL.
    pub kl_max: f64,
    /// Fraction of positions whose argmax equals the baseline's.
    pub top1_agreement: f64,
    /// What the cache held at the end of the text.
    pub stats: KvCodecStats,
    /// Per layer at the end of the text: bits per value, key and value
    /// error, attention-output error against exact K/V (empty for f32).
    pub layers: Vec<KvLayerStats>,
    /// With `auto`: the codec chosen for each layer's keys and values.
    pub auto_choices: Option<Vec<[String; 2]>>,
    /// Seconds of the run (the attention probe's included).
    pub secs: f64,
}

impl KvCodecRun {
    /// Attention-output relative error over all layers' probed rows.
    pub fn attn_rel_error(&self) -> f64 {
        let (e, r) = self
            .layers
            .iter()
            .fold((0.0, 0.0), |(e, r), l| (e + l.attn_err2, r + l.attn_ref2));
        (e / f64::max(r, f64::MIN_POSITIVE)).sqrt()
    }
}

/// [`measure_kv_codecs`]'s result: the baseline first.
#[derive(Debug, Clone, PartialEq)]
pub struct KvQualityReport {
    /// Tokens of the text scored (the window).
    pub tokens: usize,
    /// The options of the run.
    pub eval: KvEvalOptions,
    /// f32 baseline, then each codec asked for.
    pub runs: Vec<KvCodecRun>,
}

/// A session of `model` whose KV cache uses `options` (`None`: f32 blocks
/// in RAM) with blocks of `block_tokens`.
pub fn text_session(
    model: &GgufTextModel,
    options: KvCodecOptions,
    block_tokens: usize,
) -> Result<TextSession> {
    let layout = model.decoder().kv_layout(block_tokens);
    let storage: Box<dyn KvBlockStorage> = match options.kind {
        KvCodecKind::None => Box::new(HostKvStorage::new(layout)),
        _ => Box::new(CodecKvStorage::new(layout, options)?),
    };
    Ok(TextSession {
        cache: PagedKvCache::new(storage),
    })
}

/// Sum of squares in f64, over 8 independent lanes so it vectorizes.
fn sum_of_squares(v: &[f32]) -> f64 {
    let mut lanes = [0f64; 8];
    let chunks = v.chunks_exact(8);
    let tail: f64 = chunks
        .remainder()
        .iter()
        .map(|&a| (a as f64) * (a as f64))
        .sum();
    for c in chunks {
        for (l, &a) in lanes.iter_mut().zip(c) {
            *l += (a as f64) * (a as f64);
        }
    }
    lanes.iter().sum::<f64>() + tail
}

/// `log_softmax(row)` in f64.
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let lse = max
        + row
            .iter()
            .map(|&v| (v as f64 - max).exp())
            .sum::<f64>()
            .ln();
    row.iter().map(|&v| v as f64 - lse).collect()
}

fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

#[derive(Default)]
struct Tally {
    nll: f64,
    kl: f64,
    kl_max: f64,
    agree: usize,
    scored: usize,
    secs: f64,
}

/// Runs `ids` through `model` with an f32 KV cache and with each of
/// `codecs`, in lockstep chunks, and compares every next-token
/// distribution with the f32 run's. Each codec's storage runs with the
/// attention probe, so every layer's attention output over the decoded K/V
/// is compared with attention over the exact K/V for the same queries.
pub fn measure_kv_codecs(
    model: &GgufTextModel,
    ids: &[u32],
    codecs: &[KvCodecPlan],
    eval: KvEvalOptions,
) -> Result<KvQualityReport> {
    if eval.block_tokens == 0 || eval.chunk_tokens == 0 {
        return Err(ModelError::InvalidInput(format!(
            "block_tokens ({}) and chunk_tokens ({}) must be positive",
            eval.block_tokens, eval.chunk_tokens
        )));
    }
    let window = ids.len().min(model.hyperparams().context_length.max(2));
    if window < 2 {
        return Err(ModelError::InvalidInput(format!(
            "perplexity needs at least 2 tokens, the text has {}",
            ids.len()
        )));
    }
    let ids = &ids[..window];
    let layout = model.decoder().kv_layout(eval.block_tokens);
    let vocab = model.decoder().config().vocab_size;
    let mut sessions = vec![TextSession {
        cache: PagedKvCache::new(Box::new(HostKvStorage::new(layout))),
    }];
    let mut names = vec!["none".to_string()];
    let mut monitors = vec![None];
    for plan in codecs {
        if plan.spec == KvCodecSpec::None {
            sessions.push(TextSession {
                cache: PagedKvCache::new(Box::new(HostKvStorage::new(layout))),
            });
            names.push("none".to_string());
            monitors.push(None);
            continue;
        }
        let storage = CodecKvStorage::from_plan(layout, plan)?.with_attention_probe();
        names.push(storage.codec_name());
        monitors.push(Some(storage.monitor()));
        sessions.push(TextSession {
            cache: PagedKvCache::new(Box::new(storage)),
        });
    }
    let mut tallies: Vec<Tally> = (0..sessions.len()).map(|_| Tally::default()).collect();
    let mut last_stats = vec![KvCodecStats::default(); sessions.len()];
    for (c, chunk) in ids.chunks(eval.chunk_tokens).enumerate() {
        let first = c * eval.chunk_tokens;
        let mut base_rows: Vec<(Vec<f64>, usize)> = Vec::new();
        for (s, session) in sessions.iter_mut().enumerate() {
            let t = Instant::now();
            let logits = model.prefill(session, chunk, Logits::All)?;
            tallies[s].secs += t.elapsed().as_secs_f64();
            for (r, row) in logits.chunks_exact(vocab).enumerate() {
                let Some(&target) = ids.get(first + r + 1) else {
                    continue;
                };
                let target = target as usize;
                if target >= vocab {
                    return Err(ModelError::InvalidInput(format!(
                        "token id {target} is outside the vocabulary of {vocab}"
                    )));
                }
                let lp = log_softmax(row);
                let top = argmax(row);
                let tally = &mut tallies[s];
                tally.nll -= lp[target];
                tally.scored += 1;
                if s == 0 {
                    base_rows.push((lp, top));
                } else {
                    let (base, base_top) = &base_rows[r];
                    let kl: f64 = base.iter().zip(&lp).map(|(&p, &q)| p.exp() * (p - q)).sum();
                    tally.kl += kl;
                    tally.kl_max = tally.kl_max.max(kl);
                    tally.agree += usize::from(top == *base_top);
                }
            }
            last_stats[s] = match &monitors[s] {
                Some(m) => m.stats(),
                None => host_stats(&session.cache, layout),
            };
        }
    }
    let base_ppl = (tallies[0].nll / tallies[0].scored.max(1) as f64).exp();
    let mut specs = vec![KvCodecSpec::None];
    specs.extend(codecs.iter().map(|p| p.spec));
    let runs = tallies
        .iter()
        .enumerate()
        .map(|(s, t)| {
            let n = t.scored.max(1) as f64;
            let nll_mean = t.nll / n;
            let ppl = nll_mean.exp();
            KvCodecRun {
                spec: specs[s],
                codec: names[s].clone(),
                perplexity: ppl,
                nll_mean,
                perplexity_rel_change: ppl / base_ppl - 1.0,
                kl_mean: if s == 0 { 0.0 } else { t.kl / n },
                kl_max: t.kl_max,
                top1_agreement: if s == 0 { 1.0 } else { t.agree as f64 / n },
                stats: last_stats[s],
                layers: monitors[s]
                    .as_ref()
                    .map_or_else(Vec::new, KvCodecMonitor::layer_stats),
                auto_choices: monitors[s].as_ref().and_then(KvCodecMonitor::auto_choices),
                secs: t.secs,
            }
        })
        .collect();
    Ok(KvQualityReport {
        tokens: window,
        eval,
        runs,
    })
}

/// What an f32 cache holds, from its layout and token count.
fn host_stats(cache: &PagedKvCache, layout: KvLayout) -> KvCodecStats {
    let blocks = cache.blocks().len();
    let values = layout.block_floats();
    KvCodecStats {
        blocks,
        held_bytes: cache.used_bytes(),
        f32_bytes: blocks * values * 4,
        f16_bytes: blocks * values * 2,
        written_values: 2 * cache.len() * layout.token_width() * layout.layers,
        ..KvCodecStats::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{generate, tiny_decoder};
    use qvl_compress::ExactF32;

    fn prompt() -> Vec<u32> {
        (0..96u32).map(|i| (i * 37 + 5) % 300).collect()
    }

    #[test]
    fn an_exact_codec_matches_host_storage_bit_for_bit() {
        let dec = tiny_decoder();
        let l = dec.kv_layout(8);
        let mut host = PagedKvCache::new(Box::new(HostKvStorage::new(l)));
        let want = generate(&dec, &mut host, &prompt(), 8, 16);
        let storage = CodecKvStorage::with_plain_codec(l, Arc::new(ExactF32), 8);
        let monitor = storage.monitor();
        let mut cache = PagedKvCache::new(Box::new(storage));
        let got = generate(&dec, &mut cache, &prompt(), 8, 16);
        assert_eq!(got, want);
        let s = monitor.stats();
        // 112 tokens = 14 blocks; all but the newest, which holds the
        // 8-token recent window, are encoded.
        assert_eq!(s.blocks, 14);
        assert_eq!(s.encoded_slabs, 13 * l.layers);
        assert_eq!(s.quantized_values, 0, "ExactF32 quantizes nothing");
        assert_eq!(s.held_bytes, cache.used_bytes());
        assert!(s.held_bytes > s.f32_bytes, "exact encoding adds headers");
    }

    #[test]
    fn int8_and_int4_logits_stay_close_to_the_f32_cache() {
        let dec = tiny_decoder();
        let l = dec.kv_layout(16);
        // Token by token, as a served cache sees it: every row compared.
        let tokens: Vec<u32> = (0..112u32).map(|i| (i * 37 + 5) % 300).collect();
        let mut host = PagedKvCache::new(Box::new(HostKvStorage::new(l)));
        let want = generate(&dec, &mut host, &tokens, 1, 0);
        let scale = want.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
        let mut diffs = Vec::new();
        for kind in [KvCodecKind::Int8, KvCodecKind::Int4] {
            let opts = KvCodecOptions {
                group_size: 16,
                key_group_tokens: 16,
                recent_tokens: 16,
                sinks_f16: false,
                ..KvCodecOptions::of(kind)
            };
            let storage = CodecKvStorage::new(l, opts).unwrap();
            let monitor = storage.monitor();
            let mut cache = PagedKvCache::new(Box::new(storage));
            let got = generate(&dec, &mut cache, &tokens, 1, 0);
            assert_eq!(got.len(), want.len());
            // Rows before any block left the recent window are exact.
            assert_eq!(got[..31], want[..31]);
            let max_diff = got
                .iter()
                .zip(&want)
                .flat_map(|(a, b)| a.iter().zip(b.iter()).map(|(x, y)| (x - y).abs()))
                .fold(0f32, f32::max);
            diffs.push(max_diff / scale);
            let s = monitor.stats();
            assert!(s.quantized_fraction() > 0.5, "{kind}: {s:?}");
            assert!(s.held_bytes < s.f32_bytes);
            if kind == KvCodecKind::Int4 {
                // Tiny slabs (16 tokens x 32 channels): 4 + 32/16 bits per
                // value, plus f32 sinks and a header per slab: about 8 bits.
                let bits = s.encoded_bits_per_value();
                assert!(bits > 6.0 && bits < 8.5, "{bits} bits: {s:?}");
                assert!(s.quantized_bits_per_value() < bits, "{s:?}");
            }
        }
        // Random weights (no outlier structure to exploit): measured 0.006
        // and 0.11 of the largest logit; int8 about 16x closer than int4.
        assert!(diffs[0] < 0.02, "int8 max logit diff {} of scale", diffs[0]);
        assert!(diffs[1] < 0.25, "int4 max logit diff {} of scale", diffs[1]);
        assert!(
            5.0 * diffs[0] < diffs[1],
            "int8 {} vs int4 {}",
            diffs[0],
            diffs[1]
        );
    }

    /// Keys and values of one layer of block `b`: a fixed pattern.
    fn block_kv(l: KvLayout, b: usize, layer: usize) -> (Vec<f32>, Vec<f32>) {
        let w = l.token_width();
        let mut k = Vec::new();
        let mut v = Vec::new();
        for t in b * l.block_tokens..(b + 1) * l.block_tokens {
            k.extend((0..w).map(|i| ((t * 31 + i * 7 + layer) % 13) as f32 * 0.1 - 0.6));
            v.extend((0..w).map(|i| ((t * 17 + i * 3 + layer * 5) % 11) as f32 * 0.2));
        }
        (k, v)
    }

    #[test]
    fn sinks_stay_exact_recent_blocks_stay_open_and_encoded_blocks_refuse_writes() {
        let l = KvLayout {
            layers: 2,
            kv_heads: 2,
            head_dim: 8,
            block_tokens: 8,
        };
        let opts = KvCodecOptions {
            group_size: 8,
            sinks_f16: false,
            sink_tokens: 3,
            recent_tokens: 8,
            ..KvCodecOptions::of(KvCodecKind::Int4)
        };
        #[derive(Default)]
        struct Collect(std::sync::Mutex<Vec<MetricEvent>>);
        impl MetricsRecorder for Collect {
            fn record(&self, e: &MetricEvent) {
                self.0.lock().unwrap().push(*e);
            }
        }
        let events = Arc::new(Collect::default());
        let mut storage = CodecKvStorage::new(l, opts)
            .unwrap()
            .with_recorder(events.clone());
        let ids: Vec<KvBlockId> = (0..5).map(|_| storage.allocate().unwrap()).collect();
        for (b, id) in ids.iter().enumerate() {
            for layer in 0..l.layers {
                let (k, v) = block_kv(l, b, layer);
                storage.write(*id, layer, 0, &k, &v).unwrap();
            }
        }
        // 40 tokens, recent 8: blocks 0..4 are encoded, block 4 open.
        let w = l.token_width();
        let s = storage.stats();
        assert_eq!(s.encoded_slabs, 4 * l.layers);
        assert_eq!(s.open_slabs, l.layers);
        // One Compress event per keys or values slab encoded.
        let recorded = events.0.lock().unwrap().clone();
        assert_eq!(recorded.len(), 2 * s.encoded_slabs);
        for e in recorded {
            let MetricEvent::Compress {
                kind,
                input_bytes,
                output_bytes,
                rel_error,
            } = e
            else {
                panic!("{e:?}")
            };
            assert_eq!(kind, TensorKind::KvCache);
            assert_eq!(input_bytes as usize, l.block_tokens * w * 4);
            assert!(output_bytes < input_bytes && rel_error > 0.0 && rel_error < 0.2);
        }
        assert_eq!(
            s.quantized_values,
            2 * (32 - 3) * l.token_width() * l.layers
        );
        for layer in 0..l.layers {
            let (hk, hv) = block_kv(l, 0, layer);
            let got = storage.read(ids[0], layer).unwrap();
            assert_eq!(&got.keys[..3 * w], &hk[..3 * w], "sink keys exact");
            assert_eq!(&got.values[..3 * w], &hv[..3 * w], "sink values exact");
            let err = got
                .keys
                .iter()
                .zip(&hk)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(err > 0.0 && err < 0.1, "int4 key error {err}");
            let (hk, _) = block_kv(l, 4, layer);
            assert_eq!(&*storage.read(ids[4], layer).unwrap().keys, &hk[..]);
        }
        let e = storage.write(ids[1], 0, 0, &vec![0.0; w], &vec![0.0; w]);
        assert!(e.unwrap_err().to_string().contains("already encoded"));
        assert!(storage
            .write(ids[4], 0, 7, &vec![0.0; 2 * w], &vec![0.0; 2 * w])
            .is_err());
        assert!(storage.read(ids[0], 9).is_err());
        assert!(storage.read(KvBlockId(99), 0).is_err());
        for id in ids {
            storage.release(id).unwrap();
        }
        assert_eq!(storage.stats(), KvCodecStats::default());
        assert_eq!(storage.used_bytes(), 0);
        assert!(storage.release(KvBlockId(0)).is_err());
    }

    #[test]
    fn codec_names_parse_and_bad_settings_are_refused() {
        assert_eq!("INT4".parse::<KvCodecKind>(), Ok(KvCodecKind::Int4));
        assert_eq!("int8".parse::<KvCodecKind>(), Ok(KvCodecKind::Int8));
        assert_eq!("none".parse::<KvCodecKind>(), Ok(KvCodecKind::None));
        assert!("svd".parse::<KvCodecKind>().unwrap_err().contains("svd"));
        let l = KvLayout {
            layers: 1,
            kv_heads: 1,
            head_dim: 8,
            block_tokens: 8,
        };
        assert!(CodecKvStorage::new(l, KvCodecOptions::of(KvCodecKind::None)).is_err());
        let odd = KvCodecOptions {
            group_size: 7,
            ..KvCodecOptions::default()
        };
        let e = CodecKvStorage::new(l, odd).err().unwrap().to_string();
        assert!(e.contains("group size 7"), "{e}");
    }

    #[test]
    fn kv_codec_specs_parse_and_errors_name_the_problem() {
        let ok = |s: &str| s.parse::<KvCodecSpec>().unwrap();
        assert_eq!(ok("SVD:0.5"), KvCodecSpec::Svd(0.5));
        assert_eq!(ok("sparse:0.25"), KvCodecSpec::Sparse(0.25));
        assert_eq!(ok("auto"), KvCodecSpec::Auto);
        assert_eq!(ok("int4"), KvCodecSpec::Int4);
        assert_eq!(ok("none"), KvCodecSpec::None);
        assert_eq!(ok("svd:1"), KvCodecSpec::Svd(1.0));
        for spec in [ok("svd:0.5"), ok("sparse:0.1"), ok("auto"), ok("int8")] {
            assert_eq!(spec.to_string().parse::<KvCodecSpec>(), Ok(spec));
        }
        let err = |s: &str| s.parse::<KvCodecSpec>().unwrap_err();
        assert!(
            err("svd").contains("needs a ratio: svd:R"),
            "{}",
            err("svd")
        );
        assert!(err("sparse:abc").contains("`abc` is not a number"));
        assert!(err("svd:0").contains("not within (0, 1]"));
        assert!(err("sparse:1.5").contains("not within (0, 1]"));
        assert!(err("svd:nan").contains("not within (0, 1]"));
        assert!(err("auto:3").contains("takes no argument"));
        assert!(err("zip").contains("unknown KV codec `zip`"));
        assert!(err("zip").contains(KvCodecSpec::NAMES));
        let l = KvLayout {
            layers: 2,
            kv_heads: 1,
            head_dim: 8,
            block_tokens: 8,
        };
        assert!(CodecKvStorage::from_plan(l, &KvCodecPlan::of(KvCodecSpec::None)).is_err());
        let bad_budget = KvCodecPlan {
            auto: AutoKvOptions {
                error_budget: -1.0,
                ..AutoKvOptions::default()
            },
            ..KvCodecPlan::of(KvCodecSpec::Auto)
        };
        let e = CodecKvStorage::from_plan(l, &bad_budget)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("error_budget"), "{e}");
    }

    /// Every encoding through a generated GGUF model, compared with the f32
    /// cache in one run: the report has every measure, per layer.
    #[test]
    fn every_codec_runs_end_to_end_on_a_generated_model() {
        use crate::gen_model::{write_llama_gguf, GenModelConfig};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        write_llama_gguf(
            &path,
            &GenModelConfig {
                layers: 4,
                hidden: 64,
                intermediate: 128,
                heads: 4,
                kv_heads: 2,
                dtype: qvl_core::DType::F32,
                seed: 3,
            },
        )
        .unwrap();
        let model = GgufTextModel::load(&path).unwrap();
        let vocab = model.decoder().config().vocab_size as u32;
        let ids: Vec<u32> = (0..88u32).map(|i| (i * 37 + 5) % vocab).collect();
        let options = KvCodecOptions {
            group_size: 16,
            key_group_tokens: 16,
            recent_tokens: 16,
            sink_tokens: 4,
            ..KvCodecOptions::default()
        };
        let specs = [
            KvCodecSpec::Int8,
            KvCodecSpec::Int4,
            KvCodecSpec::Svd(0.5),
            KvCodecSpec::Sparse(0.5),
            KvCodecSpec::Auto,
        ];
        let plans: Vec<KvCodecPlan> = specs
            .iter()
            .map(|&spec| KvCodecPlan {
                spec,
                options,
                auto: AutoKvOptions {
                    error_budget: 0.05,
                    ..AutoKvOptions::default()
                },
            })
            .collect();
        let eval = KvEvalOptions {
            block_tokens: 16,
            chunk_tokens: 8,
        };
        let report = measure_kv_codecs(&model, &ids, &plans, eval).unwrap();
        assert_eq!(report.tokens, 88);
        assert_eq!(report.runs.len(), 1 + specs.len());
        let base = &report.runs[0];
        assert_eq!(base.spec, KvCodecSpec::None);
        assert!(base.layers.is_empty() && base.kl_mean == 0.0);
        for (run, spec) in report.runs[1..].iter().zip(specs) {
            assert_eq!(run.spec, spec);
            assert!(
                run.perplexity.is_finite() && run.perplexity > 1.0,
                "{run:?}"
            );
            assert!(run.kl_mean >= 0.0 && run.kl_mean.is_finite(), "{run:?}");
            assert!((0.0..=1.0).contains(&run.top1_agreement));
            assert_eq!(run.layers.len(), 4);
            // 88 tokens in blocks of 16, recent 16: 4 blocks encoded per layer.
            assert_eq!(run.stats.encoded_slabs, 4 * 4, "{spec}");
            for (i, l) in run.layers.iter().enumerate() {
                // Every query row of every chunk was probed.
                assert_eq!(l.attn_rows, 88 * 4, "{spec} layer {i}");
                assert!(l.attn_rel_error().is_finite() && l.bits_per_value() > 0.0);
            }
            assert!(
                run.attn_rel_error() > 0.0,
                "{spec}: lossy codecs change attention"
            );
        }
        let attn = |i: usize| report.runs[i].attn_rel_error();
        let bits = |i: usize| report.runs[i].stats.encoded_bits_per_value();
        assert!(attn(1) < attn(2), "int8 {} vs int4 {}", attn(1), attn(2));
        assert!(
            bits(2) < bits(1) && bits(1) < 16.0,
            "int4 {} int8 {}",
            bits(2),
            bits(1)
        );
        // Sparse keeping half: f32 values and u16 column indices, 3 bytes a value.
        assert!(bits(4) < 32.0);
        let auto = &report.runs[5];
        let choices = auto.auto_choices.as_ref().unwrap();
        assert_eq!(choices.len(), 4);
        assert!(choices[0][0].contains("critical") && choices[3][1].contains("critical"));
        assert!(
            choices[1][0].starts_with("kv[") || choices[1][0].contains('-'),
            "{choices:?}"
        );
        // Critical layers stay exact (f32 plus f16 sinks): no error to speak of.
        for layer in [0, 3] {
            let l = auto.layers[layer];
            assert!(
                l.key_rel_error() < 1e-3 && l.attn_rel_error() < 1e-3,
                "{l:?}"
            );
            assert!(l.bits_per_value() > 31.0, "{l:?}");
        }
        // The middle layers are encoded within the budget.
        for layer in [1, 2] {
            let l = auto.layers[layer];
            assert!(l.key_rel_error() <= 0.05 + 1e-6, "{l:?}");
            assert!(l.value_rel_error() <= 0.05 + 1e-6, "{l:?}");
            assert!(l.bits_per_value() < 32.0, "{l:?}");
        }
    }
}
