//! `moatmq-bench`: MQTT load generator for any broker at host:port (MQTT 3.1.1, rumqttc).
//!
//! One scenario for now, `fanin`: N publishers -> 1 subscriber. It prints one line of
//! `key=value` fields that `run.sh` turns into the table in docs/benchmarks.md. Not a
//! test: `cargo test` never runs it.
#![forbid(unsafe_code)]

mod fanin;
mod stats;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "MQTT benchmark load generator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// N publishers -> 1 subscriber: delivered messages/s and latency p50/p99.
    Fanin(fanin::FaninArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Fanin(args) => {
            let report = runtime.block_on(fanin::run(args))?;
            println!("{report}");
        }
    }
    Ok(())
}
