//! `qvl config show`, `check`, `reference` and `schema`.
use anyhow::Result;
use qvl_runtime::config::{self, ConfigSources};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Prints every key with its value and where the value came from.
pub fn show(file: Option<PathBuf>) -> Result<ExitCode> {
    let loaded = config::load(&ConfigSources {
        file,
        use_env: true,
    })?;
    let entries = loaded.entries();
    let width = entries
        .iter()
        .map(|(k, v, _)| k.len() - k.find('.').unwrap_or(0) + v.len() + 3)
        .max()
        .unwrap_or(0);
    let mut section = "";
    for (key, value, source) in &entries {
        let this_section = key.split('.').next().unwrap_or("");
        if this_section != section {
            if !section.is_empty() {
                println!();
            }
            println!("[{this_section}]");
            section = this_section;
        }
        let mut shown = value.clone();
        if key == "swapping.swap_directory" && value == "(unset)" {
            shown = format!("(unset: {})", config::default_swap_directory().display());
        }
        let relative = key
            .strip_prefix(section)
            .unwrap_or(key)
            .trim_start_matches('.');
        let line = format!("{relative} = {shown}");
        println!("{line:<width$}  # {source}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints the JSON Schema of the config file.
pub fn schema() -> Result<ExitCode> {
    let schema = qvl_runtime::config_reference::json_schema();
    println!("{}", serde_json::to_string_pretty(&schema)?);
    Ok(ExitCode::SUCCESS)
}

/// Validates one file.
pub fn check(file: &Path) -> Result<ExitCode> {
    config::check_file(file)?;
    println!("{}: ok", file.display());
    Ok(ExitCode::SUCCESS)
}

/// `qvl hardware`: what was detected and the profile picked from it.
pub fn hardware(file: Option<PathBuf>) -> Result<ExitCode> {
    let loaded = config::load(&ConfigSources {
        file,
        use_env: true,
    })?;
    let hw = qvl_runtime::Hardware::detect(&loaded.config);
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    println!("cores          {}", hw.cores);
    println!(
        "ram            {:.1} GiB total, {:.1} GiB available",
        gib(hw.ram_total),
        gib(hw.ram_available)
    );
    match &hw.gpu {
        Some(g) => println!(
            "gpu            {} (compute capability {})",
            g.name,
            g.compute_capability
                .map_or("unknown".to_string(), |(a, b)| format!("{a}.{b}"))
        ),
        None => println!("gpu            none (no NVIDIA driver GPU in /proc/driver/nvidia)"),
    }
    println!(
        "libcuda        {}",
        if hw.libcuda { "found" } else { "not found" }
    );
    println!(
        "disk           {} at {}",
        hw.disk_free
            .map_or("unknown".to_string(), |b| format!("{:.1} GiB free", gib(b))),
        hw.disk_path.display()
    );
    println!(
        "profile        {}{}",
        hw.profile,
        hw.profile
            .config_file()
            .map_or(String::new(), |f| format!(" (see {f})"))
    );
    Ok(ExitCode::SUCCESS)
}
