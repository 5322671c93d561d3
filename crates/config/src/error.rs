//! Configuration errors. Each names the file and, where it is known, the line; none
//! carries a configured value, which may be a secret.

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
    /// Dotted path of the offending key, e.g. `listener[1].bind`, `listener[0].tls.cert`
    /// or `limits.max_inflight`.
    pub key: String,
    pub reason: String,
}

impl Invalid {
    pub(crate) fn new(key: impl Into<String>, reason: impl Into<String>) -> Invalid {
        Invalid {
            key: key.into(),
            reason: reason.into(),
        }
    }

    /// Makes `key` relative to the `index`th `[[listener]]`.
    pub(crate) fn in_listener(mut self, index: usize) -> Invalid {
        self.key = format!("listener[{index}].{}", self.key);
        self
    }

    /// Ties the failure to `file`, taking the key's line from the TOML parser's spans
    /// (the line of its table when the key is absent and its default was refused).
    pub fn locate(self, file: &Path, text: &str) -> ConfigError {
        ConfigError::Invalid {
            file: file.to_path_buf(),
            line: key_line(text, &self.key).unwrap_or(0),
            key: self.key,
            reason: self.reason,
        }
    }
}

/// 1-based line of the dotted `key` (with `name[i]` for arrays of tables) in `text`, or
/// of the deepest table on its path that the file has.
fn key_line(text: &str, key: &str) -> Option<usize> {
    let doc = toml_edit::ImDocument::parse(text).ok()?;
    let mut table: &dyn toml_edit::TableLike = doc.as_table();
    let mut found = None;
    for part in key.split('.') {
        let (name, index) = match part.split_once('[') {
            Some((name, rest)) => (name, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (part, None),
        };
        let Some((k, item)) = table.get_key_value(name) else {
            break;
        };
        found = k.span().or(found);
        let item = match (index, item) {
            (Some(i), toml_edit::Item::ArrayOfTables(array)) => match array.get(i) {
                Some(t) => {
                    found = t.span().or(found);
                    t as &dyn toml_edit::TableLike
                }
                None => break,
            },
            (None, item) => match item.as_table_like() {
                Some(t) => t,
                None => break,
            },
            _ => break,
        };
        table = item;
    }
    found.map(|span| crate::line_of(text, span.start))
}

/// A serde/TOML message without the value it quotes: `invalid type: string "hunter2",
/// expected u64` becomes `invalid type: string, expected u64`; `unknown variant `x`,
/// expected one of ...` loses the variant.
pub(crate) fn redact(message: &str) -> String {
    for prefix in ["invalid type: ", "invalid value: ", "invalid length "] {
        if let Some(rest) = message.strip_prefix(prefix) {
            let (found, expected) = rest.split_once(", expected").unwrap_or((rest, ""));
            // serde's Unexpected: `string "..."`, `integer `5``, `boolean `true``, ...
            let kind = found
                .split([' ', '`', '"', '\''])
                .take_while(|w| !w.is_empty())
                .collect::<Vec<_>>()
                .join(" ");
            let suffix = if expected.is_empty() {
                String::new()
            } else {
                format!(", expected{expected}")
            };
            return format!("{prefix}{kind}{suffix}");
        }
    }
    if let Some(rest) = message.strip_prefix("unknown variant ") {
        let expected = rest.split_once(", expected").map(|(_, e)| e).unwrap_or("");
        return format!("unknown value, expected{expected}");
    }
    message.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_keeps_the_kind_and_drops_the_value() {
        assert_eq!(
            redact("invalid type: string \"hunter2-secret\", expected usize"),
            "invalid type: string, expected usize"
        );
        assert_eq!(
            redact("invalid type: integer `42`, expected a string"),
            "invalid type: integer, expected a string"
        );
        assert_eq!(
            redact("invalid type: floating point `1.5`, expected u64"),
            "invalid type: floating point, expected u64"
        );
        assert_eq!(
            redact("unknown variant `hunter2`, expected `mqtt` or `ws`"),
            "unknown value, expected `mqtt` or `ws`"
        );
        assert_eq!(redact("unknown field `x`"), "unknown field `x`");
    }

    #[test]
    fn key_lines_come_from_the_parser() {
        let text = "[[listener]]\nname = \"a\"\nbind = \"x\"\n\n[[listener]]\nbind = \"y\"\n\
                    [listener.tls]\ncert = \"c\"\n[metrics]\n  bind = \"z\"\n";
        assert_eq!(key_line(text, "listener[0].bind"), Some(3));
        assert_eq!(key_line(text, "listener[1].bind"), Some(6));
        assert_eq!(key_line(text, "listener[1].tls.cert"), Some(8));
        assert_eq!(key_line(text, "metrics.bind"), Some(10));
        // Absent key: its table's line; absent table: none.
        assert_eq!(key_line(text, "listener[1].name"), Some(5));
        assert_eq!(key_line(text, "limits.max_inflight"), None);
    }
}
