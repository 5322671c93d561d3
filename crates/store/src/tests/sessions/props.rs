//! Random sequences of every session-store operation, commits, compactions, clean
//! reopens and crashes (a drop without commit), checked against a plain model after
//! every step: the running store equals the model, a reopen equals the model as of the
//! last commit.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;
use crate::{Delivery, Enqueued, PendingWill};

const KEYS: usize = 3;
const SMALL: SessionLimits = SessionLimits {
    max_queued_messages: 4,
    max_queued_bytes: 40,
};

#[derive(Debug, Clone)]
enum Op {
    Put(usize, u8),
    Remove(usize),
    Enqueue(usize, u8, usize, u8, bool),
    /// A message forwarded to a connected client: queued and marked sent at once (the
    /// broker's `sent`), which the log may drop again if it is done before the commit.
    Forward(usize, usize, u16),
    Sent(usize, usize, u16),
    Released(usize, usize),
    Done(usize, usize),
    Qos2In(usize, u16),
    Qos2InDone(usize, u16),
    Will(usize, bool),
    Purge(u64),
    Commit,
    Compact,
    Reopen,
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    let k = 0..KEYS;
    prop_oneof![
        3 => (k.clone(), 0u8..4).prop_map(|(k, v)| Op::Put(k, v)),
        1 => k.clone().prop_map(Op::Remove),
        6 => (k.clone(), 0u8..3, 0usize..20, 0u8..3, any::<bool>())
            .prop_map(|(k, t, n, q, e)| Op::Enqueue(k, t, n, q, e)),
        4 => (k.clone(), 0usize..10, 1u16..5).prop_map(|(k, n, p)| Op::Forward(k, n, p)),
        3 => (k.clone(), 0usize..8, 1u16..5).prop_map(|(k, i, p)| Op::Sent(k, i, p)),
        1 => (k.clone(), 0usize..8).prop_map(|(k, i)| Op::Released(k, i)),
        5 => (k.clone(), 0usize..8).prop_map(|(k, i)| Op::Done(k, i)),
        2 => (k.clone(), 1u16..4).prop_map(|(k, p)| Op::Qos2In(k, p)),
        1 => (k.clone(), 1u16..4).prop_map(|(k, p)| Op::Qos2InDone(k, p)),
        1 => (k, any::<bool>()).prop_map(|(k, w)| Op::Will(k, w)),
        1 => (0u64..300).prop_map(Op::Purge),
        3 => Just(Op::Commit),
        1 => Just(Op::Compact),
        1 => Just(Op::Reopen),
        1 => Just(Op::Crash),
    ]
}

fn key_of(i: usize) -> SessionKey {
    [
        skey(None, "c"),
        skey(Some("u"), "c"),
        skey(Some("v"), "other"),
    ][i]
        .clone()
}

fn meta_of(v: u8) -> SessionMeta {
    let mut m = meta(&["a/#", "b"][..(v as usize % 3).min(2)]);
    if v >= 2 {
        m.disconnected_at = Some(100);
        m.expiry_interval = 50 * u64::from(v);
    }
    m
}

#[derive(Debug, Clone, Default, PartialEq)]
struct MSession {
    meta: SessionMeta,
    will: Option<PendingWill>,
    messages: Vec<(QueuedMessage, Delivery)>,
    qos2: BTreeSet<u16>,
}

type Model = BTreeMap<SessionKey, MSession>;

fn view(store: &dyn SessionStore) -> Model {
    store
        .sessions()
        .map(|s| {
            (
                s.key.clone(),
                MSession {
                    meta: s.meta.clone(),
                    will: s.will.clone(),
                    messages: s
                        .messages
                        .values()
                        .map(|h| (h.message.clone(), h.delivery))
                        .collect(),
                    qos2: s.qos2_in.clone(),
                },
            )
        })
        .collect()
}

/// The id of the `i`th held message (modulo their number), if any.
fn nth_id(store: &dyn SessionStore, k: &SessionKey, i: usize) -> Option<(usize, u64)> {
    let s = store.session(k)?;
    let n = s.messages.len();
    (n > 0).then(|| {
        let at = i % n;
        (at, *s.messages.keys().nth(at).unwrap())
    })
}

/// Applies one state operation (not a commit, compaction, reopen or crash) to the store
/// and the model, checking what the store answers; `false` for the other operations.
fn step(store: &mut dyn SessionStore, model: &mut Model, op: &Op) -> Result<bool, TestCaseError> {
    match *op {
        Op::Put(k, v) => {
            let created = store.put_session(&key_of(k), meta_of(v)).unwrap();
            prop_assert_eq!(created, !model.contains_key(&key_of(k)));
            model.entry(key_of(k)).or_default().meta = meta_of(v);
        }
        Op::Remove(k) => {
            let removed = store.remove_session(&key_of(k)).unwrap();
            prop_assert_eq!(removed, model.remove(&key_of(k)).is_some());
        }
        Op::Enqueue(k, t, n, qos, expires) => {
            let msg = QueuedMessage {
                qos,
                expires_at: expires.then_some(150),
                ..qmsg(["a/1", "b", "a/2/3"][t as usize], &"x".repeat(n))
            };
            let got = store.enqueue(&key_of(k), msg.clone());
            match model.get_mut(&key_of(k)) {
                None => prop_assert!(matches!(got, Err(StoreError::UnknownSession))),
                Some(m) => {
                    let queued: Vec<&QueuedMessage> = m
                        .messages
                        .iter()
                        .filter(|(_, d)| *d == Delivery::Queued)
                        .map(|(m, _)| m)
                        .collect();
                    let bytes: u64 = queued.iter().map(|m| m.queued_bytes()).sum();
                    let got = got.unwrap();
                    if queued.len() >= SMALL.max_queued_messages {
                        prop_assert_eq!(got, Enqueued::DroppedMessages);
                    } else if bytes + msg.queued_bytes() > SMALL.max_queued_bytes {
                        prop_assert_eq!(got, Enqueued::DroppedBytes);
                    } else {
                        prop_assert!(matches!(got, Enqueued::Queued(_)));
                        m.messages.push((msg, Delivery::Queued));
                    }
                }
            }
        }
        Op::Forward(k, n, pkid) => {
            let key = key_of(k);
            let msg = QueuedMessage {
                qos: 1,
                ..qmsg("a/f", &"f".repeat(n))
            };
            let got = store.enqueue(&key, msg.clone());
            match model.get_mut(&key) {
                None => prop_assert!(matches!(got, Err(StoreError::UnknownSession))),
                Some(m) => {
                    // Dropped by the queue bounds (checked in `Enqueue`) or queued.
                    if let Enqueued::Queued(id) = got.unwrap() {
                        prop_assert!(store.mark_sent(&key, id, pkid).unwrap());
                        m.messages.push((msg, Delivery::Sent { pkid }));
                    }
                }
            }
        }
        Op::Sent(k, i, pkid) => {
            let key = key_of(k);
            let target = nth_id(store, &key, i);
            let id = target.map_or(u64::MAX, |t| t.1);
            prop_assert_eq!(store.mark_sent(&key, id, pkid).unwrap(), target.is_some());
            if let Some((at, _)) = target {
                model.get_mut(&key).unwrap().messages[at].1 = Delivery::Sent { pkid };
            }
        }
        Op::Released(k, i) => {
            let key = key_of(k);
            let target = nth_id(store, &key, i);
            let id = target.map_or(u64::MAX, |t| t.1);
            let done = store.mark_released(&key, id).unwrap();
            let mut expect = false;
            if let Some((at, _)) = target {
                let d = &mut model.get_mut(&key).unwrap().messages[at].1;
                if let Delivery::Sent { pkid } | Delivery::Released { pkid } = *d {
                    *d = Delivery::Released { pkid };
                    expect = true;
                }
            }
            prop_assert_eq!(done, expect);
        }
        Op::Done(k, i) => {
            let key = key_of(k);
            let target = nth_id(store, &key, i);
            let id = target.map_or(u64::MAX, |t| t.1);
            prop_assert_eq!(store.complete(&key, id).unwrap(), target.is_some());
            if let Some((at, _)) = target {
                model.get_mut(&key).unwrap().messages.remove(at);
            }
        }
        Op::Qos2In(k, pkid) => {
            let got = store.qos2_in(&key_of(k), pkid).unwrap();
            let expect = model
                .get_mut(&key_of(k))
                .is_some_and(|m| m.qos2.insert(pkid));
            prop_assert_eq!(got, expect);
        }
        Op::Qos2InDone(k, pkid) => {
            let got = store.qos2_in_done(&key_of(k), pkid).unwrap();
            let expect = model
                .get_mut(&key_of(k))
                .is_some_and(|m| m.qos2.remove(&pkid));
            prop_assert_eq!(got, expect);
        }
        Op::Will(k, set) => {
            let will = set.then(|| PendingWill {
                message: qmsg("w", "bye"),
                publish_at: 7,
            });
            let got = store.set_will(&key_of(k), will.clone()).unwrap();
            let m = model.get_mut(&key_of(k));
            prop_assert_eq!(got, m.is_some());
            if let Some(m) = m {
                m.will = will;
            }
        }
        Op::Purge(now) => {
            let purged = store.purge_expired(now).unwrap();
            let gone: Vec<SessionKey> = model
                .iter()
                .filter(|(_, s)| {
                    s.meta
                        .disconnected_at
                        .is_some_and(|t| t + s.meta.expiry_interval <= now)
                })
                .map(|(k, _)| k.clone())
                .collect();
            for k in &gone {
                model.remove(k);
            }
            prop_assert_eq!(&purged.sessions, &gone);
            let mut n = 0;
            for s in model.values_mut() {
                let before = s.messages.len();
                s.messages.retain(|(m, d)| {
                    !(*d == Delivery::Queued && m.expires_at.is_some_and(|t| t <= now))
                });
                n += before - s.messages.len();
            }
            prop_assert_eq!(purged.messages, n);
        }
        Op::Commit | Op::Compact | Op::Reopen | Op::Crash => return Ok(false),
    }
    Ok(true)
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let reopen = || SessionLog::open(dir.path(), key(), SMALL).unwrap();
    let mut store = reopen();
    let mut model = Model::new();
    let mut committed = Model::new();
    for op in ops {
        if step(&mut store, &mut model, &op)? {
            prop_assert_eq!(&view(&store), &model);
            continue;
        }
        match op {
            Op::Commit => {
                store.commit().unwrap();
                committed = model.clone();
            }
            Op::Compact => {
                store.compact().unwrap();
                committed = model.clone();
            }
            Op::Reopen => {
                store.commit().unwrap();
                committed = model.clone();
                drop(store);
                store = reopen();
            }
            Op::Crash => {
                drop(store);
                store = reopen();
                model = committed.clone();
            }
            _ => unreachable!("state operations are stepped above"),
        }
        prop_assert_eq!(&view(&store), &model);
    }
    drop(store);
    prop_assert_eq!(&view(&reopen()), &committed);
    // The read-only listing agrees.
    let listed: Vec<SessionKey> = crate::read_sessions(dir.path(), &key())
        .unwrap()
        .into_iter()
        .map(|s| s.key)
        .collect();
    prop_assert_eq!(listed, committed.keys().cloned().collect::<Vec<_>>());
    Ok(())
}

/// The in-memory backend follows the same model; its commits write nothing.
fn run_memory(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut store = crate::MemorySessions::new(SMALL);
    let mut model = Model::new();
    for op in ops {
        if !step(&mut store, &mut model, &op)? {
            prop_assert_eq!(store.commit().unwrap(), crate::CommitStats::default());
        }
        prop_assert_eq!(store.pending(), 0);
        prop_assert_eq!(&view(&store), &model);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn random_operations_reopen_to_the_model(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops)?;
    }

    #[test]
    fn memory_backend_follows_the_model(ops in proptest::collection::vec(op(), 1..60)) {
        run_memory(ops)?;
    }
}

/// A record that authenticates but contradicts the state before it is refused as
/// corrupt, naming the record: only a bug or the key's holder could have written it.
#[test]
fn authentic_but_inconsistent_record_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let k = skey(None, "c");
    let mut s = open(dir.path()).unwrap();
    s.put_session(&k, meta(&[])).unwrap();
    s.commit().unwrap();
    // Append a `Done` for a message that was never queued, sealed like any record.
    s.journal.pending.push(&(5u32, 0u64, 99u64)).unwrap(); // Rec::Done { sid: 0, id: 99 }
    s.commit().unwrap();
    drop(s);
    match open(dir.path()).unwrap_err() {
        StoreError::Corrupt { reason, file, .. } => {
            assert!(reason.contains("record 1"), "{reason}");
            assert!(reason.contains("unknown message 99"), "{reason}");
            assert!(file.ends_with("sessions.log"));
        }
        other => panic!("{other:?}"),
    }
}
