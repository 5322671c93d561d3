//! Topic name and filter checks applied at the gateway (rumqttd validates neither):
//! the ACL crate's syntax rules plus the configured level limit.

/// The start of every topic of the broker's own `$SYS` tree (`sys.rs`).
pub const SYS_PREFIX: &str = "$SYS/";

/// Whether `topic` (or filter) is in the broker's own `$SYS` tree.
pub fn is_sys(topic: &str) -> bool {
    topic.starts_with(SYS_PREFIX)
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
