//! Shared subscriptions across nodes (docs/cluster.md, "Shared subscriptions across
//! nodes"): their names and this node's membership.
//!
//! A group (its identity-namespaced name and its inner filter) is known on every node by
//! its gid, a keyed hash. With `[cluster]` a member's subscription enters the router as
//! `$share/<gid>/\0share/<gid>/<filter>`, so only copies published on
//! `\0share/<gid>/<topic>` reach the group, never a client's publish (no topic name
//! holds NUL): the node that pulled the message from the group's consumer publishes
//! that copy (`cluster_groups.rs`), or [`Groups::deliver_here`] does for a message that
//! never reaches the transfer stream. [`Membership`] is one connection's share: the
//! first member of a group on this node starts its puller, the last one leaving stops
//! it.
//!
//! A `#` (or `+/...`) subscription matches a copy's topic too. Its forwards of copies are
//! dropped at the gateway, told apart from the group's own by [`MARK`]: the router
//! subscription of a group member carries that subscription identifier, which the
//! router adds to every forward through it, and which no client can use.
//!
//! A QoS 1/2 copy pulled from the stream carries a ticket ([`TICKET_KEY`]): the puller
//! acknowledges the stream message only once every copy it made of it was settled by
//! the member that got it (its PUBACK or PUBREC, or written at QoS 0, or withheld by
//! the deliver step), and gives it back to the group (NAK) when that member's
//! connection ends first. A node dying with copies in its members' hands loses none of
//! them: JetStream hands them to another node after the ack wait. [`Membership`] holds
//! the connection's tickets and reports to the group's puller ([`Report`]).

use crate::router::{namespaced_group, split_shared, GroupFilters, RouterHandle};
use bytes::Bytes;
use moatmq_store::ClusterSeal;
use rumqttd::protocol::{Publish, PublishProperties, QoS};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{mpsc, watch};

/// The first level of every group copy's topic: NUL, which no client's topic holds.
pub const TOPIC_PREFIX: &str = "\0share/";

/// The subscription identifier of every group member's router subscription: one past
/// MQTT's largest (268,435,455), so no client's, and rumqttd stores any `usize`. The
/// gateway takes it out of each forward before anything encodes it.
pub const MARK: usize = 0x1000_0000;

/// Hex characters of a gid: 128 bits of the keyed hash.
const GID_LEN: usize = 32;

/// The user property of a copy naming its ticket (see the module notes). Only copies
/// carry one, and [`Groups::publish_copy`] drops a publisher's own property of that
/// name, so no client can settle another's ticket.
pub const TICKET_KEY: &str = "$moatmq-ticket";

/// What a member's connection tells its group's puller about the copies of one ticket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// A copy reached a member's connection on this node.
    Arrived(u64),
    /// A copy was settled: the member has it (or the deliver step withheld it).
    Settled(u64),
    /// A copy that arrived will not be settled: its member's connection ended first.
    Failed(u64),
    /// A member left: copies on their way to it through the router are lost.
    Left,
}

/// A new ticket, unique in this process.
pub fn next_ticket() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A group this node now has a member of: its puller starts (`cluster_groups.rs`).
pub struct Start {
    pub gid: String,
    /// The group's inner filter.
    pub filter: String,
    /// Set by the puller once the group's consumer exists.
    pub ready: watch::Sender<bool>,
    /// Set when the last member on this node left.
    pub stop: watch::Receiver<bool>,
    /// What the members' connections report of the copies' tickets.
    pub reports: mpsc::UnboundedReceiver<Report>,
}

/// A group with members on this node.
struct Local {
    filter: String,
    members: usize,
    ready: watch::Receiver<bool>,
    stop: watch::Sender<bool>,
    reports: mpsc::UnboundedSender<Report>,
}

/// This node's groups.
#[derive(Clone)]
pub struct Groups {
    inner: Arc<Inner>,
}

struct Inner {
    seal: Arc<ClusterSeal>,
    router: RouterHandle,
    local: Mutex<HashMap<String, Local>>,
    starts: mpsc::UnboundedSender<Start>,
}

impl Groups {
    /// The groups of a node and the queue of pullers to start.
    pub fn new(
        seal: Arc<ClusterSeal>,
        router: RouterHandle,
    ) -> (Groups, mpsc::UnboundedReceiver<Start>) {
        let (starts, queue) = mpsc::unbounded_channel();
        let inner = Inner {
            seal,
            router,
            local: Mutex::new(HashMap::new()),
            starts,
        };
        (
            Groups {
                inner: Arc::new(inner),
            },
            queue,
        )
    }

    /// The gid of the namespaced `group` with inner filter `filter`.
    pub fn id(&self, group: &str, filter: &str) -> String {
        gid(&self.inner.seal, group, filter)
    }

    /// A connection's share of the groups, empty.
    pub fn membership(&self, username: Option<&str>) -> Membership {
        Membership {
            groups: self.clone(),
            username: username.map(str::to_string),
            held: HashMap::new(),
            tickets: HashMap::new(),
        }
    }

    /// Gives a message that never reaches the transfer stream (no NATS subject, queue
    /// full, a NATS-native message) to this node's members of each group it matches.
    pub fn deliver_here(
        &self,
        topic: &str,
        payload: &Bytes,
        qos: QoS,
        retain: bool,
        props: Option<&PublishProperties>,
    ) {
        if topic.starts_with('$') {
            // rumqttd matches no filter to a `$` topic: no group gets one on one node.
            return;
        }
        let matching: Vec<String> = self
            .local()
            .iter()
            .filter(|(_, g)| moatmq_acl::topic_matches_filter(&g.filter, topic))
            .map(|(gid, _)| gid.clone())
            .collect();
        for gid in matching {
            let props = props.cloned();
            self.publish_copy(&gid, topic, payload.clone(), qos, retain, props, None);
        }
    }

    /// Publishes the copy of a message for group `gid` into this node's router: one of
    /// the node's members gets it, and settles `ticket` (if any) with it.
    #[allow(clippy::too_many_arguments)]
    pub fn publish_copy(
        &self,
        gid: &str,
        topic: &str,
        payload: Bytes,
        qos: QoS,
        retain: bool,
        mut props: Option<PublishProperties>,
        ticket: Option<u64>,
    ) {
        if let Some(p) = props.as_mut() {
            p.user_properties.retain(|(k, _)| k != TICKET_KEY);
        }
        if let Some(ticket) = ticket {
            props
                .get_or_insert_with(PublishProperties::default)
                .user_properties
                .push((TICKET_KEY.to_owned(), ticket.to_string()));
        }
        let topic = Bytes::from(format!("{TOPIC_PREFIX}{gid}/{topic}"));
        self.inner
            .router
            .publish(topic, payload, qos, retain, props);
    }

    /// Tells the puller of `gid` on this node what became of a copy (nobody listens
    /// once the group's last member here left: its puller gave back what it held).
    fn report(&self, gid: &str, report: Report) {
        if let Some(group) = self.local().get(gid) {
            let _ = group.reports.send(report);
        }
    }

    /// Whether this node still has a member of `gid`.
    pub fn has_members(&self, gid: &str) -> bool {
        self.local().contains_key(gid)
    }

    fn local(&self) -> MutexGuard<'_, HashMap<String, Local>> {
        self.inner
            .local
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// One more member of `gid` here; the first starts its puller.
    fn join(&self, gid: &str, filter: &str) -> watch::Receiver<bool> {
        let mut local = self.local();
        if let Some(group) = local.get_mut(gid) {
            group.members += 1;
            return group.ready.clone();
        }
        let (ready_tx, ready) = watch::channel(false);
        let (stop, stop_rx) = watch::channel(false);
        let (reports, reports_rx) = mpsc::unbounded_channel();
        let start = Start {
            gid: gid.to_string(),
            filter: filter.to_string(),
            ready: ready_tx,
            stop: stop_rx,
            reports: reports_rx,
        };
        // The receiver lives as long as the cluster input; after it, nothing pulls.
        let _ = self.inner.starts.send(start);
        local.insert(
            gid.to_string(),
            Local {
                filter: filter.to_string(),
                members: 1,
                ready: ready.clone(),
                stop,
                reports,
            },
        );
        ready
    }

    /// One member of `gid` fewer here; the last stops its puller.
    fn leave(&self, gid: &str) {
        let mut local = self.local();
        let Some(group) = local.get_mut(gid) else {
            return;
        };
        group.members = group.members.saturating_sub(1);
        let _ = group.reports.send(Report::Left);
        if group.members == 0 {
            if let Some(group) = local.remove(gid) {
                group.stop.send_replace(true);
            }
        }
    }
}

/// One connection's shared subscriptions with `[cluster]`; it leaves their groups when
/// dropped (the connection ended).
pub struct Membership {
    groups: Groups,
    username: Option<String>,
    /// The client's filter (`$share/<group>/<filter>`) and its gid.
    held: HashMap<String, String>,
    /// Copies with a ticket that reached this connection at QoS 1/2, by the router's
    /// packet id: their gid and ticket, until settled.
    tickets: HashMap<u16, (String, u64)>,
}

impl Membership {
    /// The connection holds `filter`: if it is a shared subscription it did not hold
    /// yet, it joins the group, and the answer says when the group's consumer exists.
    pub fn join(&mut self, filter: &str) -> Option<watch::Receiver<bool>> {
        let (group, inner) = split_shared(filter)?;
        if self.held.contains_key(filter) {
            return None;
        }
        let gid = self
            .groups
            .id(&namespaced_group(self.username.as_deref(), group), inner);
        let ready = self.groups.join(&gid, inner);
        self.held.insert(filter.to_string(), gid);
        Some(ready)
    }

    /// The connection no longer holds `filter`.
    pub fn leave(&mut self, filter: &str) {
        if let Some(gid) = self.held.remove(filter) {
            self.groups.leave(&gid);
        }
    }

    /// The group copy `topic` (`\0share/<gid>/<topic>`) for this connection: the
    /// client's filter of that group and the real topic; `None` if it is one of a group
    /// this connection is not a member of.
    pub fn copy_of<'a, 'm>(&'m self, topic: &'a [u8]) -> Option<(&'m str, &'a [u8])> {
        copy_topic(
            self.held.iter().map(|(f, g)| (f.as_str(), g.as_str())),
            topic,
        )
    }
}

impl Membership {
    /// A router forward reached this connection: if it is a copy of a group this
    /// connection is a member of (through the group's subscription: [`MARK`]) with a
    /// ticket, the ticket is taken out of its properties and reported; a copy
    /// forwarded at QoS 0 is settled at once, one at QoS 1/2 when [`Membership::settle`]
    /// is called with its packet id.
    pub fn arrived(&mut self, publish: &Publish, props: &mut Option<PublishProperties>) {
        let topic = &publish.topic[..];
        if self.held.is_empty() || !is_copy(topic) {
            return;
        }
        let Some(p) = props.as_mut() else {
            return;
        };
        if !p.subscription_identifiers.contains(&MARK) {
            return;
        }
        let Some(at) = p.user_properties.iter().position(|(k, _)| k == TICKET_KEY) else {
            return;
        };
        let (_, value) = p.user_properties.remove(at);
        let (Ok(ticket), Some(gid)) = (value.parse::<u64>(), copy_gid(topic)) else {
            return;
        };
        if !self.held.values().any(|g| g.as_bytes() == gid) {
            return;
        }
        let gid = String::from_utf8_lossy(gid).into_owned();
        // Read from the encoded packet: only for a member's copy with a ticket.
        let (qos, pkid) = crate::codec::qos_and_pkid(publish);
        self.groups.report(&gid, Report::Arrived(ticket));
        if qos == QoS::AtMostOnce {
            self.groups.report(&gid, Report::Settled(ticket));
        } else if let Some((gid, old)) = self.tickets.insert(pkid, (gid, ticket)) {
            // The router reuses a packet id only once it was acknowledged.
            self.groups.report(&gid, Report::Settled(old));
        }
    }

    /// The router forward `pkid` was settled: the client acknowledged it (PUBACK or
    /// PUBREC, whatever the reason code: MQTT-4.8.2-6), or the deliver step withheld
    /// it, or it went out at QoS 0. Its copy's ticket, if any, is settled.
    pub fn settle(&mut self, pkid: u16) {
        if self.tickets.is_empty() {
            return;
        }
        if let Some((gid, ticket)) = self.tickets.remove(&pkid) {
            self.groups.report(&gid, Report::Settled(ticket));
        }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        // The copies this client never settled go back to the group (MQTT 5 4.8.2: a
        // member's connection lost, another member may get them at once).
        for (_, (gid, ticket)) in self.tickets.drain() {
            self.groups.report(&gid, Report::Failed(ticket));
        }
        for gid in self.held.values() {
            self.groups.leave(gid);
        }
    }
}

/// The gid of the group copy `topic`.
fn copy_gid(topic: &[u8]) -> Option<&[u8]> {
    let rest = topic.strip_prefix(TOPIC_PREFIX.as_bytes())?;
    let at = rest.iter().position(|&b| b == b'/')?;
    Some(&rest[..at])
}

/// Whether `topic` is a group copy: never one of a client's messages.
pub fn is_copy(topic: &[u8]) -> bool {
    topic.starts_with(TOPIC_PREFIX.as_bytes())
}

/// The gid of the namespaced `group` with inner filter `filter`: a keyed hash, so
/// neither NATS nor anyone without the cluster key learns the group or the filter.
fn gid(seal: &ClusterSeal, group: &str, filter: &str) -> String {
    let mut gid = seal.key_of(&format!("share\0{group}\0{filter}"));
    gid.truncate(GID_LEN);
    gid
}

/// The router filter of a member of group `gid` on `filter`: the gid is rumqttd's group
/// name (one group per identity, name and filter) and the level before the filter.
fn member_filter(gid: &str, filter: &str) -> String {
    format!("$share/{gid}/{TOPIC_PREFIX}{gid}/{filter}")
}

/// The filter (of `held`: filter and gid) and the real topic of the group copy `topic`,
/// if its gid is held; see [`Membership::copy_of`].
fn copy_topic<'a, 'h>(
    mut held: impl Iterator<Item = (&'h str, &'h str)>,
    topic: &'a [u8],
) -> Option<(&'h str, &'a [u8])> {
    let gid = copy_gid(topic)?;
    let (filter, _) = held.find(|(_, g)| g.as_bytes() == gid)?;
    Some((filter, &topic[TOPIC_PREFIX.len() + gid.len() + 1..]))
}

impl GroupFilters for Groups {
    fn router_filter(&self, group: &str, filter: &str) -> String {
        member_filter(&self.id(group, filter), filter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::namespaced_group;

    fn seal() -> ClusterSeal {
        ClusterSeal::new(&moatmq_store::RetainedKey::from_hex(&"07".repeat(32)).unwrap())
    }

    #[test]
    fn gids_are_per_identity_group_and_filter_and_hold_no_plaintext() {
        let seal = seal();
        let alice = namespaced_group(Some("alice"), "workers");
        let bob = namespaced_group(Some("bob"), "workers");
        let g = gid(&seal, &alice, "jobs/#");
        assert_eq!(g.len(), GID_LEN);
        assert!(g.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(g, gid(&seal, &alice, "jobs/#"), "the same on every node");
        assert_ne!(g, gid(&seal, &bob, "jobs/#"), "another identity's group");
        assert_ne!(g, gid(&seal, &alice, "jobs/+"), "another filter");
        assert_ne!(g, gid(&seal, &namespaced_group(None, "workers"), "jobs/#"));
        let other =
            ClusterSeal::new(&moatmq_store::RetainedKey::from_hex(&"08".repeat(32)).unwrap());
        assert_ne!(g, gid(&other, &alice, "jobs/#"), "another cluster key");
        let filter = member_filter(&g, "jobs/#");
        assert_eq!(filter, format!("$share/{g}/\0share/{g}/jobs/#"));
        assert!(!filter.contains("workers") && !filter.contains("alice"));
    }

    #[test]
    fn copies_are_for_their_group_only_and_no_client_can_make_one() {
        fn copy(t: &[u8]) -> Option<(&'static str, &[u8])> {
            copy_topic([("$share/a/#", "aa"), ("$share/b/#", "bb")].into_iter(), t)
        }
        assert_eq!(
            copy(b"\0share/bb/jobs/1"),
            Some(("$share/b/#", &b"jobs/1"[..]))
        );
        assert_eq!(copy(b"\0share/cc/jobs/1"), None, "another group's");
        assert_eq!(copy(b"\0share/b/jobs/1"), None, "a prefix of a gid");
        assert_eq!(copy(b"\0share/bb"), None, "no topic");
        assert_eq!(copy(b"jobs/1"), None, "not a copy");
        assert!(!is_copy(b"share/bb/jobs"));
        // NUL is in no client's topic name or filter, nor in cluster input's.
        assert!(!moatmq_acl::valid_topic_name("\0share/bb/jobs"));
        assert!(!moatmq_acl::valid_topic_filter("\0share/#"));
        assert!(!moatmq_acl::valid_topic_filter("$share/g/\0share/#"));
    }
}
