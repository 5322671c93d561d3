//! The embedded [`SessionStore`](crate::SessionStore): `sessions.log` and its
//! high-water mark in the session folder, sealed like the retained store
//! (`format::SESSIONS`, `logfile.rs`). The log is the sequence of the state machine's
//! changes (`session_state.rs`); replaying it in order rebuilds the sessions. A commit
//! appends the changes made since the last one with one fsync, or, when the log has
//! grown past about twice its live records, rewrites it (compaction).

use std::collections::HashMap;
use std::path::Path;

use crate::format::SESSIONS;
use crate::logfile::{LogFile, Trust};
use crate::record::{self, Pending, HEADER_LEN};
use crate::session::{CommitStats, Session, SessionLimits};
use crate::session_state::{replayer, Rec, State};
use crate::sessions::{Journal, Sessions};
use crate::store::COMPACT_SLACK_BYTES;
use crate::{RetainedKey, StoreError};

/// The journal of [`SessionLog`]: the encrypted log and the changes not yet in it.
pub struct LogJournal {
    pub(crate) log: LogFile,
    /// Plaintexts of changes not yet committed, in order.
    pub(crate) pending: Pending,
    pending_bytes: u64,
    /// Forwards to a connected client whose records are all still pending, by (session,
    /// message): the indexes of their `Message`, `Sent` (and `Released`) records. If the
    /// client acknowledges before the commit, none of them is written, nor the `Done`
    /// ([`Journal::forget`]): with `autosave_interval` > 0 a subscriber that keeps up
    /// costs the log nothing.
    unwritten: HashMap<(u64, u64), Unwritten>,
    /// The last `Message` record pending, with its index: a `Sent` for it right after
    /// makes it a forward ([`LogJournal::unwritten`]).
    last_message: Option<(u64, u64, usize)>,
    /// The forward whose record was pushed last, for [`Journal::unrecord`].
    last_tracked: Option<(u64, u64)>,
}

/// The pending records of one forward (at most [`Unwritten::MAX`]).
#[derive(Debug, Clone, Copy)]
struct Unwritten {
    records: [usize; Unwritten::MAX],
    len: usize,
}

impl Unwritten {
    /// `Message`, `Sent`, `Released` and one more (a resend): a forward with more
    /// records than that is written as usual.
    const MAX: usize = 4;

    fn indexes(&self) -> &[usize] {
        &self.records[..self.len]
    }
}

impl std::fmt::Debug for LogJournal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogJournal")
            .field("log", &self.log)
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl Drop for LogJournal {
    fn drop(&mut self) {
        // Commits write the mark without fsync; make the last one durable at shutdown.
        if let Err(e) = self.log.mark.sync() {
            tracing::warn!(error = %e, "session store: high-water mark not synced");
        }
    }
}

impl LogJournal {
    fn needs_compaction(&self, state: &State) -> bool {
        let useful = HEADER_LEN as u64 + state.live_frame_bytes;
        self.log.committed_len + self.pending_bytes
            > useful.saturating_mul(2).saturating_add(COMPACT_SLACK_BYTES)
    }

    fn compact(&mut self, state: &mut State) -> Result<CommitStats, StoreError> {
        let before = self.log.file_id;
        let res = self.log.rewrite(state.snapshot_records());
        // Past the rename (even if its directory fsync failed) the new file holds it all.
        if self.log.file_id == before {
            res?;
            return Ok(CommitStats::default());
        }
        self.clear_pending();
        state.live_frame_bytes = self.log.committed_len - HEADER_LEN as u64;
        let records = res?;
        Ok(CommitStats {
            records,
            bytes: self.log.committed_len,
            compacted: true,
        })
    }
}

impl LogJournal {
    fn clear_pending(&mut self) {
        self.pending.clear();
        self.pending_bytes = 0;
        self.unwritten.clear();
        self.last_message = None;
        self.last_tracked = None;
    }

    /// Notes where the records of a forward are while they are pending.
    fn track(&mut self, rec: &Rec<'_>, index: usize) {
        self.last_tracked = None;
        match *rec {
            Rec::Message { sid, id, .. } => self.last_message = Some((sid, id, index)),
            Rec::Sent { sid, id, .. }
                if self.last_message.is_some_and(|m| (m.0, m.1) == (sid, id)) =>
            {
                let message = self.last_message.take().map_or(0, |m| m.2);
                let mut records = [0; Unwritten::MAX];
                records[..2].copy_from_slice(&[message, index]);
                self.unwritten
                    .insert((sid, id), Unwritten { records, len: 2 });
                self.last_tracked = Some((sid, id));
            }
            Rec::Sent { sid, id, .. } | Rec::Released { sid, id } => {
                if let Some(u) = self.unwritten.get_mut(&(sid, id)) {
                    if u.len < Unwritten::MAX {
                        u.records[u.len] = index;
                        u.len += 1;
                        self.last_tracked = Some((sid, id));
                    } else {
                        // Too many to follow: every record of it is written, and so is
                        // its `Done`.
                        self.unwritten.remove(&(sid, id));
                    }
                }
            }
            _ => {}
        }
    }
}

impl Journal for LogJournal {
    fn record(&mut self, rec: &Rec<'_>) -> Result<u64, StoreError> {
        let index = self.pending.next_index();
        let frame = record::batched_len(self.pending.push(rec)?);
        self.pending_bytes += frame;
        self.track(rec, index);
        Ok(frame)
    }

    fn unrecord(&mut self) {
        let index = self.pending.next_index().checked_sub(1);
        if let Some(len) = self.pending.pop() {
            self.pending_bytes -= record::batched_len(len);
        }
        if self.last_message.is_some_and(|m| Some(m.2) == index) {
            self.last_message = None;
        }
        if let Some(key) = self.last_tracked.take() {
            if let Some(u) = self.unwritten.get_mut(&key) {
                if u.len > 0 && Some(u.records[u.len - 1]) == index {
                    u.len -= 1;
                }
                if u.len < 2 {
                    self.unwritten.remove(&key);
                }
            }
        }
    }

    fn forget(&mut self, sid: u64, id: u64) -> bool {
        let Some(u) = self.unwritten.remove(&(sid, id)) else {
            return false;
        };
        for &i in u.indexes() {
            if let Some(len) = self.pending.kill(i) {
                self.pending_bytes -= record::batched_len(len);
            }
        }
        if self.last_message.is_some_and(|m| (m.0, m.1) == (sid, id)) {
            self.last_message = None;
        }
        true
    }

    fn commit(&mut self, state: &mut State) -> Result<CommitStats, StoreError> {
        if self.pending.is_empty() && !self.log.needs_dir_sync {
            return Ok(CommitStats::default());
        }
        if self.needs_compaction(state) {
            return self.compact(state);
        }
        let records = self.pending.len();
        let bytes = self.log.append(self.pending.records())?;
        self.clear_pending();
        Ok(CommitStats {
            records,
            bytes,
            compacted: false,
        })
    }

    fn pending(&self) -> usize {
        self.pending.len()
    }
}

/// The embedded, encrypted session store: `sessions.log` beside the retained store.
pub type SessionLog = Sessions<LogJournal>;

impl SessionLog {
    /// Opens (or creates, mode 0700) the session folder `dir`, reads and verifies
    /// `sessions.log` against its high-water mark and rebuilds the sessions. A torn last
    /// record past the mark is cut off with a warning; every other defect is an error
    /// naming the file (and the record where there is one).
    pub fn open(
        dir: &Path,
        key: RetainedKey,
        limits: SessionLimits,
    ) -> Result<SessionLog, StoreError> {
        SessionLog::open_with(dir, key, limits, Trust::Checked)
    }

    fn open_with(
        dir: &Path,
        key: RetainedKey,
        limits: SessionLimits,
        trust: Trust,
    ) -> Result<SessionLog, StoreError> {
        let mut state = State::default();
        let mut replay = replayer(&mut state);
        // Each record counted as the current format counts it, whatever the log's
        // version: an older log is rewritten in the current one below, and a record's
        // size from the old log would then be more than it takes (the sizes are what
        // is subtracted when the record goes).
        let log = LogFile::open(dir, key, &SESSIONS, trust, move |plain, _| {
            replay(plain, record::batched_len(plain.len()))
        })?;
        let journal = LogJournal {
            log,
            pending: Pending::default(),
            pending_bytes: 0,
            unwritten: HashMap::new(),
            last_message: None,
            last_tracked: None,
        };
        let mut store = Sessions::with(state, limits, journal);
        if store.journal.log.version < SESSIONS.version {
            // Records appended to an older log must be sealed as its version says, and
            // that framing is the slower one: rewrite it in the current version now.
            tracing::info!(file = %store.journal.log.log_path.display(), "rewriting session store in format version {}", SESSIONS.version);
            store.compact()?;
        }
        Ok(store)
    }

    /// Whether folder `dir` holds a session store (its log or its high-water mark):
    /// tools check this rather than let [`SessionLog::open`] create one.
    pub fn exists_in(dir: &Path) -> bool {
        dir.join(SESSIONS.log_name).exists() || dir.join(SESSIONS.mark_name).exists()
    }

    /// Opens the store taking the log as it is (tests of what a later open refuses).
    #[cfg(test)]
    pub(crate) fn open_for_test_as_is(dir: &Path) -> SessionLog {
        SessionLog::open_with(
            dir,
            crate::tests::key(),
            SessionLimits::UNLIMITED,
            Trust::AsIs,
        )
        .unwrap()
    }

    /// Path of the log file.
    pub fn log_path(&self) -> &Path {
        &self.journal.log.log_path
    }

    /// Size of the log file as verified and written so far.
    pub fn file_bytes(&self) -> u64 {
        self.journal.log.committed_len
    }

    /// Whether the log holds more than about twice the live records (plus a small slack).
    pub fn needs_compaction(&self) -> bool {
        self.journal.needs_compaction(&self.state)
    }

    /// Rewrites the live sessions, pending changes included, into a new log (temporary
    /// file, fsync, rename, directory fsync). A crash at any step leaves either the old or
    /// the new log complete.
    pub fn compact(&mut self) -> Result<CommitStats, StoreError> {
        self.journal.compact(&mut self.state)
    }
}

/// Reads the session store in folder `dir` without writing or creating anything (for
/// `moatmq sessions list` while the broker runs): verified against its high-water mark
/// like [`SessionLog::open`]. A folder without a session store reads as empty.
pub fn read_sessions(dir: &Path, key: &RetainedKey) -> Result<Vec<Session>, StoreError> {
    let cipher = record::cipher(key);
    let mut attempts = 0;
    let state = loop {
        let mut state = State::default();
        match LogFile::inspect(dir, &cipher, &SESSIONS, replayer(&mut state)) {
            Ok(()) => break state,
            // A compaction can rename its new log into place between our reading the
            // mark and opening the log: read both again before calling it a rollback.
            Err(StoreError::RolledBack { .. }) if attempts < 2 => attempts += 1,
            Err(e) => return Err(e),
        }
    };
    let mut out: Vec<Session> = state.slots.into_values().map(|s| s.session).collect();
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}

/// Re-encrypts the session store in `dir` from `old` to `new` (verifying every record
/// under `old` first) and returns the number of sessions kept; crash-safe like the
/// retained store's [`rekey`](crate::rekey).
pub fn rekey_sessions(
    dir: &Path,
    old: RetainedKey,
    new: &RetainedKey,
) -> Result<usize, StoreError> {
    let mut store = SessionLog::open(dir, old, SessionLimits::UNLIMITED)?;
    let n = store.len();
    let cipher = record::cipher(new);
    let records = store.state.snapshot_records();
    store.journal.log.rekey_into(&cipher, records)?;
    Ok(n)
}

/// Takes the session store in `dir` as it is, for when [`SessionLog::open`] refused it as
/// truncated, rolled back or without its high-water mark (`moatmq sessions accept`):
/// every record present must still authenticate; the mark is rewritten to match.
/// Returns the number of sessions kept.
pub fn accept_sessions(dir: &Path, key: RetainedKey) -> Result<usize, StoreError> {
    let store = SessionLog::open_with(dir, key, SessionLimits::UNLIMITED, Trust::AsIs)?;
    Ok(store.len())
}
