//! Where a key is in `broker.toml`, taken from the TOML parser's spans (toml_edit's
//! `ImDocument`), never from scanning the text.
//!
//! A key path names one key: dotted, with `name[i]` for the `i`th table of an array of
//! tables (`listener[1].tls.cert`, `rate_limit.user[0].name`, `metrics.bind`). It maps to
//! the line of that key in that table; a key the file leaves out maps to the line of the
//! deepest table on its path that the file has. An error's byte offset maps back to the
//! key path whose key or value holds it.

use std::ops::Range;
use toml_edit::{ImDocument, Item, TableLike};

/// A parsed `broker.toml` that keeps each key's position.
pub(crate) struct Positions<'a> {
    doc: ImDocument<&'a str>,
}

impl<'a> Positions<'a> {
    pub(crate) fn parse(text: &'a str) -> Result<Positions<'a>, toml_edit::TomlError> {
        ImDocument::parse(text).map(|doc| Positions { doc })
    }

    /// The parsed document, for deserializing.
    pub(crate) fn document(&self) -> &ImDocument<&'a str> {
        &self.doc
    }

    /// 1-based line of the byte offset `at`.
    pub(crate) fn line_at(&self, at: usize) -> usize {
        crate::line_of(self.doc.raw(), at)
    }

    /// 1-based line of `key` (a key path), or of the deepest table on its path the file
    /// has; `None` when the file has none of it.
    pub(crate) fn line_of_key(&self, key: &str) -> Option<usize> {
        let mut table: &dyn TableLike = self.doc.as_table();
        let mut found = None;
        for part in key.split('.') {
            let (name, index) = split_index(part);
            let Some((k, item)) = table.get_key_value(name) else {
                break;
            };
            found = k.span().or(found);
            let next = match (index, item) {
                (Some(i), Item::ArrayOfTables(array)) => array.get(i).map(|t| {
                    found = t.span().or(found.clone());
                    t as &dyn TableLike
                }),
                (None, item) => item.as_table_like(),
                _ => None,
            };
            match next {
                Some(t) => table = t,
                None => break,
            }
        }
        found.map(|span| self.line_at(span.start))
    }

    /// The key path holding byte offset `at`, with the line of its key: the innermost
    /// key whose name or value spans it, else the innermost table whose header does.
    /// `None` at the top level.
    pub(crate) fn key_at(&self, at: usize) -> Option<(String, usize)> {
        let mut path = Vec::new();
        let start = key_in(self.doc.as_table(), at, &mut path)?;
        Some((path.join("."), self.line_at(start)))
    }
}

/// A key as it appears in a key path: bare if TOML allows it bare, else quoted with its
/// control characters escaped, so that a path stays one line.
fn path_key(name: &str) -> String {
    let bare = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    if !name.is_empty() && name.chars().all(bare) {
        name.to_string()
    } else {
        format!("{name:?}")
    }
}

/// `name[3]` as (`name`, Some(3)); `name` as (`name`, None).
fn split_index(part: &str) -> (&str, Option<usize>) {
    match part.split_once('[') {
        Some((name, rest)) => (name, rest.trim_end_matches(']').parse().ok()),
        None => (part, None),
    }
}

fn holds(span: Option<Range<usize>>, at: usize) -> bool {
    span.is_some_and(|s| s.contains(&at) || (s.is_empty() && s.start == at))
}

/// Pushes onto `path` the key path under `table` that holds `at` and returns where its
/// key (or table header) starts; `None` if no key under `table` holds `at`.
fn key_in(table: &dyn TableLike, at: usize, path: &mut Vec<String>) -> Option<usize> {
    let start = |span: Option<Range<usize>>| span.map(|s| s.start);
    for (name, item) in table.iter() {
        let key_span = table.get_key_value(name).and_then(|(k, _)| k.span());
        path.push(path_key(name));
        let found = match item {
            Item::None => None,
            // An inline table's own keys come first: the error may be in one of them.
            Item::Value(value) => value
                .as_inline_table()
                .and_then(|t| key_in(t, at, path))
                .or_else(|| {
                    (holds(key_span.clone(), at) || holds(value.span(), at))
                        .then(|| start(key_span.clone()).or(start(value.span())))
                        .flatten()
                }),
            Item::Table(t) => key_in(t, at, path).or_else(|| {
                (holds(t.span(), at) || holds(key_span.clone(), at))
                    .then(|| start(t.span()).or(start(key_span.clone())))
                    .flatten()
            }),
            Item::ArrayOfTables(array) => {
                let last = path.len() - 1;
                array.iter().enumerate().find_map(|(i, t)| {
                    path[last] = format!("{}[{i}]", path_key(name));
                    key_in(t, at, path)
                        .or_else(|| holds(t.span(), at).then(|| start(t.span())).flatten())
                })
            }
        };
        if found.is_some() {
            return found;
        }
        path.pop();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "[[listener]]\nname = \"a\"\nbind = \"x\"\n\n[[listener]]\nbind = \"y\"\n\
                        [listener.tls]\ncert = \"c\"\n[metrics]\n  bind = \"z\"\n\
                        [limits]\nmax_inflight = 0\nrate = { a = 1, b = [2, 3] }\n";

    #[test]
    fn key_paths_map_to_their_lines() {
        let p = Positions::parse(TEXT).unwrap();
        assert_eq!(p.line_of_key("listener[0].bind"), Some(3));
        assert_eq!(p.line_of_key("listener[1].bind"), Some(6));
        assert_eq!(p.line_of_key("listener[1].tls.cert"), Some(8));
        assert_eq!(p.line_of_key("metrics.bind"), Some(10));
        assert_eq!(p.line_of_key("limits.max_inflight"), Some(12));
        assert_eq!(p.line_of_key("limits.rate.b"), Some(13));
        // Absent key: its table's line; absent table: none.
        assert_eq!(p.line_of_key("listener[1].name"), Some(5));
        assert_eq!(p.line_of_key("listener[2].name"), Some(1));
        assert_eq!(p.line_of_key("retained.max_bytes"), None);
    }

    #[test]
    fn offsets_map_back_to_key_paths() {
        let p = Positions::parse(TEXT).unwrap();
        let key_at = |needle: &str| p.key_at(TEXT.find(needle).unwrap()).map(|(key, _)| key);
        assert_eq!(key_at("\"x\"").as_deref(), Some("listener[0].bind"));
        assert_eq!(key_at("bind = \"y\"").as_deref(), Some("listener[1].bind"));
        assert_eq!(key_at("[listener.tls]").as_deref(), Some("listener[1].tls"));
        assert_eq!(key_at("\"c\"").as_deref(), Some("listener[1].tls.cert"));
        assert_eq!(key_at("\"z\"").as_deref(), Some("metrics.bind"));
        assert_eq!(key_at("0\n").as_deref(), Some("limits.max_inflight"));
        assert_eq!(key_at("3] }").as_deref(), Some("limits.rate.b"));
        assert_eq!(key_at("[[listener]]\nbind").as_deref(), Some("listener[1]"));
        assert_eq!(key_at("\n\n[[").as_deref(), None);
        // The line is the key's, even for a value on a later line.
        let at = TEXT.find("3] }").unwrap();
        assert_eq!(p.key_at(at).map(|(_, line)| line), Some(13));
    }

    #[test]
    fn odd_keys_are_quoted_in_paths() {
        let text = "[\"a.b\"]\n\"c\\nd\" = 1\n\"\" = 2\n";
        let p = Positions::parse(text).unwrap();
        let key_at = |needle: &str| p.key_at(text.find(needle).unwrap());
        assert_eq!(key_at("1"), Some(("\"a.b\".\"c\\nd\"".to_string(), 2)));
        assert_eq!(key_at("2"), Some(("\"a.b\".\"\"".to_string(), 3)));
    }
}
