//! The open log a [`RetainedSet`] is persisted in. Changes to the set (through the
//! store or any view of the set) mark their topic dirty; `flush` takes the dirty topics'
//! current messages (`Arc` clones, under the set's lock only for that), appends one
//! sealed record per topic at the end of the verified log and fsyncs with the set
//! unlocked, so a save costs what changed and never blocks readers. A failed flush gives
//! every taken topic back and cuts the file back to its last good length before the
//! next attempt, so a half-written batch never stays in the middle.

use std::path::Path;

use zeroize::Zeroizing;

use crate::format::RETAINED;
use crate::log;
use crate::logfile::LogFile;
pub(crate) use crate::logfile::Trust;
use crate::record::{self, RecordRef, HEADER_LEN};
use crate::set::{Items, RetainedSet};
use crate::{now_unix, FlushStats, RetainedKey, RetainedMessage, StoreError, StoreLimits};

/// Compaction waits until the garbage exceeds this too, so small stores are left alone.
pub(crate) const COMPACT_SLACK_BYTES: u64 = 64 * 1024;

/// An open retained store: the log of one [`RetainedSet`]. Saving takes `&mut self`
/// (one saver at a time), but the set it persists is shared: views of it read and change
/// it while a save or a compaction runs.
pub struct Store {
    /// The messages this log persists.
    pub(crate) set: RetainedSet,
    /// The log file and its high-water mark.
    pub(crate) log: LogFile,
    /// Identifies the latest compaction job started.
    pub(crate) job_id: u64,
}

impl Drop for Store {
    fn drop(&mut self) {
        // Saves write the mark without fsync; make the last one durable at shutdown.
        if let Err(e) = self.log.mark.sync() {
            tracing::warn!(error = %e, "retained store: high-water mark not synced");
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("log_path", &self.log.log_path)
            .field("messages", &self.set.len())
            .field("file_bytes", &self.log.committed_len)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates, mode 0700) the store directory `path`, reads and verifies the
    /// whole log against its high-water mark (see `mark.rs`), drops expired messages and
    /// returns the store (with a set of its own bounded by `limits`) and a copy of its
    /// live messages. A torn last record past the mark is cut off with a warning; every
    /// other defect, missing records included, is an error.
    pub fn open(
        path: &Path,
        key: RetainedKey,
        limits: StoreLimits,
    ) -> Result<(Store, Vec<RetainedMessage>), StoreError> {
        Store::open_with(path, key, RetainedSet::new(limits), Trust::Checked).map(|store| {
            let messages = store.messages().iter().map(|m| (**m).clone()).collect();
            (store, messages)
        })
    }

    /// [`Store::open`] into `set` (its content is replaced by the log's), without a copy:
    /// from then on the store persists the changes made through any view of `set`.
    pub fn open_into(
        path: &Path,
        key: RetainedKey,
        set: &RetainedSet,
    ) -> Result<Store, StoreError> {
        Store::open_with(path, key, set.clone(), Trust::Checked)
    }

    pub(crate) fn open_with(
        path: &Path,
        key: RetainedKey,
        set: RetainedSet,
        trust: Trust,
    ) -> Result<Store, StoreError> {
        let mut live = Items::new();
        let log = LogFile::open(path, key, &RETAINED, trust, |plain, _| {
            log::apply_retained(&mut live, plain)
        })?;
        let now = now_unix();
        live.retain(|item| !item.0.is_expired(now));
        set.load(live);
        let version = log.version;
        let mut store = Store {
            set,
            log,
            job_id: 0,
        };
        if version < record::VERSION {
            // A version-1 log without its mark would pass for one written before the
            // upgrade: rewrite it as version 2 now, so a deleted mark is always noticed.
            tracing::info!(file = %store.log.log_path.display(), "rewriting retained store in format version {}", record::VERSION);
            store.compact()?;
        }
        Ok(store)
    }

    /// Records a set or replace of `msg.topic` (kept in memory until [`Store::flush`]).
    /// Fails with [`StoreError::Full`] if a total would grow past the set's limits.
    pub fn set(&mut self, msg: RetainedMessage) -> Result<(), StoreError> {
        self.set.set(msg).map_err(StoreError::Full)
    }

    /// Records that `topic`'s retained message was deleted (no-op if there is none).
    pub fn clear(&mut self, topic: &str) {
        self.set.clear(topic);
    }

    /// Clears every message expired at `now` (unix seconds); returns how many.
    pub fn purge_expired(&mut self, now: u64) -> usize {
        self.set.purge_expired(now)
    }

    /// Appends one sealed record per topic changed since the last flush, then fsyncs.
    /// On error nothing pending is lost; call again later.
    pub fn flush(&mut self) -> Result<FlushStats, StoreError> {
        let changes = self.set.take_dirty();
        let res = encode_changes(&changes)
            .and_then(|records| self.log.append(records.iter().map(|r| r.as_slice())));
        match res {
            Ok(bytes) => Ok(FlushStats {
                records: changes.len(),
                bytes,
            }),
            Err(e) => {
                self.set
                    .restore_dirty(changes.into_iter().map(|(topic, _)| topic));
                Err(e)
            }
        }
    }

    /// Forces the high-water mark to disk (saves write it without an fsync of its own).
    /// Call at shutdown after the last [`Store::flush`]; dropping the store does it too.
    pub fn sync_mark(&self) -> Result<(), StoreError> {
        self.log.mark.sync()
    }

    /// Whether the log holds more than about twice the live records (plus a small slack).
    /// A live record takes [`stored_bytes`](crate::stored_bytes) once flushed, so the set's
    /// byte total is the useful part of the file (right after a flush, when this is asked).
    pub fn needs_compaction(&self) -> bool {
        let useful = HEADER_LEN as u64 + self.set.bytes();
        self.log.committed_len > useful.saturating_mul(2).saturating_add(COMPACT_SLACK_BYTES)
    }

    /// Compacts in place (see [`Store::compact`]) if [`Store::needs_compaction`].
    pub fn maybe_compact(&mut self) -> Result<bool, StoreError> {
        if !self.needs_compaction() {
            return Ok(false);
        }
        self.compact()?;
        Ok(true)
    }

    /// Rewrites the live set into a new file with a new file id (temp file, fsync, rename,
    /// directory fsync). Pending changes are included. A crash at any step leaves either
    /// the old or the new log complete.
    pub fn compact(&mut self) -> Result<(), StoreError> {
        let mut job = self.begin_compaction();
        if let Err(e) = job.run() {
            self.set.abort_snapshot();
            return Err(e);
        }
        self.finish_compaction(job)
    }

    /// Number of live retained messages.
    pub fn len(&self) -> usize {
        self.set.len()
    }

    /// Whether there are no live retained messages.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// Bytes of the live set's records ([`stored_bytes`](crate::stored_bytes), what
    /// `max_bytes` bounds).
    pub fn live_bytes(&self) -> u64 {
        self.set.bytes()
    }

    /// Size of the log file as verified and written so far.
    pub fn file_bytes(&self) -> u64 {
        self.log.committed_len
    }

    /// Topics changed since the last flush.
    pub fn pending(&self) -> usize {
        self.set.pending()
    }

    /// The live messages, in topic order.
    pub fn messages(&self) -> Vec<std::sync::Arc<RetainedMessage>> {
        self.set.messages()
    }

    /// The live message of `topic`, if any.
    pub fn get(&self, topic: &str) -> Option<std::sync::Arc<RetainedMessage>> {
        self.set.get(topic)
    }

    /// The set this store persists.
    pub fn retained_set(&self) -> &RetainedSet {
        &self.set
    }

    /// Path of the log file.
    pub fn log_path(&self) -> &Path {
        &self.log.log_path
    }
}

/// The records that write `changes` (a set or a clear per topic).
pub(crate) fn encode_changes(
    changes: &[crate::set::Change],
) -> Result<Vec<Zeroizing<Vec<u8>>>, StoreError> {
    changes
        .iter()
        .map(|(topic, msg)| {
            record::encode(&match msg {
                Some(m) => RecordRef::set(m),
                None => RecordRef::Clear(topic),
            })
        })
        .collect()
}
