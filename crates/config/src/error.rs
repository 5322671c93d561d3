//! Configuration errors. Each names the file and, where it is known, the line and the key
//! path; none carries a configured value, which may be a secret.
//!
//! The rule is kept here, where errors are made, not at each call site: a reason is
//! either our own fixed text (validation: [`Invalid::new`] takes only `&'static str`, and
//! key paths), the TOML parser's complaint about the syntax (which names keys, not
//! values), or a serde message cut down to an allowed shape ([`schema_reason`]): the kind
//! of value found and what was expected, never the value itself.

use crate::position::Positions;
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

impl ConfigError {
    /// The file is not valid TOML. The parser's message names what it expected and, for
    /// a duplicate key, the key; its lines are joined so the error stays one line.
    pub(crate) fn malformed(file: &Path, text: &str, error: &toml_edit::TomlError) -> ConfigError {
        ConfigError::Syntax {
            file: file.to_path_buf(),
            line: error
                .span()
                .map(|span| crate::line_of(text, span.start))
                .unwrap_or(0),
            reason: error
                .message()
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join("; "),
        }
    }

    /// The TOML does not fit the schema (unknown key, missing key, wrong type). The key
    /// path and line come from the error's span; the reason goes through [`schema_reason`].
    pub(crate) fn schema(
        file: &Path,
        positions: &Positions,
        error: &toml_edit::de::Error,
    ) -> ConfigError {
        let message = error.message();
        let at = error.span().map(|span| span.start);
        let mut found = at.and_then(|at| positions.key_at(at));
        // A missing key's span is its table: name the key itself.
        if let Some(field) = message
            .strip_prefix("missing field `")
            .and_then(|m| m.strip_suffix('`'))
        {
            found = Some(match found {
                Some((table, line)) => (format!("{table}.{field}"), line),
                None => (field.to_string(), at.map_or(0, |at| positions.line_at(at))),
            });
        }
        let (key, line) = match found {
            Some((key, line)) => (Some(key), line),
            None => (None, at.map_or(0, |at| positions.line_at(at))),
        };
        let reason = schema_reason(message);
        ConfigError::Syntax {
            file: file.to_path_buf(),
            line,
            reason: match key {
                Some(key) => format!("{key}: {reason}"),
                None => reason,
            },
        }
    }
}

/// A validation failure before it is tied to a file.
#[derive(Debug)]
pub struct Invalid {
    /// Dotted path of the offending key, e.g. `listener[1].bind`, `listener[0].tls.cert`
    /// or `limits.max_inflight`.
    pub key: String,
    /// Fixed text, or text naming other keys: never a value from the file.
    pub reason: String,
}

impl Invalid {
    /// `reason` is a literal so that no configured value can reach it.
    pub(crate) fn new(key: impl Into<String>, reason: &'static str) -> Invalid {
        Invalid {
            key: key.into(),
            reason: reason.to_string(),
        }
    }

    /// `key` cannot be used together with `other`, another key path: two binds that
    /// overlap, say.
    pub(crate) fn conflict(key: impl Into<String>, other: &str, reason: &'static str) -> Invalid {
        Invalid {
            key: key.into(),
            reason: format!("{reason} {other}"),
        }
    }

    /// Makes `key` relative to the `index`th `[[listener]]`.
    pub(crate) fn in_listener(mut self, index: usize) -> Invalid {
        self.key = format!("listener[{index}].{}", self.key);
        self
    }

    /// Ties the failure to `file`, taking the key's line from the TOML parser's spans
    /// (the line of its table when the key is absent and its default was refused; 0 when
    /// the file has none of its path).
    pub(crate) fn locate(self, file: &Path, positions: &Positions) -> ConfigError {
        ConfigError::Invalid {
            file: file.to_path_buf(),
            line: positions.line_of_key(&self.key).unwrap_or(0),
            key: self.key,
            reason: self.reason,
        }
    }
}

/// serde's words for the kinds of value it found (`serde::de::Unexpected`'s `Display`),
/// each a prefix of what it prints before the value, longer ones first.
const VALUE_KINDS: &[&str] = &[
    "floating point",
    "byte array",
    "unit value",
    "Option value",
    "newtype struct",
    "unit variant",
    "newtype variant",
    "tuple variant",
    "struct variant",
    "boolean",
    "integer",
    "character",
    "string",
    "sequence",
    "map",
    "enum",
];

/// A serde message reduced to a shape that cannot hold a value: `invalid type: string
/// "hunter2", expected u64` becomes `invalid type: string, expected u64`; an unknown
/// enum value loses the value; a message of any other shape than serde's own becomes
/// `invalid value`, since a deserializer's own text may quote what it read.
///
/// What follows the last `, expected ` is the schema's description of the type, so it is
/// kept; the value sits before it, so it may hold `, expected ` itself without harm.
fn schema_reason(message: &str) -> String {
    let (found, expected) = match message.rsplit_once(", expected ") {
        Some((found, expected)) => (found, format!(", expected {expected}")),
        None => (message, String::new()),
    };
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(value) = found.strip_prefix(prefix) {
            let kind = VALUE_KINDS
                .iter()
                .find(|kind| value.starts_with(*kind))
                .unwrap_or(&"value");
            return format!("{prefix}{kind}{expected}");
        }
    }
    if found.starts_with("invalid length ") {
        return format!("invalid length{expected}");
    }
    if found.starts_with("unknown variant ") {
        return format!("unknown value{expected}");
    }
    // These name keys (the schema's or the file's), never values; the key path is
    // already in front of the reason.
    if found.starts_with("unknown field `") {
        return format!("unknown key{expected}");
    }
    if found.starts_with("missing field `") {
        return "missing key".to_string();
    }
    if found.starts_with("duplicate field `") {
        return "duplicate key".to_string();
    }
    "invalid value".to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_reasons_keep_the_kind_and_drop_the_value() {
        for (message, reason) in [
            (
                "invalid type: string \"hunter2-secret\", expected usize",
                "invalid type: string, expected usize",
            ),
            (
                "invalid type: string \"hunter2, expected secret\", expected usize",
                "invalid type: string, expected usize",
            ),
            (
                "invalid type: integer `42`, expected a string",
                "invalid type: integer, expected a string",
            ),
            (
                "invalid value: integer `70000`, expected u16",
                "invalid value: integer, expected u16",
            ),
            (
                "invalid type: floating point `1.5`, expected u64",
                "invalid type: floating point, expected u64",
            ),
            (
                "invalid type: sequence, expected a string",
                "invalid type: sequence, expected a string",
            ),
            (
                "unknown variant `hunter2`, expected `mqtt` or `ws`",
                "unknown value, expected `mqtt` or `ws`",
            ),
            (
                "unknown variant `hunter2`, expected x`, expected `mqtt` or `ws`",
                "unknown value, expected `mqtt` or `ws`",
            ),
            (
                "unknown variant `hunter2`, there are no variants",
                "unknown value",
            ),
            (
                "unknown field `x`, expected `a` or `b`",
                "unknown key, expected `a` or `b`",
            ),
            ("missing field `bind`", "missing key"),
            (
                "invalid length 3, expected 2 entries",
                "invalid length, expected 2 entries",
            ),
            ("could not parse hunter2 as a date", "invalid value"),
            ("invalid type: hunter2", "invalid type: value"),
        ] {
            assert_eq!(schema_reason(message), reason, "{message}");
        }
    }
}
