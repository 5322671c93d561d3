//! Retained messages shared through JetStream key-value buckets (docs/cluster.md,
//! "Stored state"), sealed with keys derived from the `[retained]` key
//! (`moatmq_store::ClusterSeal`), so NATS holds hashes and ciphertext only.
//!
//! - Key marker: bucket `<base>_meta`, key `key-check`. The first node creates it
//!   (create-only); every node opens it before anything else, and a node whose key does
//!   not open it never loads or writes the cluster's state: start fails, or, if NATS
//!   was away at start, the node stays unready and logs why.
//! - Out: every retained publish `admit` lets in from this node ([`Change`]) is put
//!   into `<base>_retained` at the keyed hash of its topic by one task, numbered in
//!   admit order; an empty payload deletes the key. Changes of different topics are
//!   written side by side ([`WINDOW`] at most, each awaiting JetStream's
//!   acknowledgement). A change JetStream does not take (NATS away, a leader
//!   election, a limit) waits in [`Waiting`] and is written again every [`RETRY`]
//!   (and after each reconnection) until it is: one change per topic, the latest (a
//!   later change of a topic replaces the waiting one in place, so an older one is
//!   never written after it), at most `[cluster] retained_queue` topics; past that a QoS 0 change
//!   of another topic is lost for nodes that start later (counted). A QoS 1/2 change
//!   is always kept: its publisher's PUBACK (PUBREC) waits until the bucket holds it
//!   (or a later change of its topic), as it waits for the transfer stream, so an
//!   acknowledged retained message outlives its node. While a topic's change waits,
//!   the bucket's values of it are not applied here: they are older.
//! - In: the same task watches the whole bucket from the last value of each key on and
//!   applies every value to the local retained set (which the local store persists),
//!   never through `admit`, so nothing applied is put back; a value this node put
//!   itself, and older ones still on their way, are skipped. A value that does not open is refused (logged
//!   at error, counted in `moatmq_cluster_state_rejected_total`) and the local copy of
//!   its key, if any, is dropped: the cluster's current value of that topic is not one
//!   this node can trust.
//! - Ready: the node is not ready (`cluster_state_ok`) until the values present when the
//!   watch started are applied, so a node that joins late serves them at once.
//! - Sweep: then the shareable topics of the local set the load did not name are cleared
//!   (or, at the first load of a bucket this node never joined, put into it), because
//!   delete markers older than `retained_marker_age` are compacted (`markers.rs`,
//!   `sweep.rs`).

use super::markers::{unix_nanos, until, Markers};
use super::sequencer::Done;
use super::sweep::{JoinRecord, Relayed, Unnamed};
use super::waiting::{Change, Numbered, Waiting};
use crate::metrics::Metrics;
use crate::retained_index::RetainedIndex;
use async_nats::jetstream::{self, kv};
use futures_util::stream::FuturesOrdered;
use futures_util::StreamExt;
use moatmq_store::{now_unix, ClusterSeal, RetainedMessage};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Weak;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// The key marker's key in the meta bucket.
pub const MARKER_KEY: &str = "key-check";

/// How long to wait before setting the buckets up again after a failure.
const RETRY: Duration = Duration::from_secs(1);

/// Markers compacted in one go before the task turns to its watch and changes again.
const COMPACT_BATCH: usize = 64;

/// Changes written side by side at most (each a KV put or delete awaiting JetStream's
/// acknowledgement).
const WINDOW: usize = 256;

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
    changes: mpsc::Receiver<Numbered>,
    /// How far this node's changes are stored (or dropped): every number up to it.
    stored: Done,
    /// The number of the last change received.
    received: u64,
    checked: watch::Sender<KeyCheck>,
    /// The topic of every KV key applied or written, to apply deletes (which carry
    /// the key only).
    topics: HashMap<String, String>,
    /// The revision of each key this node put and has not seen back from the watch yet:
    /// older values of it still on their way are not applied over this node's newer one.
    written: HashMap<String, u64>,
    /// This node's changes not stored in the bucket yet.
    pending: Waiting,
    /// Whether the last write failed (warn once per run of failures, not per retry).
    failing: bool,
    /// Delete markers seen in the bucket, compacted once `retained_marker_age` old.
    markers: Markers,
    /// `retained_marker_age`.
    marker_age: Duration,
    /// Where this node records that it joined the bucket (`sweep.rs`).
    join: JoinRecord,
    /// The bucket's stream and creation time this node joined (its topics held before
    /// joining are in it), once known in this run.
    joined: Option<(String, i128)>,
    /// The stream and creation time of the bucket loaded now.
    loading: Option<(String, i128)>,
    /// Whether values are written with their sealing time (without it while nodes of a
    /// release before it must open them, `accept_untimed`).
    untimed: super::replay::Untimed,
    /// What the current load does with the local topics it did not name.
    unnamed: Unnamed,
    /// Topics held before joining still to be put into the bucket.
    seed: Vec<String>,
    /// Topics set through the transfer stream lately (kept from the sweep).
    relayed: Relayed,
    /// Changes with every lost NATS connection: the watch resumes by itself after one,
    /// past markers compacted meanwhile, so the task loads the bucket again instead.
    lost: watch::Receiver<u64>,
}

/// What [`StateSync`] needs beside NATS, the seal and its queues, from the config.
pub(super) struct Local {
    /// Where the join record lives: the `[retained]` store's folder.
    pub(super) store_dir: std::path::PathBuf,
    /// `[cluster] retained_marker_age`.
    pub(super) marker_age: Duration,
    /// Topics `admit` set through the transfer stream lately.
    pub(super) relayed: Relayed,
    /// Changes with every lost NATS connection.
    pub(super) lost: watch::Receiver<u64>,
    /// Where to say how far this node's changes are stored.
    pub(super) stored: Done,
    /// `[cluster] accept_untimed`.
    pub(super) untimed: super::replay::Untimed,
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
        changes: mpsc::Receiver<Numbered>,
        checked: watch::Sender<KeyCheck>,
        replicas: usize,
        queue: usize,
        local: Local,
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
            stored: local.stored,
            received: 0,
            checked,
            topics: HashMap::new(),
            written: HashMap::new(),
            pending: Waiting::new(queue),
            failing: false,
            markers: Markers::new(local.marker_age),
            marker_age: local.marker_age,
            join: JoinRecord::in_dir(&local.store_dir),
            joined: None,
            loading: None,
            unnamed: Unnamed::Seed,
            seed: Vec::new(),
            relayed: local.relayed,
            lost: local.lost,
            untimed: local.untimed,
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
                if !self.keep_queued() {
                    return;
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
        // A connection lost from now on ends this load (see `lost`).
        self.lost.borrow_and_update();
        let mut entries = match store.watch_with_history(">").await {
            Ok(w) => w,
            Err(e) => return Ended::Retry(format!("watching {}: {e}", self.retained_bucket())),
        };
        // Anything put after the watch started is delivered to it: an empty bucket now
        // means nothing is left to load.
        let status = match store.status().await {
            Ok(status) => status,
            Err(e) => return Ended::Retry(format!("{}: {e}", self.retained_bucket())),
        };
        let mut loaded = status.values() == 0;
        self.begin_load(&status.info);
        // The keys the load delivered, and the last revision it did.
        let mut delivered = HashSet::new();
        let mut last_revision = 0;
        if loaded {
            self.loaded(&delivered);
        }
        // Waiting changes are written once what the bucket held is applied (their keys'
        // older values skipped), then as they come; after a failure, every RETRY.
        let mut retry_at: Option<tokio::time::Instant> = None;
        loop {
            if loaded && retry_at.is_none() {
                self.feed_seed();
                if !self.pending.is_empty() && !self.flush(&store).await {
                    retry_at = Some(tokio::time::Instant::now() + RETRY);
                } else {
                    self.seeded();
                }
            }
            let retry = async {
                match retry_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let compact = self.next_compaction();
            tokio::select! {
                entry = entries.next() => match entry {
                    Some(Ok(entry)) => {
                        let current = entry.delta == 0;
                        if !loaded {
                            delivered.insert(entry.key.clone());
                            last_revision = last_revision.max(entry.revision);
                        }
                        self.apply(entry);
                        if current && !loaded {
                            loaded = true;
                            self.loaded(&delivered);
                        }
                    }
                    Some(Err(e)) => return Ended::Retry(format!("watch: {e}")),
                    None => return Ended::Retry("watch ended".into()),
                },
                change = self.changes.recv() => match change {
                    Some(change) => {
                        self.keep(change);
                        // What came meanwhile is written side by side with it.
                        self.keep_queued();
                    }
                    None => return Ended::Stopped,
                },
                () = retry => retry_at = None,
                () = compact => self.compact(&store).await,
                Ok(()) = self.lost.changed() => {
                    return Ended::Retry("NATS connection lost; loading the bucket again".into());
                }
                // A marker compacted by another node before this watch reached it may
                // have been the last value: the watch then never says it is current.
                () = tokio::time::sleep(RETRY), if !loaded => {
                    if nothing_after(&store, last_revision).await {
                        loaded = true;
                        self.loaded(&delivered);
                    }
                }
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
        // Whoever wrote it, a marker left in the bucket is this node's to compact too.
        match entry.operation {
            kv::Operation::Put => self.markers.seen_put(&entry.key),
            kv::Operation::Delete | kv::Operation::Purge => self.markers.seen_marker(
                &entry.key,
                entry.revision,
                entry.created.unix_timestamp_nanos(),
            ),
        }
        if self.pending.holds(&entry.key) {
            // This node's later change of the key waits to be written over it.
            return;
        }
        if let Some(&written) = self.written.get(&entry.key) {
            if entry.revision < written {
                return;
            }
            self.written.remove(&entry.key);
            if entry.revision == written {
                // This node's own put come back: the local set has it (or a later
                // change of it waiting) already.
                return;
            }
        }
        match entry.operation {
            kv::Operation::Put => {
                let bucket = self.retained_bucket();
                let refused = |reason: String| moatmq_store::StoreError::SealedValue {
                    bucket: bucket.clone(),
                    key: entry.key.clone(),
                    reason,
                };
                let opened = self
                    .seal
                    .open_retained(&bucket, &entry.key, &entry.value)
                    .and_then(|(msg, sealed)| {
                        if msg.topic.starts_with('$') {
                            Err(refused("a $ topic is never shared".into()))
                        } else {
                            Ok((msg, sealed))
                        }
                    });
                let stored = Some(super::replay::stored_ms(entry.created));
                if let Ok((_, sealed)) = &opened {
                    if let Err(why) = super::replay::check_kv(*sealed, stored) {
                        // An authentic value stored again later:
                        // not the topic's current value, but no reason to distrust the
                        // copy this node holds (its own put, sent late after NATS came
                        // back, is one too, and its retry follows).
                        tracing::error!(
                            error = %refused(why),
                            "cluster: shared retained value refused; not applied"
                        );
                        if let Some(m) = self.metrics.upgrade() {
                            m.cluster_state_rejected.inc();
                        }
                        return;
                    }
                }
                let opened = opened.map(|(msg, _)| msg);
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

    /// A load of the bucket whose stream is `info` starts: it sweeps if this node
    /// joined that bucket before, else it seeds it.
    fn begin_load(&mut self, info: &jetstream::stream::Info) {
        let bucket = (
            info.config.name.clone(),
            info.created.unix_timestamp_nanos(),
        );
        let joined = self.joined.as_ref() == Some(&bucket) || self.join.names(&bucket.0, bucket.1);
        self.unnamed = if joined {
            self.joined = Some(bucket.clone());
            Unnamed::Clear
        } else {
            Unnamed::Seed
        };
        self.loading = Some(bucket);
        self.seed.clear();
    }

    /// The values present when the watch started are applied (`delivered` names their
    /// keys): the node sweeps (`after_load`) and is ready.
    fn loaded(&mut self, delivered: &HashSet<String>) {
        self.after_load(delivered);
        self.set_loaded(true);
    }

    /// The shareable topics of the local set the load did not name (`delivered`) are
    /// cleared, or put into the bucket at the first load of it (`sweep.rs`).
    fn after_load(&mut self, delivered: &HashSet<String>) {
        // Changes admitted so far are newer than the load: keep them from the sweep.
        self.keep_queued();
        let held = self.index.messages();
        let window = super::sweep::relayed_window(self.marker_age);
        let unnamed = super::sweep::unnamed(
            held.iter().map(|m| m.topic.as_str()),
            |topic| self.seal.key_of(topic),
            delivered,
            |key, topic| self.pending.holds(key) || self.relayed.recent(topic, window),
        );
        match self.unnamed {
            Unnamed::Clear => {
                for (key, topic) in &unnamed {
                    self.topics.remove(key);
                    self.index.clear(topic);
                }
                if !unnamed.is_empty() {
                    tracing::info!(
                        cleared = unnamed.len(),
                        "cluster: retained topics the bucket no longer names cleared \
                         (cleared elsewhere while this node was away)"
                    );
                }
            }
            Unnamed::Seed => {
                if !unnamed.is_empty() {
                    tracing::info!(
                        topics = unnamed.len(),
                        "cluster: first load of this retained bucket: putting the retained \
                         messages this node held before joining into it"
                    );
                }
                self.seed = unnamed.into_iter().map(|(_, topic)| topic).collect();
            }
        }
    }

    /// Moves topics held before joining into the waiting changes, as room allows.
    fn feed_seed(&mut self) {
        while self.pending.has_room() {
            let Some(topic) = self.seed.pop() else {
                return;
            };
            let Some(msg) = self.index.get(&topic) else {
                continue; // cleared meanwhile
            };
            let key = self.seal.key_of(&topic);
            if self.pending.holds(&key) || msg.is_expired(now_unix()) {
                continue;
            }
            self.topics.insert(key.clone(), topic);
            self.pending
                .push(key, Change::Put(RetainedMessage::clone(&msg)), None, false);
        }
    }

    /// Once everything held before joining is in the bucket, records the join: later
    /// loads of this bucket sweep.
    fn seeded(&mut self) {
        if self.unnamed != Unnamed::Seed || !self.seed.is_empty() || !self.pending.is_empty() {
            return;
        }
        let Some(bucket) = self.loading.clone() else {
            return;
        };
        match self.join.write(&bucket.0, bucket.1) {
            Ok(()) => tracing::info!(stream = bucket.0, "cluster: joined the retained bucket"),
            // This run sweeps from now on all the same; the next start puts what it
            // holds into the bucket again, which loses nothing.
            Err(e) => tracing::warn!("cluster: join record not written: {e}"),
        }
        self.joined = Some(bucket);
        self.unnamed = Unnamed::Clear;
    }

    /// Resolves when the oldest marker waiting reaches `retained_marker_age`.
    fn next_compaction(&mut self) -> impl std::future::Future<Output = ()> {
        let due = self.markers.next_due();
        async move {
            match due {
                Some(due) => {
                    tokio::time::sleep(until(due, unix_nanos(std::time::SystemTime::now()))).await
                }
                None => std::future::pending().await,
            }
        }
    }

    /// Purges the markers due, each up to its own revision: a newer put of its key
    /// survives. One not purged (NATS away) is tried again after [`RETRY`].
    async fn compact(&mut self, store: &kv::Store) {
        let now = unix_nanos(std::time::SystemTime::now());
        let due = self.markers.take_due(now, COMPACT_BATCH);
        let mut compacted = 0;
        for (key, revision) in due {
            if remove_up_to(store, &key, revision).await {
                compacted += 1;
            } else {
                let retry = i128::try_from(RETRY.as_nanos()).unwrap_or(i128::MAX);
                self.markers
                    .retry(&key, revision, now.saturating_add(retry));
            }
        }
        tracing::debug!(
            compacted,
            waiting = self.markers.len(),
            "cluster: retained delete markers compacted"
        );
    }

    /// Queues one change of this node for the bucket (see [`Waiting`]).
    fn keep(&mut self, numbered: Numbered) {
        let Numbered {
            number,
            change,
            awaited,
        } = numbered;
        self.received = number;
        let key = match &change {
            Change::Put(msg) => {
                let key = self.seal.key_of(&msg.topic);
                self.topics.insert(key.clone(), msg.topic.clone());
                key
            }
            Change::Delete(topic) => self.seal.key_of(topic),
        };
        if !self.pending.push(key, change, Some(number), awaited) {
            tracing::debug!("cluster: retained changes waiting for NATS full; change not stored");
            if let Some(m) = self.metrics.upgrade() {
                m.cluster_dropped.inc();
            }
        }
    }

    /// Keeps every change queued now, then tells the publishers waiting how far the
    /// changes are stored (a change dropped over the cap is done); `false` once the
    /// broker dropped the queue.
    fn keep_queued(&mut self) -> bool {
        let open = loop {
            match self.changes.try_recv() {
                Ok(change) => self.keep(change),
                Err(mpsc::error::TryRecvError::Empty) => break true,
                Err(mpsc::error::TryRecvError::Disconnected) => break false,
            }
        };
        self.report_stored();
        open
    }

    /// Tells the publishers waiting how far this node's changes are stored.
    fn report_stored(&self) {
        let through = self
            .pending
            .lowest()
            .map_or(self.received, |lowest| lowest - 1);
        self.stored.send_if_modified(|stored| {
            let moved = through > *stored;
            *stored = (*stored).max(through);
            moved
        });
    }

    /// Writes the waiting changes, up to [`WINDOW`] side by side (different keys: their
    /// order does not matter), the oldest first; `false` when one failed (it and the
    /// others not written stay, in their places).
    async fn flush(&mut self, store: &kv::Store) -> bool {
        while !self.pending.is_empty() {
            let bucket = self.retained_bucket();
            let writes: FuturesOrdered<_> = self
                .pending
                .oldest(WINDOW)
                .map(|(key, change)| {
                    let key = key.clone();
                    let sealed = match change {
                        Change::Put(msg) => Some(self.seal.seal_retained(
                            &bucket,
                            msg,
                            self.untimed.seal_time(),
                        )),
                        Change::Delete(_) => None,
                    };
                    async move {
                        let written = match sealed {
                            Some(Ok((_, value))) => match store.put(&key, value.into()).await {
                                Ok(revision) => Written::Put(revision),
                                Err(e) => Written::Failed(e.to_string()),
                            },
                            Some(Err(e)) => Written::Unsealable(e.to_string()),
                            None => match store.delete(&key).await {
                                Ok(()) => Written::Deleted,
                                Err(e) => Written::Failed(e.to_string()),
                            },
                        };
                        (key, written)
                    }
                })
                .collect();
            let mut failed = None;
            for (key, written) in writes.collect::<Vec<_>>().await {
                match written {
                    Written::Put(revision) => {
                        self.written.insert(key.clone(), revision);
                    }
                    Written::Deleted => {}
                    Written::Unsealable(e) => {
                        // Never sealable: not kept (counted, as before the retries).
                        tracing::warn!("cluster: retained change not stored in NATS: {e}");
                        if let Some(m) = self.metrics.upgrade() {
                            m.cluster_dropped.inc();
                        }
                    }
                    Written::Failed(e) => {
                        failed.get_or_insert(e);
                        continue;
                    }
                }
                self.pending.done(&key);
            }
            self.report_stored();
            if let Some(e) = failed {
                if !self.failing {
                    self.failing = true;
                    tracing::warn!(
                        "cluster: retained change not stored in NATS yet: {e}; kept, \
                         written again when JetStream takes it"
                    );
                }
                return false;
            }
            if self.failing {
                self.failing = false;
                tracing::info!("cluster: retained changes stored in NATS again");
            }
        }
        true
    }
}

/// How one write of [`StateSync::flush`] went.
enum Written {
    Put(u64),
    Deleted,
    /// Never sealable: dropped.
    Unsealable(String),
    /// JetStream did not take it (yet).
    Failed(String),
}

/// Whether the bucket's stream holds nothing after `revision`: what the watch has
/// delivered is all the load is (values compacted meanwhile are gone).
async fn nothing_after(store: &kv::Store, revision: u64) -> bool {
    let next = store
        .stream
        .direct_get_next_for_subject(format!("{}>", store.prefix), Some(revision + 1))
        .await;
    matches!(next, Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound)
}

/// How JetStream keeps what the cluster stores: `[cluster]` `replicas`,
/// `transfer_max_age` and `transfer_max_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keeping {
    pub replicas: usize,
    pub transfer_max_age: Duration,
    pub transfer_max_bytes: i64,
    /// How old a delete marker of the retained bucket gets before it is compacted.
    pub retained_marker_age: Duration,
    /// Messages in one transfer stream message at most.
    pub transfer_batch: usize,
    /// How transfer stream messages without their sealing time are taken.
    pub untimed: super::replay::Untimed,
    /// Messages waiting for NATS at most (`[cluster] forward_queue`).
    pub forward_queue: usize,
    /// Retained topics waiting for the bucket at most (`[cluster] retained_queue`).
    pub retained_queue: usize,
}

impl Keeping {
    pub fn of(cluster: &moatmq_config::Cluster) -> Keeping {
        Keeping {
            replicas: cluster.replicas,
            transfer_max_age: Duration::from_secs(cluster.transfer_max_age),
            transfer_max_bytes: i64::try_from(cluster.transfer_max_bytes).unwrap_or(i64::MAX),
            retained_marker_age: Duration::from_secs(cluster.retained_marker_age),
            transfer_batch: cluster.transfer_batch,
            untimed: super::replay::Untimed::of(cluster.accept_untimed),
            forward_queue: cluster.forward_queue,
            retained_queue: cluster.retained_queue,
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

/// Removes `key`'s messages up to `revision` from `bucket`'s stream: its value and any
/// older one, never a newer claim (a compare-and-set in the stream). Nothing is left
/// (a KV delete or purge would leave a marker per key for good: client ids churned
/// through the cluster, or topics set and cleared, would grow the bucket without
/// bound). Watches see nothing: a node holding a newer value keeps it. `false` when
/// JetStream did not take the purge.
pub(super) async fn remove_up_to(bucket: &kv::Store, key: &str, revision: u64) -> bool {
    let subject = format!("{}{key}", bucket.prefix);
    match bucket
        .stream
        .purge()
        .filter(subject)
        .sequence(revision.saturating_add(1))
        .await
    {
        Ok(_) => true,
        Err(e) => {
            tracing::debug!("cluster: {} entry not removed: {e}", bucket.name);
            false
        }
    }
}

/// How long a listing of a bucket waits for the next entry before it takes what it has
/// as all of them.
const LIST_IDLE: Duration = Duration::from_secs(2);

/// The current entry of every key of `store` matching `filter` (`>`: every key, `*`:
/// keys of one token), for sweeps: one pass over the bucket (a watch from each key's
/// last value), not a listing of the keys and a read per key, taken one at a time
/// ([`Entries::next`]) so that a bucket of a million sessions is never in memory at
/// once.
pub(super) async fn list_entries(store: &kv::Store, filter: &str) -> Result<Entries, String> {
    let failed = |e: &dyn std::fmt::Display| format!("listing {}: {e}", store.name);
    let mut stream = store.stream.clone();
    let stored = stream.info().await.map_err(|e| failed(&e))?.state.clone();
    if stored.messages == 0 {
        return Ok(Entries {
            name: store.name.clone(),
            watch: None,
            through: 0,
            complete: true,
        });
    }
    let watch = store
        .watch_with_history(filter)
        .await
        .map_err(|e| failed(&e))?;
    Ok(Entries {
        name: store.name.clone(),
        watch: Some(watch),
        through: stored.last_sequence,
        complete: false,
    })
}

/// What [`list_entries`] reads. It ends ([`Entries::complete`]) with the last entry
/// stored when it began, or before the first stored after (entries come in the
/// stream's order, so every key's entry from before has come by then; a key written
/// meanwhile is left out, being new). async-nats says which one is the last from the
/// server's count of what is pending, which never comes out right if a key's message
/// is replaced or purged meanwhile (nats.go has the same), hence the second rule; a
/// pause of [`LIST_IDLE`] ends it too, not complete (a sweep finds what it missed next
/// time).
pub(super) struct Entries {
    name: String,
    watch: Option<kv::Watch>,
    /// The stream's last sequence when the listing began.
    through: u64,
    complete: bool,
}

impl Entries {
    /// The next entry; `None` at the end.
    pub async fn next(&mut self) -> Result<Option<kv::Entry>, String> {
        let Some(watch) = &mut self.watch else {
            return Ok(None);
        };
        match tokio::time::timeout(LIST_IDLE, watch.next()).await {
            Ok(Some(Ok(entry))) if entry.revision > self.through => {
                self.watch = None;
                self.complete = true;
                Ok(None)
            }
            Ok(Some(Ok(entry))) => {
                if entry.seen_current || entry.revision == self.through {
                    self.watch = None;
                    self.complete = true;
                }
                Ok(Some(entry))
            }
            Ok(Some(Err(e))) => {
                self.watch = None;
                Err(format!("listing {}: {e}", self.name))
            }
            Ok(None) | Err(_) => {
                self.watch = None;
                Ok(None)
            }
        }
    }

    /// Whether it ended with the last entry (not on a pause); once [`Entries::next`]
    /// said `None`.
    pub fn complete(&self) -> bool {
        self.complete
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
    use super::bucket_base;

    #[test]
    fn bucket_names_hold_only_what_jetstream_allows() {
        assert_eq!(bucket_base("moatmq"), "moatmq");
        assert_eq!(bucket_base("site.a-1_b"), "site_a-1_b");
        assert_eq!(bucket_base("x/y$z"), "x_y_z");
    }
}
