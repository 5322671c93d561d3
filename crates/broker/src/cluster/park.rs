//! Live parks (docs/cluster.md, "Session handoff"): while this node keeps a persistent
//! session offline, or its client is connected here (parked as it was at the connect
//! and at each change of its subscriptions), it keeps the session parked in the
//! handoff bucket too, at the
//! revision of its own claim, marked live: the value at the session's key holds the
//! session's meta and names its parts; the parts hold its messages, the first ones
//! written when the session went offline here (or was restored at start-up), one more
//! part for what each round of changes queued for it. A node that claims the session
//! takes a live park only if this node does not hand the session over itself within
//! [`HANDOFF_WAIT`](super::handoff::HANDOFF_WAIT) (`handoff::receive`): so a node killed
//! or lost for good costs its offline sessions nothing that was parked.
//!
//! The session writer reports every change of its offline sessions in order
//! ([`ParkEvent`]); this task writes them a round at a time, the sessions of a round
//! concurrently. The commit waiters of a round (publishers held for the commit at
//! `autosave_interval = 0`) are answered after the round's writes, so what they wait
//! for is parked too; a round that fails answers them `false` (not acknowledged) and
//! is tried again.

use super::handoff_value::{self as value, Handoff, Messages, Part};
use super::owner::Buckets;
use crate::durable::{ParkEvent, Taken};
use crate::router::router_client_id;
use crate::shared::Shared;
use futures_util::StreamExt;
use moatmq_store::{QueuedMessage, SessionKey, SessionMeta};
use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::mpsc;

/// Changes of a round, at most.
const ROUND: usize = 4096;
/// How long a round that failed waits before it is tried again.
const RETRY: Duration = Duration::from_secs(1);
/// Sessions written at once.
const AT_ONCE: usize = 32;

/// A session parked by this node.
struct Parked {
    key: SessionKey,
    kv_key: String,
    /// The revision of this node's claim, which the value names.
    revision: u64,
    meta: SessionMeta,
    /// Parts written and named by the value.
    parts: u32,
    /// The revision of the value last written.
    written: u64,
    /// Its exchanges with the client still open (`Taken::open`).
    open: crate::durable::Exchanges,
    /// Connected: everything up to here its client has (`gateway/checkpoint.rs`).
    cut: Option<super::Cut>,
}

/// What is left to write of one session.
#[derive(Default)]
struct Pending {
    /// Park it anew with these.
    fresh: Option<Taken>,
    /// Add these messages (with their ids).
    append: Vec<(u64, QueuedMessage)>,
    /// It left this node's offline sessions: remove its park.
    gone: bool,
    /// Its connected client has everything up to here: the park names it.
    cut: Option<super::Cut>,
}

impl Pending {
    fn apply(&mut self, event: Change) {
        match event {
            Change::Fresh(taken) => {
                // A connected session's cut still holds (its client has, or the park
                // holds, everything up to it); an offline one's park needs none.
                let connected = taken.meta.disconnected_at.is_none();
                let cut = self.cut.take().filter(|_| connected);
                *self = Pending {
                    fresh: Some(taken),
                    cut,
                    ..Pending::default()
                };
            }
            Change::Queued(messages) => match &mut self.fresh {
                Some(fresh) => {
                    for (id, m) in messages {
                        fresh.messages.push((m, false));
                        fresh.ids.push(id);
                    }
                }
                None => self.append.extend(messages),
            },
            Change::Gone => {
                *self = Pending {
                    gone: true,
                    ..Pending::default()
                };
            }
            Change::Checkpoint(cut) => {
                if !self.gone {
                    self.cut = Some(cut);
                }
            }
        }
    }
}

enum Change {
    /// Parked anew with this (offline, or connected).
    Fresh(Taken),
    Queued(Vec<(u64, QueuedMessage)>),
    Gone,
    Checkpoint(super::Cut),
}

/// Writes the live parks of this node's offline sessions from `feed` until it closes
/// or [`ParkEvent::Final`] ends it.
pub async fn run(shared: Weak<Shared>, mut feed: mpsc::UnboundedReceiver<ParkEvent>) {
    let Some(mut buckets_changed) = shared
        .upgrade()
        .and_then(|s| s.cluster.as_ref().map(|c| c.owners.buckets_changes()))
    else {
        return;
    };
    let mut parked: HashMap<SessionKey, Parked> = HashMap::new();
    let mut pending: HashMap<SessionKey, Pending> = HashMap::new();
    loop {
        // The next change, or (`None`) a retry of what failed.
        let first = if pending.is_empty() {
            match feed.recv().await {
                Some(event) => Some(event),
                None => return,
            }
        } else {
            match tokio::time::timeout(RETRY, feed.recv()).await {
                Ok(Some(event)) => Some(event),
                Ok(None) => return,
                Err(_) => None,
            }
        };
        let mut waiters = Vec::new();
        let mut barriers = Vec::new();
        let mut last = None;
        let mut next = first;
        let mut taken = 0;
        while let Some(event) = next.take() {
            taken += 1;
            match event {
                ParkEvent::Offline(key, t) | ParkEvent::Connected(key, t) => {
                    pending.entry(key).or_default().apply(Change::Fresh(t));
                }
                ParkEvent::Queued(key, m) => {
                    pending.entry(key).or_default().apply(Change::Queued(m));
                }
                ParkEvent::Gone(key) => pending.entry(key).or_default().apply(Change::Gone),
                ParkEvent::Checkpoint(key, cut) => {
                    pending
                        .entry(key)
                        .or_default()
                        .apply(Change::Checkpoint(cut));
                }
                ParkEvent::Taken(key) => {
                    // Handed over by `handoff::give`, which writes over the park.
                    pending.remove(&key);
                    parked.remove(&key);
                }
                ParkEvent::Committed(w, ok) => waiters.push((w, ok)),
                ParkEvent::Barrier(b) => barriers.push(b),
                ParkEvent::Final(reply) => last = Some(reply),
            }
            if last.is_some() || taken >= ROUND {
                break;
            }
            next = feed.try_recv().ok();
        }
        // Without NATS nothing is written: the round waits (publishers held for their
        // commit at `autosave_interval = 0` are held for NATS anyway in a cluster).
        let buckets = loop {
            if let Some(b) = buckets_changed.borrow_and_update().clone() {
                break Some(b);
            }
            if last.is_some() {
                break None;
            }
            if buckets_changed.changed().await.is_err() {
                return;
            }
        };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let ok = match &buckets {
            Some(buckets) => round(&shared, buckets, &mut parked, &mut pending).await,
            None => false,
        };
        for (w, committed) in waiters {
            for w in w {
                let _ = w.send(committed && ok);
            }
        }
        for b in barriers {
            let _ = b.send(());
        }
        if let Some(reply) = last {
            let n = match &buckets {
                Some(buckets) => finish(&shared, buckets, &parked).await,
                None => 0,
            };
            let _ = reply.send(n);
            return;
        }
    }
}

/// Writes what is pending, the sessions concurrently; `false` if any write failed (it
/// stays pending).
async fn round(
    shared: &Arc<Shared>,
    buckets: &Buckets,
    parked: &mut HashMap<SessionKey, Parked>,
    pending: &mut HashMap<SessionKey, Pending>,
) -> bool {
    let work: Vec<(SessionKey, Pending, Option<Parked>)> = pending
        .drain()
        .map(|(key, p)| {
            let was = parked.remove(&key);
            (key, p, was)
        })
        .collect();
    let done: Vec<(SessionKey, Written)> = futures_util::stream::iter(work)
        .map(|(key, p, was)| {
            // Owned: the futures are polled together, apart from this frame.
            let (shared, buckets) = (shared.clone(), buckets.clone());
            async move {
                let result = write(&shared, &buckets, &key, p, was).await;
                (key, result)
            }
        })
        .buffer_unordered(AT_ONCE)
        .collect()
        .await;
    let mut ok = true;
    for (key, result) in done {
        match result {
            Ok(Some(p)) => {
                parked.insert(key, p);
            }
            Ok(None) => {}
            Err((p, was)) => {
                ok = false;
                if let Some(was) = was {
                    parked.insert(key.clone(), was);
                }
                pending.insert(key, p);
            }
        }
    }
    ok
}

/// What [`write`] made of a session: its park now, or what to try again (and its park
/// as it was).
type Written = Result<Option<Parked>, (Pending, Option<Parked>)>;

/// Writes what is pending of the session `key`, parked as `was` (if it is): its park
/// now, or what to try again.
async fn write(
    shared: &Shared,
    buckets: &Buckets,
    key: &SessionKey,
    mut p: Pending,
    was: Option<Parked>,
) -> Written {
    let Some(cluster) = &shared.cluster else {
        return Ok(None);
    };
    let seal = cluster.owners.seal();
    let budget = value::budget(cluster.max_payload());
    if p.gone {
        if let Some(was) = was {
            value::remove(buckets, &was.kv_key, was.written).await;
        }
        return Ok(None);
    }
    // Parked anew while connected: the cut it had still holds.
    let kept_cut = was.as_ref().and_then(|w| w.cut.clone());
    let mut now = was;
    if let Some(Taken {
        meta,
        messages,
        ids,
        open,
    }) = p.fresh.take()
    {
        let router_id = router_client_id(key.owner.as_deref(), &key.client_id);
        // Parked at this node's claim; a session another node claimed meanwhile is
        // handed over (`handoff.rs`), not parked.
        let Some(revision) = cluster.owners.claimed_here(&router_id).await else {
            return Ok(None);
        };
        let connected = meta.disconnected_at.is_none();
        let fresh = Parked {
            key: key.clone(),
            kv_key: seal.session_key_of(&router_id),
            revision,
            meta,
            parts: 0,
            written: 0,
            open,
            // A cut reported since (the connection's first, as it resumed) is
            // written with it.
            cut: p.cut.take().or(kept_cut).filter(|_| connected),
        };
        match extend(shared, buckets, budget, fresh, messages, ids).await {
            Ok(parked) => now = Some(parked),
            Err((parked, messages, ids)) => {
                p.fresh = Some(Taken {
                    meta: parked.meta,
                    messages,
                    ids,
                    open: parked.open,
                });
                return Err((p, None));
            }
        }
    }
    if !p.append.is_empty() {
        let Some(parked) = now else {
            // Not parked here (another node's claim): nothing to add to.
            return Ok(None);
        };
        if parked.written != 0 && !still_there(buckets, &parked).await {
            // Taken by the node that claimed the session (this node was cut off, or
            // slow): what it queued since goes in its late handoff, not in a park
            // nobody would take.
            return Ok(None);
        }
        let (ids, messages): (Vec<u64>, Messages) =
            p.append.drain(..).map(|(id, m)| (id, (m, false))).unzip();
        match extend(shared, buckets, budget, parked, messages, ids).await {
            Ok(parked) => now = Some(parked),
            Err((parked, messages, ids)) => {
                p.append = ids
                    .into_iter()
                    .zip(messages)
                    .map(|(id, (m, _))| (id, m))
                    .collect();
                return Err((p, Some(parked)));
            }
        }
    }
    if let Some(cut) = p.cut.take() {
        let Some(mut parked) = now else {
            return Ok(None);
        };
        if parked.written != 0 && !still_there(buckets, &parked).await {
            return Ok(None);
        }
        let was = parked.cut.replace(cut);
        match write_head(shared, buckets, budget, &parked, parked.parts).await {
            Ok(written) => now = Some(Parked { written, ..parked }),
            Err(e) => {
                tracing::debug!("cluster: session park not written: {e}");
                p.cut = parked.cut.take();
                parked.cut = was;
                return Err((p, Some(parked)));
            }
        }
    }
    Ok(now)
}

/// Writes the value of `parked` naming `parts` parts; the revision written.
async fn write_head(
    shared: &Shared,
    buckets: &Buckets,
    budget: usize,
    parked: &Parked,
    parts: u32,
) -> Result<u64, String> {
    let Some(cluster) = &shared.cluster else {
        return Err("not in a cluster".to_string());
    };
    let seal = cluster.owners.seal();
    let head = head(parked, parts, true);
    match postcard::to_allocvec(&head) {
        // Only over the value this node wrote last: a park taken meanwhile stays taken.
        Ok(plain) if parked.written != 0 && plain.len() <= budget => {
            value::update_value(seal, buckets, &parked.kv_key, &plain, parked.written).await
        }
        _ => value::put(seal, buckets, &parked.kv_key, &head, cluster.max_payload()).await,
    }
    .map_err(|e| e.to_string())
}

/// Adds `messages` to the park in new parts, then writes the value naming them. On a
/// failure the park is as it was (parts written are named by no value yet).
async fn extend(
    shared: &Shared,
    buckets: &Buckets,
    budget: usize,
    parked: Parked,
    messages: Messages,
    ids: Vec<u64>,
) -> Result<Parked, (Parked, Messages, Vec<u64>)> {
    let Some(cluster) = &shared.cluster else {
        return Err((parked, messages, ids));
    };
    let seal = cluster.owners.seal();
    let runs = match value::runs(messages.clone(), ids.clone(), 0, budget) {
        Ok(runs) => runs,
        Err(e) => {
            tracing::warn!("cluster: session not parked: {e}");
            return Err((parked, messages, ids));
        }
    };
    let mut parts = parked.parts;
    for (run, run_ids) in runs.into_iter().filter(|(m, _)| !m.is_empty()) {
        parts += 1;
        let part = Part {
            revision: parked.revision,
            index: parts,
            messages: run,
            ids: run_ids,
        };
        if let Err(e) = value::put_part(seal, buckets, &parked.kv_key, &part).await {
            tracing::debug!("cluster: session park not written: {e}");
            return Err((parked, messages, ids));
        }
    }
    if parts == parked.parts && parked.written != 0 {
        return Ok(parked);
    }
    match write_head(shared, buckets, budget, &parked, parts).await {
        Ok(written) => Ok(Parked {
            parts,
            written,
            ..parked
        }),
        Err(e) => {
            tracing::debug!("cluster: session park not written: {e}");
            Err((parked, messages, ids))
        }
    }
}

/// Whether the park's value is still the one this node wrote last (not taken by a node
/// that claimed the session, nor replaced by a handoff); if it cannot be read, it is
/// taken to be (the write then fails or not as NATS decides).
async fn still_there(buckets: &Buckets, parked: &Parked) -> bool {
    match buckets.handoff.entry(&parked.kv_key).await {
        Ok(Some(entry)) => {
            entry.operation == async_nats::jetstream::kv::Operation::Put
                && entry.revision == parked.written
        }
        Ok(None) => false,
        Err(_) => true,
    }
}

/// The value of `parked` naming `parts` parts.
fn head(parked: &Parked, parts: u32, live: bool) -> Handoff {
    Handoff {
        revision: parked.revision,
        key: parked.key.clone(),
        session: Some((parked.meta.clone(), Vec::new())),
        parts,
        ids: Vec::new(),
        live,
        cut: if live { parked.cut.clone() } else { None },
        open: parked.open.clone(),
    }
}

/// At shutdown: every park is marked final (not live), so a node claiming one of these
/// sessions while this node is stopped takes it at once. Returns how many.
async fn finish(
    shared: &Arc<Shared>,
    buckets: &Buckets,
    parked: &HashMap<SessionKey, Parked>,
) -> usize {
    let cut = shared.cluster.as_ref().and_then(|c| {
        c.final_cut
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    });
    let finals: Vec<(String, Handoff)> = parked
        .values()
        .map(|p| {
            let mut head = head(p, p.parts, false);
            head.cut = cut.clone();
            (p.kv_key.clone(), head)
        })
        .collect();
    futures_util::stream::iter(finals)
        .map(|(kv_key, head)| {
            let (shared, buckets) = (shared.clone(), buckets.clone());
            async move {
                let Some(cluster) = &shared.cluster else {
                    return false;
                };
                let seal = cluster.owners.seal();
                value::put(seal, &buckets, &kv_key, &head, cluster.max_payload())
                    .await
                    .map_err(|e| tracing::warn!("cluster: session not parked: {e}"))
                    .is_ok()
            }
        })
        .buffer_unordered(AT_ONCE)
        .filter(|ok| std::future::ready(*ok))
        .count()
        .await
}
