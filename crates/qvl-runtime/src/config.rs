//! The qvl configuration: the plan's sections, layered with figment.
//!
//! Layers, lowest first: built-in defaults ([`Config::default`]), a TOML file
//! (`--config`), environment variables `QVL_<SECTION>__<KEY>` (for example
//! `QVL_SWAPPING__MEMORY_THRESHOLD=0.9`). Every problem is reported with the
//! dotted key, the source it came from and what is allowed.

use crate::error::{Result, RuntimeError};
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use qvl_core::{ByteSize, DType, TensorKind};
use schemars::JsonSchema;
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Prefix of the environment variables that override config keys.
pub const ENV_PREFIX: &str = "QVL_";

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Phase 1: pools for tensor buffers.
    pub memory_pooling: PoolingConfig,
    /// Phase 2: the hierarchical cache.
    pub caching: CachingConfig,
    /// Phase 3: adaptive compression.
    pub compression: CompressionConfig,
    /// Phase 4: KV-cache swapping to SSD.
    pub swapping: SwappingConfig,
    /// Phase 5: tiering and migration.
    pub tiering: TieringConfig,
    /// Phase 6: garbage collection.
    pub garbage_collection: GcConfig,
    /// What the machine offers.
    pub hardware: HardwareConfig,
    /// The metrics collector and the dashboard (`qvl run --dashboard`).
    pub metrics: qvl_metrics::MetricsConfig,
}

/// `[memory_pooling]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct PoolingConfig {
    /// Off: every buffer comes from the system allocator.
    pub enabled: bool,
    /// Upper bound on memory the pools keep cached for reuse.
    pub max_pool_size: ByteSize,
    /// Pools of fixed-size slabs for tensors of one kind and shape, by name.
    pub specialized_pools: BTreeMap<String, SpecializedPool>,
    /// The pool's own time (KV block takes and returns) as a share of decode
    /// step time above which the phase is switched off mid-run, in (0, 1].
    pub overhead_budget: f64,
}

impl Default for PoolingConfig {
    fn default() -> Self {
        let mut specialized_pools = BTreeMap::new();
        // A Qwen3-VL-2B attention projection (hidden 2048, f16).
        specialized_pools.insert(
            "attention_weights".to_string(),
            SpecializedPool {
                kind: TensorKind::Weight,
                shape: vec![2048, 2048],
                dtype: DType::F16,
                initial_count: 0,
            },
        );
        // One paged KV block of Qwen3-VL-2B: 16 tokens x 8 KV heads x 128, K and V.
        specialized_pools.insert(
            "kv_cache".to_string(),
            SpecializedPool {
                kind: TensorKind::KvCache,
                shape: vec![2, 16, 8, 128],
                dtype: DType::F16,
                initial_count: 64,
            },
        );
        PoolingConfig {
            enabled: true,
            max_pool_size: ByteSize::gib(2),
            specialized_pools,
            overhead_budget: 0.05,
        }
    }
}

/// One `[memory_pooling.specialized_pools.<name>]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SpecializedPool {
    /// Which tensors it serves.
    pub kind: TensorKind,
    /// Shape of each slab's tensor.
    pub shape: Vec<usize>,
    /// Element type.
    pub dtype: DType,
    /// Slabs made at start-up (the pool grows past it on demand).
    #[serde(default)]
    pub initial_count: usize,
}

/// Eviction policies of the cache levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CachePolicy {
    /// Least recently used.
    Lru,
    /// Least frequently used.
    Lfu,
    /// Adaptive replacement cache.
    Arc,
    /// Small and main FIFO queues with a ghost queue.
    S3Fifo,
    /// Learns from prefix structure, reuse distance and frequency.
    Predictive,
    /// Online-trained model of reuse within a window (LRB-style).
    Learned,
}

/// `[caching]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct CachingConfig {
    /// Off: blocks are recomputed or fetched on every miss.
    pub enabled: bool,
    /// L1 capacity, GPU memory (not used by `qvl run` in this build: no
    /// CUDA store).
    pub gpu_cache_size: ByteSize,
    /// L2 capacity, host RAM: what holds prefix blocks in `qvl run`.
    pub cpu_cache_size: ByteSize,
    /// L3 capacity, SSD (not used by `qvl run` yet: its prefix cache has no
    /// SSD level; `qvl cache replay --tiers` and `TieredCache::from_config`
    /// use it).
    pub ssd_cache_size: ByteSize,
    /// How each level picks victims.
    pub eviction_policy: CachePolicy,
    /// The prefix cache's own time (lookups, block imports and exports) as a
    /// share of the request's time above which the phase is switched off for
    /// the following requests, in (0, 1].
    pub overhead_budget: f64,
}

impl Default for CachingConfig {
    fn default() -> Self {
        CachingConfig {
            enabled: true,
            gpu_cache_size: ByteSize::gib(1),
            cpu_cache_size: ByteSize::gib(2),
            ssd_cache_size: ByteSize::gib(16),
            eviction_policy: CachePolicy::Predictive,
            overhead_budget: 0.1,
        }
    }
}

/// Compression methods the selector may choose from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CompressionMethod {
    /// Group-wise int8/int4 quantization.
    Quantization,
    /// Low rank by truncated SVD.
    Svd,
    /// Magnitude top-k in CSR.
    Sparse,
    /// zstd over the encoded bytes.
    Lossless,
}

/// `[compression]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct CompressionConfig {
    /// Off: tensors are stored in their own dtype.
    pub enabled: bool,
    /// Methods the selector may use.
    pub methods: Vec<CompressionMethod>,
    /// Bits per quantized value: 4 or 8.
    pub quantization_bits: u8,
    /// Rank kept by SVD as a share of the full rank, in (0, 1].
    pub svd_rank_ratio: f64,
    /// Largest relative Frobenius error a chosen encoding may have.
    pub error_budget: f64,
    /// Time spent encoding and decoding KV blocks as a share of decode step
    /// time above which the KV cache goes back to f32 mid-run, in (0, 1].
    pub overhead_budget: f64,
}

impl Default for CompressionConfig {
    fn default() -> Self {
        CompressionConfig {
            enabled: true,
            methods: vec![CompressionMethod::Quantization, CompressionMethod::Lossless],
            quantization_bits: 8,
            svd_rank_ratio: 0.25,
            error_budget: 0.01,
            overhead_budget: 0.5,
        }
    }
}

/// Victim choice of the swap space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SwapPolicy {
    /// Least recently used blocks go first.
    Lru,
    /// Least frequently used blocks go first.
    Lfu,
}

/// `[swapping]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct SwappingConfig {
    /// Off: the KV cache stays in RAM, and a context that does not fit fails.
    pub enabled: bool,
    /// Share of the KV budget above which blocks are swapped out, in [0, 1].
    pub memory_threshold: f64,
    /// Where swap files go. Unset: a private directory under the user's
    /// runtime or cache directory (see [`default_swap_directory`]).
    pub swap_directory: Option<PathBuf>,
    /// Which blocks leave RAM first.
    pub eviction_policy: SwapPolicy,
    /// Time spent in the swapping KV storage (writes out, waits for reads) as a
    /// share of decode step time above which swapping is switched off mid-run
    /// (the blocks come back to RAM), in (0, 1].
    pub overhead_budget: f64,
}

impl Default for SwappingConfig {
    fn default() -> Self {
        SwappingConfig {
            enabled: true,
            memory_threshold: 0.8,
            swap_directory: None,
            eviction_policy: SwapPolicy::Lru,
            overhead_budget: 0.5,
        }
    }
}

/// What decides migrations between tiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MigrationPolicy {
    /// Decayed access counts: hot objects move up, cold ones down.
    AccessFrequency,
    /// Time since last access only.
    Recency,
}

/// `[tiering]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct TieringConfig {
    /// Off: everything stays where it was loaded.
    pub enabled: bool,
    /// Hotness score, in [0, 1], above which an object moves to a faster tier.
    pub migration_threshold: f64,
    /// How hotness is measured.
    pub migration_policy: MigrationPolicy,
    /// Time spent waiting for streamed layer weights as a share of decode step
    /// time above which tiering is reported over budget, in (0, 1].
    pub overhead_budget: f64,
}

impl Default for TieringConfig {
    fn default() -> Self {
        TieringConfig {
            enabled: true,
            migration_threshold: 0.7,
            migration_policy: MigrationPolicy::AccessFrequency,
            overhead_budget: 0.9,
        }
    }
}

/// `[garbage_collection]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct GcConfig {
    /// Off: memory is released only when tensors are dropped.
    pub enabled: bool,
    /// Time between collections (the start value when adaptive).
    pub collection_interval: HumanDuration,
    /// Let memory pressure and allocation rate set the interval.
    pub adaptive_enabled: bool,
    /// Collector pause time as a share of decode step time above which
    /// collection is switched off mid-run, in (0, 1].
    pub overhead_budget: f64,
}

impl Default for GcConfig {
    fn default() -> Self {
        GcConfig {
            enabled: true,
            collection_interval: HumanDuration(Duration::from_millis(100)),
            adaptive_enabled: true,
            overhead_budget: 0.05,
        }
    }
}

/// Where to compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Device {
    /// CUDA when a driver and a GPU are present, else CPU.
    Auto,
    /// CPU only.
    Cpu,
    /// CUDA; an error when unavailable.
    Cuda,
}

/// `[hardware]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct HardwareConfig {
    /// Where to compute.
    pub device: Device,
    /// CPU threads for matmuls; 0 means one per logical core.
    pub threads: usize,
    /// GPU memory qvl may use; unset: what the driver reports free.
    pub gpu_memory: Option<ByteSize>,
    /// Host RAM qvl may use; unset: what the OS reports available.
    pub ram: Option<ByteSize>,
}

impl Default for HardwareConfig {
    fn default() -> Self {
        HardwareConfig {
            device: Device::Auto,
            threads: 0,
            gpu_memory: None,
            ram: None,
        }
    }
}

/// A duration written with a unit: "250ms", "2s", "1.5s", "1m".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl std::str::FromStr for HumanDuration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (number, unit) = (&t[..split], t[split..].trim());
        let value: f64 = number.parse().map_err(|_| {
            format!("invalid duration {s:?}: expected a number with a unit, such as \"100ms\"")
        })?;
        let seconds = match unit {
            "ms" => value / 1e3,
            "s" => value,
            "m" | "min" => value * 60.0,
            "" => return Err(format!("duration {s:?} needs a unit: ms, s or m")),
            other => {
                return Err(format!(
                    "unknown duration unit {other:?} in {s:?}: use ms, s or m"
                ))
            }
        };
        Ok(HumanDuration(Duration::from_secs_f64(seconds)))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms % 1000 == 0 && ms > 0 {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

impl JsonSchema for HumanDuration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "HumanDuration".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "A duration with a unit: ms, s or m (\"250ms\", \"2s\", \"1.5s\").",
            "examples": ["100ms", "2s"]
        })
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

/// Where a config comes from: the file (if any) and whether to read the environment.
#[derive(Debug, Clone, Default)]
pub struct ConfigSources {
    /// A TOML file; it must exist.
    pub file: Option<PathBuf>,
    /// Whether `QVL_<SECTION>__<KEY>` variables override the file.
    pub use_env: bool,
}

/// A loaded configuration and the figment it came from, for provenance.
pub struct LoadedConfig {
    /// The merged, validated configuration.
    pub config: Config,
    figment: Figment,
}

impl LoadedConfig {
    /// Where the value at dotted `key` came from: "default", a file path, or
    /// an environment variable name.
    pub fn source_of(&self, key: &str) -> String {
        origin_name(&self.figment, key).unwrap_or_else(|| "default".to_string())
    }

    /// Every leaf of the configuration as (dotted key, TOML value, source),
    /// in section order.
    pub fn entries(&self) -> Vec<(String, String, String)> {
        let mut out = Vec::new();
        // Serializing our own plain structs to JSON cannot fail.
        let value = serde_json::to_value(&self.config).unwrap_or_default();
        flatten(&value, String::new(), &mut out);
        out.into_iter()
            .map(|(key, v)| {
                let source = self.source_of(&key);
                (key, v, source)
            })
            .collect()
    }
}

fn flatten(v: &serde_json::Value, prefix: String, out: &mut Vec<(String, String)>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, child) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(child, key, out);
            }
        }
        other => out.push((prefix, toml_literal(other))),
    }
}

fn toml_literal(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "(unset)".to_string(),
        serde_json::Value::Array(items) => {
            format!(
                "[{}]",
                items
                    .iter()
                    .map(toml_literal)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
        other => other.to_string(),
    }
}

/// Loads, merges and validates the configuration from `sources`.
pub fn load(sources: &ConfigSources) -> Result<LoadedConfig> {
    let mut figment = Figment::from(Serialized::defaults(Config::default()));
    if let Some(path) = &sources.file {
        if !path.exists() {
            return Err(RuntimeError::ConfigNotFound { path: path.clone() });
        }
        // Parse once up front so that a syntax error names the file plainly.
        let text = std::fs::read_to_string(path).map_err(|e| RuntimeError::ConfigUnreadable {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if let Err(e) = text.parse::<toml::Table>() {
            return Err(RuntimeError::ConfigUnreadable {
                path: path.clone(),
                reason: e.to_string().trim().replace('\n', " "),
            });
        }
        figment = figment.merge(Toml::file_exact(path));
    }
    if sources.use_env {
        // Only section-qualified variables (QVL_SECTION__KEY) are config keys;
        // others such as QVL_LOG belong to the program.
        figment = figment.merge(
            Env::prefixed(ENV_PREFIX)
                .filter(|k| k.as_str().contains("__"))
                .split("__"),
        );
    }
    let config: Config = figment.extract().map_err(|e| convert_error(&figment, e))?;
    validate(&config, &figment)?;
    Ok(LoadedConfig { config, figment })
}

/// Loads `path` alone (no environment), as `qvl config check` does.
pub fn check_file(path: &Path) -> Result<Config> {
    load(&ConfigSources {
        file: Some(path.to_path_buf()),
        use_env: false,
    })
    .map(|l| l.config)
}

/// " in <source>" for the value at `key`, or "" for defaults.
fn origin(figment: &Figment, key: &str) -> String {
    origin_name(figment, key).map_or_else(String::new, |s| format!(" in {s}"))
}

fn origin_name(figment: &Figment, key: &str) -> Option<String> {
    let meta = figment.find_metadata(key)?;
    match &meta.source {
        Some(figment::Source::File(path)) => Some(path.display().to_string()),
        _ if meta.name.contains("environment") => Some(format!(
            "environment variable {ENV_PREFIX}{}",
            key.replace('.', "__").to_uppercase()
        )),
        _ => None,
    }
}

fn convert_error(figment: &Figment, e: figment::Error) -> RuntimeError {
    use figment::error::Kind;
    let parent = e.path.join(".");
    let join = |field: &str| {
        if parent.is_empty() {
            field.to_string()
        } else {
            format!("{parent}.{field}")
        }
    };
    match &e.kind {
        Kind::UnknownField(field, expected) => {
            // figment puts the unknown field itself at the end of the path.
            let section = match e.path.split_last() {
                Some((last, rest)) if last == field => rest.join("."),
                _ => parent.clone(),
            };
            let join = |f: &str| {
                if section.is_empty() {
                    f.to_string()
                } else {
                    format!("{section}.{f}")
                }
            };
            let key = join(field);
            let best = expected
                .iter()
                .map(|cand| (strsim::jaro_winkler(field, cand), *cand))
                .filter(|(score, _)| *score >= 0.8)
                .max_by(|a, b| a.0.total_cmp(&b.0));
            let hint = match best {
                Some((_, cand)) => format!("did you mean `{}`?", join(cand)),
                None => format!("valid keys here: {}", expected.join(", ")),
            };
            RuntimeError::UnknownKey {
                origin: origin(figment, &key),
                key,
                hint,
            }
        }
        Kind::InvalidType(actual, expected) => RuntimeError::WrongType {
            origin: origin(figment, &parent),
            key: parent.clone(),
            expected: friendly_type(expected),
            found: actual.to_string(),
        },
        Kind::UnknownVariant(found, expected) => RuntimeError::InvalidValue {
            origin: origin(figment, &parent),
            key: parent.clone(),
            reason: format!("unknown value {found:?}; allowed: {}", expected.join(", ")),
        },
        Kind::MissingField(field) => RuntimeError::InvalidValue {
            key: join(field),
            origin: origin(figment, &parent),
            reason: "this key is required here".to_string(),
        },
        _ => RuntimeError::InvalidValue {
            origin: origin(figment, &parent),
            key: parent.clone(),
            reason: match &e.kind {
                Kind::Message(m) => m.clone(),
                other => other.to_string(),
            },
        },
    }
}

/// Serde's names for expected types, in words a user knows.
fn friendly_type(expected: &str) -> String {
    match expected {
        "f64" | "f32" => "a number".to_string(),
        "u8" | "u16" | "u32" | "u64" | "usize" => "a whole number >= 0".to_string(),
        "a boolean" | "bool" => "true or false".to_string(),
        "a string" => "a string".to_string(),
        "a sequence" => "a list".to_string(),
        other => other.to_string(),
    }
}

fn validate(c: &Config, figment: &Figment) -> Result<()> {
    c.metrics
        .validate()
        .map_err(|e| RuntimeError::InvalidValue {
            key: "metrics".to_string(),
            origin: origin(figment, "metrics"),
            reason: e.to_string(),
        })?;
    let range = |key: &str, value: f64, lo: f64, hi: f64, lo_open: bool| -> Result<()> {
        let ok = if lo_open { value > lo } else { value >= lo } && value <= hi;
        if ok {
            return Ok(());
        }
        Err(RuntimeError::OutOfRange {
            key: key.to_string(),
            value: value.to_string(),
            origin: origin(figment, key),
            allowed: format!(
                "{}{lo:?} to {hi:?}",
                if lo_open { "more than " } else { "" }
            ),
        })
    };
    range(
        "swapping.memory_threshold",
        c.swapping.memory_threshold,
        0.0,
        1.0,
        false,
    )?;
    range(
        "tiering.migration_threshold",
        c.tiering.migration_threshold,
        0.0,
        1.0,
        false,
    )?;
    range(
        "compression.svd_rank_ratio",
        c.compression.svd_rank_ratio,
        0.0,
        1.0,
        true,
    )?;
    range(
        "compression.error_budget",
        c.compression.error_budget,
        0.0,
        1.0,
        false,
    )?;
    for (key, budget) in [
        (
            "memory_pooling.overhead_budget",
            c.memory_pooling.overhead_budget,
        ),
        ("caching.overhead_budget", c.caching.overhead_budget),
        ("compression.overhead_budget", c.compression.overhead_budget),
        ("swapping.overhead_budget", c.swapping.overhead_budget),
        ("tiering.overhead_budget", c.tiering.overhead_budget),
        (
            "garbage_collection.overhead_budget",
            c.garbage_collection.overhead_budget,
        ),
    ] {
        range(key, budget, 0.0, 1.0, true)?;
    }
    if !matches!(c.compression.quantization_bits, 4 | 8) {
        let key = "compression.quantization_bits";
        return Err(RuntimeError::OutOfRange {
            key: key.to_string(),
            value: c.compression.quantization_bits.to_string(),
            origin: origin(figment, key),
            allowed: "4 or 8".to_string(),
        });
    }
    if c.garbage_collection.collection_interval.0 < Duration::from_millis(1) {
        let key = "garbage_collection.collection_interval";
        return Err(RuntimeError::OutOfRange {
            key: key.to_string(),
            value: c.garbage_collection.collection_interval.to_string(),
            origin: origin(figment, key),
            allowed: "1ms or more".to_string(),
        });
    }
    for (name, pool) in &c.memory_pooling.specialized_pools {
        if pool.shape.is_empty() || pool.shape.contains(&0) {
            let key = format!("memory_pooling.specialized_pools.{name}.shape");
            return Err(RuntimeError::OutOfRange {
                value: format!("{:?}", pool.shape),
                origin: origin(figment, &key),
                key,
                allowed: "one or more dimensions, each at least 1".to_string(),
            });
        }
    }
    Ok(())
}

/// The swap directory used when `swapping.swap_directory` is unset: private
/// to the user, never a fixed shared path. `$XDG_RUNTIME_DIR/qvl/swap` when
/// that is set, else `$XDG_CACHE_HOME/qvl/swap`, else `~/.cache/qvl/swap`.
pub fn default_swap_directory() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("qvl/swap");
    }
    user_cache_dir().join("swap")
}

/// `$XDG_CACHE_HOME/qvl`, else `~/.cache/qvl`, else a per-user directory
/// under the system temp dir (named with the uid, created 0700 on use).
pub fn user_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("qvl");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(home).join(".cache/qvl");
    }
    std::env::temp_dir().join(format!("qvl-{}", current_uid()))
}

fn current_uid() -> u32 {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        // /proc/self is owned by the process's user.
        std::fs::metadata("/proc/self").map_or(0, |m| m.uid())
    }
    #[cfg(not(unix))]
    {
        0
    }
}

/// Creates `dir` (and parents) if needed, with mode 0700, and checks that it
/// is a real directory owned by this user and closed to others.
pub fn ensure_private_dir(dir: &Path) -> Result<()> {
    let unsafe_dir = |reason: String| RuntimeError::UnsafeDirectory {
        path: dir.to_path_buf(),
        reason,
    };
    match std::fs::symlink_metadata(dir) {
        Ok(meta) if meta.file_type().is_symlink() => {
            return Err(unsafe_dir(
                "is a symlink; qvl will not follow it for private data".into(),
            ))
        }
        Ok(meta) if !meta.is_dir() => {
            return Err(unsafe_dir("exists and is not a directory".into()))
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut builder = std::fs::DirBuilder::new();
            builder.recursive(true);
            #[cfg(unix)]
            std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
            builder.create(dir).map_err(|e| RuntimeError::Io {
                context: format!("creating directory {}", dir.display()),
                source: e,
            })?;
        }
        Err(e) => {
            return Err(RuntimeError::Io {
                context: format!("inspecting {}", dir.display()),
                source: e,
            })
        }
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let meta = std::fs::metadata(dir).map_err(|e| RuntimeError::Io {
            context: format!("inspecting {}", dir.display()),
            source: e,
        })?;
        if meta.uid() != current_uid() {
            return Err(unsafe_dir(format!(
                "belongs to uid {}, not to this user (uid {})",
                meta.uid(),
                current_uid()
            )));
        }
        if meta.mode() & 0o077 != 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| {
                RuntimeError::Io {
                    context: format!("making {} private (mode 0700)", dir.display()),
                    source: e,
                }
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_toml(text: &str) -> (Result<LoadedConfig>, PathBuf, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qvl.toml");
        std::fs::write(&path, text).unwrap();
        let r = load(&ConfigSources {
            file: Some(path.clone()),
            use_env: false,
        });
        (r, path, dir)
    }

    fn err_of(text: &str) -> (String, PathBuf) {
        let (r, path, _dir) = load_toml(text);
        match r {
            Ok(_) => panic!("expected an error for {text:?}"),
            Err(e) => (e.to_string(), path),
        }
    }

    #[test]
    fn defaults_are_valid_and_file_overrides() {
        let (r, path, _dir) = load_toml("[caching]\ngpu_cache_size = \"512MiB\"\n");
        let loaded = r.unwrap();
        assert_eq!(loaded.config.caching.gpu_cache_size, ByteSize::mib(512));
        assert_eq!(loaded.config.caching.cpu_cache_size, ByteSize::gib(2));
        assert_eq!(
            loaded.source_of("caching.gpu_cache_size"),
            path.display().to_string()
        );
        assert_eq!(loaded.source_of("caching.cpu_cache_size"), "default");
        let entries = loaded.entries();
        assert!(entries
            .iter()
            .any(|(k, v, _)| k == "caching.gpu_cache_size" && v == "\"512MiB\""));
    }

    #[test]
    fn unknown_key_names_it_and_suggests() {
        let (msg, path) = err_of("[caching]\nevction_policy = \"lru\"\n");
        assert_eq!(
            msg,
            format!(
                "unknown key `caching.evction_policy` in {}; did you mean `caching.eviction_policy`?",
                path.display()
            )
        );
        let (msg, _) = err_of("[cachin]\nenabled = true\n");
        assert!(msg.starts_with("unknown key `cachin`"), "{msg}");
        assert!(msg.ends_with("did you mean `caching`?"), "{msg}");
    }

    #[test]
    fn wrong_type_names_expected_type() {
        let (msg, path) = err_of("[swapping]\nmemory_threshold = \"high\"\n");
        assert_eq!(
            msg,
            format!(
                "wrong type for `swapping.memory_threshold` in {}: expected a number, found string \"high\"",
                path.display()
            )
        );
    }

    #[test]
    fn out_of_range_names_key_value_and_range() {
        let (msg, path) = err_of("[swapping]\nmemory_threshold = 1.5\n");
        assert_eq!(
            msg,
            format!(
                "`swapping.memory_threshold` = 1.5 in {} is out of range: allowed 0.0 to 1.0",
                path.display()
            )
        );
        let (msg, _) = err_of("[compression]\nquantization_bits = 3\n");
        assert!(msg.contains("allowed 4 or 8"), "{msg}");
    }

    #[test]
    fn overhead_budgets_are_fractions_of_step_time() {
        let (r, _p, _d) = load_toml("[compression]\noverhead_budget = 0.2\n");
        let c = r.unwrap().config;
        assert_eq!(c.compression.overhead_budget, 0.2);
        assert_eq!(c.garbage_collection.overhead_budget, 0.05);
        let (msg, path) = err_of("[swapping]\noverhead_budget = 0\n");
        assert_eq!(
            msg,
            format!(
                "`swapping.overhead_budget` = 0 in {} is out of range: allowed more than 0.0 to 1.0",
                path.display()
            )
        );
        let (msg, _) = err_of("[garbage_collection]\noverhead_budget = 1.5\n");
        assert!(
            msg.starts_with("`garbage_collection.overhead_budget` = 1.5"),
            "{msg}"
        );
    }

    #[test]
    fn bad_size_unit_names_key_and_units() {
        let (msg, path) = err_of("[caching]\ngpu_cache_size = \"512XB\"\n");
        assert_eq!(
            msg,
            format!(
                "invalid value for `caching.gpu_cache_size` in {}: unknown size unit \"XB\" in \"512XB\": use B, KiB, MiB, GiB, TiB (powers of 1024) or KB, MB, GB, TB (powers of 1000)",
                path.display()
            )
        );
    }

    #[test]
    fn missing_file_is_named() {
        let err = check_file(Path::new("/nonexistent/qvl.toml")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "config file /nonexistent/qvl.toml not found"
        );
    }

    #[test]
    fn syntax_error_names_the_file() {
        let (msg, path) = err_of("[caching\n");
        assert!(
            msg.starts_with(&format!("cannot read config file {}:", path.display())),
            "{msg}"
        );
    }

    #[test]
    fn unknown_enum_value_lists_allowed() {
        let (msg, _) = err_of("[caching]\neviction_policy = \"random\"\n");
        assert!(msg.contains("`caching.eviction_policy`"), "{msg}");
        assert!(msg.contains("lru, lfu, arc, s3_fifo, predictive"), "{msg}");
    }

    #[test]
    fn specialized_pools_parse_by_name() {
        let (r, _p, _d) = load_toml(
            "[memory_pooling.specialized_pools.vision]\nkind = \"vision_embedding\"\nshape = [64, 2048]\ndtype = \"bf16\"\n",
        );
        let c = r.unwrap().config;
        let v = &c.memory_pooling.specialized_pools["vision"];
        assert_eq!(v.kind, TensorKind::VisionEmbedding);
        assert_eq!(v.shape, vec![64, 2048]);
        // Defaults stay beside the new entry.
        assert!(c.memory_pooling.specialized_pools.contains_key("kv_cache"));
        let (msg, _) = err_of("[memory_pooling.specialized_pools.x]\nkind = \"weight\"\nshape = [0]\ndtype = \"f16\"\n");
        assert!(
            msg.contains("memory_pooling.specialized_pools.x.shape"),
            "{msg}"
        );
    }

    #[test]
    fn durations_need_units() {
        assert_eq!(
            "250ms".parse::<HumanDuration>().unwrap().0,
            Duration::from_millis(250)
        );
        assert_eq!(
            "1.5s".parse::<HumanDuration>().unwrap().0,
            Duration::from_millis(1500)
        );
        assert!("100"
            .parse::<HumanDuration>()
            .unwrap_err()
            .contains("needs a unit"));
        let (msg, _) = err_of("[garbage_collection]\ncollection_interval = \"5h\"\n");
        assert!(msg.contains("unknown duration unit \"h\""), "{msg}");
    }

    #[test]
    fn private_dir_is_created_0700_and_symlinks_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/swap");
        ensure_private_dir(&dir).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700);
            let link = tmp.path().join("link");
            std::os::unix::fs::symlink(&dir, &link).unwrap();
            let err = ensure_private_dir(&link).unwrap_err().to_string();
            assert!(err.contains("is a symlink"), "{err}");
        }
        assert!(!default_swap_directory().starts_with("/tmp/qvl"));
    }
}
