//! The open log a [`RetainedSet`] is persisted in. Changes to the set (through the
//! store or any view of the set) mark their topic dirty; `flush` takes the dirty topics'
//! current messages (`Arc` clones, under the set's lock only for that), appends one
//! sealed record per topic at the end of the verified log and fsyncs with the set
//! unlocked, so a save costs what changed and never blocks readers. A failed flush gives
//! every taken topic back and cuts the file back to its last good length before the
//! next attempt, so a half-written batch never stays in the middle.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::BufReader;
use std::os::unix::fs::{DirBuilderExt, FileExt};
use std::path::{Path, PathBuf};

use aes_gcm::Aes256Gcm;

use crate::log::{self, Required, TMP_PREFIX};
use crate::mark::{self, Found, Mark, MarkFile, Vouch, MARK_NAME};
use crate::record::{self, FileId, RecordRef, HEADER_LEN};
use crate::set::{Items, RetainedSet};
use crate::{now_unix, FlushStats, RetainedKey, RetainedMessage, StoreError, StoreLimits};

/// Name of the log inside the store directory.
pub(crate) const LOG_NAME: &str = "retained.log";

/// Compaction waits until the garbage exceeds this too, so small stores are left alone.
const COMPACT_SLACK_BYTES: u64 = 64 * 1024;

/// An open retained store: the log of one [`RetainedSet`]. Saving takes `&mut self`
/// (one saver at a time), but the set it persists is shared: views of it read and change
/// it while a save or a compaction runs.
pub struct Store {
    /// The messages this log persists.
    pub(crate) set: RetainedSet,
    pub(crate) dir: PathBuf,
    pub(crate) log_path: PathBuf,
    pub(crate) cipher: Aes256Gcm,
    pub(crate) file: File,
    pub(crate) file_id: FileId,
    pub(crate) next_seq: u64,
    /// Length of the verified, fsynced log; appends go here.
    pub(crate) committed_len: u64,
    /// A failed append may have left bytes past `committed_len`.
    pub(crate) needs_truncate: bool,
    /// A rename was done but the directory fsync failed: retry it before appending.
    pub(crate) needs_dir_sync: bool,
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
            .field("messages", &self.set.len())
            .field("file_bytes", &self.committed_len)
            .finish_non_exhaustive()
    }
}

/// How [`Store::open`] treats what the high-water mark says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Trust {
    /// Refuse a log the mark does not vouch for (normal start).
    Checked,
    /// Take the log as it is and rewrite the mark to match (`moatmq retained accept`).
    AsIs,
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
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(|e| StoreError::io(path, e))?;
        remove_stale_tmp(path)?;
        let cipher = record::cipher(&key);
        drop(key);
        let log_path = path.join(LOG_NAME);
        let mark_path = path.join(MARK_NAME);
        let mut found = mark::read(path, &cipher)?;
        let unreadable = || StoreError::MarkMissing {
            file: log_path.clone(),
            mark: mark_path.clone(),
            reason: "it is damaged or was written under another key",
        };
        let (file, replay) = if log_path.exists() {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&log_path)
                .map_err(|e| StoreError::io(&log_path, e))?;
            let file_len = file
                .metadata()
                .map_err(|e| StoreError::io(&log_path, e))?
                .len();
            let reader = BufReader::with_capacity(1 << 20, &file);
            let required = |file_id: &FileId, version: u32| {
                if trust == Trust::AsIs {
                    return Ok(None);
                }
                match &found {
                    Found::Unreadable => Err(unreadable()),
                    Found::Mark(_, mark) => match mark.vouch_for(file_id) {
                        Some(v) => Ok(Some(Required {
                            records: v.records,
                            mark: mark_path.clone(),
                        })),
                        None => Err(StoreError::RolledBack {
                            file: log_path.clone(),
                            mark: mark_path.clone(),
                        }),
                    },
                    // Written before marks existed: the first start after an upgrade.
                    Found::Nothing if version < record::VERSION => Ok(None),
                    Found::Nothing => Err(StoreError::MarkMissing {
                        file: log_path.clone(),
                        mark: mark_path.clone(),
                        reason: "no such file",
                    }),
                }
            };
            let replay = log::read_log(reader, file_len, &cipher, &log_path, now_unix(), required)?;
            if replay.good_len < file_len {
                file.set_len(replay.good_len)
                    .and_then(|()| file.sync_all())
                    .map_err(|e| StoreError::io(&log_path, e))?;
            }
            (file, replay)
        } else {
            match (trust, &found) {
                (Trust::Checked, Found::Unreadable) => return Err(unreadable()),
                (
                    Trust::Checked,
                    Found::Mark(
                        _,
                        Mark {
                            current: Some(v), ..
                        },
                    ),
                ) => {
                    return Err(StoreError::LogMissing {
                        file: log_path.clone(),
                        mark: mark_path.clone(),
                        records: v.records,
                    })
                }
                _ => {}
            }
            tracing::info!(file = %log_path.display(), "creating a new, empty retained store");
            let tmp = path.join(format!("{TMP_PREFIX}-new"));
            let w = log::write_fresh(&tmp, &cipher, std::iter::empty())?;
            // The mark names the new file before it is renamed into place, so a crash in
            // between leaves no log without a mark.
            let next = Vouch {
                file_id: w.file_id,
                records: w.next_seq,
                len: w.len,
            };
            let mark = Mark {
                current: None,
                next: Some(next),
            };
            found = Found::Mark(MarkFile::create(path, &cipher, &mark)?, mark);
            log::install(&tmp, &log_path, path)?;
            let replay = log::Replay {
                live: Items::new(),
                file_id: w.file_id,
                version: record::VERSION,
                next_seq: w.next_seq,
                good_len: w.len,
            };
            (w.file, replay)
        };
        // The log in place may have been renamed there by a compaction whose directory
        // fsync never ran: make that durable before the mark vouches for it alone.
        log::sync_dir(path)?;
        let here = Vouch {
            file_id: replay.file_id,
            records: replay.next_seq,
            len: replay.good_len,
        };
        let settled = Mark {
            current: Some(here),
            next: None,
        };
        let mark = match found {
            Found::Mark(mut mf, _) if trust == Trust::Checked => {
                mf.write(&cipher, &settled, true)?;
                mf
            }
            // Accepting may lower what the mark vouches for: rewrite both slots, or a torn
            // write later would fall back to the other slot's higher claim.
            Found::Mark(..) | Found::Unreadable => MarkFile::create(path, &cipher, &settled)?,
            Found::Nothing => {
                if trust == Trust::Checked {
                    tracing::warn!(
                        file = %log_path.display(),
                        mark = %mark_path.display(),
                        "retained store has no high-water mark yet (written by an older moatmq); creating it"
                    );
                }
                MarkFile::create(path, &cipher, &settled)?
            }
        };
        set.load(replay.live);
        let mut store = Store {
            set,
            dir: path.to_owned(),
            log_path,
            cipher,
            file,
            file_id: replay.file_id,
            next_seq: replay.next_seq,
            committed_len: replay.good_len,
            needs_truncate: false,
            needs_dir_sync: false,
            job_id: 0,
            mark,
            prev: None,
        };
        if replay.version < record::VERSION {
            // A version-1 log without its mark would pass for one written before the
            // upgrade: rewrite it as version 2 now, so a deleted mark is always noticed.
            tracing::info!(file = %store.log_path.display(), "rewriting retained store in format version {}", record::VERSION);
            store.compact()?;
        }
        Ok(store)
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
        if self.needs_dir_sync {
            log::sync_dir(&self.dir)?;
            self.needs_dir_sync = false;
            self.prev = None;
            self.update_mark();
        }
        let changes = self.set.take_dirty();
        if changes.is_empty() {
            return Ok(FlushStats::default());
        }
        match self.append(&changes) {
            Ok(stats) => {
                self.update_mark();
                Ok(stats)
            }
            Err(e) => {
                self.set
                    .restore_dirty(changes.into_iter().map(|(topic, _)| topic));
                Err(e)
            }
        }
    }

    /// Appends one record per change at the end of the log and fsyncs.
    fn append(&mut self, changes: &[crate::set::Change]) -> Result<FlushStats, StoreError> {
        let io = |e| StoreError::io(&self.log_path, e);
        if self.needs_truncate {
            self.file.set_len(self.committed_len).map_err(io)?;
            self.needs_truncate = false;
        }
        let mut buf = Vec::new();
        let mut seq = self.next_seq;
        for (topic, msg) in changes {
            let rec = match msg {
                Some(m) => RecordRef::set(m),
                None => RecordRef::Clear(topic),
            };
            buf.extend_from_slice(&record::seal_record(
                &self.cipher,
                &self.file_id,
                seq,
                &rec,
            )?);
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
        self.committed_len += buf.len() as u64;
        self.next_seq = seq;
        Ok(FlushStats {
            records: changes.len(),
            bytes: buf.len() as u64,
        })
    }

    /// Forces the high-water mark to disk (saves write it without an fsync of its own).
    /// Call at shutdown after the last [`Store::flush`]; dropping the store does it too.
    pub fn sync_mark(&self) -> Result<(), StoreError> {
        self.mark.sync()
    }

    /// Whether the log holds more than about twice the live records (plus a small slack).
    /// A live record takes [`stored_bytes`](crate::stored_bytes) once flushed, so the set's
    /// byte total is the useful part of the file (right after a flush, when this is asked).
    pub fn needs_compaction(&self) -> bool {
        let useful = HEADER_LEN as u64 + self.set.bytes();
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
        self.committed_len
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
        &self.log_path
    }
}

/// Removes temporary files left by a compaction or rekey interrupted by a crash; the
/// rename had not happened, so the log they were replacing is still complete.
fn remove_stale_tmp(dir: &Path) -> Result<(), StoreError> {
    let entries = std::fs::read_dir(dir).map_err(|e| StoreError::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| StoreError::io(dir, e))?;
        if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
            let p = entry.path();
            tracing::info!(file = %p.display(), "removing interrupted compaction file");
            std::fs::remove_file(&p).map_err(|e| StoreError::io(&p, e))?;
        }
    }
    Ok(())
}
