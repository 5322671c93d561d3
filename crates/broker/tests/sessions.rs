//! Sessions and wills: persistent sessions keep QoS 1 messages across reconnects, wills
//! are published on abnormal ends (socket dropped, keep alive expired, v5 DISCONNECT
//! 0x04) and not on a normal DISCONNECT, and keep alive 0 is accepted.

mod common;

use bytes::BytesMut;
use common::{suback4, V4_OK};
use moatmq_testkit::{connect4, v4, v5, Raw, TestBroker, WAIT};
use rumqttc::v5::mqttbytes::v5 as m5;
use rumqttc::QoS;
use std::net::SocketAddr;

async fn watcher(addr: SocketAddr, filter: &str) -> v4::Client {
    let mut w = v4::connected(addr, "watcher").await;
    assert_eq!(suback4(&mut w, &[filter]).await, vec![V4_OK]);
    w
}

/// A raw 3.1.1 client with a will on `topic`, connected.
async fn with_will(addr: SocketAddr, id: &str, topic: &str, keep_alive: u16) -> Raw {
    let mut c = connect4(id);
    c.keep_alive = keep_alive;
    c.last_will = Some(rumqttc::LastWill::new(
        topic,
        "gone",
        QoS::AtLeastOnce,
        false,
    ));
    let (raw, code) = Raw::connect4(addr, c).await;
    assert_eq!(code, Some(rumqttc::ConnectReturnCode::Success));
    raw
}

#[tokio::test]
async fn persistent_session_gets_queued_messages_after_reconnect_v4() {
    let broker = TestBroker::start().await;
    let addr = broker.first_addr();
    let mut o = v4::options(addr, "durable");
    o.set_clean_session(false);
    let mut sub = v4::connect(o.clone()).await.unwrap();
    assert!(!sub.connack.session_present);
    assert_eq!(suback4(&mut sub, &["q/#"]).await, vec![V4_OK]);
    sub.client.disconnect().await.unwrap();
    assert!(sub.closed_within(WAIT).await.is_some());

    let mut publ = v4::connected(addr, "pub").await;
    for i in 0..3 {
        publ.publish_acked(format!("q/{i}"), false, format!("m{i}"))
            .await;
    }

    let mut sub = v4::connect(o).await.unwrap();
    assert!(sub.connack.session_present, "session kept");
    for i in 0..3 {
        assert_eq!(sub.next_publish().await.payload, format!("m{i}").as_bytes());
    }

    // A clean session starts empty and discards the stored one.
    sub.client.disconnect().await.unwrap();
    assert!(sub.closed_within(WAIT).await.is_some());
    let mut o = v4::options(addr, "durable");
    o.set_clean_session(true);
    let mut clean = v4::connect(o).await.unwrap();
    assert!(!clean.connack.session_present);
    publ.client
        .publish("q/late", QoS::AtLeastOnce, false, "late")
        .await
        .unwrap();
    common::assert_quiet4(&mut clean).await;
}

#[tokio::test]
async fn persistent_session_v5_with_session_expiry() {
    let broker = TestBroker::start().await;
    let addr = broker.first_addr();
    let opts = || {
        let mut o = v5::options(addr, "durable5");
        o.set_clean_start(false);
        let props = m5::ConnectProperties {
            session_expiry_interval: Some(300),
            ..m5::ConnectProperties::new()
        };
        o.set_connect_properties(props);
        o
    };
    let mut sub = v5::connect(opts()).await.unwrap();
    common::subscribed5(&mut sub, "q5/#").await;
    sub.client.disconnect().await.unwrap();
    assert!(sub.closed_within(WAIT).await.is_some());
    let mut publ = v5::connected(addr, "pub5").await;
    publ.publish_acked("q5/a", false, "kept").await;
    let mut sub = v5::connect(opts()).await.unwrap();
    assert!(sub.connack.session_present);
    assert_eq!(&sub.next_publish().await.payload[..], b"kept");
}

#[tokio::test]
async fn will_is_published_when_the_socket_drops() {
    let broker = TestBroker::start().await;
    let addr = broker.first_addr();
    let mut w = watcher(addr, "wills/#").await;
    let raw = with_will(addr, "dropper", "wills/dropper", 30).await;
    drop(raw);
    let will = w.next_publish().await;
    assert_eq!(
        (will.topic.as_str(), &will.payload[..]),
        ("wills/dropper", &b"gone"[..])
    );
}

#[tokio::test]
async fn will_is_published_when_keep_alive_expires() {
    let broker = TestBroker::start().await;
    let addr = broker.first_addr();
    let mut w = watcher(addr, "wills/#").await;
    // Keep alive 1 s, then silence: the broker gives up after 1.5 s.
    let mut raw = with_will(addr, "silent", "wills/silent", 1).await;
    let will = w.next_publish().await;
    assert_eq!(will.topic, "wills/silent");
    assert!(raw.closed_within(WAIT).await, "connection closed");
}

#[tokio::test]
async fn will_is_not_published_after_disconnect() {
    let broker = TestBroker::start().await;
    let addr = broker.first_addr();
    let mut w = watcher(addr, "wills/#").await;
    let mut raw = with_will(addr, "polite", "wills/polite", 30).await;
    let mut out = BytesMut::new();
    rumqttc::mqttbytes::v4::Disconnect.write(&mut out).unwrap();
    raw.send(&out).await;
    assert!(raw.closed_within(WAIT).await);
    common::assert_quiet4(&mut w).await;
}

async fn v5_with_will(addr: SocketAddr, id: &str, topic: &str) -> Raw {
    let will = m5::LastWill::new(
        topic,
        "bye",
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        false,
        None,
    );
    let (raw, code) = Raw::connect5(addr, moatmq_testkit::connect5(id), Some(will), None).await;
    assert_eq!(code, Some(m5::ConnectReturnCode::Success));
    raw
}

#[tokio::test]
async fn will_is_published_after_v5_disconnect_with_will() {
    let broker = TestBroker::start().await;
    let addr = broker.first_addr();
    let mut w = watcher(addr, "wills/#").await;
    // DISCONNECT, reason 0x04, property length 0. (rumqttc's encoder writes remaining
    // length 1 here with a stray 0x00 after it, so the bytes are written by hand.)
    let mut raw = v5_with_will(addr, "v5will", "wills/v5").await;
    raw.send(&[0xE0, 0x02, 0x04, 0x00]).await;
    assert_eq!(w.next_publish().await.topic, "wills/v5");
    assert!(raw.closed_within(WAIT).await);
    // A normal v5 DISCONNECT sends none.
    let mut raw = v5_with_will(addr, "v5quiet", "wills/quiet").await;
    raw.send(&[0xE0, 0x00]).await;
    assert!(raw.closed_within(WAIT).await);
    common::assert_quiet4(&mut w).await;
}

/// MQTT 5 section 3.14.2.2.1: with remaining length 1 the property length is omitted.
/// rumqttd 0.20's decoder would wait for more bytes; the gateway reads it itself.
#[tokio::test]
async fn v5_disconnect_without_property_length_is_understood() {
    let broker = TestBroker::start().await;
    let addr = broker.first_addr();
    let mut w = watcher(addr, "wills/#").await;
    let mut raw = v5_with_will(addr, "short", "wills/short").await;
    raw.send(&[0xE0, 0x01, 0x00]).await;
    assert!(
        raw.closed_within(WAIT).await,
        "the broker closes after DISCONNECT"
    );
    common::assert_quiet4(&mut w).await;
}

#[tokio::test]
async fn v5_will_properties_travel_with_the_will() {
    let broker = TestBroker::start().await;
    let addr = broker.first_addr();
    let mut w = moatmq_testkit::v5::connected(addr, "props-watcher").await;
    common::subscribed5(&mut w, "wills/#").await;
    let props = m5::LastWillProperties {
        delay_interval: None,
        payload_format_indicator: Some(1),
        message_expiry_interval: None,
        content_type: Some("text/plain".into()),
        response_topic: Some("replies/x".into()),
        correlation_data: None,
        user_properties: vec![("device".into(), "d7".into())],
    };
    let will = m5::LastWill::new(
        "wills/props",
        "gone",
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        false,
        Some(props),
    );
    let (mut raw, code) =
        Raw::connect5(addr, moatmq_testkit::connect5("propwill"), Some(will), None).await;
    assert_eq!(code, Some(m5::ConnectReturnCode::Success));
    // DISCONNECT with reason 0x80 (unspecified error): not a normal one, so the will goes.
    raw.send(&[0xE0, 0x01, 0x80]).await;
    let got = w.next_publish().await;
    assert_eq!(&got.topic[..], b"wills/props");
    let p = got.properties.expect("will properties");
    assert_eq!(p.content_type.as_deref(), Some("text/plain"));
    assert_eq!(p.response_topic.as_deref(), Some("replies/x"));
    assert_eq!(
        p.user_properties,
        vec![("device".to_string(), "d7".to_string())]
    );
}

#[tokio::test]
async fn keep_alive_zero_is_accepted() {
    let broker = TestBroker::start().await;
    let addr = broker.first_addr();
    let mut c = connect4("forever");
    c.keep_alive = 0;
    let (mut raw, code) = Raw::connect4(addr, c).await;
    assert_eq!(code, Some(rumqttc::ConnectReturnCode::Success));
    let mut out = BytesMut::new();
    rumqttc::mqttbytes::v4::Subscribe::new("ka/#", QoS::AtMostOnce)
        .write(&mut out)
        .unwrap();
    raw.send(&out).await;
    assert!(matches!(
        raw.next4(WAIT).await,
        Some(rumqttc::Packet::SubAck(_))
    ));
    // MQTT 5 with keep alive 0 too.
    let mut c = moatmq_testkit::connect5("ka0-5");
    c.keep_alive = 0;
    let (mut publ, code) = Raw::connect5(addr, c, None, None).await;
    assert_eq!(code, Some(m5::ConnectReturnCode::Success));
    publ.send5(m5::Packet::Publish(m5::Publish::new(
        "ka/x",
        rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        "hi",
        None,
    )))
    .await;
    match raw.next4(WAIT).await {
        Some(rumqttc::Packet::Publish(p)) => assert_eq!(p.payload, "hi".as_bytes()),
        other => panic!("expected PUBLISH, got {other:?}"),
    }
}

#[tokio::test]
async fn a_retained_will_is_served_to_later_subscribers() {
    let broker = TestBroker::start().await;
    let addr = broker.first_addr();
    let mut c = connect4("lamp");
    c.last_will = Some(rumqttc::LastWill::new(
        "status/lamp",
        "offline",
        QoS::AtLeastOnce,
        true,
    ));
    let (raw, code) = Raw::connect4(addr, c).await;
    assert_eq!(code, Some(rumqttc::ConnectReturnCode::Success));
    drop(raw); // abnormal close: the will goes out, retained
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let mut late = v4::connected(addr, "dashboard").await;
    assert_eq!(suback4(&mut late, &["status/#"]).await, vec![V4_OK]);
    let got = late.next_publish().await;
    assert_eq!(got.topic, "status/lamp");
    assert_eq!(got.payload, "offline".as_bytes());
    assert!(got.retain);
}

#[tokio::test]
async fn a_delayed_will_goes_when_the_session_ends_if_that_is_sooner() {
    let broker = TestBroker::start().await;
    let addr = broker.first_addr();
    let mut w = watcher(addr, "wills/#").await;
    // Will delay 60 s, but the session ends with the connection: the will goes at once.
    drop(common::with_delayed_will(addr, "no-session", 60, 0).await);
    assert_eq!(w.next_publish().await.topic, "wills/no-session");
    // Will delay 60 s, session expiry 1 s: the will goes when the session ends.
    drop(common::with_delayed_will(addr, "short-session", 60, 1).await);
    assert!(w
        .publish_within(std::time::Duration::from_millis(500))
        .await
        .is_none());
    assert_eq!(w.next_publish().await.topic, "wills/short-session");
}
