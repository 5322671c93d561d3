//! Configuration errors. Each names the file and, where it is known, the line.

use std::path::{Path, PathBuf};

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read (missing, permissions).
    #[error("configuration file {}: {source}", file.display())]
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
            reason: reason.into(),
        }
    }

    pub(crate) fn in_listener(mut self, index: usize) -> Invalid {
        self.listener = Some(index);
        self.key = format!("listener[{index}].{}", self.key);
        self
    }

    /// Ties the failure to `file`, finding the line of the key in `text` (0 if absent).
    pub fn locate(self, file: &Path, text: &str) -> ConfigError {
        // `limits.max_inflight` is looked for inside `[limits]` only.
        let section = match self.listener {
            None => self.key.rsplit_once('.').map(|(section, _)| section),
            Some(_) => None,
        };
        let line = find_key_line(text, &self.needle, self.listener, section);
        ConfigError::Invalid {
            file: file.to_path_buf(),
            line,
            key: self.key,
            reason: self.reason,
        }
    }
}

/// Line of `key = ...`, searching only inside the `index`th `[[listener]]` or inside
/// `[section]` when given.
fn find_key_line(text: &str, key: &str, listener: Option<usize>, section: Option<&str>) -> usize {
    let mut seen_listener: Option<usize> = None;
    let mut in_section = false;
    for (n, line) in text.lines().enumerate() {
        let t = line.trim_start();
        if t.starts_with("[[listener]]") {
            seen_listener = Some(seen_listener.map_or(0, |i| i + 1));
        }
        if t.starts_with('[') {
            in_section = section.is_some_and(|s| {
                t.strip_prefix('[')
                    .and_then(|r| r.split_once(']'))
                    .is_some_and(|(name, _)| name.trim() == s)
            });
        }
        if listener.is_some() && seen_listener != listener {
            continue;
        }
        if section.is_some() && !in_section {
            continue;
        }
        if let Some(rest) = t.strip_prefix(key) {
            if rest.trim_start().starts_with('=') {
                return n + 1;
            }
        }
    }
    0
}
