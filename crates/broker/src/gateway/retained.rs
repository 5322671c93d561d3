//! Retained messages served by the gateway itself, after the SUBACK, and a resumed
//! persistent session's messages from before a restart (`durable/`), before anything
//! the router forwards.
//!
//! Each granted filter that wants retained messages (retain handling 0, or 1 on a new
//! subscription; never for shared subscriptions) becomes a job that walks the retained
//! index in topic order, a batch at a time, as the client's socket and in-flight window
//! allow: a million retained messages reach a `#` subscriber in full, without holding
//! the router. Every message passes the read ACL and goes at min(message QoS,
//! subscription QoS), with the retain flag set. QoS 1/2 ones use packet ids above the
//! router's (which numbers 1..=100), and their acknowledgements stay here.

use super::deliver::{Delivery, Origin};
use super::{Close, Gateway};
use crate::codec::{make_publish, make_publish_dup, Version};
use crate::durable::Replay;
use crate::retained_index::RetainedIndex;
use crate::retained_index::{properties_at, qos_from, qos_of, stored_properties};
use bytes::Bytes;
use moatmq_store::RetainedMessage;
use rumqttd::protocol::{Packet, PubRecReason, PubRel, PubRelReason, PublishProperties, QoS};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

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
    /// The MQTT 5 subscription identifier of the subscription, sent with each message.
    pub subscription_id: Option<u32>,
    /// The last topic sent (or skipped); the walk goes on after it.
    pub after: Option<String>,
}

/// The next retained messages of the current job, with its subscription's QoS and
/// identifier; `more`: the job has more after them.
struct Batch {
    messages: Vec<Arc<RetainedMessage>>,
    qos: QoS,
    subscription_id: Option<u32>,
    more: bool,
}

/// Where one of our own QoS 1/2 deliveries stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OwnState {
    /// QoS 1 waiting for PUBACK, or QoS 2 waiting for PUBREC.
    Sent,
    /// QoS 2: PUBREL sent, waiting for PUBCOMP.
    Released,
}

/// The retained messages owed to one connection, and its own QoS 1/2 deliveries of
/// them in flight (packet ids above the router's).
#[derive(Default)]
pub(super) struct RetainedFeed {
    /// Jobs to start once the SUBACK of that packet id is out (MQTT-3.3.1-9).
    after_suback: HashMap<u16, Vec<RetainedJob>>,
    /// Jobs being sent, oldest subscription first.
    jobs: VecDeque<RetainedJob>,
    /// Scratch space for one batch from the retained index.
    batch: Vec<Arc<RetainedMessage>>,
    /// Stored messages of a resumed session, oldest first: they go before anything else.
    stored: VecDeque<Replay>,
    /// Our own QoS 1/2 deliveries in flight, by packet id, with the session store's id
    /// of a stored one.
    inflight: HashMap<u16, (OwnState, Option<u64>)>,
    next_pkid: u16,
}

/// How a client's acknowledgement for one of our own deliveries is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OwnAck {
    /// Not ours: it is for a router forward.
    NotOurs,
    /// Ours, and done with (a stored message: this id in the session store).
    Done(Option<u64>),
    /// Ours: a PUBREC, to be answered with this PUBREL (of a stored message: this id
    /// in the session store, which records it released first).
    Release(u16, Option<u64>),
}

impl RetainedFeed {
    /// `jobs` start once the SUBACK for `pkid` is written.
    pub(super) fn after_suback(&mut self, pkid: u16, jobs: Vec<RetainedJob>) {
        if !jobs.is_empty() {
            self.after_suback.insert(pkid, jobs);
        }
    }

    /// The SUBACK for `pkid` is written: its jobs start.
    pub(super) fn suback_sent(&mut self, pkid: u16) {
        if let Some(jobs) = self.after_suback.remove(&pkid) {
            self.jobs.extend(jobs);
        }
    }

    /// `jobs` start now (their SUBACK is out, or was answered without the router).
    pub(super) fn start(&mut self, jobs: Vec<RetainedJob>) {
        self.jobs.extend(jobs);
    }

    /// An unsubscribed filter gets no more retained messages.
    pub(super) fn cancel(&mut self, filter: &str) {
        self.jobs.retain(|job| job.filter != filter);
        for jobs in self.after_suback.values_mut() {
            jobs.retain(|job| job.filter != filter);
        }
    }

    /// An idle connection's scratch space goes back.
    pub(super) fn trim(&mut self) {
        if self.jobs.is_empty() {
            self.batch = Vec::new();
        }
    }

    /// Whether there is work and room in the in-flight window for it.
    pub(super) fn wants_to_send(&self) -> bool {
        (!self.jobs.is_empty() || !self.stored.is_empty()) && self.window_open()
    }

    /// A resumed session's stored messages, sent before anything else.
    pub(super) fn replay(&mut self, messages: Vec<Replay>) {
        self.stored.extend(messages);
    }

    /// Whether stored messages are still to be sent: router forwards wait until they are.
    pub(super) fn replaying(&self) -> bool {
        !self.stored.is_empty()
    }

    /// Whether the router's forwards wait: stored messages are still to be sent, or
    /// some went under packet ids the router numbers its own with (1..=100), and are
    /// not acknowledged yet.
    pub(super) fn router_waits(&self) -> bool {
        self.replaying() || self.inflight.keys().any(|&p| p <= ROUTER_MAX_PKID)
    }

    fn window_open(&self) -> bool {
        self.inflight.len() < OWN_WINDOW
    }

    /// Our own QoS 1/2 deliveries in flight (they count against the client's window).
    pub(super) fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// The next batch of the oldest job: its messages (to hand back through
    /// [`RetainedFeed::batch_done`]), the subscription's QoS and whether more follow.
    fn next_batch(&mut self, index: &RetainedIndex) -> Option<Batch> {
        let job = self.jobs.front()?;
        let mut messages = std::mem::take(&mut self.batch);
        messages.clear();
        let more = index.matching(&job.filter, job.after.as_deref(), BATCH, &mut messages);
        Some(Batch {
            messages,
            qos: job.qos,
            subscription_id: job.subscription_id,
            more,
        })
    }

    /// The batch went out up to `last` (the last topic sent or skipped); `finished`:
    /// nothing of the job is left.
    fn batch_done(
        &mut self,
        batch: Vec<Arc<RetainedMessage>>,
        last: Option<String>,
        finished: bool,
    ) {
        self.batch = batch;
        if let Some(job) = self.jobs.front_mut() {
            if last.is_some() {
                job.after = last;
            }
            if finished {
                self.jobs.pop_front();
            }
        }
    }

    /// A packet id of our own, not the router's and not in flight.
    fn next_pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = match self.next_pkid {
                u16::MAX | 0..=ROUTER_MAX_PKID => ROUTER_MAX_PKID + 1,
                n => n + 1,
            };
            if !self.inflight.contains_key(&self.next_pkid) {
                return self.next_pkid;
            }
        }
    }

    /// The packet id a stored message is sent again under: its original one if it
    /// had one and it is free, else one of our own.
    fn pkid_for(&mut self, original: Option<u16>) -> u16 {
        match original {
            Some(p) if p != 0 && !self.inflight.contains_key(&p) => p,
            _ => self.next_pkid(),
        }
    }

    /// Our QoS 1/2 delivery `pkid` is written.
    fn sent(&mut self, pkid: u16, stored: Option<u64>) {
        self.inflight.insert(pkid, (OwnState::Sent, stored));
    }

    /// The PUBREL of the stored message `stored`, whose PUBREC came before, is written
    /// again under `pkid`.
    fn released(&mut self, pkid: u16, stored: u64) {
        self.inflight
            .insert(pkid, (OwnState::Released, Some(stored)));
    }

    /// The client's PUBACK/PUBREC/PUBCOMP, if it is for one of our own deliveries.
    pub(super) fn client_ack(&mut self, packet: &Packet) -> OwnAck {
        let (pkid, rec_success) = match packet {
            Packet::PubAck(a, _) => (a.pkid, None),
            Packet::PubRec(r, _) => (
                r.pkid,
                Some(matches!(
                    r.reason,
                    PubRecReason::Success | PubRecReason::NoMatchingSubscribers
                )),
            ),
            Packet::PubComp(c, _) => (c.pkid, None),
            _ => return OwnAck::NotOurs,
        };
        let Some((state, stored)) = self.inflight.get(&pkid).copied() else {
            return OwnAck::NotOurs;
        };
        if let (Some(true), OwnState::Sent) = (rec_success, state) {
            self.inflight.insert(pkid, (OwnState::Released, stored));
            return OwnAck::Release(pkid, stored);
        }
        self.inflight.remove(&pkid);
        OwnAck::Done(stored)
    }
}

impl Gateway {
    /// Whether a retained batch can go out now.
    pub(super) fn can_feed_retained(&self) -> bool {
        self.retained.wants_to_send() && self.out.has_room() && self.own_room()
    }

    /// Room for one more of our own QoS 1/2 deliveries: in our window and the client's.
    fn own_room(&self) -> bool {
        self.retained.window_open() && self.window.has_room(self.retained.in_flight())
    }

    /// Writes the next batch of the oldest retained job, each message through
    /// [`Gateway::deliver`].
    pub(super) fn feed_retained(&mut self) -> Result<(), Close> {
        if self.retained.replaying() {
            return self.feed_stored();
        }
        let Some(Batch {
            messages: mut batch,
            qos: sub_qos,
            subscription_id: sub_id,
            more,
        }) = self.retained.next_batch(&self.shared.retained_index)
        else {
            return Ok(());
        };
        let now = moatmq_store::now_unix();
        let mut last = None;
        // Stopped early: the socket buffer or the in-flight window is full.
        let mut stopped = false;
        for msg in batch.drain(..) {
            if !self.out.has_room() {
                stopped = true;
                break;
            }
            // MQTT-3.8.4-8: the lower of the message's and the subscription's QoS.
            let qos = if msg.qos < sub_qos as u8 {
                qos_of(&msg)
            } else {
                sub_qos
            };
            if qos != QoS::AtMostOnce && !self.own_room() {
                stopped = true;
                break;
            }
            let pkid = match qos {
                QoS::AtMostOnce => 0,
                _ => self.retained.next_pkid(),
            };
            let properties = match self.version {
                Version::V5 => with_identifiers(properties_at(&msg, now), sub_id),
                Version::V4 => None,
            };
            let publish = make_publish(
                Bytes::copy_from_slice(msg.topic.as_bytes()),
                Bytes::copy_from_slice(&msg.payload),
                qos,
                true,
                pkid,
            );
            if let Delivery::Sent { qos, pkid } =
                self.deliver(publish, properties, Origin::Gateway)?
            {
                if qos != QoS::AtMostOnce {
                    self.retained.sent(pkid, None);
                }
            }
            last = Some(msg.topic.clone());
        }
        self.retained.batch_done(batch, last, !more && !stopped);
        Ok(())
    }

    /// Writes a resumed session's stored messages, each through [`Gateway::deliver`], as
    /// far as the socket buffer and the in-flight window allow. One the client will
    /// not acknowledge (QoS 0, refused by the read ACL, too large, expired) is done with
    /// at once.
    fn feed_stored(&mut self) -> Result<(), Close> {
        let now = moatmq_store::now_unix();
        while self.out.has_room() {
            let Some(next) = self.retained.stored.front() else {
                break;
            };
            let qos = qos_from(next.message.qos);
            if qos != QoS::AtMostOnce && !self.own_room() {
                break;
            }
            let Some(r) = self.retained.stored.pop_front() else {
                break;
            };
            if r.release {
                // The client has the message (its PUBREC came): only the PUBREL goes
                // again, under the exchange's id (MQTT-4.4.0-1).
                match r.pkid.filter(|p| !self.retained.inflight.contains_key(p)) {
                    Some(pkid) => {
                        let rel = PubRel {
                            pkid,
                            reason: PubRelReason::Success,
                        };
                        self.write(Packet::PubRel(rel, None))?;
                        self.retained.released(pkid, r.id);
                    }
                    None => self.stored_done(r.id),
                }
                continue;
            }
            if r.message.is_expired(now) {
                self.stored_done(r.id);
                continue;
            }
            let pkid = match qos {
                QoS::AtMostOnce => 0,
                _ => self.retained.pkid_for(r.pkid),
            };
            let properties = match self.version {
                Version::V5 => {
                    let p = stored_properties(
                        r.message.properties.as_deref(),
                        r.message.expires_at,
                        now,
                    );
                    // One copy: the identifiers of every matching subscription (3.3.4).
                    let subs = &self.session.subscriptions;
                    with_identifiers(p, self.options.identifiers(subs, &r.message.topic))
                }
                Version::V4 => None,
            };
            let publish = make_publish_dup(
                Bytes::from(r.message.topic.into_bytes()),
                r.message.payload,
                qos,
                r.message.retain,
                pkid,
                r.dup,
            );
            match self.deliver(publish, properties, Origin::Gateway)? {
                Delivery::Sent { qos, pkid } if qos != QoS::AtMostOnce => {
                    self.retained.sent(pkid, Some(r.id));
                    if r.pkid != Some(pkid) {
                        // Stored with the id it went under: the next replay uses it.
                        if let (Some(book), Some(key)) = (&self.shared.durable, &self.session.key) {
                            book.resent(key, r.id, pkid);
                            if qos == QoS::ExactlyOnce {
                                self.save_before_writing();
                            }
                        }
                    }
                }
                _ => self.stored_done(r.id),
            }
        }
        Ok(())
    }

    /// A stored message is delivered (or never will be): the session store forgets it.
    fn stored_done(&self, id: u64) {
        if let (Some(book), Some(key)) = (&self.shared.durable, &self.session.key) {
            book.complete(key, id);
        }
    }

    /// Answers the client's acknowledgement if it is for one of our own deliveries;
    /// `false` means it is the router's.
    pub(super) fn own_ack(&mut self, packet: &Packet) -> Result<bool, Close> {
        match self.retained.client_ack(packet) {
            OwnAck::NotOurs => Ok(false),
            OwnAck::Done(stored) => {
                if let Some(id) = stored {
                    self.stored_done(id);
                }
                self.release_held()?;
                Ok(true)
            }
            OwnAck::Release(pkid, stored) => {
                // The client has the message: after a restart it gets this PUBREL
                // again, not the message (it may have completed the exchange).
                if let (Some(id), Some(book), Some(key)) =
                    (stored, &self.shared.durable, &self.session.key)
                {
                    book.released(key, id);
                    self.save_before_writing();
                }
                let rel = PubRel {
                    pkid,
                    reason: PubRelReason::Success,
                };
                self.write(Packet::PubRel(rel, None))?;
                Ok(true)
            }
        }
    }
}

/// `props` with the subscription identifiers `ids` (MQTT-3.3.4-3).
fn with_identifiers(
    mut props: Option<PublishProperties>,
    ids: impl IntoIterator<Item = u32>,
) -> Option<PublishProperties> {
    for id in ids {
        let p = props.get_or_insert_with(PublishProperties::default);
        p.subscription_identifiers.push(id as usize);
    }
    props
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttd::protocol::{PubAck, PubAckReason, PubComp, PubCompReason, PubRec};

    fn job(filter: &str) -> RetainedJob {
        RetainedJob {
            filter: filter.into(),
            qos: QoS::AtLeastOnce,
            subscription_id: None,
            after: None,
        }
    }

    #[test]
    fn own_packet_ids_stay_above_the_routers_and_skip_those_in_flight() {
        let mut feed = RetainedFeed::default();
        let first = feed.next_pkid();
        assert_eq!(first, ROUTER_MAX_PKID + 1);
        feed.sent(first, None);
        feed.next_pkid = u16::MAX - 1;
        assert_eq!(feed.next_pkid(), u16::MAX);
        // Wraps past the router's range, and past the one still in flight.
        assert_eq!(feed.next_pkid(), ROUTER_MAX_PKID + 2);
        for _ in 0..100_000 {
            let id = feed.next_pkid();
            assert!(id > ROUTER_MAX_PKID && id != first, "{id}");
        }
    }

    #[test]
    fn a_stored_message_goes_again_under_its_id_and_the_router_waits_for_its_ack() {
        let mut feed = RetainedFeed::default();
        assert_eq!(feed.pkid_for(Some(7)), 7);
        feed.sent(7, Some(1));
        assert!(feed.router_waits(), "7 is in the router's range");
        // Taken already: one of our own instead; none known: one of our own.
        assert_eq!(feed.pkid_for(Some(7)), ROUTER_MAX_PKID + 1);
        assert_eq!(feed.pkid_for(None), ROUTER_MAX_PKID + 2);
        feed.sent(ROUTER_MAX_PKID + 2, Some(2));
        let ack = |pkid| {
            Packet::PubAck(
                PubAck {
                    pkid,
                    reason: PubAckReason::Success,
                },
                None,
            )
        };
        assert_eq!(feed.client_ack(&ack(7)), OwnAck::Done(Some(1)));
        assert!(
            !feed.router_waits(),
            "ours above the router's range do not hold it"
        );
    }

    #[test]
    fn the_window_closes_at_its_size_and_acks_reopen_it() {
        let mut feed = RetainedFeed::default();
        feed.after_suback(1, vec![job("a/#")]);
        assert!(!feed.wants_to_send(), "nothing before the SUBACK");
        feed.suback_sent(1);
        assert!(feed.wants_to_send());
        let ids: Vec<u16> = (0..OWN_WINDOW).map(|_| feed.next_pkid()).collect();
        ids.iter().for_each(|&id| feed.sent(id, None));
        assert!(!feed.wants_to_send(), "window full");
        let ack = PubAck {
            pkid: ids[0],
            reason: PubAckReason::Success,
        };
        assert_eq!(
            feed.client_ack(&Packet::PubAck(ack, None)),
            OwnAck::Done(None)
        );
        assert!(feed.wants_to_send());
        let router_ack = PubAck {
            pkid: 7,
            reason: PubAckReason::Success,
        };
        assert_eq!(
            feed.client_ack(&Packet::PubAck(router_ack, None)),
            OwnAck::NotOurs
        );
    }

    #[test]
    fn a_qos_2_delivery_is_released_then_completed() {
        let mut feed = RetainedFeed::default();
        let id = feed.next_pkid();
        feed.sent(id, None);
        let rec = PubRec {
            pkid: id,
            reason: PubRecReason::Success,
        };
        assert_eq!(
            feed.client_ack(&Packet::PubRec(rec, None)),
            OwnAck::Release(id, None)
        );
        let comp = || {
            let reason = PubCompReason::Success;
            Packet::PubComp(PubComp { pkid: id, reason }, None)
        };
        let acks = [feed.client_ack(&comp()), feed.client_ack(&comp())];
        assert_eq!(acks, [OwnAck::Done(None), OwnAck::NotOurs]);
    }

    #[test]
    fn unsubscribing_cancels_waiting_and_running_jobs() {
        let mut feed = RetainedFeed::default();
        feed.after_suback(1, vec![job("a/#"), job("b/#")]);
        feed.suback_sent(1);
        feed.after_suback(2, vec![job("a/#")]);
        feed.cancel("a/#");
        assert_eq!(feed.jobs.len(), 1);
        feed.suback_sent(2);
        assert_eq!(feed.jobs.len(), 1, "the waiting one was cancelled too");
        feed.cancel("b/#");
        assert!(!feed.wants_to_send());
    }
}
