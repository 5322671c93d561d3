#![forbid(unsafe_code)]
//! The `moatmq` command: parse the CLI, set up logging, load and validate the config,
//! then hand over to the broker library. An invalid config is one line on stderr and
//! exit code 64, before any port is bound.

mod cli;
mod commands;
mod logfmt;
mod lognoise;
mod stores;

/// Tests that install a scoped tracing dispatcher take this first: tracing caches each
/// call site's interest across every live dispatcher, so two such tests on two threads
/// can see each other's interest and a span one filter drops is recorded (a flaky test).
#[cfg(test)]
static DISPATCHER_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    commands::dispatch(cli)
}
