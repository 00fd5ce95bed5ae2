//! Llama-family text models from GGUF files (SmolLM2, llama, mistral, and
//! the text side of qwen2 / qwen3 / qwen3vl) on the shared [`TextDecoder`].
//!
//! [`GgufWeights`] serves a GGUF file's tensors under the Hugging Face names
//! the decoder asks for, dequantized to f32, with the q/k rows of llama-style
//! files put back in Hugging Face order (the decoder rotates halves);
//! [`GgufTextModel`] adds the tokenizer from the same file, sessions, greedy
//! generation with streaming, and perplexity; [`check_smollm2`] compares a
//! model with the SmolLM2 reference outputs of transformers.

use crate::checkpoint::{SafetensorsFile, WeightSource};
use crate::config::{DecoderConfig, RopeConfig, RopeKind};
use crate::error::{ModelError, Result};
use crate::gguf::{self, GgufError, GgufFile, LlamaHyperparams};
use crate::kv::{PagedKvCache, DEFAULT_BLOCK_TOKENS};
use crate::ops::{argmax, Activation};
use crate::qweight::{BlockFormat, LoadOptions, QuantizingSource, WeightFormat, WeightReport};
use crate::tensor::{Bytes, StoredTensor};
use crate::text::{DecoderTensorNames, ForwardInput, LayerProvider, Logits, TextDecoder};
use crate::tokenizer::{ChatMessage, Tokenizer};
use qvl_core::DType;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Architectures whose GGUF text decoder maps onto [`DecoderConfig`].
const SUPPORTED_ARCHITECTURES: &[&str] = &["llama", "mistral", "qwen2", "qwen3", "qwen3vl"];

/// Tokens per forward pass when scoring a long text (bounds activations).
const SCORE_CHUNK_TOKENS: usize = 512;

/// A GGUF file as a [`WeightSource`] under Hugging Face tensor names.
pub struct GgufWeights {
    file: GgufFile,
    hparams: LlamaHyperparams,
    /// Hugging Face name -> GGUF name.
    by_hf_name: HashMap<String, String>,
    /// Bytes of the tensors handed out so far.
    served_bytes: AtomicUsize,
    /// Whether matrices in Q8_0/Q4_0/Q4_1 are handed out as their blocks.
    keep_blocks: bool,
}

impl GgufWeights {
    /// Maps `path` and reads its hyperparameters.
    pub fn open(path: &Path) -> Result<GgufWeights> {
        let file = GgufFile::open(path).map_err(|e| gguf_error(path, e))?;
        GgufWeights::from_file(file)
    }

    /// Wraps an opened file.
    pub fn from_file(file: GgufFile) -> Result<GgufWeights> {
        let hparams =
            LlamaHyperparams::from_header(file.header()).map_err(|e| gguf_error(file.path(), e))?;
        let by_hf_name = file
            .header()
            .tensors
            .iter()
            .filter_map(|t| gguf::hf_tensor_name(&t.name).map(|hf| (hf, t.name.clone())))
            .collect();
        Ok(GgufWeights {
            file,
            hparams,
            by_hf_name,
            served_bytes: AtomicUsize::new(0),
            keep_blocks: false,
        })
    }

    /// Hands out 2-D Q8_0/Q4_0/Q4_1 tensors as their blocks (no
    /// dequantization, no error) instead of f32 when `keep` is true.
    pub fn keep_blocks(mut self, keep: bool) -> Self {
        self.keep_blocks = keep;
        self
    }

    /// The mapped file.
    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// The decoder hyperparameters from the metadata.
    pub fn hyperparams(&self) -> &LlamaHyperparams {
        &self.hparams
    }

    /// Bytes of the dequantized tensors served so far (what a loaded model
    /// keeps resident, the tied lm head counted once).
    pub fn served_bytes(&self) -> usize {
        self.served_bytes.load(Ordering::Relaxed)
    }

    /// The decoder config these weights describe: llama-style files get no
    /// q/k norm and plain RoPE; qwen3 files have q/k norm tensors, qwen2
    /// files attention biases, and both are detected from the tensors.
    pub fn decoder_config(&self) -> Result<DecoderConfig> {
        let hp = &self.hparams;
        let path = self.file.path();
        let bad = |reason: String| ModelError::BadConfig {
            path: path.to_path_buf(),
            reason,
        };
        if !SUPPORTED_ARCHITECTURES.contains(&hp.architecture.as_str()) {
            return Err(bad(format!(
                "general.architecture {:?} is not supported (supported: {})",
                hp.architecture,
                SUPPORTED_ARCHITECTURES.join(", ")
            )));
        }
        if hp.rope_dim != hp.head_dim {
            return Err(bad(format!(
                "partial rotary embedding (rope.dimension_count {} < head dim {}) is not supported",
                hp.rope_dim, hp.head_dim
            )));
        }
        let header = self.file.header();
        let config = DecoderConfig {
            vocab_size: hp.vocab_size,
            hidden_size: hp.hidden_size,
            intermediate_size: hp.intermediate_size,
            num_layers: hp.n_layers,
            num_heads: hp.n_heads,
            num_kv_heads: hp.n_kv_heads,
            head_dim: hp.head_dim,
            rms_norm_eps: hp.rms_norm_eps as f32,
            // Text-only: M-RoPE (qwen3vl) with equal t/h/w positions is plain RoPE.
            rope: RopeConfig {
                theta: hp.rope_theta,
                kind: RopeKind::Plain,
            },
            qk_norm: header.tensor("blk.0.attn_q_norm.weight").is_some(),
            attention_bias: header.tensor("blk.0.attn_q.bias").is_some(),
            tie_word_embeddings: hp.tied_embeddings,
            hidden_act: Activation::Silu,
        };
        config.validate(path)?;
        Ok(config)
    }

    /// Heads of the projection whose rows GGUF permuted for adjacent-pair
    /// RoPE, or None when `gguf_name` is not one (or the file has none).
    fn permuted_heads(&self, gguf_name: &str) -> Option<usize> {
        if !self.hparams.qk_rows_permuted {
            return None;
        }
        let part = gguf_name.strip_prefix("blk.")?.split_once('.')?.1;
        match part {
            "attn_q.weight" | "attn_q.bias" => Some(self.hparams.n_heads),
            "attn_k.weight" | "attn_k.bias" => Some(self.hparams.n_kv_heads),
            _ => None,
        }
    }
}

impl WeightSource for GgufWeights {
    fn tensor(&self, name: &str) -> Result<Option<StoredTensor>> {
        let Some(gguf_name) = self.by_hf_name.get(name) else {
            return Ok(None);
        };
        let path = self.file.path();
        let info = self
            .file
            .tensor_info(gguf_name)
            .map_err(|e| gguf_error(path, e))?;
        let shape = info.shape();
        let blocks = match info.ty {
            gguf::GgmlType::Q8_0 => Some(BlockFormat::Q8_0),
            gguf::GgmlType::Q4_0 => Some(BlockFormat::Q4_0),
            gguf::GgmlType::Q4_1 => Some(BlockFormat::Q4_1),
            _ => None,
        };
        if let (true, Some(format), 2) = (self.keep_blocks, blocks, shape.len()) {
            let mut bytes = self.file.tensor_data(info).to_vec();
            if let Some(heads) = self.permuted_heads(gguf_name) {
                bytes =
                    gguf::unpermute_qk_rows(&bytes, info.row_bytes(), heads, self.hparams.head_dim)
                        .map_err(|e| gguf_error(path, e))?;
            }
            self.served_bytes.fetch_add(bytes.len(), Ordering::Relaxed);
            return StoredTensor::from_blocks(name, format, shape, bytes).map(Some);
        }
        let mut values = vec![0f32; info.n_elems() as usize];
        gguf::dequantize(info.ty, self.file.tensor_data(info), &mut values)
            .map_err(|e| gguf_error(path, e))?;
        let mut bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        drop(values);
        if let Some(heads) = self.permuted_heads(gguf_name) {
            let row_len = if shape.len() == 2 { shape[1] } else { 1 };
            bytes = gguf::unpermute_qk_rows(&bytes, row_len * 4, heads, self.hparams.head_dim)
                .map_err(|e| gguf_error(path, e))?;
        }
        self.served_bytes.fetch_add(bytes.len(), Ordering::Relaxed);
        StoredTensor::new(name, DType::F32, shape, Bytes::from_vec(bytes)).map(Some)
    }

    fn contains(&self, name: &str) -> bool {
        self.by_hf_name.contains_key(name)
    }

    fn describe(&self) -> String {
        self.file.path().display().to_string()
    }
}

fn gguf_error(path: &Path, source: GgufError) -> ModelError {
    ModelError::Gguf {
        path: path.to_path_buf(),
        source,
    }
}

/// One sequence's state: its KV cache (positions follow the cache length).
pub struct TextSession {
    /// The paged KV cache.
    pub cache: PagedKvCache,
}

impl TextSession {
    /// Tokens in the cache.
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    /// Whether nothing was run yet.
    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The model produced this end-of-sequence token (not in the output).
    Eos(u32),
    /// `max_tokens` were generated.
    MaxTokens,
}

/// What [`GgufTextModel::generate`] produced, with its timings.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Generated tokens, without the prompt and without a final stop token.
    pub tokens: Vec<u32>,
    /// Prompt tokens run through prefill.
    pub prompt_tokens: usize,
    /// Seconds of the prefill (the first generated token comes from it).
    pub prefill_secs: f64,
    /// Decode steps run (each after one generated token).
    pub decode_steps: usize,
    /// Seconds of those decode steps.
    pub decode_secs: f64,
    /// Why it ended.
    pub stop: StopReason,
}

impl Generation {
    /// Prompt tokens per second of prefill.
    pub fn prefill_tokens_per_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_secs.max(1e-9)
    }

    /// Decode steps per second.
    pub fn decode_tokens_per_s(&self) -> f64 {
        self.decode_steps as f64 / self.decode_secs.max(1e-9)
    }
}

/// Perplexity of a text over one window.
#[derive(Debug, Clone, PartialEq)]
pub struct Perplexity {
    /// `exp(nll_mean)`.
    pub perplexity: f64,
    /// Mean negative log-likelihood (nats) of every token after the first.
    pub nll_mean: f64,
    /// `nll[i]` scores token `i + 1` given the tokens before it.
    pub nll: Vec<f32>,
    /// Tokens in the window (the text's tokens, cut at the context length).
    pub tokens: usize,
    /// Tokens of the text beyond the window, not scored.
    pub dropped_tokens: usize,
}

/// Decoder layers served on demand by a [`LayerProvider`] instead of loaded
/// resident (see [`GgufTextModel::load_with`]).
pub struct StreamedLayers {
    /// Gives the decoder each layer's weights on every forward pass.
    pub provider: Arc<dyn LayerProvider>,
    /// Bytes of the layers' matrices (what one decode step reads).
    pub weight_bytes: usize,
}

/// A llama-family text model loaded from a GGUF file: tokenizer and decoder.
pub struct GgufTextModel {
    path: PathBuf,
    hparams: LlamaHyperparams,
    tokenizer: Tokenizer,
    decoder: TextDecoder,
    weight_bytes: usize,
    file_bytes: usize,
    weight_format: WeightFormat,
    weight_report: WeightReport,
}

impl GgufTextModel {
    /// Loads the tokenizer and the decoder (weights dequantized to f32) of
    /// the GGUF file at `path`.
    pub fn load(path: &Path) -> Result<GgufTextModel> {
        Self::load_with(path, |_, _, _| Ok(None))
    }

    /// Loads with the weight matrices held as `options.weights` asks:
    /// f32, the file's own blocks (`native`), re-quantized int8/int4, or per
    /// matrix under an error budget.
    pub fn load_with_options(path: &Path, options: &LoadOptions) -> Result<GgufTextModel> {
        Self::load_with_options_and(path, options, |_, _, _| Ok(None))
    }

    /// [`GgufTextModel::load`], with the decoder layers served by the
    /// provider that `layers` builds from the weights (streamed under a RAM
    /// budget, say), or loaded resident when it returns None. The embedding,
    /// final norm and lm head stay resident either way; `weight_bytes`
    /// counts only what stays resident.
    pub fn load_with(
        path: &Path,
        layers: impl FnOnce(
            &DecoderConfig,
            &GgufWeights,
            &DecoderTensorNames,
        ) -> Result<Option<StreamedLayers>>,
    ) -> Result<GgufTextModel> {
        Self::load_with_options_and(path, &LoadOptions::default(), layers)
    }

    /// [`GgufTextModel::load_with`] with [`LoadOptions`]: what stays resident
    /// is held as `options.weights` asks (streamed layers come from
    /// `layers`, which sees the file's blocks when the format is `native`).
    pub fn load_with_options_and(
        path: &Path,
        options: &LoadOptions,
        layers: impl FnOnce(
            &DecoderConfig,
            &GgufWeights,
            &DecoderTensorNames,
        ) -> Result<Option<StreamedLayers>>,
    ) -> Result<GgufTextModel> {
        let weights = GgufWeights::open(path)?.keep_blocks(options.weights == WeightFormat::Native);
        let tokenizer = Tokenizer::from_gguf(weights.file().header()).map_err(|source| {
            ModelError::Tokenizer {
                path: path.to_path_buf(),
                source,
            }
        })?;
        let config = weights.decoder_config()?;
        let names = DecoderTensorNames::hugging_face("model", "lm_head.weight");
        let streamed = layers(&config, &weights, &names)?;
        // Layers copied into a provider are not resident: count from here.
        let served_before = weights.served_bytes();
        let quantizing = matches!(
            options.weights,
            WeightFormat::Q8 | WeightFormat::Q4 | WeightFormat::Budget(_)
        );
        let src = QuantizingSource::new(&weights, options.clone(), config.num_layers);
        let source: &dyn WeightSource = if quantizing { &src } else { &weights };
        let decoder = match streamed {
            None => TextDecoder::load(config, source, &names)?,
            Some(s) => {
                TextDecoder::load_streamed(config, source, &names, s.provider, s.weight_bytes)?
            }
        };
        let weight_report = src.report();
        // Served bytes less what quantization took away from them.
        let weight_bytes = (weights.served_bytes() - served_before + weight_report.output_bytes())
            .saturating_sub(weight_report.input_bytes());
        Ok(GgufTextModel {
            path: path.to_path_buf(),
            hparams: weights.hyperparams().clone(),
            tokenizer,
            decoder,
            weight_bytes,
            file_bytes: weights.file().bytes().len(),
            weight_format: options.weights,
            weight_report,
        })
    }

    /// How the weight matrices are held.
    pub fn weight_format(&self) -> WeightFormat {
        self.weight_format
    }

    /// Per matrix, what re-quantization chose (empty for f32 and native).
    pub fn weight_report(&self) -> &WeightReport {
        &self.weight_report
    }

    /// The file it came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The hyperparameters from the GGUF metadata.
    pub fn hyperparams(&self) -> &LlamaHyperparams {
        &self.hparams
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The decoder.
    pub fn decoder(&self) -> &TextDecoder {
        &self.decoder
    }

    /// Bytes of the resident weights (f32, or the blocks held); with
    /// streamed layers, of the embedding, final norm and lm head only.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// Bytes of the GGUF file (the quantized weights, memory-mapped).
    pub fn file_bytes(&self) -> usize {
        self.file_bytes
    }

    /// Whether the file carries a chat template (an instruct model).
    pub fn is_instruct(&self) -> bool {
        self.tokenizer.chat_template().is_some()
    }

    /// The tokens generation stops at: the EOS token and, for chat models,
    /// `<|im_end|>`.
    pub fn stop_tokens(&self) -> Vec<u32> {
        let mut stops: Vec<u32> = self.tokenizer.eos_id().into_iter().collect();
        if self.is_instruct() {
            stops.extend(
                self.tokenizer
                    .token_id("<|im_end|>")
                    .filter(|id| !stops.contains(id)),
            );
        }
        stops
    }

    /// Token ids of a user prompt: through the chat template (one user turn,
    /// then the assistant header) for instruct models, else the plain text.
    pub fn prompt_ids(&self, prompt: &str) -> Result<Vec<u32>> {
        if self.is_instruct() {
            let text = self
                .tokenizer
                .apply_chat_template(&[ChatMessage::user(prompt)], true)
                .map_err(|source| ModelError::Tokenizer {
                    path: self.path.clone(),
                    source,
                })?;
            Ok(self.tokenizer.encode(&text, true))
        } else {
            Ok(self.tokenizer.encode(prompt, true))
        }
    }

    /// A new session with the default KV block size.
    pub fn new_session(&self) -> TextSession {
        TextSession {
            cache: PagedKvCache::in_memory(self.decoder.kv_layout(DEFAULT_BLOCK_TOKENS)),
        }
    }

    /// Runs `ids` through the model in one batch after what the session
    /// holds; returns logits for every token (`ids.len() x vocab`) or the last.
    pub fn prefill(
        &self,
        session: &mut TextSession,
        ids: &[u32],
        logits: Logits,
    ) -> Result<Vec<f32>> {
        if ids.is_empty() {
            return Err(ModelError::InvalidInput("prefill of no tokens".to_string()));
        }
        let start = session.cache.len() as i64;
        let positions: Vec<[i64; 3]> = (0..ids.len() as i64).map(|i| [start + i; 3]).collect();
        let hidden = self.decoder.embed(ids)?;
        self.decoder
            .forward(&mut session.cache, hidden, ids, &positions, None, logits)
    }

    /// [`Self::prefill`] for a caller that shows progress on long prompts:
    /// chunks of at most `chunk_tokens`, `progress` hearing `(tokens done,
    /// tokens in all)` after each; logits within 1e-4 of one pass.
    pub fn prefill_with_progress(
        &self,
        session: &mut TextSession,
        ids: &[u32],
        logits: Logits,
        chunk_tokens: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<f32>> {
        if ids.is_empty() {
            return Err(ModelError::InvalidInput("prefill of no tokens".to_string()));
        }
        let start = session.cache.len() as i64;
        let positions: Vec<[i64; 3]> = (0..ids.len() as i64).map(|i| [start + i; 3]).collect();
        let input = ForwardInput {
            hidden: self.decoder.embed(ids)?,
            tokens: ids,
            positions: &positions,
            deepstack: None,
        };
        self.decoder.forward_with_progress(
            &mut session.cache,
            input,
            logits,
            chunk_tokens,
            progress,
        )
    }

    /// One decode step: appends `token`, returns its logits (`vocab`).
    pub fn decode_step(&self, session: &mut TextSession, token: u32) -> Result<Vec<f32>> {
        self.prefill(session, &[token], Logits::Last)
    }

    /// One decode step of several sessions at once: appends `tokens[i]` to
    /// `sessions[i]` (each at its own position) in one batched forward and
    /// returns their logits (`sessions.len() x vocab`, in order).
    pub fn decode_batch(
        &self,
        sessions: &mut [&mut TextSession],
        tokens: &[u32],
    ) -> Result<Vec<f32>> {
        let mut caches: Vec<&mut PagedKvCache> =
            sessions.iter_mut().map(|s| &mut s.cache).collect();
        crate::batch::decode_step(&self.decoder, &mut caches, tokens)
    }

    /// Greedy generation after `prompt_ids`: prefills them, then takes the
    /// argmax token until `max_tokens` tokens or a stop token (when
    /// `stop_at_eos`). Each token goes to `on_token` as soon as it is chosen.
    pub fn generate(
        &self,
        session: &mut TextSession,
        prompt_ids: &[u32],
        max_tokens: usize,
        stop_at_eos: bool,
        on_token: &mut dyn FnMut(u32),
    ) -> Result<Generation> {
        let stops = if stop_at_eos {
            self.stop_tokens()
        } else {
            Vec::new()
        };
        let mut out = Generation {
            tokens: Vec::with_capacity(max_tokens),
            prompt_tokens: prompt_ids.len(),
            prefill_secs: 0.0,
            decode_steps: 0,
            decode_secs: 0.0,
            stop: StopReason::MaxTokens,
        };
        if max_tokens == 0 {
            return Ok(out);
        }
        let t = Instant::now();
        let mut logits = self.prefill(session, prompt_ids, Logits::Last)?;
        out.prefill_secs = t.elapsed().as_secs_f64();
        loop {
            let next = argmax(&logits) as u32;
            if stops.contains(&next) {
                out.stop = StopReason::Eos(next);
                return Ok(out);
            }
            out.tokens.push(next);
            on_token(next);
            if out.tokens.len() == max_tokens {
                return Ok(out);
            }
            let t = Instant::now();
            logits = self.decode_step(session, next)?;
            out.decode_secs += t.elapsed().as_secs_f64();
            out.decode_steps += 1;
        }
    }

    /// Perplexity of `ids` over one window (the first `context_length`
    /// tokens): the mean NLL of every token after the first, exponentiated,
    /// as llama.cpp's perplexity tool reports it.
    pub fn perplexity(&self, ids: &[u32]) -> Result<Perplexity> {
        let window = ids.len().min(self.hparams.context_length.max(2));
        if window < 2 {
            return Err(ModelError::InvalidInput(format!(
                "perplexity needs at least 2 tokens, the text has {}",
                ids.len()
            )));
        }
        let ids_in = &ids[..window];
        let vocab = self.decoder.config().vocab_size;
        let mut session = self.new_session();
        let mut nll = Vec::with_capacity(window - 1);
        for (c, chunk) in ids_in.chunks(SCORE_CHUNK_TOKENS).enumerate() {
            let logits = self.prefill(&mut session, chunk, Logits::All)?;
            let first = c * SCORE_CHUNK_TOKENS;
            for (r, row) in logits.chunks_exact(vocab).enumerate() {
                if let Some(&target) = ids_in.get(first + r + 1) {
                    nll.push(token_nll(row, target)? as f32);
                }
            }
        }
        let nll_mean = nll.iter().map(|&v| v as f64).sum::<f64>() / nll.len() as f64;
        Ok(Perplexity {
            perplexity: nll_mean.exp(),
            nll_mean,
            nll,
            tokens: window,
            dropped_tokens: ids.len() - window,
        })
    }

    /// [`GgufTextModel::perplexity`] of a text, tokenized as the model's
    /// tokenizer does with its special tokens (BOS when the file asks).
    pub fn perplexity_of_text(&self, text: &str) -> Result<Perplexity> {
        self.perplexity(&self.tokenizer.encode(text, true))
    }
}

/// `-log softmax(row)[target]`, in f64.
fn token_nll(row: &[f32], target: u32) -> Result<f64> {
    let t = *row.get(target as usize).ok_or_else(|| {
        ModelError::InvalidInput(format!(
            "token id {target} is outside the vocabulary of {}",
            row.len()
        ))
    })?;
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
    Ok(max + sum.ln() - t as f64)
}

/// The `k` largest entries of `row` (index, value), largest first.
fn top_k(row: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    for (i, &v) in row.iter().enumerate() {
        if best.len() == k && best.last().is_some_and(|&(_, m)| v <= m) {
            continue;
        }
        let at = best.partition_point(|&(_, b)| b >= v);
        best.insert(at, (i as u32, v));
        best.truncate(k);
    }
    best
}

// ---------------------------------------------------------------------------
// Golden check against the SmolLM2 reference outputs.

/// Whether the `golden.json` beside `golden_file` is in the SmolLM2 format
/// (a single text with its perplexity) rather than the Qwen3-VL cases format.
pub fn is_smollm2_golden(golden_file: &Path) -> bool {
    let json = golden_file.with_file_name("golden.json");
    std::fs::read_to_string(json)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v.get("perplexity").is_some() && v.get("cases").is_none())
}

/// One line of a golden report.
#[derive(Debug, Clone, PartialEq)]
pub struct GoldenCheck {
    /// What was compared.
    pub name: &'static str,
    /// Whether it is within its tolerance.
    pub pass: bool,
    /// The numbers.
    pub detail: String,
}

/// The outcome of [`check_smollm2`], with every number measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Smollm2Report {
    /// Token ids of the golden text equal the reference ids.
    pub ids_match: bool,
    /// First index where they differ (or the shorter length).
    pub ids_first_diff: Option<usize>,
    /// Reference tokens.
    pub tokens: usize,
    /// Largest |logit - reference| over the rows of `logits_head`.
    pub max_logit_diff: f32,
    /// Tolerance of that difference (golden.json).
    pub logit_tolerance: f32,
    /// Two reference logits closer than this are a near-tie: their order may flip.
    pub near_tie: f32,
    /// Top-8 ranks compared (all positions x 8, less near-ties).
    pub top8_compared: usize,
    /// Of those, how many hold the reference id.
    pub top8_equal: usize,
    /// Ranks skipped as near-ties.
    pub top8_ties: usize,
    /// Positions where a compared rank differs.
    pub top8_mismatch_positions: Vec<usize>,
    /// Perplexity here.
    pub perplexity: f64,
    /// Perplexity of the reference.
    pub reference_perplexity: f64,
    /// Largest |nll - reference nll| over the tokens.
    pub max_nll_diff: f32,
    /// Greedy continuation here.
    pub greedy: Vec<u32>,
    /// Greedy continuation of the reference.
    pub expected_greedy: Vec<u32>,
}

/// Relative perplexity tolerance of the golden check.
pub const PERPLEXITY_REL_TOLERANCE: f64 = 0.005;

impl Smollm2Report {
    /// |perplexity / reference - 1|.
    pub fn perplexity_rel_diff(&self) -> f64 {
        (self.perplexity / self.reference_perplexity - 1.0).abs()
    }

    /// One line per check.
    pub fn checks(&self) -> Vec<GoldenCheck> {
        vec![
            GoldenCheck {
                name: "token ids",
                pass: self.ids_match,
                detail: match self.ids_first_diff {
                    None => format!("{} ids equal", self.tokens),
                    Some(i) => format!("differ from index {i} of {}", self.tokens),
                },
            },
            GoldenCheck {
                name: "logits_head",
                pass: self.max_logit_diff <= self.logit_tolerance,
                detail: format!(
                    "max |diff| {:.3e} (tolerance {:.1e})",
                    self.max_logit_diff, self.logit_tolerance
                ),
            },
            GoldenCheck {
                name: "top-8 ids",
                pass: self.top8_equal == self.top8_compared,
                detail: format!(
                    "{}/{} ranks equal, {} near-ties (< {:.0e}) skipped{}",
                    self.top8_equal,
                    self.top8_compared,
                    self.top8_ties,
                    self.near_tie,
                    if self.top8_mismatch_positions.is_empty() {
                        String::new()
                    } else {
                        format!(", differ at positions {:?}", self.top8_mismatch_positions)
                    }
                ),
            },
            GoldenCheck {
                name: "perplexity",
                pass: self.perplexity_rel_diff() <= PERPLEXITY_REL_TOLERANCE,
                detail: format!(
                    "{:.4} vs {:.4} ({:.4}% off, tolerance {:.1}%), max nll diff {:.2e}",
                    self.perplexity,
                    self.reference_perplexity,
                    self.perplexity_rel_diff() * 100.0,
                    PERPLEXITY_REL_TOLERANCE * 100.0,
                    self.max_nll_diff
                ),
            },
            GoldenCheck {
                name: "greedy",
                pass: self.greedy == self.expected_greedy,
                detail: if self.greedy == self.expected_greedy {
                    format!("{} tokens equal", self.greedy.len())
                } else {
                    format!("expected {:?}, got {:?}", self.expected_greedy, self.greedy)
                },
            },
        ]
    }

    /// Whether every check passes.
    pub fn pass(&self) -> bool {
        self.checks().iter().all(|c| c.pass)
    }
}

/// Loads the GGUF at `model_path` and runs [`check_smollm2_model`].
pub fn check_smollm2(model_path: &Path, golden_file: &Path) -> Result<Smollm2Report> {
    let model = GgufTextModel::load(model_path)?;
    check_smollm2_model(&model, golden_file)
}

/// Compares `model` with the SmolLM2 golden (`golden_file` with
/// `golden.json` beside it): token ids of the text, `logits_head`, top-8 ids
/// at every position (near-ties excepted), perplexity and the greedy
/// continuation of the first `greedy_prompt_len` tokens.
pub fn check_smollm2_model(model: &GgufTextModel, golden_file: &Path) -> Result<Smollm2Report> {
    let bad = |reason: String| ModelError::BadGolden {
        path: golden_file.to_path_buf(),
        reason,
    };
    let json_path = golden_file.with_file_name("golden.json");
    let text = std::fs::read_to_string(&json_path)
        .map_err(|e| ModelError::io(format!("reading {}", json_path.display()), e))?;
    let meta: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| bad(format!("{} is not JSON: {e}", json_path.display())))?;
    let u32_list = |key: &str| -> Result<Vec<u32>> {
        meta.get(key)
            .and_then(|v| v.as_array())
            .ok_or_else(|| bad(format!("golden.json has no {key} array")))?
            .iter()
            .map(|v| v.as_u64().and_then(|v| u32::try_from(v).ok()))
            .collect::<Option<_>>()
            .ok_or_else(|| {
                bad(format!(
                    "golden.json {key} holds a value that is not a token id"
                ))
            })
    };
    let golden_text = meta
        .get("text")
        .and_then(|v| v.as_str())
        .ok_or_else(|| bad("golden.json has no text".to_string()))?;
    let reference_perplexity = meta
        .get("perplexity")
        .and_then(|v| v.as_f64())
        .ok_or_else(|| bad("golden.json has no perplexity number".to_string()))?;
    let expected_greedy = u32_list("greedy_continuation")?;
    let prompt_len = meta
        .get("greedy_prompt_len")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| bad("golden.json has no greedy_prompt_len".to_string()))?
        as usize;
    let logit_tolerance = meta
        .pointer("/tolerance/logits_max_abs")
        .and_then(|v| v.as_f64())
        .unwrap_or(2e-3) as f32;

    let file = SafetensorsFile::open(golden_file)?;
    let ids: Vec<u32> = file
        .expect_tensor("input_ids")?
        .to_i64_vec()?
        .into_iter()
        .map(|v| u32::try_from(v).map_err(|_| bad(format!("input_ids holds {v}"))))
        .collect::<Result<_>>()?;
    let n = ids.len();
    if n < 2 || prompt_len == 0 || prompt_len > n {
        return Err(bad(format!(
            "{n} input ids and greedy_prompt_len {prompt_len} do not fit"
        )));
    }
    let vocab = model.decoder().config().vocab_size;
    let head = file.expect_tensor("logits_head")?;
    let head_rows = head.shape.first().copied().unwrap_or(0);
    if head.shape != [head_rows, vocab] || head_rows > n {
        return Err(bad(format!(
            "logits_head has shape {:?}, expected [<= {n}, {vocab}]",
            head.shape
        )));
    }
    let head = head.to_f32_vec()?;
    let top_ids = file.expect_tensor("top_ids")?;
    let k = top_ids.shape.get(1).copied().unwrap_or(0);
    if top_ids.shape != [n, k] || k == 0 {
        return Err(bad(format!("top_ids has shape {:?}", top_ids.shape)));
    }
    let top_ids = top_ids.to_i64_vec()?;
    let top_logits = file.expect_tensor("top_logits")?;
    if top_logits.shape != [n, k] {
        return Err(bad(format!("top_logits has shape {:?}", top_logits.shape)));
    }
    let top_logits = top_logits.to_f32_vec()?;
    let ref_nll = file.expect_tensor("nll")?.to_f32_vec()?;
    if ref_nll.len() != n - 1 {
        return Err(bad(format!(
            "nll holds {} values for {n} ids",
            ref_nll.len()
        )));
    }

    // Token ids of the text, against both the json list and the tensor.
    let reference_ids = u32_list("input_ids")?;
    let ours = model.tokenizer().encode(golden_text, true);
    let ids_first_diff = if ours == reference_ids && ours == ids {
        None
    } else {
        Some(
            ours.iter()
                .zip(&reference_ids)
                .position(|(a, b)| a != b)
                .unwrap_or(ours.len().min(reference_ids.len())),
        )
    };

    // Logits of every position over the reference ids.
    let mut session = model.new_session();
    let logits = model.prefill(&mut session, &ids, Logits::All)?;
    let max_logit_diff = logits[..head_rows * vocab]
        .iter()
        .zip(&head)
        .map(|(a, b)| (a - b).abs())
        .fold(
            0f32,
            |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
        );

    let near_tie = logit_tolerance;
    let (mut compared, mut equal, mut ties) = (0, 0, 0);
    let mut mismatch_positions = Vec::new();
    for (p, row) in logits.chunks_exact(vocab).enumerate() {
        let ours = top_k(row, k + 1);
        let ref_ids = &top_ids[p * k..(p + 1) * k];
        let ref_vals = &top_logits[p * k..(p + 1) * k];
        let mut position_ok = true;
        for r in 0..k {
            let tie_before = r > 0 && (ref_vals[r - 1] - ref_vals[r]).abs() <= near_tie;
            let tie_after = if r + 1 < k {
                (ref_vals[r] - ref_vals[r + 1]).abs() <= near_tie
            } else {
                // The reference's next logit is unknown; ours stands in for it.
                ours.get(k)
                    .is_some_and(|&(_, v)| (ref_vals[r] - v).abs() <= near_tie)
            };
            if tie_before || tie_after {
                ties += 1;
                continue;
            }
            compared += 1;
            if ours.get(r).map(|&(id, _)| id as i64) == Some(ref_ids[r]) {
                equal += 1;
            } else {
                position_ok = false;
            }
        }
        if !position_ok {
            mismatch_positions.push(p);
        }
    }
    // Perplexity from the same logits (one forward: the test profile is slow).
    let nll: Vec<f32> = logits
        .chunks_exact(vocab)
        .zip(&ids[1..])
        .map(|(row, &target)| token_nll(row, target).map(|v| v as f32))
        .collect::<Result<_>>()?;
    drop(logits);
    let nll_mean = nll.iter().map(|&v| v as f64).sum::<f64>() / nll.len() as f64;
    let max_nll_diff = nll
        .iter()
        .zip(&ref_nll)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);

    let mut session = model.new_session();
    let greedy = model
        .generate(
            &mut session,
            &ids[..prompt_len],
            expected_greedy.len(),
            false,
            &mut |_| {},
        )?
        .tokens;

    Ok(Smollm2Report {
        ids_match: ids_first_diff.is_none(),
        ids_first_diff,
        tokens: n,
        max_logit_diff,
        logit_tolerance,
        near_tie,
        top8_compared: compared,
        top8_equal: equal,
        top8_ties: ties,
        top8_mismatch_positions: mismatch_positions,
        perplexity: nll_mean.exp(),
        reference_perplexity,
        max_nll_diff,
        greedy,
        expected_greedy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_orders_largest_first() {
        let row = [0.5, 3.0, -1.0, 2.0, 3.5, 0.0];
        assert_eq!(top_k(&row, 3), vec![(4, 3.5), (1, 3.0), (3, 2.0)]);
        assert_eq!(top_k(&row[..2], 3), vec![(1, 3.0), (0, 0.5)]);
    }

    #[test]
    fn nll_is_minus_log_softmax() {
        let row = [1.0f32, 2.0, 3.0];
        let z: f64 = row.iter().map(|&v| (v as f64).exp()).sum();
        let want = -(2f64.exp() / z).ln();
        assert!((token_nll(&row, 1).unwrap() - want).abs() < 1e-12);
        assert!(token_nll(&row, 3).is_err());
    }
}
