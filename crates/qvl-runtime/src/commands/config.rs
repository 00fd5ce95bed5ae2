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
