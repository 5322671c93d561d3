//! Bad input from a raw socket: each case gets that one connection closed (MQTT 5: with
//! the right DISCONNECT or CONNACK reason first), while a client connected before it
//! keeps receiving and new well-behaved clients still publish and subscribe.

mod common;

use bytes::BytesMut;
use common::{suback4, V4_OK};
use moatmq_testkit::wire::{self, Version};
use moatmq_testkit::{connect4, connect5, v4, Raw, TestBroker, WAIT};
use rumqttc::v5::mqttbytes::v5 as m5;
use rumqttc::v5::mqttbytes::QoS as Q5;
use rumqttc::QoS;
use std::time::Duration;

/// A broker and a subscriber connected before the bad input arrives.
struct Scene {
    broker: TestBroker,
    bystander: v4::Client,
}

impl Scene {
    async fn start() -> Scene {
        let broker = TestBroker::builder()
            .anonymous()
            .limit("max_packet_size", 1024)
            .limit("connect_timeout", 1)
            .start()
            .await;
        let mut bystander = v4::connected(broker.first_addr(), "bystander").await;
        assert_eq!(suback4(&mut bystander, &["by/#"]).await, vec![V4_OK]);
        Scene { broker, bystander }
    }

    fn addr(&self) -> std::net::SocketAddr {
        self.broker.first_addr()
    }

    /// The bystander still receives, and new clients are served.
    async fn everyone_else_is_fine(mut self) {
        let publ = v4::connected(self.addr(), "after").await;
        publ.client
            .publish("by/x", QoS::AtLeastOnce, false, "still here")
            .await
            .unwrap();
        assert_eq!(
            self.bystander.next_publish().await.payload,
            "still here".as_bytes()
        );
        common::assert_serving(self.addr()).await;
    }

    async fn v4(&self) -> Raw {
        let (raw, code) = Raw::connect4(self.addr(), connect4("bad4")).await;
        assert_eq!(code, Some(rumqttc::ConnectReturnCode::Success));
        raw
    }

    async fn v5(&self) -> Raw {
        let (raw, code) = Raw::connect5(self.addr(), connect5("bad5"), None, None).await;
        assert_eq!(code, Some(m5::ConnectReturnCode::Success));
        raw
    }
}

/// The DISCONNECT reason the broker sends before closing (`None`: closed without one).
async fn disconnect_reason(raw: &mut Raw) -> Option<m5::DisconnectReasonCode> {
    let reason = match raw.next5(WAIT).await {
        Some(m5::Packet::Disconnect(d)) => Some(d.reason_code),
        Some(other) => panic!("expected DISCONNECT, got {other:?}"),
        None => None,
    };
    assert!(raw.closed_within(WAIT).await, "connection closed");
    reason
}

fn publish5(topic: &[u8], payload: usize) -> m5::Packet {
    m5::Packet::Publish(m5::Publish {
        dup: false,
        qos: Q5::AtLeastOnce,
        retain: false,
        topic: bytes::Bytes::copy_from_slice(topic),
        pkid: 1,
        payload: vec![b'x'; payload].into(),
        properties: None,
    })
}

/// A 3.1.1 QoS 1 PUBLISH, packet id 1, of `payload` bytes.
fn publish4(topic: &[u8], payload: usize) -> Vec<u8> {
    let payload = vec![b'x'; payload];
    wire::Publish::new(Version::V4, topic, &payload)
        .qos(1, 1)
        .encode()
}

#[tokio::test]
async fn malformed_packets_close_the_connection() {
    let scene = Scene::start().await;
    // Reserved packet type 15 (3.1.1).
    let mut raw = scene.v4().await;
    raw.send(&[0xF0, 0x00]).await;
    assert!(raw.closed_within(WAIT).await);
    // A remaining length longer than four bytes.
    let mut raw = scene.v4().await;
    raw.send(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]).await;
    assert!(raw.closed_within(WAIT).await);
    // SUBSCRIBE with the wrong fixed-header flags (MQTT 5).
    let mut raw = scene.v5().await;
    raw.send(&[0x80, 0x06, 0x00, 0x01, 0x00, 0x00, 0x01, b'a'])
        .await;
    let reason = disconnect_reason(&mut raw).await;
    assert!(
        matches!(
            reason,
            None | Some(m5::DisconnectReasonCode::MalformedPacket)
                | Some(m5::DisconnectReasonCode::ProtocolError)
        ),
        "{reason:?}"
    );
    // A CONNECT whose client id runs past its packet.
    let mut raw = Raw::tcp(scene.addr()).await;
    raw.send(&[
        0x10, 0x0E, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 30, 0, 50, b'a', b'b', b'c', b'd',
    ])
    .await;
    assert!(raw.closed_within(WAIT).await);
    scene.everyone_else_is_fine().await;
}

#[tokio::test]
async fn oversized_packet_closes_the_connection() {
    let scene = Scene::start().await;
    let mut raw = scene.v5().await;
    raw.send5(publish5(b"by/big", 2000)).await;
    assert_eq!(
        disconnect_reason(&mut raw).await,
        Some(m5::DisconnectReasonCode::PacketTooLarge)
    );
    let mut raw = scene.v4().await;
    raw.send(&publish4(b"by/big", 2000)).await;
    assert!(raw.closed_within(WAIT).await);
    // Only the header of a huge packet: refused before the body arrives.
    let mut raw = scene.v4().await;
    raw.send(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F]).await;
    assert!(raw.closed_within(WAIT).await);
    scene.everyone_else_is_fine().await;
}

#[tokio::test]
async fn publish_to_a_wildcard_topic_closes_the_connection() {
    let scene = Scene::start().await;
    for topic in [&b"by/#"[..], b"by/+/x"] {
        let mut raw = scene.v5().await;
        raw.send5(publish5(topic, 3)).await;
        assert_eq!(
            disconnect_reason(&mut raw).await,
            Some(m5::DisconnectReasonCode::TopicNameInvalid)
        );
        let mut raw = scene.v4().await;
        raw.send(&publish4(topic, 3)).await;
        assert!(raw.closed_within(WAIT).await);
    }
    common::assert_quiet4(&mut { scene.bystander }).await;
}

#[tokio::test]
async fn publish_with_invalid_utf8_topic_closes_the_connection() {
    let scene = Scene::start().await;
    let bad = &b"by/\xC3\x28"[..];
    let mut raw = scene.v5().await;
    raw.send5(publish5(bad, 3)).await;
    let reason = disconnect_reason(&mut raw).await;
    assert!(
        matches!(
            reason,
            Some(m5::DisconnectReasonCode::TopicNameInvalid)
                | Some(m5::DisconnectReasonCode::MalformedPacket)
        ),
        "{reason:?}"
    );
    let mut raw = scene.v4().await;
    raw.send(&publish4(bad, 3)).await;
    assert!(raw.closed_within(WAIT).await);
    scene.everyone_else_is_fine().await;
}

#[tokio::test]
async fn first_packet_not_connect_closes_the_connection() {
    let scene = Scene::start().await;
    let mut raw = Raw::tcp(scene.addr()).await;
    raw.send(&[0xC0, 0x00]).await; // PINGREQ
    assert_eq!(raw.bytes_until_closed(WAIT).await, Some(vec![]));
    let mut raw = Raw::tcp(scene.addr()).await;
    raw.send(&publish4(b"by/x", 3)).await;
    assert_eq!(raw.bytes_until_closed(WAIT).await, Some(vec![]));
    let mut raw = Raw::tcp(scene.addr()).await;
    raw.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(raw.bytes_until_closed(WAIT).await, Some(vec![]));
    scene.everyone_else_is_fine().await;
}

#[tokio::test]
async fn no_connect_within_the_connect_timeout_closes_the_connection() {
    let scene = Scene::start().await;
    let started = tokio::time::Instant::now();
    let mut silent = Raw::tcp(scene.addr()).await;
    // Half a CONNECT does not count either.
    let mut partial = Raw::tcp(scene.addr()).await;
    partial.send(&[0x10, 0x10, 0, 4, b'M']).await;
    assert!(silent.closed_within(Duration::from_secs(3)).await);
    assert!(partial.closed_within(Duration::from_secs(3)).await);
    assert!(started.elapsed() >= Duration::from_millis(900), "too early");
    scene.everyone_else_is_fine().await;
}

#[tokio::test]
async fn second_connect_closes_the_connection() {
    let scene = Scene::start().await;
    let mut raw = scene.v5().await;
    raw.send5(m5::Packet::Connect(connect5("again"), None, None))
        .await;
    assert_eq!(
        disconnect_reason(&mut raw).await,
        Some(m5::DisconnectReasonCode::ProtocolError)
    );
    let mut raw = scene.v4().await;
    let mut out = BytesMut::new();
    connect4("again").write(&mut out).unwrap();
    raw.send(&out).await;
    assert!(raw.closed_within(WAIT).await);
    scene.everyone_else_is_fine().await;
}

#[tokio::test]
async fn unsupported_protocol_level_gets_connack_0x01() {
    let scene = Scene::start().await;
    let mut raw = Raw::tcp(scene.addr()).await;
    // MQTT 3.1 ("MQIsdp", level 3) is not supported.
    let mut connect = vec![0x10, 0x11, 0, 6];
    connect.extend_from_slice(b"MQIsdp");
    connect.extend_from_slice(&[3, 2, 0, 30, 0, 3, b'o', b'l', b'd']);
    raw.send(&connect).await;
    assert_eq!(
        raw.bytes_until_closed(WAIT).await,
        Some(vec![0x20, 0x02, 0x00, 0x01])
    );
    scene.everyone_else_is_fine().await;
}

/// Enhanced authentication (4.12) is not supported: a CONNECT naming an authentication
/// method is refused with 0x8C rather than let in by username, password or anonymity
/// (MQTT-4.12.0-1), and an AUTH packet from a client that agreed no method is a
/// protocol error (0x82), not a malformed packet.
#[tokio::test]
async fn enhanced_authentication_is_refused_not_ignored() {
    let scene = Scene::start().await;
    let mut connect = connect5("scram");
    connect.properties = Some(m5::ConnectProperties {
        authentication_method: Some("SCRAM-SHA-256".into()),
        authentication_data: Some(bytes::Bytes::from_static(b"n,,n=user,r=nonce")),
        ..m5::ConnectProperties::new()
    });
    let (mut raw, ack) = Raw::connack5(scene.addr(), connect).await;
    assert_eq!(ack.code, m5::ConnectReturnCode::BadAuthenticationMethod);
    assert!(raw.closed_within(WAIT).await, "closed after the CONNACK");

    let mut raw = scene.v5().await;
    // AUTH, reason 0x18 (continue authentication), no properties.
    raw.send(&[0xF0, 0x02, 0x18, 0x00]).await;
    assert_eq!(
        disconnect_reason(&mut raw).await,
        Some(m5::DisconnectReasonCode::ProtocolError)
    );
    scene.everyone_else_is_fine().await;
}

/// A Receive Maximum or Maximum Packet Size of 0 in a CONNECT is a protocol error
/// (3.1.2.11.3, 3.1.2.11.4): refused with CONNACK 0x82. Taken at its word, a maximum
/// packet size of 0 would have every message to that client dropped as too large.
#[tokio::test]
async fn a_zero_receive_maximum_or_maximum_packet_size_is_refused() {
    let scene = Scene::start().await;
    for (receive_maximum, max_packet_size) in [(Some(0), None), (None, Some(0))] {
        let mut connect = connect5("zero");
        connect.properties = Some(m5::ConnectProperties {
            receive_maximum,
            max_packet_size,
            ..m5::ConnectProperties::new()
        });
        let (mut raw, ack) = Raw::connack5(scene.addr(), connect).await;
        assert_eq!(
            ack.code,
            m5::ConnectReturnCode::ProtocolError,
            "receive maximum {receive_maximum:?}, maximum packet size {max_packet_size:?}"
        );
        assert!(raw.closed_within(WAIT).await, "closed after the CONNACK");
    }
    scene.everyone_else_is_fine().await;
}
