//! This node's retained changes waiting for the cluster's bucket (`state.rs`): the
//! latest change of each KV key, in the order their keys first waited, and the numbers
//! of the changes not stored yet, which QoS 1/2 publishers' acknowledgements wait for
//! (`Cluster::retained_stored_through`).

use moatmq_store::RetainedMessage;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// A retained change `admit` let in on this node, on its way to the bucket.
pub enum Change {
    /// Set or replace the message of its topic.
    Put(RetainedMessage),
    /// Clear the message of this topic.
    Delete(String),
}

/// A retained change numbered in admit order, on its way to the bucket's task.
pub struct Numbered {
    pub number: u64,
    pub change: Change,
    /// A publisher's acknowledgement waits for it (QoS 1/2): kept past the cap, which
    /// only the connections held for it can fill (each with one read at most).
    pub awaited: bool,
}

/// The changes waiting, at most `cap` keys of changes no one waits for.
pub struct Waiting {
    /// Keys by the place they took when they began to wait.
    order: BTreeMap<u64, String>,
    changes: HashMap<String, Entry>,
    /// The place the next key takes.
    next: u64,
    /// The numbers of the changes not stored yet, those replaced by a later change of
    /// their key included (stored when it is).
    numbers: BTreeSet<u64>,
    cap: usize,
}

struct Entry {
    place: u64,
    change: Change,
    numbers: Vec<u64>,
}

impl Waiting {
    pub fn new(cap: usize) -> Waiting {
        Waiting {
            order: BTreeMap::new(),
            changes: HashMap::new(),
            next: 0,
            numbers: BTreeSet::new(),
            cap,
        }
    }

    /// Keeps `change` for `key`, replacing an older change of it in place; `false`
    /// (not kept) when `cap` other keys wait already and no one waits for it.
    pub fn push(
        &mut self,
        key: String,
        change: Change,
        number: Option<u64>,
        awaited: bool,
    ) -> bool {
        if let Some(waiting) = self.changes.get_mut(&key) {
            waiting.change = change;
            waiting.numbers.extend(number);
            self.numbers.extend(number);
            return true;
        }
        if !awaited && !self.has_room() {
            return false;
        }
        self.order.insert(self.next, key.clone());
        let entry = Entry {
            place: self.next,
            change,
            numbers: number.into_iter().collect(),
        };
        self.next += 1;
        self.numbers.extend(number);
        self.changes.insert(key, entry);
        true
    }

    /// The `n` changes waiting longest, with their keys, left in place until
    /// [`Waiting::done`].
    pub fn oldest(&self, n: usize) -> impl Iterator<Item = (&String, &Change)> {
        self.order
            .values()
            .take(n)
            .filter_map(|key| self.changes.get(key).map(|e| (key, &e.change)))
    }

    /// The change of `key` is stored (or never will be).
    pub fn done(&mut self, key: &str) {
        if let Some(entry) = self.changes.remove(key) {
            self.order.remove(&entry.place);
            for n in entry.numbers {
                self.numbers.remove(&n);
            }
        }
    }

    pub fn holds(&self, key: &str) -> bool {
        self.changes.contains_key(key)
    }

    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// Whether a change of another key would be kept.
    pub fn has_room(&self) -> bool {
        self.changes.len() < self.cap
    }

    /// The lowest number not stored yet.
    pub fn lowest(&self) -> Option<u64> {
        self.numbers.first().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::{Change, Waiting};

    fn deleted(w: &Waiting, key: &str) -> Option<String> {
        match w.changes.get(key).map(|e| &e.change) {
            Some(Change::Delete(topic)) => Some(topic.clone()),
            _ => None,
        }
    }

    fn first(w: &Waiting) -> Option<&str> {
        w.oldest(1).next().map(|(k, _)| k.as_str())
    }

    #[test]
    fn a_later_change_of_a_key_replaces_the_waiting_one_in_place_within_the_cap() {
        let mut w = Waiting::new(2);
        assert!(w.push("k1".into(), Change::Delete("first".into()), None, false));
        assert!(w.push("k2".into(), Change::Delete("other".into()), None, false));
        // Replacing never counts against the cap nor moves the key back.
        assert!(w.push("k1".into(), Change::Delete("second".into()), None, false));
        assert!(!w.push("k3".into(), Change::Delete("over".into()), None, false));
        assert!(w.holds("k1") && w.holds("k2") && !w.holds("k3"));
        assert_eq!(first(&w), Some("k1"));
        assert_eq!(deleted(&w, "k1").as_deref(), Some("second"));
        w.done("k1");
        assert_eq!(first(&w), Some("k2"));
        assert!(!w.holds("k1"));
        w.done("k2");
        assert!(w.is_empty() && first(&w).is_none());
        assert!(w.push(
            "k3".into(),
            Change::Delete("room again".into()),
            None,
            false
        ));
    }

    #[test]
    fn an_awaited_change_is_kept_past_the_cap_and_its_number_waits_until_its_key_is_stored() {
        let mut w = Waiting::new(1);
        assert!(w.push("k1".into(), Change::Delete("a".into()), Some(1), false));
        assert!(w.push("k2".into(), Change::Delete("b".into()), Some(2), true));
        // Replaced by a later change of its key: stored when that one is.
        assert!(w.push("k1".into(), Change::Delete("c".into()), Some(3), true));
        assert_eq!(w.lowest(), Some(1));
        let order: Vec<_> = w.oldest(8).map(|(k, _)| k.clone()).collect();
        assert_eq!(order, ["k1", "k2"]);
        // Stored out of order (written side by side): the lowest is still waited for.
        w.done("k2");
        assert_eq!(w.lowest(), Some(1));
        w.done("k1");
        assert_eq!(w.lowest(), None);
    }
}
