//! Test scaffolding shared by the KV storage adapters' tests: a tiny random
//! decoder and greedy generation over any paged KV cache.

use qvl_core::DType;
use qvl_model::config::{DecoderConfig, RopeConfig, RopeKind};
use qvl_model::ops::{argmax, Activation};
use qvl_model::random::{decoder_tensor_shapes, random_weights};
use qvl_model::text::Logits;
use qvl_model::{DecoderTensorNames, PagedKvCache, TextDecoder};

/// A 3-layer decoder (hidden 64, 4 heads, 2 KV heads) with seeded random weights.
pub(crate) fn tiny_decoder() -> TextDecoder {
    let cfg = DecoderConfig {
        vocab_size: 300,
        hidden_size: 64,
        intermediate_size: 128,
        num_layers: 3,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        rms_norm_eps: 1e-6,
        rope: RopeConfig {
            theta: 10_000.0,
            kind: RopeKind::Plain,
        },
        qk_norm: true,
        attention_bias: false,
        tie_word_embeddings: true,
        hidden_act: Activation::Silu,
    };
    let names = DecoderTensorNames::qwen3_vl();
    let weights = random_weights(&decoder_tensor_shapes(&cfg, &names), DType::F32, 11).unwrap();
    TextDecoder::load(cfg, &weights, &names).unwrap()
}

/// Prefills `prompt` in chunks of `chunk` tokens, then decodes greedily
/// `steps` tokens; returns every logits row produced.
pub(crate) fn generate(
    dec: &TextDecoder,
    cache: &mut PagedKvCache,
    prompt: &[u32],
    chunk: usize,
    steps: usize,
) -> Vec<Vec<f32>> {
    let mut out = Vec::new();
    let mut pos = 0i64;
    for part in prompt.chunks(chunk) {
        let positions: Vec<[i64; 3]> = (0..part.len() as i64).map(|i| [pos + i; 3]).collect();
        let hidden = dec.embed(part).unwrap();
        out.push(
            dec.forward(cache, hidden, part, &positions, None, Logits::Last)
                .unwrap(),
        );
        pos += part.len() as i64;
    }
    for _ in 0..steps {
        let next = argmax(out.last().unwrap()) as u32;
        let hidden = dec.embed(&[next]).unwrap();
        out.push(
            dec.forward(cache, hidden, &[next], &[[pos; 3]], None, Logits::Last)
                .unwrap(),
        );
        pos += 1;
    }
    out
}
