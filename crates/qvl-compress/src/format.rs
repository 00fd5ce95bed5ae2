//! The self-describing header every encoding starts with, and a bounds-checked
//! reader so that decoding malformed bytes returns an error instead of panicking.
//!
//! Layout (little endian): `b"QZ"`, format version `u8`, codec id `u16`,
//! rank `u8`, then each dimension as `u32`. Codec parameters and payload follow.

use crate::error::{CompressError, Result};
use qvl_core::CodecId;

/// First bytes of every encoding.
pub(crate) const MAGIC: [u8; 2] = *b"QZ";
/// Layout version; bumped when a codec's layout changes.
pub(crate) const VERSION: u8 = 1;
/// Most dimensions a tensor may have.
pub(crate) const MAX_RANK: usize = 8;

/// Number of elements of `shape`, refusing overflow and dims that the header
/// cannot hold.
pub(crate) fn elements_of(shape: &[usize]) -> Result<usize> {
    if shape.len() > MAX_RANK {
        return Err(CompressError::InvalidShape {
            shape: shape.to_vec(),
            reason: format!("rank {} is above the maximum {MAX_RANK}", shape.len()),
        });
    }
    let mut n: usize = 1;
    for &d in shape {
        if d > u32::MAX as usize {
            return Err(CompressError::InvalidShape {
                shape: shape.to_vec(),
                reason: format!("dimension {d} does not fit in 32 bits"),
            });
        }
        n = n
            .checked_mul(d)
            .ok_or_else(|| CompressError::InvalidShape {
                shape: shape.to_vec(),
                reason: "element count overflows".into(),
            })?;
    }
    Ok(n)
}

/// Checks that `len` values were given for `shape`; returns the element count.
pub(crate) fn check_len(shape: &[usize], len: usize, what: &str) -> Result<usize> {
    let n = elements_of(shape)?;
    if n != len {
        return Err(CompressError::ShapeMismatch {
            what: format!("{what} for shape {shape:?}"),
            expected: n,
            actual: len,
        });
    }
    Ok(n)
}

/// Views `shape` as `[rows, cols]`: `cols` is the innermost dimension.
pub(crate) fn rows_cols(shape: &[usize], elements: usize) -> (usize, usize) {
    let cols = shape.last().copied().unwrap_or(1);
    match elements.checked_div(cols) {
        Some(rows) => (rows, cols),
        None => (0, 0),
    }
}

/// Writes the common header.
pub(crate) fn write_header(out: &mut Vec<u8>, id: CodecId, shape: &[usize]) {
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&id.0.to_le_bytes());
    out.push(shape.len() as u8);
    for &d in shape {
        out.extend_from_slice(&(d as u32).to_le_bytes());
    }
}

/// Bytes the common header takes for a tensor of `rank` dimensions.
pub(crate) fn header_len(rank: usize) -> usize {
    6 + 4 * rank
}

/// Reads the codec id of an encoding without checking the rest.
pub(crate) fn peek_codec(bytes: &[u8]) -> Result<CodecId> {
    let mut r = Reader::new(bytes, "encoding");
    let magic = r.take(2)?;
    if magic != MAGIC {
        return Err(CompressError::malformed(
            "encoding",
            format!("bad magic {magic:02x?}, expected {MAGIC:02x?}"),
        ));
    }
    let version = r.u8()?;
    if version != VERSION {
        return Err(CompressError::malformed(
            "encoding",
            format!("format version {version}, this build reads {VERSION}"),
        ));
    }
    Ok(CodecId(r.u16()?))
}

/// A cursor over encoded bytes; every read is checked.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    codec: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8], codec: &'static str) -> Self {
        Reader {
            bytes,
            pos: 0,
            codec,
        }
    }

    /// Opens an encoding: checks magic, version, that the codec is `id` and
    /// that its shape is `shape`.
    pub(crate) fn open(
        bytes: &'a [u8],
        codec: &'static str,
        id: CodecId,
        shape: &[usize],
    ) -> Result<Self> {
        let found = peek_codec(bytes).map_err(|e| match e {
            CompressError::Malformed { reason, .. } => CompressError::malformed(codec, reason),
            other => other,
        })?;
        if found != id {
            return Err(CompressError::malformed(
                codec,
                format!("bytes were made by {found}, not {id}"),
            ));
        }
        let mut r = Reader::new(bytes, codec);
        r.pos = 5;
        let rank = r.u8()? as usize;
        if rank != shape.len() {
            return Err(CompressError::malformed(
                codec,
                format!("encoded rank {rank}, decode asked for shape {shape:?}"),
            ));
        }
        for (axis, &want) in shape.iter().enumerate() {
            let got = r.u32()? as usize;
            if got != want {
                return Err(CompressError::malformed(
                    codec,
                    format!(
                        "dimension {axis} is {got} in the encoding, {want} in the shape {shape:?}"
                    ),
                ));
            }
        }
        Ok(r)
    }

    pub(crate) fn err(&self, reason: impl Into<String>) -> CompressError {
        CompressError::malformed(self.codec, reason)
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        match end {
            Some(end) => {
                let s = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(self.err(format!(
                "truncated: need {n} bytes at offset {}, {} left",
                self.pos,
                self.bytes.len() - self.pos
            ))),
        }
    }

    pub(crate) fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    pub(crate) fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// Reads a length that must fit in memory.
    pub(crate) fn len_u64(&mut self, what: &str) -> Result<usize> {
        let v = self.u64()?;
        usize::try_from(v).map_err(|_| self.err(format!("{what} {v} does not fit in memory")))
    }

    /// Takes `count` items of `width` bytes each, refusing overflow.
    pub(crate) fn take_items(&mut self, count: usize, width: usize) -> Result<&'a [u8]> {
        let n = count
            .checked_mul(width)
            .ok_or_else(|| self.err(format!("{count} items of {width} bytes overflow")))?;
        self.take(n)
    }

    pub(crate) fn rest(&mut self) -> &'a [u8] {
        let s = &self.bytes[self.pos..];
        self.pos = self.bytes.len();
        s
    }

    /// Fails unless every byte was read.
    pub(crate) fn finish(&self) -> Result<()> {
        if self.pos != self.bytes.len() {
            return Err(self.err(format!(
                "{} trailing bytes after offset {}",
                self.bytes.len() - self.pos,
                self.pos
            )));
        }
        Ok(())
    }
}

/// Appends `values` as little-endian f32.
pub(crate) fn put_f32s(out: &mut Vec<u8>, values: &[f32]) {
    let start = out.len();
    out.resize(start + values.len() * 4, 0);
    for (dst, v) in out[start..].chunks_exact_mut(4).zip(values) {
        dst.copy_from_slice(&v.to_le_bytes());
    }
}

/// Reads little-endian f32 from `bytes` (whose length is a multiple of 4) into `out`.
pub(crate) fn get_f32s(bytes: &[u8], out: &mut [f32]) {
    for (v, src) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        *v = f32::from_le_bytes([src[0], src[1], src[2], src[3]]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_rejects_other_shapes() {
        let mut buf = Vec::new();
        write_header(&mut buf, CodecId(7), &[3, 5]);
        assert_eq!(buf.len(), header_len(2));
        assert_eq!(peek_codec(&buf).unwrap(), CodecId(7));
        assert!(Reader::open(&buf, "t", CodecId(7), &[3, 5]).is_ok());
        assert!(Reader::open(&buf, "t", CodecId(7), &[5, 3]).is_err());
        assert!(Reader::open(&buf, "t", CodecId(8), &[3, 5]).is_err());
        assert!(Reader::open(&buf[..7], "t", CodecId(7), &[3, 5]).is_err());
        let mut r = Reader::new(&buf, "t");
        assert!(r.take(100).is_err());
        assert!(r.take_items(usize::MAX, 4).is_err());
    }

    #[test]
    fn element_count_refuses_overflow() {
        assert!(elements_of(&[usize::MAX / 2, 4]).is_err());
        assert!(elements_of(&[1; 9]).is_err());
        assert_eq!(elements_of(&[]).unwrap(), 1);
        assert_eq!(elements_of(&[2, 0]).unwrap(), 0);
    }
}
