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

use qvl_compress::{ExactStorage, GroupQuant, KvBlockCodec, QuantAxis, QuantBits, TokenSpan};
use qvl_core::{Codec, MetricEvent, MetricsRecorder, TensorKind};
use qvl_model::kv::PagedKvCache;
use qvl_model::kv::{HostKvStorage, KvBlockId, KvBlockStorage, KvLayerView, KvLayout};
use qvl_model::llama::{GgufTextModel, TextSession};
use qvl_model::{Logits, ModelError, Result};
use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
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
    },
}

struct BlockSlot {
    /// Index of the block in the sequence.
    position: usize,
    layers: Vec<Slab>,
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
}

impl Counters {
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
}

impl KvCodecMonitor {
    /// What the storage holds now.
    pub fn stats(&self) -> KvCodecStats {
        self.counters.stats(self.layout)
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
        let shape = [l.block_tokens, l.token_width()];
        let first_token = position * l.block_tokens;
        let sinks = self
            .sink_tokens
            .saturating_sub(first_token)
            .min(l.block_tokens);
        let codec = self.codec.clone();
        let half = self.half();
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
        let (kb, vb, quantized, exact_bytes, reports) = match &codec {
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
                    2 * (l.block_tokens - sinks) * l.token_width(),
                    2 * sinks * l.token_width() * width,
                    [k.report, v.report],
                )
            }
            SlabCodec::Plain(c) => {
                let k = c
                    .encode(keys, &shape)
                    .map_err(|e| encode_err("keys", e.to_string()))?;
                let v = c
                    .encode(values, &shape)
                    .map_err(|e| encode_err("values", e.to_string()))?;
                let q = if c.is_lossless() { 0 } else { 2 * half };
                (k.bytes, v.bytes, q, 0, [k.report, v.report])
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
        let bytes = kb.len() + vb.len();
        block.layers[layer] = Slab::Encoded {
            keys: kb,
            values: vb,
            quantized,
            exact_bytes,
        };
        let c = &self.counters;
        Counters::add(&c.held_bytes, bytes);
        Counters::sub(&c.held_bytes, 2 * half * 4);
        Counters::add(&c.encoded_bytes, bytes);
        Counters::add(&c.encoded_slabs, 1);
        Counters::add(&c.quantized_values, quantized);
        Counters::add(&c.exact_bytes, exact_bytes);
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
                } => {
                    let b = keys.len() + values.len();
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
            }),
            Slab::Encoded { keys, values, .. } => {
                let shape = [l.block_tokens, l.token_width()];
                let decode = |bytes: &[u8], what: &str| {
                    let mut out = vec![0f32; self.half()];
                    qvl_compress::decode_any(bytes, &shape, &mut out).map_err(|e| {
                        kv_err(format!(
                            "decoding the {what} of layer {layer}, block {}: {e}",
                            id.0
                        ))
                    })?;
                    Ok::<_, ModelError>(out)
                };
                Ok(KvLayerView {
                    keys: Cow::Owned(decode(keys, "keys")?),
                    values: Cow::Owned(decode(values, "values")?),
                })
            }
        }
    }

    fn used_bytes(&self) -> usize {
        self.counters.held_bytes.load(Ordering::Relaxed)
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
    pub kind: KvCodecKind,
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
    /// Seconds of the run.
    pub secs: f64,
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
/// distribution with the f32 run's.
pub fn measure_kv_codecs(
    model: &GgufTextModel,
    ids: &[u32],
    codecs: &[KvCodecOptions],
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
    for opt in codecs {
        if opt.kind == KvCodecKind::None {
            sessions.push(TextSession {
                cache: PagedKvCache::new(Box::new(HostKvStorage::new(layout))),
            });
            names.push("none".to_string());
            monitors.push(None);
            continue;
        }
        let storage = CodecKvStorage::new(layout, *opt)?;
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
    let mut kinds = vec![KvCodecKind::None];
    kinds.extend(codecs.iter().map(|o| o.kind));
    let runs = tallies
        .iter()
        .enumerate()
        .map(|(s, t)| {
            let n = t.scored.max(1) as f64;
            let nll_mean = t.nll / n;
            let ppl = nll_mean.exp();
            KvCodecRun {
                kind: kinds[s],
                codec: names[s].clone(),
                perplexity: ppl,
                nll_mean,
                perplexity_rel_change: ppl / base_ppl - 1.0,
                kl_mean: if s == 0 { 0.0 } else { t.kl / n },
                kl_max: t.kl_max,
                top1_agreement: if s == 0 { 1.0 } else { t.agree as f64 / n },
                stats: last_stats[s],
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
}
