//! When a persistent session's connection ends, what the router still held for it is
//! collected into the session store and acknowledged to the router, which then forgets
//! it: the next connection gets it from the store's replay. A message the router
//! forwarded after the collection's last round (between its last answer and the
//! link's close) was collected too but not acknowledged, so the router sent it again
//! after the replay: delivered twice (`durable::a_slow_subscriber_back_gets_its_backlog_once_in_order`
//! saw it in about one run in twenty). Here a test hook pauses the collection before it
//! takes those last forwards, so the message lands there every time. Its own process:
//! the hook is an environment variable.

use std::time::Duration;

use moatmq_testkit::{v4, TestBroker, WAIT};

/// The collection's pause before it takes the link's last forwards.
const PAUSE: Duration = Duration::from_millis(1500);

fn persistent(addr: std::net::SocketAddr, id: &str) -> v4::MqttOptions {
    let mut o = v4::options(addr, id);
    o.set_clean_session(false);
    o
}

#[tokio::test]
async fn a_message_forwarded_as_the_collection_ends_is_delivered_once() {
    std::env::set_var(
        "MOATMQ_TEST_COLLECT_LAST_PAUSE_MS",
        PAUSE.as_millis().to_string(),
    );
    let broker = TestBroker::builder()
        .anonymous()
        .retained_store()
        .set("retained", "autosave_interval", 1)
        .audit()
        .start()
        .await;
    let addr = broker.first_addr();
    let mut sub = v4::connect(persistent(addr, "leaving")).await.unwrap();
    sub.subscribe_acked("feed/#").await;
    sub.client.disconnect().await.unwrap();
    assert!(sub.closed_within(WAIT).await.is_some());
    // The collection's rounds find nothing (a round trip or two to the router): it is
    // in its pause when this arrives, and the router forwards it to the ending link.
    tokio::time::sleep(PAUSE / 5).await;
    let mut publ = v4::connected(addr, "publisher").await;
    publ.publish_acked("feed/x", false, "away").await;
    broker.disconnect_audited("leaving").await;

    let mut sub = v4::connect(persistent(addr, "leaving")).await.unwrap();
    assert!(sub.connack.session_present);
    let mut got = Vec::new();
    while let Some(p) = sub.publish_within(Duration::from_secs(2)).await {
        got.push(String::from_utf8(p.payload.to_vec()).unwrap());
    }
    assert_eq!(got, vec!["away"], "delivered once");
}
