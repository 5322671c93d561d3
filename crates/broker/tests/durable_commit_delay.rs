//! With `autosave_interval = 0` a persistent session's QoS 2 state is in the session
//! store before the client sees the packet it follows from: the PUBLISH once the store
//! holds the message as sent under its packet id, the PUBREL once it holds it as
//! released, the PUBCOMP of an incoming exchange once its packet id is no longer
//! pending. A crash in between would otherwise make the broker send the message again
//! as a new one (or the message again where the client completed the exchange):
//! delivered twice (the kill -9 case end to end: e2e
//! `qos_2_deliveries_stay_exactly_once_across_kill_9`); or take the client's next
//! message under that packet id for a resend: acknowledged and lost. Here a test hook makes every
//! commit 700 ms slower, so a packet written before its commit is read before the store
//! has it; the store is read from its files as `moatmq sessions list` does. Its own
//! process: the hook is an environment variable.

use moatmq_store::{Delivery, RetainedKey};
use moatmq_testkit::wire::{self, Version};
use moatmq_testkit::{v4, Raw, TestBroker, WAIT};
use rumqttc::QoS;

/// The session `id` as the store's files hold it.
fn stored_session(broker: &TestBroker, id: &str) -> moatmq_store::Session {
    let key = RetainedKey::load(&broker.path("retained.key")).expect("key");
    moatmq_store::read_sessions(&broker.path("data/retained"), &key)
        .expect("sessions")
        .into_iter()
        .find(|s| s.key.client_id == id)
        .expect("the session stored")
}

/// How `ledger`'s messages stand in the store's files: their deliveries.
fn stored(broker: &TestBroker) -> Vec<Delivery> {
    let ledger = stored_session(broker, "ledger");
    ledger.messages.values().map(|m| m.delivery).collect()
}

async fn broker() -> TestBroker {
    std::env::set_var("MOATMQ_TEST_SESSION_COMMIT_DELAY_MS", "700");
    TestBroker::builder()
        .anonymous()
        .retained_store()
        .set("retained", "autosave_interval", 0)
        .start()
        .await
}

/// A raw 3.1.1 client with the persistent session `id`.
async fn persistent(addr: std::net::SocketAddr, id: &str) -> Raw {
    let mut connect = wire::Connect::new(Version::V4, id);
    connect.clean = false;
    Raw::accepted(addr, &connect).await.0
}

#[tokio::test]
async fn qos_2_packets_reach_a_persistent_client_only_once_their_state_is_stored() {
    let broker = broker().await;
    let addr = broker.first_addr();
    let mut sub = persistent(addr, "ledger").await;
    sub.send(&wire::subscribe(Version::V4, 1, &[(b"ledger/#", 2)]))
        .await;
    assert_eq!(
        sub.frame_within(WAIT).await.expect("SUBACK").first,
        wire::first::SUBACK
    );

    let publ = v4::connected(addr, "ledger-writer").await;
    publ.client
        .publish("ledger/x", QoS::ExactlyOnce, false, "1 EUR")
        .await
        .unwrap();
    let f = sub.frame_within(WAIT).await.expect("PUBLISH");
    assert_eq!(f.first, wire::first::PUBLISH | 4);
    let pkid = wire::publish_pkid(f.first, &f.body).expect("a packet id");
    assert_eq!(
        stored(&broker),
        vec![Delivery::Sent { pkid }],
        "the PUBLISH reached the client before the store had it as sent"
    );

    sub.send(&wire::ack(wire::first::PUBREC, pkid)).await;
    let rel = sub.frame_within(WAIT).await.expect("PUBREL");
    assert_eq!(
        (rel.first, &rel.body[..2]),
        (wire::first::PUBREL, &pkid.to_be_bytes()[..])
    );
    assert_eq!(
        stored(&broker),
        vec![Delivery::Released { pkid }],
        "the PUBREL reached the client before the store had the message as released"
    );
}

#[tokio::test]
async fn the_pubcomp_of_an_incoming_qos_2_exchange_goes_out_once_it_is_stored() {
    let broker = broker().await;
    let mut payer = persistent(broker.first_addr(), "payer").await;
    let publish = wire::Publish::new(Version::V4, b"pay/1", b"100 EUR").qos(2, 7);
    payer.send(&publish.encode()).await;
    let rec = payer.frame_within(WAIT).await.expect("PUBREC");
    assert_eq!(rec.first, wire::first::PUBREC);
    assert!(stored_session(&broker, "payer").qos2_in.contains(&7));
    payer.send(&wire::ack(wire::first::PUBREL, 7)).await;
    let comp = payer.frame_within(WAIT).await.expect("PUBCOMP");
    assert_eq!(comp.first, wire::first::PUBCOMP);
    assert!(
        stored_session(&broker, "payer").qos2_in.is_empty(),
        "the PUBCOMP went out while the store still had the exchange pending"
    );
}

/// Told its session is present, a client does not subscribe again: a SUBACK given
/// before the subscription is stored, then a crash, would leave it subscribed to
/// nothing.
#[tokio::test]
async fn a_persistent_sessions_suback_and_unsuback_go_out_once_stored() {
    let broker = broker().await;
    let mut sub = persistent(broker.first_addr(), "alarm-panel").await;
    let filters = || {
        stored_session(&broker, "alarm-panel")
            .meta
            .subscriptions
            .into_keys()
            .collect::<Vec<_>>()
    };
    sub.send(&wire::subscribe(Version::V4, 1, &[(b"alarm/#", 1)]))
        .await;
    let f = sub.frame_within(WAIT).await.expect("SUBACK");
    assert_eq!(f.first, wire::first::SUBACK);
    assert_eq!(
        filters(),
        vec!["alarm/#".to_string()],
        "the SUBACK went out before the subscription was stored"
    );
    sub.send(&wire::unsubscribe(Version::V4, 2, &[b"alarm/#"]))
        .await;
    let f = sub.frame_within(WAIT).await.expect("UNSUBACK");
    assert_eq!(f.first, wire::first::UNSUBACK);
    assert!(
        filters().is_empty(),
        "the UNSUBACK went out before it was stored"
    );
}
