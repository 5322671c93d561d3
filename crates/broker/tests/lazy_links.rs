//! Lazy router links: a clean session holds no rumqttd link until it first sends the
//! router something (`gateway/link.rs`), seen through `moatmq_router_links`. What it
//! sends before the link exists is acknowledged and delivered in order; takeover, wills
//! and persistent sessions behave as with a link opened at login.

mod common;

use bytes::BytesMut;
use common::{suback4, V4_OK};
use moatmq_testkit::wire::Version;
use moatmq_testkit::{connect4, v4, Raw, TestBroker, WAIT};
use rumqttc::mqttbytes::v4 as m4;
use rumqttc::QoS;
use std::time::Duration;

async fn broker() -> TestBroker {
    TestBroker::builder().anonymous().metrics().start().await
}

/// Waits until `moatmq_router_links` reads `n`; panics after [`WAIT`].
async fn links_become(broker: &TestBroker, n: f64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let now = broker.metric("moatmq_router_links").await;
        if now == n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "moatmq_router_links is {now}, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `moatmq_router_links` reads `n` and stays there for a moment.
async fn links_stay(broker: &TestBroker, n: f64) {
    links_become(broker, n).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(broker.metric("moatmq_router_links").await, n);
}

fn publish4(qos: QoS, pkid: u16, topic: &str, payload: &str, out: &mut BytesMut) {
    let mut p = m4::Publish::new(topic, qos, payload);
    p.pkid = pkid;
    p.write(out).unwrap();
}

/// The packet id of an acknowledgement frame.
fn pkid(frame: &moatmq_testkit::Frame) -> u16 {
    u16::from_be_bytes([frame.body[0], frame.body[1]])
}

/// Reads `n` frames of type `first` and returns their packet ids.
async fn acks(raw: &mut Raw, first: u8, n: usize) -> Vec<u16> {
    let mut ids = Vec::new();
    while ids.len() < n {
        let frame = raw.frame_within(WAIT).await.expect("an acknowledgement");
        assert_eq!(frame.first, first, "{frame:?}");
        ids.push(pkid(&frame));
    }
    ids
}

#[tokio::test]
async fn a_clean_connection_opens_its_link_on_first_need() {
    let broker = broker().await;
    let addr = broker.first_addr();
    let mut idle = v4::connected(addr, "idle").await;
    assert!(!idle.connack.session_present);
    let mut quiet = v4::connected(addr, "quiet").await;
    links_stay(&broker, 0.0).await;
    assert_eq!(suback4(&mut quiet, &["lazy/#"]).await, vec![V4_OK]);
    links_become(&broker, 1.0).await;
    idle.publish_acked("lazy/a", false, "one").await;
    assert_eq!(quiet.next_publish().await.payload, "one".as_bytes());
    links_become(&broker, 2.0).await;
    quiet.client.disconnect().await.unwrap();
    assert!(quiet.closed_within(WAIT).await.is_some());
    links_become(&broker, 1.0).await;
    idle.client.disconnect().await.unwrap();
    assert!(idle.closed_within(WAIT).await.is_some());
    links_become(&broker, 0.0).await;
}

#[tokio::test]
async fn ping_and_sys_subscriptions_need_no_link() {
    let broker = broker().await;
    let mut raw = Raw::connected(broker.first_addr(), Version::V4, "pinger").await;
    raw.send(&[0xC0, 0x00]).await;
    let pong = raw.frame_within(WAIT).await.expect("PINGRESP");
    assert_eq!(pong.first, 0xD0);
    // `$SYS` subscriptions are the gateway's own.
    let mut out = BytesMut::new();
    m4::Subscribe::new("$SYS/broker/uptime", QoS::AtMostOnce)
        .write(&mut out)
        .unwrap();
    raw.send(&out).await;
    let suback = raw.frame_within(WAIT).await.expect("SUBACK");
    assert_eq!(suback.first, 0x90);
    links_stay(&broker, 0.0).await;
}

#[tokio::test]
async fn qos_1_publishes_sent_before_the_link_are_acknowledged_and_delivered_in_order() {
    let broker = broker().await;
    let addr = broker.first_addr();
    let mut sub = v4::connected(addr, "sub").await;
    assert_eq!(suback4(&mut sub, &["burst/#"]).await, vec![V4_OK]);
    let mut raw = Raw::connected(addr, Version::V4, "burst1").await;
    links_stay(&broker, 1.0).await;
    // One write: every publish is read before the link exists.
    let mut out = BytesMut::new();
    for i in 1..=10u16 {
        publish4(QoS::AtLeastOnce, i, "burst/1", &format!("m{i}"), &mut out);
    }
    raw.send(&out).await;
    assert_eq!(acks(&mut raw, 0x40, 10).await, (1..=10).collect::<Vec<_>>());
    for i in 1..=10 {
        assert_eq!(sub.next_publish().await.payload, format!("m{i}").as_bytes());
    }
    links_become(&broker, 2.0).await;
}

#[tokio::test]
async fn qos_2_publishes_sent_before_the_link_are_completed_and_delivered_in_order() {
    let broker = broker().await;
    let addr = broker.first_addr();
    let mut sub = v4::connected(addr, "sub").await;
    assert_eq!(suback4(&mut sub, &["burst/#"]).await, vec![V4_OK]);
    let mut raw = Raw::connected(addr, Version::V4, "burst2").await;
    links_stay(&broker, 1.0).await;
    let mut out = BytesMut::new();
    for i in 1..=10u16 {
        publish4(QoS::ExactlyOnce, i, "burst/2", &format!("m{i}"), &mut out);
    }
    raw.send(&out).await;
    assert_eq!(acks(&mut raw, 0x50, 10).await, (1..=10).collect::<Vec<_>>());
    let mut out = BytesMut::new();
    for i in 1..=10u16 {
        m4::PubRel::new(i).write(&mut out).unwrap();
    }
    raw.send(&out).await;
    assert_eq!(acks(&mut raw, 0x70, 10).await, (1..=10).collect::<Vec<_>>());
    for i in 1..=10 {
        assert_eq!(sub.next_publish().await.payload, format!("m{i}").as_bytes());
    }
}

#[tokio::test]
async fn a_publish_and_disconnect_in_one_write_still_reach_the_router() {
    let broker = broker().await;
    let addr = broker.first_addr();
    let mut sub = v4::connected(addr, "sub").await;
    assert_eq!(suback4(&mut sub, &["last/#"]).await, vec![V4_OK]);
    // CONNECT, PUBLISH (QoS 0) and DISCONNECT at once, as mosquitto_pub sends them.
    let mut out = BytesMut::new();
    connect4("oneshot").write(&mut out).unwrap();
    publish4(QoS::AtMostOnce, 0, "last/word", "bye", &mut out);
    m4::Disconnect.write(&mut out).unwrap();
    let mut raw = Raw::tcp(addr).await;
    raw.send(&out).await;
    assert!(raw.closed_within(WAIT).await);
    assert_eq!(sub.next_publish().await.payload, "bye".as_bytes());
    links_become(&broker, 1.0).await;
}

#[tokio::test]
async fn a_lazy_connection_is_taken_over_and_its_will_published() {
    let broker = broker().await;
    let addr = broker.first_addr();
    let mut watcher = v4::connected(addr, "watcher").await;
    assert_eq!(suback4(&mut watcher, &["wills/#"]).await, vec![V4_OK]);
    let mut c = connect4("device");
    c.last_will = Some(rumqttc::LastWill::new(
        "wills/device",
        "gone",
        QoS::AtLeastOnce,
        false,
    ));
    let (mut first, code) = Raw::connect4(addr, c).await;
    assert_eq!(code, Some(rumqttc::ConnectReturnCode::Success));
    links_stay(&broker, 1.0).await;

    // Takeover: the first connection closes, its will goes out (3.1.1: not a normal
    // DISCONNECT), and the newcomer starts clean, without a link either.
    let mut second = v4::connected(addr, "device").await;
    assert!(!second.connack.session_present);
    assert!(first.closed_within(WAIT).await);
    let will = watcher.next_publish().await;
    assert_eq!(
        (&will.topic[..], &will.payload[..]),
        ("wills/device", &b"gone"[..])
    );
    links_stay(&broker, 1.0).await;
    second.publish_acked("wills/not-a-will", false, "hi").await;
    assert_eq!(watcher.next_publish().await.payload, "hi".as_bytes());
    links_become(&broker, 2.0).await;

    // A lazy connection's will when its socket drops.
    let mut c = connect4("dropper");
    c.last_will = Some(rumqttc::LastWill::new(
        "wills/dropper",
        "dropped",
        QoS::AtLeastOnce,
        false,
    ));
    let (dropper, _) = Raw::connect4(addr, c).await;
    drop(dropper);
    assert_eq!(watcher.next_publish().await.payload, "dropped".as_bytes());
    links_stay(&broker, 2.0).await;
}

#[tokio::test]
async fn a_persistent_session_gets_its_link_at_login() {
    let broker = broker().await;
    let addr = broker.first_addr();
    let mut o = v4::options(addr, "keeper");
    o.set_clean_session(false);
    let mut sub = v4::connect(o.clone()).await.unwrap();
    assert!(!sub.connack.session_present);
    links_become(&broker, 1.0).await;
    assert_eq!(suback4(&mut sub, &["kept/#"]).await, vec![V4_OK]);
    sub.client.disconnect().await.unwrap();
    assert!(sub.closed_within(WAIT).await.is_some());
    links_become(&broker, 0.0).await;
    let mut publ = v4::connected(addr, "pub").await;
    publ.publish_acked("kept/a", false, "queued").await;
    let mut sub = v4::connect(o).await.unwrap();
    assert!(sub.connack.session_present);
    assert_eq!(sub.next_publish().await.payload, "queued".as_bytes());
    links_become(&broker, 2.0).await;
}
