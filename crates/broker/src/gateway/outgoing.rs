//! Router to client: every notification the router sends passes [`Gateway::outgoing`].
//! Forwarded messages go through the deliver step (`deliver.rs`); what the client will
//! not acknowledge is acknowledged to the router here, in its turn.

use super::deliver::Delivery;
use super::{Close, Gateway};
use rumqttd::protocol::{
    Packet, PubAck, PubAckReason, PubComp, PubCompReason, PubRec, PubRecReason, QoS,
    SubscribeReasonCode,
};
use rumqttd::Notification;
use tracing::warn;

impl Gateway {
    /// Router to client: the one place every notification passes.
    pub(super) fn outgoing(&mut self, notification: Notification) -> Result<(), Close> {
        match notification {
            Notification::Forward(forward) => {
                match self.deliver(forward.publish, forward.properties)? {
                    Delivery::Sent { qos, pkid } if qos != QoS::AtMostOnce => {
                        self.acks.delivered(pkid)
                    }
                    Delivery::Sent { .. } => {}
                    // The router's copy is acknowledged here, in its turn.
                    Delivery::Settled { qos, pkid } => return self.withhold(qos, pkid),
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
