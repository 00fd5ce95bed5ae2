//! The text decoder: embeddings, pre-norm layers of GQA attention (optional
//! per-head q/k RMSNorm, plain or multimodal RoPE) and SwiGLU MLP, a final
//! RMSNorm and the lm head (tied or separate).
//!
//! Weights come from any [`WeightSource`] under names given by
//! [`DecoderTensorNames`], so other formats (GGUF) and other families
//! (llama, qwen3) reuse this code with their own names and config.

use crate::checkpoint::{require, WeightSource};
use crate::config::{DecoderConfig, RopeKind};
use crate::error::{ModelError, Result};
use crate::kv::{KvLayout, PagedKvCache, DEFAULT_BLOCK_TOKENS};
use crate::linear::Linear;
use crate::ops::{rms_norm, rotate_half_apply};
use crate::tensor::StoredTensor;
use rayon::prelude::*;
use std::sync::Arc;

/// Tensor names of a decoder. Per-layer names contain `{layer}`.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderTensorNames {
    /// Token embedding (`vocab x hidden`).
    pub embed_tokens: String,
    /// Final RMSNorm.
    pub final_norm: String,
    /// Separate lm head (`vocab x hidden`), used unless tied.
    pub lm_head: String,
    /// Query projection.
    pub q_proj: String,
    /// Key projection.
    pub k_proj: String,
    /// Value projection.
    pub v_proj: String,
    /// Output projection.
    pub o_proj: String,
    /// Per-head query RMSNorm (when the config has `qk_norm`).
    pub q_norm: String,
    /// Per-head key RMSNorm.
    pub k_norm: String,
    /// MLP gate.
    pub gate_proj: String,
    /// MLP up.
    pub up_proj: String,
    /// MLP down.
    pub down_proj: String,
    /// RMSNorm before attention.
    pub input_norm: String,
    /// RMSNorm before the MLP.
    pub post_attention_norm: String,
}

impl DecoderTensorNames {
    /// Hugging Face names under `prefix` (`model.language_model` for
    /// Qwen3-VL, `model` for causal LMs) with the lm head at `lm_head`.
    pub fn hugging_face(prefix: &str, lm_head: &str) -> DecoderTensorNames {
        let l = |s: &str| format!("{prefix}.layers.{{layer}}.{s}");
        DecoderTensorNames {
            embed_tokens: format!("{prefix}.embed_tokens.weight"),
            final_norm: format!("{prefix}.norm.weight"),
            lm_head: lm_head.to_string(),
            q_proj: l("self_attn.q_proj.weight"),
            k_proj: l("self_attn.k_proj.weight"),
            v_proj: l("self_attn.v_proj.weight"),
            o_proj: l("self_attn.o_proj.weight"),
            q_norm: l("self_attn.q_norm.weight"),
            k_norm: l("self_attn.k_norm.weight"),
            gate_proj: l("mlp.gate_proj.weight"),
            up_proj: l("mlp.up_proj.weight"),
            down_proj: l("mlp.down_proj.weight"),
            input_norm: l("input_layernorm.weight"),
            post_attention_norm: l("post_attention_layernorm.weight"),
        }
    }

    /// The names of `Qwen3VLForConditionalGeneration`'s text model.
    pub fn qwen3_vl() -> DecoderTensorNames {
        DecoderTensorNames::hugging_face("model.language_model", "lm_head.weight")
    }

    /// A per-layer name for layer `layer`.
    pub fn layer(template: &str, layer: usize) -> String {
        template.replace("{layer}", &layer.to_string())
    }
}

/// The bias beside a `.weight` tensor.
fn bias_name(weight: &str) -> String {
    match weight.strip_suffix(".weight") {
        Some(base) => format!("{base}.bias"),
        None => format!("{weight}.bias"),
    }
}

/// Loads a linear layer `out x in` (with its bias when `bias`).
pub(crate) fn load_linear(
    src: &dyn WeightSource,
    name: &str,
    out: usize,
    inp: usize,
    bias: bool,
) -> Result<Linear> {
    let w = require(src, name, &[out, inp])?;
    let b = if bias {
        Some(require(src, &bias_name(name), &[out])?)
    } else {
        None
    };
    Linear::new(w, b.as_ref(), out, inp)
}

/// Loads a vector of `len` as f32.
pub(crate) fn load_vector(src: &dyn WeightSource, name: &str, len: usize) -> Result<Vec<f32>> {
    require(src, name, &[len])?.to_f32_vec()
}

/// The weights of one decoder layer, ready to compute with.
pub struct DecoderLayer {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    input_norm: Vec<f32>,
    post_attention_norm: Vec<f32>,
}

impl DecoderLayer {
    /// Loads layer `index` of `config` from `src` under `names`.
    pub fn load(
        config: &DecoderConfig,
        src: &dyn WeightSource,
        names: &DecoderTensorNames,
        index: usize,
    ) -> Result<DecoderLayer> {
        let c = config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let n = |t: &str| DecoderTensorNames::layer(t, index);
        let bias = c.attention_bias;
        Ok(DecoderLayer {
            q_proj: load_linear(src, &n(&names.q_proj), c.num_heads * hd, h, bias)?,
            k_proj: load_linear(src, &n(&names.k_proj), c.num_kv_heads * hd, h, bias)?,
            v_proj: load_linear(src, &n(&names.v_proj), c.num_kv_heads * hd, h, bias)?,
            o_proj: load_linear(src, &n(&names.o_proj), h, c.num_heads * hd, bias)?,
            q_norm: if c.qk_norm {
                Some(load_vector(src, &n(&names.q_norm), hd)?)
            } else {
                None
            },
            k_norm: if c.qk_norm {
                Some(load_vector(src, &n(&names.k_norm), hd)?)
            } else {
                None
            },
            gate_proj: load_linear(src, &n(&names.gate_proj), c.intermediate_size, h, false)?,
            up_proj: load_linear(src, &n(&names.up_proj), c.intermediate_size, h, false)?,
            down_proj: load_linear(src, &n(&names.down_proj), h, c.intermediate_size, false)?,
            input_norm: load_vector(src, &n(&names.input_norm), h)?,
            post_attention_norm: load_vector(src, &n(&names.post_attention_norm), h)?,
        })
    }

    /// Names of every tensor layer `index` loads (weights, biases, norms).
    pub fn tensor_names(
        config: &DecoderConfig,
        names: &DecoderTensorNames,
        index: usize,
    ) -> Vec<String> {
        let n = |t: &str| DecoderTensorNames::layer(t, index);
        let mut out = Vec::new();
        for proj in [&names.q_proj, &names.k_proj, &names.v_proj, &names.o_proj] {
            out.push(n(proj));
            if config.attention_bias {
                out.push(bias_name(&n(proj)));
            }
        }
        if config.qk_norm {
            out.push(n(&names.q_norm));
            out.push(n(&names.k_norm));
        }
        for t in [
            &names.gate_proj,
            &names.up_proj,
            &names.down_proj,
            &names.input_norm,
            &names.post_attention_norm,
        ] {
            out.push(n(t));
        }
        out
    }

    /// Bytes of the stored matrices (what one decode step reads).
    pub fn weight_bytes(&self) -> usize {
        [
            &self.q_proj,
            &self.k_proj,
            &self.v_proj,
            &self.o_proj,
            &self.gate_proj,
            &self.up_proj,
            &self.down_proj,
        ]
        .iter()
        .map(|p| p.weight_bytes())
        .sum()
    }
}

/// Gives the decoder each layer's weights on demand, in order 0..n on every
/// forward pass (weights streamed under a RAM budget). The decoder drops a
/// layer before it asks for the next one.
pub trait LayerProvider: Send + Sync {
    /// The weights of layer `index`.
    fn layer(&self, index: usize) -> Result<Arc<DecoderLayer>>;
}

/// Visual features added to the hidden states after the first layers
/// (DeepStack): `layers[i]` is added after layer `i` to the rows `rows`.
pub struct DeepstackFeatures<'a> {
    /// Rows of the chunk that hold visual tokens, in order.
    pub rows: &'a [usize],
    /// Per layer, `rows.len() x hidden` features.
    pub layers: &'a [Vec<f32>],
}

/// Which logits a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// One row per input token.
    All,
    /// Only the last token's row.
    Last,
}

/// Chunk size for prefills that show progress
/// ([`TextDecoder::forward_with_progress`]): small enough that a progress
/// line comes every second or so on a laptop CPU, large enough that the
/// matmuls stay efficient (`cargo xtask bench model` compares it with one
/// pass).
pub const PROGRESS_CHUNK_TOKENS: usize = 256;

/// The input of one forward pass over a sequence: `n x hidden` input
/// embeddings of `tokens` at `positions`, and the deepstack features of
/// its visual rows (Qwen3-VL), if any.
pub struct ForwardInput<'a, 'd> {
    /// Input embeddings, `tokens.len() x hidden`.
    pub hidden: Vec<f32>,
    /// The tokens.
    pub tokens: &'a [u32],
    /// Their (multimodal) rotary positions.
    pub positions: &'a [[i64; 3]],
    /// Deepstack features of the visual rows.
    pub deepstack: Option<&'a DeepstackFeatures<'d>>,
}

/// One sequence of a batched forward ([`TextDecoder::forward_batch`]): its
/// KV cache, the tokens it appends (one when decoding, a prompt when
/// prefilling) and their RoPE positions (per sequence: each has its own).
pub struct BatchSequence<'a> {
    /// The sequence's paged KV cache; the tokens' keys and values go here.
    pub cache: &'a mut PagedKvCache,
    /// The tokens run (their embeddings are this sequence's rows of the input).
    pub tokens: &'a [u32],
    /// One (t, h, w) position per token (equal for text-only positions).
    pub positions: &'a [[i64; 3]],
}

/// A loaded decoder.
pub struct TextDecoder {
    config: DecoderConfig,
    embed_tokens: StoredTensor,
    /// Resident layers; empty when `provider` gives them.
    layers: Vec<Arc<DecoderLayer>>,
    provider: Option<Arc<dyn LayerProvider>>,
    layer_weight_bytes: usize,
    final_norm: Vec<f32>,
    lm_head: Linear,
    inv_freq: Vec<f32>,
}

impl TextDecoder {
    /// Loads the decoder of `config` from `src` under `names`.
    pub fn load(
        config: DecoderConfig,
        src: &dyn WeightSource,
        names: &DecoderTensorNames,
    ) -> Result<Self> {
        Self::load_with(config, src, names, None)
    }

    /// Loads the embedding, final norm and lm head of `config` from `src`;
    /// the layers come from `provider` on every forward pass.
    /// `layer_weight_bytes` is the bytes of the layers' matrices (for
    /// [`TextDecoder::weight_bytes_per_token`]).
    pub fn load_streamed(
        config: DecoderConfig,
        src: &dyn WeightSource,
        names: &DecoderTensorNames,
        provider: Arc<dyn LayerProvider>,
        layer_weight_bytes: usize,
    ) -> Result<Self> {
        Self::load_with(config, src, names, Some((provider, layer_weight_bytes)))
    }

    fn load_with(
        config: DecoderConfig,
        src: &dyn WeightSource,
        names: &DecoderTensorNames,
        provider: Option<(Arc<dyn LayerProvider>, usize)>,
    ) -> Result<Self> {
        let c = &config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let embed_tokens = require(src, &names.embed_tokens, &[c.vocab_size, h])?;
        let (layers, provider, layer_weight_bytes) = match provider {
            Some((p, bytes)) => (Vec::new(), Some(p), bytes),
            None => {
                let layers = (0..c.num_layers)
                    .map(|i| DecoderLayer::load(c, src, names, i).map(Arc::new))
                    .collect::<Result<Vec<_>>>()?;
                let bytes = layers.iter().map(|l| l.weight_bytes()).sum();
                (layers, None, bytes)
            }
        };
        let final_norm = load_vector(src, &names.final_norm, h)?;
        let lm_head = if c.tie_word_embeddings {
            Linear::new(embed_tokens.clone(), None, c.vocab_size, h)?
        } else {
            load_linear(src, &names.lm_head, c.vocab_size, h, false)?
        };
        // As the reference: inv_freq = 1 / theta^(2i/d), in f32.
        let theta = c.rope.theta as f32;
        let inv_freq = (0..hd / 2)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / hd as f32))
            .collect();
        Ok(TextDecoder {
            config,
            embed_tokens,
            layers,
            provider,
            layer_weight_bytes,
            final_norm,
            lm_head,
            inv_freq,
        })
    }

    /// The config.
    pub fn config(&self) -> &DecoderConfig {
        &self.config
    }

    /// The KV block shape this decoder needs, with `block_tokens` per block.
    pub fn kv_layout(&self, block_tokens: usize) -> KvLayout {
        KvLayout {
            layers: self.config.num_layers,
            kv_heads: self.config.num_kv_heads,
            head_dim: self.config.head_dim,
            block_tokens,
        }
    }

    /// A new empty in-memory KV cache with the default block size.
    pub fn new_cache(&self) -> PagedKvCache {
        PagedKvCache::in_memory(self.kv_layout(DEFAULT_BLOCK_TOKENS))
    }

    /// Bytes of weights one decode step reads: every layer and the lm head
    /// (the embedding row read is negligible).
    pub fn weight_bytes_per_token(&self) -> usize {
        self.layer_weight_bytes + self.lm_head.weight_bytes()
    }

    /// Whether the layers come from a [`LayerProvider`] (streamed).
    pub fn is_streamed(&self) -> bool {
        self.provider.is_some()
    }

    /// Layer `index`: resident, or asked of the provider.
    fn layer(&self, index: usize) -> Result<Arc<DecoderLayer>> {
        match &self.provider {
            Some(p) => p.layer(index),
            None => self
                .layers
                .get(index)
                .cloned()
                .ok_or_else(|| ModelError::InvalidInput(format!("no decoder layer {index}"))),
        }
    }

    /// Embedding rows of `ids` (`ids.len() x hidden`).
    pub fn embed(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let h = self.config.hidden_size;
        let mut out = vec![0f32; ids.len() * h];
        for (row, &id) in out.chunks_exact_mut(h).zip(ids) {
            if id as usize >= self.config.vocab_size {
                return Err(ModelError::InvalidInput(format!(
                    "token id {id} is outside the vocabulary of {}",
                    self.config.vocab_size
                )));
            }
            self.embed_tokens.read_f32_into(id as usize * h, row)?;
        }
        Ok(out)
    }

    /// cos and sin (`n x head_dim/2` each) of the positions.
    fn rope_tables(&self, positions: &[[i64; 3]]) -> (Vec<f32>, Vec<f32>) {
        let half = self.config.head_dim / 2;
        let mut cos = vec![0f32; positions.len() * half];
        let mut sin = vec![0f32; positions.len() * half];
        for (p, pos) in positions.iter().enumerate() {
            for j in 0..half {
                let axis = match &self.config.rope.kind {
                    RopeKind::Plain => 0,
                    RopeKind::MRope {
                        section,
                        interleaved: true,
                    } => {
                        if j % 3 == 1 && j < section[1] * 3 {
                            1
                        } else if j % 3 == 2 && j < section[2] * 3 {
                            2
                        } else {
                            0
                        }
                    }
                    RopeKind::MRope {
                        section,
                        interleaved: false,
                    } => {
                        if j < section[0] {
                            0
                        } else if j < section[0] + section[1] {
                            1
                        } else {
                            2
                        }
                    }
                };
                let angle = pos[axis] as f32 * self.inv_freq[j];
                cos[p * half + j] = angle.cos();
                sin[p * half + j] = angle.sin();
            }
        }
        (cos, sin)
    }

    /// Runs `hidden` (`n x hidden` input embeddings of the tokens `tokens`
    /// at `positions`) through the decoder, appending their keys and values
    /// to `cache`, and returns the logits (`n x vocab` or `1 x vocab`).
    ///
    /// When the cache can keep fewer new tokens resident than `n`
    /// ([`PagedKvCache::write_window_tokens`]: its KV is held to a RAM
    /// budget and the rest swapped out), the tokens run in chunks that fit,
    /// one after another: each chunk's blocks then take every layer's
    /// writes while resident, where one pass over all of them would move
    /// blocks out and back in at every layer.
    pub fn forward(
        &self,
        cache: &mut PagedKvCache,
        hidden: Vec<f32>,
        tokens: &[u32],
        positions: &[[i64; 3]],
        deepstack: Option<&DeepstackFeatures<'_>>,
        logits: Logits,
    ) -> Result<Vec<f32>> {
        let input = ForwardInput {
            hidden,
            tokens,
            positions,
            deepstack,
        };
        self.forward_in_chunks(cache, input, logits, None, &mut |_, _| {})
    }

    /// [`Self::forward`] for long inputs whose caller shows progress: past
    /// `chunk_tokens` tokens the input runs in chunks of at most that many
    /// (fewer when the cache's write window is smaller), and `progress`
    /// hears `(tokens done, tokens in all)` after each. Chunks change only
    /// the order attention sums in (logits within 1e-4 of one pass).
    pub fn forward_with_progress(
        &self,
        cache: &mut PagedKvCache,
        input: ForwardInput<'_, '_>,
        logits: Logits,
        chunk_tokens: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<f32>> {
        self.forward_in_chunks(cache, input, logits, Some(chunk_tokens.max(1)), progress)
    }

    fn forward_in_chunks(
        &self,
        cache: &mut PagedKvCache,
        input: ForwardInput<'_, '_>,
        logits: Logits,
        chunk_tokens: Option<usize>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<f32>> {
        let ForwardInput {
            hidden,
            tokens,
            positions,
            deepstack,
        } = input;
        let n = tokens.len();
        let h = self.config.hidden_size;
        let chunk = match (cache.write_window_tokens(), chunk_tokens) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
        .filter(|&c| c < n && hidden.len() == n * h && positions.len() == n);
        let Some(chunk) = chunk else {
            // One pass (forward_rows checks the shapes).
            let mut seqs = [BatchSequence {
                cache,
                tokens,
                positions,
            }];
            let out = self.forward_rows(&mut seqs, hidden, deepstack, logits)?;
            progress(n, n);
            return Ok(out);
        };
        let mut out = Vec::new();
        let mut start = 0;
        while start < n {
            let end = (start + chunk).min(n);
            // The chunk's visual rows (sorted) and their deepstack features.
            let part_rows: Vec<usize>;
            let part_layers: Vec<Vec<f32>>;
            let part_deepstack = match deepstack {
                Some(ds) => {
                    let from = ds.rows.partition_point(|&r| r < start);
                    let to = ds.rows.partition_point(|&r| r < end);
                    part_rows = ds.rows[from..to].iter().map(|&r| r - start).collect();
                    part_layers = ds
                        .layers
                        .iter()
                        .map(|l| l.get(from * h..to * h).map(<[f32]>::to_vec))
                        .collect::<Option<_>>()
                        .ok_or_else(|| {
                            ModelError::InvalidInput(
                                "deepstack features do not match the chunk's visual rows"
                                    .to_string(),
                            )
                        })?;
                    Some(DeepstackFeatures {
                        rows: &part_rows,
                        layers: &part_layers,
                    })
                }
                None => None,
            };
            let mut seqs = [BatchSequence {
                cache: &mut *cache,
                tokens: &tokens[start..end],
                positions: &positions[start..end],
            }];
            let rows = self.forward_rows(
                &mut seqs,
                hidden[start * h..end * h].to_vec(),
                part_deepstack.as_ref(),
                logits,
            )?;
            if logits == Logits::All || end == n {
                out.extend(rows);
            }
            progress(end, n);
            start = end;
        }
        Ok(out)
    }

    /// Runs several sequences through the decoder in one pass: `hidden`
    /// holds the input embeddings of every sequence's tokens, sequence after
    /// sequence (`sum(tokens) x hidden`). The matmuls run once over all the
    /// rows (each weight byte is read once per step for every sequence);
    /// RoPE uses each sequence's own positions and attention runs per
    /// sequence over its own cache, so each sequence gets the logits it
    /// would get alone. Returns `rows x vocab` logits: every row
    /// ([`Logits::All`]) or each sequence's last row ([`Logits::Last`]),
    /// in sequence order.
    pub fn forward_batch(
        &self,
        seqs: &mut [BatchSequence<'_>],
        hidden: Vec<f32>,
        logits: Logits,
    ) -> Result<Vec<f32>> {
        self.forward_rows(seqs, hidden, None, logits)
    }

    fn forward_rows(
        &self,
        seqs: &mut [BatchSequence<'_>],
        hidden: Vec<f32>,
        deepstack: Option<&DeepstackFeatures<'_>>,
        logits: Logits,
    ) -> Result<Vec<f32>> {
        crate::ops::on_compute_pool(|| self.forward_rows_in_pool(seqs, hidden, deepstack, logits))
    }

    fn forward_rows_in_pool(
        &self,
        seqs: &mut [BatchSequence<'_>],
        mut hidden: Vec<f32>,
        deepstack: Option<&DeepstackFeatures<'_>>,
        logits: Logits,
    ) -> Result<Vec<f32>> {
        let c = &self.config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        if seqs.is_empty() {
            return Err(ModelError::InvalidInput(
                "forward of no sequences".to_string(),
            ));
        }
        // Row ranges of each sequence in the stacked activations.
        let mut ranges = Vec::with_capacity(seqs.len());
        let mut n = 0;
        for (i, s) in seqs.iter().enumerate() {
            let len = s.positions.len();
            if len == 0 || s.tokens.len() != len {
                return Err(ModelError::InvalidInput(format!(
                    "sequence {i} of the forward has {} tokens and {len} positions",
                    s.tokens.len()
                )));
            }
            if s.cache.layout() != self.kv_layout(s.cache.layout().block_tokens) {
                return Err(ModelError::KvCache(format!(
                    "cache layout {:?} of sequence {i} does not fit this decoder",
                    s.cache.layout()
                )));
            }
            ranges.push(n..n + len);
            n += len;
        }
        if hidden.len() != n * h {
            return Err(ModelError::InvalidInput(format!(
                "forward of {} hidden values for {n} tokens (hidden size {h})",
                hidden.len()
            )));
        }
        if let Some(ds) = deepstack {
            if ds.layers.len() > c.num_layers
                || ds.layers.iter().any(|l| l.len() != ds.rows.len() * h)
                || ds.rows.iter().any(|&r| r >= n)
            {
                return Err(ModelError::InvalidInput(
                    "deepstack features do not match the chunk's visual rows".to_string(),
                ));
            }
        }
        let positions: Vec<[i64; 3]> = seqs
            .iter()
            .flat_map(|s| s.positions.iter().copied())
            .collect();
        let (cos, sin) = self.rope_tables(&positions);
        let half = hd / 2;
        let scale = 1.0 / (hd as f32).sqrt();
        let (q_width, kv_width) = (c.num_heads * hd, c.num_kv_heads * hd);
        for s in seqs.iter_mut() {
            s.cache.reserve(s.tokens.len())?;
        }
        for li in 0..c.num_layers {
            let layer = self.layer(li)?;
            let mut x = hidden.clone();
            rms_norm(&mut x, &layer.input_norm, c.rms_norm_eps);
            let mut q = layer.q_proj.forward(&x, n);
            let mut k = layer.k_proj.forward(&x, n);
            let v = layer.v_proj.forward(&x, n);
            if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                rms_norm(&mut q, qn, c.rms_norm_eps);
                rms_norm(&mut k, kn, c.rms_norm_eps);
            }
            let rotate = |m: &mut Vec<f32>, heads: usize| {
                m.par_chunks_mut(heads * hd)
                    .enumerate()
                    .for_each(|(p, row)| {
                        let (cs, sn) = (
                            &cos[p * half..(p + 1) * half],
                            &sin[p * half..(p + 1) * half],
                        );
                        for head in row.chunks_exact_mut(hd) {
                            rotate_half_apply(head, cs, sn);
                        }
                    });
            };
            rotate(&mut q, c.num_heads);
            rotate(&mut k, c.num_kv_heads);
            // Attention per sequence over its own blocks, sequences in parallel.
            let attn = if let [s] = seqs {
                s.cache.write_layer(li, &k, &v)?;
                s.cache.attend(li, &q, c.num_heads, scale)?
            } else {
                let parts = seqs
                    .par_iter_mut()
                    .zip(ranges.par_iter())
                    .map(|(s, r)| {
                        s.cache.write_layer(
                            li,
                            &k[r.start * kv_width..r.end * kv_width],
                            &v[r.start * kv_width..r.end * kv_width],
                        )?;
                        s.cache.attend(
                            li,
                            &q[r.start * q_width..r.end * q_width],
                            c.num_heads,
                            scale,
                        )
                    })
                    .collect::<Result<Vec<_>>>()?;
                parts.concat()
            };
            let o = layer.o_proj.forward(&attn, n);
            hidden.iter_mut().zip(&o).for_each(|(a, b)| *a += b);

            let mut x = hidden.clone();
            rms_norm(&mut x, &layer.post_attention_norm, c.rms_norm_eps);
            let mut gate = layer.gate_proj.forward(&x, n);
            let up = layer.up_proj.forward(&x, n);
            c.hidden_act.apply(&mut gate);
            gate.iter_mut().zip(&up).for_each(|(g, u)| *g *= u);
            let down = layer.down_proj.forward(&gate, n);
            hidden.iter_mut().zip(&down).for_each(|(a, b)| *a += b);

            if let Some(ds) = deepstack {
                if let Some(feats) = ds.layers.get(li) {
                    for (r, &row) in ds.rows.iter().enumerate() {
                        let dst = &mut hidden[row * h..(row + 1) * h];
                        dst.iter_mut()
                            .zip(&feats[r * h..(r + 1) * h])
                            .for_each(|(a, b)| *a += b);
                    }
                }
            }
        }
        for s in seqs.iter_mut() {
            s.cache.commit(s.tokens)?;
        }
        let mut last = match logits {
            Logits::All => hidden,
            Logits::Last => ranges
                .iter()
                .flat_map(|r| &hidden[(r.end - 1) * h..r.end * h])
                .copied()
                .collect(),
        };
        let rows = last.len() / h;
        rms_norm(&mut last, &self.final_norm, c.rms_norm_eps);
        Ok(self.lm_head.forward(&last, rows))
    }
}
