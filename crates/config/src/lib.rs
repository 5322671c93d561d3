#![forbid(unsafe_code)]
//! moatmq's configuration: the `broker.toml` schema, its defaults and its validation.
//!
//! Loading is two steps: serde parses the TOML (unknown keys are an error, so a typo
//! never silently falls back to a default), then [`Config::validate`] checks what types
//! cannot (non-zero limits, unique listener names, TLS settings that fit together).
//! Every error names the file, the line and key path where known (from the TOML parser's
//! spans), and the reason; errors never echo configuration values, which may be secrets.

mod error;
mod import;
mod position;
mod schema;

pub use import::{import_mosquitto, ImportReport};

pub use error::ConfigError;
pub use schema::*;

use std::path::{Path, PathBuf};

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            file: path.to_path_buf(),
            source,
        })?;
        Config::parse(path, &text)
    }

    /// Parses and validates `text`; `file` is only used to name errors and to resolve
    /// relative paths against the file's folder.
    pub fn parse(file: &Path, text: &str) -> Result<Config, ConfigError> {
        Config::parse_with(file, text, std::env::var(NODE_NAME_ENV).ok())
    }

    /// [`Config::parse`] with the value of [`NODE_NAME_ENV`] given (it names this node
    /// in `[cluster]`, winning over `node_name`).
    pub fn parse_with(
        file: &Path,
        text: &str,
        node_name: Option<String>,
    ) -> Result<Config, ConfigError> {
        // One parse: its spans place every error, its tree feeds serde.
        let positions =
            position::Positions::parse(text).map_err(|e| ConfigError::malformed(file, text, &e))?;
        let de = toml_edit::de::Deserializer::from(positions.document().clone());
        let mut config = <Config as serde::Deserialize>::deserialize(de)
            .map_err(|e| ConfigError::schema(file, &positions, &e))?;
        config.source = Some(file.to_path_buf());
        if let (Some(cluster), Some(name)) = (&mut config.cluster, node_name) {
            cluster.node_name = name;
        }
        config.validate().map_err(|e| e.locate(file, &positions))
    }

    /// The built-in configuration used by `moatmq serve` without `-c`: one plaintext
    /// listener on 127.0.0.1:1883 with anonymous access, like Mosquitto 2.x's local-only mode.
    pub fn local_only() -> Config {
        Config {
            listener: vec![Listener {
                name: "local".into(),
                bind: "127.0.0.1:1883".into(),
                protocol: Protocol::Mqtt,
                path: None,
                tls: None,
                allow_anonymous: Some(true),
                trust_proxy_protocol: false,
                forwarded: None,
            }],
            ..Config::default()
        }
    }

    /// Resolves a path from the config file against the config file's folder.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        match self.source.as_deref().and_then(Path::parent) {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path.to_path_buf(),
        }
    }
}

/// 1-based line number of byte offset `at` in `text`.
pub fn line_of(text: &str, at: usize) -> usize {
    text.as_bytes()[..at.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests;
