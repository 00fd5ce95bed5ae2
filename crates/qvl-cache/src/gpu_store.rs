//! The GPU block store (feature `cuda`): the L1 level of [`crate::TieredCache`]
//! on a real device.
//!
//! Each block's bytes live in device memory (allocated on the store's stream,
//! which uses the driver's stream-ordered pool where the device has one);
//! its key, shape and codec stay on the host. A put copies the block to the
//! device, a get copies it back; both wait for their copy, so a block handed
//! out is complete. Kernels that read blocks in place use
//! [`GpuStore::with_device_bytes`].
//!
//! The driver is loaded at run time: [`GpuStore::open`] says why CUDA is
//! unavailable instead of panicking, and callers fall back to a host store.

use crate::keymap::KeyMap;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use qvl_core::{Block, BlockKey, BlockStore, ByteSize, CodecId, CoreError, TensorMeta, Tier};
use std::sync::{Arc, Mutex, MutexGuard};

struct Entry {
    meta: TensorMeta,
    codec: CodecId,
    /// None for an empty block (the driver allocates no zero-byte buffers).
    data: Option<CudaSlice<u8>>,
    len: u64,
}

struct Contents {
    blocks: KeyMap<Entry>,
    used: u64,
}

/// Blocks in GPU memory with a byte capacity. Thread-safe: one mutex guards
/// the map and the byte count.
pub struct GpuStore {
    stream: Arc<CudaStream>,
    capacity: u64,
    contents: Mutex<Contents>,
}

impl std::fmt::Debug for GpuStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuStore")
            .field("capacity", &ByteSize(self.capacity))
            .field("used", &ByteSize(self.used_bytes()))
            .field("blocks", &self.len())
            .finish()
    }
}

fn cuda_err(what: &str, e: impl std::fmt::Display) -> CoreError {
    CoreError::Unavailable {
        backend: "cuda",
        reason: format!("{what}: {e}"),
    }
}

impl GpuStore {
    /// A store of `capacity` bytes on device `ordinal`, with a stream of its
    /// own; an [`CoreError::Unavailable`] error saying why when there is no
    /// driver or no such device.
    pub fn open(ordinal: usize, capacity: ByteSize) -> qvl_core::Result<GpuStore> {
        // SAFETY: only tries to open the driver library under its known names.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(CoreError::Unavailable {
                backend: "cuda",
                reason: "the CUDA driver library (libcuda.so.1) is not installed or not on the \
                         loader path"
                    .into(),
            });
        }
        let ctx = match std::panic::catch_unwind(|| CudaContext::new(ordinal)) {
            Ok(Ok(ctx)) => ctx,
            Ok(Err(e)) => return Err(cuda_err(&format!("opening CUDA device {ordinal}"), e)),
            Err(_) => {
                return Err(CoreError::Unavailable {
                    backend: "cuda",
                    reason: "the CUDA driver lacks a function cudarc needs".into(),
                })
            }
        };
        let stream = ctx
            .new_stream()
            .map_err(|e| cuda_err("creating a stream", e))?;
        Ok(GpuStore::new(stream, capacity))
    }

    /// A store of `capacity` bytes whose copies go on `stream`.
    pub fn new(stream: Arc<CudaStream>, capacity: ByteSize) -> GpuStore {
        GpuStore {
            stream,
            capacity: capacity.bytes(),
            contents: Mutex::new(Contents {
                blocks: KeyMap::default(),
                used: 0,
            }),
        }
    }

    /// The stream copies go on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    fn lock(&self) -> MutexGuard<'_, Contents> {
        // Each update is one insert or remove plus an addition: a poisoned
        // lock is still consistent.
        self.contents.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the device bytes of block `key` (None when absent or
    /// empty), with the store locked so the block cannot go away meanwhile.
    /// Work that `f` queues on the store's stream is ordered before any
    /// later replacement of the block.
    pub fn with_device_bytes<R>(
        &self,
        key: &BlockKey,
        f: impl FnOnce(Option<&CudaSlice<u8>>) -> R,
    ) -> R {
        let c = self.lock();
        f(c.blocks.get(key).and_then(|e| e.data.as_ref()))
    }
}

impl BlockStore for GpuStore {
    fn tier(&self) -> Tier {
        Tier::Gpu
    }

    fn put(&self, block: Block) -> qvl_core::Result<()> {
        let size = block.stored_bytes();
        if size > self.capacity {
            return Err(CoreError::TooLarge {
                what: "block",
                size: ByteSize(size),
                tier: Tier::Gpu,
                capacity: ByteSize(self.capacity),
            });
        }
        {
            let c = self.lock();
            let replaced = c.blocks.get(&block.key).map_or(0, |e| e.len);
            if c.used - replaced + size > self.capacity {
                return Err(CoreError::OutOfCapacity {
                    tier: Tier::Gpu,
                    needed: ByteSize(size),
                    available: ByteSize(self.capacity - (c.used - replaced)),
                    capacity: ByteSize(self.capacity),
                });
            }
        }
        // Copy outside the lock: other blocks stay readable meanwhile.
        let data = if block.data.is_empty() {
            None
        } else {
            let d = self
                .stream
                .clone_htod(&block.data[..])
                .map_err(|e| cuda_err("copying a block to the GPU", e))?;
            self.stream
                .synchronize()
                .map_err(|e| cuda_err("waiting for a block copy", e))?;
            Some(d)
        };
        let mut c = self.lock();
        let replaced = c.blocks.get(&block.key).map_or(0, |e| e.len);
        // Checked again: another put may have filled the store meanwhile.
        if c.used - replaced + size > self.capacity {
            return Err(CoreError::OutOfCapacity {
                tier: Tier::Gpu,
                needed: ByteSize(size),
                available: ByteSize(self.capacity - (c.used - replaced)),
                capacity: ByteSize(self.capacity),
            });
        }
        c.used = c.used - replaced + size;
        c.blocks.insert(
            block.key,
            Entry {
                meta: block.meta,
                codec: block.codec,
                data,
                len: size,
            },
        );
        Ok(())
    }

    fn get(&self, key: &BlockKey) -> qvl_core::Result<Option<Block>> {
        let c = self.lock();
        let Some(e) = c.blocks.get(key) else {
            return Ok(None);
        };
        let bytes = match &e.data {
            Some(d) => self
                .stream
                .clone_dtoh(d)
                .map_err(|err| cuda_err("copying a block from the GPU", err))?,
            None => Vec::new(),
        };
        if bytes.len() as u64 != e.len {
            return Err(CoreError::Corrupt {
                key: *key,
                tier: Tier::Gpu,
                reason: format!("{} bytes read back, {} stored", bytes.len(), e.len),
            });
        }
        Ok(Some(Block {
            key: *key,
            meta: e.meta.clone(),
            codec: e.codec,
            data: bytes.into(),
        }))
    }

    fn remove(&self, key: &BlockKey) -> qvl_core::Result<bool> {
        let mut c = self.lock();
        match c.blocks.remove(key) {
            Some(e) => {
                c.used -= e.len;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn contains(&self, key: &BlockKey) -> bool {
        self.lock().blocks.contains_key(key)
    }

    fn capacity_bytes(&self) -> u64 {
        self.capacity
    }

    fn used_bytes(&self) -> u64 {
        self.lock().used
    }

    fn len(&self) -> usize {
        self.lock().blocks.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qvl_core::{DType, TensorKind};

    fn store(test: &str, capacity: ByteSize) -> Option<GpuStore> {
        match GpuStore::open(0, capacity) {
            Ok(s) => Some(s),
            Err(e) => {
                println!("skipped: {test}: needs a CUDA GPU: {e}");
                None
            }
        }
    }

    fn block(id: u64, len: usize) -> Block {
        let meta = TensorMeta::new(vec![len], DType::U8, TensorKind::KvCache);
        let data: Vec<u8> = (0..len).map(|i| (i as u64 * 7 + id) as u8).collect();
        Block::raw(BlockKey::from_id(id), meta, data)
    }

    #[test]
    fn blocks_round_trip_through_device_memory() {
        let Some(s) = store("blocks_round_trip_through_device_memory", ByteSize::mib(1)) else {
            return;
        };
        assert_eq!(s.tier(), Tier::Gpu);
        let a = block(1, 100_000);
        s.put(a.clone()).unwrap();
        s.put(block(2, 0)).unwrap();
        assert_eq!(s.get(&a.key).unwrap().unwrap(), a);
        assert_eq!(s.get(&block(2, 0).key).unwrap().unwrap().data.len(), 0);
        assert_eq!(s.used_bytes(), 100_000);
        assert_eq!(s.len(), 2);
        let seen = s.with_device_bytes(&a.key, |d| d.map(|d| d.len()));
        assert_eq!(seen, Some(100_000));
        // Replacing counts the new size only.
        s.put(block(1, 10)).unwrap();
        assert_eq!(s.used_bytes(), 10);
        assert!(s.remove(&a.key).unwrap());
        assert!(!s.contains(&a.key));
        assert_eq!(s.get(&a.key).unwrap(), None);
    }

    #[test]
    fn a_full_store_refuses_with_the_numbers() {
        let Some(s) = store("a_full_store_refuses_with_the_numbers", ByteSize::kib(64)) else {
            return;
        };
        s.put(block(1, 40 << 10)).unwrap();
        let err = s.put(block(2, 40 << 10)).unwrap_err();
        assert!(matches!(err, CoreError::OutOfCapacity { .. }), "{err}");
        let err = s.put(block(3, 65 << 10)).unwrap_err();
        assert!(matches!(err, CoreError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn open_without_a_driver_says_why() {
        if let Err(e) = GpuStore::open(0, ByteSize::mib(1)) {
            let text = e.to_string();
            println!("skipped: open_without_a_driver_says_why (no GPU here): {text}");
            assert!(text.starts_with("cuda is unavailable: "), "{text}");
        } else {
            println!("cuda: GpuStore opened device 0");
        }
    }
}
