//! A session's held messages by id, oldest first. Ids only grow as messages are queued
//! (and a log replays them in that order), and a session's client takes them mostly
//! oldest first: so they live in one ring in id order, a new message goes at the end
//! without a search, one taken out leaves a hole that the front or a sweep drops, and a
//! lookup is a binary search over contiguous memory. (A B-tree searched and split its
//! nodes for every message queued: the largest item of the session writer's profile.)

use std::collections::VecDeque;

use crate::session::HeldMessage;

/// Held messages by id, in id order.
#[derive(Debug, Clone, Default)]
pub struct HeldMessages {
    /// In increasing id order; `None` for one taken out, until the front passes it or
    /// a sweep drops it.
    slots: VecDeque<(u64, Option<HeldMessage>)>,
    len: usize,
}

/// Holes are swept once there are more of them than this and than messages; and the
/// ring gives back half its room once a quarter of it is used, above this much.
const SWEEP_AFTER: usize = 64;

impl HeldMessages {
    /// How many messages are held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn find(&self, id: u64) -> Result<usize, usize> {
        self.slots.binary_search_by_key(&id, |&(i, _)| i)
    }

    pub fn get(&self, id: &u64) -> Option<&HeldMessage> {
        let at = self.find(*id).ok()?;
        self.slots[at].1.as_ref()
    }

    pub fn get_mut(&mut self, id: &u64) -> Option<&mut HeldMessage> {
        let at = self.find(*id).ok()?;
        self.slots[at].1.as_mut()
    }

    pub fn contains_key(&self, id: &u64) -> bool {
        self.get(id).is_some()
    }

    /// Holds `message` under `id`, or gives it back if `id` is held already.
    pub fn insert_new(&mut self, id: u64, message: HeldMessage) -> Result<(), HeldMessage> {
        match self.slots.back() {
            Some(&(last, _)) if last >= id => match self.find(id) {
                Ok(at) => match &mut self.slots[at].1 {
                    Some(_) => return Err(message),
                    hole => *hole = Some(message),
                },
                Err(at) => self.slots.insert(at, (id, Some(message))),
            },
            _ => self.slots.push_back((id, Some(message))),
        }
        self.len += 1;
        Ok(())
    }

    /// Takes the message `id` out.
    pub fn remove(&mut self, id: &u64) -> Option<HeldMessage> {
        let at = self.find(*id).ok()?;
        let held = self.slots[at].1.take()?;
        self.len -= 1;
        while matches!(self.slots.front(), Some((_, None))) {
            self.slots.pop_front();
        }
        while matches!(self.slots.back(), Some((_, None))) {
            self.slots.pop_back();
        }
        let holes = self.slots.len() - self.len;
        if holes > SWEEP_AFTER && holes > self.len {
            self.slots.retain(|(_, m)| m.is_some());
        }
        // A drained burst does not keep its memory.
        let room = self.slots.capacity();
        if room > SWEEP_AFTER && self.slots.len() < room / 4 {
            self.slots.shrink_to(room / 2);
        }
        Some(held)
    }

    /// Every message with its id, oldest first.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (&u64, &HeldMessage)> {
        self.slots
            .iter()
            .filter_map(|(id, m)| m.as_ref().map(|m| (id, m)))
    }

    /// The ids, oldest first.
    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &u64> {
        self.iter().map(|(id, _)| id)
    }

    /// The messages, oldest first.
    pub fn values(&self) -> impl DoubleEndedIterator<Item = &HeldMessage> {
        self.iter().map(|(_, m)| m)
    }
}

impl PartialEq for HeldMessages {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.iter().eq(other.iter())
    }
}

impl Eq for HeldMessages {}

/// For tests, which read ids they know are held: panics otherwise, as a map's index
/// does. The broker uses [`HeldMessages::get`].
#[cfg(test)]
impl std::ops::Index<&u64> for HeldMessages {
    type Output = HeldMessage;

    fn index(&self, id: &u64) -> &HeldMessage {
        self.get(id).expect("no held message with that id")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::{Delivery, QueuedMessage};
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn held(n: u64) -> HeldMessage {
        HeldMessage {
            message: QueuedMessage {
                topic: format!("t/{n}"),
                payload: bytes::Bytes::new(),
                qos: 1,
                retain: false,
                properties: None,
                expires_at: None,
            },
            delivery: Delivery::Queued,
            frame: n,
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64),
        Remove(u64),
        Mark(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u64..400).prop_map(Op::Insert),
            3 => (0u64..400).prop_map(Op::Remove),
            1 => (0u64..400).prop_map(Op::Mark),
        ]
    }

    proptest! {
        /// Whatever the order of inserts and removals, it holds what a B-tree would.
        #[test]
        fn holds_what_an_ordered_map_holds(ops in proptest::collection::vec(op(), 0..600)) {
            let mut model: BTreeMap<u64, HeldMessage> = BTreeMap::new();
            let mut held_messages = HeldMessages::default();
            for op in ops {
                match op {
                    Op::Insert(id) => {
                        let new = !model.contains_key(&id);
                        if new {
                            model.insert(id, held(id));
                        }
                        prop_assert_eq!(held_messages.insert_new(id, held(id)).is_ok(), new);
                    }
                    Op::Remove(id) => {
                        prop_assert_eq!(
                            held_messages.remove(&id).map(|h| h.frame),
                            model.remove(&id).map(|h| h.frame)
                        );
                    }
                    Op::Mark(id) => {
                        if let (Some(a), Some(b)) = (held_messages.get_mut(&id), model.get_mut(&id)) {
                            a.delivery = Delivery::Sent { pkid: 7 };
                            b.delivery = Delivery::Sent { pkid: 7 };
                        } else {
                            prop_assert!(held_messages.get(&id).is_none() && !model.contains_key(&id));
                        }
                    }
                }
                prop_assert_eq!(held_messages.len(), model.len());
            }
            let got: Vec<_> = held_messages.iter().map(|(&id, h)| (id, h.delivery)).collect();
            let want: Vec<_> = model.iter().map(|(&id, h)| (id, h.delivery)).collect();
            prop_assert_eq!(got, want);
            prop_assert_eq!(held_messages.keys().next_back(), model.keys().next_back());
            for id in 0..400 {
                prop_assert_eq!(held_messages.contains_key(&id), model.contains_key(&id));
            }
        }
    }

    #[test]
    fn a_queue_drained_from_the_front_keeps_no_holes() {
        let mut m = HeldMessages::default();
        for id in 0..10_000 {
            m.insert_new(id, held(id)).unwrap();
        }
        for id in 0..9_990 {
            assert!(m.remove(&id).is_some());
        }
        assert_eq!(m.len(), 10);
        assert_eq!(m.slots.len(), 10, "the front's holes are dropped");
        assert!(
            m.slots.capacity() <= 4 * SWEEP_AFTER,
            "the drained room is given back"
        );
        // Taken out of order (every other one): the holes are swept.
        for id in (10_000..20_000).step_by(1) {
            m.insert_new(id, held(id)).unwrap();
        }
        for id in (10_000..20_000).step_by(2) {
            m.remove(&id);
        }
        assert_eq!(m.len(), 5_010);
        assert!(m.slots.len() < 2 * m.len() + SWEEP_AFTER + 2);
    }
}
