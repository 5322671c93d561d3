//! Durable MQTT sessions: what a persistent session is made of, and the
//! [`SessionStore`] trait the broker keeps them behind. The embedded backend is
//! [`SessionLog`](crate::SessionLog) (an encrypted append-only log beside the retained
//! store), [`MemorySessions`](crate::MemorySessions) keeps them in memory only (no
//! store configured); a clustered one (NATS JetStream) implements the same trait later. Nothing here
//! is tied to a file or to one process: sessions are named by [`SessionKey`] (identity
//! and client id), messages by an id the store assigns per session.
//!
//! How it decides: every change is applied to memory at once and made durable by the
//! next [`SessionStore::commit`] (all changes since the last one, one fsync). A message is
//! refused (dropped, newest first) when its session already holds
//! `max_queued_messages` queued messages or `max_queued_bytes` of them; messages in
//! flight (sent, not yet acknowledged) do not count, as in Mosquitto.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::{HeldMessages, MessageProperties, StoreError};

/// Whose session it is: the identity (username or certificate CN; `None` for anonymous
/// clients) and the client id. Two identities with one client id are two sessions.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SessionKey {
    /// The identity the session belongs to.
    pub owner: Option<String>,
    /// The MQTT client id.
    pub client_id: String,
}

/// Options of one subscription, as the client asked for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SubscriptionOptions {
    /// Maximum QoS granted (0, 1, 2).
    pub qos: u8,
    /// MQTT 5 no-local.
    pub no_local: bool,
    /// MQTT 5 retain-as-published.
    pub retain_as_published: bool,
    /// MQTT 5 retain handling (0, 1, 2).
    pub retain_handling: u8,
    /// MQTT 5 subscription identifier.
    pub subscription_id: Option<u32>,
}

/// A session's own state (everything but its messages, will and QoS 2 exchanges).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SessionMeta {
    /// MQTT protocol level the client last connected with (4 = 3.1.1, 5 = MQTT 5).
    pub protocol: u8,
    /// Seconds the session is kept after a disconnect.
    pub expiry_interval: u64,
    /// When the client disconnected (unix seconds); `None` while it is connected.
    pub disconnected_at: Option<u64>,
    /// Subscriptions by filter.
    pub subscriptions: BTreeMap<String, SubscriptionOptions>,
}

/// A message held for a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedMessage {
    /// Topic it was published to.
    pub topic: String,
    /// Payload: shared, not copied, with the router's copy of the same message while
    /// the broker runs (serialized as one byte string, postcard's length and bytes).
    pub payload: Bytes,
    /// QoS it is delivered with (0, 1, 2).
    pub qos: u8,
    /// Retain flag as delivered.
    pub retain: bool,
    /// `Some` for MQTT 5 properties (boxed: most messages have none, and the store holds
    /// every queued message in memory).
    pub properties: Option<Box<MessageProperties>>,
    /// Absolute message expiry (unix seconds), if any: it keeps counting across restarts.
    pub expires_at: Option<u64>,
}

impl QueuedMessage {
    /// Bytes of topic and payload: what `max_queued_bytes` counts.
    pub fn queued_bytes(&self) -> u64 {
        QueuedMessage::queued_bytes_of(&self.topic, &self.payload)
    }

    /// [`QueuedMessage::queued_bytes`] of a message not built yet.
    pub fn queued_bytes_of(topic: &str, payload: &[u8]) -> u64 {
        (topic.len() + payload.len()) as u64
    }

    /// Whether it has expired at `now` (unix seconds).
    pub fn is_expired(&self, now: u64) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }
}

/// Where a held message is in its delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Delivery {
    /// Not sent yet.
    Queued,
    /// Sent with this packet id, not acknowledged: sent again with DUP on reconnect.
    Sent {
        /// The packet id it was sent with.
        pkid: u16,
    },
    /// QoS 2: PUBREC received, PUBREL sent with this packet id: PUBREL again on reconnect.
    Released {
        /// The packet id of the exchange.
        pkid: u16,
    },
}

/// A message held for a session and its delivery state.
#[derive(Debug, Clone)]
pub struct HeldMessage {
    /// The message.
    pub message: QueuedMessage,
    /// How far its delivery got.
    pub delivery: Delivery,
    /// Bytes its `Message` record takes in the log (0 without one): the store's
    /// bookkeeping for compaction, kept here so that queueing a message searches the
    /// session's messages once. Not part of what the message is (`==` ignores it).
    pub(crate) frame: u64,
}

impl PartialEq for HeldMessage {
    fn eq(&self, other: &Self) -> bool {
        self.message == other.message && self.delivery == other.delivery
    }
}

impl Eq for HeldMessage {}

/// A will waiting for its delay interval (MQTT 5 will delay).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingWill {
    /// The will message.
    pub message: QueuedMessage,
    /// When to publish it (unix seconds), unless the client comes back first.
    pub publish_at: u64,
}

/// One persistent session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Whose it is.
    pub key: SessionKey,
    /// Expiry, subscriptions, connection state.
    pub meta: SessionMeta,
    /// A will waiting for its delay.
    pub will: Option<PendingWill>,
    /// Held messages by id, oldest first (ids increase as messages are queued).
    pub messages: HeldMessages,
    /// Packet ids of incoming QoS 2 PUBLISHes admitted whose PUBREL has not come yet.
    pub qos2_in: BTreeSet<u16>,
}

impl SessionMeta {
    /// When the session expires (unix seconds); `None` while connected.
    pub fn expires_at(&self) -> Option<u64> {
        self.disconnected_at
            .map(|t| t.saturating_add(self.expiry_interval))
    }

    /// Whether its client has been away longer than its expiry interval at `now`.
    pub fn is_expired(&self, now: u64) -> bool {
        self.expires_at().is_some_and(|t| t <= now)
    }
}

impl Session {
    /// When the session expires (unix seconds); `None` while connected.
    pub fn expires_at(&self) -> Option<u64> {
        self.meta.expires_at()
    }

    /// Messages not sent yet.
    pub fn queued(&self) -> usize {
        self.messages
            .values()
            .filter(|m| m.delivery == Delivery::Queued)
            .count()
    }
}

/// Bounds on one session's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// Most messages queued (not in flight) per session: `limits.max_queued_messages`.
    pub max_queued_messages: usize,
    /// Most bytes of topics and payloads queued per session: `limits.max_queued_bytes`.
    pub max_queued_bytes: u64,
}

impl SessionLimits {
    /// No limits (offline tools).
    pub const UNLIMITED: SessionLimits = SessionLimits {
        max_queued_messages: usize::MAX,
        max_queued_bytes: u64::MAX,
    };
}

/// What [`SessionStore::enqueue`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// Held with this id.
    Queued(u64),
    /// Dropped: the session's queue is full (`max_queued_messages`).
    DroppedMessages,
    /// Dropped: the session's queue is full (`max_queued_bytes`).
    DroppedBytes,
}

/// What [`SessionStore::purge_expired`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Purged {
    /// Sessions whose expiry passed.
    pub sessions: Vec<SessionKey>,
    /// Queued (never sent) messages whose message expiry passed.
    pub messages: usize,
}

/// What one [`SessionStore::commit`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CommitStats {
    /// Records made durable.
    pub records: usize,
    /// Bytes written (the whole new file when the commit compacted).
    pub bytes: u64,
    /// Whether the commit rewrote the log (compaction).
    pub compacted: bool,
}

/// Totals over every kept session (for metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SessionStats {
    /// Sessions kept.
    pub sessions: usize,
    /// Messages held, queued and in flight.
    pub held_messages: usize,
    /// Messages queued, not sent yet (what `max_queued_messages` bounds per session).
    pub queued_messages: usize,
    /// Bytes of topics and payloads of the queued messages (what `max_queued_bytes`
    /// bounds per session).
    pub queued_bytes: u64,
}

/// Where persistent sessions are kept. Changes apply to memory at once and are durable
/// once [`commit`](SessionStore::commit) returns; a crash loses the uncommitted ones.
/// Calls naming a session that does not exist change nothing and return `false` (or
/// [`StoreError::UnknownSession`] for `enqueue`).
pub trait SessionStore: Send {
    /// The session of `key`, if kept.
    fn session(&self, key: &SessionKey) -> Option<&Session>;
    /// Every kept session, in no particular order.
    fn sessions(&self) -> Box<dyn Iterator<Item = &Session> + '_>;
    /// Creates the session of `key` or replaces its meta (subscriptions, expiry,
    /// connection state); its messages are kept. Returns whether it was created.
    fn put_session(&mut self, key: &SessionKey, meta: SessionMeta) -> Result<bool, StoreError>;
    /// Forgets the session with everything it holds (clean start, expiry).
    fn remove_session(&mut self, key: &SessionKey) -> Result<bool, StoreError>;
    /// Holds `message` for the session, unless its queue is full.
    fn enqueue(&mut self, key: &SessionKey, message: QueuedMessage)
        -> Result<Enqueued, StoreError>;
    /// Message `id` was written to the client with packet id `pkid`.
    fn mark_sent(&mut self, key: &SessionKey, id: u64, pkid: u16) -> Result<bool, StoreError>;
    /// QoS 2 message `id` got its PUBREC; PUBREL was sent.
    fn mark_released(&mut self, key: &SessionKey, id: u64) -> Result<bool, StoreError>;
    /// Message `id` is done (PUBACK, PUBCOMP, QoS 0 written, expired, refused by the ACL).
    fn complete(&mut self, key: &SessionKey, id: u64) -> Result<bool, StoreError>;
    /// An incoming QoS 2 PUBLISH with `pkid` was admitted; `false` if that pkid was
    /// already pending (a resend: do not admit it again).
    fn qos2_in(&mut self, key: &SessionKey, pkid: u16) -> Result<bool, StoreError>;
    /// The PUBREL for incoming `pkid` arrived.
    fn qos2_in_done(&mut self, key: &SessionKey, pkid: u16) -> Result<bool, StoreError>;
    /// Sets or clears the session's pending will.
    fn set_will(&mut self, key: &SessionKey, will: Option<PendingWill>)
        -> Result<bool, StoreError>;
    /// Removes sessions whose expiry passed at `now` and queued messages whose message
    /// expiry passed.
    fn purge_expired(&mut self, now: u64) -> Result<Purged, StoreError>;
    /// Makes every change so far durable.
    fn commit(&mut self) -> Result<CommitStats, StoreError>;
    /// Changes not yet committed.
    fn pending(&self) -> usize;
    /// Totals over every kept session.
    fn stats(&self) -> SessionStats;
}
