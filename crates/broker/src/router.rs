//! The rumqttd router and the links into it.
//!
//! We start `rumqttd::Router` ourselves and never use its listeners. The router's event
//! sender has a type rumqttd does not export, so it lives inside a closure: that closure
//! is the only way the rest of the broker reaches the router.
//!
//! `LinkBuilder::build` blocks its thread until the router answers, and the router never
//! answers a connection it refuses (a full slab, a client id it dislikes): it runs on the
//! blocking pool under a timeout, and the gateway only hands it client ids it has encoded
//! to be acceptable (see [`router_client_id`]).
//!
//! Supervision: rumqttd gives no handle on its thread. A ping thread sends PINGREQ on a
//! link of its own every [`PING_EVERY`] and notes each PINGRESP; a monitor thread that
//! never blocks reads that note and whether the router's event channel has lost its
//! receiver (the thread ended, e.g. by a panic). A router that is gone, or has not
//! answered for [`WEDGED_AFTER`], is failed: `/healthz` and `/readyz` answer 503 and
//! `Broker::serve` returns an error (see `server.rs`). Threads, not tasks: a wedged
//! router blocks every `LinkTx::send` once its channel is full, async workers included.

use crate::codec::make_router_publish;
use crate::spare_links::{LinkName, SpareLinks};
use bytes::Bytes;
use futures_util::FutureExt;
use rumqttd::local::{LinkBuilder, LinkError, LinkRx, LinkTx};
use rumqttd::protocol::{Packet, PingReq, PublishProperties, QoS};
use rumqttd::{Notification, Router, RouterConfig};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long we wait for the router to accept a new link before giving up.
const LINK_TIMEOUT: Duration = Duration::from_secs(10);
/// The watchdog's ping interval.
pub const PING_EVERY: Duration = Duration::from_millis(500);
/// A router that has not answered a ping for this long is wedged. Its loop answers
/// pings between batches of at most 500 events, far below a second even in debug builds.
pub const WEDGED_AFTER: Duration = Duration::from_secs(3);
/// How often the monitor looks.
const MONITOR_EVERY: Duration = Duration::from_millis(100);
// rumqttd's LinkError is boxed: the type itself is large.
type BuildLink =
    dyn Fn(&str, bool) -> Result<(LinkTx, LinkRx, Notification), Box<LinkError>> + Send + Sync;

/// A running router.
#[derive(Clone)]
pub struct RouterHandle {
    build: Arc<BuildLink>,
    /// Clean links built ahead for connections that logged in without one.
    spares: Arc<SpareLinks>,
    internal: Arc<Mutex<InternalLink>>,
    watch: Arc<Watch>,
    #[cfg(feature = "test-hooks")]
    fake_tx: Arc<dyn Fn(usize) -> LinkTx + Send + Sync>,
}

/// What the watchdog knows of the router.
struct Watch {
    /// The router's event channel has no receiver: its thread has ended.
    gone: Box<dyn Fn() -> bool + Send + Sync>,
    started: Instant,
    /// Milliseconds after `started` of the last PINGRESP.
    last_pong_ms: AtomicU64,
    /// Set when the broker stops: the watchdog threads end.
    stop: AtomicBool,
}

/// Why the router is failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouterFailure {
    /// The router thread ended (a panic: rumqttd's loop never returns otherwise).
    #[error("the router thread died")]
    Died,
    /// The router did not answer the watchdog's ping for this long.
    #[error("the router stopped answering ({0:?} without a ping answer)")]
    Wedged(Duration),
}

/// The broker's own link: publishes wills.
struct InternalLink {
    tx: LinkTx,
    next_pkid: u16,
}

impl RouterHandle {
    /// Starts the router thread. `max_connections` is our own limit; the router gets room
    /// for the overlap while old links are being torn down.
    ///
    /// The router keeps every message in an in-memory log per subscribed filter, for
    /// subscribers that have not read it yet (offline persistent sessions, slow readers).
    /// `max_queued_bytes` bounds that log: four segments of a quarter each (the active
    /// segment comes on top); past it the oldest segment is dropped. rumqttd's own default
    /// is ten segments of 100 MiB, about 1 GiB per filter.
    pub fn start(
        max_connections: usize,
        max_queued_bytes: usize,
    ) -> Result<RouterHandle, RouterError> {
        const SEGMENTS: usize = 4;
        let config = RouterConfig {
            max_connections: max_connections.saturating_mul(2).saturating_add(64),
            max_outgoing_packet_count: 200,
            // rumqttd refuses segments under 1 KiB.
            max_segment_size: (max_queued_bytes / SEGMENTS).max(1024),
            max_segment_count: SEGMENTS,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        };
        let router_tx = Router::new(0, config).spawn();
        let probe = router_tx.clone();
        let watch = Arc::new(Watch {
            gone: Box::new(move || probe.is_disconnected()),
            started: Instant::now(),
            last_pong_ms: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        #[cfg(feature = "test-hooks")]
        let fake_tx = {
            let router_tx = router_tx.clone();
            Arc::new(move |id: usize| {
                let buffer = Arc::new(parking_lot::Mutex::new(std::collections::VecDeque::new()));
                LinkTx::new(id, router_tx.clone(), buffer)
            })
        };
        let build: Arc<BuildLink> = Arc::new(move |client_id: &str, clean: bool| {
            // Dynamic filters on: otherwise the router disconnects anyone publishing to a
            // topic nobody subscribed to yet.
            LinkBuilder::new(client_id, router_tx.clone())
                .clean_session(clean)
                .dynamic_filters(true)
                .build()
                .map_err(Box::new)
        });
        let (tx, mut rx, _ack) =
            build("moatmq-internal", true).map_err(|source| RouterError::Link {
                which: "the broker's own link",
                source,
            })?;
        // Drains the internal link's acks (it publishes QoS 2 as QoS 1: no handshake).
        let internal = Arc::new(Mutex::new(InternalLink { tx, next_pkid: 0 }));
        std::thread::Builder::new()
            .name("moatmq-internal-link".into())
            .spawn(move || while let Ok(Some(_)) = rx.recv() {})
            .map_err(|source| RouterError::Thread {
                which: "the internal link thread",
                source,
            })?;
        let (ping_tx, ping_rx, _ack) =
            build("moatmq-watchdog", true).map_err(|source| RouterError::Link {
                which: "the watchdog's link",
                source,
            })?;
        let pinger = watch.clone();
        std::thread::Builder::new()
            .name("moatmq-router-ping".into())
            .spawn(move || ping_loop(ping_tx, ping_rx, &pinger))
            .map_err(|source| RouterError::Thread {
                which: "the router watchdog thread",
                source,
            })?;
        let spares = SpareLinks::start(build.clone()).map_err(|source| RouterError::Thread {
            which: "the spare links thread",
            source,
        })?;
        Ok(RouterHandle {
            build,
            spares,
            internal,
            watch,
            #[cfg(feature = "test-hooks")]
            fake_tx,
        })
    }

    /// The router's state now: `Err` once it died or stopped answering.
    pub fn health(&self) -> Result<(), RouterFailure> {
        if (self.watch.gone)() {
            return Err(RouterFailure::Died);
        }
        let now = self.watch.started.elapsed();
        let pong = Duration::from_millis(self.watch.last_pong_ms.load(Ordering::Acquire));
        match now.saturating_sub(pong) {
            silent if silent > WEDGED_AFTER => Err(RouterFailure::Wedged(silent)),
            _ => Ok(()),
        }
    }

    /// Starts the monitor thread: `on_failure` runs once, from that thread, when the
    /// router fails. It ends with [`RouterHandle::stop_watchdog`].
    pub fn watch(&self, on_failure: impl FnOnce(RouterFailure) + Send + 'static) {
        let handle = self.clone();
        let started = std::thread::Builder::new()
            .name("moatmq-router-watch".into())
            .spawn(move || loop {
                std::thread::sleep(MONITOR_EVERY);
                if handle.watch.stop.load(Ordering::Acquire) {
                    return;
                }
                if let Err(failure) = handle.health() {
                    on_failure(failure);
                    return;
                }
            });
        if let Err(e) = started {
            tracing::error!(error = %e, "cannot start the router monitor thread");
        }
    }

    /// Ends the watchdog threads and the spare links' (the broker is stopping).
    pub fn stop_watchdog(&self) {
        self.watch.stop.store(true, Ordering::Release);
        self.spares.stop();
    }

    /// Opens a link for a client; runs the blocking handshake off the async workers.
    pub async fn connect(
        &self,
        router_client_id: String,
        clean: bool,
    ) -> Result<(LinkTx, LinkRx, Notification), ConnectError> {
        let build = self.build.clone();
        let job = tokio::task::spawn_blocking(move || build(&router_client_id, clean));
        match tokio::time::timeout(LINK_TIMEOUT, job).await {
            Ok(Ok(Ok(link))) => Ok(link),
            Ok(Ok(Err(e))) => Err(ConnectError::Link(e)),
            Ok(Err(_)) => Err(ConnectError::TaskFailed),
            Err(_) => Err(ConnectError::Timeout),
        }
    }

    /// A clean link under a pool name, for a connection that logged in without one: a
    /// spare at once if one is ready, else built now (`spare_links.rs`).
    pub async fn lazy_link(&self) -> Result<(LinkTx, LinkRx, LinkName), ConnectError> {
        if let Some(spare) = self.spares.take() {
            return Ok(spare);
        }
        let (name, held) = self.spares.new_name();
        let (tx, rx, _connack) = self.connect(name, true).await?;
        Ok((tx, rx, held))
    }

    /// Publishes a message as the broker itself (wills). The router keeps no retained
    /// messages, moatmq serves them (`retained_index.rs`): `retain` only reaches
    /// Retain As Published subscribers (`origin.rs`).
    pub fn publish(
        &self,
        topic: Bytes,
        payload: Bytes,
        qos: QoS,
        retain: bool,
        properties: Option<PublishProperties>,
    ) {
        self.publish_as(topic, payload, qos, retain, properties, None);
    }

    /// [`Router::publish`] of a message with its place `id` in the cluster's transfer
    /// stream (`origin.rs`).
    pub fn publish_as(
        &self,
        topic: Bytes,
        payload: Bytes,
        qos: QoS,
        retain: bool,
        mut properties: Option<PublishProperties>,
        id: Option<crate::origin::Transfer>,
    ) {
        let published = crate::origin::Published {
            qos,
            retain,
            connection: None,
            id,
        };
        crate::origin::mark(&mut properties, &published);
        let Ok(mut link) = self.internal.lock() else {
            return;
        };
        let pkid = match qos {
            QoS::AtMostOnce => 0,
            _ => {
                link.next_pkid = link.next_pkid.checked_add(1).unwrap_or(1);
                link.next_pkid
            }
        };
        // QoS 2 goes in as QoS 1: rumqttd would keep it out of its log until our PUBREL,
        // and a persistent subscriber's connection ending meanwhile would miss it in
        // what it collects from the router. Subscribers get the published QoS
        // (`origin.rs`).
        let qos = match qos {
            QoS::ExactlyOnce => QoS::AtLeastOnce,
            other => other,
        };
        let publish = make_router_publish(topic, payload, qos, pkid);
        let _ = link
            .tx
            .send(Packet::Publish(publish, properties))
            .now_or_never();
    }
}

/// Pings the router on the watchdog's own link and notes every answer. `LinkTx::send`
/// blocks while the router's channel is full: then the notes stop, which is the point.
fn ping_loop(mut tx: LinkTx, mut rx: LinkRx, watch: &Watch) {
    loop {
        if watch.stop.load(Ordering::Acquire) {
            return;
        }
        let deadline = std::time::Instant::now() + PING_EVERY;
        if !matches!(
            tx.send(Packet::PingReq(PingReq)).now_or_never(),
            Some(Ok(_))
        ) {
            return; // the router is gone
        }
        // An error is the deadline passing (or the router gone, seen on the next send).
        while let Ok(n) = rx.recv_deadline(deadline) {
            if let Some(Packet::PingResp(_)) = n.and_then(Option::<Packet>::from) {
                let at = u64::try_from(watch.started.elapsed().as_millis()).unwrap_or(u64::MAX);
                watch.last_pong_ms.store(at, Ordering::Release);
            }
        }
        std::thread::sleep(deadline.saturating_duration_since(std::time::Instant::now()));
    }
}

/// Faults a test can inject into the real router (feature `test-hooks`).
#[cfg(feature = "test-hooks")]
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouterFault {
    /// Panics the router thread with rumqttd's "group must exists" sequence, sent on raw
    /// links that bypass the gateway's fences.
    Kill,
    /// Blocks the router thread for good on a link buffer's lock.
    Wedge,
}

#[cfg(feature = "test-hooks")]
impl RouterHandle {
    #[doc(hidden)]
    pub fn inject(&self, fault: RouterFault) {
        use rumqttd::protocol::{Filter, RetainForwardRule, Subscribe};
        let build = self.build.clone();
        let fake_tx = self.fake_tx.clone();
        let _ = std::thread::Builder::new()
            .name("moatmq-test-fault".into())
            .spawn(move || match fault {
                RouterFault::Kill => {
                    let Ok((mut sub, mut sub_rx, _)) = build("hook-sub", false) else {
                        return;
                    };
                    let filter = Filter {
                        path: "$share/hook/hook/#".into(),
                        qos: QoS::AtLeastOnce,
                        nolocal: false,
                        preserve_retain: false,
                        retain_forward_rule: RetainForwardRule::Never,
                    };
                    let subscribe = Subscribe {
                        pkid: 1,
                        filters: vec![filter],
                    };
                    let _ = sub.send(Packet::Subscribe(subscribe, None)).now_or_never();
                    std::thread::sleep(Duration::from_millis(200));
                    let Ok((mut publ, _publ_rx, _)) = build("hook-pub", true) else {
                        return;
                    };
                    let publish = make_router_publish(
                        Bytes::from_static(b"hook/x"),
                        Bytes::from_static(b"x"),
                        QoS::AtLeastOnce,
                        1,
                    );
                    let _ = publ.send(Packet::Publish(publish, None)).now_or_never();
                    let deadline = std::time::Instant::now() + Duration::from_secs(5);
                    while let Ok(n) = sub_rx.recv_deadline(deadline) {
                        if matches!(n, Some(Notification::Forward(_))) {
                            break;
                        }
                    }
                    let bye = Packet::Disconnect(
                        rumqttd::protocol::Disconnect {
                            reason_code:
                                rumqttd::protocol::DisconnectReasonCode::NormalDisconnection,
                        },
                        None,
                    );
                    let _ = sub.send(bye).now_or_never();
                }
                RouterFault::Wedge => {
                    let Ok((tx, rx, _)) = build("hook-wedge", true) else {
                        return;
                    };
                    // The router takes this lock to read the link's packets: it blocks
                    // there as soon as it is told there is data.
                    let _held = tx.buffer();
                    let mut fake = fake_tx(rx.id());
                    let _ = fake.send(Packet::PingReq(PingReq)).now_or_never();
                    loop {
                        std::thread::park();
                    }
                }
            });
    }
}

/// Why the router could not start.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// The router refused one of the broker's own links.
    #[error("the router refused {which}: {source}")]
    Link {
        which: &'static str,
        source: Box<LinkError>,
    },
    /// A thread could not be started (out of threads or memory).
    #[error("cannot start {which}: {source}")]
    Thread {
        which: &'static str,
        source: std::io::Error,
    },
}

/// Why a link could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The router refused or failed the link.
    #[error("router refused the link: {0}")]
    Link(Box<LinkError>),
    /// The blocking task opening the link failed (out of threads).
    #[error("the task opening the link failed")]
    TaskFailed,
    /// The router did not answer in time (it is overloaded or stuck).
    #[error("router did not answer in time")]
    Timeout,
}

/// The client id the router sees: sessions are namespaced by identity, so two users with
/// the same client id get two sessions and neither can take over or read the other's.
/// Characters the router refuses (`/ + # $`) and our separators are percent-escaped.
pub fn router_client_id(username: Option<&str>, client_id: &str) -> String {
    let mut out = String::with_capacity(client_id.len() + 16);
    push_identity(&mut out, username);
    for c in client_id.chars() {
        match c {
            '%' | '/' | '+' | '#' | '$' | '.' => out.push_str(&format!("%{:02X}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// `-:` for anonymous clients, `u<hex of the username>:` otherwise: no two identities
/// share a prefix, and the first `:` ends it.
fn push_identity(out: &mut String, username: Option<&str>) {
    match username {
        None => out.push('-'),
        Some(u) => {
            out.push('u');
            for b in u.bytes() {
                out.push_str(&format!("{b:02x}"));
            }
        }
    }
    out.push(':');
}

/// The filter the router sees. rumqttd keys shared-subscription groups by name alone, so
/// `$share/workers/...` of two users would be one group (each stalling or taking the
/// other's messages): the group name is namespaced by identity, as router client ids
/// are. With `[cluster]` (`groups`), a shared subscription gets the cluster's form
/// instead (`cluster/groups.rs`), which only the group's own copies reach. Other
/// filters pass unchanged.
pub fn router_filter(
    groups: Option<&dyn GroupFilters>,
    username: Option<&str>,
    filter: &str,
) -> String {
    match split_shared(filter) {
        Some((group, inner)) => {
            let group = namespaced_group(username, group);
            match groups {
                Some(groups) => groups.router_filter(&group, inner),
                None => format!("$share/{group}/{inner}"),
            }
        }
        None => filter.to_string(),
    }
}

/// How shared subscriptions enter the router when groups span the nodes of a cluster
/// (`cluster/groups.rs`).
pub trait GroupFilters {
    /// The router's filter for a member of the namespaced `group` on `filter`.
    fn router_filter(&self, group: &str, filter: &str) -> String;
}

/// The group name and inner filter of `$share/<group>/<filter>`.
pub fn split_shared(filter: &str) -> Option<(&str, &str)> {
    filter
        .strip_prefix("$share/")
        .and_then(|rest| rest.split_once('/'))
}

/// A shared group's name qualified by its identity: no two identities share one.
pub fn namespaced_group(username: Option<&str>, group: &str) -> String {
    let mut out = String::with_capacity(group.len() + 16);
    push_identity(&mut out, username);
    out.push_str(group);
    out
}

#[cfg(test)]
mod tests {
    use super::{router_client_id, router_filter as cluster_filter};

    fn router_filter(user: Option<&str>, filter: &str) -> String {
        cluster_filter(None, user, filter)
    }

    #[test]
    fn shared_groups_are_namespaced_by_identity() {
        assert_eq!(router_filter(Some("al"), "a/#"), "a/#");
        assert_eq!(
            router_filter(Some("al"), "$share/g/a/#"),
            "$share/u616c:g/a/#"
        );
        assert_eq!(router_filter(None, "$share/g/a"), "$share/-:g/a");
        assert_ne!(
            router_filter(Some("a"), "$share/g/x"),
            router_filter(Some("b"), "$share/g/x")
        );
        // A group name cannot forge another identity's prefix.
        assert_ne!(
            router_filter(Some("a"), "$share/u62:g/x"),
            router_filter(Some("b"), "$share/g/x")
        );
    }

    #[test]
    fn router_ids_are_namespaced_and_safe() {
        assert_eq!(router_client_id(None, "c1"), "-:c1");
        assert_eq!(router_client_id(Some("al"), "c1"), "u616c:c1");
        assert_ne!(
            router_client_id(Some("a"), "x"),
            router_client_id(Some("b"), "x")
        );
        let id = router_client_id(Some("a"), "x/+#$%.y");
        assert!(!id.contains(['/', '+', '#', '$']), "{id}");
        assert_ne!(router_client_id(None, "%2F"), router_client_id(None, "/"));
    }
}
