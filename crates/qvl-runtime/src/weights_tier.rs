//! Decoder weights streamed under a RAM budget: the adapter between
//! `qvl-tier` and the model.
//!
//! [`TieredLayers::build`] copies every decoder layer's tensors, as the
//! source serves them, onto the tier manager's SSD tier (its spill file),
//! one object per tensor, then drops them from RAM. As a
//! [`LayerProvider`], it gives the decoder layer `i` with each tensor from
//! its RAM copy, a prefetched buffer or a read from the SSD, reading
//! ahead in tensor order while layer `i` computes. Tensors as the unit
//! keep the read-ahead room small (a tensor, not a layer, beside the layer
//! in use), so prefetch costs few kept bytes, and let kept copies fill the
//! budget to the tensor. The layers are rebuilt over the tier's bytes
//! without copying the matrices, so a streamed forward pass computes
//! exactly what the resident one does.

use crate::config::{self, Config, MigrationPolicy, TieringConfig};
use qvl_core::{ByteSize, DType, MetricsRecorder, TensorKind, Tier};
use qvl_model::checkpoint::WeightSource;
use qvl_model::llama::{GgufTextModel, StreamedLayers};
use qvl_model::qweight::QuantizingSource;
use qvl_model::tensor::{ByteOwner, Bytes, StoredTensor};
use qvl_model::text::{DecoderLayer, DecoderTensorNames, LayerProvider, TextDecoder};
use qvl_model::{BlockFormat, DecoderConfig, LoadOptions, ModelError, WeightFormat};
use qvl_tier::{
    ObjectId, PlacementPolicy, Resident, TierConfig, TierError, TierManager, TierStats,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Tier copies are whole pages: what a tensor of the layer takes in RAM.
const PAGE: u64 = 4096;

/// Where a tensor sits: which segment object of its layer, and where in it.
#[derive(Debug, Clone)]
struct TensorEntry {
    name: String,
    dtype: DType,
    /// Set for quantized blocks (a GGUF file's own, or re-quantized).
    blocks: Option<BlockFormat>,
    shape: Vec<usize>,
    part: usize,
    offset: usize,
    len: usize,
}

/// A layer on the tier: `parts` segment objects from `first` in the read order.
#[derive(Debug, Clone)]
struct LayerTable {
    first: usize,
    parts: usize,
    tensors: Vec<TensorEntry>,
}

/// Segments per layer, about: each segment is one object on the tier, so
/// the read-ahead room is a segment beside the layer in use. More would
/// mean small reads, each paying the device's latency.
const SEGMENTS_PER_LAYER: usize = 8;

/// Tensors start on this boundary inside a segment.
const TENSOR_ALIGN: usize = 64;

/// Splits a layer's tensors (their sizes, in order) into runs of at least
/// an eighth of the layer each; a short tail joins the run before it.
fn segments(sizes: &[usize]) -> Vec<std::ops::Range<usize>> {
    let total: usize = sizes.iter().sum();
    let least = (total / SEGMENTS_PER_LAYER).max(1);
    let mut out: Vec<std::ops::Range<usize>> = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, &len) in sizes.iter().enumerate() {
        bytes += len;
        if bytes >= least {
            out.push(start..i + 1);
            (start, bytes) = (i + 1, 0);
        }
    }
    if start < sizes.len() {
        match out.last_mut() {
            Some(last) => last.end = sizes.len(),
            None => out.push(start..sizes.len()),
        }
    }
    out
}

/// Decoder layers held by a [`TierManager`], served to the decoder on demand.
pub struct TieredLayers {
    manager: TierManager,
    /// Every tensor object, layer after layer: the order they are read in.
    order: Vec<ObjectId>,
    /// Per layer: its segment objects and tensors.
    tables: Vec<LayerTable>,
    /// RAM a layer's tensors take (whole pages each), the largest.
    largest_layer: u64,
    config: DecoderConfig,
    names: DecoderTensorNames,
    weight_bytes: usize,
    /// Layers built over kept RAM copies, reused while every tensor stays
    /// kept (keyed by the copies' addresses); dropped once one is demoted
    /// so the cache never holds bytes the tier has let go.
    built: Mutex<Vec<Option<BuiltLayer>>>,
}

/// A layer built over kept copies, with the copies' addresses.
type BuiltLayer = (Vec<usize>, Arc<DecoderLayer>);

impl TieredLayers {
    /// Moves the layers of `config` from `src` onto a new tier manager.
    pub fn build(
        config: &DecoderConfig,
        src: &dyn WeightSource,
        names: &DecoderTensorNames,
        tier: TierConfig,
    ) -> qvl_model::Result<TieredLayers> {
        Self::build_with(config, src, names, tier, None, &mut |_| Ok(()))
    }

    /// [`TieredLayers::build`] with a manager that reports migrations,
    /// lookups and SSD traffic to `recorder`, calling `after_layer(i)` once
    /// layer `i` is on the SSD tier (to release its source pages, say).
    pub fn build_with(
        config: &DecoderConfig,
        src: &dyn WeightSource,
        names: &DecoderTensorNames,
        tier: TierConfig,
        recorder: Option<Arc<dyn MetricsRecorder>>,
        after_layer: &mut dyn FnMut(usize) -> qvl_model::Result<()>,
    ) -> qvl_model::Result<TieredLayers> {
        let manager = TierManager::with_recorder(tier, recorder).map_err(tier_error)?;
        let mut order = Vec::new();
        let mut tables = Vec::with_capacity(config.num_layers);
        let mut weight_bytes = 0;
        let mut largest_layer = 0u64;
        for index in 0..config.num_layers {
            let mut tensors = HashMap::new();
            let mut loaded = Vec::new();
            for name in DecoderLayer::tensor_names(config, names, index) {
                let t = src
                    .tensor(&name)?
                    .ok_or_else(|| ModelError::MissingTensor {
                        name: name.clone(),
                        source_desc: src.describe(),
                    })?;
                loaded.push(t);
            }
            let first = order.len();
            let sizes: Vec<usize> = loaded.iter().map(|t| t.bytes.len()).collect();
            let mut table = Vec::with_capacity(loaded.len());
            let mut layer_bytes = 0u64;
            for (part, range) in segments(&sizes).into_iter().enumerate() {
                let mut image = Vec::new();
                for t in &loaded[range] {
                    image.resize(image.len().next_multiple_of(TENSOR_ALIGN), 0);
                    table.push(TensorEntry {
                        name: t.name.clone(),
                        dtype: t.dtype,
                        blocks: t.block_format(),
                        shape: t.shape.clone(),
                        part,
                        offset: image.len(),
                        len: t.bytes.len(),
                    });
                    image.extend_from_slice(t.bytes.as_slice());
                }
                order.push(
                    manager
                        .insert(TensorKind::Weight, &image)
                        .map_err(tier_error)?,
                );
                layer_bytes += (image.len().max(1) as u64).next_multiple_of(PAGE);
            }
            for t in loaded {
                tensors.insert(t.name.clone(), t);
            }
            // Validates shapes now, not on the first token.
            let layer = DecoderLayer::load(config, &LayerImage { tensors }, names, index)?;
            weight_bytes += layer.weight_bytes();
            drop(layer);
            largest_layer = largest_layer.max(layer_bytes);
            let parts = order.len() - first;
            tables.push(LayerTable {
                first,
                parts,
                tensors: table,
            });
            after_layer(index)?;
        }
        // A reader holds one layer's tensors at once.
        manager.set_stream_hold(ByteSize(largest_layer));
        manager.flush().map_err(tier_error)?;
        Ok(TieredLayers {
            manager,
            order,
            tables,
            largest_layer,
            config: config.clone(),
            names: names.clone(),
            weight_bytes,
            built: Mutex::new(vec![None; config.num_layers]),
        })
    }

    /// Loads a decoder whose layers are streamed through a tier manager with
    /// `tier`'s budgets; the embedding, final norm and lm head stay resident.
    pub fn load_decoder(
        config: DecoderConfig,
        src: &dyn WeightSource,
        names: &DecoderTensorNames,
        tier: TierConfig,
    ) -> qvl_model::Result<(TextDecoder, Arc<TieredLayers>)> {
        let layers = Arc::new(TieredLayers::build(&config, src, names, tier)?);
        let bytes = layers.weight_bytes;
        let decoder = TextDecoder::load_streamed(config, src, names, layers.clone(), bytes)?;
        Ok((decoder, layers))
    }

    /// The tier manager.
    pub fn manager(&self) -> &TierManager {
        &self.manager
    }

    /// The tier manager's counters.
    pub fn stats(&self) -> TierStats {
        self.manager.stats()
    }

    /// Bytes of the layers' matrices.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// Bytes of the layer images (matrices, biases, norms, padding).
    pub fn image_bytes(&self) -> u64 {
        self.manager.stats().object_bytes
    }

    /// RAM the largest layer's tensors take (the least a RAM budget must hold).
    pub fn largest_image_bytes(&self) -> u64 {
        self.largest_layer
    }

    /// Number of layers.
    pub fn len(&self) -> usize {
        self.tables.len()
    }

    /// Whether there is no layer.
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }
}

impl TieredLayers {
    /// Changes the RAM budget and prefetch depth of the layers' tier
    /// ([`TierManager::reconfigure`]) and lets go of cached layers whose
    /// copies it demoted, so the RAM in use falls under the new budget now.
    pub fn reconfigure(&self, ram: ByteSize, prefetch_depth: usize) -> qvl_model::Result<()> {
        self.manager
            .reconfigure(ram, prefetch_depth)
            .map_err(tier_error)?;
        let mut built = self.built.lock().unwrap_or_else(|p| p.into_inner());
        self.drop_demoted(&mut built)?;
        drop(built);
        self.manager.reset_peak();
        Ok(())
    }

    /// Drops cached layers with a segment no longer kept: the cache never
    /// holds bytes the tier has let go.
    fn drop_demoted(&self, built: &mut [Option<BuiltLayer>]) -> qvl_model::Result<()> {
        for (slot, t) in built.iter_mut().zip(&self.tables) {
            let ids = &self.order[t.first..t.first + t.parts];
            if slot.is_some() && !self.manager.all_resident(ids).map_err(tier_error)? {
                *slot = None;
            }
        }
        Ok(())
    }
}

impl LayerProvider for TieredLayers {
    fn layer(&self, index: usize) -> qvl_model::Result<Arc<DecoderLayer>> {
        let Some(table) = self.tables.get(index) else {
            return Err(ModelError::InvalidInput(format!(
                "layer {index} asked of a tier with {} layers",
                self.tables.len()
            )));
        };
        let ids = &self.order[table.first..table.first + table.parts];
        // The decoder let go of the previous layer: its buffers take the
        // reads ahead before this layer's segments are waited for.
        let mut parts = Vec::with_capacity(table.parts);
        for k in 0..table.parts {
            parts.push(
                self.manager
                    .get_in_order(&self.order, table.first + k)
                    .map_err(tier_error)?,
            );
        }
        let keys: Vec<usize> = parts
            .iter()
            .map(|b| Arc::as_ptr(b) as *const u8 as usize)
            .collect();
        let kept = self.manager.all_resident(ids).map_err(tier_error)?;
        // The cache holds no tensor of its own: poison cannot leave it invalid.
        let mut built = self.built.lock().unwrap_or_else(|p| p.into_inner());
        self.drop_demoted(&mut built)?;
        if kept {
            if let Some((k, layer)) = &built[index] {
                if *k == keys {
                    return Ok(layer.clone());
                }
            }
        }
        let image = LayerImage::over(&table.tensors, &parts)?;
        let layer = Arc::new(DecoderLayer::load(
            &self.config,
            &image,
            &self.names,
            index,
        )?);
        built[index] = kept.then(|| (keys, layer.clone()));
        Ok(layer)
    }
}

/// A tier buffer as the owner of tensor bytes: the layer keeps it alive.
struct TierBytes(Arc<Resident>);

impl ByteOwner for TierBytes {
    fn bytes(&self) -> &[u8] {
        &self.0
    }
}

/// The tensors of one layer image, as a weight source.
struct LayerImage {
    tensors: HashMap<String, StoredTensor>,
}

impl LayerImage {
    /// The tensors of `table` over the tier copies of their segments.
    fn over(table: &[TensorEntry], parts: &[Arc<Resident>]) -> qvl_model::Result<LayerImage> {
        let owners: Vec<Arc<dyn ByteOwner>> = parts
            .iter()
            .map(|p| Arc::new(TierBytes(p.clone())) as Arc<dyn ByteOwner>)
            .collect();
        let mut tensors = HashMap::with_capacity(table.len());
        for e in table {
            let owner = owners.get(e.part).ok_or_else(|| {
                ModelError::InvalidInput(format!(
                    "tensor {:?} is in segment {} of a layer of {}",
                    e.name,
                    e.part,
                    owners.len()
                ))
            })?;
            let have = owner.bytes().len();
            let bytes = Bytes::new(owner.clone(), e.offset, e.len).ok_or_else(|| {
                ModelError::InvalidInput(format!(
                    "tensor {:?} at {}..{} runs past its segment of {have} bytes",
                    e.name,
                    e.offset,
                    e.offset + e.len
                ))
            })?;
            let t = match e.blocks {
                // Blocks carry their format beside the bytes; the constructor
                // takes owned bytes (a few MiB per quantized layer).
                Some(format) => StoredTensor::from_blocks(
                    e.name.clone(),
                    format,
                    e.shape.clone(),
                    bytes.as_slice().to_vec(),
                )?,
                None => StoredTensor::new(e.name.clone(), e.dtype, e.shape.clone(), bytes)?,
            };
            tensors.insert(e.name.clone(), t);
        }
        Ok(LayerImage { tensors })
    }
}

impl WeightSource for LayerImage {
    fn tensor(&self, name: &str) -> qvl_model::Result<Option<StoredTensor>> {
        Ok(self.tensors.get(name).cloned())
    }

    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn describe(&self) -> String {
        "a tiered layer image".to_string()
    }
}

/// Budgets for the decoder's layer weights, as `qvl run --ram-budget SIZE
/// --gpu-budget SIZE` gives them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WeightBudgets {
    /// RAM for the layer weights: with it, layers stream from the SSD tier.
    pub ram: Option<ByteSize>,
    /// GPU memory for the layer weights. This build has no GPU tier: the
    /// budget is reported unavailable and ignored.
    pub gpu: Option<ByteSize>,
}

/// Read-ahead room under a budget, in largest segments (a quarter layer):
/// with layers read as segments by several I/O threads, this keeps reads
/// queued across the layer boundary, where the reader holds the layer it
/// assembles and frees nothing; each segment more costs a kept segment
/// (bytes read every token). The reader asks for each segment through
/// [`TierManager::get_in_order`], which queues the next reads into the
/// buffers the previous layer freed before it waits.
pub const RUN_PREFETCH_DEPTH: usize = 2;

/// The `[tiering]` section as a [`TierConfig`]: `migration_threshold` and
/// `migration_policy` map one to one, the rest keeps the manager's defaults
/// (prefetch depth [`RUN_PREFETCH_DEPTH`]). None when `enabled` is false:
/// the off switch, everything stays where it was loaded.
pub fn tier_config(tiering: &TieringConfig) -> Option<TierConfig> {
    if !tiering.enabled {
        return None;
    }
    Some(TierConfig {
        migration_threshold: tiering.migration_threshold,
        policy: match tiering.migration_policy {
            MigrationPolicy::AccessFrequency => PlacementPolicy::AccessFrequency,
            MigrationPolicy::Recency => PlacementPolicy::Recency,
        },
        prefetch_depth: RUN_PREFETCH_DEPTH,
        ..TierConfig::default()
    })
}

/// Whether this build has a GPU tier (it has not: qvl-tier is built
/// without CUDA).
pub fn gpu_tier_available() -> bool {
    qvl_tier::gpu_tier_available()
}

/// How `qvl run` placed the decoder's weights, for its report.
pub struct WeightTiering {
    budgets: WeightBudgets,
    layers: Option<Arc<TieredLayers>>,
    notes: Vec<String>,
}

impl WeightTiering {
    /// Loads the GGUF model at `path` with its layers streamed under
    /// `budgets.ram` through a tier manager configured from `config`'s
    /// `[tiering]` section, its spill file in the swap directory; without a
    /// RAM budget, or with `[tiering] enabled = false`, the layers load
    /// resident. A GPU budget is noted as unavailable and ignored. A RAM
    /// budget below one layer is an error (it could not be kept).
    pub fn load_gguf(
        path: &Path,
        config: &Config,
        budgets: WeightBudgets,
        recorder: Option<Arc<dyn MetricsRecorder>>,
    ) -> qvl_model::Result<(GgufTextModel, WeightTiering)> {
        Self::load_gguf_as(path, config, budgets, recorder, &LoadOptions::default())
    }

    /// [`WeightTiering::load_gguf`] with the weight matrices held as
    /// `options.weights` asks, streamed layers included: `native` streams
    /// the file's own Q8_0/Q4_0/Q4_1 blocks (a quarter to a sixth of the
    /// f32 bytes), q8/q4/budget stream the re-quantized matrices.
    pub fn load_gguf_as(
        path: &Path,
        config: &Config,
        budgets: WeightBudgets,
        recorder: Option<Arc<dyn MetricsRecorder>>,
        options: &LoadOptions,
    ) -> qvl_model::Result<(GgufTextModel, WeightTiering)> {
        let mut notes = Vec::new();
        if let Some(gpu) = budgets.gpu.filter(|_| !gpu_tier_available()) {
            notes.push(format!(
                "--gpu-budget {gpu}: the GPU tier is unavailable (this build has no CUDA \
                 support); the GPU budget is ignored and the weights stay in RAM{}",
                if budgets.ram.is_some() {
                    " under the RAM budget"
                } else {
                    ""
                }
            ));
        }
        let tier = match (budgets.ram, tier_config(&config.tiering)) {
            (Some(ram), Some(tier)) => Some(TierConfig {
                cpu_ram: ram,
                gpu_hbm: budgets.gpu.unwrap_or(ByteSize(0)),
                spill_dir: Some(spill_directory(config)?),
                ..tier
            }),
            (Some(ram), None) => {
                notes.push(format!(
                    "--ram-budget {ram} is ignored: [tiering] enabled = false keeps every \
                     weight resident"
                ));
                None
            }
            (None, _) => None,
        };
        let Some(tier) = tier else {
            let model = GgufTextModel::load_with_options(path, options)?;
            return Ok((
                model,
                WeightTiering {
                    budgets,
                    layers: None,
                    notes,
                },
            ));
        };
        let ram = tier.cpu_ram;
        let mut built = None;
        let model = GgufTextModel::load_with_options_and(path, options, |cfg, weights, names| {
            // The file's pages of a layer are dropped once it is on the SSD
            // tier: the mapped file does not stay resident beside the budget.
            let file = weights.file();
            let mut release = |index: usize| -> qvl_model::Result<()> {
                let prefix = format!("blk.{index}.");
                for info in file.header().tensors.iter() {
                    if info.name.starts_with(&prefix) {
                        qvl_tier::release_mapped_pages(file.tensor_data(info)).map_err(|e| {
                            ModelError::io(format!("releasing pages of {}", info.name), e)
                        })?;
                    }
                }
                Ok(())
            };
            // The layers are held as the resident weights would be.
            let quantizing = QuantizingSource::new(weights, options.clone(), cfg.num_layers);
            let src: &dyn WeightSource = match options.weights {
                WeightFormat::Q8 | WeightFormat::Q4 | WeightFormat::Budget(_) => &quantizing,
                WeightFormat::F32 | WeightFormat::Native => weights,
            };
            let layers = Arc::new(TieredLayers::build_with(
                cfg,
                src,
                names,
                tier,
                recorder,
                &mut release,
            )?);
            let need = layers.largest_image_bytes();
            if ram.bytes() < need {
                return Err(ModelError::InvalidInput(format!(
                    "--ram-budget {ram} is smaller than one decoder layer of {} ({}): the \
                     budget must hold the layer in use; give at least {} (that layer and \
                     room to read ahead)",
                    path.display(),
                    ByteSize(need),
                    ByteSize(need + need / 2),
                )));
            }
            let weight_bytes = layers.weight_bytes();
            built = Some(layers.clone());
            Ok(Some(StreamedLayers {
                provider: layers,
                weight_bytes,
            }))
        })?;
        Ok((
            model,
            WeightTiering {
                budgets,
                layers: built,
                notes,
            },
        ))
    }

    /// Refuses budgets for a Qwen3-VL checkpoint (its layers are not
    /// streamed yet) with a message that says so; Ok without budgets.
    pub fn check_checkpoint(budgets: WeightBudgets, dir: &Path) -> qvl_model::Result<()> {
        if budgets.ram.is_some() || budgets.gpu.is_some() {
            return Err(ModelError::InvalidInput(format!(
                "--ram-budget and --gpu-budget apply to GGUF models; {} is a Qwen3-VL \
                 checkpoint, whose layers are not streamed yet",
                dir.display()
            )));
        }
        Ok(())
    }

    /// Messages about budgets that could not be applied.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// The streamed layers, when a RAM budget applied.
    pub fn layers(&self) -> Option<&Arc<TieredLayers>> {
        self.layers.as_ref()
    }

    /// The budgets asked for.
    pub fn budgets(&self) -> WeightBudgets {
        self.budgets
    }

    /// What the run's weight report says about `model`'s weights.
    pub fn weight_note(&self, model: &GgufTextModel) -> String {
        let file = format!(
            "a {:.1} MiB {} file",
            mib(model.file_bytes() as u64),
            model.hyperparams().architecture
        );
        let held = match model.weight_format() {
            WeightFormat::F32 => "f32".to_string(),
            other => format!("matrices {other}"),
        };
        match &self.layers {
            None => format!("{held}, from {file}"),
            Some(l) => format!(
                "embedding, norm and lm head resident ({held}, from {file}); {} layers \
                 ({:.1} MiB) streamed under the RAM budget",
                l.len(),
                mib(l.image_bytes())
            ),
        }
    }

    /// Report lines: used / budget / peak per tier, migrations, hits per
    /// tier and the SSD read rate. Empty when the layers are resident.
    pub fn report(&self) -> Vec<String> {
        let Some(layers) = &self.layers else {
            return Vec::new();
        };
        layers.manager().wait_idle();
        let s = layers.stats();
        // Every segment has its copy on the SSD tier: that count is all of them.
        let segments = s
            .tiers
            .iter()
            .find(|t| t.tier == Tier::Ssd)
            .map_or(0, |t| t.objects);
        let mut lines = Vec::new();
        for t in &s.tiers {
            let line =
                match t.tier {
                    Tier::Gpu if !t.available => match self.budgets.gpu {
                        Some(b) => format!("GPU  unavailable (budget {b} ignored: no CUDA)"),
                        None => "GPU  unavailable (no CUDA)".to_string(),
                    },
                    Tier::Ssd => format!(
                        "SSD  {:.1} MiB spill file, {} layers in {} segments",
                        mib(t.used),
                        layers.len(),
                        t.objects
                    ),
                    _ => format!(
                    "{:<4} {:.1} / {:.1} MiB used / budget (peak {:.1} MiB), {} of {} segments kept",
                    if t.tier == Tier::HostRam { "RAM" } else { "GPU" },
                    mib(t.used),
                    mib(t.budget),
                    mib(t.peak),
                    t.objects,
                    segments
                ),
                };
            lines.push(line);
        }
        lines.push(format!(
            "migrations {} up (SSD -> RAM), {} down; layer reads: {} kept in RAM, {} prefetched \
             ({} waited), {} on demand from SSD; {} prefetches skipped for room",
            s.promotions,
            s.demotions,
            s.ram_hits,
            s.prefetch_hits,
            s.prefetch_late,
            s.ssd_hits,
            s.prefetch_skipped
        ));
        lines.push(format!(
            "SSD reads {:.1} MiB at {:.0} MB/s while reading, {:.0} MB/s over {:.2} s",
            mib(s.ssd_read_bytes),
            s.ssd_read_bandwidth() / 1e6,
            s.ssd_read_bytes as f64 / s.elapsed_secs.max(1e-9) / 1e6,
            s.elapsed_secs
        ));
        lines
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The private directory for spill files: `[swapping] swap_directory`, else
/// the default swap directory.
fn spill_directory(config: &Config) -> qvl_model::Result<PathBuf> {
    let dir = config
        .swapping
        .swap_directory
        .clone()
        .unwrap_or_else(config::default_swap_directory);
    config::ensure_private_dir(&dir).map_err(|e| match e {
        crate::RuntimeError::Io { context, source } => ModelError::io(context, source),
        other => ModelError::InvalidInput(format!("spill directory: {other}")),
    })?;
    Ok(dir)
}

/// A tier error as a model error, keeping the I/O cause.
fn tier_error(e: TierError) -> ModelError {
    match e {
        TierError::Io { what, path, source } => {
            ModelError::io(format!("tier: {what} {}", path.display()), source)
        }
        // Bytes that changed on disk are data that cannot be read: an I/O
        // error of kind InvalidData, naming the file and the offset.
        corrupt @ TierError::Corrupt { .. } => ModelError::io(
            "tier: reading layer weights back",
            std::io::Error::new(std::io::ErrorKind::InvalidData, corrupt.to_string()),
        ),
        other => ModelError::InvalidInput(format!("tier manager: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gen_model::{write_llama_gguf, GenModelConfig};
    use qvl_model::ops::Activation;
    use qvl_model::random::{decoder_tensor_shapes, random_weights};
    use qvl_model::text::Logits;
    use qvl_model::{RopeConfig, RopeKind};

    fn tiny_config() -> DecoderConfig {
        DecoderConfig {
            vocab_size: 97,
            hidden_size: 64,
            intermediate_size: 128,
            num_layers: 6,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            rms_norm_eps: 1e-6,
            rope: RopeConfig {
                theta: 10000.0,
                kind: RopeKind::Plain,
            },
            qk_norm: true,
            attention_bias: true,
            tie_word_embeddings: false,
            hidden_act: Activation::Silu,
        }
    }

    /// The tiny decoder's random weights, a spill directory, and the bytes
    /// its layers take on the tier.
    struct TinySetup {
        config: DecoderConfig,
        names: DecoderTensorNames,
        src: qvl_model::MemoryWeights,
        dir: tempfile::TempDir,
        image: u64,
    }

    impl TinySetup {
        fn new() -> TinySetup {
            let config = tiny_config();
            let names = DecoderTensorNames::hugging_face("model", "lm_head.weight");
            let shapes = decoder_tensor_shapes(&config, &names);
            let src = random_weights(&shapes, DType::Bf16, 7).unwrap();
            let dir = tempfile::tempdir().unwrap();
            let mut s = TinySetup {
                config,
                names,
                src,
                dir,
                image: 0,
            };
            s.image = TieredLayers::build(&s.config, &s.src, &s.names, s.tier(u64::MAX))
                .unwrap()
                .image_bytes();
            s
        }

        fn tier(&self, cpu_ram: u64) -> TierConfig {
            TierConfig {
                cpu_ram: ByteSize(cpu_ram),
                spill_dir: Some(self.dir.path().to_path_buf()),
                ..TierConfig::default()
            }
        }
    }

    #[test]
    fn budgeted_decoding_equals_resident_logits_exactly() {
        let t = TinySetup::new();
        let (config, names, src, image) = (&t.config, &t.names, &t.src, t.image);
        let tier = |cpu_ram| t.tier(cpu_ram);
        let resident = TextDecoder::load(config.clone(), src, names).unwrap();
        // Half the layers: one kept copy, the layer in use and one read ahead.
        let budget = image / 2;
        let (streamed, layers) =
            TieredLayers::load_decoder(config.clone(), src, names, tier(budget)).unwrap();
        assert!(streamed.is_streamed());
        let mut a = resident.new_cache();
        let mut b = streamed.new_cache();
        let mut token = 3u32;
        for step in 0..8 {
            let ids = if step == 0 {
                vec![1, 5, 9, token]
            } else {
                vec![token]
            };
            let pos: Vec<[i64; 3]> = (0..ids.len())
                .map(|i| {
                    let p = (a.len() + i) as i64;
                    [p, p, p]
                })
                .collect();
            let la = resident
                .forward(
                    &mut a,
                    resident.embed(&ids).unwrap(),
                    &ids,
                    &pos,
                    None,
                    Logits::Last,
                )
                .unwrap();
            let lb = streamed
                .forward(
                    &mut b,
                    streamed.embed(&ids).unwrap(),
                    &ids,
                    &pos,
                    None,
                    Logits::Last,
                )
                .unwrap();
            assert!(la == lb, "logits differ at step {step}");
            token = la
                .iter()
                .enumerate()
                .max_by(|x, y| x.1.total_cmp(y.1))
                .map(|(i, _)| i as u32)
                .unwrap();
        }
        let s = layers.stats();
        assert!(
            s.ssd_read_bytes > 0 && s.prefetch_hits > 0,
            "{}",
            s.summary()
        );
        assert!(s.tiers[1].peak <= budget, "{}", s.summary());
        // Kept segments fill what the layer in use and the read ahead leave.
        let kept = s.resident_bytes;
        let reserve = layers.largest_image_bytes();
        assert!(kept > 0 && kept + reserve <= budget, "{}", s.summary());
    }

    #[test]
    fn a_damaged_spill_file_fails_the_forward_pass_naming_it() {
        let t = TinySetup::new();
        let (streamed, _layers) =
            TieredLayers::load_decoder(t.config.clone(), &t.src, &t.names, t.tier(t.image / 2))
                .unwrap();
        let spill = std::fs::read_dir(t.dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|x| x == "spill"))
            .expect("a spill file");
        let len = std::fs::metadata(&spill).unwrap().len() as usize;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&spill)
            .unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &vec![0x5a; len], 0).unwrap();
        f.sync_all().unwrap();
        // Every layer has to come back from the damaged file at least once
        // over a few steps: one of them fails the pass, none gives logits.
        let mut cache = streamed.new_cache();
        let mut failure = None;
        for step in 0..4 {
            let ids = [1u32, 5, 9];
            let start = cache.len() as i64;
            let pos: Vec<[i64; 3]> = (0..3).map(|i| [start + i; 3]).collect();
            let hidden = streamed.embed(&ids).unwrap();
            match streamed.forward(&mut cache, hidden, &ids, &pos, None, Logits::Last) {
                Ok(_) => assert!(step < 3, "the damaged spill file was never read"),
                Err(e) => {
                    failure = Some(e.to_string());
                    break;
                }
            }
        }
        let failure = failure.expect("a damaged spill file gave logits");
        assert!(failure.contains("checksum mismatch"), "{failure}");
        assert!(failure.contains(&spill.display().to_string()), "{failure}");
    }

    #[test]
    fn layers_split_into_segments_of_an_eighth_or_more() {
        assert_eq!(
            segments(&[10, 10, 10, 10, 10, 10, 10, 10]),
            [0..1, 1..2, 2..3, 3..4, 4..5, 5..6, 6..7, 7..8]
        );
        // Small tensors join until an eighth of the layer; a short tail
        // joins the run before it.
        assert_eq!(
            segments(&[4, 1, 1, 4, 2, 30, 30, 27, 1]),
            [0..5, 5..6, 6..7, 7..9]
        );
        assert_eq!(segments(&[5]).len(), 1, "one tensor: one segment");
        assert!(segments(&[]).is_empty());
    }

    #[test]
    fn tiering_section_maps_onto_tier_config() {
        let section = TieringConfig {
            enabled: true,
            migration_threshold: 0.55,
            migration_policy: MigrationPolicy::Recency,
            ..TieringConfig::default()
        };
        let t = tier_config(&section).unwrap();
        assert_eq!(t.migration_threshold, 0.55);
        assert_eq!(t.policy, PlacementPolicy::Recency);
        assert_eq!(t.prefetch_depth, RUN_PREFETCH_DEPTH);
        t.validate().unwrap();
        let freq = TieringConfig {
            migration_policy: MigrationPolicy::AccessFrequency,
            ..section.clone()
        };
        assert_eq!(
            tier_config(&freq).unwrap().policy,
            PlacementPolicy::AccessFrequency
        );
        // The defaults of both sides agree.
        let d = tier_config(&TieringConfig::default()).unwrap();
        assert_eq!(
            d.migration_threshold,
            TierConfig::default().migration_threshold
        );
        let off = TieringConfig {
            enabled: false,
            ..section
        };
        assert_eq!(tier_config(&off), None);
    }

    /// A config whose spill files go to `dir`.
    fn config_spilling_to(dir: &Path) -> Config {
        let mut c = Config::default();
        c.swapping.swap_directory = Some(dir.to_path_buf());
        c
    }

    fn greedy(model: &GgufTextModel, steps: usize) -> Vec<u32> {
        let ids = model.prompt_ids("the quick brown fox").unwrap();
        let mut s = model.new_session();
        model
            .generate(&mut s, &ids, steps, false, &mut |_| {})
            .unwrap()
            .tokens
    }

    #[test]
    fn gguf_under_a_ram_budget_generates_the_resident_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gen.gguf");
        let gen = GenModelConfig {
            layers: 6,
            hidden: 128,
            intermediate: 256,
            heads: 4,
            kv_heads: 2,
            dtype: DType::F16,
            seed: 11,
        };
        write_llama_gguf(&path, &gen).unwrap();
        let spill = dir.path().join("spill");
        let config = config_spilling_to(&spill);
        let (resident, plain) =
            WeightTiering::load_gguf(&path, &config, WeightBudgets::default(), None).unwrap();
        assert!(plain.layers().is_none() && plain.report().is_empty());
        assert!(!resident.decoder().is_streamed());
        let want = greedy(&resident, 10);

        // Budgets are fractions of the layer images: measure them first.
        let (_, all) = WeightTiering::load_gguf(
            &path,
            &config,
            WeightBudgets {
                ram: Some(ByteSize::gib(1)),
                gpu: None,
            },
            None,
        )
        .unwrap();
        let budget = all.layers().unwrap().image_bytes() / 4;
        drop(all);
        // A quarter of them, with a GPU budget that is ignored.
        let budgets = WeightBudgets {
            ram: Some(ByteSize(budget)),
            gpu: Some(ByteSize::gib(1)),
        };
        let (streamed, tiering) = WeightTiering::load_gguf(&path, &config, budgets, None).unwrap();
        assert_eq!(greedy(&streamed, 10), want);
        assert!(tiering.notes()[0].contains("GPU tier is unavailable"));
        let s = tiering.layers().unwrap().stats();
        assert!(s.ssd_read_bytes > 0, "{}", s.summary());
        assert!(s.tiers[1].peak <= budget, "{}", s.summary());
        let report = tiering.report().join("\n");
        assert!(
            report.contains("RAM") && report.contains("SSD reads"),
            "{report}"
        );
        // Resident: embedding, lm head and final norm, not the layers.
        let vocab = streamed.decoder().config().vocab_size;
        assert_eq!(streamed.weight_bytes(), (2 * vocab * 128 + 128) * 4);

        // Below one layer: a clear error, not a run over budget.
        let tiny = WeightBudgets {
            ram: Some(ByteSize::kib(64)),
            gpu: None,
        };
        let err = WeightTiering::load_gguf(&path, &config, tiny, None)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("smaller than one decoder layer"), "{err}");

        // The off switch: [tiering] enabled = false keeps the layers resident.
        let mut off = config.clone();
        off.tiering.enabled = false;
        let (m, t) = WeightTiering::load_gguf(&path, &off, budgets, None).unwrap();
        assert!(!m.decoder().is_streamed());
        assert!(t.notes().iter().any(|n| n.contains("enabled = false")));
    }

    #[test]
    fn smollm2_native_blocks_stream_under_a_budget_with_the_resident_tokens() {
        let Some(path) = qvl_model::fetch::find_cached(&qvl_model::fetch::SMOLLM2) else {
            eprintln!(
                "SKIPPED smollm2_native_blocks_stream_under_a_budget_with_the_resident_tokens: \
                 SmolLM2 is not in the models cache; fetch it with `qvl fetch-model smollm2`"
            );
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let config = config_spilling_to(dir.path());
        let native = LoadOptions::new(WeightFormat::Native);
        let (resident, _) =
            WeightTiering::load_gguf_as(&path, &config, WeightBudgets::default(), None, &native)
                .unwrap();
        let want = greedy(&resident, 6);
        drop(resident);
        let budgets = WeightBudgets {
            ram: Some(ByteSize::mib(16)),
            gpu: None,
        };
        let (streamed, tiering) =
            WeightTiering::load_gguf_as(&path, &config, budgets, None, &native).unwrap();
        assert_eq!(greedy(&streamed, 6), want);
        let layers = tiering.layers().unwrap();
        // The file's Q4_1 blocks (and f32 norms): about a sixth of f32.
        assert!(layers.image_bytes() < 100 << 20, "{}", layers.image_bytes());
        let s = layers.stats();
        assert!(
            s.ssd_read_bytes > 0 && s.tiers[1].peak <= 16 << 20,
            "{}",
            s.summary()
        );
    }
}
