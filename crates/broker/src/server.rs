//! Wiring: start the router, bind every listener, serve until SIGTERM/SIGINT.
//!
//! Shutdown: listeners stop accepting, every gateway is told (MQTT 5 clients receive
//! DISCONNECT 0x8B), and `run` returns once connections have closed or a grace period
//! has passed.

use crate::admission::{Admission, Slot};
use crate::audit::{AuditLog, Who};
use crate::gateway::Will;
use crate::handshake_log::HandshakeLog;
use crate::listener::{bind, Bound};
use crate::metrics::Metrics;
use crate::policy::{Identity, ListenerPolicy, Policy, PolicyError};
use crate::ratelimit::ConnectionLimiter;
use crate::retained::{Recorded, RetainedError, RetainedStore};
use crate::retained_index::{owner_of, Refusal, RetainedIndex};
use crate::router::{RouterFailure, RouterHandle};
use crate::sessions::Sessions;
use crate::tls::TlsSetup;
use bytes::Bytes;
use moatmq_config::Config;
use rumqttd::protocol::{PublishProperties, QoS};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tracing::{info, warn};

/// State shared by every connection.
pub struct Shared {
    pub config: Config,
    pub router: RouterHandle,
    pub policy: Policy,
    pub metrics: Arc<Metrics>,
    /// The audit log, when `[audit]` is configured.
    pub audit: Option<AuditLog>,
    /// New connections per source address (`[rate_limit]`).
    pub conn_limiter: ConnectionLimiter,
    /// Connections held and pending per source address (`limits.max_*_per_address`).
    pub admission: Arc<Admission>,
    /// Rate limit for the log lines about failed handshakes.
    pub handshake_log: HandshakeLog,
    /// Rate limit for the log lines and audit events about per-address refusals.
    pub refusal_log: HandshakeLog,
    /// The encrypted retained store, when `[retained]` is configured.
    pub retained: Option<Arc<RetainedStore>>,
    /// Every retained message, served by the gateways on SUBSCRIBE (the set the
    /// store, if any, persists).
    pub retained_index: RetainedIndex,
    /// Flips to `true` when the broker shuts down.
    pub shutdown: watch::Receiver<bool>,
    /// Wills waiting out their MQTT 5 delay, by router client id.
    delayed_wills: Mutex<HashMap<String, AbortHandle>>,
    /// Disconnected persistent sessions waiting to expire, by router client id.
    session_timers: Mutex<HashMap<String, AbortHandle>>,
    /// The connection holding each router client id (no takeover inside the router).
    pub sessions: Sessions,
}

/// What a gateway knows about its connection before CONNECT.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub listener: ListenerPolicy,
    pub peer: SocketAddr,
    /// Verified client-certificate CN, on listeners with `identity = "cn"`.
    pub cert_identity: Option<String>,
    /// The source address is over `rate_limit.connections_per_second`.
    pub rate_limited: bool,
    /// When the connection must have sent its CONNECT (`limits.connect_timeout` from
    /// accept, shared with the PROXY header, TLS and WebSocket steps).
    pub deadline: tokio::time::Instant,
    /// The connection's per-address slot, held by the listener for the connection's life.
    pub slot: Weak<Slot>,
}

impl ConnInfo {
    /// The CONNACK went out: the connection stops counting as pending for its address.
    pub fn established(&self) {
        if let Some(slot) = self.slot.upgrade() {
            slot.established();
        }
    }

    /// The audit log's view of this connection.
    pub fn who<'a>(&'a self, client_id: Option<&'a str>, username: Option<&'a str>) -> Who<'a> {
        Who {
            listener: &self.listener.name,
            peer: self.peer,
            client_id,
            username,
        }
    }
}

impl Shared {
    /// Counts and audits an ACL denial; `line` is the deciding ACL line, if any.
    pub fn denied(
        &self,
        info: &ConnInfo,
        who: &Identity,
        action: &str,
        topic: &str,
        line: Option<usize>,
    ) {
        self.metrics.deny(action);
        tracing::debug!(action, topic, ?line, "denied by ACL");
        if let Some(audit) = &self.audit {
            audit.event(
                "authz_deny",
                &info.who(Some(&who.client_id), who.username.as_deref()),
                &[
                    ("action", action.into()),
                    ("topic", topic.into()),
                    (
                        "rule_line",
                        line.map_or(serde_json::Value::Null, Into::into),
                    ),
                ],
            );
        }
    }

    /// The write check every message entering the broker passes (client publishes and
    /// wills, at connect and again when published): the ACL in force at that moment. A
    /// refusal is counted and audited as `action`.
    pub fn may_write(&self, info: &ConnInfo, who: &Identity, action: &str, topic: &str) -> bool {
        let decision = self.policy.may_publish(who, topic);
        if !decision.allowed {
            self.denied(info, who, action, topic, decision.line);
        }
        decision.allowed
    }

    /// Publishes a will now or after its delay (MQTT 5 will delay interval).
    pub fn publish_will(self: &Arc<Self>, router_id: &str, will: Will) {
        if will.delay.is_zero() {
            self.publish_will_now(will);
            return;
        }
        let shared = self.clone();
        let key = router_id.to_string();
        let task = tokio::spawn(async move {
            tokio::time::sleep(will.delay).await;
            if let Ok(mut wills) = shared.delayed_wills.lock() {
                wills.remove(&key);
            }
            shared.publish_will_now(will);
        });
        if let Ok(mut wills) = self.delayed_wills.lock() {
            wills.insert(router_id.to_string(), task.abort_handle());
        }
    }

    /// Publishes a will if its owner may still write its topic: the ACL may have been
    /// reloaded since the CONNECT, or during the will delay.
    fn publish_will_now(&self, will: Will) {
        let Will {
            will,
            v5,
            properties,
            owner,
            info,
            ..
        } = will;
        let Ok(topic) = std::str::from_utf8(&will.topic) else {
            return;
        };
        if !self.may_write(&info, &owner, "will", topic) {
            return;
        }
        // A will has no client waiting for an acknowledgement: the saver persists it on
        // its next round, also with autosave_interval = 0.
        if will.retain
            && matches!(
                self.retain(
                    &info,
                    &owner,
                    topic,
                    &will.message,
                    will.qos,
                    properties.as_ref(),
                    v5
                ),
                Recorded::Refused(_)
            )
        {
            return;
        }
        self.router
            .publish(will.topic, will.message, will.qos, properties);
    }

    /// Records a retained PUBLISH (set, replace, or clear by an empty payload) in the
    /// set subscribers are served from and the encrypted store persists, counted against
    /// `who`'s quota. The router never sees the retain flag: moatmq serves retained
    /// messages itself. A refusal is counted and audited here.
    #[allow(clippy::too_many_arguments)] // one call per publish path; a struct adds nothing
    pub fn retain(
        &self,
        info: &ConnInfo,
        who: &Identity,
        topic: &str,
        payload: &Bytes,
        qos: QoS,
        properties: Option<&PublishProperties>,
        v5: bool,
    ) -> Recorded {
        let expires_at = properties
            .and_then(|p| p.message_expiry_interval)
            .map(|secs| moatmq_store::now_unix() + u64::from(secs));
        if payload.is_empty() {
            self.retained_index.clear(topic);
        } else {
            let owner = owner_of(who.username.as_deref());
            let message =
                crate::retained::message(topic, payload, qos, properties, v5, expires_at, owner);
            if let Err(why) = self.retained_index.set(message) {
                self.retained_refused(info, who, topic, why);
                return Recorded::Refused(why);
            }
        }
        self.metrics
            .retained_messages
            .set(self.retained_index.len() as i64);
        match &self.retained {
            Some(store) => store.recorded(),
            None => Recorded::Buffered,
        }
    }

    /// Counts and audits a refused retained message (`retained_refused`).
    fn retained_refused(&self, info: &ConnInfo, who: &Identity, topic: &str, why: Refusal) {
        self.metrics.retained_refused(why.label());
        tracing::debug!(topic, reason = why.label(), "retained message refused");
        if let Some(audit) = &self.audit {
            audit.event(
                "retained_refused",
                &info.who(Some(&who.client_id), who.username.as_deref()),
                &[("topic", topic.into()), ("reason", why.label().into())],
            );
        }
    }

    /// Drops a disconnected session's state in the router: a clean link under the same
    /// router client id, closed at once. The caller holds the router client id
    /// (`sessions.rs`), so no live connection is taken over inside the router.
    pub async fn discard_session(&self, router_id: &str) {
        self.sessions.forget(router_id);
        if let Ok((mut tx, _rx, _ack)) = self.router.connect(router_id.to_string(), true).await {
            let bye = rumqttd::protocol::Packet::Disconnect(
                rumqttd::protocol::Disconnect {
                    reason_code: rumqttd::protocol::DisconnectReasonCode::NormalDisconnection,
                },
                None,
            );
            let _ = futures_util::FutureExt::now_or_never(tx.send(bye));
        }
    }

    /// Expires a disconnected session after `after` (MQTT 5 session expiry, capped by
    /// `limits.max_session_expiry`; 3.1.1 persistent sessions after the cap).
    pub fn expire_session_after(self: &Arc<Self>, router_id: &str, after: Duration) {
        let shared = self.clone();
        let key = router_id.to_string();
        // The lock is held until the timer is registered, so even a zero delay finds it.
        let Ok(mut timers) = self.session_timers.lock() else {
            return;
        };
        let task = tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let still_due = shared
                .session_timers
                .lock()
                .map(|mut t| t.remove(&key).is_some())
                .unwrap_or(false);
            // A client that is back holds the id: its session is not expired.
            if let (true, Some(_hold)) = (still_due, shared.sessions.try_hold(&key)) {
                shared.discard_session(&key).await;
            }
        });
        if let Some(old) = timers.insert(router_id.to_string(), task.abort_handle()) {
            old.abort();
        }
    }

    /// The session's client is back: its expiry is off.
    pub fn cancel_session_expiry(&self, router_id: &str) {
        if let Ok(mut timers) = self.session_timers.lock() {
            if let Some(task) = timers.remove(router_id) {
                task.abort();
            }
        }
    }

    /// A client reconnected before its will delay ran out: the will is not sent.
    pub fn cancel_delayed_will(&self, router_id: &str) {
        if let Ok(mut wills) = self.delayed_wills.lock() {
            if let Some(task) = wills.remove(router_id) {
                task.abort();
            }
        }
    }
}

/// A broker whose listeners are bound; `serve` runs it.
pub struct Broker {
    shared: Arc<Shared>,
    listeners: Vec<Bound>,
    tls: Vec<Arc<TlsSetup>>,
    shutdown_tx: watch::Sender<bool>,
    metrics_addr: Option<SocketAddr>,
    metrics_task: Option<tokio::task::JoinHandle<()>>,
}

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not bind (address in use, permission).
    #[error("listener {name}: cannot bind {addr}: {source}")]
    Bind {
        name: String,
        addr: String,
        source: std::io::Error,
    },
    /// TLS material could not be loaded.
    #[error("listener {name}: {reason}")]
    Tls { name: String, reason: String },
    /// The password or ACL file could not be loaded.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The router or its internal link could not start (out of threads or memory).
    #[error("{0}")]
    Router(String),
    /// The retained store could not be opened (wrong key, tampering, permissions).
    #[error(transparent)]
    Retained(#[from] RetainedError),
    /// The audit log cannot be opened for appending (its folder is missing, permissions).
    #[error("audit log {}: {source}", path.display())]
    Audit {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// The router died or stopped answering while serving (`run` only; see
    /// [`Broker::serve`]): the process should exit so its supervisor restarts it.
    #[error("{0}; exiting so the service manager restarts moatmq")]
    RouterFailed(#[from] RouterFailure),
}

impl StartError {
    /// Whether the configuration or a file it names is at fault, so that starting again
    /// without changing them cannot help (`moatmq` exits 64, not 1, and systemd's
    /// `RestartPreventExitStatus=64` does not restart it). A port in use or a router that
    /// could not start is a runtime failure.
    pub fn is_config(&self) -> bool {
        !matches!(
            self,
            StartError::Bind { .. } | StartError::Router(_) | StartError::RouterFailed(_)
        )
    }
}

impl Broker {
    /// Starts the router and binds every listener; nothing is accepted until `serve`.
    pub async fn start(config: Config) -> Result<Broker, StartError> {
        let metrics = Metrics::new();
        let policy = Policy::load(&config, metrics.password_checks.clone())?;
        let audit = match &config.audit {
            Some(a) => {
                let path = config.resolve(&a.path);
                Some(
                    AuditLog::open(path.clone())
                        .map_err(|source| StartError::Audit { path, source })?,
                )
            }
            None => None,
        };
        // Health endpoints come up first so /readyz can say "not ready" while the
        // retained store loads.
        let mut metrics_addr = None;
        let metrics_task = match &config.metrics {
            Some(m) => {
                let socket = tokio::net::TcpListener::bind(&m.bind)
                    .await
                    .map_err(|source| StartError::Bind {
                        name: "metrics".into(),
                        addr: m.bind.clone(),
                        source,
                    })?;
                metrics_addr = socket.local_addr().ok();
                Some(tokio::spawn(crate::metrics::serve(socket, metrics.clone())))
            }
            None => None,
        };
        let router = RouterHandle::start(
            config.limits.max_connections,
            config.limits.max_queued_bytes,
        )
        .map_err(StartError::Router)?;
        let quota = config.retained.as_ref().map_or(
            moatmq_store::StoreLimits {
                max_messages: moatmq_config::DEFAULT_RETAINED_MAX_MESSAGES,
                max_bytes: moatmq_config::DEFAULT_RETAINED_MAX_BYTES,
                max_messages_per_user: moatmq_config::DEFAULT_RETAINED_MAX_MESSAGES_PER_USER,
                max_bytes_per_user: moatmq_config::DEFAULT_RETAINED_MAX_BYTES_PER_USER,
            },
            |r| moatmq_store::StoreLimits {
                max_messages: r.max_messages,
                max_bytes: r.max_bytes,
                max_messages_per_user: r.max_messages_per_user,
                max_bytes_per_user: r.max_bytes_per_user,
            },
        );
        let retained_index = RetainedIndex::new(quota);
        // The store loads before any listener binds: a broker that cannot read its
        // retained messages does not start.
        let retained = match &config.retained {
            Some(r) => Some(RetainedStore::start(
                &config,
                r,
                &retained_index,
                metrics.clone(),
            )?),
            None => None,
        };
        metrics.retained_messages.set(retained_index.len() as i64);
        let conn_limiter = ConnectionLimiter::new(
            config.rate_limit.connections_per_second,
            config.rate_limit.connection_burst,
        );
        let admission = Admission::new(
            config.limits.connections_per_address(),
            config.limits.max_pending_per_address,
        );
        let (shutdown_tx, shutdown) = watch::channel(false);
        let mut listeners = Vec::new();
        for l in &config.listener {
            listeners.push(bind(&config, l).await?);
        }
        for l in config
            .listener
            .iter()
            .filter(|l| config.anonymous_allowed(l))
        {
            warn!(listener = %l.name, "{}", anonymous_warning(l));
        }
        let shared = Arc::new(Shared {
            config,
            router,
            policy,
            metrics,
            audit,
            conn_limiter,
            admission,
            handshake_log: HandshakeLog::default(),
            refusal_log: HandshakeLog::default(),
            retained,
            retained_index,
            shutdown,
            delayed_wills: Mutex::new(HashMap::new()),
            session_timers: Mutex::new(HashMap::new()),
            sessions: Sessions::default(),
        });
        let tls = listeners.iter().filter_map(Bound::tls).collect();
        Ok(Broker {
            shared,
            listeners,
            tls,
            shutdown_tx,
            metrics_addr,
            metrics_task,
        })
    }

    /// Address of the metrics endpoint, when `[metrics]` is configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Addresses actually bound, by listener name (ephemeral ports resolved).
    pub fn local_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.listeners
            .iter()
            .map(|l| (l.name().to_string(), l.local_addr()))
            .collect()
    }

    /// A handle that reloads password file, ACL and TLS material (what SIGHUP does).
    pub fn reloader(&self) -> Reloader {
        Reloader {
            shared: self.shared.clone(),
            tls: self.tls.clone(),
        }
    }

    /// Serves until `stop` resolves, then shuts down gracefully. If the router dies or
    /// stops answering first, health and readiness turn 503 at once and this returns the
    /// failure after flushing the retained store (bounded), without waiting for clients.
    pub async fn serve(
        self,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<(), RouterFailure> {
        // The watchdog threads end with this future, however it ends (also when a
        // caller drops it).
        let _watchdog = StopWatchdog(self.shared.router.clone());
        let failed = Arc::new(tokio::sync::Notify::new());
        let failure = Arc::new(Mutex::new(None));
        {
            let (failed, failure, metrics) =
                (failed.clone(), failure.clone(), self.shared.metrics.clone());
            // Runs on the monitor thread: the async workers may be blocked by then.
            self.shared.router.watch(move |why| {
                metrics
                    .router_ok
                    .store(false, std::sync::atomic::Ordering::Release);
                metrics
                    .ready
                    .store(false, std::sync::atomic::Ordering::Release);
                tracing::error!(
                    "router failed: {why}; exiting so the service manager restarts moatmq"
                );
                if let Ok(mut f) = failure.lock() {
                    *f = Some(why);
                }
                failed.notify_one();
            });
        }
        #[cfg(feature = "test-hooks")]
        if let Ok(fault) = std::env::var("MOATMQ_TEST_ROUTER_FAULT") {
            let fault = match fault.as_str() {
                "kill" => Some(crate::router::RouterFault::Kill),
                "wedge" => Some(crate::router::RouterFault::Wedge),
                _ => None,
            };
            if let Some(fault) = fault {
                self.shared.router.inject(fault);
            }
        }
        let slots = Arc::new(tokio::sync::Semaphore::new(
            self.shared.config.limits.max_connections,
        ));
        let mut tasks = tokio::task::JoinSet::new();
        for l in self.listeners {
            info!(listener = l.name(), addr = %l.local_addr(), "listening");
            tasks.spawn(l.accept_loop(self.shared.clone(), slots.clone()));
        }
        // Not ready if the router already failed (the monitor cleared both flags).
        let router_ok = self
            .shared
            .metrics
            .router_ok
            .load(std::sync::atomic::Ordering::Acquire);
        self.shared
            .metrics
            .ready
            .store(router_ok, std::sync::atomic::Ordering::Release);
        tokio::select! {
            _ = stop => {}
            _ = failed.notified() => {
                let why = failure
                    .lock()
                    .ok()
                    .and_then(|mut f| f.take())
                    .unwrap_or(RouterFailure::Died);
                let _ = self.shutdown_tx.send(true);
                tasks.abort_all();
                // Gateways are not awaited: their sends may block on a wedged router.
                if let Some(store) = &self.shared.retained {
                    let store = store.clone();
                    let flush = tokio::task::spawn_blocking(move || store.shutdown());
                    if tokio::time::timeout(FAILED_FLUSH_WAIT, flush).await.is_err() {
                        warn!("retained store flush did not finish in time");
                    }
                }
                if let Some(task) = self.metrics_task {
                    // The endpoints keep answering 503 until the process exits.
                    drop(task);
                }
                return Err(why);
            }
        }
        info!("shutting down");
        self.shared
            .metrics
            .ready
            .store(false, std::sync::atomic::Ordering::Release);
        let _ = self.shutdown_tx.send(true);
        tasks.abort_all();
        // Let gateways say goodbye: wait until every connection slot is free again.
        let all = self.shared.config.limits.max_connections as u32;
        let _ = tokio::time::timeout(Duration::from_secs(5), slots.acquire_many(all)).await;
        if let Some(store) = &self.shared.retained {
            let store = store.clone();
            let _ = tokio::task::spawn_blocking(move || store.shutdown()).await;
        }
        if let Some(task) = self.metrics_task {
            task.abort();
        }
        Ok(())
    }

    /// Injects a fault into the router (supervision tests).
    #[cfg(feature = "test-hooks")]
    #[doc(hidden)]
    pub fn inject_router_fault(&self, fault: crate::router::RouterFault) {
        self.shared.router.inject(fault);
    }
}

/// The start-up warning for a listener that lets anonymous clients in. A plaintext one
/// on a non-loopback address (e.g. `0.0.0.0`) gets its own: anyone who reaches the
/// address reads and writes without a password or certificate, in clear text.
fn anonymous_warning(l: &moatmq_config::Listener) -> String {
    let exposed = l
        .bind
        .parse::<SocketAddr>()
        .is_ok_and(|a| !a.ip().is_loopback());
    if exposed && l.tls.is_none() {
        format!(
            "listener {} on {} accepts anonymous clients without TLS on a non-loopback \
             address: anyone who can reach it may publish and subscribe, in clear text",
            l.name, l.bind
        )
    } else {
        format!("anonymous clients are allowed on listener {}", l.name)
    }
}

/// Stops the router watchdog when dropped.
struct StopWatchdog(RouterHandle);

impl Drop for StopWatchdog {
    fn drop(&mut self) {
        self.0.stop_watchdog();
    }
}

/// How long a failed broker waits for the retained store's final flush.
const FAILED_FLUSH_WAIT: Duration = Duration::from_secs(2);

/// Reloads what SIGHUP reloads.
#[derive(Clone)]
pub struct Reloader {
    shared: Arc<Shared>,
    tls: Vec<Arc<TlsSetup>>,
}

impl Reloader {
    /// Re-reads password file, ACL file and TLS certificates; returns the errors (the
    /// previous version of each failed file stays in force).
    pub fn reload(&self) -> Vec<String> {
        let mut errors = self.shared.policy.reload();
        if let Some(audit) = &self.shared.audit {
            if let Err(e) = audit.reopen() {
                errors.push(format!("audit log: {e}"));
            }
        }
        for tls in &self.tls {
            if let Err(e) = tls.reload() {
                errors.push(format!("{e} (previous certificates stay in force)"));
            }
        }
        for e in &errors {
            tracing::error!("reload: {e}");
        }
        if let Some(audit) = &self.shared.audit {
            let errs: Vec<serde_json::Value> = errors.iter().map(|e| e.as_str().into()).collect();
            audit.global("config_reload", &[("errors", errs.into())]);
        }
        info!(errors = errors.len(), "configuration reloaded");
        errors
    }
}

/// Runs the broker until SIGTERM or SIGINT; SIGHUP reloads.
pub async fn run(config: Config) -> Result<(), StartError> {
    let broker = Broker::start(config).await?;
    let reloader = broker.reloader();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            reloader.reload();
        }
    });
    broker.serve(shutdown_signal()).await?;
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::anonymous_warning;
    use moatmq_config::Config;
    use std::path::Path;

    #[test]
    fn exposed_plaintext_anonymous_listener_gets_its_own_warning() {
        let config = Config::parse(
            Path::new("broker.toml"),
            "[[listener]]\nname = \"open\"\nbind = \"0.0.0.0:1883\"\nallow_anonymous = true\n\
             [[listener]]\nname = \"v6\"\nbind = \"[::]:1884\"\nallow_anonymous = true\n\
             [[listener]]\nname = \"local\"\nbind = \"127.0.0.1:1885\"\nallow_anonymous = true\n",
        )
        .unwrap();
        let warnings: Vec<String> = config.listener.iter().map(anonymous_warning).collect();
        assert_eq!(
            warnings[0],
            "listener open on 0.0.0.0:1883 accepts anonymous clients without TLS on a \
             non-loopback address: anyone who can reach it may publish and subscribe, in clear text"
        );
        assert!(warnings[1].starts_with("listener v6 on [::]:1884 accepts anonymous"));
        assert_eq!(
            warnings[2],
            "anonymous clients are allowed on listener local"
        );
    }
}
