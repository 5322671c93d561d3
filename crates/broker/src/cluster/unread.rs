//! What a node that did not answer left unread for a session resumed from its park
//! (docs/cluster.md, "Session handoff"): messages other nodes published for the session
//! reach its node through that node's consumer of the transfer stream, which matches
//! them against the session's subscriptions there. What that node had not acknowledged
//! when it died is still in the stream, read by nobody; the node resuming the session
//! reads it on the dead node's behalf, from the consumer's acknowledgement floor to the
//! stream's end (its own subscriptions for the session are in place by then), and adds
//! what matches to the session.

use super::owner::Buckets;
use super::xfer;
use super::Cut;
use crate::retained::from_router_properties;
use futures_util::StreamExt;
use moatmq_store::{ClusterSeal, QueuedMessage, SessionKey, SessionMeta};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// How long a resume reads on a dead node's behalf, at most.
pub(super) const READ_WAIT: Duration = Duration::from_secs(10);

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
pub async fn read(r: ReadFor<'_>) -> Vec<(QueuedMessage, bool)> {
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
    read_from(&r, from, move |origin, _, _| node_of(origin) != dead).await
}

/// What a session handed over with `cut` (where its old node's traffic stood when the
/// session stopped being queued for there) lacks, read from the transfer stream once it
/// is subscribed here, where this node's traffic stands at `here`: messages of the old
/// node numbered after the cut and of other nodes stored after it, up to what this node
/// had taken in or sent itself before the session was subscribed here (what came later
/// reached the session through the router). Matched as [`read`] matches; empty if the
/// stream cannot be read (logged).
pub async fn after_cut(r: ReadFor<'_>, cut: &Cut, here: &Cut) -> Vec<(QueuedMessage, bool)> {
    let old_node = node_of(&cut.origin).to_string();
    let this_node = node_of(&here.origin).to_string();
    let from = cut.stream.min(cut.own_from) + 1;
    let (cut, here) = (cut.clone(), here.clone());
    read_from(&r, from, move |origin, number, sequence| {
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

/// Which messages one read takes: `(origin, number, stream sequence)` (origin
/// `<node>:<epoch>` and number from its id).
type Wanted = Box<dyn Fn(&str, u64, u64) -> bool + Send + Sync>;

/// One session's read, waiting for a pass over the stream.
struct Want {
    from: u64,
    wanted: Wanted,
    session: Session,
    reply: oneshot::Sender<Vec<(QueuedMessage, bool)>>,
}

/// What a read matches messages against: the session's subscriptions.
struct Session {
    key: SessionKey,
    meta: SessionMeta,
    queue_qos0: bool,
    max_topic_levels: usize,
}

/// The reads of the transfer stream this node makes for sessions moving in, combined:
/// a read asked while another pass runs waits for it, then goes with every other read
/// asked meanwhile as one pass (one ordered consumer, each stream message opened once).
/// A rolling restart moving thousands of sessions here then reads the stream a few
/// times, not once per session.
#[derive(Default)]
pub(crate) struct Reads {
    asked: std::sync::Mutex<Vec<Want>>,
    turn: tokio::sync::Mutex<()>,
}

/// The stream from sequence `from` to its last message when the pass starts, each MQTT
/// message taken if `wanted` and the session's subscriptions take it, in order, for at
/// most [`READ_WAIT`].
async fn read_from(
    r: &ReadFor<'_>,
    from: u64,
    wanted: impl Fn(&str, u64, u64) -> bool + Send + Sync + 'static,
) -> Vec<(QueuedMessage, bool)> {
    let cluster = r.cluster;
    let (reply, found) = oneshot::channel();
    let want = Want {
        from,
        wanted: Box::new(wanted),
        session: Session {
            key: r.key.clone(),
            meta: r.meta.clone(),
            queue_qos0: r.queue_qos0,
            max_topic_levels: r.max_topic_levels,
        },
        reply,
    };
    lock(&cluster.reads.asked).push(want);
    {
        let _turn = cluster.reads.turn.lock().await;
        let wants = std::mem::take(&mut *lock(&cluster.reads.asked));
        if !wants.is_empty() {
            // A task of its own: the reads of others are answered even if this one's
            // caller goes away meanwhile.
            let pass = pass(
                r.buckets.js.clone(),
                cluster.owners.seal_shared(),
                xfer::stream_name(&cluster.prefix),
                Arc::clone(&cluster.metrics),
                wants,
            );
            let _ = tokio::spawn(pass).await;
        }
    }
    found.await.unwrap_or_default()
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One pass over the stream for `wants`, from the lowest sequence one asks to the
/// stream's last now; each is answered at the end.
async fn pass(
    js: async_nats::jetstream::Context,
    seal: Arc<ClusterSeal>,
    stream_name: String,
    metrics: Arc<crate::metrics::Metrics>,
    wants: Vec<Want>,
) {
    let mut found: Vec<Vec<(QueuedMessage, bool)>> = wants.iter().map(|_| Vec::new()).collect();
    let from = wants.iter().map(|w| w.from).min().unwrap_or(u64::MAX);
    let read = stream_from(&js, &stream_name, from).await;
    if let Ok(Some(_)) = &read {
        metrics.cluster_transfer_reads.inc();
    }
    match read {
        Ok(Some((messages, last))) => {
            take(&seal, &stream_name, messages, last, &wants, &mut found).await;
        }
        Ok(None) => {}
        Err(e) => tracing::warn!("cluster: transfer stream not read for moving sessions: {e}"),
    }
    for (want, found) in wants.into_iter().zip(found) {
        let _ = want.reply.send(found);
    }
}

/// Reads `messages` up to stream sequence `last`, each opened once, adding to
/// `found[i]` what `wants[i]` takes.
async fn take(
    seal: &ClusterSeal,
    stream_name: &str,
    mut messages: async_nats::jetstream::consumer::pull::Ordered,
    last: u64,
    wants: &[Want],
    found: &mut [Vec<(QueuedMessage, bool)>],
) {
    let deadline = tokio::time::Instant::now() + READ_WAIT;
    loop {
        let message = match tokio::time::timeout_at(deadline, messages.next()).await {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => {
                tracing::warn!("cluster: transfer stream read cut short: {e}");
                break;
            }
            Ok(None) => break,
            Err(_) => {
                tracing::warn!(
                    sessions = wants.len(),
                    "cluster: reading the transfer stream for moving sessions took too long; the rest is lost for them"
                );
                break;
            }
        };
        let Ok(info) = message.info() else {
            continue;
        };
        let sequence = info.stream_sequence;
        if sequence > last {
            break;
        }
        let id = xfer::message_id(&message);
        let origin = id
            .as_deref()
            .and_then(|id| id.rsplit_once(':'))
            .and_then(|(origin, first)| Some((origin.to_string(), first.parse::<u64>().ok()?)));
        let readers: Vec<usize> = (0..wants.len())
            .filter(|&i| wants[i].from <= sequence)
            .collect();
        if let (Some((origin, first)), false) = (origin, readers.is_empty()) {
            match xfer::open_any(seal, stream_name, xfer::Sealed::of(&message, id.as_deref())) {
                Ok(opened) => {
                    let waited = xfer::time_in_stream(&message);
                    for i in readers {
                        let want = &wants[i];
                        found[i].extend(
                            opened
                                .iter()
                                .enumerate()
                                .filter(|(n, _)| {
                                    (want.wanted)(&origin, first + *n as u64, sequence)
                                })
                                .filter_map(|(_, (envelope, payload))| {
                                    queued_for(&want.session, envelope, payload, waited)
                                })
                                .map(|m| (m, false)),
                        );
                    }
                }
                Err(e) => {
                    tracing::debug!(
                        "cluster: transfer message not taken for a moving session: {e:?}"
                    );
                }
            }
        }
        if sequence == last {
            break;
        }
    }
}

/// The stream from sequence `from` on, read by an ordered consumer of its own, and the
/// stream's last sequence now; `None` when nothing is there.
async fn stream_from(
    js: &async_nats::jetstream::Context,
    stream_name: &str,
    from: u64,
) -> Result<Option<(async_nats::jetstream::consumer::pull::Ordered, u64)>, String> {
    let mut stream = js
        .get_stream(stream_name)
        .await
        .map_err(|e| e.to_string())?;
    let last = stream
        .info()
        .await
        .map_err(|e| e.to_string())?
        .state
        .last_sequence;
    if from > last {
        return Ok(None);
    }
    let reader = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::ByStartSequence {
                start_sequence: from,
            },
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    let messages = reader.messages().await.map_err(|e| e.to_string())?;
    Ok(Some((messages, last)))
}

/// One message as queued for the session, if one of its subscriptions takes it.
fn queued_for(
    r: &Session,
    envelope: &xfer::Envelope,
    payload: &bytes::Bytes,
    waited: Duration,
) -> Option<QueuedMessage> {
    let topic = envelope.topic.as_str();
    if !crate::topic::valid_topic_name(topic, r.max_topic_levels) || topic.starts_with('$') {
        return None;
    }
    let own = envelope.client == r.key.client_id && envelope.user == r.key.owner;
    let granted = r
        .meta
        .subscriptions
        .iter()
        .filter(|(filter, options)| {
            let shared = filter.starts_with("$share/");
            let skipped = options.no_local && own;
            !shared && !skipped && moatmq_acl::topic_matches_filter(filter, topic)
        })
        .map(|(_, options)| options.qos.min(envelope.qos))
        .max()?;
    if granted == 0 && !r.queue_qos0 {
        return None;
    }
    let props = xfer::properties_now(envelope.properties.as_deref(), waited).ok()?;
    let expires_at = props
        .as_ref()
        .and_then(|p| p.message_expiry_interval)
        .map(|secs| moatmq_store::now_unix() + u64::from(secs));
    Some(QueuedMessage {
        topic: envelope.topic.clone(),
        payload: payload.clone(),
        qos: granted,
        retain: false,
        properties: props.map(|p| Box::new(from_router_properties(Some(&p)))),
        expires_at,
    })
}
