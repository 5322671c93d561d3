//! Helpers shared by the broker's integration tests: SUBACK waiting for the rumqttc
//! clients, login options, and checks that a broker still serves. (The raw client and
//! the broker builder are in moatmq-testkit.)
//!
//! Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use moatmq_testkit::{v4, v5, Raw, TestBroker, QUIET};
use rumqttc::v5::mqttbytes::v5 as m5;
use rumqttc::v5::mqttbytes::QoS as Q5;
use rumqttc::QoS;
use std::net::SocketAddr;

/// Subscribes a 3.1.1 client and returns the SUBACK codes.
pub async fn suback4(c: &mut v4::Client, filters: &[&str]) -> Vec<rumqttc::SubscribeReasonCode> {
    let subs = filters
        .iter()
        .map(|f| rumqttc::SubscribeFilter::new(f.to_string(), QoS::AtLeastOnce));
    c.client
        .subscribe_many(subs)
        .await
        .expect("subscribe queued");
    c.incoming(|p| match p {
        rumqttc::Packet::SubAck(ack) => Some(ack.return_codes.clone()),
        _ => None,
    })
    .await
    .expect("SUBACK")
}

/// Subscribes a v5 rumqttc client to granted filters and waits for the SUBACK.
/// (rumqttc's v5 event loop ends on any refusal code: use [`Raw`] for refusals.)
pub async fn subscribed5(c: &mut v5::Client, filter: &str) {
    c.client
        .subscribe(filter, Q5::AtLeastOnce)
        .await
        .expect("subscribe queued");
    c.incoming(|p| matches!(p, m5::Packet::SubAck(_)).then_some(()))
        .await
        .expect("SUBACK");
}

/// The 3.1.1 SUBACK code for a granted QoS 1 subscription.
pub const V4_OK: rumqttc::SubscribeReasonCode =
    rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce);
/// The 3.1.1 SUBACK refusal (0x80).
pub const V4_NO: rumqttc::SubscribeReasonCode = rumqttc::SubscribeReasonCode::Failure;

/// Checks that the broker at `addr` still serves a well-behaved client end to end.
pub async fn assert_serving(addr: SocketAddr) {
    let mut sub = v4::connected(addr, "healthy-sub").await;
    let codes = suback4(&mut sub, &["health/#"]).await;
    assert_eq!(codes, vec![V4_OK]);
    let publ = v4::connected(addr, "healthy-pub").await;
    publ.client
        .publish("health/check", QoS::AtLeastOnce, false, "ok")
        .await
        .unwrap();
    assert_eq!(sub.next_publish().await.payload, "ok".as_bytes());
}

/// Options for a 3.1.1 client with a username and password.
pub fn login4(addr: SocketAddr, id: &str, user: &str, pass: &str) -> v4::MqttOptions {
    let mut o = v4::options(addr, id);
    o.set_credentials(user, pass);
    o
}

/// Options for an MQTT 5 client with a username and password.
pub fn login5(addr: SocketAddr, id: &str, user: &str, pass: &str) -> v5::MqttOptions {
    let mut o = v5::options(addr, id);
    o.set_credentials(user, pass);
    o
}

/// Waits [`QUIET`] and asserts no PUBLISH arrived.
pub async fn assert_quiet4(c: &mut v4::Client) {
    if let Some(p) = c.publish_within(QUIET).await {
        panic!("unexpected delivery on {}: {:?}", p.topic, p.payload);
    }
}

/// An anonymous broker with an encrypted retained store (and so durable sessions),
/// saved every `autosave_interval` seconds.
pub async fn broker_with_store(autosave_interval: i64) -> TestBroker {
    TestBroker::builder()
        .anonymous()
        .retained_store()
        .set("retained", "autosave_interval", autosave_interval)
        .start()
        .await
}

/// A connected v5 client with session expiry `expiry` s (clean start off) and a QoS 1
/// will "gone" on `wills/<id>` delayed by `delay` s.
pub async fn with_delayed_will(addr: SocketAddr, id: &str, delay: u32, expiry: u32) -> Raw {
    let mut connect = moatmq_testkit::connect5(id);
    connect.clean_start = false;
    connect.properties = Some(m5::ConnectProperties {
        session_expiry_interval: Some(expiry),
        ..m5::ConnectProperties::new()
    });
    let will = moatmq_testkit::delayed_will5(&format!("wills/{id}"), "gone", delay);
    let (raw, code) = Raw::connect5(addr, connect, Some(will), None).await;
    assert_eq!(code, Some(m5::ConnectReturnCode::Success));
    raw
}
