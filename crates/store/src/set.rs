//! The retained messages in memory: one set ordered by topic, the only copy. The broker's
//! gateways serve subscribers from it (by filter, walking the topics after a filter's
//! literal prefix in order, a batch at a time), publishes change it, and a [`Store`]
//! opened into it persists what changed. Without a store it is the same set, kept in
//! memory only.
//!
//! Each message is one `Arc<RetainedMessage>`, shared with whatever is reading or saving
//! it; the lock is held only for the in-memory change or lookup, never across a write,
//! an fsync or a compaction (the log takes `Arc` clones of what it writes).
//!
//! Limits ([`StoreLimits`]) are decided here: a message counts the bytes its record
//! takes in the log ([`stored_bytes`]: topic, payload, properties, expiry, owner, framing)
//! against the global `max_messages`/`max_bytes` and against its owner's (the publisher's
//! identity) `max_messages_per_user`/`max_bytes_per_user`. A change is refused only if it
//! makes a total grow past its bound: replacing one's own message counts once, a
//! replacement by someone else moves it to the new owner, a clear frees it. Messages read
//! back from the log are all kept, past lowered bounds too (new ones are refused until
//! under them again). An expired message stops counting at the next change.
//!
//! Topics the owner marks memory-only ([`RetainedSet::with_memory_only`]: the broker's
//! `$SYS` tree) are served like any other but never reach the log (not marked for a
//! flush, left out of compactions) and count toward no bound or total: they are the
//! broker's own, rewritten every few seconds, and lost on purpose at a restart.
//!
//! [`Store`]: crate::Store

use std::borrow::Borrow;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::{now_unix, stored_bytes, RetainedMessage};

/// The bounds of `[retained]`, in messages and in [`stored_bytes`]; a per-user bound of 0
/// means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreLimits {
    /// Most retained topics.
    pub max_messages: usize,
    /// Most bytes of records ([`stored_bytes`]) in all.
    pub max_bytes: u64,
    /// Most retained topics one owner holds (0: unlimited).
    pub max_messages_per_user: usize,
    /// Most bytes of records one owner holds (0: unlimited).
    pub max_bytes_per_user: u64,
}

impl StoreLimits {
    /// No limits (used by offline tools such as rekey).
    pub const UNLIMITED: StoreLimits = StoreLimits {
        max_messages: usize::MAX,
        max_bytes: u64::MAX,
        max_messages_per_user: 0,
        max_bytes_per_user: 0,
    };
}

/// Why a retained message was refused: the bound it would have passed. The label is the
/// `reason` of the broker's `moatmq_retained_refused_total` and `retained_refused` audit
/// event.
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
    /// The store could not take it (an unencodable record).
    Store,
}

impl Refusal {
    /// The name of the bound, as configured.
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
    /// Messages.
    pub messages: usize,
    /// Bytes of their records ([`stored_bytes`]).
    pub bytes: u64,
}

/// A message in the set, ordered and looked up by its topic (so the topic is not kept a
/// second time as a key).
#[derive(Debug, Clone)]
pub(crate) struct Item(pub(crate) Arc<RetainedMessage>);

impl Borrow<str> for Item {
    fn borrow(&self) -> &str {
        &self.0.topic
    }
}

impl PartialEq for Item {
    fn eq(&self, other: &Item) -> bool {
        self.0.topic == other.0.topic
    }
}

impl Eq for Item {}

impl PartialOrd for Item {
    fn partial_cmp(&self, other: &Item) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Item {
    fn cmp(&self, other: &Item) -> std::cmp::Ordering {
        self.0.topic.cmp(&other.0.topic)
    }
}

/// Messages by topic, as read back from a log.
pub(crate) type Items = BTreeSet<Item>;

/// A change the log has to write: a topic's message, or `None` for its clearing.
pub(crate) type Change = (String, Option<Arc<RetainedMessage>>);

/// What the log has not written yet (only when a store persists the set).
#[derive(Debug, Default)]
struct Pending {
    /// Topics changed since the last flush.
    dirty: HashSet<String>,
    /// Topics changed since a background compaction took its snapshot.
    since_snapshot: Option<HashSet<String>>,
}

struct Inner {
    items: Items,
    limits: StoreLimits,
    legacy_owner: fn(&str) -> &str,
    /// Topics kept in memory only, outside the bounds and totals.
    memory_only: fn(&str) -> bool,
    /// How many of `items` are memory-only.
    memory_only_count: usize,
    bytes: u64,
    owners: HashMap<String, Usage>,
    /// Messages with an expiry, soonest first.
    expiry: BTreeSet<(u64, String)>,
    /// Changes go here under the write lock (`get_mut`, no locking); the log takes them
    /// under the read lock, so readers go on while it collects what to write.
    pending: Mutex<Option<Pending>>,
}

/// The retained set: cheap to clone, every clone is a view of the same messages.
#[derive(Clone)]
pub struct RetainedSet {
    inner: Arc<RwLock<Inner>>,
}

impl std::fmt::Debug for RetainedSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.read();
        f.debug_struct("RetainedSet")
            .field("messages", &inner.items.len())
            .field("bytes", &inner.bytes)
            .field("limits", &inner.limits)
            .finish_non_exhaustive()
    }
}

/// The quota key of a record stored without an owner when nothing better is known. No
/// identity can contain `/`, so it is no one's name.
pub const UNKNOWN_OWNER: &str = "/unknown";

fn no_legacy_owner(_: &str) -> &str {
    UNKNOWN_OWNER
}

fn never(_: &str) -> bool {
    false
}

impl RetainedSet {
    /// An empty set bounded by `limits`; messages without an owner count as
    /// [`UNKNOWN_OWNER`]'s.
    pub fn new(limits: StoreLimits) -> RetainedSet {
        RetainedSet::with_legacy_owner(limits, no_legacy_owner)
    }

    /// An empty set bounded by `limits`; a message stored without an owner (before owners
    /// were kept) counts against `legacy_owner(topic)`.
    pub fn with_legacy_owner(limits: StoreLimits, legacy_owner: fn(&str) -> &str) -> RetainedSet {
        RetainedSet {
            inner: Arc::new(RwLock::new(Inner {
                items: Items::new(),
                limits,
                legacy_owner,
                memory_only: never,
                memory_only_count: 0,
                bytes: 0,
                owners: HashMap::new(),
                expiry: BTreeSet::new(),
                pending: Mutex::new(None),
            })),
        }
    }

    /// The same set, whose topics for which `memory_only` holds are never persisted and
    /// count toward no bound or total (the broker's `$SYS` tree). Set before any message
    /// is added.
    pub fn with_memory_only(self, memory_only: fn(&str) -> bool) -> RetainedSet {
        self.write().memory_only = memory_only;
        self
    }

    // A panic elsewhere while holding the lock leaves the set consistent (every change
    // is applied before anything that can panic), so a poisoned lock is still used.
    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets or replaces the message of `msg.topic`, unless that makes a total it counts
    /// toward (global or its owner's) grow past its bound.
    pub fn set(&self, msg: RetainedMessage) -> Result<(), Refusal> {
        let msg = Arc::new(msg);
        let mut inner = self.write();
        inner.purge_expired(now_unix());
        let size = stored_bytes(&msg);
        if let Some(refused) = inner.refusal(&msg, size) {
            return Err(refused);
        }
        if let Some(old) = inner.items.replace(Item(msg.clone())) {
            inner.uncount(&old.0);
        }
        inner.count(&msg, size);
        inner.touch(&msg.topic);
        Ok(())
    }

    /// Removes `topic`'s message, if any (an empty retained payload), freeing its quota.
    pub fn clear(&self, topic: &str) {
        self.write().remove(topic);
    }

    /// Removes every message expired at `now` (unix seconds); returns how many.
    pub fn purge_expired(&self, now: u64) -> usize {
        self.write().purge_expired(now)
    }

    /// What `owner` holds now.
    pub fn usage(&self, owner: &str) -> Usage {
        self.read().owners.get(owner).copied().unwrap_or_default()
    }

    /// Number of messages, memory-only ones left out (what `max_messages` bounds).
    pub fn len(&self) -> usize {
        let inner = self.read();
        inner.items.len() - inner.memory_only_count
    }

    /// Whether there are no messages (memory-only ones left out).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of all records ([`stored_bytes`]): what `max_bytes` bounds.
    pub fn bytes(&self) -> u64 {
        self.read().bytes
    }

    /// The message of `topic`, if any (expired or not).
    pub fn get(&self, topic: &str) -> Option<Arc<RetainedMessage>> {
        self.read().items.get(topic).map(|i| i.0.clone())
    }

    /// Every message, in topic order.
    pub fn messages(&self) -> Vec<Arc<RetainedMessage>> {
        self.read().items.iter().map(|i| i.0.clone()).collect()
    }

    /// Appends to `out` up to `max` unexpired messages whose topics match `filter` and
    /// sort after `after`, in topic order. Returns false once nothing is left after them.
    pub fn matching(
        &self,
        filter: &str,
        after: Option<&str>,
        max: usize,
        out: &mut Vec<Arc<RetainedMessage>>,
    ) -> bool {
        let inner = self.read();
        let now = now_unix();
        let prefix = literal_prefix(filter);
        if prefix.len() == filter.len() {
            // No wildcard: one lookup.
            if after.is_none() {
                if let Some(i) = inner.items.get(filter).filter(|i| !i.0.is_expired(now)) {
                    out.push(i.0.clone());
                }
            }
            return false;
        }
        let start = match after {
            Some(a) if a >= prefix => Bound::Excluded(a),
            _ => Bound::Included(prefix),
        };
        let mut taken = 0;
        for Item(msg) in inner.items.range::<str, _>((start, Bound::Unbounded)) {
            if !msg.topic.starts_with(prefix) {
                return false;
            }
            if !moatmq_acl::topic_matches_filter(filter, &msg.topic) || msg.is_expired(now) {
                continue;
            }
            if taken == max {
                return true;
            }
            out.push(msg.clone());
            taken += 1;
        }
        false
    }

    /// Replaces the content with `items` read back from a log and starts recording
    /// changes for it. Every message is kept, past the bounds too.
    pub(crate) fn load(&self, items: Items) {
        let mut inner = self.write();
        inner.items = Items::new();
        inner.bytes = 0;
        inner.owners.clear();
        inner.expiry.clear();
        for Item(msg) in &items {
            inner.count(msg, stored_bytes(msg));
        }
        inner.items = items;
        *inner.pending_mut() = Some(Pending::default());
        let limits = inner.limits;
        if inner.items.len() - inner.memory_only_count > limits.max_messages
            || inner.bytes > limits.max_bytes
        {
            tracing::warn!(
                messages = inner.items.len(),
                bytes = inner.bytes,
                "retained store holds more than max_messages/max_bytes; new topics are refused until under"
            );
        }
    }

    /// Takes the changes not yet written, as they are now.
    pub(crate) fn take_dirty(&self) -> Vec<Change> {
        let inner = self.read();
        let dirty = match inner.pending().as_mut() {
            Some(p) => std::mem::take(&mut p.dirty),
            None => return Vec::new(),
        };
        dirty.into_iter().map(|t| inner.change(t)).collect()
    }

    /// Gives back changes taken by [`RetainedSet::take_dirty`] that were not written.
    pub(crate) fn restore_dirty(&self, topics: impl IntoIterator<Item = String>) {
        if let Some(p) = self.read().pending().as_mut() {
            p.dirty.extend(topics);
        }
    }

    /// Topics changed and not yet written.
    pub(crate) fn pending(&self) -> usize {
        self.read().pending().as_ref().map_or(0, |p| p.dirty.len())
    }

    /// The unexpired messages for a compaction, from which on changes are also recorded
    /// for [`RetainedSet::end_snapshot`]. Taken under the read lock: publishes wait for
    /// it (a million `Arc` clones), subscribers do not.
    pub(crate) fn begin_snapshot(&self, now: u64) -> Vec<Arc<RetainedMessage>> {
        let inner = self.read();
        if let Some(p) = inner.pending().as_mut() {
            p.since_snapshot = Some(HashSet::new());
        }
        inner
            .items
            .iter()
            .filter(|i| !i.0.is_expired(now) && !(inner.memory_only)(&i.0.topic))
            .map(|i| i.0.clone())
            .collect()
    }

    /// Ends a compaction's recording: the changes since its snapshot (as they are now)
    /// and the topics not yet written (taken: the compacted file will hold them; give
    /// them back with [`RetainedSet::restore_dirty`] if it is not installed).
    pub(crate) fn end_snapshot(&self) -> (Vec<Change>, HashSet<String>) {
        let inner = self.read();
        let (since, dirty) = match inner.pending().as_mut() {
            Some(p) => (
                p.since_snapshot.take().unwrap_or_default(),
                std::mem::take(&mut p.dirty),
            ),
            None => return (Vec::new(), HashSet::new()),
        };
        let changes = since.into_iter().map(|t| inner.change(t)).collect();
        (changes, dirty)
    }

    /// Drops a compaction's recording (the job failed).
    pub(crate) fn abort_snapshot(&self) {
        if let Some(p) = self.read().pending().as_mut() {
            p.since_snapshot = None;
        }
    }
}

impl Inner {
    /// The pending changes, with only the read lock held.
    fn pending(&self) -> MutexGuard<'_, Option<Pending>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The pending changes, with the write lock held.
    fn pending_mut(&mut self) -> &mut Option<Pending> {
        self.pending.get_mut().unwrap_or_else(|e| e.into_inner())
    }

    fn owner<'a>(&self, msg: &'a RetainedMessage) -> &'a str {
        match &msg.owner {
            Some(o) => o,
            None => (self.legacy_owner)(&msg.topic),
        }
    }

    fn change(&self, topic: String) -> Change {
        let msg = self.items.get(topic.as_str()).map(|i| i.0.clone());
        (topic, msg)
    }

    fn count(&mut self, msg: &RetainedMessage, size: u64) {
        if (self.memory_only)(&msg.topic) {
            self.memory_only_count += 1;
            return;
        }
        if let Some(at) = msg.expires_at {
            self.expiry.insert((at, msg.topic.clone()));
        }
        self.bytes = self.bytes.saturating_add(size);
        let owner = self.owner(msg);
        let u = match self.owners.get_mut(owner) {
            Some(u) => u,
            None => self.owners.entry(owner.to_owned()).or_default(),
        };
        u.messages += 1;
        u.bytes = u.bytes.saturating_add(size);
    }

    fn uncount(&mut self, msg: &RetainedMessage) {
        if (self.memory_only)(&msg.topic) {
            self.memory_only_count = self.memory_only_count.saturating_sub(1);
            return;
        }
        let size = stored_bytes(msg);
        if let Some(at) = msg.expires_at {
            self.expiry.remove(&(at, msg.topic.clone()));
        }
        self.bytes = self.bytes.saturating_sub(size);
        let owner = self.owner(msg);
        if let Some(u) = self.owners.get_mut(owner) {
            u.messages = u.messages.saturating_sub(1);
            u.bytes = u.bytes.saturating_sub(size);
            if u.messages == 0 {
                self.owners.remove(owner);
            }
        }
    }

    fn touch(&mut self, topic: &str) {
        if (self.memory_only)(topic) {
            return;
        }
        if let Some(p) = self.pending_mut() {
            if let Some(s) = p.since_snapshot.as_mut() {
                s.insert(topic.to_owned());
            }
            p.dirty.insert(topic.to_owned());
        }
    }

    fn remove(&mut self, topic: &str) -> bool {
        let Some(old) = self.items.take(topic) else {
            return false;
        };
        self.uncount(&old.0);
        self.touch(topic);
        true
    }

    fn purge_expired(&mut self, now: u64) -> usize {
        let mut n = 0;
        while let Some((at, _)) = self.expiry.first() {
            if *at > now {
                break;
            }
            let Some((_, topic)) = self.expiry.pop_first() else {
                break;
            };
            n += usize::from(self.remove(&topic));
        }
        n
    }

    /// The bound `msg` (of `size` bytes) would pass by replacing its topic's message, if
    /// any. A total is only checked where it grows, so a set already past lowered bounds
    /// can still replace and shrink.
    fn refusal(&self, msg: &RetainedMessage, size: u64) -> Option<Refusal> {
        if (self.memory_only)(&msg.topic) {
            return None;
        }
        let limits = &self.limits;
        let old = self.items.get(msg.topic.as_str()).map(|i| &*i.0);
        let old_bytes = old.map_or(0, stored_bytes);
        if size == u64::MAX {
            return Some(Refusal::Store);
        }
        let counted = self.items.len() - self.memory_only_count;
        if old.is_none() && counted >= limits.max_messages {
            return Some(Refusal::Messages);
        }
        if size > old_bytes
            && self.bytes.saturating_sub(old_bytes).saturating_add(size) > limits.max_bytes
        {
            return Some(Refusal::Bytes);
        }
        let owner = self.owner(msg);
        // What the owner gets back from the message it replaces: all of it if it is its own.
        let (own_count, own_bytes) = match old {
            Some(e) if self.owner(e) == owner => (1, old_bytes),
            _ => (0, 0),
        };
        let usage = self.owners.get(owner).copied().unwrap_or_default();
        if limits.max_messages_per_user != 0
            && own_count == 0
            && usage.messages >= limits.max_messages_per_user
        {
            return Some(Refusal::UserMessages);
        }
        if limits.max_bytes_per_user != 0
            && size > own_bytes
            && usage.bytes.saturating_sub(own_bytes).saturating_add(size)
                > limits.max_bytes_per_user
        {
            return Some(Refusal::UserBytes);
        }
        None
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

#[cfg(test)]
mod tests;
