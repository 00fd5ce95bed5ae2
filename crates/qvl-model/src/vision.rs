//! The Qwen3-VL vision encoder: Conv3d patch embedding (as a matmul),
//! learned position embeddings interpolated bilinearly from their square
//! grid, 2D rotary attention blocks over each frame, the patch merger and
//! the DeepStack mergers.
//!
//! Patches arrive as the processor lays them out: per image and frame,
//! `spatial_merge_size^2` patches of each merge window next to each other,
//! windows in raster order.

use crate::checkpoint::{require, WeightSource};
use crate::config::VisionConfig;
use crate::error::{ModelError, Result};
use crate::linear::{dot, Linear};
use crate::ops::{layer_norm, rotate_half_apply, Activation};
use crate::text::{load_linear, load_vector};
use rayon::prelude::*;

/// LayerNorm epsilon of the vision tower (fixed in the reference).
const LN_EPS: f32 = 1e-6;

struct VisionBlock {
    norm1: (Vec<f32>, Vec<f32>),
    norm2: (Vec<f32>, Vec<f32>),
    qkv: Linear,
    proj: Linear,
    fc1: Linear,
    fc2: Linear,
}

struct Merger {
    norm: (Vec<f32>, Vec<f32>),
    fc1: Linear,
    fc2: Linear,
}

/// What the encoder returns for a batch of images.
#[derive(Debug, Clone)]
pub struct VisionOutput {
    /// Merged tokens, `tokens x out_hidden_size`, images in order.
    pub embeds: Vec<f32>,
    /// Per DeepStack index, features of the same tokens.
    pub deepstack: Vec<Vec<f32>>,
    /// Merged tokens per image.
    pub tokens_per_image: Vec<usize>,
}

/// A loaded vision encoder.
pub struct VisionEncoder {
    config: VisionConfig,
    patch_embed: Linear,
    pos_embed: Vec<f32>,
    blocks: Vec<VisionBlock>,
    merger: Merger,
    deepstack_mergers: Vec<Merger>,
    inv_freq: Vec<f32>,
}

fn load_norm(src: &dyn WeightSource, prefix: &str, len: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    Ok((
        load_vector(src, &format!("{prefix}.weight"), len)?,
        load_vector(src, &format!("{prefix}.bias"), len)?,
    ))
}

fn load_merger(
    src: &dyn WeightSource,
    prefix: &str,
    c: &VisionConfig,
    postshuffle: bool,
) -> Result<Merger> {
    let merged = c.hidden_size * c.spatial_merge_size * c.spatial_merge_size;
    let norm_len = if postshuffle { merged } else { c.hidden_size };
    Ok(Merger {
        norm: load_norm(src, &format!("{prefix}.norm"), norm_len)?,
        fc1: load_linear(
            src,
            &format!("{prefix}.linear_fc1.weight"),
            merged,
            merged,
            true,
        )?,
        fc2: load_linear(
            src,
            &format!("{prefix}.linear_fc2.weight"),
            c.out_hidden_size,
            merged,
            true,
        )?,
    })
}

impl Merger {
    /// `x`: tokens in merge-window order, `hidden` wide; returns one row
    /// per window.
    fn forward(&self, x: &[f32]) -> Vec<f32> {
        let mut x = x.to_vec();
        let merged = self.fc1.in_features();
        // The norm's width says where it runs: per patch before the shuffle
        // into windows, or per window after it (DeepStack mergers, loaded
        // with the wider norm). On the flat token-major buffer both are
        // the same row-wise call.
        layer_norm(&mut x, &self.norm.0, &self.norm.1, LN_EPS);
        let rows = x.len() / merged;
        let mut y = self.fc1.forward(&x, rows);
        Activation::Gelu.apply(&mut y);
        self.fc2.forward(&y, rows)
    }
}

impl VisionEncoder {
    /// Loads the encoder of `config` from `src` (names under `prefix`,
    /// `model.visual` for `Qwen3VLForConditionalGeneration`).
    pub fn load(config: VisionConfig, src: &dyn WeightSource, prefix: &str) -> Result<Self> {
        let c = &config;
        let h = c.hidden_size;
        let pw = require(
            src,
            &format!("{prefix}.patch_embed.proj.weight"),
            &[
                h,
                c.in_channels,
                c.temporal_patch_size,
                c.patch_size,
                c.patch_size,
            ],
        )?;
        let pb = require(src, &format!("{prefix}.patch_embed.proj.bias"), &[h])?;
        let patch_embed = Linear::new(pw, Some(&pb), h, c.patch_dim())?;
        let pos_embed = require(
            src,
            &format!("{prefix}.pos_embed.weight"),
            &[c.num_position_embeddings, h],
        )?
        .to_f32_vec()?;
        let mut blocks = Vec::with_capacity(c.depth);
        for i in 0..c.depth {
            let b = format!("{prefix}.blocks.{i}");
            blocks.push(VisionBlock {
                norm1: load_norm(src, &format!("{b}.norm1"), h)?,
                norm2: load_norm(src, &format!("{b}.norm2"), h)?,
                qkv: load_linear(src, &format!("{b}.attn.qkv.weight"), 3 * h, h, true)?,
                proj: load_linear(src, &format!("{b}.attn.proj.weight"), h, h, true)?,
                fc1: load_linear(
                    src,
                    &format!("{b}.mlp.linear_fc1.weight"),
                    c.intermediate_size,
                    h,
                    true,
                )?,
                fc2: load_linear(
                    src,
                    &format!("{b}.mlp.linear_fc2.weight"),
                    h,
                    c.intermediate_size,
                    true,
                )?,
            });
        }
        let merger = load_merger(src, &format!("{prefix}.merger"), c, false)?;
        let deepstack_mergers = (0..c.deepstack_visual_indexes.len())
            .map(|j| load_merger(src, &format!("{prefix}.deepstack_merger_list.{j}"), c, true))
            .collect::<Result<_>>()?;
        // Rotary over head_dim / 2 (rows and columns each get head_dim / 4).
        let dim = c.head_dim() / 2;
        let theta = c.rope_theta as f32;
        let inv_freq = (0..dim / 2)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / dim as f32))
            .collect();
        Ok(VisionEncoder {
            config,
            patch_embed,
            pos_embed,
            blocks,
            merger,
            deepstack_mergers,
            inv_freq,
        })
    }

    /// The config.
    pub fn config(&self) -> &VisionConfig {
        &self.config
    }

    /// Merged tokens an image of grid `[t, h, w]` becomes.
    pub fn tokens_for_grid(&self, grid: [usize; 3]) -> usize {
        let m = self.config.spatial_merge_size;
        grid[0] * grid[1] * grid[2] / (m * m)
    }

    /// Checks grids against the pixel rows they claim.
    fn check_inputs(&self, pixel_values: &[f32], grids: &[[usize; 3]]) -> Result<usize> {
        let m = self.config.spatial_merge_size;
        let mut patches = 0usize;
        for (i, g) in grids.iter().enumerate() {
            if g.contains(&0) || g[1] % m != 0 || g[2] % m != 0 {
                return Err(ModelError::InvalidInput(format!(
                    "image {i}: grid_thw {g:?} must be positive with h and w multiples of the merge size {m}"
                )));
            }
            patches += g[0] * g[1] * g[2];
        }
        let pd = self.config.patch_dim();
        if pixel_values.len() != patches * pd {
            return Err(ModelError::InvalidInput(format!(
                "pixel_values hold {} values; the grids {grids:?} need {patches} patches of {pd}",
                pixel_values.len()
            )));
        }
        Ok(patches)
    }

    /// Position (row, column) of every patch, in input order.
    fn patch_coords(&self, grids: &[[usize; 3]]) -> Vec<(usize, usize)> {
        let m = self.config.spatial_merge_size;
        let mut coords = Vec::new();
        for &[t, h, w] in grids {
            for _ in 0..t {
                for br in 0..h / m {
                    for bc in 0..w / m {
                        for ir in 0..m {
                            for ic in 0..m {
                                coords.push((br * m + ir, bc * m + ic));
                            }
                        }
                    }
                }
            }
        }
        coords
    }

    /// Bilinear interpolation of the learned position grid, as the
    /// reference's `fast_pos_embed_interpolate`, in input order.
    fn position_embeddings(&self, grids: &[[usize; 3]]) -> Vec<f32> {
        let side = self.config.grid_side();
        let hid = self.config.hidden_size;
        let m = self.config.spatial_merge_size;
        let mut out = Vec::new();
        for &[t, h, w] in grids {
            let hs = linspace(0.0, (side - 1) as f32, h);
            let ws = linspace(0.0, (side - 1) as f32, w);
            let corner = |i: f32| {
                let lo = i as usize;
                (lo, (lo + 1).min(side - 1), i - lo as f32)
            };
            let mut raster = vec![0f32; h * w * hid];
            for (r, &hv) in hs.iter().enumerate() {
                let (h0, h1, dh) = corner(hv);
                for (cidx, &wv) in ws.iter().enumerate() {
                    let (w0, w1, dw) = corner(wv);
                    let idx = [
                        h0 * side + w0,
                        h0 * side + w1,
                        h1 * side + w0,
                        h1 * side + w1,
                    ];
                    let wt = [
                        (1.0 - dh) * (1.0 - dw),
                        (1.0 - dh) * dw,
                        dh * (1.0 - dw),
                        dh * dw,
                    ];
                    let dst = &mut raster[(r * w + cidx) * hid..(r * w + cidx + 1) * hid];
                    for (k, d) in dst.iter_mut().enumerate() {
                        // Same order of sums as the reference: p0 + p1 + p2 + p3.
                        let p: [f32; 4] =
                            std::array::from_fn(|c| self.pos_embed[idx[c] * hid + k] * wt[c]);
                        *d = p[0] + p[1] + p[2] + p[3];
                    }
                }
            }
            for _ in 0..t {
                for br in 0..h / m {
                    for bc in 0..w / m {
                        for ir in 0..m {
                            for ic in 0..m {
                                let (r, cidx) = (br * m + ir, bc * m + ic);
                                out.extend_from_slice(
                                    &raster[(r * w + cidx) * hid..(r * w + cidx + 1) * hid],
                                );
                            }
                        }
                    }
                }
            }
        }
        out
    }

    /// Encodes `pixel_values` (`patches x patch_dim`) of images with grids
    /// `grids` (`[t, h, w]` in patches).
    pub fn forward(&self, pixel_values: &[f32], grids: &[[usize; 3]]) -> Result<VisionOutput> {
        crate::ops::on_compute_pool(|| self.forward_in_pool(pixel_values, grids))
    }

    fn forward_in_pool(&self, pixel_values: &[f32], grids: &[[usize; 3]]) -> Result<VisionOutput> {
        let c = &self.config;
        let n = self.check_inputs(pixel_values, grids)?;
        let mut x = self.patch_embed.forward(pixel_values, n);
        let pos = self.position_embeddings(grids);
        x.iter_mut().zip(&pos).for_each(|(a, b)| *a += b);

        // 2D rotary tables: row frequencies then column frequencies.
        let quarter = self.inv_freq.len();
        let half = 2 * quarter;
        let coords = self.patch_coords(grids);
        let mut cos = vec![0f32; n * half];
        let mut sin = vec![0f32; n * half];
        for (p, &(r, col)) in coords.iter().enumerate() {
            for j in 0..quarter {
                let a = r as f32 * self.inv_freq[j];
                let b = col as f32 * self.inv_freq[j];
                cos[p * half + j] = a.cos();
                sin[p * half + j] = a.sin();
                cos[p * half + quarter + j] = b.cos();
                sin[p * half + quarter + j] = b.sin();
            }
        }
        // Attention runs within each frame of each image.
        let mut segments = Vec::new();
        let mut start = 0;
        for &[t, h, w] in grids {
            for _ in 0..t {
                segments.push((start, h * w));
                start += h * w;
            }
        }
        let mut deepstack = Vec::new();
        for (bi, block) in self.blocks.iter().enumerate() {
            self.block_forward(block, &mut x, n, &cos, &sin, &segments);
            if let Some(j) = c.deepstack_visual_indexes.iter().position(|&d| d == bi) {
                deepstack.push(self.deepstack_mergers[j].forward(&x));
            }
        }
        let embeds = self.merger.forward(&x);
        Ok(VisionOutput {
            embeds,
            deepstack,
            tokens_per_image: grids.iter().map(|g| self.tokens_for_grid(*g)).collect(),
        })
    }

    fn block_forward(
        &self,
        b: &VisionBlock,
        x: &mut [f32],
        n: usize,
        cos: &[f32],
        sin: &[f32],
        segments: &[(usize, usize)],
    ) {
        let c = &self.config;
        let (hid, heads, hd) = (c.hidden_size, c.num_heads, c.head_dim());
        let half = hd / 2;
        let mut y = x.to_vec();
        layer_norm(&mut y, &b.norm1.0, &b.norm1.1, LN_EPS);
        let mut qkv = b.qkv.forward(&y, n);
        // Rows are [q | k | v], each heads x head_dim; rotate q and k.
        qkv.par_chunks_mut(3 * hid)
            .enumerate()
            .for_each(|(p, row)| {
                let (cs, sn) = (
                    &cos[p * half..(p + 1) * half],
                    &sin[p * half..(p + 1) * half],
                );
                for head in row[..2 * hid].chunks_exact_mut(hd) {
                    rotate_half_apply(head, cs, sn);
                }
            });
        let scale = 1.0 / (hd as f32).sqrt();
        let mut attn = vec![0f32; n * hid];
        attn.par_chunks_mut(hd).enumerate().for_each(|(ph, o)| {
            let (p, h) = (ph / heads, ph % heads);
            let &(s0, len) = segments
                .iter()
                .find(|(s, l)| p >= *s && p < s + l)
                .unwrap_or(&(p, 1)); // every patch lies in a segment by construction
            let q = &qkv[p * 3 * hid + h * hd..p * 3 * hid + (h + 1) * hd];
            let mut scores: Vec<f32> = (s0..s0 + len)
                .map(|t| {
                    dot(
                        q,
                        &qkv[t * 3 * hid + hid + h * hd..t * 3 * hid + hid + (h + 1) * hd],
                    ) * scale
                })
                .collect();
            crate::ops::softmax(&mut scores);
            for (i, t) in (s0..s0 + len).enumerate() {
                let v = &qkv[t * 3 * hid + 2 * hid + h * hd..t * 3 * hid + 2 * hid + (h + 1) * hd];
                for (ov, vv) in o.iter_mut().zip(v) {
                    *ov += scores[i] * vv;
                }
            }
        });
        let o = b.proj.forward(&attn, n);
        x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        let mut y = x.to_vec();
        layer_norm(&mut y, &b.norm2.0, &b.norm2.1, LN_EPS);
        let mut m = b.fc1.forward(&y, n);
        c.hidden_act.apply(&mut m);
        let o = b.fc2.forward(&m, n);
        x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
    }
}

/// `steps` evenly spaced values from `start` to `end`, computed as
/// torch.linspace does in f32 (from the start in the first half, from the
/// end in the second) so that the interpolation weights match.
fn linspace(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                start + step * i as f32
            } else {
                end - step * (steps - 1 - i) as f32
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_hits_both_ends() {
        let v = linspace(0.0, 7.0, 6);
        assert_eq!(v[0], 0.0);
        assert_eq!(v[5], 7.0);
        assert!((v[2] - 2.8).abs() < 1e-6);
        assert_eq!(linspace(0.0, 7.0, 1), [0.0]);
    }
}
