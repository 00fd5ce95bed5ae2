//! Copies between host and device on a stream, with events to wait on.

use super::pool::{DeviceBuffer, PinnedBuffer};
use super::{driver, CudaStream};
use crate::PoolError;
use cudarc::driver::{sys, CudaEvent};
use std::sync::Arc;

/// Queues copies on one stream. Copies between a pinned and a device buffer
/// are asynchronous: they return at once with a [`CopyEvent`], and both
/// buffers are marked as used by the stream, so dropping either of them
/// early is safe. Touching the pinned bytes before the event completes is
/// not: wait for it first.
#[derive(Debug, Clone)]
pub struct Transfer {
    stream: Arc<CudaStream>,
}

/// Completes when the copies queued before it on its stream are done.
#[derive(Debug)]
pub struct CopyEvent {
    event: CudaEvent,
}

impl CopyEvent {
    /// Blocks until the copy is done.
    pub fn wait(&self) -> Result<(), PoolError> {
        self.event
            .synchronize()
            .map_err(|e| driver::err("cuEventSynchronize", e))
    }

    /// Whether the copy is done, without blocking.
    pub fn is_done(&self) -> Result<bool, PoolError> {
        self.event
            .try_is_complete()
            .map_err(|e| driver::err("cuEventQuery", e))
    }
}

fn check_sizes(what: &'static str, src: usize, dst: usize) -> Result<(), PoolError> {
    if src > dst {
        return Err(PoolError::CopySize {
            what,
            source_bytes: src,
            dest_bytes: dst,
        });
    }
    Ok(())
}

impl Transfer {
    /// Copies queued on `stream`.
    pub fn new(stream: Arc<CudaStream>) -> Self {
        Transfer { stream }
    }

    /// The stream the copies go on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    fn event(&self) -> Result<CopyEvent, PoolError> {
        let event = self
            .stream
            .record_event(None)
            .map_err(|e| driver::err("cuEventRecord", e))?;
        Ok(CopyEvent { event })
    }

    /// Queues a copy of all of `src` into the start of `dst` (host to device).
    pub fn to_device(
        &self,
        src: &mut PinnedBuffer,
        dst: &mut DeviceBuffer,
    ) -> Result<CopyEvent, PoolError> {
        check_sizes("pinned to device", src.len(), dst.len())?;
        driver::bind(self.stream.context())?;
        src.record_stream(&self.stream);
        dst.record_stream(&self.stream);
        // SAFETY: both ranges are live buffers of at least `src.len()` bytes
        // (checked above), kept from reuse until the stream passes this copy
        // (record_stream); the stream is alive.
        unsafe {
            sys::cuMemcpyHtoDAsync_v2(
                dst.device_ptr(),
                src.addr() as *const std::ffi::c_void,
                src.len(),
                self.stream.cu_stream(),
            )
        }
        .result()
        .map_err(|e| driver::err("cuMemcpyHtoDAsync", e))?;
        self.event()
    }

    /// Queues a copy of all of `src` into the start of `dst` (device to host).
    pub fn to_host(
        &self,
        src: &mut DeviceBuffer,
        dst: &mut PinnedBuffer,
    ) -> Result<CopyEvent, PoolError> {
        check_sizes("device to pinned", src.len(), dst.len())?;
        driver::bind(self.stream.context())?;
        src.record_stream(&self.stream);
        dst.record_stream(&self.stream);
        // SAFETY: as in `to_device`, in the other direction.
        unsafe {
            sys::cuMemcpyDtoHAsync_v2(
                dst.addr() as *mut std::ffi::c_void,
                src.device_ptr(),
                src.len(),
                self.stream.cu_stream(),
            )
        }
        .result()
        .map_err(|e| driver::err("cuMemcpyDtoHAsync", e))?;
        self.event()
    }

    /// Copies pageable `src` into the start of `dst` and waits for it: the
    /// driver stages pageable memory through its own pinned buffers, so this
    /// is the slow path the pinned pool exists to avoid.
    pub fn to_device_pageable(&self, src: &[u8], dst: &mut DeviceBuffer) -> Result<(), PoolError> {
        check_sizes("pageable to device", src.len(), dst.len())?;
        driver::bind(self.stream.context())?;
        dst.record_stream(&self.stream);
        // SAFETY: `src` is borrowed for the whole call, which waits for the
        // copy; `dst` is a live buffer of at least `src.len()` bytes.
        unsafe {
            sys::cuMemcpyHtoDAsync_v2(
                dst.device_ptr(),
                src.as_ptr().cast(),
                src.len(),
                self.stream.cu_stream(),
            )
        }
        .result()
        .map_err(|e| driver::err("cuMemcpyHtoDAsync", e))?;
        self.stream
            .synchronize()
            .map_err(|e| driver::err("cuStreamSynchronize", e))
    }

    /// Copies `src` into the start of pageable `dst` and waits for it.
    pub fn to_host_pageable(
        &self,
        src: &mut DeviceBuffer,
        dst: &mut [u8],
    ) -> Result<(), PoolError> {
        check_sizes("device to pageable", src.len(), dst.len())?;
        driver::bind(self.stream.context())?;
        src.record_stream(&self.stream);
        // SAFETY: as in `to_device_pageable`, in the other direction.
        unsafe {
            sys::cuMemcpyDtoHAsync_v2(
                dst.as_mut_ptr().cast(),
                src.device_ptr(),
                src.len(),
                self.stream.cu_stream(),
            )
        }
        .result()
        .map_err(|e| driver::err("cuMemcpyDtoHAsync", e))?;
        self.stream
            .synchronize()
            .map_err(|e| driver::err("cuStreamSynchronize", e))
    }
}
