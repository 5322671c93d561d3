//! Admit: the one step every message entering the broker passes, whoever sends it (a
//! client's PUBLISH, a will when it is published, cluster input), before it may reach
//! the router or the retained set. What it lets in from this node's own clients, and
//! from the NATS-native clients this node took in, is also handed to the cluster, when
//! there is one (`cluster/`).
//!
//! It holds the checks that do not depend on the connection's protocol state: the
//! payload limit (`limits.max_payload_size`), the write ACL in force at this moment
//! (the ACL may have been reloaded since a will's CONNECT), and the retained record with
//! its quotas. Every refusal is counted and audited here, as one [`Event`]. What the
//! sender is told (PUBACK code, CONNACK, nothing for a will) is the caller's business.
//!
//! The protocol checks of a client's PUBLISH (topic validity, aliases, receive maximum,
//! QoS 2 duplicates, publish rate) stay in the gateway: they decide whether the
//! connection itself is still valid, not whether one message may go in.

use crate::cluster::Forwarded;
use crate::event::Event;
pub use crate::inbound::Inbound;
use crate::origin::Transfer;
use crate::policy::Identity;
use crate::retained::{from_router_properties, Recorded};
use crate::retained_index::{owner_of, Refusal};
use crate::shared::{ConnInfo, Shared};

/// Who is sending a message into the broker: the audit log's `action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A client's PUBLISH.
    Publish,
    /// A will, published when its connection ended (or its delay ran out).
    Will,
    /// A message from another cluster node (`cluster/`): checked like any other, never
    /// forwarded to the cluster again.
    Cluster,
    /// A message of a NATS-native client, taken from the live subjects by this node
    /// alone (as `native_user`): checked like any other and forwarded to the other
    /// nodes through the transfer stream, not to its live subject again.
    Native,
}

impl Source {
    fn action(self) -> &'static str {
        match self {
            Source::Publish => "publish",
            Source::Will => "will",
            // One audit label for everything that comes from NATS, as before native
            // messages had a source of their own.
            Source::Cluster | Source::Native => "cluster",
        }
    }
}

/// The message may go to the router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admitted {
    /// Now.
    Now,
    /// Once the retained store has saved it, or the session store has committed the
    /// copies queued for offline sessions (`autosave_interval = 0`), and, with
    /// `[cluster]`, the transfer stream holds what this node forwarded so far: the
    /// sender's acknowledgement must not come before.
    AfterSave,
    /// Once the cluster's transfer stream holds it (a QoS 1/2 message with
    /// `[cluster]`), with no save to wait for: the sender's acknowledgement must not
    /// come before.
    AfterTransfer,
}

/// Why a message is not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// No write access (MQTT 5 reason 0x87).
    NotAuthorized,
    /// A retained quota would be passed (MQTT 5 reason 0x97).
    Quota,
    /// The payload is over `limits.max_payload_size` (MQTT 5 reason 0x83: PUBACK has no
    /// "too large" code).
    TooLarge,
    /// A QoS 1/2 message the cluster cannot take now (its queue to NATS is full): not
    /// to be acknowledged, the sender sends it again.
    Unavailable,
}

/// Admits `msg` from `who` on connection `info`, or says why not. A retained message is
/// recorded here (set, replaced, or cleared by an empty payload).
pub fn admit(
    shared: &Shared,
    info: &ConnInfo,
    who: &Identity,
    source: Source,
    msg: Inbound<'_>,
) -> Result<Admitted, Refused> {
    admit_numbered(shared, info, who, source, msg).map(|(admitted, _)| admitted)
}

/// [`admit`], with the message's place in the cluster's transfer stream when this node
/// forwarded it there: it goes to the router with it (`origin.rs`).
pub fn admit_numbered(
    shared: &Shared,
    info: &ConnInfo,
    who: &Identity,
    source: Source,
    msg: Inbound<'_>,
) -> Result<(Admitted, Option<Transfer>), Refused> {
    let limits = &shared.config.limits;
    if limits
        .max_payload_size
        .is_some_and(|max| msg.payload.len() > max)
    {
        // Like Mosquitto's message_size_limit: the message is dropped, the sender stays.
        tracing::debug!(client_id = %who.client_id, action = source.action(), "message over max_payload_size dropped");
        return Err(Refused::TooLarge);
    }
    if !may_write(shared, info, who, source, msg.topic) {
        return Err(Refused::NotAuthorized);
    }
    if let Some(cluster) = shared
        .cluster
        .as_ref()
        .filter(|c| source != Source::Cluster && !c.fits(who, &msg))
    {
        // The other nodes could not get it: refused here too, before anything is
        // recorded, rather than delivered on this node only.
        cluster.metrics.cluster_dropped.inc();
        tracing::debug!(client_id = %who.client_id, "message too large for the cluster's transfer stream refused");
        return Err(Refused::TooLarge);
    }
    let mut admitted = Admitted::Now;
    if msg.retain {
        match retain(shared, who, msg) {
            Ok(recorded) => {
                if recorded == Recorded::NeedsSave {
                    admitted = Admitted::AfterSave;
                }
                if let Some(cluster) = shared
                    .cluster
                    .as_ref()
                    .filter(|_| source == Source::Cluster && !msg.payload.is_empty())
                {
                    cluster.relayed_retained(msg.topic);
                }
            }
            Err(why) => {
                shared.emit(
                    &info.client(who),
                    Event::RetainedRefused {
                        topic: msg.topic,
                        reason: why.label(),
                    },
                );
                return Err(Refused::Quota);
            }
        }
    }
    // Queued for offline sessions and numbered for the transfer stream in one step: a
    // session leaving for another node reads its cut between two (`Cluster::cut_for`).
    // Messages taken in from the stream hold it from their input (`cluster_input`).
    let _step = shared
        .cluster
        .as_ref()
        .filter(|_| source != Source::Cluster && shared.durable.is_some())
        .map(|c| c.admission());
    if let Some(book) = &shared.durable {
        let queued = book.enqueue(
            msg.topic,
            msg.payload,
            msg.qos as u8,
            || msg.v5.then(|| from_router_properties(msg.properties)),
            msg.expires_at(),
        );
        if queued && book.is_sync() {
            // A copy for an offline persistent session is durable before the
            // acknowledgement (`autosave_interval = 0`).
            admitted = Admitted::AfterSave;
        }
    }
    if let Some(cluster) = shared
        .cluster
        .as_ref()
        .filter(|_| source != Source::Cluster)
    {
        let number = match cluster.forward(who, &msg, source != Source::Native) {
            Forwarded::Sent(number) => number,
            // Acknowledged once the transfer stream holds it (docs/cluster.md).
            Forwarded::Awaiting(number) => {
                if admitted == Admitted::Now {
                    admitted = Admitted::AfterTransfer;
                }
                number
            }
            Forwarded::Full => return Err(Refused::Unavailable),
        };
        return Ok((admitted, number.and_then(|n| cluster.transfer_id(n))));
    }
    Ok((admitted, None))
}

/// The write ACL in force now; a refusal is counted and audited. [`admit`] asks it of
/// every message, and a CONNECT of its will (refused at once rather than dropped later).
pub fn may_write(
    shared: &Shared,
    info: &ConnInfo,
    who: &Identity,
    source: Source,
    topic: &str,
) -> bool {
    let decision = shared.policy.may_publish(who, topic);
    if !decision.allowed {
        shared.emit(
            &info.client(who),
            Event::AuthzDeny {
                action: source.action(),
                topic,
                rule_line: decision.line,
            },
        );
    }
    decision.allowed
}

/// Records a retained PUBLISH in the set subscribers are served from and the encrypted
/// store persists, counted against `who`'s quota. The router never sees the retain
/// flag: moatmq serves retained messages itself.
fn retain(shared: &Shared, who: &Identity, msg: Inbound<'_>) -> Result<Recorded, Refusal> {
    let index = &shared.retained_index;
    if msg.payload.is_empty() {
        index.clear(msg.topic);
    } else {
        let expires_at = msg.expires_at();
        let owner = owner_of(who.username.as_deref());
        let message = crate::retained::message(
            msg.topic,
            msg.payload,
            msg.qos,
            msg.properties,
            msg.v5,
            expires_at,
            owner,
        );
        index.set(message)?;
    }
    Ok(match &shared.retained {
        Some(store) => store.recorded(),
        None => Recorded::Buffered,
    })
}
