#![forbid(unsafe_code)]
//! Test support. Without features: [`wire`], MQTT packets written byte by byte and
//! frames cut from a stream (std only: the fuzz harness uses it). Feature `raw`: the raw
//! client [`Raw`] over any tokio stream (the benchmarks use it). Feature `broker` (the
//! default): [`TestBroker`] and its builder, a test CA that issues server and client
//! certificates, and rumqttc client helpers. Nothing here is fixed-port or global.

pub mod wire;

use std::path::{Path, PathBuf};

#[cfg(feature = "raw")]
mod raw;
#[cfg(feature = "raw")]
pub use raw::{connect4, connect5, delayed_will5, Frame, Raw};

#[cfg(feature = "broker")]
mod broker;
#[cfg(feature = "broker")]
mod builder;
#[cfg(feature = "broker")]
mod ca;
#[cfg(feature = "broker")]
mod client;

#[cfg(feature = "broker")]
pub use broker::TestBroker;
#[cfg(feature = "broker")]
pub use builder::{write_password_file, Listener, TestBrokerBuilder};
#[cfg(feature = "broker")]
pub use ca::TestCa;
#[cfg(feature = "broker")]
pub use client::*;

/// Writes `text` to `dir/name` and returns the path.
pub fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write test file");
    path
}
