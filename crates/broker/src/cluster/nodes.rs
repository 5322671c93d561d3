//! Which nodes are alive, and whether they enforce what this one does.
//!
//! Every node puts an entry in the bucket `<base>_nodes` when the buckets are set up,
//! every [`EVERY`] and after each SIGHUP reload: its name, this process and a digest of
//! each security setting in force (ACL, password file, anonymous access per listener,
//! client CAs of its TLS listeners, `native_user`). The key is the keyed hash of the
//! node name, the value sealed with its time like other KV state (`seal_node`), so NATS
//! learns nothing from it and an old entry put back is refused. A node not heard from
//! for [`GONE`] is gone; its last entry stays, saying when it was last heard from,
//! until `dead.rs` has removed what it left in the other buckets.
//!
//! Every node watches the bucket and compares: another node whose settings differ means
//! that a client's rights depend on which node the Service sends it to. That is logged
//! (warning, naming the node and the settings, never their contents) and counted in
//! `moatmq_cluster_nodes_differing`; `moatmq_cluster_nodes` counts the nodes heard from.
//! A second process under this node's name is logged as an error: two nodes with one
//! name take each other's sessions.

use super::owner::Buckets;
use super::replay::{check_kv, now_ms, stored_ms};
use crate::shared::Shared;
use crate::tls::TlsSetup;
use async_nats::jetstream::kv;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::time::Instant;

/// How often a node puts its entry again.
const EVERY: Duration = Duration::from_secs(20);

/// How long after its last entry a node counts as gone.
pub const GONE: Duration = Duration::from_secs(90);

/// [`GONE`] (tests shorten it with `MOATMQ_TEST_NODE_GONE_MS`, `test-hooks` only).
pub fn gone() -> Duration {
    static HOOKED: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    super::hooked(&HOOKED, "MOATMQ_TEST_NODE_GONE_MS", GONE)
}

/// [`EVERY`], shortened with [`gone`] in the same proportion.
fn every() -> Duration {
    EVERY.mul_f64(gone().as_secs_f64() / GONE.as_secs_f64())
}

/// The nodes bucket's name.
pub fn bucket_name(prefix: &str) -> String {
    format!("{}_nodes", super::bucket_base(prefix))
}

/// A node's entry: who, which process, and a digest or value per setting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub node: String,
    /// `<node>:<epoch>` of the process that wrote it.
    pub process: String,
    /// Setting name to what it is on that node; names one release does not know are
    /// not compared.
    pub settings: BTreeMap<String, String>,
}

/// The TLS listeners of this node, by name, for their client CAs.
pub type Listeners = Vec<(String, Arc<TlsSetup>)>;

/// This node's security settings as they are in force now.
pub fn settings(shared: &Shared, tls: &Listeners) -> BTreeMap<String, String> {
    let config = &shared.config;
    let (acl, passwords) = shared.policy.digests();
    let mut out = BTreeMap::new();
    out.insert(
        "acl".to_owned(),
        acl.map_or_else(|| "built-in".to_owned(), hex::encode),
    );
    out.insert(
        "password_file".to_owned(),
        passwords.map_or_else(|| "none".to_owned(), hex::encode),
    );
    let anonymous: Vec<String> = config
        .listener
        .iter()
        .map(|l| format!("{}={}", l.name, config.anonymous_allowed(l)))
        .collect();
    out.insert("anonymous".to_owned(), anonymous.join(","));
    let trust: Vec<String> = tls
        .iter()
        .map(|(n, t)| format!("{n}: {}", t.trust()))
        .collect();
    out.insert("client_ca".to_owned(), trust.join("; "));
    let native = shared
        .cluster
        .as_ref()
        .and_then(|c| c.native_user.clone())
        .unwrap_or_else(|| "none".to_owned());
    out.insert("native_user".to_owned(), native);
    out
}

/// The settings of `theirs` that differ from `ours` (those both name).
pub fn differing(
    ours: &BTreeMap<String, String>,
    theirs: &BTreeMap<String, String>,
) -> Vec<String> {
    ours.iter()
        .filter(|(name, value)| theirs.get(*name).is_some_and(|v| v != *value))
        .map(|(name, _)| name.clone())
        .collect()
}

/// What this node knows of the others.
pub struct View {
    process: String,
    /// This node's settings as last put.
    own: BTreeMap<String, String>,
    /// By KV key: the other node's entry and when it was written (on this clock).
    others: HashMap<String, (Entry, Instant)>,
    /// The settings reported as differing, by node name.
    reported: HashMap<String, Vec<String>>,
}

impl View {
    pub fn new(process: String) -> View {
        View {
            process,
            own: BTreeMap::new(),
            others: HashMap::new(),
            reported: HashMap::new(),
        }
    }

    /// This node's settings changed (or were put first).
    pub fn own(&mut self, settings: BTreeMap<String, String>) {
        self.own = settings;
    }

    /// An entry at `key`, written `age` ago; entries of this process are not others.
    pub fn note(&mut self, key: String, entry: Entry, age: Duration) {
        if entry.process == self.process || age >= gone() {
            // Its own, or the last entry of a node gone (kept for `dead.rs`).
            self.others.remove(&key);
            return;
        }
        let at = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
        self.others.insert(key, (entry, at));
    }

    /// Drops the nodes not heard from for [`GONE`]; their names.
    pub fn prune(&mut self) -> Vec<String> {
        let now = Instant::now();
        let after = gone();
        let mut left = Vec::new();
        self.others.retain(|_, (entry, at)| {
            let live = now.duration_since(*at) < after;
            if !live {
                left.push(entry.node.clone());
            }
            live
        });
        for node in &left {
            self.reported.remove(node);
        }
        left
    }

    /// Nodes heard from (this one included), and the others whose settings differ.
    pub fn counts(&self) -> (usize, usize) {
        let differ = self
            .others
            .values()
            .filter(|(e, _)| !differing(&self.own, &e.settings).is_empty())
            .count();
        (1 + self.others.len(), differ)
    }

    /// The nodes whose differing settings changed since last asked: (node, settings
    /// now differing; empty if they agree again).
    pub fn changes(&mut self) -> Vec<(String, Vec<String>)> {
        let mut now: HashMap<String, Vec<String>> = HashMap::new();
        for (entry, _) in self.others.values() {
            let d = differing(&self.own, &entry.settings);
            if !d.is_empty() {
                now.insert(entry.node.clone(), d);
            }
        }
        let mut out = Vec::new();
        for (node, d) in &now {
            if self.reported.get(node) != Some(d) {
                out.push((node.clone(), d.clone()));
            }
        }
        for node in self.reported.keys() {
            if !now.contains_key(node) {
                out.push((node.clone(), Vec::new()));
            }
        }
        out.sort();
        self.reported = now;
        out
    }
}

/// The cluster's buckets once they are set up (at once if they are); `None` once the
/// broker is gone.
pub(super) async fn buckets_set(shared: &Weak<Shared>) -> Option<Buckets> {
    let mut changes = shared
        .upgrade()
        .and_then(|s| s.cluster.as_ref().map(|c| c.owners.buckets_changes()))?;
    let set = changes.wait_for(Option::is_some).await.ok()?.clone();
    set
}

/// While the broker runs: keeps this node's entry in the bucket and compares the
/// others' with it.
pub async fn run(shared: Weak<Shared>, tls: Listeners) {
    loop {
        let Some(buckets) = buckets_set(&shared).await else {
            return;
        };
        let why = keep(&shared, &buckets, &tls).await;
        tracing::debug!("cluster: nodes bucket: {why}; again");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Puts, watches and compares until the bucket fails; why it ended.
async fn keep(shared: &Weak<Shared>, buckets: &Buckets, tls: &Listeners) -> String {
    let Some((name, replicas, node, process, changed)) = shared.upgrade().and_then(|s| {
        s.cluster.as_ref().map(|c| {
            (
                bucket_name(&c.prefix),
                c.keeping.replicas,
                c.node.clone(),
                c.origin.clone(),
                c.settings_changed.clone(),
            )
        })
    }) else {
        return "stopped".into();
    };
    let store = match super::state::bucket(&buckets.js, &name, replicas).await {
        Ok(s) => s,
        Err(e) => return e,
    };
    let mut entries = match store.watch_with_history(">").await {
        Ok(w) => w,
        Err(e) => return e.to_string(),
    };
    let started = now_ms();
    let mut view = View::new(process.clone());
    let mut tick = tokio::time::interval(every());
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = changed.notified() => {}
            entry = entries.next() => {
                let Some(shared) = shared.upgrade() else {
                    return "stopped".into();
                };
                match entry {
                    Some(Ok(entry)) => {
                        note(&shared, &name, &node, &process, started, &mut view, entry);
                    }
                    Some(Err(e)) => return e.to_string(),
                    None => return "watch ended".into(),
                }
                report(&shared, &mut view);
                continue;
            }
        }
        // A tick or a reload: this node's entry again.
        let Some(shared) = shared.upgrade() else {
            return "stopped".into();
        };
        let own = Entry {
            node: node.clone(),
            process: process.clone(),
            settings: settings(&shared, tls),
        };
        view.own(own.settings.clone());
        if let Err(e) = put(&shared, &store, &name, &own).await {
            return e;
        }
        for node_gone in view.prune() {
            tracing::info!(
                node = %node_gone,
                seconds = gone().as_secs(),
                "cluster: node not heard from, counted as gone"
            );
        }
        report(&shared, &mut view);
    }
}

async fn put(shared: &Shared, store: &kv::Store, bucket: &str, own: &Entry) -> Result<(), String> {
    let Some(cluster) = &shared.cluster else {
        return Ok(());
    };
    let seal = cluster.owners.seal();
    let key = seal.node_key_of(&own.node);
    let plain = serde_json::to_vec(own).map_err(|e| e.to_string())?;
    let value = seal
        .seal_node(bucket, &key, &plain, now_ms())
        .map_err(|e| e.to_string())?;
    store
        .put(key, value.into())
        .await
        .map(|_| ())
        .map_err(|e| format!("putting this node's entry: {e}"))
}

/// The node entry `entry` holds and when it was sealed, if it opens at its key in
/// `bucket` and names the node of that key (not yet checked for a replay).
pub fn open_entry(
    seal: &moatmq_store::ClusterSeal,
    bucket: &str,
    entry: &kv::Entry,
) -> Result<(Entry, u64), String> {
    let (plain, sealed_at) = seal
        .open_node(bucket, &entry.key, &entry.value)
        .map_err(|e| e.to_string())?;
    let e = serde_json::from_slice::<Entry>(&plain).map_err(|e| e.to_string())?;
    if seal.node_key_of(&e.node) == entry.key {
        Ok((e, sealed_at))
    } else {
        Err("sealed at its key but naming another node".to_owned())
    }
}

/// Takes `entry` into `view` if it opens, is fresh and names the node of its key.
fn note(
    shared: &Shared,
    bucket: &str,
    node: &str,
    process: &str,
    started: u64,
    view: &mut View,
    entry: kv::Entry,
) {
    let Some(cluster) = &shared.cluster else {
        return;
    };
    if entry.operation != kv::Operation::Put {
        return;
    }
    let stored = stored_ms(entry.created);
    let opened = open_entry(cluster.owners.seal(), bucket, &entry).and_then(|(e, sealed_at)| {
        check_kv(Some(sealed_at), Some(stored))?;
        Ok(e)
    });
    let e = match opened {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(error = %e, "cluster: node entry refused");
            shared.metrics.cluster_state_rejected.inc();
            return;
        }
    };
    if e.node == node && e.process != process {
        // An entry of this name from before this process started is its predecessor's.
        if i128::from(started) <= stored {
            tracing::error!(
                node = %node,
                "cluster: another moatmq process runs with this node_name: every node needs a name of its own (sessions and messages of the two get mixed up)"
            );
        }
        return;
    }
    let age_ms = (i128::from(now_ms()) - stored).clamp(0, i128::from(u64::MAX));
    let age = Duration::from_millis(u64::try_from(age_ms).unwrap_or(u64::MAX));
    view.note(entry.key, e, age);
}

/// Logs what changed and sets the gauges.
fn report(shared: &Shared, view: &mut View) {
    if view.own.is_empty() {
        // Nothing put yet: nothing to compare with.
        return;
    }
    for (node, differ) in view.changes() {
        if differ.is_empty() {
            tracing::info!(node = %node, "cluster: node enforces the same security settings as this one again");
        } else {
            tracing::warn!(
                node = %node,
                settings = %differ.join(", "),
                "cluster: node enforces different security settings than this one: a client's rights depend on which node it reaches; give every node the same files and settings"
            );
        }
    }
    let (nodes, differ) = view.counts();
    shared
        .metrics
        .cluster_nodes
        .set(i64::try_from(nodes).unwrap_or(i64::MAX));
    shared
        .metrics
        .cluster_nodes_differing
        .set(i64::try_from(differ).unwrap_or(i64::MAX));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn entry(node: &str, process: &str, pairs: &[(&str, &str)]) -> Entry {
        Entry {
            node: node.to_owned(),
            process: process.to_owned(),
            settings: settings(pairs),
        }
    }

    #[test]
    fn only_settings_both_name_are_compared() {
        let ours = settings(&[("acl", "a"), ("password_file", "p")]);
        assert!(differing(&ours, &settings(&[("acl", "a"), ("new", "x")])).is_empty());
        assert_eq!(
            differing(&ours, &settings(&[("acl", "b"), ("password_file", "p")])),
            vec!["acl".to_owned()]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn differences_are_reported_once_and_when_they_end() {
        let mut view = View::new("a:1".into());
        view.own(settings(&[("acl", "x")]));
        view.note(
            "ka".into(),
            entry("a", "a:1", &[("acl", "other")]),
            Duration::ZERO,
        );
        view.note(
            "kb".into(),
            entry("b", "b:1", &[("acl", "y")]),
            Duration::ZERO,
        );
        view.note(
            "kc".into(),
            entry("c", "c:1", &[("acl", "x")]),
            Duration::ZERO,
        );
        assert_eq!(view.counts(), (3, 1), "its own entry is not another node");
        assert_eq!(
            view.changes(),
            vec![("b".to_owned(), vec!["acl".to_owned()])]
        );
        assert!(view.changes().is_empty(), "reported once");
        view.note(
            "kb".into(),
            entry("b", "b:1", &[("acl", "x")]),
            Duration::ZERO,
        );
        assert_eq!(view.changes(), vec![("b".to_owned(), vec![])]);
        assert_eq!(view.counts(), (3, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn nodes_not_heard_from_are_gone() {
        let mut view = View::new("a:1".into());
        view.own(settings(&[("acl", "x")]));
        view.note(
            "kb".into(),
            entry("b", "b:1", &[("acl", "y")]),
            Duration::ZERO,
        );
        assert_eq!(view.changes().len(), 1);
        tokio::time::advance(GONE - Duration::from_secs(1)).await;
        assert!(view.prune().is_empty());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(view.prune(), vec!["b".to_owned()]);
        assert_eq!(view.counts(), (1, 0));
        assert!(
            view.changes().is_empty(),
            "a node gone is not said to agree"
        );
    }
}
