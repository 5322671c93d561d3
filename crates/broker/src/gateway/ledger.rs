//! The client's QoS 1/2 publishes on their way in: the receive maximum we announced
//! (MQTT-3.3.4-7/8), and QoS 2 exchanges until their PUBREL (a resend is not delivered
//! twice, MQTT-4.3.3-10): those admitted (the router has them as QoS 1 at once), those
//! we refused, and those that went in before a reconnect or restart (the session store
//! remembers them); we owe the PUBCOMP of each.

use rumqttd::protocol::{Packet, PubRecReason, QoS};
use std::collections::HashSet;

/// The client sent more unacknowledged QoS 1/2 publishes than we allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ReceiveMaximumExceeded;

/// Who answers a client's PUBREL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Release {
    /// We admitted or refused the message, or it went in before a reconnect or restart:
    /// our PUBCOMP ends the exchange.
    Ours,
    /// Nothing is held under that id (a resend after a reconnect, a made-up id): we
    /// answer, without bothering the router (which would drop the link).
    Unknown,
}

/// Incoming QoS 1/2 state of one connection.
pub(super) struct Ledger {
    /// Receive maximum; `None` for 3.1.1, which has none.
    max: Option<u16>,
    /// Packet ids received and not yet acknowledged to the end (MQTT 5 only).
    open: HashSet<u16>,
    /// QoS 2 publishes we refused (3.1.1, which cannot say no in its PUBREC).
    refused: HashSet<u16>,
    /// QoS 2 publishes admitted, given to the router at once (as QoS 1) so that none
    /// waits in the router's memory for its PUBREL, or admitted before a reconnect or
    /// restart: PUBREL not yet received, our PUBCOMP owed.
    restored: HashSet<u16>,
    /// Those of `restored` from before this connection (the session store's, after a
    /// reconnect, a restart or a move), until the client sends them again with DUP:
    /// the store may be behind the client ([`Ledger::is_resend`]).
    carried: HashSet<u16>,
}

impl Ledger {
    /// `receive_max`: what the CONNACK announced, enforced for MQTT 5 clients.
    pub(super) fn new(receive_max: Option<u16>) -> Ledger {
        Ledger {
            max: receive_max,
            open: HashSet::new(),
            refused: HashSet::new(),
            restored: HashSet::new(),
            carried: HashSet::new(),
        }
    }

    /// A QoS 2 PUBLISH admitted already, sent again before its PUBREL: its PUBREC is
    /// ours to repeat, and it must not reach the router twice. One under the id of an
    /// exchange carried from before this connection is a resend only with DUP (as a
    /// client sets it on every resend, MQTT-3.3.1-1): without, the client completed
    /// that exchange where the session store did not record it (a crash with
    /// `autosave_interval` above 0 after the PUBCOMP, before the next save), and this
    /// is a new message, which taken for a resend would be acknowledged and lost.
    pub(super) fn is_resend(&mut self, qos: QoS, pkid: u16, dup: bool) -> bool {
        if qos != QoS::ExactlyOnce || !self.restored.contains(&pkid) {
            return false;
        }
        if self.carried.remove(&pkid) && !dup {
            self.restored.remove(&pkid);
            return false;
        }
        true
    }

    /// The QoS 2 PUBLISH `pkid` of this session went in before this connection (the
    /// session store remembers it): [`Ledger::restore`], until the client confirms it.
    pub(super) fn carry(&mut self, pkid: u16) {
        self.restored.insert(pkid);
        self.carried.insert(pkid);
    }

    /// The QoS 2 PUBLISH `pkid` of this session went in (now, or before it reconnected
    /// or the broker restarted): a resend is not admitted again, and its PUBREL is ours.
    pub(super) fn restore(&mut self, pkid: u16) {
        self.restored.insert(pkid);
    }

    /// Whether the router's PUBACK for `pkid` is the PUBREC we owe for a QoS 2 PUBLISH
    /// we gave it as QoS 1.
    pub(super) fn is_ours(&self, pkid: u16) -> bool {
        self.restored.contains(&pkid)
    }

    /// A QoS 1/2 PUBLISH arrives: it takes a receive-maximum slot until it is
    /// acknowledged ([`Ledger::answered`]).
    pub(super) fn open(&mut self, qos: QoS, pkid: u16) -> Result<(), ReceiveMaximumExceeded> {
        let Some(max) = self.max else {
            return Ok(());
        };
        if qos == QoS::AtMostOnce || self.open.contains(&pkid) {
            return Ok(());
        }
        if self.open.len() >= usize::from(max) {
            return Err(ReceiveMaximumExceeded);
        }
        self.open.insert(pkid);
        Ok(())
    }

    /// We refused the QoS 2 PUBLISH `pkid` but acknowledged it with success (3.1.1).
    pub(super) fn refuse(&mut self, pkid: u16) {
        self.refused.insert(pkid);
    }

    /// The client's PUBREL for `pkid`: who answers it.
    pub(super) fn release(&mut self, pkid: u16) -> Release {
        self.carried.remove(&pkid);
        if self.refused.remove(&pkid) || self.restored.remove(&pkid) {
            Release::Ours
        } else {
            Release::Unknown
        }
    }

    /// A packet to the client: one that ends an incoming exchange frees its slot (a
    /// PUBACK, a PUBCOMP, or a PUBREC refusing the message).
    pub(super) fn answered(&mut self, packet: &Packet) {
        let pkid = match packet {
            Packet::PubAck(ack, _) => ack.pkid,
            Packet::PubComp(comp, _) => comp.pkid,
            Packet::PubRec(rec, _)
                if !matches!(
                    rec.reason,
                    PubRecReason::Success | PubRecReason::NoMatchingSubscribers
                ) =>
            {
                rec.pkid
            }
            _ => return,
        };
        self.open.remove(&pkid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttd::protocol::{PubAck, PubAckReason, PubComp, PubCompReason, PubRec};

    fn puback(pkid: u16) -> Packet {
        let reason = PubAckReason::Success;
        Packet::PubAck(PubAck { pkid, reason }, None)
    }

    fn pubcomp(pkid: u16, reason: PubCompReason) -> Packet {
        Packet::PubComp(PubComp { pkid, reason }, None)
    }

    #[test]
    fn the_receive_maximum_counts_open_exchanges_only() {
        let mut l = Ledger::new(Some(2));
        assert_eq!(l.open(QoS::AtLeastOnce, 1), Ok(()));
        assert_eq!(l.open(QoS::ExactlyOnce, 2), Ok(()));
        assert_eq!(l.open(QoS::AtMostOnce, 0), Ok(()), "QoS 0 takes no slot");
        assert_eq!(l.open(QoS::AtLeastOnce, 3), Err(ReceiveMaximumExceeded));
        l.answered(&puback(1));
        assert_eq!(l.open(QoS::AtLeastOnce, 3), Ok(()));
        // A PUBREC with success keeps a QoS 2 slot until the PUBCOMP.
        let rec = PubRec {
            pkid: 2,
            reason: PubRecReason::Success,
        };
        l.answered(&Packet::PubRec(rec, None));
        assert_eq!(l.open(QoS::AtLeastOnce, 4), Err(ReceiveMaximumExceeded));
        l.answered(&pubcomp(2, PubCompReason::Success));
        assert_eq!(l.open(QoS::AtLeastOnce, 4), Ok(()));
        // A PUBCOMP for an id never opened (an unknown PUBREL's answer) frees nothing.
        l.answered(&pubcomp(9, PubCompReason::PacketIdentifierNotFound));
        assert_eq!(l.open(QoS::AtLeastOnce, 5), Err(ReceiveMaximumExceeded));
    }

    #[test]
    fn a_3_1_1_client_has_no_receive_maximum() {
        let mut l = Ledger::new(None);
        for pkid in 1..1000 {
            assert_eq!(l.open(QoS::AtLeastOnce, pkid), Ok(()));
        }
    }

    #[test]
    fn a_pubrel_is_answered_once() {
        let mut l = Ledger::new(Some(10));
        l.restore(1);
        l.refuse(2);
        assert!(l.is_resend(QoS::ExactlyOnce, 1, true));
        assert!(
            !l.is_resend(QoS::AtLeastOnce, 1, true),
            "QoS 1 resends are delivered"
        );
        assert_eq!(l.release(1), Release::Ours);
        assert!(!l.is_resend(QoS::ExactlyOnce, 1, true), "released");
        assert_eq!(l.release(1), Release::Unknown, "a second PUBREL");
        assert_eq!(l.release(2), Release::Ours);
        assert_eq!(l.release(3), Release::Unknown);
    }

    #[test]
    fn a_restored_exchange_is_not_admitted_again_and_completed_by_us() {
        let mut l = Ledger::new(None);
        l.restore(9);
        assert!(
            l.is_resend(QoS::ExactlyOnce, 9, true),
            "a resent PUBLISH gets PUBREC only"
        );
        assert_eq!(l.release(9), Release::Ours);
        assert!(!l.is_resend(QoS::ExactlyOnce, 9, true));
        assert_eq!(l.release(9), Release::Unknown);
    }

    #[test]
    fn a_carried_exchange_is_resent_only_with_dup() {
        let mut l = Ledger::new(None);
        l.carry(7);
        l.carry(8);
        l.restore(9);
        // A resend of a carried exchange comes with DUP: not admitted again.
        assert!(l.is_resend(QoS::ExactlyOnce, 7, true));
        assert!(
            l.is_resend(QoS::ExactlyOnce, 7, false),
            "confirmed: live now"
        );
        // Without DUP under a carried id: a new message, the old exchange gone.
        assert!(!l.is_resend(QoS::ExactlyOnce, 8, false));
        assert!(!l.is_ours(8));
        assert_eq!(l.release(8), Release::Unknown);
        // Admitted in this connection: a resend with or without DUP.
        assert!(l.is_resend(QoS::ExactlyOnce, 9, false));
        assert!(
            !l.is_resend(QoS::AtLeastOnce, 9, true),
            "QoS 1 is never one"
        );
        assert_eq!(l.release(7), Release::Ours);
        assert!(!l.is_resend(QoS::ExactlyOnce, 7, true), "completed");
    }
}
