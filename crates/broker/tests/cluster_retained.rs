//! Compaction of the retained bucket's delete markers and the sweep that makes it
//! sound (docs/cluster.md, "Compacting the retained bucket's delete markers"), with a
//! real `nats-server -js` on loopback, in-process moatmq nodes with a short
//! `retained_marker_age`, rumqttc clients, and an async-nats client reading the
//! bucket's stream.

mod cluster_support;

use cluster_support::{
    cluster_seal, node_at, node_joined, wait_ready, with_key, Nats, NatsLink, ACL, CLUSTER_KEY,
    USERS,
};
use moatmq_testkit::{v4, TestBroker, QUIET, WAIT};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// `[cluster]` keys of the nodes here: markers compacted after 2 s.
const AGE: &str = "retained_marker_age = 2\n";

async fn login(addr: SocketAddr, id: &str) -> v4::Client {
    let mut o = v4::options(addr, id);
    o.set_credentials("alice", "alice-pw");
    v4::connect(o).await.expect("login")
}

/// What a new subscriber to `filter` on `addr` gets: the retained messages served.
async fn served(addr: SocketAddr, id: &str, filter: &str) -> Vec<(String, String)> {
    let mut sub = login(addr, id).await;
    sub.subscribe_acked(filter).await;
    let mut got = Vec::new();
    while let Some(p) = sub.publish_within(QUIET).await {
        got.push((
            p.topic.clone(),
            String::from_utf8_lossy(&p.payload).into_owned(),
        ));
    }
    got.sort();
    got
}

/// The retained bucket's stream, read with a plain NATS client.
async fn bucket_stream(nats: &Nats) -> async_nats::jetstream::stream::Stream {
    async_nats::jetstream::new(nats.client().await)
        .get_stream("KV_moatmq_retained")
        .await
        .expect("the retained bucket's stream")
}

/// The number of messages (values and markers) in the bucket's stream.
async fn stream_messages(nats: &Nats) -> u64 {
    bucket_stream(nats)
        .await
        .info()
        .await
        .expect("stream info")
        .state
        .messages
}

/// Waits up to `within` until the bucket's stream holds `n` messages; `false` if it
/// never did.
async fn stream_holds(nats: &Nats, n: u64, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if stream_messages(nats).await == n {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The bucket's current value of `topic`, opened with the cluster's seal.
async fn bucket_payload(nats: &Nats, topic: &str) -> Option<String> {
    let kv = async_nats::jetstream::new(nats.client().await)
        .get_key_value("moatmq_retained")
        .await
        .expect("the retained bucket");
    let seal = cluster_seal();
    let key = seal.key_of(topic);
    let value = kv.get(&key).await.expect("get")?;
    let (msg, _) = seal
        .open_retained("moatmq_retained", &key, &value)
        .expect("a value the cluster sealed");
    Some(String::from_utf8_lossy(&msg.payload).into_owned())
}

#[tokio::test]
async fn set_clear_churn_leaves_no_markers_once_they_are_old_enough() {
    let nats = Nats::start().await;
    let a = node_joined(&nats, "node-a", AGE, |b| b).await;
    let _b = node_joined(&nats, "node-b", AGE, |b| b).await;
    let mut publ = login(a.first_addr(), "churn").await;
    for round in 0..3 {
        for i in 0..40 {
            publ.publish_acked(format!("alice/churn/{i}"), true, format!("v{round}"))
                .await;
        }
        for i in 0..40 {
            publ.publish_acked(format!("alice/churn/{i}"), true, "")
                .await;
        }
    }
    // The last clears are in the bucket (one marker per topic)...
    assert!(
        stream_holds(&nats, 40, WAIT).await,
        "40 markers, not {}",
        stream_messages(&nats).await
    );
    // ...and gone once older than the age (before: 40 for good).
    assert!(
        stream_holds(&nats, 0, Duration::from_secs(10)).await,
        "markers left: {}",
        stream_messages(&nats).await
    );
    // Nothing came back anywhere.
    assert!(served(a.first_addr(), "late", "alice/churn/#")
        .await
        .is_empty());
}

#[tokio::test]
async fn a_node_away_while_a_topic_was_cleared_and_its_marker_compacted_does_not_serve_it() {
    let nats = Nats::start().await;
    let a = node_joined(&nats, "node-a", AGE, |b| b).await;
    let b = node_joined(&nats, "node-b", AGE, |b| b).await;
    let mut publ = login(a.first_addr(), "pub").await;
    publ.publish_acked("alice/stale", true, "cleared while b was away")
        .await;
    publ.publish_acked("alice/kept", true, "still set").await;
    let both = vec![
        ("alice/kept".to_string(), "still set".to_string()),
        (
            "alice/stale".to_string(),
            "cleared while b was away".to_string(),
        ),
    ];
    assert_eq!(served(b.first_addr(), "b-before", "alice/#").await, both);

    // B stops holding both (its store keeps them); the topic is cleared on A and its
    // marker compacted.
    let b_dir = b.stop().await;
    publ.publish_acked("alice/stale", true, "").await;
    assert!(stream_holds(&nats, 2, WAIT).await, "a value and a marker");
    assert!(
        stream_holds(&nats, 1, Duration::from_secs(10)).await,
        "marker compacted"
    );

    // B away longer than the transfer stream keeps messages (its default 5 min is far
    // shorter than the markers' 1 h): the clear is not there for B to read either.
    async_nats::jetstream::new(nats.client().await)
        .get_stream("moatmq_xfer")
        .await
        .expect("the transfer stream")
        .purge()
        .await
        .expect("purged");
    // Back, B loads the bucket: no marker names the cleared topic, the sweep drops it
    // (before: served again on B), and keeps what the bucket names.
    let b = TestBroker::start_in(b_dir).await;
    wait_ready(&b, true).await;
    assert_eq!(
        served(b.first_addr(), "b-after", "alice/#").await,
        vec![("alice/kept".to_string(), "still set".to_string())]
    );
}

#[tokio::test]
async fn retained_messages_held_before_joining_go_into_the_bucket_at_the_first_cluster_start() {
    let nats = Nats::start().await;
    // A node on its own first, with retained messages in its store.
    let alone = with_key(TestBroker::builder(), CLUSTER_KEY)
        .users(USERS)
        .acl(ACL)
        .metrics()
        .no_connection_rate()
        .start()
        .await;
    let mut publ = login(alone.first_addr(), "before").await;
    publ.publish_acked("alice/before-joining", true, "held alone")
        .await;
    drop(publ);
    let dir = alone.stop().await;

    // A cluster whose bucket holds another node's message already.
    let other = node_joined(&nats, "node-b", AGE, |b| b).await;
    let mut on_other = login(other.first_addr(), "other").await;
    on_other
        .publish_acked("alice/from-b", true, "set on b")
        .await;

    // The same node with [cluster] for the first time.
    let config = std::fs::read_to_string(dir.path().join("broker.toml")).expect("config");
    let config = format!(
        "{config}[cluster]\nservers = [\"{}\"]\nnode_name = \"node-x\"\n{AGE}",
        nats.url()
    );
    std::fs::write(dir.path().join("broker.toml"), config).expect("config");
    let x = TestBroker::start_in(dir).await;
    wait_ready(&x, true).await;

    let expected = vec![
        ("alice/before-joining".to_string(), "held alone".to_string()),
        ("alice/from-b".to_string(), "set on b".to_string()),
    ];
    // Not swept away on X, and put into the bucket: served by B too.
    assert_eq!(served(x.first_addr(), "x-sub", "alice/#").await, expected);
    let deadline = tokio::time::Instant::now() + WAIT;
    while bucket_payload(&nats, "alice/before-joining")
        .await
        .is_none()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never put into the bucket"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        served(other.first_addr(), "b-sub", "alice/#").await,
        expected
    );
    // And a node started afterwards.
    let c = node_joined(&nats, "node-c", AGE, |b| b).await;
    assert_eq!(served(c.first_addr(), "c-sub", "alice/#").await, expected);
    assert!(
        x.dir.path().join("data/retained/cluster-joined").exists(),
        "the join recorded"
    );

    // Restarted, X has joined: it sweeps, and the bucket names what it holds.
    let x = x.restart().await;
    wait_ready(&x, true).await;
    assert_eq!(served(x.first_addr(), "x-again", "alice/#").await, expected);
}

/// A TCP relay to NATS whose server-to-node direction can be held: the node's requests
/// reach NATS while what NATS sends it (its watch of the bucket) waits.
struct HeldLink {
    port: u16,
    held: Arc<AtomicBool>,
    _relay: tokio::task::JoinHandle<()>,
}

impl HeldLink {
    async fn start(nats: &Nats) -> HeldLink {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let held = Arc::new(AtomicBool::new(false));
        let to = nats.port;
        let flag = held.clone();
        let relay = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(out) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await else {
                    continue;
                };
                let (in_read, in_write) = inbound.into_split();
                let (out_read, out_write) = out.into_split();
                let free = Arc::new(AtomicBool::new(false));
                tokio::spawn(pipe(in_read, out_write, free));
                tokio::spawn(pipe(out_read, in_write, flag.clone()));
            }
        });
        HeldLink {
            port,
            held,
            _relay: relay,
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

/// Copies `from` to `to`, waiting while `held`.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    held: Arc<AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        while held.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while held.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test]
async fn a_put_after_a_marker_survives_the_markers_compaction() {
    let nats = Nats::start().await;
    let a = node_joined(&nats, "node-a", AGE, |b| b).await;
    let link = HeldLink::start(&nats).await;
    let b = node_at(&link.url(), "node-b", ACL, AGE, |b| b).await;
    let mut publ = login(a.first_addr(), "pub").await;
    publ.publish_acked("alice/again", true, "first").await;
    publ.publish_acked("alice/again", true, "").await;
    // B has the marker (applied: nothing served)...
    assert!(stream_holds(&nats, 1, WAIT).await, "the marker alone");
    assert!(served(b.first_addr(), "b-sub", "alice/#").await.is_empty());
    // ...and from now on hears nothing from NATS, so it does not see the put that
    // replaces the marker: when the marker's age comes, B purges the key (before the
    // fix of the bound, any purge of the key's subject took the put with it).
    link.held.store(true, Ordering::Release);
    publ.publish_acked("alice/again", true, "second").await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        bucket_payload(&nats, "alice/again").await.as_deref(),
        Some("second"),
        "the newer put survives B's compaction"
    );
    link.held.store(false, Ordering::Release);
    let c = node_joined(&nats, "node-c", AGE, |b| b).await;
    assert_eq!(
        served(c.first_addr(), "c-sub", "alice/#").await,
        vec![("alice/again".to_string(), "second".to_string())]
    );
    assert_eq!(
        served(b.first_addr(), "b-again", "alice/#").await,
        vec![("alice/again".to_string(), "second".to_string())]
    );
}

/// Caps the retained bucket's stream at `max` messages (discard new, as every KV
/// bucket): JetStream refuses puts past it; `-1` lifts the cap.
async fn cap_retained_stream(nats: &Nats, max: i64) {
    let js = async_nats::jetstream::new(nats.client().await);
    let mut stream = bucket_stream(nats).await;
    let mut config = stream.info().await.expect("stream info").config.clone();
    config.max_messages = max;
    js.update_stream(config).await.expect("stream updated");
}

/// Publishes a retained QoS 1 message without waiting for its PUBACK.
async fn publish_unacked(c: &mut v4::Client, topic: &str, payload: &str) {
    c.client
        .publish(topic, rumqttc::QoS::AtLeastOnce, true, payload)
        .await
        .expect("publish queued");
}

/// Whether `c` receives a PUBACK within `wait`.
async fn acked_within(c: &mut v4::Client, wait: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, c.rx.recv()).await {
            Ok(Some(rumqttc::Event::Incoming(rumqttc::Incoming::PubAck(_)))) => return true,
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => return false,
        }
    }
}

#[tokio::test]
async fn a_retained_publish_is_acknowledged_only_once_the_bucket_holds_it() {
    let nats = Nats::start().await;
    let a = node_joined(&nats, "node-a", AGE, |b| b).await;
    let mut publ = login(a.first_addr(), "pub").await;
    publ.publish_acked("alice/base", true, "in the bucket")
        .await;
    assert!(stream_holds(&nats, 1, WAIT).await);

    // JetStream refuses the bucket's puts (the transfer stream takes the message): no
    // PUBACK, so the publisher still has it to send again should node A die now
    // (before: acknowledged at once, then lost with A for every node starting later).
    cap_retained_stream(&nats, 1).await;
    publish_unacked(&mut publ, "alice/held", "acknowledged means stored").await;
    assert!(!acked_within(&mut publ, Duration::from_secs(2)).await);
    assert_eq!(bucket_payload(&nats, "alice/held").await, None);

    // Room again: the PUBACK comes, and by then the bucket holds the message.
    cap_retained_stream(&nats, -1).await;
    assert!(acked_within(&mut publ, WAIT).await);
    assert_eq!(
        bucket_payload(&nats, "alice/held").await.as_deref(),
        Some("acknowledged means stored")
    );

    // A topic set and cleared while the bucket refuses: both wait for the delete that
    // replaced the put (the only write).
    cap_retained_stream(&nats, 2).await;
    publish_unacked(&mut publ, "alice/gone", "set").await;
    publish_unacked(&mut publ, "alice/gone", "").await;
    assert!(!acked_within(&mut publ, Duration::from_secs(2)).await);
    cap_retained_stream(&nats, -1).await;
    assert!(acked_within(&mut publ, WAIT).await);
    assert!(acked_within(&mut publ, WAIT).await);
    assert_eq!(
        stream_messages(&nats).await,
        3,
        "base, held, a marker for gone"
    );
    assert_eq!(bucket_payload(&nats, "alice/gone").await, None);

    // A node starting after A is gone serves what A acknowledged.
    drop(publ);
    a.shutdown().await;
    let c = node_joined(&nats, "node-c", AGE, |b| b).await;
    assert_eq!(
        served(c.first_addr(), "c", "alice/#").await,
        vec![
            ("alice/base".to_string(), "in the bucket".to_string()),
            (
                "alice/held".to_string(),
                "acknowledged means stored".to_string()
            ),
        ]
    );
}

#[tokio::test]
async fn a_reload_leaves_a_topic_set_through_the_transfer_stream_whose_put_is_held_up() {
    // Relayed topics are left for half the marker age at most (120 s by default).
    const LONG: &str = "retained_marker_age = 60\n";
    let nats = Nats::start().await;
    let a = node_joined(&nats, "node-a", LONG, |b| b).await;
    let mut link = NatsLink::start(&nats).await;
    let b = node_at(&link.url(), "node-b", ACL, LONG, |b| b).await;
    let mut publ = login(a.first_addr(), "pub").await;
    publ.publish_acked("alice/base", true, "in the bucket")
        .await;
    assert!(stream_holds(&nats, 1, WAIT).await);
    // The bucket full: A's put of a new topic waits (and so does its PUBACK), B has it
    // from the transfer stream.
    cap_retained_stream(&nats, 1).await;
    publish_unacked(&mut publ, "alice/waiting", "put held up").await;
    let both = vec![
        ("alice/base".to_string(), "in the bucket".to_string()),
        ("alice/waiting".to_string(), "put held up".to_string()),
    ];
    assert_eq!(served(b.first_addr(), "b-before", "alice/#").await, both);

    // B loses NATS and loads the bucket again: it does not name the new topic, but its
    // origin's put is on its way, so the sweep leaves it (before: cleared on B until
    // the put arrived).
    link.cut().await;
    wait_ready(&b, false).await;
    link.restore().await;
    wait_ready(&b, true).await;
    assert_eq!(served(b.first_addr(), "b-after", "alice/#").await, both);

    // Room again: the put lands and everything agrees.
    cap_retained_stream(&nats, -1).await;
    assert!(acked_within(&mut publ, WAIT).await);
    assert!(stream_holds(&nats, 2, WAIT).await);
    assert_eq!(served(b.first_addr(), "b-last", "alice/#").await, both);
}

#[tokio::test]
async fn a_node_cut_off_while_a_topic_was_cleared_and_its_marker_compacted_drops_it_when_back() {
    let nats = Nats::start().await;
    let a = node_joined(&nats, "node-a", AGE, |b| b).await;
    let mut link = NatsLink::start(&nats).await;
    let b = node_at(&link.url(), "node-b", ACL, AGE, |b| b).await;
    let mut publ = login(a.first_addr(), "pub").await;
    publ.publish_acked("alice/stale", true, "cleared while b was cut off")
        .await;
    assert_eq!(served(b.first_addr(), "b-before", "alice/#").await.len(), 1);

    link.cut().await;
    wait_ready(&b, false).await;
    publ.publish_acked("alice/stale", true, "").await;
    assert!(
        stream_holds(&nats, 0, Duration::from_secs(10)).await,
        "marker compacted"
    );
    // Cut off longer than the transfer stream keeps messages.
    async_nats::jetstream::new(nats.client().await)
        .get_stream("moatmq_xfer")
        .await
        .expect("the transfer stream")
        .purge()
        .await
        .expect("purged");
    // Back, B loads the bucket again (its watch alone would resume past the marker
    // compacted meanwhile) and sweeps the cleared topic (before: served on B).
    link.restore().await;
    wait_ready(&b, true).await;
    assert!(served(b.first_addr(), "b-after", "alice/#")
        .await
        .is_empty());
}
