//! What each subcommand does.

use crate::cli::{AclCommand, Action, Cli, Command, RetainedCommand};
use anyhow::{bail, Context};
use moatmq_config::{Config, LogFormat};
use std::io::{IsTerminal, Read};
use std::path::Path;
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;
use zeroize::Zeroizing;

/// Exit code for a configuration error (EX_USAGE in sysexits.h).
const EXIT_CONFIG: u8 = 64;
/// Exit code when the router died or stopped answering (EX_SOFTWARE in sysexits.h).
const EXIT_ROUTER_FAILED: u8 = 70;

pub fn dispatch(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Serve { config } => return serve(config.as_deref()),
        Command::Check { config } => return check(&config),
        Command::Passwd { delete, file, user } => passwd(&file, &user, delete),
        Command::Keygen { out } => moatmq_store::RetainedKey::write_new(&out)
            .map(|_| println!("wrote a new key to {}", out.display()))
            .map_err(Into::into),
        Command::Retained { command } => retained(command),
        Command::Acl { command } => acl(command),
        Command::ImportMosquitto { conf, out } => import(&conf, out.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

/// Validates the config and the files it names (password file, ACL file).
fn check(path: &Path) -> ExitCode {
    let config = match load_config(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Some(p) = &config.auth.password_file {
        if let Err(e) = moatmq_auth::PasswordFile::load(&config.resolve(p)) {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    }
    if let Some(p) = &config.acl.file {
        if let Err(e) = moatmq_acl::Acl::load(&config.resolve(p)) {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    }
    println!("{}: ok", path.display());
    ExitCode::SUCCESS
}

fn serve(path: Option<&Path>) -> ExitCode {
    let config = match path {
        Some(p) => match load_config(p) {
            Ok(c) => c,
            Err(code) => return code,
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
    let result = runtime.block_on(moatmq_broker::run(config));
    // Blocking threads may be stuck on a failed router: do not wait for them.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // Logged (one ERROR line) when it was detected.
        Err(moatmq_broker::StartError::RouterFailed(_)) => ExitCode::from(EXIT_ROUTER_FAILED),
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(config: &Config) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{filter::filter_fn, Layer};
    // rumqttd logs every connection at info level; ours already does, with more context.
    const DEFAULT_FILTER: &str = "info,rumqttd=warn";
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(config.log.level.as_deref().unwrap_or(DEFAULT_FILTER)))
        .unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    // rumqttd's router opens an ERROR-level span for every packet; recording them cost a
    // quarter of the broker's CPU (docs/benchmarks.md). Its events (warnings, errors)
    // are kept.
    let no_router_spans = filter_fn(|m| !(m.is_span() && m.target().starts_with("rumqttd")));
    let layer = match config.log.format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(layer.with_filter(filter).with_filter(no_router_spans))
        .init();
}

fn passwd(file: &Path, user: &str, delete: bool) -> anyhow::Result<()> {
    if delete {
        moatmq_auth::update_password_file(file, user, None)?;
        println!("removed {user} from {}", file.display());
        return Ok(());
    }
    let password = read_password()?;
    moatmq_auth::update_password_file(file, user, Some(password.as_bytes()))?;
    println!("set the password of {user} in {}", file.display());
    Ok(())
}

/// Prompts twice on a terminal; otherwise reads one line from stdin.
fn read_password() -> anyhow::Result<Zeroizing<String>> {
    let password = if std::io::stdin().is_terminal() {
        let first = Zeroizing::new(rpassword::prompt_password("Password: ")?);
        let again = Zeroizing::new(rpassword::prompt_password("Password again: ")?);
        if *first != *again {
            bail!("the passwords do not match");
        }
        first
    } else {
        let mut input = Zeroizing::new(String::new());
        std::io::stdin().read_to_string(&mut input)?;
        let line = input.lines().next().unwrap_or("");
        Zeroizing::new(line.to_string())
    };
    if password.is_empty() {
        bail!("empty password");
    }
    Ok(password)
}

fn retained(command: RetainedCommand) -> anyhow::Result<()> {
    match command {
        RetainedCommand::List { config } => {
            let config = Config::load(&config)?;
            let r = config
                .retained
                .clone()
                .context("the config has no [retained] section")?;
            let (store, _) = moatmq_broker::retained::open(&config, &r)?;
            for m in store.messages() {
                println!("{}\t{} bytes\tqos {}", m.topic, m.payload.len(), m.qos);
            }
            println!(
                "{} messages, {} bytes on disk",
                store.len(),
                store.file_bytes()
            );
            Ok(())
        }
        RetainedCommand::Rekey { config, new_key } => {
            let config = Config::load(&config)?;
            let r = config
                .retained
                .clone()
                .context("the config has no [retained] section")?;
            let old = moatmq_broker::retained::load_key(&config, &r)?;
            let new = moatmq_store::RetainedKey::load(&new_key)?;
            let n = moatmq_store::rekey(&config.resolve(&r.path), old, &new)?;
            println!(
                "re-encrypted {n} messages; now set key_file = {:?} (or {})",
                new_key.display().to_string(),
                moatmq_broker::retained::KEY_ENV
            );
            Ok(())
        }
    }
}

fn acl(command: AclCommand) -> anyhow::Result<()> {
    let AclCommand::Check {
        acl,
        user,
        client_id,
        action,
        topic,
    } = command;
    let rules = moatmq_acl::Acl::load(&acl)?;
    let who = moatmq_acl::Identity {
        username: user.as_deref(),
        client_id: &client_id,
    };
    let decision = match action {
        Action::Read => rules.check_read(&who, &topic),
        Action::Write => rules.check_publish(&who, &topic),
        Action::Subscribe => rules.check_subscribe(&who, &topic),
    };
    let verdict = if decision.allowed { "allow" } else { "deny" };
    match decision.line {
        Some(line) => println!("{verdict} ({}:{line})", acl.display()),
        None => println!("{verdict} (no rule matched: default deny)"),
    }
    Ok(())
}

fn import(conf: &Path, out: Option<&Path>) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(conf).with_context(|| conf.display().to_string())?;
    let report = moatmq_config::import_mosquitto(&text, conf)?;
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    match out {
        Some(path) => {
            std::fs::write(path, &report.toml).with_context(|| path.display().to_string())?;
            println!("wrote {}", path.display());
        }
        None => print!("{}", report.toml),
    }
    Ok(())
}
