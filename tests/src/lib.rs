#![forbid(unsafe_code)]
//! End-to-end suites that span crates, in `tests/tests/`: the `moatmq` command run as a
//! process (`cli*.rs`), other MQTT implementations against the broker (`interop.rs`),
//! the deploy files (`deploy.rs`) and the monitoring files against a running broker
//! (`monitoring.rs`), and cluster failures with one process per node (`cluster.rs`,
//! with nats-servers from [`Nats`]). Each crate's own `tests/` keeps that crate's
//! integration tests.
//!
//! The CLI suites run the `moatmq` binary. Cargo builds a binary for the integration
//! tests of its own package only, so [`moatmq`] builds it once per test process with
//! `cargo build -p moatmq`, in the same target folder and profile as the test (a no-op
//! when it is up to date), with the broker's `test-hooks` feature on: as when these
//! suites lived in crates/moatmq, where the testkit dev-dependency turned it on, a test
//! can make the router fail (`MOATMQ_TEST_ROUTER_FAULT`).

mod nats;
mod process;

pub use nats::Nats;
pub use process::Moatmq;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The repository's root folder.
pub fn repo_root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The `moatmq` binary, built on first use.
pub fn moatmq() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(build_moatmq)
}

/// The profile this test was built with: the name of the folder above `deps/`.
fn profile() -> String {
    let exe = std::env::current_exe().expect("the test's own path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .and_then(Path::file_name)
        .and_then(|n| n.to_str())
        .expect("tests run from <target>/<profile>/deps");
    match dir {
        "debug" => "dev".to_string(),
        other => other.to_string(),
    }
}

fn build_moatmq() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").to_string());
    let out = Command::new(cargo)
        .args(["build", "--quiet", "--message-format=json", "-p", "moatmq"])
        .args(["--bin", "moatmq", "--profile", &profile()])
        .args(["--features", "moatmq-broker/test-hooks"])
        .current_dir(repo_root())
        .output()
        .expect("run cargo build -p moatmq");
    let messages: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    // With --message-format=json the compiler's own errors (and a failed link's reason)
    // arrive on stdout as JSON: show them, not only cargo's one-line summary.
    assert!(
        out.status.success(),
        "cargo build -p moatmq failed:\n{}\n{}",
        messages
            .iter()
            .filter(|m| m["reason"] == "compiler-message")
            .filter_map(|m| m["message"]["rendered"].as_str())
            .collect::<String>(),
        String::from_utf8_lossy(&out.stderr)
    );
    messages
        .iter()
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "moatmq")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .expect("cargo build -p moatmq names the moatmq executable")
}

/// Writes `dir/broker.toml` for a `moatmq serve` process: one TCP listener on a free
/// loopback port (`tcp`), anonymous clients, the store in `dir/data` with the key
/// `dir/store.key` (the caller puts it there), then `more` (lines of `[retained]`,
/// further sections). Returns its path.
pub fn store_config(dir: &Path, more: &str) -> std::path::PathBuf {
    let config = dir.join("broker.toml");
    std::fs::write(
        &config,
        format!(
            "[[listener]]\nname = \"tcp\"\nbind = \"127.0.0.1:0\"\n\
             [auth]\nallow_anonymous = true\n\
             [retained]\npath = \"data\"\nkey_file = \"store.key\"\n{more}"
        ),
    )
    .expect("write broker.toml");
    config
}
