//! Attacks before login, against the real broker over raw sockets: slot exhaustion from
//! one address, handshakes that spend the connect timeout once per step, WebSocket frames
//! larger than any packet the broker accepts, forged client addresses behind a tunnel.
//!
//! Each test sends from its own loopback address (127.0.0.x: Linux routes all of
//! 127.0.0.0/8 to lo), so per-address limits of parallel tests do not mix.

mod common;

use common::Raw;
use moatmq_testkit::{TestBroker, TestCa};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use tokio::net::{TcpSocket, TcpStream};

/// A connection the broker must close "at once".
const AT_ONCE: Duration = Duration::from_millis(500);

/// A TCP connection from `source` (a 127.0.0.x address) to `addr`.
async fn tcp_from(source: [u8; 4], addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(IpAddr::from(source), 0))
        .expect("bind a loopback source address");
    socket.connect(addr).await.expect("connect")
}

async fn raw_from(source: [u8; 4], addr: SocketAddr) -> Raw {
    Raw::from_stream(tcp_from(source, addr).await)
}

/// An MQTT 3.1.1 CONNECT with a clean session.
fn connect_bytes(id: &str) -> Vec<u8> {
    let mut out = bytes::BytesMut::new();
    rumqttc::mqttbytes::v4::Connect::new(id)
        .write(&mut out)
        .expect("encode connect");
    out.to_vec()
}

/// A logged-in 3.1.1 client from `source`.
async fn logged_in(source: [u8; 4], addr: SocketAddr, id: &str) -> Option<Raw> {
    let mut raw = raw_from(source, addr).await;
    raw.send(&connect_bytes(id)).await;
    match raw.next4(Duration::from_secs(2)).await {
        Some(rumqttc::Packet::ConnAck(ack)) if ack.code == rumqttc::ConnectReturnCode::Success => {
            Some(raw)
        }
        _ => None,
    }
}

const LIMITED: &str = r#"
[[listener]]
name = "tcp"
bind = "127.0.0.1:0"
[auth]
allow_anonymous = true
[rate_limit]
connections_per_second = 0
[limits]
max_connections = 200
max_connections_per_address = 4
max_pending_per_address = 2
connect_timeout = 3
"#;

#[tokio::test]
async fn idle_sockets_from_one_address_cannot_hold_the_slots() {
    let broker = TestBroker::with_config(LIMITED).await;
    let addr = broker.first_addr();
    let attacker = [127, 0, 0, 21];
    // 20 idle sockets: only max_pending_per_address of them are kept waiting.
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(raw_from(attacker, addr).await);
    }
    let mut closed = 0;
    for r in &mut idle {
        if r.closed_within(AT_ONCE).await {
            closed += 1;
        }
    }
    assert_eq!(closed, 18, "all but 2 pending connections closed at once");
    // Another address is unaffected, and even the attacker's own pending budget is
    // what keeps its two idle sockets: a third login from it is refused.
    assert!(logged_in([127, 0, 0, 22], addr, "bystander")
        .await
        .is_some());
    assert!(logged_in(attacker, addr, "third").await.is_none());
    drop(idle);
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Logged-in connections count against max_connections_per_address.
    let mut clients = Vec::new();
    for i in 0..4 {
        let c = logged_in(attacker, addr, &format!("c{i}")).await;
        clients.push(c.expect("within max_connections_per_address"));
    }
    let mut fifth = raw_from(attacker, addr).await;
    assert!(fifth.closed_within(AT_ONCE).await, "fifth closed at once");
    // A closed connection frees its slot.
    drop(clients.pop());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(logged_in(attacker, addr, "again").await.is_some());
}

#[tokio::test]
async fn over_limit_tls_connections_are_closed_before_the_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("prelogin ca");
    ca.server(dir.path(), "server");
    let toml = format!(
        "{LIMITED}\n[[listener]]\nname = \"tls\"\nbind = \"127.0.0.1:0\"\n[listener.tls]\ncert = \"server.crt\"\nkey = \"server.key\"\n"
    );
    let broker = TestBroker::with_config_in(dir, &toml).await;
    let addr = broker.addr("tls");
    let source = [127, 0, 0, 23];
    let mut held = vec![raw_from(source, addr).await, raw_from(source, addr).await];
    // The broker would wait for a ClientHello: a connection it closes without one was
    // refused before the TLS handshake.
    let mut third = raw_from(source, addr).await;
    let start = Instant::now();
    assert_eq!(
        third.bytes_until_closed(AT_ONCE).await,
        Some(Vec::new()),
        "closed at once, nothing sent"
    );
    assert!(start.elapsed() < AT_ONCE);
    for r in &mut held {
        assert!(!r.closed_within(Duration::from_millis(200)).await);
    }
}

const PROXIED: &str = r#"
[[listener]]
name = "proxied"
bind = "127.0.0.1:0"
trust_proxy_protocol = true
[[listener]]
name = "ws"
bind = "127.0.0.1:0"
protocol = "ws"
[auth]
allow_anonymous = true
[rate_limit]
connections_per_second = 0
[limits]
connect_timeout = 2
"#;

/// Seconds until the broker closes `raw`, or `None` if it is open after 6 s.
async fn closes_after(mut raw: Raw, opened: Instant) -> Option<Duration> {
    raw.closed_within(Duration::from_secs(6))
        .await
        .then(|| opened.elapsed())
}

#[tokio::test]
async fn connect_timeout_is_one_deadline_for_all_steps() {
    let broker = TestBroker::with_config(PROXIED).await;

    // PROXY header after 1.5 s, then no CONNECT: the CONNECT step gets what is left of
    // the 2 s, not 2 s of its own (3.5 s in all before the fix).
    let opened = Instant::now();
    let mut raw = raw_from([127, 0, 0, 24], broker.addr("proxied")).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    raw.send(b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 1883\r\n")
        .await;
    let took = closes_after(raw, opened).await.expect("closed");
    assert!(took < Duration::from_millis(2800), "closed after {took:?}");

    // WebSocket upgrade after 1.5 s, then no CONNECT.
    let opened = Instant::now();
    let mut raw = raw_from([127, 0, 0, 24], broker.addr("ws")).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    raw.send(&ws_upgrade("/mqtt", &[])).await;
    let took = closes_after(raw, opened).await.expect("closed");
    assert!(took < Duration::from_millis(2800), "closed after {took:?}");
}

/// An HTTP upgrade request for MQTT over WebSocket with extra header lines.
fn ws_upgrade(path: &str, extra: &[&str]) -> Vec<u8> {
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: mqtt\r\n"
    );
    for line in extra {
        req.push_str(line);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    req.into_bytes()
}
