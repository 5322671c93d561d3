//! With `autosave_interval = 0` a persistent session's QoS 2 delivery state is in the
//! session store before the client sees the packet it follows from: the PUBLISH once
//! the store holds the message as sent under its packet id, the PUBREL once it holds
//! it as released. A crash in between would otherwise make the broker send the message
//! again as a new one (or the message again where the client completed the exchange):
//! delivered twice (the kill -9 case end to end: e2e
//! `qos_2_deliveries_stay_exactly_once_across_kill_9`). Here a test hook makes every
//! commit 700 ms slower, so a packet written before its commit is read before the store
//! has it; the store is read from its files as `moatmq sessions list` does. Its own
//! process: the hook is an environment variable.

use moatmq_store::{Delivery, RetainedKey};
use moatmq_testkit::wire::{self, Version};
use moatmq_testkit::{v4, Raw, TestBroker, WAIT};
use rumqttc::QoS;

/// How `ledger`'s messages stand in the store's files: their deliveries.
fn stored(broker: &TestBroker) -> Vec<Delivery> {
    let key = RetainedKey::load(&broker.path("retained.key")).expect("key");
    let sessions =
        moatmq_store::read_sessions(&broker.path("data/retained"), &key).expect("sessions");
    sessions
        .iter()
        .filter(|s| s.key.client_id == "ledger")
        .flat_map(|s| s.messages.values().map(|m| m.delivery))
        .collect()
}

#[tokio::test]
async fn qos_2_packets_reach_a_persistent_client_only_once_their_state_is_stored() {
    std::env::set_var("MOATMQ_TEST_SESSION_COMMIT_DELAY_MS", "700");
    let broker = TestBroker::builder()
        .anonymous()
        .retained_store()
        .set("retained", "autosave_interval", 0)
        .start()
        .await;
    let addr = broker.first_addr();
    let mut sub = Raw::tcp(addr).await;
    let mut connect = wire::Connect::new(Version::V4, "ledger");
    connect.clean = false;
    sub.send(&connect.encode()).await;
    assert_eq!(
        sub.frame_within(WAIT).await.expect("CONNACK").first,
        wire::first::CONNACK
    );
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
    let at = 2 + u16::from_be_bytes([f.body[0], f.body[1]]) as usize;
    let pkid = u16::from_be_bytes([f.body[at], f.body[at + 1]]);
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
