//! Cluster: routing between moatmq nodes over NATS and JetStream (docs/cluster.md).
//!
//! Out: [`Cluster::forward`] is called by `admit` for every message it lets in, except
//! cluster input itself, and hands it to one task that publishes it in plaintext on
//! `<prefix>.<subject>` with the origin node, QoS, retain flag, publisher and MQTT 5
//! properties in headers (for NATS services), and sealed to the transfer stream
//! (`xfer.rs`) for the other nodes. A QoS 1/2 publish is acknowledged to its publisher
//! only once JetStream has acknowledged everything numbered up to it
//! ([`Cluster::transferred`]).
//! In: the other nodes' messages come from this node's durable consumer on the
//! transfer stream, through `admit` as [`Source::Cluster`], never forwarded again.
//! NATS-native messages (no `Moatmq-Node`) come from a queue subscription on
//! `<prefix>.>` in the group `<base>_native`, which only nodes with `native_user` join,
//! so one node of the cluster receives each: it admits it as [`Source::Native`] and
//! forwards it to the transfer stream (not to its live subject again), so the other
//! nodes and the shared groups' consumers get it from there, once. Everything enters
//! the router on the broker's own link, so every delivery passes the receiving node's
//! `deliver`. A node skips its own messages in the stream.
//! Retained messages are also kept, sealed, in a JetStream KV bucket (`state.rs`), so
//! a node that joins late serves them too.

pub(crate) mod dead;
pub(crate) mod groups;
pub(crate) mod handoff;
mod handoff_value;
pub(crate) mod late;
pub(crate) mod late_copies;
mod late_waits;
mod markers;
pub(crate) mod nodes;
pub(crate) mod order;
mod owner;
pub(crate) mod park;
mod probe;
mod properties;
pub(crate) mod reads;
pub(crate) mod replay;
mod sequencer;
mod state;
mod subject;
mod sweep;
mod unread;
mod waiting;
pub(crate) mod wills;
pub(crate) mod xfer;

pub use crate::cut::Cut;
pub(crate) use groups::Groups;
pub(crate) use order::Order;
pub use owner::{ClaimFailed, OwnerClaim};
pub(crate) use properties::decode as decode_properties;
pub use state::{bucket_base, Keeping, KeyCheck, MARKER_KEY};
pub use subject::{to_subject, to_topic};

use crate::error::BrokerError;
use crate::inbound::Inbound;
use crate::metrics::Metrics;
use crate::origin::Transfer;
use crate::policy::Identity;
use crate::retained_index::{owner_of, RetainedIndex};
use async_nats::{HeaderMap, Subscriber};
use bytes::Bytes;
use moatmq_config::{Cluster as ClusterConfig, Config};
use sequencer::Sequencer;
use state::StateSync;
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, watch, Notify};
use waiting::{Change, Numbered};

/// Records since when the NATS connection is up (`None`: lost).
fn set_up_since(
    up: &std::sync::Mutex<Option<std::time::Instant>>,
    since: Option<std::time::Instant>,
) {
    *up.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = since;
}

/// The cluster's waits, shortened by tests (`crate::hooks`).
pub(crate) use crate::hooks::hooked;

/// How long a session claimed elsewhere waits at most, before it is handed over, for
/// this node's transfer input to have no holes: what the server had sent the node's
/// previous process (or this process before a loss of NATS) without an acknowledgement
/// read again (`cluster_input`), so that the handoff's cut names what was taken in.
pub(crate) const CATCH_UP_WAIT: Duration = Duration::from_secs(45);

/// Header naming the node that admitted the message; absent on NATS-native messages.
pub const NODE: &str = "Moatmq-Node";
/// Header with the published QoS (`0`, `1`, `2`).
pub const QOS: &str = "Moatmq-Qos";
/// Header with the publisher's retain flag (`0`, `1`).
pub const RETAIN: &str = "Moatmq-Retain";
/// Header with the publisher's username or certificate CN; absent for anonymous.
pub const USER: &str = "Moatmq-User";
/// Header with the publisher's client id (ACL rules may name it, `%c`).
pub const CLIENT: &str = "Moatmq-Client";
/// Header with the MQTT 5 publish properties, JSON (`properties.rs`); absent when none.
pub const PROPERTIES: &str = "Moatmq-Properties";
/// The client id NATS-native messages are admitted under, with `native_user`.
pub const NATIVE_CLIENT_ID: &str = "nats";

/// nats-server's `max_payload` unless configured otherwise (1 MiB).
const NATS_DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

/// What a message adds to its payload on the transfer stream at most, besides its
/// topic, identity and properties: the envelope's JSON framing, the seal (version,
/// nonce, tag), the message id header and the protocol line.
const TRANSFER_OVERHEAD: usize = 512;

/// This node's link to the cluster.
pub struct Cluster {
    pub(crate) node: String,
    pub(crate) prefix: String,
    /// Copies and limits of the streams and buckets in NATS.
    pub(crate) keeping: Keeping,
    pub(crate) native_user: Option<String>,
    forward: xfer::Sequencer,
    /// `<node>:<epoch>`: the ids of this process's transfer messages are
    /// `<origin>:<number>`.
    origin: String,
    /// This node's retained changes for the KV bucket, numbered (`state.rs`); dropping
    /// it ends that task.
    changes: Sequencer<Numbered>,
    /// Session ownership across nodes (`owner.rs`).
    pub(crate) owners: owner::Owners,
    /// Shared subscriptions with members on this node (`groups.rs`).
    pub(crate) groups: Groups,
    /// Sessions started new after their old node did not hand them over in time, still
    /// taking what it hands over late (`late.rs`).
    pub(crate) late: late_waits::LateWaits,
    /// Reads of the transfer stream for sessions moving here, combined (`reads.rs`).
    pub(crate) reads: reads::Reads,
    /// Becomes `true` once this node's transfer consumer has read what waited for it at
    /// start-up and after each loss of NATS (what was published while the node was away
    /// or cut off): only then are offline sessions handed over, with those messages
    /// (`handoff.rs`).
    input_caught_up: Arc<watch::Sender<bool>>,
    /// Notified when SIGHUP reloaded files: `nodes::run` tells the other nodes what
    /// this one enforces now.
    pub(crate) settings_changed: Arc<Notify>,
    /// Offline sessions other nodes claimed, for `handoff::run` (taken by `serve`).
    handoffs: std::sync::Mutex<Option<mpsc::UnboundedReceiver<(moatmq_store::SessionKey, u64)>>>,
    key_check: watch::Receiver<KeyCheck>,
    /// Retained topics set here through the transfer stream lately, which the sweep
    /// after a load of the retained bucket leaves alone (`sweep.rs`).
    relayed: sweep::Relayed,
    pub(crate) metrics: Arc<Metrics>,
    /// Wakes `watch_connection`; with `stopped`, ends it (and its NATS client) on drop.
    connected: Arc<Notify>,
    /// Since when the NATS connection is up (`None` while it is lost): what this node
    /// has not heard from other nodes over a shorter time says nothing about them
    /// (`dead.rs`).
    pub(crate) up_since: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
    stopped: Arc<std::sync::atomic::AtomicBool>,
    /// The NATS server's `max_payload` (its default until connected).
    max_payload: Arc<AtomicUsize>,
    /// The transfer stream's sequence of the last message this node's consumer took in
    /// (`cluster_input`): every message of other nodes up to it was admitted here.
    input_through: std::sync::atomic::AtomicU64,
    /// Where this node's traffic stood when it made its parks final at shutdown
    /// (`handoff::park`), for the parks' values (`park.rs`).
    pub(crate) final_cut: std::sync::Mutex<Option<Cut>>,
    /// Connections that may hold publishes this node numbered back from the router
    /// until the transfer stream has them, with the lowest number they may hold and
    /// where this node's input stood then.
    held_back: std::sync::Mutex<std::collections::HashMap<u64, (u64, u64)>>,
    /// Where this node's traffic stood when a connection whose session moved to
    /// another node collected what the router had for it, by router client id: the
    /// handoff's cut is never later (`handoff::give`).
    closed_cuts: std::sync::Mutex<std::collections::HashMap<String, Cut>>,
    /// Held shared by each admission from before it queues a message for offline
    /// sessions until the message is numbered (or counted in [`Cluster::took_in`]), and
    /// alone by a session leaving the offline sessions for another node while it reads
    /// its cut ([`Cluster::cut_for`]): every message is then on one side of the cut,
    /// queued for the session here or read by the new node, never both.
    admissions: std::sync::RwLock<()>,
    /// The places in the transfer stream of what sessions moving here got from it
    /// (`handoff::read_after_cut`), by router client id, until their connection takes
    /// them: it skips the router's copies of those (`origin.rs`).
    moving_in: std::sync::Mutex<std::collections::HashMap<String, HashSet<Transfer>>>,
    /// This node's origin hashed, for [`Transfer`]s of its own messages.
    origin_id: u64,
    /// Sessions moving in now ([`Cluster::tagging`]).
    moving: AtomicUsize,
}

/// Messages carry their place in the transfer stream while one is held
/// ([`Cluster::tagging`]).
pub(crate) struct Tagging<'a>(&'a Cluster);

impl Drop for Tagging<'_> {
    fn drop(&mut self) {
        self.0.moving.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::Release);
        self.connected.notify_one();
    }
}

/// What `cluster_input` reads, taken once by `serve`: the live subjects (NATS-native
/// messages) and this node's consumer of the transfer stream.
pub struct Input {
    /// The queue subscription for NATS-native messages; `None` without `native_user`.
    pub(crate) live: Option<Subscriber>,
    pub(crate) client: async_nats::Client,
    pub(crate) seal: Arc<moatmq_store::ClusterSeal>,
    /// The groups this node starts pulling for (`cluster_groups.rs`).
    pub(crate) groups: mpsc::UnboundedReceiver<groups::Start>,
}

/// Whether a message `admit` let in waits for the transfer stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forwarded {
    /// Queued with this number (or kept local: `None`): nothing to wait for.
    Sent(Option<u64>),
    /// Queued with this number: its QoS 1/2 acknowledgement waits for
    /// [`Cluster::transferred_through`] it.
    Awaiting(Option<u64>),
    /// The queue is full: a QoS 1/2 message must not be acknowledged.
    Full,
}

impl Cluster {
    /// How long the NATS connection has been up without a break (`None`: it is lost).
    pub(crate) fn up_for(&self) -> Option<Duration> {
        self.up_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .map(|since| since.elapsed())
    }

    /// Connects to NATS (in the background: the broker starts while NATS is away, not
    /// ready until it is reachable), subscribes to the cluster's subjects and starts
    /// keeping `index` and the cluster's retained bucket in step.
    pub async fn connect(
        config: &Config,
        cluster: &ClusterConfig,
        metrics: Arc<Metrics>,
        index: &RetainedIndex,
        router: crate::router::RouterHandle,
    ) -> Result<(Cluster, Input), BrokerError> {
        let failed = |reason: String| BrokerError::Cluster { reason };
        let keeping = Keeping::of(cluster);
        // The config refuses a cluster without [retained]: its state would be plaintext.
        let Some(retained) = &config.retained else {
            return Err(failed("a cluster needs a [retained] key".into()));
        };
        let key = crate::retained::load_key(config, retained)?;
        let seal = moatmq_store::ClusterSeal::new(&key);
        let transfer_seal = Arc::new(moatmq_store::ClusterSeal::new(&key));
        let owner_seal = Arc::new(moatmq_store::ClusterSeal::new(&key));
        let (groups, group_starts) =
            Groups::new(Arc::new(moatmq_store::ClusterSeal::new(&key)), router);
        drop(key);
        let key_source = match (
            &retained.key_file,
            std::env::var_os(crate::retained::KEY_ENV),
        ) {
            (_, Some(_)) => crate::retained::KEY_ENV.to_string(),
            (Some(path), None) => format!("key file {}", config.resolve(path).display()),
            (None, None) => "no key".to_string(),
        };
        let mut options = async_nats::ConnectOptions::new()
            .name(format!("moatmq {}", cluster.node_name))
            .no_echo()
            .retry_on_initial_connect()
            .max_reconnects(None);
        if let Some(path) = &cluster.credentials {
            let path = config.resolve(path);
            options = options
                .credentials_file(&path)
                .await
                .map_err(|e| failed(format!("credentials file {}: {e}", path.display())))?;
        }
        if let Some(tls) = &cluster.tls {
            options = options.require_tls(true);
            if let Some(ca) = &tls.ca {
                options = options.add_root_certificates(config.resolve(ca));
            }
            if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
                options = options.add_client_certificate(config.resolve(cert), config.resolve(key));
            }
        }
        // Not ready until connected and subscribed (`watch_connection` says so).
        metrics.cluster_ok.store(false, Ordering::Release);
        metrics.cluster_xfer_ok.store(false, Ordering::Release);
        let events = Arc::downgrade(&metrics);
        let connected = Arc::new(Notify::new());
        let on_connect = connected.clone();
        let input_caught_up = Arc::new(watch::Sender::new(false));
        let behind = input_caught_up.clone();
        // Counts lost connections, for the retained task to load the bucket again.
        let (lost_tx, lost) = watch::channel(0u64);
        let lost_tx = Arc::new(lost_tx);
        let up_since = Arc::new(std::sync::Mutex::new(None));
        let up = Arc::clone(&up_since);
        options = options.event_callback(move |event| {
            let events: Weak<Metrics> = events.clone();
            let on_connect = on_connect.clone();
            let behind = behind.clone();
            let lost_tx = lost_tx.clone();
            let up = up.clone();
            async move {
                let Some(metrics) = events.upgrade() else {
                    return;
                };
                match event {
                    async_nats::Event::Connected => {
                        tracing::info!("cluster: connected to NATS");
                        set_up_since(&up, Some(std::time::Instant::now()));
                        on_connect.notify_one();
                    }
                    async_nats::Event::Disconnected | async_nats::Event::Closed => {
                        tracing::warn!("cluster: NATS connection lost; reconnecting");
                        metrics.cluster_ok.store(false, Ordering::Release);
                        set_up_since(&up, None);
                        // What is published meanwhile waits in the transfer consumer:
                        // sessions claimed elsewhere are handed over once it is read.
                        behind.send_replace(false);
                        lost_tx.send_modify(|n| *n += 1);
                    }
                    async_nats::Event::SlowConsumer(_) => {
                        // The input fell behind: NATS dropped messages for this node.
                        tracing::warn!("cluster: messages from NATS dropped (slow consumer)");
                        metrics.cluster_dropped.inc();
                    }
                    other => tracing::debug!("cluster: NATS {other}"),
                }
            }
        });
        let client = options
            .connect(cluster.servers.as_slice())
            .await
            .map_err(|e| failed(format!("NATS connection: {e}")))?;
        // One queue group per cluster: each NATS-native message reaches one node with
        // `native_user` (the live copies of the nodes' own messages too, which it
        // ignores; `no_echo` keeps a node's own from it). A node without `native_user`
        // takes nothing from the live subjects.
        let subscriber = match &cluster.native_user {
            Some(_) => Some(
                client
                    .queue_subscribe(
                        format!("{}.>", cluster.subject_prefix),
                        native_queue(&cluster.subject_prefix),
                    )
                    .await
                    .map_err(|e| failed(format!("NATS subscription: {e}")))?,
            ),
            None => {
                tracing::info!(
                    "cluster: no native_user: messages NATS clients publish on {}.> are not \
                     taken in by this node",
                    cluster.subject_prefix
                );
                None
            }
        };
        // The server's, once connected (`watch_connection`).
        let max_payload = Arc::new(AtomicUsize::new(NATS_DEFAULT_MAX_PAYLOAD));
        let (forward, origin, output, queue) = xfer::output(
            client.clone(),
            transfer_seal.clone(),
            &cluster.subject_prefix,
            &cluster.node_name,
            keeping,
            Arc::downgrade(&metrics),
            max_payload.clone(),
        );
        let origin_id = Transfer::new(&origin, 0).origin;
        tokio::spawn(output.run(queue));
        tokio::spawn(probe::run(
            client.clone(),
            xfer::stream_name(&cluster.subject_prefix),
            Arc::downgrade(&metrics),
        ));
        let (changes, stored, queue) = sequencer::sequencer(keeping.retained_queue);
        let (checked, key_check) = watch::channel(KeyCheck::Pending);
        let relayed = sweep::Relayed::default();
        let sync = StateSync::new(
            client.clone(),
            seal,
            &cluster.subject_prefix,
            key_source,
            index.clone(),
            Arc::downgrade(&metrics),
            queue,
            checked,
            keeping.replicas,
            keeping.retained_queue,
            state::Local {
                store_dir: config.resolve(&retained.path),
                marker_age: keeping.retained_marker_age,
                relayed: relayed.clone(),
                lost,
                stored,
                untimed: keeping.untimed,
            },
        );
        tokio::spawn(sync.run());
        let (handoff_tx, handoffs) = mpsc::unbounded_channel();
        let owners = owner::Owners::start(
            client.clone(),
            &cluster.node_name,
            owner::BucketSpec {
                base: &bucket_base(&cluster.subject_prefix),
                replicas: keeping.replicas,
            },
            owner_seal,
            key_check.clone(),
            Arc::downgrade(&metrics),
            handoff_tx,
        );
        let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        tokio::spawn(watch_connection(
            client.clone(),
            connected.clone(),
            stopped.clone(),
            Arc::downgrade(&metrics),
            max_payload.clone(),
            config.limits.max_packet_size,
        ));
        Ok((
            Cluster {
                node: cluster.node_name.clone(),
                prefix: cluster.subject_prefix.clone(),
                keeping,
                native_user: cluster.native_user.clone(),
                forward,
                origin,
                changes,
                owners,
                groups,
                late: late_waits::LateWaits::new(metrics.cluster_late_waits.clone()),
                reads: reads::Reads::default(),
                input_caught_up,
                handoffs: std::sync::Mutex::new(Some(handoffs)),
                key_check,
                relayed,
                metrics,
                connected,
                up_since,
                stopped,
                max_payload,
                input_through: std::sync::atomic::AtomicU64::new(0),
                final_cut: std::sync::Mutex::new(None),
                settings_changed: Arc::new(Notify::new()),
                held_back: std::sync::Mutex::new(std::collections::HashMap::new()),
                closed_cuts: std::sync::Mutex::new(std::collections::HashMap::new()),
                admissions: std::sync::RwLock::new(()),
                moving_in: std::sync::Mutex::new(std::collections::HashMap::new()),
                origin_id,
                moving: AtomicUsize::new(0),
            },
            Input {
                live: subscriber,
                client,
                seal: transfer_seal,
                groups: group_starts,
            },
        ))
    }

    /// Waits up to `wait` for the key marker's verdict: an error if this node's key
    /// does not open it; `Ok` if it does or NATS was not reached in time (then a wrong
    /// key is found later, and keeps the node unready).
    pub async fn check_key(&self, wait: Duration) -> Result<(), BrokerError> {
        let mut checked = self.key_check.clone();
        let verdict = tokio::time::timeout(wait, checked.wait_for(|c| *c != KeyCheck::Pending))
            .await
            .ok()
            .and_then(Result::ok)
            .map(|c| c.clone());
        match verdict {
            Some(KeyCheck::Failed(reason)) => Err(BrokerError::Cluster { reason }),
            _ => Ok(()),
        }
    }

    /// Records this node as the holder of `session` (a router client id); a later claim
    /// from another node notifies `kick`, closing the connection as taken over.
    pub async fn claim(
        &self,
        session: &str,
        persistent: bool,
        kick: Arc<Notify>,
    ) -> Result<OwnerClaim, ClaimFailed> {
        self.owners.claim(session, persistent, kick).await
    }

    /// The persistent session `key` (router client id `session`) stays on this node
    /// offline: handed over if another node claims it.
    pub fn kept_offline(&self, session: &str, key: moatmq_store::SessionKey) {
        self.owners.kept_offline(session, key);
    }

    /// Follows whether the transfer input is caught up.
    pub(crate) fn input_progress(&self) -> watch::Receiver<bool> {
        self.input_caught_up.subscribe()
    }

    /// The transfer input has no holes: what its consumer had delivered without an
    /// acknowledgement before it was (again) read is taken in (`cluster_input`).
    pub(crate) fn input_caught_up(&self) {
        self.input_caught_up
            .send_if_modified(|c| !std::mem::replace(c, true));
    }

    /// Waits (at most [`CATCH_UP_WAIT`]) until the transfer input has no holes.
    pub(crate) async fn input_ready(&self) {
        let mut caught_up = self.input_caught_up.subscribe();
        let _ = tokio::time::timeout(CATCH_UP_WAIT, caught_up.wait_for(|c| *c)).await;
    }

    /// The queue of offline sessions to hand over, once (for `handoff::run`).
    pub(crate) fn take_handoffs(
        &self,
    ) -> Option<mpsc::UnboundedReceiver<(moatmq_store::SessionKey, u64)>> {
        self.handoffs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// Hands a message `admit` let in to NATS for the other nodes (and NATS clients);
    /// a retained one also to the cluster's retained bucket.
    /// Never blocks: with NATS slow or away, a QoS 0 message that does not fit the
    /// queue is dropped (counted), a QoS 1/2 one is reported [`Forwarded::Full`].
    /// `live`: also publish it on its live subject (not for a NATS-native message,
    /// which is there already).
    pub fn forward(&self, who: &Identity, msg: &Inbound<'_>, live: bool) -> Forwarded {
        let Some(subject) = self.subject_of(msg.topic) else {
            tracing::debug!(
                topic = msg.topic,
                "cluster: topic has no NATS subject; kept local"
            );
            self.kept_local(msg);
            return Forwarded::Sent(None);
        };
        let awaited = msg.qos != rumqttd::protocol::QoS::AtMostOnce;
        if msg.retain && !self.store_retained(who, msg) && awaited {
            // Its PUBACK would wait for a change the bucket never gets.
            return Forwarded::Full;
        }
        let sent = self.queue(subject, who, msg, live);
        match (sent, msg.qos) {
            (Forwarded::Full, rumqttd::protocol::QoS::AtMostOnce) => {
                self.metrics.cluster_dropped.inc();
                tracing::debug!("cluster: forwarding queue full; message kept local");
                self.kept_local(msg);
                Forwarded::Sent(None)
            }
            (sent @ Forwarded::Sent(_), rumqttd::protocol::QoS::AtMostOnce) => sent,
            (Forwarded::Sent(number), _) => Forwarded::Awaiting(number),
            (other, _) => other,
        }
    }

    /// A message that stays on this node still reaches its shared groups' members here
    /// (no other node has it).
    fn kept_local(&self, msg: &Inbound<'_>) {
        self.groups
            .deliver_here(msg.topic, msg.payload, msg.qos, msg.retain, msg.properties);
    }

    /// Whether `msg` from `who` fits in one NATS message on the transfer stream. One
    /// that does not is refused everywhere (like one over `limits.max_payload_size`),
    /// not delivered on this node only and acknowledged as if the others had it.
    pub fn fits(&self, who: &Identity, msg: &Inbound<'_>) -> bool {
        let props = msg.properties.map_or(0, |p| {
            p.user_properties
                .iter()
                .map(|(k, v)| k.len() + v.len() + 8)
                .sum::<usize>()
                + p.response_topic.as_ref().map_or(0, String::len)
                + 2 * p.correlation_data.as_ref().map_or(0, |c| c.len())
                + p.content_type.as_ref().map_or(0, String::len)
                + 128
        });
        let size = msg.payload.len()
            + 2 * msg.topic.len()
            + who.username.as_ref().map_or(0, String::len)
            + who.client_id.len()
            + props
            + TRANSFER_OVERHEAD;
        size <= self.max_payload.load(Ordering::Relaxed)
    }

    /// The NATS server's `max_payload`: the most one NATS message can carry.
    pub fn max_payload(&self) -> usize {
        self.max_payload.load(Ordering::Relaxed)
    }

    /// Where this node's traffic stands now (see [`Cut`]). Read before a session leaves
    /// the offline sessions `admit` queues for: what it names was queued for it here.
    pub(crate) fn cut(&self) -> Cut {
        let held = self.held_back.lock().unwrap_or_else(|e| e.into_inner());
        // This node's own messages are in its router once no connection holds them
        // back: the cut names only those. One held back may be anywhere in the stream
        // after where this node's input stood when it was numbered.
        let lowest = held.values().map(|&(lowest, _)| lowest.saturating_sub(1));
        self.cut_below(&held, lowest.fold(u64::MAX, u64::min))
    }

    /// [`Cluster::cut`] naming this node's own messages up to `forwarded` at most.
    fn cut_below(&self, held: &std::collections::HashMap<u64, (u64, u64)>, below: u64) -> Cut {
        let stream = self.input_through.load(Ordering::Acquire);
        let forwarded = self.forward.last().min(below);
        let own_from = held.values().map(|&(_, from)| from).fold(stream, u64::min);
        Cut {
            stream,
            origin: self.origin.clone(),
            forwarded,
            own_from,
        }
    }

    /// The place of this node's own message `number` in the transfer stream, while a
    /// session moves in (see [`Cluster::tagging`]).
    pub fn transfer_id(&self, number: u64) -> Option<Transfer> {
        self.tags().then_some(Transfer {
            origin: self.origin_id,
            number,
        })
    }

    /// Whether messages carry their place in the transfer stream through the router
    /// now: only while a session moves in (it costs a quarter of the cluster's QoS 0
    /// rate), which is when a connection needs them (`origin.rs`).
    pub fn tags(&self) -> bool {
        self.moving.load(Ordering::Acquire) > 0
    }

    /// Messages carry their place through the router until the returned guard goes:
    /// a session moving in holds it from before it is subscribed here until its reads
    /// of the stream are done. What was admitted before this reached the router first
    /// (waited for, at most `wait`), so no message the router forwards to the session
    /// comes untagged from before.
    pub(crate) async fn tagging(
        &self,
        book: Option<&crate::durable::SessionBook>,
        wait: Duration,
    ) -> Tagging<'_> {
        self.moving.fetch_add(1, Ordering::AcqRel);
        let tagging = Tagging(self);
        if let Some(book) = book {
            book.admitted_before_now(wait).await;
        }
        tagging
    }

    /// What the session `router_id` moving here got from the transfer stream
    /// (`ids`, added to what it got before): its next connection skips the router's
    /// copies of those.
    pub(crate) fn moved_in(&self, router_id: &str, ids: HashSet<Transfer>) {
        if ids.is_empty() {
            return;
        }
        let mut moved = self.moving_in.lock().unwrap_or_else(|e| e.into_inner());
        moved.entry(router_id.to_string()).or_default().extend(ids);
    }

    /// For the connection of `router_id`: what [`Cluster::moved_in`] noted for it.
    pub(crate) fn take_moved_in(&self, router_id: &str) -> Option<HashSet<Transfer>> {
        self.moving_in
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(router_id)
    }

    /// An admission that may queue a message for offline sessions (`admit`): held
    /// until the message is numbered for the transfer stream, or, for one taken in
    /// from it, until [`Cluster::took_in`] counts it.
    pub(crate) fn admission(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.admissions.read().unwrap_or_else(|e| e.into_inner())
    }

    /// [`Cluster::cut`], read as `f` runs between two admissions (see
    /// [`Cluster::cut_for`]): a connection's end puts its session in the offline
    /// sessions so.
    pub(crate) fn cut_while(&self, f: impl FnOnce()) -> Cut {
        let _alone = self.admissions.write().unwrap_or_else(|e| e.into_inner());
        f();
        self.cut()
    }

    /// Where this node's traffic stands once a session moving in is subscribed in its
    /// router, for the read of what the session lacks (`unread::after_cut`): what it
    /// names the router may have had before the subscriptions, so only the read gives
    /// it to the session; what came after, the router forwards. So it is read between
    /// two admissions (the input counts a stream message taken in only after handing
    /// it to the router), and it names every message of this node's own numbered so
    /// far, held back from the router or not (another connection's later one may be in
    /// the router already): the router's copies of those that reach it after the
    /// subscriptions carry their place and are skipped (`Cluster::moved_in`). Before,
    /// either gap lost a message for the session now and then.
    pub(crate) fn cut_here(&self) -> Cut {
        self.cut_numbered(|| ())
    }

    /// Where this node's traffic stands, read as `f` runs between two admissions, naming
    /// every message of its own numbered so far (held back from the router or not).
    fn cut_numbered(&self, f: impl FnOnce()) -> Cut {
        let _alone = self.admissions.write().unwrap_or_else(|e| e.into_inner());
        f();
        let held = self.held_back.lock().unwrap_or_else(|e| e.into_inner());
        self.cut_below(&held, u64::MAX)
    }

    /// The connection of session `router_id`, which moved to another node, could not
    /// collect everything admitted before its `cut` from the router: the handoff's cut
    /// is not later.
    pub(crate) fn closing_moved(&self, router_id: &str, cut: Cut) {
        self.closed_cuts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(router_id.to_string(), cut);
    }

    /// Where this node's traffic stands as the session `router_id` leaves the offline
    /// sessions for another node (`leave` takes it out): between two admissions, so each
    /// message this node numbered or took in up to the cut was queued for the session
    /// if it matched, and none after it. Messages held back from the router count as
    /// numbered: an offline session has its copies in the store, not from the router.
    /// Not later than where its moved connection collected the router's messages
    /// ([`Cluster::closing_moved`]).
    pub(crate) fn cut_for(&self, router_id: &str, leave: impl FnOnce()) -> Cut {
        let mut cut = self.cut_numbered(leave);
        let closed = self
            .closed_cuts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(router_id);
        if let Some(closed) = closed {
            cut.stream = cut.stream.min(closed.stream);
            cut.forwarded = cut.forwarded.min(closed.forwarded);
            cut.own_from = cut.own_from.min(closed.own_from);
        }
        cut
    }

    /// Connection `conn` is about to admit a publish it may hold back from the router
    /// until the transfer stream has it (before the publish is numbered).
    pub(crate) fn hold_back(&self, conn: u64) {
        let mut held = self.held_back.lock().unwrap_or_else(|e| e.into_inner());
        let next = self.forward.last() + 1;
        let stream = self.input_through.load(Ordering::Acquire);
        held.entry(conn).or_insert((next, stream));
    }

    /// Connection `conn` handed what it held back to the router (or dropped it).
    pub(crate) fn released(&self, conn: u64) {
        self.held_back
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&conn);
    }

    /// This node's consumer took in the transfer stream message at `sequence`.
    pub(crate) fn took_in(&self, sequence: u64) {
        self.input_through.fetch_max(sequence, Ordering::Release);
    }

    /// The number of the last message this node forwarded: a connection that had one
    /// admitted waits for [`Cluster::transferred_through`] that number, not for what
    /// other connections forward meanwhile.
    pub fn last_forwarded(&self) -> u64 {
        self.forward.last()
    }

    /// Waits until JetStream holds every message this node forwarded up to number
    /// `seq`; `false` if it never will.
    pub async fn transferred_through(&self, seq: u64) -> bool {
        self.forward.done_through(seq).await
    }

    fn queue(&self, subject: String, who: &Identity, msg: &Inbound<'_>, live: bool) -> Forwarded {
        let mut headers = HeaderMap::new();
        headers.insert(NODE, self.node.as_str());
        headers.insert(QOS, (msg.qos as u8).to_string().as_str());
        headers.insert(RETAIN, if msg.retain { "1" } else { "0" });
        // A header value cannot hold a line break: such an identity stays local.
        let printable = |s: &str| !s.chars().any(char::is_control);
        if let Some(user) = &who.username {
            if !printable(user) {
                self.kept_local(msg);
                return Forwarded::Sent(None);
            }
            headers.insert(USER, user.as_str());
        }
        if !printable(&who.client_id) {
            self.kept_local(msg);
            return Forwarded::Sent(None);
        }
        headers.insert(CLIENT, who.client_id.as_str());
        let props = msg.properties.and_then(properties::encode);
        if let Some(props) = &props {
            headers.insert(PROPERTIES, props.as_str());
        }
        let envelope = xfer::Envelope {
            topic: msg.topic.to_string(),
            qos: msg.qos as u8,
            retain: msg.retain,
            user: who.username.clone(),
            client: who.client_id.clone(),
            properties: props,
            sealed: None,
            held_ms: None,
        };
        let expires = msg
            .properties
            .is_some_and(|p| p.message_expiry_interval.is_some());
        let sent = self.forward.send(|seq| xfer::Outgoing {
            seq,
            live: live.then_some((subject, headers)),
            payload: msg.payload.clone(),
            envelope,
            expiring_since: expires.then(std::time::Instant::now),
        });
        match sent {
            Some(number) => Forwarded::Sent(Some(number)),
            None => Forwarded::Full,
        }
    }

    /// A retained message from another node was set here through the transfer stream:
    /// its origin's bucket put may still be on its way, so the next sweep leaves it.
    pub fn relayed_retained(&self, topic: &str) {
        self.relayed.note(topic);
    }

    /// Queues a retained publish for the cluster's bucket: set, or cleared by an empty
    /// payload; `false` when the queue is full (a QoS 0 change is dropped, counted).
    fn store_retained(&self, who: &Identity, msg: &Inbound<'_>) -> bool {
        let change = if msg.payload.is_empty() {
            Change::Delete(msg.topic.to_string())
        } else {
            Change::Put(crate::retained::message(
                msg.topic,
                msg.payload,
                msg.qos,
                msg.properties,
                msg.v5,
                msg.expires_at(),
                owner_of(who.username.as_deref()),
            ))
        };
        let awaited = msg.qos != rumqttd::protocol::QoS::AtMostOnce;
        let queued = self.changes.send(|number| Numbered {
            number,
            change,
            awaited,
        });
        if queued.is_none() && !awaited {
            self.metrics.cluster_dropped.inc();
            tracing::debug!("cluster: retained queue full; change not stored in NATS");
        }
        queued.is_some()
    }

    /// The number of the last retained change this node queued for the bucket: a QoS
    /// 1/2 retained publish admitted waits for [`Cluster::retained_stored_through`] it.
    pub fn last_retained(&self) -> u64 {
        self.changes.last()
    }

    /// Waits until the retained bucket holds every change this node numbered up to
    /// `number` (or a later change of its topic); `false` if it never will.
    pub async fn retained_stored_through(&self, number: u64) -> bool {
        self.changes.done_through(number).await
    }

    /// `<prefix>.<subject of topic>`; `None` for `$` topics (per node) and topics
    /// nats-server cannot map.
    fn subject_of(&self, topic: &str) -> Option<String> {
        if topic.starts_with('$') {
            return None;
        }
        to_subject(topic).map(|s| format!("{}.{s}", self.prefix))
    }
}

/// The queue group of the nodes taking NATS-native messages in. NATS makes one group of
/// every subscription with that queue name matching a message, whatever its subject:
/// the name holds the prefix, so clusters with nested prefixes (`a`, `a.b`) stay apart.
pub fn native_queue(prefix: &str) -> String {
    format!("{}_native", bucket_base(prefix))
}

/// Ready once connected and subscribed: after each (re)connection the client sends its
/// subscriptions before anything else, and the server handles one connection's
/// operations in order, so an answer to a request sent after them means the server has
/// them and this node receives what the others publish.
async fn watch_connection(
    client: async_nats::Client,
    connected: Arc<Notify>,
    stopped: Arc<std::sync::atomic::AtomicBool>,
    metrics: Weak<Metrics>,
    max_payload: Arc<AtomicUsize>,
    max_packet_size: usize,
) {
    let mut warned = None;
    loop {
        connected.notified().await;
        if stopped.load(Ordering::Acquire) {
            return;
        }
        let server_max = client.server_info().max_payload;
        if server_max > 0 {
            max_payload.store(server_max, Ordering::Relaxed);
            if max_packet_size.saturating_add(TRANSFER_OVERHEAD) > server_max
                && warned != Some(server_max)
            {
                warned = Some(server_max);
                tracing::warn!(
                    max_packet_size,
                    nats_max_payload = server_max,
                    "cluster: limits.max_packet_size is more than NATS carries in one message; \
                     publishes too large for the transfer stream are refused (MQTT 5: PUBACK \
                     0x83; 3.1.1: dropped, as over max_payload_size): raise max_payload in \
                     the NATS server configuration or lower max_packet_size"
                );
            }
        }
        let answered = round_trip(&client).await;
        let Some(metrics) = metrics.upgrade() else {
            return;
        };
        if answered && client.connection_state() == async_nats::connection::State::Connected {
            metrics.cluster_ok.store(true, Ordering::Release);
        }
    }
}

/// A request to an inbox nobody listens on: the server answers "no responders" once it
/// has handled everything this connection sent before. (`Client::flush` only writes
/// the socket, and with `no_echo` a node cannot hear its own publish.)
pub async fn round_trip(client: &async_nats::Client) -> bool {
    match client.request(client.new_inbox(), Bytes::new()).await {
        Ok(_) => true,
        Err(e) => e.kind() == async_nats::RequestErrorKind::NoResponders,
    }
}
