//! Configuration of the pools: the `[pool]` table of the runtime's config.

use crate::PoolError;
use qvl_core::{ByteSize, DType, TensorKind, TensorMeta};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Settings of a [`crate::HostPool`].
///
/// ```toml
/// [pool]
/// enabled = true
/// max_pool_size = "4GiB"
///
/// [pool.specialized_pools.kv_cache]
/// kind = "kv_cache"
/// shape = [2, 16, 8, 128]   # k and v, 16 tokens, 8 kv heads, head_dim 128
/// dtype = "f16"
/// initial = 256
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    /// Off: every buffer comes straight from the system allocator, as with
    /// [`qvl_core::SystemAllocator`].
    pub enabled: bool,
    /// The most memory the pool holds from the OS, live and cached together.
    /// Requests past it are served by the system allocator instead.
    pub max_pool_size: ByteSize,
    /// Fixed-size slab pools, by name, for tensors of one kind and shape.
    pub specialized_pools: BTreeMap<String, SpecializedPoolConfig>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            enabled: true,
            max_pool_size: ByteSize::gib(8),
            specialized_pools: BTreeMap::new(),
        }
    }
}

impl PoolConfig {
    /// Checks every specialized pool; the error names the pool and the field.
    pub fn validate(&self) -> Result<(), PoolError> {
        for (name, pool) in &self.specialized_pools {
            pool.slot_bytes(name)?;
        }
        Ok(())
    }
}

/// One specialized pool: slots for tensors of one kind, shape and type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecializedPoolConfig {
    /// Role of the tensors ("kv_cache", "activation", ...).
    pub kind: TensorKind,
    /// Their shape, outermost first.
    pub shape: Vec<usize>,
    /// Their element type.
    pub dtype: DType,
    /// Slots made when the pool is built; they are kept when memory is
    /// released. More are added as needed.
    #[serde(default, alias = "count")]
    pub initial: usize,
}

impl SpecializedPoolConfig {
    /// A pool for tensors like `meta`, with `initial` slots made up front.
    pub fn for_tensor(meta: &TensorMeta, initial: usize) -> Self {
        SpecializedPoolConfig {
            kind: meta.kind,
            shape: meta.shape.clone(),
            dtype: meta.dtype,
            initial,
        }
    }

    /// Bytes of one tensor; an error naming the pool when the shape is
    /// empty, has a zero dimension or overflows.
    pub fn slot_bytes(&self, name: &str) -> Result<usize, PoolError> {
        let invalid = |reason: String| PoolError::InvalidConfig {
            pool: name.to_string(),
            reason,
        };
        if self.shape.is_empty() {
            return Err(invalid(
                "shape is empty; give the tensor's dimensions".into(),
            ));
        }
        if let Some(i) = self.shape.iter().position(|&d| d == 0) {
            return Err(invalid(format!(
                "shape {:?} has a zero dimension at index {i}",
                self.shape
            )));
        }
        let elements = self
            .shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .and_then(|e| e.checked_mul(self.dtype.bits()))
            .ok_or_else(|| invalid(format!("shape {:?} is too large", self.shape)))?;
        Ok(elements.div_ceil(8))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_from_toml_with_defaults() {
        let text = r#"
            max_pool_size = "2GiB"
            [specialized_pools.kv_cache]
            kind = "kv_cache"
            shape = [2, 16, 8, 128]
            dtype = "f16"
            count = 64
            [specialized_pools.attention_weights]
            kind = "weight"
            shape = [2048, 2048]
            dtype = "bf16"
        "#;
        let c: PoolConfig = toml::from_str(text).unwrap();
        assert!(c.enabled);
        assert_eq!(c.max_pool_size, ByteSize::gib(2));
        let kv = &c.specialized_pools["kv_cache"];
        assert_eq!(kv.initial, 64);
        assert_eq!(kv.slot_bytes("kv_cache").unwrap(), 64 << 10);
        assert_eq!(c.specialized_pools["attention_weights"].initial, 0);
        c.validate().unwrap();
        assert_eq!(
            toml::from_str::<PoolConfig>("").unwrap(),
            PoolConfig::default()
        );
    }

    #[test]
    fn bad_pools_are_named() {
        let text = r#"
            [specialized_pools.kv]
            kind = "kv_cache"
            shape = [16, 0]
            dtype = "f16"
        "#;
        let c: PoolConfig = toml::from_str(text).unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert_eq!(
            err,
            "pool.specialized_pools.kv: shape [16, 0] has a zero dimension at index 1"
        );
        let err = toml::from_str::<PoolConfig>("max_pool_sise = \"1GiB\"").unwrap_err();
        assert!(err.to_string().contains("max_pool_sise"), "{err}");
        let err = toml::from_str::<PoolConfig>("max_pool_size = \"1GB2\"").unwrap_err();
        assert!(err.to_string().contains("1GB2"), "{err}");
    }
}
