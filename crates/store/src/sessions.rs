//! One session state machine ([`State`]) behind [`SessionStore`], and a [`Journal`]
//! saying where its changes go besides memory: the encrypted log
//! ([`SessionLog`](crate::SessionLog)) or nowhere ([`MemorySessions`], for a broker
//! without a store: the same rules, and `commit` is a no-op).
//!
//! How a call decides: a call naming a session or message that is not kept changes
//! nothing; a message is dropped (newest first) when its session's queue already holds
//! `max_queued_messages` not-yet-sent messages or `max_queued_bytes` of them; otherwise
//! the change is encoded by the journal, applied to the state, and handed to the journal
//! to be made durable by the next commit.

use std::borrow::Cow;

use crate::session::{
    CommitStats, Delivery, Enqueued, HeldMessage, PendingWill, Purged, QueuedMessage, Session,
    SessionKey, SessionLimits, SessionMeta, SessionStats, SessionStore,
};
use crate::session_state::{Rec, State};
use crate::StoreError;

/// Where a session store's changes go besides memory. Implemented only in this crate
/// (the log and the memory backend).
pub trait Journal: Send {
    /// Keeps `rec` for the next commit; returns the bytes it will take in the file (0
    /// without one).
    fn record(&mut self, rec: &Rec<'_>) -> Result<u64, StoreError>;
    /// Takes back the change just recorded (the state refused it).
    fn unrecord(&mut self);
    /// Makes every change pushed so far durable.
    fn commit(&mut self, state: &mut State) -> Result<CommitStats, StoreError>;
    /// Changes pushed and not yet committed.
    fn pending(&self) -> usize;
    /// Message `id` of session `sid` is done. If it was a forward whose records are all
    /// still pending, they are dropped and `true` returned: its `Done` need not be
    /// recorded either (the message was acknowledged before it was ever written).
    fn forget(&mut self, _sid: u64, _id: u64) -> bool {
        false
    }
}

/// Persistent sessions in memory and, through its journal `J`, wherever they are kept.
/// Use it through [`SessionStore`]; named as [`SessionLog`](crate::SessionLog) or
/// [`MemorySessions`]. Not thread-safe by itself (`&mut self`), but `Send`: the broker
/// runs it on a thread of its own.
pub struct Sessions<J> {
    pub(crate) state: State,
    limits: SessionLimits,
    pub(crate) journal: J,
}

impl<J> std::fmt::Debug for Sessions<J> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("sessions", &self.state.slots.len())
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// The journal of a store without a file: nothing to write, nothing pending.
#[derive(Debug, Default)]
pub struct NoJournal;

impl Journal for NoJournal {
    fn record(&mut self, _: &Rec<'_>) -> Result<u64, StoreError> {
        Ok(0)
    }

    fn unrecord(&mut self) {}

    fn commit(&mut self, _: &mut State) -> Result<CommitStats, StoreError> {
        Ok(CommitStats::default())
    }

    fn pending(&self) -> usize {
        0
    }
}

/// Sessions kept in memory only (no `[retained]` store configured): the same state
/// machine and bounds as [`SessionLog`](crate::SessionLog), lost at exit.
pub type MemorySessions = Sessions<NoJournal>;

impl MemorySessions {
    /// An empty in-memory store bounded by `limits`.
    pub fn new(limits: SessionLimits) -> MemorySessions {
        Sessions::with(State::default(), limits, NoJournal)
    }
}

impl<J: Journal> Sessions<J> {
    pub(crate) fn with(state: State, limits: SessionLimits, journal: J) -> Sessions<J> {
        Sessions {
            state,
            limits,
            journal,
        }
    }

    /// Changes the queue bounds (a config reload); what is held stays.
    pub fn set_limits(&mut self, limits: SessionLimits) {
        self.limits = limits;
    }

    /// Number of kept sessions.
    pub fn len(&self) -> usize {
        self.state.slots.len()
    }

    /// Whether no session is kept.
    pub fn is_empty(&self) -> bool {
        self.state.slots.is_empty()
    }

    /// Records a change: applied to memory now, written by the next commit.
    fn change(&mut self, rec: Rec<'_>) -> Result<(), StoreError> {
        if let Rec::Done { sid, id } = rec {
            if self.journal.forget(sid, id) {
                return self
                    .state
                    .apply(rec, 0)
                    .map_err(|e| StoreError::Encode(format!("inconsistent session change: {e}")));
            }
        }
        let frame = self.journal.record(&rec)?;
        self.state.apply(rec, frame).map_err(|e| {
            self.journal.unrecord();
            StoreError::Encode(format!("inconsistent session change: {e}"))
        })
    }

    fn sid(&self, key: &SessionKey) -> Option<u64> {
        self.state.get(key).map(|s| s.sid)
    }

    fn held(&self, key: &SessionKey, id: u64) -> Option<(u64, &HeldMessage)> {
        let slot = self.state.get(key)?;
        Some((slot.sid, slot.session.messages.get(&id)?))
    }
}

impl<J: Journal> SessionStore for Sessions<J> {
    fn session(&self, key: &SessionKey) -> Option<&Session> {
        self.state.get(key).map(|s| &s.session)
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
        let slot = self.state.get(key).ok_or(StoreError::UnknownSession)?;
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
        match self.state.get(key) {
            Some(slot) if !slot.session.qos2_in.contains(&pkid) => {
                let sid = slot.sid;
                self.change(Rec::Qos2In { sid, pkid })?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn qos2_in_done(&mut self, key: &SessionKey, pkid: u16) -> Result<bool, StoreError> {
        match self.state.get(key) {
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
        self.journal.commit(&mut self.state)
    }

    fn pending(&self) -> usize {
        self.journal.pending()
    }

    fn stats(&self) -> SessionStats {
        self.state.stats()
    }
}
