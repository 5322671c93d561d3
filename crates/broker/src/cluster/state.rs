//! Retained messages shared through JetStream key-value buckets (docs/cluster.md,
//! "Stored state"), sealed with keys derived from the `[retained]` key
//! (`moatmq_store::ClusterSeal`), so NATS holds hashes and ciphertext only.
//!
//! - Key marker: bucket `<base>_meta`, key `key-check`. The first node creates it
//!   (create-only); every node opens it before anything else, and a node whose key does
//!   not open it never loads or writes the cluster's state: start fails, or, if NATS
//!   was away at start, the node stays unready and logs why.
//! - Out: every retained publish `admit` lets in from this node ([`Change`]) is put
//!   into `<base>_retained` at the keyed hash of its topic by one task, in admit order;
//!   an empty payload deletes the key. A change JetStream does not take (NATS away, a
//!   leader election, a limit) waits in [`Pending`] and is written again every
//!   [`RETRY`] (and after each reconnection) until it is: one change per topic, the
//!   latest (a later change of a topic replaces the waiting one in place, so an older
//!   one is never written after it), at most `STATE_QUEUE` topics; past that a change
//!   of another topic is lost for nodes that start later (counted). While a topic's
//!   change waits, the bucket's values of it are not applied here: they are older.
//! - In: the same task watches the whole bucket from the last value of each key on and
//!   applies every value to the local retained set (which the local store persists),
//!   never through `admit`, so nothing applied is put back; values older than one this
//!   node put itself since are skipped. A value that does not open is refused (logged
//!   at error, counted in `moatmq_cluster_state_rejected_total`) and the local copy of
//!   its key, if any, is dropped: the cluster's current value of that topic is not one
//!   this node can trust.
//! - Ready: the node is not ready (`cluster_state_ok`) until the values present when the
//!   watch started are applied, so a node that joins late serves them at once.

use crate::metrics::Metrics;
use crate::retained_index::RetainedIndex;
use async_nats::jetstream::{self, kv};
use futures_util::StreamExt;
use moatmq_store::{now_unix, ClusterSeal, RetainedMessage};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Weak;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// The key marker's key in the meta bucket.
pub const MARKER_KEY: &str = "key-check";

/// How long to wait before setting the buckets up again after a failure.
const RETRY: Duration = Duration::from_secs(1);

/// A retained change `admit` let in on this node, on its way to the bucket.
pub enum Change {
    /// Set or replace the message of its topic.
    Put(RetainedMessage),
    /// Clear the message of this topic.
    Delete(String),
}

/// What the key marker said, for `Broker::start`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyCheck {
    /// Not checked yet (NATS not reached so far).
    Pending,
    /// This node's key opens the marker (or wrote it).
    Passed,
    /// It does not: why, naming the cluster and the key's source.
    Failed(String),
}

/// The bucket names of one cluster: its subject prefix with every character a bucket
/// name cannot hold (anything but letters, digits, `-`, `_`) written `_`.
pub fn bucket_base(prefix: &str) -> String {
    prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The task keeping this node's retained set and the cluster's bucket in step.
pub struct StateSync {
    client: async_nats::Client,
    seal: ClusterSeal,
    /// Copies of its buckets (`[cluster] replicas`).
    replicas: usize,
    base: String,
    prefix: String,
    /// Where the key came from (key file or environment variable), for the error.
    key_source: String,
    index: RetainedIndex,
    metrics: Weak<Metrics>,
    changes: mpsc::Receiver<Change>,
    checked: watch::Sender<KeyCheck>,
    /// The topic of every KV key applied or written, to apply deletes (which carry
    /// the key only).
    topics: HashMap<String, String>,
    /// The revision of each key this node put and has not seen back from the watch yet:
    /// older values of it still on their way are not applied over this node's newer one.
    written: HashMap<String, u64>,
    /// This node's changes not stored in the bucket yet.
    pending: Pending,
    /// Whether the last write failed (warn once per run of failures, not per retry).
    failing: bool,
}

/// Changes waiting for the bucket: the latest one of each KV key, in the order their
/// keys first waited, at most `cap` keys.
struct Pending {
    order: VecDeque<String>,
    changes: HashMap<String, Change>,
    cap: usize,
}

impl Pending {
    fn new(cap: usize) -> Pending {
        Pending {
            order: VecDeque::new(),
            changes: HashMap::new(),
            cap,
        }
    }

    /// Keeps `change` for `key`, replacing an older change of it in place; `false`
    /// (not kept) when `cap` other keys wait already.
    fn push(&mut self, key: String, change: Change) -> bool {
        if let Some(waiting) = self.changes.get_mut(&key) {
            *waiting = change;
            return true;
        }
        if self.changes.len() >= self.cap {
            return false;
        }
        self.order.push_back(key.clone());
        self.changes.insert(key, change);
        true
    }

    /// The change waiting longest, with its key, left in place until [`Pending::done`].
    fn first(&self) -> Option<(&String, &Change)> {
        let key = self.order.front()?;
        self.changes.get(key).map(|c| (key, c))
    }

    /// The first change is stored.
    fn done(&mut self) {
        if let Some(key) = self.order.pop_front() {
            self.changes.remove(&key);
        }
    }

    fn holds(&self, key: &str) -> bool {
        self.changes.contains_key(key)
    }

    fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// How one round of [`StateSync::sync`] ended.
enum Ended {
    /// The broker is gone (its `Cluster` dropped the change queue).
    Stopped,
    /// NATS or JetStream failed; try again.
    Retry(String),
    /// The key does not open the marker: never go on.
    WrongKey(String),
}

impl StateSync {
    #[allow(clippy::too_many_arguments)] // reason: one constructor, each field named once
    pub fn new(
        client: async_nats::Client,
        seal: ClusterSeal,
        prefix: &str,
        key_source: String,
        index: RetainedIndex,
        metrics: Weak<Metrics>,
        changes: mpsc::Receiver<Change>,
        checked: watch::Sender<KeyCheck>,
        replicas: usize,
        queue: usize,
    ) -> StateSync {
        StateSync {
            client,
            seal,
            replicas,
            base: bucket_base(prefix),
            prefix: prefix.to_string(),
            key_source,
            index,
            metrics,
            changes,
            checked,
            topics: HashMap::new(),
            written: HashMap::new(),
            pending: Pending::new(queue),
            failing: false,
        }
    }

    fn meta_bucket(&self) -> String {
        format!("{}_meta", self.base)
    }

    fn retained_bucket(&self) -> String {
        format!("{}_retained", self.base)
    }

    fn set_loaded(&self, loaded: bool) {
        if let Some(m) = self.metrics.upgrade() {
            m.cluster_state_ok.store(loaded, Ordering::Release);
        }
    }

    /// Runs until the broker is gone, or for good on a wrong key.
    pub async fn run(mut self) {
        self.set_loaded(false);
        loop {
            while self.client.connection_state() != async_nats::connection::State::Connected {
                // Kept (and coalesced) meanwhile, so the queue stays free for more.
                loop {
                    match self.changes.try_recv() {
                        Ok(change) => self.keep(change),
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => return,
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            match self.sync().await {
                Ended::Stopped => return,
                Ended::Retry(why) => {
                    self.set_loaded(false);
                    tracing::warn!("cluster: shared retained state: {why}; retrying");
                    tokio::time::sleep(RETRY).await;
                }
                Ended::WrongKey(why) => {
                    self.set_loaded(false);
                    tracing::error!("cluster: {why}; this node stays unready");
                    self.checked.send_replace(KeyCheck::Failed(why));
                    return;
                }
            }
        }
    }

    /// Sets the buckets up, checks the marker, then applies the bucket and writes this
    /// node's changes until something fails.
    async fn sync(&mut self) -> Ended {
        let js = jetstream::new(self.client.clone());
        let meta = match bucket(&js, &self.meta_bucket(), self.replicas).await {
            Ok(b) => b,
            Err(why) => return Ended::Retry(why),
        };
        if let Some(ended) = self.check_marker(&meta).await {
            return ended;
        }
        self.checked.send_replace(KeyCheck::Passed);
        let store = match bucket(&js, &self.retained_bucket(), self.replicas).await {
            Ok(b) => b,
            Err(why) => return Ended::Retry(why),
        };
        // Deletes made while this node was away name keys only: know the topics held.
        for msg in self.index.messages() {
            if !msg.topic.starts_with('$') {
                self.topics
                    .insert(self.seal.key_of(&msg.topic), msg.topic.clone());
            }
        }
        let mut entries = match store.watch_with_history(">").await {
            Ok(w) => w,
            Err(e) => return Ended::Retry(format!("watching {}: {e}", self.retained_bucket())),
        };
        // Anything put after the watch started is delivered to it: an empty bucket now
        // means nothing is left to load.
        let mut loaded = false;
        match store.status().await {
            Ok(status) if status.values() == 0 => loaded = true,
            Ok(_) => {}
            Err(e) => return Ended::Retry(format!("{}: {e}", self.retained_bucket())),
        }
        if loaded {
            self.set_loaded(true);
        }
        // Waiting changes are written once what the bucket held is applied (their keys'
        // older values skipped), then as they come; after a failure, every RETRY.
        let mut retry_at: Option<tokio::time::Instant> = None;
        loop {
            if loaded && retry_at.is_none() && !self.pending.is_empty() && !self.flush(&store).await
            {
                retry_at = Some(tokio::time::Instant::now() + RETRY);
            }
            let retry = async {
                match retry_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                entry = entries.next() => match entry {
                    Some(Ok(entry)) => {
                        let current = entry.delta == 0;
                        self.apply(entry);
                        if current && !loaded {
                            loaded = true;
                            self.set_loaded(true);
                        }
                    }
                    Some(Err(e)) => return Ended::Retry(format!("watch: {e}")),
                    None => return Ended::Retry("watch ended".into()),
                },
                change = self.changes.recv() => match change {
                    Some(change) => self.keep(change),
                    None => return Ended::Stopped,
                },
                () = retry => retry_at = None,
            }
        }
    }

    /// `None` when the marker opens (or this node wrote it).
    async fn check_marker(&self, meta: &kv::Store) -> Option<Ended> {
        let bucket = self.meta_bucket();
        let sealed = match self.seal.seal_marker(&bucket, MARKER_KEY) {
            Ok(v) => v,
            Err(e) => return Some(Ended::Retry(format!("key marker: {e}"))),
        };
        match meta.create(MARKER_KEY, sealed.into()).await {
            Ok(_) => {
                tracing::info!(bucket, "cluster: key marker written (first node)");
                return None;
            }
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(e) => return Some(Ended::Retry(format!("key marker: {e}"))),
        }
        match meta.get(MARKER_KEY).await {
            Ok(Some(value)) if self.seal.opens_marker(&bucket, MARKER_KEY, &value) => None,
            Ok(Some(_)) => Some(Ended::WrongKey(format!(
                "the [retained] key ({}) does not open the key marker of cluster \"{}\" \
                 (NATS KV {bucket}/{MARKER_KEY}): every node of a cluster must use the \
                 same [retained] key",
                self.key_source, self.prefix
            ))),
            Ok(None) => Some(Ended::Retry("key marker deleted meanwhile".into())),
            Err(e) => Some(Ended::Retry(format!("key marker: {e}"))),
        }
    }

    /// Applies one value of the bucket to the local retained set.
    fn apply(&mut self, entry: kv::Entry) {
        if self.pending.holds(&entry.key) {
            // This node's later change of the key waits to be written over it.
            return;
        }
        if let Some(&written) = self.written.get(&entry.key) {
            if entry.revision < written {
                return;
            }
            self.written.remove(&entry.key);
        }
        match entry.operation {
            kv::Operation::Put => {
                let bucket = self.retained_bucket();
                let opened = self
                    .seal
                    .open_retained(&bucket, &entry.key, &entry.value)
                    .and_then(|msg| {
                        if msg.topic.starts_with('$') {
                            Err(moatmq_store::StoreError::SealedValue {
                                bucket: bucket.clone(),
                                key: entry.key.clone(),
                                reason: "a $ topic is never shared".into(),
                            })
                        } else {
                            Ok(msg)
                        }
                    });
                match opened {
                    Ok(msg) => {
                        self.topics.insert(entry.key, msg.topic.clone());
                        if msg.is_expired(now_unix()) {
                            self.index.clear(&msg.topic);
                        } else if let Err(why) = self.index.set(msg) {
                            tracing::warn!(
                                reason = why.label(),
                                "cluster: shared retained message over this node's quota; not applied"
                            );
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cluster: shared retained value refused; not applied");
                        if let Some(m) = self.metrics.upgrade() {
                            m.cluster_state_rejected.inc();
                        }
                        if let Some(topic) = self.topics.remove(&entry.key) {
                            self.index.clear(&topic);
                        }
                    }
                }
            }
            kv::Operation::Delete | kv::Operation::Purge => {
                if let Some(topic) = self.topics.remove(&entry.key) {
                    self.index.clear(&topic);
                }
            }
        }
    }

    /// Queues one change of this node for the bucket (see [`Pending`]).
    fn keep(&mut self, change: Change) {
        let key = match &change {
            Change::Put(msg) => {
                let key = self.seal.key_of(&msg.topic);
                self.topics.insert(key.clone(), msg.topic.clone());
                key
            }
            Change::Delete(topic) => self.seal.key_of(topic),
        };
        if !self.pending.push(key, change) {
            tracing::debug!("cluster: retained changes waiting for NATS full; change not stored");
            if let Some(m) = self.metrics.upgrade() {
                m.cluster_dropped.inc();
            }
        }
    }

    /// Writes the waiting changes in order; `false` when one failed (it stays first).
    async fn flush(&mut self, store: &kv::Store) -> bool {
        while let Some((key, change)) = self.pending.first() {
            let key = key.clone();
            let written = match change {
                Change::Put(msg) => match self.seal.seal_retained(&self.retained_bucket(), msg) {
                    Ok((_, value)) => match store.put(&key, value.into()).await {
                        Ok(revision) => {
                            self.written.insert(key, revision);
                            Ok(())
                        }
                        Err(e) => Err(e.to_string()),
                    },
                    Err(e) => {
                        // Never sealable: not kept (counted, as before the retries).
                        tracing::warn!("cluster: retained change not stored in NATS: {e}");
                        if let Some(m) = self.metrics.upgrade() {
                            m.cluster_dropped.inc();
                        }
                        Ok(())
                    }
                },
                Change::Delete(_) => store.delete(&key).await.map_err(|e| e.to_string()),
            };
            match written {
                Ok(()) => {
                    self.pending.done();
                    if self.failing {
                        self.failing = false;
                        tracing::info!("cluster: retained changes stored in NATS again");
                    }
                }
                Err(e) => {
                    if !self.failing {
                        self.failing = true;
                        tracing::warn!(
                            "cluster: retained change not stored in NATS yet: {e}; kept, \
                             written again when JetStream takes it"
                        );
                    }
                    return false;
                }
            }
        }
        true
    }
}

/// How JetStream keeps what the cluster stores: `[cluster]` `replicas`,
/// `transfer_max_age` and `transfer_max_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keeping {
    pub replicas: usize,
    pub transfer_max_age: Duration,
    pub transfer_max_bytes: i64,
}

impl Keeping {
    pub fn of(cluster: &moatmq_config::Cluster) -> Keeping {
        Keeping {
            replicas: cluster.replicas,
            transfer_max_age: Duration::from_secs(cluster.transfer_max_age),
            transfer_max_bytes: i64::try_from(cluster.transfer_max_bytes).unwrap_or(i64::MAX),
        }
    }
}

/// Warns when the stream `name` found in NATS keeps another number of copies than
/// configured: an existing stream is not changed by a node (`nats stream edit` does).
pub(super) fn check_replicas(name: &str, found: usize, replicas: usize) {
    if found != replicas {
        tracing::warn!(
            "cluster: stream {name} keeps {found} replica(s), [cluster] replicas = {replicas}; \
             nodes do not change an existing stream (nats stream edit {name} --replicas {replicas})"
        );
    }
}

/// The bucket `name` (history 1, `replicas` copies), created by the first node that
/// needs it. Its stream is created here as async-nats's `create_key_value` would,
/// without that call's account-info request: the reply of nats-server 2.9 lacks fields
/// (`reserved_memory`) async-nats 0.46 requires.
pub(super) async fn bucket(
    js: &jetstream::Context,
    name: &str,
    replicas: usize,
) -> Result<kv::Store, String> {
    if let Ok(mut stream) = js.get_stream(format!("KV_{name}")).await {
        if let Ok(info) = stream.info().await {
            check_replicas(&info.config.name, info.config.num_replicas, replicas);
        }
    }
    if let Ok(store) = js.get_key_value(name).await {
        return Ok(store);
    }
    let config = jetstream::stream::Config {
        name: format!("KV_{name}"),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: 1,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: jetstream::stream::DiscardPolicy::New,
        num_replicas: replicas,
        ..Default::default()
    };
    // Another node may create it meanwhile: the same config is no error.
    js.get_or_create_stream(config)
        .await
        .map_err(|e| format!("bucket {name}: {e}"))?;
    js.get_key_value(name)
        .await
        .map_err(|e| format!("bucket {name}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::{bucket_base, Change, Pending};

    fn deleted(p: &Pending, key: &str) -> Option<String> {
        match p.changes.get(key) {
            Some(Change::Delete(topic)) => Some(topic.clone()),
            _ => None,
        }
    }

    #[test]
    fn a_later_change_of_a_key_replaces_the_waiting_one_in_place_within_the_cap() {
        let mut p = Pending::new(2);
        assert!(p.push("k1".into(), Change::Delete("first".into())));
        assert!(p.push("k2".into(), Change::Delete("other".into())));
        // Replacing never counts against the cap nor moves the key back.
        assert!(p.push("k1".into(), Change::Delete("second".into())));
        assert!(!p.push("k3".into(), Change::Delete("over".into())));
        assert!(p.holds("k1") && p.holds("k2") && !p.holds("k3"));
        assert_eq!(p.first().map(|(k, _)| k.as_str()), Some("k1"));
        assert_eq!(deleted(&p, "k1").as_deref(), Some("second"));
        p.done();
        assert_eq!(p.first().map(|(k, _)| k.as_str()), Some("k2"));
        assert!(!p.holds("k1"));
        p.done();
        assert!(p.is_empty() && p.first().is_none());
        assert!(p.push("k3".into(), Change::Delete("room again".into())));
    }

    #[test]
    fn bucket_names_hold_only_what_jetstream_allows() {
        assert_eq!(bucket_base("moatmq"), "moatmq");
        assert_eq!(bucket_base("site.a-1_b"), "site_a-1_b");
        assert_eq!(bucket_base("x/y$z"), "x_y_z");
    }
}
