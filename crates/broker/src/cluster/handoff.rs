//! Persistent sessions handed from node to node (docs/cluster.md, "Session handoff").
//!
//! When node B claims a session (`owner.rs`) whose last holder was node A with a
//! persistent session, A takes the session out of its store (subscriptions, expiry,
//! queued and unacknowledged messages; nothing is queued for it on A from then on),
//! puts it, sealed, in the KV bucket `<base>_handoff` at the session's key (associated
//! data: bucket and key), naming the revision of B's claim, and discards its own copy
//! (router, store, expiry timer, delayed will). B's CONNACK waits up to
//! [`HANDOFF_WAIT`] for a value naming its claim; it checks that the value opens at the
//! key of its own identity and client id and holds that session, deletes it, stores the
//! session as offline with its messages carried over, and makes its subscriptions in
//! the router. The connection then resumes it as after a restart: session present,
//! carried-over messages replayed through `deliver` (read ACL on B), unacknowledged
//! ones with DUP. A value that does not open, or names another session, is refused and
//! counted; after the wait B starts the session new (session present 0).

use super::owner::{Buckets, OwnerClaim};
use crate::router::router_client_id;
use crate::shared::Shared;
use futures_util::StreamExt;
use moatmq_store::{ClusterSeal, QueuedMessage, SessionKey, SessionMeta};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// How long a CONNACK resuming a session last held on another node waits for that node
/// to hand it over; after it the session starts new (the old node is dead, or cut off).
pub const HANDOFF_WAIT: Duration = Duration::from_secs(3);

/// What one node hands another (postcard, then sealed).
#[derive(Serialize, Deserialize)]
pub(super) struct Handoff {
    /// The revision of the claim this answers: an older handoff is never taken.
    pub(super) revision: u64,
    /// Whose session it is; must be the claiming connection's.
    key: SessionKey,
    /// `None`: the old node had nothing left (expired, or removed meanwhile).
    pub(super) session: Option<(SessionMeta, Vec<(QueuedMessage, bool)>)>,
}

/// Opens the handoff value at `kv_key` for the session `key`: it must open there (not
/// altered, not moved from another key, this cluster's key) and hold that session.
pub(super) fn open(
    seal: &ClusterSeal,
    handoff_bucket: &str,
    kv_key: &str,
    value: &[u8],
    key: &SessionKey,
) -> Result<Handoff, String> {
    let plain = seal
        .open_handoff(handoff_bucket, kv_key, value)
        .map_err(|e| e.to_string())?;
    let handoff = postcard::from_bytes::<Handoff>(&plain).map_err(|e| e.to_string())?;
    if handoff.key != *key {
        return Err("it holds another session".to_string());
    }
    Ok(handoff)
}

/// What [`receive`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// The session was handed over and installed here.
    Installed,
    /// Nothing to install: the old node had nothing left, or it could not be installed.
    Nothing,
    /// The old node did not answer within [`HANDOFF_WAIT`] (dead, or cut off): the
    /// session starts new, and what that node kept may still come later (`late.rs`).
    TimedOut,
}

/// Hands the session `key` (router client id `router_id`) to the node whose claim was
/// written at `revision`, and discards this node's copy. The caller holds `router_id`.
pub async fn give(
    shared: &Shared,
    seal: &ClusterSeal,
    buckets: &Buckets,
    router_id: &str,
    key: &SessionKey,
    revision: u64,
) {
    crate::session_expiry::cancel(shared, router_id);
    // The session goes on elsewhere: its client is not gone for good.
    shared.delayed_wills.cancel(router_id);
    let session = match &shared.durable {
        Some(book) => book.take(key).await.map(|t| (t.meta, t.messages)),
        None => None,
    };
    let handoff = Handoff {
        revision,
        key: key.clone(),
        session,
    };
    if let Err(e) = put(seal, buckets, router_id, &handoff).await {
        tracing::warn!("cluster: session not handed over: {e}");
    }
    crate::session_expiry::discard(shared, router_id, key).await;
}

/// Puts `handoff`, sealed, at the key of the session `router_id`.
async fn put(
    seal: &ClusterSeal,
    buckets: &Buckets,
    router_id: &str,
    handoff: &Handoff,
) -> Result<(), String> {
    let kv_key = seal.session_key_of(router_id);
    let plain = postcard::to_allocvec(handoff).map_err(|e| e.to_string())?;
    let value = seal
        .seal_handoff(&buckets.handoff_name, &kv_key, &plain)
        .map_err(|e| e.to_string())?;
    buckets
        .handoff
        .put(&kv_key, value.into())
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// At shutdown: every persistent session this node keeps whose latest claim is its
/// own is parked in the handoff bucket at that claim's revision, so a client that
/// reconnects to another node meanwhile (a rolling upgrade, a scale-down) finds its
/// session there at once: that node's claim replaces this revision and takes it
/// ([`receive`]). The local store keeps them: a node that comes back first removes
/// what it parked (`Owners::unpark`) and goes on with them. Returns how many.
pub async fn park(shared: &Shared) -> usize {
    let (Some(cluster), Some(book)) = (&shared.cluster, &shared.durable) else {
        return 0;
    };
    let Some(buckets) = cluster.owners.buckets() else {
        return 0;
    };
    let parked = std::sync::atomic::AtomicUsize::new(0);
    futures_util::stream::iter(book.snapshot().await)
        .for_each_concurrent(32, |(key, taken)| {
            let (buckets, parked) = (&buckets, &parked);
            async move {
                let router_id = router_client_id(key.owner.as_deref(), &key.client_id);
                let Some(revision) = cluster.owners.claimed_here(&router_id).await else {
                    return;
                };
                let handoff = Handoff {
                    revision,
                    key,
                    session: Some((taken.meta, taken.messages)),
                };
                match put(cluster.owners.seal(), buckets, &router_id, &handoff).await {
                    Ok(()) => {
                        parked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(e) => tracing::warn!("cluster: session not parked: {e}"),
                }
            }
        })
        .await;
    parked.into_inner()
}

/// Waits (up to [`HANDOFF_WAIT`]) for the session `key` the node that held it hands
/// over for `claim`, and installs it here.
pub async fn receive(
    shared: &Shared,
    seal: &ClusterSeal,
    claim: &OwnerClaim,
    router_id: &str,
    key: &SessionKey,
) -> Received {
    let buckets = &claim.buckets;
    let deadline = tokio::time::Instant::now() + HANDOFF_WAIT;
    let mut values = match buckets.handoff.watch_with_history(&claim.key).await {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!("cluster: session handoff not received: {e}");
            return Received::TimedOut;
        }
    };
    loop {
        let entry = match tokio::time::timeout_at(deadline, values.next()).await {
            Ok(Some(Ok(entry))) => entry,
            Ok(Some(Err(e))) => {
                tracing::warn!("cluster: session handoff not received: {e}");
                return Received::TimedOut;
            }
            Ok(None) => return Received::TimedOut,
            Err(_) => {
                tracing::warn!(
                    client_id = %key.client_id,
                    "cluster: the session's previous node did not hand it over in time; starting it new (what it kept is taken if it hands it over later)"
                );
                return Received::TimedOut;
            }
        };
        if entry.operation != async_nats::jetstream::kv::Operation::Put {
            continue;
        }
        let opened = open(seal, &buckets.handoff_name, &claim.key, &entry.value, key);
        let handoff = match opened {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(error = %e, "cluster: session handoff refused");
                shared.metrics.cluster_state_rejected.inc();
                continue;
            }
        };
        // For this claim, or parked by the node whose claim this one replaced when it
        // shut down.
        if handoff.revision != claim.revision && Some(handoff.revision) != claim.replaced {
            // An older handoff of this session, for a claim since superseded.
            continue;
        }
        // Taken: nobody else may take it again (nothing left of it in the bucket).
        super::owner::remove_up_to(&buckets.handoff, &claim.key, entry.revision).await;
        let Some((meta, messages)) = handoff.session else {
            return Received::Nothing;
        };
        let Some(book) = &shared.durable else {
            return Received::Nothing;
        };
        book.adopt(key, meta.clone(), messages);
        let owner = key.owner.as_deref();
        if let Err(e) =
            crate::session_restore::resubscribe(shared, router_id, owner, &meta.subscriptions).await
        {
            tracing::warn!(error = %e, "cluster: handed-over session not made in the router");
            return Received::Nothing;
        }
        if shared.sessions.resume(router_id, owner, usize::MAX).is_ok() {
            shared.sessions.save(router_id, &meta.subscriptions);
        }
        return Received::Installed;
    }
}

/// A connection of the persistent session `key` ended on this node (the caller still
/// holds `router_id`): if another node claimed the session meanwhile it is handed over
/// now (`true`); otherwise it stays here, offline, to be handed over at a later claim.
pub async fn settle(
    shared: &Shared,
    claim: &OwnerClaim,
    router_id: &str,
    key: &SessionKey,
) -> bool {
    let Some(cluster) = &shared.cluster else {
        return false;
    };
    if claim.moved().is_none() {
        cluster.kept_offline(router_id, key.clone());
    }
    // A claim that reached the watch before the line above went to this connection.
    let Some(revision) = claim.moved() else {
        return false;
    };
    cluster.owners.forget_offline(router_id);
    give(
        shared,
        cluster.owners.seal(),
        &claim.buckets,
        router_id,
        key,
        revision,
    )
    .await;
    true
}

/// How long an offline session claimed elsewhere waits for the connection that last
/// held it here to let its client id go.
const RELEASE_WAIT: Duration = Duration::from_secs(2);

/// Hands over the offline sessions other nodes claim (`owner.rs` sends them), each
/// while holding its router client id: a client connecting here meanwhile claims it
/// back, and wins as the newer claim.
pub async fn run(shared: Arc<Shared>, mut claimed: mpsc::UnboundedReceiver<(SessionKey, u64)>) {
    while let Some((key, revision)) = claimed.recv().await {
        tokio::spawn(hand_over(shared.clone(), key, revision));
    }
}

/// Hands one offline session over, once its client id is free here: the connection
/// that last held it may still be settling its end. If a new connection holds it
/// instead, that one claims the session after the other node and keeps it.
async fn hand_over(shared: Arc<Shared>, key: SessionKey, revision: u64) {
    let Some(cluster) = &shared.cluster else {
        return;
    };
    // The session takes along what was published for it while this node was away
    // (restarted) or cut off from NATS, which its transfer consumer may still be reading.
    cluster.input_ready().await;
    let router_id = router_client_id(key.owner.as_deref(), &key.client_id);
    let deadline = tokio::time::Instant::now() + RELEASE_WAIT;
    let hold = loop {
        if let Some(hold) = shared.sessions.try_hold(&router_id) {
            break hold;
        }
        if tokio::time::Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let Some(buckets) = cluster.owners.buckets() else {
        tracing::warn!("cluster: session not handed over: NATS away");
        return;
    };
    // A client that connected here meanwhile claimed the session back: it stays. A
    // newer claim from another node gets it instead.
    let Some(current) = cluster.owners.claimed_elsewhere(&router_id).await else {
        return;
    };
    let revision = revision.max(current);
    give(
        &shared,
        cluster.owners.seal(),
        &buckets,
        &router_id,
        &key,
        revision,
    )
    .await;
    drop(hold);
}
