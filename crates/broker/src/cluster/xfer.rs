//! The cross-node hop through JetStream (docs/cluster.md, "Stored state"): every
//! message this node forwards is also published, sealed, to `<base>_xfer.<node>` in
//! the stream `<base>_xfer`; the other nodes read that stream, not the live subjects,
//! for what moatmq nodes forward.
//!
//! Out: one task takes what is queued when it is ready to send (up to `[cluster]
//! transfer_batch` messages and the server's `max_payload`, never waiting for more)
//! and publishes it as one stream message, a batch ([`BATCH`] header), with
//! `Nats-Msg-Id` `<node>:<epoch>:<number of its first message>` so the stream's
//! duplicate window drops a republish; with `transfer_batch = 1`, one message each
//! (no header), as releases before batching read. It does not wait for one
//! acknowledgement before sending the next (at most [`WINDOW`] messages
//! unacknowledged) and advances the sequencer's done number over the acknowledgements in
//! order, each to its batch's last number. A failed acknowledgement (timeout, NATS
//! away, stream missing) sends every unacknowledged batch again, sealed again with the
//! time now, once NATS is back: a gateway holding a QoS 1/2 PUBACK until its number is acknowledged
//! never acknowledges what JetStream does not hold.
//! In: [`open`] authenticates a message of the stream (its AAD names the stream, the
//! message id, whose node must be the subject's, and whether it is a batch) and decodes
//! it into its messages; [`Seen`] drops a message id already handed to the router (a
//! redelivery after a lost ack).
//!
//! Replays: the first message of each stream message carries the time it was sealed
//! (sealed again, with a new time, each time it is sent), and a stream message JetStream
//! stored more than `replay::REPLAY_SLACK` after that is refused. A captured message sent
//! again within the stream's duplicate window is dropped by the stream; later, it is
//! stored at least that window after it was sealed, so it is refused here, by every
//! node, also by one that never saw it (a node started since, a group's consumer).
//! Messages without the time (releases before it) are refused unless `[cluster]
//! accept_untimed` is set (a rolling upgrade from one of those).
//!
//! A message is `len u32 BE | header JSON | payload` before sealing; the header holds
//! the topic, QoS, retain flag, publisher, MQTT 5 properties (`properties.rs`) and, in
//! a stream message's first, the time it was sealed. A batch is `count u32 BE | (len
//! u32 BE | message)*`.

use super::replay::{now_ms, Untimed};
use super::state::{check_replicas, Keeping};
use crate::metrics::Metrics;
use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesOrdered;
use futures_util::StreamExt;
use moatmq_store::ClusterSeal;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Republishes of one id within this are dropped by the stream (the stream's max age,
/// `[cluster] transfer_max_age`, is never under it).
const DUPLICATE_WINDOW: Duration =
    Duration::from_secs(moatmq_config::TRANSFER_DUPLICATE_WINDOW_SECS);
/// Messages (not batches) published and not yet acknowledged, at most.
const WINDOW: usize = 4096;
/// How long to wait for one acknowledgement before sending again.
const ACK_TIMEOUT: Duration = Duration::from_secs(3);
/// Message ids remembered on the way in, to drop redeliveries.
const SEEN: usize = 65_536;
/// Pause before sending the unacknowledged messages again.
const RETRY: Duration = Duration::from_millis(250);

/// The stream of one cluster (`<base>` as for the KV buckets).
pub fn stream_name(prefix: &str) -> String {
    format!("{}_xfer", super::bucket_base(prefix))
}

/// What travels sealed with the payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub topic: String,
    pub qos: u8,
    pub retain: bool,
    #[serde(default)]
    pub user: Option<String>,
    pub client: String,
    /// The `Moatmq-Properties` JSON, when the message has MQTT 5 properties.
    #[serde(default)]
    pub properties: Option<String>,
    /// When its stream message was sealed (Unix milliseconds, the sending node's
    /// clock): in a stream message's first message only. Releases before it ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed: Option<u64>,
    /// How long the message had waited on its node when its stream message was sealed
    /// (milliseconds, that node's monotonic clock), for a message with an MQTT 5
    /// message expiry interval: one that waited for NATS (away, or slow) has it counted
    /// down by that wait too, not only by its time in the stream. Releases before it
    /// ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_ms: Option<u64>,
}

impl Envelope {
    /// How long the message has been on its way: `in_stream` (since JetStream stored
    /// it) and what it waited on its node before that.
    pub fn waited(&self, in_stream: Duration) -> Duration {
        in_stream.saturating_add(Duration::from_millis(self.held_ms.unwrap_or(0)))
    }
}

/// Milliseconds since `since`, for [`Envelope::held_ms`].
fn held_ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// `len u32 BE | header JSON | payload`.
pub fn encode(envelope: &Envelope, payload: &[u8]) -> Vec<u8> {
    // Serialising a struct of strings and integers cannot fail.
    let header = serde_json::to_vec(envelope).unwrap_or_default();
    let mut out = Vec::with_capacity(4 + header.len() + payload.len());
    out.extend_from_slice(&(header.len() as u32).to_be_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(payload);
    out
}

/// The envelope and payload of an opened message; `None` if malformed.
pub fn decode(plain: &[u8]) -> Option<(Envelope, &[u8])> {
    let len = u32::from_be_bytes(plain.get(..4)?.try_into().ok()?) as usize;
    let header = plain.get(4..4usize.checked_add(len)?)?;
    let envelope = serde_json::from_slice(header).ok()?;
    Some((envelope, &plain[4 + len..]))
}

/// The NATS header that names a transfer stream message a batch (its value: how many
/// messages it holds). It only chooses how the message is opened: a batch
/// authenticates only as one, under its own associated data.
pub const BATCH: &str = "Moatmq-Batch";

/// Messages being gathered into one transfer stream message: `count u32 BE | (len u32
/// BE | message)*` before sealing, each message as [`encode`] makes it.
pub struct Batch {
    plain: zeroize::Zeroizing<Vec<u8>>,
    count: u32,
}

impl Batch {
    pub fn new() -> Batch {
        Batch {
            plain: zeroize::Zeroizing::new(vec![0; 4]),
            count: 0,
        }
    }

    /// Adds one message, as [`encode`] made it.
    pub fn push(&mut self, message: &[u8]) {
        self.plain
            .extend_from_slice(&(message.len() as u32).to_be_bytes());
        self.plain.extend_from_slice(message);
        self.count += 1;
        self.plain[..4].copy_from_slice(&self.count.to_be_bytes());
    }

    #[cfg(test)]
    pub fn count(&self) -> u32 {
        self.count
    }

    pub fn plain(&self) -> &[u8] {
        &self.plain
    }
}

/// The messages of an opened batch, in order; `None` if malformed (a count that does
/// not match, a length past the end, a message that does not decode).
pub fn decode_batch(plain: &[u8]) -> Option<Vec<(Envelope, std::ops::Range<usize>)>> {
    let count = u32::from_be_bytes(plain.get(..4)?.try_into().ok()?) as usize;
    // Each message takes at least its two length prefixes.
    if count > plain.len() / 8 {
        return None;
    }
    let mut out = Vec::with_capacity(count);
    let mut at = 4usize;
    for _ in 0..count {
        let len = u32::from_be_bytes(plain.get(at..at + 4)?.try_into().ok()?) as usize;
        let start = at + 4;
        let end = start.checked_add(len)?;
        let (envelope, payload) = decode(plain.get(start..end)?)?;
        out.push((envelope, end - payload.len()..end));
        at = end;
    }
    (at == plain.len()).then_some(out)
}

/// Why a message of the stream is not taken in.
#[derive(Debug, PartialEq, Eq)]
pub enum Rejected {
    /// Sent by this node: nothing to do.
    Own,
    /// Not sealed by a node of this cluster for this stream and id, or malformed.
    Refused(String),
    /// Stored longer after its sealing than the replay slack (`replay.rs`): a replay,
    /// or its node's own copy that NATS stored late, which that node then stores again
    /// under `<its id>~<random>` ([`Output::store_again`]).
    Late(super::replay::Stale),
}

/// The messages of the stream message on `subject` with message id `msg_id` (one, or
/// a `batch`'s), in order.
pub fn open(
    seal: &ClusterSeal,
    stream: &str,
    node: &str,
    at: Sealed<'_>,
    untimed: Untimed,
) -> Result<Vec<(Envelope, Bytes)>, Rejected> {
    let origin = origin(stream, at.subject)?;
    if origin == node {
        return Err(Rejected::Own);
    }
    fresh(open_from(seal, stream, origin, at)?, at, untimed)
}

/// `opened` unless stored long after it was sealed (a replay), or without the time
/// unless `untimed` accepts it (`replay.rs`); a stream message's first message carries
/// the time.
fn fresh(
    opened: Vec<(Envelope, Bytes)>,
    at: Sealed<'_>,
    untimed: Untimed,
) -> Result<Vec<(Envelope, Bytes)>, Rejected> {
    let sealed = opened.first().and_then(|(e, _)| e.sealed);
    super::replay::check(sealed, at.stored_ms(), untimed).map_err(|stale| match stale {
        super::replay::Stale::Late { .. } => Rejected::Late(stale),
        super::replay::Stale::Untimed(_) => Rejected::Refused(stale.to_string()),
    })?;
    Ok(opened)
}

/// How long after this node sealed it JetStream stored `message`, one of this node's
/// own (its send, and how far its clock is behind the NATS server's), in
/// milliseconds; `None` if it does not open or says no time.
pub fn own_lag(seal: &ClusterSeal, stream: &str, message: &jetstream::Message) -> Option<i128> {
    let id = message_id(message);
    let at = Sealed::of(message, id.as_deref());
    let opened = open_from(seal, stream, origin(stream, at.subject).ok()?, at).ok()?;
    let sealed = opened.first()?.0.sealed?;
    Some(at.stored_ms()? - i128::from(sealed))
}

/// A message as read from the stream.
#[derive(Clone, Copy)]
pub struct Sealed<'a> {
    pub subject: &'a str,
    pub msg_id: Option<&'a str>,
    /// It names itself a batch ([`BATCH`]).
    pub batch: bool,
    pub value: &'a [u8],
    /// When JetStream stored it (Unix nanoseconds, the NATS server's clock).
    pub stored_ns: Option<i128>,
}

impl<'a> Sealed<'a> {
    /// `message` with its id (from [`message_id`]).
    pub fn of(message: &'a jetstream::Message, msg_id: Option<&'a str>) -> Sealed<'a> {
        Sealed {
            subject: message.subject.as_str(),
            msg_id,
            batch: message
                .headers
                .as_ref()
                .is_some_and(|h| h.get(BATCH).is_some()),
            value: &message.payload,
            stored_ns: message
                .info()
                .ok()
                .map(|i| i.published.unix_timestamp_nanos()),
        }
    }

    /// When JetStream stored it, in Unix milliseconds.
    pub fn stored_ms(&self) -> Option<i128> {
        self.stored_ns.map(|ns| ns / 1_000_000)
    }

    /// How long ago JetStream stored it, by the NATS server's own timestamp (not the
    /// sending node's clock); zero if the message names none or the local clock is
    /// behind.
    pub fn time_in_stream(&self) -> Duration {
        let Some(stored) = self.stored_ns else {
            return Duration::ZERO;
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let now = i128::try_from(now).unwrap_or(i128::MAX);
        let waited = now.saturating_sub(stored).max(0);
        Duration::from_nanos(u64::try_from(waited).unwrap_or(u64::MAX))
    }
}

/// The node a stream message's subject names (its last token).
fn origin<'s>(stream: &str, subject: &'s str) -> Result<&'s str, Rejected> {
    subject
        .strip_prefix(stream)
        .and_then(|s| s.strip_prefix('.'))
        .ok_or_else(|| Rejected::Refused("not on a node's subject".into()))
}

/// Opens the stream message of node `origin` (its subject's last token), this node's
/// own messages included (a shared group's consumer reads them too).
pub fn open_any(
    seal: &ClusterSeal,
    stream: &str,
    at: Sealed<'_>,
    untimed: Untimed,
) -> Result<Vec<(Envelope, Bytes)>, Rejected> {
    fresh(
        open_from(seal, stream, origin(stream, at.subject)?, at)?,
        at,
        untimed,
    )
}

fn open_from(
    seal: &ClusterSeal,
    stream: &str,
    origin: &str,
    at: Sealed<'_>,
) -> Result<Vec<(Envelope, Bytes)>, Rejected> {
    let msg_id = at
        .msg_id
        .ok_or_else(|| Rejected::Refused("no message id".into()))?;
    if msg_id.split(':').next() != Some(origin) {
        return Err(Rejected::Refused(
            "message id of another node than its subject".into(),
        ));
    }
    let refused = |e: moatmq_store::StoreError| Rejected::Refused(e.to_string());
    let malformed = || Rejected::Refused("authenticated but malformed".into());
    if !at.batch {
        let plain = seal
            .open_transfer(stream, msg_id, at.value)
            .map_err(refused)?;
        let (envelope, payload) = decode(&plain).ok_or_else(malformed)?;
        return Ok(vec![(envelope, Bytes::copy_from_slice(payload))]);
    }
    let plain = seal
        .open_transfer_batch(stream, msg_id, at.value)
        .map_err(refused)?;
    let messages = decode_batch(&plain).ok_or_else(malformed)?;
    // One copy of the batch; each payload a slice of it.
    let all = Bytes::copy_from_slice(&plain);
    Ok(messages
        .into_iter()
        .map(|(envelope, range)| (envelope, all.slice(range)))
        .collect())
}

/// A message of the stream taken in: what it carries and how long it waited there.
pub struct Arrived {
    pub envelope: Envelope,
    pub payload: Bytes,
    pub waited: Duration,
}

/// Opens a message read from the stream into the messages it carries (one, or a
/// batch's), in order: none for one already taken in (a redelivery, by its message
/// id). With `own` (this node), this node's own messages are [`Rejected::Own`];
/// without, they open too (a shared group's consumer).
pub fn take_in(
    seal: &ClusterSeal,
    stream: &str,
    own: Option<&str>,
    untimed: Untimed,
    seen: &mut Seen,
    message: &jetstream::Message,
) -> Result<Vec<Arrived>, Rejected> {
    let id = message_id(message);
    let at = Sealed::of(message, id.as_deref());
    let opened = match own {
        Some(node) => open(seal, stream, node, at, untimed)?,
        None => open_any(seal, stream, at, untimed)?,
    };
    if !id.as_deref().is_some_and(|id| seen.first(id)) {
        return Ok(Vec::new());
    }
    let waited = at.time_in_stream();
    Ok(opened
        .into_iter()
        .map(|(envelope, payload)| Arrived {
            envelope,
            payload,
            waited,
        })
        .collect())
}

/// How long ago JetStream stored `message` ([`Sealed::time_in_stream`]).
pub fn time_in_stream(message: &jetstream::Message) -> Duration {
    Sealed::of(message, None).time_in_stream()
}

/// Message ids already taken in, the latest [`SEEN`].
#[derive(Default)]
pub struct Seen {
    /// Oldest first, each with the number it was taken in under.
    order: VecDeque<(String, u64)>,
    /// The ids held, with that number (a forgotten one taken in again has a new one).
    ids: HashMap<String, u64>,
    next: u64,
}

impl Seen {
    /// `true` the first time `id` is seen.
    pub fn first(&mut self, id: &str) -> bool {
        if self.ids.contains_key(id) {
            return false;
        }
        if self.order.len() >= SEEN {
            if let Some((old, n)) = self.order.pop_front() {
                if self.ids.get(&old) == Some(&n) {
                    self.ids.remove(&old);
                }
            }
        }
        self.next += 1;
        self.order.push_back((id.to_string(), self.next));
        self.ids.insert(id.to_string(), self.next);
        true
    }

    /// `id` was given back to JetStream: its redelivery is taken in again. (Its place
    /// in the order stays until it comes round, and then drops nothing.)
    pub fn forget(&mut self, id: &str) {
        self.ids.remove(id);
    }
}

/// The stream, created as nats-server 2.9 accepts it (limits retention, file storage),
/// with the configured copies, max age and size.
pub async fn ensure_stream(
    js: &jetstream::Context,
    prefix: &str,
    keeping: &Keeping,
) -> Result<(), String> {
    let name = stream_name(prefix);
    let config = jetstream::stream::Config {
        subjects: vec![format!("{name}.>")],
        name: name.clone(),
        retention: jetstream::stream::RetentionPolicy::Limits,
        storage: jetstream::stream::StorageType::File,
        max_age: keeping.transfer_max_age,
        max_bytes: keeping.transfer_max_bytes,
        duplicate_window: DUPLICATE_WINDOW,
        discard: jetstream::stream::DiscardPolicy::Old,
        num_replicas: keeping.replicas,
        ..Default::default()
    };
    // Another node may create it meanwhile: the same config is no error.
    let stream = js
        .get_or_create_stream(config)
        .await
        .map_err(|e| format!("stream {name}: {e}"))?;
    let found = stream.cached_info().config.num_replicas;
    check_replicas(&name, found, keeping.replicas);
    Ok(())
}

/// The durable consumer of `node` on the stream, from the messages published after
/// its creation on; removed by the server after the stream's max age without this node.
pub async fn consumer(
    js: &jetstream::Context,
    prefix: &str,
    node: &str,
    keeping: &Keeping,
) -> Result<jetstream::consumer::PullConsumer, String> {
    let consumer = Durable {
        name: node.to_string(),
        ack_wait: Duration::from_secs(30),
        max_ack_pending: 65_536,
        inactive: keeping.transfer_max_age,
    };
    consumer.get_or_create(js, prefix, keeping).await
}

/// How long a shared group's consumer waits for an acknowledgement before handing the
/// message to another node: a node that pulled it and died.
const GROUP_ACK_WAIT: Duration = Duration::from_secs(10);
/// A shared group's consumer is removed this long after its last pull (no node has
/// members of the group).
const GROUP_INACTIVE: Duration = Duration::from_secs(60);

/// The durable consumer of shared group `gid` (a keyed hash: docs/cluster.md), pulled
/// by every node with members of the group, from the messages published after its
/// creation on.
pub async fn group_consumer(
    js: &jetstream::Context,
    prefix: &str,
    gid: &str,
    keeping: &Keeping,
) -> Result<jetstream::consumer::PullConsumer, String> {
    let consumer = Durable {
        name: format!("share_{gid}"),
        ack_wait: GROUP_ACK_WAIT,
        max_ack_pending: 4096,
        inactive: GROUP_INACTIVE,
    };
    consumer.get_or_create(js, prefix, keeping).await
}

/// A durable pull consumer of the stream: new messages only, explicit acknowledgements.
struct Durable {
    name: String,
    ack_wait: Duration,
    max_ack_pending: i64,
    /// Removed by the server this long after its last pull.
    inactive: Duration,
}

impl Durable {
    /// The consumer, and the stream first when it is missing.
    async fn get_or_create(
        self,
        js: &jetstream::Context,
        prefix: &str,
        keeping: &Keeping,
    ) -> Result<jetstream::consumer::PullConsumer, String> {
        ensure_stream(js, prefix, keeping).await?;
        let stream_name = stream_name(prefix);
        let stream = js
            .get_stream(&stream_name)
            .await
            .map_err(|e| format!("stream {stream_name}: {e}"))?;
        let config = jetstream::consumer::pull::Config {
            durable_name: Some(self.name.clone()),
            deliver_policy: jetstream::consumer::DeliverPolicy::New,
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: self.ack_wait,
            max_ack_pending: self.max_ack_pending,
            inactive_threshold: self.inactive,
            ..Default::default()
        };
        stream
            .get_or_create_consumer(&self.name, config)
            .await
            .map_err(|e| format!("consumer {} on {stream_name}: {e}", self.name))
    }
}

/// Where a stream message's id places it: `<node>:<epoch>` and the number of its first
/// message, from `<node>:<epoch>:<number>`, or `<node>:<epoch>:<number>~<random>` for
/// one its node stored again under a new id ([`Output::store_again`]).
pub fn place_of(id: &str) -> Option<(&str, u64)> {
    let base = id.split('~').next()?;
    let (origin, number) = base.rsplit_once(':')?;
    Some((origin, number.parse().ok()?))
}

/// The `Nats-Msg-Id` of a message read from the stream.
pub fn message_id(message: &jetstream::Message) -> Option<String> {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
        .map(|v| v.as_str().to_string())
}

/// Numbers forwarded messages in admit order and tells how far JetStream has
/// acknowledged them.
pub type Sequencer = super::sequencer::Sequencer<Outgoing>;

/// A message on its way to NATS: plaintext on its live subject, sealed in the stream.
pub struct Outgoing {
    pub seq: u64,
    /// Its live subject and headers; `None` for a NATS-native message (on it already).
    pub live: Option<(String, async_nats::HeaderMap)>,
    pub payload: Bytes,
    pub envelope: Envelope,
    /// When it was queued, if it has an MQTT 5 message expiry interval: the time it
    /// waits here for NATS counts ([`Envelope::held_ms`]).
    pub expiring_since: Option<Instant>,
}

/// A message of a batch after its first, encoded when it was gathered; one with an
/// expiry interval is encoded at each sealing instead, with how long it had waited.
enum Gathered {
    Encoded(zeroize::Zeroizing<Vec<u8>>),
    Expiring(Envelope, Bytes, Instant),
}

/// One published stream message (one MQTT message, or a batch of them) waiting for its
/// acknowledgement.
struct Pending {
    /// The number of its last message.
    last: u64,
    /// How many messages it holds.
    count: usize,
    /// `<node>:<epoch>:<number of its first message>`, then `~<random>` once it was
    /// stored again under a new id ([`Output::store_again`]).
    msg_id: String,
    /// Sent again after a failed acknowledgement: the stream may hold an earlier copy.
    resent: bool,
    /// When it was first sealed.
    since: Instant,
    /// Its first message, encoded with the time at each sealing ([`Output::seal_now`]:
    /// sealed again, with a new time, when it is sent again), and since when it
    /// waits if it expires.
    first: (Envelope, Bytes, Option<Instant>),
    /// The rest of a batch's messages.
    rest: Vec<Gathered>,
    /// `None`: it could not be sealed or sent (counted); it is not waited for.
    sealed: Option<Bytes>,
    batch: bool,
}

/// What a batch leaves of the server's `max_payload` for its messages: the seal,
/// the headers and the protocol line.
const BATCH_OVERHEAD: usize = 512;
/// What the time adds to a first message (`,"sealed":` and 13 digits, until 2286).
const SEALED_FIELD: usize = 24;
/// What the wait adds to an expiring message (`,"held_ms":` and 20 digits at most).
const HELD_FIELD: usize = 31;

/// The output task's state.
pub struct Output {
    client: async_nats::Client,
    js: jetstream::Context,
    seal: Arc<ClusterSeal>,
    prefix: String,
    keeping: Keeping,
    stream: String,
    subject: String,
    id_prefix: String,
    metrics: Weak<Metrics>,
    acked: super::sequencer::Done,
    pending: VecDeque<Pending>,
    /// Messages in `pending`.
    in_flight: usize,
    /// Taken from the queue for a batch it did not fit in: the next batch's first.
    carry: Option<Outgoing>,
    /// The NATS server's `max_payload` (`Cluster::max_payload`).
    max_payload: Arc<AtomicUsize>,
    acks: FuturesOrdered<Ack>,
}

/// What JetStream answered for a stream message: whether it held one with the same id
/// already (a copy sent before), and the stream sequence of the one it holds.
struct Stored {
    duplicate: bool,
    sequence: u64,
}

/// A stream message's acknowledgement to come.
type Ack = BoxFuture<'static, Result<Stored, String>>;

/// [`Output::stored_copy_taken`].
async fn stored_copy_taken(
    js: jetstream::Context,
    seal: Arc<ClusterSeal>,
    stream_name: String,
    sequence: u64,
) -> bool {
    let read = async {
        let stream = js
            .get_stream_no_info(&stream_name)
            .await
            .map_err(|e| e.to_string())?;
        stream
            .get_raw_message(sequence)
            .await
            .map_err(|e| e.to_string())
    };
    let raw = match read.await {
        Ok(raw) => raw,
        Err(e) => {
            tracing::debug!("cluster: transfer stream: copy {sequence} not read: {e}");
            return false;
        }
    };
    let id = raw
        .headers
        .get(async_nats::header::NATS_MESSAGE_ID)
        .map(|v| v.as_str());
    let at = Sealed {
        subject: raw.subject.as_str(),
        msg_id: id,
        batch: raw.headers.get(BATCH).is_some(),
        value: &raw.payload,
        stored_ns: Some(raw.time.unix_timestamp_nanos()),
    };
    origin(&stream_name, at.subject)
        .and_then(|node| open_from(&seal, &stream_name, node, at))
        .and_then(|opened| fresh(opened, at, Untimed::Refuse))
        .is_ok()
}

/// The acknowledgement of a message that was not sent (it could not be sealed or sent:
/// counted, not waited for).
fn not_sent() -> Ack {
    Box::pin(async {
        Ok(Stored {
            duplicate: false,
            sequence: 0,
        })
    })
}

/// The sequencer `Cluster::forward` uses, the `<node>:<epoch>` prefix of this
/// process's message ids, and the task that publishes its messages.
pub fn output(
    client: async_nats::Client,
    seal: Arc<ClusterSeal>,
    prefix: &str,
    node: &str,
    keeping: Keeping,
    metrics: Weak<Metrics>,
    max_payload: Arc<AtomicUsize>,
) -> (Sequencer, String, Output, mpsc::Receiver<Outgoing>) {
    let (sequencer, acked, rx) = super::sequencer::sequencer(keeping.forward_queue);
    // A restarted node numbers from 1 again: the epoch keeps its ids new.
    let epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    let js = jetstream::ContextBuilder::new()
        .ack_timeout(ACK_TIMEOUT)
        .build(client.clone());
    let stream = stream_name(prefix);
    let id_prefix = format!("{node}:{epoch}");
    let output = Output {
        client,
        js,
        seal,
        prefix: prefix.to_string(),
        keeping,
        subject: format!("{stream}.{node}"),
        stream,
        id_prefix: id_prefix.clone(),
        metrics,
        acked,
        pending: VecDeque::new(),
        in_flight: 0,
        carry: None,
        max_payload,
        acks: FuturesOrdered::new(),
    };
    (sequencer, id_prefix, output, rx)
}

impl Output {
    /// Publishes until the broker drops the sequencer.
    pub async fn run(mut self, mut queue: mpsc::Receiver<Outgoing>) {
        if let Err(e) = ensure_stream(&self.js, &self.prefix, &self.keeping).await {
            tracing::debug!("cluster: {e}; created on the next attempt");
        }
        loop {
            if self.in_flight < WINDOW {
                if let Some(first) = self.carry.take() {
                    self.send(first, &mut queue).await;
                    continue;
                }
            }
            tokio::select! {
                out = queue.recv(), if self.in_flight < WINDOW => match out {
                    Some(first) => self.send(first, &mut queue).await,
                    None => return,
                },
                Some(acked) = self.acks.next(), if !self.acks.is_empty() => match acked {
                    Ok(stored) => {
                        // The stream holds a message of this id already. Sent again,
                        // the copy sent before is taken unless it may have been stored
                        // later than the replay slack after its sealing (half of it:
                        // room for the clocks of the node and NATS). Sent once, it is
                        // someone else's (ids are never reused): it does not open.
                        let suspect = self.pending.front().is_some_and(|p| {
                            !p.resent || p.since.elapsed() > super::replay::slack() / 2
                        });
                        if stored.duplicate
                            && suspect
                            && !self.stored_copy_taken(stored.sequence).await
                            && !self.store_again().await
                        {
                            self.resend().await;
                            continue;
                        }
                        if let Some(done) = self.pending.pop_front() {
                            self.in_flight -= done.count;
                            self.acked.send_replace(done.last);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(
                            unacknowledged = self.in_flight,
                            "cluster: transfer stream: {e}; sending again"
                        );
                        self.resend().await;
                    }
                },
            }
        }
    }

    /// Publishes `first` and what else is queued now, up to `[cluster] transfer_batch`
    /// messages and the server's `max_payload` (never waiting for more), each on its
    /// live subject (core NATS, once) and together, sealed, as one message of the
    /// stream with the first one's number in its id.
    async fn send(&mut self, first: Outgoing, queue: &mut mpsc::Receiver<Outgoing>) {
        // Not handed to the NATS client while NATS is away: it would keep the message
        // and send it once back, sealed now, maybe too late for the nodes to take it
        // (the replay slack); sealed when it goes, its wait here counts against its
        // expiry instead ([`Envelope::held_ms`]).
        while self.client.connection_state() != async_nats::connection::State::Connected {
            tokio::time::sleep(RETRY).await;
        }
        let msg_id = format!("{}:{}", self.id_prefix, first.seq);
        let batch = self.keeping.transfer_batch > 1;
        self.live(&first).await;
        let (rest, last) = if batch {
            self.gather(&first, queue).await
        } else {
            (Vec::new(), first.seq)
        };
        let count = 1 + rest.len();
        let mut pending = Pending {
            last,
            count,
            msg_id,
            resent: false,
            since: Instant::now(),
            first: (first.envelope, first.payload, first.expiring_since),
            rest,
            sealed: None,
            batch,
        };
        let ack = self.publish(&mut pending).await;
        self.in_flight += count;
        self.pending.push_back(pending);
        self.acks.push_back(ack);
    }

    /// `p` sealed now: its first message carries the time (a replay is refused by it).
    fn seal_now(&self, p: &mut Pending) -> Option<Bytes> {
        let (envelope, payload, since) = &mut p.first;
        envelope.sealed = Some(now_ms());
        envelope.held_ms = since.map(held_ms);
        let first = zeroize::Zeroizing::new(encode(envelope, payload));
        let sealed = if p.batch {
            let mut batch = Batch::new();
            batch.push(&first);
            for message in &mut p.rest {
                match message {
                    Gathered::Encoded(m) => batch.push(m),
                    Gathered::Expiring(envelope, payload, since) => {
                        envelope.held_ms = Some(held_ms(*since));
                        batch.push(&zeroize::Zeroizing::new(encode(envelope, payload)));
                    }
                }
            }
            self.seal
                .seal_transfer_batch(&self.stream, &p.msg_id, batch.plain())
        } else {
            self.seal.seal_transfer(&self.stream, &p.msg_id, &first)
        };
        match sealed {
            Ok(v) => Some(Bytes::from(v)),
            Err(e) => {
                tracing::warn!("cluster: transfer message not sealed: {e}");
                self.dropped();
                None
            }
        }
    }

    /// What follows `first` in the queue now, for one batch with it, each encoded, and
    /// the number of the batch's last message; a message that would take the batch
    /// past `max_payload` is kept for the next one.
    async fn gather(
        &mut self,
        first: &Outgoing,
        queue: &mut mpsc::Receiver<Outgoing>,
    ) -> (Vec<Gathered>, u64) {
        let room = self
            .max_payload
            .load(Ordering::Relaxed)
            .saturating_sub(BATCH_OVERHEAD);
        let most = self.keeping.transfer_batch;
        let mut rest = Vec::new();
        let mut last = first.seq;
        // The batch's plaintext so far, as `Batch` will hold it: the count, then each
        // message with its length; the first always goes (`Cluster::fits` let it in
        // alone), with its time. Worked out only once a second message comes.
        let mut len = 0;
        while rest.len() + 1 < most {
            let Ok(out) = queue.try_recv() else { break };
            if len == 0 {
                len = 4 + 4 + encode(&first.envelope, &first.payload).len() + SEALED_FIELD;
                if first.expiring_since.is_some() {
                    len += HELD_FIELD;
                }
            }
            let message = zeroize::Zeroizing::new(encode(&out.envelope, &out.payload));
            let size = match out.expiring_since {
                Some(_) => message.len() + HELD_FIELD,
                None => message.len(),
            };
            if len + 4 + size > room {
                self.carry = Some(out);
                break;
            }
            self.live(&out).await;
            len += 4 + size;
            last = out.seq;
            rest.push(match out.expiring_since {
                Some(since) => Gathered::Expiring(out.envelope, out.payload, since),
                None => Gathered::Encoded(message),
            });
        }
        (rest, last)
    }

    /// Publishes `out` on its live subject (core NATS, at most once), if it has one;
    /// one that waited here has its expiry interval counted down, and is not published
    /// once it ran out.
    async fn live(&mut self, out: &Outgoing) {
        if let Some((subject, headers)) = &out.live {
            let Some(headers) = live_headers(headers, out.expiring_since) else {
                return;
            };
            if let Err(e) = self
                .client
                .publish_with_headers(subject.clone(), headers, out.payload.clone())
                .await
            {
                tracing::debug!("cluster: publish to NATS failed: {e}");
            }
        }
    }

    /// Whether the nodes take the copy of the first unacknowledged message that the
    /// stream holds at `sequence` under its id (the one sent was a duplicate). Not if
    /// JetStream stored it longer after its sealing than the replay slack
    /// (`replay.rs`): it waited through an outage in the NATS client or on a stalled
    /// network path, and every node refuses it as a replay; nor if it does not open
    /// (someone with access to the stream stored a message under the id first). Not
    /// known (the stream cannot be read now) counts as not taken.
    fn stored_copy_taken(&self, sequence: u64) -> impl std::future::Future<Output = bool> {
        // Not `self` across the reads: the output's futures are not `Sync`.
        stored_copy_taken(
            self.js.clone(),
            Arc::clone(&self.seal),
            self.stream.clone(),
            sequence,
        )
    }

    /// Stores the first unacknowledged message again, sealed now, under a new id (its
    /// own with `~<random>`: the stream would drop it as a duplicate under the old
    /// one), and waits until JetStream has it; `false` if it did not take it.
    async fn store_again(&mut self) -> bool {
        let Some(mut p) = self.pending.pop_front() else {
            return true;
        };
        let base = p.msg_id.split('~').next().unwrap_or_default().to_string();
        let mut stored = Err(String::new());
        // A random id each time, so that whoever took the old one cannot take the new
        // one first too (a duplicate again is tried again, a few times).
        for _ in 0..3 {
            p.msg_id = format!("{base}~{:016x}", rand::random::<u64>());
            tracing::warn!(
                id = p.msg_id.as_str(),
                "cluster: the transfer stream holds a copy of a message that the nodes \
                 do not take (stored too late, NATS out of reach meanwhile, or not this \
                 node's); storing it again"
            );
            stored = self.publish(&mut p).await.await;
            if !matches!(
                stored,
                Ok(Stored {
                    duplicate: true,
                    ..
                })
            ) {
                break;
            }
        }
        self.pending.push_front(p);
        match stored {
            Ok(Stored {
                duplicate: false, ..
            }) => true,
            Ok(_) => {
                tracing::error!("cluster: transfer stream: every new id was taken first");
                false
            }
            Err(e) => {
                tracing::warn!("cluster: transfer stream: {e}; sending again");
                false
            }
        }
    }

    /// Sends one message to the stream; its acknowledgement as a future.
    async fn publish(&mut self, p: &mut Pending) -> Ack {
        p.sealed = self.seal_now(p);
        let Some(sealed) = p.sealed.clone() else {
            return not_sent();
        };
        let mut message = PublishMessage::build()
            .message_id(&p.msg_id)
            .payload(sealed);
        if p.batch {
            message = message.header(BATCH, p.count.to_string().as_str());
        }
        match self.js.send_publish(self.subject.clone(), message).await {
            Ok(ack) => Box::pin(async move {
                ack.await
                    .map(|a| Stored {
                        duplicate: a.duplicate,
                        sequence: a.sequence,
                    })
                    .map_err(|e| e.to_string())
            }),
            Err(e) => {
                // Refused by the client itself (over the server's max_payload) or the
                // client is gone: sending again would not help.
                tracing::warn!("cluster: transfer message not sent: {e}");
                self.dropped();
                p.sealed = None;
                not_sent()
            }
        }
    }

    /// Every unacknowledged stream message again (the same ids: the stream drops what
    /// it has; sealed again with the time now), in order, once NATS is back.
    async fn resend(&mut self) {
        self.acks = FuturesOrdered::new();
        tokio::time::sleep(RETRY).await;
        while self.client.connection_state() != async_nats::connection::State::Connected {
            tokio::time::sleep(RETRY).await;
        }
        if let Err(e) = ensure_stream(&self.js, &self.prefix, &self.keeping).await {
            tracing::debug!("cluster: {e}");
        }
        let mut pending = std::mem::take(&mut self.pending);
        for p in pending.iter_mut() {
            let ack = match p.sealed {
                Some(_) => {
                    p.resent = true;
                    self.publish(p).await
                }
                // It could not be sealed or sent before: not sent again (counted).
                None => not_sent(),
            };
            self.acks.push_back(ack);
        }
        self.pending = pending;
    }

    fn dropped(&self) {
        if let Some(m) = self.metrics.upgrade() {
            m.cluster_dropped.inc();
        }
    }
}

/// The headers of a live copy that has waited here since `since` (if it expires): its
/// `Moatmq-Properties` with the expiry interval counted down once it waited a second
/// or more; `None` once it ran out.
fn live_headers(
    headers: &async_nats::HeaderMap,
    since: Option<Instant>,
) -> Option<async_nats::HeaderMap> {
    let held = since.map_or(Duration::ZERO, |s| s.elapsed());
    if held < Duration::from_secs(1) {
        return Some(headers.clone());
    }
    let Some(json) = headers.get(super::PROPERTIES) else {
        return Some(headers.clone());
    };
    let Ok(Some(props)) = counted_down(Some(json.as_str()), held) else {
        return None;
    };
    let mut headers = headers.clone();
    if let Some(json) = super::properties::encode(&props) {
        headers.insert(super::PROPERTIES, json.as_str());
    }
    Some(headers)
}

/// The MQTT 5 properties of a transfer message `in_stream` after JetStream stored it:
/// the message expiry interval counts down by the time it spent in the stream and
/// waited on its node before ([`Envelope::waited`]; whole seconds left, rounded up, as
/// a retained copy's does). `Err` if it ran out: the message is not delivered.
pub fn properties_now(
    envelope: &Envelope,
    in_stream: Duration,
) -> Result<Option<rumqttd::protocol::PublishProperties>, Expired> {
    counted_down(envelope.properties.as_deref(), envelope.waited(in_stream))
}

/// `Moatmq-Properties` JSON as it is `waited` after the message was admitted.
fn counted_down(
    json: Option<&str>,
    waited: Duration,
) -> Result<Option<rumqttd::protocol::PublishProperties>, Expired> {
    let Some(mut props) = json.and_then(super::properties::decode) else {
        return Ok(None);
    };
    if let Some(interval) = props.message_expiry_interval {
        props.message_expiry_interval =
            Some(crate::inbound::expiry_left(interval, waited).ok_or(Expired)?);
    }
    Ok(Some(props))
}

/// A message whose expiry interval ran out before it was taken in.
#[derive(Debug)]
pub struct Expired;

/// The QoS a transfer message names.
pub fn qos_of(n: u8) -> rumqttd::protocol::QoS {
    use rumqttd::protocol::QoS;
    match n {
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        _ => QoS::AtMostOnce,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope() -> Envelope {
        Envelope {
            topic: "a/b".into(),
            qos: 1,
            retain: true,
            user: Some("alice".into()),
            client: "c1".into(),
            properties: Some("{\"content_type\":\"x\"}".into()),
            sealed: Some(SEALED),
            held_ms: None,
        }
    }

    /// When the test messages were sealed, and stored (half a second later).
    const SEALED: u64 = 1_765_000_000_000;
    const STORED: i128 = SEALED as i128 + 500;

    #[test]
    fn seen_ids_are_taken_once_until_forgotten_and_the_oldest_go_first() {
        let mut seen = Seen::default();
        assert!(seen.first("n:1:1"));
        assert!(!seen.first("n:1:1"), "a redelivery");
        seen.forget("n:1:1");
        assert!(seen.first("n:1:1"), "given back, taken in again");
        assert!(!seen.first("n:1:1"));
        // The first entry of the id comes round first: it does not drop the second.
        for i in 0..SEEN - 2 {
            assert!(seen.first(&format!("m:{i}")));
        }
        assert!(seen.first("x"));
        assert!(!seen.first("n:1:1"), "still held under its second number");
        assert!(seen.first("y"));
        assert!(
            seen.first("n:1:1"),
            "its second number came round: forgotten"
        );
        assert!(seen.order.len() <= SEEN && seen.ids.len() <= SEEN);
    }

    #[test]
    fn envelopes_round_trip_and_malformed_ones_are_refused() {
        let plain = encode(&envelope(), b"payload");
        assert_eq!(decode(&plain), Some((envelope(), &b"payload"[..])));
        assert_eq!(decode(&plain[..3]), None);
        assert_eq!(decode(&[0xff, 0xff, 0xff, 0xff, b'{']), None);
        assert_eq!(decode(&[0, 0, 0, 2, b'{', b'}']), None, "fields missing");
    }

    fn sealed<'a>(subject: &'a str, msg_id: Option<&'a str>, value: &'a [u8]) -> Sealed<'a> {
        Sealed {
            subject,
            msg_id,
            batch: false,
            value,
            stored_ns: Some(STORED * 1_000_000),
        }
    }

    #[test]
    fn messages_open_only_from_the_node_their_subject_names() {
        let key = moatmq_store::RetainedKey::from_hex(&"01".repeat(32)).unwrap();
        let seal = ClusterSeal::new(&key);
        let plain = encode(&envelope(), b"p");
        let value = seal.seal_transfer("m_xfer", "a:1:1", &plain).unwrap();
        let at = sealed("m_xfer.a", Some("a:1:1"), &value);
        let opened = open(&seal, "m_xfer", "b", at, Untimed::Refuse);
        assert_eq!(opened, Ok(vec![(envelope(), Bytes::from_static(b"p"))]));
        assert_eq!(
            open(&seal, "m_xfer", "a", at, Untimed::Refuse),
            Err(Rejected::Own)
        );
        for (subject, id) in [
            ("m_xfer.c", Some("a:1:1")),
            ("m_xfer.a", Some("a:1:2")),
            ("m_xfer.a", None),
            ("other.a", Some("a:1:1")),
        ] {
            assert!(
                matches!(
                    open(
                        &seal,
                        "m_xfer",
                        "b",
                        sealed(subject, id, &value),
                        Untimed::Refuse
                    ),
                    Err(Rejected::Refused(_))
                ),
                "{subject} {id:?}"
            );
        }
        // Named a batch, a single message does not open.
        let as_batch = Sealed { batch: true, ..at };
        assert!(matches!(
            open(&seal, "m_xfer", "b", as_batch, Untimed::Refuse),
            Err(Rejected::Refused(_))
        ));
    }

    #[test]
    fn a_group_consumer_opens_its_own_nodes_messages_with_the_same_checks() {
        let key = moatmq_store::RetainedKey::from_hex(&"01".repeat(32)).unwrap();
        let seal = ClusterSeal::new(&key);
        let value = seal
            .seal_transfer("m_xfer", "a:1:1", &encode(&envelope(), b"p"))
            .unwrap();
        let at = sealed("m_xfer.a", Some("a:1:1"), &value);
        let opened = open_any(&seal, "m_xfer", at, Untimed::Refuse);
        assert_eq!(opened, Ok(vec![(envelope(), Bytes::from_static(b"p"))]));
        for (subject, id) in [("m_xfer.c", Some("a:1:1")), ("m_xfer.a", None)] {
            assert!(matches!(
                open_any(
                    &seal,
                    "m_xfer",
                    sealed(subject, id, &value),
                    Untimed::Refuse
                ),
                Err(Rejected::Refused(_))
            ));
        }
    }

    #[test]
    fn batches_open_into_their_messages_in_order_and_only_as_batches() {
        let key = moatmq_store::RetainedKey::from_hex(&"01".repeat(32)).unwrap();
        let seal = ClusterSeal::new(&key);
        let mut batch = Batch::new();
        let second = Envelope {
            topic: "c".into(),
            properties: None,
            ..envelope()
        };
        batch.push(&encode(&envelope(), b"one"));
        batch.push(&encode(&second, b""));
        batch.push(&encode(&envelope(), b"three"));
        assert_eq!(batch.count(), 3);
        let value = seal
            .seal_transfer_batch("m_xfer", "a:1:5", batch.plain())
            .unwrap();
        let at = Sealed {
            batch: true,
            ..sealed("m_xfer.a", Some("a:1:5"), &value)
        };
        assert_eq!(
            open(&seal, "m_xfer", "b", at, Untimed::Refuse),
            Ok(vec![
                (envelope(), Bytes::from_static(b"one")),
                (second, Bytes::new()),
                (envelope(), Bytes::from_static(b"three")),
            ])
        );
        assert_eq!(
            open(&seal, "m_xfer", "a", at, Untimed::Refuse),
            Err(Rejected::Own)
        );
        // Not named a batch (what a node before batching does), it does not open.
        let single = Sealed { batch: false, ..at };
        assert!(matches!(
            open(&seal, "m_xfer", "b", single, Untimed::Refuse),
            Err(Rejected::Refused(_))
        ));
    }

    #[test]
    fn a_message_stored_long_after_it_was_sealed_is_refused_as_a_replay() {
        let key = moatmq_store::RetainedKey::from_hex(&"01".repeat(32)).unwrap();
        let seal = ClusterSeal::new(&key);
        let value = seal
            .seal_transfer("m_xfer", "a:1:1", &encode(&envelope(), b"p"))
            .unwrap();
        let at = |stored_ms: Option<i128>| Sealed {
            stored_ns: stored_ms.map(|ms| ms * 1_000_000),
            ..sealed("m_xfer.a", Some("a:1:1"), &value)
        };
        let slack = super::super::replay::REPLAY_SLACK.as_millis() as i128;
        let opens = |stored_ms| open(&seal, "m_xfer", "b", at(stored_ms), Untimed::Refuse).is_ok();
        assert!(opens(Some(STORED)));
        assert!(opens(Some(SEALED as i128 + slack)), "at the slack");
        assert!(
            opens(Some(SEALED as i128 - 5_000)),
            "the node's clock ahead"
        );
        let late = |stored_ms| {
            matches!(
                open(&seal, "m_xfer", "b", at(stored_ms), Untimed::Refuse),
                Err(Rejected::Late(_))
            )
        };
        assert!(
            late(Some(SEALED as i128 + slack + 1)),
            "stored after the slack"
        );
        assert!(
            late(Some(SEALED as i128 + DUPLICATE_WINDOW.as_millis() as i128)),
            "a replay past the stream's duplicate window"
        );
        assert!(
            matches!(
                open(&seal, "m_xfer", "b", at(None), Untimed::Refuse),
                Err(Rejected::Refused(_))
            ),
            "no time JetStream stored it"
        );

        // A batch is as fresh as its first message's time.
        let mut batch = Batch::new();
        batch.push(&encode(&envelope(), b"one"));
        batch.push(&encode(
            &Envelope {
                sealed: None,
                ..envelope()
            },
            b"two",
        ));
        let value = seal
            .seal_transfer_batch("m_xfer", "a:1:5", batch.plain())
            .unwrap();
        let at = |stored_ms: Option<i128>| Sealed {
            batch: true,
            stored_ns: stored_ms.map(|ms| ms * 1_000_000),
            ..sealed("m_xfer.a", Some("a:1:5"), &value)
        };
        let batch_opens =
            |stored_ms| open(&seal, "m_xfer", "b", at(stored_ms), Untimed::Refuse).is_ok();
        assert!(batch_opens(Some(STORED)));
        assert!(!batch_opens(Some(SEALED as i128 + slack + 1)));
    }

    #[test]
    fn untimed_messages_open_only_when_the_cluster_accepts_them() {
        let key = moatmq_store::RetainedKey::from_hex(&"01".repeat(32)).unwrap();
        let seal = ClusterSeal::new(&key);
        let untimed = Envelope {
            sealed: None,
            ..envelope()
        };
        let plain = encode(&untimed, b"p");
        // As a release before the time wrote it: no field at all.
        assert!(!String::from_utf8_lossy(&plain).contains("sealed"));
        let value = seal.seal_transfer("m_xfer", "a:1:1", &plain).unwrap();
        let at = sealed("m_xfer.a", Some("a:1:1"), &value);
        assert!(matches!(
            open(&seal, "m_xfer", "b", at, Untimed::Refuse),
            Err(Rejected::Refused(_))
        ));
        assert_eq!(
            open(&seal, "m_xfer", "b", at, Untimed::Accept),
            Ok(vec![(untimed, Bytes::from_static(b"p"))])
        );
        // A timed message is checked either way.
        let value = seal
            .seal_transfer("m_xfer", "a:1:2", &encode(&envelope(), b"p"))
            .unwrap();
        let late = Sealed {
            stored_ns: Some((STORED + DUPLICATE_WINDOW.as_millis() as i128) * 1_000_000),
            ..sealed("m_xfer.a", Some("a:1:2"), &value)
        };
        assert!(open(&seal, "m_xfer", "b", late, Untimed::Accept).is_err());
    }

    #[test]
    fn malformed_batches_are_refused() {
        let mut batch = Batch::new();
        batch.push(&encode(&envelope(), b"one"));
        batch.push(&encode(&envelope(), b"two"));
        let plain = batch.plain().to_vec();
        assert_eq!(decode_batch(&plain).map(|m| m.len()), Some(2));
        assert_eq!(decode_batch(&plain[..plain.len() - 1]), None, "cut short");
        let mut longer = plain.clone();
        longer.push(0);
        assert_eq!(decode_batch(&longer), None, "bytes after the last");
        let mut miscounted = plain.clone();
        miscounted[3] = 3;
        assert_eq!(decode_batch(&miscounted), None, "count past the end");
        miscounted[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(decode_batch(&miscounted), None, "huge count");
        let mut overlong = plain.clone();
        overlong[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(decode_batch(&overlong), None, "length past the end");
        assert_eq!(decode_batch(&[]), None);
        assert_eq!(decode_batch(&[0, 0, 0, 0]), Some(vec![]));
    }

    #[test]
    fn the_expiry_interval_counts_down_by_the_wait_on_the_node_too() {
        let ms = Duration::from_millis;
        let expiring = |held_ms| Envelope {
            properties: Some("{\"message_expiry\":60}".into()),
            held_ms,
            ..envelope()
        };
        let left = |e: &Envelope, in_stream| {
            properties_now(e, in_stream)
                .ok()
                .map(|p| p.and_then(|p| p.message_expiry_interval))
        };
        assert_eq!(left(&expiring(None), ms(3_000)), Some(Some(57)));
        assert_eq!(left(&expiring(Some(10_000)), ms(3_000)), Some(Some(47)));
        assert_eq!(left(&expiring(Some(58_000)), ms(2_500)), None, "ran out");
        // A release before `held_ms` reads the envelope as before (unknown fields are
        // ignored), and one without it reads as no wait.
        let json = serde_json::to_string(&expiring(Some(1_234))).unwrap();
        assert!(json.contains("\"held_ms\":1234"), "{json}");
        assert!(!serde_json::to_string(&envelope())
            .unwrap()
            .contains("held_ms"));
        let old: Envelope =
            serde_json::from_str("{\"topic\":\"a\",\"qos\":1,\"retain\":false,\"client\":\"c\"}")
                .unwrap();
        assert_eq!(old.waited(ms(5)), ms(5));
    }

    #[test]
    fn a_live_copy_that_waited_has_its_expiry_counted_down_or_is_not_sent() {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(super::super::PROPERTIES, "{\"message_expiry\":60}");
        let since = |secs| Some(Instant::now() - Duration::from_secs(secs));
        let expiry = |h: &async_nats::HeaderMap| {
            h.get(super::super::PROPERTIES)
                .and_then(|v| super::super::properties::decode(v.as_str()))
                .and_then(|p| p.message_expiry_interval)
        };
        let now = live_headers(&headers, None).expect("sent");
        assert_eq!(expiry(&now), Some(60));
        let waited = live_headers(&headers, since(5)).expect("sent");
        assert_eq!(expiry(&waited), Some(55));
        assert!(live_headers(&headers, since(61)).is_none(), "ran out");
    }

    #[test]
    fn a_message_stored_again_under_a_new_id_keeps_its_place() {
        assert_eq!(place_of("node-a:17:42"), Some(("node-a:17", 42)));
        assert_eq!(place_of("node-a:17:42~1"), Some(("node-a:17", 42)));
        assert_eq!(
            place_of("node-a:17:42~00ab12cd34ef5678"),
            Some(("node-a:17", 42))
        );
        assert_eq!(place_of("node-a:17:x"), None);
        assert_eq!(place_of("none"), None);
    }

    #[test]
    fn seen_ids_are_dropped_once_each() {
        let mut seen = Seen::default();
        assert!(seen.first("a:1:1"));
        assert!(!seen.first("a:1:1"));
        assert!(seen.first("a:1:2"));
    }
}
