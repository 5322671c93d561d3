//! Delayed wills across the cluster (docs/cluster.md, "Delayed wills"). A will with a
//! delay interval waits on the node its client left (`will.rs`); so that it is not lost
//! with that node, the node also puts it, sealed, in the KV bucket `<prefix>_wills` at
//! its session's key. Whoever publishes it first takes it out of the bucket with a
//! compare-and-set on its revision, so it is published once in the whole cluster:
//! - its node, when the delay is over (a will the bucket does not hold any more was
//!   taken by another node, or cancelled by the client coming back there);
//! - any node, once it is [`OVERDUE`] (its node is dead or cut off from NATS): every
//!   node watches the bucket and looks for overdue wills every [`KEEP_EVERY`]
//!   ([`keep`]);
//! - nobody, when its client comes back: the node it connects to removes it.

use super::owner::Buckets;
use super::Cluster;
use crate::shared::Shared;
use async_nats::jetstream::kv;
use futures_util::StreamExt;
use moatmq_store::{now_unix, PendingWill, SessionKey};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// How long after its time a will in the bucket is taken to be its node's no more.
pub const OVERDUE: Duration = Duration::from_secs(10);
/// How often each node looks for overdue wills among those it watches.
const KEEP_EVERY: Duration = Duration::from_secs(5);
/// How often a will NATS did not take is put again, until its time.
const PUT_RETRY: Duration = Duration::from_secs(1);
/// How long a `taken` marker stays: a node restoring a will from its store after a
/// shorter stop finds it taken; after a longer one the will is overdue and dropped.
const TAKEN_KEPT: Duration = Duration::from_secs(3600);

/// Publishes a will now, as its session's identity (`will::publish_overdue`).
pub type Publish = fn(&Shared, SessionKey, PendingWill);

/// Where a delayed will waits besides its node's memory and store.
pub enum Held {
    /// Here only (no cluster, or NATS did not take it): published here.
    Here,
    /// In the cluster's wills bucket at this revision: published by whoever takes it.
    Nats(u64),
    /// Taken already (published by another node, or its client came back there).
    Taken,
}

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
/// (`restored`), found there (or taken meanwhile) if this node put it before. While
/// NATS does not take it, it is tried again every [`PUT_RETRY`] until it does or the
/// will is `due`: a will left while this node was cut off from NATS is not lost with
/// this node once NATS is back.
pub async fn hold(
    shared: &Shared,
    router_id: &str,
    key: &SessionKey,
    will: &PendingWill,
    restored: bool,
    due: tokio::time::Instant,
) -> Held {
    let mut tried_before = false;
    loop {
        match hold_once(shared, router_id, key, will, restored).await {
            Held::Nats(revision) if tried_before => {
                tracing::info!("cluster: delayed will put in NATS after all");
                // Put late: its client may have come back on another node meanwhile,
                // whose cancel found nothing in the bucket then.
                return match shared.cluster.as_ref() {
                    Some(c) if c.owners.claimed_elsewhere(router_id).await.is_some() => {
                        take(shared, router_id, revision).await;
                        Held::Taken
                    }
                    _ => Held::Nats(revision),
                };
            }
            Held::Here if tokio::time::Instant::now() + PUT_RETRY < due => {
                if !tried_before {
                    tracing::warn!(
                        "cluster: delayed will kept on this node only until NATS takes it"
                    );
                }
                tried_before = true;
                tokio::time::sleep(PUT_RETRY).await;
            }
            Held::Here => {
                tracing::warn!(
                    "cluster: delayed will kept on this node only (NATS did not take it)"
                );
                return Held::Here;
            }
            held => return held,
        }
    }
}

/// [`hold`], one attempt.
async fn hold_once(
    shared: &Shared,
    router_id: &str,
    key: &SessionKey,
    will: &PendingWill,
    restored: bool,
) -> Held {
    if restored {
        if let Some((_, buckets, kv_key)) = at(shared, router_id) {
            match buckets.wills.entry(&kv_key).await {
                Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
                    if &entry.value[..] == TAKEN {
                        return Held::Taken;
                    }
                    return Held::Nats(entry.revision);
                }
                // Not there: taken longer than `TAKEN_KEPT` ago if it is overdue by now
                // (another node published it, or its client came back); put otherwise.
                Ok(_) if will.publish_at + OVERDUE.as_secs() <= now_unix() => {
                    return Held::Taken;
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
    let (cluster, buckets, kv_key) = at(shared, router_id)?;
    if buckets.js.client().connection_state() != async_nats::connection::State::Connected {
        // Not handed to async-nats, which would keep it and send it once reconnected,
        // after its timeout: maybe after this node published the will itself.
        tracing::debug!("cluster: delayed will not put in NATS: not connected");
        return None;
    }
    let seal = cluster.owners.seal();
    let stored = Stored {
        key: key.clone(),
        will: will.clone(),
        node: cluster.node.clone(),
    };
    let sealed = postcard::to_allocvec(&stored)
        .map_err(|e| e.to_string())
        .and_then(|plain| {
            let sealed_at = cluster.keeping.untimed.seal_time();
            seal.seal_will(&buckets.wills_name, &kv_key, &plain, sealed_at)
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
            tracing::debug!(error = %e, "cluster: delayed will not put in NATS");
            None
        }
    }
}

/// Takes the will put at `revision` for session `router_id` out of the bucket: `true`
/// if this node took it (and publishes it), `false` if it was taken or cancelled
/// meanwhile, or NATS cannot say (then it stays for its node, or another, to take).
pub async fn take(shared: &Shared, router_id: &str, revision: u64) -> bool {
    match at(shared, router_id) {
        Some((_, buckets, kv_key)) => take_at(&buckets, &kv_key, revision).await,
        None => false,
    }
}

/// The cluster, its buckets (while they are set up) and the bucket key of session
/// `router_id`.
fn at<'s>(shared: &'s Shared, router_id: &str) -> Option<(&'s Cluster, Buckets, String)> {
    let cluster = shared.cluster.as_ref()?;
    let buckets = cluster.owners.buckets()?;
    let kv_key = cluster.owners.seal().session_key_of(router_id);
    Some((cluster, buckets, kv_key))
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
    let Some((_, buckets, kv_key)) = at(shared, router_id) else {
        return;
    };
    if let Ok(Some(entry)) = buckets.wills.entry(&kv_key).await {
        if entry.operation == kv::Operation::Put && &entry.value[..] != TAKEN {
            // Taken like a publisher would, so a node publishing it now cannot as well.
            take_at(&buckets, &kv_key, entry.revision).await;
        }
    }
}

/// While the broker runs: watches the bucket and publishes each will that becomes
/// [`OVERDUE`] (its node did not), taken first so that one node publishes it; removes
/// `taken` markers once they are [`TAKEN_KEPT`] old.
pub async fn keep(shared: std::sync::Weak<Shared>, publish: Publish) {
    loop {
        let Some(buckets) = super::nodes::buckets_set(&shared).await else {
            return;
        };
        let why = watch(&shared, &buckets, publish).await;
        tracing::debug!("cluster: wills bucket: {why}; watching again");
        tokio::time::sleep(KEEP_EVERY).await;
    }
}

/// What the keeper knows of one key of the bucket.
enum Known {
    /// A will, due at `publish_at` (its node's clock), at `revision`.
    Will(Box<Stored>, u64),
    /// A `taken` marker written at `revision`, at `created`.
    Taken(u64, std::time::SystemTime),
}

/// Watches the bucket until the watch fails; why it ended.
async fn watch(shared: &std::sync::Weak<Shared>, buckets: &Buckets, publish: Publish) -> String {
    let mut entries = match buckets.wills.watch_with_history(">").await {
        Ok(w) => w,
        Err(e) => return e.to_string(),
    };
    let mut known: HashMap<String, Known> = HashMap::new();
    loop {
        let tick = tokio::time::sleep(KEEP_EVERY);
        tokio::select! {
            entry = entries.next() => match entry {
                Some(Ok(entry)) => {
                    let Some(shared) = shared.upgrade() else {
                        return "stopped".into();
                    };
                    note(&shared, buckets, &mut known, entry);
                }
                Some(Err(e)) => return e.to_string(),
                None => return "watch ended".into(),
            },
            () = tick => {
                let Some(shared) = shared.upgrade() else {
                    return "stopped".into();
                };
                keep_due(&shared, buckets, &mut known, publish).await;
            }
        }
    }
}

/// Records what `entry` says of its key.
fn note(shared: &Shared, buckets: &Buckets, known: &mut HashMap<String, Known>, entry: kv::Entry) {
    let Some(cluster) = &shared.cluster else {
        return;
    };
    if entry.operation != kv::Operation::Put {
        known.remove(&entry.key);
        return;
    }
    if &entry.value[..] == TAKEN {
        let created = std::time::SystemTime::from(entry.created);
        known.insert(entry.key, Known::Taken(entry.revision, created));
        return;
    }
    let seal = cluster.owners.seal();
    let stored_at = Some(super::replay::stored_ms(entry.created));
    let stored = seal
        .open_will(&buckets.wills_name, &entry.key, &entry.value)
        .map_err(|e| e.to_string())
        .and_then(|(plain, sealed_at)| {
            super::replay::check_kv(sealed_at, stored_at)?;
            postcard::from_bytes::<Stored>(&plain).map_err(|e| e.to_string())
        })
        .and_then(|s| {
            let router_id =
                crate::router::router_client_id(s.key.owner.as_deref(), &s.key.client_id);
            if seal.session_key_of(&router_id) == entry.key {
                Ok(s)
            } else {
                Err("sealed at its key but naming another session".to_string())
            }
        });
    match stored {
        Ok(s) => {
            known.insert(entry.key, Known::Will(Box::new(s), entry.revision));
        }
        Err(e) => {
            tracing::error!(error = %e, "cluster: pending will refused");
            shared.metrics.cluster_state_rejected.inc();
            known.remove(&entry.key);
        }
    }
}

/// Publishes the overdue wills (each taken first) and removes old `taken` markers.
async fn keep_due(
    shared: &Arc<Shared>,
    buckets: &Buckets,
    known: &mut HashMap<String, Known>,
    publish: Publish,
) {
    let due = now_unix().saturating_sub(OVERDUE.as_secs());
    let now = std::time::SystemTime::now();
    let ready: Vec<String> = known
        .iter()
        .filter(|(_, k)| match k {
            Known::Will(s, _) => s.will.publish_at <= due,
            Known::Taken(_, created) => now
                .duration_since(*created)
                .is_ok_and(|age| age >= TAKEN_KEPT),
        })
        .map(|(key, _)| key.clone())
        .collect();
    for kv_key in ready {
        match known.remove(&kv_key) {
            Some(Known::Taken(revision, _)) => {
                super::state::remove_up_to(&buckets.wills, &kv_key, revision).await;
            }
            // Another node may take it first: then the watch brings its marker.
            Some(Known::Will(stored, revision)) if take_at(buckets, &kv_key, revision).await => {
                publish_overdue(shared, publish, *stored);
            }
            _ => {}
        }
    }
}

fn publish_overdue(shared: &Shared, publish: Publish, stored: Stored) {
    tracing::warn!(
        client_id = %stored.key.client_id,
        node = %stored.node,
        "cluster: a delayed will its node did not publish is published here"
    );
    shared.metrics.cluster_wills_taken_over.inc();
    publish(shared, stored.key, stored.will);
}
