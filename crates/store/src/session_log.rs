//! The embedded [`SessionStore`]: `sessions.log` and its high-water mark in the session
//! folder, sealed like the retained store (`format::SESSIONS`, `logfile.rs`). The log is
//! a sequence of changes (records below); replaying it in order rebuilds the sessions.
//! Every change goes through [`State::apply`] both when it is made and when it is read
//! back, so what a reopened store holds is what the running one held at its last commit.
//! A record that authenticates but does not fit the state before it (a message for a
//! session that does not exist, an acknowledgement of an unknown message) is refused as
//! corrupt: only a bug or the key's holder could have written it.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::format::SESSIONS;
use crate::logfile::{LogFile, Trust};
use crate::record::{self, OpenError, HEADER_LEN, NONCE_LEN, PREFIX_LEN, TAG_LEN};
use crate::session::{
    CommitStats, Delivery, Enqueued, HeldMessage, PendingWill, Purged, QueuedMessage, Session,
    SessionKey, SessionLimits, SessionMeta, SessionStore,
};
use crate::{RetainedKey, StoreError};

/// Bytes a frame adds to its plaintext.
const FRAME_OVERHEAD: u64 = (PREFIX_LEN + NONCE_LEN + TAG_LEN) as u64;
/// Compaction waits until the garbage exceeds this too, so small stores are left alone.
const COMPACT_SLACK_BYTES: u64 = 64 * 1024;

/// One change. Encoded by position (postcard): new kinds go at the end only. `sid` is the
/// session's number in this log, given by its first `Put`.
#[derive(Debug, Serialize, Deserialize)]
enum Rec<'a> {
    Put {
        sid: u64,
        key: Cow<'a, SessionKey>,
        meta: Cow<'a, SessionMeta>,
    },
    Remove {
        sid: u64,
    },
    Message {
        sid: u64,
        id: u64,
        message: Cow<'a, QueuedMessage>,
        delivery: Delivery,
    },
    Sent {
        sid: u64,
        id: u64,
        pkid: u16,
    },
    Released {
        sid: u64,
        id: u64,
    },
    Done {
        sid: u64,
        id: u64,
    },
    Qos2In {
        sid: u64,
        pkid: u16,
    },
    Qos2InDone {
        sid: u64,
        pkid: u16,
    },
    Will {
        sid: u64,
        will: Cow<'a, Option<PendingWill>>,
    },
}

/// A session and what the log needs to know about it.
#[derive(Debug)]
struct Slot {
    sid: u64,
    session: Session,
    next_id: u64,
    /// Messages in `Delivery::Queued` and their `queued_bytes`.
    queued: usize,
    queued_bytes: u64,
    /// Frame bytes of the live records of this session, by what they hold.
    put_frame: u64,
    will_frame: u64,
    message_frames: HashMap<u64, u64>,
    qos2_frames: HashMap<u16, u64>,
}

impl Slot {
    fn frames(&self) -> u64 {
        self.put_frame
            + self.will_frame
            + self.message_frames.values().sum::<u64>()
            + self.qos2_frames.values().sum::<u64>()
    }
}

/// Every session, by key and by number.
#[derive(Debug, Default)]
pub(crate) struct State {
    slots: HashMap<SessionKey, Slot>,
    by_sid: HashMap<u64, SessionKey>,
    next_sid: u64,
    /// Frame bytes of all live records: what a compacted log would hold.
    live_frame_bytes: u64,
}

impl State {
    fn slot(&mut self, sid: u64) -> Result<&mut Slot, String> {
        let key = self
            .by_sid
            .get(&sid)
            .ok_or_else(|| format!("refers to unknown session {sid}"))?;
        Ok(self.slots.get_mut(key).expect("by_sid and slots agree"))
    }

    /// Applies one change; `frame` is the size of the frame holding it.
    fn apply(&mut self, rec: Rec<'_>, frame: u64) -> Result<(), String> {
        match rec {
            Rec::Put { sid, key, meta } => {
                let key = key.into_owned();
                let meta = meta.into_owned();
                if let Some(slot) = self.slots.get_mut(&key) {
                    if slot.sid != sid {
                        return Err(format!("session {sid} put over session {}", slot.sid));
                    }
                    self.live_frame_bytes = self.live_frame_bytes - slot.put_frame + frame;
                    slot.put_frame = frame;
                    slot.session.meta = meta;
                    return Ok(());
                }
                if self.by_sid.contains_key(&sid) {
                    return Err(format!("session {sid} put under another key"));
                }
                self.next_sid = self.next_sid.max(sid + 1);
                self.by_sid.insert(sid, key.clone());
                self.live_frame_bytes += frame;
                self.slots.insert(
                    key.clone(),
                    Slot {
                        sid,
                        session: Session {
                            key,
                            meta,
                            will: None,
                            messages: BTreeMap::new(),
                            qos2_in: Default::default(),
                        },
                        next_id: 0,
                        queued: 0,
                        queued_bytes: 0,
                        put_frame: frame,
                        will_frame: 0,
                        message_frames: HashMap::new(),
                        qos2_frames: HashMap::new(),
                    },
                );
            }
            Rec::Remove { sid } => {
                let key = self
                    .by_sid
                    .remove(&sid)
                    .ok_or_else(|| format!("removes unknown session {sid}"))?;
                let slot = self.slots.remove(&key).expect("by_sid and slots agree");
                self.live_frame_bytes -= slot.frames();
            }
            Rec::Message {
                sid,
                id,
                message,
                delivery,
            } => {
                let message = message.into_owned();
                if message.qos > 2 {
                    return Err(format!("invalid qos {}", message.qos));
                }
                let slot = self.slot(sid)?;
                if slot.session.messages.contains_key(&id) {
                    return Err(format!("message {id} of session {sid} queued twice"));
                }
                if delivery == Delivery::Queued {
                    slot.queued += 1;
                    slot.queued_bytes += message.queued_bytes();
                }
                slot.next_id = slot.next_id.max(id + 1);
                slot.message_frames.insert(id, frame);
                slot.session
                    .messages
                    .insert(id, HeldMessage { message, delivery });
                self.live_frame_bytes += frame;
            }
            Rec::Sent { sid, id, pkid } => {
                let slot = self.slot(sid)?;
                let held = slot
                    .session
                    .messages
                    .get_mut(&id)
                    .ok_or_else(|| format!("sends unknown message {id} of session {sid}"))?;
                if held.delivery == Delivery::Queued {
                    slot.queued -= 1;
                    slot.queued_bytes -= held.message.queued_bytes();
                }
                held.delivery = Delivery::Sent { pkid };
            }
            Rec::Released { sid, id } => {
                let slot = self.slot(sid)?;
                let held = slot
                    .session
                    .messages
                    .get_mut(&id)
                    .ok_or_else(|| format!("releases unknown message {id} of session {sid}"))?;
                held.delivery = match held.delivery {
                    Delivery::Sent { pkid } | Delivery::Released { pkid } => {
                        Delivery::Released { pkid }
                    }
                    Delivery::Queued => {
                        return Err(format!("releases unsent message {id} of session {sid}"))
                    }
                };
            }
            Rec::Done { sid, id } => {
                let slot = self.slot(sid)?;
                let held =
                    slot.session.messages.remove(&id).ok_or_else(|| {
                        format!("completes unknown message {id} of session {sid}")
                    })?;
                if held.delivery == Delivery::Queued {
                    slot.queued -= 1;
                    slot.queued_bytes -= held.message.queued_bytes();
                }
                let f = slot.message_frames.remove(&id).unwrap_or(0);
                self.live_frame_bytes -= f;
            }
            Rec::Qos2In { sid, pkid } => {
                let slot = self.slot(sid)?;
                if !slot.session.qos2_in.insert(pkid) {
                    return Err(format!("incoming pkid {pkid} of session {sid} twice"));
                }
                slot.qos2_frames.insert(pkid, frame);
                self.live_frame_bytes += frame;
            }
            Rec::Qos2InDone { sid, pkid } => {
                let slot = self.slot(sid)?;
                if !slot.session.qos2_in.remove(&pkid) {
                    return Err(format!("releases unknown pkid {pkid} of session {sid}"));
                }
                let f = slot.qos2_frames.remove(&pkid).unwrap_or(0);
                self.live_frame_bytes -= f;
            }
            Rec::Will { sid, will } => {
                let slot = self.slot(sid)?;
                let will = will.into_owned();
                let old = slot.will_frame;
                slot.will_frame = if will.is_some() { frame } else { 0 };
                let new = slot.will_frame;
                slot.session.will = will;
                self.live_frame_bytes = self.live_frame_bytes - old + new;
            }
        }
        Ok(())
    }

    /// The records that rebuild this state, session by session in number order.
    fn snapshot(&self) -> impl Iterator<Item = Rec<'_>> {
        let mut slots: Vec<&Slot> = self.slots.values().collect();
        slots.sort_by_key(|s| s.sid);
        slots.into_iter().flat_map(|slot| {
            let sid = slot.sid;
            let s = &slot.session;
            std::iter::once(Rec::Put {
                sid,
                key: Cow::Borrowed(&s.key),
                meta: Cow::Borrowed(&s.meta),
            })
            .chain(s.will.is_some().then_some(Rec::Will {
                sid,
                will: Cow::Borrowed(&s.will),
            }))
            .chain(s.messages.iter().map(move |(id, held)| Rec::Message {
                sid,
                id: *id,
                message: Cow::Borrowed(&held.message),
                delivery: held.delivery,
            }))
            .chain(
                s.qos2_in
                    .iter()
                    .map(move |pkid| Rec::Qos2In { sid, pkid: *pkid }),
            )
        })
    }

    /// [`State::snapshot`] encoded, ready to be sealed into a fresh log.
    pub(crate) fn snapshot_records(
        &self,
    ) -> impl Iterator<Item = Result<Zeroizing<Vec<u8>>, StoreError>> + '_ {
        self.snapshot().map(|r| record::encode(&r))
    }
}

/// Reads a log's records into a state.
fn replayer(state: &mut State) -> impl FnMut(&[u8], u64) -> Result<(), OpenError> + '_ {
    |plain, frame| {
        let rec: Rec<'static> = record::decode_exact(plain)?;
        state.apply(rec, frame).map_err(OpenError::Decode)
    }
}

/// The embedded, encrypted session store. Not thread-safe by itself (`&mut self`), but
/// `Send`: the broker runs it on a thread of its own.
pub struct SessionLog {
    pub(crate) log: LogFile,
    limits: SessionLimits,
    pub(crate) state: State,
    /// Plaintexts of changes not yet committed, in order.
    pub(crate) pending: Vec<Zeroizing<Vec<u8>>>,
    pending_bytes: u64,
}

impl std::fmt::Debug for SessionLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionLog")
            .field("log_path", &self.log.log_path)
            .field("sessions", &self.state.slots.len())
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl Drop for SessionLog {
    fn drop(&mut self) {
        // Commits write the mark without fsync; make the last one durable at shutdown.
        if let Err(e) = self.log.mark.sync() {
            tracing::warn!(error = %e, "session store: high-water mark not synced");
        }
    }
}

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
        let cipher = record::cipher(&key);
        drop(key);
        let mut state = State::default();
        let log = LogFile::open(dir, cipher, &SESSIONS, trust, replayer(&mut state))?;
        Ok(SessionLog {
            log,
            limits,
            state,
            pending: Vec::new(),
            pending_bytes: 0,
        })
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

    /// Changes the queue bounds (a config reload); what is held stays.
    pub fn set_limits(&mut self, limits: SessionLimits) {
        self.limits = limits;
    }

    /// Path of the log file.
    pub fn log_path(&self) -> &Path {
        &self.log.log_path
    }

    /// Size of the log file as verified and written so far.
    pub fn file_bytes(&self) -> u64 {
        self.log.committed_len
    }

    /// Number of kept sessions.
    pub fn len(&self) -> usize {
        self.state.slots.len()
    }

    /// Whether no session is kept.
    pub fn is_empty(&self) -> bool {
        self.state.slots.is_empty()
    }

    /// Whether the log holds more than about twice the live records (plus a small slack).
    pub fn needs_compaction(&self) -> bool {
        let useful = HEADER_LEN as u64 + self.state.live_frame_bytes;
        self.log.committed_len + self.pending_bytes
            > useful.saturating_mul(2).saturating_add(COMPACT_SLACK_BYTES)
    }

    /// Rewrites the live sessions, pending changes included, into a new log (temporary
    /// file, fsync, rename, directory fsync). A crash at any step leaves either the old or
    /// the new log complete.
    pub fn compact(&mut self) -> Result<CommitStats, StoreError> {
        let records = self.state.snapshot_records();
        let res = self.log.rewrite(records);
        // Past the rename (even if its directory fsync failed) the new file holds it all.
        if res.is_ok() || self.log.needs_dir_sync {
            let n = self.log.next_seq as usize;
            self.pending.clear();
            self.pending_bytes = 0;
            self.state.live_frame_bytes = self.log.committed_len - HEADER_LEN as u64;
            res?;
            return Ok(CommitStats {
                records: n,
                bytes: self.log.committed_len,
                compacted: true,
            });
        }
        res.map(|_| CommitStats::default())
    }

    /// Records a change: applied to memory now, written by the next commit.
    fn change(&mut self, rec: Rec<'_>) -> Result<(), StoreError> {
        let plain = record::encode(&rec)?;
        let frame = plain.len() as u64 + FRAME_OVERHEAD;
        self.state
            .apply(rec, frame)
            .map_err(|e| StoreError::Encode(format!("inconsistent session change: {e}")))?;
        self.pending_bytes += frame;
        self.pending.push(plain);
        Ok(())
    }

    fn sid(&self, key: &SessionKey) -> Option<u64> {
        self.state.slots.get(key).map(|s| s.sid)
    }

    fn held(&self, key: &SessionKey, id: u64) -> Option<(u64, &HeldMessage)> {
        let slot = self.state.slots.get(key)?;
        Some((slot.sid, slot.session.messages.get(&id)?))
    }
}

impl SessionStore for SessionLog {
    fn session(&self, key: &SessionKey) -> Option<&Session> {
        self.state.slots.get(key).map(|s| &s.session)
    }

    fn sessions(&self) -> Box<dyn Iterator<Item = &Session> + '_> {
        Box::new(self.state.slots.values().map(|s| &s.session))
    }

    fn put_session(&mut self, key: &SessionKey, meta: SessionMeta) -> Result<bool, StoreError> {
        let (sid, created) = match self.sid(key) {
            Some(sid) => (sid, false),
            None => (self.state.next_sid, true),
        };
        self.change(Rec::Put {
            sid,
            key: Cow::Borrowed(key),
            meta: Cow::Owned(meta),
        })?;
        Ok(created)
    }

    fn remove_session(&mut self, key: &SessionKey) -> Result<bool, StoreError> {
        let Some(sid) = self.sid(key) else {
            return Ok(false);
        };
        self.change(Rec::Remove { sid })?;
        Ok(true)
    }

    fn enqueue(
        &mut self,
        key: &SessionKey,
        message: QueuedMessage,
    ) -> Result<Enqueued, StoreError> {
        let slot = self
            .state
            .slots
            .get(key)
            .ok_or(StoreError::UnknownSession)?;
        if slot.queued >= self.limits.max_queued_messages {
            return Ok(Enqueued::DroppedMessages);
        }
        if slot.queued_bytes.saturating_add(message.queued_bytes()) > self.limits.max_queued_bytes {
            return Ok(Enqueued::DroppedBytes);
        }
        let (sid, id) = (slot.sid, slot.next_id);
        self.change(Rec::Message {
            sid,
            id,
            message: Cow::Owned(message),
            delivery: Delivery::Queued,
        })?;
        Ok(Enqueued::Queued(id))
    }

    fn mark_sent(&mut self, key: &SessionKey, id: u64, pkid: u16) -> Result<bool, StoreError> {
        let Some((sid, _)) = self.held(key, id) else {
            return Ok(false);
        };
        self.change(Rec::Sent { sid, id, pkid })?;
        Ok(true)
    }

    fn mark_released(&mut self, key: &SessionKey, id: u64) -> Result<bool, StoreError> {
        match self.held(key, id) {
            Some((sid, held)) if held.delivery != Delivery::Queued => {
                self.change(Rec::Released { sid, id })?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn complete(&mut self, key: &SessionKey, id: u64) -> Result<bool, StoreError> {
        let Some((sid, _)) = self.held(key, id) else {
            return Ok(false);
        };
        self.change(Rec::Done { sid, id })?;
        Ok(true)
    }

    fn qos2_in(&mut self, key: &SessionKey, pkid: u16) -> Result<bool, StoreError> {
        match self.state.slots.get(key) {
            Some(slot) if !slot.session.qos2_in.contains(&pkid) => {
                let sid = slot.sid;
                self.change(Rec::Qos2In { sid, pkid })?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn qos2_in_done(&mut self, key: &SessionKey, pkid: u16) -> Result<bool, StoreError> {
        match self.state.slots.get(key) {
            Some(slot) if slot.session.qos2_in.contains(&pkid) => {
                let sid = slot.sid;
                self.change(Rec::Qos2InDone { sid, pkid })?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn set_will(
        &mut self,
        key: &SessionKey,
        will: Option<PendingWill>,
    ) -> Result<bool, StoreError> {
        let Some(sid) = self.sid(key) else {
            return Ok(false);
        };
        self.change(Rec::Will {
            sid,
            will: Cow::Owned(will),
        })?;
        Ok(true)
    }

    fn purge_expired(&mut self, now: u64) -> Result<Purged, StoreError> {
        let mut purged = Purged::default();
        let mut expired: Vec<SessionKey> = self
            .state
            .slots
            .values()
            .filter(|s| s.session.expires_at().is_some_and(|t| t <= now))
            .map(|s| s.session.key.clone())
            .collect();
        expired.sort();
        for key in &expired {
            self.remove_session(key)?;
        }
        purged.sessions = expired;
        let stale: Vec<(SessionKey, u64)> = self
            .state
            .slots
            .values()
            .flat_map(|s| {
                s.session
                    .messages
                    .iter()
                    .filter(move |(_, h)| {
                        h.delivery == Delivery::Queued && h.message.is_expired(now)
                    })
                    .map(move |(id, _)| (s.session.key.clone(), *id))
            })
            .collect();
        for (key, id) in &stale {
            self.complete(key, *id)?;
        }
        purged.messages = stale.len();
        Ok(purged)
    }

    fn commit(&mut self) -> Result<CommitStats, StoreError> {
        if self.pending.is_empty() && !self.log.needs_dir_sync {
            return Ok(CommitStats::default());
        }
        if self.needs_compaction() {
            return self.compact();
        }
        let lens = self.log.append(&self.pending)?;
        self.pending.clear();
        self.pending_bytes = 0;
        Ok(CommitStats {
            records: lens.len(),
            bytes: lens.iter().sum(),
            compacted: false,
        })
    }

    fn pending(&self) -> usize {
        self.pending.len()
    }
}

/// Reads the session store in folder `dir` without writing or creating anything (for
/// `moatmq sessions list` while the broker runs): verified against its high-water mark
/// like [`SessionLog::open`]. A folder without a session store reads as empty.
pub fn read_sessions(dir: &Path, key: &RetainedKey) -> Result<Vec<Session>, StoreError> {
    let cipher = record::cipher(key);
    let mut state = State::default();
    LogFile::inspect(dir, &cipher, &SESSIONS, replayer(&mut state))?;
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
    store.log.rekey_into(&cipher, records)?;
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
