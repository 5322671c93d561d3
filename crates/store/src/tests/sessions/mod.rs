//! The session store: round trips and bounds (`basic`), damage detection (`tamper`),
//! every crash point (`crash`), and random operation sequences against a model
//! (`props`).

mod basic;
mod crash;
mod props;
mod tamper;

use bytes::Bytes;
use std::path::{Path, PathBuf};

use super::key;
use crate::{
    QueuedMessage, Session, SessionKey, SessionLimits, SessionLog, SessionMeta, SessionStore,
    StoreError, SubscriptionOptions,
};

pub(crate) const LIMITS: SessionLimits = SessionLimits {
    max_queued_messages: 1000,
    max_queued_bytes: 1 << 20,
};

pub(crate) fn open(dir: &Path) -> Result<SessionLog, StoreError> {
    SessionLog::open(dir, key(), LIMITS)
}

pub(crate) fn log_path(dir: &Path) -> PathBuf {
    dir.join("sessions.log")
}

pub(crate) fn mark_path(dir: &Path) -> PathBuf {
    dir.join("sessions.log.hwm")
}

pub(crate) fn skey(owner: Option<&str>, client_id: &str) -> SessionKey {
    SessionKey {
        owner: owner.map(str::to_owned),
        client_id: client_id.to_owned(),
    }
}

pub(crate) fn meta(filters: &[&str]) -> SessionMeta {
    SessionMeta {
        protocol: 5,
        expiry_interval: 3600,
        disconnected_at: None,
        subscriptions: filters
            .iter()
            .map(|f| {
                (
                    (*f).to_owned(),
                    SubscriptionOptions {
                        qos: 1,
                        ..Default::default()
                    },
                )
            })
            .collect(),
    }
}

pub(crate) fn qmsg(topic: &str, payload: &str) -> QueuedMessage {
    QueuedMessage {
        topic: topic.to_owned(),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        qos: 1,
        retain: false,
        properties: None,
        expires_at: None,
    }
}

/// Every session, sorted by key.
pub(crate) fn all(store: &impl SessionStore) -> Vec<Session> {
    let mut v: Vec<Session> = store.sessions().cloned().collect();
    v.sort_by(|a, b| a.key.cmp(&b.key));
    v
}

/// A store with one session holding `n` messages, each committed on its own.
pub(crate) fn store_with(dir: &Path, n: usize) -> Vec<Session> {
    let mut s = open(dir).unwrap();
    let k = skey(Some("alice"), "c1");
    s.put_session(&k, meta(&["alice/#"])).unwrap();
    s.commit().unwrap();
    for i in 0..n {
        s.enqueue(&k, qmsg(&format!("alice/t{i}"), &format!("payload-{i}")))
            .unwrap();
        s.commit().unwrap();
    }
    all(&s)
}
