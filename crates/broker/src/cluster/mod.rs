//! Cluster: live routing between moatmq nodes over core NATS (docs/cluster.md).
//!
//! Out: [`Cluster::forward`] is called by `admit` for every message it lets in, except
//! cluster input itself, and hands it to one task that publishes it on
//! `<prefix>.<subject>` with the origin node, QoS, retain flag, publisher and MQTT 5
//! properties in headers.
//! In: one subscription on `<prefix>.>`; a message from another node, or from a
//! NATS-native client when `native_user` is set, goes through `admit` as
//! [`Source::Cluster`] and then into the router on the broker's own link, so every
//! delivery passes the receiving node's `deliver`. A node never re-publishes what it
//! received (the source decides), NATS does not echo a node's own publishes back
//! (`no_echo`), and a message naming this node as origin is dropped.
//! Retained messages are also kept, sealed, in a JetStream KV bucket (`state.rs`), so
//! a node that joins late serves them too.

pub(crate) mod handoff;
mod owner;
mod properties;
mod state;
mod subject;

pub use owner::{ClaimFailed, OwnerClaim};
pub(crate) use properties::decode as decode_properties;
pub use state::{bucket_base, KeyCheck, MARKER_KEY};
pub use subject::{to_subject, to_topic};

use crate::error::BrokerError;
use crate::inbound::Inbound;
use crate::metrics::Metrics;
use crate::policy::Identity;
use crate::retained_index::{owner_of, RetainedIndex};
use async_nats::{HeaderMap, Subscriber};
use bytes::Bytes;
use moatmq_config::{Cluster as ClusterConfig, Config};
use state::{Change, StateSync};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, watch, Notify};

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

/// Messages waiting for the NATS connection: past this, new ones are not forwarded
/// (counted) rather than holding up the publishers' gateways.
const FORWARD_QUEUE: usize = 16_384;

/// Retained changes waiting for the KV bucket; past this they are not stored in NATS
/// (counted with the messages not forwarded).
const STATE_QUEUE: usize = 16_384;

/// This node's link to the cluster.
pub struct Cluster {
    pub(crate) node: String,
    pub(crate) prefix: String,
    pub(crate) native_user: Option<String>,
    forward: mpsc::Sender<Outgoing>,
    /// This node's retained changes for the KV bucket (`state.rs`); dropping it ends
    /// that task.
    changes: mpsc::Sender<Change>,
    /// Session ownership across nodes (`owner.rs`).
    pub(crate) owners: owner::Owners,
    /// Offline sessions other nodes claimed, for `handoff::run` (taken by `serve`).
    handoffs: std::sync::Mutex<Option<mpsc::UnboundedReceiver<(moatmq_store::SessionKey, u64)>>>,
    key_check: watch::Receiver<KeyCheck>,
    pub(crate) metrics: Arc<Metrics>,
    /// Wakes `watch_connection`; with `stopped`, ends it (and its NATS client) on drop.
    connected: Arc<Notify>,
    stopped: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::Release);
        self.connected.notify_one();
    }
}

/// A message on its way to NATS.
struct Outgoing {
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
}

/// The subscription that feeds `cluster_input::run_input`, taken once by `serve`.
pub struct Input(pub(crate) Subscriber);

impl Cluster {
    /// Connects to NATS (in the background: the broker starts while NATS is away, not
    /// ready until it is reachable), subscribes to the cluster's subjects and starts
    /// keeping `index` and the cluster's retained bucket in step.
    pub async fn connect(
        config: &Config,
        cluster: &ClusterConfig,
        metrics: Arc<Metrics>,
        index: &RetainedIndex,
    ) -> Result<(Cluster, Input), BrokerError> {
        let failed = |reason: String| BrokerError::Cluster { reason };
        // The config refuses a cluster without [retained]: its state would be plaintext.
        let Some(retained) = &config.retained else {
            return Err(failed("a cluster needs a [retained] key".into()));
        };
        let key = crate::retained::load_key(config, retained)?;
        let seal = moatmq_store::ClusterSeal::new(&key);
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
        let events = Arc::downgrade(&metrics);
        let connected = Arc::new(Notify::new());
        let on_connect = connected.clone();
        options = options.event_callback(move |event| {
            let events: Weak<Metrics> = events.clone();
            let on_connect = on_connect.clone();
            async move {
                let Some(metrics) = events.upgrade() else {
                    return;
                };
                match event {
                    async_nats::Event::Connected => {
                        tracing::info!("cluster: connected to NATS");
                        on_connect.notify_one();
                    }
                    async_nats::Event::Disconnected | async_nats::Event::Closed => {
                        tracing::warn!("cluster: NATS connection lost; reconnecting");
                        metrics.cluster_ok.store(false, Ordering::Release);
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
        let subscriber = client
            .subscribe(format!("{}.>", cluster.subject_prefix))
            .await
            .map_err(|e| failed(format!("NATS subscription: {e}")))?;
        let (forward, queue) = mpsc::channel(FORWARD_QUEUE);
        tokio::spawn(run_output(client.clone(), queue));
        let (changes, queue) = mpsc::channel(STATE_QUEUE);
        let (checked, key_check) = watch::channel(KeyCheck::Pending);
        let sync = StateSync::new(
            client.clone(),
            seal,
            &cluster.subject_prefix,
            key_source,
            index.clone(),
            Arc::downgrade(&metrics),
            queue,
            checked,
        );
        tokio::spawn(sync.run());
        let (handoff_tx, handoffs) = mpsc::unbounded_channel();
        let owners = owner::Owners::start(
            client.clone(),
            &cluster.node_name,
            &bucket_base(&cluster.subject_prefix),
            Arc::new(moatmq_store::ClusterSeal::new(&key)),
            key_check.clone(),
            Arc::downgrade(&metrics),
            handoff_tx,
        );
        let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        tokio::spawn(watch_connection(
            client,
            connected.clone(),
            stopped.clone(),
            Arc::downgrade(&metrics),
        ));
        Ok((
            Cluster {
                node: cluster.node_name.clone(),
                prefix: cluster.subject_prefix.clone(),
                native_user: cluster.native_user.clone(),
                forward,
                changes,
                owners,
                handoffs: std::sync::Mutex::new(Some(handoffs)),
                key_check,
                metrics,
                connected,
                stopped,
            },
            Input(subscriber),
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
    /// Never blocks: with NATS slow or away, what does not fit the queue is dropped.
    pub fn forward(&self, who: &Identity, msg: &Inbound<'_>) {
        let Some(subject) = self.subject_of(msg.topic) else {
            tracing::debug!(
                topic = msg.topic,
                "cluster: topic has no NATS subject; kept local"
            );
            return;
        };
        let mut headers = HeaderMap::new();
        headers.insert(NODE, self.node.as_str());
        headers.insert(QOS, (msg.qos as u8).to_string().as_str());
        headers.insert(RETAIN, if msg.retain { "1" } else { "0" });
        // A header value cannot hold a line break: such an identity stays local.
        let printable = |s: &str| !s.chars().any(char::is_control);
        if let Some(user) = &who.username {
            if !printable(user) {
                return;
            }
            headers.insert(USER, user.as_str());
        }
        if !printable(&who.client_id) {
            return;
        }
        headers.insert(CLIENT, who.client_id.as_str());
        if let Some(props) = msg.properties.and_then(properties::encode) {
            headers.insert(PROPERTIES, props.as_str());
        }
        let out = Outgoing {
            subject,
            headers,
            payload: msg.payload.clone(),
        };
        if self.forward.try_send(out).is_err() {
            self.metrics.cluster_dropped.inc();
            tracing::debug!("cluster: forwarding queue full; message kept local");
        }
        if msg.retain {
            self.store_retained(who, msg);
        }
    }

    /// Queues a retained publish for the cluster's bucket: set, or cleared by an empty
    /// payload.
    fn store_retained(&self, who: &Identity, msg: &Inbound<'_>) {
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
        if self.changes.try_send(change).is_err() {
            self.metrics.cluster_dropped.inc();
            tracing::debug!("cluster: retained queue full; change not stored in NATS");
        }
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

/// Ready once connected and subscribed: after each (re)connection the client sends its
/// subscriptions before anything else, and the server handles one connection's
/// operations in order, so an answer to a request sent after them means the server has
/// them and this node receives what the others publish.
async fn watch_connection(
    client: async_nats::Client,
    connected: Arc<Notify>,
    stopped: Arc<std::sync::atomic::AtomicBool>,
    metrics: Weak<Metrics>,
) {
    loop {
        connected.notified().await;
        if stopped.load(Ordering::Acquire) {
            return;
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

/// Publishes forwarded messages in the order `admit` let them in.
async fn run_output(client: async_nats::Client, mut queue: mpsc::Receiver<Outgoing>) {
    while let Some(out) = queue.recv().await {
        if let Err(e) = client
            .publish_with_headers(out.subject, out.headers, out.payload)
            .await
        {
            tracing::debug!("cluster: publish to NATS failed: {e}");
        }
    }
}
