//! A node acknowledges a transfer-stream message only once what admitting it queued for
//! an offline persistent session is durable (`autosave_interval = 0`), as a publisher's
//! PUBACK waits for it on one node: a node killed before the commit reads the message
//! again from the stream. Its own test binary: the commit-failure hook is process-wide.

mod cluster_support;

use cluster_support::{node, node_with, password, Nats};
use moatmq_testkit::{v4, QUIET, WAIT};

#[tokio::test]
async fn no_transfer_acknowledgement_before_the_offline_copy_is_durable() {
    // Every session store commit fails, as on a full or read-only disk.
    std::env::set_var("MOATMQ_TEST_SESSION_COMMIT_FAIL", "1");
    let nats = Nats::start().await;
    let a = node_with(&nats, "node-a", |b| {
        b.set("retained", "autosave_interval", 0)
    })
    .await;
    let b = node(&nats, "node-b").await;
    let mut o = v4::options(a.first_addr(), "sink");
    o.set_credentials("alice", password("alice"));
    o.set_clean_session(false);
    let mut sub = v4::connect(o).await.expect("login");
    sub.subscribe_acked("alice/q").await;
    sub.client.disconnect().await.unwrap();
    sub.closed_within(WAIT).await;

    let mut o = v4::options(b.first_addr(), "source");
    o.set_credentials("alice", password("alice"));
    let mut publ = v4::connect(o).await.expect("login");
    // Node B has it in the stream: acknowledged to the publisher.
    publ.publish_acked("alice/q", false, "must not be lost")
        .await;
    tokio::time::sleep(QUIET).await;

    let js = async_nats::jetstream::new(nats.client().await);
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_consumer_from_stream("node-a", "moatmq_xfer")
        .await
        .expect("node A's consumer");
    let info = consumer.info().await.expect("consumer info");
    assert_eq!(info.num_pending, 0, "node A took the message in");
    assert_eq!(
        info.num_ack_pending, 1,
        "node A acknowledged the message without a durable copy for the offline session"
    );
}
