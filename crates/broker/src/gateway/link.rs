//! The connection's link to the router: packets for it gathered and handed over with
//! one wake-up per read ([`RouterLink::commit`]), acknowledgements kept in the order
//! rumqttd 0.20 demands (`acks.rs`), QoS 2 forwards the gateway withheld completed by
//! the gateway, and packets held back until the retained store has saved
//! (`autosave_interval = 0`).
//!
//! The ordering rules live in [`ToRouter`], which only produces packets; [`RouterLink`]
//! moves them into rumqttd's link.
//!
//! Lazy links: a clean session the router keeps nothing of logs in without a link
//! (`connect.rs`). Its packets for the router wait in [`ToRouter`] until the gateway has
//! opened one (`Gateway::open_link`): rumqttd allocates about 150 KiB of queues per link
//! up front, which a fleet of idle devices would otherwise hold for nothing
//! (docs/benchmarks.md, idle connections).

use super::close::Close;
use crate::acks::AckOrder;
use crate::spare_links::LinkName;
use futures_util::FutureExt;
use prometheus_client::metrics::gauge::Gauge;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{
    Disconnect, DisconnectReasonCode, Packet, PubAck, PubAckReason, PubComp, PubCompReason, PubRec,
    PubRecReason, QoS,
};
use rumqttd::Notification;
use std::collections::HashSet;
use std::time::{Duration, Instant};

/// A publish that waited `held` before the router: its message expiry interval less
/// the wait; one that ran out goes to [`crate::topic::EXPIRED`] instead (no client gets
/// it, MQTT-3.3.2-5; the router still answers it in its turn).
fn count_down(packet: &mut Packet, held: Duration) {
    let Packet::Publish(publish, Some(props)) = packet else {
        return;
    };
    let Some(interval) = props.message_expiry_interval else {
        return;
    };
    match crate::inbound::expiry_left(interval, held) {
        Some(left) => props.message_expiry_interval = Some(left),
        None => publish.topic = bytes::Bytes::from_static(crate::topic::EXPIRED.as_bytes()),
    }
}

/// What goes to the router, in the order it must see it.
#[derive(Default)]
pub(super) struct ToRouter {
    /// Acknowledgements held until their turn.
    acks: AckOrder,
    /// Scratch list of acknowledgements released by `acks`.
    released: Vec<Packet>,
    /// Router QoS 2 forwards we withheld: we owe the router a PUBCOMP after its PUBREL.
    withheld_qos2: HashSet<u16>,
    /// Waiting for the retained store's save (or only the cluster's transfer stream);
    /// everything after them waits too.
    awaiting_save: Vec<Packet>,
    /// Since when the oldest of them waits.
    held_since: Option<Instant>,
    /// Some of `awaiting_save` wait for the stores' save, not only for the transfer.
    needs_save: bool,
    /// The cluster's number of the last message among them forwarded to the other
    /// nodes: they wait until the transfer stream holds it (0: none).
    transfer_through: u64,
    /// The cluster's number of the last retained change among them: they wait until
    /// the retained bucket holds it (0: none).
    retained_through: u64,
    /// Ready for the router, oldest first.
    ready: Vec<Packet>,
}

impl ToRouter {
    /// Queues a packet for the router, behind any that wait for a save.
    pub(super) fn send(&mut self, packet: Packet) {
        if self.awaiting_save.is_empty() {
            self.ready.push(packet);
        } else {
            self.awaiting_save.push(packet);
        }
    }

    /// Queues a packet that may reach the router only after the next save.
    pub(super) fn after_save(&mut self, packet: Packet) {
        self.needs_save = true;
        self.hold(packet);
    }

    /// Queues a packet that may reach the router only once the cluster's transfer
    /// stream holds what this node forwarded so far (no store save needed for it).
    pub(super) fn after_transfer(&mut self, packet: Packet) {
        self.hold(packet);
    }

    fn hold(&mut self, packet: Packet) {
        self.held_since.get_or_insert_with(Instant::now);
        self.awaiting_save.push(packet);
    }

    /// Whether what waits needs the stores' save, not only the transfer stream.
    pub(super) fn needs_save(&self) -> bool {
        self.needs_save
    }

    /// Whether packets are ready for the router.
    pub(super) fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Whether a client's PUBLISH is among them.
    pub(super) fn has_publish(&self) -> bool {
        self.ready.iter().any(|p| matches!(p, Packet::Publish(..)))
    }

    /// The router cannot be reached: nothing queued will reach it.
    pub(super) fn discard(&mut self) {
        *self = ToRouter::default();
    }

    /// Whether packets wait for a save.
    pub(super) fn waits_for_save(&self) -> bool {
        !self.awaiting_save.is_empty()
    }

    /// The save is done: what waited for it is ready, a publish's MQTT 5 message
    /// expiry interval counted down by the wait (rumqttd's router counts none; the
    /// transfer stream can hold a publish for as long as NATS is away).
    pub(super) fn saved(&mut self) {
        let held = self.held_since.map_or(Duration::ZERO, |s| s.elapsed());
        self.saved_after(held);
    }

    fn saved_after(&mut self, held: Duration) {
        let mut waiting = std::mem::take(&mut self.awaiting_save);
        self.held_since = None;
        if held >= Duration::from_secs(1) {
            waiting.iter_mut().for_each(|p| count_down(p, held));
        }
        self.needs_save = false;
        self.transfer_through = 0;
        self.retained_through = 0;
        self.ready.extend(waiting);
    }

    /// What waits includes the cluster's message number `seq` (or earlier ones).
    pub(super) fn transfer_through(&mut self, seq: u64) {
        self.transfer_through = self.transfer_through.max(seq);
    }

    /// The number the transfer stream must hold before what waits goes on.
    pub(super) fn transfer_target(&self) -> u64 {
        self.transfer_through
    }

    /// What waits includes the cluster's retained change `number` (or earlier ones).
    pub(super) fn retained_through(&mut self, number: u64) {
        self.retained_through = self.retained_through.max(number);
    }

    /// The retained change the cluster's bucket must hold before what waits goes on.
    pub(super) fn retained_target(&self) -> u64 {
        self.retained_through
    }

    /// A router forward (QoS 1/2) was written to the client: the client acknowledges it.
    pub(super) fn delivered(&mut self, pkid: u16) {
        self.acks.delivered(pkid);
    }

    /// A router forward the client will not acknowledge (not written, or written at
    /// QoS 0): we acknowledge it to the router, in its turn.
    pub(super) fn withhold(&mut self, qos: QoS, pkid: u16) {
        let ack = match qos {
            QoS::AtMostOnce => return,
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
        self.acks.withheld(pkid, ack, &mut self.released);
        self.release();
    }

    /// The client's PUBACK, PUBREC or PUBCOMP for a router forward.
    pub(super) fn client_ack(&mut self, packet: Packet) {
        match &packet {
            Packet::PubAck(ack, _) => {
                let pkid = ack.pkid;
                self.acks.client_ack(pkid, packet, &mut self.released)
            }
            Packet::PubRec(rec, _) => {
                let pkid = rec.pkid;
                self.acks.client_ack(pkid, packet, &mut self.released)
            }
            Packet::PubComp(comp, _) => {
                let pkid = comp.pkid;
                self.acks.client_comp(pkid, packet, &mut self.released)
            }
            _ => return,
        }
        self.release();
    }

    /// The router's PUBREL for `pkid`. `true`: the message was withheld and we have
    /// answered the router ourselves; `false`: the PUBREL goes on to the client.
    pub(super) fn router_pubrel(&mut self, pkid: u16) -> bool {
        if self.withheld_qos2.remove(&pkid) {
            let comp = PubComp {
                pkid,
                reason: PubCompReason::Success,
            };
            self.acks
                .pubrel_withheld(pkid, Packet::PubComp(comp, None), &mut self.released);
            self.release();
            true
        } else {
            self.acks.pubrel_forwarded(pkid);
            false
        }
    }

    /// The forwards in flight to the client so far (`AckOrder::inflight_counts`).
    pub(super) fn inflight_counts(&self) -> crate::acks::Counts {
        self.acks.inflight_counts()
    }

    /// The session leaves this router: every forward in flight to the client is
    /// acknowledged to the router now, so it forwards what it still holds.
    pub(super) fn settle_all(&mut self) {
        self.acks.settle_all(&mut self.released);
        self.release();
    }

    /// A forward the router sent while the session leaves (kept in the session store):
    /// acknowledged to the router at once.
    pub(super) fn settle(&mut self, publish: &rumqttd::protocol::Publish) {
        let (qos, pkid) = crate::codec::qos_and_pkid(publish);
        if qos != QoS::AtMostOnce {
            self.send(crate::acks::puback(pkid));
        }
    }

    fn release(&mut self) {
        let mut released = std::mem::take(&mut self.released);
        for packet in released.drain(..) {
            self.send(packet);
        }
        self.released = released;
    }
}

/// rumqttd's link for one connection, fed through [`ToRouter`]; absent until the
/// connection needs the router (lazy links, above).
pub(super) struct RouterLink {
    open: Option<(LinkTx, LinkRx)>,
    /// The pool name of a link opened after the login, given back when this is dropped
    /// (after `close`: `spare_links.rs`).
    name: Option<LinkName>,
    /// `moatmq_router_links`: one while the link exists.
    gauge: Gauge,
}

impl RouterLink {
    pub(super) fn new(open: Option<(LinkTx, LinkRx)>, gauge: Gauge) -> RouterLink {
        if open.is_some() {
            gauge.inc();
        }
        RouterLink {
            open,
            name: None,
            gauge,
        }
    }

    /// Whether the link exists.
    pub(super) fn is_open(&self) -> bool {
        self.open.is_some()
    }

    /// The link was opened after the login, under a pool name.
    pub(super) fn opened(&mut self, tx: LinkTx, rx: LinkRx, name: LinkName) {
        if self.open.replace((tx, rx)).is_none() {
            self.gauge.inc();
        }
        self.name = Some(name);
    }

    /// Hands everything ready to the router with one wake-up, as rumqttd's own link
    /// does: one wake-up per packet costs more than the rest of the path. Without a
    /// link the packets stay queued.
    pub(super) fn commit(&mut self, queue: &mut ToRouter) -> Result<(), Close> {
        let Some((tx, _)) = &mut self.open else {
            return Ok(());
        };
        let Some(last) = queue.ready.pop() else {
            return Ok(());
        };
        if !queue.ready.is_empty() {
            tx.buffer().extend(queue.ready.drain(..));
        }
        match tx.send(last).now_or_never() {
            Some(Ok(_)) => Ok(()),
            _ => Err(Close::TakenOver),
        }
    }

    /// The next notification from the router; never, without a link.
    pub(super) async fn next(&mut self) -> Result<Option<Notification>, Close> {
        match &mut self.open {
            Some((_, rx)) => rx.next().await.map_err(|_| Close::TakenOver),
            None => std::future::pending().await,
        }
    }

    /// A notification that is already there, without waiting.
    pub(super) fn try_next(&mut self) -> Option<Result<Option<Notification>, Close>> {
        let (_, rx) = self.open.as_mut()?;
        rx.next()
            .now_or_never()
            .map(|n| n.map_err(|_| Close::TakenOver))
    }

    /// The router paused this link until its buffer is drained: say it is.
    pub(super) fn ready(&self) {
        if let Some((_, rx)) = &self.open {
            let _ = rx.ready();
        }
    }

    /// Tells the router the link is gone (it keeps a persistent session's state).
    pub(super) fn close(&mut self, queue: &mut ToRouter) {
        let _ = self.commit(queue);
        let Some((tx, _)) = &mut self.open else {
            return;
        };
        let bye = Packet::Disconnect(
            Disconnect {
                reason_code: DisconnectReasonCode::NormalDisconnection,
            },
            None,
        );
        let _ = tx.send(bye).now_or_never();
    }
}

impl Drop for RouterLink {
    fn drop(&mut self) {
        if self.open.is_some() {
            self.gauge.dec();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttd::protocol::{Publish, Subscribe};

    fn kinds(q: &mut ToRouter) -> Vec<String> {
        q.ready
            .drain(..)
            .map(|p| match p {
                Packet::PubAck(a, _) => format!("puback {}", a.pkid),
                Packet::PubRec(r, _) => format!("pubrec {}", r.pkid),
                Packet::PubComp(c, _) => format!("pubcomp {}", c.pkid),
                Packet::Publish(..) => "publish".into(),
                Packet::Subscribe(..) => "subscribe".into(),
                other => format!("{other:?}"),
            })
            .collect()
    }

    fn subscribe() -> Packet {
        Packet::Subscribe(
            Subscribe {
                pkid: 1,
                filters: Vec::new(),
            },
            None,
        )
    }

    fn client_puback(pkid: u16) -> Packet {
        let reason = PubAckReason::Success;
        Packet::PubAck(PubAck { pkid, reason }, None)
    }

    #[test]
    fn a_withheld_forward_is_acknowledged_after_the_older_ones() {
        let mut q = ToRouter::default();
        q.delivered(1);
        q.withhold(QoS::AtLeastOnce, 2);
        assert!(
            kinds(&mut q).is_empty(),
            "2 waits for the client's ack of 1"
        );
        q.client_ack(client_puback(1));
        assert_eq!(kinds(&mut q), ["puback 1", "puback 2"]);
        q.withhold(QoS::AtMostOnce, 0);
        assert!(kinds(&mut q).is_empty(), "QoS 0 needs no acknowledgement");
    }

    #[test]
    fn a_withheld_qos_2_forward_is_completed_by_us() {
        let mut q = ToRouter::default();
        q.withhold(QoS::ExactlyOnce, 5);
        assert_eq!(kinds(&mut q), ["pubrec 5"]);
        assert!(q.router_pubrel(5), "we answer the router's PUBREL");
        assert_eq!(kinds(&mut q), ["pubcomp 5"]);
        assert!(
            !q.router_pubrel(6),
            "a delivered one's PUBREL goes to the client"
        );
        assert!(kinds(&mut q).is_empty());
    }

    #[test]
    fn everything_after_a_retained_publish_waits_for_its_save() {
        let mut q = ToRouter::default();
        q.send(subscribe());
        let publish = Publish::new("t", "x", false);
        q.after_save(Packet::Publish(publish, None));
        q.send(subscribe());
        assert!(q.waits_for_save());
        assert_eq!(kinds(&mut q), ["subscribe"], "what came before goes now");
        q.saved();
        assert!(!q.waits_for_save());
        assert_eq!(kinds(&mut q), ["publish", "subscribe"]);
    }

    #[test]
    fn a_held_publish_has_its_expiry_counted_down_by_the_wait_or_goes_to_no_one() {
        use rumqttd::protocol::PublishProperties;
        let expiring = |topic: &'static str, secs| {
            let props = PublishProperties {
                message_expiry_interval: Some(secs),
                ..PublishProperties::default()
            };
            Packet::Publish(Publish::new(topic, "x", false), Some(props))
        };
        let mut q = ToRouter::default();
        q.after_transfer(expiring("short", 2));
        q.after_transfer(expiring("long", 60));
        q.after_transfer(Packet::Publish(Publish::new("plain", "x", false), None));
        q.saved_after(Duration::from_millis(3_200));
        let topics: Vec<(Vec<u8>, Option<u32>)> = q
            .ready
            .iter()
            .map(|p| match p {
                Packet::Publish(p, props) => (
                    p.topic.to_vec(),
                    props.as_ref().and_then(|p| p.message_expiry_interval),
                ),
                _ => panic!("not a publish"),
            })
            .collect();
        assert_eq!(
            topics,
            [
                (crate::topic::EXPIRED.as_bytes().to_vec(), Some(2)),
                (b"long".to_vec(), Some(57)),
                (b"plain".to_vec(), None),
            ]
        );
        // A short wait (a store's save) changes nothing.
        let mut q = ToRouter::default();
        q.after_save(expiring("t", 60));
        q.saved_after(Duration::from_millis(400));
        assert!(
            matches!(&q.ready[0], Packet::Publish(_, Some(p)) if p.message_expiry_interval == Some(60))
        );
    }

    #[test]
    fn a_publish_waiting_for_the_transfer_only_needs_no_store_save() {
        let mut q = ToRouter::default();
        q.after_transfer(Packet::Publish(Publish::new("t", "x", false), None));
        assert!(q.waits_for_save() && !q.needs_save());
        q.after_save(Packet::Publish(Publish::new("r", "x", true), None));
        assert!(q.needs_save());
        q.saved();
        assert!(!q.waits_for_save() && !q.needs_save());
        assert_eq!(kinds(&mut q), ["publish", "publish"]);
    }
}
