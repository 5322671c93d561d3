//! What a message carries from its publisher's gateway to its subscribers' gateways
//! through rumqttd's router, which forwards every message at the subscription's QoS
//! with the retain flag cleared and says nothing of who published it. MQTT 5 needs all
//! three at delivery: QoS = min(published, granted) (3.8.4), Retain As Published and
//! No Local (3.8.3.1).
//!
//! The router keeps each message's publish properties and hands them to every forward
//! unchanged, except the topic alias (which it resolves) and subscription identifiers
//! (which it refuses from publishers and adds for subscribers). The payload format
//! indicator is neither: a client may only set it to 0 or 1 (3.3.2.3.2), and the
//! router never reads it. So the publisher's gateway packs the published QoS, the
//! retain flag and the client's own indicator into that one byte ([`mark`]), and every
//! delivering gateway unpacks it before anything else sees the properties ([`take`]).
//! It costs no allocation: the properties live inline in rumqttd's log entry either way.
//!
//! For No Local the subscriber must know the message is its own. Only a connection
//! holding a No Local subscription that matches the topic needs that, so only its
//! publishes pay for it: a user property naming the connection ([`ORIGIN_KEY`]),
//! flagged in the byte so other gateways look for it only then. A client cannot forge
//! it: the publisher's gateway removes any property of that name the client sent.
//!
//! With `[cluster]`, each message also names its place in the cluster's transfer stream
//! ([`Transfer`]: its node's origin and number there), in a user property of its own
//! ([`ID_KEY`], flagged likewise): a session that moved to this node got what was
//! published while it moved from the stream (`cluster/unread.rs`), and its gateway
//! skips the router's copy of each message it got that way (exactly once for QoS 2).

use rumqttd::protocol::{PublishProperties, QoS};
use std::sync::atomic::{AtomicU64, Ordering};

/// Set in a marked payload format indicator; a client's is 0 or 1.
const MARKED: u8 = 0x80;
const CLIENT_VALUE: u8 = 0x01;
const CLIENT_SET: u8 = 0x02;
const QOS_SHIFT: u8 = 2;
const RETAIN: u8 = 0x10;
const TAGGED: u8 = 0x20;
const IDENTIFIED: u8 = 0x40;

/// The user property naming the publishing connection (see the module notes).
pub const ORIGIN_KEY: &str = "$moatmq-origin";

/// The user property naming a message's place in the transfer stream (see the module
/// notes).
pub const ID_KEY: &str = "$moatmq-id";

/// What the publisher sent, as its gateway recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    pub qos: QoS,
    pub retain: bool,
    /// The publishing connection, when it holds a matching No Local subscription.
    pub connection: Option<u64>,
    /// Its place in the cluster's transfer stream, with `[cluster]`.
    pub id: Option<Transfer>,
}

/// A message's identity in the cluster's transfer stream: the origin (`<node>:<epoch>`)
/// of the node that admitted it, hashed (within this process), and its number there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Transfer {
    pub origin: u64,
    pub number: u64,
}

impl Transfer {
    pub fn new(origin: &str, number: u64) -> Transfer {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        origin.hash(&mut h);
        Transfer {
            origin: h.finish(),
            number,
        }
    }

    fn parse(value: &str) -> Option<Transfer> {
        let (origin, number) = value.split_once(':')?;
        Some(Transfer {
            origin: u64::from_str_radix(origin, 16).ok()?,
            number: number.parse().ok()?,
        })
    }
}

/// A number for each connection of this process, for No Local.
pub fn next_connection() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Records `published` in `props` on the publisher's side, before the router.
pub fn mark(props: &mut Option<PublishProperties>, published: &Published) {
    let p = props.get_or_insert_with(PublishProperties::default);
    // A client's own property of our name never travels (it could silence others).
    if !p.user_properties.is_empty() {
        p.user_properties
            .retain(|(k, _)| k != ORIGIN_KEY && k != ID_KEY);
    }
    let mut byte = MARKED | ((published.qos as u8) << QOS_SHIFT);
    if let Some(v) = p.payload_format_indicator {
        byte |= CLIENT_SET | (v & CLIENT_VALUE);
    }
    if published.retain {
        byte |= RETAIN;
    }
    if let Some(c) = published.connection {
        byte |= TAGGED;
        p.user_properties
            .push((ORIGIN_KEY.to_owned(), c.to_string()));
    }
    if let Some(id) = published.id {
        byte |= IDENTIFIED;
        p.user_properties
            .push((ID_KEY.to_owned(), format!("{:x}:{}", id.origin, id.number)));
    }
    p.payload_format_indicator = Some(byte);
}

/// Takes the record out of a forward's `props`, leaving them as the client sent them
/// (`None` again if it sent none). `None` for a message no gateway marked (one the
/// broker published itself, or stored before this existed).
pub fn take(props: &mut Option<PublishProperties>) -> Option<Published> {
    let p = props.as_mut()?;
    let byte = p.payload_format_indicator.filter(|b| b & MARKED != 0)?;
    p.payload_format_indicator = (byte & CLIENT_SET != 0).then_some(byte & CLIENT_VALUE);
    let qos = match (byte >> QOS_SHIFT) & 0b11 {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    };
    let mut connection = None;
    if byte & TAGGED != 0 {
        if let Some(i) = p.user_properties.iter().position(|(k, _)| k == ORIGIN_KEY) {
            connection = p.user_properties.remove(i).1.parse().ok();
        }
    }
    let mut id = None;
    if byte & IDENTIFIED != 0 {
        if let Some(i) = p.user_properties.iter().position(|(k, _)| k == ID_KEY) {
            id = Transfer::parse(&p.user_properties.remove(i).1);
        }
    }
    if *p == PublishProperties::default() {
        *props = None;
    }
    Some(Published {
        qos,
        retain: byte & RETAIN != 0,
        connection,
        id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marked_message_gives_back_what_was_published_and_the_clients_properties() {
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
            for retain in [false, true] {
                for (connection, id) in [
                    (None, None),
                    (Some(7u64), None),
                    (None, Some(Transfer::new("n:1", 9))),
                    (Some(7), Some(Transfer::new("n:2", u64::MAX))),
                ] {
                    for client_pfi in [None, Some(0u8), Some(1)] {
                        let published = Published {
                            qos,
                            retain,
                            connection,
                            id,
                        };
                        let sent = client_pfi.map(|v| PublishProperties {
                            payload_format_indicator: Some(v),
                            user_properties: vec![("a".into(), "1".into())],
                            ..Default::default()
                        });
                        let mut props = sent.clone();
                        mark(&mut props, &published);
                        assert_eq!(take(&mut props), Some(published));
                        assert_eq!(props, sent);
                    }
                }
            }
        }
    }

    #[test]
    fn a_clients_origin_property_is_dropped_and_unmarked_messages_are_left_alone() {
        let forged = PublishProperties {
            user_properties: vec![
                (ORIGIN_KEY.into(), "3".into()),
                (ID_KEY.into(), "1:2".into()),
                ("k".into(), "v".into()),
            ],
            ..Default::default()
        };
        let mut props = Some(forged.clone());
        let published = Published {
            qos: QoS::AtLeastOnce,
            retain: false,
            connection: None,
            id: None,
        };
        mark(&mut props, &published);
        let taken = take(&mut props).unwrap();
        assert_eq!((taken.connection, taken.id), (None, None));
        assert_eq!(
            props.unwrap().user_properties,
            vec![("k".into(), "v".into())]
        );

        let mut own = Some(PublishProperties {
            payload_format_indicator: Some(1),
            ..Default::default()
        });
        assert_eq!(take(&mut own), None);
        assert_eq!(own.unwrap().payload_format_indicator, Some(1));
        assert_eq!(take(&mut None), None);
    }
}
