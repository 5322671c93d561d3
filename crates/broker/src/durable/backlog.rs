//! A resumed session's backlog: the messages queued for it in this run, while it was
//! offline, which the router holds too and forwards after the reconnect. They stay in
//! the store until the client acknowledges each one, so a crash in the middle of a
//! drain loses none of them: a forward is matched to its stored copy here and that copy
//! marked sent, instead of the copy being dropped at the reconnect and the forward
//! stored again.
//!
//! A forward is found by its payload, which the stored copy shares with the router's
//! (the same allocation: admit hands both the same `Bytes`), checked against the stored
//! topic and payload; failing that (a payload the router copied), by content among the
//! oldest unmatched messages. What the router never forwards (refused at delivery,
//! dropped, QoS 0) is completed once the drain is well past it.

use moatmq_store::QueuedMessage;
use std::collections::{HashMap, VecDeque};

/// Address and length of a payload shared with the router's copy.
type PayloadId = (usize, usize);

/// How far behind the newest matched message an unmatched one may fall before it is
/// taken as never coming (the router's order differs from the store's only by how
/// publishers on different threads interleave).
const SKIP_AFTER: u64 = 4096;

/// How many of the oldest messages (from the first unmatched one) a forward is compared
/// with by content.
const BY_CONTENT: usize = 8;

fn payload_id(message: &QueuedMessage) -> PayloadId {
    (message.payload.as_ptr() as usize, message.payload.len())
}

/// Whether `stored` is the message `forward` carries.
fn same(stored: &QueuedMessage, forward: &QueuedMessage) -> bool {
    stored.topic == forward.topic && stored.payload == forward.payload
}

#[derive(Debug, Default)]
pub(super) struct Backlog {
    /// Store ids in queue order with their payloads; matched ones leave `unmatched` and
    /// are passed over here.
    order: VecDeque<(u64, PayloadId)>,
    unmatched: HashMap<PayloadId, u64>,
}

impl Backlog {
    /// Adds the stored message `id` (ids in increasing order).
    pub(super) fn push(&mut self, id: u64, message: &QueuedMessage) {
        let pid = payload_id(message);
        // Two messages with one payload id (empty payloads) cannot both be found by
        // it: the later one is found by content or completed as skipped.
        self.unmatched.entry(pid).or_insert(id);
        self.order.push_back((id, pid));
    }

    pub(super) fn is_empty(&self) -> bool {
        self.unmatched.is_empty()
    }

    /// The store id of the backlog message `forward` is, taken out of the backlog;
    /// `stored(id)` reads a stored message. Also returns the ids the drain has passed
    /// by more than [`SKIP_AFTER`]: the caller completes them.
    pub(super) fn take<'s>(
        &mut self,
        forward: &QueuedMessage,
        stored: impl Fn(u64) -> Option<&'s QueuedMessage>,
    ) -> (Option<u64>, Vec<u64>) {
        let pid = payload_id(forward);
        let found = match self.unmatched.get(&pid) {
            Some(&id) if stored(id).is_some_and(|s| same(s, forward)) => Some((pid, id)),
            _ => self
                .order
                .iter()
                .take(BY_CONTENT)
                .filter(|(id, p)| self.unmatched.get(p) == Some(id))
                .find(|(id, _)| stored(*id).is_some_and(|s| same(s, forward)))
                .copied()
                .map(|(id, p)| (p, id)),
        };
        let Some((pid, id)) = found else {
            return (None, Vec::new());
        };
        self.unmatched.remove(&pid);
        let mut skipped = Vec::new();
        while let Some(&(front, p)) = self.order.front() {
            let pending = self.unmatched.get(&p) == Some(&front);
            if pending && front.saturating_add(SKIP_AFTER) >= id {
                break;
            }
            if pending {
                self.unmatched.remove(&p);
                skipped.push(front);
            }
            self.order.pop_front();
        }
        (Some(id), skipped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn message(topic: &str, payload: &Bytes) -> QueuedMessage {
        QueuedMessage {
            topic: topic.into(),
            payload: payload.clone(),
            qos: 1,
            retain: false,
            properties: None,
            expires_at: None,
        }
    }

    /// `n` stored messages, ids 0.., and a backlog of all of them.
    fn stored(n: usize) -> (Vec<QueuedMessage>, Backlog) {
        let stored: Vec<QueuedMessage> = (0..n)
            .map(|i| message("t", &Bytes::from(format!("m{i}"))))
            .collect();
        let mut b = Backlog::default();
        stored
            .iter()
            .enumerate()
            .for_each(|(i, m)| b.push(i as u64, m));
        (stored, b)
    }

    #[test]
    fn forwards_are_matched_by_shared_payload_in_any_order() {
        let (stored, mut b) = stored(5);
        let get = |id: u64| stored.get(id as usize);
        for i in [2, 0, 4, 1, 3] {
            assert_eq!(b.take(&stored[i].clone(), get), (Some(i as u64), vec![]));
        }
        assert!(b.is_empty());
        // Taken once only.
        assert_eq!(b.take(&stored[2].clone(), get).0, None);
    }

    #[test]
    fn a_copied_payload_is_found_by_content_and_a_stranger_not_at_all() {
        let stored = [message("a", &Bytes::from_static(b"x"))];
        let mut b = Backlog::default();
        b.push(7, &stored[0]);
        let get = |id: u64| (id == 7).then_some(&stored[0]);
        let stranger = message("b", &Bytes::from(b"x".to_vec()));
        assert_eq!(b.take(&stranger, get), (None, vec![]));
        let copy = message("a", &Bytes::from(b"x".to_vec()));
        assert_eq!(b.take(&copy, get), (Some(7), vec![]));
    }

    #[test]
    fn what_the_drain_passes_by_far_is_given_up() {
        let (stored, mut b) = stored(SKIP_AFTER as usize + 3);
        let get = |id: u64| stored.get(id as usize);
        // 0 and 1 never come (refused at delivery); 2.. do.
        let mut skipped = Vec::new();
        for m in &stored[2..] {
            let (id, s) = b.take(&m.clone(), get);
            assert!(id.is_some());
            skipped.extend(s);
        }
        assert_eq!(skipped, vec![0, 1]);
        assert!(b.is_empty());
    }
}
