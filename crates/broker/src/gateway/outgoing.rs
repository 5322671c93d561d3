//! Router to client: every notification the router sends passes [`Gateway::outgoing`].
//! Forwarded messages go through the deliver step (`deliver.rs`); what the client will
//! not acknowledge is acknowledged to the router in its turn (`link.rs`).

use super::deliver::{Delivery, Origin};
use super::unacked::as_queued;
use super::{Close, Gateway};
use rumqttd::protocol::{
    Packet, PubAckReason, PubRec, PubRecReason, Publish, PublishProperties, QoS,
    SubscribeReasonCode,
};
use rumqttd::Notification;
use tracing::warn;

impl Gateway {
    /// Sends the forwards that waited for the client's window, as far as it has room,
    /// the session store's writer is not behind and no stored message goes first (a
    /// resumed session's replay, or one in flight under an id the router also uses:
    /// [`super::retained::RetainedFeed::router_waits`]).
    pub(super) fn release_held(&mut self) -> Result<(), Close> {
        while !self.writer_behind() && !self.retained.router_waits() {
            let Some(f) = self.window.next_held(self.retained.in_flight()) else {
                break;
            };
            self.forward(f)?;
        }
        Ok(())
    }

    /// Whether this connection's deliveries wait for the session store's writer: it is
    /// behind, and each delivery to a persistent session records changes for it
    /// ([`crate::durable::SessionBook::writer_behind`]). They wait as for the client's
    /// window: the router stops at its in-flight limit for the link meanwhile.
    pub(super) fn writer_behind(&self) -> bool {
        self.session.key.is_some()
            && self
                .shared
                .durable
                .as_ref()
                .is_some_and(|book| book.writer_behind())
    }

    /// A copy for a shared group across nodes (`cluster/groups.rs`) gets its real
    /// topic back, and the client's own subscription identifier for the group in place
    /// of the group's mark, if it reached this connection through its membership of
    /// that group; `false` if not (a `#` subscription matches every copy): it is never
    /// written. Nor is a message on another of moatmq's own topics (a publish that
    /// expired while held back, `link.rs`).
    pub(super) fn group_copy(
        &self,
        publish: &mut Publish,
        props: &mut Option<PublishProperties>,
    ) -> bool {
        use crate::cluster::groups::{is_copy, MARK};
        if !is_copy(&publish.topic) {
            return !crate::topic::is_internal(&publish.topic);
        }
        let Some(p) = props.as_mut() else {
            return false;
        };
        let ids = p.subscription_identifiers.len();
        p.subscription_identifiers.retain(|&id| id != MARK);
        if p.subscription_identifiers.len() == ids {
            // Not through the group's subscription.
            return false;
        }
        let Some((filter, real)) = self.groups.as_ref().and_then(|m| m.copy_of(&publish.topic))
        else {
            return false;
        };
        if let Some(id) = self
            .session
            .subscriptions
            .get(filter)
            .and_then(|o| o.subscription_id)
        {
            p.subscription_identifiers.push(id as usize);
        }
        if *p == PublishProperties::default() {
            *props = None;
        }
        let len = real.len();
        publish.topic = publish.topic.slice(publish.topic.len() - len..);
        true
    }

    /// A router forward through the deliver step, settled with the router.
    fn forward(&mut self, mut forward: rumqttd::Forward) -> Result<(), Close> {
        // What the publisher sent, out of the properties before anything copies them.
        let published = crate::origin::take(&mut forward.properties);
        if self.read_as_moved(published.as_ref())
            || !self.group_copy(&mut forward.publish, &mut forward.properties)
        {
            let (qos, pkid) = crate::codec::qos_and_pkid(&forward.publish);
            self.settle_copy(pkid);
            self.to_router.withhold(qos, pkid);
            return Ok(());
        }
        // A durable session stores what it was sent until the client acknowledges it.
        let copy = self.session.key.is_some().then(|| {
            let p = &forward.publish;
            (
                p.topic.clone(),
                p.payload.clone(),
                forward.properties.clone(),
            )
        });
        match self.deliver(
            forward.publish,
            forward.properties,
            Origin::Router(published),
        )? {
            Delivery::Sent { qos, pkid } if qos != QoS::AtMostOnce => {
                self.window.sent(pkid);
                if let (Some((topic, payload, props)), Some(book), Some(key)) =
                    (copy, &self.shared.durable, &self.session.key)
                {
                    book.sent(key, pkid, as_queued(&topic, &payload, qos, props.as_ref()));
                    if qos == QoS::ExactlyOnce {
                        self.save_before_writing();
                    }
                }
                self.to_router.delivered(pkid)
            }
            // Forwarded at QoS 0: a group's copy was settled as it arrived.
            Delivery::Sent { .. } => {}
            // The router's copy is acknowledged here, in its turn.
            Delivery::Settled { qos, pkid } => {
                self.settle_copy(pkid);
                self.to_router.withhold(qos, pkid)
            }
        }
        Ok(())
    }

    /// The router forward `pkid` needs nothing more from the client: a shared group's
    /// copy of it is settled (`cluster/groups.rs`).
    pub(super) fn settle_copy(&mut self, pkid: u16) {
        if let Some(m) = self.groups.as_mut() {
            m.settle(pkid);
        }
    }

    /// Router to client: the one place every notification passes.
    pub(super) fn outgoing(&mut self, notification: Notification) -> Result<(), Close> {
        match notification {
            Notification::Forward(mut forward) => {
                if let Some(c) = self.checkpoints.as_mut() {
                    c.forwarded();
                }
                if let Some(m) = self.groups.as_mut() {
                    // A shared group's copy with a ticket: the group's puller learns
                    // where it is, and what becomes of it (`cluster/groups.rs`).
                    m.arrived(&forward.publish, &mut forward.properties);
                }
                // With the client's Receive Maximum reached, forwards wait (`window.rs`),
                // in order (QoS 0 ones too: reading their QoS costs a copy here); so
                // they do while the client's exchange under their packet id is at its
                // PUBREL, and while the session store's writer is behind.
                if self.window.is_holding()
                    || !self.window.has_room(self.retained.in_flight())
                    || self.window.must_wait(&forward)
                    || self.writer_behind()
                {
                    self.window.hold(forward);
                    return Ok(());
                }
                self.forward(forward)
            }
            Notification::DeviceAck(ack) => match Packet::from(ack) {
                Packet::ConnAck(..) => Ok(()),
                // For a SUBSCRIBE of the group members' filters (`incoming.rs`).
                Packet::SubAck(ack, _)
                    if ack.pkid == super::GROUP_SUBSCRIBE && self.group_subacks > 0 =>
                {
                    self.group_subacks -= 1;
                    Ok(())
                }
                Packet::SubAck(..) if self.own_subacks > 0 => {
                    // Ours (`Gateway::new`), answered before any of the client's.
                    self.own_subacks -= 1;
                    Ok(())
                }
                Packet::SubAck(mut suback, props) => {
                    if let Some(slots) = self.pending_subacks.remove(&suback.pkid) {
                        let mut granted = suback.return_codes.into_iter();
                        suback.return_codes = slots
                            .into_iter()
                            .map(|slot| {
                                slot.or_else(|| granted.next())
                                    .unwrap_or(SubscribeReasonCode::Failure)
                            })
                            .collect();
                    }
                    // Retained messages follow the SUBACK (MQTT-3.3.1-9).
                    self.retained.suback_sent(suback.pkid);
                    self.write(Packet::SubAck(suback, props))
                }
                Packet::PubRel(rel, props) => {
                    if self.to_router.router_pubrel(rel.pkid) {
                        // Withheld from the client: we have answered it.
                        return Ok(());
                    }
                    self.window.released(rel.pkid);
                    self.write(Packet::PubRel(rel, props))
                }
                // Ours (the gateway answers the client's PINGREQs itself).
                Packet::PingResp(_) => {
                    self.on_ping_answer();
                    Ok(())
                }
                // A durable session's QoS 2 PUBLISH went to the router as QoS 1: its
                // PUBACK is the client's PUBREC (`incoming.rs`).
                Packet::PubAck(ack, _) if self.ledger.is_ours(ack.pkid) => {
                    let reason = match ack.reason {
                        PubAckReason::NoMatchingSubscribers => PubRecReason::NoMatchingSubscribers,
                        _ => PubRecReason::Success,
                    };
                    let pkid = ack.pkid;
                    self.write(Packet::PubRec(PubRec { pkid, reason }, None))
                }
                other => self.write(other),
            },
            Notification::Unschedule => {
                // The router paused this link until we have drained its buffer.
                if let Some(c) = self.checkpoints.as_mut() {
                    c.unscheduled();
                }
                self.link.ready();
                Ok(())
            }
            Notification::Disconnect(d, _) => {
                warn!(
                    reason = super::close::reason_code_name(d.reason_code),
                    "router closed the link"
                );
                Err(Close::Protocol(d.reason_code, "closed by the router"))
            }
            _ => Ok(()),
        }
    }
}
