//! The two CUDA backings of the arena: device memory mapped into one
//! reserved virtual range (CUDA virtual memory management), and host memory
//! pinned chunk by chunk inside one anonymous mapping.

use super::{driver, CudaContext};
use crate::backing::{Backing, HostBacking};
use crate::chunks::ChunkCounts;
use crate::PoolError;
use cudarc::driver::sys;
use qvl_core::{ByteSize, Tier};
use std::sync::Arc;

/// Arena granule of the device pool: blocks are multiples of 512 bytes
/// (what `cudaMalloc` rounds small requests to), aligned to 512.
pub const DEVICE_GRANULE: usize = 512;
/// Chunk in which pinned host memory is registered with the driver.
pub const PINNED_CHUNK: usize = 2 << 20;

/// What a CUDA pool needs from its backing beyond [`Backing`].
pub trait CudaBacking: Backing + Sized {
    /// Tier of the memory.
    const TIER: Tier;
    /// Name in messages ("device", "pinned host").
    const NAME: &'static str;

    /// Reserves `capacity` bytes of this memory's address space.
    fn reserve(ctx: &Arc<CudaContext>, capacity: usize) -> Result<Self, PoolError>;

    /// Physical bytes held now (mapped chunks, or the whole range when it
    /// was allocated at once).
    fn mapped_bytes(&self) -> usize;

    /// One allocation straight from the driver, for the unpooled modes:
    /// `cuMemAlloc` (or `cuMemAllocAsync` on `stream` when `on_stream`) for
    /// the device, `cuMemHostAlloc` for pinned memory.
    fn driver_alloc(
        ctx: &CudaContext,
        bytes: usize,
        stream: Option<sys::CUstream>,
    ) -> Result<usize, PoolError>;

    /// Frees what [`CudaBacking::driver_alloc`] returned.
    ///
    /// # Safety
    /// `ptr` came from `driver_alloc` with the same `stream` choice and is
    /// freed once; no work still queued may use it, unless `stream` is the
    /// stream that work is on.
    unsafe fn driver_free(
        ctx: &CudaContext,
        ptr: usize,
        stream: Option<sys::CUstream>,
    ) -> Result<(), PoolError>;
}

/// Device memory: one virtual range reserved with `cuMemAddressReserve`,
/// physical memory created and mapped in chunks of the allocation
/// granularity (2 MiB) as the arena grows, unmapped and released as it
/// gives memory back (PyTorch's expandable segments). On a device without
/// virtual memory management the whole range is one `cuMemAlloc` made up
/// front.
pub struct DeviceBacking {
    ctx: Arc<CudaContext>,
    base: sys::CUdeviceptr,
    capacity: usize,
    kind: DeviceKind,
}

enum DeviceKind {
    Mapped {
        prop: sys::CUmemAllocationProp,
        chunks: ChunkCounts<sys::CUmemGenericAllocationHandle>,
    },
    Whole,
}

// SAFETY: the backing owns its range and handles exclusively; the raw
// pointer inside `prop` is an unused Windows field (null).
unsafe impl Send for DeviceBacking {}

impl std::fmt::Debug for DeviceBacking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceBacking")
            .field("base", &self.base)
            .field("capacity", &self.capacity)
            .field("mapped", &self.mapped_bytes())
            .finish()
    }
}

impl DeviceBacking {
    /// Reserves `capacity` bytes of device address space on `ctx`'s device.
    pub fn reserve(ctx: &Arc<CudaContext>, capacity: usize) -> Result<DeviceBacking, PoolError> {
        driver::bind(ctx)?;
        let device = ctx.cu_device();
        // SAFETY: a valid device from the context, an attribute of the enum.
        let vmm = unsafe {
            cudarc::driver::result::device::get_attribute(
                device,
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED,
            )
        }
        .map_err(|e| driver::err("cuDeviceGetAttribute(VMM)", e))?;
        if vmm == 0 {
            let capacity = capacity.div_ceil(DEVICE_GRANULE) * DEVICE_GRANULE;
            let base = if capacity == 0 {
                0
            } else {
                <Self as CudaBacking>::driver_alloc(ctx, capacity, None)? as sys::CUdeviceptr
            };
            return Ok(DeviceBacking {
                ctx: Arc::clone(ctx),
                base,
                capacity,
                kind: DeviceKind::Whole,
            });
        }
        // SAFETY: zeroed is a valid bit pattern for this plain C struct; the
        // fields that matter are set just below.
        let mut prop: sys::CUmemAllocationProp = unsafe { std::mem::zeroed() };
        prop.type_ = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
        prop.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
        prop.location.id = device;
        let mut chunk = 0usize;
        // SAFETY: both pointers are valid for the call.
        unsafe {
            sys::cuMemGetAllocationGranularity(
                &mut chunk,
                &prop,
                sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM,
            )
        }
        .result()
        .map_err(|e| driver::err("cuMemGetAllocationGranularity", e))?;
        let chunk = chunk.max(DEVICE_GRANULE);
        let capacity = capacity.div_ceil(chunk) * chunk;
        let mut base: sys::CUdeviceptr = 0;
        if capacity > 0 {
            // SAFETY: reserves address space only; `base` is written on success.
            unsafe { sys::cuMemAddressReserve(&mut base, capacity, chunk, 0, 0) }
                .result()
                .map_err(|e| driver::err("cuMemAddressReserve", e))?;
        }
        Ok(DeviceBacking {
            ctx: Arc::clone(ctx),
            base,
            capacity,
            kind: DeviceKind::Mapped {
                prop,
                chunks: ChunkCounts::new(capacity, chunk),
            },
        })
    }

    /// Whether the range is mapped chunk by chunk (false: one allocation).
    pub fn is_expandable(&self) -> bool {
        matches!(self.kind, DeviceKind::Mapped { .. })
    }

    fn map_chunk(
        ctx: &CudaContext,
        base: sys::CUdeviceptr,
        prop: &sys::CUmemAllocationProp,
        chunk: usize,
        k: usize,
    ) -> Result<sys::CUmemGenericAllocationHandle, PoolError> {
        let addr = base + (k * chunk) as u64;
        let mut handle: sys::CUmemGenericAllocationHandle = 0;
        // SAFETY: creates physical memory; `handle` is written on success.
        unsafe { sys::cuMemCreate(&mut handle, chunk, prop, 0) }
            .result()
            .map_err(|e| driver::err("cuMemCreate", e))?;
        // SAFETY: `addr..addr+chunk` lies in our reservation and is unmapped
        // (the chunk counts say so); the handle is the one just created.
        let mapped = unsafe { sys::cuMemMap(addr, chunk, 0, handle, 0) }
            .result()
            .map_err(|e| driver::err("cuMemMap", e))
            .and_then(|()| {
                let desc = sys::CUmemAccessDesc {
                    location: prop.location,
                    flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
                };
                // SAFETY: the range was just mapped; one descriptor is passed.
                unsafe { sys::cuMemSetAccess(addr, chunk, &desc, 1) }
                    .result()
                    .map_err(|e| {
                        // SAFETY: undoing the map made just above.
                        let _ = unsafe { sys::cuMemUnmap(addr, chunk) };
                        driver::err("cuMemSetAccess", e)
                    })
            });
        if let Err(e) = mapped {
            // SAFETY: the handle is ours and mapped nowhere.
            let _ = unsafe { sys::cuMemRelease(handle) };
            return Err(e);
        }
        let _ = ctx;
        Ok(handle)
    }

    fn unmap_chunk(
        base: sys::CUdeviceptr,
        chunk: usize,
        k: usize,
        handle: sys::CUmemGenericAllocationHandle,
    ) -> Result<(), PoolError> {
        let addr = base + (k * chunk) as u64;
        // SAFETY: the chunk was mapped with `handle` by `map_chunk`, and the
        // arena holds no live block in it (its count reached zero); callers
        // synchronize the pool's streams before giving memory back.
        unsafe { sys::cuMemUnmap(addr, chunk) }
            .result()
            .map_err(|e| driver::err("cuMemUnmap", e))?;
        // SAFETY: the handle is unmapped now and released once.
        unsafe { sys::cuMemRelease(handle) }
            .result()
            .map_err(|e| driver::err("cuMemRelease", e))
    }
}

impl Backing for DeviceBacking {
    fn base(&self) -> usize {
        self.base as usize
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn granule(&self) -> usize {
        DEVICE_GRANULE
    }

    fn commit(&mut self, offset: usize, len: usize) -> Result<(), PoolError> {
        let DeviceKind::Mapped { prop, chunks } = &mut self.kind else {
            return Ok(());
        };
        driver::bind(&self.ctx)?;
        let (ctx, base, chunk) = (&self.ctx, self.base, chunks.chunk());
        let prop = *prop;
        chunks.commit(
            offset,
            len,
            |k| Self::map_chunk(ctx, base, &prop, chunk, k),
            |k, h| Self::unmap_chunk(base, chunk, k, h),
        )
    }

    fn decommit(&mut self, offset: usize, len: usize) -> Result<(), PoolError> {
        let DeviceKind::Mapped { chunks, .. } = &mut self.kind else {
            return Ok(());
        };
        driver::bind(&self.ctx)?;
        let (base, chunk) = (self.base, chunks.chunk());
        chunks.decommit(offset, len, |k, h| Self::unmap_chunk(base, chunk, k, h))
    }
}

impl CudaBacking for DeviceBacking {
    const TIER: Tier = Tier::Gpu;
    const NAME: &'static str = "device";

    fn reserve(ctx: &Arc<CudaContext>, capacity: usize) -> Result<Self, PoolError> {
        DeviceBacking::reserve(ctx, capacity)
    }

    fn mapped_bytes(&self) -> usize {
        match &self.kind {
            DeviceKind::Mapped { chunks, .. } => chunks.mapped_chunks() * chunks.chunk(),
            DeviceKind::Whole => self.capacity,
        }
    }

    fn driver_alloc(
        ctx: &CudaContext,
        bytes: usize,
        stream: Option<sys::CUstream>,
    ) -> Result<usize, PoolError> {
        driver::bind(ctx)?;
        let mut ptr: sys::CUdeviceptr = 0;
        let bytes = bytes.max(1);
        match stream {
            // SAFETY: `ptr` is written on success; the stream is alive (the
            // pool holds it).
            Some(s) => unsafe { sys::cuMemAllocAsync(&mut ptr, bytes, s) }
                .result()
                .map_err(|e| driver::err("cuMemAllocAsync", e))?,
            // SAFETY: `ptr` is written on success.
            None => unsafe { sys::cuMemAlloc_v2(&mut ptr, bytes) }
                .result()
                .map_err(|e| driver::err("cuMemAlloc", e))?,
        }
        Ok(ptr as usize)
    }

    unsafe fn driver_free(
        ctx: &CudaContext,
        ptr: usize,
        stream: Option<sys::CUstream>,
    ) -> Result<(), PoolError> {
        driver::bind(ctx)?;
        match stream {
            // SAFETY: per this function's contract.
            Some(s) => unsafe { sys::cuMemFreeAsync(ptr as sys::CUdeviceptr, s) }
                .result()
                .map_err(|e| driver::err("cuMemFreeAsync", e)),
            // SAFETY: per this function's contract.
            None => unsafe { sys::cuMemFree_v2(ptr as sys::CUdeviceptr) }
                .result()
                .map_err(|e| driver::err("cuMemFree", e)),
        }
    }
}

impl Drop for DeviceBacking {
    fn drop(&mut self) {
        if self.capacity == 0 {
            return;
        }
        if driver::bind(&self.ctx).is_err() {
            tracing::error!("cannot bind the CUDA context to free the device pool");
            return;
        }
        // Nothing may still run on this memory: the pool that owns the
        // backing is dropped only when no buffer is left, and its drop
        // synchronized the pending frees.
        match &mut self.kind {
            DeviceKind::Mapped { chunks, .. } => {
                let chunk = chunks.chunk();
                for (k, h) in chunks.drain_mapped() {
                    if let Err(e) = Self::unmap_chunk(self.base, chunk, k, h) {
                        tracing::error!("releasing device pool chunk {k}: {e}");
                    }
                }
                // SAFETY: the reservation made in `reserve`, now unmapped.
                if let Err(e) = unsafe { sys::cuMemAddressFree(self.base, self.capacity) }.result()
                {
                    tracing::error!("cuMemAddressFree of the device pool: {e}");
                }
            }
            DeviceKind::Whole => {
                // SAFETY: the allocation made in `reserve`, freed once.
                if let Err(e) = unsafe { Self::driver_free(&self.ctx, self.base as usize, None) } {
                    tracing::error!("freeing the device pool: {e}");
                }
            }
        }
    }
}

/// Pinned host memory: one anonymous mapping (as [`HostBacking`]) whose
/// chunks of [`PINNED_CHUNK`] are page-locked with `cuMemHostRegister` as
/// the arena grows, and unregistered and returned to the OS as it gives
/// memory back.
///
/// A buffer that spans two chunks spans two registrations: copies from it
/// are still correct, and the driver may split them.
pub struct PinnedBacking {
    ctx: Arc<CudaContext>,
    host: HostBacking,
    chunks: ChunkCounts<()>,
}

impl std::fmt::Debug for PinnedBacking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedBacking")
            .field("host", &self.host)
            .field("mapped", &self.mapped_bytes())
            .finish()
    }
}

impl PinnedBacking {
    /// Reserves `capacity` bytes of host address space to pin as needed.
    pub fn reserve(ctx: &Arc<CudaContext>, capacity: usize) -> Result<PinnedBacking, PoolError> {
        let capacity = capacity.div_ceil(PINNED_CHUNK) * PINNED_CHUNK;
        let host = HostBacking::reserve(capacity)?;
        Ok(PinnedBacking {
            ctx: Arc::clone(ctx),
            chunks: ChunkCounts::new(host.capacity(), PINNED_CHUNK),
            host,
        })
    }

    fn chunk_range(&self, k: usize) -> (*mut std::ffi::c_void, usize) {
        let start = k * PINNED_CHUNK;
        let len = PINNED_CHUNK.min(self.host.capacity() - start);
        ((self.host.base() + start) as *mut std::ffi::c_void, len)
    }
}

impl Backing for PinnedBacking {
    fn base(&self) -> usize {
        self.host.base()
    }

    fn capacity(&self) -> usize {
        self.host.capacity()
    }

    fn granule(&self) -> usize {
        self.host.granule()
    }

    fn commit(&mut self, offset: usize, len: usize) -> Result<(), PoolError> {
        driver::bind(&self.ctx)?;
        let ranges: Vec<_> = (0..self.chunks_len())
            .map(|k| self.chunk_range(k))
            .collect();
        self.chunks.commit(
            offset,
            len,
            |k| {
                let (ptr, len) = ranges[k];
                // SAFETY: the range is inside our mapping, page aligned, and
                // not registered yet (the chunk counts say so). Registering
                // populates and locks its pages.
                unsafe { sys::cuMemHostRegister_v2(ptr, len, sys::CU_MEMHOSTREGISTER_PORTABLE) }
                    .result()
                    .map_err(|e| driver::err("cuMemHostRegister", e))
            },
            |k, ()| {
                // SAFETY: undoing the registration of this chunk made above.
                unsafe { sys::cuMemHostUnregister(ranges[k].0) }
                    .result()
                    .map_err(|e| driver::err("cuMemHostUnregister", e))
            },
        )
    }

    fn decommit(&mut self, offset: usize, len: usize) -> Result<(), PoolError> {
        driver::bind(&self.ctx)?;
        let ranges: Vec<_> = (0..self.chunks_len())
            .map(|k| self.chunk_range(k))
            .collect();
        let host = &mut self.host;
        self.chunks.decommit(offset, len, |k, ()| {
            let (ptr, len) = ranges[k];
            // SAFETY: the chunk was registered by `commit` and holds no live
            // buffer (its count reached zero).
            unsafe { sys::cuMemHostUnregister(ptr) }
                .result()
                .map_err(|e| driver::err("cuMemHostUnregister", e))?;
            host.decommit(k * PINNED_CHUNK, len)
        })
    }
}

impl PinnedBacking {
    fn chunks_len(&self) -> usize {
        self.host.capacity().div_ceil(PINNED_CHUNK)
    }
}

impl CudaBacking for PinnedBacking {
    const TIER: Tier = Tier::HostRam;
    const NAME: &'static str = "pinned host";

    fn reserve(ctx: &Arc<CudaContext>, capacity: usize) -> Result<Self, PoolError> {
        PinnedBacking::reserve(ctx, capacity)
    }

    fn mapped_bytes(&self) -> usize {
        self.chunks.mapped_chunks() * PINNED_CHUNK
    }

    fn driver_alloc(
        ctx: &CudaContext,
        bytes: usize,
        _stream: Option<sys::CUstream>,
    ) -> Result<usize, PoolError> {
        driver::bind(ctx)?;
        let mut ptr: *mut std::ffi::c_void = std::ptr::null_mut();
        // SAFETY: `ptr` is written on success.
        unsafe { sys::cuMemHostAlloc(&mut ptr, bytes.max(1), sys::CU_MEMHOSTALLOC_PORTABLE) }
            .result()
            .map_err(|e| driver::err("cuMemHostAlloc", e))?;
        Ok(ptr as usize)
    }

    unsafe fn driver_free(
        ctx: &CudaContext,
        ptr: usize,
        _stream: Option<sys::CUstream>,
    ) -> Result<(), PoolError> {
        driver::bind(ctx)?;
        // SAFETY: per this function's contract.
        unsafe { sys::cuMemFreeHost(ptr as *mut std::ffi::c_void) }
            .result()
            .map_err(|e| driver::err("cuMemFreeHost", e))
    }
}

impl Drop for PinnedBacking {
    fn drop(&mut self) {
        if driver::bind(&self.ctx).is_err() {
            tracing::error!("cannot bind the CUDA context to unpin the pinned pool");
            return;
        }
        for (k, ()) in self.chunks.drain_mapped() {
            let (ptr, _) = self.chunk_range(k);
            // SAFETY: registered by `commit`; the pool is gone, so no buffer
            // or copy uses it. The mapping itself goes with `host`.
            if let Err(e) = unsafe { sys::cuMemHostUnregister(ptr) }.result() {
                tracing::error!(
                    "unpinning {} of the pinned pool: {e}",
                    ByteSize(PINNED_CHUNK as u64)
                );
            }
        }
    }
}
