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

use super::handoff_value::{self as value, Handoff};
use super::late_waits::{ParkedResume, ReadOnBehalf};
use super::owner::{Buckets, OwnerClaim};
use crate::router::router_client_id;
use crate::shared::Shared;
use async_nats::jetstream::kv;
use futures_util::StreamExt;
use moatmq_store::{ClusterSeal, SessionKey};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// How long a CONNACK resuming a session last held on another node waits for that node
/// to hand it over; after it the session starts new (the old node is dead, or cut off).
pub const HANDOFF_WAIT: Duration = Duration::from_secs(3);

/// What [`receive`] got.
#[derive(Debug)]
pub enum Received {
    /// The session was handed over and installed here.
    Installed,
    /// Nothing to install: the old node had nothing left, or it could not be installed.
    Nothing,
    /// The old node did not answer within [`HANDOFF_WAIT`] (dead, or cut off), and
    /// what it last parked of the session while it ran (`park.rs`) was installed,
    /// with what it left unread in the transfer stream (`unread.rs`). What it kept
    /// beyond may still come later (`late.rs`).
    Parked(ParkedResume),
    /// The old node did not answer within [`HANDOFF_WAIT`] (dead, or cut off) and had
    /// parked nothing: the session starts new, and what that node kept may still come
    /// later (`late.rs`).
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
    // Read as the session leaves the offline sessions `admit` queues for: what it
    // names is in what is taken; the taking node reads what came after (`unread.rs`).
    let cut = shared.cluster.as_ref().map(|c| {
        c.cut_for(router_id, || {
            if let Some(book) = &shared.durable {
                book.stop_queueing(key);
            }
        })
    });
    let (session, ids, open) = match &shared.durable {
        Some(book) => match book.take(key).await {
            Some(t) => (Some((t.meta, t.messages)), t.ids, t.open),
            None => (None, Vec::new(), Default::default()),
        },
        None => (None, Vec::new(), Default::default()),
    };
    if let Some(book) = &shared.durable {
        // What the park task still had to write of the session is written before this
        // handoff, not over it.
        book.parked().await;
    }
    let handoff = Handoff {
        revision,
        key: key.clone(),
        session,
        parts: 0,
        ids,
        live: false,
        cut,
        open,
    };
    let max_payload = shared.cluster.as_ref().map(|c| c.max_payload());
    let kv_key = seal.session_key_of(router_id);
    let failed = value::put(seal, buckets, &kv_key, &handoff, max_payload.unwrap_or(0))
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
            book.adopt(key, meta, messages, &handoff.ids, &handoff.open);
            cluster.kept_offline(router_id, key.clone());
            cluster.owners.recheck_later(router_id, RETRY_WAIT);
        }
        _ => tracing::warn!("cluster: session not handed over: {e}"),
    }
}

/// How long a session whose handoff could not be put waits before the next try.
const RETRY_WAIT: Duration = Duration::from_secs(5);

/// At shutdown, after the connections closed: every persistent session this node keeps
/// offline is parked already, live (`park.rs`); the parks are made final, so a client
/// that reconnects to another node meanwhile (a rolling upgrade, a scale-down) finds
/// its session there at once: that node's claim replaces this node's revision and takes
/// it ([`receive`]). The local store keeps them: a node that comes back first parks them
/// anew, live, and goes on with them. Returns how many.
pub async fn park(shared: &Shared) -> usize {
    match (&shared.cluster, &shared.durable) {
        (Some(cluster), Some(book)) => {
            // Read before the final parks are ordered: what it names is in them; the
            // node taking one reads what came after (`unread.rs`), published while this
            // node stops and until the session is subscribed there.
            let cut = cluster.cut();
            *cluster.final_cut.lock().unwrap_or_else(|e| e.into_inner()) = Some(cut);
            book.park_final().await
        }
        _ => 0,
    }
}

/// Waits (up to [`HANDOFF_WAIT`]) for the session `key` the node that held it hands
/// over for `claim`, and installs it here. If that node does not answer in time, what
/// it last parked of the session while it ran (`park.rs`) is installed instead.
pub async fn receive(
    shared: &Shared,
    seal: &ClusterSeal,
    claim: &OwnerClaim,
    router_id: &str,
    key: &SessionKey,
) -> Received {
    // Until its reads of the stream are done, the router's copies of messages carry
    // their place in the stream, so the connection skips those it got from the reads.
    let _tagging = match &shared.cluster {
        Some(c) => Some(c.tagging(shared.durable.as_ref(), TAG_WAIT).await),
        None => None,
    };
    let buckets = &claim.buckets;
    let deadline = tokio::time::Instant::now() + HANDOFF_WAIT;
    let mut values = match buckets.handoff.watch_with_history(&claim.key).await {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!("cluster: session handoff not received: {e}");
            return Received::TimedOut;
        }
    };
    // The old node's live park of the session, taken if it does not answer.
    let mut parked = false;
    // The cut of the previous holder's live park, named while its client was connected
    // there (`gateway/checkpoint.rs`, `connect.rs`).
    let mut parked_cut = None;
    loop {
        let entry = match tokio::time::timeout_at(deadline, values.next()).await {
            Ok(Some(Ok(entry))) => entry,
            Ok(Some(Err(e))) => {
                tracing::warn!("cluster: session handoff not received: {e}");
                break;
            }
            Ok(None) | Err(_) => break,
        };
        if entry.operation != kv::Operation::Put {
            continue;
        }
        let handoff = match value::open(seal, buckets, &claim.key, &entry.value, key).await {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(error = %e, "cluster: session handoff refused");
                shared.metrics.cluster_state_rejected.inc();
                continue;
            }
        };
        // For this claim, or parked by the node whose claim this one replaced.
        if handoff.revision != claim.revision && Some(handoff.revision) != claim.replaced {
            // An older handoff of this session, for a claim since superseded.
            continue;
        }
        if handoff.live {
            // That node may still be running: it hands over what it has now.
            parked = true;
            if Some(handoff.revision) == claim.replaced {
                parked_cut = handoff.cut.clone().or(parked_cut);
            }
            continue;
        }
        let restarted = parked_cut.filter(|p| {
            handoff
                .cut
                .as_ref()
                .is_some_and(|cut| cut.origin != p.origin)
        });
        return install(
            shared,
            claim,
            router_id,
            key,
            handoff,
            entry.revision,
            Held::Handed { restarted },
        )
        .await;
    }
    if parked {
        // Read again: the park may have grown since the watch delivered it.
        if let Ok(Some(entry)) = buckets.handoff.entry(&claim.key).await {
            let opened = match entry.operation {
                kv::Operation::Put => {
                    value::open(seal, buckets, &claim.key, &entry.value, key).await
                }
                _ => Err("removed".to_string()),
            };
            match opened {
                Ok(handoff) if Some(handoff.revision) == claim.replaced && handoff.live => {
                    let through = handoff.ids.iter().copied().max().unwrap_or(0);
                    tracing::warn!(
                        client_id = %key.client_id,
                        "cluster: the session's previous node did not hand it over in time; resuming what it parked (what it kept beyond is taken if it hands it over later)"
                    );
                    let revision = entry.revision;
                    return install(
                        shared,
                        claim,
                        router_id,
                        key,
                        handoff,
                        revision,
                        Held::Parked { through },
                    )
                    .await;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cluster: parked session not taken"),
            }
        }
    }
    tracing::warn!(
        client_id = %key.client_id,
        "cluster: the session's previous node did not hand it over in time; starting it new (what it kept is taken if it hands it over later)"
    );
    Received::TimedOut
}

/// Where a session being installed comes from.
enum Held {
    /// Handed over by the node that held it. `restarted`: the cut that node named in its
    /// live park while the client was connected there, from a process before the one
    /// that handed the session over (killed, and started again within the claim's
    /// wait). What its router held for the client after that cut was in no store: read
    /// from the stream after that cut instead of the handoff's.
    Handed { restarted: Option<super::Cut> },
    /// The live park of a node that did not answer, holding its messages up to its
    /// store id `through`.
    Parked { through: u64 },
}

/// Installs the session `handoff` brought (value at revision `revision`): stored here
/// and committed, then removed from the bucket, subscribed in the router. From the
/// live park of a node that did not answer, what that node left unread in the transfer
/// stream for the session is added (`unread.rs`): [`Received::Parked`].
async fn install(
    shared: &Shared,
    claim: &OwnerClaim,
    router_id: &str,
    key: &SessionKey,
    mut handoff: Handoff,
    revision: u64,
    held: Held,
) -> Received {
    let buckets = &claim.buckets;
    if let Some((meta, _)) = handoff
        .session
        .as_ref()
        .filter(|(meta, _)| meta.is_expired(moatmq_store::now_unix()))
    {
        // Its client was away longer than its expiry interval (the node that parked it
        // was cut off or stopped, and could not discard it itself): it is gone, as
        // after a restart on one node. Nobody takes it again.
        tracing::info!(
            client_id = %key.client_id,
            expired_at = meta.expires_at(),
            "cluster: the session handed over had expired; starting it new"
        );
        value::remove(buckets, &claim.key, revision).await;
        return Received::Nothing;
    }
    if let Some((meta, _)) = handoff.session.as_mut() {
        // Parked while its client was connected to a node that died: offline here
        // until the resume that follows, counted from now (when that node lost the
        // connection is not known).
        meta.disconnected_at
            .get_or_insert_with(moatmq_store::now_unix);
    }
    let (cut, restarted, parked_through) = match held {
        Held::Handed {
            restarted: Some(earlier),
        } => (Some(earlier), true, None),
        Held::Handed { restarted: None } => (handoff.cut.take(), false, None),
        Held::Parked { through } => (handoff.cut.take(), false, Some(through)),
    };
    // A park holds what its node queued up to its last round, which may be past what
    // that node acknowledged on its transfer consumer: read again on its behalf below.
    // Likewise what a restarted node handed over from its store, read again after the
    // earlier cut.
    let mut in_park = match &handoff.session {
        Some((_, messages)) if restarted || parked_through.is_some() => {
            ReadOnBehalf::of(messages.iter().map(|(m, _)| m))
        }
        _ => ReadOnBehalf::default(),
    };
    // Stored here before it leaves the bucket: a crash in between loses nothing.
    let adopted = match (handoff.session.take(), &shared.durable) {
        (Some((meta, messages)), Some(book)) => {
            book.adopt(key, meta.clone(), messages, &handoff.ids, &handoff.open);
            Some((meta, book.commit().await))
        }
        _ => None,
    };
    // Taken: nobody else may take it again (nothing left of it in the bucket). If it
    // could not be saved here, the bucket keeps the only durable copy.
    if !matches!(adopted, Some((_, false))) {
        value::remove(buckets, &claim.key, revision).await;
    }
    let Some((meta, _)) = adopted else {
        return Received::Nothing;
    };
    let owner = key.owner.as_deref();
    // What this node's router still keeps under the id is stale: a copy of the session
    // this node restored at start-up (it held the session before it stopped) and has not
    // handed over yet, with what its input queued for that copy since. Made again
    // from the session handed over: with more than 100 of those messages in flight on
    // the link, the router would not answer the subscriptions (rumqttd pauses a link at
    // its in-flight limit, acknowledgements included).
    crate::session_expiry::clear_router(shared, router_id).await;
    let pause = subscribe_pause();
    if !pause.is_zero() {
        tokio::time::sleep(pause).await;
    }
    if let Err(e) =
        crate::session_restore::resubscribe(shared, router_id, owner, &meta.subscriptions).await
    {
        tracing::warn!(error = %e, "cluster: handed-over session not made in the router");
        return Received::Nothing;
    }
    if shared.sessions.resume(router_id, owner, usize::MAX).is_ok() {
        shared.sessions.save(router_id, &meta.subscriptions);
    }
    let Some(through) = parked_through else {
        if let Some(cut) = cut {
            read_after_cut(shared, claim, router_id, key, &meta, &cut, &mut in_park).await;
        }
        return Received::Installed;
    };
    if let Some(cut) = cut {
        // The live park of a session whose client was connected to that node, which
        // had everything up to `cut` (`gateway/checkpoint.rs`): what came after,
        // delivered there or not, is read from the stream. (Its transfer consumer took
        // and acknowledged what its router then held for the client.)
        let read = read_after_cut(
            shared,
            claim,
            router_id,
            key,
            &meta,
            &cut,
            &mut ReadOnBehalf::default(),
        )
        .await;
        return Received::Parked(ParkedResume { through, read });
    }
    let mut read = ReadOnBehalf::default();
    if let (Some(node), Some(cluster), Some(book)) =
        (claim.previous.as_deref(), &shared.cluster, &shared.durable)
    {
        // Subscribed here now: what the stream gets from here on comes through this
        // node's own consumer.
        let read_for = super::unread::ReadFor::of(shared, cluster, buckets, node, key, &meta);
        let found = super::unread::read(read_for).await;
        // Some may reach this node's router too, through its own consumer: skipped
        // there (`origin.rs`).
        let mut unread = moved_in(cluster, router_id, found);
        // What the park brought already is not queued twice (one equal message left
        // out per message parked): duplicates would count against the session's
        // queue limit and push out the newest.
        unread.retain(|(m, _)| !in_park.take(m));
        if !unread.is_empty() {
            tracing::info!(
                client_id = %key.client_id,
                node,
                messages = unread.len(),
                "cluster: messages the previous node left unread added to the session"
            );
            read = ReadOnBehalf::of(unread.iter().map(|(m, _)| m));
            // Replayed by the resume that follows, as carried over.
            let _ = book.late(key, unread).await;
        }
    }
    Received::Parked(ParkedResume { through, read })
}

/// The messages of `read` for the session `router_id` moving here, as carried over to
/// it; its connection skips its router's copies of them (noted by their ids,
/// [`super::Cluster::moved_in`]).
fn moved_in(
    cluster: &super::Cluster,
    router_id: &str,
    read: Vec<super::reads::Read>,
) -> Vec<(moatmq_store::QueuedMessage, bool)> {
    cluster.moved_in(router_id, read.iter().map(|r| r.id).collect());
    read.into_iter().map(|r| (r.message, false)).collect()
}

/// A pause between storing a session handed over and subscribing it in the router:
/// none, or with the `test-hooks` feature the milliseconds in
/// `MOATMQ_TEST_HANDOFF_SUBSCRIBE_PAUSE_MS`, so that a test can publish while the
/// session is on neither node.
fn subscribe_pause() -> Duration {
    static HOOKED: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    super::hooked(
        &HOOKED,
        "MOATMQ_TEST_HANDOFF_SUBSCRIBE_PAUSE_MS",
        Duration::ZERO,
    )
}

/// What was published for the session `key` (subscribed here now) between its old node
/// letting it go (`cut`) and this node subscribing it, read from the transfer stream and
/// added to it (`unread.rs`), but for one equal message per message in `handed`;
/// replayed by the resume that follows as carried over; what was added.
async fn read_after_cut(
    shared: &Shared,
    claim: &OwnerClaim,
    router_id: &str,
    key: &SessionKey,
    meta: &moatmq_store::SessionMeta,
    cut: &super::Cut,
    handed: &mut ReadOnBehalf,
) -> ReadOnBehalf {
    let (Some(cluster), Some(book)) = (&shared.cluster, &shared.durable) else {
        return ReadOnBehalf::default();
    };
    let here = cluster.cut_here();
    // This node's own messages up to `here` are read from the stream: once it has them.
    let stored = tokio::time::timeout(
        super::reads::READ_WAIT,
        cluster.transferred_through(here.forwarded),
    )
    .await;
    if !matches!(stored, Ok(true)) {
        tracing::warn!(
            client_id = %key.client_id,
            "cluster: this node's messages not yet in the transfer stream; the session may miss some of them"
        );
    }
    let node = claim.previous.as_deref().unwrap_or(cut.origin.as_str());
    let read_for = super::unread::ReadFor::of(shared, cluster, &claim.buckets, node, key, meta);
    let read = super::unread::after_cut(read_for, cut, &here).await;
    // The router may forward some of these to the session's connection too (this
    // node's own held back for the transfer stream, or any that reached the router
    // after the session's subscriptions): it skips those (`origin.rs`).
    let mut missed = moved_in(cluster, router_id, read);
    // What the session brought already is not added twice (one equal message left
    // out per message brought).
    missed.retain(|(m, _)| !handed.take(m));
    if missed.is_empty() {
        return ReadOnBehalf::default();
    }
    tracing::debug!(
        client_id = %key.client_id,
        messages = missed.len(),
        "cluster: messages published while the session moved added to it"
    );
    let read = ReadOnBehalf::of(missed.iter().map(|(m, _)| m));
    let _ = book.late(key, missed).await;
    read
}

/// Once NATS is reached at start-up: removes from the handoff bucket every session
/// whose expiry has passed (the parks of a node stopped or removed for good, whose
/// clients never came back), with its parts. Nobody may take those any more
/// ([`install`] discards them too), and without this they would stay in NATS for good.
pub async fn sweep_expired(shared: Arc<Shared>) {
    let Some(cluster) = &shared.cluster else {
        return;
    };
    let Some(buckets) = super::nodes::buckets_set(&Arc::downgrade(&shared)).await else {
        return;
    };
    // Session values only (keys of one token): a part (`<key>.<n>`) goes with its
    // session's value.
    let mut entries = match super::state::list_entries(&buckets.handoff, "*").await {
        Ok(entries) => entries,
        Err(e) => {
            tracing::debug!("cluster: expired sessions not swept: {e}");
            return;
        }
    };
    let now = moatmq_store::now_unix();
    let mut swept = 0;
    loop {
        let entry = match entries.next().await {
            Ok(Some(entry)) => entry,
            Ok(None) => break,
            Err(e) => {
                tracing::debug!("cluster: expired sessions not all swept: {e}");
                break;
            }
        };
        let kv_key = entry.key.as_str();
        if entry.operation != kv::Operation::Put {
            continue;
        }
        let expired = value::open_head(cluster.owners.seal(), &buckets, kv_key, &entry.value)
            .is_ok_and(|h| {
                h.session
                    .as_ref()
                    .is_some_and(|(meta, _)| meta.is_expired(now))
            });
        if expired {
            value::remove(&buckets, kv_key, entry.revision).await;
            swept += 1;
        }
    }
    if swept > 0 {
        tracing::info!(
            sessions = swept,
            "cluster: expired sessions removed from the handoff bucket"
        );
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
    // Or a claim that reached the watch before went to this connection.
    let Err(revision) = cluster
        .owners
        .keep_offline_after(claim, router_id, key.clone())
    else {
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

/// How long a session moving in waits for what was admitted before it to reach the
/// router, untagged (`Cluster::tagging`).
const TAG_WAIT: Duration = Duration::from_secs(1);

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
    // Once what this node's transfer input took in has no holes (after a restart or
    // a loss of NATS, what the server had sent before without an acknowledgement is
    // read again first): the cut then names it all, and the taking node reads the
    // rest from the stream.
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
