//! Unit tests of the store as a whole: round trips, limits, compaction, rekey
//! (`basic`), detection of every kind of damage to the file (`tamper`, `fuzz`), and of
//! truncation and rollback against the high-water mark (`rollback`); the session store
//! (`sessions`).

mod basic;
mod fuzz;
mod owner;
mod rollback;
mod sessions;
mod tamper;

use std::path::{Path, PathBuf};

use crate::record::{self, HEADER_LEN, NONCE_LEN, PREFIX_LEN};
use crate::{MessageProperties, RetainedKey, RetainedMessage, Store, StoreError, StoreLimits};

pub(crate) const LIMITS: StoreLimits = StoreLimits {
    max_messages: 1_000_000,
    max_bytes: 1 << 30,
    max_messages_per_user: 0,
    max_bytes_per_user: 0,
};

pub(crate) fn key() -> RetainedKey {
    RetainedKey::from_hex(&"11".repeat(32)).unwrap()
}

pub(crate) fn other_key() -> RetainedKey {
    RetainedKey::from_hex(&"22".repeat(32)).unwrap()
}

pub(crate) fn msg(topic: &str, payload: &str) -> RetainedMessage {
    RetainedMessage {
        topic: topic.to_owned(),
        payload: payload.as_bytes().to_vec(),
        qos: 1,
        properties: None,
        expires_at: None,
        owner: None,
    }
}

pub(crate) fn v5_msg(topic: &str, payload: &str) -> RetainedMessage {
    RetainedMessage {
        properties: Some(MessageProperties {
            payload_format_indicator: Some(1),
            content_type: Some("application/json".to_owned()),
            response_topic: Some("reply/here".to_owned()),
            correlation_data: Some(vec![1, 2, 3]),
            user_properties: vec![
                ("k".to_owned(), "v".to_owned()),
                ("k".to_owned(), "w".to_owned()),
            ],
        }),
        expires_at: Some(u64::MAX / 2),
        qos: 2,
        ..msg(topic, payload)
    }
}

pub(crate) fn open(dir: &Path) -> Result<(Store, Vec<RetainedMessage>), StoreError> {
    Store::open(dir, key(), LIMITS)
}

pub(crate) fn log_path(dir: &Path) -> PathBuf {
    dir.join("retained.log")
}

pub(crate) fn mark_path(dir: &Path) -> PathBuf {
    dir.join("retained.log.hwm")
}

/// Byte ranges `(start, end)` of each frame in a log file.
pub(crate) fn frames(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut off = HEADER_LEN;
    while off + PREFIX_LEN <= bytes.len() {
        let mut p = [0u8; PREFIX_LEN];
        p.copy_from_slice(&bytes[off..off + PREFIX_LEN]);
        let len = record::decode_prefix(&p).unwrap() as usize;
        let end = off + PREFIX_LEN + NONCE_LEN + len;
        out.push((off, end));
        off = end;
    }
    out
}

/// A store with messages `t0..t{n}` flushed one record each, in order.
pub(crate) fn store_with(dir: &Path, n: usize) {
    let (mut s, _) = open(dir).unwrap();
    for i in 0..n {
        s.set(msg(&format!("t{i}"), &format!("payload-{i}")))
            .unwrap();
        s.flush().unwrap();
    }
}

pub(crate) fn sorted(mut v: Vec<RetainedMessage>) -> Vec<RetainedMessage> {
    v.sort_by(|a, b| a.topic.cmp(&b.topic));
    v
}
