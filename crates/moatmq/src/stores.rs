//! The store tools: `retained list|accept`, `sessions list|accept` and `store rekey`
//! (also `retained rekey`). Both stores are encrypted with the `[retained]` key, so a
//! rekey re-encrypts both. No tool creates a store that is not there: it would belong to
//! whoever runs the tool (often root), and the broker's own user could then not open it.

use crate::cli::{RekeyArgs, RetainedCommand, SessionsCommand, StoreCommand};
use anyhow::Context;
use moatmq_broker::retained::{load_key, KEY_ENV};
use moatmq_config::{Config, Retained, SessionsConfig};
use moatmq_store::{RetainedKey, SessionLimits, SessionLog, Store, StoreError, StoreLimits};
use std::path::{Path, PathBuf};

/// The config at `path` and its `[retained]` section, which the command needs.
fn retained_config(path: &Path) -> anyhow::Result<(Config, Retained)> {
    let config = Config::load(path)?;
    let r = config
        .retained
        .clone()
        .context("the config has no [retained] section")?;
    Ok((config, r))
}

/// The config at `path` with durable sessions on: the config, the key and the session
/// log's folder.
fn sessions_config(path: &Path) -> anyhow::Result<(Config, RetainedKey, PathBuf)> {
    let config = Config::load(path)?;
    let retained = config.retained.clone().context(
        "the config has no [retained] section: persistent sessions are kept in memory only",
    )?;
    let SessionsConfig { path, .. } = config
        .sessions()
        .context("durable sessions are off in this config ([sessions] enabled = false)")?;
    let key = load_key(&config, &retained)?;
    let dir = config.resolve(&path);
    Ok((config, key, dir))
}

pub fn retained(command: RetainedCommand) -> anyhow::Result<()> {
    match command {
        RetainedCommand::List { config } => {
            let (config, r) = retained_config(&config)?;
            let dir = config.resolve(&r.path);
            if !dir.exists() {
                println!(
                    "no retained store at {} yet (the broker creates it when it first starts)",
                    dir.display()
                );
                return Ok(());
            }
            let store = moatmq_broker::retained::open(&config, &r)?;
            for m in store.messages() {
                // Quota owner: as stored, or as derived for records from before owners.
                let owner = m
                    .owner
                    .as_deref()
                    .unwrap_or_else(|| moatmq_broker::retained::legacy_owner(&m.topic));
                println!(
                    "{}\t{} bytes\tqos {}\towner {owner}",
                    m.topic,
                    m.payload.len(),
                    m.qos
                );
            }
            println!(
                "{} messages, {} bytes on disk",
                store.len(),
                store.file_bytes()
            );
            Ok(())
        }
        RetainedCommand::Rekey(args) => rekey(args),
        RetainedCommand::Accept { config } => {
            let (config, r) = retained_config(&config)?;
            let key = load_key(&config, &r)?;
            let path = config.resolve(&r.path);
            anyhow::ensure!(path.exists(), "no retained store at {}", path.display());
            accept_damaged(
                "messages",
                || {
                    let (store, _) = Store::open(&path, key.clone(), StoreLimits::UNLIMITED)?;
                    Ok((store.log_path().to_owned(), store.len()))
                },
                || moatmq_store::accept(&path, key.clone()),
            )
        }
    }
}

pub fn sessions(command: SessionsCommand) -> anyhow::Result<()> {
    match command {
        SessionsCommand::List { config } => {
            let (_, key, dir) = sessions_config(&config)?;
            // Read-only: safe beside a running broker (a commit in progress past the
            // high-water mark is skipped, not cut).
            let sessions = moatmq_store::read_sessions(&dir, &key)?;
            let now = moatmq_store::now_unix();
            let (mut queued, mut in_flight) = (0, 0);
            for s in &sessions {
                let q = s.queued();
                queued += q;
                in_flight += s.messages.len() - q;
                // Client ids and usernames come from clients: escaped, never raw bytes
                // for the terminal.
                println!(
                    "{}\towner {}\t{} subscriptions\t{q} queued\t{} in flight\t{}",
                    s.key.client_id.escape_debug(),
                    s.key
                        .owner
                        .as_deref()
                        .map_or("(anonymous)".into(), |o| o.escape_debug().to_string()),
                    s.meta.subscriptions.len(),
                    s.messages.len() - q,
                    expiry(s, now),
                );
            }
            println!(
                "{} sessions, {queued} queued messages, {in_flight} in flight",
                sessions.len()
            );
            Ok(())
        }
        SessionsCommand::Accept { config } => {
            let (_, key, dir) = sessions_config(&config)?;
            anyhow::ensure!(
                SessionLog::exists_in(&dir),
                "no session store at {}",
                dir.display()
            );
            accept_damaged(
                "sessions",
                || {
                    let log = SessionLog::open(&dir, key.clone(), SessionLimits::UNLIMITED)?;
                    Ok((log.log_path().to_owned(), log.len()))
                },
                || moatmq_store::accept_sessions(&dir, key.clone()),
            )
        }
    }
}

/// When session `s` expires, as `sessions list` says it.
fn expiry(s: &moatmq_store::Session, now: u64) -> String {
    match s.expires_at() {
        None => format!(
            "connected (kept {} s after it disconnects)",
            s.meta.expiry_interval
        ),
        Some(at) if at <= now => "expired (dropped at the next start)".into(),
        Some(at) => format!("expires in {} s", at - now),
    }
}

pub fn store(command: StoreCommand) -> anyhow::Result<()> {
    match command {
        StoreCommand::Rekey(args) => rekey(args),
    }
}

/// `accept` of either store: `open` as the broker would; only if it refuses the log for
/// a defect an operator may accept (missing records, an older copy, no mark) is it
/// taken as it is with `accept`. `unit` names what the count counts.
fn accept_damaged(
    unit: &str,
    open: impl FnOnce() -> Result<(PathBuf, usize), StoreError>,
    accept: impl FnOnce() -> Result<usize, StoreError>,
) -> anyhow::Result<()> {
    match open() {
        Ok((log, n)) => {
            println!(
                "{} is consistent with its high-water mark ({n} {unit}); nothing to accept",
                log.display()
            );
            return Ok(());
        }
        Err(
            e @ (StoreError::Truncated { .. }
            | StoreError::RolledBack { .. }
            | StoreError::MarkMissing { .. }
            | StoreError::LogMissing { .. }),
        ) => println!("accepting: {e}"),
        Err(e) => return Err(e.into()),
    }
    let n = accept()?;
    println!("accepted: {n} {unit} kept; the high-water mark now matches the log");
    Ok(())
}

/// Re-encrypts the retained store and the session log under the new key (refused for
/// a cluster node). Each rekey is crash-safe on its own; if one fails after the other
/// succeeded, running the command again finishes the job: a store whose header opens
/// under the new key (and not the old) is already done and left as it is.
fn rekey(args: RekeyArgs) -> anyhow::Result<()> {
    let (config, r) = retained_config(&args.config)?;
    // A node under another key than the cluster's refuses to start (the key marker in
    // NATS), and what the cluster keeps in NATS is sealed with the old one.
    anyhow::ensure!(
        config.cluster.is_none(),
        "{} has a [cluster] section: every node of the cluster and what it keeps in NATS \
         are sealed with this key, and a node under another key refuses to start; \
         rotating a cluster's key is not supported (docs/security.md, \
         \"Clusters: what NATS access grants\")",
        args.config.display()
    );
    let old = load_key(&config, &r)?;
    let new = RetainedKey::load(&args.new_key)?;
    let retained_dir = config.resolve(&r.path);
    let sessions_dir = config
        .sessions()
        .map(|s| config.resolve(&s.path))
        .filter(|dir| SessionLog::exists_in(dir));
    // Opening a missing store would create one, owned by whoever runs this.
    anyhow::ensure!(
        retained_dir.exists() || sessions_dir.is_some(),
        "no retained store at {}",
        retained_dir.display()
    );
    if retained_dir.exists() {
        match moatmq_store::rekey(&retained_dir, old.clone(), &new) {
            Ok(n) => println!("re-encrypted {n} messages"),
            Err(StoreError::WrongKey { .. }) if new.check_store(&retained_dir).is_ok() => {
                println!("the retained store is under the new key already")
            }
            Err(e) => return Err(e.into()),
        }
    }
    if let Some(dir) = &sessions_dir {
        match moatmq_store::rekey_sessions(dir, old, &new) {
            Ok(n) => println!("re-encrypted {n} sessions"),
            Err(StoreError::WrongKey { .. }) if new.check_session_store(dir).is_ok() => {
                println!("the session log is under the new key already")
            }
            Err(e) => return Err(e.into()),
        }
    }
    println!(
        "now set key_file = {:?} (or {KEY_ENV})",
        args.new_key.display().to_string()
    );
    Ok(())
}
