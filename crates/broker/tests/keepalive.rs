//! `limits.max_keepalive` (Mosquitto's `max_keepalive`, MQTT 5 server keep alive,
//! 3.2.2.3.14): an MQTT 5 client asking for no keep alive or a longer one is told the
//! maximum in its CONNACK and held to it; a 3.1.1 client, which cannot be told, is
//! refused; by default nothing is capped.

mod common;
use moatmq_testkit::{connect4, connect5, v4, Raw, TestBroker, WAIT};
use rumqttc::v5::mqttbytes::v5 as m5;
use std::net::SocketAddr;

async fn broker(max_keepalive: Option<i64>) -> TestBroker {
    let b = TestBroker::builder().anonymous().no_connection_rate();
    match max_keepalive {
        Some(k) => b.limit("max_keepalive", k).start().await,
        None => b.start().await,
    }
}

/// The server keep alive a v5 client asking for `keep_alive` is told.
async fn told5(addr: SocketAddr, keep_alive: u16) -> (Raw, Option<u16>) {
    let mut c = connect5(&format!("ka{keep_alive}"));
    c.keep_alive = keep_alive;
    let mut raw = Raw::tcp(addr).await;
    raw.send5(m5::Packet::Connect(c, None, None)).await;
    match raw.next5(WAIT).await {
        Some(m5::Packet::ConnAck(ack)) => {
            assert_eq!(ack.code, m5::ConnectReturnCode::Success);
            (raw, ack.properties.and_then(|p| p.server_keep_alive))
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

#[tokio::test]
async fn an_mqtt_5_client_is_told_the_maximum_and_held_to_it() {
    let broker = broker(Some(1)).await;
    let addr = broker.first_addr();
    assert_eq!(told5(addr, 0).await.1, Some(1), "no keep alive asked");
    assert_eq!(told5(addr, 60).await.1, Some(1), "a longer one asked");
    assert_eq!(told5(addr, 1).await.1, None, "within the maximum");
    // Told 1 s, the silent client is closed after 1.5 s: keep alive timeout (0x8D).
    let (mut raw, _) = told5(addr, 0).await;
    match raw.next5(WAIT).await {
        Some(m5::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, m5::DisconnectReasonCode::KeepAliveTimeout)
        }
        other => panic!("expected DISCONNECT 0x8D, got {other:?}"),
    }
}

#[tokio::test]
async fn a_3_1_1_client_over_the_maximum_is_refused() {
    let broker = broker(Some(30)).await;
    let addr = broker.first_addr();
    for keep_alive in [0, 31] {
        let mut c = connect4("old");
        c.keep_alive = keep_alive;
        let (_, code) = Raw::connect4(addr, c).await;
        assert_eq!(
            code,
            Some(rumqttc::ConnectReturnCode::BadClientId),
            "{keep_alive}"
        );
    }
    let mut c = connect4("fine");
    c.keep_alive = 30;
    assert_eq!(
        Raw::connect4(addr, c).await.1,
        Some(rumqttc::ConnectReturnCode::Success)
    );
}

#[tokio::test]
async fn by_default_nothing_is_capped() {
    let broker = broker(None).await;
    let addr = broker.first_addr();
    assert_eq!(told5(addr, 0).await.1, None);
    let mut o = v4::options(addr, "zero");
    o.set_keep_alive(std::time::Duration::ZERO);
    assert!(v4::connect(o).await.is_ok());
}
