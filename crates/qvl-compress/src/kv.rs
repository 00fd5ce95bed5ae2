//! KIVI-style KV block codec: quantizes the middle of the sequence and keeps
//! attention-sink tokens and a window of recent tokens exact.
//!
//! KV blocks are `[.., tokens, ..]` tensors; `token_axis` says which
//! dimension counts tokens. A block only knows its own tokens, so the caller
//! says where it sits in the sequence ([`TokenSpan`]); plain
//! [`Codec::encode`] treats the tensor as the whole sequence.
//!
//! The middle tokens are gathered as `[outer, middle_tokens, inner]` and
//! quantized by the inner [`GroupQuant`]: with [`QuantAxis::PerChannel`] its
//! groups run along tokens for each channel (keys), with
//! [`QuantAxis::PerToken`] along the channels of a token (values).
//!
//! Payload after the common header: `token_axis u8`, `exact dtype u8`
//! (0 f32, 1 f16), `prefix u32`, `suffix u32`, `inner length u64`, the inner
//! encoding (self-describing), the exact tokens (prefix then suffix, each
//! `[outer, count, inner]`).

use crate::error::{CompressError, Result};
use crate::float::{HalfFloat, HalfKind};
use crate::format::{check_len, get_f32s, put_f32s, write_header, Reader};
use crate::ids;
use crate::quant::{GroupQuant, QuantAxis};
use crate::stats::ErrStats;
use qvl_core::{Codec, CodecId, Encoded};

/// How exact tokens are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExactStorage {
    /// Bit-exact f32.
    F32,
    /// f16: exact with respect to an f16 KV cache, half the bytes.
    F16,
}

/// Where a block's tokens sit in the sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenSpan {
    /// Position of the block's first token in the sequence.
    pub first_token: usize,
    /// Tokens in the sequence so far (the recent window ends here).
    pub seq_len: usize,
}

/// KV block codec with exact sink and recent tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KvBlockCodec {
    /// Quantizer of the middle tokens.
    pub inner: GroupQuant,
    /// Dimension of the block shape that counts tokens.
    pub token_axis: usize,
    /// The first tokens of the sequence, kept exact (attention sinks).
    pub sink_tokens: usize,
    /// The last tokens of the sequence, kept exact (KIVI's residual).
    pub recent_tokens: usize,
    /// How exact tokens are stored.
    pub exact: ExactStorage,
}

/// Exact prefix and suffix token counts of a block of `tokens` tokens.
fn exact_counts(codec: &KvBlockCodec, tokens: usize, span: TokenSpan) -> (usize, usize) {
    let prefix = codec
        .sink_tokens
        .saturating_sub(span.first_token)
        .min(tokens);
    let end = span.first_token + tokens;
    let recent_start = span
        .seq_len
        .saturating_sub(codec.recent_tokens)
        .max(span.first_token);
    let suffix = end.saturating_sub(recent_start).min(tokens - prefix);
    (prefix, suffix)
}

/// `(outer, tokens, inner)` of `shape` around `axis`.
fn split_axis(shape: &[usize], axis: usize) -> Result<(usize, usize, usize)> {
    if axis >= shape.len() {
        return Err(CompressError::InvalidShape {
            shape: shape.to_vec(),
            reason: format!("token axis {axis} is out of range"),
        });
    }
    let outer = shape[..axis].iter().product();
    let inner = shape[axis + 1..].iter().product();
    Ok((outer, shape[axis], inner))
}

impl KvBlockCodec {
    /// KIVI's layout for keys (groups along tokens, per channel) or values
    /// (groups along channels, per token).
    pub fn kivi(
        inner: GroupQuant,
        token_axis: usize,
        sink_tokens: usize,
        recent_tokens: usize,
    ) -> Self {
        KvBlockCodec {
            inner,
            token_axis,
            sink_tokens,
            recent_tokens,
            exact: ExactStorage::F32,
        }
    }

    /// Encodes a block whose tokens sit at `span` in the sequence.
    pub fn encode_span(&self, values: &[f32], shape: &[usize], span: TokenSpan) -> Result<Encoded> {
        let n = check_len(shape, values.len(), "values")?;
        let (outer, tokens, inner) = split_axis(shape, self.token_axis)?;
        let (prefix, suffix) = exact_counts(self, tokens, span);
        let middle = tokens - prefix - suffix;
        let row = inner;
        // Gather the middle and exact tokens of every outer slab; with the
        // token axis first (one slab) the middle is already contiguous.
        let mut gathered = Vec::new();
        let mut exact = Vec::with_capacity(outer * (prefix + suffix) * row);
        if row > 0 && tokens > 0 {
            for slab in values.chunks_exact(tokens * row) {
                exact.extend_from_slice(&slab[..prefix * row]);
                if outer > 1 {
                    gathered.extend_from_slice(&slab[prefix * row..(prefix + middle) * row]);
                }
            }
            for slab in values.chunks_exact(tokens * row) {
                exact.extend_from_slice(&slab[(prefix + middle) * row..]);
            }
        }
        let mid = if outer > 1 {
            &gathered[..]
        } else {
            &values[(prefix * row).min(n)..((prefix + middle) * row).min(n)]
        };
        let mut bytes = Vec::with_capacity(64 + 4 * exact.len() + n);
        write_header(&mut bytes, ids::KV_BLOCK, shape);
        bytes.push(self.token_axis as u8);
        bytes.push(match self.exact {
            ExactStorage::F32 => 0,
            ExactStorage::F16 => 1,
        });
        bytes.extend_from_slice(&(prefix as u32).to_le_bytes());
        bytes.extend_from_slice(&(suffix as u32).to_le_bytes());
        // The inner encoding goes straight into this buffer after its length.
        let len_at = bytes.len();
        bytes.extend_from_slice(&0u64.to_le_bytes());
        let mut stats = if middle > 0 && outer > 0 && row > 0 {
            self.inner
                .encode_stats(mid, &[outer, middle, row], &mut bytes)?
        } else {
            ErrStats::default()
        };
        let inner_len = (bytes.len() - len_at - 8) as u64;
        bytes[len_at..len_at + 8].copy_from_slice(&inner_len.to_le_bytes());
        match self.exact {
            ExactStorage::F32 => {
                put_f32s(&mut bytes, &exact);
                stats.merge(ErrStats::exact(&exact));
            }
            ExactStorage::F16 => {
                let mut words = vec![0u16; exact.len()];
                HalfFloat::to_bits(HalfKind::F16, &exact, &mut words);
                let mut back = vec![0f32; exact.len()];
                HalfFloat::from_bits(HalfKind::F16, &words, &mut back);
                stats.merge(ErrStats::between(&exact, &back));
                for w in words {
                    bytes.extend_from_slice(&w.to_le_bytes());
                }
            }
        }
        Ok(Encoded {
            codec: ids::KV_BLOCK,
            shape: shape.to_vec(),
            report: stats.report(4 * n, bytes.len()),
            bytes,
        })
    }

    /// Decodes KV block bytes; every parameter comes from the bytes.
    pub(crate) fn decode_bytes(bytes: &[u8], shape: &[usize], out: &mut [f32]) -> Result<()> {
        check_len(shape, out.len(), "output buffer")?;
        let mut r = Reader::open(bytes, "kv-block", ids::KV_BLOCK, shape)?;
        let axis = r.u8()? as usize;
        let (outer, tokens, row) = split_axis(shape, axis).map_err(|e| r.err(e.to_string()))?;
        let exact_f16 = match r.u8()? {
            0 => false,
            1 => true,
            other => {
                return Err(r.err(format!(
                    "exact storage {other} is neither 0 (f32) nor 1 (f16)"
                )))
            }
        };
        let prefix = r.u32()? as usize;
        let suffix = r.u32()? as usize;
        if prefix.checked_add(suffix).is_none_or(|s| s > tokens) {
            return Err(r.err(format!(
                "{prefix} sink and {suffix} recent tokens in a block of {tokens}"
            )));
        }
        let middle = tokens - prefix - suffix;
        let inner_len = r.len_u64("inner length")?;
        let inner_bytes = r.take(inner_len)?;
        let exact_count = outer * (prefix + suffix) * row;
        let exact_bytes = r.take_items(exact_count, if exact_f16 { 2 } else { 4 })?;
        r.finish()?;
        let mut mid = vec![0f32; outer * middle * row];
        if !mid.is_empty() {
            let id = crate::format::peek_codec(inner_bytes)?;
            if id != ids::INT8 && id != ids::INT4 {
                return Err(r.err(format!("inner codec {id} is not int8 or int4")));
            }
            GroupQuant::decode_bytes(id, inner_bytes, &[outer, middle, row], &mut mid)?;
        } else if !inner_bytes.is_empty() {
            return Err(r.err("inner bytes present for a block with no middle tokens"));
        }
        let mut exact = vec![0f32; exact_count];
        if exact_f16 {
            let words: Vec<u16> = exact_bytes
                .chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
                .collect();
            HalfFloat::from_bits(HalfKind::F16, &words, &mut exact);
        } else {
            get_f32s(exact_bytes, &mut exact);
        }
        if row == 0 || tokens == 0 {
            return Ok(());
        }
        let (pre, suf) = exact.split_at(outer * prefix * row);
        let (p, m, s) = (prefix * row, middle * row, suffix * row);
        for (o, slab) in out.chunks_exact_mut(tokens * row).enumerate() {
            slab[..p].copy_from_slice(&pre[o * p..(o + 1) * p]);
            slab[p..p + m].copy_from_slice(&mid[o * m..(o + 1) * m]);
            slab[p + m..].copy_from_slice(&suf[o * s..(o + 1) * s]);
        }
        Ok(())
    }
}

impl Codec for KvBlockCodec {
    fn id(&self) -> CodecId {
        ids::KV_BLOCK
    }

    fn name(&self) -> String {
        format!(
            "kv[{}+sink{}+recent{}{}]",
            self.inner.name(),
            self.sink_tokens,
            self.recent_tokens,
            if self.exact == ExactStorage::F16 {
                "-f16"
            } else {
                ""
            }
        )
    }

    fn is_lossless(&self) -> bool {
        false
    }

    fn encode(&self, values: &[f32], shape: &[usize]) -> qvl_core::Result<Encoded> {
        let (_, tokens, _) = split_axis(shape, self.token_axis)?;
        Ok(self.encode_span(
            values,
            shape,
            TokenSpan {
                first_token: 0,
                seq_len: tokens,
            },
        )?)
    }

    fn decode(&self, bytes: &[u8], shape: &[usize], out: &mut [f32]) -> qvl_core::Result<()> {
        Ok(Self::decode_bytes(bytes, shape, out)?)
    }
}

/// Keys: groups along tokens for each channel.
pub fn kivi_keys(inner: GroupQuant) -> GroupQuant {
    GroupQuant {
        axis: QuantAxis::PerChannel,
        ..inner
    }
}

/// Values: groups along the channels of each token.
pub fn kivi_values(inner: GroupQuant) -> GroupQuant {
    GroupQuant {
        axis: QuantAxis::PerToken,
        ..inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::QuantBits;

    fn data(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    #[test]
    fn sinks_and_recent_tokens_are_exact() {
        // [heads=2, tokens=40, dim=8], token axis 1.
        let shape = [2, 40, 8];
        let x = data(2 * 40 * 8);
        let q = GroupQuant::new(QuantBits::Int4, false, 16, QuantAxis::PerChannel).unwrap();
        let kv = KvBlockCodec::kivi(q, 1, 4, 8);
        let e = kv.encode(&x, &shape).unwrap();
        let mut out = vec![0f32; x.len()];
        kv.decode(&e.bytes, &shape, &mut out).unwrap();
        for h in 0..2 {
            for t in 0..40 {
                for d in 0..8 {
                    let i = (h * 40 + t) * 8 + d;
                    if !(4..32).contains(&t) {
                        assert_eq!(out[i], x[i], "h{h} t{t} d{d}");
                    } else {
                        assert!((out[i] - x[i]).abs() < 0.15, "h{h} t{t} d{d}");
                    }
                }
            }
        }
        let (rel, max) = qvl_core::codec::error_of(&x, &out);
        assert!((rel - e.report.rel_frobenius).abs() < 1e-6);
        assert!((max - e.report.max_abs).abs() < 1e-6);
        assert!(rel > 0.0);
    }

    #[test]
    fn spans_place_the_window_by_sequence_position() {
        let q = GroupQuant::new(QuantBits::Int8, true, 8, QuantAxis::PerToken).unwrap();
        let kv = KvBlockCodec::kivi(q, 0, 4, 16);
        // Block of 32 tokens at 64..96 in a 200-token sequence: all quantized.
        assert_eq!(
            exact_counts(
                &kv,
                32,
                TokenSpan {
                    first_token: 64,
                    seq_len: 200
                }
            ),
            (0, 0)
        );
        // First block: 4 sinks.
        assert_eq!(
            exact_counts(
                &kv,
                32,
                TokenSpan {
                    first_token: 0,
                    seq_len: 200
                }
            ),
            (4, 0)
        );
        // Last full block 168..200: its last 16 tokens are recent.
        assert_eq!(
            exact_counts(
                &kv,
                32,
                TokenSpan {
                    first_token: 168,
                    seq_len: 200
                }
            ),
            (0, 16)
        );
        // A block being filled (192..224 with 200 tokens so far): from 184 on.
        assert_eq!(
            exact_counts(
                &kv,
                32,
                TokenSpan {
                    first_token: 192,
                    seq_len: 200
                }
            ),
            (0, 32)
        );
        // A short sequence is entirely exact.
        assert_eq!(
            exact_counts(
                &kv,
                10,
                TokenSpan {
                    first_token: 0,
                    seq_len: 10
                }
            ),
            (4, 6)
        );
        let x = data(10 * 6);
        let e = kv
            .encode_span(
                &x,
                &[10, 6],
                TokenSpan {
                    first_token: 0,
                    seq_len: 10,
                },
            )
            .unwrap();
        assert_eq!(e.report.max_abs, 0.0);
        let mut out = vec![0f32; 60];
        kv.decode(&e.bytes, &[10, 6], &mut out).unwrap();
        assert_eq!(out, x);
    }

    #[test]
    fn f16_exact_storage_and_malformed_bytes() {
        let q = GroupQuant::new(QuantBits::Int4, false, 8, QuantAxis::PerToken).unwrap();
        let kv = KvBlockCodec {
            exact: ExactStorage::F16,
            ..KvBlockCodec::kivi(q, 0, 2, 2)
        };
        let x = data(16 * 8);
        let e = kv.encode(&x, &[16, 8]).unwrap();
        let mut out = vec![0f32; x.len()];
        kv.decode(&e.bytes, &[16, 8], &mut out).unwrap();
        assert!((out[0] - x[0]).abs() < 1e-3);
        for cut in 0..e.bytes.len() {
            assert!(kv.decode(&e.bytes[..cut], &[16, 8], &mut out).is_err());
        }
        let mut bad = e.bytes.clone();
        bad[crate::format::header_len(2) + 2] = 200; // prefix beyond the block
        assert!(kv.decode(&bad, &[16, 8], &mut out).is_err());
        assert!(kv.encode(&x, &[16, 8, 1, 1, 1, 1, 1, 1, 1]).is_err());
        let bad_axis = KvBlockCodec::kivi(q, 5, 0, 0);
        assert!(bad_axis.encode(&x, &[16, 8]).is_err());
    }
}
