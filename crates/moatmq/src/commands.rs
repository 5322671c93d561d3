//! What each subcommand does.

use crate::cli::{AclCommand, Action, Cli, Command};
use crate::stores;
use anyhow::{bail, Context};
use moatmq_config::{Config, LogFormat};
use std::io::{IsTerminal, Read};
use std::path::Path;
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;
use zeroize::Zeroizing;

/// Exit code of `check` and `serve` for a problem in the configuration or a file it
/// names (EX_USAGE in sysexits.h): starting again without a change cannot help, so the
/// systemd unit has `RestartPreventExitStatus=64`. A runtime failure (a port in use,
/// the router failing) exits 1.
const EXIT_CONFIG: u8 = 64;
/// Exit code when the router died or stopped answering (EX_SOFTWARE in sysexits.h).
const EXIT_ROUTER_FAILED: u8 = 70;

pub fn dispatch(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Serve { config } => return serve(config.as_deref()),
        Command::Check { config } => return check(&config),
        Command::Passwd { delete, file, user } => passwd(&file, &user, delete),
        Command::Keygen { out } => keygen(&out),
        Command::Retained { command } => stores::retained(command),
        Command::Sessions { command } => stores::sessions(command),
        Command::Store { command } => stores::store(command),
        Command::Acl { command } => return acl(command),
        Command::ImportMosquitto { conf, out, force } => import(&conf, out.as_deref(), force),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_text(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each cause only if the text so far does not already say it
/// (our error types print their OS error themselves: `{:#}` would repeat it).
fn error_text(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

fn load_config(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

/// Validates the config and every file it names, as `serve` does before it binds:
/// one shared function, so `check` passes exactly when `serve` would get past it.
fn check(path: &Path) -> ExitCode {
    let config = match load_config(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Err(e) = moatmq_broker::validate(&config) {
        eprintln!("{e}");
        return ExitCode::from(EXIT_CONFIG);
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
    // Before logging starts, so the broker's own loading logs its warnings once.
    if let Err(e) = moatmq_broker::validate(&config) {
        eprintln!("{e}");
        return ExitCode::from(EXIT_CONFIG);
    }
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
        Err(moatmq_broker::BrokerError::RouterFailed(_)) => ExitCode::from(EXIT_ROUTER_FAILED),
        Err(e) => {
            eprintln!("{e}");
            if e.is_config() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn init_tracing(config: &Config) {
    use tracing_subscriber::util::SubscriberInitExt;
    log_subscriber(config).init();
}

/// The broker's log: `config.log` level and format, rumqttd's router spans never
/// recorded, known-harmless dependency lines dropped.
fn log_subscriber(config: &Config) -> impl tracing::Subscriber + Send + Sync {
    use tracing_subscriber::layer::SubscriberExt;
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
    // Colours only for a person at a terminal: journald, `docker logs` and log files get
    // plain text (escape codes there are noise, and break grep). NO_COLOR turns them off.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && !std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let layer = match config.log.format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .fmt_fields(crate::logfmt::escaped_fields())
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed(),
    };
    // `no_router_spans` is the outermost filter: a span it refuses is never created in
    // the registry. Under a filter that lets it through (KnownNoise passes every span),
    // the registry records it even if an inner filter refuses it, and the router's
    // per-packet spans cost a fifth of the QoS 1 throughput again (docs/benchmarks.md).
    tracing_subscriber::registry().with(
        layer
            .with_filter(filter)
            .with_filter(crate::lognoise::KnownNoise)
            .with_filter(no_router_spans),
    )
}

fn keygen(out: &Path) -> anyhow::Result<()> {
    if out == Path::new("-") {
        // `-` means stdout, as for most tools, never a file named `-`.
        use std::fmt::Write as _;
        use std::io::Write as _;
        let key = moatmq_store::RetainedKey::generate();
        let mut hex = Zeroizing::new(String::with_capacity(65));
        // Exposed only to be printed, which is what was asked for.
        for b in key.expose_secret() {
            let _ = write!(hex, "{b:02x}");
        }
        hex.push('\n');
        std::io::stdout()
            .write_all(hex.as_bytes())
            .context("stdout")?;
        return Ok(());
    }
    moatmq_store::RetainedKey::write_new(out)?;
    println!("wrote a new key to {}", out.display());
    Ok(())
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

/// `acl check`: exit 0 allow, 1 deny, 2 error, so scripts can branch on the decision.
fn acl(command: AclCommand) -> ExitCode {
    const EXIT_DENY: u8 = 1;
    const EXIT_ERROR: u8 = 2;
    let AclCommand::Check {
        acl,
        user,
        client_id,
        action,
        topic,
    } = command;
    let rules = match moatmq_acl::Acl::load(&acl) {
        Ok(rules) => rules,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
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
    if decision.allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_DENY)
    }
}

fn import(conf: &Path, out: Option<&Path>, force: bool) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(conf)
        .with_context(|| format!("Mosquitto configuration file {}", conf.display()))?;
    let report = moatmq_config::import_mosquitto(&text, conf)?;
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    match out {
        Some(path) => {
            use std::io::Write as _;
            // create_new: an existing broker.toml is never replaced by accident, not
            // even one created between a check and the write.
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .create_new(!force)
                .open(path);
            let mut file = match file {
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => bail!(
                    "{} exists and was left unchanged; use --force to replace it",
                    path.display()
                ),
                other => other.with_context(|| path.display().to_string())?,
            };
            file.write_all(report.toml.as_bytes())
                .with_context(|| path.display().to_string())?;
            println!("wrote {}", path.display());
        }
        None => print!("{}", report.toml),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_routers_per_packet_spans_are_never_recorded() {
        let _one_at_a_time = crate::DISPATCHER_TESTS
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let toml = "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\n";
        let config = Config::parse(Path::new("broker.toml"), toml).unwrap();
        let dispatch = tracing::Dispatch::new(log_subscriber(&config));
        tracing::dispatcher::with_default(&dispatch, || {
            // rumqttd opens one of these, at ERROR level, for every packet it routes.
            let router = tracing::error_span!(target: "rumqttd::router::routing", "incoming");
            assert!(router.is_disabled(), "a router span reaches the registry");
            let ours = tracing::error_span!(target: "moatmq_broker::gateway", "ours");
            assert!(!ours.is_disabled(), "the filter drops every span");
        });
    }
}
