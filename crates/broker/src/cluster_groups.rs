//! Shared subscriptions across nodes, the way in (docs/cluster.md, "Shared
//! subscriptions across nodes"): while this node has members of a group, it pulls from
//! the group's durable consumer on the transfer stream, which every node with members
//! pulls from and which hands each message to one of them. A message whose topic
//! matches the group's filter, and which its publisher may write under this node's ACL,
//! is published into the router as the group's copy (one local member gets it, through
//! `deliver`); then it is acknowledged. Anything else is acknowledged and dropped. When
//! the last local member leaves, what was pulled and not handed on is NAKed, so another
//! node gets it at once. Apart from `cluster/` for the same reason as `cluster_input`.

use crate::cluster::groups::Start;
use crate::cluster::xfer::{self, Seen};
use crate::policy::Identity;
use crate::shared::Shared;
use async_nats::jetstream::{self, AckKind};
use futures_util::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

/// Messages asked for in one pull: a small batch keeps the nodes' turns short (balance)
/// and what a leaving node gives back small.
const BATCH: usize = 10;
/// How long one pull request waits for messages; a node stops pulling at most this
/// long after its last member left.
const PULL_EXPIRES: Duration = Duration::from_secs(1);

/// Starts a puller for each group this node gets a member of, until shutdown (the
/// pullers end with this task).
pub async fn run(
    shared: Arc<Shared>,
    client: async_nats::Client,
    seal: Arc<moatmq_store::ClusterSeal>,
    mut starts: mpsc::UnboundedReceiver<Start>,
) {
    let mut pullers = JoinSet::new();
    loop {
        tokio::select! {
            start = starts.recv() => match start {
                Some(start) => {
                    pullers.spawn(pull(shared.clone(), client.clone(), seal.clone(), start));
                }
                None => return,
            },
            Some(_) = pullers.join_next(), if !pullers.is_empty() => {}
        }
    }
}

/// Pulls for one group until its last local member leaves.
async fn pull(
    shared: Arc<Shared>,
    client: async_nats::Client,
    seal: Arc<moatmq_store::ClusterSeal>,
    start: Start,
) {
    let Some(cluster) = shared.cluster.as_ref() else {
        return;
    };
    let Start {
        gid,
        filter,
        ready,
        mut stop,
    } = start;
    let js = jetstream::new(client.clone());
    let stream = xfer::stream_name(&cluster.prefix);
    let mut seen = Seen::default();
    while !*stop.borrow() {
        if client.connection_state() != async_nats::connection::State::Connected {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = stop.changed() => {}
            }
            continue;
        }
        let consumer =
            match xfer::group_consumer(&js, &cluster.prefix, &gid, &cluster.keeping).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("cluster: shared group consumer: {e}; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.changed() => {}
                    }
                    continue;
                }
            };
        ready.send_replace(true);
        while !*stop.borrow() {
            let batch = consumer
                .batch()
                .max_messages(BATCH)
                .expires(PULL_EXPIRES)
                .messages()
                .await;
            let mut batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    tracing::debug!("cluster: shared group pull: {e}");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    break;
                }
            };
            while let Some(message) = batch.next().await {
                let message = match message {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::debug!("cluster: shared group pull: {e}");
                        break;
                    }
                };
                if *stop.borrow() || !cluster.groups.has_members(&gid) {
                    // No member here any more: another node's member gets it now.
                    let _ = message.ack_with(AckKind::Nak(None)).await;
                    continue;
                }
                match xfer::take_in(&seal, &stream, None, &mut seen, &message) {
                    // A batch goes to this node's members whole (balance per batch).
                    Ok(arrived) => {
                        for m in arrived {
                            hand_on(&shared, &gid, &filter, m.envelope, m.payload, m.waited);
                        }
                    }
                    // Counted by this node's own consumer of the stream, which reads
                    // every message too.
                    Err(why) => tracing::debug!("cluster: shared group: {why:?}"),
                }
                if let Err(e) = message.ack().await {
                    tracing::debug!("cluster: shared group message not acknowledged: {e}");
                }
            }
        }
    }
}

/// One message of the stream for group `gid` (inner filter `filter`), stored there
/// `waited` ago: into the router as the group's copy if it is the group's and its
/// message expiry has not run out (what is left of it goes with it).
fn hand_on(
    shared: &Shared,
    gid: &str,
    filter: &str,
    envelope: xfer::Envelope,
    payload: bytes::Bytes,
    waited: Duration,
) {
    let Some(cluster) = shared.cluster.as_ref() else {
        return;
    };
    let topic = envelope.topic;
    if !crate::topic::valid_topic_name(&topic, shared.config.limits.max_topic_levels)
        || topic.starts_with('$')
        || !moatmq_acl::topic_matches_filter(filter, &topic)
    {
        return;
    }
    let who = Identity {
        username: envelope.user,
        client_id: envelope.client,
    };
    // As this node's admit of the same message (`cluster_input`) checks, and audits.
    if !shared.policy.may_publish(&who, &topic).allowed {
        return;
    }
    let qos = xfer::qos_of(envelope.qos);
    let Ok(props) = xfer::properties_now(envelope.properties.as_deref(), waited) else {
        tracing::debug!(
            topic,
            "cluster: shared group message expired in the stream dropped"
        );
        return;
    };
    cluster
        .groups
        .publish_copy(gid, &topic, payload, qos, envelope.retain, props);
}
