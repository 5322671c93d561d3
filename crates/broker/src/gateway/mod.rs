//! The per-connection gateway: our equivalent of rumqttd's remote link.
//!
//! It owns the socket. Two steps hold every check, one per direction:
//! - into the broker, [`crate::admit::admit`]: payload limit, write ACL in force, retained
//!   record and quotas, for a client's PUBLISH ([`Gateway::incoming`]) and for a will
//!   (`will.rs`) alike;
//! - out to the client, [`Gateway::deliver`] (`deliver.rs`): read ACL, the client's
//!   maximum packet size, QoS downgrade, for router forwards (`outgoing.rs`) and retained
//!   messages (`retained.rs`) alike.
//!
//! `incoming.rs` keeps the checks on the connection's own protocol state (topic
//! validity, aliases, receive maximum, QoS 2 duplicates, publish rate, subscription
//! filters).
//!
//! Packet ids: the router numbers what it forwards (1..=100). When the gateway withholds a
//! forwarded QoS 1/2 message it acknowledges it to the router itself; when it refuses a
//! client's QoS 2 publish it completes the PUBREC/PUBREL/PUBCOMP exchange itself.

use crate::codec::{
    clear_dup, codec_for, publish_header, refuse_before_decode, short_v5_disconnect, Version, DUP,
};
use crate::durable::Resumed;
use crate::event::Event;
use crate::policy::{AclView, Identity};
use crate::ratelimit::PublishLimiter;
use crate::sessions::Filters;
use crate::shared::{ConnInfo, Shared};
use crate::transport::{Reader, Writer};
use crate::will::{self, Will};
use bytes::BytesMut;
use moatmq_store::{SessionKey, SessionMeta};
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{DisconnectReasonCode, Packet, Protocol, SubscribeReasonCode};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::debug;

/// How long a connection whose session moved to another node waits for each of the
/// router's answers while collecting what it had not forwarded yet.
const ROUTER_SETTLE_WAIT: Duration = Duration::from_millis(200);
/// How long a durable session's end waits for publishes admitted while it was online
/// to reach the router, at most (a publish held for the cluster's transfer stream
/// while NATS is away may take longer; it is then missed by the collection).
const ADMITTED_WAIT: Duration = Duration::from_secs(1);

mod checkpoint;
mod close;
mod deliver;
mod held;
mod incoming;
mod ledger;
mod link;
mod options;
mod out_alias;
mod outgoing;
mod output;
mod retained;
mod sys;
mod unacked;
mod window;

use close::Close;
use ledger::Ledger;
use link::{RouterLink, ToRouter};
use output::Output;
use retained::RetainedFeed;
use window::OutWindow;

/// After this long without traffic a connection gives its buffers back: a fleet of
/// idle devices keeps only what each must (docs/benchmarks.md, idle connections).
const IDLE_TRIM: Duration = Duration::from_secs(5);

/// The packet id of the gateway's SUBSCRIBEs of shared-group members (`[cluster]`):
/// none of a valid client's (MQTT packet ids start at 1). The router answers in order,
/// and each is followed by the client's own SUBSCRIBE, so the first SUBACK with this id
/// while one is owed is ours (unless the client broke the protocol twice over: sent id
/// 0, and twice before an answer).
const GROUP_SUBSCRIBE: u16 = 0;

/// How long, and for how many bytes at most, what a client still sends after its MQTT 5
/// DISCONNECT is read and dropped before the socket closes (`Reader::drain`).
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 64 * 1024;

/// How a connection ended, for [`Gateway::run`]'s caller.
pub struct Ended {
    /// How long the session outlives the connection, `None` when it was taken over.
    pub kept_for: Option<Duration>,
    /// The read side of a socket the broker sent an MQTT 5 DISCONNECT on: [`linger`] on
    /// it before the connection lets go of its slots.
    pub linger: Option<Reader>,
}

/// Reads and drops what a client still sends after its DISCONNECT until it closes, for
/// at most `LINGER` and `LINGER_BYTES`.
pub async fn linger(reader: Reader) {
    reader.drain(LINGER, LINGER_BYTES).await;
}

/// What the client's CONNECT asked of the broker's side (MQTT 5 properties).
#[derive(Debug, Clone, Copy, Default)]
pub struct ClientLimits {
    /// The largest packet the client takes (MQTT-3.1.2-25).
    pub max_packet_size: Option<u32>,
    /// QoS 1/2 PUBLISHes the client takes in flight at once (3.3.4).
    pub receive_maximum: Option<u16>,
    /// Topic aliases the client takes from us (3.3.2.3.4; 0 or none: none).
    pub topic_alias_max: Option<u16>,
}

/// The session a connection serves: whether it outlives the connection, what it is
/// subscribed to, and its key in the durable session store.
pub struct SessionPart {
    /// The session is kept after the connection (clean session 0, expiry).
    pub persistent: bool,
    /// Notified when a new connection takes this session over.
    pub kicked: Arc<Notify>,
    /// Stored messages another node handed over late, to replay (`cluster/late.rs`).
    pub late: Arc<crate::sessions::LateMail>,
    /// Filters the session holds (for the subscription limit and the session store), as
    /// the client wrote them; a resumed persistent session starts with the ones it kept.
    pub subscriptions: Filters,
    /// Seconds the session is kept after the connection.
    pub expiry: u64,
    /// Its key in the durable session store, when that is on and the session persistent.
    pub key: Option<SessionKey>,
    /// Non-zero once another node of the cluster took the session over (`owner.rs`).
    pub moved: Option<Arc<std::sync::atomic::AtomicU64>>,
}

impl SessionPart {
    /// What the session store keeps of it while it is connected.
    pub(crate) fn meta(&self, version: Version) -> SessionMeta {
        SessionMeta {
            protocol: match version {
                Version::V4 => 4,
                Version::V5 => 5,
            },
            expiry_interval: self.expiry,
            disconnected_at: None,
            subscriptions: self.subscriptions.clone(),
        }
    }
}

/// What the next write to the client waits for (`autosave_interval = 0`), the most
/// any packet of the turn asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Unsaved {
    No,
    /// This node's commit of the session store.
    Here,
    /// The commit and, on a cluster node, the session's park in NATS.
    Parked,
}

/// One connection after its CONNACK: who it is, its session's view, and the parts
/// that carry its traffic. Each part owns its state; this loop composes them.
pub struct Gateway {
    shared: Arc<Shared>,
    /// Publishes admitted and not all handed to the router yet (durable sessions:
    /// `SessionBook::admitting`).
    admitting: Option<crate::durable::Admitting>,
    /// This connection's number in the cluster's record of publishes held back from
    /// the router (`Cluster::hold_back`).
    hold_id: u64,
    info: ConnInfo,
    version: Version,
    /// Reads the client's packets (its protocol version's codec).
    decoder: Box<dyn Protocol + Send>,
    identity: Identity,
    router_id: String,
    /// Boxed: most devices have none, and the room of one is 400 bytes.
    will: Option<Box<Will>>,
    keep_alive: Option<Duration>,
    /// The client's maximum packet size (MQTT-3.1.2-25).
    max_out_packet: usize,
    /// The client's Receive Maximum: QoS 1/2 deliveries in flight to it.
    window: OutWindow,
    /// MQTT 5 topic aliases the client set (`incoming.rs`).
    aliases: HashMap<u16, bytes::Bytes>,
    /// SUBSCRIBEs partly refused here: reason codes of the refused positions.
    pending_subacks: HashMap<u16, Vec<Option<SubscribeReasonCode>>>,
    /// `[rate_limit]` buckets for this client's publishes.
    limiter: PublishLimiter,
    /// Reading is paused until then (publish rate exceeded).
    paused_until: Option<Instant>,
    /// Cached ACL for the per-message read check.
    acl: AclView,
    /// The connection's session.
    session: SessionPart,
    /// Packets for the client, until the next socket write.
    out: Output,
    /// With `autosave_interval = 0`, a persistent session's state that the next
    /// packets to the client depend on changed and is not committed yet: the next write
    /// to the client waits for the commit ([`Gateway::save_before_writing`]), and on a
    /// cluster node for the session's park too if the change is in it
    /// ([`Gateway::park_before_writing`]).
    unsaved: Unsaved,
    /// The router link.
    link: RouterLink,
    /// Packets for the router, in the order it must see them.
    to_router: ToRouter,
    /// The client's QoS 1/2 publishes on their way in.
    ledger: Ledger,
    /// Retained messages owed to the client.
    retained: RetainedFeed,
    /// Updates of the `$SYS` tree, while the session holds a `$SYS/...` filter.
    sys: Option<tokio::sync::broadcast::Receiver<crate::sys::Update>>,
    /// The session's subscriptions in the `moatmq_subscriptions` gauge.
    counted: sys::Counted,
    /// MQTT 5 subscription options the router ignores (`options.rs`).
    options: options::SubOptions,
    /// SUBACKs the router owes for SUBSCRIBEs of our own (not the client's).
    own_subacks: usize,
    /// Topic aliases we give the client (`out_alias.rs`).
    out_aliases: out_alias::OutAliases,
    /// With `[cluster]`, the shared groups this connection is a member of on this node
    /// (`cluster/groups.rs`); boxed, as single nodes have none.
    groups: Option<Box<crate::cluster::groups::Membership>>,
    /// Groups joined by a SUBSCRIBE whose consumer may not exist yet: the SUBSCRIBE
    /// waits for them with what waits for a save.
    group_waits: Vec<tokio::sync::watch::Receiver<bool>>,
    /// SUBACKs the router owes for the group members' SUBSCRIBEs ([`GROUP_SUBSCRIBE`]).
    group_subacks: u32,
    /// A durable persistent session of a cluster node: its checkpoints
    /// (`checkpoint.rs`); boxed, as most connections have none.
    checkpoints: Option<Box<checkpoint::Checkpoints>>,
    /// A session that moved to this node got what was published while it moved from
    /// the transfer stream (`cluster/unread.rs`): the places of those messages, whose
    /// router copies are not delivered again; boxed, as most connections have none.
    #[allow(clippy::box_collection)] // reason: 8 bytes per idle connection, not 48
    moved_in: Option<Box<std::collections::HashSet<crate::origin::Transfer>>>,
}

impl Gateway {
    #[allow(clippy::too_many_arguments)] // one call site, in connect.rs; the fields are the state
    pub fn new(
        shared: Arc<Shared>,
        info: ConnInfo,
        version: Version,
        identity: Identity,
        router_id: String,
        link: Option<(LinkTx, LinkRx)>,
        will: Option<Will>,
        keep_alive: u16,
        client: ClientLimits,
        session: SessionPart,
        resumed: Resumed,
    ) -> Gateway {
        let link = RouterLink::new(link, shared.metrics.router_links.clone());
        let limiter = PublishLimiter::new(&shared.config.rate_limit, identity.username.as_deref());
        let acl = shared.policy.acl_view();
        // MQTT-3.3.4-7/8: we announced limits.max_inflight as receive maximum.
        let receive_max = (version == Version::V5).then_some(shared.config.limits.max_inflight);
        let mut retained = RetainedFeed::default();
        retained.replay(resumed.replay);
        let mut ledger = Ledger::new(receive_max);
        for pkid in resumed.qos2_in {
            ledger.carry(pkid);
        }
        let counted = sys::Counted::new(
            shared.metrics.subscriptions.clone(),
            session.subscriptions.len(),
        );
        let options = options::SubOptions::new(&session.subscriptions);
        // rumqttd forgets a persistent session's subscription identifiers when its client
        // goes (it keeps the filters): given again before anything the client sends.
        let mut to_router = ToRouter::default();
        let groups = shared.cluster.as_ref().map(|c| &c.groups);
        let again = crate::resubscribe::router_subscribes(
            groups,
            identity.username.as_deref(),
            &session.subscriptions,
            // With `[cluster]`, a group member's subscription carries the group's mark.
            |f, o| o.subscription_id.is_some() || (groups.is_some() && f.starts_with("$share/")),
        );
        let own_subacks = again.len();
        for subscribe in again {
            to_router.send(subscribe);
        }
        // A resumed session's shared subscriptions count here again (no waiting: the
        // router had them all along).
        let groups = shared.cluster.as_ref().map(|c| {
            let mut m = c.groups.membership(identity.username.as_deref());
            for f in session.subscriptions.keys() {
                m.join(f);
            }
            Box::new(m)
        });
        let every = shared
            .config
            .cluster
            .as_ref()
            .map_or(0, |c| c.checkpoint_interval);
        let checkpoints = (session.persistent
            && session.key.is_some()
            && every > 0
            && shared.cluster.is_some()
            && shared.durable.is_some())
        .then(|| Box::new(checkpoint::Checkpoints::new(Duration::from_secs(every))));
        let sys = sys::sys_filters(&session.subscriptions)
            .next()
            .is_some()
            .then(|| shared.sys.subscribe());
        let moved_in = shared
            .cluster
            .as_ref()
            .and_then(|c| c.take_moved_in(&router_id))
            .map(Box::new);
        Gateway {
            admitting: None,
            hold_id: crate::origin::next_connection(),
            shared,
            info,
            version,
            decoder: codec_for(version),
            identity,
            router_id,
            will: will.map(Box::new),
            // MQTT-3.1.2-24: one and a half keep-alive periods; 0 disables it.
            keep_alive: (keep_alive > 0)
                .then(|| Duration::from_millis(u64::from(keep_alive) * 1500)),
            max_out_packet: client.max_packet_size.map_or(usize::MAX, |m| m as usize),
            window: OutWindow::new(client.receive_maximum),
            aliases: HashMap::new(),
            pending_subacks: HashMap::new(),
            limiter,
            paused_until: None,
            acl,
            session,
            out: Output::new(version),
            unsaved: Unsaved::No,
            link,
            to_router,
            ledger,
            retained,
            sys,
            counted,
            options,
            own_subacks,
            out_aliases: out_alias::OutAliases::new(client.topic_alias_max.unwrap_or(0)),
            groups,
            group_waits: Vec::new(),
            group_subacks: 0,
            checkpoints,
            moved_in,
        }
    }

    /// Whether a router forward `published` is a message this session got from the
    /// transfer stream as it moved here, and replayed already (each such is skipped
    /// once).
    fn read_as_moved(&mut self, published: Option<&crate::origin::Published>) -> bool {
        let (Some(ids), Some(id)) = (self.moved_in.as_mut(), published.and_then(|p| p.id)) else {
            return false;
        };
        let skipped = ids.remove(&id);
        if ids.is_empty() {
            self.moved_in = None;
        }
        skipped
    }

    /// Serves the connection until it ends, then tears down the link. Returns how long
    /// the session outlives the connection (its expiry, which an MQTT 5 DISCONNECT may
    /// have changed), or `None` when a new connection took it over, and the socket's
    /// read side if the caller should [`linger`] on it before closing.
    ///
    /// Boxed: the gateway is the bulk of an idle connection's memory, and a future that
    /// takes it by value keeps its room twice (the argument and the moved local), as does
    /// every async caller that holds it before the call (docs/benchmarks.md).
    pub async fn run(
        mut self: Box<Self>,
        mut reader: Reader,
        mut writer: Writer,
        mut buf: BytesMut,
    ) -> Ended {
        let mut shutdown = self.shared.shutdown.clone();
        let close = self
            .serve(&mut reader, &mut writer, &mut buf, &mut shutdown)
            .await;
        let reason = match &close {
            Close::Protocol(code, _) => Some(*code),
            Close::TakenOver | Close::Replaced => Some(DisconnectReasonCode::SessionTakenOver),
            Close::Shutdown => Some(DisconnectReasonCode::ServerShuttingDown),
            _ => None,
        };
        if let (Version::V5, Some(reason_code)) = (self.version, reason) {
            let bye = self.out.last_words(reason_code);
            let _ = tokio::time::timeout(Duration::from_secs(1), writer.write_all(bye)).await;
        }
        // A client that reads nothing cannot hold up the teardown (TLS close_notify).
        let _ = tokio::time::timeout(Duration::from_secs(1), writer.shutdown()).await;
        // The client may still be answering what it had not read yet (PUBRELs for the
        // PUBRECs before a DISCONNECT 0x93). Dropping the socket now would answer those
        // writes with a reset, and the client's next write would fail before it reads the
        // DISCONNECT and its reason code: the caller lingers once the session is settled,
        // still holding the connection's slots (an open socket counts against the limits).
        let linger = matches!(
            (self.version, reason, &close),
            (Version::V5, Some(_), c) if !matches!(c, Close::Shutdown)
        )
        .then_some(reader);
        let publish_will = !matches!(
            close,
            Close::ClientDisconnect { with_will: false } | Close::Shutdown
        );
        if let (true, Some(mut w)) = (publish_will, self.will.take()) {
            // MQTT-3.1.3.2.2: the will waits for its delay or the end of the session,
            // whichever comes first (at once when no session is kept).
            let session_ends = match close {
                Close::TakenOver | Close::Replaced => w.delay,
                _ => Duration::from_secs(self.session.expiry),
            };
            w.delay = w.delay.min(session_ends);
            will::publish_will(
                &self.shared,
                &self.router_id,
                self.session.key.as_ref(),
                *w,
                false,
            );
        }
        // A durable session: at shutdown what the router has ready for it is stored
        // first (older than anything queued from now on; what it was sent is stored
        // already), then, before the link closes, its messages are queued in the store.
        let held = match (&close, &self.session.key) {
            (Close::Shutdown, Some(_)) => {
                let forwards = self.router_ready();
                self.as_queued(forwards)
            }
            _ => Vec::new(),
        };
        // This connection's own publishes not handed to the router yet go at its close,
        // below: its end does not wait for itself.
        self.admitting = None;
        let mut offline_cut = None;
        if let (Some(book), Some(key)) = (&self.shared.durable, &self.session.key) {
            book.hold(key, held);
            let meta = self.session.meta(self.version);
            // With [cluster], between two admissions (`Cluster::cut_for`): a message is
            // in the router before it (collected below) or queued in the store after.
            match &self.shared.cluster {
                Some(cluster) => offline_cut = Some(cluster.cut_while(|| book.offline(key, meta))),
                None => book.offline(key, meta),
            }
        }
        let moved = self
            .session
            .moved
            .as_ref()
            .is_some_and(|m| m.load(std::sync::atomic::Ordering::Acquire) != 0);
        let shared = self.shared.clone();
        if let (false, Some(book), Some(key)) = (
            matches!(close, Close::TakenOver | Close::Shutdown),
            &shared.durable,
            self.session.key.clone(),
        ) {
            // What was admitted before the line above (from then on it is queued in
            // the store) and the router has not forwarded yet (a slow client's backlog)
            // is collected and stored: the session may resume on another node (taken
            // over now, or later), and a crash before it comes back must not lose it.
            // (Not when the router dropped the link: nothing to ask.)
            // Publishes admitted while the session was online reach the router first.
            let complete = book.admitted_before_now(ADMITTED_WAIT).await;
            if let (Close::Replaced, true, Some(cluster), Some(cut), false) =
                (&close, moved, &shared.cluster, offline_cut, complete)
            {
                // Some did not in time: they are not collected, so the handoff's cut
                // goes back before them (the new node reads them from the stream, and
                // may deliver some of what is collected twice).
                cluster.closing_moved(&self.router_id, cut);
            }
            let forwards = self.router_settled().await;
            let held = self.as_queued(forwards);
            book.collected(&key, held);
        }
        if !matches!(close, Close::TakenOver) {
            // What a lazy connection sent just before it ended (a QoS 0 PUBLISH and
            // its DISCONNECT in one read) still reaches the router, as with a link.
            let _ = self.open_link().await;
            self.link.close(&mut self.to_router);
        }
        if let Some(cluster) = &self.shared.cluster {
            cluster.released(self.hold_id);
        }
        if self.session.persistent {
            // Before the session hold is released: a new connection resumes these.
            self.shared
                .sessions
                .save(&self.router_id, &self.session.subscriptions);
        }
        self.shared.emit(
            &self.info.client(&self.identity),
            Event::Disconnect {
                reason: close.as_str(),
                detail: close.detail(),
            },
        );
        Ended {
            kept_for: (!matches!(close, Close::TakenOver | Close::Replaced))
                .then(|| Duration::from_secs(self.session.expiry)),
            linger,
        }
    }

    async fn serve(
        &mut self,
        reader: &mut Reader,
        writer: &mut Writer,
        buf: &mut BytesMut,
        shutdown: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Close {
        let max_packet = self.shared.config.limits.max_packet_size;
        let far_future = Duration::from_secs(86400 * 365);
        let mut deadline = Instant::now() + self.keep_alive.unwrap_or(far_future);
        // When the buffers go back if nothing happens until then; `None` once they have.
        let mut idle_at = Some(Instant::now() + IDLE_TRIM);
        let kicked = self.session.kicked.clone();
        // One waiter for the connection's life: creating one per loop turn takes the
        // Notify's lock twice per turn on the hot path.
        let replaced = kicked.notified();
        tokio::pin!(replaced);
        let late = self.session.late.clone();
        let late_mail = late.arrived();
        tokio::pin!(late_mail);
        let shutting_down = shutdown.changed();
        tokio::pin!(shutting_down);
        if self.session.persistent && self.link.is_open() {
            // rumqttd's link build takes the router's first wake-up, with the CONNACK;
            // what the router queued in the same pass (the PUBRELs a resumed session is
            // owed) would wait for the next one. A PINGREQ brings it now.
            self.ping_router();
            if let Err(close) = self.link.commit(&mut self.to_router) {
                return close;
            }
        }
        // Bytes already buffered after the CONNECT are packets too.
        if let Err(close) = self.decode_all(buf, max_packet) {
            return close;
        }
        // A read brought PUBLISHes: they wait for the other connections ready now.
        let mut others_first = false;
        loop {
            if std::mem::take(&mut others_first) {
                // Connections that became readable together are woken in arrival order,
                // but tokio runs the last one woken first (its LIFO slot): a PUBLISH that
                // arrived just after another client's SUBSCRIBE was read first, and
                // reached the router before it, in 8 of 8 Paho runs (docs/compliance.md).
                // Yielding lets the connections already woken hand their packets to the
                // router first; tokio resumes this one once its ready tasks have run.
                tokio::task::yield_now().await;
            }
            // One save (autosave_interval = 0) for all retained publishes of a read, and
            // one wait for the cluster's transfer stream; NATS may be away for long, so
            // a takeover or shutdown still ends the connection (nothing acknowledged).
            if self.to_router.waits_for_save() {
                // Read meanwhile, for its PINGREQs only (`held.rs`).
                let metrics = self.shared.metrics.clone();
                let read = match held::read_while(
                    self.save_then_forward(),
                    reader,
                    writer,
                    buf,
                    &metrics,
                    shutting_down.as_mut(),
                    replaced.as_mut(),
                )
                .await
                {
                    Ok((Ok(()), read)) => read,
                    Ok((Err(close), _)) | Err(close) => return close,
                };
                // The wait does not count against the client's keep-alive.
                deadline = Instant::now() + self.keep_alive.unwrap_or(far_future);
                if read {
                    // What it sent meanwhile, in order, now.
                    if let Err(close) = self.decode_all(buf, max_packet) {
                        return close;
                    }
                    others_first = self.to_router.has_publish();
                    continue;
                }
            }
            match self.open_link().await {
                // The client was not read meanwhile: its keep-alive starts again.
                Ok(true) => deadline = Instant::now() + self.keep_alive.unwrap_or(far_future),
                Ok(false) => {}
                Err(close) => return close,
            }
            self.checkpoint_turn();
            // Forwards held while the session store's writer was behind go once it is
            // not (`release_held` checks): with none in flight to the client, no
            // acknowledgement would release them.
            if self.window.is_holding() {
                if let Err(close) = self.release_held() {
                    return close;
                }
            }
            if let Err(close) = self.link.commit(&mut self.to_router) {
                return close;
            }
            if !self.to_router.has_ready() && !self.to_router.waits_for_save() {
                // Every publish admitted so far is with the router.
                self.admitting = None;
            }
            // What the session store must hold first; a disk slow to commit does not
            // hold up a takeover or a shutdown (nothing of it was written yet). A wait
            // for the cluster's park lasts as long as NATS is away: the client is read
            // for its PINGREQs meanwhile, as during a publish's wait (`held.rs`).
            let mut read_while_held = false;
            if self.unsaved != Unsaved::No {
                let metrics = self.shared.metrics.clone();
                match held::read_while(
                    self.saved_first(),
                    reader,
                    writer,
                    buf,
                    &metrics,
                    shutting_down.as_mut(),
                    replaced.as_mut(),
                )
                .await
                {
                    Ok(((), read)) => read_while_held = read,
                    Err(close) => return close,
                }
            }
            match self.out.flush(writer, replaced.as_mut()).await {
                Ok(n) => self.shared.metrics.bytes_out.inc_by(n as u64),
                Err(close) => return close,
            };
            if read_while_held {
                // What the client sent meanwhile, in order, now; the wait did not count
                // against its keep-alive.
                deadline = Instant::now() + self.keep_alive.unwrap_or(far_future);
                if let Err(close) = self.decode_all(buf, max_packet) {
                    return close;
                }
                continue;
            }
            // Over its publish rate the client is read more slowly: its own TCP window
            // then slows it down (back-pressure) while deliveries to it continue.
            let paused_until = self.paused_until;
            // One timer for the keep-alive, for trimming an idle connection and for
            // checkpoints.
            let mut wake = idle_at.map_or(deadline, |t| t.min(deadline));
            if let Some(c) = &self.checkpoints {
                wake = wake.min(c.wake_at());
            }
            // Forwards held for the session store's writer go once it caught up.
            let held_for_writer = self.window.is_holding() && self.writer_behind();
            tokio::select! {
                _ = tokio::time::sleep_until(paused_until.unwrap_or_else(Instant::now)), if paused_until.is_some() => {
                    self.paused_until = None;
                    // A paused client cannot send its PINGREQ: the pause does not count.
                    let now = Instant::now();
                    deadline = now + self.keep_alive.unwrap_or(far_future);
                    idle_at = Some(now + IDLE_TRIM);
                    if let Err(close) = self.decode_all(buf, max_packet) {
                        return close;
                    }
                }
                read = reader.read(buf), if paused_until.is_none() => {
                    match read {
                        Ok(0) => return Close::ClientClosed,
                        Ok(n) => self.shared.metrics.bytes_in.inc_by(n as u64),
                        Err(e) => return Close::Network(e.to_string()),
                    };
                    let now = Instant::now();
                    deadline = now + self.keep_alive.unwrap_or(far_future);
                    idle_at = Some(now + IDLE_TRIM);
                    if let Err(close) = self.decode_all(buf, max_packet) {
                        return close;
                    }
                    others_first = self.to_router.has_publish();
                }
                // A resumed session's stored messages go first (`retained.rs`).
                notification = self.link.next(), if !self.retained.router_waits() => {
                    idle_at = Some(Instant::now() + IDLE_TRIM);
                    if let Err(close) = self.on_router(notification) {
                        return close;
                    }
                }
                _ = writer_caught_up(&self.shared), if held_for_writer => {
                    if let Err(close) = self.release_held() {
                        return close;
                    }
                }
                _ = tokio::time::sleep_until(wake) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Close::Protocol(DisconnectReasonCode::KeepAliveTimeout, "keep alive timeout");
                    }
                    if idle_at.is_some_and(|t| now >= t) {
                        self.trim(buf);
                        idle_at = None;
                    }
                }
                update = sys::next_update(&mut self.sys), if self.sys.is_some() => {
                    if let Err(close) = self.on_sys(update) {
                        return close;
                    }
                }
                _ = &mut shutting_down => return Close::Shutdown,
                _ = &mut replaced => return Close::Replaced,
                _ = &mut late_mail => {
                    late_mail.set(late.arrived());
                    self.retained.replay(late.take());
                }
                _ = std::future::ready(()), if self.can_feed_retained() => {
                    if let Err(close) = self.feed_retained() {
                        return close;
                    }
                }
            }
        }
    }

    /// A persistent session's state changed in the session store in a way the next
    /// packets to the client tell it about: with `autosave_interval = 0` it is committed
    /// before the next write to the client, so that a crash after the client got them
    /// cannot undo what they said. A QoS 2 forward sent (or replayed under a new packet
    /// id) or released: else sent again as a new message, or the message again under a
    /// packet id the client has completed (exactly once). An incoming exchange
    /// completed (its PUBCOMP): else its packet id stays pending and the client's next
    /// message under it is taken for a resend and lost. Subscriptions changed (their
    /// SUBACK/UNSUBACK): else the client, told its session is present, never
    /// subscribes again and gets nothing.
    pub(super) fn save_before_writing(&mut self) {
        if self.shared.durable.as_ref().is_some_and(|b| b.is_sync()) {
            self.unsaved = self.unsaved.max(Unsaved::Here);
        }
    }

    /// [`Gateway::save_before_writing`] for a change a cluster node's park of the
    /// session holds (its subscriptions: `ParkEvent::Connected`): the next write waits
    /// for the park in NATS as well, as a publisher's PUBACK does, so that another node
    /// resuming the session after this one died has what the client was told.
    pub(super) fn park_before_writing(&mut self) {
        if self.shared.durable.as_ref().is_some_and(|b| b.is_sync()) {
            self.unsaved = Unsaved::Parked;
        }
    }

    /// Waits for the commit [`Gateway::save_before_writing`] asked for, if any (one
    /// commit for everything a turn wrote; grouped with every other change waiting).
    async fn saved_first(&mut self) {
        let unsaved = std::mem::replace(&mut self.unsaved, Unsaved::No);
        let Some(book) = &self.shared.durable else {
            return;
        };
        // A failed commit (or park) is logged where it failed; the client still gets
        // its packets (its messages at least once, then).
        match unsaved {
            Unsaved::No => {}
            // Not waiting for the park in NATS (parks follow commits,
            // docs/cluster.md): it would hold the client's messages while NATS is
            // away, for state the park does not hold.
            Unsaved::Here => {
                let _ = book.commit_here().await;
            }
            // Held while NATS is away, as a QoS 1 publish is.
            Unsaved::Parked => {
                let _ = book.commit().await;
            }
        }
    }

    /// Opens the router link of a connection that logged in without one (lazy links,
    /// `link.rs`) once packets wait for the router; `true` if it did. A spare link is
    /// taken at once (`spare_links.rs`), so what was read goes to the router in this same
    /// turn. Without one the link is built and awaited in place, like a retained save:
    /// the router answers in well under a millisecond, and within the router's link
    /// timeout in any case. Never abandoned for a takeover or a shutdown: rumqttd would
    /// still build the link, with nobody to close it.
    async fn open_link(&mut self) -> Result<bool, Close> {
        if self.link.is_open() || !self.to_router.has_ready() {
            return Ok(false);
        }
        match self.shared.router.lazy_link().await {
            Ok((tx, rx, name)) => {
                self.link.opened(tx, rx, name);
                Ok(true)
            }
            Err(e) => {
                tracing::error!(error = %e, "router link failed");
                // Nothing queued is acknowledged: the client sends it again elsewhere.
                self.to_router.discard();
                // 0x88 "server unavailable" is a CONNACK code only; DISCONNECT has 0x89.
                Err(Close::Protocol(
                    DisconnectReasonCode::ServerBusy,
                    "router link failed",
                ))
            }
        }
    }

    /// Handles a notification and whatever else the router has ready, up to one
    /// write's worth.
    fn on_router(
        &mut self,
        notification: Result<Option<rumqttd::Notification>, Close>,
    ) -> Result<(), Close> {
        if let Some(n) = notification? {
            self.outgoing(n)?;
        }
        while self.out.has_room() {
            match self.link.try_next() {
                Some(Ok(Some(n))) => self.outgoing(n)?,
                Some(Ok(None)) => continue,
                Some(Err(close)) => return Err(close),
                None => break,
            }
        }
        Ok(())
    }

    /// What the router has forwarded for the session and the client has not been sent
    /// yet, oldest first: at shutdown they would die with the process, so they go to
    /// the session store instead.
    fn router_ready(&mut self) -> Vec<rumqttd::Forward> {
        // Those waiting for the client's window are older than the link's.
        let mut forwards = self.window.take_held();
        while let Some(Ok(Some(n))) = self.link.try_next() {
            if let rumqttd::Notification::Forward(f) = n {
                forwards.push(f);
            }
        }
        forwards
    }

    /// [`Gateway::router_ready`], once the router has handled everything sent to it
    /// before, and everything it still held for the session: what the client was sent
    /// and what the router forwards meanwhile is acknowledged to it (the session store
    /// keeps them), so a router stopped at its in-flight limit goes on; then rounds of
    /// two PINGREQs on the link (the first answered before the data the same pass
    /// forwards, the second after it) until a round brings nothing, each answer waited
    /// for at most [`ROUTER_SETTLE_WAIT`].
    async fn router_settled(&mut self) -> Vec<rumqttd::Forward> {
        let mut forwards = self.window.take_held();
        if !self.link.is_open() {
            forwards.extend(self.router_ready());
            return forwards;
        }
        self.to_router.settle_all();
        for f in &forwards {
            self.to_router.settle(&f.publish);
        }
        'rounds: loop {
            let before = forwards.len();
            for _ in 0..2 {
                // Whatever paused the link (its buffer read or not), it is read now.
                self.link.ready();
                let mine = self.ping_router();
                if self.link.commit(&mut self.to_router).is_err() {
                    break 'rounds;
                }
                let deadline = Instant::now() + ROUTER_SETTLE_WAIT;
                loop {
                    match tokio::time::timeout_at(deadline, self.link.next()).await {
                        Ok(Ok(Some(rumqttd::Notification::Forward(f)))) => {
                            // Acknowledged at once: a router at its in-flight limit
                            // answers nothing more, the PINGREQ included, until then.
                            self.to_router.settle(&f.publish);
                            forwards.push(f);
                            if self.link.commit(&mut self.to_router).is_err() {
                                break 'rounds;
                            }
                        }
                        Ok(Ok(Some(n @ rumqttd::Notification::DeviceAck(_)))) => {
                            let packet: Option<Packet> = n.into();
                            // Not an answer to an earlier PINGREQ (`checkpoint.rs`).
                            if matches!(packet, Some(Packet::PingResp(_)))
                                && self.ping_answered(mine)
                            {
                                break;
                            }
                        }
                        // The router paused the link until its buffer is read.
                        Ok(Ok(Some(rumqttd::Notification::Unschedule))) => self.link.ready(),
                        // A wake-up whose notifications an earlier read took.
                        Ok(Ok(Some(_) | None)) => {}
                        _ => break 'rounds,
                    }
                }
            }
            if forwards.len() == before {
                break;
            }
        }
        let pause = collect_last_pause();
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        // Forwarded after the last answer: collected and acknowledged like the rest.
        // Unacknowledged, the router would send them again to the next connection,
        // after the store's replay of them (a second delivery).
        let last = self.router_ready();
        for f in &last {
            self.to_router.settle(&f.publish);
        }
        let _ = self.link.commit(&mut self.to_router);
        forwards.extend(last);
        forwards
    }

    /// `forwards` as the session store keeps them (not sent to this client: QoS 0 and
    /// group copies of other sessions left out).
    fn as_queued(&mut self, forwards: Vec<rumqttd::Forward>) -> Vec<moatmq_store::QueuedMessage> {
        forwards
            .into_iter()
            .filter_map(|mut f| {
                if !self.group_copy(&mut f.publish, &mut f.properties) {
                    return None;
                }
                // At the lower of the published and the forwarded QoS; QoS 0 is not kept.
                let (mut qos, _) = crate::codec::qos_and_pkid(&f.publish);
                let p = &f.publish;
                let from = crate::origin::take(&mut f.properties);
                if self.read_as_moved(from.as_ref()) {
                    // Stored with the session already.
                    return None;
                }
                if let Some(from) = from {
                    let topic = std::str::from_utf8(&p.topic).unwrap_or("");
                    if self
                        .options
                        .is_own(&self.session.subscriptions, topic, &from)
                    {
                        return None;
                    }
                    if (from.qos as u8) < (qos as u8) {
                        qos = from.qos;
                    }
                }
                if qos == rumqttd::protocol::QoS::AtMostOnce {
                    return None;
                }
                Some(unacked::as_queued(
                    &p.topic,
                    &p.payload,
                    qos,
                    f.properties.as_ref(),
                ))
            })
            .collect()
    }

    /// Decodes and handles every complete packet in `buf`.
    fn decode_all(&mut self, buf: &mut BytesMut, max_packet: usize) -> Result<(), Close> {
        loop {
            // A throttled publisher's remaining packets wait in the buffer.
            if buf.is_empty() || self.paused_until.is_some() {
                return Ok(());
            }
            // QoS and packet id are private in rumqttd's Publish: read them off the wire.
            // A client's DUP stays with it (codec.rs), told only to the ledger (a
            // resend of an exchange from before this connection, `ledger.rs`).
            let dup = buf.first().is_some_and(|&b| b & DUP != 0);
            let header = publish_header(buf).map(|(qos, pkid)| (qos, pkid, dup));
            clear_dup(&mut buf[..]);
            if let Some(kind) = refuse_before_decode(buf) {
                // rumqttd's v5 decoder panics on these; a client never sends them.
                debug!(kind, "server-only packet type from a client");
                return Err(Close::Protocol(
                    DisconnectReasonCode::ProtocolError,
                    "packet not allowed from a client",
                ));
            }
            if self.version == Version::V5 {
                if buf[0] >> 4 == 15 {
                    // AUTH: no authentication method was agreed at CONNECT (a CONNECT
                    // naming one is refused), so any AUTH is a protocol error (4.12).
                    return Err(Close::Protocol(
                        DisconnectReasonCode::ProtocolError,
                        "AUTH without enhanced authentication",
                    ));
                }
                if let Some(reason) = short_v5_disconnect(buf) {
                    // MQTT 5 3.14.2.2: with a remaining length of 1 the property length is
                    // absent; rumqttd would wait for it forever.
                    return Err(Close::ClientDisconnect {
                        with_will: reason != 0x00,
                    });
                }
            }
            match self.decoder.read_mut(buf, max_packet) {
                Ok(packet) => self.incoming(packet, header)?,
                Err(rumqttd::protocol::Error::InsufficientBytes(_)) => return Ok(()),
                Err(rumqttd::protocol::Error::PayloadSizeLimitExceeded(_)) => {
                    return Err(Close::Protocol(
                        DisconnectReasonCode::PacketTooLarge,
                        "packet larger than limits.max_packet_size",
                    ))
                }
                Err(e) => {
                    debug!(error = %e, "malformed packet");
                    return Err(Close::Protocol(
                        DisconnectReasonCode::MalformedPacket,
                        "malformed packet",
                    ));
                }
            }
        }
    }

    /// Gives back the memory an idle connection does not need: empty buffers are
    /// dropped and grow again from nothing with the next packet.
    fn trim(&mut self, buf: &mut BytesMut) {
        if buf.is_empty() {
            *buf = BytesMut::new();
        }
        self.out.trim();
        self.retained.trim();
    }

    /// Writes a packet for the client; one that ends an incoming exchange frees its
    /// receive-maximum slot.
    fn write(&mut self, packet: Packet) -> Result<(), Close> {
        self.ledger.answered(&packet);
        self.out.write(packet)
    }
}

/// A pause before the collection of a session's end takes the link's last forwards
/// (`Gateway::router_settled`): none, or with the `test-hooks` feature the
/// milliseconds in `MOATMQ_TEST_COLLECT_LAST_PAUSE_MS`, so that a test can have the
/// router forward one more then.
fn collect_last_pause() -> Duration {
    static HOOKED: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    crate::hooks::hooked(&HOOKED, "MOATMQ_TEST_COLLECT_LAST_PAUSE_MS", Duration::ZERO)
}

/// Returns once the session store's writer is not behind (at once without a store).
async fn writer_caught_up(shared: &Shared) {
    if let Some(book) = &shared.durable {
        book.writer_caught_up().await;
    }
}
