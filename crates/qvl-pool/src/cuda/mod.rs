//! CUDA pools (feature `cuda`): a device pool and a pinned host pool with
//! the host pool's interface ([`BufferAllocator`]), frees ordered on
//! streams, and asynchronous copies between them.
//!
//! Both pools carve buffers from one [`BfcArena`] over a CUDA backing
//! ([`DeviceBacking`]: device memory mapped into one reserved range;
//! [`PinnedBacking`]: host memory pinned chunk by chunk), so a buffer costs a
//! lock and a tree lookup instead of a driver call.
//!
//! **Stream order.** A pool has a home stream. A buffer used only on it is
//! reused as soon as it is dropped: any later user of the same memory is
//! queued behind the earlier work on that stream. A buffer used on another
//! stream is marked with [`CudaBuffer::record_stream`] (the copies in
//! [`Transfer`] do it themselves); dropping it records an event on each such
//! stream, and its memory comes back only when those events have completed.
//!
//! **No driver.** The driver library is loaded at run time. [`probe`] says
//! why CUDA cannot be used (no `libcuda.so.1`, no device) without the panic
//! that cudarc raises when the library is missing; every entry point here
//! starts from a context that `probe` returned.
//!
//! [`BfcArena`]: crate::bfc::BfcArena
//! [`BufferAllocator`]: qvl_core::BufferAllocator

mod backings;
mod copy;
mod pool;

pub use backings::{CudaBacking, DeviceBacking, PinnedBacking, DEVICE_GRANULE, PINNED_CHUNK};
pub use copy::{CopyEvent, Transfer};
pub use cudarc::driver::{CudaContext, CudaStream};
pub use pool::{
    CudaBuffer, CudaPool, CudaPoolConfig, CudaPoolMode, DeviceBuffer, DevicePool, PinnedBuffer,
    PinnedPool,
};

use crate::PoolError;
use std::sync::Arc;

/// Small helpers around raw driver calls.
pub(crate) mod driver {
    use super::CudaContext;
    use crate::PoolError;
    use cudarc::driver::DriverError;

    /// The error of driver call `op`.
    pub(crate) fn err(op: &'static str, source: DriverError) -> PoolError {
        PoolError::Cuda { op, source }
    }

    /// Makes `ctx` current on this thread (every raw call needs it).
    pub(crate) fn bind(ctx: &CudaContext) -> Result<(), PoolError> {
        ctx.bind_to_thread().map_err(|e| err("cuCtxSetCurrent", e))
    }
}

/// A context on device `ordinal`, or why CUDA cannot be used here.
///
/// Checks for the driver library before calling into it (cudarc panics when
/// it is missing), and turns a panic of a driver too old for a symbol into
/// an error as well.
pub fn probe(ordinal: usize) -> Result<Arc<CudaContext>, PoolError> {
    let unavailable = |reason: String| PoolError::CudaUnavailable { reason };
    // SAFETY: only tries to open the library under its known names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(unavailable(
            "the CUDA driver library (libcuda.so.1) is not installed or not on the loader path"
                .into(),
        ));
    }
    let opened = std::panic::catch_unwind(|| {
        let count = CudaContext::device_count()?;
        if ordinal as i64 >= i64::from(count) {
            return Ok(Err(count));
        }
        CudaContext::new(ordinal).map(Ok)
    });
    match opened {
        Ok(Ok(Ok(ctx))) => Ok(ctx),
        Ok(Ok(Err(0))) => Err(unavailable(
            "the CUDA driver is installed but reports no device".into(),
        )),
        Ok(Ok(Err(count))) => Err(unavailable(format!(
            "device {ordinal} asked for, the driver reports {count}"
        ))),
        Ok(Err(e)) => Err(unavailable(format!("initializing the CUDA driver: {e}"))),
        Err(_) => Err(unavailable(
            "the CUDA driver library lacks a function cudarc needs (driver older than CUDA 12?)"
                .into(),
        )),
    }
}

/// Why the CUDA tests and benchmarks of this machine are skipped, or None
/// when device 0 is usable. Prints nothing; callers say it.
pub fn unavailable_reason() -> Option<String> {
    probe(0).err().map(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_says_why_cuda_is_missing_or_gives_a_context() {
        match probe(0) {
            Ok(ctx) => {
                let name = ctx.name().unwrap();
                println!("cuda: device 0 is {name}");
                assert!(probe(usize::MAX >> 1).is_err());
            }
            Err(e) => {
                let text = e.to_string();
                println!("skipped: CUDA tests need a GPU: {text}");
                assert!(text.starts_with("CUDA is unavailable: "), "{text}");
            }
        }
    }
}
