//! A node acknowledges a transfer-stream message only once what admitting it queued for
//! an offline persistent session is durable (`autosave_interval = 0`), as a publisher's
//! PUBACK waits for it on one node: a node killed before the commit reads the message
//! again from the stream. Likewise a node taking a handed-over session removes it from
//! the handoff bucket only once it is durable here. Its own test binary: the
//! commit-failure hook is process-wide (the tests take turns, `HOOK`).

mod cluster_support;

use cluster_support::{node, node_with, password, Nats};
use futures_util::StreamExt;
use moatmq_testkit::{v4, QUIET, WAIT};

/// The commit-failure hook is read when a node opens its store: one test at a time.
static HOOK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test]
async fn no_transfer_acknowledgement_before_the_offline_copy_is_durable() {
    let _turn = HOOK.lock().await;
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

    let mut consumer = cluster_support::transfer_consumer(&nats, "node-a").await;
    let info = consumer.info().await.expect("consumer info");
    assert_eq!(info.num_pending, 0, "node A took the message in");
    assert_eq!(
        info.num_ack_pending, 1,
        "node A acknowledged the message without a durable copy for the offline session"
    );
}

#[tokio::test]
async fn a_handoff_stays_in_the_bucket_until_the_new_node_saved_the_session() {
    let _turn = HOOK.lock().await;
    std::env::remove_var("MOATMQ_TEST_SESSION_COMMIT_FAIL");
    let nats = Nats::start().await;
    let a = node(&nats, "node-a").await;
    let mut o = v4::options(a.first_addr(), "mover");
    o.set_credentials("alice", password("alice"));
    o.set_clean_session(false);
    let mut sub = v4::connect(o).await.expect("login");
    sub.subscribe_acked("alice/q").await;
    sub.client.disconnect().await.unwrap();
    sub.closed_within(WAIT).await;
    let mut o = v4::options(a.first_addr(), "source");
    o.set_credentials("alice", password("alice"));
    let mut publ = v4::connect(o).await.expect("login");
    publ.publish_acked("alice/q", false, "queued on A").await;

    // Node B's store fails every commit, as on a full or read-only disk.
    std::env::set_var("MOATMQ_TEST_SESSION_COMMIT_FAIL", "1");
    let b = node(&nats, "node-b").await;
    std::env::remove_var("MOATMQ_TEST_SESSION_COMMIT_FAIL");
    let mut o = v4::options(b.first_addr(), "mover");
    o.set_credentials("alice", password("alice"));
    o.set_clean_session(false);
    let mut moved = v4::connect(o).await.expect("login");
    assert!(moved.connack.session_present, "served from memory");
    assert_eq!(&moved.next_publish().await.payload[..], b"queued on A");
    tokio::time::sleep(QUIET).await;

    let js = async_nats::jetstream::new(nats.client().await);
    let bucket = js
        .get_key_value("moatmq_handoff")
        .await
        .expect("the handoff bucket");
    let keys: Vec<String> = bucket
        .keys()
        .await
        .expect("keys")
        .filter_map(|k| async move { k.ok() })
        .collect()
        .await;
    // Values at sessions' keys; parts are at `<key>.<n>`.
    let kept = keys.iter().filter(|k| !k.contains('.')).count();
    assert_eq!(
        kept, 1,
        "node B removed the only durable copy of the session it could not save"
    );
}
