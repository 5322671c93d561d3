//! The encrypted retained store behind the gateway.
//!
//! The store persists the retained set the gateways serve subscribers from
//! ([`RetainedIndex`], a view of the same `moatmq_store::RetainedSet`): every retained
//! PUBLISH that passed the ACL changes the set (set, replace, clear) and marks its topic
//! dirty; a saver thread appends what changed every `autosave_interval` seconds and
//! compacts the log off the lock when it has grown. Neither holds the set's lock across
//! a write or an fsync. With `autosave_interval = 0` the gateway waits for the save
//! before the publish is acknowledged, so nothing acknowledged is lost (the saver then
//! runs every second to retry failed saves and to compact). At start the log is read
//! into the set; at shutdown it is flushed.

use crate::metrics::Metrics;
pub use crate::retained_index::legacy_owner;
use crate::retained_index::RetainedIndex;
use bytes::Bytes;
use moatmq_config::{Config, Retained};
use moatmq_store::{
    now_unix, MessageProperties, RetainedKey, RetainedMessage, Store, StoreError, StoreLimits,
};
use rumqttd::protocol::{PublishProperties, QoS};
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

/// Opens the store named in `[retained]` into a set of its own, without bounds (tools).
pub fn open(config: &Config, retained: &Retained) -> Result<Store, RetainedError> {
    let key = load_key(config, retained)?;
    let set = RetainedIndex::new(StoreLimits::UNLIMITED);
    Ok(Store::open_into(
        &config.resolve(&retained.path),
        key,
        &set,
    )?)
}

/// The log of the retained set, shared by gateways (`autosave_interval = 0` saves) and
/// the saver thread.
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
}

impl RetainedStore {
    /// Opens the store into `index` (replacing its content) and starts the saver thread.
    pub fn start(
        config: &Config,
        retained: &Retained,
        index: &RetainedIndex,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<RetainedStore>, RetainedError> {
        let key = load_key(config, retained)?;
        let store = Store::open_into(&config.resolve(&retained.path), key, index)?;
        info!(
            messages = store.len(),
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

    /// What a change just made to the set needs before it is acknowledged.
    pub fn recorded(&self) -> Recorded {
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
                .set(now_unix() as i64);
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
                store.purge_expired(now_unix());
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

pub(crate) fn from_router_properties(p: Option<&PublishProperties>) -> MessageProperties {
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
