//! Acknowledgements to the router, kept in the order it expects them.
//!
//! rumqttd 0.20 accepts PUBACK/PUBREC only for the oldest message it has in flight to a
//! client, and PUBCOMP only for the oldest PUBREL; anything else drops the link. Clients
//! acknowledge in order (MQTT-4.6.0-2), but the gateway also acknowledges messages it
//! withholds (read ACL, the client's maximum packet size) and the PUBCOMPs of those, at
//! the moment it withholds them. This queue holds such acknowledgements back until every
//! older one has been sent, so the router always sees them in its own order.
//!
//! An acknowledgement for nothing in flight (a duplicate, a made-up id) is dropped here:
//! the router would drop the link itself, and the gateway keeps every link teardown in
//! its own hands (docs/security.md, "Router panics").

use rumqttd::protocol::Packet;
use std::collections::VecDeque;

/// One message in flight to the client, oldest first.
struct Slot {
    pkid: u16,
    /// The acknowledgement for the router, once there is one.
    ack: Option<Packet>,
}

/// One sequence the router checks, oldest first. Its acknowledgements come from the
/// client or from the gateway, and leave in order.
#[derive(Default)]
struct Sequence(VecDeque<Slot>, Counts);

/// How many messages entered a sequence, and how many of them left it acknowledged,
/// since the connection began: the first `left` to enter are done with.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub entered: u64,
    pub left: u64,
}

impl Sequence {
    /// `pkid` went to the client: its acknowledgement comes from it.
    fn sent(&mut self, pkid: u16) {
        self.1.entered += 1;
        self.0.push_back(Slot { pkid, ack: None });
    }

    /// `pkid` was withheld from the client: `ack` is ours, to send in its turn.
    fn ours(&mut self, pkid: u16, ack: Packet, out: &mut Vec<Packet>) {
        self.1.entered += 1;
        self.0.push_back(Slot {
            pkid,
            ack: Some(ack),
        });
        self.release(out);
    }

    /// The client acknowledged `pkid`. An id not waiting for one is dropped.
    fn answered(&mut self, pkid: u16, ack: Packet, out: &mut Vec<Packet>) {
        match self
            .0
            .iter_mut()
            .find(|s| s.pkid == pkid && s.ack.is_none())
        {
            Some(slot) => slot.ack = Some(ack),
            None => return,
        }
        self.release(out);
    }

    /// Moves the acknowledgements at the front, up to the first still missing, to `out`.
    fn release(&mut self, out: &mut Vec<Packet>) {
        while self.0.front().is_some_and(|s| s.ack.is_some()) {
            if let Some(Slot { ack: Some(ack), .. }) = self.0.pop_front() {
                self.1.left += 1;
                out.push(ack);
            }
        }
    }
}

/// The two ordered sequences the router checks: in-flight publishes (acknowledged by
/// PUBACK or PUBREC) and PUBRELs (completed by PUBCOMP).
#[derive(Default)]
pub struct AckOrder {
    inflight: Sequence,
    pubrels: Sequence,
}

impl AckOrder {
    /// A QoS 1/2 message was written to the client: its acknowledgement comes from it.
    pub fn delivered(&mut self, pkid: u16) {
        self.inflight.sent(pkid);
    }

    /// A QoS 1/2 message was withheld: `ack` is ours, to send in its turn.
    pub fn withheld(&mut self, pkid: u16, ack: Packet, out: &mut Vec<Packet>) {
        self.inflight.ours(pkid, ack, out);
    }

    /// The client's PUBACK or PUBREC for `pkid`. An id not in flight is dropped.
    pub fn client_ack(&mut self, pkid: u16, ack: Packet, out: &mut Vec<Packet>) {
        self.inflight.answered(pkid, ack, out);
    }

    /// The router sent a PUBREL that was forwarded to the client.
    pub fn pubrel_forwarded(&mut self, pkid: u16) {
        self.pubrels.sent(pkid);
    }

    /// The router sent a PUBREL for a withheld message: `comp` is ours.
    pub fn pubrel_withheld(&mut self, pkid: u16, comp: Packet, out: &mut Vec<Packet>) {
        self.pubrels.ours(pkid, comp, out);
    }

    /// The client's PUBCOMP for `pkid`.
    pub fn client_comp(&mut self, pkid: u16, comp: Packet, out: &mut Vec<Packet>) {
        self.pubrels.answered(pkid, comp, out);
    }

    /// Every message in flight acknowledged now, in order (the session leaves this
    /// router, and what the client was sent is in the session store): ours where there
    /// is one, a PUBACK otherwise, which frees the router's slot whatever the QoS.
    pub fn settle_all(&mut self, out: &mut Vec<Packet>) {
        for slot in self.inflight.0.drain(..) {
            self.inflight.1.left += 1;
            out.push(slot.ack.unwrap_or_else(|| puback(slot.pkid)));
        }
    }

    /// The messages in flight to the client (PUBLISHes, not PUBRELs) so far: a QoS 2
    /// one leaves at its PUBREC, when the client has it.
    pub fn inflight_counts(&self) -> Counts {
        self.inflight.1
    }
}

/// A successful PUBACK for `pkid`, to the router.
pub fn puback(pkid: u16) -> Packet {
    Packet::PubAck(
        rumqttd::protocol::PubAck {
            pkid,
            reason: rumqttd::protocol::PubAckReason::Success,
        },
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttd::protocol::{PubAck, PubAckReason, PubComp, PubCompReason};

    fn ack(pkid: u16) -> Packet {
        Packet::PubAck(
            PubAck {
                pkid,
                reason: PubAckReason::Success,
            },
            None,
        )
    }
    fn ids(out: &[Packet]) -> Vec<u16> {
        out.iter()
            .map(|p| match p {
                Packet::PubAck(a, _) => a.pkid,
                Packet::PubComp(c, _) => c.pkid,
                _ => 0,
            })
            .collect()
    }

    #[test]
    fn counts_say_how_many_of_the_first_forwards_are_done_with() {
        let mut q = AckOrder::default();
        let mut out = Vec::new();
        q.delivered(1);
        q.withheld(2, ack(2), &mut out);
        q.delivered(3);
        let c = q.inflight_counts();
        assert_eq!((c.entered, c.left), (3, 0));
        // 3 answered first: nothing leaves before 1 does.
        q.client_ack(3, ack(3), &mut out);
        assert_eq!(q.inflight_counts().left, 0);
        q.client_ack(1, ack(1), &mut out);
        assert_eq!(q.inflight_counts().left, 3);
        // A made-up id changes nothing.
        q.client_ack(9, ack(9), &mut out);
        assert_eq!(
            q.inflight_counts(),
            Counts {
                entered: 3,
                left: 3
            }
        );
        // PUBRELs are another sequence.
        q.pubrel_forwarded(1);
        assert_eq!(
            q.inflight_counts(),
            Counts {
                entered: 3,
                left: 3
            }
        );
        q.delivered(4);
        q.settle_all(&mut out);
        assert_eq!(
            q.inflight_counts(),
            Counts {
                entered: 4,
                left: 4
            }
        );
    }

    #[test]
    fn a_withheld_ack_waits_for_older_deliveries() {
        let mut q = AckOrder::default();
        let mut out = Vec::new();
        q.delivered(1);
        q.withheld(2, ack(2), &mut out);
        q.delivered(3);
        assert!(out.is_empty(), "2 must wait for 1");
        q.client_ack(1, ack(1), &mut out);
        assert_eq!(ids(&out), vec![1, 2]);
        out.clear();
        q.client_ack(3, ack(3), &mut out);
        assert_eq!(ids(&out), vec![3]);
    }

    #[test]
    fn pubcomps_keep_pubrel_order_and_unknown_ids_are_dropped() {
        let mut q = AckOrder::default();
        let mut out = Vec::new();
        let comp = |pkid| {
            Packet::PubComp(
                PubComp {
                    pkid,
                    reason: PubCompReason::Success,
                },
                None,
            )
        };
        q.pubrel_forwarded(7);
        q.pubrel_withheld(8, comp(8), &mut out);
        assert!(out.is_empty());
        q.client_comp(7, comp(7), &mut out);
        assert_eq!(ids(&out), vec![7, 8]);
        out.clear();
        q.client_ack(99, ack(99), &mut out);
        q.client_comp(7, comp(7), &mut out);
        assert!(out.is_empty(), "nothing in flight: {:?}", ids(&out));
    }

    #[test]
    fn settling_all_acknowledges_every_message_in_flight_in_order() {
        let mut order = AckOrder::default();
        let mut out = Vec::new();
        order.delivered(1);
        order.delivered(2);
        order.withheld(3, ack(3), &mut out);
        order.delivered(4);
        assert!(out.is_empty(), "held behind 1");
        order.settle_all(&mut out);
        assert_eq!(ids(&out), vec![1, 2, 3, 4]);
        // Nothing is left to acknowledge twice.
        out.clear();
        order.client_ack(4, ack(4), &mut out);
        assert!(out.is_empty());
    }
}
