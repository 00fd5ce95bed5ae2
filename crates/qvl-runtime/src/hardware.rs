//! What the machine offers: CPU cores, RAM, an NVIDIA GPU and the free
//! space of the swap directory, read from the OS without a CUDA dependency,
//! and the profile qvl picks from them.
//!
//! - Cores: [`std::thread::available_parallelism`] (respects CPU affinity
//!   and cgroup quotas).
//! - RAM: `MemTotal` and `MemAvailable` of `/proc/meminfo`.
//! - GPU: the NVIDIA kernel driver's `/proc/driver/nvidia/gpus/*/information`
//!   (model name) and `/proc/driver/nvidia/version`; `libcuda.so.1` in the
//!   usual library directories; the compute capability from `nvidia-smi`
//!   when that tool is installed (one short process), else unknown.
//! - Disk: `statvfs` of the swap directory (or its nearest existing parent).

use crate::config::{Config, Device};
use std::fmt;
use std::path::{Path, PathBuf};

/// An NVIDIA GPU seen through its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    /// Model name as the driver reports it ("NVIDIA GeForce GTX 1050").
    pub name: String,
    /// Compute capability (major, minor), when `nvidia-smi` could tell.
    pub compute_capability: Option<(u32, u32)>,
}

/// The machine profiles qvl tunes for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// No usable GPU: everything on the CPU, RAM and SSD tiers only.
    CpuOnly,
    /// A small Pascal-class GPU (compute capability 6.x or unknown) beside a
    /// few cores and 8-16 GB of RAM: the reference laptop
    /// (`configs/laptop-sm61.toml`).
    LaptopSm61,
    /// A GPU of compute capability 7.0 or newer.
    ModernGpu,
}

impl Profile {
    /// The name used in logs and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Profile::CpuOnly => "cpu-only",
            Profile::LaptopSm61 => "laptop-sm61",
            Profile::ModernGpu => "modern-gpu",
        }
    }

    /// The shipped config file closest to this profile, if any.
    pub fn config_file(self) -> Option<&'static str> {
        match self {
            Profile::LaptopSm61 => Some("configs/laptop-sm61.toml"),
            Profile::CpuOnly | Profile::ModernGpu => None,
        }
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What was detected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hardware {
    /// Logical cores this process may use.
    pub cores: usize,
    /// Total RAM in bytes (0 when `/proc/meminfo` is unreadable).
    pub ram_total: u64,
    /// RAM the OS reports available to new work, in bytes.
    pub ram_available: u64,
    /// The NVIDIA GPU, when its driver is loaded.
    pub gpu: Option<GpuInfo>,
    /// Whether `libcuda.so.1` was found (a driver install, not the toolkit).
    pub libcuda: bool,
    /// The directory whose free space was measured (the swap directory).
    pub disk_path: PathBuf,
    /// Bytes free there for an unprivileged user, when measurable.
    pub disk_free: Option<u64>,
    /// The profile chosen from the above and `[hardware] device`.
    pub profile: Profile,
}

/// Directories that hold the driver's `libcuda.so.1` on common distributions.
const LIBCUDA_DIRS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/local/nvidia/lib64",
    "/usr/lib/wsl/lib",
];

impl Hardware {
    /// Detects the machine; the disk is measured at the swap directory of
    /// `config`. Never fails: what cannot be read is reported as unknown.
    pub fn detect(config: &Config) -> Hardware {
        let swap_dir = config
            .swapping
            .swap_directory
            .clone()
            .unwrap_or_else(crate::config::default_swap_directory);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (ram_total, ram_available) = std::fs::read_to_string("/proc/meminfo")
            .map(|t| parse_meminfo(&t))
            .unwrap_or((0, 0));
        let gpu = detect_gpu(Path::new("/proc/driver/nvidia/gpus"));
        let libcuda = LIBCUDA_DIRS
            .iter()
            .any(|d| Path::new(d).join("libcuda.so.1").exists());
        let (disk_path, disk_free) = disk_free(&swap_dir);
        let mut hw = Hardware {
            cores,
            ram_total,
            ram_available,
            gpu,
            libcuda,
            disk_path,
            disk_free,
            profile: Profile::CpuOnly,
        };
        hw.profile = hw.pick_profile(config.hardware.device);
        tracing::info!(profile = %hw.profile, "hardware: {}", hw.summary());
        hw
    }

    /// The profile for these resources under `device`.
    pub fn pick_profile(&self, device: Device) -> Profile {
        let gpu = match (&self.gpu, device) {
            (_, Device::Cpu) | (None, _) => return Profile::CpuOnly,
            (Some(g), _) => g,
        };
        match gpu.compute_capability {
            Some((major, _)) if major >= 7 => Profile::ModernGpu,
            // Pascal, or a GPU whose capability we could not read: plan for
            // the small card, which is the safe assumption.
            _ => Profile::LaptopSm61,
        }
    }

    /// One line: cores, RAM, GPU, disk, profile.
    pub fn summary(&self) -> String {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        let gpu = match &self.gpu {
            Some(g) => format!(
                "{} (compute capability {})",
                g.name,
                g.compute_capability
                    .map_or("unknown".to_string(), |(a, b)| format!("{a}.{b}"))
            ),
            None if self.libcuda => "none (libcuda present, no driver GPU listed)".to_string(),
            None => "none".to_string(),
        };
        let disk = self
            .disk_free
            .map_or("unknown".to_string(), |b| format!("{:.1} GiB free", gib(b)));
        format!(
            "{} cores, RAM {:.1} GiB ({:.1} GiB available), GPU {gpu}, disk {disk} at {}, profile {}",
            self.cores,
            gib(self.ram_total),
            gib(self.ram_available),
            self.disk_path.display(),
            self.profile
        )
    }
}

/// (MemTotal, MemAvailable) in bytes from the text of `/proc/meminfo`.
fn parse_meminfo(text: &str) -> (u64, u64) {
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    };
    let total = field("MemTotal:");
    // Kernels before 3.14 have no MemAvailable: free memory is the floor.
    let available = match field("MemAvailable:") {
        0 => field("MemFree:"),
        a => a,
    };
    (total, available)
}

/// The first GPU listed under `gpus_dir` (the driver's per-GPU directories).
fn detect_gpu(gpus_dir: &Path) -> Option<GpuInfo> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(gpus_dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    dirs.sort();
    let info = std::fs::read_to_string(dirs.first()?.join("information")).ok()?;
    let name = info
        .lines()
        .find_map(|l| l.strip_prefix("Model:"))
        .map_or("NVIDIA GPU", str::trim)
        .to_string();
    Some(GpuInfo {
        name,
        compute_capability: nvidia_smi_compute_capability(),
    })
}

/// `nvidia-smi --query-gpu=compute_cap` (driver 510+), first GPU.
fn nvidia_smi_compute_capability() -> Option<(u32, u32)> {
    let out = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=compute_cap", "--format=csv,noheader"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    parse_compute_capability(String::from_utf8_lossy(&out.stdout).lines().next()?)
}

fn parse_compute_capability(text: &str) -> Option<(u32, u32)> {
    let (major, minor) = text.trim().split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// Free bytes for unprivileged users at `dir`, or at its nearest existing
/// ancestor when it does not exist yet.
fn disk_free(dir: &Path) -> (PathBuf, Option<u64>) {
    let mut probe = dir.to_path_buf();
    while !probe.exists() {
        match probe.parent() {
            Some(p) => probe = p.to_path_buf(),
            None => return (dir.to_path_buf(), None),
        }
    }
    (probe.clone(), statvfs_free(&probe))
}

#[cfg(unix)]
fn statvfs_free(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a NUL-terminated path that outlives the call, and `st`
    // points to writable memory of the size statvfs fills.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it initialized the struct.
    let st = unsafe { st.assume_init() };
    // The field types differ between targets (u32 or u64).
    #[allow(clippy::useless_conversion)]
    let (blocks, size) = (u64::from(st.f_bavail), u64::from(st.f_frsize));
    Some(blocks.saturating_mul(size))
}

#[cfg(not(unix))]
fn statvfs_free(_path: &Path) -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_fields_in_bytes() {
        let text = "MemTotal:       16318480 kB\nMemFree:         1000000 kB\nMemAvailable:    8000000 kB\n";
        assert_eq!(parse_meminfo(text), (16318480 * 1024, 8000000 * 1024));
        let old = "MemTotal:       100 kB\nMemFree:         40 kB\n";
        assert_eq!(parse_meminfo(old), (100 * 1024, 40 * 1024));
    }

    #[test]
    fn gpu_from_driver_directory_and_profiles() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(detect_gpu(tmp.path()), None);
        let gpu = tmp.path().join("0000:01:00.0");
        std::fs::create_dir_all(&gpu).unwrap();
        std::fs::write(
            gpu.join("information"),
            "Model: \t\t NVIDIA GeForce GTX 1050\nIRQ: 130\n",
        )
        .unwrap();
        let found = detect_gpu(tmp.path()).unwrap();
        assert_eq!(found.name, "NVIDIA GeForce GTX 1050");
        assert_eq!(parse_compute_capability("6.1\n"), Some((6, 1)));
        assert_eq!(parse_compute_capability("n/a"), None);

        let mut hw = Hardware {
            cores: 4,
            ram_total: 8 << 30,
            ram_available: 6 << 30,
            gpu: Some(GpuInfo {
                name: found.name,
                compute_capability: Some((6, 1)),
            }),
            libcuda: true,
            disk_path: tmp.path().to_path_buf(),
            disk_free: Some(1 << 30),
            profile: Profile::CpuOnly,
        };
        assert_eq!(hw.pick_profile(Device::Auto), Profile::LaptopSm61);
        assert_eq!(hw.pick_profile(Device::Cpu), Profile::CpuOnly);
        if let Some(g) = hw.gpu.as_mut() {
            g.compute_capability = Some((9, 0));
        }
        assert_eq!(hw.pick_profile(Device::Cuda), Profile::ModernGpu);
        hw.gpu = None;
        assert_eq!(hw.pick_profile(Device::Auto), Profile::CpuOnly);
        assert!(hw.summary().contains("4 cores"), "{}", hw.summary());
    }

    #[test]
    fn detect_reads_this_machine() {
        let hw = Hardware::detect(&Config::default());
        assert!(hw.cores >= 1);
        assert!(hw.ram_total >= hw.ram_available);
        // A temp directory exists, so its free space is measurable.
        let (path, free) = disk_free(&std::env::temp_dir().join("qvl-no-such-dir/x"));
        assert!(path.exists());
        assert!(free.is_some());
    }
}
