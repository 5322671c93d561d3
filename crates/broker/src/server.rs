//! Wiring: start the router, bind every listener, serve until SIGTERM/SIGINT.
//!
//! Shutdown: listeners stop accepting, every gateway is told (MQTT 5 clients receive
//! DISCONNECT 0x8B), and `run` returns once connections have closed or a grace period
//! has passed.

use crate::admission::Admission;
use crate::audit::AuditLog;
use crate::error::BrokerError;
use crate::event::Event;
use crate::handshake_log::HandshakeLog;
use crate::listener::{bind, Bound};
use crate::metrics::{Metrics, Observed};
use crate::policy::Policy;
use crate::ratelimit::ConnectionLimiter;
use crate::retained::RetainedStore;
use crate::retained_index::RetainedIndex;
use crate::router::{RouterFailure, RouterHandle};
use crate::sessions::Sessions;
use crate::shared::Shared;
use crate::tls::TlsSetup;
use moatmq_config::Config;
use moatmq_store::RetainedSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tracing::{info, warn};

/// A broker whose listeners are bound; `serve` runs it.
pub struct Broker {
    shared: Arc<Shared>,
    /// The cluster subscription, taken in by `serve`.
    cluster_input: Option<crate::cluster::Input>,
    listeners: Vec<Bound>,
    tls: Vec<Arc<TlsSetup>>,
    shutdown_tx: watch::Sender<bool>,
    metrics_addr: Option<SocketAddr>,
    metrics_task: Option<tokio::task::JoinHandle<()>>,
}

impl Broker {
    /// Starts the router and binds every listener; nothing is accepted until `serve`.
    pub async fn start(config: Config) -> Result<Broker, BrokerError> {
        let metrics = Metrics::new();
        let policy = Policy::load(&config, metrics.password_checks.clone())?;
        let audit = match &config.audit {
            Some(a) => {
                let path = config.resolve(&a.path);
                Some(
                    AuditLog::open(path.clone())
                        .map_err(|source| BrokerError::Audit { path, source })?,
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
                    .map_err(|source| BrokerError::Bind {
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
        )?;
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
        // So does the session store: a broker that cannot read its sessions does not start.
        let (durable, loaded) = match crate::durable::open(&config, &metrics)? {
            Some((book, loaded)) => (Some(book), loaded),
            None => (None, Vec::new()),
        };
        // The gauges of state owned elsewhere are read at each scrape; the bounds are fixed.
        metrics.observe(Observed {
            throttle: policy.throttle(),
            retained: RetainedSet::clone(&retained_index),
        });
        metrics.set_bounds(config.limits.max_connections, &quota);
        let conn_limiter = ConnectionLimiter::new(
            config.rate_limit.connections_per_second,
            config.rate_limit.connection_burst,
        );
        let admission = Admission::new(
            config.limits.connections_per_address(),
            config.limits.max_pending_per_address,
        );
        // NATS is connected in the background: a node starts (not ready) while it is away.
        let (cluster, cluster_input) = match &config.cluster {
            Some(c) => {
                let (cluster, input) = crate::cluster::Cluster::connect(
                    &config,
                    c,
                    metrics.clone(),
                    &retained_index,
                    router.clone(),
                )
                .await?;
                // A node whose key does not open the cluster's state does not start.
                cluster.check_key(KEY_CHECK_WAIT).await?;
                (Some(cluster), Some(input))
            }
            None => (None, None),
        };
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
            delayed_wills: Default::default(),
            session_timers: Default::default(),
            sessions: Sessions::default(),
            durable,
            cluster,
            sys: Default::default(),
        });
        crate::session_restore::restore(&shared, loaded).await;
        let tls = listeners.iter().filter_map(Bound::tls).collect();
        Ok(Broker {
            shared,
            cluster_input,
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
        if self.shared.cluster.is_some() {
            let tls = self
                .listeners
                .iter()
                .filter_map(|l| l.tls().map(|t| (l.name().to_string(), t)))
                .collect();
            tasks.spawn(crate::cluster::nodes::run(
                Arc::downgrade(&self.shared),
                tls,
            ));
        }
        for l in self.listeners {
            info!(listener = l.name(), addr = %l.local_addr(), "listening");
            tasks.spawn(l.accept_loop(self.shared.clone(), slots.clone()));
        }
        tasks.spawn(crate::sys::run(self.shared.clone()));
        if let Some(input) = self.cluster_input {
            tasks.spawn(crate::cluster_input::run_input(self.shared.clone(), input));
        }
        if let Some(handoffs) = self.shared.cluster.as_ref().and_then(|c| c.take_handoffs()) {
            tasks.spawn(crate::cluster::handoff::run(self.shared.clone(), handoffs));
            tasks.spawn(crate::cluster::late::run(self.shared.clone()));
            tasks.spawn(crate::cluster::handoff::sweep_expired(self.shared.clone()));
            tasks.spawn(crate::cluster::dead::run(Arc::downgrade(&self.shared)));
            tasks.spawn(crate::cluster::wills::keep(
                Arc::downgrade(&self.shared),
                crate::will::publish_overdue,
            ));
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
                if let Some(book) = &self.shared.durable {
                    if tokio::time::timeout(FAILED_FLUSH_WAIT, book.stop()).await.is_err() {
                        warn!("session store flush did not finish in time");
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
        // After the gateways: each stored its session as disconnected.
        if self.shared.cluster.is_some() {
            match tokio::time::timeout(PARK_WAIT, crate::cluster::handoff::park(&self.shared)).await
            {
                Ok(0) => {}
                Ok(n) => info!(sessions = n, "cluster: sessions parked for other nodes"),
                Err(_) => warn!("cluster: parking sessions did not finish in time"),
            }
        }
        if let Some(book) = &self.shared.durable {
            book.stop().await;
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

/// How long start waits for NATS to say whether this node's key opens the cluster's
/// key marker; past it the node starts (unready) and the check goes on in the background.
const KEY_CHECK_WAIT: Duration = Duration::from_secs(5);

/// How long a cluster node shutting down takes at most to park its persistent sessions
/// for other nodes (`cluster::handoff::park`), within Kubernetes' default 30 s grace.
const PARK_WAIT: Duration = Duration::from_secs(10);

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
        if let Some(cluster) = &self.shared.cluster {
            // The other nodes compare what this one enforces now.
            cluster.settings_changed.notify_one();
        }
        self.shared
            .emit_global(Event::ConfigReload { errors: &errors });
        errors
    }
}

/// Runs the broker until SIGTERM or SIGINT; SIGHUP reloads.
pub async fn run(config: Config) -> Result<(), BrokerError> {
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
