//! Batched decoding and a small continuous-batching scheduler.
//!
//! Decoding one sequence reads every weight byte for one token; decoding
//! `N` sequences together ([`TextDecoder::forward_batch`]) reads them once
//! for `N` tokens, so aggregate tokens/s grows with the batch until the
//! matmuls become compute-bound. Each sequence keeps its own
//! [`PagedKvCache`] and positions; attention runs per sequence over its own
//! blocks, so every sequence gets the logits it would get alone.
//!
//! [`BatchScheduler`] serves a stream of [`Request`]s greedily: between
//! steps, waiting requests join (their prompts are prefilled in the same
//! forward as the running sequences' decode tokens) up to
//! [`BatchConfig::max_batch`] sequences and a KV block budget; requests
//! leave at a stop token or after `max_tokens`, and their KV blocks go back
//! to the storage at once. Every generated token comes out as a
//! [`BatchEvent`] tagged with its request.

use crate::error::{ModelError, Result};
use crate::kv::{KvLayout, PagedKvCache, DEFAULT_BLOCK_TOKENS};
use crate::llama::StopReason;
use crate::ops::argmax;
use crate::text::{BatchSequence, Logits, TextDecoder};
use std::collections::VecDeque;
use std::time::Instant;

/// One decode step of several sequences at once: appends `tokens[i]` to
/// `caches[i]` at position `caches[i].len()` (text positions) in one
/// batched forward; returns `caches.len() x vocab` logits, in order.
pub fn decode_step(
    decoder: &TextDecoder,
    caches: &mut [&mut PagedKvCache],
    tokens: &[u32],
) -> Result<Vec<f32>> {
    if caches.len() != tokens.len() || tokens.is_empty() {
        return Err(ModelError::InvalidInput(format!(
            "batched decode of {} tokens for {} sequences",
            tokens.len(),
            caches.len()
        )));
    }
    let positions: Vec<[[i64; 3]; 1]> = caches.iter().map(|c| [[c.len() as i64; 3]]).collect();
    let hidden = decoder.embed(tokens)?;
    let mut seqs: Vec<BatchSequence<'_>> = caches
        .iter_mut()
        .zip(tokens.chunks(1))
        .zip(&positions)
        .map(|((cache, tokens), positions)| BatchSequence {
            cache,
            tokens,
            positions,
        })
        .collect();
    decoder.forward_batch(&mut seqs, hidden, Logits::Last)
}

/// How a [`BatchScheduler`] batches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchConfig {
    /// Most sequences in one step (running plus joining).
    pub max_batch: usize,
    /// Most prompt tokens prefilled in one step; a request whose prompt is
    /// longer still joins, alone among the joining ones.
    pub max_prefill_tokens: usize,
    /// Most KV blocks the running requests may hold together, counted at
    /// admission for the prompt plus `max_tokens` (so no request runs out
    /// mid-way); 0: no limit.
    pub max_kv_blocks: usize,
    /// Tokens per KV block.
    pub block_tokens: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_batch: 8,
            max_prefill_tokens: 512,
            max_kv_blocks: 0,
            block_tokens: DEFAULT_BLOCK_TOKENS,
        }
    }
}

/// A generation request: greedy decoding after `prompt`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Prompt token ids (at least one).
    pub prompt: Vec<u32>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Tokens that end the request (not part of its output).
    pub stop_tokens: Vec<u32>,
}

/// Identifies a request: the order of [`BatchScheduler::submit`] calls, from 0.
pub type RequestId = usize;

/// A request that left the batch, with its output and timings.
#[derive(Debug, Clone, PartialEq)]
pub struct FinishedRequest {
    /// Which request.
    pub request: RequestId,
    /// Generated tokens (without a final stop token).
    pub tokens: Vec<u32>,
    /// Prompt tokens prefilled.
    pub prompt_tokens: usize,
    /// Why it ended.
    pub stop: StopReason,
    /// Seconds from submission to joining the batch.
    pub queued_secs: f64,
    /// Seconds from submission to its first token (or to finishing, when
    /// it produced none).
    pub first_token_secs: f64,
    /// Seconds from submission to finishing.
    pub total_secs: f64,
}

/// What one step produced, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum BatchEvent {
    /// Request `request` generated `token`.
    Token {
        /// Which request.
        request: RequestId,
        /// The token.
        token: u32,
    },
    /// A request finished; its KV blocks are released.
    Finished(FinishedRequest),
}

/// Totals of a [`BatchScheduler::run`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BatchRunStats {
    /// Steps (batched forwards) run.
    pub steps: usize,
    /// Tokens generated over every request.
    pub generated_tokens: usize,
    /// Prompt tokens prefilled.
    pub prompt_tokens: usize,
    /// Wall seconds of the run.
    pub secs: f64,
    /// Most sequences in one step.
    pub peak_batch: usize,
    /// Most KV blocks held at once.
    pub peak_kv_blocks: usize,
    /// The requests, in the order they finished.
    pub finished: Vec<FinishedRequest>,
}

impl BatchRunStats {
    /// Generated tokens per second of the run (prefill time included).
    pub fn tokens_per_s(&self) -> f64 {
        self.generated_tokens as f64 / self.secs.max(1e-9)
    }
}

struct Waiting {
    id: RequestId,
    request: Request,
    submitted: Instant,
}

struct Running {
    id: RequestId,
    request: Request,
    cache: PagedKvCache,
    /// The last generated token, appended by the next step.
    next: u32,
    output: Vec<u32>,
    submitted: Instant,
    queued_secs: f64,
    first_token_secs: Option<f64>,
    /// KV blocks counted against the budget at admission.
    reserved_blocks: usize,
}

/// Greedy continuous batching over one [`TextDecoder`]: see the module docs.
///
/// After [`BatchScheduler::step`] returns an error (a failed forward) the
/// running sequences' caches may hold a partial step; drop the scheduler.
pub struct BatchScheduler<'d> {
    decoder: &'d TextDecoder,
    config: BatchConfig,
    layout: KvLayout,
    next_id: RequestId,
    waiting: VecDeque<Waiting>,
    running: Vec<Running>,
    reserved_blocks: usize,
    /// Sequences in the last step's forward.
    last_batch: usize,
    /// Most KV blocks held at once, at the end of a forward.
    peak_kv_blocks: usize,
}

impl<'d> BatchScheduler<'d> {
    /// A scheduler over `decoder`.
    pub fn new(decoder: &'d TextDecoder, config: BatchConfig) -> Result<Self> {
        if config.max_batch == 0 || config.block_tokens == 0 || config.max_prefill_tokens == 0 {
            return Err(ModelError::InvalidInput(format!(
                "batch config {config:?}: max_batch, max_prefill_tokens and block_tokens must be at least 1"
            )));
        }
        Ok(BatchScheduler {
            layout: decoder.kv_layout(config.block_tokens),
            decoder,
            config,
            next_id: 0,
            waiting: VecDeque::new(),
            running: Vec::new(),
            reserved_blocks: 0,
            last_batch: 0,
            peak_kv_blocks: 0,
        })
    }

    /// The config.
    pub fn config(&self) -> &BatchConfig {
        &self.config
    }

    /// Queues `request`; it joins the batch at a later step.
    pub fn submit(&mut self, request: Request) -> Result<RequestId> {
        let id = self.next_id;
        let vocab = self.decoder.config().vocab_size;
        if request.prompt.is_empty() {
            return Err(ModelError::InvalidInput(format!(
                "request {id} has an empty prompt"
            )));
        }
        if let Some(bad) = request.prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(ModelError::InvalidInput(format!(
                "request {id}: prompt token {bad} is outside the vocabulary of {vocab}"
            )));
        }
        let need = self.blocks_needed(&request);
        if self.config.max_kv_blocks > 0 && need > self.config.max_kv_blocks {
            return Err(ModelError::InvalidInput(format!(
                "request {id} needs {need} KV blocks ({} prompt + {} new tokens), more than the budget of {}",
                request.prompt.len(),
                request.max_tokens,
                self.config.max_kv_blocks
            )));
        }
        self.next_id += 1;
        self.waiting.push_back(Waiting {
            id,
            request,
            submitted: Instant::now(),
        });
        Ok(id)
    }

    /// Requests waiting to join.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Requests in the batch.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Whether every submitted request has finished.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// KV blocks the running requests hold now.
    pub fn kv_blocks_in_use(&self) -> usize {
        self.running.iter().map(|r| r.cache.blocks().len()).sum()
    }

    /// Bytes of KV cache the running requests hold now.
    pub fn kv_bytes_in_use(&self) -> usize {
        self.running.iter().map(|r| r.cache.used_bytes()).sum()
    }

    /// Sequences in the last step's forward.
    pub fn last_batch(&self) -> usize {
        self.last_batch
    }

    /// Most KV blocks held at once so far.
    pub fn peak_kv_blocks(&self) -> usize {
        self.peak_kv_blocks
    }

    /// KV blocks counted against [`BatchConfig::max_kv_blocks`] now.
    pub fn kv_blocks_reserved(&self) -> usize {
        self.reserved_blocks
    }

    fn blocks_needed(&self, request: &Request) -> usize {
        (request.prompt.len() + request.max_tokens).div_ceil(self.config.block_tokens)
    }

    /// One step: waiting requests join (as many as the batch, prefill and
    /// KV budgets allow), one forward runs the joining prompts and the
    /// running sequences' next tokens together, each sequence takes its
    /// argmax token, and finished requests leave. Returns the events in
    /// order (nothing when idle).
    pub fn step(&mut self) -> Result<Vec<BatchEvent>> {
        let mut events = Vec::new();
        let joined = self.admit(&mut events);
        self.last_batch = self.running.len();
        if self.running.is_empty() {
            return Ok(events);
        }
        let joined_from = self.running.len() - joined;
        // Inputs: the running sequences' next tokens, then the joining prompts.
        let inputs: Vec<Vec<u32>> = self
            .running
            .iter()
            .enumerate()
            .map(|(i, r)| {
                if i < joined_from {
                    vec![r.next]
                } else {
                    r.request.prompt.clone()
                }
            })
            .collect();
        let positions: Vec<Vec<[i64; 3]>> = self
            .running
            .iter()
            .zip(&inputs)
            .map(|(r, t)| {
                let start = r.cache.len() as i64;
                (0..t.len() as i64).map(|i| [start + i; 3]).collect()
            })
            .collect();
        let all_tokens: Vec<u32> = inputs.concat();
        let hidden = self.decoder.embed(&all_tokens)?;
        let logits = {
            let mut seqs: Vec<BatchSequence<'_>> = self
                .running
                .iter_mut()
                .zip(&inputs)
                .zip(&positions)
                .map(|((r, tokens), positions)| BatchSequence {
                    cache: &mut r.cache,
                    tokens,
                    positions,
                })
                .collect();
            self.decoder
                .forward_batch(&mut seqs, hidden, Logits::Last)?
        };
        self.peak_kv_blocks = self.peak_kv_blocks.max(self.kv_blocks_in_use());
        let vocab = self.decoder.config().vocab_size;
        let mut done = Vec::new();
        for (i, (r, row)) in self
            .running
            .iter_mut()
            .zip(logits.chunks_exact(vocab))
            .enumerate()
        {
            let token = argmax(row) as u32;
            let now = r.submitted.elapsed().as_secs_f64();
            if r.first_token_secs.is_none() {
                r.first_token_secs = Some(now);
            }
            if r.request.stop_tokens.contains(&token) {
                done.push((i, StopReason::Eos(token)));
                continue;
            }
            r.output.push(token);
            r.next = token;
            events.push(BatchEvent::Token {
                request: r.id,
                token,
            });
            if r.output.len() >= r.request.max_tokens {
                done.push((i, StopReason::MaxTokens));
            }
        }
        // Leave in reverse index order so the indices stay valid.
        for (i, stop) in done.into_iter().rev() {
            let r = self.running.remove(i);
            events.push(BatchEvent::Finished(self.retire(r, stop)?));
        }
        Ok(events)
    }

    /// Moves waiting requests into the batch; returns how many joined (they
    /// are the last entries of `running`). Requests with `max_tokens == 0`
    /// finish at once.
    fn admit(&mut self, events: &mut Vec<BatchEvent>) -> usize {
        let mut joined = 0;
        let mut prefill = 0;
        while let Some(w) = self.waiting.front() {
            if self.running.len() >= self.config.max_batch {
                break;
            }
            let len = w.request.prompt.len();
            if joined > 0 && prefill + len > self.config.max_prefill_tokens {
                break;
            }
            let need = self.blocks_needed(&w.request);
            if self.config.max_kv_blocks > 0
                && self.reserved_blocks + need > self.config.max_kv_blocks
            {
                break;
            }
            let Some(w) = self.waiting.pop_front() else {
                break;
            };
            let queued_secs = w.submitted.elapsed().as_secs_f64();
            if w.request.max_tokens == 0 {
                events.push(BatchEvent::Finished(FinishedRequest {
                    request: w.id,
                    tokens: Vec::new(),
                    prompt_tokens: 0,
                    stop: StopReason::MaxTokens,
                    queued_secs,
                    first_token_secs: queued_secs,
                    total_secs: queued_secs,
                }));
                continue;
            }
            self.reserved_blocks += need;
            prefill += len;
            joined += 1;
            self.running.push(Running {
                id: w.id,
                cache: PagedKvCache::in_memory(self.layout),
                next: 0,
                output: Vec::with_capacity(w.request.max_tokens),
                request: w.request,
                submitted: w.submitted,
                queued_secs,
                first_token_secs: None,
                reserved_blocks: need,
            });
        }
        joined
    }

    /// Releases a finished request's KV blocks and budget.
    fn retire(&mut self, mut r: Running, stop: StopReason) -> Result<FinishedRequest> {
        r.cache.clear()?;
        self.reserved_blocks -= r.reserved_blocks;
        let total_secs = r.submitted.elapsed().as_secs_f64();
        Ok(FinishedRequest {
            request: r.id,
            prompt_tokens: r.request.prompt.len(),
            tokens: r.output,
            stop,
            queued_secs: r.queued_secs,
            first_token_secs: r.first_token_secs.unwrap_or(total_secs),
            total_secs,
        })
    }

    /// Steps until every submitted request has finished, handing each
    /// event to `on_event` as it happens; returns the totals.
    pub fn run(&mut self, on_event: &mut dyn FnMut(&BatchEvent)) -> Result<BatchRunStats> {
        let t = Instant::now();
        let mut stats = BatchRunStats::default();
        while !self.is_idle() {
            let events = self.step()?;
            if events.is_empty() {
                // Cannot happen: submit rejects requests over the budgets, so
                // a step with nothing running admits one; kept as an error.
                return Err(ModelError::InvalidInput(
                    "batch scheduler made no progress".to_string(),
                ));
            }
            stats.steps += 1;
            stats.peak_batch = stats.peak_batch.max(self.last_batch);
            for e in &events {
                match e {
                    BatchEvent::Token { .. } => stats.generated_tokens += 1,
                    BatchEvent::Finished(f) => {
                        stats.prompt_tokens += f.prompt_tokens;
                        stats.finished.push(f.clone());
                    }
                }
                on_event(e);
            }
        }
        stats.peak_kv_blocks = self.peak_kv_blocks;
        stats.secs = t.elapsed().as_secs_f64();
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DecoderConfig, RopeConfig, RopeKind};
    use crate::ops::Activation;
    use crate::random::{decoder_tensor_shapes, random_weights};
    use crate::text::DecoderTensorNames;
    use qvl_core::DType;

    /// A 2-layer decoder with M-RoPE and q/k norm, seeded random weights.
    fn tiny_decoder() -> TextDecoder {
        let cfg = DecoderConfig {
            vocab_size: 256,
            hidden_size: 64,
            intermediate_size: 96,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            rms_norm_eps: 1e-6,
            rope: RopeConfig {
                theta: 10_000.0,
                kind: RopeKind::MRope {
                    section: [4, 2, 2],
                    interleaved: true,
                },
            },
            qk_norm: true,
            attention_bias: false,
            tie_word_embeddings: true,
            hidden_act: Activation::Silu,
        };
        let names = DecoderTensorNames::qwen3_vl();
        let weights = random_weights(&decoder_tensor_shapes(&cfg, &names), DType::F32, 5).unwrap();
        TextDecoder::load(cfg, &weights, &names).unwrap()
    }

    fn prompt(seed: u32, len: usize) -> Vec<u32> {
        (0..len as u32)
            .map(|i| (i * 37 + seed * 101 + 3) % 256)
            .collect()
    }

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn batched_decode_matches_each_sequence_alone() {
        let dec = tiny_decoder();
        let vocab = dec.config().vocab_size;
        // Eight sequences of different lengths: batches above and below the
        // matmul's direct-read row limit.
        let lens = [3usize, 17, 1, 9, 33, 5, 16, 2];
        let mut alone: Vec<PagedKvCache> = Vec::new();
        let mut batched: Vec<PagedKvCache> = Vec::new();
        let mut next = Vec::new();
        for (s, &len) in lens.iter().enumerate() {
            let p = prompt(s as u32, len);
            let pos: Vec<[i64; 3]> = (0..len as i64).map(|i| [i; 3]).collect();
            let mut a = dec.new_cache();
            let l = dec
                .forward(&mut a, dec.embed(&p).unwrap(), &p, &pos, None, Logits::Last)
                .unwrap();
            let mut b = PagedKvCache::in_memory(dec.kv_layout(4));
            dec.forward(&mut b, dec.embed(&p).unwrap(), &p, &pos, None, Logits::Last)
                .unwrap();
            next.push(argmax(&l) as u32);
            alone.push(a);
            batched.push(b);
        }
        for batch in [1usize, 2, 4, 8] {
            for _step in 0..3 {
                let tokens = &next[..batch];
                let mut refs: Vec<&mut PagedKvCache> = batched[..batch].iter_mut().collect();
                let got = decode_step(&dec, &mut refs, tokens).unwrap();
                assert_eq!(got.len(), batch * vocab);
                for i in 0..batch {
                    let pos = alone[i].len() as i64;
                    let want = dec
                        .forward(
                            &mut alone[i],
                            dec.embed(&tokens[i..=i]).unwrap(),
                            &tokens[i..=i],
                            &[[pos; 3]],
                            None,
                            Logits::Last,
                        )
                        .unwrap();
                    let d = max_abs_diff(&got[i * vocab..(i + 1) * vocab], &want);
                    assert!(d < 1e-4, "batch {batch} sequence {i}: max abs diff {d}");
                    assert_eq!(batched[i].len(), alone[i].len());
                }
                for (i, n) in next[..batch].iter_mut().enumerate() {
                    *n = argmax(&got[i * vocab..(i + 1) * vocab]) as u32;
                }
            }
        }
    }

    #[test]
    fn ragged_forward_uses_each_sequences_own_mrope_positions() {
        let dec = tiny_decoder();
        let vocab = dec.config().vocab_size;
        // Two prompts with distinct (t, h, w) positions, as images give.
        let (p0, p1) = (prompt(1, 6), prompt(2, 3));
        let pos0: Vec<[i64; 3]> = (0..6).map(|i| [i, i / 2, i % 3]).collect();
        let pos1: Vec<[i64; 3]> = (0..3).map(|i| [i + 40, i + 7, 2 * i]).collect();
        let mut alone = Vec::new();
        for (p, pos) in [(&p0, &pos0), (&p1, &pos1)] {
            let mut c = dec.new_cache();
            alone.push(
                dec.forward(&mut c, dec.embed(p).unwrap(), p, pos, None, Logits::All)
                    .unwrap(),
            );
        }
        let (mut c0, mut c1) = (dec.new_cache(), dec.new_cache());
        let hidden = dec.embed(&[p0.clone(), p1.clone()].concat()).unwrap();
        let mut seqs = [
            BatchSequence {
                cache: &mut c0,
                tokens: &p0,
                positions: &pos0,
            },
            BatchSequence {
                cache: &mut c1,
                tokens: &p1,
                positions: &pos1,
            },
        ];
        let all = dec.forward_batch(&mut seqs, hidden, Logits::All).unwrap();
        assert!(max_abs_diff(&all[..6 * vocab], &alone[0]) < 1e-4);
        assert!(max_abs_diff(&all[6 * vocab..], &alone[1]) < 1e-4);
        assert_eq!((c0.len(), c1.len()), (6, 3));
        // Logits::Last: one row per sequence.
        let mut seqs = [
            BatchSequence {
                cache: &mut c0,
                tokens: &p1[..1],
                positions: &[[50; 3]],
            },
            BatchSequence {
                cache: &mut c1,
                tokens: &p0[..2],
                positions: &[[60; 3], [61; 3]],
            },
        ];
        let hidden = dec.embed(&[p1[0], p0[0], p0[1]]).unwrap();
        let last = dec.forward_batch(&mut seqs, hidden, Logits::Last).unwrap();
        assert_eq!(last.len(), 2 * vocab);
        // Bad shapes are errors naming the problem.
        let mut seqs = [BatchSequence {
            cache: &mut c0,
            tokens: &p0[..2],
            positions: &[[0; 3]],
        }];
        let err = dec
            .forward_batch(&mut seqs, vec![0.0; 128], Logits::Last)
            .unwrap_err();
        assert!(err.to_string().contains("sequence 0"), "{err}");
        assert!(dec
            .forward_batch(&mut [], Vec::new(), Logits::Last)
            .is_err());
        let err = decode_step(&dec, &mut [&mut c0], &[1, 2]).unwrap_err();
        assert!(
            err.to_string().contains("2 tokens for 1 sequences"),
            "{err}"
        );
    }

    /// Greedy tokens of `request` decoded alone, one token at a time.
    fn alone(dec: &TextDecoder, request: &Request) -> (Vec<u32>, StopReason) {
        if request.max_tokens == 0 {
            return (Vec::new(), StopReason::MaxTokens);
        }
        let mut cache = dec.new_cache();
        let n = request.prompt.len();
        let pos: Vec<[i64; 3]> = (0..n as i64).map(|i| [i; 3]).collect();
        let mut logits = dec
            .forward(
                &mut cache,
                dec.embed(&request.prompt).unwrap(),
                &request.prompt,
                &pos,
                None,
                Logits::Last,
            )
            .unwrap();
        let mut out = Vec::new();
        loop {
            let t = argmax(&logits) as u32;
            if request.stop_tokens.contains(&t) {
                return (out, StopReason::Eos(t));
            }
            out.push(t);
            if out.len() == request.max_tokens {
                return (out, StopReason::MaxTokens);
            }
            let mut refs = [&mut cache];
            logits = decode_step(dec, &mut refs, &[t]).unwrap();
        }
    }

    fn requests(dec: &TextDecoder) -> Vec<Request> {
        let lens = [(5, 9), (12, 3), (2, 14), (20, 6), (7, 1), (3, 11), (9, 0)];
        let mut reqs: Vec<Request> = lens
            .iter()
            .enumerate()
            .map(|(i, &(len, max_tokens))| Request {
                prompt: prompt(i as u32 + 10, len),
                max_tokens,
                stop_tokens: Vec::new(),
            })
            .collect();
        // One request stops at a token it is known to produce.
        let (tokens, _) = alone(dec, &reqs[2]);
        reqs[2].stop_tokens = vec![tokens[4]];
        reqs
    }

    #[test]
    fn scheduler_gives_each_request_its_greedy_output_and_releases_blocks() {
        let dec = tiny_decoder();
        let reqs = requests(&dec);
        let config = BatchConfig {
            max_batch: 3,
            max_prefill_tokens: 16,
            max_kv_blocks: 0,
            block_tokens: 4,
        };
        let mut sched = BatchScheduler::new(&dec, config).unwrap();
        for r in &reqs {
            sched.submit(r.clone()).unwrap();
        }
        let mut streams: Vec<Vec<u32>> = vec![Vec::new(); reqs.len()];
        let mut finished_order = Vec::new();
        let stats = sched
            .run(&mut |e| match e {
                BatchEvent::Token { request, token } => streams[*request].push(*token),
                BatchEvent::Finished(f) => finished_order.push(f.request),
            })
            .unwrap();
        assert!(sched.is_idle());
        assert_eq!(sched.kv_blocks_in_use(), 0);
        assert_eq!(sched.kv_blocks_reserved(), 0);
        assert_eq!(stats.finished.len(), reqs.len());
        assert!(stats.peak_batch <= 3 && stats.peak_batch >= 2);
        // Requests left in a different order than they came: short ones first.
        assert_ne!(finished_order, (0..reqs.len()).collect::<Vec<_>>());
        for f in &stats.finished {
            let (want, stop) = alone(&dec, &reqs[f.request]);
            assert_eq!(f.tokens, want, "request {}", f.request);
            assert_eq!(f.stop, stop, "request {}", f.request);
            assert_eq!(streams[f.request], want);
            assert!(f.queued_secs <= f.first_token_secs && f.first_token_secs <= f.total_secs);
        }
        assert!(matches!(
            stats
                .finished
                .iter()
                .find(|f| f.request == 2)
                .map(|f| f.stop),
            Some(StopReason::Eos(_))
        ));
        assert_eq!(
            stats.generated_tokens,
            stats.finished.iter().map(|f| f.tokens.len()).sum::<usize>()
        );
    }

    #[test]
    fn kv_budget_limits_how_many_run_at_once() {
        let dec = tiny_decoder();
        let reqs: Vec<Request> = (0..5)
            .map(|i| Request {
                prompt: prompt(i, 6),
                max_tokens: 6,
                stop_tokens: Vec::new(),
            })
            .collect();
        // Each request needs 3 blocks of 4 tokens; 7 blocks fit two at once.
        let config = BatchConfig {
            max_batch: 8,
            max_prefill_tokens: 64,
            max_kv_blocks: 7,
            block_tokens: 4,
        };
        let mut sched = BatchScheduler::new(&dec, config).unwrap();
        for r in &reqs {
            sched.submit(r.clone()).unwrap();
        }
        let mut most_running = 0;
        while !sched.is_idle() {
            sched.step().unwrap();
            most_running = most_running.max(sched.last_batch());
            assert!(sched.kv_blocks_reserved() <= 7);
            assert!(sched.kv_blocks_in_use() <= sched.kv_blocks_reserved());
        }
        assert_eq!(most_running, 2);
        assert!(sched.peak_kv_blocks() <= 6);
        assert_eq!(sched.kv_bytes_in_use(), 0);
        // Requests that can never fit, and bad prompts, are refused at submit.
        let too_long = Request {
            prompt: prompt(0, 20),
            max_tokens: 20,
            stop_tokens: Vec::new(),
        };
        let err = sched.submit(too_long).unwrap_err();
        assert!(err.to_string().contains("KV blocks"), "{err}");
        let empty = Request {
            prompt: Vec::new(),
            max_tokens: 1,
            stop_tokens: Vec::new(),
        };
        assert!(sched.submit(empty).is_err());
        let outside = Request {
            prompt: vec![1, 999],
            max_tokens: 1,
            stop_tokens: Vec::new(),
        };
        let err = sched.submit(outside).unwrap_err();
        assert!(err.to_string().contains("999"), "{err}");
        assert!(BatchScheduler::new(
            &dec,
            BatchConfig {
                max_batch: 0,
                ..BatchConfig::default()
            }
        )
        .is_err());
    }
}
