//! Command-line interface.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// moatmq: a hardened MQTT broker.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the broker. Without -c: one listener on 127.0.0.1:1883, anonymous allowed.
    Serve {
        /// Configuration file (broker.toml).
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Validate a configuration file and exit (non-zero naming file, line and reason).
    Check {
        #[arg(short, long)]
        config: PathBuf,
    },
}
