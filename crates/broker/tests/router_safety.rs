//! Client sequences that reach a panic in rumqttd's router (issue 11): each must leave the
//! broker serving. docs/security.md lists every router panic and the gateway's fence.

mod common;

use bytes::BytesMut;
use moatmq_testkit::{connect4, connect5, v4, Raw, TestBroker, QUIET, WAIT};
use rumqttc::mqttbytes::v4 as m4;
use rumqttc::v5::mqttbytes::v5 as m5;
use rumqttc::v5::mqttbytes::QoS as Q5;
use rumqttc::QoS;
use std::net::SocketAddr;

/// Sends a 3.1.1 packet over a raw client.
async fn send4(raw: &mut Raw, packet: m4::Packet) {
    let mut out = BytesMut::new();
    match packet {
        m4::Packet::Subscribe(s) => s.write(&mut out),
        m4::Packet::Unsubscribe(u) => u.write(&mut out),
        m4::Packet::PubAck(a) => a.write(&mut out),
        m4::Packet::PubRel(r) => r.write(&mut out),
        m4::Packet::PubComp(c) => c.write(&mut out),
        m4::Packet::PubRec(r) => r.write(&mut out),
        m4::Packet::Publish(p) => p.write(&mut out),
        other => panic!("not used here: {other:?}"),
    }
    .expect("encode");
    raw.send(&out).await;
}

/// A persistent 3.1.1 session subscribing to `filters` at QoS 1: the SUBACK codes.
async fn persistent4(
    addr: SocketAddr,
    id: &str,
    filters: &[&str],
) -> (Raw, Vec<rumqttc::SubscribeReasonCode>) {
    let mut c = connect4(id);
    c.clean_session = false;
    let (mut raw, code) = Raw::connect4(addr, c).await;
    assert_eq!(code, Some(rumqttc::ConnectReturnCode::Success));
    let mut sub = m4::Subscribe::new_many(
        filters
            .iter()
            .map(|f| m4::SubscribeFilter::new(f.to_string(), QoS::AtLeastOnce)),
    );
    sub.pkid = 1;
    send4(&mut raw, m4::Packet::Subscribe(sub)).await;
    match raw.next4(WAIT).await {
        Some(rumqttc::Packet::SubAck(ack)) => (raw, ack.return_codes),
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

/// Publishes one QoS 1 message from a fresh client.
async fn publish_one(addr: SocketAddr, topic: &str) {
    let mut publ = v4::connected(addr, "publisher").await;
    publ.publish_acked(topic, false, "m").await;
}

/// Waits for a QoS 1 PUBLISH on a raw 3.1.1 client and leaves it unacknowledged.
async fn unacked4(raw: &mut Raw) {
    loop {
        match raw.next4(WAIT).await {
            Some(rumqttc::Packet::Publish(p)) => {
                assert_eq!(p.qos, QoS::AtLeastOnce);
                return;
            }
            Some(_) => continue,
            None => panic!("no PUBLISH"),
        }
    }
}

/// The broker still accepts, routes and delivers for a second client.
async fn still_serving(addr: SocketAddr) {
    tokio::time::sleep(QUIET).await;
    common::assert_serving(addr).await;
}

/// The sequence: a persistent session, the only member of a shared group, drops
/// with one QoS 1 message unacknowledged. rumqttd panics saving that session, so a
/// persistent session's shared subscription is refused (clean sessions keep them).
#[tokio::test]
async fn sole_shared_member_of_a_persistent_session_drops_with_unacked_v4() {
    let broker = TestBroker::start().await;
    let addr = broker.first_addr();
    let (mut solo, codes) = persistent4(addr, "solo", &["$share/solo/alice/#", "alice/#"]).await;
    assert_eq!(
        codes,
        vec![
            rumqttc::SubscribeReasonCode::Failure,
            rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce)
        ]
    );
    publish_one(addr, "alice/x").await;
    unacked4(&mut solo).await;
    drop(solo);
    still_serving(addr).await;
    // A clean session still shares.
    let mut clean = v4::connected(addr, "clean-sharer").await;
    assert_eq!(
        common::suback4(&mut clean, &["$share/solo/alice/#"]).await,
        vec![common::V4_OK]
    );
    publish_one(addr, "alice/y").await;
    assert_eq!(clean.next_publish().await.topic, "alice/y");
}

#[tokio::test]
async fn sole_shared_member_of_a_persistent_session_drops_with_unacked_v5() {
    let broker = TestBroker::start().await;
    let addr = broker.first_addr();
    let mut c = connect5("solo5");
    c.properties = Some(m5::ConnectProperties {
        session_expiry_interval: Some(300),
        ..m5::ConnectProperties::new()
    });
    let mut raw = Raw::tcp(addr).await;
    raw.send5(m5::Packet::Connect(c, None, None)).await;
    match raw.next5(WAIT).await {
        Some(m5::Packet::ConnAck(ack)) => {
            assert_eq!(ack.code, m5::ConnectReturnCode::Success);
            let props = ack.properties.expect("CONNACK properties");
            assert_eq!(props.shared_subscription_available, Some(0));
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
    let codes = raw.subscribe5(1, &["$share/solo/alice/#", "alice/#"]).await;
    assert_eq!(
        codes,
        vec![
            m5::SubscribeReasonCode::SharedSubscriptionsNotSupported,
            m5::SubscribeReasonCode::Success(Q5::AtLeastOnce)
        ]
    );
    publish_one(addr, "alice/x").await;
    loop {
        match raw.next5(WAIT).await {
            Some(m5::Packet::Publish(p)) => {
                assert_eq!(p.qos, Q5::AtLeastOnce);
                break;
            }
            Some(_) => continue,
            None => panic!("no PUBLISH"),
        }
    }
    drop(raw);
    still_serving(addr).await;
}

/// A second connection with the same client id: the router never takes the session over
/// itself (its own teardown is where it panics); the old connection closes first.
#[tokio::test]
async fn takeover_of_a_persistent_session_with_a_message_in_flight() {
    let broker = TestBroker::start().await;
    let addr = broker.first_addr();
    let (mut old, _) = persistent4(addr, "taken", &["alice/#"]).await;
    publish_one(addr, "alice/x").await;
    unacked4(&mut old).await;
    let mut c = connect4("taken");
    c.clean_session = false;
    let (mut new, code) = Raw::connect4(addr, c).await;
    assert_eq!(code, Some(rumqttc::ConnectReturnCode::Success));
    assert!(
        old.closed_within(WAIT).await,
        "the old connection is closed"
    );
    // The unacknowledged message comes again on the new connection.
    unacked4(&mut new).await;
    still_serving(addr).await;
}

/// Acknowledgements for nothing in flight made the router drop the link (and a router
/// teardown is where it panics): they are dropped at the gateway, the client stays.
#[tokio::test]
async fn acknowledgements_for_nothing_in_flight_keep_the_connection() {
    let broker = TestBroker::start().await;
    let addr = broker.first_addr();
    let bogus = [
        m4::Packet::PubAck(m4::PubAck::new(999)),
        m4::Packet::PubRec(m4::PubRec::new(999)),
        m4::Packet::PubComp(m4::PubComp::new(999)),
        m4::Packet::PubRel(m4::PubRel::new(999)),
    ];
    for (i, packet) in bogus.into_iter().enumerate() {
        let (mut c, _) = persistent4(addr, &format!("bogus-{i}"), &["alice/#"]).await;
        publish_one(addr, "alice/x").await;
        unacked4(&mut c).await;
        send4(&mut c, packet).await;
        assert!(
            !c.closed_within(QUIET).await,
            "bogus ack {i} dropped the link"
        );
        drop(c);
        still_serving(addr).await;
    }
}

/// MQTT-3.3.4-6: a client's PUBLISH must not carry a subscription identifier. The router
/// would drop the link itself; the gateway closes it with a protocol error.
#[tokio::test]
async fn publish_with_a_subscription_identifier_is_a_protocol_error() {
    let broker = TestBroker::start().await;
    let addr = broker.first_addr();
    let (mut c, code) = Raw::connect5(addr, connect5("subid"), None, None).await;
    assert_eq!(code, Some(m5::ConnectReturnCode::Success));
    let props = m5::PublishProperties {
        subscription_identifiers: vec![7],
        ..Default::default()
    };
    let publish = m5::Publish::new("alice/y", Q5::AtMostOnce, "x", Some(props));
    c.send5(m5::Packet::Publish(publish)).await;
    let bytes = c.bytes_until_closed(WAIT).await.expect("closed");
    // DISCONNECT with reason 0x82 (protocol error).
    assert_eq!(bytes.get(..1), Some(&[0xE0][..]), "{bytes:?}");
    assert!(bytes.contains(&0x82), "{bytes:?}");
    still_serving(addr).await;
}
