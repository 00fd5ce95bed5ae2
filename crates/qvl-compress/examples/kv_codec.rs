//! Compresses a synthetic KV cache block by block with the KIVI int4 codec,
//! decodes it back, and prints size, error and single-thread speed; then
//! lets the selector choose per layer under an error budget.
//!
//! `cargo run --release -p qvl-compress --example kv_codec`

use qvl_compress::{
    CompressionConfig, GroupQuant, KvBlockCodec, Method, QuantAxis, QuantBits, Selector, Target,
    TokenSpan,
};
use qvl_core::Codec;
use std::time::Instant;

const TOKENS: usize = 2048;
const CHANNELS: usize = 1024; // 8 KV heads x head_dim 128
const BLOCK: usize = 256;

/// Deterministic pseudo-random values in [-1, 1).
fn noise(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Keys: noise plus a few large fixed channels; values: plain noise.
    let mut keys = noise(1, TOKENS * CHANNELS);
    for (i, k) in keys.iter_mut().enumerate() {
        if i % CHANNELS % 37 == 0 {
            *k += 12.0;
        }
    }
    let values = noise(2, TOKENS * CHANNELS);

    for (name, data, axis) in [
        ("keys  ", &keys, QuantAxis::PerChannel),
        ("values", &values, QuantAxis::PerToken),
    ] {
        let codec = KvBlockCodec::kivi(
            GroupQuant::new(QuantBits::Int4, false, 128, axis)?,
            0,
            4,
            32,
        );
        let shape = [BLOCK, CHANNELS];
        // Best of a few passes: the first pays for page faults on fresh buffers.
        let mut blocks = Vec::new();
        let mut out = vec![0f32; data.len()];
        let (mut encode_s, mut decode_s) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..5 {
            let start = Instant::now();
            blocks.clear();
            for (b, block) in data.chunks_exact(BLOCK * CHANNELS).enumerate() {
                let span = TokenSpan {
                    first_token: b * BLOCK,
                    seq_len: TOKENS,
                };
                blocks.push(codec.encode_span(block, &shape, span)?);
            }
            encode_s = encode_s.min(start.elapsed().as_secs_f64());
            let start = Instant::now();
            for (e, dst) in blocks.iter().zip(out.chunks_exact_mut(BLOCK * CHANNELS)) {
                codec.decode(&e.bytes, &shape, dst)?;
            }
            decode_s = decode_s.min(start.elapsed().as_secs_f64());
        }
        let bytes: usize = blocks.iter().map(|e| e.bytes.len()).sum();
        let (rel, max) = qvl_core::codec::error_of(data, &out);
        let gb = (data.len() * 4) as f64 / 1e9;
        println!(
            "{name} {}: {:.2} bits/value ({:.2}x vs f16), rel error {rel:.4}, max {max:.3}, encode {:.2} GB/s, decode {:.2} GB/s",
            codec.name(),
            bytes as f64 * 8.0 / data.len() as f64,
            (data.len() * 2) as f64 / bytes as f64,
            gb / encode_s,
            gb / decode_s,
        );
    }

    // The selector: first and last layer exact, the rest the smallest
    // encoding within 10% relative error.
    let config = CompressionConfig {
        enabled: true,
        methods: vec![Method::Quant, Method::F16],
        error_budget: 0.1,
        ..Default::default()
    };
    let selector = Selector::new(config, 4)?;
    let block = &keys[..BLOCK * CHANNELS];
    for layer in 0..4 {
        let sel = selector.select(Target::keys(layer), block, &[BLOCK, CHANNELS])?;
        println!(
            "layer {layer} keys: {} ({}), ratio {:.2} vs f32, rel error {:.4}",
            sel.codec.name(),
            sel.reason,
            sel.encoded.report.ratio(),
            sel.encoded.report.rel_frobenius
        );
    }
    Ok(())
}
