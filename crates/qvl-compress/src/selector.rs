//! Chooses, per tensor kind and layer, the smallest encoding within the
//! error budget; critical layers stay exact.

use crate::config::{CompressionConfig, Method};
use crate::error::Result;
use crate::float::{ExactF32, HalfFloat};
use crate::kv::{ExactStorage, KvBlockCodec};
use crate::lossless::ZstdStage;
use crate::lowrank::{FactorStorage, LowRank, RankRule};
use crate::quant::{GroupQuant, QuantAxis, QuantBits};
use crate::sparse::SparseTopK;
use qvl_core::{Codec, CodecId, CodecReport, Encoded, MetricEvent, MetricsRecorder, TensorKind};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Keys or values of attention: KIVI quantizes keys per channel and values per token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvPart {
    /// Keys.
    Key,
    /// Values.
    Value,
}

/// What is being encoded: the unit the selector decides for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Target {
    /// Role of the tensor.
    pub kind: TensorKind,
    /// Decoder layer, if any.
    pub layer: Option<u32>,
    /// For KV tensors, keys or values.
    pub kv: Option<KvPart>,
}

impl Target {
    /// A tensor of `kind` in `layer`.
    pub fn new(kind: TensorKind, layer: Option<u32>) -> Self {
        Target {
            kind,
            layer,
            kv: None,
        }
    }

    /// Keys of `layer`'s KV cache.
    pub fn keys(layer: u32) -> Self {
        Target {
            kind: TensorKind::KvCache,
            layer: Some(layer),
            kv: Some(KvPart::Key),
        }
    }

    /// Values of `layer`'s KV cache.
    pub fn values(layer: u32) -> Self {
        Target {
            kind: TensorKind::KvCache,
            layer: Some(layer),
            kv: Some(KvPart::Value),
        }
    }
}

/// One codec the selector tried.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Its name.
    pub name: String,
    /// Its id.
    pub codec: CodecId,
    /// Its ratio and error on the tensor.
    pub report: CodecReport,
    /// Whether its error was within the budget.
    pub within_budget: bool,
}

/// The selector's answer.
#[derive(Clone)]
pub struct Selection {
    /// The chosen encoding.
    pub encoded: Encoded,
    /// The chosen codec (reused for this target until it misses the budget).
    pub codec: Arc<dyn Codec>,
    /// Everything tried, in the order tried; empty when exact was forced.
    pub candidates: Vec<Candidate>,
    /// Why this codec: "disabled", "critical layer", "smallest within budget",
    /// "nothing within budget".
    pub reason: &'static str,
}

impl std::fmt::Debug for Selection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Selection")
            .field("codec", &self.codec.name())
            .field("report", &self.encoded.report)
            .field("candidates", &self.candidates)
            .field("reason", &self.reason)
            .finish()
    }
}

/// Picks encodings under a [`CompressionConfig`] for a model of `num_layers` layers.
pub struct Selector {
    config: CompressionConfig,
    num_layers: u32,
    choices: Mutex<HashMap<Target, Arc<dyn Codec>>>,
    recorder: Option<Arc<dyn MetricsRecorder>>,
}

impl std::fmt::Debug for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Selector")
            .field("config", &self.config)
            .field("num_layers", &self.num_layers)
            .finish()
    }
}

impl Selector {
    /// A selector; fails on an invalid config.
    pub fn new(config: CompressionConfig, num_layers: u32) -> Result<Self> {
        config.validate()?;
        Ok(Selector {
            config,
            num_layers,
            choices: Mutex::new(HashMap::new()),
            recorder: None,
        })
    }

    /// Records a [`MetricEvent::Compress`] (the target's kind, bytes in and
    /// out, relative error) for every encoding [`Selector::select`] and
    /// [`Selector::encode`] return.
    pub fn with_recorder(mut self, recorder: Arc<dyn MetricsRecorder>) -> Self {
        self.recorder = Some(recorder);
        self
    }

    fn record(&self, target: &Target, encoded: &Encoded) {
        if let Some(r) = &self.recorder {
            r.record(&MetricEvent::Compress {
                kind: target.kind,
                input_bytes: encoded.report.input_bytes,
                output_bytes: encoded.report.output_bytes,
                rel_error: encoded.report.rel_frobenius,
            });
        }
    }

    /// Its configuration.
    pub fn config(&self) -> &CompressionConfig {
        &self.config
    }

    /// Whether `layer` is listed in `critical_layers` (negative entries count from the end).
    pub fn is_critical(&self, layer: Option<u32>) -> bool {
        let Some(layer) = layer else { return false };
        self.config.critical_layers.iter().any(|&c| {
            let resolved = if c < 0 { self.num_layers as i64 + c } else { c };
            resolved == layer as i64
        })
    }

    /// The KV block codec for keys or values at `bits`, for callers that
    /// encode paged blocks with [`KvBlockCodec::encode_span`].
    pub fn kv_codec(&self, part: KvPart, bits: u32) -> Result<KvBlockCodec> {
        let axis = match part {
            KvPart::Key => QuantAxis::PerChannel,
            KvPart::Value => QuantAxis::PerToken,
        };
        let inner = GroupQuant::new(
            QuantBits::from_bits(bits)?,
            self.config.symmetric,
            self.config.group_size,
            axis,
        )?;
        Ok(KvBlockCodec {
            inner,
            token_axis: self.config.kv_token_axis,
            sink_tokens: self.config.kv_sink_tokens,
            recent_tokens: self.config.kv_recent_tokens,
            exact: ExactStorage::F32,
        })
    }

    /// The codecs tried for `target`, built from the config.
    pub fn candidates(&self, target: &Target) -> Result<Vec<Arc<dyn Codec>>> {
        let c = &self.config;
        let mut out: Vec<Arc<dyn Codec>> = Vec::new();
        for method in &c.methods {
            match method {
                Method::Quant => {
                    for &bits in &c.quantization_bits {
                        if target.kind == TensorKind::KvCache {
                            out.push(Arc::new(
                                self.kv_codec(target.kv.unwrap_or(KvPart::Value), bits)?,
                            ));
                        } else {
                            out.push(Arc::new(GroupQuant::new(
                                QuantBits::from_bits(bits)?,
                                c.symmetric,
                                c.group_size,
                                QuantAxis::PerToken,
                            )?));
                        }
                    }
                }
                Method::F16 => out.push(Arc::new(HalfFloat::f16())),
                Method::Bf16 => out.push(Arc::new(HalfFloat::bf16())),
                Method::Svd => {
                    let rule = match c.svd_energy {
                        Some(e) => RankRule::Energy(e),
                        None => RankRule::Ratio(c.svd_rank_ratio),
                    };
                    out.push(Arc::new(LowRank::new(rule, FactorStorage::F16)?));
                }
                Method::Sparse => out.push(Arc::new(SparseTopK::new(c.sparse_keep_ratio)?)),
            }
        }
        Ok(out)
    }

    /// Tries every candidate on `values` and returns the smallest encoding
    /// within the budget (exact if none is, or if the layer is critical or
    /// compression is disabled). Remembers the choice for `target`.
    pub fn select(
        &self,
        target: Target,
        values: &[f32],
        shape: &[usize],
    ) -> qvl_core::Result<Selection> {
        let exact = |reason| -> qvl_core::Result<Selection> {
            let encoded = ExactF32.encode(values, shape)?;
            self.record(&target, &encoded);
            Ok(Selection {
                encoded,
                codec: Arc::new(ExactF32),
                candidates: Vec::new(),
                reason,
            })
        };
        if !self.config.enabled {
            return exact("disabled");
        }
        if self.is_critical(target.layer) {
            return exact("critical layer");
        }
        let budget = self.config.budget_for(target.kind);
        let mut candidates = Vec::new();
        let mut best: Option<(Arc<dyn Codec>, Encoded)> = None;
        for codec in self.candidates(&target)? {
            let encoded = codec.encode(values, shape)?;
            let within_budget = encoded.report.rel_frobenius <= budget;
            candidates.push(Candidate {
                name: codec.name(),
                codec: codec.id(),
                report: encoded.report,
                within_budget,
            });
            let smaller = best
                .as_ref()
                .is_none_or(|(_, b)| encoded.bytes.len() < b.bytes.len());
            if within_budget && smaller {
                best = Some((codec, encoded));
            }
        }
        let (reason, mut codec, mut encoded): (_, Arc<dyn Codec>, _) = match best {
            Some((codec, encoded)) => ("smallest within budget", codec, encoded),
            None => (
                "nothing within budget",
                Arc::new(ExactF32),
                ExactF32.encode(values, shape)?,
            ),
        };
        if let Some(level) = self.config.zstd_level {
            let z: Arc<dyn Codec> = Arc::new(ZstdStage::new(codec.clone(), level)?);
            let ze = z.encode(values, shape)?;
            candidates.push(Candidate {
                name: z.name(),
                codec: z.id(),
                report: ze.report,
                within_budget: ze.report.rel_frobenius <= budget,
            });
            if ze.bytes.len() < encoded.bytes.len() {
                codec = z;
                encoded = ze;
            }
        }
        self.remember(target, codec.clone());
        self.record(&target, &encoded);
        Ok(Selection {
            encoded,
            codec,
            candidates,
            reason,
        })
    }

    /// Encodes with the codec chosen earlier for `target`, choosing anew when
    /// there is none or when its error on these values exceeds the budget.
    pub fn encode(
        &self,
        target: Target,
        values: &[f32],
        shape: &[usize],
    ) -> qvl_core::Result<Encoded> {
        let chosen = self.chosen(&target);
        if let Some(codec) = chosen {
            let encoded = codec.encode(values, shape)?;
            if encoded.report.rel_frobenius <= self.config.budget_for(target.kind)
                || codec.is_lossless()
            {
                self.record(&target, &encoded);
                return Ok(encoded);
            }
        }
        Ok(self.select(target, values, shape)?.encoded)
    }

    /// The codec chosen for `target` so far.
    pub fn chosen(&self, target: &Target) -> Option<Arc<dyn Codec>> {
        // A poisoned lock only means another thread panicked mid-insert; the map is still valid.
        let map = self.choices.lock().unwrap_or_else(|p| p.into_inner());
        map.get(target).cloned()
    }

    fn remember(&self, target: Target, codec: Arc<dyn Codec>) {
        let mut map = self.choices.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(target, codec);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids;

    /// Noise (full rank, dense) with one outlier channel, like keys.
    fn kv_data(tokens: usize, channels: usize) -> Vec<f32> {
        let mut state = 0x9e37_79b9u32;
        (0..tokens * channels)
            .map(|i| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                let noise = state as f32 / u32::MAX as f32 * 2.0 - 1.0;
                noise + if i % channels == 5 { 10.0 } else { 0.0 }
            })
            .collect()
    }

    fn config(budget: f64) -> CompressionConfig {
        CompressionConfig {
            enabled: true,
            error_budget: budget,
            methods: vec![Method::Quant, Method::F16, Method::Svd, Method::Sparse],
            ..Default::default()
        }
    }

    #[test]
    fn picks_the_smallest_within_budget() {
        let x = kv_data(256, 64);
        let shape = [256, 64];
        // Generous budget: int4 (smallest) wins.
        let s = Selector::new(config(0.2), 24).unwrap();
        let sel = s.select(Target::keys(5), &x, &shape).unwrap();
        assert_eq!(sel.reason, "smallest within budget");
        assert_eq!(sel.encoded.codec, ids::KV_BLOCK);
        assert!(sel.codec.name().contains("int4"), "{}", sel.codec.name());
        assert_eq!(sel.candidates.len(), 5);
        // Tight budget: int8 is the smallest that fits.
        let s = Selector::new(config(0.01), 24).unwrap();
        let sel = s.select(Target::keys(5), &x, &shape).unwrap();
        assert!(sel.codec.name().contains("int8"), "{}", sel.codec.name());
        // Tighter than int8: f16.
        let s = Selector::new(config(1e-3), 24).unwrap();
        let sel = s.select(Target::values(5), &x, &shape).unwrap();
        assert_eq!(sel.encoded.codec, ids::F16);
        // Nothing fits a zero budget: exact.
        let s = Selector::new(config(0.0), 24).unwrap();
        let sel = s.select(Target::values(5), &x, &shape).unwrap();
        assert_eq!(sel.reason, "nothing within budget");
        assert_eq!(sel.encoded.codec, ids::EXACT_F32);
        // Every candidate reported an honest error.
        for c in &sel.candidates {
            assert!(!c.within_budget && c.report.rel_frobenius > 0.0, "{c:?}");
        }
    }

    #[test]
    fn records_a_compress_event_per_encoding() {
        #[derive(Default)]
        struct Collect(Mutex<Vec<MetricEvent>>);
        impl MetricsRecorder for Collect {
            fn record(&self, e: &MetricEvent) {
                self.0.lock().unwrap().push(*e);
            }
        }
        let x = kv_data(256, 64);
        let shape = [256, 64];
        let events = Arc::new(Collect::default());
        let s = Selector::new(config(0.2), 24)
            .unwrap()
            .with_recorder(events.clone());
        let sel = s.select(Target::keys(5), &x, &shape).unwrap();
        let again = s.encode(Target::keys(5), &x, &shape).unwrap();
        s.select(Target::keys(0), &x, &shape).unwrap();
        let got = events.0.lock().unwrap().clone();
        assert_eq!(got.len(), 3, "{got:?}");
        let want = |e: &Encoded| MetricEvent::Compress {
            kind: TensorKind::KvCache,
            input_bytes: e.report.input_bytes,
            output_bytes: e.report.output_bytes,
            rel_error: e.report.rel_frobenius,
        };
        assert_eq!(got[0], want(&sel.encoded));
        assert_eq!(got[1], want(&again));
        // The critical layer: exact, no error, no saving.
        assert!(matches!(got[2], MetricEvent::Compress { rel_error, .. } if rel_error == 0.0));
    }

    #[test]
    fn critical_layers_and_disabled_stay_exact() {
        let x = kv_data(64, 16);
        let s = Selector::new(config(0.2), 24).unwrap();
        assert!(s.is_critical(Some(0)) && s.is_critical(Some(23)) && !s.is_critical(Some(22)));
        for layer in [0, 23] {
            let sel = s.select(Target::keys(layer), &x, &[64, 16]).unwrap();
            assert_eq!(sel.reason, "critical layer");
            assert_eq!(sel.encoded.codec, ids::EXACT_F32);
            let mut out = vec![0f32; x.len()];
            sel.codec
                .decode(&sel.encoded.bytes, &[64, 16], &mut out)
                .unwrap();
            assert_eq!(out, x);
        }
        let off = Selector::new(CompressionConfig::default(), 24).unwrap();
        assert_eq!(
            off.select(Target::keys(3), &x, &[64, 16]).unwrap().reason,
            "disabled"
        );
    }

    #[test]
    fn remembers_choices_per_kind_and_layer_and_reselects_on_miss() {
        let s = Selector::new(
            CompressionConfig {
                error_budgets: [(TensorKind::Weight, 0.01)].into_iter().collect(),
                ..config(0.2)
            },
            24,
        )
        .unwrap();
        let x = kv_data(256, 64);
        let w = s
            .encode(Target::new(TensorKind::Weight, Some(3)), &x, &[256, 64])
            .unwrap();
        let k = s.encode(Target::keys(3), &x, &[256, 64]).unwrap();
        assert_eq!(w.codec, ids::INT8, "weights have the tighter budget");
        assert_eq!(k.codec, ids::KV_BLOCK);
        assert!(s
            .chosen(&Target::new(TensorKind::Weight, Some(3)))
            .is_some());
        assert!(s
            .chosen(&Target::new(TensorKind::Weight, Some(4)))
            .is_none());
        // A tensor the remembered int8 cannot fit within budget: chosen anew.
        let spiky: Vec<f32> = (0..4096)
            .map(|i| {
                if i % 64 == 0 {
                    1e4
                } else {
                    (i % 7) as f32 * 1e-3
                }
            })
            .collect();
        let e = s
            .encode(Target::new(TensorKind::Weight, Some(3)), &spiky, &[64, 64])
            .unwrap();
        assert!(e.report.rel_frobenius <= 0.01);
    }

    #[test]
    fn zstd_stage_is_kept_only_when_smaller() {
        let s = Selector::new(
            CompressionConfig {
                zstd_level: Some(3),
                methods: vec![Method::F16],
                ..config(0.01)
            },
            24,
        )
        .unwrap();
        let repetitive: Vec<f32> = (0..4096).map(|i| (i % 4) as f32).collect();
        let sel = s
            .select(
                Target::new(TensorKind::Activation, None),
                &repetitive,
                &[4096],
            )
            .unwrap();
        assert_eq!(sel.encoded.codec, ids::ZSTD);
        let mut out = vec![0f32; 4096];
        crate::decode_any(&sel.encoded.bytes, &[4096], &mut out).unwrap();
        assert_eq!(out, repetitive);
    }
}
