//! Byte-level BPE tokenizer built from GGUF metadata (`tokenizer.ggml.*`) or
//! from a Hugging Face `tokenizer.json` ([`Tokenizer::from_hf_dir`], no
//! `tokenizers` crate needed), streaming decode, and the ChatML chat
//! template of instruct models.
//!
//! Encoding follows what Hugging Face `transformers` builds from the same
//! GGUF (the reference the goldens were made with): control and
//! user-defined tokens are matched in the text first, the rest is split by
//! the pre-tokenizer regex, each piece is mapped to GPT-2 byte-level
//! characters and merged by rank.
//!
//! The pre-tokenizer comes from `tokenizer.ggml.pre`:
//! - `qwen2` (Qwen2/Qwen3 models): the Qwen2 regex, one digit per piece;
//! - `llama-bpe`/`llama3`: the Llama 3 regex (up to three digits per piece);
//! - anything else (`gpt2`, `smollm`, ...): the GPT-2 regex, which is what
//!   transformers applies to llama-architecture GGUFs. llama.cpp and the
//!   original SmolLM2 `tokenizer.json` additionally split digits one by one:
//!   choose [`PreTokenizer::Gpt2DigitsSplit`] with
//!   [`Tokenizer::with_pre_tokenizer`] to get that behaviour.
//!
//! ```no_run
//! use qvl_model::gguf::GgufFile;
//! use qvl_model::tokenizer::{ChatMessage, Tokenizer};
//! let gguf = GgufFile::open("SmolLM2-135M-Instruct.Q4_1.gguf")?;
//! let tok = Tokenizer::from_gguf(gguf.header())?;
//! let prompt = tok.apply_chat_template(&[ChatMessage::user("Hi!")], true)?;
//! let ids = tok.encode(&prompt, true);
//! assert_eq!(tok.decode(&ids), prompt);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::HashMap;

use fancy_regex::Regex;
use unicode_normalization::UnicodeNormalization;

use crate::gguf::{GgufError, GgufHeader};

/// What can go wrong building or using a tokenizer, grouped by cause.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The GGUF metadata is missing a key or has a wrong type.
    #[error("tokenizer metadata: {0}")]
    Metadata(#[from] GgufError),
    /// The tokenizer model is not byte-level BPE.
    #[error("tokenizer.ggml.model is {0:?}; only byte-level BPE (\"gpt2\") is supported")]
    UnsupportedModel(String),
    /// The vocabulary or merges do not hold together.
    #[error("tokenizer vocabulary: {0}")]
    BadVocab(String),
    /// A chat template this crate does not know how to apply.
    #[error(
        "unsupported chat template (only ChatML with <|im_start|>/<|im_end|> is implemented): {0}"
    )]
    UnsupportedChatTemplate(String),
    /// A token id outside the vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab} tokens")]
    BadTokenId {
        /// The id.
        id: u32,
        /// The vocabulary size.
        vocab: usize,
    },
}

/// Result of this module.
pub type Result<T, E = TokenizerError> = std::result::Result<T, E>;

/// Kinds of tokens, as `tokenizer.ggml.token_type` numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    /// An ordinary token (1).
    Normal,
    /// The unknown token (2).
    Unknown,
    /// A control token such as `<|im_start|>` (3): matched whole in text.
    Control,
    /// A user-defined token (4): matched whole in text.
    UserDefined,
    /// Unused slot (5).
    Unused,
    /// A raw byte `<0xXX>` (6).
    Byte,
}

impl TokenType {
    fn from_id(v: i64) -> Self {
        match v {
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Normal,
        }
    }
}

/// The regex that splits text into pieces before BPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreTokenizer {
    /// GPT-2: contractions, letters, numbers, punctuation, whitespace.
    Gpt2,
    /// Each digit on its own, then GPT-2 (llama.cpp `smollm`, SmolLM2's tokenizer.json).
    Gpt2DigitsSplit,
    /// Llama 3 (`llama-bpe`).
    Llama3,
    /// Qwen2 / Qwen3 (`qwen2`).
    Qwen2,
    /// Stages read from a `tokenizer.json` (see [`Tokenizer::from_tokenizer_json`]).
    Custom,
}

const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl PreTokenizer {
    /// The pre-tokenizer for a `tokenizer.ggml.pre` value.
    pub fn for_gguf_pre(pre: &str) -> Self {
        match pre {
            "qwen2" | "deepseek-r1-qwen" => Self::Qwen2,
            "llama-bpe" | "llama3" => Self::Llama3,
            _ => Self::Gpt2,
        }
    }

    /// The regexes applied one after the other; each splits every piece
    /// into its matches and the text between them.
    fn stage_patterns(self) -> &'static [&'static str] {
        match self {
            Self::Gpt2 => &[GPT2_PATTERN],
            Self::Gpt2DigitsSplit => &[r"\p{N}", GPT2_PATTERN],
            Self::Llama3 => &[LLAMA3_PATTERN],
            Self::Qwen2 => &[QWEN2_PATTERN],
            Self::Custom => &[],
        }
    }
}

/// One message of a chat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message with any role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
}

/// A byte-level BPE tokenizer.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    /// Token strings as stored (byte-level characters for normal tokens).
    tokens: Vec<String>,
    /// The raw bytes each token stands for.
    token_bytes: Vec<Vec<u8>>,
    token_types: Vec<TokenType>,
    token_ids: HashMap<String, u32>,
    /// (left, right) -> (rank, merged token).
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Tokens matched whole in text, longest first.
    specials: Vec<(String, u32)>,
    /// Token id of each of the 256 byte-level characters.
    byte_token: [Option<u32>; 256],
    pre: PreTokenizer,
    /// Pre-tokenizer stages (see [`PreTokenizer::stage_patterns`]).
    stages: Vec<Regex>,
    /// Unicode NFC before anything else (Qwen2's tokenizer.json asks for it).
    nfc: bool,
    /// Emit a piece that is already a token whole, without merging (Llama 3).
    ignore_merges: bool,
    /// Tokens the post-processor puts before / after the text (e.g. BOS).
    prefix_ids: Vec<u32>,
    suffix_ids: Vec<u32>,
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    pad: Option<u32>,
    add_bos: bool,
    chat_template: Option<String>,
}

/// GPT-2's reversible map from bytes to printable characters: printable
/// Latin-1 bytes map to themselves, the others to U+0100 onwards in order.
const BYTE_TO_CHAR: [char; 256] = {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    let mut b = 0usize;
    while b < 256 {
        let printable = (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || b >= 0xae;
        table[b] = if printable {
            b as u8 as char
        } else {
            n += 1;
            // 255 + n stays below 0x144, always a valid char.
            match char::from_u32(255 + n) {
                Some(c) => c,
                None => '\u{fffd}',
            }
        };
        b += 1;
    }
    table
};

fn byte_to_char_table() -> [char; 256] {
    BYTE_TO_CHAR
}

fn char_to_byte_map() -> HashMap<char, u8> {
    byte_to_char_table()
        .iter()
        .enumerate()
        .map(|(b, &c)| (c, b as u8))
        .collect()
}

fn compile(pattern: &str) -> Result<Regex> {
    Regex::new(pattern).map_err(|e| TokenizerError::BadVocab(format!("pre-tokenizer regex: {e}")))
}

fn compile_stages(patterns: &[&str]) -> Result<Vec<Regex>> {
    patterns.iter().map(|p| compile(p)).collect()
}

impl Tokenizer {
    /// Builds the tokenizer from `tokenizer.ggml.*` metadata.
    pub fn from_gguf(h: &GgufHeader) -> Result<Self> {
        let model = h.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(TokenizerError::UnsupportedModel(model.to_string()));
        }
        let tokens: Vec<String> = h
            .get_array("tokenizer.ggml.tokens")?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| TokenizerError::BadVocab(format!("token {i} is not a string")))
            })
            .collect::<Result<_>>()?;
        let types = match h.get("tokenizer.ggml.token_type") {
            Some(_) => h
                .get_array("tokenizer.ggml.token_type")?
                .iter()
                .map(|v| TokenType::from_id(v.as_i64().unwrap_or(1)))
                .collect(),
            None => vec![TokenType::Normal; tokens.len()],
        };
        let merges: Vec<String> = match h.get("tokenizer.ggml.merges") {
            Some(_) => h
                .get_array("tokenizer.ggml.merges")?
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            None => Vec::new(),
        };
        let id = |key: &str| -> Result<Option<u32>> {
            match h.get(key) {
                None => Ok(None),
                Some(_) => Ok(Some(h.get_u64(key)? as u32)),
            }
        };
        let pre = match h.get("tokenizer.ggml.pre") {
            Some(_) => PreTokenizer::for_gguf_pre(h.get_str("tokenizer.ggml.pre")?),
            None => PreTokenizer::Gpt2,
        };
        let mut tok = Self::new(tokens, types, &merges, pre)?;
        tok.bos = id("tokenizer.ggml.bos_token_id")?;
        tok.eos = id("tokenizer.ggml.eos_token_id")?;
        tok.unk = id("tokenizer.ggml.unknown_token_id")?;
        tok.pad = id("tokenizer.ggml.padding_token_id")?;
        tok.add_bos = match h.get("tokenizer.ggml.add_bos_token") {
            Some(_) => h.get_bool("tokenizer.ggml.add_bos_token")?,
            None => false,
        };
        tok.chat_template = h
            .get("tokenizer.chat_template")
            .and_then(|v| v.as_str())
            .map(str::to_string);
        let vocab = tok.tokens.len();
        for (name, v) in [
            ("bos", tok.bos),
            ("eos", tok.eos),
            ("unknown", tok.unk),
            ("padding", tok.pad),
        ] {
            if let Some(v) = v.filter(|&v| v as usize >= vocab) {
                return Err(TokenizerError::BadVocab(format!(
                    "{name} token id {v} is outside the vocabulary of {vocab}"
                )));
            }
        }
        Ok(tok)
    }

    /// Builds a tokenizer from its parts: token strings (byte-level
    /// characters), their types, merges as `"left right"` in rank order.
    pub fn new(
        tokens: Vec<String>,
        token_types: Vec<TokenType>,
        merges: &[String],
        pre: PreTokenizer,
    ) -> Result<Self> {
        if tokens.is_empty() || tokens.len() > u32::MAX as usize {
            return Err(TokenizerError::BadVocab(format!("{} tokens", tokens.len())));
        }
        if token_types.len() != tokens.len() {
            return Err(TokenizerError::BadVocab(format!(
                "{} token types for {} tokens",
                token_types.len(),
                tokens.len()
            )));
        }
        let mut token_ids = HashMap::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            // Duplicates keep the first id, as transformers does; empty slots are no token.
            if !t.is_empty() {
                token_ids.entry(t.clone()).or_insert(i as u32);
            }
        }
        let char_to_byte = char_to_byte_map();
        let token_bytes = tokens
            .iter()
            .zip(&token_types)
            .map(|(t, ty)| match ty {
                TokenType::Byte => {
                    parse_byte_token(t).map_or_else(|| t.as_bytes().to_vec(), |b| vec![b])
                }
                TokenType::Control | TokenType::UserDefined | TokenType::Unknown => {
                    t.as_bytes().to_vec()
                }
                _ => t
                    .chars()
                    .map(|c| char_to_byte.get(&c).copied())
                    .collect::<Option<Vec<u8>>>()
                    .unwrap_or_else(|| t.as_bytes().to_vec()),
            })
            .collect();
        let mut merge_map = HashMap::with_capacity(merges.len());
        for (rank, m) in merges.iter().enumerate() {
            // The left part has at least one character (it may itself be a space-like char).
            let first_len = m.chars().next().map_or(0, char::len_utf8);
            let split = m[first_len..].find(' ').map(|p| p + first_len);
            let Some(split) = split else {
                return Err(TokenizerError::BadVocab(format!(
                    "merge {rank} ({m:?}) has no space"
                )));
            };
            let (left, right) = (&m[..split], &m[split + 1..]);
            let (Some(&l), Some(&r)) = (token_ids.get(left), token_ids.get(right)) else {
                return Err(TokenizerError::BadVocab(format!(
                    "merge {rank} ({m:?}) uses a token that is not in the vocabulary"
                )));
            };
            // A merge whose result is not a token can never apply; skip it like transformers.
            if let Some(&merged) = token_ids.get(&format!("{left}{right}")) {
                merge_map.entry((l, r)).or_insert((rank as u32, merged));
            }
        }
        let mut specials: Vec<(String, u32)> = tokens
            .iter()
            .zip(&token_types)
            .enumerate()
            .filter(|(_, (t, ty))| {
                !t.is_empty() && matches!(ty, TokenType::Control | TokenType::UserDefined)
            })
            .map(|(i, (t, _))| (t.clone(), i as u32))
            .collect();
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        let table = byte_to_char_table();
        let mut byte_token = [None; 256];
        for (b, slot) in byte_token.iter_mut().enumerate() {
            *slot = token_ids
                .get(&table[b].to_string())
                .copied()
                .or_else(|| token_ids.get(&format!("<0x{b:02X}>")).copied());
        }
        Ok(Self {
            tokens,
            token_bytes,
            token_types,
            token_ids,
            merges: merge_map,
            specials,
            byte_token,
            pre,
            stages: compile_stages(pre.stage_patterns())?,
            nfc: false,
            ignore_merges: false,
            prefix_ids: Vec::new(),
            suffix_ids: Vec::new(),
            bos: None,
            eos: None,
            unk: None,
            pad: None,
            add_bos: false,
            chat_template: None,
        })
    }

    /// Builds a byte-level BPE tokenizer from the text of a Hugging Face
    /// `tokenizer.json` (Qwen2/Qwen3, Llama 3, GPT-2, SmolLM2 styles).
    ///
    /// Supported: a `BPE` model with byte-level tokens, `NFC` or no
    /// normalizer, pre-tokenizers made of `Split` (regex, isolated),
    /// `Digits` and `ByteLevel`, and a `TemplateProcessing` or `ByteLevel`
    /// post-processor. Anything else is refused with the part named.
    pub fn from_tokenizer_json(text: &str) -> Result<Self> {
        use serde_json::Value;
        let bad = |m: String| TokenizerError::BadVocab(format!("tokenizer.json: {m}"));
        let v: Value = serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
        let model = &v["model"];
        if model["type"].as_str() != Some("BPE") {
            return Err(TokenizerError::UnsupportedModel(format!(
                "tokenizer.json model {}",
                model["type"]
            )));
        }
        if model["continuing_subword_prefix"]
            .as_str()
            .is_some_and(|p| !p.is_empty())
            || model["end_of_word_suffix"]
                .as_str()
                .is_some_and(|p| !p.is_empty())
        {
            return Err(bad(
                "subword prefixes/suffixes are not byte-level BPE".into()
            ));
        }
        // Vocabulary: model.vocab plus added tokens, indexed by id.
        let vocab = model["vocab"]
            .as_object()
            .ok_or_else(|| bad("model.vocab is not a map".into()))?;
        let added = v["added_tokens"].as_array().cloned().unwrap_or_default();
        let id_of = |x: &Value, what: &str| -> Result<usize> {
            x.as_u64()
                .filter(|&i| i < (1 << 24))
                .map(|i| i as usize)
                .ok_or_else(|| bad(format!("{what} has no valid id")))
        };
        let mut max_id = 0usize;
        for (tok, id) in vocab {
            max_id = max_id.max(id_of(id, tok)?);
        }
        for a in &added {
            max_id = max_id.max(id_of(&a["id"], "an added token")?);
        }
        let mut tokens = vec![String::new(); max_id + 1];
        let mut types = vec![TokenType::Unused; max_id + 1];
        for (tok, id) in vocab {
            let id = id_of(id, tok)?;
            tokens[id] = tok.clone();
            types[id] = TokenType::Normal;
        }
        for a in &added {
            let id = id_of(&a["id"], "an added token")?;
            let content = a["content"]
                .as_str()
                .ok_or_else(|| bad(format!("added token {id} has no content")))?;
            tokens[id] = content.to_string();
            types[id] = if a["special"].as_bool().unwrap_or(false) {
                TokenType::Control
            } else {
                TokenType::UserDefined
            };
        }
        let merges: Vec<String> = match model["merges"].as_array() {
            None => Vec::new(),
            Some(list) => list
                .iter()
                .map(|m| match m {
                    Value::String(s) => Ok(s.clone()),
                    Value::Array(pair) => match (
                        pair.first().and_then(Value::as_str),
                        pair.get(1).and_then(Value::as_str),
                    ) {
                        (Some(a), Some(b)) if pair.len() == 2 => Ok(format!("{a} {b}")),
                        _ => Err(bad(format!("merge {m} is not a pair of strings"))),
                    },
                    _ => Err(bad(format!("merge {m} is not a string or a pair"))),
                })
                .collect::<Result<_>>()?,
        };
        let nfc = match &v["normalizer"] {
            Value::Null => false,
            n if n["type"] == "NFC" => true,
            n if n["type"] == "Sequence"
                && n["normalizers"].as_array().is_some_and(|a| a.is_empty()) =>
            {
                false
            }
            n => return Err(bad(format!("unsupported normalizer {}", n["type"]))),
        };
        let patterns = pre_tokenizer_patterns(&v["pre_tokenizer"]).map_err(bad)?;
        let mut tok = Self::new(tokens, types, &merges, PreTokenizer::Custom)?;
        tok.stages = patterns.iter().map(|p| compile(p)).collect::<Result<_>>()?;
        tok.nfc = nfc;
        tok.ignore_merges = model["ignore_merges"].as_bool().unwrap_or(false);
        tok.unk = model["unk_token"].as_str().and_then(|u| tok.token_id(u));
        // TemplateProcessing: special tokens around the single sequence "A".
        if let Some(single) = v["post_processor"]["single"].as_array() {
            let mut seen_seq = false;
            for piece in single {
                if piece.get("Sequence").is_some() {
                    seen_seq = true;
                } else if let Some(name) = piece["SpecialToken"]["id"].as_str() {
                    let id = tok.token_id(name).ok_or_else(|| {
                        bad(format!(
                            "post-processor token {name:?} is not in the vocabulary"
                        ))
                    })?;
                    if seen_seq {
                        tok.suffix_ids.push(id)
                    } else {
                        tok.prefix_ids.push(id)
                    }
                }
            }
        }
        Ok(tok)
    }

    /// Loads `tokenizer.json` from a Hugging Face checkpoint directory, with
    /// BOS/EOS, `add_bos_token` and the chat template from
    /// `tokenizer_config.json` (or `chat_template.json` / `chat_template.jinja`)
    /// when present.
    pub fn from_hf_dir(dir: &std::path::Path) -> Result<Self> {
        let read = |name: &str| std::fs::read_to_string(dir.join(name));
        let text = read("tokenizer.json").map_err(|e| {
            TokenizerError::BadVocab(format!(
                "cannot read {}: {e}",
                dir.join("tokenizer.json").display()
            ))
        })?;
        let mut tok = Self::from_tokenizer_json(&text)?;
        let token_of = |v: &serde_json::Value| -> Option<String> {
            v.as_str()
                .map(str::to_string)
                .or_else(|| v["content"].as_str().map(str::to_string))
        };
        if let Ok(cfg) = read("tokenizer_config.json") {
            let cfg: serde_json::Value = serde_json::from_str(&cfg).map_err(|e| {
                TokenizerError::BadVocab(format!("tokenizer_config.json in {}: {e}", dir.display()))
            })?;
            tok.bos = token_of(&cfg["bos_token"]).and_then(|t| tok.token_id(&t));
            tok.eos = token_of(&cfg["eos_token"]).and_then(|t| tok.token_id(&t));
            tok.pad = token_of(&cfg["pad_token"]).and_then(|t| tok.token_id(&t));
            tok.add_bos = cfg["add_bos_token"].as_bool().unwrap_or(false);
            tok.chat_template = cfg["chat_template"].as_str().map(str::to_string);
        }
        if let Ok(t) = read("chat_template.json") {
            let t: serde_json::Value = serde_json::from_str(&t).map_err(|e| {
                TokenizerError::BadVocab(format!("chat_template.json in {}: {e}", dir.display()))
            })?;
            tok.chat_template = t["chat_template"]
                .as_str()
                .map(str::to_string)
                .or(tok.chat_template);
        }
        if let Ok(t) = read("chat_template.jinja") {
            tok.chat_template = Some(t);
        }
        Ok(tok)
    }

    /// The same tokenizer with another pre-tokenizer.
    pub fn with_pre_tokenizer(mut self, pre: PreTokenizer) -> Result<Self> {
        self.stages = compile_stages(pre.stage_patterns())?;
        self.pre = pre;
        Ok(self)
    }

    /// The pre-tokenizer in use.
    pub fn pre_tokenizer(&self) -> PreTokenizer {
        self.pre
    }

    /// Number of tokens.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// Beginning-of-sequence token.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// End-of-sequence token (generation stops there).
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Unknown token.
    pub fn unk_id(&self) -> Option<u32> {
        self.unk
    }

    /// Padding token.
    pub fn pad_id(&self) -> Option<u32> {
        self.pad
    }

    /// Whether [`Tokenizer::encode`] with `add_special` puts the BOS token first.
    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    /// The raw Jinja chat template from the metadata, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The id of a token string (as stored, byte-level characters).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.token_ids.get(token).copied()
    }

    /// The stored string of a token.
    pub fn token_str(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// The type of a token.
    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.token_types.get(id as usize).copied()
    }

    /// Whether `id` is a control token (e.g. `<|im_end|>`).
    pub fn is_control(&self, id: u32) -> bool {
        self.token_type(id) == Some(TokenType::Control)
    }

    /// Token ids of `text`. Control and user-defined tokens written in the
    /// text are recognised; `add_special` prepends BOS when the model asks
    /// for it (`tokenizer.ggml.add_bos_token`).
    pub fn encode(&self, text: &str, add_special: bool) -> Vec<u32> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 2);
        if add_special {
            if self.add_bos && !self.prefix_ids.contains(&self.bos.unwrap_or(u32::MAX)) {
                ids.extend(self.bos);
            }
            ids.extend_from_slice(&self.prefix_ids);
        }
        let mut rest = text;
        while !rest.is_empty() {
            match self.next_special(rest) {
                Some((at, token, id)) => {
                    self.encode_ordinary_into(&rest[..at], &mut ids);
                    ids.push(id);
                    rest = &rest[at + token.len()..];
                }
                None => {
                    self.encode_ordinary_into(rest, &mut ids);
                    break;
                }
            }
        }
        if add_special {
            ids.extend_from_slice(&self.suffix_ids);
        }
        ids
    }

    /// Token ids of `text` with no special-token matching (control token
    /// strings are encoded as ordinary text).
    pub fn encode_ordinary(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        self.encode_ordinary_into(text, &mut ids);
        ids
    }

    /// The leftmost special token in `text`, longest first at a position.
    fn next_special<'s>(&'s self, text: &str) -> Option<(usize, &'s str, u32)> {
        if self.specials.is_empty() {
            return None;
        }
        text.char_indices().find_map(|(i, _)| {
            let here = &text[i..];
            self.specials
                .iter()
                .find(|(s, _)| here.starts_with(s.as_str()))
                .map(|(s, id)| (i, s.as_str(), *id))
        })
    }

    fn encode_ordinary_into(&self, text: &str, ids: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        let normalized;
        let text = if self.nfc {
            normalized = text.nfc().collect::<String>();
            normalized.as_str()
        } else {
            text
        };
        self.split_and_encode(text, &self.stages, ids);
    }

    /// Splits `text` by the first stage into matches and the gaps between
    /// them, passes each piece to the next stage, and BPE-encodes what the
    /// last stage leaves.
    fn split_and_encode(&self, text: &str, stages: &[Regex], ids: &mut Vec<u32>) {
        let Some((regex, rest)) = stages.split_first() else {
            self.bpe(text, ids);
            return;
        };
        let mut last = 0;
        for m in regex.find_iter(text) {
            // A backtracking-limit error leaves the rest as one piece rather than failing.
            let Ok(m) = m else { break };
            if m.start() > last {
                self.split_and_encode(&text[last..m.start()], rest, ids);
            }
            if m.end() > m.start() {
                self.split_and_encode(m.as_str(), rest, ids);
            }
            last = m.end();
        }
        if last < text.len() {
            self.split_and_encode(&text[last..], rest, ids);
        }
    }

    /// Merges the byte-level symbols of one piece by rank.
    fn bpe(&self, piece: &str, ids: &mut Vec<u32>) {
        let mut symbols: Vec<u32> = Vec::with_capacity(piece.len());
        // A byte no token stands for (and no unknown token) cannot be emitted.
        symbols.extend(
            piece
                .as_bytes()
                .iter()
                .filter_map(|&b| self.byte_token[b as usize].or(self.unk)),
        );
        if self.ignore_merges && symbols.len() > 1 {
            let whole: String = piece.bytes().map(|b| BYTE_TO_CHAR[b as usize]).collect();
            if let Some(&id) = self.token_ids.get(&whole) {
                ids.push(id);
                return;
            }
        }
        loop {
            let best = symbols
                .windows(2)
                .enumerate()
                .filter_map(|(i, w)| {
                    self.merges
                        .get(&(w[0], w[1]))
                        .map(|&(rank, merged)| (rank, i, w[0], w[1], merged))
                })
                .min();
            let Some((_, _, l, r, merged)) = best else {
                break;
            };
            // Merge every occurrence of the best pair, left to right.
            let mut out = Vec::with_capacity(symbols.len());
            let mut i = 0;
            while i < symbols.len() {
                if i + 1 < symbols.len() && symbols[i] == l && symbols[i + 1] == r {
                    out.push(merged);
                    i += 2;
                } else {
                    out.push(symbols[i]);
                    i += 1;
                }
            }
            symbols = out;
        }
        ids.extend_from_slice(&symbols);
    }

    /// The bytes `ids` stand for, concatenated (control tokens as their text).
    pub fn decode_bytes(&self, ids: &[u32]) -> Vec<u8> {
        let mut out = Vec::new();
        for &id in ids {
            if let Some(b) = self.token_bytes.get(id as usize) {
                out.extend_from_slice(b);
            }
        }
        out
    }

    /// Text of `ids`; invalid UTF-8 (a cut multi-byte character) becomes U+FFFD.
    /// Ids outside the vocabulary are skipped.
    pub fn decode(&self, ids: &[u32]) -> String {
        String::from_utf8_lossy(&self.decode_bytes(ids)).into_owned()
    }

    /// Text of `ids`, refusing ids outside the vocabulary.
    pub fn decode_checked(&self, ids: &[u32]) -> Result<String> {
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.tokens.len()) {
            return Err(TokenizerError::BadTokenId {
                id,
                vocab: self.tokens.len(),
            });
        }
        Ok(self.decode(ids))
    }

    /// A streaming decoder: feed ids one at a time, get text as soon as it
    /// forms whole UTF-8 characters.
    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder {
            tokenizer: self,
            pending: Vec::new(),
        }
    }

    /// Renders a chat with the model's template (ChatML), ending with the
    /// assistant header when `add_generation_prompt`.
    ///
    /// Templates that inject a default system prompt when the chat has none
    /// (SmolLM2 does) are honoured.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.chat_template.as_deref().unwrap_or("<|im_start|>");
        if !template.contains("<|im_start|>") {
            let head: String = template.chars().take(120).collect();
            return Err(TokenizerError::UnsupportedChatTemplate(head));
        }
        let mut out = String::new();
        if messages.first().is_none_or(|m| m.role != "system") {
            if let Some(system) = default_system_prompt(template) {
                out.push_str(&format!("<|im_start|>system\n{system}<|im_end|>\n"));
            }
        }
        for m in messages {
            out.push_str(&format!(
                "<|im_start|>{}\n{}<|im_end|>\n",
                m.role, m.content
            ));
        }
        if add_generation_prompt {
            out.push_str("<|im_start|>assistant\n");
        }
        Ok(out)
    }
}

/// The system prompt a ChatML template inserts when the chat has none
/// (a literal `'<|im_start|>system\n...<|im_end|>` inside the template).
fn default_system_prompt(template: &str) -> Option<String> {
    const START: &str = "'<|im_start|>system\\n";
    const START_REAL: &str = "'<|im_start|>system\n";
    let (at, skip) = template
        .find(START)
        .map(|a| (a, START.len()))
        .or_else(|| template.find(START_REAL).map(|a| (a, START_REAL.len())))?;
    let rest = &template[at + skip..];
    let end = rest.find("<|im_end|>")?;
    let text = &rest[..end];
    // A template expression instead of a literal (e.g. messages[0]['content']) is not a default.
    if text.contains('\'') || text.contains("{{") {
        return None;
    }
    Some(text.replace("\\n", "\n"))
}

/// The regex stages of a tokenizer.json pre-tokenizer, or what is unsupported.
fn pre_tokenizer_patterns(pre: &serde_json::Value) -> std::result::Result<Vec<String>, String> {
    use serde_json::Value;
    let mut out = Vec::new();
    let list: Vec<Value> = match pre {
        Value::Null => return Ok(out),
        p if p["type"] == "Sequence" => p["pretokenizers"].as_array().cloned().unwrap_or_default(),
        p => vec![p.clone()],
    };
    for p in &list {
        match p["type"].as_str() {
            Some("ByteLevel") => {
                if p["add_prefix_space"].as_bool() == Some(true) {
                    return Err("ByteLevel with add_prefix_space is not supported".into());
                }
                if p["use_regex"].as_bool().unwrap_or(true) {
                    out.push(GPT2_PATTERN.to_string());
                }
            }
            Some("Digits") => out.push(
                if p["individual_digits"].as_bool().unwrap_or(false) {
                    r"\p{N}"
                } else {
                    r"\p{N}+"
                }
                .to_string(),
            ),
            Some("Split") => {
                let behavior = p["behavior"].as_str().unwrap_or("Isolated");
                if behavior != "Isolated" || p["invert"].as_bool() == Some(true) {
                    return Err(format!(
                        "Split with behavior {behavior} / invert is not supported"
                    ));
                }
                let pattern = match (&p["pattern"]["Regex"], &p["pattern"]["String"]) {
                    (Value::String(r), _) => r.clone(),
                    (_, Value::String(s)) => fancy_regex::escape(s).into_owned(),
                    _ => {
                        return Err(format!(
                            "Split pattern {} is not a regex or string",
                            p["pattern"]
                        ))
                    }
                };
                out.push(pattern);
            }
            other => return Err(format!("unsupported pre-tokenizer {other:?}")),
        }
    }
    Ok(out)
}

fn parse_byte_token(t: &str) -> Option<u8> {
    let hex = t.strip_prefix("<0x")?.strip_suffix('>')?;
    u8::from_str_radix(hex, 16).ok()
}

/// Incremental decoding for streamed generation (see [`Tokenizer::stream_decoder`]).
#[derive(Debug)]
pub struct StreamDecoder<'t> {
    tokenizer: &'t Tokenizer,
    pending: Vec<u8>,
}

impl StreamDecoder<'_> {
    /// Adds one token; returns the text that is now complete (possibly empty
    /// while a multi-byte character is split across tokens).
    pub fn push(&mut self, id: u32) -> String {
        if let Some(b) = self.tokenizer.token_bytes.get(id as usize) {
            self.pending.extend_from_slice(b);
        }
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // valid_up_to marks a UTF-8 boundary, so this slice is valid.
                    out.push_str(std::str::from_utf8(&self.pending[..valid]).unwrap_or_default());
                    match e.error_len() {
                        // Invalid bytes: replace them and go on.
                        Some(bad) => {
                            out.push('\u{fffd}');
                            self.pending.drain(..valid + bad);
                        }
                        // An incomplete character at the end: wait for more bytes.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                    }
                }
            }
        }
    }

    /// Flushes what is left (an unfinished character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy() -> Tokenizer {
        let table = byte_to_char_table();
        let mut tokens: Vec<String> = vec!["<|im_start|>".into(), "<|im_end|>".into()];
        tokens.extend(table.iter().map(|c| c.to_string()));
        for t in [
            "he", "ll", "llo", "hello", "Ġw", "Ġwor", "or", "ld", "Ġworld",
        ] {
            tokens.push(t.into());
        }
        let mut types = vec![TokenType::Control; 2];
        types.resize(tokens.len(), TokenType::Normal);
        let merges: Vec<String> = [
            "h e", "l l", "ll o", "he llo", "o r", "Ġ w", "Ġw or", "l d", "Ġwor ld",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        Tokenizer::new(tokens, types, &merges, PreTokenizer::Gpt2).unwrap()
    }

    #[test]
    fn merges_by_rank_and_round_trips() {
        let t = toy();
        let ids = t.encode("hello world", false);
        let strs: Vec<&str> = ids.iter().map(|&i| t.token_str(i).unwrap()).collect();
        assert_eq!(strs, ["hello", "Ġworld"]);
        assert_eq!(t.decode(&ids), "hello world");
        for text in ["", "héllo\n\n  wörld!! 123", "日本語 🎉", "a\tb\r\nc   "] {
            assert_eq!(t.decode(&t.encode(text, false)), text);
        }
    }

    #[test]
    fn special_tokens_are_matched_in_text_only_when_asked() {
        let t = toy();
        let ids = t.encode("<|im_start|>hello<|im_end|>", false);
        assert_eq!(ids.first(), Some(&0));
        assert_eq!(ids.last(), Some(&1));
        assert!(t.encode_ordinary("<|im_start|>").len() > 1);
        assert_eq!(t.decode(&ids), "<|im_start|>hello<|im_end|>");
    }

    #[test]
    fn stream_decoder_waits_for_whole_characters() {
        let t = toy();
        let text = "a🎉é";
        let ids = t.encode(text, false);
        let mut d = t.stream_decoder();
        let mut pieces = Vec::new();
        for &id in &ids {
            pieces.push(d.push(id));
        }
        pieces.push(d.finish());
        assert_eq!(pieces.concat(), text);
        // The emoji is four byte tokens: nothing is emitted until the last one.
        assert_eq!(pieces[1..4].concat(), "");
        assert_eq!(pieces[4], "🎉");
        // An invalid byte becomes U+FFFD; a dangling lead byte is flushed as U+FFFD.
        let bad = t.byte_token[0xff].unwrap();
        let lead = t.byte_token[0xe6].unwrap();
        let mut d = t.stream_decoder();
        assert_eq!(d.push(bad), "\u{fffd}");
        assert_eq!(d.push(lead), "");
        assert_eq!(d.finish(), "\u{fffd}");
    }

    #[test]
    fn chatml_template_with_default_system_prompt() {
        let mut t = toy();
        t.chat_template = Some("{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are nice<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}".into());
        let s = t
            .apply_chat_template(&[ChatMessage::user("Hi")], true)
            .unwrap();
        assert_eq!(s, "<|im_start|>system\nYou are nice<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
        let s = t
            .apply_chat_template(&[ChatMessage::system("S"), ChatMessage::user("Hi")], false)
            .unwrap();
        assert_eq!(
            s,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
        t.chat_template = Some("{{ bos_token }}[INST] x [/INST]".into());
        assert!(matches!(
            t.apply_chat_template(&[ChatMessage::user("Hi")], true),
            Err(TokenizerError::UnsupportedChatTemplate(_))
        ));
    }

    #[test]
    fn byte_table_is_gpt2s() {
        let t = byte_to_char_table();
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[b'A' as usize], 'A');
        assert_eq!(char_to_byte_map().len(), 256);
    }
}
