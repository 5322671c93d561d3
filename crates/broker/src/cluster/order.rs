//! Each node's messages in the order it numbered them (docs/cluster.md, "Ordering and
//! exactly-once points"). A node numbers what it forwards and publishes it to the
//! transfer stream in that order, but when its NATS connection drops with messages in
//! flight, one lost on the old connection is sent again (same id) after later ones went
//! out on the new connection, and the stream holds it after them. The receiving side
//! puts them back in order: a message numbered past the next one expected from its node
//! (and epoch) waits until the missing ones come, at most [`HOLD`] (a number its node
//! never stored: a message it could not seal or send, logged there); then it goes on
//! and the gap is given up.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use tokio::time::Instant;

/// How long a message waits for the ones its node numbered before it: longer than a
/// node takes to send again what it lost with its connection (its acknowledgement
/// timeout, 3 s, and a retry pause).
pub const HOLD: Duration = Duration::from_secs(5);
/// Messages held at most (all nodes); past it the oldest go on.
const MOST: usize = 8192;

/// Messages of other nodes put back in their nodes' order; `T` is what goes on.
pub struct Order<T> {
    origins: HashMap<String, Origin<T>>,
    held: usize,
}

struct Origin<T> {
    epoch: String,
    /// The number expected next.
    next: u64,
    /// Held, by first number.
    held: BTreeMap<u64, Held<T>>,
}

struct Held<T> {
    count: u64,
    since: Instant,
    /// Its stream sequence.
    seq: u64,
    item: T,
}

impl<T> Default for Order<T> {
    fn default() -> Self {
        Order {
            origins: HashMap::new(),
            held: 0,
        }
    }
}

/// Where a stream message stands: sequence `seq` in the stream, from `node`'s process
/// `epoch`, its messages numbered `first..first + count`.
pub struct Place<'a> {
    pub node: &'a str,
    pub epoch: &'a str,
    pub first: u64,
    pub count: u64,
    pub seq: u64,
}

impl<T> Order<T> {
    /// A stream message at `place`: what goes on now, in order, with its sequence.
    pub fn arrive(&mut self, place: Place<'_>, item: T, now: Instant) -> Vec<(u64, T)> {
        let Place {
            node,
            epoch,
            first,
            count,
            seq,
        } = place;
        let mut out = Vec::new();
        let origin = match self.origins.get_mut(node) {
            Some(o) if o.epoch == epoch => o,
            _ => {
                // The first from it, or from a new process of it (numbered from 1
                // again): what the old one left held goes on first.
                if let Some(old) = self.origins.remove(node) {
                    self.held -= old.held.len();
                    out.extend(old.held.into_values().map(|h| (h.seq, h.item)));
                }
                self.origins.entry(node.to_string()).or_insert(Origin {
                    epoch: epoch.to_string(),
                    next: first,
                    held: BTreeMap::new(),
                })
            }
        };
        if first > origin.next {
            origin.held.insert(
                first,
                Held {
                    count,
                    since: now,
                    seq,
                    item,
                },
            );
            self.held += 1;
            if self.held > MOST {
                out.extend(self.release_oldest());
            }
            return out;
        }
        // The one expected, or one given up for (it goes on as it comes).
        if first == origin.next {
            origin.next = first + count.max(1);
        }
        out.push((seq, item));
        self.held -= drain(origin, &mut out);
        out
    }

    /// What has waited [`HOLD`] by `now` goes on, with what follows it in order.
    pub fn due(&mut self, now: Instant) -> Vec<(u64, T)> {
        let mut out = Vec::new();
        for origin in self.origins.values_mut() {
            while let Some((&first, h)) = origin.held.iter().next() {
                if now < h.since + HOLD {
                    break;
                }
                origin.next = first;
                self.held -= drain(origin, &mut out);
            }
        }
        out
    }

    /// When [`Order::due`] has something next.
    pub fn deadline(&self) -> Option<Instant> {
        self.origins
            .values()
            .filter_map(|o| o.held.values().next().map(|h| h.since + HOLD))
            .min()
    }

    /// The lowest stream sequence held: the stream is taken in below it only.
    pub fn lowest_held(&self) -> Option<u64> {
        self.origins
            .values()
            .flat_map(|o| o.held.values().map(|h| h.seq))
            .min()
    }

    fn release_oldest(&mut self) -> Vec<(u64, T)> {
        let mut out = Vec::new();
        let oldest = self
            .origins
            .values_mut()
            .filter_map(|o| {
                let (&first, h) = o.held.iter().next()?;
                Some((h.since, first, o))
            })
            .min_by_key(|(since, ..)| *since);
        if let Some((_, first, origin)) = oldest {
            origin.next = first;
            self.held -= drain(origin, &mut out);
        }
        out
    }
}

/// Moves the held messages that follow `origin.next` in order to `out`; how many.
fn drain<T>(origin: &mut Origin<T>, out: &mut Vec<(u64, T)>) -> usize {
    let mut n = 0;
    while let Some(h) = origin.held.remove(&origin.next) {
        origin.next += h.count.max(1);
        out.push((h.seq, h.item));
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(
        node: &'static str,
        epoch: &'static str,
        first: u64,
        count: u64,
        seq: u64,
    ) -> Place<'static> {
        Place {
            node,
            epoch,
            first,
            count,
            seq,
        }
    }

    fn items(out: Vec<(u64, &'static str)>) -> Vec<&'static str> {
        out.into_iter().map(|(_, i)| i).collect()
    }

    #[test]
    fn a_message_sent_again_after_later_ones_goes_before_them() {
        let now = Instant::now();
        let mut o = Order::default();
        assert_eq!(items(o.arrive(at("a", "1", 1, 2, 10), "1-2", now)), ["1-2"]);
        // 3 was lost with the connection; 4 and 5 came on the new one first.
        assert!(o.arrive(at("a", "1", 4, 1, 11), "4", now).is_empty());
        assert!(o.arrive(at("a", "1", 5, 3, 12), "5-7", now).is_empty());
        assert_eq!(o.lowest_held(), Some(11));
        // Another node's messages are not held up.
        assert_eq!(items(o.arrive(at("b", "1", 9, 1, 13), "b9", now)), ["b9"]);
        assert_eq!(
            items(o.arrive(at("a", "1", 3, 1, 14), "3", now)),
            ["3", "4", "5-7"]
        );
        assert_eq!(o.lowest_held(), None);
        assert_eq!(items(o.arrive(at("a", "1", 8, 1, 15), "8", now)), ["8"]);
        // A redelivery of an earlier one (dropped before, by its id) goes as it comes.
        assert_eq!(items(o.arrive(at("a", "1", 2, 1, 16), "2", now)), ["2"]);
    }

    #[test]
    fn a_gap_that_never_fills_is_given_up_after_the_hold() {
        let now = Instant::now();
        let mut o = Order::default();
        o.arrive(at("a", "1", 1, 1, 1), "1", now);
        assert!(o.arrive(at("a", "1", 3, 1, 2), "3", now).is_empty());
        assert!(o
            .arrive(at("a", "1", 5, 1, 3), "5", now + Duration::from_secs(1))
            .is_empty());
        assert_eq!(o.deadline(), Some(now + HOLD));
        assert!(o.due(now + HOLD - Duration::from_millis(1)).is_empty());
        assert_eq!(items(o.due(now + HOLD)), ["3"]);
        assert_eq!(items(o.due(now + HOLD + Duration::from_secs(1))), ["5"]);
        assert_eq!(items(o.arrive(at("a", "1", 6, 1, 4), "6", now)), ["6"]);
    }

    #[test]
    fn a_new_process_of_a_node_starts_its_numbers_again() {
        let now = Instant::now();
        let mut o = Order::default();
        o.arrive(at("a", "1", 1, 1, 1), "old 1", now);
        assert!(o.arrive(at("a", "1", 3, 1, 2), "old 3", now).is_empty());
        // Restarted: what the old process left held goes first.
        assert_eq!(
            items(o.arrive(at("a", "2", 1, 1, 3), "new 1", now)),
            ["old 3", "new 1"]
        );
        assert_eq!(
            items(o.arrive(at("a", "2", 2, 1, 4), "new 2", now)),
            ["new 2"]
        );
        assert_eq!(o.deadline(), None);
    }
}
