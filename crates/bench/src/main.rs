//! `moatmq-bench`: MQTT load generators for any broker at host:port, and moatmq-store
//! measured directly. Each subcommand prints one line of `key=value` fields that the
//! scripts in crates/bench turn into the tables in docs/benchmarks.md. Not a test:
//! `cargo test` never runs them.
#![forbid(unsafe_code)]

mod certs;
mod fanin;
mod fleet;
mod latency;
mod login;
mod retained;
mod sessions;
mod stats;
mod storebench;
mod wire;

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
    /// Login storm (connections/s, password or mTLS) with a publish-latency probe.
    Login(login::LoginArgs),
    /// Password devices all logging in, dropped at once, all back: time per wave.
    Reconnect(fleet::FleetArgs),
    /// Idle devices: the broker's RSS before and with them (per connection).
    Idle(fleet::IdleArgs),
    /// Password files for `reconnect`/`idle`: Argon2id for moatmq, plain for mosquitto_passwd -U.
    Passwords(fleet::PasswordsArgs),
    /// Write a CA, a server certificate and client certificates for the login benchmark.
    Certs(certs::CertsArgs),
    /// moatmq-store directly: fill, reopen (load) time, bytes per save, compaction.
    Store(storebench::StoreArgs),
    /// Retained publishes: acknowledged messages/s and PUBACK latency.
    RetainedPub(retained::PubArgs),
    /// Start a broker; time to /readyz, first CONNACK, first and last retained delivery.
    Startup(retained::StartupArgs),
    /// Leave persistent sessions (clean session 0) subscribed and offline.
    SessionSetup(sessions::SetupArgs),
    /// Bring persistent sessions back at once (another cluster node: they move there);
    /// time until every CONNACK, session present, CONNACK p50/p99/max.
    SessionResume(sessions::ResumeArgs),
    /// Reconnect one persistent session (optionally starting the broker first) and take
    /// its queue: CONNACK time, session present, drain rate.
    SessionDrain(sessions::DrainArgs),
    /// One QoS 1 publisher at a fixed rate -> one subscriber: latency p50/p99/max.
    Latency(latency::LatencyArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = match cli.command {
        Command::Fanin(args) => runtime.block_on(fanin::run(args))?.to_string(),
        Command::Login(args) => runtime.block_on(login::run(args))?,
        Command::Reconnect(args) => runtime.block_on(fleet::reconnect(args))?,
        Command::Idle(args) => runtime.block_on(fleet::idle(args))?,
        Command::Passwords(args) => {
            fleet::passwords(args)?;
            return Ok(());
        }
        Command::Certs(args) => {
            certs::run(args)?;
            return Ok(());
        }
        Command::Store(args) => storebench::run(args)?,
        Command::RetainedPub(args) => runtime.block_on(retained::publish(args))?,
        Command::Startup(args) => runtime.block_on(retained::startup(args))?,
        Command::SessionSetup(args) => runtime.block_on(sessions::setup(args))?,
        Command::SessionDrain(args) => runtime.block_on(sessions::drain(args))?,
        Command::SessionResume(args) => runtime.block_on(sessions::resume(args))?,
        Command::Latency(args) => runtime.block_on(latency::run(args))?,
    };
    println!("{report}");
    Ok(())
}
