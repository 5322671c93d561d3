//! Session ownership across nodes (docs/cluster.md, "Session ownership and takeover"):
//! which node holds each session's connection, in the KV bucket `<base>_owner`.
//!
//! - Key: the keyed hash of the session's router client id (identity and client id, so
//!   another user's client id of the same name is another key: nothing is taken over
//!   across identities). Value, sealed: the node name, the node's connection epoch and
//!   whether the session is persistent (only then does a new holder wait for it).
//! - Claim: a node accepting a CONNECT writes its value with a compare-and-set on the
//!   revision it read (create if absent). On a race the write that lands last wins: a
//!   claim that lost the compare-and-set reads again and writes over the winner, so of
//!   two simultaneous connections the later one stays and the other is taken over, as
//!   on one node (the newest connection wins). A claim that fails for another reason
//!   (NATS away, the bucket not set up yet, every retry lost) refuses the CONNECT: a
//!   node that cannot record ownership cannot have the old connection closed.
//! - Takeover: every node watches the bucket (from the current value of each key on);
//!   a value naming another node (or an unreadable one) at a key this node holds a
//!   connection for, newer than this node's claim, kicks that connection as a local
//!   takeover does (MQTT 5: DISCONNECT 0x8E; 3.1.1: the socket is closed). After its claim a node reads the key once more, so a
//!   newer claim the watch delivered before the connection was registered is not missed.
//! - The node that lost a persistent session (connected there, or kept offline there)
//!   hands it to the claiming node (`handoff.rs`) and discards its copy: the session
//!   lives where its owner is.
//! - Values that do not open are refused (logged, `moatmq_cluster_state_rejected_total`),
//!   and treat the key as no longer this node's: a forged value can close a connection
//!   (NATS write access can always cut traffic) but never hands anyone a session.

use super::state::{bucket, remove_up_to};
use super::KeyCheck;
use crate::metrics::Metrics;
use async_nats::jetstream::{self, kv};
use futures_util::StreamExt;
use moatmq_store::{ClusterSeal, Owner, SessionKey};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, watch, Notify};

/// How often a claim retries after losing the compare-and-set to another node.
const CLAIM_TRIES: usize = 5;
/// How long a claim waits for the buckets to be set up again after NATS came back (a
/// node is ready once its transfer input is, which can be a little before).
const BUCKETS_WAIT: Duration = Duration::from_secs(3);

/// How long to wait before setting the bucket up again after a failure.
const RETRY: Duration = Duration::from_secs(1);

/// Why a session could not be claimed for this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimFailed(pub String);

/// This node's side of the ownership bucket.
pub struct Owners {
    inner: Arc<Inner>,
}

struct Inner {
    node: String,
    seal: Arc<ClusterSeal>,
    bucket_name: String,
    /// Copies of the two buckets (`[cluster] replicas`).
    replicas: usize,
    /// The ownership and handoff buckets, once set up (`None` while NATS is away or
    /// before the key check).
    store: watch::Receiver<Option<Buckets>>,
    /// The connections of this node holding a session, by KV key.
    claims: Mutex<HashMap<String, Claimed>>,
    /// Persistent sessions this node keeps offline (last held here), by KV key: handed
    /// over when another node claims one.
    offline: Mutex<HashMap<String, SessionKey>>,
    /// Offline sessions to hand over (`handoff.rs`), with the claim's revision.
    handoffs: mpsc::UnboundedSender<(SessionKey, u64)>,
    next_epoch: AtomicU64,
    next_id: AtomicU64,
    metrics: Weak<Metrics>,
}

struct Claimed {
    /// Which claim (a later one of the same key replaces it).
    id: u64,
    /// The revision this node's value was written at.
    revision: u64,
    /// Closes the connection as taken over.
    kick: Arc<Notify>,
    /// The revision of the other node's claim, set before `kick` (0: none).
    moved: Arc<AtomicU64>,
}

/// The ownership bucket and the bucket sessions are handed over in.
#[derive(Clone)]
pub struct Buckets {
    pub owner: kv::Store,
    pub handoff: kv::Store,
    /// The handoff bucket's name (bound into its values).
    pub handoff_name: String,
    /// Pending wills (`wills.rs`).
    pub wills: kv::Store,
    /// The wills bucket's name (bound into its values).
    pub wills_name: String,
    /// JetStream, as the buckets were set up with.
    pub js: jetstream::Context,
}

/// A connection's claim of its session; dropping it stops watching for a takeover (the
/// value stays in the bucket while the session lives: it was last held here; a session
/// that ended is released, [`OwnerClaim::release`], [`Owners::release`]).
pub struct OwnerClaim {
    inner: Weak<Inner>,
    /// The session's KV key (in both buckets).
    pub key: String,
    id: u64,
    moved: Arc<AtomicU64>,
    /// The revision this claim was written at (a handoff for it names it).
    pub revision: u64,
    /// The revision of the other node's claim this one replaced (with
    /// `from_elsewhere`): that node parked the session at it when it shut down.
    pub replaced: Option<u64>,
    /// The value this claim replaced named another node holding a persistent session:
    /// that node hands it over.
    pub from_elsewhere: bool,
    /// That node's name.
    pub previous: Option<String>,
    /// The buckets the claim was made in.
    pub buckets: Buckets,
}

impl OwnerClaim {
    /// The session ended with this connection (not kept, not taken over): its entry
    /// leaves the bucket unless a newer claim replaced it.
    pub async fn release(&self) {
        if self.moved().is_none() {
            remove_up_to(&self.buckets.owner, &self.key, self.revision).await;
        }
    }

    /// The revision of another node's claim that took the session over, if one did
    /// (this node's copy is stale then, and handed over).
    pub fn moved(&self) -> Option<u64> {
        Some(self.moved.load(Ordering::Acquire)).filter(|&r| r != 0)
    }

    /// What [`OwnerClaim::moved`] reads (non-zero once another node took the session).
    pub fn moved_flag(&self) -> Arc<AtomicU64> {
        self.moved.clone()
    }
}

impl Drop for OwnerClaim {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.upgrade() {
            let mut claims = lock(&inner.claims);
            if claims.get(&self.key).is_some_and(|c| c.id == self.id) {
                claims.remove(&self.key);
            }
        }
    }
}

/// Which buckets the owners keep: the cluster's bucket name base and their copies.
#[derive(Debug, Clone, Copy)]
pub struct BucketSpec<'a> {
    pub base: &'a str,
    pub replicas: usize,
}

impl Owners {
    /// Starts watching the ownership bucket of the cluster `base` once the key check
    /// has passed (and again after every NATS failure).
    pub fn start(
        client: async_nats::Client,
        node: &str,
        buckets: BucketSpec<'_>,
        seal: Arc<ClusterSeal>,
        key_check: watch::Receiver<KeyCheck>,
        metrics: Weak<Metrics>,
        handoffs: mpsc::UnboundedSender<(SessionKey, u64)>,
    ) -> Owners {
        let BucketSpec { base, replicas } = buckets;
        let (set_store, store) = watch::channel(None);
        // Epochs only grow, across restarts too: the clock at start, then one a claim.
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 2))
            .unwrap_or(0);
        let inner = Arc::new(Inner {
            node: node.to_string(),
            seal,
            bucket_name: format!("{base}_owner"),
            replicas,
            store,
            claims: Mutex::new(HashMap::new()),
            offline: Mutex::new(HashMap::new()),
            handoffs,
            next_epoch: AtomicU64::new(start),
            next_id: AtomicU64::new(0),
            metrics,
        });
        tokio::spawn(run(
            client,
            Arc::downgrade(&inner),
            format!("{base}_handoff"),
            format!("{base}_wills"),
            set_store,
            key_check,
        ));
        Owners { inner }
    }

    /// Records this node as the holder of `session` (a router client id) for the
    /// connection that `kick` closes; from then on a newer claim from another node
    /// closes it.
    pub async fn claim(
        &self,
        session: &str,
        persistent: bool,
        kick: Arc<Notify>,
    ) -> Result<OwnerClaim, ClaimFailed> {
        let inner = &self.inner;
        let mut setup = inner.store.clone();
        let set_up = tokio::time::timeout(BUCKETS_WAIT, setup.wait_for(Option::is_some)).await;
        let Some(buckets) = set_up.ok().and_then(|b| b.ok()).and_then(|b| b.clone()) else {
            return Err(ClaimFailed(
                "ownership bucket not set up (NATS away?)".into(),
            ));
        };
        let store = &buckets.owner;
        let key = inner.seal.session_key_of(session);
        // A session claimed here again is connected here, not offline.
        lock(&inner.offline).remove(&key);
        let owner = Owner {
            node: inner.node.clone(),
            epoch: inner.next_epoch.fetch_add(1, Ordering::Relaxed),
            persistent,
        };
        let value = inner
            .seal
            .seal_owner(&inner.bucket_name, &key, &owner)
            .map_err(|e| ClaimFailed(e.to_string()))?;
        let mut revision = None;
        let mut from_elsewhere = false;
        let mut replaced = None;
        let mut previous = None;
        for _ in 0..CLAIM_TRIES {
            let current = store
                .entry(key.clone())
                .await
                .map_err(|e| ClaimFailed(format!("reading {}: {e}", inner.bucket_name)))?;
            previous = current
                .as_ref()
                .filter(|entry| entry.operation == kv::Operation::Put)
                .and_then(|entry| {
                    inner
                        .seal
                        .open_owner(&inner.bucket_name, &entry.key, &entry.value)
                        .ok()
                })
                .filter(|o| o.node != inner.node && o.persistent)
                .map(|o| o.node);
            from_elsewhere = previous.is_some();
            replaced = current
                .as_ref()
                .filter(|_| from_elsewhere)
                .map(|e| e.revision);
            let written = match current {
                Some(entry) => store
                    .update(&key, value.clone().into(), entry.revision)
                    .await
                    .map_err(|e| e.to_string()),
                None => store
                    .create(&key, value.clone().into())
                    .await
                    .map_err(|e| e.to_string()),
            };
            match written {
                Ok(r) => {
                    revision = Some(r);
                    break;
                }
                // Another node wrote in between: read its revision and write over it.
                Err(e) => tracing::debug!("cluster: ownership claim raced: {e}"),
            }
        }
        let Some(revision) = revision else {
            return Err(ClaimFailed(format!(
                "{} compare-and-set lost {CLAIM_TRIES} times",
                inner.bucket_name
            )));
        };
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let moved = Arc::new(AtomicU64::new(0));
        lock(&inner.claims).insert(
            key.clone(),
            Claimed {
                id,
                revision,
                kick: kick.clone(),
                moved: moved.clone(),
            },
        );
        let claim = OwnerClaim {
            inner: Arc::downgrade(inner),
            key: key.clone(),
            id,
            moved,
            revision,
            replaced,
            previous,
            from_elsewhere,
            buckets: buckets.clone(),
        };
        // A newer claim may have reached the watch before this one was registered.
        if let Ok(Some(entry)) = store.entry(key.clone()).await {
            if entry.revision > revision {
                inner.observe(&entry);
            }
        }
        Ok(claim)
    }

    /// The persistent session `key` (router client id `session`) stays here after its
    /// connection ended: if another node claims it, it is handed over.
    pub fn kept_offline(&self, session: &str, key: SessionKey) {
        let kv_key = self.inner.seal.session_key_of(session);
        lock(&self.inner.offline).insert(kv_key, key);
    }

    /// The connection of `claim` ended and its persistent session `key` (router client
    /// id `session`) stays here offline: from now on another node's claim hands it over
    /// as for any session kept offline, not through the connection, which is gone. In
    /// one step with the watch's look at the claims: a claim seen in between found the
    /// connection still registered, told it (nobody listened any more) and the session
    /// was never handed over (the other node waited 3 s and started it new). If another
    /// node's claim reached the connection first, its revision instead: hand the session
    /// over now.
    pub fn keep_offline_after(
        &self,
        claim: &OwnerClaim,
        session: &str,
        key: SessionKey,
    ) -> Result<(), u64> {
        let mut claims = lock(&self.inner.claims);
        if let Some(revision) = claim.moved() {
            return Err(revision);
        }
        if claims.get(&claim.key).is_some_and(|c| c.id == claim.id) {
            claims.remove(&claim.key);
        }
        let kv_key = self.inner.seal.session_key_of(session);
        lock(&self.inner.offline).insert(kv_key, key);
        Ok(())
    }

    /// Looks at the claim of `session` (a router client id) again after `after`: if
    /// the session is still kept offline here and another node claims it, it is handed
    /// over (again). Without NATS meanwhile, the watch's reload looks at it instead.
    pub fn recheck_later(&self, session: &str, after: std::time::Duration) {
        let kv_key = self.inner.seal.session_key_of(session);
        let inner = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let Some(inner) = inner.upgrade() else {
                return;
            };
            let Some(buckets) = inner.store.borrow().clone() else {
                return;
            };
            if let Ok(Some(entry)) = buckets.owner.entry(&kv_key).await {
                inner.observe_offline(&entry);
            }
        });
    }

    /// The revision of this node's claim of `session` (a router client id) if it
    /// claimed it last; `None` otherwise (or if it cannot be read).
    pub async fn claimed_here(&self, session: &str) -> Option<u64> {
        let (ours, revision) = self.current_claim(session).await?;
        ours.then_some(revision)
    }

    /// The revision of the current claim of `session` (a router client id) if it is
    /// another node's; `None` if this node claimed it last (or it cannot be read).
    pub async fn claimed_elsewhere(&self, session: &str) -> Option<u64> {
        let (ours, revision) = self.current_claim(session).await?;
        (!ours).then_some(revision)
    }

    /// Whether this node wrote the current claim of `session`, and its revision; `None`
    /// if there is none or it cannot be read.
    async fn current_claim(&self, session: &str) -> Option<(bool, u64)> {
        let inner = &self.inner;
        let buckets = inner.store.borrow().clone()?;
        let key = inner.seal.session_key_of(session);
        let entry = buckets.owner.entry(key).await.ok()??;
        let ours = entry.operation == kv::Operation::Put
            && inner
                .seal
                .open_owner(&inner.bucket_name, &entry.key, &entry.value)
                .is_ok_and(|o| o.node == inner.node);
        Some((ours, entry.revision))
    }

    /// The session `session` (a router client id) ended here (expired or removed while
    /// offline): its entry leaves the bucket if this node wrote it last.
    pub async fn release(&self, session: &str) {
        let inner = &self.inner;
        let Some(buckets) = inner.store.borrow().clone() else {
            return;
        };
        let key = inner.seal.session_key_of(session);
        let Ok(Some(entry)) = buckets.owner.entry(key.clone()).await else {
            return;
        };
        let ours = entry.operation == kv::Operation::Put
            && inner
                .seal
                .open_owner(&inner.bucket_name, &entry.key, &entry.value)
                .is_ok_and(|o| o.node == inner.node);
        if ours && !lock(&inner.claims).contains_key(&key) {
            remove_up_to(&buckets.owner, &key, entry.revision).await;
        }
    }

    /// The session `session` (a router client id) is no longer kept here.
    pub fn forget_offline(&self, session: &str) {
        let kv_key = self.inner.seal.session_key_of(session);
        lock(&self.inner.offline).remove(&kv_key);
    }

    /// This node's seal.
    pub fn seal(&self) -> &ClusterSeal {
        &self.inner.seal
    }

    /// [`Owners::seal`], for a task of its own.
    pub(crate) fn seal_shared(&self) -> Arc<ClusterSeal> {
        Arc::clone(&self.inner.seal)
    }

    /// The buckets, once set up.
    pub fn buckets(&self) -> Option<Buckets> {
        self.inner.store.borrow().clone()
    }

    /// The buckets as they are set up, again after each NATS failure.
    pub fn buckets_changes(&self) -> watch::Receiver<Option<Buckets>> {
        self.inner.store.clone()
    }
}

impl Inner {
    /// One value of the bucket, from the watch (or the re-read after a claim): kicks
    /// this node's connection of that key if another node claimed it after it.
    fn observe(&self, entry: &kv::Entry) {
        let mut claims = lock(&self.claims);
        let Some(held) = claims.get(&entry.key) else {
            drop(claims);
            self.observe_offline(entry);
            return;
        };
        if entry.revision <= held.revision {
            return;
        }
        let other = match entry.operation {
            kv::Operation::Put => {
                match self
                    .seal
                    .open_owner(&self.bucket_name, &entry.key, &entry.value)
                {
                    Ok(owner) => owner.node != self.node,
                    Err(e) => {
                        tracing::error!(error = %e, "cluster: ownership value refused");
                        if let Some(m) = self.metrics.upgrade() {
                            m.cluster_state_rejected.inc();
                        }
                        true
                    }
                }
            }
            // Nobody deletes ownership values: whoever did, this node no longer holds it.
            kv::Operation::Delete | kv::Operation::Purge => true,
        };
        if other {
            if let Some(held) = claims.remove(&entry.key) {
                tracing::info!("cluster: session taken over by another node");
                held.moved.store(entry.revision, Ordering::Release);
                held.kick.notify_one();
            }
        }
    }

    /// A claim of a key this node holds no connection for: an offline session kept
    /// here is handed over to the claiming node.
    fn observe_offline(&self, entry: &kv::Entry) {
        if entry.operation != kv::Operation::Put {
            return;
        }
        let Ok(owner) = self
            .seal
            .open_owner(&self.bucket_name, &entry.key, &entry.value)
        else {
            return;
        };
        if owner.node == self.node {
            return;
        }
        let Some(key) = lock(&self.offline).remove(&entry.key) else {
            return;
        };
        tracing::info!("cluster: offline session claimed by another node; handing it over");
        let _ = self.handoffs.send((key, entry.revision));
    }
}

/// Sets the bucket up after the key check, then applies the watch until NATS fails or
/// the broker is gone.
async fn run(
    client: async_nats::Client,
    inner: Weak<Inner>,
    handoff_name: String,
    wills_name: String,
    set_store: watch::Sender<Option<Buckets>>,
    mut key_check: watch::Receiver<KeyCheck>,
) {
    // Nothing of the cluster's state is touched before this node's key is known good.
    let passed = tokio::select! {
        c = key_check.wait_for(|c| *c != KeyCheck::Pending) => {
            matches!(c.as_deref(), Ok(KeyCheck::Passed))
        }
        () = set_store.closed() => false,
    };
    if !passed {
        return;
    }
    loop {
        let Some((name, replicas)) = inner.upgrade().map(|i| (i.bucket_name.clone(), i.replicas))
        else {
            return;
        };
        if client.connection_state() != async_nats::connection::State::Connected {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let js = jetstream::new(client.clone());
        let buckets = match (
            bucket(&js, &name, replicas).await,
            bucket(&js, &handoff_name, replicas).await,
            bucket(&js, &wills_name, replicas).await,
        ) {
            (Ok(owner), Ok(handoff), Ok(wills)) => Ok(Buckets {
                owner,
                handoff,
                handoff_name: handoff_name.clone(),
                wills,
                wills_name: wills_name.clone(),
                js: js.clone(),
            }),
            (Err(why), _, _) | (_, Err(why), _) | (_, _, Err(why)) => Err(why),
        };
        let why = match buckets {
            Err(why) => why,
            // From the current value of each key on: a session restored here at start
            // (or kept here while NATS was away) that another node claimed meanwhile is
            // handed over (nobody may wait for it) rather than kept stale.
            Ok(buckets) => match buckets.owner.watch_with_history(">").await {
                Err(e) => format!("watching {name}: {e}"),
                Ok(mut entries) => {
                    set_store.send_replace(Some(buckets));
                    loop {
                        let entry = tokio::select! {
                            entry = entries.next() => entry,
                            // The broker is gone (its `Owners` dropped the receiver).
                            () = set_store.closed() => return,
                        };
                        match entry {
                            Some(Ok(entry)) => match inner.upgrade() {
                                Some(inner) => inner.observe(&entry),
                                None => return,
                            },
                            Some(Err(e)) => break format!("watch: {e}"),
                            None => break "watch ended".to_string(),
                        }
                    }
                }
            },
        };
        set_store.send_replace(None);
        if inner.strong_count() == 0 {
            return;
        }
        tracing::warn!("cluster: session ownership: {why}; retrying");
        tokio::time::sleep(RETRY).await;
    }
}

/// Removes every value of `key` from `bucket`'s stream (no marker left).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
