//! Topic name and filter checks applied at the gateway (rumqttd validates neither):
//! the ACL crate's syntax rules plus the configured level limit.

/// The start of every topic of the broker's own `$SYS` tree (`sys.rs`).
pub const SYS_PREFIX: &str = "$SYS/";

/// Whether `topic` (or filter) is in the broker's own `$SYS` tree.
pub fn is_sys(topic: &str) -> bool {
    topic.starts_with(SYS_PREFIX)
}

/// Where a publish held back until its MQTT 5 message expiry interval ran out goes
/// (`gateway/link.rs`): the router answers it in its turn, and no client gets it.
pub const EXPIRED: &str = "\0expired";

/// Whether `topic` is one of moatmq's own router topics, which start with NUL: no
/// client's topic or filter holds one (`valid_topic_name`), so no client may get a
/// message on one (a shared group's copies across nodes, `cluster/groups.rs`, go only
/// to that group's members; [`EXPIRED`] to no one).
pub fn is_internal(topic: &[u8]) -> bool {
    topic.first() == Some(&0)
}

/// A PUBLISH topic: valid MQTT topic name with at most `max_levels` levels.
pub fn valid_topic_name(topic: &str, max_levels: usize) -> bool {
    moatmq_acl::valid_topic_name(topic) && topic.split('/').count() <= max_levels
}

/// A SUBSCRIBE filter: valid MQTT filter (shared or not) with at most `max_levels` levels.
pub fn valid_topic_filter(filter: &str, max_levels: usize) -> bool {
    moatmq_acl::valid_topic_filter(filter)
        && moatmq_acl::strip_share(filter).is_some_and(|f| f.split('/').count() <= max_levels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_limit_applies_to_names_and_inner_filters() {
        assert!(valid_topic_name("a/b", 2));
        assert!(!valid_topic_name("a/b/c", 2));
        assert!(!valid_topic_name("a/#", 32));
        assert!(valid_topic_filter("$share/g/a/b", 2));
        assert!(!valid_topic_filter("$share/g/a/b/c", 2));
        assert!(!valid_topic_filter("a/#/b", 32));
    }
}
