//! Sessions handed over late (docs/cluster.md, "Session handoff").
//!
//! When the node that held a persistent session does not hand it over within
//! [`HANDOFF_WAIT`](super::handoff::HANDOFF_WAIT) (it died, or lost NATS), the claiming
//! node starts the session new. What the old node kept for it (queued and
//! unacknowledged messages) is still in its session store: a node that comes back (a
//! Kubernetes pod restarted on its volume) sees the claim and hands the session over
//! then (`handoff.rs`), to nobody waiting. This node keeps waiting for such a late
//! handoff, per session, for [`LATE_WAIT`], with one watch of the handoff bucket for
//! all of them; a late handoff it takes is checked as in `handoff::receive`, and its
//! messages are added to the session as carried over: the connection replays them at
//! once (through `deliver`, so the read ACL applies), or the next resume does. The
//! session's subscriptions are not taken: its client was told the session was not
//! present and made its own.

use super::handoff_value as value;
use super::owner::Buckets;
use crate::shared::Shared;
use futures_util::StreamExt;
use std::sync::Arc;

/// Watches the handoff bucket for late handoffs, again after each NATS failure (the
/// bucket is set up anew then); ends with the cluster.
pub async fn run(shared: Arc<Shared>) {
    let Some(cluster) = &shared.cluster else {
        return;
    };
    let mut buckets_changed = cluster.owners.buckets_changes();
    loop {
        let buckets = buckets_changed.borrow_and_update().clone();
        if let Some(buckets) = buckets {
            watch(&shared, &buckets, &mut buckets_changed).await;
        }
        if buckets_changed.changed().await.is_err() {
            return;
        }
    }
}

/// One watch of the bucket, until it fails or the buckets change.
async fn watch(
    shared: &Shared,
    buckets: &Buckets,
    buckets_changed: &mut tokio::sync::watch::Receiver<Option<Buckets>>,
) {
    let mut values = match buckets.handoff.watch_all().await {
        Ok(w) => w,
        Err(e) => {
            tracing::debug!("cluster: late handoffs not watched: {e}");
            return;
        }
    };
    let Some(cluster) = &shared.cluster else {
        return;
    };
    // What was handed over while nothing watched.
    for kv_key in cluster.late.keys() {
        if let Ok(Some(entry)) = buckets.handoff.entry(&kv_key).await {
            take(shared, buckets, entry).await;
        }
    }
    loop {
        tokio::select! {
            entry = values.next() => match entry {
                Some(Ok(entry)) => take(shared, buckets, entry).await,
                Some(Err(e)) => {
                    tracing::debug!("cluster: late handoff watch failed: {e}");
                    return;
                }
                None => return,
            },
            changed = buckets_changed.changed() => {
                // Marked unseen again so that `run` sees the change.
                if changed.is_ok() {
                    buckets_changed.mark_changed();
                }
                return;
            }
        }
    }
}

/// A handoff value: taken if a session here waits for it and it is the right one.
async fn take(shared: &Shared, buckets: &Buckets, entry: async_nats::jetstream::kv::Entry) {
    let Some(cluster) = &shared.cluster else {
        return;
    };
    if entry.operation != async_nats::jetstream::kv::Operation::Put {
        return;
    }
    let Some(mut waiting) = cluster.late.take(&entry.key) else {
        return;
    };
    let opened = value::open(
        cluster.owners.seal(),
        buckets,
        &entry.key,
        &entry.value,
        &waiting.key,
    )
    .await;
    let mut handed = match opened {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(error = %e, "cluster: late session handoff refused");
            shared.metrics.cluster_state_rejected.inc();
            // Still waiting for the right one.
            cluster.late.put_back(&entry.key, waiting);
            return;
        }
    };
    // For this node's claim, or a newer one of this node's (the client came back here).
    let ours = cluster
        .owners
        .claimed_elsewhere(&waiting.router_id)
        .await
        .is_none();
    // A live park (`park.rs`) is taken only at the claim, never late: the node that
    // wrote it is running and hands the session over itself.
    if handed.revision < waiting.revision || handed.live || !ours {
        if ours {
            cluster.late.put_back(&entry.key, waiting);
        }
        return;
    }
    let (Some((_, mut messages)), Some(book)) = (handed.session.take(), &shared.durable) else {
        // Nothing to keep: taken, so nobody takes it again.
        value::remove(buckets, &entry.key, entry.revision).await;
        return;
    };
    if let Some(parked) = waiting.parked.as_mut() {
        // What the node's live park brought at the claim is here already, and what was
        // read on its behalf from its transfer consumer.
        if handed.ids.len() == messages.len() {
            let mut ids = handed.ids.iter();
            messages.retain(|_| ids.next().is_some_and(|&id| id > parked.through));
        }
        messages.retain(|(m, _)| !parked.read.take(m));
    }
    let count = messages.len();
    let replay = book.late(&waiting.key, messages).await;
    // Stored here before it leaves the bucket (a crash in between loses nothing); if it
    // could not be saved, the bucket keeps the only durable copy.
    if replay.is_none() || book.commit().await {
        value::remove(buckets, &entry.key, entry.revision).await;
        // The handoff was written over this node's own park of the session: parked
        // again, so the session is not without one if this node dies.
        book.repark(&waiting.key);
    }
    match replay {
        Some(replay) => {
            tracing::info!(
                client_id = %waiting.key.client_id,
                messages = count,
                "cluster: session handed over late; its messages are delivered"
            );
            shared.sessions.mail_late(&waiting.router_id, replay);
        }
        None => tracing::warn!(
            client_id = %waiting.key.client_id,
            messages = count,
            "cluster: session handed over late, but it is no longer kept here; its messages are lost"
        ),
    }
}
