//! Operations: connection and publish rate limits, PROXY protocol, audit log, metrics
//! and health endpoints, against the real broker over real sockets.

mod common;

use moatmq_testkit::{v4, Listener, Raw, TestBroker, TestBrokerBuilder, QUIET, WAIT};
use rumqttc::v5::mqttbytes::v5 as m5;
use rumqttc::QoS;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A v5 CONNECT from `source` (a loopback address) and its CONNACK code.
async fn connect_from(
    source: [u8; 4],
    addr: SocketAddr,
    id: &str,
) -> Option<m5::ConnectReturnCode> {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((source, 0))).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    connack_code(stream, id).await
}

/// Sends an MQTT 5 CONNECT on an open socket; the CONNACK's code, if one comes.
async fn connack_code(stream: TcpStream, id: &str) -> Option<m5::ConnectReturnCode> {
    let mut raw = Raw::new(stream);
    raw.send5(m5::Packet::Connect(
        moatmq_testkit::connect5(id),
        None,
        None,
    ))
    .await;
    match raw.next5(WAIT).await {
        Some(m5::Packet::ConnAck(ack)) => Some(ack.code),
        _ => None,
    }
}

#[tokio::test]
async fn a_connection_flood_is_limited_per_source_address() {
    let broker = TestBroker::builder()
        .anonymous()
        .rate_limit("connections_per_second", 1)
        .rate_limit("connection_burst", 5)
        .start()
        .await;
    let addr = broker.first_addr();
    let mut codes = Vec::new();
    for i in 0..8 {
        codes.push(connect_from([127, 0, 0, 1], addr, &format!("flood{i}")).await);
    }
    assert!(
        codes[..5]
            .iter()
            .all(|c| *c == Some(m5::ConnectReturnCode::Success)),
        "{codes:?}"
    );
    assert!(
        codes[5..]
            .iter()
            .all(|c| *c == Some(m5::ConnectReturnCode::ConnectionRateExceeded)),
        "{codes:?}"
    );
    // Another address is not affected.
    assert_eq!(
        connect_from([127, 0, 0, 2], addr, "other").await,
        Some(m5::ConnectReturnCode::Success)
    );
}

#[tokio::test]
async fn proxy_protocol_source_is_what_limits_see() {
    let broker = TestBroker::builder()
        .listener(Listener::tcp("tunnel").set("trust_proxy_protocol", true))
        .anonymous()
        .rate_limit("connections_per_second", 1)
        .rate_limit("connection_burst", 2)
        .start()
        .await;
    let addr = broker.first_addr();
    async fn via_proxy(addr: SocketAddr, client: &str, id: &str) -> Option<m5::ConnectReturnCode> {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let header = format!("PROXY TCP4 {client} 10.0.0.1 40000 1883\r\n");
        stream.write_all(header.as_bytes()).await.unwrap();
        connack_code(stream, id).await
    }
    let ok = Some(m5::ConnectReturnCode::Success);
    assert_eq!(via_proxy(addr, "203.0.113.1", "a1").await, ok);
    assert_eq!(via_proxy(addr, "203.0.113.1", "a2").await, ok);
    assert_eq!(
        via_proxy(addr, "203.0.113.1", "a3").await,
        Some(m5::ConnectReturnCode::ConnectionRateExceeded)
    );
    // Same tunnel socket address, another client behind it.
    assert_eq!(via_proxy(addr, "203.0.113.2", "b1").await, ok);
    // Without a header the connection is refused outright.
    let mut raw = Raw::tcp(addr).await;
    raw.send5(m5::Packet::Connect(
        moatmq_testkit::connect5("nohdr"),
        None,
        None,
    ))
    .await;
    assert!(raw.closed_within(WAIT).await);
}

#[tokio::test]
async fn a_publish_flood_is_throttled_without_hurting_others() {
    let broker = TestBroker::builder()
        .anonymous()
        .rate_limit("messages_per_second", 50)
        .rate_limit("message_burst", 50)
        .start()
        .await;
    let addr = broker.first_addr();
    let mut sub = v4::connected(addr, "watch").await;
    assert_eq!(
        common::suback4(&mut sub, &["flood", "calm"]).await,
        vec![common::V4_OK; 2]
    );
    let flooder = v4::connected(addr, "flooder").await;
    let calm = v4::connected(addr, "calm").await;
    let started = tokio::time::Instant::now();
    for i in 0..150u32 {
        flooder
            .client
            .try_publish("flood", QoS::AtMostOnce, false, i.to_be_bytes().to_vec())
            .ok();
    }
    calm.client
        .publish("calm", QoS::AtLeastOnce, false, "hello")
        .await
        .unwrap();
    let mut flood_seen = 0;
    let mut calm_seen = false;
    let deadline = started + Duration::from_secs(4);
    while let Some(p) = sub
        .publish_within(deadline - tokio::time::Instant::now())
        .await
    {
        match p.topic.as_str() {
            "calm" => calm_seen = true,
            _ => flood_seen += 1,
        }
        if flood_seen == 150 && calm_seen {
            break;
        }
    }
    assert!(calm_seen, "the well-behaved client's message was delivered");
    assert_eq!(flood_seen, 150, "throttled, not dropped");
    // 150 messages at 50/s after a burst of 50 take about two seconds.
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "not throttled: {:?}",
        started.elapsed()
    );
}

async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    let status = body
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, body)
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing in\n{text}"))
}

/// An anonymous broker with metrics.
fn with_metrics() -> TestBrokerBuilder {
    TestBroker::builder().anonymous().metrics()
}

#[tokio::test]
async fn metrics_move_with_traffic_and_health_endpoints_answer() {
    let broker = with_metrics().start().await;
    let m = broker.metrics_addr();
    let (status, _) = http_get(m, "/healthz").await;
    assert_eq!(status, 200);
    let (status, _) = http_get(m, "/readyz").await;
    assert_eq!(status, 200);
    let (_, before) = http_get(m, "/metrics").await;
    let received = metric(&before, "moatmq_messages_received_total");

    let mut sub = v4::connected(broker.first_addr(), "s").await;
    common::suback4(&mut sub, &["m/#"]).await;
    let publ = v4::connected(broker.first_addr(), "p").await;
    for _ in 0..3 {
        publ.client
            .publish("m/x", QoS::AtLeastOnce, false, "x")
            .await
            .unwrap();
        sub.next_publish().await;
    }
    let (_, after) = http_get(m, "/metrics").await;
    assert_eq!(
        metric(&after, "moatmq_messages_received_total"),
        received + 3.0
    );
    assert!(metric(&after, "moatmq_messages_sent_total") >= 3.0);
    assert!(
        after.contains("moatmq_connections_current{listener=\"tcp\"} 2"),
        "{after}"
    );
    assert!(metric(&after, "moatmq_auth_successes_total") >= 2.0);
}

/// The gauges read at scrape time: the router's health and the process's memory, the
/// figures the Grafana dashboard and alert rules under deploy/ are built on.
#[tokio::test]
async fn metrics_export_router_health_and_resident_memory() {
    let broker = with_metrics().start().await;
    let (_, text) = http_get(broker.metrics_addr(), "/metrics").await;
    assert_eq!(metric(&text, "moatmq_router_up"), 1.0);
    assert!(text.contains("# TYPE moatmq_router_up gauge"), "{text}");
    let rss = metric(&text, "process_resident_memory_bytes");
    // This test process holds the broker and the test harness: more than 1 MiB, less
    // than 4 GiB, a whole number of KiB.
    assert!(rss > 1_048_576.0 && rss < 4_294_967_296.0, "{rss}");
    assert_eq!(rss % 1024.0, 0.0);
    assert!(
        text.contains("# UNIT process_resident_memory_bytes bytes"),
        "{text}"
    );
    assert!(text.ends_with("# EOF\n"), "one EOF, at the end");
    assert_eq!(text.matches("# EOF").count(), 1);
}

/// The bounds use is measured against, and the gauges read at scrape time from state
/// other parts own: the login throttle's throttled addresses and the retained set's size.
#[tokio::test]
async fn metrics_export_bounds_retained_use_and_throttled_addresses() {
    let broker = TestBroker::builder()
        .users(&[("alice", "alice-pw")])
        .no_connection_rate()
        .limit("max_connections", 50)
        .retained_store()
        .set("retained", "max_messages", 7)
        .set("retained", "max_bytes", 4096)
        .metrics()
        .start()
        .await;
    let (addr, m) = (broker.first_addr(), broker.metrics_addr());
    let (_, text) = http_get(m, "/metrics").await;
    assert_eq!(metric(&text, "moatmq_max_connections"), 50.0);
    assert_eq!(metric(&text, "moatmq_retained_max_messages"), 7.0);
    assert_eq!(metric(&text, "moatmq_retained_max_bytes"), 4096.0);
    assert_eq!(metric(&text, "moatmq_retained_bytes"), 0.0);
    assert_eq!(metric(&text, "moatmq_login_throttled_addresses"), 0.0);

    let alice = v4::connect(common::login4(addr, "a1", "alice", "alice-pw"))
        .await
        .unwrap();
    alice
        .client
        .publish("alice/state", QoS::AtLeastOnce, true, "on")
        .await
        .unwrap();
    alice.client.disconnect().await.unwrap();
    // Three wrong passwords for alice from this address use up its free failures: the
    // next attempt would wait.
    for i in 0..3 {
        let id = format!("bad{i}");
        assert!(v4::connect(common::login4(addr, &id, "alice", "wrong-pw"))
            .await
            .is_err());
    }
    let (_, text) = http_get(m, "/metrics").await;
    assert_eq!(metric(&text, "moatmq_login_throttled_addresses"), 1.0);
    assert_eq!(metric(&text, "moatmq_retained_messages"), 1.0);
    let bytes = metric(&text, "moatmq_retained_bytes");
    assert!(bytes > 2.0 && bytes < 4096.0, "{bytes}");
    // Her correct login clears her count from this address: no longer held back.
    let again = v4::connect(common::login4(addr, "a2", "alice", "alice-pw"))
        .await
        .unwrap();
    let (_, text) = http_get(m, "/metrics").await;
    assert_eq!(metric(&text, "moatmq_login_throttled_addresses"), 0.0);
    drop(again);
}

#[tokio::test]
async fn readyz_is_not_ready_until_the_broker_serves() {
    let (_dir, path) = with_metrics().write();
    let broker = moatmq_broker::Broker::start(moatmq_config::Config::load(&path).unwrap())
        .await
        .unwrap();
    let m = broker.metrics_addr().unwrap();
    assert_eq!(http_get(m, "/readyz").await.0, 503);
    assert_eq!(http_get(m, "/healthz").await.0, 200);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(broker.serve(async move {
        let _ = stopped.await;
    }));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(http_get(m, "/readyz").await.0, 200);
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn audit_lines_for_each_event_never_carry_the_password() {
    let broker = TestBroker::builder()
        .users(&[("alice", "s3cret-pw")])
        .acl("user alice\ntopic readwrite alice/#\n")
        .audit()
        .start()
        .await;
    let addr = broker.first_addr();
    let refused = v4::connect(common::login4(addr, "bad", "alice", "wrong-pw")).await;
    assert!(refused.is_err());
    let mut alice = v4::connect(common::login4(addr, "a1", "alice", "s3cret-pw"))
        .await
        .unwrap();
    assert_eq!(
        common::suback4(&mut alice, &["bob/#"]).await,
        vec![common::V4_NO]
    );
    alice.client.disconnect().await.unwrap();
    tokio::time::sleep(QUIET).await;

    // logrotate: move the file away, reload, and the broker writes a fresh one.
    std::fs::rename(broker.path("audit.log"), broker.path("audit.log.1")).unwrap();
    assert!(broker.reload().is_empty());
    let text = std::fs::read_to_string(broker.path("audit.log.1")).unwrap();
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    for kind in [
        "connect",
        "auth_failure",
        "auth_success",
        "authz_deny",
        "disconnect",
    ] {
        assert!(kinds.contains(&kind), "{kind} missing in {kinds:?}");
    }
    let deny = events.iter().find(|e| e["event"] == "authz_deny").unwrap();
    assert_eq!(deny["action"], "subscribe");
    assert_eq!(deny["topic"], "bob/#");
    assert_eq!(deny["username"], "alice");
    // A stable word (docs/operating.md), not Rust debug text.
    let bye = events.iter().find(|e| e["event"] == "disconnect").unwrap();
    assert_eq!(bye["reason"], "client_disconnect");
    assert!(events
        .iter()
        .all(|e| e["ts"].as_str().is_some_and(|t| t.contains('T'))));
    assert!(
        !text.contains("s3cret-pw") && !text.contains("wrong-pw"),
        "password in the audit log"
    );
    let reopened = std::fs::read_to_string(broker.path("audit.log")).unwrap();
    assert!(reopened.contains("config_reload"), "{reopened}");
}

#[tokio::test]
async fn mqtt5_receive_maximum_is_enforced() {
    use bytes::BytesMut;
    let broker = TestBroker::builder()
        .anonymous()
        .limit("max_inflight", 2)
        .start()
        .await;
    let (mut raw, code) = Raw::connect5(
        broker.first_addr(),
        moatmq_testkit::connect5("eager"),
        None,
        None,
    )
    .await;
    assert_eq!(code, Some(m5::ConnectReturnCode::Success));
    // Three QoS 1 publishes in one write: the third exceeds the announced maximum of 2.
    let mut out = BytesMut::new();
    for pkid in 1..=3 {
        let mut p = m5::Publish::new("rm/t", rumqttc::v5::mqttbytes::QoS::AtLeastOnce, "x", None);
        p.pkid = pkid;
        m5::Packet::Publish(p).write(&mut out).unwrap();
    }
    raw.send(&out).await;
    let mut saw_disconnect = None;
    while let Some(p) = raw.next5(WAIT).await {
        if let m5::Packet::Disconnect(d) = p {
            saw_disconnect = Some(d.reason_code);
            break;
        }
    }
    assert_eq!(
        saw_disconnect,
        Some(m5::DisconnectReasonCode::ReceiveMaximumExceeded)
    );
    common::assert_serving(broker.first_addr()).await;
}
