//! What a load of the retained bucket does with the local topics it did not name
//! (docs/cluster.md, "Compacting the retained bucket's delete markers").
//!
//! Delete markers are compacted (`markers.rs`), so a node that was away longer than
//! `retained_marker_age` finds no marker for a topic cleared meanwhile: the bucket is
//! the whole truth for shareable topics (no `$`, with a NATS subject), not only for the
//! keys it names. Once the values present when the watch started are applied, the node
//! therefore clears every shareable topic of its set whose key the load did not
//! deliver, except:
//! - topics with a change of this node waiting for the bucket (`Pending`): newer;
//! - topics set through the transfer stream lately ([`Relayed`], [`relayed_window`]):
//!   their origin's put may not have reached the bucket yet.
//!
//! A node that never joined this bucket holds what it had before joining (served by
//! that node only until now): instead of clearing those topics it puts them into the
//! bucket once, and records the join in [`JoinRecord`] once JetStream took them all.
//! The record names the bucket's stream and its creation time, so a bucket created
//! anew (NATS lost its store, another cluster) is joined, not swept, again.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a topic set through the transfer stream is kept from the sweep at most:
/// its origin's bucket put follows the transfer copy within a round trip unless NATS or
/// JetStream fails, and the transfer stream's duplicate window is as long.
pub(crate) const RELAYED_FOR: Duration = Duration::from_secs(120);

/// How long a topic set through the transfer stream is kept from the sweep with
/// markers compacted after `marker_age`: [`RELAYED_FOR`], but less than the age. A
/// clear of the topic after the relay leaves a marker no node compacts before the age
/// has passed since the relay, so within it a load still delivers that marker, and the
/// skip never keeps a cleared copy (half the age: room for clocks apart).
pub(super) fn relayed_window(marker_age: Duration) -> Duration {
    RELAYED_FOR.min(marker_age / 2)
}

/// The join record's file name, in the `[retained]` store's folder.
pub(crate) const JOIN_RECORD: &str = "cluster-joined";

/// What a load does with the shareable topics it did not name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Unnamed {
    /// The node joined this bucket before: clear them.
    Clear,
    /// First load of this bucket: put them into it.
    Seed,
}

/// Whether `topic` could be in the bucket: other topics stay on their node.
pub(super) fn shareable(topic: &str) -> bool {
    !topic.starts_with('$') && super::to_subject(topic).is_some()
}

/// The shareable topics of `held` whose key (`key_of`) the load did not deliver and
/// `keep` does not keep, with their keys.
pub(super) fn unnamed<'a>(
    held: impl IntoIterator<Item = &'a str>,
    key_of: impl Fn(&str) -> String,
    delivered: &HashSet<String>,
    keep: impl Fn(&str, &str) -> bool,
) -> Vec<(String, String)> {
    held.into_iter()
        .filter(|topic| shareable(topic))
        .filter_map(|topic| {
            let key = key_of(topic);
            (!delivered.contains(&key) && !keep(&key, topic)).then(|| (key, topic.to_string()))
        })
        .collect()
}

/// Topics set on this node through the transfer stream lately, for the sweep to leave
/// alone: shared between `admit` (which notes them) and the state task.
#[derive(Clone, Default)]
pub(crate) struct Relayed(Arc<Mutex<RelayedInner>>);

#[derive(Default)]
struct RelayedInner {
    at: HashMap<String, Instant>,
    order: VecDeque<(Instant, String)>,
}

impl Relayed {
    /// `topic` was just set from the transfer stream.
    pub(crate) fn note(&self, topic: &str) {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.forget_before(now);
        inner.at.insert(topic.to_string(), now);
        inner.order.push_back((now, topic.to_string()));
    }

    /// Whether `topic` was set from the transfer stream within `window` (at most
    /// [`RELAYED_FOR`]).
    pub(super) fn recent(&self, topic: &str, window: Duration) -> bool {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.forget_before(now);
        inner
            .at
            .get(topic)
            .is_some_and(|at| now.duration_since(*at) < window)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RelayedInner> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl RelayedInner {
    /// Drops what was noted more than [`RELAYED_FOR`] before `now`.
    fn forget_before(&mut self, now: Instant) {
        while let Some((at, topic)) = self.order.front() {
            if now.duration_since(*at) < RELAYED_FOR {
                return;
            }
            if self.at.get(topic) == Some(at) {
                self.at.remove(topic);
            }
            self.order.pop_front();
        }
    }
}

/// The local record that this node joined a retained bucket: one line, the bucket's
/// stream name and its creation time (Unix ns, JetStream's clock).
pub(super) struct JoinRecord {
    path: PathBuf,
}

impl JoinRecord {
    /// The record in the `[retained]` store's folder `dir`.
    pub(super) fn in_dir(dir: &Path) -> JoinRecord {
        JoinRecord {
            path: dir.join(JOIN_RECORD),
        }
    }

    /// Whether the record names `stream` created at `created`; `false` when absent or
    /// unreadable (the node then puts its topics into the bucket again: nothing lost).
    pub(super) fn names(&self, stream: &str, created: i128) -> bool {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => text.trim_end() == Self::line(stream, created),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => {
                tracing::warn!(file = %self.path.display(), "cluster: join record unreadable: {e}");
                false
            }
        }
    }

    /// Records that this node joined `stream` created at `created` (written whole or
    /// not at all: a temporary file renamed over the record, then synced).
    pub(super) fn write(&self, stream: &str, created: i128) -> std::io::Result<()> {
        use std::io::Write;
        let tmp = self.path.with_extension("tmp");
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(format!("{}\n", Self::line(stream, created)).as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    fn line(stream: &str, created: i128) -> String {
        format!("{stream} {created}")
    }
}

#[cfg(test)]
mod tests {
    use super::{relayed_window, shareable, unnamed, JoinRecord, Relayed, RELAYED_FOR};
    use std::collections::HashSet;
    use std::time::Duration;

    #[test]
    fn only_shareable_topics_the_load_did_not_name_and_nothing_kept_are_unnamed() {
        let delivered: HashSet<String> = ["k:a/named".to_string()].into();
        let held = ["a/named", "a/gone", "$SYS/x", "a/waiting", "a/relayed"];
        let got = unnamed(
            held,
            |t| format!("k:{t}"),
            &delivered,
            |key, topic| key == "k:a/waiting" || topic == "a/relayed",
        );
        assert_eq!(got, [("k:a/gone".to_string(), "a/gone".to_string())]);
        assert!(!shareable("$share/x") && shareable("a/b"));
    }

    #[test]
    fn relayed_topics_are_remembered() {
        let r = Relayed::default();
        r.note("a/b");
        assert!(r.recent("a/b", RELAYED_FOR) && !r.recent("a/c", RELAYED_FOR));
        assert!(!r.recent("a/b", Duration::ZERO));
        assert_eq!(relayed_window(Duration::from_secs(3600)), RELAYED_FOR);
        assert_eq!(
            relayed_window(Duration::from_secs(2)),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn the_join_record_names_one_stream_and_its_creation() {
        let dir = tempfile::tempdir().unwrap();
        let record = JoinRecord::in_dir(dir.path());
        assert!(!record.names("KV_moatmq_retained", 5), "absent");
        record.write("KV_moatmq_retained", 5).unwrap();
        assert!(record.names("KV_moatmq_retained", 5));
        assert!(!record.names("KV_moatmq_retained", 6), "a bucket made anew");
        assert!(!record.names("KV_other_retained", 5));
    }
}
