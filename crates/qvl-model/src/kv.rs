//! The paged KV cache.
//!
//! A sequence's keys and values live in fixed-size blocks of
//! `block_tokens` tokens (16 by default) that hold every layer. Where the
//! blocks live and in which format is the business of a [`KvBlockStorage`]:
//! [`HostKvStorage`] keeps f32 blocks in RAM; other storages (compressed,
//! on a GPU, swapped to SSD) implement the same trait and hand blocks back
//! as f32 when attention reads them. Attention walks a sequence's blocks in
//! order with an online softmax, so no block needs to sit next to another.
//!
//! Full blocks get a [`BlockKey`] chained over the token ids (prefix
//! caching keys) and can leave as a [`qvl_core::Block`] for any
//! [`qvl_core::BlockStore`].

use crate::error::{ModelError, Result};
use crate::linear::dot;
use qvl_core::{Block, BlockKey, DType, TensorKind, TensorMeta};
use rayon::prelude::*;
use std::borrow::Cow;

/// Tokens per block unless configured otherwise.
pub const DEFAULT_BLOCK_TOKENS: usize = 16;

/// The shape of every block of a cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    /// Decoder layers.
    pub layers: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Tokens per block.
    pub block_tokens: usize,
}

impl KvLayout {
    /// f32 values of one token's keys (or values) in one layer.
    pub fn token_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// f32 values of one layer's keys and values in a block.
    pub fn layer_floats(&self) -> usize {
        2 * self.block_tokens * self.token_width()
    }

    /// f32 values of a whole block (all layers, keys and values).
    pub fn block_floats(&self) -> usize {
        self.layers * self.layer_floats()
    }

    /// Checks a [`KvBlockStorage::write`] of `keys` and `values` at `layer`,
    /// starting at token `slot` of a block, against this layout; returns the
    /// number of tokens written. Every storage validates writes with it.
    pub fn check_write(
        &self,
        layer: usize,
        slot: usize,
        keys: &[f32],
        values: &[f32],
    ) -> Result<usize> {
        let w = self.token_width();
        let tokens = keys.len() / w.max(1);
        if keys.len() != values.len()
            || keys.len() % w.max(1) != 0
            || slot + tokens > self.block_tokens
            || layer >= self.layers
        {
            return Err(ModelError::KvCache(format!(
                "write of {} keys at layer {layer} slot {slot} does not fit a block of {} tokens x {w}",
                keys.len(),
                self.block_tokens
            )));
        }
        Ok(tokens)
    }

    /// Copies a write that [`KvLayout::check_write`] accepted into `block`,
    /// one whole block in this layout (per layer: keys of every token slot,
    /// then values).
    pub fn copy_into_block(
        &self,
        block: &mut [f32],
        layer: usize,
        slot: usize,
        keys: &[f32],
        values: &[f32],
    ) {
        let w = self.token_width();
        let base = layer * self.layer_floats();
        let kstart = base + slot * w;
        let vstart = base + self.block_tokens * w + slot * w;
        block[kstart..kstart + keys.len()].copy_from_slice(keys);
        block[vstart..vstart + values.len()].copy_from_slice(values);
    }

    /// Layer `layer` (checked by the caller) of `block`, one whole block in
    /// this layout, as attention reads it.
    pub fn layer_view<'a>(&self, block: &'a [f32], layer: usize) -> KvLayerView<'a> {
        let base = layer * self.layer_floats();
        let half = self.block_tokens * self.token_width();
        KvLayerView::new(
            Cow::Borrowed(&block[base..base + half]),
            Cow::Borrowed(&block[base + half..base + 2 * half]),
        )
    }
}

/// Identifies a block inside one storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KvBlockId(pub u64);

/// One layer of one block as attention reads it: keys then values, each
/// `block_tokens x kv_heads x head_dim` f32 (token-major).
pub struct KvLayerView<'a> {
    /// Keys.
    pub keys: Cow<'a, [f32]>,
    /// Values.
    pub values: Cow<'a, [f32]>,
    /// A check the bytes must pass before anything computed from them is
    /// used (a checksum of bytes read back from disk), or None. Attention
    /// runs it right before it reads the block ([`KvLayerView::verify`]),
    /// so that the check streams the bytes into cache for the compute that
    /// follows instead of making a pass of its own over memory; an error
    /// fails the attention call.
    pub check: Option<KvCheck<'a>>,
}

/// See [`KvLayerView::check`].
pub type KvCheck<'a> = Box<dyn Fn() -> Result<()> + Send + Sync + 'a>;

impl<'a> KvLayerView<'a> {
    /// A view with nothing to check.
    pub fn new(keys: Cow<'a, [f32]>, values: Cow<'a, [f32]>) -> Self {
        KvLayerView {
            keys,
            values,
            check: None,
        }
    }

    /// Runs the view's check, if any.
    pub fn verify(&self) -> Result<()> {
        self.check.as_ref().map_or(Ok(()), |check| check())
    }
}

/// Where blocks live and in which format.
pub trait KvBlockStorage: Send + Sync {
    /// The shape of this storage's blocks.
    fn layout(&self) -> KvLayout;

    /// A new zeroed block.
    fn allocate(&mut self) -> Result<KvBlockId>;

    /// Gives a block back.
    fn release(&mut self, id: KvBlockId) -> Result<()>;

    /// Writes the keys and values of `keys.len() / token_width` consecutive
    /// tokens of `layer`, starting at `slot` inside block `id`.
    fn write(
        &mut self,
        id: KvBlockId,
        layer: usize,
        slot: usize,
        keys: &[f32],
        values: &[f32],
    ) -> Result<()>;

    /// One layer of block `id`.
    fn read(&self, id: KvBlockId, layer: usize) -> Result<KvLayerView<'_>>;

    /// One layer of each block of `ids`, in order: what attention reads
    /// for one layer. The default reads the blocks one by one; a storage
    /// that fetches blocks from elsewhere overrides it to serve the whole
    /// layer in one pass (one lock, one batch of reads).
    fn read_layer(&self, ids: &[KvBlockId], layer: usize) -> Result<Vec<KvLayerView<'_>>> {
        ids.iter().map(|id| self.read(*id, layer)).collect()
    }

    /// Bytes the storage holds now.
    fn used_bytes(&self) -> usize;

    /// Most blocks one forward pass may write into at once before the
    /// storage has to move some of them out and back again (a swapping
    /// storage's resident capacity); None when there is no such limit.
    /// [`crate::TextDecoder::forward`] runs a longer prompt in chunks that
    /// fit it.
    fn write_window_blocks(&self) -> Option<usize> {
        None
    }

    /// Sees every attention over `layer`: the `queries` (`n x heads x
    /// head_dim`, the last `n` tokens written) and the `output` computed
    /// from what [`KvBlockStorage::read`] returned. Storages that encode
    /// lossily use it to measure what their encoding does to attention;
    /// the default ignores it.
    fn observe_attention(
        &self,
        _layer: usize,
        _queries: &[f32],
        _heads: usize,
        _scale: f32,
        _output: &[f32],
    ) {
    }
}

/// Copies blocks `ids` of `from` into new blocks of `to` and returns the
/// new ids, in order. It goes a layer at a time: each layer of all blocks
/// is one [`KvBlockStorage::read_layer`] call, so a storage that fetches
/// blocks from elsewhere (an SSD) serves it in a few merged reads instead
/// of a round trip per block and layer. Every view is verified before it
/// is copied. On an error the blocks allocated in `to` are released again;
/// `from` is never changed.
pub fn copy_blocks(
    from: &dyn KvBlockStorage,
    to: &mut dyn KvBlockStorage,
    ids: &[KvBlockId],
) -> Result<Vec<KvBlockId>> {
    let mut new = Vec::with_capacity(ids.len());
    let copied = copy_layers(from, to, ids, &mut new);
    if let Err(e) = copied {
        for id in new {
            // The copy's error is the one to report.
            let _ = to.release(id);
        }
        return Err(e);
    }
    Ok(new)
}

/// The work of [`copy_blocks`]; the ids allocated so far are in `new`.
fn copy_layers(
    from: &dyn KvBlockStorage,
    to: &mut dyn KvBlockStorage,
    ids: &[KvBlockId],
    new: &mut Vec<KvBlockId>,
) -> Result<()> {
    for _ in ids {
        new.push(to.allocate()?);
    }
    for layer in 0..from.layout().layers {
        let views = from.read_layer(ids, layer)?;
        for (view, &id) in views.iter().zip(new.iter()) {
            view.verify()?;
            to.write(id, layer, 0, &view.keys, &view.values)?;
        }
    }
    Ok(())
}

/// Tokens of context one task of single-query attention covers: ranges are
/// fixed by position, not by the number of threads, so the result (its
/// rounding) does not depend on the machine.
const DECODE_TOKENS_PER_TASK: usize = 128;

/// The running max and sum of one query head's online softmax; the
/// weighted sum of values it scales lives beside it (the output row).
#[derive(Clone, Copy)]
struct Softmax {
    max: f32,
    sum: f32,
}

impl Softmax {
    fn new() -> Softmax {
        Softmax {
            max: f32::NEG_INFINITY,
            sum: 0.0,
        }
    }

    /// Adds the first `count` tokens of `view` (the kv head whose channels
    /// start at `kv`) for query `q`, rescaling `o` as the max grows.
    #[allow(clippy::too_many_arguments)]
    fn add_block(
        &mut self,
        l: KvLayout,
        view: &KvLayerView<'_>,
        q: &[f32],
        kv: usize,
        count: usize,
        scale: f32,
        o: &mut [f32],
    ) {
        let (hd, w) = (l.head_dim, l.token_width());
        let mut scores = [0f32; 64];
        let mut done = 0;
        // Scores in chunks so the buffer stays on the stack whatever the block size.
        while done < count {
            let c = (count - done).min(scores.len());
            let mut cmax = f32::NEG_INFINITY;
            for (t, score) in scores[..c].iter_mut().enumerate() {
                let at = (done + t) * w + kv;
                *score = dot(q, &view.keys[at..at + hd]) * scale;
                cmax = cmax.max(*score);
            }
            let new_max = self.max.max(cmax);
            let corr = (self.max - new_max).exp();
            self.sum *= corr;
            o.iter_mut().for_each(|v| *v *= corr);
            for (t, score) in scores[..c].iter().enumerate() {
                let at = (done + t) * w + kv;
                let e = (score - new_max).exp();
                self.sum += e;
                for (ov, vv) in o.iter_mut().zip(&view.values[at..at + hd]) {
                    *ov += e * vv;
                }
            }
            self.max = new_max;
            done += c;
        }
    }
}

/// The online softmax of every head over part of the context: each
/// head's running max and sum, and its weighted sum of values (`acc`,
/// `heads x head_dim`).
struct Partial {
    runs: Vec<Softmax>,
    acc: Vec<f32>,
}

/// Attention of one query (decode) over the first `total` tokens of
/// `views`, split by block ranges rather than by head: each task checks a
/// block ([`KvLayerView::verify`]) and runs every head over it while its
/// bytes are in cache, keeping a running max, sum and weighted sum per
/// head (flash-decoding); the ranges' partials are merged at the end.
fn attend_one(
    l: KvLayout,
    views: &[KvLayerView<'_>],
    query: &[f32],
    heads: usize,
    scale: f32,
    total: usize,
) -> Result<Vec<f32>> {
    let hd = l.head_dim;
    let bt = l.block_tokens;
    let group = heads / l.kv_heads;
    let used = total.div_ceil(bt).min(views.len());
    let per_task = (DECODE_TOKENS_PER_TASK / bt).max(1);
    let partials = views[..used]
        .par_chunks(per_task)
        .enumerate()
        .map(|(r, range)| -> Result<Partial> {
            let mut p = Partial {
                runs: vec![Softmax::new(); heads],
                acc: vec![0f32; heads * hd],
            };
            for (j, view) in range.iter().enumerate() {
                view.verify()?;
                let start = (r * per_task + j) * bt;
                let count = (total - start).min(bt);
                for (h, (run, o)) in p.runs.iter_mut().zip(p.acc.chunks_mut(hd)).enumerate() {
                    let q = &query[h * hd..(h + 1) * hd];
                    run.add_block(l, view, q, (h / group) * hd, count, scale, o);
                }
            }
            Ok(p)
        })
        .collect::<Result<Vec<Partial>>>()?;
    let mut out = vec![0f32; heads * hd];
    for h in 0..heads {
        let max = partials
            .iter()
            .map(|p| p.runs[h].max)
            .fold(f32::NEG_INFINITY, f32::max);
        let o = &mut out[h * hd..(h + 1) * hd];
        let mut sum = 0f32;
        for p in &partials {
            let f = (p.runs[h].max - max).exp();
            sum += p.runs[h].sum * f;
            for (ov, pv) in o.iter_mut().zip(&p.acc[h * hd..(h + 1) * hd]) {
                *ov += pv * f;
            }
        }
        let inv = 1.0 / sum;
        o.iter_mut().for_each(|v| *v *= inv);
    }
    Ok(out)
}

/// f32 blocks in host RAM, reused through a free list.
pub struct HostKvStorage {
    layout: KvLayout,
    blocks: Vec<Option<Vec<f32>>>,
    free: Vec<usize>,
}

impl HostKvStorage {
    /// An empty storage for blocks of `layout`.
    pub fn new(layout: KvLayout) -> HostKvStorage {
        HostKvStorage {
            layout,
            blocks: Vec::new(),
            free: Vec::new(),
        }
    }

    fn block(&self, id: KvBlockId) -> Result<&Vec<f32>> {
        self.blocks
            .get(id.0 as usize)
            .and_then(Option::as_ref)
            .ok_or_else(|| ModelError::KvCache(format!("no block {} in host storage", id.0)))
    }
}

impl KvBlockStorage for HostKvStorage {
    fn layout(&self) -> KvLayout {
        self.layout
    }

    fn allocate(&mut self) -> Result<KvBlockId> {
        let data = vec![0f32; self.layout.block_floats()];
        if let Some(i) = self.free.pop() {
            self.blocks[i] = Some(data);
            return Ok(KvBlockId(i as u64));
        }
        self.blocks.push(Some(data));
        Ok(KvBlockId(self.blocks.len() as u64 - 1))
    }

    fn release(&mut self, id: KvBlockId) -> Result<()> {
        let slot = self
            .blocks
            .get_mut(id.0 as usize)
            .filter(|b| b.is_some())
            .ok_or_else(|| ModelError::KvCache(format!("release of unknown block {}", id.0)))?;
        *slot = None;
        self.free.push(id.0 as usize);
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
        l.check_write(layer, slot, keys, values)?;
        let data = self
            .blocks
            .get_mut(id.0 as usize)
            .and_then(Option::as_mut)
            .ok_or_else(|| ModelError::KvCache(format!("write to unknown block {}", id.0)))?;
        l.copy_into_block(data, layer, slot, keys, values);
        Ok(())
    }

    fn read(&self, id: KvBlockId, layer: usize) -> Result<KvLayerView<'_>> {
        let l = self.layout;
        if layer >= l.layers {
            return Err(ModelError::KvCache(format!(
                "layer {layer} out of {}",
                l.layers
            )));
        }
        Ok(l.layer_view(self.block(id)?, layer))
    }

    fn used_bytes(&self) -> usize {
        self.blocks.iter().flatten().count() * self.layout.block_floats() * 4
    }
}

/// The KV cache of one sequence: its block table over a storage.
pub struct PagedKvCache {
    storage: Box<dyn KvBlockStorage>,
    table: Vec<KvBlockId>,
    len: usize,
    pending: usize,
    tokens: Vec<u32>,
}

impl PagedKvCache {
    /// A cache over blocks in RAM.
    pub fn in_memory(layout: KvLayout) -> PagedKvCache {
        PagedKvCache::new(Box::new(HostKvStorage::new(layout)))
    }

    /// A cache over any storage.
    pub fn new(storage: Box<dyn KvBlockStorage>) -> PagedKvCache {
        PagedKvCache {
            storage,
            table: Vec::new(),
            len: 0,
            pending: 0,
            tokens: Vec::new(),
        }
    }

    /// The block shape.
    pub fn layout(&self) -> KvLayout {
        self.storage.layout()
    }

    /// Tokens cached (committed).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The block table.
    pub fn blocks(&self) -> &[KvBlockId] {
        &self.table
    }

    /// Bytes held by the storage.
    pub fn used_bytes(&self) -> usize {
        self.storage.used_bytes()
    }

    /// Most tokens one forward pass should append, wherever the sequence
    /// ends now, so that the blocks it writes stay resident (see
    /// [`KvBlockStorage::write_window_blocks`]); None when any number fits.
    pub fn write_window_tokens(&self) -> Option<usize> {
        let blocks = self.storage.write_window_blocks()?;
        // One block less: the first written may be partly filled already.
        Some(blocks.saturating_sub(1).max(1) * self.layout().block_tokens)
    }

    /// Makes room for `n` more tokens (allocating blocks as needed); they
    /// are pending until [`Self::commit`].
    pub fn reserve(&mut self, n: usize) -> Result<()> {
        self.pending = n;
        let bt = self.layout().block_tokens;
        let need = (self.len + n).div_ceil(bt);
        while self.table.len() < need {
            let id = self.storage.allocate()?;
            self.table.push(id);
        }
        Ok(())
    }

    /// Writes keys and values (`n x kv_heads x head_dim` each) of `layer`
    /// for the `n` tokens after the committed ones. Call [`Self::reserve`]
    /// first and [`Self::commit`] after every layer is written.
    pub fn write_layer(&mut self, layer: usize, keys: &[f32], values: &[f32]) -> Result<()> {
        let l = self.layout();
        let w = l.token_width();
        let n = keys.len() / w;
        let mut done = 0;
        while done < n {
            if n > self.pending {
                return Err(ModelError::KvCache(format!(
                    "write of {n} tokens, {} reserved",
                    self.pending
                )));
            }
            let pos = self.len + done;
            let (b, slot) = (pos / l.block_tokens, pos % l.block_tokens);
            let id = *self.table.get(b).ok_or_else(|| {
                ModelError::KvCache(format!("token {pos} has no block; reserve before writing"))
            })?;
            let take = (l.block_tokens - slot).min(n - done);
            self.storage.write(
                id,
                layer,
                slot,
                &keys[done * w..(done + take) * w],
                &values[done * w..(done + take) * w],
            )?;
            done += take;
        }
        Ok(())
    }

    /// Marks the pending tokens as cached, with their ids (for block keys).
    pub fn commit(&mut self, tokens: &[u32]) -> Result<()> {
        if tokens.len() != self.pending {
            return Err(ModelError::KvCache(format!(
                "commit of {} tokens, {} were reserved",
                tokens.len(),
                self.pending
            )));
        }
        self.len += tokens.len();
        self.pending = 0;
        self.tokens.extend_from_slice(tokens);
        Ok(())
    }

    /// Causal attention of `queries` (`n x heads x head_dim`, the last `n`
    /// written tokens, committed or pending, in order) over the cache of
    /// `layer`: query `i` sees tokens `0..=total - n + i`. Walks the blocks
    /// with an online softmax.
    pub fn attend(
        &self,
        layer: usize,
        queries: &[f32],
        heads: usize,
        scale: f32,
    ) -> Result<Vec<f32>> {
        let l = self.layout();
        let hd = l.head_dim;
        let n = queries.len() / (heads * hd);
        let total = self.len + self.pending;
        if n > total || heads % l.kv_heads != 0 {
            return Err(ModelError::KvCache(format!(
                "{n} queries with {heads} heads do not fit a cache of {total} tokens and {} kv heads",
                l.kv_heads
            )));
        }
        let group = heads / l.kv_heads;
        let first = total - n;
        let views = self.storage.read_layer(&self.table, layer)?;
        if n == 1 {
            let out = attend_one(l, &views, queries, heads, scale, total)?;
            self.storage
                .observe_attention(layer, queries, heads, scale, &out);
            return Ok(out);
        }
        views.par_iter().try_for_each(KvLayerView::verify)?;
        let mut out = vec![0f32; n * heads * hd];
        out.par_chunks_mut(hd).enumerate().for_each(|(qh, o)| {
            let (i, h) = (qh / heads, qh % heads);
            let q = &queries[qh * hd..(qh + 1) * hd];
            let kvh = h / group;
            let visible = first + i + 1;
            let mut run = Softmax::new();
            for (b, view) in views.iter().enumerate() {
                let start = b * l.block_tokens;
                if start >= visible {
                    break;
                }
                let count = (visible - start).min(l.block_tokens);
                run.add_block(l, view, q, kvh * hd, count, scale, o);
            }
            let inv = 1.0 / run.sum;
            o.iter_mut().for_each(|v| *v *= inv);
        });
        self.storage
            .observe_attention(layer, queries, heads, scale, &out);
        Ok(out)
    }

    /// Keys of the full blocks, each chained over its parent and token ids.
    pub fn block_keys(&self) -> Vec<BlockKey> {
        let bt = self.layout().block_tokens;
        let mut keys = Vec::new();
        let mut parent = None;
        for chunk in self.tokens.chunks_exact(bt) {
            let key = BlockKey::chained(parent, chunk, &[]);
            keys.push(key);
            parent = Some(key);
        }
        keys
    }

    /// Full block `index` as a raw f32 [`Block`] of shape
    /// `layers x 2 x block_tokens x kv_heads x head_dim`, keyed by its
    /// chained key, for any [`qvl_core::BlockStore`].
    pub fn export_block(&self, index: usize) -> Result<Block> {
        let l = self.layout();
        let keys = self.block_keys();
        let key = *keys.get(index).ok_or_else(|| {
            ModelError::KvCache(format!(
                "block {index} is not full ({} full blocks)",
                keys.len()
            ))
        })?;
        let mut data = Vec::with_capacity(l.block_floats() * 4);
        for layer in 0..l.layers {
            let view = self.storage.read(self.table[index], layer)?;
            for v in view.keys.iter().chain(view.values.iter()) {
                data.extend_from_slice(&v.to_le_bytes());
            }
        }
        let meta = TensorMeta::new(
            vec![l.layers, 2, l.block_tokens, l.kv_heads, l.head_dim],
            DType::F32,
            TensorKind::KvCache,
        );
        Ok(Block::raw(key, meta, data))
    }

    /// Appends a full block exported by [`Self::export_block`] (from this
    /// or another cache of the same layout) holding `tokens`: the prefix
    /// cache path. The block's key must be the key of `tokens` chained on
    /// this cache's last full block, so a block can only continue the prefix
    /// it was computed for.
    pub fn import_block(&mut self, tokens: &[u32], block: &Block) -> Result<()> {
        let l = self.layout();
        if self.pending != 0 || self.len % l.block_tokens != 0 || tokens.len() != l.block_tokens {
            return Err(ModelError::KvCache(format!(
                "import of {} tokens onto {} cached (+{} pending) tokens: only whole blocks of {} on a block boundary",
                tokens.len(),
                self.len,
                self.pending,
                l.block_tokens
            )));
        }
        let parent = self.block_keys().last().copied();
        let key = BlockKey::chained(parent, tokens, &[]);
        if key != block.key {
            return Err(ModelError::KvCache(format!(
                "block {:?} does not continue this prefix (expected {key:?})",
                block.key
            )));
        }
        let shape = [l.layers, 2, l.block_tokens, l.kv_heads, l.head_dim];
        if block.codec != qvl_core::CodecId::RAW
            || block.meta.dtype != DType::F32
            || block.meta.shape != shape
            || block.data.len() != l.block_floats() * 4
        {
            return Err(ModelError::KvCache(format!(
                "block {:?} is not a raw f32 block of shape {shape:?}",
                block.key
            )));
        }
        let floats: Vec<f32> = block
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        self.reserve(l.block_tokens)?;
        let half = l.block_tokens * l.token_width();
        for layer in 0..l.layers {
            let base = layer * 2 * half;
            self.write_layer(
                layer,
                &floats[base..base + half],
                &floats[base + half..base + 2 * half],
            )?;
        }
        self.commit(tokens)
    }

    /// Gives every block back to the storage.
    pub fn clear(&mut self) -> Result<()> {
        for id in self.table.drain(..) {
            self.storage.release(id)?;
        }
        self.len = 0;
        self.pending = 0;
        self.tokens.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(bt: usize) -> KvLayout {
        KvLayout {
            layers: 2,
            kv_heads: 2,
            head_dim: 4,
            block_tokens: bt,
        }
    }

    /// Plain softmax attention over contiguous keys, for comparison.
    fn reference(q: &[f32], keys: &[Vec<f32>], values: &[Vec<f32>], scale: f32) -> Vec<f32> {
        let mut s: Vec<f32> = keys.iter().map(|k| dot(q, k) * scale).collect();
        crate::ops::softmax(&mut s);
        let mut o = vec![0f32; q.len()];
        for (p, v) in s.iter().zip(values) {
            for (oo, vv) in o.iter_mut().zip(v) {
                *oo += p * vv;
            }
        }
        o
    }

    /// Fills a cache of block size `bt` with `n` tokens of 2 layers.
    fn filled(bt: usize, n: usize, keys: &[f32], values: &[f32]) -> PagedKvCache {
        let w = 8;
        let mut cache = PagedKvCache::in_memory(layout(bt));
        cache.reserve(n).unwrap();
        for layer in 0..2 {
            cache
                .write_layer(layer, &keys[..n * w], &values[..n * w])
                .unwrap();
        }
        cache.commit(&vec![1; n]).unwrap();
        cache
    }

    #[test]
    fn single_query_attention_over_block_ranges_matches_a_plain_softmax() {
        // Long enough for several ranges of DECODE_TOKENS_PER_TASK tokens.
        let n = 3 * DECODE_TOKENS_PER_TASK + 37;
        let w = 8;
        let keys: Vec<f32> = (0..n * w)
            .map(|i| ((i * 13) % 7) as f32 * 0.3 - 1.0)
            .collect();
        let values: Vec<f32> = (0..n * w).map(|i| ((i * 5) % 11) as f32 * 0.2).collect();
        let heads = 4;
        let query: Vec<f32> = (0..heads * 4)
            .map(|i| ((i * 3) % 5) as f32 * 0.25)
            .collect();
        for bt in [1, 3, 16, 64, 200] {
            let cache = filled(bt, n, &keys, &values);
            let out = cache.attend(1, &query, heads, 0.5).unwrap();
            for h in 0..heads {
                let kvh = h / 2;
                let ks: Vec<Vec<f32>> = (0..n)
                    .map(|t| keys[t * w + kvh * 4..t * w + kvh * 4 + 4].to_vec())
                    .collect();
                let vs: Vec<Vec<f32>> = (0..n)
                    .map(|t| values[t * w + kvh * 4..t * w + kvh * 4 + 4].to_vec())
                    .collect();
                let want = reference(&query[h * 4..h * 4 + 4], &ks, &vs, 0.5);
                for (a, b) in out[h * 4..h * 4 + 4].iter().zip(&want) {
                    assert!((a - b).abs() < 1e-5, "bt {bt} h {h}: {a} vs {b}");
                }
            }
        }
    }

    /// Host blocks whose layer reads carry a check that fails for one block.
    struct FailingCheck {
        inner: HostKvStorage,
        bad: KvBlockId,
    }

    impl KvBlockStorage for FailingCheck {
        fn layout(&self) -> KvLayout {
            self.inner.layout()
        }
        fn allocate(&mut self) -> Result<KvBlockId> {
            self.inner.allocate()
        }
        fn release(&mut self, id: KvBlockId) -> Result<()> {
            self.inner.release(id)
        }
        fn write(
            &mut self,
            id: KvBlockId,
            layer: usize,
            slot: usize,
            keys: &[f32],
            values: &[f32],
        ) -> Result<()> {
            self.inner.write(id, layer, slot, keys, values)
        }
        fn read(&self, id: KvBlockId, layer: usize) -> Result<KvLayerView<'_>> {
            self.inner.read(id, layer)
        }
        fn read_layer(&self, ids: &[KvBlockId], layer: usize) -> Result<Vec<KvLayerView<'_>>> {
            ids.iter()
                .map(|&id| {
                    let mut view = self.inner.read(id, layer)?;
                    let bad = id == self.bad;
                    view.check = Some(Box::new(move || {
                        if bad {
                            Err(ModelError::KvCache(format!("block {} is damaged", id.0)))
                        } else {
                            Ok(())
                        }
                    }));
                    Ok(view)
                })
                .collect()
        }
        fn used_bytes(&self) -> usize {
            self.inner.used_bytes()
        }
    }

    #[test]
    fn a_failed_check_fails_attention_for_one_query_and_for_many() {
        let w = 8;
        let n = 300;
        let keys: Vec<f32> = (0..n * w).map(|i| (i % 7) as f32 * 0.1).collect();
        let storage = FailingCheck {
            inner: HostKvStorage::new(layout(16)),
            bad: KvBlockId(11),
        };
        let mut cache = PagedKvCache::new(Box::new(storage));
        cache.reserve(n).unwrap();
        for layer in 0..2 {
            cache.write_layer(layer, &keys, &keys).unwrap();
        }
        cache.commit(&vec![1; n]).unwrap();
        let one = cache.attend(0, &[0.5; 16], 4, 0.5).unwrap_err().to_string();
        assert!(one.contains("block 11 is damaged"), "{one}");
        let many = cache.attend(0, &[0.5; 48], 4, 0.5).unwrap_err().to_string();
        assert!(many.contains("block 11 is damaged"), "{many}");
    }

    #[test]
    fn copied_blocks_read_back_equal_and_a_failed_check_leaves_no_copy() {
        let l = layout(4);
        let w = l.token_width();
        let mut from = HostKvStorage::new(l);
        let ids: Vec<KvBlockId> = (0..5).map(|_| from.allocate().unwrap()).collect();
        for (b, &id) in ids.iter().enumerate() {
            for layer in 0..l.layers {
                let k: Vec<f32> = (0..4 * w)
                    .map(|i| (b * 1000 + layer * 100 + i) as f32)
                    .collect();
                let v: Vec<f32> = k.iter().map(|x| -x).collect();
                from.write(id, layer, 0, &k, &v).unwrap();
            }
        }
        let mut to = HostKvStorage::new(l);
        let new = copy_blocks(&from, &mut to, &ids).unwrap();
        assert_eq!(new.len(), ids.len());
        for (&a, &b) in ids.iter().zip(&new) {
            for layer in 0..l.layers {
                let (x, y) = (from.read(a, layer).unwrap(), to.read(b, layer).unwrap());
                assert_eq!(x.keys, y.keys);
                assert_eq!(x.values, y.values);
            }
        }
        // A block whose check fails: an error naming it, and nothing left
        // allocated in the destination.
        let failing = FailingCheck {
            inner: from,
            bad: ids[3],
        };
        let mut to = HostKvStorage::new(l);
        let err = copy_blocks(&failing, &mut to, &ids)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("block {} is damaged", ids[3].0)),
            "{err}"
        );
        assert_eq!(to.used_bytes(), 0);
    }

    #[test]
    fn paged_attention_matches_contiguous_for_any_block_size() {
        let n = 37;
        let w = 8;
        let keys: Vec<f32> = (0..n * w)
            .map(|i| ((i * 13) % 7) as f32 * 0.3 - 1.0)
            .collect();
        let values: Vec<f32> = (0..n * w).map(|i| ((i * 5) % 11) as f32 * 0.2).collect();
        let heads = 4;
        let queries: Vec<f32> = (0..n * heads * 4)
            .map(|i| ((i * 3) % 5) as f32 * 0.25)
            .collect();
        let mut results = Vec::new();
        for bt in [1, 3, 16, 64] {
            let mut cache = PagedKvCache::in_memory(layout(bt));
            // Two appends: 30 tokens, then 7.
            for (a, b) in [(0, 30), (30, n)] {
                cache.reserve(b - a).unwrap();
                for layer in 0..2 {
                    cache
                        .write_layer(layer, &keys[a * w..b * w], &values[a * w..b * w])
                        .unwrap();
                }
                cache.commit(&vec![1; b - a]).unwrap();
            }
            let out = cache.attend(1, &queries, heads, 0.5).unwrap();
            // Check the last and a middle query against a plain softmax.
            for i in [10, n - 1] {
                for h in 0..heads {
                    let kvh = h / 2;
                    let ks: Vec<Vec<f32>> = (0..=i)
                        .map(|t| keys[t * w + kvh * 4..t * w + kvh * 4 + 4].to_vec())
                        .collect();
                    let vs: Vec<Vec<f32>> = (0..=i)
                        .map(|t| values[t * w + kvh * 4..t * w + kvh * 4 + 4].to_vec())
                        .collect();
                    let q = &queries[(i * heads + h) * 4..(i * heads + h) * 4 + 4];
                    let want = reference(q, &ks, &vs, 0.5);
                    let got = &out[(i * heads + h) * 4..(i * heads + h) * 4 + 4];
                    for (a, b) in got.iter().zip(&want) {
                        assert!((a - b).abs() < 1e-5, "bt {bt} i {i} h {h}: {a} vs {b}");
                    }
                }
            }
            results.push(out);
        }
        assert_eq!(results[0].len(), results[3].len());
    }

    #[test]
    fn blocks_export_with_chained_keys_and_release() {
        let mut cache = PagedKvCache::in_memory(layout(4));
        cache.reserve(9).unwrap();
        let kv = vec![0.5f32; 9 * 8];
        for layer in 0..2 {
            cache.write_layer(layer, &kv, &kv).unwrap();
        }
        cache.commit(&[1, 2, 3, 4, 5, 6, 7, 8, 9]).unwrap();
        assert_eq!(cache.blocks().len(), 3);
        let keys = cache.block_keys();
        assert_eq!(keys.len(), 2);
        assert_eq!(
            keys[1],
            BlockKey::chained(Some(keys[0]), &[5, 6, 7, 8], &[])
        );
        let block = cache.export_block(1).unwrap();
        assert_eq!(block.meta.byte_len(), block.data.len());
        assert!(cache.export_block(2).is_err());
        // The blocks continue the same prefix in another cache, in order only.
        let mut other = PagedKvCache::in_memory(layout(4));
        assert!(other.import_block(&[5, 6, 7, 8], &block).is_err());
        other
            .import_block(&[1, 2, 3, 4], &cache.export_block(0).unwrap())
            .unwrap();
        other.import_block(&[5, 6, 7, 8], &block).unwrap();
        assert_eq!(other.block_keys(), keys);
        assert_eq!(other.export_block(1).unwrap(), block);
        cache.clear().unwrap();
        assert_eq!(cache.used_bytes(), 0);
        // Writing past the reservation is an error, not a panic.
        assert!(cache.write_layer(0, &kv[..8], &kv[..8]).is_err());
    }
}
