#![forbid(unsafe_code)]
//! The `moatmq` command: parse the CLI, set up logging, load and validate the config,
//! then hand over to the broker library. An invalid config is one line on stderr and
//! exit code 64, before any port is bound.

mod cli;
mod commands;
mod logfmt;
mod lognoise;
mod stores;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    commands::dispatch(cli)
}
