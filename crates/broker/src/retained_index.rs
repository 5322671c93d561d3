//! The retained messages moatmq serves itself: the broker's view of the store crate's
//! [`RetainedSet`], the one copy of every retained message.
//!
//! rumqttd 0.20 keeps retained messages too, but sends at most its free in-flight slots
//! (or 200) of them on a SUBSCRIBE, scans all of them on the router thread for every
//! SUBSCRIBE, and deletes one on any empty-payload PUBLISH. So the gateway strips the
//! retain flag before the router and keeps them in the set instead: ordered by topic,
//! shared by all connections, which each gateway walks at its own pace after a SUBACK.
//! When `[retained]` is configured the encrypted store (`retained.rs`) persists the set's
//! changes; without it the same set lives in memory only.
//!
//! Quotas are the set's (`[retained]` bounds as [`moatmq_store::StoreLimits`], counted in
//! `moatmq_store::stored_bytes`); the broker adds whose quota a message counts against:
//! its publisher's identity, or for records stored before owners were kept, the first
//! level of their topic.

use bytes::Bytes;
use moatmq_store::{MessageProperties, RetainedMessage, RetainedSet, StoreLimits};
use rumqttd::protocol::{PublishProperties, QoS};

pub use moatmq_store::{Refusal, UNKNOWN_OWNER};

/// A view of the retained set with the broker's owner rule for old records.
#[derive(Debug, Clone)]
pub struct RetainedIndex(RetainedSet);

impl RetainedIndex {
    /// An empty set bounded by `limits`.
    pub fn new(limits: StoreLimits) -> RetainedIndex {
        // The broker's `$SYS` tree is served from the set but never persisted (`sys.rs`).
        RetainedIndex(
            RetainedSet::with_legacy_owner(limits, legacy_owner)
                .with_memory_only(crate::topic::is_sys),
        )
    }
}

impl std::ops::Deref for RetainedIndex {
    type Target = RetainedSet;

    fn deref(&self) -> &RetainedSet {
        &self.0
    }
}

/// The quota key of anonymous clients, all of them together. No username or certificate
/// CN can contain `/`, so it is no one's name.
pub const ANONYMOUS_OWNER: &str = "/anonymous";

/// Whose quota a publish counts against: its username or certificate CN.
pub fn owner_of(username: Option<&str>) -> &str {
    username.unwrap_or(ANONYMOUS_OWNER)
}

/// The owner of a record stored before owners were kept: its topic's first level (the
/// tenant under the default `%u/#` isolation) if that could be a username, else
/// [`UNKNOWN_OWNER`].
pub fn legacy_owner(topic: &str) -> &str {
    let first = topic.split('/').next().unwrap_or_default();
    if moatmq_auth::valid_identity(first) {
        first
    } else {
        UNKNOWN_OWNER
    }
}

/// The QoS a retained message was published with.
pub fn qos_of(msg: &RetainedMessage) -> QoS {
    qos_from(msg.qos)
}

/// A stored QoS number as the router's QoS (anything unknown as QoS 0).
pub fn qos_from(qos: u8) -> QoS {
    match qos {
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        _ => QoS::AtMostOnce,
    }
}

/// MQTT 5 properties to send `msg` with now: the stored ones, and the expiry interval as
/// what remains of it (MQTT-3.3.2-6).
pub fn properties_at(msg: &RetainedMessage, now: u64) -> Option<PublishProperties> {
    stored_properties(msg.properties.as_ref(), msg.expires_at, now)
}

/// The properties a stored message (retained, or queued for a session) is sent with at
/// `now`: its own, and the message expiry interval still left.
pub fn stored_properties(
    properties: Option<&MessageProperties>,
    expires_at: Option<u64>,
    now: u64,
) -> Option<PublishProperties> {
    let mut props = properties.map(to_router_properties);
    if let Some(at) = expires_at {
        let p = props.get_or_insert_with(PublishProperties::default);
        p.message_expiry_interval = Some(u32::try_from(at.saturating_sub(now)).unwrap_or(u32::MAX));
    }
    props
}

fn to_router_properties(p: &MessageProperties) -> PublishProperties {
    PublishProperties {
        payload_format_indicator: p.payload_format_indicator,
        // Kept as the message's `expires_at`; the remaining interval is set when sent.
        message_expiry_interval: None,
        topic_alias: None,
        response_topic: p.response_topic.clone(),
        correlation_data: p.correlation_data.clone().map(Bytes::from),
        user_properties: p.user_properties.clone(),
        subscription_identifiers: Vec::new(),
        content_type: p.content_type.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retained::message;

    #[test]
    fn legacy_owner_is_the_first_level_when_it_can_be_a_username() {
        assert_eq!(legacy_owner("alice/x"), "alice");
        assert_eq!(legacy_owner("alice"), "alice");
        assert_eq!(legacy_owner("/x"), UNKNOWN_OWNER);
        assert_eq!(legacy_owner("+/x"), UNKNOWN_OWNER);
        assert_eq!(owner_of(None), ANONYMOUS_OWNER);
        assert!(!moatmq_auth::valid_identity(ANONYMOUS_OWNER));
    }

    #[test]
    fn the_index_counts_old_records_against_their_first_level() {
        let index = RetainedIndex::new(StoreLimits::UNLIMITED);
        let mut m = message(
            "bob/x",
            &Bytes::from_static(b"v"),
            QoS::AtMostOnce,
            None,
            false,
            None,
            "bob",
        );
        m.owner = None;
        index.set(m).unwrap();
        assert_eq!(index.usage("bob").messages, 1);
    }

    #[test]
    fn v5_properties_round_trip_and_expiry_counts_down() {
        let props = PublishProperties {
            content_type: Some("text/plain".into()),
            user_properties: vec![("k".into(), "v".into())],
            message_expiry_interval: Some(60),
            topic_alias: Some(3),
            ..Default::default()
        };
        let m = message(
            "t",
            &Bytes::from_static(b"v"),
            QoS::ExactlyOnce,
            Some(&props),
            true,
            Some(1060),
            "a",
        );
        assert_eq!(qos_of(&m), QoS::ExactlyOnce);
        let sent = properties_at(&m, 1000).unwrap();
        assert_eq!(sent.message_expiry_interval, Some(60));
        assert_eq!(sent.topic_alias, None);
        assert_eq!(sent.content_type.as_deref(), Some("text/plain"));
        assert_eq!(sent.user_properties, props.user_properties);
        let v4 = message(
            "t",
            &Bytes::from_static(b"v"),
            QoS::AtMostOnce,
            None,
            false,
            None,
            "a",
        );
        assert!(properties_at(&v4, 1000).is_none());
    }
}
