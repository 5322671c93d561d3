//! The client's Receive Maximum (MQTT 5 3.3.4, flow control): no more QoS 1/2 PUBLISHes
//! in flight to the client than it announced in its CONNECT. The router keeps up to 100
//! forwards in flight to every link, so forwards past the client's window wait here (at
//! most the router's 100) until an acknowledgement frees a slot; the gateway's own
//! deliveries (retained, stored) count against the same window.

use rumqttd::Forward;
use std::collections::{HashSet, VecDeque};

/// QoS 1/2 deliveries in flight to the client and the forwards waiting for room.
pub(super) struct OutWindow {
    /// The client's Receive Maximum (65,535 when it announced none, and for 3.1.1).
    max: usize,
    /// Router forwards written at QoS 1/2 and not yet acknowledged, by packet id.
    router: HashSet<u16>,
    /// Router PUBRELs written to the client, its PUBCOMP not yet received.
    pubrels: HashSet<u16>,
    /// Router forwards waiting for a slot, oldest first.
    held: VecDeque<Forward>,
}

impl OutWindow {
    pub(super) fn new(receive_max: Option<u16>) -> OutWindow {
        OutWindow {
            max: usize::from(receive_max.unwrap_or(u16::MAX).max(1)),
            router: HashSet::new(),
            pubrels: HashSet::new(),
            held: VecDeque::new(),
        }
    }

    /// Whether one more QoS 1/2 delivery may go, with `own` of the gateway's own in
    /// flight.
    pub(super) fn has_room(&self, own: usize) -> bool {
        self.router.len() + own < self.max
    }

    /// A router forward was written at QoS 1/2 with `pkid`.
    pub(super) fn sent(&mut self, pkid: u16) {
        self.router.insert(pkid);
    }

    /// A router PUBREL went to the client (one the router owes from an earlier
    /// connection too): the exchange under `pkid` is open until its PUBCOMP.
    pub(super) fn released(&mut self, pkid: u16) {
        self.pubrels.insert(pkid);
    }

    /// Whether a forward under `pkid` must wait for the client's exchange under that id
    /// to end. rumqttd numbers its forwards 1..=100 and takes an id again once the
    /// client's PUBREC came, before its PUBCOMP; a PUBLISH under an id whose exchange
    /// is still open would take the place of the message its PUBREL releases, and a
    /// PUBREL owed from before a reconnect would release the newcomer instead
    /// (MQTT 5 2.2.1, 3.1.1 2.3.1: an id is free again once its PUBCOMP came).
    pub(super) fn is_open(&self, pkid: u16) -> bool {
        pkid != 0 && self.pubrels.contains(&pkid)
    }

    /// Whether `forward` must wait for [`OutWindow::is_open`] (its packet id read only
    /// while some exchange is at its PUBREL: reading it costs a copy of the header).
    pub(super) fn must_wait(&self, forward: &Forward) -> bool {
        !self.pubrels.is_empty() && self.is_open(crate::codec::qos_and_pkid(&forward.publish).1)
    }

    /// The client is done with router forward `pkid` (PUBACK, PUBCOMP, or a PUBREC
    /// refusing it).
    pub(super) fn done(&mut self, pkid: u16) {
        self.router.remove(&pkid);
        self.pubrels.remove(&pkid);
    }

    /// A forward that must wait for room (behind any already waiting).
    pub(super) fn hold(&mut self, forward: Forward) {
        self.held.push_back(forward);
    }

    /// Whether forwards are waiting: newer ones queue behind them.
    pub(super) fn is_holding(&self) -> bool {
        !self.held.is_empty()
    }

    /// Every waiting forward, oldest first (shutdown: they go to the session store).
    pub(super) fn take_held(&mut self) -> Vec<Forward> {
        self.held.drain(..).collect()
    }

    /// The oldest waiting forward, if there is room for it and its packet id is free.
    pub(super) fn next_held(&mut self, own: usize) -> Option<Forward> {
        let front = self.held.front()?;
        if self.has_room(own) && !self.must_wait(front) {
            self.held.pop_front()
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttd::protocol::Publish;

    fn forward(n: u8) -> Forward {
        Forward {
            cursor: None,
            size: 1,
            publish: Publish::new(
                bytes::Bytes::from_static(b"t"),
                bytes::Bytes::from(vec![n]),
                false,
            ),
            properties: None,
        }
    }

    #[test]
    fn the_window_holds_forwards_until_an_acknowledgement_frees_a_slot() {
        let mut w = OutWindow::new(Some(2));
        assert!(w.has_room(0));
        w.sent(1);
        assert!(!w.has_room(1), "own deliveries count too");
        w.sent(2);
        assert!(!w.has_room(0));
        w.hold(forward(3));
        w.hold(forward(4));
        assert!(w.next_held(0).is_none(), "no room yet");
        w.done(1);
        let next = w.next_held(0).expect("room for one");
        assert_eq!(&next.publish.payload[..], &[3]);
        w.sent(3);
        assert!(w.next_held(0).is_none());
        assert!(w.is_holding());
        assert!(
            OutWindow::new(None).has_room(60_000),
            "none announced: 65,535"
        );
    }

    fn qos2_forward(pkid: u16) -> Forward {
        Forward {
            cursor: None,
            size: 1,
            publish: crate::codec::make_publish(
                bytes::Bytes::from_static(b"t"),
                bytes::Bytes::from(vec![pkid as u8]),
                rumqttd::protocol::QoS::ExactlyOnce,
                false,
                pkid,
            ),
            properties: None,
        }
    }

    #[test]
    fn a_forward_waits_while_the_exchange_under_its_packet_id_is_at_its_pubrel() {
        let mut w = OutWindow::new(None);
        w.sent(1);
        assert!(!w.must_wait(&qos2_forward(1)), "no PUBREL out");
        w.released(1);
        assert!(w.is_open(1), "PUBREL out, no PUBCOMP yet");
        assert!(w.must_wait(&qos2_forward(1)));
        assert!(!w.must_wait(&qos2_forward(2)));
        w.hold(qos2_forward(1));
        assert!(
            w.next_held(0).is_none(),
            "id 1 taken again before its PUBCOMP"
        );
        w.done(1);
        assert_eq!(w.next_held(0).map(|f| f.publish.payload[0]), Some(1));
        assert!(!w.is_open(1));
        assert!(!w.is_open(0), "QoS 0 has no id");
    }
}
