//! Attacks before login, against the real broker over raw sockets: slot exhaustion from
//! one address, handshakes that spend the connect timeout once per step, WebSocket frames
//! larger than any packet the broker accepts, forged client addresses behind a tunnel.
//!
//! Each test sends from its own loopback address (127.0.0.x: Linux routes all of
//! 127.0.0.0/8 to lo), so per-address limits of parallel tests do not mix.

mod common;

use moatmq_testkit::{Listener, Raw, TestBroker, TestBrokerBuilder, TestCa};
use rumqttc::v5::mqttbytes::v5 as m5;
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
    Raw::new(tcp_from(source, addr).await)
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

/// Anonymous `tcp`, with per-address limits of 4 connections, 2 of them pending login.
fn limited() -> TestBrokerBuilder {
    TestBroker::builder()
        .listener(Listener::tcp("tcp"))
        .anonymous()
        .no_connection_rate()
        .limit("max_connections", 200)
        .limit("max_connections_per_address", 4)
        .limit("max_pending_per_address", 2)
        .limit("connect_timeout", 3)
}

#[tokio::test]
async fn idle_sockets_from_one_address_cannot_hold_the_slots() {
    let broker = limited().start().await;
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

/// After an MQTT 5 DISCONNECT the broker reads on for a while (so a client still
/// acknowledging gets to read the reason code). That socket is still open: it must keep
/// counting against the address's limit, or an address could hold more sockets than
/// `max_connections_per_address` by provoking DISCONNECTs and never closing.
#[tokio::test]
async fn a_socket_read_after_its_disconnect_still_holds_its_slot() {
    let broker = limited()
        .limit("max_connections_per_address", 1)
        .start()
        .await;
    let addr = broker.first_addr();
    let attacker = [127, 0, 0, 24];
    let mut held = raw_from(attacker, addr).await;
    let mut connect = bytes::BytesMut::new();
    m5::Packet::Connect(moatmq_testkit::connect5("provoker"), None, None)
        .write(&mut connect)
        .expect("encode connect");
    held.send(&connect).await;
    assert!(matches!(
        held.next5(Duration::from_secs(2)).await,
        Some(m5::Packet::ConnAck(_))
    ));
    // A second CONNECT is a protocol error: DISCONNECT 0x82, and the attacker keeps
    // its socket open.
    held.send(&connect).await;
    match held.next5(Duration::from_secs(2)).await {
        Some(m5::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, m5::DisconnectReasonCode::ProtocolError)
        }
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
    let mut second = raw_from(attacker, addr).await;
    assert!(
        second.closed_within(AT_ONCE).await,
        "a second socket while the first is still open is over the limit"
    );
    // A client that closes its side after the DISCONNECT frees the slot at once.
    drop(held);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(logged_in(attacker, addr, "after").await.is_some());
}

#[tokio::test]
async fn over_limit_tls_connections_are_closed_before_the_handshake() {
    let ca = TestCa::new("prelogin ca");
    let broker = limited()
        .listener(Listener::tcp("tls").tls())
        .server_cert(&ca)
        .start()
        .await;
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

/// Seconds until the broker closes `raw`, or `None` if it is open after 6 s.
async fn closes_after(mut raw: Raw, opened: Instant) -> Option<Duration> {
    raw.closed_within(Duration::from_secs(6))
        .await
        .then(|| opened.elapsed())
}

#[tokio::test]
async fn connect_timeout_is_one_deadline_for_all_steps() {
    let broker = TestBroker::builder()
        .listener(Listener::tcp("proxied").set("trust_proxy_protocol", true))
        .listener(Listener::ws("ws"))
        .anonymous()
        .no_connection_rate()
        .limit("connect_timeout", 2)
        .start()
        .await;

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

/// Opens a WebSocket to `addr` on `path` from `source`; returns the socket after the
/// broker's answer and the status line it sent.
async fn ws_open(
    source: [u8; 4],
    addr: SocketAddr,
    path: &str,
    extra: &[&str],
) -> (TcpStream, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tcp_from(source, addr).await;
    tcp.write_all(&ws_upgrade(path, extra)).await.unwrap();
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while !answer.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(3), tcp.read(&mut byte)).await {
            Ok(Ok(1)) => answer.push(byte[0]),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&answer);
    let status = text.lines().next().unwrap_or("").to_string();
    (tcp, status)
}

/// A masked (client-to-server) WebSocket frame header; the mask key is zero, so the
/// payload goes as it is.
fn ws_frame_header(fin: bool, opcode: u8, len: u64) -> Vec<u8> {
    let mut out = vec![(u8::from(fin) << 7) | opcode];
    match len {
        0..=125 => out.push(0x80 | len as u8),
        126..=0xffff => {
            out.push(0x80 | 126);
            out.extend((len as u16).to_be_bytes());
        }
        _ => {
            out.push(0x80 | 127);
            out.extend(len.to_be_bytes());
        }
    }
    out.extend([0, 0, 0, 0]);
    out
}

/// Whether the broker closes `tcp` within `wait` (what it sends first is discarded).
async fn tcp_closed_within(tcp: &mut TcpStream, wait: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = vec![0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn websocket_frames_and_messages_are_bounded_by_max_packet_size() {
    use tokio::io::AsyncWriteExt;
    let broker = TestBroker::builder()
        .listener(Listener::ws("ws"))
        .anonymous()
        .no_connection_rate()
        .limit("max_packet_size", 65536)
        .limit("connect_timeout", 10)
        .start()
        .await;
    let addr = broker.addr("ws");
    let source = [127, 0, 0, 25];

    // One frame announcing 64 MiB: refused from its header, before any payload is
    // buffered (tungstenite's default limit would have waited for all of it).
    let (mut tcp, status) = ws_open(source, addr, "/mqtt", &[]).await;
    assert!(status.contains(" 101 "), "{status}");
    tcp.write_all(&ws_frame_header(true, 2, 64 << 20))
        .await
        .unwrap();
    let _ = tcp.write_all(&[0u8; 4096]).await;
    assert!(tcp_closed_within(&mut tcp, AT_ONCE).await, "closed at once");

    // A message of small fragments that adds up past the limit.
    let (mut tcp, status) = ws_open(source, addr, "/mqtt", &[]).await;
    assert!(status.contains(" 101 "), "{status}");
    let chunk = vec![0u8; 16 * 1024];
    let mut first = true;
    for _ in 0..8 {
        let opcode = if first { 2 } else { 0 };
        first = false;
        let mut frame = ws_frame_header(false, opcode, chunk.len() as u64);
        frame.extend(&chunk);
        if tcp.write_all(&frame).await.is_err() {
            break;
        }
    }
    assert!(tcp_closed_within(&mut tcp, AT_ONCE).await, "closed at once");

    // A CONNECT within the limits still works on the same listener.
    let (mut tcp, _) = ws_open(source, addr, "/mqtt", &[]).await;
    let connect = connect_bytes("ws-ok");
    let mut frame = ws_frame_header(true, 2, connect.len() as u64);
    frame.extend(&connect);
    tcp.write_all(&frame).await.unwrap();
    assert_eq!(
        read_ws_binary(&mut tcp).await,
        Some(vec![0x20, 0x02, 0x00, 0x00])
    );
}

/// The payload of the next (unmasked, server-to-client) frame if it is a small binary
/// one; `None` for a close frame, a closed socket or nothing within 3 s.
async fn read_ws_binary(tcp: &mut TcpStream) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(3), tcp.read_exact(&mut head))
        .await
        .ok()?
        .ok()?;
    if head[0] & 0x0f != 2 {
        return None;
    }
    let mut payload = vec![0u8; usize::from(head[1] & 0x7f)];
    tcp.read_exact(&mut payload).await.ok()?;
    Some(payload)
}

fn ws_client(addr: SocketAddr, path: &str, id: &str) -> moatmq_testkit::v4::MqttOptions {
    let url = format!("ws://127.0.0.1:{}{path}", addr.port());
    let mut o = moatmq_testkit::v4::MqttOptions::new(id, url, addr.port());
    o.set_transport(rumqttc::Transport::Ws);
    o
}

#[tokio::test]
async fn websocket_paths_are_per_listener() {
    let broker = TestBroker::builder()
        .listener(Listener::ws("default"))
        .listener(Listener::ws("listed").set("path", vec!["/", "/ws"]))
        .listener(Listener::ws("any").set("path", vec!["*"]))
        .anonymous()
        .no_connection_rate()
        .start()
        .await;
    let source = [127, 0, 0, 26];
    let status = |addr, path: &'static str| async move {
        let (_, status) = ws_open(source, addr, path, &[]).await;
        status
    };
    let default = broker.addr("default");
    assert!(status(default, "/mqtt").await.contains(" 101 "));
    assert!(status(default, "/").await.contains(" 404 "));
    let listed = broker.addr("listed");
    assert!(status(listed, "/").await.contains(" 101 "));
    assert!(status(listed, "/ws").await.contains(" 101 "));
    assert!(status(listed, "/mqtt").await.contains(" 404 "));
    let any = broker.addr("any");
    assert!(status(any, "/anything/at/all").await.contains(" 101 "));

    // Real clients on / and /ws publish and receive.
    for (addr, path) in [(listed, "/"), (listed, "/ws"), (any, "/ws")] {
        let mut c = moatmq_testkit::v4::connect(ws_client(addr, path, "p"))
            .await
            .unwrap_or_else(|e| panic!("client on {path}: {e:?}"));
        common::suback4(&mut c, &["p/t"]).await;
        c.client
            .publish("p/t", rumqttc::QoS::AtLeastOnce, false, path.as_bytes())
            .await
            .unwrap();
        assert_eq!(c.next_publish().await.payload, path.as_bytes());
    }
}

/// A 3.1.1 client over a raw WebSocket from `source`; `Some` once its CONNACK accepted it.
async fn ws_login(
    source: [u8; 4],
    addr: SocketAddr,
    headers: &[&str],
    id: &str,
) -> Option<TcpStream> {
    use tokio::io::AsyncWriteExt;
    let (mut tcp, status) = ws_open(source, addr, "/mqtt", headers).await;
    if !status.contains(" 101 ") {
        return None;
    }
    let connect = connect_bytes(id);
    let mut frame = ws_frame_header(true, 2, connect.len() as u64);
    frame.extend(&connect);
    tcp.write_all(&frame).await.ok()?;
    let connack = read_ws_binary(&mut tcp).await;
    (connack.as_deref() == Some(&[0x20, 0x02, 0x00, 0x00])).then_some(tcp)
}

/// The `peer` of the audit log's `connect` event for `client_id`.
fn audited_peer(broker: &TestBroker, client_id: &str) -> Option<String> {
    let log = std::fs::read_to_string(broker.path("audit.log")).unwrap_or_default();
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| e["event"] == "connect" && e["client_id"] == client_id)
        .and_then(|e| e["peer"].as_str().map(str::to_string))
}

#[tokio::test]
async fn a_trusted_proxy_names_the_client_address() {
    let broker = TestBroker::builder()
        .listener(Listener::ws("cf").forwarded("CF-Connecting-IP", &["127.0.0.31/32"]))
        .listener(Listener::ws("xff").forwarded("X-Forwarded-For", &["127.0.0.31"]))
        .anonymous()
        .audit()
        .no_connection_rate()
        .limit("max_connections_per_address", 2)
        .start()
        .await;
    let (cf, xff) = (broker.addr("cf"), broker.addr("xff"));
    let proxy = [127, 0, 0, 31];

    // Through the trusted proxy, limits count each client: three clients on one tunnel
    // connection address, beyond max_connections_per_address = 2 for the tunnel itself.
    let mut held = Vec::new();
    for (i, client) in ["203.0.113.1", "203.0.113.2", "203.0.113.3"]
        .iter()
        .enumerate()
    {
        let header = format!("CF-Connecting-IP: {client}");
        let id = format!("cf-{i}");
        let c = ws_login(proxy, cf, &[&header], &id).await;
        held.push(c.unwrap_or_else(|| panic!("{client} through the tunnel")));
        assert_eq!(audited_peer(&broker, &id), Some(format!("{client}:0")));
    }
    // ... and one client address is still held to its own share.
    let same = "CF-Connecting-IP: 203.0.113.1";
    held.push(
        ws_login(proxy, cf, &[same], "cf-same")
            .await
            .expect("second"),
    );
    assert!(ws_login(proxy, cf, &[same], "cf-third").await.is_none());

    // X-Forwarded-For: the last hop, the one the proxy appended.
    let header = "X-Forwarded-For: 198.51.100.66, 203.0.113.9";
    held.push(ws_login(proxy, xff, &[header], "xff").await.expect("xff"));
    assert_eq!(
        audited_peer(&broker, "xff"),
        Some("203.0.113.9:0".to_string())
    );

    // From anywhere else the header is ignored: a client cannot pick its address.
    let stranger = [127, 0, 0, 32];
    let forged = "CF-Connecting-IP: 192.0.2.200";
    held.push(
        ws_login(stranger, cf, &[forged], "forger")
            .await
            .expect("forger"),
    );
    let peer = audited_peer(&broker, "forger").expect("audited");
    assert!(peer.starts_with("127.0.0.32:"), "{peer}");
}

/// Everything the broker logs in this test binary, at INFO and above, without colours.
fn captured_log() -> &'static std::sync::Mutex<Vec<u8>> {
    use std::sync::{Mutex, OnceLock};
    static LOG: OnceLock<&'static Mutex<Vec<u8>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let buf: &'static Mutex<Vec<u8>> = Box::leak(Box::new(Mutex::new(Vec::new())));
        let writer = move || Capture(buf);
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer(writer)
            .try_init();
        buf
    })
}

struct Capture(&'static std::sync::Mutex<Vec<u8>>);

impl std::io::Write for Capture {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Captured log lines that mention `needle`.
fn log_lines(needle: &str) -> Vec<String> {
    let log = captured_log().lock().unwrap();
    String::from_utf8_lossy(&log)
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn refused_tls_clients_are_logged_at_info_rate_limited() {
    captured_log();
    let ca = TestCa::new("prelogin ca");
    let builder = TestBroker::builder()
        .listener(
            Listener::tcp("mtls-log")
                .tls()
                .tls_set("client_ca", "client-ca.crt"),
        )
        .server_cert(&ca)
        .client_ca(&ca)
        .anonymous()
        .no_connection_rate();
    let dir = builder.dir();
    let foreign = TestCa::new("someone else's ca");
    let (crt, key) = foreign.valid_client(dir, "foreign", "device-7");
    let (old_crt, old_key) = ca.client(
        dir,
        "expired",
        "device-8",
        time::Duration::days(-30),
        time::Duration::days(-1),
    );
    let broker = builder.start().await;
    let addr = broker.addr("mtls-log");
    let read = |crt, key| Some((std::fs::read(crt).unwrap(), std::fs::read(key).unwrap()));
    let (foreign_auth, expired_auth) = (read(crt, key), read(old_crt, old_key));
    for i in 0..8 {
        // First an expired certificate of the right CA, then a foreign CA's.
        let client_auth = if i == 0 { &expired_auth } else { &foreign_auth };
        let mut o = moatmq_testkit::v4::options(addr, &format!("dev-{i}"));
        o.set_transport(rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Simple {
            ca: ca.pem().as_bytes().to_vec(),
            alpn: None,
            client_auth: client_auth.clone(),
        }));
        assert!(moatmq_testkit::v4::connect(o).await.is_err(), "refused");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lines = log_lines("mtls-log");
    let failed: Vec<_> = lines
        .iter()
        .filter(|l| l.contains("TLS handshake failed"))
        .collect();
    assert_eq!(
        failed.len(),
        6,
        "5 lines, then one saying the rest are suppressed: {lines:#?}"
    );
    assert!(
        failed[0].contains("certificate expired"),
        "the reason: {}",
        failed[0]
    );
    for l in &failed[..5] {
        assert!(l.contains(" INFO "), "{l}");
        assert!(l.contains("peer=127.0.0.1:"), "{l}");
    }
    for l in &failed[1..5] {
        assert!(l.contains("UnknownIssuer"), "the reason: {l}");
    }
    assert!(failed[5].contains("suppressed"), "{}", failed[5]);
}

#[tokio::test]
async fn refused_websocket_upgrades_are_logged_at_info_rate_limited() {
    captured_log();
    let broker = TestBroker::builder()
        .listener(Listener::ws("ws-log"))
        .anonymous()
        .no_connection_rate()
        .start()
        .await;
    let addr = broker.addr("ws-log");
    let source = [127, 0, 0, 42];
    let (_, status) = ws_open(source, addr, "/wrong", &[]).await;
    assert!(status.contains(" 404 "), "{status}");
    // No subprotocol offered.
    let mut tcp = tcp_from(source, addr).await;
    let request = String::from_utf8(ws_upgrade("/mqtt", &[]))
        .unwrap()
        .replace("Sec-WebSocket-Protocol: mqtt\r\n", "");
    tokio::io::AsyncWriteExt::write_all(&mut tcp, request.as_bytes())
        .await
        .unwrap();
    assert!(tcp_closed_within(&mut tcp, Duration::from_secs(2)).await);
    for _ in 0..6 {
        let _ = ws_open(source, addr, "/scan", &[]).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lines = log_lines("ws-log");
    let refused: Vec<_> = lines
        .iter()
        .filter(|l| l.contains("WebSocket upgrade refused"))
        .collect();
    assert_eq!(refused.len(), 6, "{lines:#?}");
    assert!(refused[0].contains("peer=127.0.0.42:") && refused[0].contains("no MQTT on this path"));
    assert!(
        refused[1].contains("Sec-WebSocket-Protocol: mqtt required"),
        "{}",
        refused[1]
    );
    assert!(refused[5].contains("suppressed"), "{}", refused[5]);
}

#[tokio::test]
async fn refusals_are_audited_but_cannot_flood_the_audit_log() {
    let broker = TestBroker::builder()
        .anonymous()
        .audit()
        .no_connection_rate()
        .limit("max_pending_per_address", 1)
        .start()
        .await;
    let addr = broker.first_addr();
    let source = [127, 0, 0, 27];
    let _held = raw_from(source, addr).await;
    for _ in 0..50 {
        let mut refused = raw_from(source, addr).await;
        assert!(refused.closed_within(AT_ONCE).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = std::fs::read_to_string(broker.path("audit.log")).unwrap_or_default();
    let audited: Vec<_> = log
        .lines()
        .filter(|l| l.contains("max_pending_per_address"))
        .collect();
    assert_eq!(audited.len(), 5, "{audited:#?}");
    assert!(
        audited[0].contains("\"event\":\"rate_limited\""),
        "{}",
        audited[0]
    );
    assert!(audited[0].contains("127.0.0.27:"), "{}", audited[0]);
}
