//! The values of the handoff bucket `<base>_handoff` (docs/cluster.md, "Session
//! handoff"): a session, postcard-encoded and sealed at its key (associated data: bucket
//! and key). A session too large for one NATS message (the server's `max_payload`)
//! brings the rest of its messages in parts at `<key>.<n>`, each sealed at its own key
//! and naming the value's revision and its index, put before the value that names them.

use super::owner::Buckets;
use crate::durable::Exchanges;
use async_nats::jetstream::kv;
use moatmq_store::{ClusterSeal, QueuedMessage, SessionKey, SessionMeta};
use serde::{Deserialize, Serialize};

/// A session's messages: `true` for one sent before without an acknowledgement.
pub(super) type Messages = Vec<(QueuedMessage, bool)>;

/// What one node hands another, at the session's key.
#[derive(Serialize, Deserialize)]
pub(super) struct Handoff {
    /// The revision of the claim this answers: an older handoff is never taken.
    pub(super) revision: u64,
    /// Whose session it is; must be the claiming connection's.
    pub(super) key: SessionKey,
    /// `None`: the old node had nothing left (expired, or removed meanwhile).
    pub(super) session: Option<(SessionMeta, Messages)>,
    /// Values at `<key>.1` to `<key>.<parts>` holding the session's later messages.
    pub(super) parts: u32,
    /// The messages' ids in the writing node's store (ids only grow), this value's then
    /// each part's; empty if unknown.
    pub(super) ids: Vec<u64>,
    /// Kept up to date by a running node for a session it keeps offline (`park.rs`):
    /// taken only if that node does not hand the session over itself in time.
    pub(super) live: bool,
    /// Where the writing node's traffic stood when the session stopped being queued
    /// for there: the taking node reads what came after from the transfer stream
    /// (`unread.rs`). `None` from releases before it, and in parks.
    pub(super) cut: Option<super::Cut>,
    /// The session's exchanges with its client still open, by the messages' ids in
    /// `ids` (packet ids: MQTT-4.4.0-1; PUBRELs owed and incoming QoS 2 exchanges:
    /// MQTT-4.3.3). Empty from releases before it; only packet ids from the one before.
    pub(super) open: Exchanges,
}

/// A handoff as releases before the QoS 2 exchanges wrote it (a release reading a
/// newer one leaves the trailing ones unread).
#[derive(Deserialize)]
struct HandoffV4 {
    revision: u64,
    key: SessionKey,
    session: Option<(SessionMeta, Messages)>,
    parts: u32,
    ids: Vec<u64>,
    live: bool,
    cut: Option<super::Cut>,
    pkids: Vec<(u64, u16)>,
}

/// A handoff as releases before packet ids wrote it (a release reading a newer one
/// leaves the trailing ids unread).
#[derive(Deserialize)]
struct HandoffV3 {
    revision: u64,
    key: SessionKey,
    session: Option<(SessionMeta, Messages)>,
    parts: u32,
    ids: Vec<u64>,
    live: bool,
    cut: Option<super::Cut>,
}

/// A handoff as releases before the cut wrote it.
#[derive(Deserialize)]
struct HandoffV2 {
    revision: u64,
    key: SessionKey,
    session: Option<(SessionMeta, Messages)>,
    parts: u32,
    ids: Vec<u64>,
    live: bool,
}

/// A handoff as releases before parts wrote it: still read, so that sessions move
/// both ways during a rolling upgrade.
#[derive(Deserialize)]
struct HandoffV1 {
    revision: u64,
    key: SessionKey,
    session: Option<(SessionMeta, Messages)>,
}

/// `plain` as a handoff of this release or of an older one (each older form read as
/// the next newer one, its missing fields empty).
fn decode(plain: &[u8]) -> Result<Handoff, String> {
    let newest = |e: postcard::Error| e.to_string();
    postcard::from_bytes::<Handoff>(plain).or_else(|e| {
        postcard::from_bytes::<HandoffV4>(plain)
            .or_else(|_| postcard::from_bytes::<HandoffV3>(plain).map(HandoffV4::from))
            .or_else(|_| {
                postcard::from_bytes::<HandoffV2>(plain)
                    .map(HandoffV3::from)
                    .map(HandoffV4::from)
            })
            .or_else(|_| {
                postcard::from_bytes::<HandoffV1>(plain)
                    .map(HandoffV2::from)
                    .map(HandoffV3::from)
                    .map(HandoffV4::from)
            })
            .map(Handoff::from)
            .map_err(|_| newest(e))
    })
}

impl From<HandoffV4> for Handoff {
    fn from(v4: HandoffV4) -> Handoff {
        Handoff {
            revision: v4.revision,
            key: v4.key,
            session: v4.session,
            parts: v4.parts,
            ids: v4.ids,
            live: v4.live,
            cut: v4.cut,
            open: Exchanges {
                pkids: v4.pkids,
                ..Exchanges::default()
            },
        }
    }
}

impl From<HandoffV3> for HandoffV4 {
    fn from(v3: HandoffV3) -> HandoffV4 {
        HandoffV4 {
            revision: v3.revision,
            key: v3.key,
            session: v3.session,
            parts: v3.parts,
            ids: v3.ids,
            live: v3.live,
            cut: v3.cut,
            pkids: Vec::new(),
        }
    }
}

impl From<HandoffV2> for HandoffV3 {
    fn from(v2: HandoffV2) -> HandoffV3 {
        HandoffV3 {
            revision: v2.revision,
            key: v2.key,
            session: v2.session,
            parts: v2.parts,
            ids: v2.ids,
            live: v2.live,
            cut: None,
        }
    }
}

impl From<HandoffV1> for HandoffV2 {
    fn from(v1: HandoffV1) -> HandoffV2 {
        HandoffV2 {
            revision: v1.revision,
            key: v1.key,
            session: v1.session,
            parts: 0,
            ids: Vec::new(),
            live: false,
        }
    }
}

/// More of a handoff's messages, at `<key>.<index>`, sealed for that key.
#[derive(Serialize, Deserialize)]
pub(super) struct Part {
    /// The handoff's revision: a part left by another handoff of the session is refused.
    pub(super) revision: u64,
    pub(super) index: u32,
    pub(super) messages: Messages,
    pub(super) ids: Vec<u64>,
}

/// What a handoff value or part may take of `max_payload`: the rest is for sealing and
/// the encoding's lengths.
const PART_OVERHEAD: usize = 1024;

/// The KV key of part `index` of the handoff at `kv_key`.
pub(super) fn part_key(kv_key: &str, index: u32) -> String {
    format!("{kv_key}.{index}")
}

/// Opens the handoff value at `kv_key` alone: what it holds, its parts not read.
pub(super) fn open_head(
    seal: &ClusterSeal,
    buckets: &Buckets,
    kv_key: &str,
    value: &[u8],
) -> Result<Handoff, String> {
    let plain = seal
        .open_handoff(&buckets.handoff_name, kv_key, value)
        .map_err(|e| e.to_string())?;
    decode(&plain)
}

/// Opens the handoff value at `kv_key` for the session `key`: it must open there (not
/// altered, not moved from another key, this cluster's key) and hold that session. Its
/// parts, if any, are read and checked the same way and their messages appended in
/// order.
pub(super) async fn open(
    seal: &ClusterSeal,
    buckets: &Buckets,
    kv_key: &str,
    value: &[u8],
    key: &SessionKey,
) -> Result<Handoff, String> {
    let mut handoff = open_head(seal, buckets, kv_key, value)?;
    if handoff.key != *key {
        return Err("it holds another session".to_string());
    }
    for index in 1..=handoff.parts {
        let part_key = part_key(kv_key, index);
        let entry = match buckets.handoff.entry(&part_key).await {
            Ok(Some(e)) if e.operation == kv::Operation::Put => e,
            Ok(_) => return Err(format!("its part {index} is missing")),
            Err(e) => return Err(format!("its part {index} cannot be read: {e}")),
        };
        let plain = seal
            .open_handoff(&buckets.handoff_name, &part_key, &entry.value)
            .map_err(|e| format!("its part {index}: {e}"))?;
        let part = postcard::from_bytes::<Part>(&plain).map_err(|e| e.to_string())?;
        if part.revision != handoff.revision || part.index != index {
            return Err(format!("its part {index} belongs to another handoff"));
        }
        let Some((_, messages)) = &mut handoff.session else {
            return Err("parts without a session".to_string());
        };
        messages.extend(part.messages);
        handoff.ids.extend(part.ids);
    }
    Ok(handoff)
}

/// Taken: the value at `kv_key` up to `revision` leaves the bucket, with every part
/// put before it, so nobody takes the session again; a newer handoff survives.
pub(super) async fn remove(buckets: &Buckets, kv_key: &str, revision: u64) {
    super::state::remove_up_to(&buckets.handoff, kv_key, revision).await;
    super::state::remove_up_to(&buckets.handoff, &format!("{kv_key}.>"), revision).await;
}

/// Puts `handoff`, sealed, at `kv_key`: in one value if it fits in `max_payload`,
/// otherwise its later messages in parts put first. Returns the value's revision.
pub(super) async fn put(
    seal: &ClusterSeal,
    buckets: &Buckets,
    kv_key: &str,
    handoff: &Handoff,
    max_payload: usize,
) -> Result<u64, String> {
    let budget = budget(max_payload);
    let whole = postcard::to_allocvec(handoff).map_err(|e| e.to_string())?;
    let head = if whole.len() <= budget {
        whole
    } else {
        let (head, parts) = split(handoff, budget)?;
        for part in &parts {
            put_part(seal, buckets, kv_key, part).await?;
        }
        postcard::to_allocvec(&head).map_err(|e| e.to_string())?
    };
    put_value(seal, buckets, kv_key, &head).await
}

/// What a value or part may hold of `max_payload`.
pub(super) fn budget(max_payload: usize) -> usize {
    max_payload.saturating_sub(PART_OVERHEAD)
}

/// Puts `part` of the handoff at `kv_key`.
pub(super) async fn put_part(
    seal: &ClusterSeal,
    buckets: &Buckets,
    kv_key: &str,
    part: &Part,
) -> Result<u64, String> {
    let plain = postcard::to_allocvec(part).map_err(|e| e.to_string())?;
    put_value(seal, buckets, &part_key(kv_key, part.index), &plain).await
}

/// `handoff` as a value holding what of its messages fits in `budget` bytes, and parts
/// of at most `budget` bytes each holding the rest, in order.
fn split(handoff: &Handoff, budget: usize) -> Result<(Handoff, Vec<Part>), String> {
    let Some((meta, messages)) = &handoff.session else {
        return Err("an empty handoff larger than one NATS message".to_string());
    };
    let mut head = Handoff {
        revision: handoff.revision,
        key: handoff.key.clone(),
        session: Some((meta.clone(), Vec::new())),
        parts: 0,
        ids: Vec::new(),
        live: handoff.live,
        cut: handoff.cut.clone(),
        open: handoff.open.clone(),
    };
    let room = budget
        .checked_sub(encoded_len(&head)?)
        .ok_or("the session's subscriptions alone exceed one NATS message")?;
    let mut runs = runs(messages.clone(), handoff.ids.clone(), room, budget)?.into_iter();
    let (first, first_ids) = runs.next().unwrap_or_default();
    head.session = Some((meta.clone(), first));
    head.ids = first_ids;
    let parts = runs
        .enumerate()
        .map(|(i, (messages, ids))| {
            Ok(Part {
                revision: handoff.revision,
                index: u32::try_from(i + 1).map_err(|e| e.to_string())?,
                messages,
                ids,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    head.parts = u32::try_from(parts.len()).map_err(|e| e.to_string())?;
    Ok((head, parts))
}

/// `messages` (with their `ids`, if as many) in runs, in order: the first of at most
/// `first_room` encoded bytes (possibly empty), each other of at most `budget`.
pub(super) fn runs(
    messages: Messages,
    ids: Vec<u64>,
    first_room: usize,
    budget: usize,
) -> Result<Vec<(Messages, Vec<u64>)>, String> {
    let with_ids = ids.len() == messages.len();
    let mut ids = ids.into_iter();
    let mut runs: Vec<(Messages, Vec<u64>)> = vec![(Vec::new(), Vec::new())];
    let mut room = first_room;
    for message in messages {
        let need = encoded_len(&message)? + 10;
        if need > room {
            if need > budget {
                return Err("a queued message larger than one NATS message".to_string());
            }
            runs.push((Vec::new(), Vec::new()));
            room = budget;
        }
        room -= need;
        if let Some(run) = runs.last_mut() {
            run.0.push(message);
            if with_ids {
                run.1.extend(ids.next());
            }
        }
    }
    Ok(runs)
}

/// The length of `value` postcard-encoded.
pub(super) fn encoded_len<T: Serialize>(value: &T) -> Result<usize, String> {
    postcard::to_allocvec(value)
        .map(|v| v.len())
        .map_err(|e| e.to_string())
}

/// Seals `plain` for `kv_key` and puts it there; returns its revision.
pub(super) async fn put_value(
    seal: &ClusterSeal,
    buckets: &Buckets,
    kv_key: &str,
    plain: &[u8],
) -> Result<u64, String> {
    let value = sealed(seal, buckets, kv_key, plain)?;
    buckets
        .handoff
        .put(kv_key, value)
        .await
        .map_err(|e| e.to_string())
}

/// `plain` sealed for `kv_key` of the handoff bucket.
fn sealed(
    seal: &ClusterSeal,
    buckets: &Buckets,
    kv_key: &str,
    plain: &[u8],
) -> Result<bytes::Bytes, String> {
    seal.seal_handoff(&buckets.handoff_name, kv_key, plain)
        .map(Into::into)
        .map_err(|e| e.to_string())
}

/// Puts `plain`, sealed, at `kv_key` only if the key's value is still the one at
/// `revision` (nobody took or replaced it meanwhile).
pub(super) async fn update_value(
    seal: &ClusterSeal,
    buckets: &Buckets,
    kv_key: &str,
    plain: &[u8],
    revision: u64,
) -> Result<u64, String> {
    let value = sealed(seal, buckets, kv_key, plain)?;
    buckets
        .handoff
        .update(kv_key, value, revision)
        .await
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handoff(sizes: &[usize]) -> Handoff {
        let messages: Messages = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let message = QueuedMessage {
                    topic: format!("alice/{i}"),
                    payload: vec![i as u8; n].into(),
                    qos: 1,
                    retain: false,
                    properties: None,
                    expires_at: None,
                };
                (message, i % 2 == 0)
            })
            .collect();
        Handoff {
            revision: 7,
            key: SessionKey {
                owner: Some("alice".into()),
                client_id: "dev1".into(),
            },
            ids: (100..100 + messages.len() as u64).collect(),
            session: Some((SessionMeta::default(), messages)),
            parts: 0,
            live: false,
            cut: Some(crate::cluster::Cut {
                stream: 41,
                origin: "node-a:1700000000".into(),
                forwarded: 9,
                own_from: 40,
            }),
            open: Exchanges {
                // Those sent before (even positions): ids 100, 102, ...
                pkids: (0..sizes.len() as u64)
                    .step_by(2)
                    .map(|i| (100 + i, 40 + i as u16))
                    .collect(),
                // The client has the one of id 102 (PUBREC): its PUBREL is owed.
                released: vec![102],
                qos2_in: vec![7, 9],
            },
        }
    }

    #[test]
    fn a_large_handoff_splits_into_parts_within_the_budget_in_order() {
        let whole = handoff(&[300, 10, 700, 500, 900, 5, 5, 800]);
        let (head, parts) = split(&whole, 1000).expect("split");
        assert_eq!(head.parts as usize, parts.len());
        assert!(parts.len() >= 3);
        assert!(postcard::to_allocvec(&head).unwrap().len() <= 1000);
        let mut joined = head.session.clone().unwrap().1;
        let mut ids = head.ids.clone();
        for (i, part) in parts.iter().enumerate() {
            assert_eq!((part.revision, part.index as usize), (7, i + 1));
            assert!(postcard::to_allocvec(part).unwrap().len() <= 1000);
            joined.extend(part.messages.clone());
            ids.extend(part.ids.clone());
        }
        assert_eq!(
            joined,
            whole.session.unwrap().1,
            "every message once, in order"
        );
        assert_eq!(ids, whole.ids, "each with its id");
    }

    #[test]
    fn a_message_larger_than_a_part_is_refused_not_dropped() {
        assert!(split(&handoff(&[10, 2000]), 1000).is_err());
    }

    #[test]
    fn a_handoff_from_a_release_without_parts_still_reads() {
        #[derive(Serialize)]
        struct Before {
            revision: u64,
            key: SessionKey,
            session: Option<(SessionMeta, Messages)>,
        }
        let now = handoff(&[3, 4]);
        let before = Before {
            revision: now.revision,
            key: now.key.clone(),
            session: now.session.clone(),
        };
        let plain = postcard::to_allocvec(&before).unwrap();
        assert!(postcard::from_bytes::<Handoff>(&plain).is_err());
        let read = postcard::from_bytes::<HandoffV1>(&plain).unwrap();
        assert_eq!(read.session, now.session);
    }

    #[test]
    fn handoffs_with_and_without_a_cut_read_both_ways() {
        let now = handoff(&[3]);
        let plain = postcard::to_allocvec(&now).unwrap();
        let read = postcard::from_bytes::<Handoff>(&plain).unwrap();
        assert_eq!(read.cut, now.cut);
        // A release before the cut reads the new value (the cut is left over at its end).
        let old = postcard::from_bytes::<HandoffV2>(&plain).unwrap();
        assert_eq!((old.revision, old.parts, old.live), (7, 0, false));
        // And its values read here, without a cut.
        #[derive(Serialize)]
        struct Before<'a> {
            revision: u64,
            key: &'a SessionKey,
            session: &'a Option<(SessionMeta, Messages)>,
            parts: u32,
            ids: &'a Vec<u64>,
            live: bool,
        }
        let before = Before {
            revision: now.revision,
            key: &now.key,
            session: &now.session,
            parts: 0,
            ids: &now.ids,
            live: true,
        };
        let plain = postcard::to_allocvec(&before).unwrap();
        assert!(postcard::from_bytes::<Handoff>(&plain).is_err());
        let read = postcard::from_bytes::<HandoffV2>(&plain).unwrap();
        assert!(read.live);
        assert_eq!(read.ids, now.ids);
    }

    #[test]
    fn handoffs_with_and_without_packet_ids_read_both_ways() {
        let now = handoff(&[3, 4, 5]);
        assert_eq!(
            now.open.in_order(&now.ids),
            vec![(40, false), (0, false), (42, true)]
        );
        let plain = postcard::to_allocvec(&now).unwrap();
        let read = postcard::from_bytes::<Handoff>(&plain).unwrap();
        assert_eq!(read.open, now.open);
        // A release before packet ids reads the new value (they are left over at its end).
        let old = postcard::from_bytes::<HandoffV3>(&plain).unwrap();
        assert_eq!((old.ids, old.cut), (now.ids.clone(), now.cut.clone()));
        // And its values read here, without packet ids: sent again under new ones.
        let before = HandoffV3Out {
            revision: now.revision,
            key: &now.key,
            session: &now.session,
            parts: 0,
            ids: &now.ids,
            live: false,
            cut: &now.cut,
        };
        let plain = postcard::to_allocvec(&before).unwrap();
        assert!(postcard::from_bytes::<Handoff>(&plain).is_err());
        assert!(postcard::from_bytes::<HandoffV3>(&plain).is_ok());
    }

    #[test]
    fn handoffs_with_and_without_qos_2_exchanges_read_both_ways() {
        let now = handoff(&[3, 4, 5]);
        let plain = postcard::to_allocvec(&now).unwrap();
        // A release before the QoS 2 exchanges reads the new value's packet ids (the
        // exchanges are left over at its end).
        let old = postcard::from_bytes::<HandoffV4>(&plain).unwrap();
        assert_eq!(old.pkids, now.open.pkids);
        // And its values read here with their packet ids, no exchanges.
        #[derive(Serialize)]
        struct V4Out<'a> {
            v3: HandoffV3Out<'a>,
            pkids: &'a Vec<(u64, u16)>,
        }
        let before = V4Out {
            v3: HandoffV3Out {
                revision: now.revision,
                key: &now.key,
                session: &now.session,
                parts: 0,
                ids: &now.ids,
                live: false,
                cut: &now.cut,
            },
            pkids: &now.open.pkids,
        };
        let plain = postcard::to_allocvec(&before).unwrap();
        assert!(postcard::from_bytes::<Handoff>(&plain).is_err());
        let read = decode(&plain).unwrap();
        assert_eq!(read.open.pkids, now.open.pkids);
        assert!(read.open.released.is_empty() && read.open.qos2_in.is_empty());
    }

    /// A handoff as releases before packet ids write it.
    #[derive(Serialize)]
    struct HandoffV3Out<'a> {
        revision: u64,
        key: &'a SessionKey,
        session: &'a Option<(SessionMeta, Messages)>,
        parts: u32,
        ids: &'a Vec<u64>,
        live: bool,
        cut: &'a Option<crate::cluster::Cut>,
    }

    #[test]
    fn every_older_form_decodes_as_a_handoff() {
        let now = handoff(&[3, 4]);
        let v3 = HandoffV3Out {
            revision: now.revision,
            key: &now.key,
            session: &now.session,
            parts: 0,
            ids: &now.ids,
            live: true,
            cut: &now.cut,
        };
        let read = decode(&postcard::to_allocvec(&v3).unwrap()).unwrap();
        assert_eq!(
            (read.live, read.ids, read.cut),
            (true, now.ids.clone(), now.cut.clone())
        );
        assert_eq!(read.open, Exchanges::default());
        #[derive(Serialize)]
        struct V1<'a> {
            revision: u64,
            key: &'a SessionKey,
            session: &'a Option<(SessionMeta, Messages)>,
        }
        let v1 = V1 {
            revision: now.revision,
            key: &now.key,
            session: &now.session,
        };
        let read = decode(&postcard::to_allocvec(&v1).unwrap()).unwrap();
        assert_eq!((read.revision, read.parts, read.live), (7, 0, false));
        assert_eq!(read.session, now.session);
        assert!(decode(b"\xff").is_err());
    }

    #[test]
    fn a_split_handoff_keeps_its_open_exchanges_in_the_head() {
        let whole = handoff(&[300, 10, 700, 500, 900, 5, 5, 800]);
        let (head, _) = split(&whole, 1000).expect("split");
        assert_eq!(head.open, whole.open);
    }
}
