//! Compaction and rekey: write the live set into a brand-new log (new file id, records
//! numbered from 0) in a temporary file, fsync it, rename it over the log, fsync the
//! directory. Until the rename the old log is untouched; after it the new one is
//! complete, so a crash at any step loses nothing that was flushed. Before the rename the
//! high-water mark names both files (fsynced), after the directory fsync the new one only,
//! so either file loads after a crash, and once the mark names only the new one the old
//! one is refused.
//!
//! Compaction can run off the store's thread: [`Store::begin_compaction`] snapshots the
//! live set (cheap `Arc` clones), [`CompactionJob::run`] does the heavy writing anywhere,
//! and [`Store::finish_compaction`] appends the topics changed meanwhile before renaming.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use aes_gcm::Aes256Gcm;

use crate::log::{self, Written};
use crate::record::{self, RecordRef};
use crate::store::{encode_changes, Trust};
use crate::{now_unix, RetainedKey, RetainedMessage, RetainedSet, Store, StoreError, StoreLimits};

/// A compaction in progress: a snapshot of the live set to write into a new file.
/// `Send`, so [`CompactionJob::run`] can go to another thread.
pub struct CompactionJob {
    id: u64,
    tmp_path: PathBuf,
    cipher: Aes256Gcm,
    snapshot: Vec<Arc<RetainedMessage>>,
    written: Option<Written>,
}

impl std::fmt::Debug for CompactionJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompactionJob")
            .field("id", &self.id)
            .field("messages", &self.snapshot.len())
            .finish_non_exhaustive()
    }
}

impl CompactionJob {
    /// Writes and fsyncs the temporary file. Safe to call on any thread; does not touch
    /// the live log. After an error, finishing the job fails and cleans up.
    pub fn run(&mut self) -> Result<(), StoreError> {
        match log::write_fresh(
            &self.tmp_path,
            &self.cipher,
            self.snapshot.iter().map(|m| &**m),
        ) {
            Ok(w) => {
                self.written = Some(w);
                Ok(())
            }
            Err(e) => {
                let _ = std::fs::remove_file(&self.tmp_path);
                Err(e)
            }
        }
    }
}

impl Store {
    /// Starts a compaction: snapshots the live, unexpired set. Only the latest job
    /// started can be finished.
    pub fn begin_compaction(&mut self) -> CompactionJob {
        self.job_id += 1;
        CompactionJob {
            id: self.job_id,
            tmp_path: self.log.tmp_path(self.job_id),
            cipher: self.log.cipher.clone(),
            snapshot: self.set.begin_snapshot(now_unix()),
            written: None,
        }
    }

    /// Completes a job that has [`run`](CompactionJob::run): appends the current state
    /// of topics changed since its snapshot, fsyncs, renames it over the log and fsyncs
    /// the directory. On error the old log stays in use and nothing is lost.
    pub fn finish_compaction(&mut self, job: CompactionJob) -> Result<(), StoreError> {
        let tmp = job.tmp_path.clone();
        let res = self.finish_inner(job);
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        res
    }

    fn finish_inner(&mut self, job: CompactionJob) -> Result<(), StoreError> {
        if job.id != self.job_id {
            return Err(StoreError::StaleCompaction);
        }
        let Some(w) = job.written else {
            self.set.abort_snapshot();
            return Err(StoreError::StaleCompaction);
        };
        // The changes made while the job ran, as they are now. Topics not yet flushed are
        // taken too: the new file holds them (given back if it is not installed).
        let (since, dirty) = self.set.end_snapshot();
        let res = encode_changes(&since).and_then(|since| self.log.install(w, &since));
        if res.is_err() {
            self.set.restore_dirty(dirty);
        }
        res
    }

    /// Rewrites the log under `new` (see [`rekey`]); the store must not be used after.
    fn rekey_into(&mut self, new: &RetainedKey) -> Result<usize, StoreError> {
        let messages = self.messages();
        let records = messages.iter().map(|m| record::encode(&RecordRef::set(m)));
        self.log.rekey_into(&record::cipher(new), records)
    }
}

/// Re-encrypts the store in directory `path` from `old` to `new` (verifying every record
/// under `old` first) and returns the number of messages kept. Crash-safe: the new log is
/// written to a temporary file and renamed over the old one. The new log keeps the old
/// one's owner and group: an operator running this as root must not leave a log the
/// broker's own user cannot open.
pub fn rekey(path: &Path, old: RetainedKey, new: &RetainedKey) -> Result<usize, StoreError> {
    let (mut store, _) = Store::open(path, old, StoreLimits::UNLIMITED)?;
    store.rekey_into(new)
}

/// Takes the store in directory `path` as it is, for when [`Store::open`] refused it as
/// truncated, rolled back or without its high-water mark and the operator wants it anyway
/// (`moatmq retained accept`): every record present must still authenticate; a torn or
/// zeroed tail is cut; the high-water mark is rewritten to vouch for what is there.
/// Returns the number of live messages kept.
pub fn accept(path: &Path, key: RetainedKey) -> Result<usize, StoreError> {
    let store = Store::open_with(
        path,
        key,
        RetainedSet::new(StoreLimits::UNLIMITED),
        Trust::AsIs,
    )?;
    Ok(store.len())
}
