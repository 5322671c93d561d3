//! Cluster live routing (docs/cluster.md) with real components on loopback: a
//! `nats-server -js` (Debian package nats-server, installed by .ci/run) started by each
//! test on a port of its own, two or three in-process moatmq nodes joined through it,
//! rumqttc clients on the nodes and an async-nats client for NATS-native traffic (and
//! to read and tamper with the cluster's JetStream KV buckets).

mod cluster_support;

use cluster_support::{
    forge_transfer, last_sequence, node_at, node_with_acl, password, ready, transfer_plaintext,
    transfer_stream, wait_ready, with_key, Nats, NatsLink, CLUSTER_KEY, USERS,
};
use futures_util::StreamExt;
use moatmq_testkit::{v4, TestBroker, QUIET, WAIT};
use rumqttc::QoS;
use std::net::SocketAddr;
use std::time::Duration;

const ACL: &str = "\
user alice
topic readwrite alice/#
topic write feed/#

user bob
topic read feed/#
topic deny feed/secret/#

user admin
topic readwrite #

user natsbridge
topic write nats-in/#
";

/// A moatmq node joined to `nats` as `name`, with `extra` keys in `[cluster]`; ready
/// (connected to NATS and subscribed) when this returns.
async fn node(nats: &Nats, name: &str, extra: &str) -> TestBroker {
    node_with(nats, name, extra, |b| b).await
}

/// [`node`], with more set up on its builder (files in its folder).
async fn node_with(
    nats: &Nats,
    name: &str,
    extra: &str,
    more: impl FnOnce(moatmq_testkit::TestBrokerBuilder) -> moatmq_testkit::TestBrokerBuilder,
) -> TestBroker {
    node_with_acl(nats, name, ACL, extra, more).await
}

async fn login(addr: SocketAddr, id: &str, user: &str) -> v4::Client {
    let mut o = v4::options(addr, id);
    o.set_credentials(user, password(user));
    v4::connect(o).await.expect("login")
}

/// A login at `addr` is refused with "server unavailable" (3.1.1 code 3).
async fn assert_refused(addr: SocketAddr) {
    let mut o = v4::options(addr, "refused");
    o.set_credentials("alice", "alice-pw");
    match v4::connect(o).await {
        Err(rumqttc::ConnectionError::ConnectionRefused(
            rumqttc::ConnectReturnCode::ServiceUnavailable,
        )) => {}
        Err(other) => panic!("refused otherwise: {other}"),
        Ok(_) => panic!("a node without NATS accepted a client"),
    }
}

/// Subscribes at `qos` and waits for the SUBACK; returns whether it was granted.
async fn subscribe(c: &mut v4::Client, filter: &str, qos: QoS) -> bool {
    c.client
        .subscribe(filter, qos)
        .await
        .expect("subscribe queued");
    let codes = c
        .incoming(|p| match p {
            rumqttc::Packet::SubAck(ack) => Some(ack.return_codes.clone()),
            _ => None,
        })
        .await
        .expect("SUBACK");
    matches!(codes[..], [rumqttc::SubscribeReasonCode::Success(_)])
}

async fn publish(c: &v4::Client, topic: &str, qos: QoS, retain: bool, payload: &str) {
    c.client
        .publish(topic, qos, retain, payload.as_bytes().to_vec())
        .await
        .expect("publish queued");
}

/// The payloads of what `got` holds on `topic`, in order.
fn payloads_on(got: &[rumqttc::Publish], topic: &str) -> Vec<String> {
    got.iter()
        .filter(|p| p.topic == topic)
        .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
        .collect()
}

/// Every PUBLISH received until nothing more arrives for [`QUIET`].
async fn drain(c: &mut v4::Client) -> Vec<rumqttc::Publish> {
    let mut got = Vec::new();
    while let Some(p) = c.publish_within(QUIET).await {
        got.push(p);
    }
    got
}

#[tokio::test]
async fn publish_on_one_node_reaches_subscribers_on_another_at_qos_0_1_and_2() {
    let nats = Nats::start().await;
    let a = node(&nats, "node-a", "").await;
    let b = node(&nats, "node-b", "").await;
    let mut sub = login(b.first_addr(), "alice-sub", "alice").await;
    assert!(subscribe(&mut sub, "alice/#", QoS::AtLeastOnce).await);
    let publ = login(a.first_addr(), "alice-pub", "alice").await;

    publish(&publ, "alice/q0", QoS::AtMostOnce, false, "zero").await;
    let p = sub.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("alice/q0", &b"zero"[..])
    );
    assert_eq!(p.qos, QoS::AtMostOnce, "QoS 0 stays QoS 0");

    publish(&publ, "alice/q1", QoS::AtLeastOnce, false, "one").await;
    let p = sub.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("alice/q1", &b"one"[..])
    );
    assert_eq!(p.qos, QoS::AtLeastOnce, "QoS 1 arrives at QoS 1");
    assert!(!p.retain);
    assert!(drain(&mut sub).await.is_empty(), "each message once");
    assert!(b.metric("moatmq_cluster_messages_received_total").await >= 2.0);

    // QoS 2 arrives at QoS 2 for a QoS 2 subscription, once; at QoS 1 for the other.
    let mut sub2 = login(b.first_addr(), "alice-sub2", "alice").await;
    assert!(subscribe(&mut sub2, "alice/q2", QoS::ExactlyOnce).await);
    publish(&publ, "alice/q2", QoS::ExactlyOnce, false, "two").await;
    let p = sub2.next_publish().await;
    assert_eq!((p.topic.as_str(), p.qos), ("alice/q2", QoS::ExactlyOnce));
    assert!(drain(&mut sub2).await.is_empty(), "QoS 2 once");
    let p = sub.next_publish().await;
    assert_eq!((p.topic.as_str(), p.qos), ("alice/q2", QoS::AtLeastOnce));
}

#[tokio::test]
async fn retained_flag_and_qos_cross_nodes_as_mqtt_requires() {
    let nats = Nats::start().await;
    let a = node(&nats, "node-a", "").await;
    let b = node(&nats, "node-b", "").await;
    let mut live = login(b.first_addr(), "alice-live", "alice").await;
    assert!(subscribe(&mut live, "alice/#", QoS::AtLeastOnce).await);
    let publ = login(a.first_addr(), "alice-pub", "alice").await;
    publish(&publ, "alice/state", QoS::AtLeastOnce, true, "on").await;

    // A live forward of a retained publish has retain = 0 (MQTT-3.3.1-9).
    let p = live.next_publish().await;
    assert_eq!(&p.payload[..], b"on");
    assert!(!p.retain, "live forward carries retain 0");
    assert_eq!(p.qos, QoS::AtLeastOnce);

    // A new subscriber on the other node gets the retained copy, retain = 1, at the
    // lower of the published and granted QoS.
    let mut late = login(b.first_addr(), "alice-late", "alice").await;
    assert!(subscribe(&mut late, "alice/state", QoS::AtMostOnce).await);
    let p = late.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("alice/state", &b"on"[..])
    );
    assert!(p.retain, "retained copy carries retain 1");
    assert_eq!(p.qos, QoS::AtMostOnce);

    // Clearing it on node A clears it on node B.
    publish(&publ, "alice/state", QoS::AtLeastOnce, true, "").await;
    assert_eq!(live.next_publish().await.payload.len(), 0);
    let mut later = login(b.first_addr(), "alice-later", "alice").await;
    assert!(subscribe(&mut later, "alice/state", QoS::AtLeastOnce).await);
    assert!(
        drain(&mut later).await.is_empty(),
        "retained message cleared"
    );
}

#[tokio::test]
async fn read_acl_applies_on_the_receiving_node() {
    let nats = Nats::start().await;
    let a = node(&nats, "node-a", "").await;
    let b = node(&nats, "node-b", "").await;
    let mut admin = login(b.first_addr(), "admin-sub", "admin").await;
    assert!(subscribe(&mut admin, "feed/#", QoS::AtLeastOnce).await);
    // bob may subscribe to feed/# but not read feed/secret/#: checked per delivery.
    let mut bob = login(b.first_addr(), "bob-sub", "bob").await;
    assert!(subscribe(&mut bob, "feed/#", QoS::AtLeastOnce).await);
    let publ = login(a.first_addr(), "alice-pub", "alice").await;
    publish(&publ, "feed/secret/1", QoS::AtLeastOnce, false, "s").await;
    publish(&publ, "feed/open/1", QoS::AtLeastOnce, false, "o").await;

    let topics = |got: Vec<rumqttc::Publish>| got.into_iter().map(|p| p.topic).collect::<Vec<_>>();
    // node B has both (the reader allowed everything gets both)...
    let mut seen = vec![admin.next_publish().await.topic];
    seen.extend(topics(drain(&mut admin).await));
    assert_eq!(seen, ["feed/secret/1", "feed/open/1"]);
    // ...and bob only what his ACL lets him read.
    assert_eq!(topics(drain(&mut bob).await), ["feed/open/1"]);
}

#[tokio::test]
async fn three_nodes_deliver_each_message_once_in_order() {
    let nats = Nats::start().await;
    let nodes = [
        node(&nats, "node-a", "").await,
        node(&nats, "node-b", "").await,
        node(&nats, "node-c", "").await,
    ];
    let mut subs = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let mut s = login(n.first_addr(), &format!("alice-sub-{i}"), "alice").await;
        assert!(subscribe(&mut s, "alice/#", QoS::AtLeastOnce).await);
        subs.push(s);
    }
    // Publishers on two nodes: nothing may come back around to either.
    let on_a = login(nodes[0].first_addr(), "alice-pub-a", "alice").await;
    let on_c = login(nodes[2].first_addr(), "alice-pub-c", "alice").await;
    for i in 0..20 {
        publish(&on_a, "alice/a", QoS::AtLeastOnce, false, &i.to_string()).await;
        publish(&on_c, "alice/c", QoS::AtMostOnce, false, &i.to_string()).await;
    }
    let expected: Vec<String> = (0..20).map(|i| i.to_string()).collect();
    for (i, s) in subs.iter_mut().enumerate() {
        let mut got = vec![s.next_publish().await];
        got.extend(drain(s).await);
        for topic in ["alice/a", "alice/c"] {
            let payloads = payloads_on(&got, topic);
            assert_eq!(payloads, expected, "node {i}, {topic}: once each, in order");
        }
        assert_eq!(got.len(), 40, "node {i}: nothing else");
    }
}

#[tokio::test]
async fn nats_clients_and_mqtt_clients_exchange_messages_where_the_acl_allows() {
    let nats = Nats::start().await;
    // Node B has no native_user: alone, it takes nothing from NATS clients (default
    // deny).
    let b = node(&nats, "node-b", "").await;
    let mut on_b = login(b.first_addr(), "admin-b", "admin").await;
    assert!(subscribe(&mut on_b, "#", QoS::AtLeastOnce).await);
    let nc = nats.client().await;
    nc.publish("moatmq.nats-in.early", "x".into())
        .await
        .unwrap();
    assert!(moatmq_broker::cluster::round_trip(&nc).await);
    assert!(drain(&mut on_b).await.is_empty());

    // Node A takes NATS-native messages in as natsbridge and forwards them: node B
    // delivers them too, once.
    let a = node(&nats, "node-a", "native_user = \"natsbridge\"\n").await;
    let mut on_a = login(a.first_addr(), "admin-a", "admin").await;
    assert!(subscribe(&mut on_a, "#", QoS::AtLeastOnce).await);
    let watcher = nats.client().await;
    let mut watched = watcher.subscribe("moatmq.nats-in.>").await.unwrap();
    assert!(moatmq_broker::cluster::round_trip(&watcher).await);
    // natsbridge may not write alice/#: refused; nats-in/# is allowed.
    nc.publish("moatmq.alice.forged", "x".into()).await.unwrap();
    nc.publish("moatmq.nats-in.temp//c", "21.5".into())
        .await
        .unwrap();
    assert!(moatmq_broker::cluster::round_trip(&nc).await);
    for on in [&mut on_a, &mut on_b] {
        let got = on.next_publish().await;
        assert_eq!(
            (got.topic.as_str(), &got.payload[..]),
            ("nats-in/temp.c", &b"21.5"[..])
        );
        assert_eq!(got.qos, QoS::AtMostOnce, "no QoS header: QoS 0");
        assert!(drain(on).await.is_empty(), "once; the forged one refused");
    }
    // Node A forwards it through the transfer stream only: NATS services see it once,
    // as its publisher sent it.
    let m = watched.next().await.expect("the NATS client's message");
    assert!(m.headers.map_or(true, |h| h.get("Moatmq-Node").is_none()));
    assert!(
        tokio::time::timeout(QUIET, watched.next()).await.is_err(),
        "not published again on its subject"
    );

    // MQTT -> NATS: the subject of nats-server's MQTT mapping, under the prefix.
    let mut nsub = nc.subscribe("moatmq.alice.>").await.unwrap();
    assert!(moatmq_broker::cluster::round_trip(&nc).await);
    let publ = login(b.first_addr(), "alice-pub", "alice").await;
    publish(&publ, "alice/a.b//c", QoS::AtLeastOnce, true, "hello").await;
    let m = tokio::time::timeout(WAIT, nsub.next())
        .await
        .expect("a NATS message in time")
        .expect("subscription open");
    assert_eq!(m.subject.as_str(), "moatmq.alice.a//b./.c");
    assert_eq!(&m.payload[..], b"hello");
    let headers = m.headers.expect("moatmq headers");
    let h = |name: &str| headers.get(name).map(|v| v.as_str().to_string());
    assert_eq!(h("Moatmq-Node").as_deref(), Some("node-b"));
    assert_eq!(h("Moatmq-Qos").as_deref(), Some("1"));
    assert_eq!(h("Moatmq-Retain").as_deref(), Some("1"));
    assert_eq!(h("Moatmq-User").as_deref(), Some("alice"));
    // A message refused by admit (alice may not write bob/#) never reaches NATS.
    let mut all = nc.subscribe("moatmq.>").await.unwrap();
    assert!(moatmq_broker::cluster::round_trip(&nc).await);
    publish(&publ, "bob/x", QoS::AtLeastOnce, false, "no").await;
    publish(&publ, "alice/after", QoS::AtLeastOnce, false, "yes").await;
    let m = tokio::time::timeout(WAIT, all.next())
        .await
        .expect("a NATS message in time")
        .expect("subscription open");
    assert_eq!(m.subject.as_str(), "moatmq.alice.after");

    // A retained NATS-native message reaches the cluster's retained bucket too: a node
    // started afterwards serves it.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Moatmq-Retain", "1");
    nc.publish_with_headers("moatmq.nats-in.kept", headers, "k".into())
        .await
        .unwrap();
    assert!(moatmq_broker::cluster::round_trip(&nc).await);
    tokio::time::sleep(QUIET).await;
    let c = node(&nats, "node-c", "").await;
    let mut on_c = login(c.first_addr(), "admin-c", "admin").await;
    assert!(subscribe(&mut on_c, "nats-in/kept", QoS::AtLeastOnce).await);
    let kept = on_c.next_publish().await;
    assert_eq!((&kept.payload[..], kept.retain), (&b"k"[..], true));
}

#[tokio::test]
async fn readyz_follows_nats_and_routing_resumes_after_a_nats_restart() {
    let mut nats = Nats::start().await;
    let a = node(&nats, "node-a", "").await;
    let b = node(&nats, "node-b", "").await;
    let mut sub_a = login(a.first_addr(), "alice-sub-a", "alice").await;
    assert!(subscribe(&mut sub_a, "alice/#", QoS::AtLeastOnce).await);
    let publ = login(a.first_addr(), "alice-pub", "alice").await;
    nats.kill();
    wait_ready(&a, false).await;
    wait_ready(&b, false).await;
    // Clients already connected are served locally while NATS is away (QoS 0; QoS 1
    // waits for the transfer stream, below); new ones are refused (server
    // unavailable), to connect to a node that can route them.
    publish(&publ, "alice/local", QoS::AtMostOnce, false, "l").await;
    assert_eq!(&sub_a.next_publish().await.payload[..], b"l");
    assert_refused(b.first_addr()).await;

    nats.restart().await;
    wait_ready(&a, true).await;
    wait_ready(&b, true).await;
    let mut sub_b = login(b.first_addr(), "alice-sub-b", "alice").await;
    assert!(subscribe(&mut sub_b, "alice/#", QoS::AtLeastOnce).await);
    publish(&publ, "alice/again", QoS::AtLeastOnce, false, "x").await;
    let p = sub_b.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("alice/again", &b"x"[..])
    );
}

/// Whether a PUBACK arrives within `wait`.
async fn puback_within(c: &mut v4::Client, wait: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, c.rx.recv()).await {
            Ok(Some(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) => return true,
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => return false,
        }
    }
}

#[tokio::test]
async fn a_qos_1_puback_waits_for_the_transfer_stream_across_a_nats_restart() {
    let mut nats = Nats::start().await;
    let a = node(&nats, "node-a", "").await;
    let b = node(&nats, "node-b", "").await;
    let mut sub = login(b.first_addr(), "alice-sub", "alice").await;
    assert!(subscribe(&mut sub, "alice/#", QoS::AtLeastOnce).await);
    let mut publ = login(a.first_addr(), "alice-pub", "alice").await;
    publish(&publ, "alice/before", QoS::AtLeastOnce, false, "1").await;
    assert!(puback_within(&mut publ, WAIT).await);
    assert_eq!(&sub.next_publish().await.payload[..], b"1");

    // NATS away: the publish is not acknowledged, and reaches nobody yet.
    nats.kill();
    wait_ready(&a, false).await;
    publish(&publ, "alice/held", QoS::AtLeastOnce, false, "2").await;
    assert!(
        !puback_within(&mut publ, Duration::from_secs(2)).await,
        "PUBACK before JetStream had the message"
    );
    assert!(sub.publish_within(QUIET).await.is_none());

    // NATS back: the PUBACK comes, node B delivers it, once.
    nats.restart().await;
    assert!(
        puback_within(&mut publ, Duration::from_secs(20)).await,
        "no PUBACK after NATS came back"
    );
    let p = sub
        .publish_within(Duration::from_secs(20))
        .await
        .expect("delivered on B");
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("alice/held", &b"2"[..])
    );
    assert!(
        sub.publish_within(Duration::from_secs(2)).await.is_none(),
        "delivered twice"
    );
    // Sent again after the reconnection, stored once (duplicate window).
    let mut stream = transfer_stream(&nats).await;
    let state = stream.info().await.expect("stream info").state.clone();
    assert_eq!(state.messages, 2);
    let last = stream
        .get_raw_message(state.last_sequence)
        .await
        .expect("last message");
    let find = |needle: &[u8]| last.payload.windows(needle.len()).any(|w| w == needle);
    assert!(!find(b"alice"), "the topic is sealed in the stream");
}

#[tokio::test]
async fn tampered_moved_or_foreign_transfer_messages_are_refused_and_counted() {
    let nats = Nats::start().await;
    let _a = node(&nats, "node-a", "").await;
    let b = node(&nats, "node-b", "").await;
    let mut sub = login(b.first_addr(), "alice-sub", "alice").await;
    assert!(subscribe(&mut sub, "alice/#", QoS::AtLeastOnce).await);
    let js = async_nats::jetstream::new(nats.client().await);
    let put = |id: &str, value: Vec<u8>| {
        let js = js.clone();
        let id = id.to_string();
        async move {
            let message = async_nats::jetstream::message::PublishMessage::build()
                .message_id(id)
                .payload(value.into());
            js.send_publish("moatmq_xfer.node-a", message)
                .await
                .expect("published")
                .await
                .expect("stored");
        }
    };
    let ours = cluster_seal(CLUSTER_KEY);
    let theirs = cluster_seal(&"ab".repeat(32));
    let plain = transfer_plaintext("alice/t", b"evil");
    let mut altered = ours
        .seal_transfer("moatmq_xfer", "node-a:9:1", &plain)
        .unwrap();
    let last = altered.len() - 1;
    altered[last] ^= 1;
    put("node-a:9:1", altered).await;
    let moved = ours
        .seal_transfer("moatmq_xfer", "node-a:9:2", &plain)
        .unwrap();
    put("node-a:9:3", moved).await;
    put(
        "node-a:9:4",
        theirs
            .seal_transfer("moatmq_xfer", "node-a:9:4", &plain)
            .unwrap(),
    )
    .await;
    put("node-a:9:5", b"plain text".to_vec()).await;
    // Sealed right, but for node-c while on node-a's subject.
    put(
        "node-c:9:6",
        ours.seal_transfer("moatmq_xfer", "node-c:9:6", &plain)
            .unwrap(),
    )
    .await;
    // The control: sealed right under its id, it is taken in.
    let good = transfer_plaintext("alice/t", b"good");
    put(
        "node-a:9:7",
        ours.seal_transfer("moatmq_xfer", "node-a:9:7", &good)
            .unwrap(),
    )
    .await;
    let p = sub.next_publish().await;
    assert_eq!(
        &p.payload[..],
        b"good",
        "only the well sealed one is delivered"
    );
    assert!(sub.publish_within(QUIET).await.is_none());
    assert_eq!(b.metric("moatmq_cluster_state_rejected_total").await, 5.0);
}

/// A node's messages stored in the transfer stream out of its order (one lost with its
/// NATS connection and sent again, under its id, after later ones went out on the new
/// connection) reach subscribers on the other nodes in the node's order: node X's
/// messages 1, 3, 4 and then 2 (written with a NATS client, sealed as node X would)
/// arrive as 1, 2, 3, 4; a number node X never stored (6 missing before 7) holds 7 back
/// for a few seconds only. (Before: 1, 3, 4, 2.)
#[tokio::test]
async fn a_nodes_messages_stored_out_of_its_order_are_delivered_in_its_order() {
    let nats = Nats::start().await;
    let b = node(&nats, "node-b", "").await;
    let mut sub = login(b.first_addr(), "alice-sub", "alice").await;
    assert!(subscribe(&mut sub, "alice/#", QoS::AtLeastOnce).await);
    let js = async_nats::jetstream::new(nats.client().await);
    let put = |n: u64| {
        let js = js.clone();
        async move { forge_transfer(&js, "node-x", n, "alice/t", n.to_string().as_bytes()).await }
    };
    for n in [1, 3, 4] {
        put(n).await;
    }
    let first = sub.next_publish().await;
    assert_eq!(&first.payload[..], b"1");
    tokio::time::sleep(Duration::from_millis(500)).await;
    put(2).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(String::from_utf8(sub.next_publish().await.payload.to_vec()).unwrap());
    }
    assert_eq!(got, ["2", "3", "4"], "in node X's order");
    put(5).await;
    put(7).await;
    assert_eq!(&sub.next_publish().await.payload[..], b"5");
    let late = sub
        .publish_within(Duration::from_secs(10))
        .await
        .expect("7 goes on once 6 is given up");
    assert_eq!(&late.payload[..], b"7");
}

/// A batch as nodes put it in the transfer stream: `count u32 BE | (len u32 BE |
/// message)*`.
fn transfer_batch_plaintext(messages: &[Vec<u8>]) -> Vec<u8> {
    let mut out = (messages.len() as u32).to_be_bytes().to_vec();
    for m in messages {
        out.extend_from_slice(&(m.len() as u32).to_be_bytes());
        out.extend_from_slice(m);
    }
    out
}

#[tokio::test]
async fn transfer_batches_deliver_their_messages_in_order_and_open_only_as_sealed() {
    let nats = Nats::start().await;
    let _a = node(&nats, "node-a", "").await;
    let b = node(&nats, "node-b", "").await;
    let mut sub = login(b.first_addr(), "alice-sub", "alice").await;
    assert!(subscribe(&mut sub, "alice/#", QoS::AtLeastOnce).await);
    let js = async_nats::jetstream::new(nats.client().await);
    let put = |id: &str, batch: bool, value: Vec<u8>| {
        let js = js.clone();
        let id = id.to_string();
        async move {
            let mut message = async_nats::jetstream::message::PublishMessage::build()
                .message_id(id)
                .payload(value.into());
            if batch {
                message = message.header("Moatmq-Batch", "2");
            }
            js.send_publish("moatmq_xfer.node-a", message)
                .await
                .expect("published")
                .await
                .expect("stored");
        }
    };
    let ours = cluster_seal(CLUSTER_KEY);
    let evil = transfer_batch_plaintext(&[
        transfer_plaintext("alice/t", b"evil-1"),
        transfer_plaintext("alice/t", b"evil-2"),
    ]);
    // Sealed as one message, named a batch: refused.
    let single = ours
        .seal_transfer("moatmq_xfer", "node-a:9:1", &evil)
        .unwrap();
    put("node-a:9:1", true, single).await;
    // Sealed as a batch, not named one (what a node before batching sees): refused.
    let unnamed = ours
        .seal_transfer_batch("moatmq_xfer", "node-a:9:2", &evil)
        .unwrap();
    put("node-a:9:2", false, unnamed).await;
    // Altered, or moved to another id.
    let mut altered = ours
        .seal_transfer_batch("moatmq_xfer", "node-a:9:3", &evil)
        .unwrap();
    altered[20] ^= 1;
    put("node-a:9:3", true, altered).await;
    let moved = ours
        .seal_transfer_batch("moatmq_xfer", "node-a:9:4", &evil)
        .unwrap();
    put("node-a:9:5", true, moved).await;
    // Authenticated, but its count says more than it holds: refused whole.
    let mut short = evil.clone();
    short[3] = 3;
    put(
        "node-a:9:6",
        true,
        ours.seal_transfer_batch("moatmq_xfer", "node-a:9:6", &short)
            .unwrap(),
    )
    .await;
    // The control: a well sealed batch, its messages delivered in order.
    let good = transfer_batch_plaintext(&[
        transfer_plaintext("alice/t", b"good-1"),
        transfer_plaintext("alice/u", b"good-2"),
        transfer_plaintext("alice/t", b"good-3"),
    ]);
    put(
        "node-a:9:7",
        true,
        ours.seal_transfer_batch("moatmq_xfer", "node-a:9:7", &good)
            .unwrap(),
    )
    .await;
    let mut got = vec![sub.next_publish().await];
    got.extend(drain(&mut sub).await);
    let got: Vec<(String, String)> = got
        .iter()
        .map(|p| (p.topic.clone(), String::from_utf8_lossy(&p.payload).into()))
        .collect();
    let want = [
        ("alice/t", "good-1"),
        ("alice/u", "good-2"),
        ("alice/t", "good-3"),
    ]
    .map(|(t, p)| (t.to_string(), p.to_string()));
    assert_eq!(got, want, "only the good batch, in order");
    assert_eq!(b.metric("moatmq_cluster_state_rejected_total").await, 5.0);
}

/// What each node put in the transfer stream: `(subject, named a batch)` per stream
/// message, in order.
async fn stream_messages(nats: &Nats) -> Vec<(String, bool)> {
    let mut stream = transfer_stream(nats).await;
    let last = last_sequence(&mut stream).await;
    let mut out = Vec::new();
    for seq in 1..=last {
        let m = stream.get_raw_message(seq).await.expect("stream message");
        let batch = m.headers.get("Moatmq-Batch").is_some();
        out.push((m.subject.to_string(), batch));
    }
    out
}

/// A rolling upgrade from a release that reads no batches: nodes with `transfer_batch
/// = 1` write one message per stream message, unnamed (what that release reads), and
/// read the batches of upgraded nodes; nodes without it batch what is queued.
#[tokio::test]
async fn nodes_batching_and_nodes_sending_one_by_one_exchange_every_message() {
    let nats = Nats::start().await;
    let one = node(&nats, "node-one", "transfer_batch = 1").await;
    let batching = node(&nats, "node-batching", "").await;
    let mut sub_one = login(one.first_addr(), "alice-sub-one", "alice").await;
    assert!(subscribe(&mut sub_one, "alice/#", QoS::AtLeastOnce).await);
    let mut sub_batching = login(batching.first_addr(), "alice-sub-b", "alice").await;
    assert!(subscribe(&mut sub_batching, "alice/#", QoS::AtLeastOnce).await);
    const N: usize = 300;
    for (node, topic) in [(&one, "alice/from-one"), (&batching, "alice/from-batching")] {
        let publ = login(node.first_addr(), &format!("pub-{topic}"), "alice").await;
        // QoS 0 in a burst: the node's output finds many queued at once.
        for i in 0..N {
            publish(&publ, topic, QoS::AtMostOnce, false, &i.to_string()).await;
        }
    }
    let expected: Vec<String> = (0..N).map(|i| i.to_string()).collect();
    for (name, sub) in [
        ("node-one", &mut sub_one),
        ("node-batching", &mut sub_batching),
    ] {
        let mut got = vec![sub.next_publish().await];
        got.extend(drain(sub).await);
        for topic in ["alice/from-one", "alice/from-batching"] {
            let payloads = payloads_on(&got, topic);
            assert_eq!(payloads, expected, "{name}, {topic}: every one, in order");
        }
    }
    let stream = stream_messages(&nats).await;
    let from_one: Vec<bool> = stream
        .iter()
        .filter(|(s, _)| s == "moatmq_xfer.node-one")
        .map(|(_, batch)| *batch)
        .collect();
    assert_eq!(from_one, vec![false; N], "one unnamed stream message each");
    let from_batching: Vec<bool> = stream
        .iter()
        .filter(|(s, _)| s == "moatmq_xfer.node-batching")
        .map(|(_, batch)| *batch)
        .collect();
    assert!(from_batching.iter().all(|b| *b), "all named batches");
    eprintln!("{N} messages in {} batches", from_batching.len());
    assert!(
        from_batching.len() < N / 2,
        "{} stream messages for {N} messages: not batched",
        from_batching.len()
    );
}

#[tokio::test]
async fn nodes_reach_nats_over_mutual_tls() {
    let ca = moatmq_testkit::TestCa::new("nats test CA");
    let dir = tempfile::tempdir().expect("temp dir");
    let (cert, key) = ca.server(dir.path(), "nats");
    let ca_file = ca.write_ca(dir.path(), "ca.crt");
    let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let tls = vec![
        "--tlsverify".to_string(),
        "--tlscert".into(),
        path(&cert),
        "--tlskey".into(),
        path(&key),
        "--tlscacert".into(),
        path(&ca_file),
    ];
    let nats = Nats::start_with(dir, tls).await;
    let with_tls = |b: moatmq_testkit::TestBrokerBuilder| {
        ca.write_ca(b.dir(), "nats-ca.crt");
        ca.valid_client(b.dir(), "node", "moatmq-node");
        b
    };
    let section = "[cluster.tls]\nca = \"nats-ca.crt\"\ncert = \"node.crt\"\nkey = \"node.key\"\n";
    let a = node_with(&nats, "node-a", section, with_tls).await;
    let b = node_with(&nats, "node-b", section, with_tls).await;
    let mut sub = login(b.first_addr(), "alice-sub", "alice").await;
    assert!(subscribe(&mut sub, "alice/#", QoS::AtLeastOnce).await);
    let publ = login(a.first_addr(), "alice-pub", "alice").await;
    publish(&publ, "alice/tls", QoS::AtLeastOnce, false, "sealed").await;
    assert_eq!(&sub.next_publish().await.payload[..], b"sealed");

    // Without the client certificate the NATS server refuses the node: never ready.
    let plain = with_key(TestBroker::builder(), CLUSTER_KEY)
        .users(USERS)
        .metrics()
        .toml(&format!(
            "[cluster]\nservers = [\"{}\"]\nnode_name = \"node-c\"\n",
            nats.url()
        ))
        .start()
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!ready(&plain).await, "a node NATS refused is not ready");
}

#[test]
fn check_refuses_a_missing_credentials_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.toml");
    std::fs::write(
        &path,
        "[[listener]]\nname = \"tcp\"\nbind = \"127.0.0.1:0\"\n\
         [cluster]\nservers = [\"nats://127.0.0.1:4222\"]\nnode_name = \"n\"\n\
         credentials = \"nats.creds\"\n[retained]\npath = \"data\"\nkey_file = \"retained.key\"\n",
    )
    .unwrap();
    moatmq_store::RetainedKey::write_new(&dir.path().join("retained.key")).unwrap();
    let config = moatmq_config::Config::load(&path).unwrap();
    let err = moatmq_broker::validate(&config).unwrap_err().to_string();
    let expected = format!(
        "cluster: credentials {}: ",
        dir.path().join("nats.creds").display()
    );
    assert!(err.starts_with(&expected), "{err}");
}

#[tokio::test]
async fn a_node_starts_unready_and_refusing_while_nats_is_away_and_joins_when_it_comes() {
    let mut nats = Nats::start().await;
    let a = node(&nats, "node-a", "").await;
    nats.kill();
    // The broker starts (its clients are served locally) but says it is not ready.
    let b = with_key(TestBroker::builder(), CLUSTER_KEY)
        .users(USERS)
        .acl(ACL)
        .metrics()
        .no_connection_rate()
        .toml(&format!(
            "[cluster]\nservers = [\"{}\"]\nnode_name = \"node-b\"\n",
            nats.url()
        ))
        .start()
        .await;
    assert!(!ready(&b).await, "not ready without NATS");
    assert_refused(b.first_addr()).await;

    nats.restart().await;
    wait_ready(&a, true).await;
    wait_ready(&b, true).await;
    let mut sub = login(b.first_addr(), "alice-sub", "alice").await;
    assert!(subscribe(&mut sub, "alice/#", QoS::AtLeastOnce).await);
    let publ = login(a.first_addr(), "alice-pub", "alice").await;
    publish(&publ, "alice/joined", QoS::AtLeastOnce, false, "j").await;
    let p = sub.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("alice/joined", &b"j"[..])
    );
}

#[tokio::test]
async fn mqtt5_properties_cross_nodes() {
    use moatmq_testkit::v5;
    use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
    use rumqttc::v5::mqttbytes::QoS as Q5;
    let login5 = |addr: SocketAddr, id: &str| {
        let mut o = v5::options(addr, id);
        o.set_credentials("alice", "alice-pw");
        async move { v5::connect(o).await.expect("login") }
    };
    let nats = Nats::start().await;
    let a = node(&nats, "node-a", "").await;
    let b = node(&nats, "node-b", "").await;
    let mut sub = login5(b.first_addr(), "alice-sub5").await;
    sub.client
        .subscribe("alice/#", Q5::AtLeastOnce)
        .await
        .unwrap();
    sub.incoming(|p| matches!(p, Packet::SubAck(_)).then_some(()))
        .await
        .expect("SUBACK");
    let publ = login5(a.first_addr(), "alice-pub5").await;
    let props = PublishProperties {
        content_type: Some("text/plain".into()),
        response_topic: Some("alice/reply".into()),
        correlation_data: Some(vec![1, 2, 0xff].into()),
        user_properties: vec![("k".into(), "v".into()), ("k".into(), "w".into())],
        ..Default::default()
    };
    publ.client
        .publish_with_properties("alice/props", Q5::AtLeastOnce, true, "hello", props)
        .await
        .unwrap();
    let got = sub.next_publish().await;
    assert_eq!(&got.payload[..], b"hello");
    let check = |p: Option<PublishProperties>| {
        let p = p.expect("properties crossed the nodes");
        assert_eq!(p.content_type.as_deref(), Some("text/plain"));
        assert_eq!(p.response_topic.as_deref(), Some("alice/reply"));
        assert_eq!(p.correlation_data.as_deref(), Some(&[1u8, 2, 0xff][..]));
        assert_eq!(
            p.user_properties,
            [("k".to_string(), "v".to_string()), ("k".into(), "w".into())]
        );
    };
    check(got.properties);
    // The retained copy on node B keeps them too.
    let mut late = login5(b.first_addr(), "alice-late5").await;
    late.client
        .subscribe("alice/props", Q5::AtLeastOnce)
        .await
        .unwrap();
    let got = late.next_publish().await;
    assert!(got.retain);
    check(got.properties);
}

/// The cluster's retained bucket, read with a plain NATS client.
async fn retained_bucket(nats: &Nats) -> async_nats::jetstream::kv::Store {
    async_nats::jetstream::new(nats.client().await)
        .get_key_value("moatmq_retained")
        .await
        .expect("the retained bucket exists")
}

/// Waits until the bucket holds `n` values (deletes not counted) and returns them by key.
async fn bucket_values(kv: &async_nats::jetstream::kv::Store, n: usize) -> Vec<(String, Vec<u8>)> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        // `keys()` never ends on a bucket that has held nothing yet: bounded.
        let listed = kv.keys().await.expect("keys").map(|k| k.expect("key"));
        let mut keys: Vec<String> = tokio::time::timeout(QUIET, listed.collect())
            .await
            .unwrap_or_default();
        keys.sort();
        let mut values = Vec::new();
        for key in keys {
            if let Some(v) = kv.get(&key).await.expect("get") {
                values.push((key, v.to_vec()));
            }
        }
        if values.len() == n {
            return values;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "bucket holds {} values, not {n}",
            values.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The cluster key's seal, as the nodes derive it (to forge values in the tests).
fn cluster_seal(hex: &str) -> moatmq_store::ClusterSeal {
    moatmq_store::ClusterSeal::new(&moatmq_store::RetainedKey::from_hex(hex).unwrap())
}

#[tokio::test]
async fn retained_messages_are_shared_sealed_through_the_kv_bucket_and_cleared_from_any_node() {
    let nats = Nats::start().await;
    let a = node(&nats, "node-a", "").await;
    let b = node(&nats, "node-b", "").await;
    let on_a = login(a.first_addr(), "alice-pub-a", "alice").await;
    publish(
        &on_a,
        "alice/secret-topic",
        QoS::AtLeastOnce,
        true,
        "secret-payload",
    )
    .await;
    let kv = retained_bucket(&nats).await;
    let values = bucket_values(&kv, 1).await;

    // NATS holds a keyed hash and ciphertext: neither the topic nor the payload.
    let (key, value) = &values[0];
    assert_eq!(key, &cluster_seal(CLUSTER_KEY).key_of("alice/secret-topic"));
    let holds = |needle: &[u8]| value.windows(needle.len()).any(|w| w == needle);
    assert!(
        !holds(b"secret") && !holds(b"alice"),
        "no plaintext in the bucket"
    );

    let mut sub = login(b.first_addr(), "alice-sub-b", "alice").await;
    assert!(subscribe(&mut sub, "alice/#", QoS::AtLeastOnce).await);
    let p = sub.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..], p.retain),
        ("alice/secret-topic", &b"secret-payload"[..], true)
    );

    // Cleared on B: gone from the bucket and from A.
    let on_b = login(b.first_addr(), "alice-pub-b", "alice").await;
    publish(&on_b, "alice/secret-topic", QoS::AtLeastOnce, true, "").await;
    bucket_values(&kv, 0).await;
    let mut late = login(a.first_addr(), "alice-late-a", "alice").await;
    assert!(subscribe(&mut late, "alice/#", QoS::AtLeastOnce).await);
    assert!(drain(&mut late).await.is_empty(), "cleared on A too");
}

#[tokio::test]
async fn a_node_started_after_a_retained_publish_serves_it_at_once() {
    let nats = Nats::start().await;
    let a = node(&nats, "node-a", "").await;
    let publ = login(a.first_addr(), "alice-pub", "alice").await;
    publish(
        &publ,
        "alice/early",
        QoS::AtLeastOnce,
        true,
        "before you came",
    )
    .await;
    bucket_values(&retained_bucket(&nats).await, 1).await;

    // Ready means loaded: the first subscriber gets it with no wait.
    let b = node(&nats, "node-b", "").await;
    let mut sub = login(b.first_addr(), "alice-sub", "alice").await;
    assert!(subscribe(&mut sub, "alice/#", QoS::AtLeastOnce).await);
    let p = sub.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..], p.retain, p.qos),
        (
            "alice/early",
            &b"before you came"[..],
            true,
            QoS::AtLeastOnce
        )
    );
}

#[tokio::test]
async fn a_node_with_another_key_refuses_to_start_and_says_why() {
    let nats = Nats::start().await;
    let _a = node(&nats, "node-a", "").await;
    let other = "0".repeat(63) + "1";
    let (dir, path) = with_key(TestBroker::builder(), &other)
        .users(USERS)
        .toml(&format!(
            "[cluster]\nservers = [\"{}\"]\nnode_name = \"node-b\"\n",
            nats.url()
        ))
        .write();
    let config = moatmq_config::Config::load(&path).unwrap();
    let err = match moatmq_broker::Broker::start(config).await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a node with another key started"),
    };
    assert_eq!(
        err,
        format!(
            "cluster: the [retained] key (key file {}) does not open the key marker of \
             cluster \"moatmq\" (NATS KV moatmq_meta/key-check): every node of a cluster \
             must use the same [retained] key",
            dir.path().join("retained.key").display()
        )
    );
}

#[tokio::test]
async fn altered_moved_or_foreign_values_in_the_bucket_are_refused() {
    let nats = Nats::start().await;
    let a = node(&nats, "node-a", "").await;
    let publ = login(a.first_addr(), "alice-pub", "alice").await;
    publish(&publ, "alice/t", QoS::AtLeastOnce, true, "genuine").await;
    let kv = retained_bucket(&nats).await;
    let (key, value) = bucket_values(&kv, 1).await.remove(0);

    // Altered in place; the genuine value copied to another topic's key; a value sealed
    // under another key.
    let mut altered = value.clone();
    *altered.last_mut().unwrap() ^= 1;
    kv.put(&key, altered.into()).await.unwrap();
    let seal = cluster_seal(CLUSTER_KEY);
    kv.put(seal.key_of("alice/moved"), value.into())
        .await
        .unwrap();
    let foreign = cluster_seal(&"0".repeat(64));
    let msg = moatmq_store::RetainedMessage {
        topic: "alice/foreign".into(),
        payload: b"forged".to_vec(),
        qos: 0,
        properties: None,
        expires_at: None,
        owner: Some("alice".into()),
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let (_, forged) = foreign
        .seal_retained("moatmq_retained", &msg, Some(now))
        .unwrap();
    kv.put(seal.key_of("alice/foreign"), forged.into())
        .await
        .unwrap();

    // A node joining now, and node A (which dropped its copy of alice/t), serve none.
    let b = node(&nats, "node-b", "").await;
    for (n, id) in [(&a, "alice-a"), (&b, "alice-b")] {
        n.metric_reaches(
            "moatmq_cluster_state_rejected_total",
            3.0,
            &format!("{id}: three values refused"),
        )
        .await;
        let mut sub = login(n.first_addr(), id, "alice").await;
        assert!(subscribe(&mut sub, "alice/#", QoS::AtLeastOnce).await);
        assert!(
            drain(&mut sub).await.is_empty(),
            "{id}: nothing refused is delivered"
        );
    }
}

/// A publish too large for one NATS message (nats-server's default `max_payload` is
/// 1 MiB; the node allows 2 MB packets) cannot reach the other nodes through the
/// transfer stream: it is refused on the publishing node too (MQTT 5: PUBACK 0x83),
/// rather than delivered there only and acknowledged as if every node had it.
#[tokio::test]
async fn a_publish_too_large_for_nats_is_refused_not_acknowledged_and_kept_local() {
    use moatmq_testkit::Raw;
    use rumqttc::v5::mqttbytes::v5 as m5;
    let nats = Nats::start().await;
    let big = |b: moatmq_testkit::TestBrokerBuilder| b.limit("max_packet_size", 2_000_000);
    let a = node_with(&nats, "node-a", "", big).await;
    let b = node_with(&nats, "node-b", "", big).await;
    let mut here = login(a.first_addr(), "sub-a", "alice").await;
    let mut there = login(b.first_addr(), "sub-b", "alice").await;
    assert!(subscribe(&mut here, "alice/#", QoS::AtLeastOnce).await);
    assert!(subscribe(&mut there, "alice/#", QoS::AtLeastOnce).await);
    let mut publ = Raw::v5_login(a.first_addr(), "big-pub", "alice", "alice-pw").await;
    let publish = |pkid: u16, size: usize| {
        let mut p = m5::Publish::new(
            "alice/big",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            vec![b'x'; size],
            None,
        );
        p.pkid = pkid;
        m5::Packet::Publish(p)
    };
    publ.send5(publish(1, 1_100_000)).await;
    match publ.next5(WAIT).await {
        Some(m5::Packet::PubAck(ack)) => {
            assert_eq!(ack.reason, m5::PubAckReason::ImplementationSpecificError)
        }
        other => panic!("expected a PUBACK, got {other:?}"),
    }
    // A message that fits crosses as usual, and nothing of the large one went anywhere.
    publ.send5(publish(2, 1_000)).await;
    match publ.next5(WAIT).await {
        Some(m5::Packet::PubAck(ack)) => assert_eq!(ack.reason, m5::PubAckReason::Success),
        other => panic!("expected a PUBACK, got {other:?}"),
    }
    for c in [&mut here, &mut there] {
        let sizes: Vec<usize> = drain(c).await.iter().map(|p| p.payload.len()).collect();
        assert_eq!(sizes, [1_000]);
    }
}

/// A QoS 1 publisher held while NATS is away keeps its connection: its PINGREQs are
/// answered meanwhile (keep-alive 1 s, held 4 s), and its PUBACK comes once NATS is
/// back. (Before, the held connection read nothing, the client got no PINGRESP and
/// closed it after two keep-alive periods.)
#[tokio::test]
async fn a_held_publisher_with_a_short_keep_alive_stays_connected() {
    let mut nats = Nats::start().await;
    let a = node(&nats, "node-a", "").await;
    let mut o = v4::options(a.first_addr(), "alice-pinger");
    o.set_credentials("alice", "alice-pw");
    o.set_keep_alive(Duration::from_secs(1));
    let mut publ = v4::connect(o).await.expect("login");
    nats.kill();
    wait_ready(&a, false).await;
    publish(&publ, "alice/held", QoS::AtLeastOnce, false, "x").await;
    assert!(
        !puback_within(&mut publ, Duration::from_secs(4)).await,
        "PUBACK before JetStream had the message"
    );
    nats.restart().await;
    assert!(
        puback_within(&mut publ, Duration::from_secs(20)).await,
        "no PUBACK after NATS came back: the held connection was lost"
    );
}

#[tokio::test]
async fn retained_changes_made_while_nats_is_away_reach_the_bucket_and_a_node_started_later() {
    let mut nats = Nats::start().await;
    let a = node(&nats, "node-a", "").await;
    let mut publ = login(a.first_addr(), "alice-pub", "alice").await;
    publish(&publ, "alice/cleared", QoS::AtLeastOnce, true, "old").await;
    assert!(puback_within(&mut publ, WAIT).await);
    publish(&publ, "alice/changed", QoS::AtLeastOnce, true, "first").await;
    assert!(puback_within(&mut publ, WAIT).await);
    bucket_values(&retained_bucket(&nats).await, 2).await;

    // NATS away: one topic cleared and one changed twice at QoS 0 (admitted at once,
    // so the node tries to write the first while NATS is away: that write times out),
    // one set at QoS 1 (its
    // PUBACK waits for the transfer stream); the bucket gets each topic's last change
    // once NATS is back.
    nats.kill();
    wait_ready(&a, false).await;
    publish(&publ, "alice/cleared", QoS::AtMostOnce, true, "").await;
    publish(&publ, "alice/changed", QoS::AtMostOnce, true, "second").await;
    publish(&publ, "alice/changed", QoS::AtMostOnce, true, "third").await;
    publish(&publ, "alice/kept", QoS::AtLeastOnce, true, "while away").await;
    // Long enough for a put tried meanwhile to fail (JetStream's 5 s request timeout).
    tokio::time::sleep(Duration::from_secs(7)).await;
    nats.restart().await;
    assert!(
        puback_within(&mut publ, Duration::from_secs(20)).await,
        "no PUBACK after NATS came back"
    );
    wait_ready(&a, true).await;
    let kv = retained_bucket(&nats).await;
    let seal = cluster_seal(CLUSTER_KEY);
    // The bucket may still hold the cleared topic's old value a moment: wait for it.
    let mut want = [seal.key_of("alice/changed"), seal.key_of("alice/kept")];
    want.sort();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let values = bucket_values(&kv, 2).await;
        let keys: Vec<&String> = values.iter().map(|(k, _)| k).collect();
        if keys == want.iter().collect::<Vec<_>>() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the bucket holds other keys"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A node started now reads the bucket: the last change of each topic, nothing cleared.
    let c = node(&nats, "node-c", "").await;
    let mut sub = login(c.first_addr(), "alice-sub", "alice").await;
    assert!(subscribe(&mut sub, "alice/#", QoS::AtLeastOnce).await);
    let mut got: Vec<(String, Vec<u8>)> = drain(&mut sub)
        .await
        .into_iter()
        .map(|p| (p.topic, p.payload.to_vec()))
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            ("alice/changed".to_string(), b"third".to_vec()),
            ("alice/kept".to_string(), b"while away".to_vec()),
        ]
    );
}

/// Caps the retained bucket's stream at `max` messages (discard new, as every KV
/// bucket): JetStream refuses puts and deletes past it; `-1` lifts the cap.
async fn cap_retained_stream(nats: &Nats, max: i64) {
    let js = async_nats::jetstream::new(nats.client().await);
    let mut stream = js
        .get_stream("KV_moatmq_retained")
        .await
        .expect("the bucket's stream");
    let mut config = stream.info().await.expect("stream info").config.clone();
    config.max_messages = max;
    js.update_stream(config).await.expect("stream updated");
}

#[tokio::test]
async fn retained_changes_jetstream_refused_are_written_once_it_takes_them() {
    let nats = Nats::start().await;
    let a = node(&nats, "node-a", "").await;
    let mut publ = login(a.first_addr(), "alice-pub", "alice").await;
    publish(&publ, "alice/cleared", QoS::AtLeastOnce, true, "old").await;
    assert!(puback_within(&mut publ, WAIT).await);
    let kv = retained_bucket(&nats).await;
    bucket_values(&kv, 1).await;

    // The bucket full (an account or stream limit reached): JetStream refuses a new
    // topic and a clear; NATS itself answers, so the node stays ready. The QoS 1
    // publisher waits for its PUBACK meanwhile; QoS 0 changes from another client
    // replace its waiting one.
    cap_retained_stream(&nats, 1).await;
    publish(&publ, "alice/kept", QoS::AtLeastOnce, true, "first").await;
    let other = login(a.first_addr(), "alice-pub0", "alice").await;
    publish(&other, "alice/kept", QoS::AtMostOnce, true, "second").await;
    publish(&other, "alice/cleared", QoS::AtMostOnce, true, "").await;
    assert!(!puback_within(&mut publ, Duration::from_secs(2)).await);
    // The clear replaces its topic's value (one per subject: the count stays within
    // the cap) and is written beside the refused put: only the new topic waits.
    let seal = cluster_seal(CLUSTER_KEY);
    assert!(bucket_values(&kv, 0).await.is_empty());
    assert!(ready(&a).await);

    // Room again: the last change of each topic is written, nothing older after it,
    // and the publisher of the replaced one gets its PUBACK.
    cap_retained_stream(&nats, -1).await;
    assert!(puback_within(&mut publ, WAIT).await);
    let deadline = tokio::time::Instant::now() + WAIT;
    while bucket_values(&kv, 1).await[0].0 != seal.key_of("alice/kept") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the waiting changes were not written"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let c = node(&nats, "node-c", "").await;
    let mut sub = login(c.first_addr(), "alice-sub", "alice").await;
    assert!(subscribe(&mut sub, "alice/#", QoS::AtLeastOnce).await);
    let got: Vec<(String, Vec<u8>)> = drain(&mut sub)
        .await
        .into_iter()
        .map(|p| (p.topic, p.payload.to_vec()))
        .collect();
    assert_eq!(got, vec![("alice/kept".to_string(), b"second".to_vec())]);
    // Node A too: the bucket's old value of the cleared topic was not applied there.
    let mut on_a = login(a.first_addr(), "alice-sub-a", "alice").await;
    assert!(subscribe(&mut on_a, "alice/#", QoS::AtLeastOnce).await);
    let got: Vec<String> = drain(&mut on_a)
        .await
        .into_iter()
        .map(|p| p.topic)
        .collect();
    assert_eq!(got, vec!["alice/kept".to_string()]);
}

/// Two nodes enforcing different ACLs: a client's rights would depend on which node the
/// Service sends it to. Both say so (warning, `moatmq_cluster_nodes_differing`) until
/// the files agree after a SIGHUP; a third node with the same files is not reported.
#[tokio::test]
async fn nodes_enforcing_different_acls_say_so_until_the_files_agree() {
    let nats = Nats::start().await;
    let a = node(&nats, "moatmq-0", "").await;
    let wider = format!("{ACL}\nuser bob\ntopic readwrite alice/#\n");
    let b = node_with_acl(&nats, "moatmq-1", &wider, "", |b| b).await;
    let c = node(&nats, "moatmq-2", "").await;
    a.metric_reaches("moatmq_cluster_nodes", 3.0, "node A hears of B and C")
        .await;
    a.metric_is("moatmq_cluster_nodes_differing", 1.0, "A reports B (only)")
        .await;
    b.metric_is("moatmq_cluster_nodes_differing", 2.0, "B reports A and C")
        .await;
    c.metric_is("moatmq_cluster_nodes_differing", 1.0, "C reports B (only)")
        .await;

    // B gets the same file and reloads it: nobody differs any more.
    std::fs::write(b.path("aclfile"), ACL).unwrap();
    assert!(b.reload().is_empty());
    for n in [&a, &b, &c] {
        n.metric_is("moatmq_cluster_nodes_differing", 0.0, "the files agree")
            .await;
    }
    assert_eq!(a.metric("moatmq_cluster_nodes").await, 3.0);
}

/// Counts the PUBLISHes `c` receives until none comes for a second.
async fn count_received(c: &mut v4::Client) -> usize {
    let mut n = 0;
    while c.publish_within(Duration::from_secs(1)).await.is_some() {
        n += 1;
    }
    n
}

/// `[cluster] forward_queue` bounds what a node cut off from NATS holds for the other
/// nodes: past it QoS 0 messages stay local and are counted as dropped, while the
/// node's own subscriber gets every one; back, the others get what it held.
#[tokio::test]
async fn forward_queue_bounds_what_a_node_cut_off_holds_for_the_others() {
    const SENT: usize = 3000;
    const QUEUE: usize = 256;
    let nats = Nats::start().await;
    let b = node(&nats, "node-b", "").await;
    let mut link = NatsLink::start(&nats).await;
    let a = node_at(
        &link.url(),
        "node-a",
        ACL,
        &format!("forward_queue = {QUEUE}\n"),
        |b| b,
    )
    .await;
    let mut local = login(a.first_addr(), "local", "bob").await;
    assert!(subscribe(&mut local, "feed/#", QoS::AtMostOnce).await);
    let mut remote = login(b.first_addr(), "remote", "bob").await;
    assert!(subscribe(&mut remote, "feed/#", QoS::AtMostOnce).await);
    let publ = login(a.first_addr(), "pub", "alice").await;
    // Crossing before the cut.
    publ.client
        .publish("feed/q", QoS::AtMostOnce, false, "first")
        .await
        .unwrap();
    assert!(remote.publish_within(WAIT).await.is_some(), "crossed");
    assert!(local.publish_within(WAIT).await.is_some());

    link.cut().await;
    wait_ready(&a, false).await;
    for i in 0..SENT {
        publ.client
            .publish("feed/q", QoS::AtMostOnce, false, i.to_string())
            .await
            .unwrap();
    }
    assert_eq!(
        count_received(&mut local).await,
        SENT,
        "the local subscriber"
    );
    let dropped = a.metric("moatmq_cluster_messages_dropped_total").await;
    link.restore().await;
    wait_ready(&a, true).await;
    let crossed = count_received(&mut remote).await;
    // Besides the queue, what the node had handed to its NATS client before it noticed
    // the cut (up to 4,096 unacknowledged) crosses too; every other one is counted.
    let dropped = dropped as usize;
    assert!(dropped > 0, "nothing dropped: the queue held all {SENT}");
    assert!(
        crossed >= QUEUE,
        "held only {crossed} of the queue's {QUEUE}"
    );
    assert!(
        dropped + crossed >= SENT,
        "lost without being counted: dropped {dropped}, crossed {crossed} of {SENT}"
    );
}

/// A node's path to NATS stalls: the connection looks up (nothing closes it) and
/// nothing arrives. The NATS client pings only an idle connection, and this node's
/// traffic keeps its connection busy: the node must find out itself, go unready and
/// refuse new clients it cannot route, and come back once the path clears, crossing
/// what it held. (It stayed ready, accepting clients, for as long as the stall.)
#[tokio::test]
async fn a_node_whose_path_to_nats_stalls_goes_unready_and_comes_back() {
    let nats = Nats::start().await;
    let b = node(&nats, "node-b", "").await;
    let link = NatsLink::start(&nats).await;
    let a = node_at(&link.url(), "node-a", ACL, "", |b| b).await;
    let mut remote = login(b.first_addr(), "remote", "alice").await;
    assert!(subscribe(&mut remote, "alice/#", QoS::AtLeastOnce).await);
    let publ = login(a.first_addr(), "pub", "alice").await;

    link.stall();
    // Traffic through the stall, as a busy node has.
    let traffic = {
        let client = publ.client.clone();
        tokio::spawn(async move {
            for i in 0..60 {
                let _ = client
                    .publish("alice/t", QoS::AtMostOnce, false, i.to_string())
                    .await;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    wait_ready(&a, false).await;
    // A new client is refused rather than accepted by a node that cannot route it.
    assert_refused(a.first_addr()).await;
    link.resume();
    wait_ready(&a, true).await;
    traffic.abort();
    publ.client
        .publish("alice/after", QoS::AtLeastOnce, false, "x")
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let p = remote
            .publish_within(deadline - tokio::time::Instant::now())
            .await
            .expect("the node's traffic crosses again");
        if p.topic == "alice/after" {
            break;
        }
    }
}
