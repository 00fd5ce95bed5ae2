//! The CUDA pools: a device buffer and a pinned buffer, a round trip
//! through the GPU, and the counters. Without a GPU it says why and exits.
//!
//! `cargo run -p qvl-pool --features cuda --example cuda_pool`

use qvl_core::{AllocRequest, BufferAllocator, TensorKind};
use qvl_pool::cuda::{self, CudaPoolConfig, DevicePool, PinnedPool, Transfer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let ctx = match cuda::probe(0) {
        Ok(ctx) => ctx,
        Err(e) => {
            println!("no GPU here, nothing to show: {e}");
            return Ok(());
        }
    };
    println!("device 0: {}", ctx.name()?);
    let stream = ctx.new_stream()?;
    let device = DevicePool::new(&ctx, &stream, &CudaPoolConfig::default())?;
    let pinned = PinnedPool::new(&ctx, &stream, &CudaPoolConfig::default())?;
    let request = AllocRequest::bytes(64 << 20, TensorKind::KvCache);
    let mut host = pinned.allocate(&request)?;
    let mut back = pinned.allocate(&request)?;
    let mut dev = device.allocate(&request)?;
    host.fill(7);
    let transfer = Transfer::new(stream.clone());
    transfer.to_device(&mut host, &mut dev)?.wait()?;
    transfer.to_host(&mut dev, &mut back)?.wait()?;
    println!("round trip intact: {}", back.iter().all(|&b| b == 7));
    drop((host, back, dev));
    println!("device pool: {:?}", device.stats());
    println!(
        "released {} bytes of device memory",
        device.release_cached()
    );
    Ok(())
}
