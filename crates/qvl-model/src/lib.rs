//! # qvl-model
//!
//! The models qvl serves, on CPU: Qwen3-VL from Hugging Face checkpoint
//! directories, and llama-family models from GGUF files.
//!
//! Qwen3-VL: [`Qwen3VlModel::load`] a checkpoint directory, then
//! [`generate`] greedily or drive a [`Session`] with
//! [`Qwen3VlModel::prefill`] and [`Qwen3VlModel::decode_step`];
//! [`golden::check_qwen3vl`] compares against reference outputs.
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod batch;
pub mod checkpoint;
pub mod config;
mod error;
pub mod fetch;
pub mod gguf;
pub mod golden;
pub mod kv;
pub mod linear;
pub mod llama;
pub mod ops;
pub mod preprocess;
pub mod qweight;
pub mod qwen3vl;
pub mod random;
pub mod tensor;
pub mod text;
pub mod tokenizer;
pub mod vision;

pub use checkpoint::{HfCheckpoint, MemoryWeights, SafetensorsFile, WeightSource};
pub use config::{DecoderConfig, Qwen3VlConfig, RopeConfig, RopeKind, VisionConfig};
pub use error::{ModelError, Result};
pub use kv::{HostKvStorage, KvBlockStorage, KvLayout, PagedKvCache};
pub use qweight::{BlockFormat, LoadOptions, WeightFormat, WeightReport};
pub use qwen3vl::{generate, generate_in, ImageInput, Qwen3VlModel, Session};
pub use tensor::StoredTensor;
pub use text::{BatchSequence, DecoderTensorNames, Logits, TextDecoder};
