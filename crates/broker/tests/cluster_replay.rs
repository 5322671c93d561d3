//! A captured transfer stream message sent again is refused by every node (docs/security.md,
//! "Cluster"): within the stream's duplicate window the stream drops it; after it, the
//! message was stored longer after it was sealed than any node's own send takes. The
//! attack is reproduced against real nodes and NATS: whoever may publish to the stream
//! copies a node's message (a door opened) and stores it again once the duplicate window
//! has passed; a node started since (which never saw the message's id) must not deliver
//! it. Its own test binary: the slack is shortened for the whole process
//! (`MOATMQ_TEST_REPLAY_SLACK_MS`, read once), so that the test need not wait out the
//! real minute; the attacker shortens the stream's duplicate window (or would wait two
//! minutes).

mod cluster_support;

use cluster_support::{node, node_joined, password, transfer_plaintext_at, Nats};
use moatmq_testkit::{v4, TestBroker, QUIET, WAIT};
use std::time::Duration;

/// The nodes' replay slack in this binary.
const SLACK: Duration = Duration::from_millis(1500);

fn shorten_slack() {
    std::env::set_var("MOATMQ_TEST_REPLAY_SLACK_MS", SLACK.as_millis().to_string());
}

async fn alice(node: &TestBroker, id: &str) -> v4::Client {
    let mut o = v4::options(node.first_addr(), id);
    o.set_credentials("alice", password("alice"));
    v4::connect(o).await.expect("login")
}

#[tokio::test]
async fn a_transfer_message_stored_again_after_the_duplicate_window_reaches_no_one() {
    shorten_slack();
    let nats = Nats::start().await;
    let a = node(&nats, "node-a").await;
    let b = node(&nats, "node-b").await;
    let mut seen_on_b = alice(&b, "watch-b").await;
    seen_on_b.subscribe_acked("alice/door").await;
    let mut publ = alice(&a, "keypad").await;
    publ.publish_acked("alice/door", false, "open").await;
    assert_eq!(&seen_on_b.next_publish().await.payload[..], b"open");

    // The attacker copies the stream message that carried it...
    let js = async_nats::jetstream::new(nats.client().await);
    let mut stream = js.get_stream("moatmq_xfer").await.expect("the stream");
    let last = stream
        .info()
        .await
        .expect("stream info")
        .state
        .last_sequence;
    let captured = stream.get_raw_message(last).await.expect("the message");
    assert_eq!(captured.subject.as_str(), "moatmq_xfer.node-a");
    // ...lets the duplicate window pass (shortened here rather than waited out)...
    let mut config = stream.info().await.expect("stream info").config.clone();
    config.duplicate_window = Duration::from_millis(500);
    js.update_stream(config).await.expect("window shortened");
    tokio::time::sleep(SLACK + Duration::from_millis(500)).await;
    // ...and a node starts that never saw the message's id.
    let c = node(&nats, "node-c").await;
    let mut seen_on_c = alice(&c, "watch-c").await;
    seen_on_c.subscribe_acked("alice/door").await;

    let replay = async_nats::jetstream::message::PublishMessage::build()
        .headers(captured.headers.clone())
        .payload(captured.payload.clone());
    js.send_publish("moatmq_xfer.node-a", replay)
        .await
        .expect("published")
        .await
        .expect("the stream stored the replay: its id is past the window");
    // The control: a new message from node A after the replay.
    publ.publish_acked("alice/door", false, "close").await;
    assert_eq!(
        &seen_on_c.next_publish().await.payload[..],
        b"close",
        "the replayed message reached a node that never saw it"
    );
    assert!(seen_on_c.publish_within(QUIET).await.is_none());
    assert_eq!(&seen_on_b.next_publish().await.payload[..], b"close");
    assert!(seen_on_b.publish_within(QUIET).await.is_none());
    assert_eq!(c.metric("moatmq_cluster_state_rejected_total").await, 1.0);
}

/// Stores, with a plain NATS client, node X's message `n` as a release before the
/// sealing time wrote it (no time in it), sealed with the cluster's key.
async fn untimed_from_node_x(js: &async_nats::jetstream::Context, n: u64, payload: &[u8]) {
    let id = format!("node-x:9:{n}");
    let plain = transfer_plaintext_at("alice/door", payload, None);
    let value = cluster_support::cluster_seal()
        .seal_transfer("moatmq_xfer", &id, &plain)
        .expect("sealed");
    let message = async_nats::jetstream::message::PublishMessage::build()
        .message_id(id)
        .payload(value.into());
    js.send_publish("moatmq_xfer.node-x", message)
        .await
        .expect("published")
        .await
        .expect("stored");
}

#[tokio::test]
async fn untimed_transfer_messages_are_taken_only_where_the_upgrade_setting_allows() {
    shorten_slack();
    let nats = Nats::start().await;
    let strict = node(&nats, "node-a").await;
    let upgrading = node_joined(&nats, "node-b", "accept_untimed_transfer = true\n", |b| b).await;
    let mut on_strict = alice(&strict, "watch-a").await;
    on_strict.subscribe_acked("alice/door").await;
    let mut on_upgrading = alice(&upgrading, "watch-b").await;
    on_upgrading.subscribe_acked("alice/door").await;
    let js = async_nats::jetstream::new(nats.client().await);
    untimed_from_node_x(&js, 1, b"from an old release").await;
    let got = on_upgrading.publish_within(WAIT).await.expect("taken in");
    assert_eq!(&got.payload[..], b"from an old release");
    assert!(on_strict.publish_within(QUIET).await.is_none());
    assert_eq!(
        strict.metric("moatmq_cluster_state_rejected_total").await,
        1.0
    );
    assert_eq!(
        upgrading
            .metric("moatmq_cluster_state_rejected_total")
            .await,
        0.0
    );
}
