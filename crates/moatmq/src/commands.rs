//! What each subcommand does.

use crate::cli::{Cli, Command};
use moatmq_config::{Config, LogFormat};
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

/// Exit code for a configuration error (EX_USAGE in sysexits.h).
const EXIT_CONFIG: u8 = 64;

pub fn dispatch(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Serve { config } => serve(config),
        Command::Check { config } => match Config::load(&config) {
            Ok(_) => {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
    }
}

fn serve(path: Option<std::path::PathBuf>) -> ExitCode {
    let config = match &path {
        Some(p) => match Config::load(p) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        None => Config::local_only(),
    };
    init_tracing(&config);
    if path.is_none() {
        tracing::warn!(
            "no configuration given: serving 127.0.0.1:1883 only, anonymous access allowed \
             (loopback only); use -c broker.toml for anything else"
        );
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(moatmq_broker::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(config: &Config) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(config.log.level.as_deref().unwrap_or("info")))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
