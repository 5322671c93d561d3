//! moatmq's encrypted retained-message store: an append-only log of AES-256-GCM sealed
//! records (`Set{message}` / `Clear{topic}`), one per changed topic per flush, so a save
//! costs what changed, not the store's size. The log is rewritten (compacted) into a new
//! file when it grows past about twice the live data.
//!
//! How it decides what to trust, on open:
//! - the header's key-check block must decrypt, else [`StoreError::WrongKey`];
//! - every record must authenticate with associated data binding it to this file's random
//!   id and to its sequence number, so an altered, swapped, replayed (from another file)
//!   or missing record is [`StoreError::WrongKeyOrTampered`] naming its index;
//! - a sealed high-water mark beside the log (`retained.log.hwm`, see `mark.rs`) names
//!   the log file that must be there and how many records it must hold at least: a log
//!   cut at a record boundary or to its header, with its last records zeroed, or put back
//!   from an older copy is [`StoreError::Truncated`] or [`StoreError::RolledBack`]; a
//!   missing mark is [`StoreError::MarkMissing`], a missing log [`StoreError::LogMissing`];
//! - only a frame past the mark that runs past end-of-file or is all zeros (a crash
//!   mid-append, never counted by the mark, which is written after the fsync) is "torn":
//!   it is cut away with a warning and everything before it is kept. Anything else is an
//!   error, so a store with records never comes back empty or shorter without an error
//!   or an operator's [`accept`]. What stays undetectable: the log and its mark rolled
//!   back or deleted together (a restored backup of the whole folder), and a version-1
//!   log from before the mark existed put back with the mark deleted.
//!
//! Topics, payloads and properties are all inside the ciphertext. The store is plain
//! synchronous code with no MQTT library types; the broker owns the thread it runs on.
//!
//! The same file format, checks and high-water mark keep durable MQTT sessions
//! ([`SessionLog`] behind the [`SessionStore`] trait, `sessions.log`; see
//! docs/sessions.md), with a magic and associated-data domains of their own so neither
//! kind of file or record ever opens as the other. [`MemorySessions`] is the same
//! session state machine without a file, for brokers without a store.
//!
//! [`ClusterSeal`] seals the values a cluster of brokers shares in NATS JetStream KV
//! (retained messages, the key marker) under keys derived from the same key, and hashes
//! topics into KV keys (`cluster.rs`).

#![forbid(unsafe_code)]

mod cluster;
mod compact;
mod error;
mod format;
mod held;
mod key;
mod log;
mod logfile;
mod mark;
mod record;
mod session;
mod session_log;
mod session_state;
mod sessions;
mod set;
mod store;

#[cfg(test)]
mod tests;

pub use cluster::{ClusterSeal, Owner};
pub use compact::{accept, rekey, CompactionJob};
pub use error::StoreError;
pub use held::HeldMessages;
pub use key::{RetainedKey, KEY_LEN};
pub use session::{
    CommitStats, Delivery, Enqueued, HeldMessage, PendingWill, Purged, QueuedMessage, Session,
    SessionKey, SessionLimits, SessionMeta, SessionStats, SessionStore, SubscriptionOptions,
};
pub use session_log::{accept_sessions, read_sessions, rekey_sessions, SessionLog};
pub use sessions::{MemorySessions, Sessions};
pub use set::{Refusal, RetainedSet, StoreLimits, Usage, UNKNOWN_OWNER};
pub use store::Store;

use serde::{Deserialize, Serialize};

/// MQTT 5 properties kept with a retained message (message expiry lives in
/// [`RetainedMessage::expires_at`]).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MessageProperties {
    /// Payload format indicator (0 = bytes, 1 = UTF-8).
    pub payload_format_indicator: Option<u8>,
    /// Content type.
    pub content_type: Option<String>,
    /// Response topic.
    pub response_topic: Option<String>,
    /// Correlation data.
    pub correlation_data: Option<Vec<u8>>,
    /// User properties, in order, duplicates allowed.
    pub user_properties: Vec<(String, String)>,
}

/// One retained message as the broker should replay it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetainedMessage {
    /// The topic it was published to.
    pub topic: String,
    /// The payload (never empty: an empty payload clears the topic).
    pub payload: Vec<u8>,
    /// QoS 0, 1 or 2.
    pub qos: u8,
    /// `Some` for a message published with MQTT 5, `None` for 3.1.1.
    pub properties: Option<MessageProperties>,
    /// Absolute expiry in unix seconds (from MQTT 5 message expiry), if any.
    pub expires_at: Option<u64>,
    /// Who published it (the broker's per-user quota key); `None` in records written
    /// before owners were kept. Stored in a record of its own kind, so files written
    /// before it existed still load.
    #[serde(skip)]
    pub owner: Option<String>,
}

impl RetainedMessage {
    /// Whether the message has expired at `now` (unix seconds).
    pub fn is_expired(&self, now: u64) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }
}

/// Bytes `msg` takes as one record in the log: topic, payload, properties, expiry and
/// owner as encoded, plus the frame's length prefix, nonce and tag. The one size measure:
/// what [`StoreLimits`] count and what a flushed message takes in the file.
pub fn stored_bytes(msg: &RetainedMessage) -> u64 {
    record::frame_bytes(msg)
}

/// What one [`Store::flush`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FlushStats {
    /// Records appended.
    pub records: usize,
    /// Bytes appended.
    pub bytes: u64,
}

/// Current time in unix seconds (0 if the clock is before 1970): what message expiry is
/// measured in.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// For fuzz and property harnesses: decode an in-memory log image under `key`, exactly as
/// [`Store::open`] reads a file. Returns the live messages or the error open would give.
#[doc(hidden)]
pub fn decode_log_image(
    key: &RetainedKey,
    image: &[u8],
) -> Result<Vec<RetainedMessage>, StoreError> {
    let cipher = record::cipher(key);
    let live = log::read_log(
        image,
        image.len() as u64,
        &cipher,
        std::path::Path::new("<memory>"),
        0,
        |_, _| Ok(None),
    )?;
    Ok(live.into_iter().map(|item| (*item.0).clone()).collect())
}
