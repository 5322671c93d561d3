//! What a node that died leaves in NATS, removed once nobody can need it.
//!
//! A node stopped gracefully releases its clean sessions and parks its persistent ones
//! offline (with their disconnect time: the start-up sweep in `handoff.rs` removes them
//! once expired). A node killed for good leaves the ownership entries of its clean
//! sessions and the live parks of its connected persistent sessions, which name no
//! disconnect time, so nothing would ever remove them. Every [`SWEEP_EVERY`] the live
//! node with the smallest name (one node, so the work is not done N times) looks for
//! nodes gone ([`nodes::gone`] without an entry, on NATS's clock, so a node's own clock
//! does not matter) and removes, for each session whose ownership entry names one:
//! - a clean session's entry (its connection died with the node);
//! - a persistent session's entry and park once the session has expired, counted from
//!   its disconnect time if it was offline; if it was connected, once
//!   [`CONNECTED_KEPT`] (a day) or its expiry, the longer, has passed since its node was
//!   last heard from (the moment its connection can have ended at the latest). A node
//!   cut off from NATS alone looks gone too, and still serves those clients: what it
//!   left for them in NATS is theirs until the partition is longer than a day.
//!
//! Each removal purges up to the revision read, so a claim or park written meanwhile
//! (the client came back) survives. A node gone is forgotten (its entry removed) once
//! a complete listing of the ownership bucket finds nothing naming it; a node that
//! never wrote an entry (a release before it) is never taken for gone. A node sweeps
//! only once its own NATS connection has been up for [`nodes::gone`]: right after a
//! NATS restart or a partition healed, every node's entry is as old as the break until
//! it puts a new one, and live nodes would be taken for gone. Removing a clean
//! session's entry of a node that is only cut off costs nothing: a newer claim is what
//! closes an old connection, and it is written either way.

use super::handoff_value as value;
use super::nodes;
use super::owner::Buckets;
use super::replay::stored_ms;
use super::state::{bucket, list_entries, remove_up_to};
use crate::shared::Shared;
use async_nats::jetstream::kv;
use std::collections::HashMap;
use std::sync::Weak;
use std::time::Duration;

/// How often the sweep runs.
const SWEEP_EVERY: Duration = Duration::from_secs(600);

/// How long after its node was last heard from a connected persistent session's
/// ownership entry and park are kept at least (more if its expiry is longer).
const CONNECTED_KEPT: Duration = Duration::from_secs(24 * 3600);

/// [`CONNECTED_KEPT`] (tests shorten it with `MOATMQ_TEST_CONNECTED_KEPT_MS`,
/// `test-hooks` only).
fn connected_kept() -> Duration {
    static HOOKED: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    super::hooked(&HOOKED, "MOATMQ_TEST_CONNECTED_KEPT_MS", CONNECTED_KEPT)
}

/// [`SWEEP_EVERY`] (tests shorten it with `MOATMQ_TEST_DEAD_SWEEP_MS`, `test-hooks`
/// only).
fn sweep_every() -> Duration {
    static HOOKED: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    super::hooked(&HOOKED, "MOATMQ_TEST_DEAD_SWEEP_MS", SWEEP_EVERY)
}

/// While the broker runs: sweeps every [`SWEEP_EVERY`].
pub async fn run(shared: Weak<Shared>) {
    loop {
        tokio::time::sleep(sweep_every()).await;
        let Some(buckets) = super::nodes::buckets_set(&shared).await else {
            return;
        };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        // After a loss of NATS (a NATS restart, a partition) every other node's entry is
        // as old as the loss until it puts one again, within an interval of its own
        // reconnection: not having heard from a node says it is gone only over
        // [`nodes::gone`] of listening.
        let listening = shared.cluster.as_ref().and_then(|c| c.up_for());
        if !listening.is_some_and(|up| up >= nodes::gone()) {
            tracing::debug!(
                ?listening,
                "cluster: connected to NATS for less than a node takes to count as gone; no sweep yet"
            );
            continue;
        }
        if let Err(e) = sweep(&shared, &buckets).await {
            tracing::debug!("cluster: sessions of nodes gone not swept: {e}");
        }
    }
}

/// A node's last entry.
struct Seen {
    key: String,
    revision: u64,
    /// When NATS stored it (Unix ms).
    at: i128,
}

/// What one sweep removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub clean: usize,
    pub persistent: usize,
    pub nodes: usize,
}

async fn sweep(shared: &Shared, buckets: &Buckets) -> Result<Swept, String> {
    let Some(cluster) = &shared.cluster else {
        return Ok(Swept::default());
    };
    let seal = cluster.owners.seal();
    let name = nodes::bucket_name(&cluster.prefix);
    let store = bucket(&buckets.js, &name, cluster.keeping.replicas).await?;
    let mut seen: HashMap<String, Seen> = HashMap::new();
    let mut nodes = list_entries(&store, ">").await?;
    while let Some(entry) = nodes.next().await? {
        if entry.operation != kv::Operation::Put {
            continue;
        }
        // One that does not open is refused and counted by `nodes.rs`; a node's last
        // entry is old by nature, so no replay check here.
        let Ok((node, _)) = nodes::open_entry(seal, &name, &entry) else {
            continue;
        };
        seen.insert(
            node.node,
            Seen {
                key: entry.key,
                revision: entry.revision,
                at: stored_ms(entry.created),
            },
        );
    }
    // NATS's clock: this node's own entry is at most one interval old.
    let Some(now) = seen.values().map(|s| s.at).max() else {
        tracing::debug!("cluster: no node entries");
        return Ok(Swept::default());
    };
    let gone_ms = i128::try_from(nodes::gone().as_millis()).unwrap_or(i128::MAX);
    let (dead, live): (HashMap<_, _>, HashMap<_, _>) =
        seen.into_iter().partition(|(_, s)| now - s.at >= gone_ms);
    if dead.is_empty() || live.keys().min() != Some(&cluster.node) {
        tracing::debug!(
            live = live.len(),
            dead = dead.len(),
            "cluster: no node gone, or another node sweeps"
        );
        return Ok(Swept::default());
    }
    let now_s = u64::try_from(now / 1000).unwrap_or(0);
    let mut swept = Swept::default();
    let mut named: HashMap<&str, usize> = HashMap::new();
    let mut owners = list_entries(&buckets.owner, ">").await?;
    while let Some(entry) = owners.next().await? {
        let key = entry.key.as_str();
        if entry.operation != kv::Operation::Put {
            continue;
        }
        let Ok(owner) = seal.open_owner(&buckets.owner.name, key, &entry.value) else {
            continue;
        };
        let Some((node, last)) = dead.get_key_value(&owner.node) else {
            continue;
        };
        if !owner.persistent {
            remove_up_to(&buckets.owner, key, entry.revision).await;
            swept.clean += 1;
            continue;
        }
        let last_s = u64::try_from(last.at / 1000).unwrap_or(0);
        if park_expired(buckets, seal, key, last_s, now_s).await {
            remove_up_to(&buckets.owner, key, entry.revision).await;
            swept.persistent += 1;
        } else {
            *named.entry(node.as_str()).or_default() += 1;
        }
    }
    // A node gone is forgotten only after a listing that saw every key: one cut short
    // by a pause may have missed what it still left.
    let complete = owners.complete();
    drop(owners);
    for (node, s) in dead.iter().filter(|_| complete) {
        if !named.contains_key(node.as_str()) && remove_up_to(&store, &s.key, s.revision).await {
            swept.nodes += 1;
        }
    }
    tracing::debug!(?swept, "cluster: sweep of nodes gone");
    if swept != Swept::default() {
        tracing::info!(
            clean = swept.clean,
            persistent = swept.persistent,
            nodes = swept.nodes,
            "cluster: sessions of nodes gone removed (clean sessions, expired persistent sessions), and nodes gone that nothing names any more"
        );
    }
    Ok(swept)
}

/// Whether the park at `key` is of a session that has expired at `now` (from its
/// disconnect time; for a connected one, [`connected_kept`] at least, from its node's
/// last entry at `last`); removes it if so.
/// A park missing or unreadable is left (and its ownership entry with it).
async fn park_expired(
    buckets: &Buckets,
    seal: &moatmq_store::ClusterSeal,
    key: &str,
    last: u64,
    now: u64,
) -> bool {
    let Ok(Some(entry)) = buckets.handoff.entry(key).await else {
        return false;
    };
    if entry.operation != kv::Operation::Put {
        return false;
    }
    let Ok(head) = value::open_head(seal, buckets, key, &entry.value) else {
        return false;
    };
    let Some((meta, _)) = &head.session else {
        return false;
    };
    let (ended, kept) = match meta.disconnected_at {
        Some(at) => (at, meta.expiry_interval),
        None => (last, meta.expiry_interval.max(connected_kept().as_secs())),
    };
    if ended.saturating_add(kept) > now {
        return false;
    }
    value::remove(buckets, key, entry.revision).await;
    true
}
