//! Retained messages served by the gateway itself, after the SUBACK.
//!
//! Each granted filter that wants retained messages (retain handling 0, or 1 on a new
//! subscription; never for shared subscriptions) becomes a job that walks the retained
//! index in topic order, a batch at a time, as the client's socket and in-flight window
//! allow: a million retained messages reach a `#` subscriber in full, without holding
//! the router. Every message passes the read ACL and goes at min(message QoS,
//! subscription QoS), with the retain flag set. QoS 1/2 ones use packet ids above the
//! router's (which numbers 1..=100), and their acknowledgements stay here.

use super::deliver::Delivery;
use super::{Close, Gateway, WRITE_BATCH};
use crate::codec::{make_publish, Version};
use crate::retained_index::{properties_at, qos_of};
use bytes::Bytes;
use rumqttd::protocol::{Packet, PubRecReason, PubRel, PubRelReason, QoS};

/// The router numbers its forwards 1..=100 (rumqttd's MAX_INFLIGHT).
const ROUTER_MAX_PKID: u16 = 100;
/// Retained QoS 1/2 messages in flight to one client at most.
pub(super) const OWN_WINDOW: usize = 32;
/// Retained messages taken from the index per step.
const BATCH: usize = 64;

/// One filter's retained messages still to send.
pub(super) struct RetainedJob {
    pub filter: String,
    pub qos: QoS,
    /// The last topic sent (or skipped); the walk goes on after it.
    pub after: Option<String>,
}

/// Where one of our own QoS 1/2 deliveries stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OwnState {
    /// QoS 1 waiting for PUBACK, or QoS 2 waiting for PUBREC.
    Sent,
    /// QoS 2: PUBREL sent, waiting for PUBCOMP.
    Released,
}

impl Gateway {
    /// Whether a retained batch can go out now.
    pub(super) fn can_feed_retained(&self) -> bool {
        !self.retained_jobs.is_empty()
            && self.out.len() < WRITE_BATCH
            && self.own_inflight.len() < OWN_WINDOW
    }

    /// Writes the next batch of the oldest retained job.
    pub(super) fn feed_retained(&mut self) -> Result<(), Close> {
        let Some(job) = self.retained_jobs.front() else {
            return Ok(());
        };
        let (filter, sub_qos) = (job.filter.clone(), job.qos);
        let mut batch = std::mem::take(&mut self.retained_batch);
        batch.clear();
        let more =
            self.shared
                .retained_index
                .matching(&filter, job.after.as_deref(), BATCH, &mut batch);
        let now = moatmq_store::now_unix();
        let mut last = None;
        // Stopped early: the socket buffer or the in-flight window is full.
        let mut stopped = false;
        for msg in batch.drain(..) {
            if self.out.len() >= WRITE_BATCH {
                stopped = true;
                break;
            }
            // MQTT-3.8.4-8: the lower of the message's and the subscription's QoS.
            let qos = if msg.qos < sub_qos as u8 {
                qos_of(&msg)
            } else {
                sub_qos
            };
            if qos != QoS::AtMostOnce && self.own_inflight.len() >= OWN_WINDOW {
                stopped = true;
                break;
            }
            let pkid = match qos {
                QoS::AtMostOnce => 0,
                _ => self.own_pkid(),
            };
            let properties = match self.version {
                Version::V5 => properties_at(&msg, now),
                Version::V4 => None,
            };
            let publish = make_publish(
                Bytes::copy_from_slice(msg.topic.as_bytes()),
                Bytes::copy_from_slice(&msg.payload),
                qos,
                true,
                pkid,
            );
            if let Delivery::Sent { qos, pkid } = self.deliver(publish, properties)? {
                if qos != QoS::AtMostOnce {
                    self.own_inflight.insert(pkid, OwnState::Sent);
                }
            }
            last = Some(msg.topic.clone());
        }
        self.retained_batch = batch;
        if let Some(job) = self.retained_jobs.front_mut() {
            if last.is_some() {
                job.after = last;
            }
            if !more && !stopped {
                self.retained_jobs.pop_front();
            }
        }
        Ok(())
    }

    /// An unsubscribed filter gets no more retained messages.
    pub(super) fn cancel_retained(&mut self, filter: &str) {
        self.retained_jobs.retain(|job| job.filter != filter);
        for jobs in self.retained_after_suback.values_mut() {
            jobs.retain(|job| job.filter != filter);
        }
    }

    /// A packet id of our own, not the router's and not in flight.
    fn own_pkid(&mut self) -> u16 {
        loop {
            self.next_own_pkid = match self.next_own_pkid {
                u16::MAX | 0..=ROUTER_MAX_PKID => ROUTER_MAX_PKID + 1,
                n => n + 1,
            };
            if !self.own_inflight.contains_key(&self.next_own_pkid) {
                return self.next_own_pkid;
            }
        }
    }

    /// Handles the client's PUBACK/PUBREC/PUBCOMP if it is for one of our own
    /// deliveries; `false` means it is the router's.
    pub(super) fn own_ack(&mut self, packet: &Packet) -> Result<bool, Close> {
        let (pkid, kind) = match packet {
            Packet::PubAck(a, _) => (a.pkid, 1),
            Packet::PubRec(r, _) => (r.pkid, 2),
            Packet::PubComp(c, _) => (c.pkid, 3),
            _ => return Ok(false),
        };
        let Some(state) = self.own_inflight.get(&pkid).copied() else {
            return Ok(false);
        };
        match (kind, state) {
            (2, OwnState::Sent) => {
                let success = matches!(
                    packet,
                    Packet::PubRec(r, _)
                        if matches!(r.reason, PubRecReason::Success | PubRecReason::NoMatchingSubscribers)
                );
                if success {
                    self.own_inflight.insert(pkid, OwnState::Released);
                    let rel = PubRel {
                        pkid,
                        reason: PubRelReason::Success,
                    };
                    self.write(Packet::PubRel(rel, None))?;
                } else {
                    self.own_inflight.remove(&pkid);
                }
            }
            _ => {
                self.own_inflight.remove(&pkid);
            }
        }
        Ok(true)
    }
}
