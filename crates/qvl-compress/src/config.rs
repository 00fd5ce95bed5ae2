//! The `[compression]` section of the runtime's configuration.

use crate::error::{CompressError, Result};
use qvl_core::TensorKind;
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;

/// A family of codecs the selector may try.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Group-wise integer quantization at each of `quantization_bits`
    /// (KV tensors: the KIVI block codec).
    Quant,
    /// f16 conversion.
    F16,
    /// bf16 conversion.
    Bf16,
    /// Truncated SVD at `svd_rank_ratio` (or `svd_energy`).
    Svd,
    /// Magnitude top-k at `sparse_keep_ratio`.
    Sparse,
}

/// Compression settings. Every field has a default, so an empty section is
/// valid; unknown keys are refused so that typos do not pass silently.
///
/// ```toml
/// [compression]
/// enabled = true
/// methods = ["quant", "f16"]
/// quantization_bits = [4, 8]   # or a single number
/// group_size = 64
/// error_budget = 0.1           # relative Frobenius error allowed
/// critical_layers = [0, -1]    # negative counts from the last layer
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CompressionConfig {
    /// Off: every tensor is stored exact.
    pub enabled: bool,
    /// Codec families to try, in any order (the smallest within budget wins).
    pub methods: Vec<Method>,
    /// Bit widths the `quant` method tries (4 and/or 8).
    #[serde(deserialize_with = "one_or_many")]
    pub quantization_bits: Vec<u32>,
    /// Symmetric quantization (scale only) instead of asymmetric (scale and minimum).
    pub symmetric: bool,
    /// Values per quantization group (even).
    pub group_size: usize,
    /// Fraction of singular values the `svd` method keeps, in (0, 1].
    pub svd_rank_ratio: f64,
    /// If set, `svd` keeps the fewest singular values holding this fraction
    /// of the energy instead of `svd_rank_ratio`.
    pub svd_energy: Option<f64>,
    /// Fraction of values the `sparse` method keeps, in (0, 1].
    pub sparse_keep_ratio: f64,
    /// Largest relative Frobenius error a chosen encoding may have.
    pub error_budget: f64,
    /// Per-kind budgets that override `error_budget` (keys: `kv_cache`, `weight`, ...).
    pub error_budgets: BTreeMap<TensorKind, f64>,
    /// Layers stored exact; negative numbers count from the end (-1 = last).
    pub critical_layers: Vec<i64>,
    /// Dimension of KV block shapes that counts tokens.
    pub kv_token_axis: usize,
    /// First tokens of a sequence kept exact (attention sinks).
    pub kv_sink_tokens: usize,
    /// Most recent tokens kept exact.
    pub kv_recent_tokens: usize,
    /// zstd level of the lossless stage tried over the winner (SSD tier); off if unset.
    pub zstd_level: Option<i32>,
}

impl Default for CompressionConfig {
    fn default() -> Self {
        CompressionConfig {
            enabled: false,
            methods: vec![Method::Quant, Method::F16],
            quantization_bits: vec![4, 8],
            symmetric: false,
            group_size: 64,
            svd_rank_ratio: 0.25,
            svd_energy: None,
            sparse_keep_ratio: 0.1,
            error_budget: 0.1,
            error_budgets: BTreeMap::new(),
            critical_layers: vec![0, -1],
            kv_token_axis: 0,
            kv_sink_tokens: 4,
            kv_recent_tokens: 32,
            zstd_level: None,
        }
    }
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(u32),
        Many(Vec<u32>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(b) => vec![b],
        OneOrMany::Many(v) => v,
    })
}

impl CompressionConfig {
    /// Checks every field's range; the error names the field.
    pub fn validate(&self) -> Result<()> {
        for &b in &self.quantization_bits {
            crate::quant::QuantBits::from_bits(b)?;
        }
        if self.methods.contains(&Method::Quant) && self.quantization_bits.is_empty() {
            return Err(CompressError::config(
                "quantization_bits",
                "empty while methods has quant",
            ));
        }
        if self.group_size < 2 || self.group_size % 2 != 0 || self.group_size > 1 << 16 {
            return Err(CompressError::config(
                "group_size",
                format!("{}: must be even and within 2..=65536", self.group_size),
            ));
        }
        let unit = |field, v: f64| {
            if v > 0.0 && v <= 1.0 {
                Ok(())
            } else {
                Err(CompressError::config(
                    field,
                    format!("{v} is not within (0, 1]"),
                ))
            }
        };
        unit("svd_rank_ratio", self.svd_rank_ratio)?;
        if let Some(e) = self.svd_energy {
            unit("svd_energy", e)?;
        }
        unit("sparse_keep_ratio", self.sparse_keep_ratio)?;
        let budgets =
            std::iter::once(self.error_budget).chain(self.error_budgets.values().copied());
        for b in budgets {
            if !(b >= 0.0 && b.is_finite()) {
                return Err(CompressError::config(
                    "error_budget",
                    format!("{b} is not a finite number >= 0"),
                ));
            }
        }
        if let Some(level) = self.zstd_level {
            if !(-7..=22).contains(&level) {
                return Err(CompressError::config(
                    "zstd_level",
                    format!("{level} is not within -7..=22"),
                ));
            }
        }
        Ok(())
    }

    /// The budget of tensors of `kind`.
    pub fn budget_for(&self, kind: TensorKind) -> f64 {
        self.error_budgets
            .get(&kind)
            .copied()
            .unwrap_or(self.error_budget)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_toml_with_defaults_and_single_bits() {
        let c: CompressionConfig = toml::from_str(
            r#"
            enabled = true
            methods = ["quant", "svd", "sparse", "bf16"]
            quantization_bits = 4
            group_size = 32
            error_budget = 0.05
            critical_layers = [0, 1, -1]
            [error_budgets]
            weight = 0.01
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert!(c.enabled);
        assert_eq!(c.quantization_bits, vec![4]);
        assert_eq!(c.methods.len(), 4);
        assert_eq!(c.budget_for(TensorKind::Weight), 0.01);
        assert_eq!(c.budget_for(TensorKind::KvCache), 0.05);
        assert_eq!(c.kv_sink_tokens, 4);
        let empty: CompressionConfig = toml::from_str("").unwrap();
        assert_eq!(empty, CompressionConfig::default());
        empty.validate().unwrap();
    }

    #[test]
    fn refuses_typos_and_out_of_range_values() {
        assert!(toml::from_str::<CompressionConfig>("enabeld = true").is_err());
        assert!(toml::from_str::<CompressionConfig>("methods = [\"zip\"]").is_err());
        for bad in [
            "quantization_bits = 3",
            "group_size = 7",
            "svd_rank_ratio = 0.0",
            "sparse_keep_ratio = 2.0",
            "error_budget = -1.0",
            "zstd_level = 99",
            "svd_energy = 1.5",
        ] {
            let c: CompressionConfig = toml::from_str(bad).unwrap();
            let err = c.validate().unwrap_err().to_string();
            let field = bad.split(' ').next().unwrap();
            assert!(err.contains(field), "{bad}: {err}");
        }
    }
}
