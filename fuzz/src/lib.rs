//! Fuzz harness of qvl's parsers: one function per target, shared by the
//! cargo-fuzz targets (`fuzz/fuzz_targets/*.rs`), the corpus replay that
//! runs under plain `cargo test` on stable
//! (`crates/qvl-runtime/tests/reliability_fuzz_corpus.rs` includes this file
//! by path), and the stable random-mutation loop behind
//! `cargo xtask fuzz` when cargo-fuzz is missing.
//!
//! Each function feeds arbitrary bytes to one parser and then to what a
//! caller would do with an accepted input (dequantize the tensors, build
//! the tokenizer, replay the trace, ...). Errors are fine; a panic, an
//! abort, a hang or an allocation beyond the limits is a crash.
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

use std::path::{Path, PathBuf};

/// One target's entry point: must not panic on any input.
pub type Harness = fn(&[u8]);

/// The fuzz targets, by name: the directory of each one's corpus under
/// `fuzz/corpus/` and its cargo-fuzz binary carry the same name.
pub const TARGETS: &[(&str, Harness)] = &[
    ("gguf", gguf),
    ("safetensors", safetensors),
    ("config_toml", config_toml),
    ("trace_jsonl", trace_jsonl),
    ("swap_record", swap_record),
    ("image", image),
    ("tokenizer_json", tokenizer_json),
    ("model_config_json", model_config_json),
];

/// Tensors bigger than this are not dequantized (the parse is what is
/// fuzzed; converting megabytes of noise only slows the fuzzer).
const MAX_DEQUANT_ELEMS: u64 = 1 << 16;

/// A GGUF file: header, metadata, tensor table; then the tensors' bytes,
/// dequantized; the llama hyperparameters; the tokenizer from the metadata,
/// used on a short text.
pub fn gguf(data: &[u8]) {
    use qvl_model::gguf::{dequantize, tensor_slice, GgufHeader, LlamaHyperparams};
    let Ok(header) = GgufHeader::parse(data) else {
        return;
    };
    for info in header.tensors.iter().take(16) {
        let bytes = tensor_slice(data, &header, info);
        let n = info.n_elems();
        if info.ty.can_dequantize() && n <= MAX_DEQUANT_ELEMS {
            let mut out = vec![0f32; n as usize];
            let _ = dequantize(info.ty, bytes, &mut out);
        }
        let _ = (
            info.shape(),
            info.row_len(),
            info.n_rows(),
            info.row_bytes(),
        );
    }
    let _ = LlamaHyperparams::from_header(&header);
    if let Ok(tok) = qvl_model::tokenizer::Tokenizer::from_gguf(&header) {
        use_tokenizer(&tok);
    }
}

fn use_tokenizer(tok: &qvl_model::tokenizer::Tokenizer) {
    use qvl_model::tokenizer::ChatMessage;
    let ids = tok.encode("Hello, wörld! <|im_start|>user 12345 \n\t  ", true);
    let _ = tok.decode(&ids);
    let _ = tok.decode_checked(&[0, 1, 2, u32::MAX]);
    let mut stream = tok.stream_decoder();
    for id in ids.iter().take(32) {
        let _ = stream.push(*id);
    }
    let _ = tok.apply_chat_template(
        &[ChatMessage::system("be brief"), ChatMessage::user("hi")],
        true,
    );
}

/// A safetensors file: the JSON header, every tensor's range and dtype;
/// small float tensors are converted to f32.
pub fn safetensors(data: &[u8]) {
    let Ok(file) =
        qvl_model::SafetensorsFile::from_bytes(PathBuf::from("fuzz.safetensors"), data.to_vec())
    else {
        return;
    };
    let _ = file.metadata().len();
    let names: Vec<String> = file.names().map(str::to_string).collect();
    for name in names.iter().take(16) {
        if let Some(t) = file.get(name) {
            if t.elements() as u64 <= MAX_DEQUANT_ELEMS && t.is_float() {
                let _ = t.to_f32_vec();
            }
        }
    }
}

/// The runtime's TOML config, loaded from a file as `qvl config check`
/// does (figment, validation); each line also goes through the size and
/// duration parsers the config uses.
pub fn config_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for line in text.lines().take(64) {
        let value = line
            .rsplit('=')
            .next()
            .unwrap_or(line)
            .trim()
            .trim_matches('"');
        let _ = value.parse::<qvl_core::ByteSize>();
        let _ = value.parse::<qvl_runtime::config::HumanDuration>();
    }
    let path = scratch_file("config.toml");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(config) = qvl_runtime::config::check_file(&path) {
        // What `qvl config show` prints must come out of what was accepted.
        if let Ok(loaded) = qvl_runtime::config::load(&qvl_runtime::ConfigSources {
            file: Some(path.clone()),
            use_env: false,
        }) {
            let _ = loaded.entries();
        }
        drop(config);
    }
}

/// A Mooncake-style JSONL trace: parsed, turned into accesses and replayed
/// under LRU in a small cache.
pub fn trace_jsonl(data: &[u8]) {
    use qvl_cache::trace::{replay_accesses, Capacity, ReplayPolicy, Trace};
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Capacity::parse_list(text.lines().next().unwrap_or(""));
    let Ok(trace) = Trace::parse(text, Path::new("fuzz.jsonl")) else {
        return;
    };
    let accesses = trace.accesses();
    let unique = trace.unique_blocks();
    if accesses.len() <= 4096 {
        let capacity = (unique / 4).max(1);
        let _ = replay_accesses(
            &accesses,
            ReplayPolicy::Online(qvl_cache::PolicyKind::Lru),
            capacity,
        );
    }
}

/// A swap record as read back from disk, checked against the header it
/// carries (so the checksum and length checks are reached) and against a
/// fixed expectation; an accepted record must re-encode to the same header.
/// The stale-file name parser gets the bytes as a file name.
pub fn swap_record(data: &[u8]) {
    use qvl_core::{BlockKey, CodecId};
    use qvl_swap::format::{encode_header, verify_record, RecordHeader, HEADER_LEN};
    let _ = qvl_swap::dir::owner_pid(&String::from_utf8_lossy(data));
    let fixed = RecordHeader {
        codec: CodecId(0),
        key: BlockKey::from_id(1),
        payload_len: data.len().saturating_sub(HEADER_LEN) as u64,
        generation: 1,
    };
    let _ = verify_record(data, &fixed);
    if data.len() < HEADER_LEN {
        return;
    }
    let u64_at = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&data[at..at + 8]);
        u64::from_le_bytes(b)
    };
    let mut key = [0u8; 16];
    key.copy_from_slice(&data[16..32]);
    let own = RecordHeader {
        codec: CodecId(u16::from_le_bytes([data[10], data[11]])),
        key: BlockKey::from_le_bytes(key),
        payload_len: u64_at(32),
        generation: u64_at(40),
    };
    if let Ok(payload) = verify_record(data, &own) {
        let mut again = [0u8; HEADER_LEN];
        encode_header(&own, payload, &mut again);
        // Bytes 12..16 are reserved but covered by the checksum; a record
        // whose reserved bytes are not zero cannot verify after re-encoding,
        // so compare the fields and the checksum only where they are zero.
        if data[12..16] == [0; 4] {
            assert_eq!(
                &again[..56],
                &data[..56],
                "an accepted record re-encodes differently"
            );
        }
    }
}

/// PNG or JPEG bytes through decoding and the Qwen3-VL preprocessing, with
/// the decode limit lowered so that the fuzzer spends its time on parsing.
pub fn image(data: &[u8]) {
    use qvl_model::preprocess::{preprocess_bytes, ImageProcessorConfig};
    let cfg = ImageProcessorConfig {
        min_pixels: 32 * 32,
        max_pixels: 128 * 128,
        max_decode_pixels: 1 << 20,
        ..ImageProcessorConfig::qwen3_vl()
    };
    let _ = preprocess_bytes(data, &cfg);
}

/// A Hugging Face `tokenizer.json`, then the tokenizer on a short text.
pub fn tokenizer_json(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(tok) = qvl_model::tokenizer::Tokenizer::from_tokenizer_json(text) {
        use_tokenizer(&tok);
    }
}

/// A checkpoint's `config.json` (Qwen3-VL) and `preprocessor_config.json`.
pub fn model_config_json(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = qvl_model::preprocess::ImageProcessorConfig::from_json(text)
        .map(|c| c.validate().map(|()| (c.factor(), c.patch_dim())));
    if let Ok(value) = serde_json::from_str::<serde_json::Value>(text) {
        if let Ok(cfg) = qvl_model::Qwen3VlConfig::from_json(&value, Path::new("config.json")) {
            let _ = cfg.text.validate(Path::new("config.json"));
        }
    }
}

/// A per-process, per-thread scratch file under the temp directory (the
/// config loader reads files only).
fn scratch_file(name: &str) -> PathBuf {
    let thread = format!("{:?}", std::thread::current().id());
    let thread: String = thread.chars().filter(char::is_ascii_digit).collect();
    std::env::temp_dir().join(format!("qvl-fuzz-{}-{thread}-{name}", std::process::id()))
}

/// A small xorshift generator: the mutation loop needs no more.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (0 is replaced: xorshift stays at 0).
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
}

/// Values that often sit on parser boundaries.
const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    7,
    8,
    16,
    32,
    63,
    64,
    255,
    256,
    4095,
    4096,
    65535,
    65536,
    u32::MAX as u64 - 1,
    u32::MAX as u64,
    i64::MAX as u64,
    u64::MAX - 1,
    u64::MAX,
];

/// One random mutation of `input` in the manner of libFuzzer's default
/// mutators: bit flips, byte sets, interesting integers, insertions,
/// deletions, duplicated ranges, splices with `other`, truncation, and
/// ASCII digits changed (text formats carry their numbers in decimal).
pub fn mutate(input: &[u8], other: &[u8], rng: &mut Rng, max_len: usize) -> Vec<u8> {
    let mut out = input.to_vec();
    let rounds = 1 + rng.below(4);
    for _ in 0..rounds {
        let len = out.len();
        match rng.below(10) {
            0 if len > 0 => {
                let i = rng.below(len);
                out[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                out[i] = rng.next_u64() as u8;
            }
            2 if len > 0 => {
                let v = INTERESTING[rng.below(INTERESTING.len())];
                let width = [1usize, 2, 4, 8][rng.below(4)];
                let i = rng.below(len);
                for (k, b) in v.to_le_bytes().iter().take(width).enumerate() {
                    if let Some(slot) = out.get_mut(i + k) {
                        *slot = *b;
                    }
                }
            }
            3 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                out.splice(i..i, bytes);
            }
            4 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                out.drain(i..i + n);
            }
            5 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                let copy = out[i..i + n].to_vec();
                let at = rng.below(len + 1);
                out.splice(at..at, copy);
            }
            6 if !other.is_empty() => {
                let cut = rng.below(len + 1);
                let from = rng.below(other.len());
                out.truncate(cut);
                out.extend_from_slice(&other[from..]);
            }
            7 if len > 0 => {
                out.truncate(rng.below(len));
            }
            8 => {
                let digits: Vec<usize> = out
                    .iter()
                    .enumerate()
                    .filter(|(_, b)| b.is_ascii_digit())
                    .map(|(i, _)| i)
                    .collect();
                if !digits.is_empty() {
                    let i = digits[rng.below(digits.len())];
                    let replacement = match rng.below(3) {
                        0 => INTERESTING[rng.below(INTERESTING.len())].to_string(),
                        1 => "-1".to_string(),
                        _ => (rng.below(10)).to_string(),
                    };
                    out.splice(i..=i, replacement.into_bytes());
                }
            }
            _ => {
                if len > 0 {
                    let i = rng.below(len);
                    out[i] = out[i].wrapping_add(1 + rng.below(3) as u8);
                }
            }
        }
    }
    out.truncate(max_len);
    out
}
