//! KV blocks in RAM up to a budget, the rest swapped to SSD: the adapter
//! between the model's paged KV cache ([`KvBlockStorage`]) and the swap
//! space of `qvl-swap`.
//!
//! Residency is per block (all layers); the swap unit is one layer of one
//! block (a "chunk"), because attention reads a layer at a time.
//!
//! - RAM budget `B`: resident blocks may take `memory_threshold * B`;
//!   above that, victims chosen by LRU or LFU are written out (layer-major,
//!   in one I/O per batch) and dropped from RAM. The rest of the budget,
//!   `(1 - memory_threshold) * B`, is the prefetch window: chunks read
//!   ahead and not yet consumed. [`KvBlockStorage::used_bytes`] is their
//!   sum and never exceeds `B`.
//! - Prefetch: attention walks layer `l`'s blocks in order, and the
//!   decoder reaches layer `l + 1` (or layer 0 of the next step) right
//!   after. So the first read of layer `l` plans the swapped chunks of the
//!   layers after it, as many layers ahead as the window holds (at least
//!   one), and queues them as the window has room, in batches of up to
//!   one merged read (1 MiB of neighbouring chunks): the I/O threads read
//!   them (and verify and decode encoded ones) while the CPU runs
//!   attention and the MLP. A
//!   chunk not staged in time is read on demand (urgent, ahead of
//!   prefetches), and the wait is counted as a stall.
//! - Layout: swap-out writes each layer's chunks to that layer's stream
//!   of the swap file, as bare records (payload only, the checksum in the
//!   store's index), so a layer's chunks of consecutive blocks sit back to
//!   back and a layer's swap-in is a few 1 MiB reads.
//! - The newest block (the one decode writes into) is never a victim. A
//!   write into a swapped block loads it back first, so the copy on SSD
//!   and the chunks staged from it never disagree with RAM.
//! - Chunks can leave through a [`Codec`] (a lossy one changes what
//!   attention sees after swap-in, by its reported error), or in KIVI's
//!   layout ([`SwappingKvStorage::with_kivi`], what the pipeline uses when
//!   compression is on too): keys per channel, values per token, the
//!   sequence's sink tokens exact, the same encoding as the in-RAM codec.
//! - Raw chunks are not copied on the way in: a merged read lands in a
//!   pooled buffer of the store, and attention gets views into it
//!   ([`SsdStore::read_many_landed`]), kept alive until the next `&mut
//!   self` call (the next write, when every view is gone).
//! - Every chunk read back is verified (header, key, generation,
//!   checksum) before anything reads it; a failure is a
//!   [`ModelError::KvCache`] naming the block and the swap file, which
//!   fails the request: wrong KV is never returned. Raw chunks of a
//!   layer read ([`KvBlockStorage::read_layer`], what attention uses) are
//!   lent unverified, each view carrying its check
//!   ([`qvl_model::kv::KvLayerView::check`]), which attention runs on its
//!   compute thread right before it reads that chunk: decode keeps every
//!   core busy, and checksums on the I/O threads would take cores from it
//!   at random moments, over bytes that attention then reads from memory a
//!   second time; run just before the compute, the check streams the bytes
//!   into cache for it, so the bytes cross the memory bus once.
//!   Encoded chunks are verified and decoded on the I/O threads.
//!
//! Memory outside the budget: attention collects one layer's views of all
//! blocks before it computes, so the buffers lent for that layer live as
//! long as that attention call (one layer of the context, `1/layers` of
//! the KV, plus partly used buffers; capped, past the cap chunks are
//! copied instead), and the store keeps up to 32 MiB of read buffers for
//! reuse.

use crate::kv_codec::{KvCodecKind, KvCodecOptions};
use qvl_compress::{ExactStorage, GroupQuant, KvBlockCodec, QuantAxis, QuantBits, TokenSpan};
use qvl_core::{
    Block, BlockInfo, BlockKey, Codec, CodecId, DType, EvictionPolicy, TensorKind, TensorMeta,
};
use qvl_model::kv::{KvBlockId, KvBlockStorage, KvLayerView, KvLayout};
use qvl_model::{ModelError, Result};
use qvl_swap::{
    policy_for, Decoder, LandedRead, LandedRecord, LandedTicket, LandedUnverified, SsdStore,
    StoreStats, SwapConfig, SwapError, Ticket, MAX_MERGED_READ,
};
use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// Keys and values of one layer of one block.
type Chunk = (Vec<f32>, Vec<f32>);

/// A chunk read back: in place in the buffer its read landed in (raw f32,
/// lent to attention without a copy once verified), or decoded into
/// vectors (through a codec, verified and decoded on the I/O thread).
enum Fetched {
    Landed(LandedUnverified),
    Decoded(Chunk),
}

/// A chunk on its way in.
enum Staged {
    Landed(LandedTicket),
    Decoded(Ticket<Chunk>),
}

impl Staged {
    /// Waits for the chunk; adds the time spent blocked to `stalled` (a
    /// chunk already in costs no clock reads).
    fn wait(self, stalled: &mut std::time::Duration) -> std::result::Result<Fetched, SwapError> {
        let pending = match self {
            Staged::Landed(t) => match t.try_wait() {
                Ok(done) => return done.map(Fetched::Landed),
                Err(t) => Staged::Landed(t),
            },
            Staged::Decoded(t) => match t.try_wait() {
                Ok(done) => return done.map(Fetched::Decoded),
                Err(t) => Staged::Decoded(t),
            },
        };
        let start = Instant::now();
        let fetched = match pending {
            Staged::Landed(t) => t.wait().map(Fetched::Landed),
            Staged::Decoded(t) => t.wait().map(Fetched::Decoded),
        };
        *stalled += start.elapsed();
        fetched
    }
}

/// What the swapping storage has done.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KvSwapStats {
    /// Blocks held in RAM now.
    pub resident_blocks: usize,
    /// Blocks whose only copy is on SSD now.
    pub swapped_blocks: usize,
    /// Most RAM (resident plus staged chunks) held at once, in bytes.
    pub peak_ram_bytes: usize,
    /// Blocks written out.
    pub swap_outs: u64,
    /// Blocks loaded back for a write.
    pub swap_ins_for_write: u64,
    /// Chunk reads served by a prefetch.
    pub prefetch_hits: u64,
    /// Chunk reads that were not prefetched (read on demand).
    pub demand_reads: u64,
    /// Seconds attention waited for chunk reads.
    pub stall_secs: f64,
    /// Seconds spent serving reads of swapped chunks on the caller's
    /// thread, waits included (planning, queueing, taking staged chunks).
    pub fetch_secs: f64,
    /// Seconds attention spent checking lent chunks right before reading
    /// them, summed over the compute threads.
    pub verify_secs: f64,
    /// Chunk reads lent to attention in place (no copy).
    pub lent_chunks: u64,
    /// Chunk reads copied out instead (codec, or the lent set was full).
    pub copied_chunks: u64,
    /// The SSD store's counters.
    pub store: StoreStats,
}

struct Slot {
    /// Unique per allocation: chunk keys of a released and reused slot
    /// never match the old ones.
    uid: u64,
    /// All layers, when resident.
    data: Option<Vec<f32>>,
    /// Where the block sits in its sequence, in blocks (the live blocks
    /// when it was allocated): tells the KIVI codec which of its tokens
    /// are attention sinks.
    seq_block: usize,
}

/// KIVI's layout for swapped chunks, the same as the in-RAM codec's
/// (`CodecKvStorage`): keys quantized per channel (groups along tokens),
/// values per token (groups along channels), the sequence's first tokens
/// (attention sinks) exact.
#[derive(Debug, Clone, Copy)]
struct SwapKivi {
    keys: KvBlockCodec,
    values: KvBlockCodec,
}

/// Codec id of a swapped chunk encoded with [`SwapKivi`]: a u32 LE byte
/// length of the keys' encoding, then the keys' and the values' encodings
/// (each a self-describing qvl-compress encoding of `[block_tokens,
/// kv_heads * head_dim]`). Outside qvl-compress's ids (1-9).
const KIVI_PAIR: CodecId = CodecId(0x4b49);

/// Chunks on their way in, by block index and layer: a flat table rather
/// than a hash map, since a decode step takes and stages every swapped
/// chunk of the context (thousands per step for small models).
#[derive(Default)]
struct StagedChunks {
    /// `index * layers + layer`; grows with the block slots.
    chunks: Vec<Option<Staged>>,
    layers: usize,
    len: usize,
}

impl StagedChunks {
    fn new(layers: usize) -> StagedChunks {
        StagedChunks {
            chunks: Vec::new(),
            layers,
            len: 0,
        }
    }

    fn at(&self, index: usize, layer: usize) -> usize {
        index * self.layers + layer
    }

    fn contains(&self, index: usize, layer: usize) -> bool {
        self.chunks
            .get(self.at(index, layer))
            .is_some_and(Option::is_some)
    }

    fn insert(&mut self, index: usize, layer: usize, staged: Staged) {
        let at = self.at(index, layer);
        if at >= self.chunks.len() {
            self.chunks.resize_with(at + 1, || None);
        }
        if self.chunks[at].replace(staged).is_none() {
            self.len += 1;
        }
    }

    fn remove(&mut self, index: usize, layer: usize) -> Option<Staged> {
        let at = self.at(index, layer);
        let taken = self.chunks.get_mut(at).and_then(Option::take);
        if taken.is_some() {
            self.len -= 1;
        }
        taken
    }

    /// Drops every staged chunk of block `index`; returns how many.
    fn forget_block(&mut self, index: usize) -> usize {
        (0..self.layers)
            .filter(|&layer| self.remove(index, layer).is_some())
            .count()
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[derive(Default)]
struct Prefetch {
    staged: StagedChunks,
    staged_bytes: usize,
    plan: VecDeque<(usize, usize)>,
    /// The layer attention reads now (the last one a chunk was read of).
    current: Option<usize>,
    /// The furthest layer whose chunks are in the plan.
    planned_to: Option<usize>,
}

/// A [`KvBlockStorage`] that keeps at most a RAM budget of blocks and swaps
/// the rest to an [`SsdStore`].
pub struct SwappingKvStorage {
    layout: KvLayout,
    store: SsdStore,
    codec: Option<Arc<dyn Codec>>,
    kivi: Option<SwapKivi>,
    resident_cap: usize,
    staging_cap: usize,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    next_uid: u64,
    newest: Option<usize>,
    resident_bytes: usize,
    policy: Mutex<Box<dyn EvictionPolicy>>,
    prefetch: Mutex<Prefetch>,
    /// Read buffers whose chunks were lent to attention by `read` (views
    /// borrow `&self`). Only cleared through `&mut self`, so no view can
    /// outlive its bytes; see [`SwappingKvStorage::lend`].
    lent: Mutex<Vec<Arc<LandedRead>>>,
    counters: Arc<Counters>,
}

#[derive(Default)]
struct Counters {
    resident_blocks: AtomicU64,
    swapped_blocks: AtomicU64,
    peak_ram: AtomicU64,
    swap_outs: AtomicU64,
    swap_ins_for_write: AtomicU64,
    prefetch_hits: AtomicU64,
    demand_reads: AtomicU64,
    stall_ns: AtomicU64,
    fetch_ns: AtomicU64,
    verify_ns: AtomicU64,
    lent_chunks: AtomicU64,
    copied_chunks: AtomicU64,
}

/// Reads a [`SwappingKvStorage`]'s counters after it was moved into a
/// [`qvl_model::PagedKvCache`].
#[derive(Clone)]
pub struct KvSwapMonitor {
    counters: Arc<Counters>,
    store: SsdStore,
}

impl KvSwapMonitor {
    /// Counters now.
    pub fn stats(&self) -> KvSwapStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        KvSwapStats {
            resident_blocks: get(&c.resident_blocks) as usize,
            swapped_blocks: get(&c.swapped_blocks) as usize,
            peak_ram_bytes: get(&c.peak_ram) as usize,
            swap_outs: get(&c.swap_outs),
            swap_ins_for_write: get(&c.swap_ins_for_write),
            prefetch_hits: get(&c.prefetch_hits),
            demand_reads: get(&c.demand_reads),
            stall_secs: get(&c.stall_ns) as f64 * 1e-9,
            fetch_secs: get(&c.fetch_ns) as f64 * 1e-9,
            verify_secs: get(&c.verify_ns) as f64 * 1e-9,
            lent_chunks: get(&c.lent_chunks),
            copied_chunks: get(&c.copied_chunks),
            store: self.store.stats(),
        }
    }
}

/// Little-endian f32 bytes as a new vector (`bytes.len() / 4` values):
/// one memcpy into fresh capacity on little-endian machines (no zeroing
/// pass first), since every bit pattern is a valid f32.
fn le_bytes_to_f32(bytes: &[u8]) -> Vec<f32> {
    let n = bytes.len() / 4;
    let mut out: Vec<f32> = Vec::with_capacity(n);
    #[cfg(target_endian = "little")]
    {
        // SAFETY: out has capacity for n f32 (4n bytes), bytes holds at
        // least 4n bytes, the two do not overlap (out is a new allocation),
        // and any 4 bytes are a valid little-endian f32 on this target, so
        // after the copy the first n elements are initialized.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), out.as_mut_ptr().cast::<u8>(), 4 * n);
            out.set_len(n);
        }
    }
    #[cfg(not(target_endian = "little"))]
    out.extend(
        bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
    );
    out
}

fn swap_err(what: &str, e: SwapError) -> ModelError {
    ModelError::KvCache(format!("{what}: {e}"))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded maps are updated in single statements; a panic elsewhere
    // cannot leave them half-changed.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SwappingKvStorage {
    /// A storage for blocks of `layout` holding at most `ram_budget_bytes`
    /// in RAM, swapping through a new store opened from `config`.
    pub fn new(layout: KvLayout, config: &SwapConfig, ram_budget_bytes: usize) -> Result<Self> {
        let store = SsdStore::open(config).map_err(|e| swap_err("opening the swap space", e))?;
        Self::with_store(layout, store, config, ram_budget_bytes)
    }

    /// The same over an open store.
    pub fn with_store(
        layout: KvLayout,
        store: SsdStore,
        config: &SwapConfig,
        ram_budget_bytes: usize,
    ) -> Result<Self> {
        config.validate().map_err(|e| swap_err("swap config", e))?;
        let block_bytes = layout.block_floats() * 4;
        let chunk_bytes = layout.layer_floats() * 4;
        let resident_cap = (ram_budget_bytes as f64 * config.memory_threshold) as usize;
        let staging_cap = ram_budget_bytes.saturating_sub(resident_cap);
        if resident_cap < block_bytes || staging_cap < chunk_bytes {
            return Err(ModelError::KvCache(format!(
                "a KV RAM budget of {ram_budget_bytes} bytes at memory_threshold {} leaves {resident_cap} bytes for resident blocks and {staging_cap} for prefetch; they need at least one block ({block_bytes} bytes) and one layer of a block ({chunk_bytes} bytes)",
                config.memory_threshold
            )));
        }
        Ok(SwappingKvStorage {
            layout,
            store,
            codec: None,
            kivi: None,
            resident_cap,
            staging_cap,
            slots: Vec::new(),
            free: Vec::new(),
            next_uid: 0,
            newest: None,
            resident_bytes: 0,
            policy: Mutex::new(policy_for(config.eviction_policy)),
            prefetch: Mutex::new(Prefetch {
                staged: StagedChunks::new(layout.layers),
                ..Prefetch::default()
            }),
            lent: Mutex::new(Vec::new()),
            counters: Arc::new(Counters::default()),
        })
    }

    /// Chunks leave RAM encoded by `codec` (and come back decoded).
    pub fn with_codec(mut self, codec: Arc<dyn Codec>) -> Self {
        self.codec = Some(codec);
        self.kivi = None;
        self
    }

    /// Chunks leave RAM in KIVI's layout with `options`' bits and groups,
    /// exactly as `CodecKvStorage` encodes blocks in RAM (keys per
    /// channel, values per token, the first `sink_tokens` of the sequence
    /// exact), so that compression and swapping together quantize the KV
    /// the same way as compression alone. `none` is refused.
    pub fn with_kivi(mut self, options: &KvCodecOptions) -> Result<Self> {
        let bits = match options.kind {
            KvCodecKind::Int8 => QuantBits::Int8,
            KvCodecKind::Int4 => QuantBits::Int4,
            KvCodecKind::None => {
                return Err(ModelError::InvalidInput(
                    "a KIVI swap codec needs int8 or int4".to_string(),
                ))
            }
        };
        let key_group = (options.key_group_tokens.min(self.layout.block_tokens) & !1).max(2);
        let quant = |group: usize, axis: QuantAxis| {
            GroupQuant::new(bits, options.symmetric, group, axis).map_err(|e| {
                ModelError::InvalidInput(format!("swap codec group size {group}: {e}"))
            })
        };
        let exact = if options.sinks_f16 {
            ExactStorage::F16
        } else {
            ExactStorage::F32
        };
        let codec = |inner: GroupQuant| KvBlockCodec {
            exact,
            ..KvBlockCodec::kivi(inner, 0, options.sink_tokens, 0)
        };
        self.kivi = Some(SwapKivi {
            keys: codec(quant(key_group, QuantAxis::PerChannel)?),
            values: codec(quant(options.group_size, QuantAxis::PerToken)?),
        });
        self.codec = None;
        Ok(self)
    }

    /// Whether chunks leave RAM encoded (read back through the decoder on
    /// the I/O threads) rather than raw (lent in place).
    fn encodes(&self) -> bool {
        self.codec.is_some() || self.kivi.is_some()
    }

    /// The SSD store (its path, I/O mode, counters).
    pub fn store(&self) -> &SsdStore {
        &self.store
    }

    /// Counters.
    pub fn stats(&self) -> KvSwapStats {
        self.monitor().stats()
    }

    /// A handle on the counters that outlives moving the storage into a cache.
    pub fn monitor(&self) -> KvSwapMonitor {
        KvSwapMonitor {
            counters: Arc::clone(&self.counters),
            store: self.store.clone(),
        }
    }

    fn block_bytes(&self) -> usize {
        self.layout.block_floats() * 4
    }

    fn chunk_bytes(&self) -> usize {
        self.layout.layer_floats() * 4
    }

    fn chunk_key(uid: u64, layer: usize) -> BlockKey {
        BlockKey(((uid as u128) << 32) | layer as u128)
    }

    fn policy_key(index: usize) -> BlockKey {
        BlockKey(index as u128)
    }

    /// Tells the eviction policy that attention read resident block
    /// `index`. Attention reads every layer of the context once per step,
    /// so only layer 0 counts: the same recency and frequency order as
    /// counting every layer, at 1/layers of the cost (one lock and one
    /// policy update per block instead of one per chunk).
    fn note_access(&self, index: usize, layer: usize) {
        if layer == 0 {
            lock(&self.policy).on_access(Self::policy_key(index));
        }
    }

    fn slot(&self, id: KvBlockId) -> Result<&Slot> {
        self.slots
            .get(id.0 as usize)
            .and_then(Option::as_ref)
            .ok_or_else(|| {
                ModelError::KvCache(format!("no block {} in the swapping storage", id.0))
            })
    }

    fn note_ram(&self, staged: usize) {
        let now = (self.resident_bytes + staged) as u64;
        self.counters.peak_ram.fetch_max(now, Ordering::Relaxed);
    }

    fn decoder(&self) -> Decoder<Chunk> {
        let codec = self.codec.clone();
        let half = self.layout.layer_floats() / 2;
        let shape = [
            2,
            self.layout.block_tokens,
            self.layout.kv_heads,
            self.layout.head_dim,
        ];
        let slab = [self.layout.block_tokens, self.layout.token_width()];
        Arc::new(move |_meta, id, payload| {
            if id == KIVI_PAIR {
                let bad = |why: String| SwapError::InvalidConfig(format!("KIVI chunk: {why}"));
                let (len, rest) = payload
                    .split_first_chunk::<4>()
                    .ok_or_else(|| bad(format!("{} bytes, no length", payload.len())))?;
                let keys_len = u32::from_le_bytes(*len) as usize;
                if keys_len > rest.len() {
                    return Err(bad(format!(
                        "keys of {keys_len} bytes in {} bytes",
                        rest.len()
                    )));
                }
                let (k, v) = rest.split_at(keys_len);
                let mut keys = vec![0f32; half];
                let mut values = vec![0f32; half];
                qvl_compress::decode_any(k, &slab, &mut keys)
                    .map_err(|e| bad(format!("decoding the keys: {e}")))?;
                qvl_compress::decode_any(v, &slab, &mut values)
                    .map_err(|e| bad(format!("decoding the values: {e}")))?;
                return Ok((keys, values));
            }
            if id == CodecId::RAW {
                if payload.len() != 8 * half {
                    return Err(SwapError::InvalidConfig(format!(
                        "raw chunk of {} bytes, the layout needs {}",
                        payload.len(),
                        8 * half
                    )));
                }
                let (k, v) = payload.split_at(4 * half);
                return Ok((le_bytes_to_f32(k), le_bytes_to_f32(v)));
            }
            let Some(codec) = codec.as_ref().filter(|c| c.id() == id) else {
                return Err(SwapError::InvalidConfig(format!(
                    "chunk encoded with {id}, which this storage was not given"
                )));
            };
            let mut both = vec![0f32; 2 * half];
            codec
                .decode(payload, &shape, &mut both)
                .map_err(|e| SwapError::InvalidConfig(format!("decoding a chunk: {e}")))?;
            let values = both.split_off(half);
            Ok((both, values))
        })
    }

    /// Writes resident victims out until `incoming` more bytes fit under the
    /// threshold, with some headroom so that write-outs come in batches.
    /// What [`Self::make_room`] swaps resident blocks down to once they
    /// pass their share: a quarter of it free, so that the next few blocks
    /// need no swap-out of their own.
    fn resident_after_room(&self) -> usize {
        self.resident_cap * 3 / 4
    }

    fn make_room(&mut self, incoming: usize) -> Result<()> {
        if self.resident_bytes + incoming <= self.resident_cap {
            return Ok(());
        }
        let target = self
            .resident_after_room()
            .max(self.block_bytes())
            .min(self.resident_cap - incoming.min(self.resident_cap));
        let mut victims = Vec::new();
        let mut kept = Vec::new();
        let mut freed = 0usize;
        {
            let mut policy = lock(&self.policy);
            while self.resident_bytes - freed > target {
                let Some(key) = policy.evict() else { break };
                let index = key.0 as usize;
                if Some(index) == self.newest {
                    kept.push(key);
                    continue;
                }
                if self
                    .slots
                    .get(index)
                    .and_then(Option::as_ref)
                    .is_some_and(|s| s.data.is_some())
                {
                    victims.push(index);
                    freed += self.block_bytes();
                }
            }
            for key in kept {
                policy.on_insert(key, &BlockInfo::kv(self.block_bytes() as u64, None, 0));
            }
        }
        if victims.is_empty() {
            return Ok(());
        }
        victims.sort_unstable();
        // One stream per layer: a layer's chunks of consecutive blocks sit
        // next to each other, so a prefetch of one layer merges into long reads.
        let mut blocks = Vec::with_capacity(victims.len() * self.layout.layers);
        for layer in 0..self.layout.layers {
            for &index in &victims {
                blocks.push((layer as u32, self.encode_chunk(index, layer)?));
            }
        }
        if let Err(e) = self.store.put_streamed(blocks) {
            // The victims stay resident and tracked; the error fails the
            // request that needed the room.
            let mut policy = lock(&self.policy);
            for &index in &victims {
                policy.on_insert(
                    Self::policy_key(index),
                    &BlockInfo::kv(self.block_bytes() as u64, None, 0),
                );
            }
            return Err(swap_err("swapping KV blocks out", e));
        }
        for index in victims {
            if let Some(slot) = self.slots.get_mut(index).and_then(Option::as_mut) {
                slot.data = None;
            }
            self.resident_bytes -= self.block_bytes();
            self.counters.swap_outs.fetch_add(1, Ordering::Relaxed);
            self.counters
                .resident_blocks
                .fetch_sub(1, Ordering::Relaxed);
            self.counters.swapped_blocks.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn encode_chunk(&self, index: usize, layer: usize) -> Result<Block> {
        let l = self.layout;
        let slot = self.slots[index]
            .as_ref()
            .ok_or_else(|| ModelError::KvCache(format!("victim {index} vanished")))?;
        let data = slot
            .data
            .as_ref()
            .ok_or_else(|| ModelError::KvCache(format!("victim {index} is not resident")))?;
        let base = layer * l.layer_floats();
        let floats = &data[base..base + l.layer_floats()];
        let shape = vec![2, l.block_tokens, l.kv_heads, l.head_dim];
        let meta = TensorMeta::new(shape.clone(), DType::F32, TensorKind::KvCache)
            .with_layer(layer as u32);
        let key = Self::chunk_key(slot.uid, layer);
        if let Some(kivi) = &self.kivi {
            let half = l.layer_floats() / 2;
            let slab = [l.block_tokens, l.token_width()];
            let first_token = slot.seq_block * l.block_tokens;
            let span = TokenSpan {
                first_token,
                seq_len: first_token + l.block_tokens,
            };
            let err = |what: &str, e: String| {
                ModelError::KvCache(format!(
                    "encoding the {what} of block {index} layer {layer}: {e}"
                ))
            };
            let k = kivi
                .keys
                .encode_span(&floats[..half], &slab, span)
                .map_err(|e| err("keys", e.to_string()))?;
            let v = kivi
                .values
                .encode_span(&floats[half..], &slab, span)
                .map_err(|e| err("values", e.to_string()))?;
            let keys_len = u32::try_from(k.bytes.len())
                .map_err(|_| err("keys", format!("{} bytes", k.bytes.len())))?;
            let mut data = Vec::with_capacity(4 + k.bytes.len() + v.bytes.len());
            data.extend_from_slice(&keys_len.to_le_bytes());
            data.extend_from_slice(&k.bytes);
            data.extend_from_slice(&v.bytes);
            return Ok(Block {
                key,
                meta,
                codec: KIVI_PAIR,
                data: data.into(),
            });
        }
        if let Some(codec) = &self.codec {
            let enc = codec.encode(floats, &shape).map_err(|e| {
                ModelError::KvCache(format!("encoding block {index} layer {layer}: {e}"))
            })?;
            return Ok(Block {
                key,
                meta,
                codec: enc.codec,
                data: enc.bytes.into(),
            });
        }
        let mut bytes = Vec::with_capacity(floats.len() * 4);
        for v in floats {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        Ok(Block::raw(key, meta, bytes))
    }

    /// Queues prefetches from the plan while the window has room, as one
    /// batch so that neighbouring chunks are read together.
    fn pump(&self, p: &mut Prefetch) {
        let chunk = self.chunk_bytes();
        // While reads are still staged, wait for room for one merged read
        // (1 MiB of neighbouring chunks) or half the window if that is
        // smaller: fewer, longer reads (the disk streams 1 MiB requests
        // several times faster than 32 KiB ones), yet more than one in
        // flight.
        let window = self.staging_cap / chunk;
        let per_read = (qvl_swap::MAX_MERGED_READ / chunk).max(1);
        let min_batch = per_read.min(window / 2).max(1);
        let room = (self.staging_cap - p.staged_bytes.min(self.staging_cap)) / chunk;
        if room < min_batch && !p.staged.is_empty() {
            return;
        }
        let mut batch = Vec::new();
        while p.staged_bytes + (batch.len() + 1) * chunk <= self.staging_cap {
            let Some((index, layer)) = p.plan.pop_front() else {
                break;
            };
            if p.staged.contains(index, layer) {
                continue;
            }
            let Some(slot) = self.slots.get(index).and_then(Option::as_ref) else {
                continue;
            };
            if slot.data.is_some() {
                continue;
            }
            batch.push((index, layer, slot.uid));
        }
        // The plan may list a chunk twice (replanned after the swapped set
        // changed); one read of it is enough.
        batch.sort_unstable();
        batch.dedup();
        if batch.is_empty() {
            return;
        }
        let keys: Vec<BlockKey> = batch
            .iter()
            .map(|&(_, layer, uid)| Self::chunk_key(uid, layer))
            .collect();
        let tickets = self.read_chunks(&keys, false);
        for ((index, layer, _), ticket) in batch.into_iter().zip(tickets) {
            if let Some(t) = ticket {
                p.staged.insert(index, layer, t);
                p.staged_bytes += chunk;
            }
        }
        self.note_ram(p.staged_bytes);
    }

    /// Queues reads of the chunks `keys` (merged where they neighbour on
    /// disk): raw chunks land in place, encoded ones are decoded on the I/O
    /// threads. None for a key the store does not hold.
    fn read_chunks(&self, keys: &[BlockKey], urgent: bool) -> Vec<Option<Staged>> {
        if !self.encodes() {
            self.store
                .read_many_landed(keys, urgent)
                .into_iter()
                .map(|t| t.map(Staged::Landed))
                .collect()
        } else {
            self.store
                .read_many_async(keys, urgent, self.decoder())
                .into_iter()
                .map(|t| t.map(Staged::Decoded))
                .collect()
        }
    }

    /// Plans the swapped chunks of the layers after `layer`, as many
    /// layers ahead as the prefetch window holds (at least one), so that a
    /// layer's reads run while the layers before it compute; entries of
    /// layers already passed are dropped (they would fill the window with
    /// chunks wanted only at the next step).
    fn plan_ahead(&self, p: &mut Prefetch, layer: usize) {
        let layers = self.layout.layers;
        let swapped: Vec<usize> = self.swapped_indices().collect();
        let window = self.staging_cap / self.chunk_bytes();
        let ahead = window
            .div_ceil(swapped.len().max(1))
            .clamp(1, layers.saturating_sub(1).max(1));
        let dist = |to: usize| (to + layers - layer) % layers;
        p.plan.retain(|&(_, l)| dist(l) <= ahead);
        let from = match p.planned_to {
            Some(t) if (1..=ahead).contains(&dist(t)) => dist(t) + 1,
            _ => 1,
        };
        for d in from..=ahead {
            let l = (layer + d) % layers;
            p.plan.extend(swapped.iter().map(|&i| (i, l)));
        }
        p.planned_to = Some((layer + ahead) % layers);
    }

    fn swapped_indices(&self) -> impl Iterator<Item = usize> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.as_ref().is_some_and(|s| s.data.is_none()))
            .map(|(i, _)| i)
    }

    /// Reads one swapped chunk (see [`Self::fetch_chunks`]).
    fn fetch_chunk(&self, index: usize, uid: u64, layer: usize) -> Result<Fetched> {
        let mut fetched = None;
        self.fetch_chunks(&[(index, uid)], layer, |_, chunk| {
            fetched = Some(chunk);
            Ok(())
        })?;
        fetched.ok_or_else(|| ModelError::KvCache(format!("block {index} layer {layer} not read")))
    }

    /// Reads swapped chunks `(index, uid)` of `layer` and hands each to
    /// `take` with its position in `chunks`, in order: from the prefetch
    /// window where they are staged, the rest on demand in one batch of
    /// urgent reads (merged where they neighbour on disk). One pass over
    /// the window for the whole list, which also plans the layers ahead
    /// and tops up the prefetches once the list's chunks have left it.
    fn fetch_chunks(
        &self,
        chunks: &[(usize, u64)],
        layer: usize,
        mut take: impl FnMut(usize, Fetched) -> Result<()>,
    ) -> Result<()> {
        let entered = Instant::now();
        let mut tickets: Vec<Option<Staged>> = Vec::with_capacity(chunks.len());
        let mut missed = Vec::new();
        {
            let mut p = lock(&self.prefetch);
            if p.current != Some(layer) {
                p.current = Some(layer);
                self.plan_ahead(&mut p, layer);
            }
            for (at, &(index, _)) in chunks.iter().enumerate() {
                let staged = p.staged.remove(index, layer);
                if staged.is_some() {
                    p.staged_bytes -= self.chunk_bytes();
                } else {
                    missed.push(at);
                }
                tickets.push(staged);
            }
            if !missed.is_empty() {
                // Read below on demand: a planned prefetch of them would
                // be a second read.
                let demanded: std::collections::HashSet<usize> =
                    missed.iter().map(|&at| chunks[at].0).collect();
                p.plan
                    .retain(|&(i, l)| l != layer || !demanded.contains(&i));
            }
            self.pump(&mut p);
        }
        let hits = (chunks.len() - missed.len()) as u64;
        if !missed.is_empty() {
            // Not prefetched (cold start, or the window was too small):
            // needed right now, ahead of the prefetches.
            let keys: Vec<BlockKey> = missed
                .iter()
                .map(|&at| Self::chunk_key(chunks[at].1, layer))
                .collect();
            for (&at, ticket) in missed.iter().zip(self.read_chunks(&keys, true)) {
                tickets[at] = ticket;
            }
        }
        let mut stalled = std::time::Duration::ZERO;
        let mut result = Ok(());
        for (at, ticket) in tickets.into_iter().enumerate() {
            let (index, _) = chunks[at];
            let Some(ticket) = ticket else {
                result = Err(ModelError::KvCache(format!(
                    "block {index} layer {layer} is neither in RAM nor in the swap space"
                )));
                break;
            };
            let chunk = ticket
                .wait(&mut stalled)
                .map_err(|e| swap_err(&format!("reading KV block {index} layer {layer} back"), e));
            if let Err(e) = chunk.and_then(|chunk| take(at, chunk)) {
                result = Err(e);
                break;
            }
        }
        let c = &self.counters;
        c.stall_ns
            .fetch_add(stalled.as_nanos() as u64, Ordering::Relaxed);
        c.prefetch_hits.fetch_add(hits, Ordering::Relaxed);
        c.demand_reads
            .fetch_add(missed.len() as u64, Ordering::Relaxed);
        c.fetch_ns
            .fetch_add(entered.elapsed().as_nanos() as u64, Ordering::Relaxed);
        result
    }

    /// Most read buffers lent at once: one layer of the swapped blocks
    /// (what one attention call reads), plus the partly used buffers at
    /// the ends of its runs. Past it, chunks are copied out instead, so a
    /// caller that reads many layers without a write in between does not
    /// pin the whole swapped context in RAM.
    fn lend_cap(&self) -> usize {
        let swapped = self.counters.swapped_blocks.load(Ordering::Relaxed) as usize;
        (swapped * self.chunk_bytes()).div_ceil(MAX_MERGED_READ) + 4
    }

    /// A view of a verified raw chunk in place in its read buffer (no
    /// copy); see [`Self::lend_bytes`].
    fn lend(&self, rec: &LandedRecord) -> Option<KvLayerView<'_>> {
        let (keys, values) = self.lend_bytes(rec.payload(), rec.codec(), rec.buffer())?;
        Some(KvLayerView::new(Cow::Borrowed(keys), Cow::Borrowed(values)))
    }

    /// A view of a raw chunk in place in its read buffer, not yet verified:
    /// the view carries the check ([`KvLayerView::check`]), which attention
    /// runs right before it reads the chunk. Gives the record back when it
    /// cannot be lent (see [`Self::lend_bytes`]).
    fn lend_unverified(
        &self,
        index: usize,
        layer: usize,
        rec: LandedUnverified,
    ) -> std::result::Result<KvLayerView<'_>, LandedUnverified> {
        let Some((keys, values)) = rec
            .unverified_payload()
            .and_then(|payload| self.lend_bytes(payload, rec.codec(), rec.buffer()))
        else {
            return Err(rec);
        };
        let counters = Arc::clone(&self.counters);
        let check = move || {
            let started = Instant::now();
            let checked = rec
                .check()
                .map_err(|e| swap_err(&format!("reading KV block {index} layer {layer} back"), e));
            counters
                .verify_ns
                .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
            checked
        };
        Ok(KvLayerView {
            keys: Cow::Borrowed(keys),
            values: Cow::Borrowed(values),
            check: Some(Box::new(check)),
        })
    }

    /// The keys and values of a raw chunk's payload in place in `buffer`
    /// (no copy): the buffer joins `lent` and stays alive and unchanged
    /// until the next `&mut self` call. None (copy it instead) when the
    /// payload is not a raw f32 chunk of this layout in native byte order,
    /// or when the lent set is full.
    fn lend_bytes(
        &self,
        payload: &[u8],
        codec: CodecId,
        buffer: &Arc<LandedRead>,
    ) -> Option<(&[f32], &[f32])> {
        let half = self.layout.layer_floats() / 2;
        let native = cfg!(target_endian = "little");
        if !native
            || codec != CodecId::RAW
            || payload.len() != 8 * half
            || payload.as_ptr() as usize % std::mem::align_of::<f32>() != 0
        {
            return None;
        }
        let mut lent = lock(&self.lent);
        let known = lent.last().is_some_and(|b| Arc::ptr_eq(b, buffer));
        if !known {
            if lent.len() >= self.lend_cap() {
                return None;
            }
            lent.push(Arc::clone(buffer));
        }
        drop(lent);
        let ptr = payload.as_ptr().cast::<f32>();
        // SAFETY: `ptr` points to 8 * half bytes (checked above), aligned
        // for f32 (checked above), inside the heap allocation of the
        // LandedRead `buffer`, which `self.lent` now holds an Arc of. That
        // Arc leaves `lent` only through `&mut self` (return_lent) or when
        // self drops, neither of which can happen while the returned
        // slices borrow `&self`; the buffer is never written once it is
        // shared (a LandedRead only gives out `&[u8]`). Any 4 bytes are a
        // valid f32, and on this little-endian target they are the chunk's
        // little-endian floats.
        let (keys, values) = unsafe {
            (
                std::slice::from_raw_parts(ptr, half),
                std::slice::from_raw_parts(ptr.add(half), half),
            )
        };
        self.counters.lent_chunks.fetch_add(1, Ordering::Relaxed);
        Some((keys, values))
    }

    /// A chunk handed to attention as its own vectors (decoded, or copied
    /// because it could not be lent), counted.
    fn copied(&self, (keys, values): Chunk) -> KvLayerView<'static> {
        self.counters.copied_chunks.fetch_add(1, Ordering::Relaxed);
        KvLayerView::new(Cow::Owned(keys), Cow::Owned(values))
    }

    /// Checks a landed chunk (see [`LandedUnverified::verify`]).
    fn verify(&self, index: usize, layer: usize, rec: LandedUnverified) -> Result<LandedRecord> {
        rec.verify()
            .map_err(|e| swap_err(&format!("reading KV block {index} layer {layer} back"), e))
    }

    /// Copies (or decodes) a landed chunk into vectors.
    fn decode_landed(&self, index: usize, layer: usize, rec: &LandedRecord) -> Result<Chunk> {
        let meta = TensorMeta::new(
            vec![
                2,
                self.layout.block_tokens,
                self.layout.kv_heads,
                self.layout.head_dim,
            ],
            DType::F32,
            TensorKind::KvCache,
        );
        (self.decoder())(&meta, rec.codec(), rec.payload())
            .map_err(|e| swap_err(&format!("reading KV block {index} layer {layer} back"), e))
    }

    /// Gives the buffers lent to views back (no view is alive: `&mut self`).
    fn return_lent(&mut self) {
        let lent = self.lent.get_mut().unwrap_or_else(|p| p.into_inner());
        if !lent.is_empty() {
            lent.clear();
        }
    }

    /// Drops staged chunks and plan entries of a block (released, or
    /// loaded back to be written).
    fn forget_staged(&self, index: usize) {
        let mut p = lock(&self.prefetch);
        let dropped = p.staged.forget_block(index);
        p.staged_bytes -= dropped * self.chunk_bytes();
        p.plan.retain(|(i, _)| *i != index);
    }

    /// Loads a swapped block back into RAM (before a write into it).
    fn load_back(&mut self, index: usize) -> Result<()> {
        let Some(uid) = self.slots[index].as_ref().map(|s| s.uid) else {
            return Err(ModelError::KvCache(format!("no block {index}")));
        };
        self.make_room(self.block_bytes())?;
        let l = self.layout;
        let mut data = vec![0f32; l.block_floats()];
        for layer in 0..l.layers {
            let (k, v) = match self.fetch_chunk(index, uid, layer)? {
                Fetched::Decoded(chunk) => chunk,
                Fetched::Landed(rec) => {
                    let rec = self.verify(index, layer, rec)?;
                    self.decode_landed(index, layer, &rec)?
                }
            };
            let base = layer * l.layer_floats();
            data[base..base + k.len()].copy_from_slice(&k);
            data[base + k.len()..base + k.len() + v.len()].copy_from_slice(&v);
        }
        self.forget_staged(index);
        for layer in 0..l.layers {
            self.store.remove_key(&Self::chunk_key(uid, layer));
        }
        if let Some(slot) = self.slots[index].as_mut() {
            slot.data = Some(data);
        }
        self.resident_bytes += self.block_bytes();
        let c = &self.counters;
        c.swap_ins_for_write.fetch_add(1, Ordering::Relaxed);
        self.note_ram(lock(&self.prefetch).staged_bytes);
        c.resident_blocks.fetch_add(1, Ordering::Relaxed);
        c.swapped_blocks.fetch_sub(1, Ordering::Relaxed);
        lock(&self.policy).on_insert(
            Self::policy_key(index),
            &BlockInfo::kv(self.block_bytes() as u64, None, index as u32),
        );
        Ok(())
    }
}

impl KvBlockStorage for SwappingKvStorage {
    fn layout(&self) -> KvLayout {
        self.layout
    }

    fn allocate(&mut self) -> Result<KvBlockId> {
        self.return_lent();
        // The previous newest block is full once a new one is needed, so
        // it may leave too.
        self.newest = None;
        self.make_room(self.block_bytes())?;
        let slot = Slot {
            uid: self.next_uid,
            data: Some(vec![0f32; self.layout.block_floats()]),
            seq_block: self.slots.iter().flatten().count(),
        };
        self.next_uid += 1;
        let index = match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(slot);
                i
            }
            None => {
                self.slots.push(Some(slot));
                self.slots.len() - 1
            }
        };
        self.resident_bytes += self.block_bytes();
        self.counters
            .resident_blocks
            .fetch_add(1, Ordering::Relaxed);
        self.newest = Some(index);
        lock(&self.policy).on_insert(
            Self::policy_key(index),
            &BlockInfo::kv(self.block_bytes() as u64, None, index as u32),
        );
        self.note_ram(lock(&self.prefetch).staged_bytes);
        Ok(KvBlockId(index as u64))
    }

    fn release(&mut self, id: KvBlockId) -> Result<()> {
        self.return_lent();
        let index = id.0 as usize;
        let slot = self
            .slots
            .get_mut(index)
            .and_then(Option::take)
            .ok_or_else(|| ModelError::KvCache(format!("release of unknown block {index}")))?;
        self.forget_staged(index);
        lock(&self.policy).on_remove(Self::policy_key(index));
        if slot.data.is_some() {
            self.resident_bytes -= self.block_bytes();
            self.counters
                .resident_blocks
                .fetch_sub(1, Ordering::Relaxed);
        } else {
            self.counters.swapped_blocks.fetch_sub(1, Ordering::Relaxed);
            for layer in 0..self.layout.layers {
                self.store.remove_key(&Self::chunk_key(slot.uid, layer));
            }
        }
        if self.newest == Some(index) {
            self.newest = None;
        }
        self.free.push(index);
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
        self.return_lent();
        let l = self.layout;
        l.check_write(layer, slot, keys, values)?;
        let index = id.0 as usize;
        if self.slot(id)?.data.is_none() {
            self.load_back(index)?;
        }
        let data = self.slots[index]
            .as_mut()
            .and_then(|s| s.data.as_mut())
            .ok_or_else(|| ModelError::KvCache(format!("block {index} did not load")))?;
        l.copy_into_block(data, layer, slot, keys, values);
        self.note_access(index, layer);
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
        let index = id.0 as usize;
        let slot = self.slot(id)?;
        if let Some(data) = &slot.data {
            self.note_access(index, layer);
            return Ok(l.layer_view(data, layer));
        }
        let (keys, values) = match self.fetch_chunk(index, slot.uid, layer)? {
            Fetched::Decoded(chunk) => chunk,
            Fetched::Landed(rec) => {
                let rec = self.verify(index, layer, rec)?;
                if let Some(view) = self.lend(&rec) {
                    return Ok(view);
                }
                self.decode_landed(index, layer, &rec)?
            }
        };
        Ok(self.copied((keys, values)))
    }

    fn read_layer(&self, ids: &[KvBlockId], layer: usize) -> Result<Vec<KvLayerView<'_>>> {
        let l = self.layout;
        if layer >= l.layers {
            return Err(ModelError::KvCache(format!(
                "layer {layer} out of {}",
                l.layers
            )));
        }
        let mut views: Vec<Option<KvLayerView<'_>>> = Vec::with_capacity(ids.len());
        // (position in ids, block index, uid) of the swapped blocks.
        let mut swapped = Vec::new();
        {
            // Recency and frequency count once per step (see `note_access`).
            let mut policy = (layer == 0).then(|| lock(&self.policy));
            for (at, &id) in ids.iter().enumerate() {
                let slot = self.slot(id)?;
                let index = id.0 as usize;
                match &slot.data {
                    Some(data) => {
                        if let Some(policy) = policy.as_mut() {
                            policy.on_access(Self::policy_key(index));
                        }
                        views.push(Some(l.layer_view(data, layer)));
                    }
                    None => {
                        views.push(None);
                        swapped.push((at, (index, slot.uid)));
                    }
                }
            }
        }
        if !swapped.is_empty() {
            let chunks: Vec<(usize, u64)> = swapped.iter().map(|&(_, c)| c).collect();
            // Raw chunks landed in place, still to be verified.
            let mut landed = Vec::with_capacity(chunks.len());
            self.fetch_chunks(&chunks, layer, |n, fetched| {
                let (at, (index, _)) = swapped[n];
                match fetched {
                    Fetched::Landed(rec) => landed.push((at, index, rec)),
                    Fetched::Decoded(chunk) => views[at] = Some(self.copied(chunk)),
                }
                Ok(())
            })?;
            // Lent unverified, each with its check, which attention runs
            // right before it reads the chunk (see the module docs).
            for (at, index, rec) in landed {
                views[at] = Some(match self.lend_unverified(index, layer, rec) {
                    Ok(view) => view,
                    Err(rec) => {
                        let rec = self.verify(index, layer, rec)?;
                        self.copied(self.decode_landed(index, layer, &rec)?)
                    }
                });
            }
        }
        views
            .into_iter()
            .enumerate()
            .map(|(at, v)| {
                v.ok_or_else(|| ModelError::KvCache(format!("block {} not read", ids[at].0)))
            })
            .collect()
    }

    fn used_bytes(&self) -> usize {
        self.resident_bytes + lock(&self.prefetch).staged_bytes
    }

    /// What stays resident through a forward pass: `make_room` swaps out
    /// down to 3/4 of the resident share, least recently used first, so
    /// the blocks a pass allocates survive it when they fit in that.
    fn write_window_blocks(&self) -> Option<usize> {
        Some((self.resident_after_room() / self.block_bytes()).max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{generate, tiny_decoder};
    use qvl_core::{CodecReport, Encoded};
    use qvl_model::kv::{HostKvStorage, PagedKvCache};
    use qvl_model::Logits;
    use qvl_swap::FaultPlan;

    /// A fresh directory under the system temp dir, removed on drop (no
    /// tempfile: this module is also compiled into the swap benchmark).
    struct TempDir(std::path::PathBuf);

    impl TempDir {
        fn path(&self) -> &std::path::Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn tempdir() -> TempDir {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "qvl-kv-swap-test-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        TempDir(p)
    }

    fn layout() -> KvLayout {
        KvLayout {
            layers: 3,
            kv_heads: 2,
            head_dim: 4,
            block_tokens: 4,
        }
    }

    fn config(dir: &std::path::Path) -> SwapConfig {
        SwapConfig {
            memory_threshold: 0.5,
            capacity_bytes: 8 << 20,
            max_inflight: 2,
            ..SwapConfig::in_directory(dir)
        }
    }

    /// Fills both caches with the same tokens and compares attention.
    fn fill(cache: &mut PagedKvCache, tokens: usize) {
        let l = cache.layout();
        let w = l.token_width();
        for t in 0..tokens {
            cache.reserve(1).unwrap();
            for layer in 0..l.layers {
                let k: Vec<f32> = (0..w)
                    .map(|i| ((t * 31 + i * 7 + layer) % 13) as f32 * 0.1 - 0.6)
                    .collect();
                let v: Vec<f32> = (0..w)
                    .map(|i| ((t * 17 + i * 3 + layer * 5) % 11) as f32 * 0.2)
                    .collect();
                cache.write_layer(layer, &k, &v).unwrap();
            }
            cache.commit(&[t as u32]).unwrap();
        }
    }

    #[test]
    fn attention_over_swapped_blocks_matches_host_exactly() {
        for policy in [
            qvl_swap::EvictionPolicyKind::Lru,
            qvl_swap::EvictionPolicyKind::Lfu,
        ] {
            let tmp = tempdir();
            let l = layout();
            let block = l.block_floats() * 4;
            let cfg = SwapConfig {
                eviction_policy: policy,
                ..config(tmp.path())
            };
            let storage = SwappingKvStorage::new(l, &cfg, 4 * block).unwrap();
            let mut swapped = PagedKvCache::new(Box::new(storage));
            let mut host = PagedKvCache::new(Box::new(HostKvStorage::new(l)));
            fill(&mut swapped, 50);
            fill(&mut host, 50);
            assert!(swapped.used_bytes() <= 4 * block);
            let q: Vec<f32> = (0..4 * 4).map(|i| (i % 5) as f32 * 0.3 - 0.5).collect();
            for _ in 0..2 {
                for layer in 0..l.layers {
                    let a = swapped.attend(layer, &q, 4, 0.5).unwrap();
                    let b = host.attend(layer, &q, 4, 0.5).unwrap();
                    assert_eq!(a, b, "layer {layer}");
                }
            }
            assert!(swapped.used_bytes() <= 4 * block);
        }
    }

    #[test]
    fn a_layer_read_in_one_pass_equals_the_blocks_read_one_by_one() {
        let tmp = tempdir();
        let l = layout();
        let mut s =
            SwappingKvStorage::new(l, &config(tmp.path()), 4 * l.block_floats() * 4).unwrap();
        let n = l.block_tokens * l.token_width();
        let ids: Vec<_> = (0..6).map(|_| s.allocate().unwrap()).collect();
        for (b, &id) in ids.iter().enumerate() {
            for layer in 0..l.layers {
                let k: Vec<f32> = (0..n)
                    .map(|i| (b * 1000 + layer * 100 + i) as f32)
                    .collect();
                let v: Vec<f32> = k.iter().map(|x| -x).collect();
                s.write(id, layer, 0, &k, &v).unwrap();
            }
        }
        s.allocate().unwrap();
        assert!(s.stats().swapped_blocks >= 3, "{:?}", s.stats());
        // Resident and swapped blocks mixed, asked in reverse order and one
        // of them twice.
        let mut asked: Vec<KvBlockId> = ids.iter().rev().copied().collect();
        asked.push(ids[1]);
        for layer in 0..l.layers {
            let views = s.read_layer(&asked, layer).unwrap();
            assert_eq!(views.len(), asked.len());
            for (view, &id) in views.iter().zip(&asked) {
                let want = s.read(id, layer).unwrap();
                assert_eq!(view.keys, want.keys, "layer {layer} block {id:?}");
                assert_eq!(view.values, want.values, "layer {layer} block {id:?}");
                assert_eq!(view.keys[0], (id.0 as usize * 1000 + layer * 100) as f32);
            }
        }
    }

    #[test]
    fn the_staged_table_counts_each_chunk_once() {
        let staged_chunk = || Staged::Decoded(Ticket::ready(Ok((vec![1.0], vec![2.0]))));
        let mut t = StagedChunks::new(3);
        assert!(t.is_empty());
        t.insert(4, 2, staged_chunk());
        t.insert(4, 2, staged_chunk());
        t.insert(4, 0, staged_chunk());
        t.insert(1, 2, staged_chunk());
        assert_eq!(t.len, 3);
        assert!(t.contains(4, 2) && t.contains(1, 2) && !t.contains(1, 1) && !t.contains(9, 0));
        let mut stalled = std::time::Duration::ZERO;
        match t.remove(1, 2).map(|s| s.wait(&mut stalled)) {
            Some(Ok(Fetched::Decoded((k, v)))) => assert_eq!((k, v), (vec![1.0], vec![2.0])),
            _ => panic!("the staged chunk did not come back"),
        }
        assert!(t.remove(1, 2).is_none());
        assert_eq!(t.forget_block(4), 2);
        assert!(t.is_empty());
        assert_eq!(
            stalled,
            std::time::Duration::ZERO,
            "a ready chunk costs no stall"
        );
    }

    #[test]
    fn a_budget_below_one_block_is_refused() {
        let tmp = tempdir();
        let err = SwappingKvStorage::new(layout(), &config(tmp.path()), 100)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("at least one block"), "{err}");
    }

    #[test]
    fn a_corrupt_chunk_fails_the_read_with_the_block_and_file_named() {
        let tmp = tempdir();
        let l = layout();
        let mut s =
            SwappingKvStorage::new(l, &config(tmp.path()), 4 * l.block_floats() * 4).unwrap();
        let ids: Vec<_> = (0..6).map(|_| s.allocate().unwrap()).collect();
        for &id in &ids {
            s.write(id, 1, 0, &[1.0; 8], &[2.0; 8]).unwrap();
        }
        assert!(s.stats().swapped_blocks >= 3);
        let victim = ids[0];
        // Chunks prefetched before the damage hold the true bytes; drop
        // them so that the read goes to the damaged record.
        s.forget_staged(0);
        let uid = s.slots[0].as_ref().unwrap().uid;
        assert!(s.slots[0].as_ref().unwrap().data.is_none());
        let off = s
            .store()
            .record_offset(&SwappingKvStorage::chunk_key(uid, 1))
            .unwrap();
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(s.store().path())
            .unwrap();
        f.write_all_at(&[0xff; 4], off + 100).unwrap();
        f.sync_all().unwrap();
        let err = match s.read(victim, 1) {
            Ok(_) => panic!("corrupt data was returned"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("block 0 layer 1"), "{err}");
        assert!(err.contains("checksum mismatch"), "{err}");
        assert!(
            err.contains(&s.store().path().display().to_string()),
            "{err}"
        );
        // A layer read lends the chunk with its check, which fails the
        // same way, every time, whether or not the chunk was prefetched.
        for _ in 0..2 {
            let views = s.read_layer(&ids, 1).unwrap();
            let err = match views.iter().map(KvLayerView::verify).find(Result::is_err) {
                Some(Err(e)) => e.to_string(),
                _ => panic!("a corrupt chunk passed its check"),
            };
            assert!(err.contains("block 0 layer 1"), "{err}");
            assert!(err.contains("checksum mismatch"), "{err}");
        }
        // Other layers of the block are intact.
        let v = s.read(victim, 0).unwrap();
        assert!(v.keys.iter().all(|&x| x == 0.0));
        let views = s.read_layer(&ids, 0).unwrap();
        assert_eq!(views.len(), ids.len());
        assert!(views.iter().all(|v| v.verify().is_ok()));
    }

    #[test]
    fn enospc_on_swap_out_fails_the_write_and_loses_nothing() {
        let tmp = tempdir();
        let l = layout();
        let mut s =
            SwappingKvStorage::new(l, &config(tmp.path()), 4 * l.block_floats() * 4).unwrap();
        s.store().set_faults(FaultPlan {
            write_budget: Some(0),
        });
        let a = s.allocate().unwrap();
        s.write(a, 0, 0, &[3.0; 8], &[4.0; 8]).unwrap();
        let mut err = None;
        for _ in 0..5 {
            match s.allocate() {
                Ok(_) => {}
                Err(e) => {
                    err = Some(e.to_string());
                    break;
                }
            }
        }
        let err = err.expect("the budget forces a swap-out, which hits ENOSPC");
        assert!(err.contains("no space left"), "{err}");
        // The block that could not leave is still resident and intact.
        let v = s.read(a, 0).unwrap();
        assert_eq!(&v.keys[..8], &[3.0; 8]);
        assert_eq!(&v.values[..8], &[4.0; 8]);
    }

    #[test]
    fn writes_into_a_swapped_block_load_it_back() {
        let tmp = tempdir();
        let l = layout();
        let mut s =
            SwappingKvStorage::new(l, &config(tmp.path()), 4 * l.block_floats() * 4).unwrap();
        let ids: Vec<_> = (0..6).map(|_| s.allocate().unwrap()).collect();
        s.write(ids[5], 2, 0, &[1.0; 8], &[1.0; 8]).unwrap();
        assert!(s.slots[0].as_ref().unwrap().data.is_none());
        s.write(ids[0], 2, 1, &[5.0; 8], &[6.0; 8]).unwrap();
        let v = s.read(ids[0], 2).unwrap();
        assert_eq!(&v.keys[8..16], &[5.0; 8]);
        assert_eq!(&v.values[8..16], &[6.0; 8]);
        drop(v);
        assert!(s.stats().swap_ins_for_write >= 1);
        for id in ids {
            s.release(id).unwrap();
        }
        assert_eq!(s.used_bytes(), 0);
        assert_eq!(qvl_core::BlockStore::len(s.store()), 0);
    }

    /// A lossless codec of our own (byte-swapped f32): proves that chunks
    /// leave through the codec and come back through it.
    struct SwappedBytes;

    impl Codec for SwappedBytes {
        fn id(&self) -> CodecId {
            CodecId(0x7e57)
        }
        fn name(&self) -> String {
            "test-byteswap".to_string()
        }
        fn is_lossless(&self) -> bool {
            true
        }
        fn encode(&self, values: &[f32], shape: &[usize]) -> qvl_core::Result<Encoded> {
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_be_bytes()).collect();
            Ok(Encoded {
                codec: self.id(),
                shape: shape.to_vec(),
                report: CodecReport {
                    input_bytes: bytes.len() as u64,
                    output_bytes: bytes.len() as u64,
                    ..Default::default()
                },
                bytes,
            })
        }
        fn decode(&self, bytes: &[u8], _shape: &[usize], out: &mut [f32]) -> qvl_core::Result<()> {
            if bytes.len() != out.len() * 4 {
                return Err(qvl_core::CoreError::InvalidInput("length".into()));
            }
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_be_bytes([b[0], b[1], b[2], b[3]]);
            }
            Ok(())
        }
    }

    #[test]
    fn chunks_leave_and_return_through_a_codec() {
        let tmp = tempdir();
        let l = layout();
        let s = SwappingKvStorage::new(l, &config(tmp.path()), 4 * l.block_floats() * 4)
            .unwrap()
            .with_codec(Arc::new(SwappedBytes));
        let mut swapped = PagedKvCache::new(Box::new(s));
        let mut host = PagedKvCache::new(Box::new(HostKvStorage::new(l)));
        fill(&mut swapped, 30);
        fill(&mut host, 30);
        let q: Vec<f32> = (0..16).map(|i| i as f32 * 0.1).collect();
        assert_eq!(
            swapped.attend(2, &q, 4, 0.5).unwrap(),
            host.attend(2, &q, 4, 0.5).unwrap()
        );
    }

    #[test]
    fn kivi_swap_out_is_the_in_ram_codec_layout_with_sinks_exact() {
        let tmp = tempdir();
        let l = layout();
        let options = KvCodecOptions {
            group_size: 8,
            key_group_tokens: 4,
            sink_tokens: 2,
            sinks_f16: false,
            ..KvCodecOptions::of(KvCodecKind::Int8)
        };
        let mut s = SwappingKvStorage::new(l, &config(tmp.path()), 4 * l.block_floats() * 4)
            .unwrap()
            .with_kivi(&options)
            .unwrap();
        let w = l.token_width();
        let key = |t: usize, i: usize, layer: usize| ((t * 31 + i * 7 + layer) % 13) as f32 * 0.1;
        let value = |t: usize, i: usize, layer: usize| ((t * 17 + i * 3 + layer * 5) % 11) as f32;
        let ids: Vec<_> = (0..8).map(|_| s.allocate().unwrap()).collect();
        for (b, &id) in ids.iter().enumerate() {
            for layer in 0..l.layers {
                for slot in 0..l.block_tokens {
                    let t = b * l.block_tokens + slot;
                    let k: Vec<f32> = (0..w).map(|i| key(t, i, layer)).collect();
                    let v: Vec<f32> = (0..w).map(|i| value(t, i, layer)).collect();
                    s.write(id, layer, slot, &k, &v).unwrap();
                }
            }
        }
        assert!(
            s.slots[0].as_ref().unwrap().data.is_none(),
            "block 0 left RAM"
        );
        // What CodecKvStorage makes of the same slabs: KIVI keys per
        // channel, values per token, the sequence's first tokens exact.
        let kivi = s.kivi.unwrap();
        let slab = [l.block_tokens, w];
        let round_trip = |c: &KvBlockCodec, x: &[f32], b: usize| {
            let span = TokenSpan {
                first_token: b * l.block_tokens,
                seq_len: (b + 1) * l.block_tokens,
            };
            let e = c.encode_span(x, &slab, span).unwrap();
            let mut out = vec![0f32; x.len()];
            qvl_compress::decode_any(&e.bytes, &slab, &mut out).unwrap();
            out
        };
        let mut swapped = 0;
        for (b, &id) in ids.iter().enumerate() {
            if s.slots[b].as_ref().unwrap().data.is_some() {
                continue;
            }
            swapped += 1;
            for layer in 0..l.layers {
                let tokens = b * l.block_tokens..(b + 1) * l.block_tokens;
                let k: Vec<f32> = tokens
                    .clone()
                    .flat_map(|t| (0..w).map(move |i| key(t, i, layer)))
                    .collect();
                let v: Vec<f32> = tokens
                    .flat_map(|t| (0..w).map(move |i| value(t, i, layer)))
                    .collect();
                let got = s.read(id, layer).unwrap();
                assert_eq!(
                    &got.keys[..],
                    &round_trip(&kivi.keys, &k, b)[..],
                    "block {b}"
                );
                assert_eq!(&got.values[..], &round_trip(&kivi.values, &v, b)[..]);
                if b == 0 {
                    // The two sink tokens come back exactly; the rest is
                    // quantized (and differs somewhere).
                    assert_eq!(&got.keys[..2 * w], &k[..2 * w]);
                    assert_eq!(&got.values[..2 * w], &v[..2 * w]);
                }
                assert_ne!(
                    &got.keys[..],
                    &k[..],
                    "block {b} layer {layer} was quantized"
                );
            }
        }
        assert!(swapped >= 4, "{swapped} blocks swapped");
        assert_eq!(s.stats().copied_chunks, swapped * l.layers as u64);
    }

    #[test]
    fn a_model_generating_over_swapped_kv_matches_host_bit_for_bit() {
        let dec = tiny_decoder();
        let l = dec.kv_layout(4);
        let prompt: Vec<u32> = (0..64u32).map(|i| (i * 37 + 5) % 300).collect();
        let mut host = PagedKvCache::new(Box::new(HostKvStorage::new(l)));
        let want = generate(&dec, &mut host, &prompt, 4, 24);

        let tmp = tempdir();
        let budget = 4 * l.block_floats() * 4;
        let storage = SwappingKvStorage::new(l, &config(tmp.path()), budget).unwrap();
        let monitor = storage.monitor();
        let mut cache = PagedKvCache::new(Box::new(storage));
        let got = generate(&dec, &mut cache, &prompt, 4, 24);
        assert_eq!(got.len(), want.len());
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert_eq!(a, b, "logits row {i} differ");
        }
        // 88 tokens = 22 blocks; the budget holds 2 resident blocks + prefetch.
        assert!(cache.used_bytes() <= budget);
        assert_eq!(cache.blocks().len(), 22);
        let st = monitor.stats();
        assert!(st.swapped_blocks >= 19, "{st:?}");
        assert_eq!(st.resident_blocks + st.swapped_blocks, 22);
        assert!(st.peak_ram_bytes <= budget, "{st:?}");
        assert!(st.prefetch_hits > 0 && st.store.blocks_read > 0, "{st:?}");
        assert_eq!(st.store.integrity_failures, 0);
        // Raw chunks are lent to attention in place, not copied.
        assert!(st.lent_chunks > 0, "{st:?}");
        assert_eq!(
            st.lent_chunks + st.copied_chunks,
            st.prefetch_hits + st.demand_reads
        );
    }

    #[test]
    fn a_long_prompt_prefills_in_chunks_that_stay_resident() {
        let dec = tiny_decoder();
        let l = dec.kv_layout(4);
        let prompt: Vec<u32> = (0..64u32).map(|i| (i * 37 + 5) % 300).collect();
        let positions: Vec<[i64; 3]> = (0..64).map(|i| [i; 3]).collect();
        let prefill = |cache: &mut PagedKvCache| {
            let hidden = dec.embed(&prompt).unwrap();
            dec.forward(cache, hidden, &prompt, &positions, None, Logits::All)
                .unwrap()
        };
        let want = prefill(&mut PagedKvCache::new(Box::new(HostKvStorage::new(l))));

        let tmp = tempdir();
        // 8 blocks at threshold 0.5: 4 resident, 3 of them kept through a
        // pass; 64 tokens are 16 blocks.
        let budget = 8 * l.block_floats() * 4;
        let storage = SwappingKvStorage::new(l, &config(tmp.path()), budget).unwrap();
        let monitor = storage.monitor();
        let mut cache = PagedKvCache::new(Box::new(storage));
        assert_eq!(cache.write_window_tokens(), Some(8));
        let got = prefill(&mut cache);
        // Every row, in chunks of 8 tokens, as in one pass (up to the order
        // attention sums in).
        assert_eq!(got.len(), want.len());
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst <= 1e-4, "logits differ by {worst}");
        // No block was swapped out while the pass still wrote into it.
        let st = monitor.stats();
        assert_eq!(st.swap_ins_for_write, 0, "{st:?}");
        assert!(st.swapped_blocks >= 12, "{st:?}");
    }
}
