//! The retained messages moatmq serves itself.
//!
//! rumqttd 0.20 keeps retained messages too, but sends at most its free in-flight slots
//! (or 200) of them on a SUBSCRIBE, scans all of them on the router thread for every
//! SUBSCRIBE, and deletes one on any empty-payload PUBLISH. So the gateway strips the
//! retain flag before the router and keeps them here instead: a map ordered by topic,
//! shared by all connections, which each gateway walks at its own pace after a SUBACK.
//! The encrypted store (`retained.rs`) persists the same changes.
//!
//! Quotas are decided here, for everyone (`[retained]`): a message counts with the bytes
//! its record takes in the store (`moatmq_store::stored_bytes`: topic, payload,
//! properties, expiry, owner), against the global `max_messages`/`max_bytes` and against
//! its owner's (the publisher's identity) `max_messages_per_user`/`max_bytes_per_user`.
//! A change is refused only if it makes a total grow past its bound: replacing one's own
//! message counts once, a replacement by someone else moves it to the new owner, an empty
//! payload frees it.

use bytes::Bytes;
use rumqttd::protocol::{PublishProperties, QoS};
use std::collections::{BTreeMap, BTreeSet, HashMap};
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
    /// Whose quota it counts against.
    pub owner: Arc<str>,
    /// What it counts: `moatmq_store::stored_bytes` of its record.
    pub stored_bytes: u64,
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
}

/// The bounds of `[retained]`; a per-user bound of 0 means unlimited.
#[derive(Debug, Clone, Copy)]
pub struct Quota {
    pub max_messages: usize,
    pub max_bytes: u64,
    pub max_messages_per_user: usize,
    pub max_bytes_per_user: u64,
}

/// Why a retained message was refused: the bound it would have passed. The label is the
/// `reason` of `moatmq_retained_refused_total` and of the `retained_refused` audit event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `max_messages`.
    Messages,
    /// `max_bytes`.
    Bytes,
    /// `max_messages_per_user`.
    UserMessages,
    /// `max_bytes_per_user`.
    UserBytes,
    /// The store could not take it (a poisoned lock or an unencodable record).
    Store,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Messages => "max_messages",
            Refusal::Bytes => "max_bytes",
            Refusal::UserMessages => "max_messages_per_user",
            Refusal::UserBytes => "max_bytes_per_user",
            Refusal::Store => "store",
        }
    }
}

/// What one owner holds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub messages: usize,
    pub bytes: u64,
}

struct Inner {
    map: BTreeMap<String, Arc<RetainedEntry>>,
    bytes: u64,
    owners: HashMap<Arc<str>, Usage>,
    /// Messages with an expiry, soonest first: expired ones stop counting at the next change.
    expiry: BTreeSet<(u64, String)>,
}

impl Inner {
    fn add(&mut self, topic: &str, entry: &RetainedEntry) {
        if let Some(at) = entry.expires_at {
            self.expiry.insert((at, topic.to_string()));
        }
        self.bytes = self.bytes.saturating_add(entry.stored_bytes);
        let u = self.owners.entry(entry.owner.clone()).or_default();
        u.messages += 1;
        u.bytes = u.bytes.saturating_add(entry.stored_bytes);
    }

    fn remove(&mut self, topic: &str, entry: &RetainedEntry) {
        if let Some(at) = entry.expires_at {
            self.expiry.remove(&(at, topic.to_string()));
        }
        self.bytes = self.bytes.saturating_sub(entry.stored_bytes);
        if let Some(u) = self.owners.get_mut(&entry.owner) {
            u.messages = u.messages.saturating_sub(1);
            u.bytes = u.bytes.saturating_sub(entry.stored_bytes);
            if u.messages == 0 {
                self.owners.remove(&entry.owner);
            }
        }
    }

    /// Drops the messages expired at `now` (the store drops its copies on its own).
    fn purge_expired(&mut self, now: u64) {
        while let Some((at, _)) = self.expiry.first() {
            if *at > now {
                return;
            }
            let Some((_, topic)) = self.expiry.pop_first() else {
                return;
            };
            if let Some(old) = self.map.remove(&topic) {
                self.remove(&topic, &old);
            }
        }
    }

    /// The bound `entry` would pass by replacing `topic`'s message, if any. A total is
    /// only checked where it grows, so a store already past lowered bounds can still
    /// replace and shrink.
    fn refusal(
        &self,
        quota: &Quota,
        topic: &str,
        entry: &RetainedEntry,
        per_user: bool,
    ) -> Option<Refusal> {
        let old = self.map.get(topic);
        let old_bytes = old.map_or(0, |e| e.stored_bytes);
        let size = entry.stored_bytes;
        if old.is_none() && self.map.len() >= quota.max_messages {
            return Some(Refusal::Messages);
        }
        if size > old_bytes
            && self.bytes.saturating_sub(old_bytes).saturating_add(size) > quota.max_bytes
        {
            return Some(Refusal::Bytes);
        }
        if !per_user {
            return None;
        }
        // What the owner gets back from the message it replaces: all of it if it is its own.
        let (own_count, own_bytes) = match old {
            Some(e) if e.owner == entry.owner => (1, e.stored_bytes),
            _ => (0, 0),
        };
        let usage = self.owners.get(&entry.owner).copied().unwrap_or_default();
        if quota.max_messages_per_user != 0
            && own_count == 0
            && usage.messages >= quota.max_messages_per_user
        {
            return Some(Refusal::UserMessages);
        }
        if quota.max_bytes_per_user != 0
            && size > own_bytes
            && usage.bytes.saturating_sub(own_bytes).saturating_add(size) > quota.max_bytes_per_user
        {
            return Some(Refusal::UserBytes);
        }
        None
    }
}

/// All retained messages, by topic.
pub struct RetainedIndex {
    inner: RwLock<Inner>,
    quota: Quota,
}

impl RetainedIndex {
    pub fn new(quota: Quota) -> RetainedIndex {
        RetainedIndex {
            inner: RwLock::new(Inner {
                map: BTreeMap::new(),
                bytes: 0,
                owners: HashMap::new(),
                expiry: BTreeSet::new(),
            }),
            quota,
        }
    }

    /// Sets or replaces a topic's message, unless that makes a total it counts toward
    /// (global or its owner's) grow past its bound.
    pub fn set(&self, topic: &str, entry: RetainedEntry) -> Result<(), Refusal> {
        self.insert(topic, entry, true)
    }

    /// [`RetainedIndex::set`] for a message read back from the store at start: only the
    /// global bounds apply, so lowering a per-user quota never hides what was accepted
    /// (the owner cannot add more until under it again).
    pub fn load(&self, topic: &str, entry: RetainedEntry) -> Result<(), Refusal> {
        self.insert(topic, entry, false)
    }

    fn insert(&self, topic: &str, entry: RetainedEntry, per_user: bool) -> Result<(), Refusal> {
        let Ok(mut inner) = self.inner.write() else {
            return Err(Refusal::Store);
        };
        inner.purge_expired(unix_now());
        if let Some(refused) = inner.refusal(&self.quota, topic, &entry, per_user) {
            return Err(refused);
        }
        let mut entry = entry;
        // One allocation per owner, shared by its entries.
        if let Some((name, _)) = inner.owners.get_key_value(&*entry.owner) {
            entry.owner = name.clone();
        }
        let entry = Arc::new(entry);
        if let Some(old) = inner.map.insert(topic.to_string(), entry.clone()) {
            inner.remove(topic, &old);
        }
        inner.add(topic, &entry);
        Ok(())
    }

    /// Removes a topic's message (an empty retained payload), freeing its owner's quota.
    pub fn clear(&self, topic: &str) {
        if let Ok(mut inner) = self.inner.write() {
            if let Some(old) = inner.map.remove(topic) {
                inner.remove(topic, &old);
            }
        }
    }

    /// What `owner` holds now.
    pub fn usage(&self, owner: &str) -> Usage {
        self.inner
            .read()
            .ok()
            .and_then(|i| i.owners.get(owner).copied())
            .unwrap_or_default()
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

/// The quota key of anonymous clients, all of them together. No username or certificate
/// CN can contain `/`, so it is no one's name.
pub const ANONYMOUS_OWNER: &str = "/anonymous";
/// The quota key of a record stored before owners were kept whose topic's first level
/// is not a possible username.
pub const UNKNOWN_OWNER: &str = "/unknown";

/// Whose quota a publish counts against: its username or certificate CN.
pub fn owner_of(username: Option<&str>) -> &str {
    username.unwrap_or(ANONYMOUS_OWNER)
}

/// The owner of a record stored before owners were kept: its topic's first level (the
/// tenant under the default `%u/#` isolation) if that could be a username, else
/// [`UNKNOWN_OWNER`].
pub fn legacy_owner(topic: &str) -> &str {
    let first = topic.split('/').next().unwrap_or_default();
    if moatmq_auth::valid_identity(first) {
        first
    } else {
        UNKNOWN_OWNER
    }
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
        owned(payload, "alice")
    }

    fn owned(payload: &'static str, owner: &str) -> RetainedEntry {
        RetainedEntry {
            payload: Bytes::from_static(payload.as_bytes()),
            qos: QoS::AtLeastOnce,
            properties: None,
            expires_at: None,
            owner: owner.into(),
            stored_bytes: payload.len() as u64,
        }
    }

    fn quota(max_messages: usize, max_bytes: u64) -> Quota {
        Quota {
            max_messages,
            max_bytes,
            max_messages_per_user: 0,
            max_bytes_per_user: 0,
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
        let index = RetainedIndex::new(quota(100, 1 << 20));
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
    fn bounds_refuse_what_grows_past_them() {
        let index = RetainedIndex::new(quota(2, 1 << 20));
        index.set("x", entry("1")).unwrap();
        index.set("y", entry("1")).unwrap();
        assert_eq!(index.set("z", entry("1")), Err(Refusal::Messages));
        assert_eq!(index.set("x", entry("2")), Ok(()));
        let small = RetainedIndex::new(quota(100, 4));
        small.set("a", entry("12")).unwrap();
        assert_eq!(small.set("b", entry("123")), Err(Refusal::Bytes));
        // A replacement may not grow past the bound either (small messages later grown
        // would get round it), but it may shrink.
        small.set("b", entry("1")).unwrap();
        assert_eq!(small.set("b", entry("123")), Err(Refusal::Bytes));
        small.set("b", entry("12")).unwrap();
        small.set("b", entry("")).unwrap();
    }

    #[test]
    fn per_user_bounds_count_each_owner() {
        let index = RetainedIndex::new(Quota {
            max_messages: 100,
            max_bytes: 1 << 20,
            max_messages_per_user: 2,
            max_bytes_per_user: 10,
        });
        index.set("a/1", owned("12345", "alice")).unwrap();
        index.set("a/2", owned("1", "alice")).unwrap();
        assert_eq!(
            index.set("a/3", owned("1", "alice")),
            Err(Refusal::UserMessages)
        );
        // Her own replacement counts once; growing past her bytes does not pass.
        index.set("a/2", owned("12345", "alice")).unwrap();
        assert_eq!(
            index.set("a/2", owned("123456", "alice")),
            Err(Refusal::UserBytes)
        );
        assert_eq!(
            index.usage("alice"),
            Usage {
                messages: 2,
                bytes: 10
            }
        );
        // Bob is not affected by her being full.
        index.set("b/1", owned("12345", "bob")).unwrap();
        // Bob replacing her message takes it over: hers is freed, his is charged.
        index.set("a/1", owned("1", "bob")).unwrap();
        assert_eq!(index.usage("alice").messages, 1);
        assert_eq!(index.usage("bob").messages, 2);
        index.set("a/3", owned("1", "alice")).unwrap();
        // Clearing frees.
        index.clear("a/3");
        index.clear("a/2");
        assert_eq!(index.usage("alice"), Usage::default());
        // Loading from the store ignores per-user bounds.
        for t in ["c/1", "c/2", "c/3"] {
            index.load(t, owned("1", "carol")).unwrap();
        }
        assert_eq!(index.usage("carol").messages, 3);
        assert_eq!(
            index.set("c/4", owned("1", "carol")),
            Err(Refusal::UserMessages)
        );
    }

    #[test]
    fn legacy_owner_is_the_first_level_when_it_can_be_a_username() {
        assert_eq!(legacy_owner("alice/x"), "alice");
        assert_eq!(legacy_owner("alice"), "alice");
        assert_eq!(legacy_owner("/x"), UNKNOWN_OWNER);
        assert_eq!(legacy_owner("+/x"), UNKNOWN_OWNER);
        assert_eq!(owner_of(None), ANONYMOUS_OWNER);
        assert!(!moatmq_auth::valid_identity(ANONYMOUS_OWNER));
    }

    #[test]
    fn expired_messages_are_not_returned() {
        let index = RetainedIndex::new(quota(10, 1 << 20));
        let mut e = entry("old");
        e.expires_at = Some(1);
        index.set("gone", e).unwrap();
        assert!(topics(&index, "#").is_empty());
    }

    #[test]
    fn expired_messages_stop_counting() {
        let index = RetainedIndex::new(Quota {
            max_messages: 2,
            max_bytes: 1 << 20,
            max_messages_per_user: 1,
            max_bytes_per_user: 0,
        });
        let mut e = entry("old");
        e.expires_at = Some(unix_now() + 1000);
        index.set("soon", e).unwrap();
        assert_eq!(index.set("other", entry("v")), Err(Refusal::UserMessages));
        let mut e = entry("old");
        e.expires_at = Some(1);
        index.set("soon", e).unwrap();
        index.set("other", entry("v")).unwrap();
        assert_eq!(index.usage("alice").messages, 1);
        assert_eq!(index.len(), 1);
    }
}
