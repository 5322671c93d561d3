//! Delayed wills across the cluster (docs/cluster.md, "Delayed wills"). A will with a
//! delay interval waits on the node its client left (`will.rs`); so that it is not lost
//! with that node, the node also puts it, sealed, in the KV bucket `<prefix>_wills` at
//! its session's key. Whoever publishes it first takes it out of the bucket with a
//! compare-and-set on its revision, so it is published once in the whole cluster:
//! - its node, when the delay is over (a will the bucket does not hold any more was
//!   taken by another node, or cancelled by the client coming back there);
//! - any node, once it is [`OVERDUE`] (its node is dead or cut off from NATS): every
//!   node looks at the bucket every [`KEEP_EVERY`] ([`keep`]);
//! - nobody, when its client comes back: the node it connects to removes it.

use super::owner::Buckets;
use crate::policy::Identity;
use crate::shared::Shared;
use crate::will::Held;
use async_nats::jetstream::kv;
use futures_util::StreamExt;
use moatmq_store::{now_unix, PendingWill, SessionKey};
use std::sync::Arc;
use std::time::Duration;

/// How long after its time a will in the bucket is taken to be its node's no more.
pub const OVERDUE: Duration = Duration::from_secs(10);
/// How often each node looks for overdue wills.
const KEEP_EVERY: Duration = Duration::from_secs(5);

/// A pending will as the bucket holds it.
#[derive(serde::Serialize, serde::Deserialize)]
struct Stored {
    key: SessionKey,
    will: PendingWill,
    /// The node it waits on.
    node: String,
}

/// What a taker writes over a will (a compare-and-set on the will's revision: one
/// taker only). It stays until the session's next will replaces it, so a node that
/// restores the will from its store at start-up finds it taken and drops it.
const TAKEN: &[u8] = b"taken";

/// Where the pending will of session `key` (router client id `router_id`) waits besides
/// this node: put in the bucket now, or, for a will restored from the store at start-up
/// (`restored`), found there (or taken meanwhile) if this node put it before.
pub async fn hold(
    shared: &Shared,
    router_id: &str,
    key: &SessionKey,
    will: &PendingWill,
    restored: bool,
) -> Held {
    if restored {
        let found = shared.cluster.as_ref().and_then(|c| {
            c.owners
                .buckets()
                .map(|b| (b, c.owners.seal().session_key_of(router_id)))
        });
        if let Some((buckets, kv_key)) = found {
            match buckets.wills.entry(&kv_key).await {
                Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
                    if &entry.value[..] == TAKEN {
                        return Held::Taken;
                    }
                    return Held::Nats(entry.revision);
                }
                Ok(_) => {}
                // NATS cannot say: this node's alone, as when it cannot put it.
                Err(_) => return Held::Here,
            }
        }
    }
    match put(shared, router_id, key, will).await {
        Some(revision) => Held::Nats(revision),
        None => Held::Here,
    }
}

/// Puts the pending will of session `key` (router client id `router_id`) in the
/// bucket; its revision, or `None` if NATS did not take it (the will is then this
/// node's alone).
async fn put(
    shared: &Shared,
    router_id: &str,
    key: &SessionKey,
    will: &PendingWill,
) -> Option<u64> {
    let cluster = shared.cluster.as_ref()?;
    let buckets = cluster.owners.buckets()?;
    let seal = cluster.owners.seal();
    let kv_key = seal.session_key_of(router_id);
    let stored = Stored {
        key: key.clone(),
        will: will.clone(),
        node: cluster.node.clone(),
    };
    let sealed = postcard::to_allocvec(&stored)
        .map_err(|e| e.to_string())
        .and_then(|plain| {
            seal.seal_will(&buckets.wills_name, &kv_key, &plain)
                .map_err(|e| e.to_string())
        });
    let written = match sealed {
        Ok(value) => buckets
            .wills
            .put(&kv_key, value.into())
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    match written {
        Ok(revision) => Some(revision),
        Err(e) => {
            tracing::warn!(error = %e, "cluster: delayed will kept on this node only");
            None
        }
    }
}

/// Takes the will put at `revision` for session `router_id` out of the bucket: `true`
/// if this node took it (and publishes it), `false` if it was taken or cancelled
/// meanwhile, or NATS cannot say (then it stays for its node, or another, to take).
pub async fn take(shared: &Shared, router_id: &str, revision: u64) -> bool {
    let Some((cluster, buckets)) = shared
        .cluster
        .as_ref()
        .and_then(|c| c.owners.buckets().map(|b| (c, b)))
    else {
        return false;
    };
    let kv_key = cluster.owners.seal().session_key_of(router_id);
    take_at(&buckets, &kv_key, revision).await
}

async fn take_at(buckets: &Buckets, kv_key: &str, revision: u64) -> bool {
    buckets
        .wills
        .update(kv_key, TAKEN.into(), revision)
        .await
        .is_ok()
}

/// The client of session `router_id` is back on this node: a will of its session that
/// waits in the bucket (on whichever node) is removed. Returns once it is.
pub async fn cancel(shared: &Shared, router_id: &str) {
    let Some((cluster, buckets)) = shared
        .cluster
        .as_ref()
        .and_then(|c| c.owners.buckets().map(|b| (c, b)))
    else {
        return;
    };
    let kv_key = cluster.owners.seal().session_key_of(router_id);
    if let Ok(Some(entry)) = buckets.wills.entry(&kv_key).await {
        if entry.operation == kv::Operation::Put && &entry.value[..] != TAKEN {
            // Taken like a publisher would, so a node publishing it now cannot as well.
            take_at(&buckets, &kv_key, entry.revision).await;
        }
    }
}

/// Every [`KEEP_EVERY`] while the broker runs: publishes the wills of the bucket that are
/// [`OVERDUE`] (their nodes did not), each taken first so that one node publishes it.
pub async fn keep(shared: std::sync::Weak<Shared>) {
    loop {
        tokio::time::sleep(KEEP_EVERY).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let Some(buckets) = shared.cluster.as_ref().and_then(|c| c.owners.buckets()) else {
            continue;
        };
        keep_once(&shared, &buckets).await;
    }
}

async fn keep_once(shared: &Arc<Shared>, buckets: &Buckets) {
    let Some(cluster) = &shared.cluster else {
        return;
    };
    let keys: Vec<String> = match buckets.wills.keys().await {
        Ok(keys) => keys.filter_map(|k| async move { k.ok() }).collect().await,
        Err(_) => return,
    };
    let due = now_unix().saturating_sub(OVERDUE.as_secs());
    for kv_key in keys {
        let Ok(Some(entry)) = buckets.wills.entry(&kv_key).await else {
            continue;
        };
        if entry.operation != kv::Operation::Put || &entry.value[..] == TAKEN {
            continue;
        }
        let stored = cluster
            .owners
            .seal()
            .open_will(&buckets.wills_name, &kv_key, &entry.value)
            .map_err(|e| e.to_string())
            .and_then(|plain| postcard::from_bytes::<Stored>(&plain).map_err(|e| e.to_string()));
        let stored = match stored {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cluster: pending will refused");
                shared.metrics.cluster_state_rejected.inc();
                continue;
            }
        };
        let router_id =
            crate::router::router_client_id(stored.key.owner.as_deref(), &stored.key.client_id);
        if kv_key != cluster.owners.seal().session_key_of(&router_id) {
            // Sealed for this key but naming another session.
            shared.metrics.cluster_state_rejected.inc();
            continue;
        }
        if stored.will.publish_at > due || !take_at(buckets, &kv_key, entry.revision).await {
            continue;
        }
        tracing::warn!(
            client_id = %stored.key.client_id,
            node = %stored.node,
            "cluster: a delayed will its node did not publish is published here"
        );
        shared.metrics.cluster_wills_taken_over.inc();
        let identity = Identity {
            username: stored.key.owner.clone(),
            client_id: stored.key.client_id.clone(),
        };
        let mut will = stored.will;
        // Its time has passed: now.
        will.publish_at = 0;
        let will = crate::will::restored(
            will,
            identity,
            crate::session_restore::restored_connection(),
        );
        crate::will::publish_now(shared, will);
    }
}
