//! The encrypted retained store behind the gateway.
//!
//! The gateway records every retained PUBLISH that passed the ACL (set, replace, clear)
//! here as well as in the [`RetainedIndex`] it serves subscribers from; a saver thread
//! appends what changed every `autosave_interval` seconds and compacts the log off the
//! lock when it has grown. With `autosave_interval = 0` the gateway waits for the save
//! before the publish is acknowledged, so nothing acknowledged is lost (the saver then
//! runs every second to retry failed saves and to compact). At start the store is read
//! back into the index; at shutdown it is flushed. Its bounds are the index's.

use crate::metrics::Metrics;
pub use crate::retained_index::legacy_owner;
use crate::retained_index::{unix_now, Refusal, RetainedEntry, RetainedIndex};
use bytes::Bytes;
use moatmq_config::{Config, Retained};
use moatmq_store::{
    stored_bytes, MessageProperties, RetainedKey, RetainedMessage, Store, StoreError, StoreLimits,
};
use rumqttd::protocol::{PublishProperties, QoS};
use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use tracing::{error, info, warn};

/// Environment variable that carries the key as hex; wins over `key_file`.
pub const KEY_ENV: &str = "MOATMQ_RETAINED_KEY";

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum RetainedError {
    /// Neither the environment variable nor `retained.key_file` gives a key.
    #[error("[retained] needs a key: set {KEY_ENV} or retained.key_file (create one with `moatmq keygen --out FILE`)")]
    NoKey,
    /// The key or the store failed to load (wrong key, tampering, permissions).
    #[error("retained store: {0}")]
    Store(#[from] StoreError),
}

/// Loads the key: `MOATMQ_RETAINED_KEY` first, else the key file.
pub fn load_key(config: &Config, retained: &Retained) -> Result<RetainedKey, RetainedError> {
    if let Ok(hex) = std::env::var(KEY_ENV) {
        return Ok(RetainedKey::from_hex(&hex)?);
    }
    match &retained.key_file {
        Some(path) => Ok(RetainedKey::load(&config.resolve(path))?),
        None => Err(RetainedError::NoKey),
    }
}

/// Opens the store named in `[retained]`: returns it with its live messages.
pub fn open(
    config: &Config,
    retained: &Retained,
) -> Result<(Store, Vec<RetainedMessage>), RetainedError> {
    let key = load_key(config, retained)?;
    // The index refuses new topics past the bounds before anything reaches the store.
    Ok(Store::open(
        &config.resolve(&retained.path),
        key,
        StoreLimits::UNLIMITED,
    )?)
}

/// The store shared by gateways and the saver thread.
pub struct RetainedStore {
    store: Mutex<Store>,
    /// Wakes the saver early (shutdown) and lets `autosave_interval = 0` wait for saves.
    saved: Condvar,
    interval: Duration,
    stop: Mutex<bool>,
    metrics: Arc<Metrics>,
}

/// Outcome of recording a retained publish.
#[derive(Debug, PartialEq, Eq)]
pub enum Recorded {
    /// Recorded; saved on the next autosave.
    Buffered,
    /// Recorded; the caller must `save_now` before acknowledging (`autosave_interval = 0`).
    NeedsSave,
    /// Refused: it would pass a quota (or the store could not take it).
    Refused(Refusal),
}

impl RetainedStore {
    /// Opens the store, loads it into `index` and starts the saver thread.
    pub fn start(
        config: &Config,
        retained: &Retained,
        index: &RetainedIndex,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<RetainedStore>, RetainedError> {
        let (store, messages) = open(config, retained)?;
        let loaded = messages.len();
        // One shared name per owner, not one allocation per message.
        let mut owners: HashMap<String, Arc<str>> = HashMap::new();
        for m in messages {
            let size = stored_bytes(&m);
            // Records from before owners were kept count against their topic's first level.
            let name = m.owner.as_deref().unwrap_or_else(|| legacy_owner(&m.topic));
            let owner = match owners.get(name) {
                Some(o) => o.clone(),
                None => {
                    let o: Arc<str> = name.into();
                    owners.insert(name.to_string(), o.clone());
                    o
                }
            };
            let entry = RetainedEntry {
                owner,
                stored_bytes: size,
                payload: Bytes::from(m.payload),
                qos: qos_of(m.qos),
                properties: m.properties.as_ref().map(to_router_properties),
                expires_at: m.expires_at,
            };
            if index.load(&m.topic, entry).is_err() {
                warn!(topic = %m.topic, "retained store holds more than [retained] max_messages/max_bytes; not served");
            }
        }
        info!(
            messages = loaded,
            bytes = store.live_bytes(),
            "retained store loaded"
        );
        let this = Arc::new(RetainedStore {
            store: Mutex::new(store),
            saved: Condvar::new(),
            interval: Duration::from_secs(retained.autosave_interval),
            stop: Mutex::new(false),
            metrics,
        });
        this.update_gauges(None);
        let saver = this.clone();
        std::thread::Builder::new()
            .name("moatmq-retained-saver".into())
            .spawn(move || saver.saver_loop())
            .map_err(|e| StoreError::Io {
                path: "saver thread".into(),
                source: e,
            })?;
        Ok(this)
    }

    /// Records a retained message, or the clearing of `topic` by an empty payload (`None`).
    pub fn record(&self, topic: &str, message: Option<RetainedMessage>) -> Recorded {
        let Ok(mut store) = self.store.lock() else {
            return Recorded::Refused(Refusal::Store);
        };
        match message {
            None => store.clear(topic),
            Some(message) => {
                if let Err(e) = store.set(message) {
                    // Unlimited store: only an encoding failure gets here.
                    error!(error = %e, "retained store refused a message");
                    return Recorded::Refused(Refusal::Store);
                }
            }
        }
        if self.interval.is_zero() {
            Recorded::NeedsSave
        } else {
            Recorded::Buffered
        }
    }

    /// Saves everything pending now; blocking (call from a blocking thread).
    pub fn save_now(&self) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        {
            let Ok(mut store) = self.store.lock() else {
                return Ok(());
            };
            if store.pending() == 0 {
                return Ok(());
            }
            store.flush()?;
        }
        self.update_gauges(Some(started.elapsed()));
        Ok(())
    }

    /// Mirrors the store's size (and the last save) into the metrics.
    fn update_gauges(&self, save: Option<Duration>) {
        let bytes = self.store.lock().map_or(0, |s| s.file_bytes());
        self.metrics.retained_store_bytes.set(bytes as i64);
        if let Some(took) = save {
            self.metrics
                .retained_last_save_timestamp
                .set(unix_now() as i64);
            self.metrics
                .retained_last_save_duration_ms
                .set(took.as_millis() as i64);
        }
    }

    /// Stops the saver and flushes (SIGTERM).
    pub fn shutdown(&self) {
        if let Ok(mut stop) = self.stop.lock() {
            *stop = true;
        }
        self.saved.notify_all();
        match self.save_now() {
            Ok(()) => info!("retained store flushed"),
            Err(e) => error!(error = %e, "retained store: final flush failed"),
        }
        if let Ok(store) = self.store.lock() {
            if let Err(e) = store.sync_mark() {
                error!(error = %e, "retained store: high-water mark not synced");
            }
        }
    }

    fn saver_loop(&self) {
        loop {
            {
                let Ok(stop) = self.stop.lock() else { return };
                let tick = self.interval.max(Duration::from_secs(1));
                let Ok((stop, _)) = self.saved.wait_timeout(stop, tick) else {
                    return;
                };
                if *stop {
                    return;
                }
            }
            if let Ok(mut store) = self.store.lock() {
                store.purge_expired(unix_now());
            }
            if let Err(e) = self.save_now() {
                // Nothing pending is lost: the next round retries.
                warn!(error = %e, "retained store: save failed, will retry");
                continue;
            }
            let job = {
                let Ok(mut store) = self.store.lock() else {
                    return;
                };
                store.needs_compaction().then(|| store.begin_compaction())
            };
            if let Some(mut job) = job {
                // The rewrite runs without the lock; only the final swap takes it.
                let ran = job.run();
                let Ok(mut store) = self.store.lock() else {
                    return;
                };
                match ran.and_then(|()| store.finish_compaction(job)) {
                    Ok(()) => info!(
                        messages = store.len(),
                        bytes = store.file_bytes(),
                        "retained store compacted"
                    ),
                    Err(e) => {
                        warn!(error = %e, "retained store: compaction failed, the old log stays in use")
                    }
                }
            }
        }
    }
}

fn qos_of(q: u8) -> QoS {
    match q {
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        _ => QoS::AtMostOnce,
    }
}

/// The stored form of a retained publish that passed the ACL; `owner` is its quota key.
pub fn message(
    topic: &str,
    payload: &Bytes,
    qos: QoS,
    properties: Option<&PublishProperties>,
    v5: bool,
    expires_at: Option<u64>,
    owner: &str,
) -> RetainedMessage {
    RetainedMessage {
        topic: topic.to_string(),
        payload: payload.to_vec(),
        qos: qos as u8,
        properties: v5.then(|| from_router_properties(properties)),
        expires_at,
        owner: Some(owner.to_string()),
    }
}

fn from_router_properties(p: Option<&PublishProperties>) -> MessageProperties {
    let Some(p) = p else {
        return MessageProperties::default();
    };
    MessageProperties {
        payload_format_indicator: p.payload_format_indicator,
        content_type: p.content_type.clone(),
        response_topic: p.response_topic.clone(),
        correlation_data: p.correlation_data.as_ref().map(|b| b.to_vec()),
        user_properties: p.user_properties.clone(),
    }
}

fn to_router_properties(p: &MessageProperties) -> PublishProperties {
    PublishProperties {
        payload_format_indicator: p.payload_format_indicator,
        // Kept as the entry's `expires_at`; the remaining interval is set when sent.
        message_expiry_interval: None,
        topic_alias: None,
        response_topic: p.response_topic.clone(),
        correlation_data: p.correlation_data.clone().map(Bytes::from),
        user_properties: p.user_properties.clone(),
        subscription_identifiers: Vec::new(),
        content_type: p.content_type.clone(),
    }
}
