//! A persistent session's router forwards that are written to the client and not yet
//! acknowledged. When the connection ends, the session store takes them (as sent, so a
//! later replay carries DUP): the router also keeps them, but only in memory, and a
//! restart must not lose what the client never confirmed.

use bytes::Bytes;
use moatmq_store::{MessageProperties, QueuedMessage};
use rumqttd::protocol::{PublishProperties, QoS};
use std::collections::HashMap;

/// One forward in flight.
struct InFlight {
    /// Order of writing: the store gets them oldest first.
    seq: u64,
    topic: Bytes,
    payload: Bytes,
    qos: QoS,
    properties: Option<PublishProperties>,
}

/// Forwards in flight to the client, by the router's packet id.
#[derive(Default)]
pub(super) struct Unacked {
    by_pkid: HashMap<u16, InFlight>,
    next: u64,
}

impl Unacked {
    /// A QoS 1/2 forward went out with `pkid`.
    pub(super) fn sent(
        &mut self,
        pkid: u16,
        topic: Bytes,
        payload: Bytes,
        qos: QoS,
        properties: Option<PublishProperties>,
    ) {
        self.next += 1;
        let seq = self.next;
        let m = InFlight {
            seq,
            topic,
            payload,
            qos,
            properties,
        };
        self.by_pkid.insert(pkid, m);
    }

    /// The client's PUBACK or PUBREC for `pkid`: it has the message.
    pub(super) fn acked(&mut self, pkid: u16) {
        self.by_pkid.remove(&pkid);
    }

    /// Everything still unacknowledged, oldest first, as the session store keeps it.
    pub(super) fn take(&mut self) -> Vec<QueuedMessage> {
        let mut all: Vec<InFlight> = self.by_pkid.drain().map(|(_, m)| m).collect();
        all.sort_by_key(|m| m.seq);
        all.into_iter().map(queued).collect()
    }
}

/// A forward as the session store keeps it (its remaining expiry is not known here).
fn queued(m: InFlight) -> QueuedMessage {
    QueuedMessage {
        topic: String::from_utf8_lossy(&m.topic).into_owned(),
        payload: m.payload.to_vec(),
        qos: m.qos as u8,
        retain: false,
        expires_at: None,
        properties: m.properties.map(|p| MessageProperties {
            payload_format_indicator: p.payload_format_indicator,
            content_type: p.content_type,
            response_topic: p.response_topic,
            correlation_data: p.correlation_data.map(|b| b.to_vec()),
            user_properties: p.user_properties,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(u: &mut Unacked, pkid: u16, topic: &'static str) {
        u.sent(
            pkid,
            Bytes::from_static(topic.as_bytes()),
            Bytes::from_static(b"x"),
            QoS::AtLeastOnce,
            None,
        );
    }

    #[test]
    fn what_was_not_acknowledged_is_taken_in_the_order_it_was_sent() {
        let mut u = Unacked::default();
        send(&mut u, 7, "a");
        send(&mut u, 3, "b");
        send(&mut u, 9, "c");
        u.acked(3);
        u.acked(42);
        let topics: Vec<String> = u.take().into_iter().map(|m| m.topic).collect();
        assert_eq!(topics, ["a", "c"]);
        assert!(u.take().is_empty(), "taken once");
    }
}
