//! Qwen3-VL: the vision encoder feeding the text decoder, the 3D
//! multimodal position ids, sessions with a paged KV cache, and greedy
//! generation.

use crate::checkpoint::{HfCheckpoint, WeightSource};
use crate::config::Qwen3VlConfig;
use crate::error::{ModelError, Result};
use crate::kv::{PagedKvCache, DEFAULT_BLOCK_TOKENS};
use crate::ops::argmax;
use crate::text::{DecoderTensorNames, DeepstackFeatures, ForwardInput, Logits, TextDecoder};
use crate::vision::VisionEncoder;
use std::path::Path;

/// Images for one request: processor output for all of them, in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImageInput {
    /// Flattened patches, `patches x (C * T * P * P)`.
    pub pixel_values: Vec<f32>,
    /// `[t, h, w]` in patches, one per image.
    pub grid_thw: Vec<[usize; 3]>,
}

impl ImageInput {
    /// The input of preprocessed images, in order.
    pub fn from_processed(images: &[crate::preprocess::ProcessedImage]) -> ImageInput {
        ImageInput {
            pixel_values: images
                .iter()
                .flat_map(|i| i.pixel_values.iter().copied())
                .collect(),
            grid_thw: images.iter().map(|i| i.grid_thw).collect(),
        }
    }
}

/// A loaded Qwen3-VL model.
pub struct Qwen3VlModel {
    config: Qwen3VlConfig,
    text: TextDecoder,
    vision: VisionEncoder,
}

/// One conversation's state: its KV cache and where its positions go on.
pub struct Session {
    /// The paged KV cache.
    pub cache: PagedKvCache,
    /// The position id of the next token (images advance positions by less
    /// than their token count, so this differs from the cache length).
    next_position: i64,
}

impl Session {
    /// Tokens in the cache.
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    /// Whether nothing was run yet.
    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// Reuses a full KV block of a text-only prefix (exported from another
    /// session with [`PagedKvCache::export_block`], e.g. through a
    /// [`qvl_core::BlockStore`]) instead of computing it again.
    pub fn import_text_block(&mut self, tokens: &[u32], block: &qvl_core::Block) -> Result<()> {
        if self.next_position != self.cache.len() as i64 {
            return Err(ModelError::KvCache(
                "blocks can be imported onto text-only prefixes only".to_string(),
            ));
        }
        self.cache.import_block(tokens, block)?;
        self.next_position = self.cache.len() as i64;
        Ok(())
    }
}

impl Qwen3VlModel {
    /// Loads a Hugging Face checkpoint directory (config.json and its
    /// safetensors files).
    pub fn load(dir: &Path) -> Result<Qwen3VlModel> {
        let ckpt = HfCheckpoint::open(dir)?;
        let config = Qwen3VlConfig::from_json(ckpt.config(), &dir.join("config.json"))?;
        Qwen3VlModel::from_source(config, &ckpt)
    }

    /// Loads a model of `config` from `src` under the parameter names of
    /// `Qwen3VLForConditionalGeneration`.
    pub fn from_source(config: Qwen3VlConfig, src: &dyn WeightSource) -> Result<Qwen3VlModel> {
        let text = TextDecoder::load(config.text.clone(), src, &DecoderTensorNames::qwen3_vl())?;
        let vision = VisionEncoder::load(config.vision.clone(), src, "model.visual")?;
        Ok(Qwen3VlModel {
            config,
            text,
            vision,
        })
    }

    /// The config.
    pub fn config(&self) -> &Qwen3VlConfig {
        &self.config
    }

    /// The text decoder.
    pub fn text(&self) -> &TextDecoder {
        &self.text
    }

    /// The vision encoder.
    pub fn vision(&self) -> &VisionEncoder {
        &self.vision
    }

    /// The tokens an image of grid `grid_thw` takes in a prompt:
    /// `<vision_start>`, one image placeholder per merged token, `<vision_end>`.
    pub fn image_placeholder(&self, grid_thw: [usize; 3]) -> Vec<u32> {
        let mut ids = vec![self.config.vision_start_token_id];
        ids.extend(std::iter::repeat_n(
            self.config.image_token_id,
            self.vision.tokens_for_grid(grid_thw),
        ));
        ids.push(self.config.vision_end_token_id);
        ids
    }

    /// A new session with an in-memory cache of `block_tokens` per block.
    pub fn new_session_with_blocks(&self, block_tokens: usize) -> Session {
        Session {
            cache: PagedKvCache::in_memory(self.text.kv_layout(block_tokens.max(1))),
            next_position: 0,
        }
    }

    /// A new session with the default block size.
    pub fn new_session(&self) -> Session {
        self.new_session_with_blocks(DEFAULT_BLOCK_TOKENS)
    }

    /// The 3D (t, h, w) position ids of `ids` starting at `start`, as the
    /// reference's `get_rope_index`: text advances all three by one; each
    /// image's placeholder run gets its grid of (t, row, column) offsets
    /// from the current position, after which text continues at
    /// `current + max(h, w) / merge`. Returns the ids and the next position.
    pub fn rope_index(
        &self,
        ids: &[u32],
        grids: &[[usize; 3]],
        start: i64,
    ) -> Result<(Vec<[i64; 3]>, i64)> {
        let m = self.config.vision.spatial_merge_size;
        let image = self.config.image_token_id;
        let mut positions = Vec::with_capacity(ids.len());
        let mut current = start;
        let mut next_grid = 0;
        let mut i = 0;
        while i < ids.len() {
            if ids[i] != image {
                positions.push([current; 3]);
                current += 1;
                i += 1;
                continue;
            }
            let [t, h, w] = *grids.get(next_grid).ok_or_else(|| {
                ModelError::InvalidInput(format!(
                    "image placeholder at position {i} but only {} image grids",
                    grids.len()
                ))
            })?;
            next_grid += 1;
            let (lh, lw) = (h / m, w / m);
            let count = t * lh * lw;
            if i + count > ids.len() || ids[i..i + count].iter().any(|&x| x != image) {
                return Err(ModelError::InvalidInput(format!(
                    "image {} (grid {:?}) needs {count} placeholder tokens from position {i}",
                    next_grid - 1,
                    [t, h, w]
                )));
            }
            for tt in 0..t {
                for r in 0..lh {
                    for c in 0..lw {
                        positions.push([
                            current + tt as i64,
                            current + r as i64,
                            current + c as i64,
                        ]);
                    }
                }
            }
            current += lh.max(lw) as i64;
            i += count;
        }
        if next_grid != grids.len() {
            return Err(ModelError::InvalidInput(format!(
                "{} image grids but placeholders for {next_grid}",
                grids.len()
            )));
        }
        Ok((positions, current))
    }

    /// Runs `ids` (with the images their placeholders stand for) through the
    /// model in one batch, appending to the session's cache. Returns logits
    /// for every position (`ids.len() x vocab`) or only the last.
    pub fn prefill(
        &self,
        session: &mut Session,
        ids: &[u32],
        images: Option<&ImageInput>,
        logits: Logits,
    ) -> Result<Vec<f32>> {
        self.prefill_inner(session, ids, images, logits, None, &mut |_, _| {})
    }

    /// [`Self::prefill`] for a caller that shows progress on long prompts:
    /// the text runs in chunks of at most `chunk_tokens` (after the images
    /// are encoded), and `progress` hears `(tokens done, tokens in all)`
    /// after each. Logits are those of one pass within 1e-4 (chunks change
    /// only the order attention sums in).
    pub fn prefill_with_progress(
        &self,
        session: &mut Session,
        ids: &[u32],
        images: Option<&ImageInput>,
        logits: Logits,
        chunk_tokens: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<f32>> {
        self.prefill_inner(session, ids, images, logits, Some(chunk_tokens), progress)
    }

    fn prefill_inner(
        &self,
        session: &mut Session,
        ids: &[u32],
        images: Option<&ImageInput>,
        logits: Logits,
        chunk_tokens: Option<usize>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<f32>> {
        if ids.is_empty() {
            return Err(ModelError::InvalidInput("prefill of no tokens".to_string()));
        }
        let grids: &[[usize; 3]] = images.map_or(&[], |im| &im.grid_thw);
        let (positions, next) = self.rope_index(ids, grids, session.next_position)?;
        let mut hidden = self.text.embed(ids)?;
        let h = self.config.text.hidden_size;
        let image_rows: Vec<usize> = ids
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == self.config.image_token_id)
            .map(|(i, _)| i)
            .collect();
        let vision_out = match images {
            Some(im) if !im.grid_thw.is_empty() => {
                Some(self.vision.forward(&im.pixel_values, &im.grid_thw)?)
            }
            _ => None,
        };
        if let Some(v) = &vision_out {
            if v.embeds.len() != image_rows.len() * h {
                return Err(ModelError::InvalidInput(format!(
                    "{} image placeholder tokens but the images give {} tokens",
                    image_rows.len(),
                    v.embeds.len() / h
                )));
            }
            for (r, &row) in image_rows.iter().enumerate() {
                hidden[row * h..(row + 1) * h].copy_from_slice(&v.embeds[r * h..(r + 1) * h]);
            }
        }
        let deepstack = vision_out.as_ref().map(|v| DeepstackFeatures {
            rows: &image_rows,
            layers: &v.deepstack,
        });
        let out = match chunk_tokens {
            None => self.text.forward(
                &mut session.cache,
                hidden,
                ids,
                &positions,
                deepstack.as_ref(),
                logits,
            )?,
            Some(chunk_tokens) => self.text.forward_with_progress(
                &mut session.cache,
                ForwardInput {
                    hidden,
                    tokens: ids,
                    positions: &positions,
                    deepstack: deepstack.as_ref(),
                },
                logits,
                chunk_tokens,
                progress,
            )?,
        };
        session.next_position = next;
        Ok(out)
    }

    /// One decode step: appends `token` and returns its logits (`vocab`).
    pub fn decode_step(&self, session: &mut Session, token: u32) -> Result<Vec<f32>> {
        if token == self.config.image_token_id {
            return Err(ModelError::InvalidInput(
                "an image placeholder cannot be decoded without its image".to_string(),
            ));
        }
        let pos = session.next_position;
        let hidden = self.text.embed(&[token])?;
        let out = self.text.forward(
            &mut session.cache,
            hidden,
            &[token],
            &[[pos; 3]],
            None,
            Logits::Last,
        )?;
        session.next_position += 1;
        Ok(out)
    }
}

/// Greedy generation: prefills `prompt_ids` (with `images`) in one batch,
/// then decodes `max_tokens` tokens, each the argmax of the last logits.
/// Returns the generated tokens (not the prompt).
pub fn generate(
    model: &Qwen3VlModel,
    prompt_ids: &[u32],
    images: Option<&ImageInput>,
    max_tokens: usize,
) -> Result<Vec<u32>> {
    let mut session = model.new_session();
    generate_in(model, &mut session, prompt_ids, images, max_tokens, None)
}

/// [`generate`] in an existing session, stopping early at `stop_token`.
pub fn generate_in(
    model: &Qwen3VlModel,
    session: &mut Session,
    prompt_ids: &[u32],
    images: Option<&ImageInput>,
    max_tokens: usize,
    stop_token: Option<u32>,
) -> Result<Vec<u32>> {
    let mut out = Vec::with_capacity(max_tokens);
    if max_tokens == 0 {
        return Ok(out);
    }
    let mut logits = model.prefill(session, prompt_ids, images, Logits::Last)?;
    loop {
        let next = argmax(&logits) as u32;
        out.push(next);
        if out.len() == max_tokens || Some(next) == stop_token {
            return Ok(out);
        }
        logits = model.decode_step(session, next)?;
    }
}
