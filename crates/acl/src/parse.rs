//! The Mosquitto `acl_file` syntax.
//!
//! ```text
//! # anonymous clients (lines before the first `user`)
//! topic read public/#
//! user alice
//! topic readwrite alice/#
//! topic deny alice/secrets/#
//! pattern readwrite %u/#
//! ```
//! One directive per line, keywords case-sensitive, fields separated by spaces or tabs.
//! Blank lines and lines whose first non-blank character is `#` are ignored (a `#` after
//! a keyword is a topic, never a comment). `topic` and `pattern` take an optional access
//! word (`read`, `write`, `readwrite`, `deny`; default `readwrite`) and then the rest of
//! the line as the topic, so topics may contain spaces. A first word of letters followed
//! by more text is taken as a misspelt access word and refused, so a topic with spaces
//! needs an explicit access word. `topic` lines belong to the
//! anonymous section until the first `user NAME` line, then to that user (repeated
//! sections for one user are merged). `pattern` lines apply to every client wherever they
//! appear. Anything else is an error naming the line: the file is rejected, never
//! partially applied.

use std::collections::HashMap;
use std::path::Path;

use crate::rule::{Grant, Rule};
use crate::topic::{MAX_TOPIC_LEN, SHARE_PREFIX};
use crate::AclError;

/// The rules of one file, grouped by whom they apply to.
#[derive(Debug, Default)]
pub(crate) struct Rules {
    pub(crate) anonymous: Vec<Rule>,
    pub(crate) users: HashMap<Box<str>, Vec<Rule>>,
    pub(crate) patterns: Vec<Rule>,
}

fn is_blank(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r')
}

/// The first word of `s` and the rest with leading blanks removed.
fn next_word(s: &str) -> (&str, &str) {
    match s.find(is_blank) {
        Some(i) => (&s[..i], s[i..].trim_start_matches(is_blank)),
        None => (s, ""),
    }
}

pub(crate) fn parse(file: &Path, text: &str) -> Result<Rules, AclError> {
    let mut rules = Rules::default();
    let mut user: Option<Box<str>> = None;
    for (index, raw) in text.split('\n').enumerate() {
        let line = index + 1;
        let err = |reason: &str| AclError::Parse {
            file: file.to_path_buf(),
            line,
            reason: reason.to_owned(),
        };
        let content = raw.trim_matches(is_blank);
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        let (keyword, rest) = next_word(content);
        match keyword {
            "user" => {
                if rest.is_empty() {
                    return Err(err("`user` needs a user name"));
                }
                rules.users.entry(rest.into()).or_default();
                user = Some(rest.into());
            }
            "topic" | "pattern" => {
                let (word, after) = next_word(rest);
                let (grant, topic) = match word {
                    "read" => (Grant::Read, after),
                    "write" => (Grant::Write, after),
                    "readwrite" => (Grant::ReadWrite, after),
                    "deny" => (Grant::Deny, after),
                    // `topic readwrit foo/#` would otherwise grant read and write on the
                    // topic "readwrit foo/#": a word of letters followed by more text is
                    // a misspelt access word, and a topic with spaces needs one.
                    _ if !after.is_empty() && word.chars().all(|c| c.is_ascii_alphabetic()) => {
                        return Err(err(
                            "unknown access word: expected `read`, `write`, `readwrite` or `deny` (a topic containing spaces needs one, e.g. `topic readwrite my room/#`)",
                        ));
                    }
                    _ => (Grant::ReadWrite, rest),
                };
                if let Some(reason) = invalid_rule_topic(topic) {
                    return Err(err(reason));
                }
                let pattern = keyword == "pattern";
                let rule = Rule::new(grant, line, topic, pattern);
                if pattern {
                    rules.patterns.push(rule);
                } else if let Some(u) = &user {
                    rules.users.entry(u.clone()).or_default().push(rule);
                } else {
                    rules.anonymous.push(rule);
                }
            }
            _ => {
                return Err(err(
                    "unknown keyword: expected `topic`, `pattern` or `user`",
                ))
            }
        }
    }
    Ok(rules)
}

/// Why `topic` cannot be a rule's topic, if it cannot.
fn invalid_rule_topic(topic: &str) -> Option<&'static str> {
    if topic.is_empty() {
        return Some("missing topic");
    }
    if topic.len() > MAX_TOPIC_LEN {
        return Some("topic longer than 65535 bytes");
    }
    if topic.contains('\0') {
        return Some("topic contains a NUL character");
    }
    if topic.starts_with(SHARE_PREFIX) {
        return Some("rules cannot name `$share/` subscriptions: shared subscriptions are checked on their inner filter");
    }
    let mut levels = topic.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && !(level == "#" && levels.peek().is_none()) {
            return Some("`#` must be the whole last level of a topic");
        }
        if level.contains('+') && level != "+" {
            return Some("`+` must be a whole topic level");
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_err(text: &str) -> (usize, String) {
        match parse(Path::new("acl.conf"), text) {
            Err(AclError::Parse { file, line, reason }) => {
                assert_eq!(file, Path::new("acl.conf"));
                (line, reason)
            }
            other => panic!("expected a parse error, got {other:?}"),
        }
    }

    #[test]
    fn sections_and_access_words() {
        let text = "# comment\n\n  topic read public/#\ntopic sensors/+ \r\nuser alice\n\ttopic deny alice/secrets/#\n\
                    pattern write devices/%c/telemetry\nuser bob\ntopic write my room/#\nuser alice\ntopic alice/#\n";
        let rules = parse(Path::new("f"), text).unwrap();
        let anon: Vec<_> = rules.anonymous.iter().map(|r| (r.grant, r.line)).collect();
        assert_eq!(anon, vec![(Grant::Read, 3), (Grant::ReadWrite, 4)]);
        let alice: Vec<_> = rules.users["alice"]
            .iter()
            .map(|r| (r.grant, r.line))
            .collect();
        assert_eq!(alice, vec![(Grant::Deny, 6), (Grant::ReadWrite, 11)]);
        assert_eq!(rules.users["bob"][0].grant, Grant::Write);
        assert_eq!(rules.patterns.len(), 1);
        assert_eq!(rules.patterns[0].line, 7);
    }

    #[test]
    fn errors_name_the_line() {
        assert_eq!(
            parse_err("topic a\nfoo bar\n"),
            (
                2,
                "unknown keyword: expected `topic`, `pattern` or `user`".into()
            )
        );
        assert_eq!(
            parse_err("\n\nuser\n"),
            (3, "`user` needs a user name".into())
        );
        assert_eq!(parse_err("topic read\n"), (1, "missing topic".into()));
        assert_eq!(parse_err("topic\n"), (1, "missing topic".into()));
        assert_eq!(
            parse_err("topic a/#/b"),
            (1, "`#` must be the whole last level of a topic".into())
        );
        assert_eq!(
            parse_err("# ok\npattern read %u+/x"),
            (2, "`+` must be a whole topic level".into())
        );
        assert_eq!(parse_err("topic a\0b").0, 1);
        assert_eq!(parse_err("topic $share/g/a").0, 1);
        assert_eq!(parse_err("Topic a").0, 1);
        for typo in [
            "topic readwrit foo/#",
            "pattern Read %u/#",
            "topic my room/#",
        ] {
            let (line, reason) = parse_err(&format!("topic ok\n{typo}\n"));
            assert_eq!(line, 2, "{typo}");
            assert!(
                reason.starts_with("unknown access word"),
                "{typo}: {reason}"
            );
        }
        // Spaces after an access word, or in a topic that does not start with a plain
        // word, remain topics.
        let rules = parse(
            Path::new("f"),
            "topic write my room/#\ntopic a/b c\ntopic foo\n",
        )
        .unwrap();
        assert_eq!(rules.anonymous.len(), 3);
    }

    #[test]
    fn error_display_names_file_and_line_without_text() {
        let e = parse(
            Path::new("/etc/moatmq/acl"),
            "topic a\ntopic read x#secret\n",
        )
        .unwrap_err();
        let msg = e.to_string();
        assert_eq!(
            msg,
            "/etc/moatmq/acl:2: `#` must be the whole last level of a topic"
        );
        assert!(!msg.contains("secret"));
    }

    #[test]
    fn hash_after_keyword_is_a_topic() {
        let rules = parse(Path::new("f"), "topic #\ntopic read #\n").unwrap();
        assert_eq!(rules.anonymous.len(), 2);
    }
}
