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
    /// Validate a configuration file and every file it names, as `serve` does, then exit.
    ///
    /// Loads the password and ACL files, TLS certificates, keys and CAs and the
    /// retained-store key, without binding a port. Exit code 0: ok; 64: the file, the
    /// line where known and the reason on stderr (the same message and code as `serve`).
    Check {
        /// Configuration file (broker.toml) to check.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Add or update a user in a password file (Argon2id), or delete one.
    /// The password is prompted twice on a terminal, else read from stdin.
    Passwd {
        /// Remove the user instead.
        #[arg(long)]
        delete: bool,
        /// Password file to update (created with mode 0600 if missing; an existing
        /// file keeps its owner, group and mode).
        file: PathBuf,
        /// Username to add, update or delete.
        user: String,
    },
    /// Write a new random 256-bit key for the retained store (mode 0600).
    Keygen {
        /// The key file to create (never overwritten); `-` prints the key to stdout
        /// instead, e.g. for MOATMQ_RETAINED_KEY in a Kubernetes Secret.
        #[arg(long)]
        out: PathBuf,
    },
    /// Retained-store maintenance (needs the key).
    Retained {
        #[command(subcommand)]
        command: RetainedCommand,
    },
    /// Durable-session maintenance (needs the [retained] key).
    Sessions {
        #[command(subcommand)]
        command: SessionsCommand,
    },
    /// Maintenance of both stores: the retained store and the session log.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// ACL tools.
    Acl {
        #[command(subcommand)]
        command: AclCommand,
    },
    /// Convert a mosquitto.conf into a broker.toml, warning about what cannot be carried over.
    ImportMosquitto {
        /// The mosquitto.conf to convert.
        conf: PathBuf,
        /// Where to write broker.toml (default: stdout). An existing file is kept
        /// unless --force is given.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Replace the --out file if it exists.
        #[arg(long, requires = "out")]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum RetainedCommand {
    /// Print retained topics and their sizes.
    List {
        /// Configuration file whose [retained] store to read.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// The same as `moatmq store rekey`: re-encrypts the retained store and the session
    /// log (they share the key).
    Rekey(RekeyArgs),
    /// Keep the store as it is after the broker refused it as truncated, rolled back or
    /// without its high-water mark: what is missing stays lost, tampered records are
    /// still refused, and the high-water mark is rewritten to match.
    Accept {
        /// Configuration file whose [retained] store and key to use.
        #[arg(short, long)]
        config: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum SessionsCommand {
    /// Print the stored persistent sessions: client id, owner, subscriptions, queued
    /// messages and expiry. Reads the files only, so it is safe while the broker runs
    /// (it shows the last commit).
    List {
        /// Configuration file whose session store and key to read.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Keep the session log as it is after the broker refused it as truncated, rolled
    /// back or without its high-water mark: what is missing stays lost, tampered records
    /// are still refused, and the high-water mark is rewritten to match. Run it with the
    /// broker stopped.
    Accept {
        /// Configuration file whose session store and key to use.
        #[arg(short, long)]
        config: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Re-encrypt the retained store and the session log under a new key (each
    /// crash-safe; run it again after a failure: a store already under the new key is
    /// left as it is); then point key_file at the new key. Run it with the broker stopped.
    Rekey(RekeyArgs),
}

/// Arguments of `store rekey` (and `retained rekey`).
#[derive(Debug, clap::Args)]
pub struct RekeyArgs {
    /// Configuration file whose stores and key to use.
    #[arg(short, long)]
    pub config: PathBuf,
    /// Key file made by `moatmq keygen`.
    #[arg(long)]
    pub new_key: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum AclCommand {
    /// Print allow or deny for one request and the file line that decided it.
    /// Exit code: 0 allow, 1 deny, 2 or more an error (unreadable or invalid ACL file,
    /// bad arguments).
    Check {
        /// ACL file (Mosquitto syntax) to ask.
        #[arg(long)]
        acl: PathBuf,
        /// Username of the client (omit for an anonymous client).
        #[arg(long)]
        user: Option<String>,
        /// Client id of the client (for %c patterns).
        #[arg(long, default_value = "")]
        client_id: String,
        /// read, write (or publish) or subscribe
        action: Action,
        /// Topic (read, write) or topic filter (subscribe).
        topic: String,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Action {
    /// Receive a message published on the topic.
    Read,
    /// Publish on the topic.
    #[value(alias = "publish")]
    Write,
    /// Subscribe to the filter.
    Subscribe,
}
