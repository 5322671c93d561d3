//! Cluster input (docs/cluster.md): every message of another node, from this node's
//! durable consumer of the transfer stream, is admitted here as [`Source::Cluster`] and
//! handed to the router on the broker's own link. A stream message (one MQTT message,
//! or a batch of them, taken in order) is acknowledged once, after that; one whose id was already taken in (a redelivery) is only
//! acknowledged; one that does not open is refused and counted; one whose MQTT 5
//! message expiry ran out while it waited in the stream (counted from the time
//! JetStream stored it) is dropped, and the others carry what is left of it.
//! A NATS-native message (no `Moatmq-Node`) reaches one node of the cluster (a queue
//! subscription, `native_user` set): admitted here as [`Source::Native`], which also
//! forwards it to the transfer stream for the other nodes and the shared groups. The
//! live copies of the nodes' own messages, which the queue hands to some node too, are
//! ignored (for NATS services). Apart from `cluster/` (the way out, which `Shared`
//! holds) so that the way in can use `admit` and `Shared` freely.

use crate::admit::{admit_numbered, Admitted, Refused, Source};
use crate::cluster::late_copies::{LateCopies, Refusal};
use crate::cluster::xfer::{self, Rejected, Seen};
use crate::cluster::*;
use crate::inbound::Inbound;
use crate::origin::Transfer;
use crate::policy::Identity;
use crate::shared::{ConnInfo, Shared};
use bytes::Bytes;
use futures_util::StreamExt;
use rumqttd::protocol::QoS;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Takes every message of the cluster's subjects into this node until shutdown.
pub async fn run_input(shared: Arc<Shared>, input: Input) {
    let Some(cluster) = shared.cluster.as_ref() else {
        return;
    };
    let Input {
        live,
        client,
        seal,
        groups,
    } = input;
    let pullers = crate::cluster_groups::run(shared.clone(), client.clone(), seal.clone(), groups);
    let info = cluster_connection();
    let live = async {
        let Some(mut subscriber) = live else {
            // No native_user: nothing to take from the live subjects.
            return std::future::pending().await;
        };
        while let Some(message) = subscriber.next().await {
            receive(&shared, cluster, &info, message);
        }
    };
    // Both end with this task (aborted at shutdown).
    tokio::select! {
        _ = live => {}
        _ = run_transfer(&shared, client, seal) => {}
        _ = pullers => {}
    }
}

/// Reads this node's consumer of the transfer stream until shutdown, setting it up
/// again after each failure.
async fn run_transfer(
    shared: &Arc<Shared>,
    client: async_nats::Client,
    seal: Arc<moatmq_store::ClusterSeal>,
) {
    let Some(cluster) = shared.cluster.as_ref() else {
        return;
    };
    let js = async_nats::jetstream::new(client.clone());
    let stream = xfer::stream_name(&cluster.prefix);
    let untimed = cluster.keeping.untimed;
    let mut clock = ClockCheck::default();
    let info = cluster_connection();
    let mut seen = Seen::default();
    // Messages put back in their nodes' order, and the highest stream sequence read.
    let mut order: Order<(async_nats::jetstream::Message, Vec<xfer::Arrived>)> = Order::default();
    let mut taken = 0;
    // Late refusals waiting for their nodes' replacements.
    let mut late = LateCopies::default();
    let set_ok = |ok: bool| shared.metrics.cluster_xfer_ok.store(ok, Ordering::Release);
    // Follows the NATS connection: a loss marks the input behind (`Cluster::new`).
    let mut progress = cluster.input_progress();
    loop {
        // Whether this consumer's holes are read (and the input marked caught up).
        let mut caught_up = false;
        if client.connection_state() != async_nats::connection::State::Connected {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let (mut again, mut messages) = match open_input(cluster, &js, &stream).await {
            Ok(opened) => opened,
            Err(e) => {
                set_ok(false);
                tracing::warn!("cluster: transfer stream: {e}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        set_ok(true);
        // Sent again by the consumer later: read already.
        let read_through = again.as_ref().map_or(0, |a| a.through);
        if again.is_none() {
            caught_up = true;
            cluster.input_caught_up();
        }
        loop {
            let wake = [order.deadline(), late.deadline()]
                .into_iter()
                .flatten()
                .min();
            let next = async {
                match again.as_mut() {
                    Some(a) => a.next().await,
                    None => messages.next().await.map(|m| m.map_err(|e| e.to_string())),
                }
            };
            // NATS lost once caught up: read again from the consumer, holes first.
            let lost = async {
                match caught_up {
                    true => drop(progress.wait_for(|caught_up| !*caught_up).await),
                    false => std::future::pending::<()>().await,
                }
            };
            let message = match wake {
                Some(at) => tokio::select! {
                    m = next => m,
                    () = lost => break,
                    () = tokio::time::sleep_until(at) => {
                        let now = tokio::time::Instant::now();
                        for refusal in late.due(now) {
                            refused(shared, &refusal.subject, &refusal.why);
                        }
                        if order.deadline().is_some_and(|d| d <= now) {
                            let due = order.due(now);
                            go_on_all(shared, &info, due, through(&order, taken)).await;
                            took_in(cluster, &order, taken);
                        }
                        continue;
                    }
                },
                None => tokio::select! {
                    m = next => m,
                    () = lost => break,
                },
            };
            let Some(message) = message else {
                break;
            };
            match message {
                Ok(message) if again.is_none() && sequence(&message) <= read_through => {
                    ack(&message).await;
                }
                Ok(message) => {
                    let seq = sequence(&message);
                    if again.as_ref().is_some_and(|a| seq >= a.through) {
                        // The holes are read: what comes next is new.
                        again = None;
                    }
                    let own = Some(cluster.node.as_str());
                    let took = xfer::take_in(&seal, &stream, own, untimed, &mut seen, &message);
                    if took.is_ok() {
                        settle(shared, &mut late, &message);
                    }
                    match took {
                        // In its node's order (`cluster/order.rs`), then each of a
                        // batch's messages in order; one acknowledgement.
                        Ok(arrived) if !arrived.is_empty() => {
                            let id = xfer::message_id(&message);
                            match id.as_deref().and_then(numbered) {
                                Some((node, epoch, first)) => {
                                    let count = arrived.len() as u64;
                                    let now = tokio::time::Instant::now();
                                    let place = order::Place {
                                        node,
                                        epoch,
                                        first,
                                        count,
                                        seq,
                                    };
                                    let ready = order.arrive(place, (message, arrived), now);
                                    let through = through(&order, taken.max(seq));
                                    go_on_all(shared, &info, ready, through).await;
                                }
                                None => {
                                    let through = through(&order, taken.max(seq));
                                    go_on(shared, &info, message, arrived, through).await;
                                }
                            }
                        }
                        Err(Rejected::Own) => {
                            if clock.due() {
                                clock.check(xfer::own_lag(&seal, &stream, &message));
                            }
                            ack(&message).await;
                        }
                        Ok(_) => ack(&message).await,
                        Err(Rejected::Refused(why)) => {
                            refused(shared, message.subject.as_str(), &why);
                            ack(&message).await;
                        }
                        Err(Rejected::Late(why)) => {
                            // Reported once its node had the time to store it again.
                            let refusal = Refusal {
                                id: xfer::message_id(&message).unwrap_or_default(),
                                subject: message.subject.to_string(),
                                why: why.to_string(),
                            };
                            if let Some(now) = late.refused(refusal, tokio::time::Instant::now()) {
                                refused(shared, &now.subject, &now.why);
                            }
                            ack(&message).await;
                        }
                    }
                    taken = taken.max(seq);
                    took_in(cluster, &order, taken);
                    if again.is_none() && !caught_up {
                        caught_up = true;
                        cluster.input_caught_up();
                    }
                }
                Err(e) => {
                    tracing::debug!("cluster: transfer stream: {e}");
                    if client.connection_state() != async_nats::connection::State::Connected {
                        break;
                    }
                }
            }
        }
        set_ok(false);
    }
}

/// A transfer message refused: logged and counted.
fn refused(shared: &Shared, subject: &str, why: &str) {
    tracing::error!(subject, "cluster: transfer message refused: {why}");
    shared.metrics.cluster_state_rejected.inc();
}

/// `message` opened: if its node stored it again under a new id, the late copy refused
/// before is not reported as a replay (`cluster/late_copies.rs`).
fn settle(shared: &Shared, late: &mut LateCopies, message: &async_nats::jetstream::Message) {
    if late.is_empty() {
        return;
    }
    let Some(id) = xfer::message_id(message) else {
        return;
    };
    if let Some(copy) = late.replaced(&id) {
        tracing::warn!(
            subject = copy.subject.as_str(),
            late = copy.id.as_str(),
            again = id.as_str(),
            "cluster: a transfer message refused as stored too late was its node's own \
             copy, stored again since and taken (the path between that node and NATS \
             stalled)"
        );
        shared.metrics.cluster_late_copies_replaced.inc();
    }
}

/// [`go_on`] with each of `ready`, in order, the stream counted as taken in up to
/// `through` at most and below each one not yet admitted.
async fn go_on_all<K>(
    shared: &Arc<Shared>,
    info: &ConnInfo,
    ready: Vec<(K, (async_nats::jetstream::Message, Vec<xfer::Arrived>))>,
    through: u64,
) {
    let mut rest: Vec<u64> = ready.iter().map(|(_, (m, _))| sequence(m)).collect();
    for (_, (m, arrived)) in ready {
        rest.remove(0);
        let below = rest
            .iter()
            .min()
            .map_or(through, |s| through.min(s.saturating_sub(1)));
        go_on(shared, info, m, arrived, below).await;
    }
}

/// Admits the messages of one stream message, in order, counts the stream as taken in
/// up to `through` in the same step (see `Cluster::cut_for`), and acknowledges it
/// (once what it queued for offline sessions is saved, if it must wait for that).
async fn go_on(
    shared: &Arc<Shared>,
    info: &ConnInfo,
    message: async_nats::jetstream::Message,
    arrived: Vec<xfer::Arrived>,
    through: u64,
) {
    // Counted down by the time it spent in the stream until now (it may have waited
    // for its node's earlier messages); never less than at its arrival, should the
    // wall clock step back meanwhile.
    let waited = xfer::time_in_stream(&message);
    let mut save = false;
    // The input runs only with a cluster.
    if let Some(cluster) = &shared.cluster {
        // Each message's place, while a session moves in (`Cluster::tags`): its node's
        // origin and number (a batch's are consecutive).
        let id = cluster.tags().then(|| xfer::message_id(&message)).flatten();
        let first = id
            .as_deref()
            .and_then(numbered)
            .map(|(node, epoch, first)| Transfer::new(&format!("{node}:{epoch}"), first));
        // Queued for offline sessions and counted taken in, in one step (as `admit`
        // does for this node's own: without durable sessions nothing is queued, and
        // no cut is taken under the lock).
        let _step = shared.durable.is_some().then(|| cluster.admission());
        for (i, m) in arrived.into_iter().enumerate() {
            let id = first.map(|f| Transfer {
                origin: f.origin,
                number: f.number + i as u64,
            });
            let waited = waited.max(m.waited);
            save |= transferred(shared, info, m.envelope, m.payload, waited, id);
        }
        let pause = taken_pause();
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
        cluster.took_in(through);
    }
    if save {
        ack_once_saved(shared.clone(), message);
    } else {
        ack(&message).await;
    }
}

/// A pause between handing a stream message's messages to the router and counting it
/// taken in, within the admission step: none, or with the `test-hooks` feature the
/// milliseconds in `MOATMQ_TEST_INPUT_TAKEN_PAUSE_MS`, so that a test can take a cut
/// in between (a cut must wait for the step, `handoff::read_after_cut`).
fn taken_pause() -> Duration {
    static HOOKED: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    crate::hooks::hooked(&HOOKED, "MOATMQ_TEST_INPUT_TAKEN_PAUSE_MS", Duration::ZERO)
}

async fn ack(message: &async_nats::jetstream::Message) {
    if let Err(e) = message.ack().await {
        tracing::debug!("cluster: transfer message not acknowledged: {e}");
    }
}

/// The stream is taken in up to `taken`, below what is held.
fn took_in(cluster: &Cluster, order: &Order<impl Sized>, taken: u64) {
    cluster.took_in(through(order, taken));
}

/// `taken`, or below the lowest stream sequence `order` holds.
fn through(order: &Order<impl Sized>, taken: u64) -> u64 {
    order
        .lowest_held()
        .map_or(taken, |held| taken.min(held.saturating_sub(1)))
}

/// The stream sequence of `message` (0 if not a JetStream message).
fn sequence(message: &async_nats::jetstream::Message) -> u64 {
    message.info().map_or(0, |i| i.stream_sequence)
}

/// `(node, epoch, number)` of a message id ([`xfer::place_of`]).
fn numbered(id: &str) -> Option<(&str, &str, u64)> {
    let (origin, number) = xfer::place_of(id)?;
    let (node, epoch) = origin.split_once(':')?;
    Some((node, epoch, number))
}

/// This node's consumer of the transfer stream, ready to be read: what it delivered
/// before without an acknowledgement first ([`Again`]), then its own messages.
async fn open_input(
    cluster: &Cluster,
    js: &async_nats::jetstream::Context,
    stream: &str,
) -> Result<(Option<Again>, async_nats::jetstream::consumer::pull::Stream), String> {
    let consumer = xfer::consumer(js, &cluster.prefix, &cluster.node, &cluster.keeping).await?;
    // Everything up to the consumer's acknowledgement floor was taken in, by this
    // process or the one before (a cut names it: a process just started has taken
    // nothing in itself until more traffic comes).
    cluster.took_in(consumer.cached_info().ack_floor.stream_sequence);
    // What the server sent this node's previous process (or this process before a loss
    // of NATS) without an acknowledgement, it sends again only after the consumer's ack
    // wait (30 s), and newer messages at once: read first, in order, so that what this
    // node took in has no holes (`Cluster::cut_for`).
    let again = match unacknowledged(consumer.cached_info()) {
        Some((from, through)) => Again::read(js, stream, from, through).await?,
        None => None,
    };
    let messages = consumer.messages().await.map_err(|e| e.to_string())?;
    Ok((again, messages))
}

/// The stream sequences `(from, through)` a consumer delivered without their
/// acknowledgement, if any: from above its acknowledgement floor to the last it
/// delivered (some in between may be acknowledged: taken in again, or dropped as seen).
fn unacknowledged(consumer: &async_nats::jetstream::consumer::Info) -> Option<(u64, u64)> {
    let floor = consumer.ack_floor.stream_sequence;
    let through = consumer.delivered.stream_sequence;
    (consumer.num_ack_pending > 0 && through > floor).then_some((floor + 1, through))
}

/// The transfer stream from the first message the consumer delivered without an
/// acknowledgement through the last it delivered, read by an ordered consumer of its own.
struct Again {
    messages: async_nats::jetstream::consumer::pull::Ordered,
    through: u64,
}

impl Again {
    /// `None` when nothing of it is left in the stream.
    async fn read(
        js: &async_nats::jetstream::Context,
        stream: &str,
        from: u64,
        through: u64,
    ) -> Result<Option<Again>, String> {
        tracing::info!(
            from,
            through,
            "cluster: reading the transfer messages sent before without an acknowledgement"
        );
        let read = crate::cluster::reads::stream_from(js, stream, from).await?;
        Ok(read.map(|(messages, _)| Again { messages, through }))
    }

    async fn next(&mut self) -> Option<Result<async_nats::jetstream::Message, String>> {
        self.messages
            .next()
            .await
            .map(|m| m.map_err(|e| e.to_string()))
    }
}

/// Acknowledges a transfer message once the session store has committed what admitting
/// it queued for offline persistent sessions (`autosave_interval = 0`), as a
/// publisher's PUBACK waits for it: a node killed before the commit reads it again.
/// The messages after it go on meanwhile, so commits still gather many.
fn ack_once_saved(shared: Arc<Shared>, message: async_nats::jetstream::Message) {
    tokio::spawn(async move {
        let saved = match &shared.durable {
            Some(book) => book.commit().await,
            None => true,
        };
        if !saved {
            // Not acknowledged: JetStream sends it again after the ack wait.
            tracing::error!(
                "cluster: transfer message not acknowledged: session store commit failed"
            );
            return;
        }
        if let Err(e) = message.ack().await {
            tracing::debug!("cluster: transfer message not acknowledged: {e}");
        }
    });
}

/// One message of another node from the transfer stream, stored there `waited` ago;
/// `true` if its acknowledgement must wait for a save ([`Admitted::AfterSave`]).
fn transferred(
    shared: &Shared,
    info: &ConnInfo,
    envelope: xfer::Envelope,
    payload: Bytes,
    waited: Duration,
    id: Option<Transfer>,
) -> bool {
    // Counted down by the time it waited, before the envelope is taken apart.
    let props = xfer::properties_now(&envelope, waited);
    let topic = envelope.topic;
    if !crate::topic::valid_topic_name(&topic, shared.config.limits.max_topic_levels)
        || topic.starts_with('$')
    {
        tracing::debug!("cluster: transfer message with no valid topic dropped");
        return false;
    }
    let who = Identity {
        username: envelope.user,
        client_id: envelope.client,
    };
    let Ok(props) = props else {
        tracing::debug!(
            topic,
            "cluster: transfer message expired in the stream dropped"
        );
        return false;
    };
    take_in(
        shared,
        info,
        &who,
        Source::Cluster,
        Message {
            topic,
            payload,
            qos: xfer::qos_of(envelope.qos),
            retain: envelope.retain,
            props,
            id,
        },
    )
}

/// A message taken in from NATS, with its place in the transfer stream when it comes
/// from there (a NATS-native one gets its place as this node forwards it).
struct Message {
    topic: String,
    payload: Bytes,
    qos: QoS,
    retain: bool,
    props: Option<rumqttd::protocol::PublishProperties>,
    id: Option<Transfer>,
}

/// One message from NATS on a live subject, which the queue gave to this node alone: a
/// NATS-native client's is admitted as [`Source::Native`], then into the router; a
/// node's live copy is ignored (the nodes have it from the transfer stream).
fn receive(shared: &Shared, cluster: &Cluster, info: &ConnInfo, message: async_nats::Message) {
    let header = |name: &str| {
        message
            .headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_string())
    };
    if header(NODE).is_some() {
        return;
    }
    let Some(rest) = message
        .subject
        .as_str()
        .strip_prefix(cluster.prefix.as_str())
        .and_then(|s| s.strip_prefix('.'))
    else {
        return;
    };
    let topic = to_topic(rest);
    if !crate::topic::valid_topic_name(&topic, shared.config.limits.max_topic_levels)
        || topic.starts_with('$')
    {
        tracing::debug!("cluster: message on a subject with no valid topic dropped");
        return;
    }
    let Some(user) = &cluster.native_user else {
        // Only nodes with native_user subscribe.
        return;
    };
    let who = Identity {
        username: Some(user.clone()),
        client_id: NATIVE_CLIENT_ID.to_string(),
    };
    let qos = match header(QOS).as_deref() {
        Some("1") => QoS::AtLeastOnce,
        Some("2") => QoS::ExactlyOnce,
        _ => QoS::AtMostOnce,
    };
    let retain = header(RETAIN).as_deref() == Some("1");
    let props = header(PROPERTIES).and_then(|p| crate::cluster::decode_properties(&p));
    // Admitted as this node's own client's would be: forwarded through the transfer
    // stream, which brings it to the other nodes and to the shared groups' consumers.
    // Nobody waits for its acknowledgement (core NATS gave it at most once).
    let message = Message {
        topic,
        payload: message.payload,
        qos,
        retain,
        props,
        id: None,
    };
    let _ = take_in(shared, info, &who, Source::Native, message);
}

/// Admits a message from the cluster and hands it to the router; `true` if what it
/// queued for offline sessions (or the retained store) is to be saved before the
/// message is acknowledged.
fn take_in(shared: &Shared, info: &ConnInfo, who: &Identity, source: Source, m: Message) -> bool {
    let Message {
        topic,
        payload,
        qos,
        retain,
        props,
        id,
    } = m;
    // Properties mean an MQTT 5 publisher: a retained copy keeps them, as on one node.
    let inbound = Inbound {
        topic: &topic,
        payload: &payload,
        qos,
        retain,
        properties: props.as_ref(),
        v5: props.is_some(),
    };
    // Nothing waits for the transfer of a NATS-native message: core NATS gave it at
    // most once, and nobody is owed an acknowledgement.
    // Until the router has it (`SessionBook::admitting`), as for a client's publish.
    let _routing = shared.durable.as_ref().map(|book| book.admitting());
    match admit_numbered(shared, info, who, source, inbound) {
        Ok((admitted, forwarded)) => {
            shared.metrics.cluster_received.inc();
            let topic = Bytes::from(topic.into_bytes());
            // Only while a session moves in (`Cluster::tags`).
            let id = id
                .or(forwarded)
                .filter(|_| shared.cluster.as_ref().is_some_and(|c| c.tags()));
            shared
                .router
                .publish_as(topic, payload, qos, retain, props, id);
            admitted == Admitted::AfterSave
        }
        Err(Refused::Unavailable) => {
            // A NATS-native QoS 1/2 message with the forwarding queue full: delivered
            // nowhere rather than on this node only.
            shared.metrics.cluster_dropped.inc();
            tracing::debug!(
                topic,
                "cluster: forwarding queue full; NATS message dropped"
            );
            false
        }
        Err(why) => {
            tracing::debug!(topic, ?why, "cluster: message not admitted");
            false
        }
    }
}

/// The connection cluster input is audited as coming from.
fn cluster_connection() -> ConnInfo {
    ConnInfo::internal("cluster")
}

/// How far behind its NATS server's clock this node's is, from its own messages in the
/// transfer stream (the time it sealed one against the time JetStream stored it), at
/// most once a minute: other nodes refuse its messages as replays once that passes
/// `replay::REPLAY_SLACK` (docs/cluster.md, "Replays"), so it says so before.
#[derive(Default)]
struct ClockCheck {
    last: Option<tokio::time::Instant>,
}

impl ClockCheck {
    const EVERY: Duration = Duration::from_secs(60);

    fn due(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        if self.last.is_some_and(|t| now < t + Self::EVERY) {
            return false;
        }
        self.last = Some(now);
        true
    }

    fn check(&self, lag_ms: Option<i128>) {
        match lag_ms.map(Behind::of) {
            Some(Behind::Refused(s)) => tracing::error!(
                behind_s = s,
                "cluster: this node's clock is behind its NATS server's by more than the \
                 replay slack: the other nodes refuse its messages as replays; keep the \
                 clocks in step (NTP)"
            ),
            Some(Behind::Near(s)) => tracing::warn!(
                behind_s = s,
                "cluster: this node's clock is behind its NATS server's: past 60 s the \
                 other nodes refuse its messages as replays; keep the clocks in step (NTP)"
            ),
            Some(Behind::Fine) | None => {}
        }
    }
}

/// How far behind its NATS server a node's own message was stored (seconds).
#[derive(Debug, PartialEq, Eq)]
enum Behind {
    Fine,
    /// Past half the replay slack.
    Near(i128),
    /// Past the slack: refused by the other nodes.
    Refused(i128),
}

impl Behind {
    fn of(lag_ms: i128) -> Behind {
        let slack = crate::cluster::replay::REPLAY_SLACK.as_millis() as i128;
        if lag_ms > slack {
            Behind::Refused(lag_ms / 1000)
        } else if lag_ms > slack / 2 {
            Behind::Near(lag_ms / 1000)
        } else {
            Behind::Fine
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clock_behind_is_told_before_the_other_nodes_refuse_its_messages() {
        assert_eq!(Behind::of(-5_000), Behind::Fine, "ahead of NATS");
        assert_eq!(Behind::of(200), Behind::Fine);
        assert_eq!(Behind::of(31_000), Behind::Near(31));
        assert_eq!(Behind::of(61_000), Behind::Refused(61));
        let mut clock = ClockCheck::default();
        assert!(clock.due());
        assert!(!clock.due(), "once a minute");
    }
}
