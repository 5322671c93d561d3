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

use cluster_support::{
    forge_transfer_plain, last_transfer_message, node, node_joined, password,
    transfer_plaintext_at, transfer_stream, Nats,
};
use moatmq_testkit::{v4, TestBroker, QUIET, WAIT};
use std::time::Duration;

/// The nodes' replay slack in this binary.
const SLACK: Duration = Duration::from_millis(1500);
/// How long a node waits for a late copy's replacement before reporting it as a
/// replay, in this binary (30 s).
const GRACE: Duration = Duration::from_secs(3);

fn shorten_slack() {
    std::env::set_var("MOATMQ_TEST_REPLAY_SLACK_MS", SLACK.as_millis().to_string());
    std::env::set_var(
        "MOATMQ_TEST_LATE_COPY_GRACE_MS",
        GRACE.as_millis().to_string(),
    );
}

async fn alice(node: &TestBroker, id: &str) -> v4::Client {
    let mut o = v4::options(node.first_addr(), id);
    o.set_credentials("alice", password("alice"));
    v4::connect(o).await.expect("login")
}

/// Nodes A and B on `nats`, alice's `keypad` on A and `watch-b` on B (subscribed to
/// `alice/door`), after `first` went from one to the other.
struct Door {
    a: TestBroker,
    b: TestBroker,
    publ: v4::Client,
    seen_on_b: v4::Client,
}

async fn door(nats: &Nats, first: &str) -> Door {
    let a = node(nats, "node-a").await;
    let b = node(nats, "node-b").await;
    let mut seen_on_b = alice(&b, "watch-b").await;
    seen_on_b.subscribe_acked("alice/door").await;
    let mut publ = alice(&a, "keypad").await;
    publ.publish_acked("alice/door", false, first).await;
    assert_eq!(
        &seen_on_b.next_publish().await.payload[..],
        first.as_bytes()
    );
    Door {
        a,
        b,
        publ,
        seen_on_b,
    }
}

#[tokio::test]
async fn a_transfer_message_stored_again_after_the_duplicate_window_reaches_no_one() {
    shorten_slack();
    let nats = Nats::start().await;
    let Door {
        a: _a,
        b: _b,
        mut publ,
        mut seen_on_b,
    } = door(&nats, "open").await;

    // The attacker copies the stream message that carried it...
    let js = async_nats::jetstream::new(nats.client().await);
    let captured = last_transfer_message(&nats).await;
    assert_eq!(captured.subject.as_str(), "moatmq_xfer.node-a");
    // ...lets the duplicate window pass (shortened here rather than waited out)...
    let mut stream = transfer_stream(&nats).await;
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
    // Reported as a replay once node A had the time to store it again and did not.
    c.metric_is(
        "moatmq_cluster_state_rejected_total",
        1.0,
        "the replay counted as refused",
    )
    .await;
    assert_eq!(
        c.metric("moatmq_cluster_late_copies_replaced_total").await,
        0.0
    );
}

#[tokio::test]
async fn untimed_transfer_messages_are_taken_only_where_the_upgrade_setting_allows() {
    shorten_slack();
    let nats = Nats::start().await;
    let strict = node(&nats, "node-a").await;
    let upgrading = node_joined(&nats, "node-b", "accept_untimed = true\n", |b| b).await;
    let mut on_strict = alice(&strict, "watch-a").await;
    on_strict.subscribe_acked("alice/door").await;
    let mut on_upgrading = alice(&upgrading, "watch-b").await;
    on_upgrading.subscribe_acked("alice/door").await;
    let js = async_nats::jetstream::new(nats.client().await);
    // Node X's message as a release before the sealing time wrote it.
    let untimed = transfer_plaintext_at("alice/door", b"from an old release", None);
    forge_transfer_plain(&js, "node-x", 1, &untimed).await;
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

/// Whoever may write the retained bucket puts back a value it read there earlier (the
/// door's old state) after the topic moved on: no node serves it. (Before: every node
/// applied it and new subscribers got the old state as the current one.)
#[tokio::test]
async fn an_old_retained_value_put_back_in_the_bucket_is_not_served() {
    shorten_slack();
    let nats = Nats::start().await;
    let a = node(&nats, "node-a").await;
    let b = node(&nats, "node-b").await;
    let mut publ = alice(&a, "keypad").await;
    publ.publish_acked("alice/state", true, "open").await;
    let kv = async_nats::jetstream::new(nats.client().await)
        .get_key_value("moatmq_retained")
        .await
        .expect("the retained bucket");
    let key = cluster_support::cluster_seal().key_of("alice/state");
    let captured = kv.get(&key).await.expect("get").expect("the value");
    publ.publish_acked("alice/state", true, "locked").await;
    tokio::time::sleep(SLACK + Duration::from_millis(500)).await;
    kv.put(&key, captured).await.expect("put back");

    b.metric_reaches(
        "moatmq_cluster_state_rejected_total",
        1.0,
        "node B never refused the old value",
    )
    .await;
    let late = node(&nats, "node-c").await;
    // The running nodes keep the current value; a node loading the bucket now finds
    // only the refused one and serves none.
    for (n, id, want) in [
        (&a, "sub-a", Some("locked")),
        (&b, "sub-b", Some("locked")),
        (&late, "sub-c", None),
    ] {
        let mut sub = alice(n, id).await;
        sub.subscribe_acked("alice/state").await;
        let got = sub.publish_within(QUIET).await;
        let got = got.as_ref().map(|p| String::from_utf8_lossy(&p.payload));
        assert_eq!(got.as_deref(), want, "{id}");
    }
    assert!(late.metric("moatmq_cluster_state_rejected_total").await >= 1.0);
    // The topic's next value is served again.
    publ.publish_acked("alice/state", true, "closed").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    for round in 0.. {
        let mut sub = alice(&late, &format!("sub-c-{round}")).await;
        sub.subscribe_acked("alice/state").await;
        if let Some(p) = sub.publish_within(QUIET).await {
            assert_eq!(&p.payload[..], b"closed");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the next value never served"
        );
    }
}

/// Whoever may write the wills bucket puts a taken will's value back: once overdue, no
/// node publishes it again. (Before: a node took it as its node's overdue will and
/// published it a second time.)
#[tokio::test]
async fn a_published_will_put_back_in_the_bucket_is_not_published_again() {
    use moatmq_testkit::Raw;
    use rumqttc::v5::mqttbytes::v5 as m5;
    shorten_slack();
    let nats = Nats::start().await;
    let a = node(&nats, "node-a").await;
    let b = node(&nats, "node-b").await;
    let mut watcher = alice(&b, "watcher").await;
    watcher.subscribe_acked("alice/will/#").await;
    let mut connect = moatmq_testkit::connect5("device");
    connect.clean_start = false;
    connect.properties = Some(m5::ConnectProperties {
        session_expiry_interval: Some(600),
        ..m5::ConnectProperties::new()
    });
    let will = moatmq_testkit::delayed_will5("alice/will/device", "gone", 1);
    let login = m5::Login::new("alice", password("alice"));
    let (mut device, code) = Raw::connect5(a.first_addr(), connect, Some(will), Some(login)).await;
    assert_eq!(code, Some(m5::ConnectReturnCode::Success));
    // The attacker watches the wills bucket (it keeps one value per key).
    let kv = async_nats::jetstream::new(nats.client().await)
        .get_key_value("moatmq_wills")
        .await
        .expect("the wills bucket");
    let mut watch = kv.watch_all().await.expect("watch");
    // Gone without a DISCONNECT 0x00: the will waits for its delay, in the bucket too.
    device.send(&[0xE0, 0x01, 0x04]).await;
    let first = watcher.publish_within(WAIT).await.expect("the will");
    assert_eq!(&first.payload[..], b"gone");
    let captured = loop {
        let entry = tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut watch))
            .await
            .expect("the will in the bucket")
            .expect("watching")
            .expect("an entry");
        if &entry.value[..] != b"taken" && !entry.value.is_empty() {
            break entry;
        }
    };
    let keys = [captured.key.clone()];
    tokio::time::sleep(SLACK + Duration::from_millis(500)).await;
    kv.put(&keys[0], captured.value).await.expect("put back");
    // Overdue 10 s after its time, and the nodes look every 5 s.
    let again = watcher.publish_within(Duration::from_secs(16)).await;
    assert!(again.is_none(), "the will published again: {again:?}");
    assert!(b.metric("moatmq_cluster_state_rejected_total").await >= 1.0);
}

/// Retained values of a release before the sealing time (version 1, no time) stay the
/// current values of their topics after an upgrade: a node without `accept_untimed`
/// serves one it finds in the bucket; a node with it writes such values (for the old
/// nodes), one without it timed ones.
#[tokio::test]
async fn untimed_retained_values_are_served_after_an_upgrade_and_written_only_during_one() {
    shorten_slack();
    let nats = Nats::start().await;
    let upgrading = node_joined(&nats, "node-a", "accept_untimed = true\n", |b| b).await;
    let mut publ = alice(&upgrading, "publisher").await;
    publ.publish_acked("alice/old", true, "from before").await;
    let kv = async_nats::jetstream::new(nats.client().await)
        .get_key_value("moatmq_retained")
        .await
        .expect("the retained bucket");
    let seal = cluster_support::cluster_seal();
    let old = kv
        .get(seal.key_of("alice/old"))
        .await
        .expect("get")
        .expect("the value");
    assert_eq!(old[0], 1, "written as releases before the time read it");
    tokio::time::sleep(SLACK + Duration::from_millis(500)).await;

    let strict = node(&nats, "node-b").await;
    let mut sub = alice(&strict, "reader").await;
    sub.subscribe_acked("alice/old").await;
    let got = sub
        .publish_within(WAIT)
        .await
        .expect("the old value served");
    assert_eq!(&got.payload[..], b"from before");
    let mut publ_b = alice(&strict, "publisher-b").await;
    publ_b.publish_acked("alice/new", true, "timed").await;
    let new = kv
        .get(seal.key_of("alice/new"))
        .await
        .expect("get")
        .expect("the value");
    assert_eq!(new[0], 2, "written with its sealing time");
}

/// A node's path to NATS stalls (the connection stays up, nothing arrives) for longer
/// than the slack while it sends a QoS 1 publish: its acknowledgement times out, the node
/// sends it again, and when the path clears NATS stores the first copy, now older than
/// the slack, and drops the second as a duplicate. Every node refuses that copy as a
/// replay, so the node must store the message again under a new id: the publish is
/// acknowledged and reaches the other node once. (It was acknowledged and reached no
/// one.)
#[tokio::test]
async fn a_publish_stored_late_through_a_stalled_path_to_nats_is_sent_again_and_delivered() {
    shorten_slack();
    let nats = Nats::start().await;
    let link = cluster_support::NatsLink::start(&nats).await;
    let a = cluster_support::node_at(&link.url(), "node-a", cluster_support::ACL, "", |b| b).await;
    let b = node(&nats, "node-b").await;
    let mut seen_on_b = alice(&b, "watch-b").await;
    seen_on_b.subscribe_acked("alice/door").await;
    let mut publ = alice(&a, "keypad").await;
    publ.publish_acked("alice/door", false, "before").await;
    assert_eq!(&seen_on_b.next_publish().await.payload[..], b"before");

    link.stall();
    publ.client
        .publish("alice/door", rumqttc::QoS::AtLeastOnce, false, "open")
        .await
        .expect("publish queued");
    // Past the node's acknowledgement timeout (3 s: it sends again, into the stall) and
    // well past the slack.
    tokio::time::sleep(Duration::from_secs(4) + SLACK).await;
    link.resume();
    let got = seen_on_b
        .publish_within(Duration::from_secs(20))
        .await
        .expect("the publish reached node B");
    assert_eq!(&got.payload[..], b"open");
    assert!(
        publ.incoming(|p| matches!(p, rumqttc::Packet::PubAck(_)).then_some(()))
            .await
            .is_some(),
        "no PUBACK once NATS had it"
    );
    assert!(seen_on_b.publish_within(QUIET).await.is_none(), "twice");
    // Node B refused the late copy, and took node A's replacement: not a replay, no
    // alarm (it was logged at ERROR and counted as refused, as a replay is).
    tokio::time::sleep(GRACE).await;
    assert_eq!(
        b.metric("moatmq_cluster_state_rejected_total").await,
        0.0,
        "the late copy its node replaced reported as a replay"
    );
    assert_eq!(
        b.metric("moatmq_cluster_late_copies_replaced_total").await,
        1.0
    );
}

/// Whoever may write to the stream stores something under the id a node's next message
/// will have (ids are `<node>:<epoch>:<number>`, readable from the node's earlier
/// messages): the stream then drops the node's own message as a duplicate. The node
/// sees the duplicate, finds that the stored copy does not open, and stores its message
/// again under a new id: it still reaches the other node. (It was acknowledged and
/// reached no one.)
#[tokio::test]
async fn a_message_id_taken_first_by_someone_else_does_not_suppress_the_nodes_message() {
    shorten_slack();
    let nats = Nats::start().await;
    let Door {
        a: _a,
        b: _b,
        mut publ,
        mut seen_on_b,
    } = door(&nats, "before").await;

    // The id of node A's next stream message.
    let js = async_nats::jetstream::new(nats.client().await);
    let id = last_transfer_message(&nats)
        .await
        .headers
        .get(async_nats::header::NATS_MESSAGE_ID)
        .expect("an id")
        .as_str()
        .to_string();
    let (origin, number) = id.rsplit_once(':').expect("<node>:<epoch>:<number>");
    let next = format!("{origin}:{}", number.parse::<u64>().unwrap() + 1);
    let squat = async_nats::jetstream::message::PublishMessage::build()
        .message_id(next)
        .payload(bytes::Bytes::from_static(b"not sealed"));
    js.send_publish("moatmq_xfer.node-a", squat)
        .await
        .expect("published")
        .await
        .expect("stored");

    publ.publish_acked("alice/door", false, "open").await;
    let got = seen_on_b
        .publish_within(WAIT)
        .await
        .expect("node A's message reached node B");
    assert_eq!(&got.payload[..], b"open");
    assert!(seen_on_b.publish_within(QUIET).await.is_none(), "twice");
}
