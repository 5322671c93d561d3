//! Listeners: accept TCP, run TLS and WebSocket handshakes, hand each connection to
//! the gateway on its own task.
//!
//! The accept loop only accepts: handshakes run on the connection's task under
//! `limits.connect_timeout`, so one slow client never stalls a listener (rumqttd's own
//! listener does its TLS handshake inline). A connection beyond `limits.max_connections`
//! is closed at once.

use crate::policy::ListenerPolicy;
use crate::server::{ConnInfo, Shared, StartError};
use crate::tls::TlsSetup;
use crate::transport::{split_stream, split_tcp, split_ws, BoxStream, Reader, Writer};
use moatmq_config::{Config, Listener, Protocol};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tracing::{debug, warn};

/// A bound listener, not yet accepting.
pub struct Bound {
    socket: TcpListener,
    protocol: Protocol,
    tls: Option<Arc<TlsSetup>>,
    policy: ListenerPolicy,
    trust_proxy_protocol: bool,
}

/// Binds a configured listener and loads its TLS material.
pub async fn bind(config: &Config, l: &Listener) -> Result<Bound, StartError> {
    let tls = TlsSetup::for_listener(config, l)?.map(Arc::new);
    let socket = TcpListener::bind(&l.bind)
        .await
        .map_err(|source| StartError::Bind {
            name: l.name.clone(),
            addr: l.bind.clone(),
            source,
        })?;
    Ok(Bound {
        socket,
        protocol: l.protocol,
        tls,
        trust_proxy_protocol: l.trust_proxy_protocol,
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
        let timeout = Duration::from_secs(shared.config.limits.connect_timeout);
        if self.trust_proxy_protocol {
            match tokio::time::timeout(timeout, crate::proxy::read_header(&mut tcp)).await {
                Ok(Ok(Some(source))) => peer = source,
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    debug!(listener = self.name(), %peer, error = %e, "bad PROXY header");
                    return;
                }
                Err(_) => return,
            }
        }
        let rate_limited = !shared.conn_limiter.allow(peer.ip());
        if rate_limited {
            shared.metrics.rate_limited.inc();
        }
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
        self.serve_checked(&shared, tcp, peer, rate_limited).await;
        current.dec();
    }

    async fn serve_checked(
        &self,
        shared: &Arc<Shared>,
        tcp: TcpStream,
        peer: SocketAddr,
        rate_limited: bool,
    ) {
        let shared = shared.clone();
        let timeout = Duration::from_secs(shared.config.limits.connect_timeout);
        let handshake = tokio::time::timeout(timeout, self.handshake(tcp)).await;
        let (reader, writer, cert_identity) = match handshake {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => {
                debug!(listener = self.name(), %peer, error = %e, "handshake failed");
                return;
            }
            Err(_) => {
                debug!(listener = self.name(), %peer, "handshake timed out");
                return;
            }
        };
        let info = ConnInfo {
            listener: self.policy.clone(),
            peer,
            cert_identity,
            rate_limited,
        };
        if let Err(e) = crate::connect::handle(shared, info, reader, writer).await {
            debug!(listener = self.name(), %peer, error = %e, "connection ended before CONNACK");
        }
    }

    /// TLS (if configured) then WebSocket (if configured).
    async fn handshake(&self, tcp: TcpStream) -> Result<(Reader, Writer, Option<String>), String> {
        let (stream, cert_identity): (BoxStream, Option<String>) = match &self.tls {
            None if self.protocol == Protocol::Mqtt => {
                let (r, w) = split_tcp(tcp);
                return Ok((r, w, None));
            }
            None => (Box::new(tcp), None),
            Some(tls) => {
                let stream = tls
                    .acceptor()
                    .accept(tcp)
                    .await
                    .map_err(|e| e.to_string())?;
                let identity = tls.identity_of(stream.get_ref().1)?;
                (Box::new(stream), identity)
            }
        };
        match self.protocol {
            Protocol::Mqtt => {
                let (r, w) = split_stream(stream);
                Ok((r, w, cert_identity))
            }
            Protocol::Ws => {
                let ws = tokio_tungstenite::accept_hdr_async(stream, mqtt_subprotocol)
                    .await
                    .map_err(|e| e.to_string())?;
                let (r, w) = split_ws(ws);
                Ok((r, w, cert_identity))
            }
        }
    }
}

/// WebSocket upgrade on path `/mqtt`, answering with the `mqtt` subprotocol
/// (MQTT 5 section 6: the client must offer it).
#[allow(clippy::result_large_err)] // the error type is tungstenite's callback signature
fn mqtt_subprotocol(req: &Request, mut resp: Response) -> Result<Response, ErrorResponse> {
    if req.uri().path() != "/mqtt" {
        let mut err = ErrorResponse::new(Some("MQTT is served on /mqtt".into()));
        *err.status_mut() = StatusCode::NOT_FOUND;
        return Err(err);
    }
    let offers_mqtt = req
        .headers()
        .get_all("Sec-WebSocket-Protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim().eq_ignore_ascii_case("mqtt"));
    if !offers_mqtt {
        let mut err = ErrorResponse::new(Some("Sec-WebSocket-Protocol: mqtt required".into()));
        *err.status_mut() = StatusCode::BAD_REQUEST;
        return Err(err);
    }
    resp.headers_mut()
        .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
    Ok(resp)
}
