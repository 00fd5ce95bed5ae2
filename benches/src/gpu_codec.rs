//! `qvl-bench gpu-codec`: the KV codecs' int8/int4 group quantization on
//! the GPU against the CPU codec, on a KV-shaped tensor.
//!
//! Rows: encode and decode throughput (GB/s of f32 input or output) of the
//! CPU codec, of the GPU kernels on device-resident data (what a GPU block
//! store or the tier manager sees) and of the GPU codec from host memory
//! (copies included). Every GPU encoding is checked to be byte-identical
//! to the CPU encoding of the same tensor. Without the `cuda` feature or
//! without a GPU the report says why and holds no criteria.

use crate::BenchOptions;
use anyhow::Result;
use qvl_core::bench::BenchReport;
#[cfg(feature = "cuda")]
use qvl_core::bench::Criterion;
use serde_json::json;

/// Runs the phase.
pub fn run(opts: &BenchOptions) -> Result<BenchReport> {
    let mut report = BenchReport::new("gpu-codec");
    #[cfg(feature = "cuda")]
    {
        report.details = gpu(opts, &mut report)?;
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = opts;
        report.details = json!({"skipped": "built without --features cuda; `cargo xtask gpu-check` runs this phase"});
    }
    Ok(report)
}

#[cfg(feature = "cuda")]
fn gpu(opts: &BenchOptions, report: &mut BenchReport) -> Result<serde_json::Value> {
    use qvl_compress::cuda::{nvrtc_available, probe_device, GpuQuant};
    use qvl_compress::{GroupQuant, QuantAxis, QuantBits};
    use qvl_core::Codec;
    use std::time::Instant;

    if !nvrtc_available() {
        println!("bench gpu-codec: skipped: NVRTC is not installed");
        return Ok(json!({"skipped": "NVRTC (libnvrtc.so.12) is not installed"}));
    }
    let ctx = match probe_device(0) {
        Ok(ctx) => ctx,
        Err(e) => {
            println!("bench gpu-codec: skipped: {e}");
            return Ok(json!({"skipped": e.to_string()}));
        }
    };
    let stream = ctx.new_stream()?;
    // One layer's V of a 4096-token context: [tokens, kv_heads * head_dim].
    let tokens = if opts.quick { 1024 } else { 4096 };
    let shape = [tokens, 8 * 128];
    let n = tokens * 1024;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let values: Vec<f32> = (0..n)
        .map(|i| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            let u = (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            if i % 128 == 3 {
                u * 20.0
            } else {
                u
            }
        })
        .collect();
    let reps = if opts.quick { 3 } else { 9 };
    let gb = |secs: f64| (4 * n) as f64 / secs / 1e9;
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut rows = Vec::new();
    for bits in [QuantBits::Int8, QuantBits::Int4] {
        let q = GroupQuant::new(bits, false, 32, QuantAxis::PerToken)?;
        let gq = GpuQuant::new(q, stream.clone())?;
        let cpu_bytes = q.encode(&values, &shape)?.bytes;
        let gpu_bytes = gq.encode(&values, &shape)?.bytes;
        let identical = cpu_bytes == gpu_bytes;
        let on_device = stream.clone_htod(&values)?;
        let enc = gq.encode_on_device(&on_device, &shape)?;
        let mut decoded = stream.alloc_zeros::<f32>(n)?;
        let mut host_out = vec![0f32; n];
        let mut t: [Vec<f64>; 6] = Default::default();
        for _ in 0..reps {
            let s = Instant::now();
            let e = q.encode(&values, &shape)?;
            t[0].push(gb(s.elapsed().as_secs_f64()));
            let s = Instant::now();
            q.decode(&e.bytes, &shape, &mut host_out)?;
            t[1].push(gb(s.elapsed().as_secs_f64()));
            stream.synchronize()?;
            let s = Instant::now();
            let _e = gq.encode_on_device(&on_device, &shape)?;
            stream.synchronize()?;
            t[2].push(gb(s.elapsed().as_secs_f64()));
            let s = Instant::now();
            gq.decode_on_device(&enc.header, &enc.payload, &shape, &mut decoded)?;
            stream.synchronize()?;
            t[3].push(gb(s.elapsed().as_secs_f64()));
            let s = Instant::now();
            let e = gq.encode(&values, &shape)?;
            t[4].push(gb(s.elapsed().as_secs_f64()));
            let s = Instant::now();
            gq.decode(&e.bytes, &shape, &mut host_out)?;
            t[5].push(gb(s.elapsed().as_secs_f64()));
        }
        let [cpu_enc, cpu_dec, dev_enc, dev_dec, host_enc, host_dec] = t.clone().map(median);
        let name = gq.name();
        report.criteria.push(Criterion::higher_is_better(
            format!("{name}: encode on device vs CPU encode"),
            "GB/s",
            dev_enc,
            cpu_enc,
            1.0,
        ));
        report.criteria.push(Criterion::higher_is_better(
            format!("{name}: decode on device vs CPU decode"),
            "GB/s",
            dev_dec,
            cpu_dec,
            1.0,
        ));
        report.criteria.push(Criterion::higher_is_better(
            format!("{name}: GPU bytes identical to CPU bytes (1 = yes)"),
            "bool",
            f64::from(u8::from(identical)),
            1.0,
            1.0,
        ));
        rows.push(json!({
            "codec": name, "arch": gq.arch(), "identical_to_cpu": identical,
            "gb_per_s_median": {"cpu_encode": cpu_enc, "cpu_decode": cpu_dec,
                "device_encode": dev_enc, "device_decode": dev_dec,
                "host_encode_with_copies": host_enc, "host_decode_with_copies": host_dec},
            "gb_per_s_runs": t,
        }));
    }
    Ok(json!({
        "device": ctx.name()?,
        "shape": shape,
        "method": "GB/s of f32 values (4 bytes each) encoded or decoded; device rows time kernels on device-resident data between stream synchronizations (the encode includes reading back its 8-byte amax and the per-group error sums); host rows include the copies; median of the runs",
        "rows": rows,
    }))
}
