//! Weights from Hugging Face checkpoint directories: memory-mapped, validated
//! safetensors files (one, or sharded with `model.safetensors.index.json`),
//! behind the [`WeightSource`] trait that every model loads from.

use crate::error::{ModelError, Result};
use crate::tensor::{checked_elements, ByteOwner, Bytes, StoredTensor};
use qvl_core::DType;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where a model's tensors come from, by name. Implemented by safetensors
/// files and checkpoint directories here, by in-memory maps (benchmarks,
/// tests) and by other formats (GGUF) that map their names on the way in.
pub trait WeightSource: Send + Sync {
    /// The tensor called `name`, or None when the source has none.
    fn tensor(&self, name: &str) -> Result<Option<StoredTensor>>;

    /// Whether a tensor called `name` exists.
    fn contains(&self, name: &str) -> bool;

    /// A short description for error messages (a path, "in-memory weights").
    fn describe(&self) -> String;
}

/// Loads `name` from `source`, failing when it is missing or when its shape
/// is not `expected`.
pub fn require(source: &dyn WeightSource, name: &str, expected: &[usize]) -> Result<StoredTensor> {
    let t = source
        .tensor(name)?
        .ok_or_else(|| ModelError::MissingTensor {
            name: name.to_string(),
            source_desc: source.describe(),
        })?;
    if t.shape != expected {
        return Err(ModelError::ShapeMismatch {
            name: name.to_string(),
            source_desc: source.describe(),
            expected: expected.to_vec(),
            actual: t.shape.clone(),
        });
    }
    if !t.is_float() {
        return Err(ModelError::InvalidInput(format!(
            "tensor {name:?} in {} is {}, weights must be f32, f16 or bf16",
            source.describe(),
            t.dtype
        )));
    }
    Ok(t)
}

/// The dtype names of the safetensors format this crate reads.
fn parse_dtype(s: &str) -> Option<DType> {
    Some(match s {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::Bf16,
        "I64" => DType::I64,
        "I32" => DType::I32,
        "I8" => DType::I8,
        "U8" => DType::U8,
        _ => return None,
    })
}

/// The safetensors name of `dtype`.
fn dtype_name(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::Bf16 => "BF16",
        DType::I64 => "I64",
        DType::I32 => "I32",
        DType::I8 => "I8",
        DType::U8 => "U8",
        DType::I4Packed => {
            return Err(ModelError::InvalidInput(
                "safetensors has no packed int4 dtype".to_string(),
            ))
        }
    })
}

/// Largest header accepted; real headers are a few MB at most.
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// One safetensors file, memory-mapped, with its header validated: every
/// tensor has a known dtype, a byte range inside the file and a byte length
/// that matches its shape.
pub struct SafetensorsFile {
    path: PathBuf,
    tensors: BTreeMap<String, StoredTensor>,
    metadata: BTreeMap<String, String>,
}

impl SafetensorsFile {
    /// Maps and validates `path`.
    pub fn open(path: &Path) -> Result<SafetensorsFile> {
        let file = std::fs::File::open(path)
            .map_err(|e| ModelError::io(format!("opening {}", path.display()), e))?;
        // SAFETY: the map is read-only and the file is opened read-only. A
        // file truncated by another process while mapped would fault on
        // access; checkpoint files are not modified while a model runs.
        let mmap = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| ModelError::io(format!("mapping {}", path.display()), e))?;
        Self::from_owner(path.to_path_buf(), Arc::new(mmap))
    }

    /// Parses a safetensors image held in memory (`path` names it in errors).
    pub fn from_bytes(path: PathBuf, data: Vec<u8>) -> Result<SafetensorsFile> {
        Self::from_owner(path, Arc::new(data))
    }

    fn from_owner(path: PathBuf, owner: Arc<dyn ByteOwner>) -> Result<SafetensorsFile> {
        let bad = |reason: String| ModelError::BadSafetensors {
            path: path.clone(),
            reason,
        };
        let all = owner.bytes();
        let file_len = all.len() as u64;
        if file_len < 8 {
            return Err(bad(format!(
                "file is {file_len} bytes, too short for the 8-byte header length (truncated?)"
            )));
        }
        let mut len_bytes = [0u8; 8];
        len_bytes.copy_from_slice(&all[..8]);
        let header_len = u64::from_le_bytes(len_bytes);
        if header_len > MAX_HEADER_BYTES {
            return Err(bad(format!(
                "header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit (not a safetensors file?)"
            )));
        }
        if 8 + header_len > file_len {
            return Err(bad(format!(
                "header of {header_len} bytes runs past the end of the {file_len}-byte file (truncated?)"
            )));
        }
        let data_start = 8 + header_len as usize;
        let header: serde_json::Value = serde_json::from_slice(&all[8..data_start])
            .map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
        let serde_json::Value::Object(entries) = header else {
            return Err(bad("header is not a JSON object".to_string()));
        };
        let data_len = file_len - data_start as u64;
        let mut tensors = BTreeMap::new();
        let mut metadata = BTreeMap::new();
        for (name, entry) in entries {
            if name == "__metadata__" {
                if let serde_json::Value::Object(m) = entry {
                    for (k, v) in m {
                        metadata.insert(k, v.as_str().unwrap_or_default().to_string());
                    }
                }
                continue;
            }
            let bad_t = |what: &str| bad(format!("tensor {name:?}: {what}"));
            let dtype_str = entry
                .get("dtype")
                .and_then(|d| d.as_str())
                .ok_or_else(|| bad_t("no dtype string"))?;
            let dtype = parse_dtype(dtype_str).ok_or_else(|| ModelError::UnknownDtype {
                path: path.clone(),
                tensor: name.clone(),
                dtype: dtype_str.to_string(),
            })?;
            let shape: Vec<usize> = entry
                .get("shape")
                .and_then(|s| s.as_array())
                .ok_or_else(|| bad_t("no shape array"))?
                .iter()
                .map(|d| d.as_u64().map(|d| d as usize))
                .collect::<Option<_>>()
                .ok_or_else(|| bad_t("shape holds a value that is not a non-negative integer"))?;
            let offsets: Vec<u64> = entry
                .get("data_offsets")
                .and_then(|s| s.as_array())
                .ok_or_else(|| bad_t("no data_offsets array"))?
                .iter()
                .map(|d| d.as_u64())
                .collect::<Option<_>>()
                .ok_or_else(|| {
                    bad_t("data_offsets holds a value that is not a non-negative integer")
                })?;
            let [begin, end] = offsets[..] else {
                return Err(bad_t("data_offsets must hold exactly two numbers"));
            };
            if begin > end {
                return Err(bad_t(&format!(
                    "data_offsets [{begin}, {end}] run backwards"
                )));
            }
            if end > data_len {
                return Err(bad_t(&format!(
                    "data_offsets [{begin}, {end}] run past the {data_len} data bytes of the file (truncated?)"
                )));
            }
            let elements = checked_elements(&shape)
                .ok_or_else(|| bad_t(&format!("shape {shape:?} overflows")))?;
            let expected = dtype.bytes_for(elements) as u64;
            if end - begin != expected {
                return Err(bad_t(&format!(
                    "holds {} bytes, but {shape:?} of {dtype} needs {expected}",
                    end - begin
                )));
            }
            // In bounds: end <= data_len was checked above.
            let bytes = Bytes::new(
                owner.clone(),
                data_start + begin as usize,
                (end - begin) as usize,
            )
            .ok_or_else(|| bad_t("byte range outside the file"))?;
            let tensor = StoredTensor::new(name.clone(), dtype, shape, bytes)?;
            tensors.insert(name, tensor);
        }
        Ok(SafetensorsFile {
            path,
            tensors,
            metadata,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The `__metadata__` entries.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Option<&StoredTensor> {
        self.tensors.get(name)
    }

    /// The tensor called `name`, or an error naming the file.
    pub fn expect_tensor(&self, name: &str) -> Result<&StoredTensor> {
        self.get(name).ok_or_else(|| ModelError::MissingTensor {
            name: name.to_string(),
            source_desc: self.path.display().to_string(),
        })
    }
}

impl WeightSource for SafetensorsFile {
    fn tensor(&self, name: &str) -> Result<Option<StoredTensor>> {
        Ok(self.get(name).cloned())
    }

    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

/// Serializes tensors into the safetensors format (sorted by name, data in
/// that order). Used to write test checkpoints and goldens from Rust.
pub fn safetensors_bytes(tensors: &[StoredTensor]) -> Result<Vec<u8>> {
    let mut sorted: Vec<&StoredTensor> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for t in &sorted {
        let end = offset + t.bytes.len();
        header.insert(
            t.name.clone(),
            serde_json::json!({
                "dtype": dtype_name(t.dtype)?,
                "shape": t.shape,
                "data_offsets": [offset, end],
            }),
        );
        offset = end;
    }
    let mut text = serde_json::Value::Object(header).to_string().into_bytes();
    // Pad with spaces so data starts 8-byte aligned, as the reference writer does.
    while (8 + text.len()) % 8 != 0 {
        text.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + text.len() + offset);
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(&text);
    for t in &sorted {
        out.extend_from_slice(t.bytes.as_slice());
    }
    Ok(out)
}

/// Writes tensors to a safetensors file at `path`.
pub fn write_safetensors(path: &Path, tensors: &[StoredTensor]) -> Result<()> {
    let bytes = safetensors_bytes(tensors)?;
    std::fs::write(path, bytes)
        .map_err(|e| ModelError::io(format!("writing {}", path.display()), e))
}

/// A Hugging Face checkpoint directory: `config.json` and its safetensors
/// files, all mapped and validated on open.
pub struct HfCheckpoint {
    dir: PathBuf,
    config: serde_json::Value,
    files: Vec<SafetensorsFile>,
    index: HashMap<String, usize>,
}

impl HfCheckpoint {
    /// Opens `dir`: reads `config.json`, then the shards named by
    /// `model.safetensors.index.json` or, without an index, every
    /// `*.safetensors` file in the directory.
    pub fn open(dir: &Path) -> Result<HfCheckpoint> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path)
            .map_err(|e| ModelError::io(format!("reading {}", config_path.display()), e))?;
        let config: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ModelError::BadConfig {
                path: config_path.clone(),
                reason: format!("not valid JSON: {e}"),
            })?;
        let index_path = dir.join("model.safetensors.index.json");
        let mut shard_names: Vec<String> = Vec::new();
        if index_path.exists() {
            let text = std::fs::read_to_string(&index_path)
                .map_err(|e| ModelError::io(format!("reading {}", index_path.display()), e))?;
            let index: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ModelError::BadSafetensors {
                    path: index_path.clone(),
                    reason: format!("index is not valid JSON: {e}"),
                })?;
            let map = index
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::BadSafetensors {
                    path: index_path.clone(),
                    reason: "index has no weight_map object".to_string(),
                })?;
            for file in map.values() {
                let file = file.as_str().ok_or_else(|| ModelError::BadSafetensors {
                    path: index_path.clone(),
                    reason: "weight_map value is not a file name".to_string(),
                })?;
                if file.contains('/') || file.contains("..") {
                    return Err(ModelError::BadSafetensors {
                        path: index_path.clone(),
                        reason: format!("shard name {file:?} leaves the checkpoint directory"),
                    });
                }
                if !shard_names.iter().any(|s| s == file) {
                    shard_names.push(file.to_string());
                }
            }
            shard_names.sort();
        } else {
            let entries = std::fs::read_dir(dir)
                .map_err(|e| ModelError::io(format!("listing {}", dir.display()), e))?;
            for entry in entries {
                let entry =
                    entry.map_err(|e| ModelError::io(format!("listing {}", dir.display()), e))?;
                let name = entry.file_name().to_string_lossy().to_string();
                if name.ends_with(".safetensors") {
                    shard_names.push(name);
                }
            }
            shard_names.sort();
        }
        if shard_names.is_empty() {
            return Err(ModelError::BadConfig {
                path: dir.to_path_buf(),
                reason: "no *.safetensors file in the checkpoint directory".to_string(),
            });
        }
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for name in &shard_names {
            let file = SafetensorsFile::open(&dir.join(name))?;
            for tensor in file.names() {
                if let Some(prev) = index.insert(tensor.to_string(), files.len()) {
                    let prev: &SafetensorsFile = &files[prev];
                    return Err(ModelError::BadSafetensors {
                        path: file.path().to_path_buf(),
                        reason: format!("tensor {tensor:?} is also in {}", prev.path().display()),
                    });
                }
            }
            files.push(file);
        }
        Ok(HfCheckpoint {
            dir: dir.to_path_buf(),
            config,
            files,
            index,
        })
    }

    /// The parsed `config.json`.
    pub fn config(&self) -> &serde_json::Value {
        &self.config
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Number of tensors over all shards.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether the checkpoint holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }
}

impl WeightSource for HfCheckpoint {
    fn tensor(&self, name: &str) -> Result<Option<StoredTensor>> {
        Ok(self
            .index
            .get(name)
            .and_then(|&i| self.files[i].get(name).cloned()))
    }

    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn describe(&self) -> String {
        self.dir.display().to_string()
    }
}

/// Tensors held in memory by name (benchmarks with random weights, tests).
#[derive(Default)]
pub struct MemoryWeights {
    tensors: HashMap<String, StoredTensor>,
}

impl MemoryWeights {
    /// An empty set.
    pub fn new() -> MemoryWeights {
        MemoryWeights::default()
    }

    /// Adds (or replaces) a tensor under its own name.
    pub fn insert(&mut self, tensor: StoredTensor) {
        self.tensors.insert(tensor.name.clone(), tensor);
    }

    /// Every tensor, for writing them to a file.
    pub fn tensors(&self) -> Vec<StoredTensor> {
        self.tensors.values().cloned().collect()
    }

    /// Total stored bytes.
    pub fn total_bytes(&self) -> usize {
        self.tensors.values().map(|t| t.bytes.len()).sum()
    }
}

impl WeightSource for MemoryWeights {
    fn tensor(&self, name: &str) -> Result<Option<StoredTensor>> {
        Ok(self.tensors.get(name).cloned())
    }

    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn describe(&self) -> String {
        "in-memory weights".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<StoredTensor> {
        vec![
            StoredTensor::from_f32("b", vec![2], &[1.0, 2.0]).unwrap(),
            StoredTensor::from_bf16_bits("a", vec![1, 3], &[0x3f80, 0x4000, 0xc040]).unwrap(),
        ]
    }

    #[test]
    fn writes_and_reads_back() {
        let bytes = safetensors_bytes(&sample()).unwrap();
        let f = SafetensorsFile::from_bytes("mem".into(), bytes).unwrap();
        assert_eq!(f.names().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(f.get("a").unwrap().to_f32_vec().unwrap(), [1.0, 2.0, -3.0]);
        assert_eq!(f.get("b").unwrap().to_f32_vec().unwrap(), [1.0, 2.0]);
    }

    #[test]
    fn short_file_is_an_error() {
        let err = SafetensorsFile::from_bytes("x.safetensors".into(), vec![1, 2])
            .err()
            .unwrap();
        assert!(err.to_string().contains("x.safetensors"), "{err}");
    }
}
