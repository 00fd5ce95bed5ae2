//! Physical memory in large chunks under an arena that works in small
//! granules.
//!
//! The arena commits and decommits ranges in its granule (512 B on the
//! device, a page for pinned memory), but the driver maps device memory in
//! chunks of its allocation granularity (2 MiB) and pins host memory per
//! registration. [`ChunkCounts`] keeps, for every chunk, how many of its
//! bytes the arena holds committed: a chunk is mapped when its count leaves
//! zero and unmapped when it returns to zero. Because the arena never
//! commits a byte twice nor decommits one it did not commit, the counts are
//! exact.

/// Committed bytes per chunk, and which chunks are mapped.
#[derive(Debug)]
pub(crate) struct ChunkCounts<H> {
    chunk: usize,
    used: Vec<usize>,
    mapped: Vec<Option<H>>,
}

impl<H: Copy> ChunkCounts<H> {
    /// Chunks of `chunk` bytes covering `capacity` bytes.
    pub(crate) fn new(capacity: usize, chunk: usize) -> Self {
        let n = capacity.div_ceil(chunk.max(1));
        ChunkCounts {
            chunk: chunk.max(1),
            used: vec![0; n],
            mapped: vec![None; n],
        }
    }

    /// Bytes of one chunk.
    pub(crate) fn chunk(&self) -> usize {
        self.chunk
    }

    /// Chunks mapped now.
    pub(crate) fn mapped_chunks(&self) -> usize {
        self.mapped.iter().filter(|m| m.is_some()).count()
    }

    /// `(chunk index, overlap in bytes)` of `[offset, offset + len)`.
    fn overlaps(&self, offset: usize, len: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        let end = offset + len;
        let first = offset / self.chunk;
        let last = if len == 0 {
            first
        } else {
            (end - 1) / self.chunk + 1
        };
        (first..last.min(self.used.len())).map(move |k| {
            let (lo, hi) = (k * self.chunk, (k + 1) * self.chunk);
            (k, hi.min(end) - lo.max(offset))
        })
    }

    /// Counts `[offset, offset + len)` committed, mapping every chunk it
    /// touches that is not mapped yet with `map(chunk index)`. When a map
    /// fails, the chunks mapped by this call are unmapped with `unmap` and
    /// nothing changes.
    pub(crate) fn commit<E>(
        &mut self,
        offset: usize,
        len: usize,
        mut map: impl FnMut(usize) -> Result<H, E>,
        mut unmap: impl FnMut(usize, H) -> Result<(), E>,
    ) -> Result<(), E> {
        let touched: Vec<(usize, usize)> = self.overlaps(offset, len).collect();
        let mut new = Vec::new();
        for &(k, _) in &touched {
            if self.mapped[k].is_none() {
                match map(k) {
                    Ok(h) => {
                        self.mapped[k] = Some(h);
                        new.push(k);
                    }
                    Err(e) => {
                        for k in new {
                            if let Some(h) = self.mapped[k].take() {
                                // The original error is the one to report.
                                let _ = unmap(k, h);
                            }
                        }
                        return Err(e);
                    }
                }
            }
        }
        for (k, bytes) in touched {
            self.used[k] += bytes;
        }
        Ok(())
    }

    /// Counts `[offset, offset + len)` given back, unmapping every chunk
    /// whose count reaches zero with `unmap(chunk index, handle)`. A chunk
    /// whose unmap fails stays mapped (and is retried when it is next
    /// emptied or when the backing is dropped); the first error is returned.
    pub(crate) fn decommit<E>(
        &mut self,
        offset: usize,
        len: usize,
        mut unmap: impl FnMut(usize, H) -> Result<(), E>,
    ) -> Result<(), E> {
        let touched: Vec<(usize, usize)> = self.overlaps(offset, len).collect();
        let mut first_err = None;
        for (k, bytes) in touched {
            self.used[k] = self.used[k].saturating_sub(bytes);
            if self.used[k] == 0 {
                if let Some(h) = self.mapped[k] {
                    match unmap(k, h) {
                        Ok(()) => self.mapped[k] = None,
                        Err(e) => {
                            first_err.get_or_insert(e);
                        }
                    }
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Takes every mapped chunk out, for the backing's drop.
    pub(crate) fn drain_mapped(&mut self) -> Vec<(usize, H)> {
        self.used.iter_mut().for_each(|u| *u = 0);
        self.mapped
            .iter_mut()
            .enumerate()
            .filter_map(|(k, m)| m.take().map(|h| (k, h)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_map_on_first_byte_and_unmap_on_last() {
        let mut c = ChunkCounts::<u32>::new(10 * 1024, 1024);
        let mut log = Vec::new();
        let mut next = 100;
        // 512 bytes into chunk 0 and 1: 1536..2560 spans chunks 1 and 2.
        c.commit(
            1536,
            1024,
            |k| {
                log.push(format!("map {k}"));
                next += 1;
                Ok::<_, ()>(next)
            },
            |_, _| Ok(()),
        )
        .unwrap();
        assert_eq!(log, ["map 1", "map 2"]);
        // More of chunk 2: already mapped.
        c.commit(2560, 512, |_| Err(()), |_, _| Ok(())).unwrap();
        assert_eq!(c.mapped_chunks(), 2);
        // Give back the first range: chunk 1 empties, chunk 2 keeps 512.
        c.decommit(1536, 1024, |k, h| {
            log.push(format!("unmap {k} {h}"));
            Ok::<_, ()>(())
        })
        .unwrap();
        assert_eq!(log.last().unwrap(), "unmap 1 101");
        assert_eq!(c.mapped_chunks(), 1);
        c.decommit(2560, 512, |k, h| {
            log.push(format!("unmap {k} {h}"));
            Ok::<_, ()>(())
        })
        .unwrap();
        assert_eq!(log.last().unwrap(), "unmap 2 102");
        assert_eq!(c.mapped_chunks(), 0);
    }

    #[test]
    fn a_failed_map_undoes_the_whole_commit() {
        let mut c = ChunkCounts::<u32>::new(4096, 1024);
        let mut unmapped = Vec::new();
        let err = c
            .commit(
                0,
                3072,
                |k| {
                    if k < 2 {
                        Ok(k as u32)
                    } else {
                        Err("out of memory")
                    }
                },
                |k, _| {
                    unmapped.push(k);
                    Ok(())
                },
            )
            .unwrap_err();
        assert_eq!(err, "out of memory");
        assert_eq!(unmapped, [0, 1]);
        assert_eq!(c.mapped_chunks(), 0);
        // Nothing was counted: a later commit maps again.
        c.commit(0, 1024, |k| Ok::<_, &str>(k as u32), |_, _| Ok(()))
            .unwrap();
        assert_eq!(c.mapped_chunks(), 1);
        assert_eq!(c.drain_mapped(), [(0, 0)]);
    }

    #[test]
    fn a_failed_unmap_keeps_the_chunk_mapped() {
        let mut c = ChunkCounts::<u32>::new(2048, 1024);
        c.commit(0, 2048, |k| Ok::<_, &str>(k as u32), |_, _| Ok(()))
            .unwrap();
        let err = c
            .decommit(0, 2048, |k, _| if k == 0 { Err("busy") } else { Ok(()) })
            .unwrap_err();
        assert_eq!(err, "busy");
        assert_eq!(c.mapped_chunks(), 1);
        assert_eq!(c.drain_mapped(), [(0, 0)]);
    }
}
