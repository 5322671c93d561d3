//! The sessions of this node waiting for a late handoff (`late.rs`): kept apart from
//! the task that takes them, which needs the broker's shared state.

use moatmq_store::{QueuedMessage, SessionKey};
use prometheus_client::metrics::gauge::Gauge;
use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use tokio::time::Instant;

/// How long a session started new after the handoff wait still takes what its previous
/// node hands over late: long enough for a restarted pod, bounded so that the waits of
/// a dead node's sessions do not pile up.
pub const LATE_WAIT: Duration = Duration::from_secs(600);

/// Sessions waiting for a late handoff, by KV key.
pub struct LateWaits {
    waiting: Mutex<HashMap<String, Waiting>>,
    /// `moatmq_cluster_late_waits`.
    gauge: Gauge,
}

pub(super) struct Waiting {
    pub(super) router_id: String,
    pub(super) key: SessionKey,
    /// The revision of this node's claim: a handoff for an older claim is not taken.
    pub(super) revision: u64,
    /// The session was resumed from the old node's live park (`park.rs`): what that
    /// brought is left out of a late handoff.
    pub(super) parked: Option<ParkedResume>,
    until: Instant,
}

/// A session resumed from its old node's live park.
#[derive(Debug)]
pub struct ParkedResume {
    /// The park held the old node's messages up to this id in its store.
    pub through: u64,
    /// What was read on the old node's behalf from its transfer consumer (`unread.rs`).
    pub read: ReadOnBehalf,
}

/// The messages read on a node's behalf, by digest of topic and payload, counted: the
/// same messages reach that node through its consumer when it comes back, and are then
/// in its late handoff beyond its park, under ids of its own store. Each one read
/// leaves one equal message out of the handoff (two equal messages published are two
/// read, and two in the handoff).
#[derive(Debug, Default)]
pub struct ReadOnBehalf {
    counts: HashMap<u64, u32>,
}

impl ReadOnBehalf {
    pub fn of<'a>(messages: impl Iterator<Item = &'a QueuedMessage>) -> Self {
        let mut read = Self::default();
        for m in messages {
            *read.counts.entry(digest(m)).or_default() += 1;
        }
        read
    }

    /// Whether `m` was read already (and counts it off).
    pub(super) fn take(&mut self, m: &QueuedMessage) -> bool {
        match self.counts.get_mut(&digest(m)) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    }
}

/// Process-local (never stored or sent): topic and payload of a message.
fn digest(m: &QueuedMessage) -> u64 {
    let mut h = DefaultHasher::new();
    m.topic.hash(&mut h);
    m.payload.hash(&mut h);
    h.finish()
}

impl LateWaits {
    pub fn new(gauge: Gauge) -> LateWaits {
        LateWaits {
            waiting: Mutex::new(HashMap::new()),
            gauge,
        }
    }

    /// The session `key` (KV key `kv_key`) was started new (or resumed from the old
    /// node's live park: `parked`) for the claim at `revision` after the old node did
    /// not answer.
    pub fn wait(
        &self,
        kv_key: &str,
        router_id: &str,
        key: &SessionKey,
        revision: u64,
        parked: Option<ParkedResume>,
    ) {
        let now = Instant::now();
        let mut waiting = lock(&self.waiting);
        waiting.retain(|_, w| w.until > now);
        waiting.insert(
            kv_key.to_string(),
            Waiting {
                router_id: router_id.to_string(),
                key: key.clone(),
                revision,
                parked,
                until: now + LATE_WAIT,
            },
        );
        self.gauge.set(waiting.len() as i64);
    }

    /// Takes the wait for `kv_key` if it is still on.
    pub(super) fn take(&self, kv_key: &str) -> Option<Waiting> {
        let mut waiting = lock(&self.waiting);
        let w = waiting.remove(kv_key);
        self.gauge.set(waiting.len() as i64);
        w.filter(|w| w.until > Instant::now())
    }

    pub(super) fn keys(&self) -> Vec<String> {
        let now = Instant::now();
        let mut waiting = lock(&self.waiting);
        waiting.retain(|_, w| w.until > now);
        self.gauge.set(waiting.len() as i64);
        waiting.keys().cloned().collect()
    }
}

impl LateWaits {
    /// A wait taken for a value that was not the right one goes on.
    pub(super) fn put_back(&self, kv_key: &str, waiting: Waiting) {
        let mut all = lock(&self.waiting);
        all.insert(kv_key.to_string(), waiting);
        self.gauge.set(all.len() as i64);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
