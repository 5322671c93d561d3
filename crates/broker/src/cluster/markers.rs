//! Compaction of the retained bucket's delete markers (docs/cluster.md, "Compacting
//! the retained bucket's delete markers").
//!
//! A cleared topic leaves a KV delete marker (or a purge marker, written by `nats kv
//! purge`) in `<base>_retained`. Every node's watch sees each marker with its revision
//! and JetStream's timestamp of it, the initial load included; once a marker is older
//! than `[cluster] retained_marker_age` the node purges the key's subject up to the
//! marker's own revision (`state::remove_up_to`): a newer put of the key, at a higher
//! revision, survives, and several nodes purging the same marker is harmless. A marker
//! younger than the age waits here until it reaches it (a timer in `state.rs`), so
//! set/clear churn does not grow the stream forever.
//!
//! Removing markers is sound only because every load of the bucket ends with a sweep
//! (`sweep.rs`): a node that comes back after the marker is gone clears what the bucket
//! no longer names.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Markers of the bucket not compacted yet, by when they are due.
pub(super) struct Markers {
    age: Duration,
    /// `(due, key, revision)`, earliest first; an item whose key has since seen another
    /// value (`latest` no longer holds its revision) is skipped when it comes up.
    due: BinaryHeap<Reverse<(i128, String, u64)>>,
    /// The revision of the newest marker of each key still waiting.
    latest: HashMap<String, u64>,
}

/// Nanoseconds since the Unix epoch of `t` (0 for a clock before it).
pub(super) fn unix_nanos(t: SystemTime) -> i128 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i128::try_from(d.as_nanos()).unwrap_or(i128::MAX))
}

impl Markers {
    pub(super) fn new(age: Duration) -> Markers {
        Markers {
            age,
            due: BinaryHeap::new(),
            latest: HashMap::new(),
        }
    }

    /// A marker of `key` at `revision`, written at `created` (Unix ns, JetStream's
    /// clock): due at `created` + the age.
    pub(super) fn seen_marker(&mut self, key: &str, revision: u64, created: i128) {
        let age = i128::try_from(self.age.as_nanos()).unwrap_or(i128::MAX);
        self.latest.insert(key.to_string(), revision);
        self.due.push(Reverse((
            created.saturating_add(age),
            key.to_string(),
            revision,
        )));
    }

    /// A put of `key`: its marker, if one waited, was replaced in the stream (the
    /// bucket keeps one message per key), nothing left to compact.
    pub(super) fn seen_put(&mut self, key: &str) {
        self.latest.remove(key);
    }

    /// The marker of `key` at `revision` was taken but not purged: due again at `at`
    /// (Unix ns), unless the key has had another value since.
    pub(super) fn retry(&mut self, key: &str, revision: u64, at: i128) {
        if self.latest.contains_key(key) {
            return;
        }
        self.latest.insert(key.to_string(), revision);
        self.due.push(Reverse((at, key.to_string(), revision)));
    }

    /// When the next marker is due (Unix ns), if any waits.
    pub(super) fn next_due(&mut self) -> Option<i128> {
        self.skip_stale();
        self.due.peek().map(|Reverse((at, _, _))| *at)
    }

    /// Up to `max` markers due at `now` (Unix ns): key and revision to purge up to.
    pub(super) fn take_due(&mut self, now: i128, max: usize) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        while out.len() < max {
            self.skip_stale();
            match self.due.peek() {
                Some(Reverse((at, _, _))) if *at <= now => {}
                _ => break,
            }
            if let Some(Reverse((_, key, revision))) = self.due.pop() {
                self.latest.remove(&key);
                out.push((key, revision));
            }
        }
        out
    }

    /// Markers waiting (for tests and logs).
    pub(super) fn len(&self) -> usize {
        self.latest.len()
    }

    /// Drops heap items of keys whose marker was replaced or compacted already.
    fn skip_stale(&mut self) {
        while let Some(Reverse((_, key, revision))) = self.due.peek() {
            if self.latest.get(key) == Some(revision) {
                return;
            }
            self.due.pop();
        }
    }
}

/// How long from `now` until `due` (both Unix ns); zero once it is past.
pub(super) fn until(due: i128, now: i128) -> Duration {
    let nanos = due.saturating_sub(now).max(0);
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::{until, Markers};
    use std::time::Duration;

    const S: i128 = 1_000_000_000;

    #[test]
    fn markers_come_due_after_the_age_in_order_and_a_later_put_cancels_one() {
        let mut m = Markers::new(Duration::from_secs(10));
        m.seen_marker("b", 7, 5 * S);
        m.seen_marker("a", 3, 2 * S);
        m.seen_marker("c", 9, 6 * S);
        m.seen_put("c");
        assert_eq!(m.len(), 2);
        assert_eq!(m.next_due(), Some(12 * S));
        assert!(m.take_due(11 * S, 10).is_empty(), "not yet");
        assert_eq!(m.take_due(100 * S, 1), [("a".to_string(), 3)]);
        assert_eq!(m.take_due(100 * S, 10), [("b".to_string(), 7)]);
        assert_eq!(m.next_due(), None, "c was put again: nothing to compact");
        assert_eq!(m.len(), 0);
    }

    #[test]
    fn a_newer_marker_of_a_key_replaces_the_older_one() {
        let mut m = Markers::new(Duration::from_secs(1));
        m.seen_marker("k", 3, 0);
        m.seen_marker("k", 8, 5 * S);
        assert_eq!(m.next_due(), Some(6 * S));
        assert_eq!(m.take_due(10 * S, 10), [("k".to_string(), 8)]);
        assert_eq!(until(6 * S, 5 * S), Duration::from_secs(1));
        assert_eq!(until(5 * S, 6 * S), Duration::ZERO);
    }
}
