//! Generated llama-architecture GGUF models of any size (`qvl gen-model`),
//! for runs and benchmarks on models larger than the ones at hand.
//!
//! The weights are random ([`qvl_model::random::random_tensor`]: matrices
//! scaled by `1/sqrt(fan_in)`, so activations stay in range at any depth)
//! and written tensor by tensor, so a model larger than RAM can be written.
//! The file carries a small byte-level BPE tokenizer (the 256 byte tokens,
//! lower-case letter pairs and `<|endoftext|>`), so `qvl run --model` loads
//! it like any llama GGUF: the text it writes is noise, but it is the same
//! noise under every weight placement.

use qvl_core::DType;
use qvl_model::gguf::GgmlType;
use qvl_model::random::random_tensor;
use qvl_model::{ModelError, Result};
use std::io::{BufWriter, Seek, Write};
use std::path::Path;

/// GGUF tensor data alignment (the format's default).
const ALIGNMENT: u64 = 32;

/// The shape of a generated model.
#[derive(Debug, Clone, PartialEq)]
pub struct GenModelConfig {
    /// Decoder layers.
    pub layers: usize,
    /// Hidden size.
    pub hidden: usize,
    /// MLP width.
    pub intermediate: usize,
    /// Query heads (head dim = hidden / heads).
    pub heads: usize,
    /// Key/value heads (divides `heads`).
    pub kv_heads: usize,
    /// Stored type of the matrices: F32, F16 or BF16 (norms are F32).
    pub dtype: DType,
    /// Seed of the weights.
    pub seed: u64,
}

impl Default for GenModelConfig {
    /// 16 layers of hidden 1024 and MLP 4096: 487 MB of f32 layer weights
    /// once loaded (the tier benchmark's model), a 0.5 GB f16 file.
    fn default() -> Self {
        GenModelConfig {
            layers: 16,
            hidden: 1024,
            intermediate: 4096,
            heads: 16,
            kv_heads: 4,
            dtype: DType::F16,
            seed: 5,
        }
    }
}

impl GenModelConfig {
    /// Checks the shape, naming the first bad value.
    pub fn validate(&self) -> Result<(), String> {
        if self.layers == 0 || self.hidden == 0 || self.intermediate == 0 {
            return Err("layers, hidden and intermediate must be at least 1".to_string());
        }
        if self.heads == 0 || self.hidden % self.heads != 0 {
            return Err(format!(
                "hidden {} is not a multiple of heads {}",
                self.hidden, self.heads
            ));
        }
        if (self.hidden / self.heads) % 2 != 0 {
            return Err(format!(
                "head dim {} must be even (RoPE rotates halves)",
                self.hidden / self.heads
            ));
        }
        if self.kv_heads == 0 || self.heads % self.kv_heads != 0 {
            return Err(format!(
                "heads {} is not a multiple of kv heads {}",
                self.heads, self.kv_heads
            ));
        }
        if !matches!(self.dtype, DType::F32 | DType::F16 | DType::Bf16) {
            return Err(format!("dtype {} is not one of f32, f16, bf16", self.dtype));
        }
        Ok(())
    }

    fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }
}

/// What [`write_llama_gguf`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedModel {
    /// Bytes of the file.
    pub file_bytes: u64,
    /// Parameters of the decoder layers.
    pub layer_params: u64,
    /// All parameters (layers, embedding, final norm, lm head).
    pub total_params: u64,
    /// Tokens in the vocabulary.
    pub vocab: usize,
}

impl GeneratedModel {
    /// One line: where, how big, how many parameters.
    pub fn summary(&self, path: &Path) -> String {
        format!(
            "wrote {} ({:.1} MiB): {:.1} M parameters, {:.1} M in the layers \
             ({:.1} MiB as f32 once loaded), vocabulary of {}",
            path.display(),
            self.file_bytes as f64 / (1024.0 * 1024.0),
            self.total_params as f64 / 1e6,
            self.layer_params as f64 / 1e6,
            self.layer_params as f64 * 4.0 / (1024.0 * 1024.0),
            self.vocab
        )
    }
}

/// Parses `f32`, `f16` or `bf16` (`qvl gen-model --dtype`).
pub fn parse_dtype(s: &str) -> std::result::Result<DType, String> {
    match s.to_ascii_lowercase().as_str() {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::Bf16),
        other => Err(format!("{other:?} is not one of f32, f16, bf16")),
    }
}

/// The GPT-2 byte-level alphabet: the character standing for each byte.
fn byte_chars() -> Vec<char> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut next = 256u32;
    (0..256u32)
        .map(|b| {
            let c = if printable(b) {
                b
            } else {
                next += 1;
                next - 1
            };
            // Every value is below 0x180, a valid scalar value.
            char::from_u32(c).unwrap_or('?')
        })
        .collect()
}

/// Tokens, token types and merges of the generated tokenizer.
fn vocabulary() -> (Vec<String>, Vec<i32>, Vec<String>) {
    let mut tokens: Vec<String> = byte_chars().into_iter().map(String::from).collect();
    let mut merges = Vec::new();
    for a in 'a'..='z' {
        for b in 'a'..='z' {
            tokens.push(format!("{a}{b}"));
            merges.push(format!("{a} {b}"));
        }
    }
    let mut types = vec![1i32; tokens.len()];
    tokens.push("<|endoftext|>".to_string());
    types.push(3); // control
    (tokens, types, merges)
}

enum Meta {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_meta(out: &mut Vec<u8>, key: &str, v: &Meta) {
    put_str(out, key);
    let (ty, body): (u32, Vec<u8>) = match v {
        Meta::U32(x) => (4, x.to_le_bytes().to_vec()),
        Meta::F32(x) => (6, x.to_le_bytes().to_vec()),
        Meta::Bool(x) => (7, vec![u8::from(*x)]),
        Meta::Str(s) => {
            let mut b = Vec::new();
            put_str(&mut b, s);
            (8, b)
        }
        Meta::Strs(items) => {
            let mut b = 8u32.to_le_bytes().to_vec();
            b.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for s in items {
                put_str(&mut b, s);
            }
            (9, b)
        }
        Meta::I32s(items) => {
            let mut b = 5u32.to_le_bytes().to_vec();
            b.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for x in items {
                b.extend_from_slice(&x.to_le_bytes());
            }
            (9, b)
        }
    };
    out.extend_from_slice(&ty.to_le_bytes());
    out.extend_from_slice(&body);
}

/// One tensor to write: GGUF name, Hugging Face-order shape (`out x in`), type.
struct Planned {
    name: String,
    shape: Vec<usize>,
    dtype: DType,
}

impl Planned {
    fn elements(&self) -> usize {
        self.shape.iter().product()
    }

    fn bytes(&self) -> u64 {
        self.dtype.bytes_for(self.elements()) as u64
    }

    fn ggml_type(&self) -> GgmlType {
        match self.dtype {
            DType::F16 => GgmlType::F16,
            DType::Bf16 => GgmlType::BF16,
            _ => GgmlType::F32,
        }
    }
}

fn plan(c: &GenModelConfig, vocab: usize) -> Vec<Planned> {
    let (h, hd) = (c.hidden, c.head_dim());
    let t = |name: String, shape: Vec<usize>, dtype: DType| Planned { name, shape, dtype };
    let mut out = vec![t("token_embd.weight".into(), vec![vocab, h], c.dtype)];
    for i in 0..c.layers {
        let n = |s: &str| format!("blk.{i}.{s}");
        out.push(t(n("attn_norm.weight"), vec![h], DType::F32));
        out.push(t(n("attn_q.weight"), vec![c.heads * hd, h], c.dtype));
        out.push(t(n("attn_k.weight"), vec![c.kv_heads * hd, h], c.dtype));
        out.push(t(n("attn_v.weight"), vec![c.kv_heads * hd, h], c.dtype));
        out.push(t(n("attn_output.weight"), vec![h, c.heads * hd], c.dtype));
        out.push(t(n("ffn_norm.weight"), vec![h], DType::F32));
        out.push(t(n("ffn_gate.weight"), vec![c.intermediate, h], c.dtype));
        out.push(t(n("ffn_up.weight"), vec![c.intermediate, h], c.dtype));
        out.push(t(n("ffn_down.weight"), vec![h, c.intermediate], c.dtype));
    }
    out.push(t("output_norm.weight".into(), vec![h], DType::F32));
    out.push(t("output.weight".into(), vec![vocab, h], c.dtype));
    out
}

/// Writes a generated llama GGUF of `config` to `path` (replacing it).
pub fn write_llama_gguf(path: &Path, config: &GenModelConfig) -> Result<GeneratedModel> {
    config
        .validate()
        .map_err(|e| ModelError::InvalidInput(format!("gen-model: {e}")))?;
    let (tokens, types, merges) = vocabulary();
    let vocab = tokens.len();
    let eos = (vocab - 1) as u32;
    let c = config;
    let meta = [
        ("general.architecture", Meta::Str("llama".into())),
        (
            "general.name",
            Meta::Str(format!(
                "qvl generated llama {}x{} (seed {})",
                c.layers, c.hidden, c.seed
            )),
        ),
        ("general.alignment", Meta::U32(ALIGNMENT as u32)),
        ("llama.block_count", Meta::U32(c.layers as u32)),
        ("llama.context_length", Meta::U32(4096)),
        ("llama.embedding_length", Meta::U32(c.hidden as u32)),
        (
            "llama.feed_forward_length",
            Meta::U32(c.intermediate as u32),
        ),
        ("llama.attention.head_count", Meta::U32(c.heads as u32)),
        (
            "llama.attention.head_count_kv",
            Meta::U32(c.kv_heads as u32),
        ),
        ("llama.rope.freq_base", Meta::F32(10_000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Meta::F32(1e-5)),
        ("tokenizer.ggml.model", Meta::Str("gpt2".into())),
        ("tokenizer.ggml.pre", Meta::Str("gpt2".into())),
        ("tokenizer.ggml.tokens", Meta::Strs(tokens)),
        ("tokenizer.ggml.token_type", Meta::I32s(types)),
        ("tokenizer.ggml.merges", Meta::Strs(merges)),
        ("tokenizer.ggml.bos_token_id", Meta::U32(eos)),
        ("tokenizer.ggml.eos_token_id", Meta::U32(eos)),
        ("tokenizer.ggml.add_bos_token", Meta::Bool(false)),
    ];
    let tensors = plan(c, vocab);
    let mut head = b"GGUF".to_vec();
    head.extend_from_slice(&3u32.to_le_bytes());
    head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    head.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    for (k, v) in &meta {
        put_meta(&mut head, k, v);
    }
    let mut offset = 0u64;
    let mut offsets = Vec::with_capacity(tensors.len());
    for t in &tensors {
        put_str(&mut head, &t.name);
        head.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        // ggml lists dimensions innermost first.
        for d in t.shape.iter().rev() {
            head.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        head.extend_from_slice(&t.ggml_type().id().to_le_bytes());
        head.extend_from_slice(&offset.to_le_bytes());
        offsets.push(offset);
        offset = (offset + t.bytes()).next_multiple_of(ALIGNMENT);
    }
    let data_start = (head.len() as u64).next_multiple_of(ALIGNMENT);
    head.resize(data_start as usize, 0);

    let file = std::fs::File::create(path)
        .map_err(|e| ModelError::io(format!("creating the model file {}", path.display()), e))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let write_err = |e| ModelError::io(format!("writing {}", path.display()), e);
    out.write_all(&head).map_err(write_err)?;
    let (mut layer_params, mut total_params) = (0u64, 0u64);
    for (i, (t, &at)) in tensors.iter().zip(&offsets).enumerate() {
        let pos = out.stream_position().map_err(write_err)?;
        let pad = (data_start + at).checked_sub(pos).ok_or_else(|| {
            ModelError::InvalidInput("gen-model: tensor offsets out of order".to_string())
        })?;
        out.write_all(&vec![0u8; pad as usize]).map_err(write_err)?;
        let seed = c.seed.wrapping_add(i as u64 * 7919);
        let tensor = random_tensor(&t.name, &t.shape, t.dtype, seed)?;
        out.write_all(tensor.bytes.as_slice()).map_err(write_err)?;
        total_params += t.elements() as u64;
        if t.name.starts_with("blk.") {
            layer_params += t.elements() as u64;
        }
    }
    let file = out.into_inner().map_err(|e| write_err(e.into_error()))?;
    file.sync_all().map_err(write_err)?;
    let file_bytes = file.metadata().map_err(write_err)?.len();
    Ok(GeneratedModel {
        file_bytes,
        layer_params,
        total_params,
        vocab,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use qvl_model::llama::GgufTextModel;

    #[test]
    fn generated_gguf_loads_tokenizes_and_generates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gen.gguf");
        let cfg = GenModelConfig {
            layers: 2,
            hidden: 64,
            intermediate: 96,
            heads: 4,
            kv_heads: 2,
            dtype: DType::F16,
            seed: 3,
        };
        let info = write_llama_gguf(&path, &cfg).unwrap();
        assert_eq!(info.file_bytes, std::fs::metadata(&path).unwrap().len());
        let model = GgufTextModel::load(&path).unwrap();
        let c = model.decoder().config();
        assert_eq!((c.num_layers, c.hidden_size, c.num_kv_heads), (2, 64, 2));
        assert_eq!(c.vocab_size, info.vocab);
        assert!(!c.tie_word_embeddings);
        let ids = model.prompt_ids("hello world").unwrap();
        assert_eq!(model.tokenizer().decode(&ids), "hello world");
        // "he", "ll", "o", " ", "wo", "rl", "d": the letter-pair merges apply.
        assert_eq!(ids.len(), 7, "{ids:?}");
        let mut s = model.new_session();
        let g = model.generate(&mut s, &ids, 4, false, &mut |_| {}).unwrap();
        assert_eq!(g.tokens.len(), 4);
    }

    #[test]
    fn bad_shapes_are_named() {
        let bad = GenModelConfig {
            hidden: 100,
            heads: 3,
            ..GenModelConfig::default()
        };
        let e = write_llama_gguf(Path::new("/nonexistent/x.gguf"), &bad).unwrap_err();
        assert!(e.to_string().contains("multiple of heads"), "{e}");
    }
}
