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

/// The PCIe link of a device, read from sysfs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PciLink {
    /// Transfer rate per lane, GT/s (8 for gen3, 16 for gen4).
    pub gt_per_s: f64,
    /// Lanes.
    pub width: u32,
}

impl PciLink {
    /// Payload bandwidth of the link in GB/s after line encoding (8b/10b up
    /// to 5 GT/s, 128b/130b above), before protocol overhead.
    pub fn bound_gb_per_s(&self) -> f64 {
        let encoding = if self.gt_per_s <= 5.0 {
            0.8
        } else {
            128.0 / 130.0
        };
        self.gt_per_s * encoding * f64::from(self.width) / 8.0
    }
}

/// The current PCIe link of `ctx`'s device, or None when sysfs does not
/// say (not Linux, a virtual device, a container without /sys).
pub fn pci_link(ctx: &CudaContext) -> Option<PciLink> {
    use cudarc::driver::sys::CUdevice_attribute as A;
    let domain = ctx.attribute(A::CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID).ok()?;
    let bus = ctx.attribute(A::CU_DEVICE_ATTRIBUTE_PCI_BUS_ID).ok()?;
    let device = ctx.attribute(A::CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID).ok()?;
    let dir = format!("/sys/bus/pci/devices/{domain:04x}:{bus:02x}:{device:02x}.0");
    let read = |name: &str| std::fs::read_to_string(format!("{dir}/{name}")).ok();
    let speed = read("current_link_speed")?;
    let gt_per_s = speed.split_whitespace().next()?.parse().ok()?;
    let width = read("current_link_width")?.trim().parse().ok()?;
    Some(PciLink { gt_per_s, width })
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
    fn pcie_bounds_follow_the_line_encoding() {
        let gen3 = PciLink {
            gt_per_s: 8.0,
            width: 16,
        };
        assert!((gen3.bound_gb_per_s() - 15.754).abs() < 0.01);
        let gen2 = PciLink {
            gt_per_s: 5.0,
            width: 8,
        };
        assert!((gen2.bound_gb_per_s() - 4.0).abs() < 1e-9);
    }

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
