//! Session expiry: rumqttd keeps persistent sessions forever; the gateway expires them
//! after the MQTT 5 session expiry interval, capped by `limits.max_session_expiry`,
//! which also bounds 3.1.1 persistent sessions.

use moatmq_testkit::{v4, Raw, TestBroker, WAIT};
use rumqttc::v5::mqttbytes::v5 as m5;
use std::net::SocketAddr;
use std::time::Duration;

/// Connects (MQTT 5) and returns the socket and the CONNACK.
async fn connect(
    addr: SocketAddr,
    id: &str,
    clean: bool,
    expiry: Option<u32>,
) -> (Raw, m5::ConnAck) {
    let mut connect = moatmq_testkit::connect5(id);
    connect.clean_start = clean;
    connect.properties = expiry.map(|e| m5::ConnectProperties {
        session_expiry_interval: Some(e),
        ..m5::ConnectProperties::new()
    });
    Raw::connack5(addr, connect).await
}

async fn disconnect(mut raw: Raw) {
    raw.send(&[0xE0, 0x00]).await;
    assert!(raw.closed_within(WAIT).await);
}

#[tokio::test]
async fn mqtt5_session_lives_for_its_expiry_interval_then_goes() {
    let broker = TestBroker::start().await;
    let addr = broker.first_addr();
    let (mut raw, ack) = connect(addr, "exp", false, Some(1)).await;
    assert!(!ack.session_present);
    let codes = raw.subscribe5(1, &["exp/t"]).await;
    assert_eq!(codes.len(), 1);
    disconnect(raw).await;

    // Back within the interval: the session is there.
    let (raw, ack) = connect(addr, "exp", false, Some(1)).await;
    assert!(ack.session_present, "resumed within the expiry interval");
    disconnect(raw).await;

    // Back after it: gone, and so is its subscription.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let (mut raw, ack) = connect(addr, "exp", false, Some(1)).await;
    assert!(
        !ack.session_present,
        "the session outlived its expiry interval"
    );
    let publ = v4::connected(addr, "exp-pub").await;
    publ.client
        .publish("exp/t", rumqttc::QoS::AtLeastOnce, false, "x")
        .await
        .unwrap();
    assert!(raw
        .publish5_within(Duration::from_millis(400))
        .await
        .is_none());
}

#[tokio::test]
async fn mqtt5_expiry_zero_ends_the_session_with_the_connection() {
    let broker = TestBroker::start().await;
    let addr = broker.first_addr();
    let (raw, _) = connect(addr, "zero", false, Some(60)).await;
    disconnect(raw).await;
    // Resumed (clean start off), but with expiry 0 this time...
    let (raw, ack) = connect(addr, "zero", false, None).await;
    assert!(ack.session_present);
    disconnect(raw).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // ...so it ended with that connection.
    let (_raw, ack) = connect(addr, "zero", false, None).await;
    assert!(!ack.session_present);
}

#[tokio::test]
async fn expiry_is_capped_and_the_cap_announced() {
    let broker = TestBroker::builder()
        .anonymous()
        .limit("max_session_expiry", 1)
        .start()
        .await;
    let addr = broker.first_addr();
    let (raw, ack) = connect(addr, "capped", false, Some(u32::MAX)).await;
    let announced = ack.properties.and_then(|p| p.session_expiry_interval);
    assert_eq!(
        announced,
        Some(1),
        "MQTT 5 CONNACK announces the shorter interval"
    );
    disconnect(raw).await;
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let (_raw, ack) = connect(addr, "capped", false, Some(u32::MAX)).await;
    assert!(!ack.session_present, "\"never expire\" is capped too");

    // 3.1.1 persistent sessions are bounded by the same cap.
    let mut opts = v4::options(addr, "old-style");
    opts.set_clean_session(false);
    let c = v4::connect(opts.clone()).await.unwrap();
    c.client.disconnect().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let c = v4::connect(opts.clone()).await.unwrap();
    assert!(c.connack.session_present);
    c.client.disconnect().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let c = v4::connect(opts).await.unwrap();
    assert!(!c.connack.session_present);
}

/// A v5 client with session expiry `expiry` that sends DISCONNECT with `props` (the
/// raw property bytes after the reason code).
async fn disconnect_with(addr: SocketAddr, id: &str, expiry: u32, props: &[u8]) -> Raw {
    let (mut raw, ack) = connect(addr, id, false, Some(expiry)).await;
    assert_eq!(ack.code, m5::ConnectReturnCode::Success);
    let mut body = vec![0x00, props.len() as u8];
    body.extend_from_slice(props);
    let mut frame = vec![0xE0, body.len() as u8];
    frame.extend_from_slice(&body);
    raw.send(&frame).await;
    raw
}

#[tokio::test]
async fn a_disconnect_sets_a_new_session_expiry() {
    let broker = TestBroker::start().await;
    let addr = broker.first_addr();
    // Kept for 300 s by its CONNECT, ended at once by its DISCONNECT (0x11 = 0).
    let mut raw = disconnect_with(addr, "shortened", 300, &[0x11, 0, 0, 0, 0]).await;
    assert!(raw.closed_within(WAIT).await);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let (_, ack) = connect(addr, "shortened", false, Some(300)).await;
    assert!(!ack.session_present, "the DISCONNECT's 0 ended the session");
    // 0 in the CONNECT cannot be raised by the DISCONNECT: protocol error 0x82.
    let mut raw = disconnect_with(addr, "raised", 0, &[0x11, 0, 0, 0, 60]).await;
    match raw.next5(WAIT).await {
        Some(m5::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, m5::DisconnectReasonCode::ProtocolError)
        }
        other => panic!("expected DISCONNECT 0x82, got {other:?}"),
    }
}

#[tokio::test]
async fn a_session_ended_by_its_disconnect_is_gone_for_a_client_back_at_once() {
    // Paho's test_session_expiry reconnects right after a DISCONNECT with expiry 0: the
    // session must already be gone then, not some time later.
    let broker = TestBroker::start().await;
    let addr = broker.first_addr();
    for round in 0..20 {
        let (mut raw, _) = connect(addr, "at-once", true, Some(300)).await;
        assert_eq!(raw.subscribe5(1, &["at-once/t"]).await.len(), 1);
        raw.send(&[0xE0, 0x07, 0x00, 0x05, 0x11, 0, 0, 0, 0]).await;
        let (_, ack) = connect(addr, "at-once", false, Some(300)).await;
        assert!(
            !ack.session_present,
            "round {round}: the session outlived its end"
        );
    }
}
