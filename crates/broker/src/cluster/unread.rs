//! What a node that did not answer left unread for a session resumed from its park
//! (docs/cluster.md, "Session handoff"): messages other nodes published for the session
//! reach its node through that node's consumer of the transfer stream, which matches
//! them against the session's subscriptions there. What that node had not acknowledged
//! when it died is still in the stream, read by nobody; the node resuming the session
//! reads it on the dead node's behalf, from the consumer's acknowledgement floor to the
//! stream's end (its own subscriptions for the session are in place by then), and adds
//! what matches to the session.

use super::owner::Buckets;
pub(super) use super::reads::Read;
use super::reads::{Kind, Session, Stream, Want};
use super::xfer;
use super::Cut;
use moatmq_store::{SessionKey, SessionMeta};
use std::sync::Arc;

/// Where to read and what for.
pub struct ReadFor<'a> {
    pub cluster: &'a super::Cluster,
    pub buckets: &'a Buckets,
    /// The node that did not answer (its consumer is named after it).
    pub node: &'a str,
    pub key: &'a SessionKey,
    pub meta: &'a SessionMeta,
    pub queue_qos0: bool,
    pub max_topic_levels: usize,
}

impl<'a> ReadFor<'a> {
    /// A read of `node`'s traffic for the session `key` (`meta`) by this node.
    pub(super) fn of(
        shared: &'a crate::shared::Shared,
        cluster: &'a super::Cluster,
        buckets: &'a Buckets,
        node: &'a str,
        key: &'a SessionKey,
        meta: &'a SessionMeta,
    ) -> ReadFor<'a> {
        ReadFor {
            cluster,
            buckets,
            node,
            key,
            meta,
            queue_qos0: shared.durable.as_ref().is_some_and(|b| b.queues_qos0()),
            max_topic_levels: shared.config.limits.max_topic_levels,
        }
    }
}

/// The messages of other nodes in the transfer stream after `node`'s acknowledgement
/// floor that match the session's subscriptions (shared ones aside: their groups have
/// consumers of their own), at the QoS granted, their expiry counted down by their time
/// in the stream, in order. Empty if the node's consumer is gone (removed after the
/// stream's `transfer_max_age` without the node) or cannot be read.
pub async fn read(r: ReadFor<'_>) -> Vec<Read> {
    let stream_name = xfer::stream_name(&r.cluster.prefix);
    let js = &r.buckets.js;
    let consumer: Result<async_nats::jetstream::consumer::PullConsumer, _> =
        js.get_consumer_from_stream(r.node, &stream_name).await;
    let mut consumer = match consumer {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!("cluster: no transfer consumer of {} to read: {e}", r.node);
            return Vec::new();
        }
    };
    let from = match consumer.info().await {
        Ok(info) => info.ack_floor.stream_sequence + 1,
        Err(e) => {
            tracing::warn!("cluster: transfer stream not read for {}: {e}", r.node);
            return Vec::new();
        }
    };
    // Its own publishes it matched itself, before forwarding: in its park if it
    // acknowledged them.
    let dead = r.node.to_string();
    read_from(&r, Kind::OnBehalf, from, move |origin, _, _| {
        node_of(origin) != dead
    })
    .await
}

/// What a session handed over with `cut` (where its old node's traffic stood when the
/// session stopped being queued for there) lacks, read from the transfer stream once it
/// is subscribed here, where this node's traffic stands at `here`: messages of the old
/// node numbered after the cut and of other nodes stored after it, up to what this node
/// had taken in or sent itself before the session was subscribed here (what came later
/// reached the session through the router). Matched as [`read`] matches; empty if the
/// stream cannot be read (logged).
pub async fn after_cut(r: ReadFor<'_>, cut: &Cut, here: &Cut) -> Vec<Read> {
    let old_node = node_of(&cut.origin).to_string();
    let this_node = node_of(&here.origin).to_string();
    let from = cut.stream.min(cut.own_from) + 1;
    let (cut, here) = (cut.clone(), here.clone());
    read_from(&r, Kind::AfterCut, from, move |origin, number, sequence| {
        if origin == cut.origin {
            // The old node's own, not in its router when the session left.
            number > cut.forwarded && sequence <= here.stream
        } else if sequence <= cut.stream || node_of(origin) == old_node {
            // Admitted on the old node before the session left; or an earlier process
            // of the old node's own, matched there when admitted.
            false
        } else if origin == here.origin {
            // This node's own, admitted here before the session was subscribed.
            number <= here.forwarded
        } else {
            // Another node's (an earlier process of this one's included).
            sequence <= here.stream || node_of(origin) == this_node
        }
    })
    .await
}

/// `<node>` of an id origin `<node>:<epoch>`.
fn node_of(origin: &str) -> &str {
    origin.split(':').next().unwrap_or(origin)
}

/// The stream from sequence `from` to its last message when the pass starts, each MQTT
/// message taken if `wanted` (origin `<node>:<epoch>`, number, stream sequence) and the
/// session's subscriptions take it, in order, for at most `reads::READ_WAIT`: in a pass
/// shared with the other sessions reading at the same time (`reads.rs`).
async fn read_from(
    r: &ReadFor<'_>,
    kind: Kind,
    from: u64,
    wanted: impl Fn(&str, u64, u64) -> bool + Send + Sync + 'static,
) -> Vec<Read> {
    let cluster = r.cluster;
    let want = Want {
        from,
        wanted: Box::new(wanted),
        session: Session {
            key: r.key.clone(),
            meta: r.meta.clone(),
            queue_qos0: r.queue_qos0,
            max_topic_levels: r.max_topic_levels,
        },
    };
    let stream = Stream {
        js: r.buckets.js.clone(),
        seal: cluster.owners.seal_shared(),
        name: xfer::stream_name(&cluster.prefix),
        untimed: cluster.keeping.untimed,
        metrics: Arc::clone(&cluster.metrics),
    };
    cluster.reads.read(kind, stream, want).await
}
