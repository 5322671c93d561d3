//! Persistent sessions handed from node to node (docs/cluster.md, "Session handoff").
//!
//! When node B claims a session (`owner.rs`) whose last holder was node A with a
//! persistent session, A takes the session out of its store (subscriptions, expiry,
//! queued and unacknowledged messages; nothing is queued for it on A from then on),
//! puts it, sealed, in the KV bucket `<base>_handoff` at the session's key (associated
//! data: bucket and key), naming the revision of B's claim, and discards its own copy
//! (router, store, expiry timer, delayed will). B's CONNACK waits up to
//! [`HANDOFF_WAIT`] for a value naming its claim; it checks that the value opens at the
//! key of its own identity and client id and holds that session, deletes it, stores the
//! session as offline with its messages carried over, and makes its subscriptions in
//! the router. The connection then resumes it as after a restart: session present,
//! carried-over messages replayed through `deliver` (read ACL on B), unacknowledged
//! ones with DUP. A value that does not open, or names another session, is refused and
//! counted; after the wait B starts the session new (session present 0).

use super::owner::{Buckets, OwnerClaim};
use crate::router::router_client_id;
use crate::shared::Shared;
use async_nats::jetstream::kv;
use futures_util::StreamExt;
use moatmq_store::{ClusterSeal, QueuedMessage, SessionKey, SessionMeta};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// How long a CONNACK resuming a session last held on another node waits for that node
/// to hand it over; after it the session starts new (the old node is dead, or cut off).
pub const HANDOFF_WAIT: Duration = Duration::from_secs(3);

/// What one node hands another (postcard, then sealed), at the session's key. A session
/// too large for one NATS message (the server's `max_payload`) brings the rest of its
/// messages in `parts` values at `<key>.<n>` ([`Part`]), put before this one.
#[derive(Serialize, Deserialize)]
pub(super) struct Handoff {
    /// The revision of the claim this answers: an older handoff is never taken.
    pub(super) revision: u64,
    /// Whose session it is; must be the claiming connection's.
    key: SessionKey,
    /// `None`: the old node had nothing left (expired, or removed meanwhile).
    pub(super) session: Option<(SessionMeta, Vec<(QueuedMessage, bool)>)>,
    /// Values at `<key>.1` to `<key>.<parts>` holding the session's later messages.
    parts: u32,
}

/// A handoff as releases before parts wrote it: still read, so that sessions move
/// both ways during a rolling upgrade.
#[derive(Deserialize)]
struct HandoffV1 {
    revision: u64,
    key: SessionKey,
    session: Option<(SessionMeta, Vec<(QueuedMessage, bool)>)>,
}

/// More of a handoff's messages, at `<key>.<index>`, sealed for that key.
#[derive(Serialize, Deserialize)]
struct Part {
    /// The handoff's revision: a part left by another handoff of the session is refused.
    revision: u64,
    index: u32,
    messages: Vec<(QueuedMessage, bool)>,
}

/// What a handoff value or part may take of `max_payload`: the rest is for sealing and
/// the encoding's lengths.
const PART_OVERHEAD: usize = 1024;

/// The KV key of part `index` of the handoff at `kv_key`.
fn part_key(kv_key: &str, index: u32) -> String {
    format!("{kv_key}.{index}")
}

/// Opens the handoff value at `kv_key` for the session `key`: it must open there (not
/// altered, not moved from another key, this cluster's key) and hold that session. Its
/// parts, if any, are read and checked the same way and their messages appended in
/// order; what [`Opened::remove`] purges is returned with it.
pub(super) async fn open(
    seal: &ClusterSeal,
    buckets: &Buckets,
    kv_key: &str,
    value: &[u8],
    key: &SessionKey,
) -> Result<Opened, String> {
    let plain = seal
        .open_handoff(&buckets.handoff_name, kv_key, value)
        .map_err(|e| e.to_string())?;
    let mut handoff = match postcard::from_bytes::<Handoff>(&plain) {
        Ok(h) => h,
        Err(e) => match postcard::from_bytes::<HandoffV1>(&plain) {
            Ok(v1) => Handoff {
                revision: v1.revision,
                key: v1.key,
                session: v1.session,
                parts: 0,
            },
            Err(_) => return Err(e.to_string()),
        },
    };
    if handoff.key != *key {
        return Err("it holds another session".to_string());
    }
    let mut parts = Vec::new();
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
        parts.push((part_key, entry.revision));
    }
    Ok(Opened { handoff, parts })
}

/// A handoff opened with its parts.
pub(super) struct Opened {
    pub(super) handoff: Handoff,
    /// Each part's KV key and revision.
    parts: Vec<(String, u64)>,
}

impl Opened {
    /// Taken: the value at `kv_key` (up to `revision`) and its parts leave the bucket,
    /// so nobody takes the session again; a newer handoff of it survives.
    pub(super) async fn remove(&self, buckets: &Buckets, kv_key: &str, revision: u64) {
        super::owner::remove_up_to(&buckets.handoff, kv_key, revision).await;
        for (part_key, revision) in &self.parts {
            super::owner::remove_up_to(&buckets.handoff, part_key, *revision).await;
        }
    }
}

/// What [`receive`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// The session was handed over and installed here.
    Installed,
    /// Nothing to install: the old node had nothing left, or it could not be installed.
    Nothing,
    /// The old node did not answer within [`HANDOFF_WAIT`] (dead, or cut off): the
    /// session starts new, and what that node kept may still come later (`late.rs`).
    TimedOut,
}

/// Hands the session `key` (router client id `router_id`) to the node whose claim was
/// written at `revision`, and discards this node's copy. The caller holds `router_id`.
/// If the handoff cannot be put (NATS failing), the session's store copy stays here,
/// offline, and is handed over again after [`RETRY_WAIT`] or the next NATS reconnect.
pub async fn give(
    shared: &Shared,
    seal: &ClusterSeal,
    buckets: &Buckets,
    router_id: &str,
    key: &SessionKey,
    revision: u64,
) {
    crate::session_expiry::cancel(shared, router_id);
    // The session goes on elsewhere: its client is not gone for good.
    shared.delayed_wills.cancel(router_id);
    let session = match &shared.durable {
        Some(book) => book.take(key).await.map(|t| (t.meta, t.messages)),
        None => None,
    };
    let handoff = Handoff {
        revision,
        key: key.clone(),
        session,
        parts: 0,
    };
    let max_payload = shared.cluster.as_ref().map(|c| c.max_payload());
    let failed = put(seal, buckets, router_id, &handoff, max_payload.unwrap_or(0))
        .await
        .err();
    crate::session_expiry::discard(shared, router_id, key).await;
    let Some(e) = failed else {
        return;
    };
    match (&shared.durable, &shared.cluster, handoff.session) {
        (Some(book), Some(cluster), Some((meta, messages))) => {
            tracing::warn!(
                client_id = %key.client_id,
                "cluster: session not handed over ({e}); kept here to hand over again"
            );
            // Nothing more is queued for it here (its router state is gone); what it
            // held waits, stored, for the next try.
            book.adopt(key, meta, messages);
            cluster.kept_offline(router_id, key.clone());
            cluster.owners.recheck_later(router_id, RETRY_WAIT);
        }
        _ => tracing::warn!("cluster: session not handed over: {e}"),
    }
}

/// How long a session whose handoff could not be put waits before the next try.
const RETRY_WAIT: Duration = Duration::from_secs(5);

/// Puts `handoff`, sealed, at the key of the session `router_id`: in one value if it
/// fits in `max_payload`, otherwise its later messages in parts put first.
async fn put(
    seal: &ClusterSeal,
    buckets: &Buckets,
    router_id: &str,
    handoff: &Handoff,
    max_payload: usize,
) -> Result<(), String> {
    let kv_key = seal.session_key_of(router_id);
    let budget = max_payload.saturating_sub(PART_OVERHEAD);
    let whole = postcard::to_allocvec(handoff).map_err(|e| e.to_string())?;
    let head = if whole.len() <= budget {
        whole
    } else {
        let (head, parts) = split(handoff, budget)?;
        for part in &parts {
            let plain = postcard::to_allocvec(part).map_err(|e| e.to_string())?;
            put_value(seal, buckets, &part_key(&kv_key, part.index), &plain).await?;
        }
        postcard::to_allocvec(&head).map_err(|e| e.to_string())?
    };
    put_value(seal, buckets, &kv_key, &head).await
}

/// `handoff` as a head holding what of its messages fits in `budget` bytes, and parts
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
    };
    let mut room = budget
        .checked_sub(encoded_len(&head)?)
        .ok_or("the session's subscriptions alone exceed one NATS message")?;
    let mut first = Vec::new();
    let mut parts: Vec<Part> = Vec::new();
    for message in messages {
        let need = encoded_len(message)?;
        if need > room {
            if need > budget {
                return Err("a queued message larger than one NATS message".to_string());
            }
            let index = u32::try_from(parts.len() + 1).map_err(|e| e.to_string())?;
            parts.push(Part {
                revision: handoff.revision,
                index,
                messages: Vec::new(),
            });
            room = budget;
        }
        room -= need;
        match parts.last_mut() {
            Some(part) => part.messages.push(message.clone()),
            None => first.push(message.clone()),
        }
    }
    head.session = Some((meta.clone(), first));
    head.parts = u32::try_from(parts.len()).map_err(|e| e.to_string())?;
    Ok((head, parts))
}

/// The length of `value` postcard-encoded.
fn encoded_len<T: Serialize>(value: &T) -> Result<usize, String> {
    postcard::to_allocvec(value)
        .map(|v| v.len())
        .map_err(|e| e.to_string())
}

/// Seals `plain` for `kv_key` and puts it there.
async fn put_value(
    seal: &ClusterSeal,
    buckets: &Buckets,
    kv_key: &str,
    plain: &[u8],
) -> Result<(), String> {
    let value = seal
        .seal_handoff(&buckets.handoff_name, kv_key, plain)
        .map_err(|e| e.to_string())?;
    buckets
        .handoff
        .put(kv_key, value.into())
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// At shutdown: every persistent session this node keeps whose latest claim is its
/// own is parked in the handoff bucket at that claim's revision, so a client that
/// reconnects to another node meanwhile (a rolling upgrade, a scale-down) finds its
/// session there at once: that node's claim replaces this revision and takes it
/// ([`receive`]). The local store keeps them: a node that comes back first removes
/// what it parked (`Owners::unpark`) and goes on with them. Returns how many.
pub async fn park(shared: &Shared) -> usize {
    let (Some(cluster), Some(book)) = (&shared.cluster, &shared.durable) else {
        return 0;
    };
    let Some(buckets) = cluster.owners.buckets() else {
        return 0;
    };
    let parked = std::sync::atomic::AtomicUsize::new(0);
    futures_util::stream::iter(book.snapshot().await)
        .for_each_concurrent(32, |(key, taken)| {
            let (buckets, parked) = (&buckets, &parked);
            async move {
                let router_id = router_client_id(key.owner.as_deref(), &key.client_id);
                let Some(revision) = cluster.owners.claimed_here(&router_id).await else {
                    return;
                };
                let handoff = Handoff {
                    revision,
                    key,
                    session: Some((taken.meta, taken.messages)),
                    parts: 0,
                };
                let max_payload = cluster.max_payload();
                match put(
                    cluster.owners.seal(),
                    buckets,
                    &router_id,
                    &handoff,
                    max_payload,
                )
                .await
                {
                    Ok(()) => {
                        parked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(e) => tracing::warn!("cluster: session not parked: {e}"),
                }
            }
        })
        .await;
    parked.into_inner()
}

/// Waits (up to [`HANDOFF_WAIT`]) for the session `key` the node that held it hands
/// over for `claim`, and installs it here.
pub async fn receive(
    shared: &Shared,
    seal: &ClusterSeal,
    claim: &OwnerClaim,
    router_id: &str,
    key: &SessionKey,
) -> Received {
    let buckets = &claim.buckets;
    let deadline = tokio::time::Instant::now() + HANDOFF_WAIT;
    let mut values = match buckets.handoff.watch_with_history(&claim.key).await {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!("cluster: session handoff not received: {e}");
            return Received::TimedOut;
        }
    };
    loop {
        let entry = match tokio::time::timeout_at(deadline, values.next()).await {
            Ok(Some(Ok(entry))) => entry,
            Ok(Some(Err(e))) => {
                tracing::warn!("cluster: session handoff not received: {e}");
                return Received::TimedOut;
            }
            Ok(None) => return Received::TimedOut,
            Err(_) => {
                tracing::warn!(
                    client_id = %key.client_id,
                    "cluster: the session's previous node did not hand it over in time; starting it new (what it kept is taken if it hands it over later)"
                );
                return Received::TimedOut;
            }
        };
        if entry.operation != kv::Operation::Put {
            continue;
        }
        let opened = open(seal, buckets, &claim.key, &entry.value, key).await;
        let mut opened = match opened {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(error = %e, "cluster: session handoff refused");
                shared.metrics.cluster_state_rejected.inc();
                continue;
            }
        };
        // For this claim, or parked by the node whose claim this one replaced when it
        // shut down.
        let handoff = &opened.handoff;
        if handoff.revision != claim.revision && Some(handoff.revision) != claim.replaced {
            // An older handoff of this session, for a claim since superseded.
            continue;
        }
        // Stored here before it leaves the bucket: a crash in between loses nothing.
        let adopted = match (opened.handoff.session.take(), &shared.durable) {
            (Some((meta, messages)), Some(book)) => {
                book.adopt(key, meta.clone(), messages);
                Some((meta, book.commit().await))
            }
            _ => None,
        };
        // Taken: nobody else may take it again (nothing left of it in the bucket). If
        // it could not be saved here, the bucket keeps the only durable copy.
        if !matches!(adopted, Some((_, false))) {
            opened.remove(buckets, &claim.key, entry.revision).await;
        }
        let Some((meta, _)) = adopted else {
            return Received::Nothing;
        };
        let owner = key.owner.as_deref();
        if let Err(e) =
            crate::session_restore::resubscribe(shared, router_id, owner, &meta.subscriptions).await
        {
            tracing::warn!(error = %e, "cluster: handed-over session not made in the router");
            return Received::Nothing;
        }
        if shared.sessions.resume(router_id, owner, usize::MAX).is_ok() {
            shared.sessions.save(router_id, &meta.subscriptions);
        }
        return Received::Installed;
    }
}

/// A connection of the persistent session `key` ended on this node (the caller still
/// holds `router_id`): if another node claimed the session meanwhile it is handed over
/// now (`true`); otherwise it stays here, offline, to be handed over at a later claim.
pub async fn settle(
    shared: &Shared,
    claim: &OwnerClaim,
    router_id: &str,
    key: &SessionKey,
) -> bool {
    let Some(cluster) = &shared.cluster else {
        return false;
    };
    if claim.moved().is_none() {
        cluster.kept_offline(router_id, key.clone());
    }
    // A claim that reached the watch before the line above went to this connection.
    let Some(revision) = claim.moved() else {
        return false;
    };
    cluster.owners.forget_offline(router_id);
    give(
        shared,
        cluster.owners.seal(),
        &claim.buckets,
        router_id,
        key,
        revision,
    )
    .await;
    true
}

/// How long an offline session claimed elsewhere waits for the connection that last
/// held it here to let its client id go.
const RELEASE_WAIT: Duration = Duration::from_secs(2);

/// Hands over the offline sessions other nodes claim (`owner.rs` sends them), each
/// while holding its router client id: a client connecting here meanwhile claims it
/// back, and wins as the newer claim.
pub async fn run(shared: Arc<Shared>, mut claimed: mpsc::UnboundedReceiver<(SessionKey, u64)>) {
    while let Some((key, revision)) = claimed.recv().await {
        tokio::spawn(hand_over(shared.clone(), key, revision));
    }
}

/// Hands one offline session over, once its client id is free here: the connection
/// that last held it may still be settling its end. If a new connection holds it
/// instead, that one claims the session after the other node and keeps it.
async fn hand_over(shared: Arc<Shared>, key: SessionKey, revision: u64) {
    let Some(cluster) = &shared.cluster else {
        return;
    };
    // The session takes along what was published for it while this node was away
    // (restarted) or cut off from NATS, which its transfer consumer may still be reading.
    cluster.input_ready().await;
    let router_id = router_client_id(key.owner.as_deref(), &key.client_id);
    let deadline = tokio::time::Instant::now() + RELEASE_WAIT;
    let hold = loop {
        if let Some(hold) = shared.sessions.try_hold(&router_id) {
            break hold;
        }
        if tokio::time::Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let Some(buckets) = cluster.owners.buckets() else {
        tracing::warn!("cluster: session not handed over yet: NATS away");
        // The ownership watch, back with NATS, sees the claim again.
        cluster.kept_offline(&router_id, key);
        return;
    };
    // A client that connected here meanwhile claimed the session back: it stays,
    // offline once that connection ended. A newer claim from another node gets it
    // instead.
    let Some(current) = cluster.owners.claimed_elsewhere(&router_id).await else {
        // Or the claim could not be read: looked at again.
        cluster.kept_offline(&router_id, key);
        cluster.owners.recheck_later(&router_id, RETRY_WAIT);
        return;
    };
    let revision = revision.max(current);
    give(
        &shared,
        cluster.owners.seal(),
        &buckets,
        &router_id,
        &key,
        revision,
    )
    .await;
    drop(hold);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handoff(sizes: &[usize]) -> Handoff {
        let messages = sizes
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
            session: Some((SessionMeta::default(), messages)),
            parts: 0,
        }
    }

    #[test]
    fn a_large_handoff_splits_into_parts_within_the_budget_in_order() {
        let whole = handoff(&[300, 10, 700, 500, 900, 5, 5, 800]);
        let (head, parts) = split(&whole, 1000).expect("split");
        assert_eq!(head.parts as usize, parts.len());
        assert!(parts.len() >= 3);
        assert!(postcard::to_allocvec(&head).unwrap().len() <= 1000 + 8);
        let mut joined = head.session.clone().unwrap().1;
        for (i, part) in parts.iter().enumerate() {
            assert_eq!((part.revision, part.index as usize), (7, i + 1));
            assert!(postcard::to_allocvec(part).unwrap().len() <= 1000 + 8);
            joined.extend(part.messages.clone());
        }
        assert_eq!(
            joined,
            whole.session.unwrap().1,
            "every message once, in order"
        );
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
            session: Option<(SessionMeta, Vec<(QueuedMessage, bool)>)>,
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
}
