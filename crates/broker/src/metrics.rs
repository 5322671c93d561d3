//! Prometheus metrics and health endpoints (`[metrics] bind`): `GET /metrics`,
//! `GET /healthz` (the process is alive and its router answers) and `GET /readyz`
//! (listeners bound, the retained store loaded and the router answering). Both answer 503
//! as soon as the router watchdog finds the router dead or wedged (`router.rs`).
//!
//! Hot-path counters are plain atomics held by each gateway; labelled families are only
//! touched when a connection starts or ends. Gauges that mirror state owned elsewhere
//! (`moatmq_router_up`, the process's resident memory, the login throttle's throttled
//! addresses, the retained set's size) are read at scrape time, so they are never stale
//! (retained messages expire and throttled addresses are forgotten without an event).
//! The configured bounds (`moatmq_max_connections`, `moatmq_retained_max_*`) are
//! exported beside the figures they bound, so a dashboard or alert can show use as a
//! fraction.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use moatmq_auth::LoginThrottle;
use moatmq_store::{RetainedSet, StoreLimits};
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    pub listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabel {
    pub action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

/// State owned elsewhere that the gauges mirror at scrape time.
pub struct Observed {
    /// `moatmq_login_throttled_addresses`.
    pub throttle: Arc<LoginThrottle>,
    /// `moatmq_retained_messages` and `moatmq_retained_bytes`.
    pub retained: RetainedSet,
}

/// Every metric the broker exports.
pub struct Metrics {
    registry: Mutex<Registry>,
    /// Metrics under their conventional unprefixed names (`process_*`), which
    /// dashboards and alert rules written for any exporter already know.
    process: Mutex<Registry>,
    /// `process_resident_memory_bytes`, set from /proc at scrape time; not exported
    /// where /proc/self/status cannot be read (not Linux).
    resident_memory: Gauge,
    /// `moatmq_router_up`: 1 while `router_ok`, set at scrape time.
    router_up: Gauge,
    /// What the scrape-time gauges below read, once the broker has made it.
    observed: OnceLock<Observed>,
    login_throttled_addresses: Gauge,
    retained_messages: Gauge,
    retained_bytes: Gauge,
    /// Configured bounds, set once at start.
    max_connections: Gauge,
    retained_max_messages: Gauge,
    retained_max_bytes: Gauge,
    pub connections_total: Family<ListenerLabel, Counter>,
    pub connections_current: Family<ListenerLabel, Gauge>,
    pub messages_in: Counter,
    pub messages_out: Counter,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    pub auth_success: Counter,
    pub auth_failure: Counter,
    /// Passwords checked on the hashing pool (attempts that reached a hash check).
    pub password_checks: Counter,
    /// Password logins answered "server busy" (no capacity to check them).
    pub login_busy: Counter,
    pub acl_denials: Family<ActionLabel, Counter>,
    pub rate_limited: Counter,
    /// Retained messages refused, by the quota they would have passed.
    pub retained_refused: Family<ReasonLabel, Counter>,
    /// Messages for offline persistent sessions dropped because their queue was full.
    pub session_messages_dropped: Counter,
    /// `[cluster]`: messages taken in from other nodes and NATS clients.
    pub cluster_received: Counter,
    /// `[cluster]`: messages not forwarded (queue to NATS full; a NATS-native QoS 1/2
    /// message then reaches no node) or not taken in (each time the input fell behind
    /// and NATS dropped messages for this node, counted once).
    pub cluster_dropped: Counter,
    /// `[cluster]`: values of the shared state in NATS and messages of the transfer
    /// stream refused (not authenticating under this node's key at their bucket and key,
    /// or stream and message id: altered, moved or foreign).
    pub cluster_state_rejected: Counter,
    /// `[cluster]`: transfer messages refused as stored too late that their node then
    /// stored again, each settled by its replacement rather than counted as refused
    /// (`cluster/late_copies.rs`).
    pub cluster_late_copies_replaced: Counter,
    /// `[cluster]`: passes over the transfer stream for sessions moving in (each one
    /// ordered consumer), shared by the moves asked at once.
    pub cluster_transfer_reads: Counter,
    /// `[cluster]`: delayed wills of other nodes published here (overdue: their node
    /// did not publish them, dead or cut off).
    pub cluster_wills_taken_over: Counter,
    /// `[cluster]`: sessions this node resumed without their old node's answer, still
    /// taking what that node may hand over late (`cluster/late.rs`).
    pub cluster_late_waits: Gauge,
    /// `[cluster]`: nodes heard from lately, this one included (`cluster/nodes.rs`).
    pub cluster_nodes: Gauge,
    /// `[cluster]`: of those, the other nodes whose security settings (ACL, password
    /// file, anonymous access, client CAs, `native_user`) differ from this node's.
    pub cluster_nodes_differing: Gauge,
    /// Persistent sessions whose client is away, and their subscriptions.
    pub sessions_offline: Gauge,
    pub sessions_offline_subscriptions: Gauge,
    /// Persistent sessions in the session store, and the messages it holds for them.
    pub sessions_stored: Gauge,
    pub session_messages_held: Gauge,
    /// 1 while the session store's writer is behind (`durable/jobs.rs`).
    pub session_writer_behind: Gauge,
    /// Subscriptions of connected clients (changed on SUBSCRIBE, UNSUBSCRIBE and when a
    /// connection ends, never per message).
    pub subscriptions: Gauge,
    /// Router links held by client connections: a clean session opens its link only
    /// when it first sends the router something (`gateway/link.rs`).
    pub router_links: Gauge,
    pub retained_store_bytes: Gauge,
    pub retained_last_save_timestamp: Gauge,
    pub retained_last_save_duration_ms: Gauge,
    /// Set once listeners are bound and the retained store is loaded.
    pub ready: AtomicBool,
    /// Cleared for good when the router dies or stops answering.
    pub router_ok: AtomicBool,
    /// `[cluster]`: false while NATS is unreachable or the subscription not yet in
    /// place (`/readyz` answers 503, CONNECTs are refused); always true without a cluster.
    pub cluster_ok: AtomicBool,
    /// `[cluster]`: false until the retained messages in NATS are loaded (and for good
    /// when this node's key does not open the cluster's key marker); always true
    /// without a cluster.
    pub cluster_state_ok: AtomicBool,
    /// `[cluster]`: false until this node's consumer of the transfer stream is in place
    /// (and while it is set up again after a failure); always true without a cluster.
    pub cluster_xfer_ok: AtomicBool,
    /// Saves counted by the store, mirrored into the gauges at scrape time.
    pub saves: AtomicU64,
}

impl Metrics {
    /// With `[cluster]`: connected and subscribed to NATS, reading the transfer stream,
    /// and the shared retained messages loaded (always true without a cluster).
    pub fn cluster_ready(&self) -> bool {
        self.cluster_ok.load(Ordering::Acquire)
            && self.cluster_state_ok.load(Ordering::Acquire)
            && self.cluster_xfer_ok.load(Ordering::Acquire)
    }

    pub fn new() -> Arc<Metrics> {
        let m = Metrics {
            registry: Mutex::new(Registry::with_prefix("moatmq")),
            process: Mutex::new(Registry::with_prefix("process")),
            resident_memory: Gauge::default(),
            router_up: Gauge::default(),
            observed: OnceLock::new(),
            login_throttled_addresses: Gauge::default(),
            retained_messages: Gauge::default(),
            retained_bytes: Gauge::default(),
            max_connections: Gauge::default(),
            retained_max_messages: Gauge::default(),
            retained_max_bytes: Gauge::default(),
            connections_total: Family::default(),
            connections_current: Family::default(),
            messages_in: Counter::default(),
            messages_out: Counter::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            auth_success: Counter::default(),
            auth_failure: Counter::default(),
            password_checks: Counter::default(),
            login_busy: Counter::default(),
            acl_denials: Family::default(),
            rate_limited: Counter::default(),
            retained_refused: Family::default(),
            session_messages_dropped: Counter::default(),
            cluster_received: Counter::default(),
            cluster_dropped: Counter::default(),
            cluster_state_rejected: Counter::default(),
            cluster_late_copies_replaced: Counter::default(),
            cluster_transfer_reads: Counter::default(),
            cluster_wills_taken_over: Counter::default(),
            cluster_late_waits: Gauge::default(),
            cluster_nodes: Gauge::default(),
            cluster_nodes_differing: Gauge::default(),
            sessions_offline: Gauge::default(),
            sessions_offline_subscriptions: Gauge::default(),
            sessions_stored: Gauge::default(),
            session_messages_held: Gauge::default(),
            session_writer_behind: Gauge::default(),
            subscriptions: Gauge::default(),
            router_links: Gauge::default(),
            retained_store_bytes: Gauge::default(),
            retained_last_save_timestamp: Gauge::default(),
            retained_last_save_duration_ms: Gauge::default(),
            ready: AtomicBool::new(false),
            router_ok: AtomicBool::new(true),
            cluster_ok: AtomicBool::new(true),
            cluster_state_ok: AtomicBool::new(true),
            cluster_xfer_ok: AtomicBool::new(true),
            saves: AtomicU64::new(0),
        };
        if let Ok(mut r) = m.registry.lock() {
            r.register(
                "connections",
                "Connections accepted, by listener",
                m.connections_total.clone(),
            );
            r.register(
                "connections_current",
                "Connections open now, by listener",
                m.connections_current.clone(),
            );
            r.register(
                "max_connections",
                "The [limits] max_connections bound, over all listeners",
                m.max_connections.clone(),
            );
            r.register(
                "messages_received",
                "PUBLISH packets received from clients",
                m.messages_in.clone(),
            );
            r.register(
                "messages_sent",
                "PUBLISH packets sent to clients",
                m.messages_out.clone(),
            );
            r.register(
                "bytes_received",
                "Bytes received from clients",
                m.bytes_in.clone(),
            );
            r.register("bytes_sent", "Bytes sent to clients", m.bytes_out.clone());
            r.register(
                "auth_successes",
                "Successful authentications",
                m.auth_success.clone(),
            );
            r.register(
                "auth_failures",
                "Failed authentications",
                m.auth_failure.clone(),
            );
            r.register(
                "password_checks",
                "Passwords checked against the password file (hash computations)",
                m.password_checks.clone(),
            );
            r.register(
                "login_busy",
                "Password logins answered server busy",
                m.login_busy.clone(),
            );
            r.register(
                "login_throttled_addresses",
                "Source addresses (IPv6 by /64) whose next login attempt waits out the failed-login throttle's delay",
                m.login_throttled_addresses.clone(),
            );
            r.register(
                "acl_denials",
                "ACL denials, by action",
                m.acl_denials.clone(),
            );
            r.register(
                "rate_limited",
                "Connections or publishers limited",
                m.rate_limited.clone(),
            );
            r.register(
                "retained_messages",
                "Retained messages held (the set subscribers are served from)",
                m.retained_messages.clone(),
            );
            r.register(
                "retained_bytes",
                "Bytes of retained messages as the max_bytes quota counts them (each message's stored record)",
                m.retained_bytes.clone(),
            );
            r.register(
                "retained_max_messages",
                "The [retained] max_messages quota",
                m.retained_max_messages.clone(),
            );
            r.register(
                "retained_max_bytes",
                "The [retained] max_bytes quota",
                m.retained_max_bytes.clone(),
            );
            r.register(
                "retained_refused",
                "Retained messages refused, by the quota they would pass",
                m.retained_refused.clone(),
            );
            r.register(
                "session_messages_dropped",
                "Messages for offline persistent sessions dropped: the session's queue was full",
                m.session_messages_dropped.clone(),
            );
            r.register(
                "cluster_messages_received",
                "Messages taken in from other cluster nodes and NATS clients",
                m.cluster_received.clone(),
            );
            r.register(
                "cluster_messages_dropped",
                "Messages not forwarded to NATS (queue full) or dropped by NATS for this node (slow)",
                m.cluster_dropped.clone(),
            );
            r.register(
                "cluster_state_rejected",
                "Values of the cluster's shared state and transfer messages in NATS refused (tampered, moved or sealed under another key)",
                m.cluster_state_rejected.clone(),
            );
            r.register(
                "cluster_late_copies_replaced",
                "Transfer messages NATS stored too late (a stalled path from their node) that their node stored again: refused, and not counted in cluster_state_rejected",
                m.cluster_late_copies_replaced.clone(),
            );
            r.register(
                "cluster_transfer_reads",
                "Passes over the transfer stream for sessions moving to this node (one ordered consumer each)",
                m.cluster_transfer_reads.clone(),
            );
            r.register(
                "cluster_late_waits",
                "Sessions resumed without their old node's answer, still taking what it may hand over late (up to 10 minutes each)",
                m.cluster_late_waits.clone(),
            );
            r.register(
                "cluster_nodes",
                "Nodes of the cluster heard from in the last 90 s, this one included",
                m.cluster_nodes.clone(),
            );
            r.register(
                "cluster_nodes_differing",
                "Other nodes enforcing different security settings than this one (ACL, password file, anonymous access, client CAs, native_user): a client's rights depend on the node it reaches",
                m.cluster_nodes_differing.clone(),
            );
            r.register(
                "cluster_wills_taken_over",
                "Delayed wills of other nodes published by this node once overdue (their node did not publish them)",
                m.cluster_wills_taken_over.clone(),
            );
            r.register(
                "sessions_offline",
                "Persistent sessions whose client is away (their messages are queued)",
                m.sessions_offline.clone(),
            );
            r.register(
                "sessions_offline_subscriptions",
                "Subscriptions of persistent sessions whose client is away",
                m.sessions_offline_subscriptions.clone(),
            );
            r.register(
                "sessions_stored",
                "Persistent sessions in the durable session store (as of its last commit)",
                m.sessions_stored.clone(),
            );
            r.register(
                "session_messages_held",
                "Messages the session store holds for persistent sessions, queued or in flight",
                m.session_messages_held.clone(),
            );
            r.register(
                "session_writer_behind",
                "1 while more changes wait for the session store's writer than it may be behind by (a slow disk): connected persistent sessions' deliveries wait meanwhile",
                m.session_writer_behind.clone(),
            );
            r.register(
                "subscriptions",
                "Subscriptions of connected clients",
                m.subscriptions.clone(),
            );
            r.register(
                "router_links",
                "Router links held by client connections (idle clean sessions hold none)",
                m.router_links.clone(),
            );
            r.register(
                "retained_store_bytes",
                "Size of the retained store on disk",
                m.retained_store_bytes.clone(),
            );
            r.register(
                "retained_last_save_timestamp_seconds",
                "Unix time of the last retained save",
                m.retained_last_save_timestamp.clone(),
            );
            r.register(
                "retained_last_save_duration_milliseconds",
                "Duration of the last retained save",
                m.retained_last_save_duration_ms.clone(),
            );
            r.register(
                "router_up",
                "1 while the router thread answers the watchdog, 0 once it failed",
                m.router_up.clone(),
            );
        }
        if resident_memory_bytes().is_some() {
            if let Ok(mut r) = m.process.lock() {
                r.register_with_unit(
                    "resident_memory",
                    "Resident memory size (VmRSS)",
                    Unit::Bytes,
                    m.resident_memory.clone(),
                );
            }
        }
        Arc::new(m)
    }

    /// Gives the scrape-time gauges their sources; only the first call counts.
    pub fn observe(&self, observed: Observed) {
        let _ = self.observed.set(observed);
    }

    /// Exports the configured bounds that use is measured against.
    pub fn set_bounds(&self, max_connections: usize, retained: &StoreLimits) {
        self.max_connections.set(saturating_i64(max_connections));
        self.retained_max_messages
            .set(saturating_i64(retained.max_messages));
        self.retained_max_bytes
            .set(saturating_i64(retained.max_bytes));
    }

    pub fn deny(&self, action: &str) {
        self.acl_denials
            .get_or_create(&ActionLabel {
                action: action.into(),
            })
            .inc();
    }

    pub fn retained_refused(&self, reason: &str) {
        self.retained_refused
            .get_or_create(&ReasonLabel {
                reason: reason.into(),
            })
            .inc();
    }

    pub(crate) fn render(&self) -> String {
        self.router_up
            .set(i64::from(self.router_ok.load(Ordering::Acquire)));
        if let Some(rss) = resident_memory_bytes() {
            self.resident_memory.set(rss as i64);
        }
        if let Some(o) = self.observed.get() {
            self.login_throttled_addresses
                .set(saturating_i64(o.throttle.throttled_addresses()));
            self.retained_messages.set(saturating_i64(o.retained.len()));
            self.retained_bytes.set(saturating_i64(o.retained.bytes()));
        }
        let mut out = String::new();
        for registry in [&self.registry, &self.process] {
            if let Ok(r) = registry.lock() {
                let _ = encode_registry(&mut out, &r);
            }
        }
        let _ = encode_eof(&mut out);
        out
    }
}

/// A count or configured bound as a gauge value (a bound past `i64::MAX` as `i64::MAX`).
fn saturating_i64(n: impl TryInto<i64>) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}

/// The process's resident set size from `/proc/self/status` (`VmRSS:  1234 kB`).
pub(crate) fn resident_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    vm_rss_bytes(&status)
}

fn vm_rss_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    kib.checked_mul(1024)
}

/// Serves the endpoints until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    let app = Router::new()
        .route("/metrics", get(scrape))
        .route("/healthz", get(healthy))
        .route("/readyz", get(ready))
        .with_state(metrics);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "metrics endpoint stopped");
    }
}

async fn scrape(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.render(),
    )
}

async fn healthy(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    if m.router_ok.load(Ordering::Acquire) {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "router failed\n")
    }
}

async fn ready(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    if m.ready.load(Ordering::Acquire) && m.router_ok.load(Ordering::Acquire) && m.cluster_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_rss_is_read_in_bytes() {
        let status = "Name:\tmoatmq\nVmPeak:\t  9000 kB\nVmRSS:\t    5120 kB\nThreads:\t4\n";
        assert_eq!(vm_rss_bytes(status), Some(5 * 1024 * 1024));
        assert_eq!(vm_rss_bytes("VmRSS:\t12 MB\n"), None);
        assert_eq!(vm_rss_bytes("Name:\tx\n"), None);
    }

    #[test]
    fn observed_state_and_bounds_are_read_at_scrape() {
        let m = Metrics::new();
        let limits = StoreLimits {
            max_messages: 10,
            max_bytes: u64::MAX,
            max_messages_per_user: 0,
            max_bytes_per_user: 0,
        };
        m.set_bounds(500, &limits);
        let retained = RetainedSet::new(limits);
        let throttle = Arc::new(LoginThrottle::new());
        m.observe(Observed {
            throttle: throttle.clone(),
            retained: retained.clone(),
        });
        let ip = std::net::IpAddr::from([192, 0, 2, 1]);
        for _ in 0..3 {
            throttle.record_failure(ip, "alice");
        }
        let msg = moatmq_store::RetainedMessage {
            topic: "a/b".into(),
            payload: b"hello".to_vec(),
            qos: 0,
            properties: None,
            expires_at: None,
            owner: Some("alice".into()),
        };
        let size = moatmq_store::stored_bytes(&msg);
        retained.set(msg).unwrap();
        let text = m.render();
        for line in [
            "moatmq_max_connections 500".to_string(),
            "moatmq_retained_max_messages 10".to_string(),
            format!("moatmq_retained_max_bytes {}", i64::MAX),
            "moatmq_login_throttled_addresses 1".to_string(),
            "moatmq_retained_messages 1".to_string(),
            format!("moatmq_retained_bytes {size}"),
        ] {
            assert!(text.contains(&format!("\n{line}\n")), "{line} in\n{text}");
        }
    }
}
