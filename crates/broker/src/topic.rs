//! Topic name and filter checks applied at the gateway (rumqttd validates neither).

/// A PUBLISH topic: non-empty, no wildcards, no NUL, at most `max_levels` levels.
pub fn valid_topic_name(topic: &str, max_levels: usize) -> bool {
    !topic.is_empty()
        && topic.len() <= usize::from(u16::MAX)
        && !topic.contains(['+', '#', '\0'])
        && topic.split('/').count() <= max_levels
}

/// A SUBSCRIBE filter: `+` only as a whole level, `#` only as the whole last level,
/// no NUL, at most `max_levels` levels; `$share/<group>/<filter>` with a plain group.
pub fn valid_topic_filter(filter: &str, max_levels: usize) -> bool {
    let inner = match filter.strip_prefix("$share/") {
        Some(rest) => match rest.split_once('/') {
            Some((group, f)) if !group.is_empty() && !group.contains(['+', '#']) => f,
            _ => return false,
        },
        None => filter,
    };
    if inner.is_empty() || inner.contains('\0') || filter.len() > usize::from(u16::MAX) {
        return false;
    }
    let levels: Vec<&str> = inner.split('/').collect();
    if levels.len() > max_levels {
        return false;
    }
    levels.iter().enumerate().all(|(i, level)| match *level {
        "#" => i == levels.len() - 1,
        "+" => true,
        l => !l.contains(['+', '#']),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_filters() {
        assert!(valid_topic_name("a/b", 32));
        assert!(!valid_topic_name("a/#", 32));
        assert!(!valid_topic_name("a/+/b", 32));
        assert!(!valid_topic_name("", 32));
        assert!(!valid_topic_name("a/b/c", 2));
        assert!(valid_topic_filter("a/+/#", 32));
        assert!(valid_topic_filter("#", 32));
        assert!(!valid_topic_filter("a/#/b", 32));
        assert!(!valid_topic_filter("a+/b", 32));
        assert!(valid_topic_filter("$share/g/a/#", 32));
        assert!(!valid_topic_filter("$share/g", 32));
        assert!(!valid_topic_filter("$share//a", 32));
    }
}
