//! Configuration errors. Each names the file and, where it is known, the line.

use std::path::{Path, PathBuf};

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read (missing, permissions).
    #[error("{}: {source}", file.display())]
    Io {
        file: PathBuf,
        source: std::io::Error,
    },
    /// The TOML is malformed, a key is unknown or a value has the wrong type.
    #[error("{}:{line}: {reason}", file.display())]
    Syntax {
        file: PathBuf,
        line: usize,
        reason: String,
    },
    /// The TOML parsed but a value is not acceptable; `key` is the dotted key path.
    #[error("{}:{line}: {key}: {reason}", file.display())]
    Invalid {
        file: PathBuf,
        line: usize,
        key: String,
        reason: String,
    },
}

/// A validation failure before it is tied to a file.
#[derive(Debug)]
pub struct Invalid {
    /// Dotted path of the offending key, e.g. `listener[1].bind` or `limits.max_inflight`.
    pub key: String,
    /// The last path element as written in the file, used to find its line.
    pub needle: String,
    /// Index of the `[[listener]]` table the key belongs to, if any.
    pub listener: Option<usize>,
    /// The array-of-tables header (e.g. `[[rate_limit.user]]`) and index of the table the
    /// key belongs to, if it is not a listener's.
    pub table: Option<(&'static str, usize)>,
    pub reason: String,
}

impl Invalid {
    pub(crate) fn new(key: impl Into<String>, reason: impl Into<String>) -> Invalid {
        let key = key.into();
        let needle = key.rsplit('.').next().unwrap_or(&key).to_string();
        Invalid {
            key,
            needle,
            listener: None,
            table: None,
            reason: reason.into(),
        }
    }

    pub(crate) fn in_listener(mut self, index: usize) -> Invalid {
        self.listener = Some(index);
        self.key = format!("listener[{index}].{}", self.key);
        self
    }

    /// The key belongs to the `index`th table under the array-of-tables `header`.
    pub(crate) fn in_table(mut self, header: &'static str, index: usize) -> Invalid {
        self.table = Some((header, index));
        self.key = format!(
            "{}[{index}].{}",
            header.trim_matches(['[', ']']),
            self.needle
        );
        self
    }

    /// Ties the failure to `file`, finding the line of the key in `text` (0 if absent).
    pub fn locate(self, file: &Path, text: &str) -> ConfigError {
        let table = self.table.or(self.listener.map(|i| ("[[listener]]", i)));
        let line = find_key_line(text, &self.needle, table);
        ConfigError::Invalid {
            file: file.to_path_buf(),
            line,
            key: self.key,
            reason: self.reason,
        }
    }
}

/// Line of `key = ...`, searching only inside the `index`th table under the given
/// array-of-tables header (e.g. `[[listener]]`) when given.
fn find_key_line(text: &str, key: &str, table: Option<(&str, usize)>) -> usize {
    let mut seen: Option<usize> = None;
    let mut inside = false;
    for (n, line) in text.lines().enumerate() {
        let t = line.trim_start();
        if let Some((header, _)) = table {
            if t.starts_with(header) {
                seen = Some(seen.map_or(0, |i| i + 1));
                inside = true;
            } else if t.starts_with('[') && !t.starts_with("[listener.") {
                // Another table; `[listener.tls]` still belongs to its listener.
                inside = false;
            }
        }
        if let Some((_, index)) = table {
            if !inside || seen != Some(index) {
                continue;
            }
        }
        if let Some(rest) = t.strip_prefix(key) {
            if rest.trim_start().starts_with('=') {
                return n + 1;
            }
        }
    }
    0
}
