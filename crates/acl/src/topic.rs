//! MQTT topic names and topic filters: validation and matching.
//!
//! A topic name is what a PUBLISH carries; a topic filter is what a SUBSCRIBE (or an ACL
//! rule) carries and may contain the wildcards `+` (exactly one whole level) and `#`
//! (the last whole level, matching that level's parent and everything below it).
//! Following MQTT 3.1.1 §4.7.2, a filter whose first level is `+` or `#` never matches
//! a topic starting with `$` (`$SYS/...`, `$share/...`): those must be named explicitly.

/// Longest topic name or filter MQTT can carry (a two-byte length prefix).
pub const MAX_TOPIC_LEN: usize = 65_535;

/// Prefix of an MQTT 5 shared subscription: `$share/<group>/<filter>`.
pub const SHARE_PREFIX: &str = "$share/";

/// Whether `topic` is a valid topic name for PUBLISH (and for a will message):
/// non-empty, at most 65,535 bytes, no `+`, `#` or NUL.
pub fn valid_topic_name(topic: &str) -> bool {
    !topic.is_empty()
        && topic.len() <= MAX_TOPIC_LEN
        && !topic.bytes().any(|b| matches!(b, b'+' | b'#' | 0))
}

/// Whether `filter` is a valid SUBSCRIBE topic filter: non-empty, at most 65,535 bytes,
/// no NUL, `+` only as a whole level, `#` only as the whole last level.
///
/// A shared subscription `$share/<group>/<filter>` is valid when the group is non-empty
/// and free of wildcards and the inner filter is itself a valid, non-shared filter.
pub fn valid_topic_filter(filter: &str) -> bool {
    if filter.len() > MAX_TOPIC_LEN {
        return false;
    }
    match split_share(filter) {
        Some(Some((group, inner))) => {
            valid_share_group(group)
                && !inner.starts_with(SHARE_PREFIX)
                && valid_plain_filter(inner)
        }
        Some(None) => false,
        None => valid_plain_filter(filter),
    }
}

/// The inner filter of a shared subscription, or the filter itself when it is not
/// shared. `None` when `filter` starts with `$share/` but has no `/<filter>` part.
pub fn strip_share(filter: &str) -> Option<&str> {
    match split_share(filter) {
        Some(Some((_, inner))) => Some(inner),
        Some(None) => None,
        None => Some(filter),
    }
}

/// MQTT matching of a topic name against a topic filter.
///
/// Returns false when either is invalid. A shared subscription filter is matched by its
/// inner filter. A leading `#` or `+` never matches a topic starting with `$`.
pub fn topic_matches_filter(filter: &str, topic: &str) -> bool {
    if !valid_topic_filter(filter) || !valid_topic_name(topic) {
        return false;
    }
    let Some(filter) = strip_share(filter) else {
        return false;
    };
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut levels = topic.split('/');
    for f in filter.split('/') {
        if f == "#" {
            return true;
        }
        match levels.next() {
            Some(t) if f == "+" || f == t => {}
            _ => return false,
        }
    }
    levels.next().is_none()
}

/// `None`: not a shared subscription. `Some(None)`: starts with `$share/` but lacks the
/// `/<filter>` part. `Some(Some((group, inner)))` otherwise.
fn split_share(filter: &str) -> Option<Option<(&str, &str)>> {
    let rest = filter.strip_prefix(SHARE_PREFIX)?;
    Some(rest.split_once('/'))
}

fn valid_share_group(group: &str) -> bool {
    !group.is_empty() && !group.bytes().any(|b| matches!(b, b'+' | b'#' | 0))
}

/// Validity of a filter that is not a shared subscription.
pub(crate) fn valid_plain_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.len() > MAX_TOPIC_LEN || filter.contains('\0') {
        return false;
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let last = levels.peek().is_none();
        if level.contains('#') && !(level == "#" && last) {
            return false;
        }
        if level.contains('+') && level != "+" {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names() {
        assert!(valid_topic_name("a"));
        assert!(valid_topic_name("/"));
        assert!(valid_topic_name("a b/c"));
        assert!(valid_topic_name("$SYS/broker"));
        assert!(!valid_topic_name(""));
        assert!(!valid_topic_name("a/+"));
        assert!(!valid_topic_name("a/#"));
        assert!(!valid_topic_name("a\0b"));
        assert!(valid_topic_name(&"x".repeat(MAX_TOPIC_LEN)));
        assert!(!valid_topic_name(&"x".repeat(MAX_TOPIC_LEN + 1)));
    }

    #[test]
    fn topic_filters() {
        for ok in [
            "#",
            "+",
            "a/#",
            "+/+",
            "/",
            "a//b",
            "+/#",
            "$SYS/#",
            "$share/g/a/#",
            "$share/g/#",
            "$share",
        ] {
            assert!(valid_topic_filter(ok), "{ok}");
        }
        for bad in [
            "",
            "a#",
            "a/#/b",
            "#/a",
            "a+",
            "a/+b",
            "a\0",
            "$share/g",
            "$share//a",
            "$share/g+/a",
            "$share/g#/a",
            "$share/g/",
            "$share/g/a#",
            "$share/g/$share/h/a",
        ] {
            assert!(!valid_topic_filter(bad), "{bad:?}");
        }
        assert!(!valid_topic_filter(&"x".repeat(MAX_TOPIC_LEN + 1)));
    }

    #[test]
    fn share_stripping() {
        assert_eq!(strip_share("$share/g/a/+"), Some("a/+"));
        assert_eq!(strip_share("a/+"), Some("a/+"));
        assert_eq!(strip_share("$share/g"), None);
    }

    #[test]
    fn matching() {
        assert!(topic_matches_filter("#", "a/b/c"));
        assert!(topic_matches_filter("a/#", "a"));
        assert!(topic_matches_filter("a/#", "a/b"));
        assert!(topic_matches_filter("a/+", "a/"));
        assert!(topic_matches_filter("+/+", "/x"));
        assert!(topic_matches_filter("a/b", "a/b"));
        assert!(topic_matches_filter("$SYS/#", "$SYS/uptime"));
        assert!(topic_matches_filter("$share/g/a/+", "a/b"));
        assert!(!topic_matches_filter("a/+", "a"));
        assert!(!topic_matches_filter("a/+", "a/b/c"));
        assert!(!topic_matches_filter("a/b", "a/b/c"));
        assert!(!topic_matches_filter("#", "$SYS/uptime"));
        assert!(!topic_matches_filter("+/uptime", "$SYS/uptime"));
        assert!(!topic_matches_filter("a/#", "a/+"));
        assert!(!topic_matches_filter("a/#/b", "a/x/b"));
    }
}
