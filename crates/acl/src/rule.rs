//! One compiled ACL rule and how it matches a topic name or covers a topic filter.
//!
//! A rule's topic is stored split into levels at parse time. `pattern` levels that use
//! `%u` / `%c` are kept as pieces and compared against the identity's values slice by
//! slice, so matching never builds a string. A pattern whose placeholder cannot be filled
//! safely (anonymous client for `%u`, or a value that is empty, starts with `$` or
//! contains `/`, `+`, `#`, NUL or a control character) does not match at all.

use crate::Access;

/// What a rule grants or denies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Grant {
    Read,
    Write,
    ReadWrite,
    Deny,
}

impl Grant {
    pub(crate) fn grants(self, access: Access) -> bool {
        matches!(
            (self, access),
            (Grant::ReadWrite, _) | (Grant::Read, Access::Read) | (Grant::Write, Access::Write)
        )
    }
}

/// Part of a pattern level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Piece {
    Lit(Box<str>),
    User,
    Client,
}

/// One level of a rule's topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Level {
    Lit(Box<str>),
    Plus,
    Hash,
    /// A pattern level containing `%u` and/or `%c`.
    Tmpl(Box<[Piece]>),
}

/// A compiled `topic` or `pattern` line.
#[derive(Debug, Clone)]
pub(crate) struct Rule {
    pub(crate) grant: Grant,
    /// 1-based line in the file (for built-in rules, an internal ordinal).
    pub(crate) line: usize,
    levels: Box<[Level]>,
    uses_user: bool,
    uses_client: bool,
}

/// The identity values a pattern may substitute, already vetted: `None` means "absent or
/// unsafe", and any rule needing it does not match.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Subst<'a> {
    pub(crate) user: Option<&'a str>,
    pub(crate) client: Option<&'a str>,
}

impl<'a> Subst<'a> {
    pub(crate) fn new(username: Option<&'a str>, client_id: &'a str) -> Self {
        Subst {
            user: username.filter(|u| safe_value(u)),
            client: Some(client_id).filter(|c| safe_value(c)),
        }
    }
}

/// Whether a username or client id may be substituted into a pattern. Besides the
/// CVE-2017-7650 characters, empty values (which would turn `%u/#` into `/#`, shared by
/// every such client) and a leading `$` (which would turn `%u/#` into `$SYS/#`) are refused.
fn safe_value(v: &str) -> bool {
    !v.is_empty()
        && !v.starts_with('$')
        && !v
            .chars()
            .any(|c| matches!(c, '/' | '+' | '#') || c.is_control())
}

impl Rule {
    /// Compiles a validated topic filter. With `pattern`, `%u` and `%c` become placeholders.
    pub(crate) fn new(grant: Grant, line: usize, topic: &str, pattern: bool) -> Rule {
        let mut uses_user = false;
        let mut uses_client = false;
        let levels = topic
            .split('/')
            .map(|l| match l {
                "+" => Level::Plus,
                "#" => Level::Hash,
                _ if pattern && (l.contains("%u") || l.contains("%c")) => {
                    let pieces = split_pieces(l);
                    uses_user |= pieces.contains(&Piece::User);
                    uses_client |= pieces.contains(&Piece::Client);
                    Level::Tmpl(pieces.into())
                }
                _ => Level::Lit(l.into()),
            })
            .collect();
        Rule {
            grant,
            line,
            levels,
            uses_user,
            uses_client,
        }
    }

    fn applies(&self, s: &Subst<'_>) -> bool {
        !(self.uses_user && s.user.is_none() || self.uses_client && s.client.is_none())
    }

    fn leading_wildcard(&self) -> bool {
        matches!(self.levels.first(), Some(Level::Plus | Level::Hash))
    }

    /// Whether the (valid) topic name `topic` falls under this rule. Allocation-free.
    pub(crate) fn matches(&self, topic: &str, s: &Subst<'_>) -> bool {
        if !self.applies(s) || topic.starts_with('$') && self.leading_wildcard() {
            return false;
        }
        let mut t = topic.split('/');
        for level in self.levels.iter() {
            if *level == Level::Hash {
                return true;
            }
            match t.next() {
                Some(name) if level_matches(level, name, s) => {}
                _ => return false,
            }
        }
        t.next().is_none()
    }

    /// Whether every topic the (valid, non-shared) filter can match falls under this rule.
    pub(crate) fn covers(&self, filter: &str, s: &Subst<'_>) -> bool {
        if !self.applies(s) || filter.starts_with('$') && self.leading_wildcard() {
            return false;
        }
        let mut f = filter.split('/');
        for (i, level) in self.levels.iter().enumerate() {
            if *level == Level::Hash {
                // `#` covers whatever remains, including nothing (`a/#` covers `a`).
                return true;
            }
            match f.next() {
                // The rule needs another level the filter's topics may not have.
                None => return false,
                Some("#") => {
                    // A filter `#` matches topics of one level or more; `+/#` matches
                    // exactly those too. Anywhere else `#` also matches the parent
                    // level, which only a rule `#` at the same depth covers.
                    return i == 0 && *self.levels == [Level::Plus, Level::Hash];
                }
                Some("+") => {
                    if *level != Level::Plus {
                        return false;
                    }
                }
                Some(name) => {
                    if !level_matches(level, name, s) {
                        return false;
                    }
                }
            }
        }
        f.next().is_none()
    }
}

/// One topic level against one rule level (`#` is handled by the caller).
fn level_matches(level: &Level, name: &str, s: &Subst<'_>) -> bool {
    match level {
        Level::Plus => true,
        Level::Hash => true,
        Level::Lit(l) => **l == *name,
        Level::Tmpl(pieces) => {
            let mut rest = name;
            for piece in pieces.iter() {
                let want = match piece {
                    Piece::Lit(l) => &**l,
                    Piece::User => s.user.unwrap_or_default(),
                    Piece::Client => s.client.unwrap_or_default(),
                };
                match rest.strip_prefix(want) {
                    Some(r) => rest = r,
                    None => return false,
                }
            }
            rest.is_empty()
        }
    }
}

/// Splits a pattern level such as `dev-%c-%u` into literal and placeholder pieces.
fn split_pieces(level: &str) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut lit = String::new();
    let mut rest = level;
    while !rest.is_empty() {
        let placeholder = if rest.starts_with("%u") {
            Some(Piece::User)
        } else if rest.starts_with("%c") {
            Some(Piece::Client)
        } else {
            None
        };
        match placeholder {
            Some(p) => {
                if !lit.is_empty() {
                    pieces.push(Piece::Lit(std::mem::take(&mut lit).into()));
                }
                pieces.push(p);
                rest = &rest[2..];
            }
            None => {
                let mut chars = rest.chars();
                if let Some(c) = chars.next() {
                    lit.push(c);
                }
                rest = chars.as_str();
            }
        }
    }
    if !lit.is_empty() {
        pieces.push(Piece::Lit(lit.into()));
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> Subst<'static> {
        Subst::new(Some("alice"), "c1")
    }

    #[test]
    fn pieces() {
        assert_eq!(
            split_pieces("dev-%c-%u%%"),
            vec![
                Piece::Lit("dev-".into()),
                Piece::Client,
                Piece::Lit("-".into()),
                Piece::User,
                Piece::Lit("%%".into())
            ]
        );
    }

    #[test]
    fn pattern_matching() {
        let r = Rule::new(Grant::ReadWrite, 1, "%u/#", true);
        assert!(r.matches("alice/x", &alice()));
        assert!(r.matches("alice", &alice()));
        assert!(!r.matches("alicex/x", &alice()));
        assert!(!r.matches("bob/x", &alice()));
        assert!(!r.matches("alice/x", &Subst::new(None, "alice")));
        let r = Rule::new(Grant::Write, 1, "d/x%c-%u/t", true);
        assert!(r.matches("d/xc1-alice/t", &alice()));
        assert!(!r.matches("d/xc1-alic/t", &alice()));
        // Without `pattern`, placeholders are literal text.
        let r = Rule::new(Grant::Write, 1, "%u/#", false);
        assert!(r.matches("%u/x", &alice()));
        assert!(!r.matches("alice/x", &alice()));
    }

    #[test]
    fn unsafe_values_never_substitute() {
        let r = Rule::new(Grant::ReadWrite, 1, "%u/#", true);
        for bad in ["a/b", "+", "#", "a\0", "a\n", "", "$SYS", "a\u{85}"] {
            let s = Subst::new(Some(bad), "c");
            assert!(s.user.is_none(), "{bad:?}");
            assert!(!r.matches("a/b/c", &s));
        }
        let r = Rule::new(Grant::ReadWrite, 1, "c/%c", true);
        assert!(!r.matches("c/x", &Subst::new(Some("u"), "+")));
        assert!(r.matches("c/x", &Subst::new(Some("+"), "x")));
    }

    #[test]
    fn coverage() {
        let s = alice();
        let r = Rule::new(Grant::ReadWrite, 1, "%u/#", true);
        for yes in ["alice/#", "alice/+/temp", "alice", "alice/+", "alice/a/#"] {
            assert!(r.covers(yes, &s), "{yes}");
        }
        for no in ["#", "+/#", "+/sensors/#", "bob/#", "+", "alic/#"] {
            assert!(!r.covers(no, &s), "{no}");
        }
        let r = Rule::new(Grant::Read, 1, "a/+/c", false);
        assert!(r.covers("a/+/c", &s));
        assert!(r.covers("a/b/c", &s));
        assert!(!r.covers("a/#", &s));
        assert!(!r.covers("a/+/#", &s));
        assert!(!r.covers("a/+/c/d", &s));
        let r = Rule::new(Grant::Read, 1, "+/#", false);
        assert!(r.covers("#", &s));
        assert!(!r.covers("$SYS/#", &s));
        let r = Rule::new(Grant::Read, 1, "#", false);
        assert!(r.covers("#", &s));
        assert!(!r.covers("$SYS/x", &s));
        let r = Rule::new(Grant::Read, 1, "$SYS/#", false);
        assert!(r.covers("$SYS/#", &s));
        assert!(!r.covers("+/#", &s));
    }
}
