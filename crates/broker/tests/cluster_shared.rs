//! Shared subscriptions across cluster nodes (docs/cluster.md, "Shared subscriptions
//! across nodes"): a `nats-server -js` on loopback, three in-process nodes, rumqttc
//! clients. A group with members on several nodes gets each message once, on one of
//! them, and every node with members gets some; a member leaving leaves the rest
//! everything; two identities' same-named groups stay apart; the read ACL still
//! decides on the node that delivers.

mod cluster_support;

use cluster_support::{node, password, Nats};
use futures_util::StreamExt;
use moatmq_testkit::{v4, QUIET};
use std::collections::BTreeMap;
use std::net::SocketAddr;

async fn login(addr: SocketAddr, id: &str, user: &str) -> v4::Client {
    let mut o = v4::options(addr, id);
    o.set_credentials(user, password(user));
    v4::connect(o).await.expect("login")
}

/// A member of `filter` (`$share/...`) on `addr`, subscribed at QoS 1.
async fn member(addr: SocketAddr, id: &str, user: &str, filter: &str) -> v4::Client {
    let mut c = login(addr, id, user).await;
    c.subscribe_acked(filter).await;
    c
}

/// Publishes `0..n` (prefixed with `tag`) to `topic` at QoS 1, each acknowledged.
async fn publish_n(c: &mut v4::Client, topic: &str, tag: &str, n: usize) {
    for i in 0..n {
        c.publish_acked(topic, false, format!("{tag}{i}")).await;
    }
}

/// Every payload a client gets until nothing arrives for a while (the group's copies
/// cross NATS twice: a little more than [`QUIET`]).
async fn drain(c: &mut v4::Client) -> Vec<String> {
    let mut got = Vec::new();
    while let Some(p) = c.publish_within(QUIET * 3).await {
        got.push(String::from_utf8_lossy(&p.payload).into_owned());
    }
    got
}

/// How often each payload arrived across `members`, and how many each member got.
async fn tally(members: &mut [&mut v4::Client]) -> (BTreeMap<String, usize>, Vec<usize>) {
    let mut seen = BTreeMap::new();
    let mut per_member = Vec::new();
    for m in members.iter_mut() {
        let got = drain(m).await;
        per_member.push(got.len());
        for p in got {
            *seen.entry(p).or_insert(0) += 1;
        }
    }
    (seen, per_member)
}

/// Each of `0..n` (prefixed with `tag`) exactly once.
fn assert_once(seen: &BTreeMap<String, usize>, tag: &str, n: usize) {
    let want: BTreeMap<String, usize> = (0..n).map(|i| (format!("{tag}{i}"), 1)).collect();
    assert_eq!(seen, &want, "every message exactly once across the group");
}

#[tokio::test]
async fn a_group_on_two_nodes_gets_each_message_once_and_both_nodes_get_some() {
    let nats = Nats::start().await;
    let a = node(&nats, "node-a").await;
    let b = node(&nats, "node-b").await;
    let c = node(&nats, "node-c").await;
    let filter = "$share/workers/alice/jobs";
    let mut on_b = member(b.first_addr(), "w-b", "alice", filter).await;
    let mut on_c = member(c.first_addr(), "w-c", "alice", filter).await;
    let mut publisher = login(a.first_addr(), "pub", "alice").await;
    publish_n(&mut publisher, "alice/jobs", "j", 40).await;
    let (seen, per_member) = tally(&mut [&mut on_b, &mut on_c]).await;
    assert_once(&seen, "j", 40);
    assert!(
        per_member.iter().all(|&n| n > 0),
        "both nodes' members get some: {per_member:?}"
    );
    // One consumer for the group, named by a keyed hash: no group name, user or topic.
    let stream = async_nats::jetstream::new(nats.client().await)
        .get_stream("moatmq_xfer")
        .await
        .expect("the transfer stream");
    let names: Vec<String> = stream
        .consumer_names()
        .map(|n| n.expect("a consumer name"))
        .collect()
        .await;
    let groups: Vec<&String> = names.iter().filter(|n| !n.starts_with("node-")).collect();
    assert_eq!(groups.len(), 1, "{names:?}");
    let hash = groups[0].strip_prefix("share_").expect("a group consumer");
    assert!(hash.len() == 32 && hash.bytes().all(|b| b.is_ascii_hexdigit()));
    for plain in ["workers", "alice", "jobs"] {
        assert!(!names.iter().any(|n| n.contains(plain)), "{names:?}");
    }
}

#[tokio::test]
async fn a_message_that_stays_on_its_node_reaches_the_groups_members_there_once() {
    let nats = Nats::start().await;
    let a = node(&nats, "node-a").await;
    let b = node(&nats, "node-b").await;
    let filter = "$share/workers/alice/+";
    let mut on_a = member(a.first_addr(), "w-a", "alice", filter).await;
    let mut on_b = member(b.first_addr(), "w-b", "alice", filter).await;
    // A space has no NATS subject: the topic stays on node A (docs/cluster.md).
    let mut publisher = login(a.first_addr(), "pub", "alice").await;
    publish_n(&mut publisher, "alice/local topic", "l", 5).await;
    let (seen, per_member) = tally(&mut [&mut on_a, &mut on_b]).await;
    assert_once(&seen, "l", 5);
    assert_eq!(per_member, vec![5, 0], "only node A has them");
    // The group's other messages still cross.
    publish_n(&mut publisher, "alice/jobs", "j", 10).await;
    let (seen, _) = tally(&mut [&mut on_a, &mut on_b]).await;
    assert_once(&seen, "j", 10);
}

#[tokio::test]
async fn a_group_with_a_member_on_the_publishing_node_too_gets_each_message_once() {
    let nats = Nats::start().await;
    let a = node(&nats, "node-a").await;
    let b = node(&nats, "node-b").await;
    let c = node(&nats, "node-c").await;
    let filter = "$share/workers/alice/+";
    let mut on_a = member(a.first_addr(), "w-a", "alice", filter).await;
    let mut on_b = member(b.first_addr(), "w-b", "alice", filter).await;
    let mut on_c = member(c.first_addr(), "w-c", "alice", filter).await;
    let mut publisher = login(a.first_addr(), "pub", "alice").await;
    publish_n(&mut publisher, "alice/jobs", "j", 30).await;
    let (seen, per_member) = tally(&mut [&mut on_a, &mut on_b, &mut on_c]).await;
    assert_once(&seen, "j", 30);
    assert_eq!(per_member.iter().sum::<usize>(), 30, "{per_member:?}");
}

#[tokio::test]
async fn members_leaving_leave_the_rest_of_the_group_everything() {
    let nats = Nats::start().await;
    let a = node(&nats, "node-a").await;
    let b = node(&nats, "node-b").await;
    let c = node(&nats, "node-c").await;
    let filter = "$share/workers/alice/jobs";
    let mut b1 = member(b.first_addr(), "w-b1", "alice", filter).await;
    let mut b2 = member(b.first_addr(), "w-b2", "alice", filter).await;
    let mut c1 = member(c.first_addr(), "w-c1", "alice", filter).await;
    let mut publisher = login(a.first_addr(), "pub", "alice").await;
    publish_n(&mut publisher, "alice/jobs", "x", 10).await;
    let (seen, _) = tally(&mut [&mut b1, &mut b2, &mut c1]).await;
    assert_once(&seen, "x", 10);

    // One of node B's two members goes: B and C still share the group.
    b1.client.disconnect().await.unwrap();
    b1.closed_within(moatmq_testkit::WAIT).await;
    publish_n(&mut publisher, "alice/jobs", "y", 10).await;
    let (seen, _) = tally(&mut [&mut b2, &mut c1]).await;
    assert_once(&seen, "y", 10);

    // Node B's last member unsubscribes: node C's member gets everything.
    b2.client.unsubscribe(filter).await.unwrap();
    let unsubscribed = b2
        .incoming(|p| matches!(p, rumqttc::Packet::UnsubAck(_)).then_some(()))
        .await;
    assert!(unsubscribed.is_some(), "UNSUBACK");
    publish_n(&mut publisher, "alice/jobs", "z", 10).await;
    let (seen, per_member) = tally(&mut [&mut b2, &mut c1]).await;
    assert_once(&seen, "z", 10);
    assert_eq!(per_member, vec![0, 10], "all on node C");
}

/// Group `workers` of alice on `alice/jobs` across three nodes: a member on node B
/// that acknowledges nothing (manual acks, never sent), one on node C that acknowledges
/// everything, and a publisher on node A.
struct HoldingGroup {
    holding: v4::Client,
    on_c: v4::Client,
    publisher: v4::Client,
    _nodes: Vec<moatmq_testkit::TestBroker>,
    _nats: Nats,
}

impl HoldingGroup {
    async fn start() -> HoldingGroup {
        let nats = Nats::start().await;
        let a = node(&nats, "node-a").await;
        let b = node(&nats, "node-b").await;
        let c = node(&nats, "node-c").await;
        let filter = "$share/workers/alice/jobs";
        let mut o = v4::options(b.first_addr(), "w-b");
        o.set_credentials("alice", password("alice"));
        o.set_manual_acks(true);
        let mut holding = v4::connect(o).await.expect("login");
        holding.subscribe_acked(filter).await;
        let on_c = member(c.first_addr(), "w-c", "alice", filter).await;
        let publisher = login(a.first_addr(), "pub", "alice").await;
        HoldingGroup {
            holding,
            on_c,
            publisher,
            _nodes: vec![a, b, c],
            _nats: nats,
        }
    }
}

/// A member that leaves holding copies it never acknowledged gives them back
/// to the group at once (MQTT 5 4.8.2): the other node's member gets them, none lost.
/// (Before, the node acknowledged each stream message to JetStream once its copies were
/// in the router, so what the member held was lost for the group.)
#[tokio::test]
async fn copies_a_member_never_acknowledged_go_to_the_rest_of_the_group_when_it_leaves() {
    let mut group = HoldingGroup::start().await;
    let (holding, on_c) = (&mut group.holding, &mut group.on_c);
    publish_n(&mut group.publisher, "alice/jobs", "j", 40).await;
    let held = drain(holding).await;
    assert!(!held.is_empty(), "node B's member got its share");
    // It leaves, none of them acknowledged.
    holding.client.disconnect().await.unwrap();
    holding.closed_within(moatmq_testkit::WAIT).await;
    let mut got = BTreeMap::new();
    while let Some(p) = on_c
        .publish_within(std::time::Duration::from_secs(15))
        .await
    {
        *got.entry(String::from_utf8_lossy(&p.payload).into_owned())
            .or_insert(0) += 1;
        if got.len() == 40 {
            break;
        }
    }
    let missing: Vec<String> = (0..40)
        .map(|i| format!("j{i}"))
        .filter(|p| !got.contains_key(p))
        .collect();
    assert!(
        missing.is_empty(),
        "lost for the group: {missing:?} (node B's member held {held:?})"
    );
}

/// A member that takes its copies and never acknowledges them (a stuck worker) does
/// not take the group's messages for ever: its node holds at most 100 of the group's
/// stream messages unsettled and then pulls no more, so the other node's member gets
/// the rest. (Before, the stuck member got its node's turns, about half of them.)
#[tokio::test]
async fn a_stuck_member_holds_a_bounded_share_and_the_group_gets_the_rest() {
    const N: usize = 400;
    let mut group = HoldingGroup::start().await;
    // One at a time: each its own stream message.
    publish_n(&mut group.publisher, "alice/jobs", "j", N).await;
    let (seen, per_member) = tally(&mut [&mut group.holding, &mut group.on_c]).await;
    assert_once(&seen, "j", N);
    assert!(
        per_member[0] <= 100,
        "the stuck member holds at most its node's 100: {per_member:?}"
    );
}

#[tokio::test]
async fn two_tenants_same_named_groups_on_the_same_filter_stay_apart() {
    let nats = Nats::start().await;
    let a = node(&nats, "node-a").await;
    let b = node(&nats, "node-b").await;
    let c = node(&nats, "node-c").await;
    // Both may read and write common/#: one group name, one filter, two identities.
    let filter = "$share/workers/common/jobs";
    let mut alice_b = member(b.first_addr(), "aw-b", "alice", filter).await;
    let mut alice_c = member(c.first_addr(), "aw-c", "alice", filter).await;
    let mut bob_b = member(b.first_addr(), "bw-b", "bob", filter).await;
    let mut bob_c = member(c.first_addr(), "bw-c", "bob", filter).await;
    let mut admin = login(a.first_addr(), "admin-pub", "admin").await;
    publish_n(&mut admin, "common/jobs", "j", 20).await;
    // Each identity's group gets every message once: neither takes the other's turns.
    let (seen, _) = tally(&mut [&mut alice_b, &mut alice_c]).await;
    assert_once(&seen, "j", 20);
    let (seen, _) = tally(&mut [&mut bob_b, &mut bob_c]).await;
    assert_once(&seen, "j", 20);
}

#[tokio::test]
async fn the_read_acl_still_decides_on_the_node_that_delivers() {
    let nats = Nats::start().await;
    let a = node(&nats, "node-a").await;
    let b = node(&nats, "node-b").await;
    let c = node(&nats, "node-c").await;
    // alice may read alice/# but not alice/secret/#; admin may write anything.
    let filter = "$share/workers/alice/#";
    let mut on_b = member(b.first_addr(), "w-b", "alice", filter).await;
    let mut on_c = member(c.first_addr(), "w-c", "alice", filter).await;
    let mut admin = login(a.first_addr(), "admin-pub", "admin").await;
    for i in 0..10 {
        admin
            .publish_acked("alice/secret/x", false, format!("s{i}"))
            .await;
        admin
            .publish_acked("alice/ok", false, format!("k{i}"))
            .await;
    }
    let (seen, _) = tally(&mut [&mut on_b, &mut on_c]).await;
    assert_once(&seen, "k", 10);
    // A `#` subscriber of another identity sees its own messages only, never a copy.
    let mut watcher = member(b.first_addr(), "watch", "admin", "#").await;
    admin.publish_acked("alice/ok", false, "late").await;
    let got = drain(&mut watcher).await;
    assert_eq!(
        got,
        vec!["late".to_string()],
        "one copy, under its real topic"
    );
}

#[tokio::test]
async fn a_member_also_subscribed_to_everything_gets_each_group_message_once() {
    let nats = Nats::start().await;
    let a = node(&nats, "node-a").await;
    let b = node(&nats, "node-b").await;
    let c = node(&nats, "node-c").await;
    let filter = "$share/workers/common/jobs";
    // `#` matches the router topic of the group's copies too: only the group's own
    // forward of a copy may reach a member.
    let mut wide = member(b.first_addr(), "w-wide", "admin", filter).await;
    wide.subscribe_acked("#").await;
    let mut on_b = member(b.first_addr(), "w-b", "admin", filter).await;
    let mut on_c = member(c.first_addr(), "w-c", "admin", filter).await;
    let mut publisher = login(a.first_addr(), "pub", "alice").await;
    publish_n(&mut publisher, "common/jobs", "j", 30).await;
    let (seen, per_member) = tally(&mut [&mut wide, &mut on_b, &mut on_c]).await;
    // Once through `#`, once through the group.
    let want: BTreeMap<String, usize> = (0..30).map(|i| (format!("j{i}"), 2)).collect();
    assert_eq!(seen, want, "{per_member:?}");
}

#[tokio::test]
async fn an_mqtt5_member_gets_its_own_subscription_identifier_on_the_groups_messages() {
    use rumqttc::v5::mqttbytes::v5::{Packet, SubscribeProperties};
    use rumqttc::v5::mqttbytes::QoS;
    let nats = Nats::start().await;
    let a = node(&nats, "node-a").await;
    let b = node(&nats, "node-b").await;
    let c = node(&nats, "node-c").await;
    let filter = "$share/workers/alice/jobs";
    let mut members = Vec::new();
    for (addr, id) in [(b.first_addr(), "m5-b"), (c.first_addr(), "m5-c")] {
        let mut o = moatmq_testkit::v5::options(addr, id);
        o.set_credentials("alice", password("alice"));
        let mut m = moatmq_testkit::v5::connect(o).await.expect("login");
        let props = SubscribeProperties {
            id: Some(7),
            user_properties: Vec::new(),
        };
        m.client
            .subscribe_with_properties(filter, QoS::AtLeastOnce, props)
            .await
            .expect("subscribe queued");
        m.incoming(|p| matches!(p, Packet::SubAck(_)).then_some(()))
            .await
            .expect("SUBACK");
        members.push(m);
    }
    let mut publisher = login(a.first_addr(), "pub", "alice").await;
    publish_n(&mut publisher, "alice/jobs", "j", 10).await;
    let mut got = 0;
    for m in &mut members {
        while let Some(p) = m.publish_within(QUIET * 3).await {
            got += 1;
            assert_eq!(&p.topic[..], b"alice/jobs");
            let ids = p.properties.map(|p| p.subscription_identifiers);
            assert_eq!(
                ids,
                Some(vec![7]),
                "the member's own identifier, not the mark"
            );
        }
    }
    assert_eq!(got, 10, "each message once");
}

/// A publisher cannot pass a ticket of its own to a group's member (it could settle
/// another copy's ticket, and its stream message would be acknowledged before its
/// member had it): the property of that name it sends is dropped, the node's own is
/// taken out before the member sees the message, and its other properties arrive as
/// sent.
#[tokio::test]
async fn a_publishers_own_ticket_property_never_reaches_a_member() {
    use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
    use rumqttc::v5::mqttbytes::QoS;
    let nats = Nats::start().await;
    let a = node(&nats, "node-a").await;
    let b = node(&nats, "node-b").await;
    let filter = "$share/workers/alice/jobs";
    let mut o = moatmq_testkit::v5::options(b.first_addr(), "m5-b");
    o.set_credentials("alice", password("alice"));
    let mut member5 = moatmq_testkit::v5::connect(o).await.expect("login");
    member5
        .client
        .subscribe(filter, QoS::AtLeastOnce)
        .await
        .expect("subscribe queued");
    member5
        .incoming(|p| matches!(p, Packet::SubAck(_)).then_some(()))
        .await
        .expect("SUBACK");
    let mut o = moatmq_testkit::v5::options(a.first_addr(), "pub5");
    o.set_credentials("alice", password("alice"));
    let mut publisher = moatmq_testkit::v5::connect(o).await.expect("login");
    let sent = vec![
        ("$moatmq-ticket".to_string(), "1".to_string()),
        ("k".to_string(), "v".to_string()),
    ];
    let props = PublishProperties {
        user_properties: sent,
        ..Default::default()
    };
    publisher
        .client
        .publish_with_properties("alice/jobs", QoS::AtLeastOnce, false, "forged", props)
        .await
        .expect("publish queued");
    publisher
        .incoming(|p| matches!(p, Packet::PubAck(_)).then_some(()))
        .await
        .expect("PUBACK");
    let got = member5
        .publish_within(QUIET * 3)
        .await
        .expect("the member gets the message");
    assert_eq!(&got.payload[..], b"forged");
    let user = got
        .properties
        .map(|p| p.user_properties)
        .unwrap_or_default();
    assert_eq!(user, vec![("k".to_string(), "v".to_string())]);
}

#[tokio::test]
async fn what_a_node_pulled_and_never_acknowledged_reaches_a_member_after_the_ack_wait() {
    let nats = Nats::start().await;
    let a = node(&nats, "node-a").await;
    let b = node(&nats, "node-b").await;
    let mut on_b = member(b.first_addr(), "w-b", "alice", "$share/workers/alice/jobs").await;
    // A node that pulls from the group's consumer and dies before acknowledging: a NATS
    // client taking turns with node B, acknowledging nothing.
    let gid =
        &cluster_support::cluster_seal().key_of("share\0u616c696365:workers\0alice/jobs")[..32];
    let consumer: async_nats::jetstream::consumer::PullConsumer =
        async_nats::jetstream::new(nats.client().await)
            .get_stream("moatmq_xfer")
            .await
            .expect("the transfer stream")
            .get_consumer(&format!("share_{gid}"))
            .await
            .expect("the group's consumer");
    let mut dying = consumer
        .batch()
        .max_messages(5)
        .expires(std::time::Duration::from_secs(5))
        .messages()
        .await
        .expect("a pull request");
    let mut publisher = login(a.first_addr(), "pub", "alice").await;
    publish_n(&mut publisher, "alice/jobs", "j", 10).await;
    let mut taken = 0;
    while let Ok(Some(Ok(_))) =
        tokio::time::timeout(std::time::Duration::from_secs(2), dying.next()).await
    {
        taken += 1;
    }
    assert!(taken > 0, "the dying puller took its turns");
    drop(dying);
    // After the ack wait (10 s) JetStream hands those to node B.
    let mut got = BTreeMap::new();
    while let Some(p) = on_b
        .publish_within(std::time::Duration::from_secs(15))
        .await
    {
        *got.entry(String::from_utf8_lossy(&p.payload).into_owned())
            .or_insert(0) += 1;
        if got.len() == 10 {
            break;
        }
    }
    // And nothing twice.
    for (payload, n) in tally(&mut [&mut on_b]).await.0 {
        *got.entry(payload).or_insert(0) += n;
    }
    assert_once(&got, "j", 10);
}

/// A NATS-native message enters the cluster once (the nodes with `native_user` share a
/// NATS queue group; the one that takes it forwards it through the transfer stream):
/// every node's subscriber gets it once, also on a node without `native_user`, and a
/// group with members on two nodes that both take NATS messages in gets it once in
/// all. What `native_user` may not write reaches nobody.
#[tokio::test]
async fn a_nats_native_message_reaches_every_node_once_and_a_group_once() {
    let nats = Nats::start().await;
    let a = cluster_support::native_node(&nats, "node-a").await;
    let b = cluster_support::native_node(&nats, "node-b").await;
    let c = node(&nats, "node-c").await;
    let mut everything = Vec::new();
    for (i, n) in [&a, &b, &c].into_iter().enumerate() {
        everything.push(member(n.first_addr(), &format!("all-{i}"), "admin", "#").await);
    }
    let filter = "$share/workers/alice/from-nats/jobs";
    let mut on_a = member(a.first_addr(), "w-a", "alice", filter).await;
    let mut on_b = member(b.first_addr(), "w-b", "alice", filter).await;
    let nc = nats.client().await;
    let n = 30;
    for i in 0..n {
        nc.publish("moatmq.alice.from-nats.jobs", format!("n{i}").into())
            .await
            .unwrap();
        // natsbridge may write alice/from-nats/# only.
        nc.publish("moatmq.alice.jobs", format!("forged{i}").into())
            .await
            .unwrap();
    }
    assert!(moatmq_broker::cluster::round_trip(&nc).await);
    let (seen, per_member) = tally(&mut [&mut on_a, &mut on_b]).await;
    assert_once(&seen, "n", n);
    assert!(
        per_member.iter().all(|&m| m > 0),
        "both nodes' members get some: {per_member:?}"
    );
    for all in &mut everything {
        let (seen, _) = tally(&mut [all]).await;
        assert_once(&seen, "n", n);
    }
}

/// The message expiry interval counts the time a message spent in the transfer stream
/// (JetStream's own timestamp): a group's consumer read 3 s late (its only member
/// left and came back) drops a message with 2 s and delivers one with 60 s with what
/// is left of it.
#[tokio::test]
async fn a_groups_consumer_read_late_drops_expired_messages_and_counts_down_the_rest() {
    use cluster_support::{expiring5, publish_expiring5, subscribed5};
    let nats = Nats::start().await;
    let a = node(&nats, "node-a").await;
    let b = node(&nats, "node-b").await;
    let filter = "$share/late/alice/exp";
    let login5 = |addr, id: &'static str| async move {
        let mut o = moatmq_testkit::v5::options(addr, id);
        o.set_credentials("alice", password("alice"));
        moatmq_testkit::v5::connect(o).await.expect("login")
    };
    let mut m = login5(b.first_addr(), "late-member").await;
    subscribed5(&mut m, filter).await;
    m.client.disconnect().await.unwrap();
    m.closed_within(moatmq_testkit::WAIT).await;
    // Nobody pulls now; the group's consumer keeps its place (60 s).
    let mut publisher = login5(a.first_addr(), "pub5").await;
    publish_expiring5(&mut publisher, "alice/exp", "short", 2).await;
    publish_expiring5(&mut publisher, "alice/exp", "long", 60).await;
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let mut m = login5(b.first_addr(), "late-member").await;
    subscribed5(&mut m, filter).await;
    let got = expiring5(&mut m, QUIET * 3).await;
    cluster_support::only_the_long_one_counted_down(&got);
}
