//! With `autosave_interval = 0` a publisher's acknowledgement waits for the commit of the
//! copies queued for offline persistent sessions: when the session store cannot commit
//! (here a test hook fails every commit, as a full disk would), the QoS 1 publish is
//! not acknowledged and its connection is closed, while publishes that queue nothing
//! for an offline session are acknowledged as usual. Its own process: the hook is an
//! environment variable.

use moatmq_testkit::{v4, TestBroker, QUIET, WAIT};
use rumqttc::QoS;

#[tokio::test]
async fn no_puback_before_the_offline_copy_is_durable() {
    std::env::set_var("MOATMQ_TEST_SESSION_COMMIT_FAIL", "1");
    let broker = TestBroker::builder()
        .anonymous()
        .retained_store()
        .set("retained", "autosave_interval", 0)
        .start()
        .await;
    let addr = broker.first_addr();
    let mut o = v4::options(addr, "offline-sink");
    o.set_clean_session(false);
    let mut sub = v4::connect(o).await.unwrap();
    sub.subscribe_acked("alerts/#").await;
    sub.client.disconnect().await.unwrap();
    assert!(sub.closed_within(WAIT).await.is_some());

    let mut publ = v4::connected(addr, "publisher").await;
    // No offline session wants it: nothing to commit, acknowledged at once.
    publ.publish_acked("telemetry/x", false, "fine").await;
    publ.client
        .publish("alerts/fire", QoS::AtLeastOnce, false, "must not be lost")
        .await
        .unwrap();
    let acked = publ
        .incoming(|p| matches!(p, rumqttc::Packet::PubAck(_)).then_some(()))
        .await;
    assert!(acked.is_none(), "acknowledged without a durable copy");
    assert!(
        publ.closed_within(QUIET).await.is_some(),
        "the publisher is closed, unacknowledged"
    );
}
