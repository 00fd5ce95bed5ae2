//! Random weights of the right names and shapes for any config: for
//! benchmarks at real widths and for tests of shapes no golden covers.

use crate::checkpoint::MemoryWeights;
use crate::config::{DecoderConfig, Qwen3VlConfig};
use crate::error::Result;
use crate::tensor::{Bytes, StoredTensor};
use crate::text::DecoderTensorNames;
use qvl_core::DType;
use rayon::prelude::*;

/// Name and shape of every tensor of a decoder under `names`.
pub fn decoder_tensor_shapes(
    c: &DecoderConfig,
    names: &DecoderTensorNames,
) -> Vec<(String, Vec<usize>)> {
    let (h, hd) = (c.hidden_size, c.head_dim);
    let mut out = vec![
        (names.embed_tokens.clone(), vec![c.vocab_size, h]),
        (names.final_norm.clone(), vec![h]),
    ];
    if !c.tie_word_embeddings {
        out.push((names.lm_head.clone(), vec![c.vocab_size, h]));
    }
    for i in 0..c.num_layers {
        let n = |t: &str| DecoderTensorNames::layer(t, i);
        let mut push = |t: &str, shape: Vec<usize>| out.push((n(t), shape));
        push(&names.q_proj, vec![c.num_heads * hd, h]);
        push(&names.k_proj, vec![c.num_kv_heads * hd, h]);
        push(&names.v_proj, vec![c.num_kv_heads * hd, h]);
        push(&names.o_proj, vec![h, c.num_heads * hd]);
        if c.attention_bias {
            for (t, len) in [
                (&names.q_proj, c.num_heads * hd),
                (&names.k_proj, c.num_kv_heads * hd),
                (&names.v_proj, c.num_kv_heads * hd),
                (&names.o_proj, h),
            ] {
                push(&t.replace(".weight", ".bias"), vec![len]);
            }
        }
        if c.qk_norm {
            push(&names.q_norm, vec![hd]);
            push(&names.k_norm, vec![hd]);
        }
        push(&names.gate_proj, vec![c.intermediate_size, h]);
        push(&names.up_proj, vec![c.intermediate_size, h]);
        push(&names.down_proj, vec![h, c.intermediate_size]);
        push(&names.input_norm, vec![h]);
        push(&names.post_attention_norm, vec![h]);
    }
    out
}

/// Name and shape of every tensor of `Qwen3VLForConditionalGeneration`.
pub fn qwen3vl_tensor_shapes(c: &Qwen3VlConfig) -> Vec<(String, Vec<usize>)> {
    let mut out = decoder_tensor_shapes(&c.text, &DecoderTensorNames::qwen3_vl());
    let v = &c.vision;
    let h = v.hidden_size;
    let p = "model.visual";
    out.push((
        format!("{p}.patch_embed.proj.weight"),
        vec![
            h,
            v.in_channels,
            v.temporal_patch_size,
            v.patch_size,
            v.patch_size,
        ],
    ));
    out.push((format!("{p}.patch_embed.proj.bias"), vec![h]));
    out.push((
        format!("{p}.pos_embed.weight"),
        vec![v.num_position_embeddings, h],
    ));
    for i in 0..v.depth {
        let b = format!("{p}.blocks.{i}");
        for norm in ["norm1", "norm2"] {
            out.push((format!("{b}.{norm}.weight"), vec![h]));
            out.push((format!("{b}.{norm}.bias"), vec![h]));
        }
        for (name, o, i_) in [
            ("attn.qkv", 3 * h, h),
            ("attn.proj", h, h),
            ("mlp.linear_fc1", v.intermediate_size, h),
            ("mlp.linear_fc2", h, v.intermediate_size),
        ] {
            out.push((format!("{b}.{name}.weight"), vec![o, i_]));
            out.push((format!("{b}.{name}.bias"), vec![o]));
        }
    }
    let merged = h * v.spatial_merge_size * v.spatial_merge_size;
    let mut merger = |prefix: String, norm: usize| {
        out.push((format!("{prefix}.norm.weight"), vec![norm]));
        out.push((format!("{prefix}.norm.bias"), vec![norm]));
        out.push((format!("{prefix}.linear_fc1.weight"), vec![merged, merged]));
        out.push((format!("{prefix}.linear_fc1.bias"), vec![merged]));
        out.push((
            format!("{prefix}.linear_fc2.weight"),
            vec![v.out_hidden_size, merged],
        ));
        out.push((format!("{prefix}.linear_fc2.bias"), vec![v.out_hidden_size]));
    };
    merger(format!("{p}.merger"), h);
    for j in 0..v.deepstack_visual_indexes.len() {
        merger(format!("{p}.deepstack_merger_list.{j}"), merged);
    }
    out
}

/// A small fast generator (xorshift64*), enough for random weights.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// Uniform in [-1, 1).
    fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let bits = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40;
        bits as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// A random tensor: norms near 1, biases near 0, matrices scaled by
/// `1 / sqrt(fan_in)` (uniform, so activations stay in range at any depth).
pub fn random_tensor(name: &str, shape: &[usize], dtype: DType, seed: u64) -> Result<StoredTensor> {
    let elements: usize = shape.iter().product();
    let is_norm = shape.len() == 1 && name.contains("norm");
    let scale = if shape.len() == 1 {
        if is_norm {
            0.1
        } else {
            0.05
        }
    } else {
        // Uniform [-1, 1) has variance 1/3.
        (3.0 / (elements / shape[0]) as f32).sqrt()
    };
    let offset = if is_norm { 1.0 } else { 0.0 };
    let elem = dtype.bytes_for(1);
    const CHUNK: usize = 1 << 16;
    let mut bytes = vec![0u8; elements * elem];
    bytes
        .par_chunks_mut(CHUNK * elem)
        .enumerate()
        .for_each(|(ci, chunk)| {
            let mut rng = Rng::new(seed ^ (ci as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93));
            for e in chunk.chunks_exact_mut(elem) {
                let v = offset + scale * rng.next_f32();
                match dtype {
                    DType::Bf16 => {
                        e.copy_from_slice(&half::bf16::from_f32(v).to_bits().to_le_bytes())
                    }
                    DType::F16 => {
                        e.copy_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes())
                    }
                    _ => e.copy_from_slice(&v.to_le_bytes()),
                }
            }
        });
    let dtype = if matches!(dtype, DType::Bf16 | DType::F16) {
        dtype
    } else {
        DType::F32
    };
    StoredTensor::new(name, dtype, shape.to_vec(), Bytes::from_vec(bytes))
}

/// Random weights for every tensor in `shapes`, in `dtype` (f32, f16 or bf16).
pub fn random_weights(
    shapes: &[(String, Vec<usize>)],
    dtype: DType,
    seed: u64,
) -> Result<MemoryWeights> {
    let mut w = MemoryWeights::new();
    for (i, (name, shape)) in shapes.iter().enumerate() {
        w.insert(random_tensor(
            name,
            shape,
            dtype,
            seed.wrapping_add(i as u64 * 7919),
        )?);
    }
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_values_have_the_intended_spread() {
        let t = random_tensor("w", &[64, 300], DType::Bf16, 1).unwrap();
        let v = t.to_f32_vec().unwrap();
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / v.len() as f32;
        assert!(mean.abs() < 0.01, "{mean}");
        assert!((var * 300.0 - 1.0).abs() < 0.1, "{var}");
        let n = random_tensor("x.norm.weight", &[100], DType::F32, 2)
            .unwrap()
            .to_f32_vec()
            .unwrap();
        assert!(n.iter().all(|x| (x - 1.0).abs() <= 0.1));
    }
}
