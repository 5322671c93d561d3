//! The state machine of the session store: every session, rebuilt by applying changes
//! ([`Rec`]) in order. Each change goes through [`State::apply`] both when it is made and
//! when it is read back from a log, so what a reopened store holds is what the running
//! one held at its last commit. A change that does not fit the state before it (a
//! message for a session that does not exist, an acknowledgement of an unknown message)
//! is refused: read back from a log it is corruption, since only a bug or the key's
//! holder could have written it.

use std::borrow::Cow;
use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::record::{self, OpenError};
use crate::session::{
    Delivery, HeldMessage, PendingWill, QueuedMessage, Session, SessionKey, SessionMeta,
    SessionStats,
};
use crate::{HeldMessages, StoreError};

/// One change. Encoded by position (postcard): new kinds go at the end only. `sid` is the
/// session's number in this log, given by its first `Put`.
#[derive(Debug, Serialize, Deserialize)]
pub enum Rec<'a> {
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
pub(crate) struct Slot {
    pub(crate) sid: u64,
    pub(crate) session: Session,
    pub(crate) next_id: u64,
    /// Messages in `Delivery::Queued` and their `queued_bytes`.
    pub(crate) queued: usize,
    pub(crate) queued_bytes: u64,
    /// Frame bytes of the live records of this session, by what they hold.
    /// (Each held message keeps its own, [`HeldMessage::frame`].)
    put_frame: u64,
    will_frame: u64,
    qos2_frames: HashMap<u16, u64>,
}

impl Slot {
    fn frames(&self) -> u64 {
        self.put_frame
            + self.will_frame
            + self.session.messages.values().map(|m| m.frame).sum::<u64>()
            + self.qos2_frames.values().sum::<u64>()
    }
}

/// Every session, by key and by number.
#[derive(Debug, Default)]
pub struct State {
    /// By session number: every record names one, so replaying a log hashes a `u64`
    /// per record, not the identity and client id.
    pub(crate) slots: HashMap<u64, Slot>,
    by_key: HashMap<SessionKey, u64>,
    pub(crate) next_sid: u64,
    /// Frame bytes of all live records: what a compacted log would hold. An estimate
    /// (a record compacted may take a few bytes more than when it was written), so
    /// what a record gives back never takes it below zero.
    pub(crate) live_frame_bytes: u64,
}

impl State {
    fn slot(&mut self, sid: u64) -> Result<&mut Slot, String> {
        self.slots
            .get_mut(&sid)
            .ok_or_else(|| format!("refers to unknown session {sid}"))
    }

    /// The slot of the session of `key`.
    pub(crate) fn get(&self, key: &SessionKey) -> Option<&Slot> {
        self.slots.get(self.by_key.get(key)?)
    }

    /// Applies one change; `frame` is the size of the frame holding it.
    pub(crate) fn apply(&mut self, rec: Rec<'_>, frame: u64) -> Result<(), String> {
        match rec {
            Rec::Put { sid, key, meta } => {
                let key = key.into_owned();
                let meta = meta.into_owned();
                if let Some(&known) = self.by_key.get(&key) {
                    if known != sid {
                        return Err(format!("session {sid} put over session {known}"));
                    }
                    let slot = self
                        .slots
                        .get_mut(&sid)
                        .ok_or_else(|| format!("session {sid} has a key but no slot"))?;
                    self.live_frame_bytes =
                        self.live_frame_bytes.saturating_sub(slot.put_frame) + frame;
                    slot.put_frame = frame;
                    slot.session.meta = meta;
                    return Ok(());
                }
                if self.slots.contains_key(&sid) {
                    return Err(format!("session {sid} put under another key"));
                }
                self.next_sid = self.next_sid.max(sid + 1);
                self.by_key.insert(key.clone(), sid);
                self.live_frame_bytes += frame;
                self.slots.insert(
                    sid,
                    Slot {
                        sid,
                        session: Session {
                            key,
                            meta,
                            will: None,
                            messages: HeldMessages::default(),
                            qos2_in: Default::default(),
                        },
                        next_id: 0,
                        queued: 0,
                        queued_bytes: 0,
                        put_frame: frame,
                        will_frame: 0,
                        qos2_frames: HashMap::new(),
                    },
                );
            }
            Rec::Remove { sid } => {
                let slot = self
                    .slots
                    .remove(&sid)
                    .ok_or_else(|| format!("removes unknown session {sid}"))?;
                self.by_key.remove(&slot.session.key);
                self.live_frame_bytes = self.live_frame_bytes.saturating_sub(slot.frames());
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
                let bytes = message.queued_bytes();
                // Held and checked for a duplicate id in one step: ids grow, so this
                // appends without a search (replaying a log is mostly this).
                let held = HeldMessage {
                    message,
                    delivery,
                    frame,
                };
                if slot.session.messages.insert_new(id, held).is_err() {
                    return Err(format!("message {id} of session {sid} queued twice"));
                }
                if delivery == Delivery::Queued {
                    slot.queued += 1;
                    slot.queued_bytes += bytes;
                }
                slot.next_id = slot.next_id.max(id + 1);
                self.live_frame_bytes += frame;
            }
            Rec::Sent { sid, id, pkid } => {
                let slot = self.slot(sid)?;
                let held = held_mut(&mut slot.session.messages, sid, id, "sends")?;
                if held.delivery == Delivery::Queued {
                    slot.queued -= 1;
                    slot.queued_bytes -= held.message.queued_bytes();
                }
                held.delivery = Delivery::Sent { pkid };
            }
            Rec::Released { sid, id } => {
                let slot = self.slot(sid)?;
                let held = held_mut(&mut slot.session.messages, sid, id, "releases")?;
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
                self.live_frame_bytes = self.live_frame_bytes.saturating_sub(held.frame);
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
                self.live_frame_bytes = self.live_frame_bytes.saturating_sub(f);
            }
            Rec::Will { sid, will } => {
                let slot = self.slot(sid)?;
                let will = will.into_owned();
                let old = slot.will_frame;
                slot.will_frame = if will.is_some() { frame } else { 0 };
                let new = slot.will_frame;
                slot.session.will = will;
                self.live_frame_bytes = self.live_frame_bytes.saturating_sub(old) + new;
            }
        }
        Ok(())
    }

    /// Totals over every session.
    pub(crate) fn stats(&self) -> SessionStats {
        let mut stats = SessionStats {
            sessions: self.slots.len(),
            ..SessionStats::default()
        };
        for slot in self.slots.values() {
            stats.held_messages += slot.session.messages.len();
            stats.queued_messages += slot.queued;
            stats.queued_bytes += slot.queued_bytes;
        }
        stats
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
pub(crate) fn replayer(state: &mut State) -> impl FnMut(&[u8], u64) -> Result<(), OpenError> + '_ {
    |plain, frame| {
        let rec: Rec<'static> = record::decode_exact(plain)?;
        state.apply(rec, frame).map_err(OpenError::Decode)
    }
}

/// Message `id` of session `sid` among `messages`; `what` names the record in the error.
fn held_mut<'a>(
    messages: &'a mut HeldMessages,
    sid: u64,
    id: u64,
    what: &str,
) -> Result<&'a mut HeldMessage, String> {
    messages
        .get_mut(&id)
        .ok_or_else(|| format!("{what} unknown message {id} of session {sid}"))
}
