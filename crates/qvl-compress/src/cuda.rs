//! GPU group quantization (feature `cuda`): int8 and int4, symmetric or
//! asymmetric, per-token groups, writing and reading exactly the bytes of
//! the CPU [`GroupQuant`] codec.
//!
//! Kernels are compiled at run time by NVRTC for the device's architecture
//! (compute_61 on the reference Pascal GPU) with fused multiply-add off and
//! IEEE division, and do every rounding step the CPU does in the same order,
//! so GPU and CPU encodings compare equal byte for byte. One warp quantizes
//! one group (blocks of 8 warps, 256 threads; no shared memory), so the
//! 48 KB shared-memory limit of Pascal is never approached.
//!
//! Per-channel groups (KIVI's keys) stay on the CPU codec for now: a GPU
//! encode or decode of that layout is refused with a clear error.
//!
//! The CUDA driver and NVRTC are loaded at run time; [`GpuQuant::new`] says
//! when either is missing instead of panicking.

use crate::error::CompressError;
use crate::format::{check_len, header_len, rows_cols, write_header, Reader};
use crate::ids;
use crate::quant::{GroupQuant, QuantAxis, QuantBits};
use crate::stats::ErrStats;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DriverError, LaunchConfig, PushKernelArg,
};
use qvl_core::{Codec, CodecId, CoreError, Encoded};
use std::sync::Arc;

/// The kernels, in CUDA C. Plain C (no headers), so NVRTC needs nothing
/// beyond itself.
pub const KERNEL_SOURCE: &str = r#"
#define WARP 32
#define F16_NORMAL_MIN 6.1035156e-5f
#define F16_MAX 65504.0f
#define ROUND_MAGIC 12582912.0f

__device__ unsigned short f32_to_f16(float f) {
    unsigned x = __float_as_uint(f);
    unsigned sign = (x >> 16) & 0x8000u;
    unsigned exp = (x >> 23) & 0xffu;
    unsigned man = x & 0x7fffffu;
    if (exp == 0xffu) return (unsigned short)(sign | 0x7c00u | (man ? (0x200u | (man >> 13)) : 0u));
    int e = (int)exp - 127 + 15;
    if (e >= 0x1f) return (unsigned short)(sign | 0x7c00u);
    if (e <= 0) {
        if (e < -10) return (unsigned short)sign;
        man |= 0x800000u;
        int shift = 14 - e;
        unsigned h = man >> shift;
        unsigned round_bit = 1u << (shift - 1);
        unsigned rem = man & ((round_bit << 1) - 1u);
        if (rem > round_bit || (rem == round_bit && (h & 1u))) h++;
        return (unsigned short)(sign | h);
    }
    unsigned h = sign | ((unsigned)e << 10) | (man >> 13);
    unsigned rem = man & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++;
    return (unsigned short)h;
}

__device__ float f16_to_f32(unsigned short hv) {
    unsigned h = hv;
    unsigned sign = (h & 0x8000u) << 16;
    unsigned exp = (h >> 10) & 0x1fu;
    unsigned man = h & 0x3ffu;
    if (exp == 0u) {
        float v = __fmul_rn((float)man, 5.9604645e-8f);
        return sign ? -v : v;
    }
    if (exp == 31u) return __uint_as_float(sign | 0x7f800000u | (man << 13));
    return __uint_as_float(sign | ((exp + 112u) << 23) | (man << 13));
}

/* The smallest f16 value >= x, as the CPU's f16_up. */
__device__ float f16_up(float x) {
    float a = fabsf(x);
    if (a >= F16_NORMAL_MIN && a <= F16_MAX) {
        unsigned b = __float_as_uint(x);
        unsigned r = x > 0.0f ? ((b & 0x1fffu) ? ((b | 0x1fffu) + 1u) : b) : (b & ~0x1fffu);
        return __uint_as_float(r);
    }
    unsigned short h = f32_to_f16(x);
    float hv = f16_to_f32(h);
    if (hv >= x) return hv;
    unsigned short next;
    if ((h & 0x7fffu) == 0u) next = 1;
    else if ((h & 0x8000u) == 0u) next = h + 1;
    else next = h - 1;
    return f16_to_f32(next);
}

__device__ float f16_down(float x) { return -f16_up(-x); }

/* meta[0]: bits of max |x|; meta[1]: nonzero when some value is not finite. */
extern "C" __global__ void qvl_absmax(const float* x, unsigned long long n, unsigned* meta) {
    float m = 0.0f;
    unsigned bad = 0;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        float v = x[i];
        unsigned b = __float_as_uint(v);
        bad |= ((b & 0x7f800000u) == 0x7f800000u);
        float a = fabsf(v);
        m = a > m ? a : m;
    }
    for (int o = WARP / 2; o > 0; o /= 2) {
        float other = __shfl_xor_sync(0xffffffffu, m, o);
        m = other > m ? other : m;
        bad |= __shfl_xor_sync(0xffffffffu, bad, o);
    }
    if ((threadIdx.x & (WARP - 1)) == 0) {
        if (!bad) atomicMax(&meta[0], __float_as_uint(m));
        if (bad) atomicOr(&meta[1], 1u);
    }
}

__device__ void put_param(unsigned char* out, unsigned long long index, float v, int f16) {
    if (f16) {
        unsigned short h = f32_to_f16(v);
        out[2 * index] = (unsigned char)(h & 0xff);
        out[2 * index + 1] = (unsigned char)(h >> 8);
    } else {
        unsigned b = __float_as_uint(v);
        for (int k = 0; k < 4; k++) out[4 * index + k] = (unsigned char)(b >> (8 * k));
    }
}

__device__ float get_param(const unsigned char* in, unsigned long long index, int f16) {
    if (f16) {
        unsigned short h = (unsigned short)(in[2 * index] | (in[2 * index + 1] << 8));
        return f16_to_f32(h);
    }
    unsigned b = 0;
    for (int k = 0; k < 4; k++) b |= (unsigned)in[4 * index + k] << (8 * k);
    return __uint_as_float(b);
}

__device__ unsigned char code_of(float x, float lo, float inv, float qmax, float s,
                                 double* d2, double* n2, float* mx) {
    float t = __fmul_rn(__fsub_rn(x, lo), inv);
    t = t > 0.0f ? t : 0.0f;
    t = t < qmax ? t : qmax;
    float m = __fadd_rn(t, ROUND_MAGIC);
    float r = __fsub_rn(m, ROUND_MAGIC);
    float d = __fsub_rn(x, __fadd_rn(__fmul_rn(r, s), lo));
    *d2 += (double)d * (double)d;
    *n2 += (double)x * (double)x;
    float ad = fabsf(d);
    *mx = ad > *mx ? ad : *mx;
    return (unsigned char)(__float_as_uint(m) & 0xffu);
}

/*
 * One warp per group of a row-major [rows, cols] tensor, groups of g along
 * the row (the last one ragged). out = codes | scales | mins (asymmetric).
 * stats: per group (diff^2, x^2, max|diff|) as doubles.
 */
extern "C" __global__ void qvl_quantize(const float* x, unsigned long long rows, unsigned cols,
                                        unsigned g, int bits, int symmetric, const unsigned* meta,
                                        unsigned char* out, unsigned long long code_bytes,
                                        double* stats) {
    unsigned lane = threadIdx.x & (WARP - 1);
    unsigned long long warp = (blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x) / WARP;
    unsigned gpr = (cols + g - 1) / g;
    unsigned long long groups = rows * gpr;
    if (warp >= groups) return;
    unsigned long long row = warp / gpr;
    unsigned j = (unsigned)(warp % gpr);
    unsigned start = j * g;
    unsigned len = cols - start < g ? cols - start : g;
    const float* xs = x + row * cols + start;

    float amax = __uint_as_float(meta[0]);
    int f16 = (amax == 0.0f) || (amax >= 1e-2f && amax <= 3.0e4f);

    float mn = __int_as_float(0x7f800000), mxv = -__int_as_float(0x7f800000);
    for (unsigned i = lane; i < len; i += WARP) {
        float v = xs[i];
        mn = v < mn ? v : mn;
        mxv = v > mxv ? v : mxv;
    }
    for (int o = WARP / 2; o > 0; o /= 2) {
        float a = __shfl_xor_sync(0xffffffffu, mn, o);
        float b = __shfl_xor_sync(0xffffffffu, mxv, o);
        mn = a < mn ? a : mn;
        mxv = b > mxv ? b : mxv;
    }
    float qmax = (float)((1u << bits) - 1u);
    float s, lo;
    if (symmetric) {
        float half_codes = (float)(1u << (bits - 1));
        float am = -mn > mxv ? -mn : mxv;
        s = __fdiv_rn(am, __fsub_rn(half_codes, 1.0f));
        if (f16) s = f16_up(s);
        lo = __fmul_rn(-half_codes, s);
    } else {
        lo = f16 ? f16_down(mn) : mn;
        s = __fdiv_rn(__fsub_rn(mxv, lo), qmax);
        if (f16) s = f16_up(s);
    }
    float inv = s > 0.0f ? __fdiv_rn(1.0f, s) : 0.0f;

    double d2 = 0.0, n2 = 0.0;
    float mxd = 0.0f;
    if (bits == 8) {
        unsigned char* q = out + row * cols + start;
        for (unsigned i = lane; i < len; i += WARP)
            q[i] = code_of(xs[i], lo, inv, qmax, s, &d2, &n2, &mxd);
    } else {
        unsigned long long row_bytes = (unsigned long long)(cols / g) * (g / 2) + ((cols % g) + 1) / 2;
        unsigned char* q = out + row * row_bytes + (unsigned long long)j * (g / 2);
        unsigned h = (len + 1) / 2;
        for (unsigned i = lane; i < h; i += WARP) {
            unsigned char a = code_of(xs[i], lo, inv, qmax, s, &d2, &n2, &mxd);
            unsigned char b = 0;
            if (i + h < len) b = code_of(xs[i + h], lo, inv, qmax, s, &d2, &n2, &mxd);
            q[i] = (unsigned char)(a | (b << 4));
        }
    }
    for (int o = WARP / 2; o > 0; o /= 2) {
        d2 += __shfl_xor_sync(0xffffffffu, d2, o);
        n2 += __shfl_xor_sync(0xffffffffu, n2, o);
        float m = __shfl_xor_sync(0xffffffffu, mxd, o);
        mxd = m > mxd ? m : mxd;
    }
    if (lane == 0) {
        unsigned char* params = out + code_bytes;
        put_param(params, warp, s, f16);
        if (!symmetric) put_param(params + (f16 ? 2ull : 4ull) * groups, warp, lo, f16);
        stats[3 * warp] = d2;
        stats[3 * warp + 1] = n2;
        stats[3 * warp + 2] = (double)mxd;
    }
}

/* The inverse: one warp per group, params read from `in` after the codes. */
extern "C" __global__ void qvl_dequantize(const unsigned char* in, unsigned long long rows,
                                          unsigned cols, unsigned g, int bits, int symmetric,
                                          int f16, unsigned long long code_bytes, float* x) {
    unsigned lane = threadIdx.x & (WARP - 1);
    unsigned long long warp = (blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x) / WARP;
    unsigned gpr = (cols + g - 1) / g;
    unsigned long long groups = rows * gpr;
    if (warp >= groups) return;
    unsigned long long row = warp / gpr;
    unsigned j = (unsigned)(warp % gpr);
    unsigned start = j * g;
    unsigned len = cols - start < g ? cols - start : g;
    float* xs = x + row * cols + start;
    const unsigned char* params = in + code_bytes;
    float s = get_param(params, warp, f16);
    float lo;
    if (symmetric) {
        lo = __fmul_rn(-(float)(1u << (bits - 1)), s);
    } else {
        lo = get_param(params + (f16 ? 2ull : 4ull) * groups, warp, f16);
    }
    if (bits == 8) {
        const unsigned char* q = in + row * cols + start;
        for (unsigned i = lane; i < len; i += WARP)
            xs[i] = __fadd_rn(__fmul_rn((float)q[i], s), lo);
    } else {
        unsigned long long row_bytes = (unsigned long long)(cols / g) * (g / 2) + ((cols % g) + 1) / 2;
        const unsigned char* q = in + row * row_bytes + (unsigned long long)j * (g / 2);
        unsigned h = (len + 1) / 2;
        for (unsigned i = lane; i < h; i += WARP) {
            unsigned c = q[i];
            xs[i] = __fadd_rn(__fmul_rn((float)(c & 0xfu), s), lo);
            if (i + h < len) xs[i + h] = __fadd_rn(__fmul_rn((float)(c >> 4), s), lo);
        }
    }
}
"#;

/// Threads per block: 8 warps, one group each.
const BLOCK_THREADS: u32 = 256;
const GROUPS_PER_BLOCK: u64 = (BLOCK_THREADS / 32) as u64;
const FLAG_SYMMETRIC: u8 = 1;
const FLAG_PER_CHANNEL: u8 = 2;
const FLAG_F32_PARAMS: u8 = 4;

/// Why the GPU codec cannot run, or what failed on the GPU.
#[derive(Debug, thiserror::Error)]
pub enum GpuCodecError {
    /// No CUDA driver, no device, or no NVRTC on this machine.
    #[error("GPU codec unavailable: {0}")]
    Unavailable(String),
    /// NVRTC rejected the kernels (the log says where).
    #[error("NVRTC could not compile the codec kernels for {arch}: {log}")]
    Compile {
        /// Target architecture.
        arch: String,
        /// The compiler's log.
        log: String,
    },
    /// A driver call failed.
    #[error("CUDA {op} failed: {source}")]
    Driver {
        /// What was being done.
        op: &'static str,
        /// The driver's error.
        #[source]
        source: DriverError,
    },
    /// The input or the encoding is wrong (as the CPU codec would say).
    #[error(transparent)]
    Codec(#[from] CompressError),
}

impl From<GpuCodecError> for CoreError {
    fn from(e: GpuCodecError) -> CoreError {
        match e {
            GpuCodecError::Codec(c) => c.into(),
            other => CoreError::Unavailable {
                backend: "cuda",
                reason: other.to_string(),
            },
        }
    }
}

type GpuResult<T> = std::result::Result<T, GpuCodecError>;

fn drv(op: &'static str) -> impl FnOnce(DriverError) -> GpuCodecError {
    move |source| GpuCodecError::Driver { op, source }
}

/// Whether the NVRTC library can be loaded (cudarc panics when it cannot).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to open the library under its known names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// A context on device `ordinal`, or why there is none (no driver library,
/// no device), without the panic cudarc raises when the library is missing.
pub fn probe_device(ordinal: usize) -> GpuResult<Arc<CudaContext>> {
    // SAFETY: only tries to open the library under its known names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(GpuCodecError::Unavailable(
            "the CUDA driver library (libcuda.so.1) is not installed or not on the loader path"
                .into(),
        ));
    }
    match std::panic::catch_unwind(|| CudaContext::new(ordinal)) {
        Ok(Ok(ctx)) => Ok(ctx),
        Ok(Err(e)) => Err(GpuCodecError::Unavailable(format!(
            "no usable CUDA device {ordinal}: {e}"
        ))),
        Err(_) => Err(GpuCodecError::Unavailable(
            "the CUDA driver library lacks a function cudarc needs (driver older than CUDA 12?)"
                .into(),
        )),
    }
}

/// Compiles [`KERNEL_SOURCE`] to PTX for `arch` ("compute_61"), with
/// fused multiply-add off and IEEE division and square root.
pub fn compile_kernels(arch: &'static str) -> GpuResult<cudarc::nvrtc::Ptx> {
    if !nvrtc_available() {
        return Err(GpuCodecError::Unavailable(
            "the NVRTC library (libnvrtc.so.12) is not installed or not on the loader path".into(),
        ));
    }
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        fmad: Some(false),
        prec_div: Some(true),
        prec_sqrt: Some(true),
        ftz: Some(false),
        ..Default::default()
    };
    let compiled =
        std::panic::catch_unwind(|| cudarc::nvrtc::compile_ptx_with_opts(KERNEL_SOURCE, opts));
    match compiled {
        Ok(Ok(ptx)) => Ok(ptx),
        Ok(Err(e)) => Err(GpuCodecError::Compile {
            arch: arch.to_string(),
            log: e.to_string(),
        }),
        Err(_) => Err(GpuCodecError::Unavailable(
            "the NVRTC library lacks a function cudarc needs".into(),
        )),
    }
}

/// The `compute_XY` name of a compute capability NVRTC 12 targets.
fn arch_name(major: i32, minor: i32) -> &'static str {
    match (major, minor) {
        (5, _) => "compute_52",
        (6, 0) => "compute_60",
        (6, _) => "compute_61",
        (7, 0) => "compute_70",
        (7, 2) => "compute_72",
        (7, _) => "compute_75",
        (8, 0) => "compute_80",
        (8, 6) => "compute_86",
        (8, 7) => "compute_87",
        (8, _) => "compute_89",
        (9, _) => "compute_90",
        // Newer devices run compute_90 PTX through the driver's JIT.
        _ => "compute_90",
    }
}

/// An encoding whose payload stays on the device: header on the host,
/// codes and parameters on the device, ready for a GPU block store.
#[derive(Debug)]
pub struct DeviceEncoding {
    /// Common header, bits, flags and group size: the bytes before the payload.
    pub header: Vec<u8>,
    /// Codes, then scales, then minimums (asymmetric only).
    pub payload: CudaSlice<u8>,
    /// Ratio and error of the encode.
    pub report: qvl_core::CodecReport,
}

/// [`GroupQuant`] on a CUDA device. Implements [`Codec`] with the CPU
/// codec's id and bytes.
#[derive(Debug)]
pub struct GpuQuant {
    quant: GroupQuant,
    stream: Arc<CudaStream>,
    absmax: CudaFunction,
    quantize: CudaFunction,
    dequantize: CudaFunction,
    arch: &'static str,
}

/// Geometry of a per-token encoding.
#[derive(Debug, Clone, Copy)]
struct Layout {
    rows: u64,
    cols: u32,
    groups: u64,
    code_bytes: u64,
}

impl GpuQuant {
    /// Compiles the kernels for `stream`'s device and loads them. Refuses
    /// per-channel groups (see the module docs).
    pub fn new(quant: GroupQuant, stream: Arc<CudaStream>) -> GpuResult<Self> {
        if quant.axis != QuantAxis::PerToken {
            return Err(CompressError::config(
                "gpu quantization axis",
                "per-channel groups are encoded on the CPU; the GPU codec does per-token groups",
            )
            .into());
        }
        let ctx = stream.context();
        let (major, minor) = ctx
            .compute_capability()
            .map_err(drv("cuDeviceGetAttribute(compute capability)"))?;
        let arch = arch_name(major, minor);
        let ptx = compile_kernels(arch)?;
        let module = ctx.load_module(ptx).map_err(drv("cuModuleLoadData"))?;
        let load = |name: &str| {
            module
                .load_function(name)
                .map_err(drv("cuModuleGetFunction"))
        };
        Ok(GpuQuant {
            quant,
            absmax: load("qvl_absmax")?,
            quantize: load("qvl_quantize")?,
            dequantize: load("qvl_dequantize")?,
            stream,
            arch,
        })
    }

    /// The CPU codec this one matches.
    pub fn quant(&self) -> GroupQuant {
        self.quant
    }

    /// The architecture the kernels were compiled for.
    pub fn arch(&self) -> &'static str {
        self.arch
    }

    /// The stream the work goes on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    fn layout(&self, shape: &[usize], n: usize) -> GpuResult<Layout> {
        let (rows, cols) = rows_cols(shape, n);
        let cols32 = u32::try_from(cols).map_err(|_| CompressError::InvalidShape {
            shape: shape.to_vec(),
            reason: "the GPU codec needs rows of at most 2^32 values".into(),
        })?;
        let g = self.quant.group_size;
        let gpr = cols.div_ceil(g.max(1));
        let row_bytes = match self.quant.bits {
            QuantBits::Int8 => cols,
            QuantBits::Int4 => (cols / g) * (g / 2) + (cols % g).div_ceil(2),
        };
        Ok(Layout {
            rows: rows as u64,
            cols: cols32,
            groups: (rows * gpr) as u64,
            code_bytes: (rows * row_bytes) as u64,
        })
    }

    fn header(&self, shape: &[usize], f16_params: bool) -> Vec<u8> {
        let id = self.id();
        let mut h = Vec::with_capacity(header_len(shape.len()) + 6);
        write_header(&mut h, id, shape);
        h.push(self.quant.bits.bits() as u8);
        let mut flags = 0;
        if self.quant.symmetric {
            flags |= FLAG_SYMMETRIC;
        }
        if !f16_params {
            flags |= FLAG_F32_PARAMS;
        }
        h.push(flags);
        h.extend_from_slice(&(self.quant.group_size as u32).to_le_bytes());
        h
    }

    fn launch_config(groups: u64) -> GpuResult<LaunchConfig> {
        let blocks = groups.div_ceil(GROUPS_PER_BLOCK).max(1);
        let blocks = u32::try_from(blocks).map_err(|_| {
            GpuCodecError::Codec(CompressError::config(
                "tensor size",
                format!("{groups} groups exceed one kernel launch"),
            ))
        })?;
        Ok(LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (BLOCK_THREADS, 1, 1),
            shared_mem_bytes: 0,
        })
    }

    /// Encodes `values` already on the device; the payload stays there.
    pub fn encode_on_device(
        &self,
        values: &CudaSlice<f32>,
        shape: &[usize],
    ) -> GpuResult<DeviceEncoding> {
        let n = check_len(shape, values.len(), "values")?;
        let label = match self.quant.bits {
            QuantBits::Int8 => "int8",
            QuantBits::Int4 => "int4",
        };
        let l = self.layout(shape, n)?;
        let s = &self.stream;
        let mut meta = s.alloc_zeros::<u32>(2).map_err(drv("cuMemAlloc(meta)"))?;
        let params_max = 4 * l.groups * if self.quant.symmetric { 1 } else { 2 };
        let mut out = s
            .alloc_zeros::<u8>((l.code_bytes + params_max).max(1) as usize)
            .map_err(drv("cuMemAlloc(payload)"))?;
        let mut stats = s
            .alloc_zeros::<f64>((3 * l.groups).max(1) as usize)
            .map_err(drv("cuMemAlloc(stats)"))?;
        if n > 0 {
            let n64 = n as u64;
            let blocks = (n64.div_ceil(u64::from(BLOCK_THREADS) * 4)).clamp(1, 4096) as u32;
            let cfg = LaunchConfig {
                grid_dim: (blocks, 1, 1),
                block_dim: (BLOCK_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = s.launch_builder(&self.absmax);
            b.arg(values).arg(&n64).arg(&mut meta);
            // SAFETY: the kernel reads `n` floats of `values` and writes two
            // u32 of `meta`, both allocated with those lengths.
            unsafe { b.launch(cfg) }.map_err(drv("launch qvl_absmax"))?;
            let (g, bits, sym) = (
                self.quant.group_size as u32,
                self.quant.bits.bits() as i32,
                i32::from(self.quant.symmetric),
            );
            let mut b = s.launch_builder(&self.quantize);
            b.arg(values)
                .arg(&l.rows)
                .arg(&l.cols)
                .arg(&g)
                .arg(&bits)
                .arg(&sym)
                .arg(&meta)
                .arg(&mut out)
                .arg(&l.code_bytes)
                .arg(&mut stats);
            // SAFETY: one warp per group reads its group of `values` and
            // writes its codes inside `code_bytes`, its parameters inside the
            // `params_max` bytes after them, and 3 doubles of `stats`.
            unsafe { b.launch(Self::launch_config(l.groups)?) }
                .map_err(drv("launch qvl_quantize"))?;
        }
        let meta_host = s.clone_dtoh(&meta).map_err(drv("cuMemcpyDtoH(meta)"))?;
        if meta_host[1] != 0 {
            // Name the first bad value as the CPU codec does.
            let host = s.clone_dtoh(values).map_err(drv("cuMemcpyDtoH(values)"))?;
            crate::stats::scan_finite(&host, label)?;
        }
        let amax = f32::from_bits(meta_host[0]);
        let f16_params = amax == 0.0 || (1e-2..=3.0e4).contains(&amax);
        let width = if f16_params { 2 } else { 4 };
        let params = width * l.groups * if self.quant.symmetric { 1 } else { 2 };
        let stats_host = s.clone_dtoh(&stats).map_err(drv("cuMemcpyDtoH(stats)"))?;
        let mut err = ErrStats::default();
        for st in stats_host.chunks_exact(3).take(l.groups as usize) {
            err.merge(ErrStats {
                diff2: st[0],
                norm2: st[1],
                max_abs: st[2],
            });
        }
        let header = self.header(shape, f16_params);
        let total = header.len() + (l.code_bytes + params) as usize;
        // Keep only the payload's real length: the f32-sized tail of an f16
        // encoding is unused.
        let payload = if (l.code_bytes + params) < out.len() as u64 {
            let mut exact = s
                .alloc_zeros::<u8>(((l.code_bytes + params) as usize).max(1))
                .map_err(drv("cuMemAlloc(payload)"))?;
            let keep = (l.code_bytes + params) as usize;
            if keep > 0 {
                s.memcpy_dtod(&out.slice(..keep), &mut exact.slice_mut(..keep))
                    .map_err(drv("cuMemcpyDtoD(payload)"))?;
            }
            exact
        } else {
            out
        };
        Ok(DeviceEncoding {
            header,
            payload,
            report: err.report(4 * n, total),
        })
    }

    /// Checks an int8/int4 encoding's header for `shape`; returns the
    /// header length, whether parameters are f16, and the layout.
    fn parse_header(&self, bytes: &[u8], shape: &[usize]) -> GpuResult<(usize, bool, Layout)> {
        let id = crate::format::peek_codec(bytes)?;
        let label = if id == ids::INT8 {
            "int8"
        } else if id == ids::INT4 {
            "int4"
        } else {
            return Err(CompressError::malformed(
                "gpu quantized tensor",
                format!("{id} is not int8 or int4"),
            )
            .into());
        };
        let n = crate::format::elements_of(shape)?;
        let mut r = Reader::open(bytes, label, id, shape)?;
        let bits = r.u8()?;
        let flags = r.u8()?;
        let g = r.u32()? as usize;
        if u32::from(bits) != self.quant.bits.bits() || g != self.quant.group_size {
            return Err(r
                .err(format!(
                    "encoded with {bits} bits and groups of {g}; this GPU codec is {}",
                    self.name()
                ))
                .into());
        }
        if flags & FLAG_PER_CHANNEL != 0 {
            return Err(r
                .err("per-channel groups are decoded on the CPU, not by the GPU codec")
                .into());
        }
        if (flags & FLAG_SYMMETRIC != 0) != self.quant.symmetric
            || flags & !(FLAG_SYMMETRIC | FLAG_F32_PARAMS) != 0
        {
            return Err(r
                .err(format!("flags {flags:#x} do not match {}", self.name()))
                .into());
        }
        let f16 = flags & FLAG_F32_PARAMS == 0;
        let l = self.layout(shape, n)?;
        let width = if f16 { 2 } else { 4 };
        let params = width * l.groups * if self.quant.symmetric { 1 } else { 2 };
        let head = bytes.len() - r.rest().len();
        let rest = bytes.len() - head;
        if rest as u64 != l.code_bytes + params {
            return Err(CompressError::malformed(
                label,
                format!(
                    "payload of {rest} bytes; shape {shape:?} needs {}",
                    l.code_bytes + params
                ),
            )
            .into());
        }
        Ok((head, f16, l))
    }

    /// Decodes a payload already on the device into `out` on the device.
    pub fn decode_on_device(
        &self,
        header: &[u8],
        payload: &CudaSlice<u8>,
        shape: &[usize],
        out: &mut CudaSlice<f32>,
    ) -> GpuResult<()> {
        // The header check needs the payload's length only: give it a
        // stand-in of that length after the header.
        let mut probe = header.to_vec();
        probe.resize(header.len() + payload.len(), 0);
        let (_, f16, l) = self.parse_header(&probe, shape)?;
        let n = check_len(shape, out.len(), "output buffer")?;
        if n == 0 {
            return Ok(());
        }
        let (g, bits, sym, f16) = (
            self.quant.group_size as u32,
            self.quant.bits.bits() as i32,
            i32::from(self.quant.symmetric),
            i32::from(f16),
        );
        let mut b = self.stream.launch_builder(&self.dequantize);
        b.arg(payload)
            .arg(&l.rows)
            .arg(&l.cols)
            .arg(&g)
            .arg(&bits)
            .arg(&sym)
            .arg(&f16)
            .arg(&l.code_bytes)
            .arg(out);
        // SAFETY: the payload's length was checked against the layout above,
        // and `out` holds the shape's `n` floats; each warp reads its group's
        // codes and parameters and writes its group of `out`.
        unsafe { b.launch(Self::launch_config(l.groups)?) }
            .map_err(drv("launch qvl_dequantize"))?;
        Ok(())
    }

    /// Encodes host `values` on the GPU: the same bytes as the CPU codec.
    pub fn encode_host(&self, values: &[f32], shape: &[usize]) -> GpuResult<Encoded> {
        check_len(shape, values.len(), "values")?;
        if values.is_empty() {
            // Nothing for the device to do: the header alone, as on the CPU.
            let bytes = self.header(shape, true);
            return Ok(Encoded {
                codec: self.id(),
                shape: shape.to_vec(),
                report: ErrStats::default().report(0, bytes.len()),
                bytes,
            });
        }
        let s = &self.stream;
        let dev = s.clone_htod(values).map_err(drv("cuMemcpyHtoD(values)"))?;
        let enc = self.encode_on_device(&dev, shape)?;
        let mut bytes = enc.header;
        let payload = s
            .clone_dtoh(&enc.payload)
            .map_err(drv("cuMemcpyDtoH(payload)"))?;
        bytes.extend_from_slice(&payload);
        // A payload of zero bytes is one placeholder byte on the device.
        bytes.truncate(enc.report.output_bytes as usize);
        Ok(Encoded {
            codec: self.id(),
            shape: shape.to_vec(),
            report: enc.report,
            bytes,
        })
    }

    /// Decodes CPU or GPU bytes on the GPU into host `out`.
    pub fn decode_host(&self, bytes: &[u8], shape: &[usize], out: &mut [f32]) -> GpuResult<()> {
        let (head, _, _) = self.parse_header(bytes, shape)?;
        check_len(shape, out.len(), "output buffer")?;
        if out.is_empty() {
            return Ok(());
        }
        let s = &self.stream;
        let payload = s
            .clone_htod(&bytes[head..])
            .map_err(drv("cuMemcpyHtoD(payload)"))?;
        let mut dev = s
            .alloc_zeros::<f32>(out.len())
            .map_err(drv("cuMemAlloc(output)"))?;
        self.decode_on_device(&bytes[..head], &payload, shape, &mut dev)?;
        s.memcpy_dtoh(&dev, out)
            .map_err(drv("cuMemcpyDtoH(output)"))?;
        Ok(())
    }
}

impl Codec for GpuQuant {
    fn id(&self) -> CodecId {
        self.quant.id()
    }

    fn name(&self) -> String {
        format!("{}-gpu", self.quant.name())
    }

    fn is_lossless(&self) -> bool {
        false
    }

    fn encode(&self, values: &[f32], shape: &[usize]) -> qvl_core::Result<Encoded> {
        Ok(self.encode_host(values, shape)?)
    }

    fn decode(&self, bytes: &[u8], shape: &[usize], out: &mut [f32]) -> qvl_core::Result<()> {
        Ok(self.decode_host(bytes, shape, out)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_compile_for_pascal_when_nvrtc_is_present() {
        if !nvrtc_available() {
            println!(
                "skipped: kernels_compile_for_pascal_when_nvrtc_is_present: NVRTC (libnvrtc.so.12) \
                 is not installed; `pip install nvidia-cuda-nvrtc-cu12` and put its lib/ on \
                 LD_LIBRARY_PATH to run this without a GPU"
            );
            return;
        }
        let ptx = compile_kernels("compute_61").unwrap().to_src();
        assert!(
            ptx.contains(".target sm_61"),
            "{}",
            &ptx[..400.min(ptx.len())]
        );
        for entry in ["qvl_absmax", "qvl_quantize", "qvl_dequantize"] {
            assert!(ptx.contains(&format!(".entry {entry}")), "{entry} missing");
        }
        // No fused multiply-add: the CPU rounds the product and the sum.
        assert!(!ptx.contains("fma.rn.f32"), "fmad must be off");
        println!(
            "cuda: kernels compile for compute_61 ({} bytes of PTX)",
            ptx.len()
        );
    }

    #[test]
    fn a_bad_kernel_is_a_compile_error_naming_the_arch() {
        if !nvrtc_available() {
            println!(
                "skipped: a_bad_kernel_is_a_compile_error_naming_the_arch: NVRTC is not installed"
            );
            return;
        }
        let err = compile_kernels("compute_9").unwrap_err().to_string();
        assert!(err.contains("compute_9"), "{err}");
    }

    fn gpu(test: &str) -> Option<Arc<CudaStream>> {
        if !nvrtc_available() {
            println!("skipped: {test}: NVRTC is not installed");
            return None;
        }
        match probe_device(0) {
            Ok(ctx) => Some(ctx.default_stream()),
            Err(e) => {
                println!("skipped: {test}: needs a CUDA GPU: {e}");
                None
            }
        }
    }

    fn data(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                // A few outlier channels, as in real KV tensors.
                let outlier = if i % 97 == 5 { 8.0 } else { 1.0 };
                u * scale * outlier
            })
            .collect()
    }

    #[test]
    fn gpu_bytes_equal_cpu_bytes() {
        let Some(stream) = gpu("gpu_bytes_equal_cpu_bytes") else {
            return;
        };
        let shapes: [&[usize]; 4] = [&[16, 8, 128], &[7, 100], &[3, 33], &[1, 2]];
        for bits in [QuantBits::Int8, QuantBits::Int4] {
            for symmetric in [false, true] {
                for g in [32, 64, 6] {
                    let q = GroupQuant::new(bits, symmetric, g, QuantAxis::PerToken).unwrap();
                    let gq = GpuQuant::new(q, Arc::clone(&stream)).unwrap();
                    for (si, shape) in shapes.iter().enumerate() {
                        let n: usize = shape.iter().product();
                        // Scales that pick f16 parameters, f32 parameters
                        // (tiny and huge ranges) and f16 subnormal scales.
                        for scale in [1.0f32, 1e-3, 1e5, 0.05] {
                            let x = data(n, si as u64 * 7 + g as u64, scale);
                            let cpu = q.encode(&x, shape).unwrap();
                            let gpu = gq.encode(&x, shape).unwrap();
                            assert_eq!(
                                cpu.bytes,
                                gpu.bytes,
                                "{} {shape:?} scale {scale}",
                                gq.name()
                            );
                            let rel = (cpu.report.rel_frobenius - gpu.report.rel_frobenius).abs();
                            assert!(rel <= 1e-6 + 1e-3 * cpu.report.rel_frobenius);
                            let mut a = vec![0f32; n];
                            let mut b = vec![0f32; n];
                            q.decode(&cpu.bytes, shape, &mut a).unwrap();
                            gq.decode(&cpu.bytes, shape, &mut b).unwrap();
                            assert!(
                                a.iter().zip(&b).all(|(p, r)| p.to_bits() == r.to_bits()),
                                "decode differs: {} {shape:?}",
                                gq.name()
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn gpu_codec_refuses_what_it_cannot_do() {
        let Some(stream) = gpu("gpu_codec_refuses_what_it_cannot_do") else {
            return;
        };
        let chan = GroupQuant::new(QuantBits::Int4, false, 32, QuantAxis::PerChannel).unwrap();
        let err = GpuQuant::new(chan, Arc::clone(&stream)).unwrap_err();
        assert!(err.to_string().contains("per-channel"), "{err}");
        let q = GroupQuant::new(QuantBits::Int8, false, 32, QuantAxis::PerToken).unwrap();
        let gq = GpuQuant::new(q, stream).unwrap();
        let mut x = data(256, 1, 1.0);
        x[77] = f32::NAN;
        let err = gq.encode(&x, &[2, 128]).unwrap_err().to_string();
        assert!(err.contains("index 77"), "{err}");
        let good = q.encode(&data(256, 1, 1.0), &[2, 128]).unwrap();
        let mut out = vec![0f32; 256];
        let err = gq
            .decode(&good.bytes[..good.bytes.len() - 1], &[2, 128], &mut out)
            .unwrap_err()
            .to_string();
        assert!(err.contains("payload"), "{err}");
    }
}
