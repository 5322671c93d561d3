//! The retained messages moatmq serves itself.
//!
//! rumqttd 0.20 keeps retained messages too, but sends at most its free in-flight slots
//! (or 200) of them on a SUBSCRIBE, scans all of them on the router thread for every
//! SUBSCRIBE, and deletes one on any empty-payload PUBLISH. So the gateway strips the
//! retain flag before the router and keeps them here instead: a map ordered by topic,
//! shared by all connections, which each gateway walks at its own pace after a SUBACK.
//! The encrypted store (`retained.rs`) persists the same changes.

use bytes::Bytes;
use rumqttd::protocol::{PublishProperties, QoS};
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

/// One retained message.
#[derive(Debug)]
pub struct RetainedEntry {
    pub payload: Bytes,
    pub qos: QoS,
    /// MQTT 5 properties; the message expiry interval is kept as `expires_at` instead.
    pub properties: Option<PublishProperties>,
    /// Unix seconds after which the message is no longer sent (MQTT 5 message expiry).
    pub expires_at: Option<u64>,
}

impl RetainedEntry {
    /// Properties to send now: the expiry interval is what remains of it (MQTT-3.3.2-6).
    pub fn properties_at(&self, now: u64) -> Option<PublishProperties> {
        let mut props = self.properties.clone();
        if let Some(at) = self.expires_at {
            let p = props.get_or_insert_with(PublishProperties::default);
            p.message_expiry_interval =
                Some(u32::try_from(at.saturating_sub(now)).unwrap_or(u32::MAX));
        }
        props
    }

    fn size(&self, topic: &str) -> u64 {
        (topic.len() + self.payload.len()) as u64
    }
}

/// A new retained topic past `[retained] max_messages` / `max_bytes`.
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

struct Inner {
    map: BTreeMap<String, Arc<RetainedEntry>>,
    bytes: u64,
}

/// All retained messages, by topic.
pub struct RetainedIndex {
    inner: RwLock<Inner>,
    max_messages: usize,
    max_bytes: u64,
}

impl RetainedIndex {
    pub fn new(max_messages: usize, max_bytes: u64) -> RetainedIndex {
        RetainedIndex {
            inner: RwLock::new(Inner {
                map: BTreeMap::new(),
                bytes: 0,
            }),
            max_messages,
            max_bytes,
        }
    }

    /// Sets or replaces a topic's message. A new topic past the bounds is refused; a
    /// replacement is always accepted (it frees as much as it takes, or close to it).
    pub fn set(&self, topic: &str, entry: RetainedEntry) -> Result<(), Full> {
        let Ok(mut inner) = self.inner.write() else {
            return Err(Full);
        };
        let size = entry.size(topic);
        let old = inner.map.get(topic).map(|e| e.size(topic));
        if old.is_none()
            && (inner.map.len() >= self.max_messages
                || inner.bytes.saturating_add(size) > self.max_bytes)
        {
            return Err(Full);
        }
        inner.bytes = inner.bytes.saturating_sub(old.unwrap_or(0)) + size;
        inner.map.insert(topic.to_string(), Arc::new(entry));
        Ok(())
    }

    /// Removes a topic's message (an empty retained payload).
    pub fn clear(&self, topic: &str) {
        if let Ok(mut inner) = self.inner.write() {
            if let Some(old) = inner.map.remove(topic) {
                inner.bytes = inner.bytes.saturating_sub(old.size(topic));
            }
        }
    }

    pub fn len(&self) -> usize {
        self.inner.read().map_or(0, |i| i.map.len())
    }

    /// Appends to `out` up to `max` unexpired messages whose topics match `filter` and
    /// sort after `after`, in topic order. Returns false once nothing is left after them.
    pub fn matching(
        &self,
        filter: &str,
        after: Option<&str>,
        max: usize,
        out: &mut Vec<(String, Arc<RetainedEntry>)>,
    ) -> bool {
        let Ok(inner) = self.inner.read() else {
            return false;
        };
        let now = unix_now();
        let live = |e: &RetainedEntry| !matches!(e.expires_at, Some(at) if at <= now);
        let prefix = literal_prefix(filter);
        if prefix.len() == filter.len() {
            // No wildcard: one lookup.
            if after.is_none() {
                if let Some(e) = inner.map.get(filter).filter(|e| live(e)) {
                    out.push((filter.to_string(), e.clone()));
                }
            }
            return false;
        }
        let start = match after {
            Some(a) if a >= prefix => Bound::Excluded(a),
            _ => Bound::Included(prefix),
        };
        let mut taken = 0;
        for (topic, entry) in inner.map.range::<str, _>((start, Bound::Unbounded)) {
            if !topic.starts_with(prefix) {
                return false;
            }
            if !moatmq_acl::topic_matches_filter(filter, topic) || !live(entry) {
                continue;
            }
            if taken == max {
                return true;
            }
            out.push((topic.clone(), entry.clone()));
            taken += 1;
        }
        false
    }
}

/// The part of a filter before its first wildcard level: every matching topic starts
/// with it. (`a/b/#` gives `a/b`, which also covers the parent `a/b` that `#` matches.)
fn literal_prefix(filter: &str) -> &str {
    let mut end: usize = 0;
    for (i, level) in filter.split('/').enumerate() {
        if level == "+" || level == "#" {
            // Keep up to the separator before this level (none for the first level).
            return &filter[..end.saturating_sub(usize::from(i > 0))];
        }
        end += level.len() + 1;
    }
    filter
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(payload: &'static str) -> RetainedEntry {
        RetainedEntry {
            payload: Bytes::from_static(payload.as_bytes()),
            qos: QoS::AtLeastOnce,
            properties: None,
            expires_at: None,
        }
    }

    fn topics(index: &RetainedIndex, filter: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut batch = Vec::new();
            let more = index.matching(filter, after.as_deref(), 2, &mut batch);
            after = batch.last().map(|(t, _)| t.clone()).or(after);
            out.extend(batch.into_iter().map(|(t, _)| t));
            if !more {
                return out;
            }
        }
    }

    #[test]
    fn prefixes() {
        assert_eq!(literal_prefix("a/b/#"), "a/b");
        assert_eq!(literal_prefix("a/+/c"), "a");
        assert_eq!(literal_prefix("#"), "");
        assert_eq!(literal_prefix("+/x"), "");
        assert_eq!(literal_prefix("a/b"), "a/b");
    }

    #[test]
    fn matching_walks_in_batches_and_respects_wildcards() {
        let index = RetainedIndex::new(100, 1 << 20);
        for t in ["a", "a/b", "a/c/d", "ab/x", "b", "$SYS/x"] {
            index.set(t, entry("v")).unwrap();
        }
        assert_eq!(topics(&index, "a/#"), vec!["a", "a/b", "a/c/d"]);
        assert_eq!(topics(&index, "#"), vec!["a", "a/b", "a/c/d", "ab/x", "b"]);
        assert_eq!(topics(&index, "+/x"), vec!["ab/x"]);
        assert_eq!(topics(&index, "a/b"), vec!["a/b"]);
        assert_eq!(topics(&index, "$SYS/#"), vec!["$SYS/x"]);
        index.clear("a/b");
        assert_eq!(topics(&index, "a/#"), vec!["a", "a/c/d"]);
    }

    #[test]
    fn bounds_refuse_new_topics_only() {
        let index = RetainedIndex::new(2, 1 << 20);
        index.set("x", entry("1")).unwrap();
        index.set("y", entry("1")).unwrap();
        assert_eq!(index.set("z", entry("1")), Err(Full));
        assert_eq!(index.set("x", entry("2")), Ok(()));
        let small = RetainedIndex::new(100, 4);
        assert_eq!(small.set("abc", entry("12")), Err(Full));
    }

    #[test]
    fn expired_messages_are_not_returned() {
        let index = RetainedIndex::new(10, 1 << 20);
        let mut e = entry("old");
        e.expires_at = Some(1);
        index.set("gone", e).unwrap();
        assert!(topics(&index, "#").is_empty());
    }
}
