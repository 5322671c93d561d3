//! The live retained set plus the open log it is persisted in. `set`/`clear` change
//! memory and mark the topic dirty; `flush` appends one sealed record per dirty topic
//! (its current state) at the end of the verified log and fsyncs, so a save costs what
//! changed. A failed flush keeps every dirty topic and cuts the file back to its last
//! good length before the next attempt, so a half-written batch never stays in the middle.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aes_gcm::Aes256Gcm;

use crate::format::RETAINED;
use crate::log::{self, Entry};
use crate::logfile::LogFile;
pub(crate) use crate::logfile::Trust;
use crate::mark::{Mark, MarkFile, Vouch};
use crate::record::{self, FileId, RecordRef, HEADER_LEN};
use crate::{now_unix, FlushStats, RetainedKey, RetainedMessage, StoreError, StoreLimits};

/// Prefix of compaction/rekey temporary files; stale ones are removed on open.
pub(crate) const TMP_PREFIX: &str = RETAINED.tmp_prefix;
/// Compaction waits until the garbage exceeds this too, so small stores are left alone.
const COMPACT_SLACK_BYTES: u64 = 64 * 1024;

/// An open retained store. Not thread-safe by itself (`&mut self`), but `Send`: the
/// broker runs it on a thread of its own.
pub struct Store {
    pub(crate) dir: PathBuf,
    pub(crate) log_path: PathBuf,
    pub(crate) cipher: Aes256Gcm,
    limits: StoreLimits,
    pub(crate) file: File,
    pub(crate) file_id: FileId,
    pub(crate) next_seq: u64,
    /// Length of the verified, fsynced log; appends go here.
    pub(crate) committed_len: u64,
    /// A failed append may have left bytes past `committed_len`.
    pub(crate) needs_truncate: bool,
    /// A rename was done but the directory fsync failed: retry it before appending.
    pub(crate) needs_dir_sync: bool,
    pub(crate) live: HashMap<String, Entry>,
    live_bytes: u64,
    /// Sum of `frame_len` over live entries: the useful part of the file.
    pub(crate) live_frame_bytes: u64,
    pub(crate) dirty: HashSet<String>,
    /// Topics changed since a background compaction took its snapshot.
    pub(crate) since_snapshot: Option<HashSet<String>>,
    /// Identifies the latest compaction job started.
    pub(crate) job_id: u64,
    /// The high-water mark beside the log.
    pub(crate) mark: MarkFile,
    /// The log a compaction replaced, while the rename's directory fsync is pending (the
    /// mark must keep vouching for it: after a crash either file may be in place).
    pub(crate) prev: Option<Vouch>,
}

impl Drop for Store {
    fn drop(&mut self) {
        // Saves write the mark without fsync; make the last one durable at shutdown.
        if let Err(e) = self.mark.sync() {
            tracing::warn!(error = %e, "retained store: high-water mark not synced");
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("log_path", &self.log_path)
            .field("messages", &self.live.len())
            .field("file_bytes", &self.committed_len)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates, mode 0700) the store directory `path`, reads and verifies the
    /// whole log against its high-water mark (see `mark.rs`), drops expired messages and
    /// returns the store with its live messages. A torn last record past the mark is cut
    /// off with a warning; every other defect, missing records included, is an error.
    pub fn open(
        path: &Path,
        key: RetainedKey,
        limits: StoreLimits,
    ) -> Result<(Store, Vec<RetainedMessage>), StoreError> {
        Store::open_with(path, key, limits, Trust::Checked)
    }

    pub(crate) fn open_with(
        path: &Path,
        key: RetainedKey,
        limits: StoreLimits,
        trust: Trust,
    ) -> Result<(Store, Vec<RetainedMessage>), StoreError> {
        let cipher = record::cipher(&key);
        drop(key);
        let mut live: HashMap<String, Entry> = HashMap::new();
        let log = LogFile::open(path, cipher, &RETAINED, trust, |plain, frame_len| {
            match record::decode_record(plain)?.into_change() {
                Ok(msg) => {
                    live.insert(
                        msg.topic.clone(),
                        Entry {
                            msg: Arc::new(msg),
                            frame_len,
                        },
                    );
                }
                Err(topic) => {
                    live.remove(&topic);
                }
            }
            Ok(())
        })?;
        let now = now_unix();
        live.retain(|_, e| !e.msg.is_expired(now));
        let live_bytes = live.values().map(|e| e.msg.data_bytes()).sum();
        let live_frame_bytes = live.values().map(|e| e.frame_len).sum();
        let messages = live.values().map(|e| (*e.msg).clone()).collect();
        let version = log.version;
        let mut store = Store {
            dir: log.dir,
            log_path: log.log_path,
            cipher: log.cipher,
            limits,
            file: log.file,
            file_id: log.file_id,
            next_seq: log.next_seq,
            committed_len: log.committed_len,
            needs_truncate: false,
            needs_dir_sync: false,
            live,
            live_bytes,
            live_frame_bytes,
            dirty: HashSet::new(),
            since_snapshot: None,
            job_id: 0,
            mark: log.mark,
            prev: None,
        };
        if version < record::VERSION {
            // A version-1 log without its mark would pass for one written before the
            // upgrade: rewrite it as version 2 now, so a deleted mark is always noticed.
            tracing::info!(file = %store.log_path.display(), "rewriting retained store in format version {}", record::VERSION);
            store.compact()?;
        }
        Ok((store, messages))
    }

    /// What the mark should say now: this log, or while a compaction's rename may not be
    /// durable yet, the previous log and this one.
    fn mark_now(&self) -> Mark {
        let here = Some(self.vouch());
        match self.prev {
            Some(prev) => Mark {
                current: Some(prev),
                next: here,
            },
            None => Mark {
                current: here,
                next: None,
            },
        }
    }

    /// The committed state of the log, as the mark records it.
    pub(crate) fn vouch(&self) -> Vouch {
        Vouch {
            file_id: self.file_id,
            records: self.next_seq,
            len: self.committed_len,
        }
    }

    /// Writes the mark after a save. A failure costs no data (the log is already
    /// durable), only protection until the next save writes it again: warn and go on.
    pub(crate) fn update_mark(&mut self) {
        let mark = self.mark_now();
        if let Err(e) = self.mark.write(&self.cipher, &mark, false) {
            tracing::warn!(error = %e, "retained store: high-water mark not updated; retrying at the next save");
        }
    }

    /// Records a set or replace of `msg.topic` (kept in memory until [`Store::flush`]).
    /// Fails with [`StoreError::Full`] only for a new topic past the limits.
    pub fn set(&mut self, msg: RetainedMessage) -> Result<(), StoreError> {
        let size = msg.data_bytes();
        let old_size = self.live.get(&msg.topic).map(|e| e.msg.data_bytes());
        if old_size.is_none()
            && (self.live.len() >= self.limits.max_messages
                || self.live_bytes.saturating_add(size) > self.limits.max_bytes)
        {
            return Err(StoreError::Full);
        }
        let topic = msg.topic.clone();
        let entry = Entry {
            msg: Arc::new(msg),
            frame_len: 0,
        };
        if let Some(old) = self.live.insert(topic.clone(), entry) {
            self.live_frame_bytes = self.live_frame_bytes.saturating_sub(old.frame_len);
        }
        self.live_bytes = self.live_bytes.saturating_sub(old_size.unwrap_or(0)) + size;
        self.mark_dirty(topic);
        Ok(())
    }

    /// Records that `topic`'s retained message was deleted (no-op if there is none).
    pub fn clear(&mut self, topic: &str) {
        if let Some(old) = self.live.remove(topic) {
            self.live_frame_bytes = self.live_frame_bytes.saturating_sub(old.frame_len);
            self.live_bytes = self.live_bytes.saturating_sub(old.msg.data_bytes());
            self.mark_dirty(topic.to_owned());
        }
    }

    /// Clears every message expired at `now` (unix seconds); returns how many.
    pub fn purge_expired(&mut self, now: u64) -> usize {
        let expired: Vec<String> = self
            .live
            .values()
            .filter(|e| e.msg.is_expired(now))
            .map(|e| e.msg.topic.clone())
            .collect();
        for t in &expired {
            self.clear(t);
        }
        expired.len()
    }

    fn mark_dirty(&mut self, topic: String) {
        if let Some(s) = self.since_snapshot.as_mut() {
            s.insert(topic.clone());
        }
        self.dirty.insert(topic);
    }

    /// Appends one sealed record per topic changed since the last flush, then fsyncs.
    /// On error nothing pending is lost; call again later.
    pub fn flush(&mut self) -> Result<FlushStats, StoreError> {
        if self.needs_dir_sync {
            log::sync_dir(&self.dir)?;
            self.needs_dir_sync = false;
            self.prev = None;
            self.update_mark();
        }
        if self.dirty.is_empty() {
            return Ok(FlushStats::default());
        }
        let io = |e| StoreError::io(&self.log_path, e);
        if self.needs_truncate {
            self.file.set_len(self.committed_len).map_err(io)?;
            self.needs_truncate = false;
        }
        let mut buf = Vec::new();
        let mut written: Vec<(&str, u64)> = Vec::with_capacity(self.dirty.len());
        let mut seq = self.next_seq;
        for topic in &self.dirty {
            let rec = match self.live.get(topic) {
                Some(e) => RecordRef::set(&e.msg),
                None => RecordRef::Clear(topic),
            };
            let frame = record::seal_record(&self.cipher, &self.file_id, seq, &rec)?;
            written.push((topic, frame.len() as u64));
            buf.extend_from_slice(&frame);
            seq += 1;
        }
        let res = self
            .file
            .write_all_at(&buf, self.committed_len)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = res {
            self.needs_truncate = true;
            return Err(io(e));
        }
        let stats = FlushStats {
            records: written.len(),
            bytes: buf.len() as u64,
        };
        for (topic, frame_len) in written {
            if let Some(e) = self.live.get_mut(topic) {
                e.frame_len = frame_len;
                self.live_frame_bytes += frame_len;
            }
        }
        self.committed_len += stats.bytes;
        self.next_seq = seq;
        self.dirty.clear();
        self.update_mark();
        Ok(stats)
    }

    /// Forces the high-water mark to disk (saves write it without an fsync of its own).
    /// Call at shutdown after the last [`Store::flush`]; dropping the store does it too.
    pub fn sync_mark(&self) -> Result<(), StoreError> {
        self.mark.sync()
    }

    /// Whether the log holds more than about twice the live records (plus a small slack).
    pub fn needs_compaction(&self) -> bool {
        let useful = HEADER_LEN as u64 + self.live_frame_bytes;
        self.committed_len > useful.saturating_mul(2).saturating_add(COMPACT_SLACK_BYTES)
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
            self.since_snapshot = None;
            return Err(e);
        }
        self.finish_compaction(job)
    }

    /// Number of live retained messages.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    /// Whether there are no live retained messages.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// Bytes of topics, payloads and properties of the live set (what `max_bytes` bounds).
    pub fn live_bytes(&self) -> u64 {
        self.live_bytes
    }

    /// Size of the log file as verified and written so far.
    pub fn file_bytes(&self) -> u64 {
        self.committed_len
    }

    /// Topics changed since the last flush.
    pub fn pending(&self) -> usize {
        self.dirty.len()
    }

    /// The live messages, in no particular order.
    pub fn messages(&self) -> impl Iterator<Item = &RetainedMessage> {
        self.live.values().map(|e| &*e.msg)
    }

    /// The live message of `topic`, if any.
    pub fn get(&self, topic: &str) -> Option<&RetainedMessage> {
        self.live.get(topic).map(|e| &*e.msg)
    }

    /// Path of the log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }
}
