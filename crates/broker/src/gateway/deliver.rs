//! Deliver: the one step every message reaching a client passes, whatever it comes
//! from (a router forward, a retained message, anything later), before its bytes are
//! in the output buffer.
//!
//! It holds the read ACL in force now (refusals counted and audited as `read`), the
//! client's maximum packet size (MQTT-3.1.2-25: a message too large is not sent at all
//! rather than cut), QoS downgrade (a message published at QoS 0 reaches the client at
//! QoS 0, MQTT-3.8.4-8) and the `messages_out` metric. The caller settles what the
//! [`Delivery`] says with the message's source: a router forward is acknowledged to
//! the router in its turn, a retained one is tracked in the feed's own window.

use super::{Close, Gateway};
use crate::codec::{publish_header, qos_and_pkid};
use crate::event::Event;
use crate::origin::Published;
use rumqttd::protocol::{Packet, Publish, PublishProperties, QoS};

/// Where a message comes from: the router's forwards, with what their publisher sent
/// taken out of their properties (`origin.rs`); the gateway's own (retained, stored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Origin {
    Router(Option<Published>),
    Gateway,
}

/// What became of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Delivery {
    /// Written: the client acknowledges it at this QoS and packet id (none at QoS 0).
    Sent { qos: QoS, pkid: u16 },
    /// Not written (read ACL, client's maximum packet size), or written at QoS 0 below
    /// the `qos` it came with: no acknowledgement will come from the client for it.
    Settled { qos: QoS, pkid: u16 },
}

impl Gateway {
    /// Writes `publish` for the client if it may have it, in the form it may have it.
    pub(super) fn deliver(
        &mut self,
        mut publish: Publish,
        mut properties: Option<PublishProperties>,
        origin: Origin,
    ) -> Result<Delivery, Close> {
        let published = match origin {
            Origin::Router(p) => p,
            Origin::Gateway => None,
        };
        let topic = std::str::from_utf8(&publish.topic).unwrap_or("");
        let subs = &self.session.subscriptions;
        if let Some(from) = &published {
            if self.options.is_own(subs, topic, from) {
                // No Local (MQTT-3.8.3-3): never sent, settled with the router.
                let (qos, pkid) = qos_and_pkid(&publish);
                return Ok(Delivery::Settled { qos, pkid });
            }
            // Retain As Published (MQTT-3.3.1-12/13); the router clears the flag.
            publish.retain = self.options.keeps_retain(subs, topic, from);
        }
        self.options.check_identifiers(subs, topic, &mut properties);
        let decision = self
            .shared
            .policy
            .may_read(&mut self.acl, &self.identity, topic);
        if !decision.allowed {
            self.shared.emit(
                &self.info.client(&self.identity),
                Event::AuthzDeny {
                    action: "read",
                    topic,
                    rule_line: decision.line,
                },
            );
            let (qos, pkid) = qos_and_pkid(&publish);
            return Ok(Delivery::Settled { qos, pkid });
        }
        let alias = self.out_aliases.apply(&mut publish, &mut properties);
        let mark = self.out.len();
        self.out.write(Packet::Publish(publish, properties))?;
        let written = self.out.since(mark);
        // QoS and packet id, read back from the bytes just encoded.
        let (qos, pkid) = publish_header(written).unwrap_or((QoS::AtMostOnce, 0));
        if written.len() > self.max_out_packet {
            self.out.truncate(mark);
            self.out_aliases.undo(alias);
            return Ok(Delivery::Settled { qos, pkid });
        }
        alias.keep();
        self.shared.metrics.messages_out.inc();
        match published.map(|p| p.qos) {
            Some(QoS::AtLeastOnce) if qos == QoS::ExactlyOnce => {
                // Published at QoS 1: delivered at QoS 1, not at the subscription's 2
                // (MQTT-3.8.4-8). Same frame with the QoS bits changed; the client's
                // PUBACK settles it with the router like a PUBREC would.
                written[0] = (written[0] & !0b0110) | ((QoS::AtLeastOnce as u8) << 1);
                let qos = QoS::AtLeastOnce;
                return Ok(Delivery::Sent { qos, pkid });
            }
            Some(QoS::AtMostOnce) if qos != QoS::AtMostOnce && self.out.downgrade_to_qos0(mark) => {
                // Published at QoS 0, so delivered at QoS 0, not at the subscription's
                // QoS as the router forwards it; the router's copy is settled here.
                return Ok(Delivery::Settled { qos, pkid });
            }
            _ => {}
        }
        Ok(Delivery::Sent { qos, pkid })
    }
}
