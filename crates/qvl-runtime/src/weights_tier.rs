//! Decoder weights streamed under a RAM budget: the adapter between
//! `qvl-tier` and the model.
//!
//! [`TieredLayers::build`] copies every decoder layer's tensors, as the
//! source serves them, into one image per layer on the tier manager's SSD
//! tier (its spill file), then drops them from RAM. As a
//! [`LayerProvider`], it gives the decoder layer `i` from the RAM copy, a
//! prefetched buffer or a read from the SSD, and asks the manager to read
//! the next non-resident layer ahead while layer `i` computes. The layers
//! are rebuilt over the tier's bytes without copying the matrices, so a
//! streamed forward pass computes exactly what the resident one does.

use qvl_core::{DType, TensorKind};
use qvl_model::checkpoint::WeightSource;
use qvl_model::tensor::{ByteOwner, Bytes, StoredTensor};
use qvl_model::text::{DecoderLayer, DecoderTensorNames, LayerProvider, TextDecoder};
use qvl_model::{DecoderConfig, ModelError};
use qvl_tier::{ObjectId, Resident, TierConfig, TierError, TierManager, TierStats};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Where a tensor sits inside its layer's image.
#[derive(Debug, Clone)]
struct TensorEntry {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    offset: usize,
    len: usize,
}

/// Decoder layers held by a [`TierManager`], served to the decoder on demand.
pub struct TieredLayers {
    manager: TierManager,
    order: Vec<ObjectId>,
    tables: Vec<Vec<TensorEntry>>,
    config: DecoderConfig,
    names: DecoderTensorNames,
    weight_bytes: usize,
    /// Layers built over kept RAM copies, reused while the copy stays
    /// kept (keyed by the copy's address); dropped once it is demoted so
    /// the cache never holds bytes the tier has let go.
    built: Mutex<Vec<Option<BuiltLayer>>>,
}

/// A layer built over a kept copy, with the copy's address.
type BuiltLayer = (usize, Arc<DecoderLayer>);

/// Tensor images start on this boundary inside a layer image.
const TENSOR_ALIGN: usize = 64;

impl TieredLayers {
    /// Moves the layers of `config` from `src` onto a new tier manager.
    pub fn build(
        config: &DecoderConfig,
        src: &dyn WeightSource,
        names: &DecoderTensorNames,
        tier: TierConfig,
    ) -> qvl_model::Result<TieredLayers> {
        let manager = TierManager::new(tier).map_err(tier_error)?;
        let mut order = Vec::with_capacity(config.num_layers);
        let mut tables = Vec::with_capacity(config.num_layers);
        let mut weight_bytes = 0;
        for index in 0..config.num_layers {
            let mut image = Vec::new();
            let mut table = Vec::new();
            for name in DecoderLayer::tensor_names(config, names, index) {
                let t = src
                    .tensor(&name)?
                    .ok_or_else(|| ModelError::MissingTensor {
                        name: name.clone(),
                        source_desc: src.describe(),
                    })?;
                image.resize(image.len().next_multiple_of(TENSOR_ALIGN), 0);
                table.push(TensorEntry {
                    name,
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    offset: image.len(),
                    len: t.bytes.len(),
                });
                image.extend_from_slice(t.bytes.as_slice());
            }
            // Validates shapes now, not on the first token.
            let layer = DecoderLayer::load(
                config,
                &LayerImage::new(&table, image.clone())?,
                names,
                index,
            )?;
            weight_bytes += layer.weight_bytes();
            drop(layer);
            order.push(
                manager
                    .insert(TensorKind::Weight, &image)
                    .map_err(tier_error)?,
            );
            tables.push(table);
        }
        manager.flush().map_err(tier_error)?;
        Ok(TieredLayers {
            manager,
            order,
            tables,
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

    /// Number of layers.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether there is no layer.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

impl LayerProvider for TieredLayers {
    fn layer(&self, index: usize) -> qvl_model::Result<Arc<DecoderLayer>> {
        let (Some(&id), Some(table)) = (self.order.get(index), self.tables.get(index)) else {
            return Err(ModelError::InvalidInput(format!(
                "layer {index} asked of a tier with {} layers",
                self.order.len()
            )));
        };
        let bytes = self.manager.get(id).map_err(tier_error)?;
        self.manager
            .prefetch_after(&self.order, index)
            .map_err(tier_error)?;
        let key = Arc::as_ptr(&bytes) as *const u8 as usize;
        let kept = self.manager.is_resident(id).map_err(tier_error)?;
        // The cache holds no tensor of its own: poison cannot leave it invalid.
        let mut built = self.built.lock().unwrap_or_else(|p| p.into_inner());
        if index == 0 {
            for (slot, &other) in built.iter_mut().zip(&self.order) {
                if slot.is_some() && !self.manager.is_resident(other).map_err(tier_error)? {
                    *slot = None;
                }
            }
        }
        if kept {
            if let Some((k, layer)) = &built[index] {
                if *k == key {
                    return Ok(layer.clone());
                }
            }
        }
        let image = LayerImage::over(table, Arc::new(TierBytes(bytes)))?;
        let layer = Arc::new(DecoderLayer::load(
            &self.config,
            &image,
            &self.names,
            index,
        )?);
        built[index] = kept.then(|| (key, layer.clone()));
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
    fn new(table: &[TensorEntry], image: Vec<u8>) -> qvl_model::Result<LayerImage> {
        Self::over(table, Arc::new(image))
    }

    fn over(table: &[TensorEntry], owner: Arc<dyn ByteOwner>) -> qvl_model::Result<LayerImage> {
        let mut tensors = HashMap::with_capacity(table.len());
        for e in table {
            let bytes = Bytes::new(owner.clone(), e.offset, e.len).ok_or_else(|| {
                ModelError::InvalidInput(format!(
                    "tensor {:?} at {}..{} runs past its layer image of {} bytes",
                    e.name,
                    e.offset,
                    e.offset + e.len,
                    owner.bytes().len()
                ))
            })?;
            let t = StoredTensor::new(e.name.clone(), e.dtype, e.shape.clone(), bytes)?;
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

/// A tier error as a model error, keeping the I/O cause.
fn tier_error(e: TierError) -> ModelError {
    match e {
        TierError::Io { what, path, source } => {
            ModelError::io(format!("tier: {what} {}", path.display()), source)
        }
        other => ModelError::InvalidInput(format!("tier manager: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qvl_core::ByteSize;
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

    #[test]
    fn budgeted_decoding_equals_resident_logits_exactly() {
        let config = tiny_config();
        let names = DecoderTensorNames::hugging_face("model", "lm_head.weight");
        let shapes = decoder_tensor_shapes(&config, &names);
        let src = random_weights(&shapes, DType::Bf16, 7).unwrap();
        let resident = TextDecoder::load(config.clone(), &src, &names).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let tier = |cpu_ram: u64| TierConfig {
            cpu_ram: ByteSize(cpu_ram),
            spill_dir: Some(dir.path().to_path_buf()),
            ..TierConfig::default()
        };
        let image = TieredLayers::build(&config, &src, &names, tier(u64::MAX))
            .unwrap()
            .image_bytes();
        // Half the layers: one kept copy, the layer in use and one read ahead.
        let budget = image / 2;
        let (streamed, layers) =
            TieredLayers::load_decoder(config.clone(), &src, &names, tier(budget)).unwrap();
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
        assert_eq!(s.tiers[1].objects, 1, "{}", s.summary());
    }
}
