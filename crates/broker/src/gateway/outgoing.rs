//! Router to client: every notification the router sends passes [`Gateway::outgoing`],
//! which checks read access, the client's limits and retain handling, and either
//! writes it or acknowledges it to the router in its turn.

use super::{Close, Gateway};
use crate::codec::{downgrade_to_qos0, publish_header, qos_and_pkid, QOS0_MARK};
use rumqttd::protocol::{
    Packet, PubAck, PubAckReason, PubComp, PubCompReason, PubRec, PubRecReason, QoS,
    SubscribeReasonCode,
};
use rumqttd::Notification;
use tracing::{debug, warn};

impl Gateway {
    /// Router to client: the one place every notification passes.
    pub(super) fn outgoing(&mut self, notification: Notification) -> Result<(), Close> {
        match notification {
            Notification::Forward(forward) => {
                let topic = std::str::from_utf8(&forward.publish.topic).unwrap_or("");
                let decision = self
                    .shared
                    .policy
                    .may_read(&mut self.acl, &self.identity, topic);
                if !decision.allowed {
                    debug!(topic, "delivery withheld by read ACL");
                    self.shared
                        .denied(&self.info, &self.identity, "read", topic, decision.line);
                    let (qos, pkid) = qos_and_pkid(&forward.publish);
                    return self.withhold(qos, pkid);
                }
                let mark = self.out.len();
                self.write(Packet::Publish(forward.publish, forward.properties))?;
                // QoS and packet id, read back from the bytes just encoded.
                let (qos, pkid) = publish_header(&self.out[mark..]).unwrap_or((QoS::AtMostOnce, 0));
                if self.out.len() - mark > self.max_out_packet {
                    // MQTT-3.1.2-25: never send more than the client's maximum packet size.
                    self.out.truncate(mark);
                    return self.withhold(qos, pkid);
                }
                self.shared.metrics.messages_out.inc();
                if self.out[mark] & QOS0_MARK != 0 {
                    if qos == QoS::AtMostOnce {
                        self.out[mark] &= !QOS0_MARK;
                    } else if downgrade_to_qos0(&mut self.out, mark) {
                        // Published at QoS 0, so delivered at QoS 0 (MQTT-3.8.4-8), not at
                        // the subscription's QoS as the router forwards it: the router's
                        // copy is acknowledged here, in its turn.
                        return self.withhold(qos, pkid);
                    }
                }
                if qos != QoS::AtMostOnce {
                    self.acks.delivered(pkid);
                }
                Ok(())
            }
            Notification::DeviceAck(ack) => match Packet::from(ack) {
                Packet::ConnAck(..) => Ok(()),
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
                    if let Some(jobs) = self.retained_after_suback.remove(&suback.pkid) {
                        self.retained_jobs.extend(jobs);
                    }
                    self.write(Packet::SubAck(suback, props))
                }
                Packet::PubRel(rel, props) => {
                    if self.withheld_qos2.remove(&rel.pkid) {
                        let comp = PubComp {
                            pkid: rel.pkid,
                            reason: PubCompReason::Success,
                        };
                        let comp = Packet::PubComp(comp, None);
                        self.acks
                            .pubrel_withheld(rel.pkid, comp, &mut self.to_router);
                        return self.flush_router();
                    }
                    self.acks.pubrel_forwarded(rel.pkid);
                    self.write(Packet::PubRel(rel, props))
                }
                Packet::PingResp(_) => Ok(()),
                other => self.write(other),
            },
            Notification::Unschedule => {
                // The router paused this link until we have drained its buffer.
                let _ = self.rx.ready();
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

    /// Acknowledges to the router, in its turn, a forward that the client will not get.
    pub(super) fn withhold(&mut self, qos: QoS, pkid: u16) -> Result<(), Close> {
        let ack = match qos {
            QoS::AtMostOnce => return Ok(()),
            QoS::AtLeastOnce => Packet::PubAck(
                PubAck {
                    pkid,
                    reason: PubAckReason::Success,
                },
                None,
            ),
            QoS::ExactlyOnce => {
                self.withheld_qos2.insert(pkid);
                Packet::PubRec(
                    PubRec {
                        pkid,
                        reason: PubRecReason::Success,
                    },
                    None,
                )
            }
        };
        self.acks.withheld(pkid, ack, &mut self.to_router);
        self.flush_router()
    }

    /// Sends the acknowledgements released by the ordering queue.
    pub(super) fn flush_router(&mut self) -> Result<(), Close> {
        let mut ready = std::mem::take(&mut self.to_router);
        for packet in ready.drain(..) {
            self.send_router(packet)?;
        }
        self.to_router = ready;
        Ok(())
    }
}
