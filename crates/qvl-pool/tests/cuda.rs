//! The CUDA pools on a real device. Without a driver or a device every test
//! prints that it was skipped and why, and passes: the CPU-only build must
//! stay green, and `cargo xtask gpu-check` runs these where a GPU is.
#![cfg(feature = "cuda")]
// Helpers of a test: a failed call is a failed test.
#![allow(clippy::unwrap_used)]

use qvl_core::{AllocRequest, BufferAllocator, ByteSize, TensorKind};
use qvl_pool::cuda::{
    self, CudaContext, CudaPoolConfig, CudaPoolMode, DevicePool, PinnedPool, Transfer,
};
use std::sync::Arc;

fn gpu(test: &str) -> Option<Arc<CudaContext>> {
    match cuda::probe(0) {
        Ok(ctx) => Some(ctx),
        Err(e) => {
            println!("skipped: {test}: needs a CUDA GPU: {e}");
            None
        }
    }
}

fn req(bytes: usize) -> AllocRequest {
    AllocRequest::bytes(bytes, TensorKind::Activation)
}

fn config(mode: CudaPoolMode) -> CudaPoolConfig {
    CudaPoolConfig {
        max_pool_size: ByteSize::mib(256),
        mode,
    }
}

#[test]
fn device_buffers_are_distinct_aligned_and_round_trip() {
    let Some(ctx) = gpu("device_buffers_are_distinct_aligned_and_round_trip") else {
        return;
    };
    let stream = ctx.new_stream().unwrap();
    for mode in [
        CudaPoolMode::Pool,
        CudaPoolMode::Driver,
        CudaPoolMode::DriverAsync,
    ] {
        let device = DevicePool::new(&ctx, &stream, &config(mode)).unwrap();
        let pinned = PinnedPool::new(&ctx, &stream, &config(mode)).unwrap();
        let sizes = [1usize, 500, 513, 4096, 100_000, 3 << 20];
        let mut bufs: Vec<_> = sizes
            .iter()
            .map(|&n| device.allocate(&req(n)).unwrap())
            .collect();
        let mut spans: Vec<(usize, usize)> = bufs.iter().map(|b| (b.addr(), b.len())).collect();
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "{mode:?}: overlapping {w:?}");
        }
        assert!(bufs.iter().all(|b| b.addr() % 256 == 0));
        let aligned = device.allocate(&req(10).with_align(1 << 16)).unwrap();
        assert_eq!(aligned.addr() % (1 << 16), 0);
        // Pinned -> device -> pinned keeps every byte.
        let transfer = Transfer::new(Arc::clone(&stream));
        let big = bufs.last_mut().unwrap();
        let mut src = pinned.allocate(&req(big.len())).unwrap();
        for (i, b) in src.iter_mut().enumerate() {
            *b = (i * 31 % 251) as u8;
        }
        let mut back = pinned.allocate(&req(big.len())).unwrap();
        transfer.to_device(&mut src, big).unwrap().wait().unwrap();
        transfer.to_host(big, &mut back).unwrap().wait().unwrap();
        assert!(
            back.iter().eq(src.iter()),
            "{mode:?}: round trip changed bytes"
        );
        let s = device.stats();
        assert!(s.allocated_bytes >= sizes.iter().sum::<usize>() as u64);
        assert!(s.reserved_bytes >= s.allocated_bytes);
        drop(bufs);
        drop(aligned);
        drop((src, back));
        stream.synchronize().unwrap();
        device.release_cached();
        assert_eq!(device.stats().allocated_bytes, 0, "{mode:?}");
        if mode == CudaPoolMode::Pool {
            assert_eq!(device.stats().reserved_bytes, 0, "everything given back");
        }
    }
}

#[test]
fn freed_device_memory_is_reused_without_the_driver() {
    let Some(ctx) = gpu("freed_device_memory_is_reused_without_the_driver") else {
        return;
    };
    let stream = ctx.new_stream().unwrap();
    let pool = DevicePool::new(&ctx, &stream, &config(CudaPoolMode::Pool)).unwrap();
    let a = pool.allocate(&req(1 << 20)).unwrap();
    let addr = a.addr();
    drop(a);
    let commits = pool.stats().os_alloc_count;
    let b = pool.allocate(&req(1 << 20)).unwrap();
    assert_eq!(b.addr(), addr, "same stream: reused at once");
    assert_eq!(pool.stats().os_alloc_count, commits, "no driver call");
}

#[test]
fn frees_wait_for_the_streams_that_used_the_buffer() {
    let Some(ctx) = gpu("frees_wait_for_the_streams_that_used_the_buffer") else {
        return;
    };
    let home = ctx.new_stream().unwrap();
    let other = ctx.new_stream().unwrap();
    let device = DevicePool::new(&ctx, &home, &config(CudaPoolMode::Pool)).unwrap();
    let pinned = PinnedPool::new(&ctx, &home, &config(CudaPoolMode::Pool)).unwrap();
    let mut buf = device.allocate(&req(8 << 20)).unwrap();
    let mut src = pinned.allocate(&req(8 << 20)).unwrap();
    src.fill(7);
    let addr = buf.addr();
    let copy = Transfer::new(Arc::clone(&other))
        .to_device(&mut src, &mut buf)
        .unwrap();
    drop(buf);
    drop(src);
    assert_eq!(
        device.pending_frees(),
        1,
        "held until `other` passes the copy"
    );
    assert_eq!(pinned.pending_frees(), 1);
    copy.wait().unwrap();
    let again = device.allocate(&req(8 << 20)).unwrap();
    assert_eq!(
        device.pending_frees(),
        0,
        "collected once the event completed"
    );
    assert_eq!(again.addr(), addr);
}

#[test]
fn pinned_buffers_are_host_bytes() {
    let Some(ctx) = gpu("pinned_buffers_are_host_bytes") else {
        return;
    };
    let stream = ctx.new_stream().unwrap();
    let pool = PinnedPool::new(&ctx, &stream, &config(CudaPoolMode::Pool)).unwrap();
    let mut a = pool.allocate(&req(10_000).with_align(4096)).unwrap();
    assert_eq!(a.addr() % 4096, 0);
    assert!(a.iter().all(|&b| b == 0), "fresh pinned pages are zero");
    a[9_999] = 5;
    assert_eq!(a[9_999], 5);
    assert_eq!(pool.tier(), qvl_core::Tier::HostRam);
    drop(a);
    assert!(pool.release_cached() > 0);
    assert_eq!(pool.stats().reserved_bytes, 0);
}

#[test]
fn a_full_device_pool_says_so() {
    let Some(ctx) = gpu("a_full_device_pool_says_so") else {
        return;
    };
    let stream = ctx.new_stream().unwrap();
    let pool = DevicePool::new(
        &ctx,
        &stream,
        &CudaPoolConfig {
            max_pool_size: ByteSize::mib(4),
            mode: CudaPoolMode::Pool,
        },
    )
    .unwrap();
    let _a = pool.allocate(&req(3 << 20)).unwrap();
    let err = pool.allocate(&req(3 << 20)).unwrap_err().to_string();
    assert!(err.contains("is full"), "{err}");
}
