//! Retained quotas against the real broker: a message counts with everything it stores
//! (properties included), each user has a quota of their own that survives a restart, and
//! a refusal is never a silent loss (MQTT 5: 0x97; 3.1.1 QoS 1/2: closed unacknowledged).

use bytes::BytesMut;
use moatmq_testkit::{Raw, TestBroker, TestBrokerBuilder, QUIET, WAIT};
use rumqttc::v5::mqttbytes::v5 as m5;
use rumqttc::v5::mqttbytes::QoS as Q5;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const USERS: &[(&str, &str)] = &[("alice", "alice-pw"), ("bob", "bob-pw")];

/// A broker with users alice and bob (tenant isolation: `<user>/#`), a durable store
/// (`autosave_interval = 0`), metrics and audit, and `quota` set in `[retained]`.
fn broker_with(quota: &[(&str, i64)]) -> TestBrokerBuilder {
    let mut broker =
        TestBroker::builder()
            .users(USERS)
            .retained_store()
            .set("retained", "autosave_interval", 0);
    for (key, value) in quota {
        broker = broker.set("retained", key, *value);
    }
    broker.metrics().audit()
}

async fn broker(quota: &[(&str, i64)]) -> TestBroker {
    broker_with(quota).start().await
}

fn pass(user: &str) -> &'static str {
    USERS.iter().find(|(u, _)| *u == user).unwrap().1
}

async fn login5(addr: SocketAddr, user: &str) -> Raw {
    Raw::v5_login(addr, &format!("{user}-5"), user, pass(user)).await
}

/// Publishes a retained QoS 1 message (MQTT 5) and returns the PUBACK's reason.
async fn retain5(
    c: &mut Raw,
    pkid: u16,
    topic: &str,
    payload: &str,
    props: Option<m5::PublishProperties>,
) -> m5::PubAckReason {
    let mut p = m5::Publish::new(topic, Q5::AtLeastOnce, payload.to_string(), props);
    p.retain = true;
    p.pkid = pkid;
    c.send5(m5::Packet::Publish(p)).await;
    loop {
        match c.next5(WAIT).await {
            Some(m5::Packet::PubAck(ack)) => {
                assert_eq!(ack.pkid, pkid);
                return ack.reason;
            }
            Some(_) => continue,
            None => panic!("no PUBACK for {topic}"),
        }
    }
}

fn big_properties(bytes: usize) -> m5::PublishProperties {
    m5::PublishProperties {
        user_properties: vec![("pad".to_string(), "x".repeat(bytes))],
        ..Default::default()
    }
}

/// The retained topics `user` is served under `<user>/#`.
async fn retained_topics(addr: SocketAddr, user: &str) -> Vec<String> {
    let mut c = Raw::v5_login(addr, &format!("{user}-reader"), user, pass(user)).await;
    c.subscribe5(1, &[&format!("{user}/#")]).await;
    let mut got = Vec::new();
    while let Some(p) = c.publish5_within(QUIET).await {
        assert!(p.retain);
        got.push(String::from_utf8(p.topic.to_vec()).unwrap());
    }
    got.sort();
    got
}

async fn metrics(broker: &TestBroker) -> String {
    let mut s = tokio::net::TcpStream::connect(broker.metrics_addr())
        .await
        .unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    body
}

/// `moatmq_retained_refused_total{reason="..."}`, 0 if not exported yet.
async fn refused(broker: &TestBroker, reason: &str) -> u64 {
    let name = format!("moatmq_retained_refused_total{{reason=\"{reason}\"}} ");
    metrics(broker)
        .await
        .lines()
        .find_map(|l| l.strip_prefix(&name))
        .map_or(0, |v| v.trim().parse().unwrap())
}

fn audit_refusals(broker: &TestBroker) -> Vec<serde_json::Value> {
    std::fs::read_to_string(broker.path("audit.log"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["event"] == "retained_refused")
        .collect()
}

#[tokio::test]
async fn properties_count_toward_max_bytes() {
    // 0.1 MB for everyone; 20 KB of user properties per message on a 1-byte payload.
    let broker = broker(&[("max_bytes", 100000), ("max_bytes_per_user", 0)]).await;
    let addr = broker.first_addr();
    let mut alice = login5(addr, "alice").await;
    let mut reasons = Vec::new();
    for i in 0..10u16 {
        let props = Some(big_properties(20_000));
        reasons.push(retain5(&mut alice, i + 1, &format!("alice/p/{i}"), "x", props).await);
    }
    let ok = m5::PubAckReason::Success;
    let full = m5::PubAckReason::QuotaExceeded;
    assert_eq!(reasons[..4], [ok, ok, ok, ok], "{reasons:?}");
    assert!(reasons[4..].iter().all(|r| *r == full), "{reasons:?}");
    assert_eq!(retained_topics(addr, "alice").await.len(), 4);
    // Small messages grown afterwards by replacement do not get round it either.
    assert_eq!(retain5(&mut alice, 20, "alice/p/0", "x", None).await, ok);
    assert_eq!(retain5(&mut alice, 21, "alice/s", "x", None).await, ok);
    let grown = Some(big_properties(40_000));
    assert_eq!(retain5(&mut alice, 22, "alice/s", "x", grown).await, full);
    assert_eq!(refused(&broker, "max_bytes").await, 7);
}

#[tokio::test]
async fn alice_filling_her_quota_does_not_stop_bob() {
    let broker = broker(&[("max_messages_per_user", 3)]).await;
    let addr = broker.first_addr();
    let ok = m5::PubAckReason::Success;
    let full = m5::PubAckReason::QuotaExceeded;
    let mut alice = login5(addr, "alice").await;
    for i in 1..=3 {
        assert_eq!(
            retain5(&mut alice, i, &format!("alice/{i}"), "v", None).await,
            ok
        );
    }
    assert_eq!(retain5(&mut alice, 4, "alice/4", "v", None).await, full);
    // QoS 2: PUBREC 0x97.
    let mut p = m5::Publish::new("alice/4", Q5::ExactlyOnce, "v", None);
    p.retain = true;
    p.pkid = 40;
    alice.send5(m5::Packet::Publish(p)).await;
    match alice.next5(WAIT).await {
        Some(m5::Packet::PubRec(rec)) => {
            assert_eq!(
                (rec.pkid, rec.reason),
                (40, m5::PubRecReason::QuotaExceeded)
            )
        }
        other => panic!("expected PUBREC, got {other:?}"),
    }
    // Replacing her own message does not count twice.
    assert_eq!(retain5(&mut alice, 5, "alice/1", "v2", None).await, ok);
    let mut bob = login5(addr, "bob").await;
    for i in 1..=3 {
        assert_eq!(
            retain5(&mut bob, i, &format!("bob/{i}"), "v", None).await,
            ok
        );
    }
    // Deleting (empty payload) frees her quota.
    assert_eq!(retain5(&mut alice, 6, "alice/2", "", None).await, ok);
    assert_eq!(retain5(&mut alice, 7, "alice/4", "v", None).await, ok);
    assert_eq!(
        retained_topics(addr, "alice").await,
        ["alice/1", "alice/3", "alice/4"]
    );
    assert_eq!(retained_topics(addr, "bob").await.len(), 3);

    assert_eq!(refused(&broker, "max_messages_per_user").await, 2);
    let audit = audit_refusals(&broker);
    assert_eq!(audit.len(), 2, "{audit:?}");
    assert_eq!(audit[0]["username"], "alice");
    assert_eq!(audit[0]["topic"], "alice/4");
    assert_eq!(audit[0]["reason"], "max_messages_per_user");
}

/// Sends a 3.1.1 PUBLISH with the retain flag.
async fn retain4(c: &mut Raw, qos: rumqttc::QoS, pkid: u16, topic: &str) {
    let mut p = rumqttc::mqttbytes::v4::Publish::new(topic, qos, "v");
    p.retain = true;
    p.pkid = pkid;
    let mut out = BytesMut::new();
    p.write(&mut out).unwrap();
    c.send(&out).await;
}

async fn login4(addr: SocketAddr, id: &str, user: &str) -> Raw {
    let mut connect = moatmq_testkit::connect4(id);
    connect.login = Some(rumqttc::mqttbytes::v4::Login::new(user, pass(user)));
    let (raw, code) = Raw::connect4(addr, connect).await;
    assert_eq!(code, Some(rumqttc::ConnectReturnCode::Success));
    raw
}

#[tokio::test]
async fn mqtt311_refusal_is_never_acknowledged() {
    use rumqttc::QoS::{AtLeastOnce, AtMostOnce, ExactlyOnce};
    let broker = broker(&[("max_messages_per_user", 2)]).await;
    let addr = broker.first_addr();
    let mut alice = login4(addr, "a4", "alice").await;
    for i in 1..=2 {
        retain4(&mut alice, AtLeastOnce, i, &format!("alice/{i}")).await;
        match alice.next4(WAIT).await {
            Some(rumqttc::Packet::PubAck(ack)) => assert_eq!(ack.pkid, i),
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
    // QoS 0: dropped and counted; the connection stays.
    retain4(&mut alice, AtMostOnce, 0, "alice/q0").await;
    assert!(alice.next4(QUIET).await.is_none());
    assert_eq!(refused(&broker, "max_messages_per_user").await, 1);
    retain4(&mut alice, AtLeastOnce, 3, "alice/1").await;
    assert!(
        matches!(alice.next4(WAIT).await, Some(rumqttc::Packet::PubAck(_))),
        "the connection is still served"
    );
    // QoS 1 and 2: no success acknowledgement for a message that is not kept.
    retain4(&mut alice, AtLeastOnce, 4, "alice/q1").await;
    assert_eq!(alice.bytes_until_closed(WAIT).await, Some(Vec::new()));
    let mut again = login4(addr, "a4b", "alice").await;
    retain4(&mut again, ExactlyOnce, 5, "alice/q2").await;
    assert_eq!(again.bytes_until_closed(WAIT).await, Some(Vec::new()));

    assert_eq!(refused(&broker, "max_messages_per_user").await, 3);
    assert_eq!(audit_refusals(&broker).len(), 3);
    assert_eq!(retained_topics(addr, "alice").await, ["alice/1", "alice/2"]);
}

#[tokio::test]
async fn quota_and_owners_survive_a_restart() {
    let broker = broker(&[("max_messages_per_user", 2)]).await;
    let addr = broker.first_addr();
    let ok = m5::PubAckReason::Success;
    let full = m5::PubAckReason::QuotaExceeded;
    let mut alice = login5(addr, "alice").await;
    assert_eq!(retain5(&mut alice, 1, "alice/1", "v", None).await, ok);
    assert_eq!(retain5(&mut alice, 2, "alice/2", "v", None).await, ok);
    drop(alice);

    let broker = broker.restart().await;
    let addr = broker.first_addr();
    let mut alice = login5(addr, "alice").await;
    assert_eq!(retain5(&mut alice, 1, "alice/3", "v", None).await, full);
    assert_eq!(retain5(&mut alice, 2, "alice/1", "v2", None).await, ok);
    let mut bob = login5(addr, "bob").await;
    assert_eq!(retain5(&mut bob, 1, "bob/1", "v", None).await, ok);
    assert_eq!(retain5(&mut bob, 2, "bob/2", "v", None).await, ok);
    assert_eq!(retain5(&mut alice, 3, "alice/2", "", None).await, ok);
    assert_eq!(retain5(&mut alice, 4, "alice/3", "v", None).await, ok);
    assert_eq!(retained_topics(addr, "alice").await, ["alice/1", "alice/3"]);
}

#[tokio::test]
async fn records_from_before_owners_count_against_their_first_level() {
    // A store written without owners (the record layout of earlier versions).
    let builder = broker_with(&[("max_messages_per_user", 2)]);
    let dir = builder.dir();
    let key = moatmq_store::RetainedKey::load(&dir.join("retained.key")).unwrap();
    let limits = moatmq_store::StoreLimits::UNLIMITED;
    let (mut store, _) =
        moatmq_store::Store::open(&dir.join("data/retained"), key, limits).unwrap();
    for topic in ["alice/old1", "alice/old2", "/no-tenant"] {
        store
            .set(moatmq_store::RetainedMessage {
                topic: topic.to_string(),
                payload: b"v".to_vec(),
                qos: 1,
                properties: None,
                expires_at: None,
                owner: None,
            })
            .unwrap();
    }
    store.flush().unwrap();
    drop(store);

    let broker = builder.start().await;
    let addr = broker.first_addr();
    assert_eq!(
        retained_topics(addr, "alice").await,
        ["alice/old1", "alice/old2"]
    );
    let mut alice = login5(addr, "alice").await;
    let full = m5::PubAckReason::QuotaExceeded;
    let ok = m5::PubAckReason::Success;
    assert_eq!(retain5(&mut alice, 1, "alice/new", "v", None).await, full);
    assert_eq!(retain5(&mut alice, 2, "alice/old1", "", None).await, ok);
    assert_eq!(retain5(&mut alice, 3, "alice/new", "v", None).await, ok);
    let mut bob = login5(addr, "bob").await;
    assert_eq!(retain5(&mut bob, 1, "bob/1", "v", None).await, ok);
}

#[tokio::test]
async fn a_retained_will_past_the_quota_is_refused_counted_and_audited() {
    let broker = broker(&[("max_messages_per_user", 1)]).await;
    let addr = broker.first_addr();
    let mut alice = login5(addr, "alice").await;
    let ok = m5::PubAckReason::Success;
    assert_eq!(retain5(&mut alice, 1, "alice/1", "v", None).await, ok);
    let will = m5::LastWill::new("alice/will", "gone", Q5::AtLeastOnce, true, None);
    let (raw, code) = Raw::connect5(
        addr,
        moatmq_testkit::connect5("alice-will"),
        Some(will),
        Some(m5::Login::new("alice", pass("alice"))),
    )
    .await;
    assert_eq!(code, Some(m5::ConnectReturnCode::Success));
    drop(raw); // no DISCONNECT: the will is published
    tokio::time::sleep(QUIET).await;
    assert_eq!(retained_topics(addr, "alice").await, ["alice/1"]);
    assert_eq!(refused(&broker, "max_messages_per_user").await, 1);
    let audit = audit_refusals(&broker);
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert_eq!(audit[0]["topic"], "alice/will");
}
