//! # qvl-model
//!
//! The models qvl serves, on CPU: Qwen3-VL from Hugging Face checkpoint
//! directories, and llama-family models from GGUF files.
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod fetch;
pub mod gguf;
pub mod preprocess;
pub mod tokenizer;
