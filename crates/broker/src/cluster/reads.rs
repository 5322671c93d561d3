//! Passes over the transfer stream for sessions moving to this node
//! (`unread.rs`), combined: what each session needs from the stream is read in one pass
//! with the others asking at the same time.

use super::xfer;
use crate::metrics::Metrics;
use crate::origin::Transfer;
use crate::retained::from_router_properties;
use futures_util::StreamExt;
use moatmq_store::{ClusterSeal, QueuedMessage, SessionKey, SessionMeta};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// How long a pass reads, at most.
pub(super) const READ_WAIT: Duration = Duration::from_secs(10);

/// Which messages one read takes: `(origin, number, stream sequence)` (origin
/// `<node>:<epoch>` and number from its id).
pub(super) type Wanted = Box<dyn Fn(&str, u64, u64) -> bool + Send + Sync>;

/// One session's read: from which stream sequence, which messages.
pub(super) struct Want {
    pub(super) from: u64,
    pub(super) wanted: Wanted,
    pub(super) session: Session,
}

/// What a read matches messages against: the session's subscriptions.
pub(super) struct Session {
    pub(super) key: SessionKey,
    pub(super) meta: SessionMeta,
    pub(super) queue_qos0: bool,
    pub(super) max_topic_levels: usize,
}

/// The transfer stream, and what a pass over it needs.
pub(super) struct Stream {
    pub(super) js: async_nats::jetstream::Context,
    pub(super) seal: Arc<ClusterSeal>,
    pub(super) name: String,
    pub(super) untimed: super::replay::Untimed,
    pub(super) metrics: Arc<Metrics>,
}

/// A read waiting for its pass.
struct Asked {
    want: Want,
    reply: oneshot::Sender<Vec<Read>>,
}

/// A message a read took for a session, as queued for it, and its place in the stream.
pub(super) struct Read {
    pub(super) message: QueuedMessage,
    pub(super) id: Transfer,
}

/// The reads of the transfer stream this node makes for sessions moving in, combined:
/// a read asked while another pass runs waits for it, then goes with every other read
/// of its kind asked meanwhile as one pass (one ordered consumer, each stream message
/// opened once). A rolling restart moving thousands of sessions here then reads the
/// stream a few times, not once per session. The two kinds combine apart: reads after
/// a cut start near the stream's end, reads on a dead node's behalf where its consumer
/// stopped, possibly minutes back, which the first kind must not wait through.
#[derive(Default)]
pub(crate) struct Reads {
    after_cut: Passes,
    on_behalf: Passes,
}

/// What a read is for.
pub(super) enum Kind {
    /// What was published while a session moved (`unread::after_cut`).
    AfterCut,
    /// What a dead node left unread for a session (`unread::read`).
    OnBehalf,
}

/// Reads of one kind, waiting for their pass.
#[derive(Default)]
struct Passes {
    asked: std::sync::Mutex<Vec<Asked>>,
    turn: tokio::sync::Mutex<()>,
}

impl Reads {
    /// The stream from `want.from` to its last message when the pass starts, each MQTT
    /// message taken if `want.wanted` and the session's subscriptions take it, at the
    /// QoS granted, its expiry counted down by its time in the stream, in order, for at
    /// most [`READ_WAIT`]; empty if the stream cannot be read (logged).
    pub(super) async fn read(&self, kind: Kind, stream: Stream, want: Want) -> Vec<Read> {
        let passes = match kind {
            Kind::AfterCut => &self.after_cut,
            Kind::OnBehalf => &self.on_behalf,
        };
        let (reply, found) = oneshot::channel();
        lock(&passes.asked).push(Asked { want, reply });
        {
            let _turn = passes.turn.lock().await;
            let asked = std::mem::take(&mut *lock(&passes.asked));
            if !asked.is_empty() {
                // A task of its own: the reads of others are answered even if this
                // one's caller goes away meanwhile.
                let _ = tokio::spawn(pass(stream, asked)).await;
            }
        }
        found.await.unwrap_or_default()
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One pass over the stream for `asked`, from the lowest sequence one asks to the
/// stream's last now; each is answered at the end.
async fn pass(stream: Stream, asked: Vec<Asked>) {
    let (wants, replies): (Vec<Want>, Vec<_>) =
        asked.into_iter().map(|a| (a.want, a.reply)).unzip();
    let mut found: Vec<Vec<Found>> = wants.iter().map(|_| Vec::new()).collect();
    let from = wants.iter().map(|w| w.from).min().unwrap_or(u64::MAX);
    match stream_from(&stream.js, &stream.name, from).await {
        Ok(Some((messages, last))) => {
            stream.metrics.cluster_transfer_reads.inc();
            take(&stream, messages, last, &wants, &mut found).await;
        }
        Ok(None) => {}
        Err(e) => tracing::warn!("cluster: transfer stream not read for moving sessions: {e}"),
    }
    for (reply, found) in replies.into_iter().zip(found) {
        let _ = reply.send(in_node_order(found));
    }
}

/// A message a read took, with its node's number for it.
struct Found {
    /// `<node>:<epoch>` of its id.
    origin: Arc<str>,
    number: u64,
    message: QueuedMessage,
}

/// Puts each node's messages back in that node's order, in the places its messages
/// take among the others': one stored late (lost with its node's NATS connection and
/// sent again after later ones went out) comes where its node sent it, as this node's
/// own consumer orders them (`order.rs`); one stored twice (sent again after the
/// stream's duplicate window) comes once.
fn in_node_order(found: Vec<Found>) -> Vec<Read> {
    let mut places: std::collections::HashMap<Arc<str>, Vec<usize>> = Default::default();
    for (i, f) in found.iter().enumerate() {
        places.entry(f.origin.clone()).or_default().push(i);
    }
    let mut found: Vec<Option<Found>> = found.into_iter().map(Some).collect();
    let mut out: Vec<Option<Read>> = found.iter().map(|_| None).collect();
    for (origin, places) in &places {
        let origin = Transfer::new(origin, 0).origin;
        let mut mine: Vec<Found> = places.iter().filter_map(|&i| found[i].take()).collect();
        mine.sort_by_key(|f| f.number);
        mine.dedup_by_key(|f| f.number);
        for (&i, f) in places.iter().zip(mine) {
            let id = Transfer {
                origin,
                number: f.number,
            };
            out[i] = Some(Read {
                message: f.message,
                id,
            });
        }
    }
    out.into_iter().flatten().collect()
}

/// Reads `messages` up to stream sequence `last`, each opened once, adding to
/// `found[i]` what `wants[i]` takes.
async fn take(
    stream: &Stream,
    mut messages: async_nats::jetstream::consumer::pull::Ordered,
    last: u64,
    wants: &[Want],
    found: &mut [Vec<Found>],
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
            .and_then(xfer::place_of)
            .map(|(origin, first)| (Arc::<str>::from(origin), first));
        let readers: Vec<usize> = (0..wants.len())
            .filter(|&i| wants[i].from <= sequence)
            .collect();
        if let (Some((origin, first)), false) = (origin, readers.is_empty()) {
            let sealed = xfer::Sealed::of(&message, id.as_deref());
            match xfer::open_any(&stream.seal, &stream.name, sealed, stream.untimed) {
                Ok(opened) => {
                    let waited = sealed.time_in_stream();
                    for i in readers {
                        let want = &wants[i];
                        found[i].extend(
                            opened
                                .iter()
                                .enumerate()
                                .map(|(n, m)| (first + n as u64, m))
                                .filter(|(number, _)| (want.wanted)(&origin, *number, sequence))
                                .filter_map(|(number, (envelope, payload))| {
                                    let message =
                                        queued_for(&want.session, envelope, payload, waited)?;
                                    Some(Found {
                                        origin: origin.clone(),
                                        number,
                                        message,
                                    })
                                }),
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
pub(crate) async fn stream_from(
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
    let props = xfer::properties_now(envelope, waited).ok()?;
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

#[cfg(test)]
mod tests {
    use super::{in_node_order, Found};
    use moatmq_store::QueuedMessage;

    fn found(origin: &str, number: u64) -> Found {
        Found {
            origin: origin.into(),
            number,
            message: QueuedMessage {
                topic: format!("{origin}/{number}"),
                payload: Default::default(),
                qos: 1,
                retain: false,
                properties: None,
                expires_at: None,
            },
        }
    }

    #[test]
    fn each_nodes_messages_go_back_in_its_order_in_its_places_and_once() {
        let read = vec![
            found("x:1", 1),
            found("y:1", 7),
            found("x:1", 3),
            found("x:1", 4),
            found("y:1", 8),
            found("x:1", 2),
            found("x:1", 3),
        ];
        let topics: Vec<String> = in_node_order(read)
            .into_iter()
            .map(|r| r.message.topic)
            .collect();
        assert_eq!(
            topics,
            ["x:1/1", "y:1/7", "x:1/2", "x:1/3", "y:1/8", "x:1/4"]
        );
    }
}
