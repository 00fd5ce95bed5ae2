//! The `qvl` binary: vision-language inference that fits small machines.
#![deny(missing_docs)]

mod commands;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// qvl runs Qwen3-VL and llama-family models on small machines, with six
/// memory managers (pool, cache, compress, swap, tier, gc) that can each be
/// switched on and off.
#[derive(Debug, Parser)]
#[command(name = "qvl", version, about, long_about = None, propagate_version = true)]
struct Cli {
    /// Log level filter (error, warn, info, debug, trace); QVL_LOG overrides it.
    #[arg(long, global = true, default_value = "warn")]
    log: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show or validate the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Print the merged configuration (defaults < --config file < QVL_* env)
    /// with the source of every value.
    Show {
        /// A TOML config file to merge over the defaults.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a config file on its own (no environment) and exit non-zero
    /// with a precise message if anything is wrong.
    Check {
        /// The TOML file to check.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = std::env::var("QVL_LOG").unwrap_or_else(|_| cli.log.clone());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Config(ConfigCommand::Show { config }) => commands::config::show(config),
        Command::Config(ConfigCommand::Check { file }) => commands::config::check(&file),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
