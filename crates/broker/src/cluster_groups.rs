//! Shared subscriptions across nodes, the way in (docs/cluster.md, "Shared
//! subscriptions across nodes"): while this node has members of a group, it pulls from
//! the group's durable consumer on the transfer stream, which every node with members
//! pulls from and which hands each message to one of them. A message whose topic
//! matches the group's filter, and which its publisher may write under this node's ACL,
//! is published into the router as the group's copy (one local member gets it, through
//! `deliver`). Anything else is acknowledged and dropped.
//!
//! A stream message with QoS 1/2 copies is acknowledged only once the members that got
//! them settled every one ([`Held`], fed by the members' connections through
//! `cluster/groups.rs`' reports); meanwhile JetStream hears every few seconds that it is
//! still being worked on. It goes back to the group (NAK: another member, on any node,
//! gets it at once) when a member's connection ends holding one of its copies, or when
//! a copy never reached a member (a member left with it in the router's queue for it).
//! A node that dies holding some acknowledges nothing: JetStream hands them to another
//! node after the ack wait. When the last local member leaves, everything held is
//! given back. Apart from `cluster/` for the same reason as `cluster_input`.

use crate::cluster::groups::{next_ticket, Report, Start};
use crate::cluster::xfer::{self, Seen};
use crate::policy::Identity;
use crate::shared::Shared;
use async_nats::jetstream::{self, AckKind};
use futures_util::StreamExt;
use rumqttd::protocol::QoS;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Messages asked for in one pull: a small batch keeps the nodes' turns short (balance)
/// and what a leaving node gives back small.
const BATCH: usize = 10;
/// How long one pull request waits for messages; a node stops pulling at most this
/// long after its last member left.
const PULL_EXPIRES: Duration = Duration::from_secs(1);
/// Stream messages whose copies this node's members hold at most: past it the node
/// pulls no more until they settle, and the other nodes take the group's messages.
const MAX_HELD: usize = 100;
/// How often JetStream hears that held messages are still being worked on: well
/// inside the group consumer's ack wait (10 s).
const PROGRESS: Duration = Duration::from_secs(3);
/// How long every copy of a held message has to reach a member's connection; one that
/// has not by then was lost on the way, and the message goes back to the group.
const ARRIVAL: Duration = Duration::from_secs(30);

/// Starts a puller for each group this node gets a member of, until shutdown (the
/// pullers end with this task).
pub async fn run(
    shared: Arc<Shared>,
    client: async_nats::Client,
    seal: Arc<moatmq_store::ClusterSeal>,
    mut starts: mpsc::UnboundedReceiver<Start>,
) {
    let mut pullers = JoinSet::new();
    loop {
        tokio::select! {
            start = starts.recv() => match start {
                Some(start) => {
                    pullers.spawn(pull(shared.clone(), client.clone(), seal.clone(), start));
                }
                None => return,
            },
            Some(_) = pullers.join_next(), if !pullers.is_empty() => {}
        }
    }
}

/// Pulls for one group until its last local member leaves.
async fn pull(
    shared: Arc<Shared>,
    client: async_nats::Client,
    seal: Arc<moatmq_store::ClusterSeal>,
    start: Start,
) {
    let Some(cluster) = shared.cluster.as_ref() else {
        return;
    };
    let Start {
        gid,
        filter,
        ready,
        mut stop,
        mut reports,
    } = start;
    let js = jetstream::new(client.clone());
    let stream = xfer::stream_name(&cluster.prefix);
    let untimed = cluster.keeping.untimed;
    let mut held = Held::default();
    let mut progress = tokio::time::interval(PROGRESS);
    progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !*stop.borrow() {
        if client.connection_state() != async_nats::connection::State::Connected {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = stop.changed() => {}
            }
            continue;
        }
        let consumer =
            match xfer::group_consumer(&js, &cluster.prefix, &gid, &cluster.keeping).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("cluster: shared group consumer: {e}; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.changed() => {}
                    }
                    continue;
                }
            };
        ready.send_replace(true);
        while !*stop.borrow() {
            if held.is_full() {
                // The members have enough: wait for them, not for more.
                tokio::select! {
                    Some(report) = reports.recv() => held.report(report).await,
                    _ = progress.tick() => held.progress().await,
                    _ = stop.changed() => {}
                }
                continue;
            }
            // No more than there is room for: the members hold at most `MAX_HELD`.
            let batch = consumer
                .batch()
                .max_messages(BATCH.min(held.room()))
                .expires(PULL_EXPIRES)
                .messages()
                .await;
            let mut batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    tracing::debug!("cluster: shared group pull: {e}");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    break;
                }
            };
            loop {
                let message = tokio::select! {
                    message = batch.next() => message,
                    Some(report) = reports.recv() => {
                        held.report(report).await;
                        continue;
                    }
                    _ = progress.tick() => {
                        held.progress().await;
                        continue;
                    }
                };
                let message = match message {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => {
                        tracing::debug!("cluster: shared group pull: {e}");
                        break;
                    }
                    None => break,
                };
                if *stop.borrow() || !cluster.groups.has_members(&gid) {
                    // No member here any more: another node's member gets it now.
                    let _ = message.ack_with(AckKind::Nak(None)).await;
                    continue;
                }
                let id = xfer::message_id(&message);
                let Some(message) = held.redelivered(id.as_deref(), message) else {
                    // Still held here: the members work on it.
                    continue;
                };
                let ticket = next_ticket();
                let mut copies = 0;
                match xfer::take_in(&seal, &stream, None, untimed, &mut held.seen, &message) {
                    // A batch goes to this node's members whole (balance per batch).
                    Ok(arrived) => {
                        for m in arrived {
                            let on = hand_on(&shared, &gid, &filter, m, ticket);
                            copies += usize::from(on);
                        }
                    }
                    // Counted by this node's own consumer of the stream, which reads
                    // every message too.
                    Err(why) => tracing::debug!("cluster: shared group: {why:?}"),
                }
                if copies > 0 {
                    held.hold(ticket, id, message, copies);
                } else if let Err(e) = message.ack().await {
                    tracing::debug!("cluster: shared group message not acknowledged: {e}");
                }
            }
        }
    }
    // The last member left (or the node stops): what the members did not settle goes
    // to another node's members now.
    held.give_back_where(|_| true).await;
}

/// The stream messages whose QoS 1/2 copies this node's members hold, by ticket.
#[derive(Default)]
struct Held {
    messages: HashMap<u64, HeldMessage>,
    /// The ticket of each held message, by its message id.
    tickets: HashMap<String, u64>,
    /// Message ids taken in: a redelivery of one acknowledged is dropped.
    seen: Seen,
}

struct HeldMessage {
    message: jetstream::Message,
    id: Option<String>,
    copies: usize,
    arrived: usize,
    settled: usize,
    since: Instant,
}

impl Held {
    fn is_full(&self) -> bool {
        self.room() == 0
    }

    /// How many more stream messages the members may hold.
    fn room(&self) -> usize {
        MAX_HELD.saturating_sub(self.messages.len())
    }

    /// `message`, unless it is one held here already (JetStream sent it again: a
    /// progress note came late); then it replaces the held one's handle.
    fn redelivered(
        &mut self,
        id: Option<&str>,
        message: jetstream::Message,
    ) -> Option<jetstream::Message> {
        let Some(held) = id
            .and_then(|id| self.tickets.get(id))
            .and_then(|t| self.messages.get_mut(t))
        else {
            return Some(message);
        };
        held.message = message;
        None
    }

    /// Holds `message` (message id `id`) until its `copies` are settled.
    fn hold(
        &mut self,
        ticket: u64,
        id: Option<String>,
        message: jetstream::Message,
        copies: usize,
    ) {
        if let Some(id) = &id {
            self.tickets.insert(id.clone(), ticket);
        }
        let held = HeldMessage {
            message,
            id,
            copies,
            arrived: 0,
            settled: 0,
            since: Instant::now(),
        };
        self.messages.insert(ticket, held);
    }

    fn take(&mut self, ticket: u64) -> Option<HeldMessage> {
        let held = self.messages.remove(&ticket)?;
        if let Some(id) = &held.id {
            self.tickets.remove(id);
        }
        Some(held)
    }

    async fn report(&mut self, report: Report) {
        match report {
            Report::Arrived(ticket) => {
                if let Some(held) = self.messages.get_mut(&ticket) {
                    held.arrived += 1;
                }
            }
            Report::Settled(ticket) => {
                let Some(held) = self.messages.get_mut(&ticket) else {
                    return;
                };
                held.settled += 1;
                if held.settled < held.copies {
                    return;
                }
                if let Some(held) = self.take(ticket) {
                    if let Err(e) = held.message.ack().await {
                        tracing::debug!("cluster: shared group message not acknowledged: {e}");
                    }
                }
            }
            Report::Failed(ticket) => self.give_back(ticket).await,
            // Copies on their way to the member that left are lost in the router.
            Report::Left => self.give_back_where(|h| h.arrived < h.copies).await,
        }
    }

    /// JetStream keeps waiting for what the members hold; what never reached one is
    /// given back.
    async fn progress(&mut self) {
        self.give_back_where(|h| h.arrived < h.copies && h.since.elapsed() > ARRIVAL)
            .await;
        for held in self.messages.values() {
            let _ = held.message.ack_with(AckKind::Progress).await;
        }
    }

    /// The message of `ticket` goes back to the group: JetStream hands it to a member
    /// at once (here or on another node), and this node takes it in again if it comes
    /// back here.
    async fn give_back(&mut self, ticket: u64) {
        let Some(held) = self.take(ticket) else {
            return;
        };
        if let Some(id) = &held.id {
            self.seen.forget(id);
        }
        let _ = held.message.ack_with(AckKind::Nak(None)).await;
    }

    /// [`Held::give_back`] of every held message `which` picks.
    async fn give_back_where(&mut self, which: impl Fn(&HeldMessage) -> bool) {
        let tickets: Vec<u64> = self
            .messages
            .iter()
            .filter(|(_, h)| which(h))
            .map(|(t, _)| *t)
            .collect();
        for ticket in tickets {
            self.give_back(ticket).await;
        }
    }
}

/// One message of the stream for group `gid` (inner filter `filter`): into the router
/// as the group's copy if it is the group's and its message expiry has not run out
/// (what is left of it goes with it); a QoS 1/2 copy carries `ticket`. `true` if it
/// did.
fn hand_on(shared: &Shared, gid: &str, filter: &str, arrived: xfer::Arrived, ticket: u64) -> bool {
    let Some(cluster) = shared.cluster.as_ref() else {
        return false;
    };
    let xfer::Arrived {
        envelope,
        payload,
        waited,
    } = arrived;
    // Counted down by the time it waited, before the envelope is taken apart.
    let props = xfer::properties_now(&envelope, waited);
    let topic = envelope.topic;
    if !crate::topic::valid_topic_name(&topic, shared.config.limits.max_topic_levels)
        || topic.starts_with('$')
        || !moatmq_acl::topic_matches_filter(filter, &topic)
    {
        return false;
    }
    let who = Identity {
        username: envelope.user,
        client_id: envelope.client,
    };
    // As this node's admit of the same message (`cluster_input`) checks, and audits.
    if !shared.policy.may_publish(&who, &topic).allowed {
        return false;
    }
    let qos = xfer::qos_of(envelope.qos);
    let Ok(props) = props else {
        tracing::debug!(
            topic,
            "cluster: shared group message expired in the stream dropped"
        );
        return false;
    };
    let ticket = (qos != QoS::AtMostOnce).then_some(ticket);
    cluster
        .groups
        .publish_copy(gid, &topic, payload, qos, envelope.retain, props, ticket);
    ticket.is_some()
}
