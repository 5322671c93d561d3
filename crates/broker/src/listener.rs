//! Listeners: accept TCP, run TLS and WebSocket handshakes, hand each connection to
//! the gateway on its own task.
//!
//! The accept loop only accepts: handshakes run on the connection's task, so one slow
//! client never stalls a listener (rumqttd's own listener does its TLS handshake
//! inline). `limits.connect_timeout` is one deadline from accept for PROXY header, TLS,
//! WebSocket upgrade and CONNECT together. A connection beyond `limits.max_connections`,
//! or beyond its address's share (see `admission`), is closed at once, before any
//! handshake.

use crate::admission::Slot;
use crate::audit::Who;
use crate::error::BrokerError;
use crate::event::Event;
use crate::forwarded::ForwardedPolicy;
use crate::handshake_log::Verdict;
use crate::policy::ListenerPolicy;
use crate::shared::{ConnInfo, Shared};
use crate::tls::TlsSetup;
use crate::transport::{split_stream, split_tcp, split_ws, BoxStream, Reader, Writer};
use crate::ws_upgrade;
use moatmq_config::{Config, Listener, Protocol};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::error::{Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::handshake::server::Request;
use tracing::{debug, info, warn};

/// A bound listener, not yet accepting.
pub struct Bound {
    socket: TcpListener,
    protocol: Protocol,
    tls: Option<Arc<TlsSetup>>,
    policy: ListenerPolicy,
    trust_proxy_protocol: bool,
    /// `ws` listeners: paths upgrades are accepted on (`"*"` = any).
    ws_paths: Vec<String>,
    /// `ws` listeners: client addresses named by a trusted proxy's header.
    forwarded: Option<ForwardedPolicy>,
}

/// Why a TLS or WebSocket handshake failed.
#[derive(Debug)]
enum HandshakeError {
    /// TLS refused: bad, expired or foreign client certificate, no common protocol.
    Tls(String),
    /// WebSocket upgrade refused: wrong path, no `mqtt` subprotocol, not an upgrade.
    Upgrade(String),
    /// The client left before saying anything (port scans, TCP health checks).
    Silent(String),
}

/// A connection after its TLS and WebSocket handshakes.
struct Handshaken {
    reader: Reader,
    writer: Writer,
    cert_identity: Option<String>,
    /// The client address a trusted proxy's header named.
    forwarded: Option<IpAddr>,
}

/// Loads the TLS material of listener `l`, if it has a `[listener.tls]`.
pub fn tls_for(config: &Config, l: &Listener) -> Result<Option<TlsSetup>, BrokerError> {
    let Some(tls) = &l.tls else {
        return Ok(None);
    };
    TlsSetup::load(config, tls)
        .map(Some)
        .map_err(|source| BrokerError::Tls {
            name: l.name.clone(),
            source,
        })
}

/// Binds a configured listener and loads its TLS material.
pub async fn bind(config: &Config, l: &Listener) -> Result<Bound, BrokerError> {
    let tls = tls_for(config, l)?.map(Arc::new);
    let socket = TcpListener::bind(&l.bind)
        .await
        .map_err(|source| BrokerError::Bind {
            name: l.name.clone(),
            addr: l.bind.clone(),
            source,
        })?;
    Ok(Bound {
        socket,
        protocol: l.protocol,
        tls,
        trust_proxy_protocol: l.trust_proxy_protocol,
        ws_paths: l.ws_paths(),
        forwarded: l.forwarded.as_ref().map(ForwardedPolicy::new),
        policy: ListenerPolicy {
            name: l.name.as_str().into(),
            allow_anonymous: config.anonymous_allowed(l),
        },
    })
}

impl Bound {
    /// The listener's TLS setup, for reloads.
    pub fn tls(&self) -> Option<Arc<TlsSetup>> {
        self.tls.clone()
    }

    pub fn name(&self) -> &str {
        &self.policy.name
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.socket
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Accepts until the task is aborted.
    pub async fn accept_loop(self, shared: Arc<Shared>, slots: Arc<Semaphore>) {
        let this = Arc::new(self);
        loop {
            let (tcp, peer) = match this.socket.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(listener = this.name(), error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                debug!(listener = this.name(), %peer, "connection refused: max_connections reached");
                drop(tcp);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let shared = shared.clone();
            let this = this.clone();
            tokio::spawn(async move {
                let _permit = permit;
                this.serve_one(shared, tcp, peer).await;
            });
        }
    }

    async fn serve_one(&self, shared: Arc<Shared>, mut tcp: TcpStream, mut peer: SocketAddr) {
        // One deadline from accept for PROXY header, TLS, WebSocket upgrade and CONNECT.
        let deadline = Instant::now() + Duration::from_secs(shared.config.limits.connect_timeout);
        if self.trust_proxy_protocol {
            match tokio::time::timeout_at(deadline, crate::proxy::read_header(&mut tcp)).await {
                Ok(Ok(Some(source))) => peer = source,
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    debug!(listener = self.name(), %peer, error = %e, "bad PROXY header");
                    return;
                }
                Err(_) => return,
            }
        }
        // A trusted proxy's connections are counted once its header has named the client;
        // every other connection is refused here, before any handshake work is spent.
        let via_proxy = self.forwarded.as_ref().is_some_and(|f| f.trusts(peer.ip()));
        let slot = match via_proxy {
            true => None,
            false => match self.admit(&shared, peer) {
                Some(slot) => Some(slot),
                None => return,
            },
        };
        let label = crate::metrics::ListenerLabel {
            listener: self.policy.name.to_string(),
        };
        shared.metrics.connections_total.get_or_create(&label).inc();
        let current = shared
            .metrics
            .connections_current
            .get_or_create(&label)
            .clone();
        current.inc();
        self.serve_checked(&shared, tcp, peer, via_proxy, deadline, slot)
            .await;
        current.dec();
    }

    /// A connection slot for `peer`'s address, or `None` (counted, closed) when the
    /// address holds its share already. Refusals are logged and audited at most a few
    /// times per address and minute: a flood of them must not flood the disk.
    fn admit(&self, shared: &Shared, peer: SocketAddr) -> Option<Arc<Slot>> {
        let full = match shared.admission.admit(peer.ip()) {
            Ok(slot) => return Some(Arc::new(slot)),
            Err(full) => full,
        };
        let limit = full.limit();
        let verdict = shared.refusal_log.check(peer.ip());
        match verdict {
            Verdict::Log { suppressed } => {
                info!(listener = self.name(), %peer, limit, suppressed, "connection refused")
            }
            Verdict::StartSuppressing => {
                info!(listener = self.name(), %peer, limit, "connection refused; further refusals of this address are suppressed for 60 s");
            }
            Verdict::Quiet => debug!(listener = self.name(), %peer, limit, "connection refused"),
        }
        let who = Who {
            listener: self.name(),
            peer,
            client_id: None,
            username: None,
        };
        let audited = matches!(verdict, Verdict::Log { .. });
        shared.emit(&who, Event::RateLimited { limit, audited });
        None
    }

    async fn serve_checked(
        &self,
        shared: &Arc<Shared>,
        tcp: TcpStream,
        mut peer: SocketAddr,
        via_proxy: bool,
        deadline: Instant,
        slot: Option<Arc<Slot>>,
    ) {
        let shared = shared.clone();
        let handshake =
            // Boxed: the handshake's state (TLS, WebSocket upgrade) is needed only until it
            // ends, not for the connection's life.
            tokio::time::timeout_at(deadline, Box::pin(self.handshake(&shared, tcp, via_proxy)))
                .await;
        let mut done = match handshake {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => {
                self.log_failure(&shared, peer, e);
                return;
            }
            Err(_) => {
                debug!(listener = self.name(), %peer, "handshake timed out");
                return;
            }
        };
        if let Some(client) = done.forwarded {
            // The proxy's connection port says nothing about the client: 0 = unknown.
            peer = SocketAddr::new(client, 0);
        }
        let slot = match slot {
            Some(slot) => slot,
            None => match self.admit(&shared, peer) {
                Some(slot) => slot,
                None => {
                    done.writer.shutdown().await;
                    return;
                }
            },
        };
        // Counted and audited with the client id once its CONNECT is read (connect.rs).
        let rate_limited = !shared.conn_limiter.allow(peer.ip());
        let info = ConnInfo {
            listener: self.policy.clone(),
            peer,
            cert_identity: done.cert_identity,
            rate_limited,
            deadline,
            slot: Arc::downgrade(&slot),
        };
        if let Err(e) = crate::connect::handle(shared, info, done.reader, done.writer).await {
            debug!(listener = self.name(), %peer, error = %e, "connection ended before CONNACK");
        }
        drop(slot);
    }

    /// Failed handshakes at INFO with peer and reason, at most a few per address and
    /// minute (see `handshake_log`). The reason may quote the client: the log formatter
    /// escapes control characters in every field.
    fn log_failure(&self, shared: &Shared, peer: SocketAddr, e: HandshakeError) {
        let (what, reason) = match e {
            HandshakeError::Silent(reason) => {
                debug!(listener = self.name(), %peer, reason, "client left during the handshake");
                return;
            }
            HandshakeError::Tls(reason) => ("TLS handshake failed", reason),
            HandshakeError::Upgrade(reason) => ("WebSocket upgrade refused", reason),
        };
        match shared.handshake_log.check(peer.ip()) {
            Verdict::Log { suppressed: 0 } => {
                info!(listener = self.name(), %peer, reason, "{what}");
            }
            Verdict::Log { suppressed } => {
                info!(listener = self.name(), %peer, reason, suppressed, "{what} (earlier failures from this address suppressed)");
            }
            Verdict::StartSuppressing => {
                info!(listener = self.name(), %peer, "{what}; further failed handshakes from this address are suppressed for 60 s");
            }
            Verdict::Quiet => debug!(listener = self.name(), %peer, reason, "{what}"),
        }
    }

    /// TLS (if configured) then WebSocket (if configured). `via_proxy`: the peer is a
    /// trusted proxy whose forwarded-address header is read.
    async fn handshake(
        &self,
        shared: &Shared,
        tcp: TcpStream,
        via_proxy: bool,
    ) -> Result<Handshaken, HandshakeError> {
        let (stream, cert_identity): (BoxStream, Option<String>) = match &self.tls {
            None if self.protocol == Protocol::Mqtt => {
                let (reader, writer) = split_tcp(tcp);
                return Ok(Handshaken {
                    reader,
                    writer,
                    cert_identity: None,
                    forwarded: None,
                });
            }
            None => (Box::new(tcp), None),
            Some(tls) => {
                let stream = tls.acceptor().accept(tcp).await.map_err(|e| {
                    if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        HandshakeError::Silent(e.to_string())
                    } else {
                        HandshakeError::Tls(e.to_string())
                    }
                })?;
                let identity = tls
                    .identity_of(stream.get_ref().1)
                    .map_err(|e| HandshakeError::Tls(e.to_string()))?;
                (Box::new(stream), identity)
            }
        };
        match self.protocol {
            Protocol::Mqtt => {
                let (reader, writer) = split_stream(stream);
                Ok(Handshaken {
                    reader,
                    writer,
                    cert_identity,
                    forwarded: None,
                })
            }
            Protocol::Ws => {
                let config = ws_upgrade::config(shared.config.limits.max_packet_size);
                let forwarded_by = self.forwarded.as_ref().filter(|_| via_proxy);
                let mut forwarded = None;
                let mut refused = None;
                #[allow(clippy::result_large_err)] // tungstenite's callback signature
                let callback = |req: &Request, resp| {
                    forwarded = forwarded_by.and_then(|f| f.client_address(req.headers()));
                    let answer = ws_upgrade::accept(&self.ws_paths, req, resp);
                    if let Err(refusal) = &answer {
                        refused = refusal.body().clone();
                    }
                    answer
                };
                let ws =
                    tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config))
                        .await
                        .map_err(|e| ws_failure(refused.take(), e))?;
                let (reader, writer) = split_ws(ws);
                Ok(Handshaken {
                    reader,
                    writer,
                    cert_identity,
                    forwarded,
                })
            }
        }
    }
}

/// A failed WebSocket handshake: our own refusal, a client that left, or a request that
/// is not a WebSocket upgrade.
fn ws_failure(refused: Option<String>, e: WsError) -> HandshakeError {
    if let Some(reason) = refused {
        return HandshakeError::Upgrade(reason);
    }
    match &e {
        WsError::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            HandshakeError::Silent(e.to_string())
        }
        WsError::Protocol(ProtocolError::HandshakeIncomplete) | WsError::ConnectionClosed => {
            HandshakeError::Silent(e.to_string())
        }
        _ => HandshakeError::Upgrade(e.to_string()),
    }
}
