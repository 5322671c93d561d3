//! The `$SYS/broker/...` tree over real connections: what a user with an explicit grant
//! reads (Mosquitto's names and formats, values that follow reality, retained values for
//! late subscribers), and that nobody else reads it by any wildcard, nobody writes it,
//! and `[sys] interval = 0` turns it off.

mod common;

use common::{login4, suback4, V4_NO, V4_OK};
use moatmq_testkit::{v4, Raw, TestBroker, WAIT};
use rumqttc::v5::mqttbytes::v5 as m5;
use rumqttc::v5::mqttbytes::QoS as Q5;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::time::Instant;

const USERS: &[(&str, &str)] = &[
    ("ops", "ops-pw"),
    ("alice", "alice-pw"),
    ("bob", "bob-pw"),
    ("reader", "reader-pw"),
];

/// `ops` may read the tree; `alice` is granted readwrite on it (writing stays refused);
/// `reader` reads every topic through wildcards, which never cover `$SYS`.
const ACL: &str = "\
user ops
topic read $SYS/#

user alice
topic readwrite alice/#
topic readwrite $SYS/#

user bob
topic readwrite bob/#

user reader
topic read #
topic read +/broker/#
";

/// Long enough for two updates at `interval = 1`.
const TWO_TICKS: Duration = Duration::from_millis(2500);

async fn broker(interval: u64) -> TestBroker {
    TestBroker::builder()
        .users(USERS)
        .acl(ACL)
        .set("sys", "interval", interval as i64)
        .start()
        .await
}

async fn user4(addr: SocketAddr, id: &str, user: &str) -> v4::Client {
    v4::connect(login4(addr, id, user, &format!("{user}-pw")))
        .await
        .unwrap_or_else(|e| panic!("{user} connects: {e}"))
}

/// What a subscriber has seen of the tree: the latest message per topic.
#[derive(Default)]
struct Seen(HashMap<String, rumqttc::Publish>);

impl Seen {
    /// The latest message on `topic` satisfying `ok`, from what was seen or what comes
    /// within `WAIT` plus a few updates.
    async fn value_where(
        &mut self,
        c: &mut v4::Client,
        topic: &str,
        ok: impl Fn(&str) -> bool,
    ) -> rumqttc::Publish {
        let matches = |p: &rumqttc::Publish| ok(&String::from_utf8_lossy(&p.payload));
        if let Some(p) = self.0.get(topic).filter(|p| matches(p)) {
            return p.clone();
        }
        let deadline = Instant::now() + WAIT + TWO_TICKS;
        while let Some(p) = c
            .publish_within(deadline.saturating_duration_since(Instant::now()))
            .await
        {
            self.0.insert(p.topic.clone(), p.clone());
            if p.topic == topic && matches(&p) {
                return p;
            }
        }
        panic!("no {topic} as expected; last: {:?}", self.0.get(topic));
    }
}

fn number(payload: &str) -> u64 {
    payload
        .parse()
        .unwrap_or_else(|_| panic!("not a number: {payload}"))
}

/// Every PUBLISH received within `wait`, by topic.
async fn received_within(c: &mut v4::Client, wait: Duration) -> Vec<String> {
    let deadline = Instant::now() + wait;
    let mut topics = Vec::new();
    while let Some(p) = c
        .publish_within(deadline.saturating_duration_since(Instant::now()))
        .await
    {
        topics.push(p.topic);
    }
    topics
}

#[tokio::test]
async fn a_granted_user_reads_mosquittos_tree_and_sees_it_change() {
    let broker = broker(1).await;
    let addr = broker.first_addr();
    let mut ops = user4(addr, "ops-1", "ops").await;
    assert_eq!(suback4(&mut ops, &["$SYS/#"]).await, vec![V4_OK]);
    let mut tree = Seen::default();

    let version = tree
        .value_where(&mut ops, "$SYS/broker/version", |_| true)
        .await;
    assert_eq!(
        version.payload,
        format!("moatmq version {}", env!("CARGO_PKG_VERSION")).as_bytes()
    );
    // The current values come from the retained set, with the retain flag.
    assert!(version.retain);
    tree.value_where(&mut ops, "$SYS/broker/uptime", |p| {
        p.strip_suffix(" seconds")
            .is_some_and(|n| n.parse::<u64>().is_ok())
    })
    .await;
    tree.value_where(&mut ops, "$SYS/broker/load/messages/received/1min", |p| {
        p.split_once('.').is_some_and(|(_, d)| d.len() == 2)
    })
    .await;

    // ops and two tenants connected.
    let mut alice = user4(addr, "alice-1", "alice").await;
    let _bob = user4(addr, "bob-1", "bob").await;
    tree.value_where(&mut ops, "$SYS/broker/clients/connected", |p| p == "3")
        .await;
    tree.value_where(&mut ops, "$SYS/broker/clients/maximum", |p| number(p) >= 3)
        .await;

    let before = number(&String::from_utf8_lossy(
        &tree
            .value_where(&mut ops, "$SYS/broker/messages/received", |_| true)
            .await
            .payload,
    ));
    for i in 0..3 {
        alice.publish_acked("alice/x", false, format!("{i}")).await;
    }
    tree.value_where(&mut ops, "$SYS/broker/messages/received", |p| {
        number(p) >= before + 3
    })
    .await;
    tree.value_where(&mut ops, "$SYS/broker/publish/messages/received", |p| {
        number(p) >= before + 3
    })
    .await;

    // A subscriber that comes later gets the current values at once, retained.
    let mut late = user4(addr, "ops-2", "ops").await;
    assert_eq!(
        suback4(&mut late, &["$SYS/broker/version"]).await,
        vec![V4_OK]
    );
    let p = late.next_publish().await;
    assert_eq!(p.topic, "$SYS/broker/version");
    assert!(p.retain);

    // Unsubscribed: answered without the router, and the updates stop.
    ops.client.unsubscribe("$SYS/#").await.unwrap();
    let unsuback = ops
        .incoming(|p| matches!(p, rumqttc::Packet::UnsubAck(_)).then_some(()))
        .await;
    assert!(unsuback.is_some(), "UNSUBACK");
    assert_eq!(
        received_within(&mut ops, TWO_TICKS).await,
        Vec::<String>::new()
    );
}

#[tokio::test]
async fn a_grant_on_part_of_the_tree_reads_only_that_part() {
    let acl = "user ops\ntopic read $SYS/broker/clients/#\n";
    let broker = TestBroker::builder()
        .users(USERS)
        .acl(acl)
        .set("sys", "interval", 1)
        .start()
        .await;
    let mut ops = user4(broker.first_addr(), "ops-1", "ops").await;
    let codes = suback4(&mut ops, &["$SYS/#", "$SYS/broker/clients/+"]).await;
    assert_eq!(codes, vec![V4_NO, V4_OK]);
    let topics = received_within(&mut ops, TWO_TICKS).await;
    assert!(
        topics.iter().any(|t| t == "$SYS/broker/clients/connected"),
        "{topics:?}"
    );
    assert!(
        topics.iter().all(|t| t.starts_with("$SYS/broker/clients/")),
        "{topics:?}"
    );
}

#[tokio::test]
async fn wildcards_and_tenants_never_reach_the_tree() {
    let broker = broker(1).await;
    let addr = broker.first_addr();
    // Proof the tree is being published meanwhile.
    let mut ops = user4(addr, "ops-1", "ops").await;
    assert_eq!(suback4(&mut ops, &["$SYS/#"]).await, vec![V4_OK]);

    let mut reader = user4(addr, "reader-1", "reader").await;
    let codes = suback4(
        &mut reader,
        &["#", "+/broker/#", "$SYS/#", "$share/g/$SYS/#"],
    )
    .await;
    assert_eq!(codes, vec![V4_OK, V4_OK, V4_NO, V4_NO]);
    let mut bob = user4(addr, "bob-1", "bob").await;
    let codes = suback4(&mut bob, &["bob/#", "$SYS/#", "$SYS/broker/uptime"]).await;
    assert_eq!(codes, vec![V4_OK, V4_NO, V4_NO]);

    let (seen, by_reader, by_bob) = tokio::join!(
        received_within(&mut ops, TWO_TICKS),
        received_within(&mut reader, TWO_TICKS),
        received_within(&mut bob, TWO_TICKS),
    );
    assert!(seen.iter().any(|t| t == "$SYS/broker/uptime"), "{seen:?}");
    assert_eq!(by_reader, Vec::<String>::new());
    assert_eq!(by_bob, Vec::<String>::new());
}

#[tokio::test]
async fn the_default_tenant_rule_never_reaches_the_tree() {
    let broker = TestBroker::builder()
        .users(USERS)
        .anonymous()
        .set("sys", "interval", 1)
        .start()
        .await;
    let addr = broker.first_addr();
    let mut alice = user4(addr, "alice-1", "alice").await;
    let codes = suback4(&mut alice, &["alice/#", "$SYS/#", "+/broker/#"]).await;
    assert_eq!(codes, vec![V4_OK, V4_NO, V4_NO]);
    // Anonymous clients may use every topic except $-topics.
    let mut anon = v4::connected(addr, "anon-1").await;
    let codes = suback4(&mut anon, &["#", "+/broker/#", "$SYS/#"]).await;
    assert_eq!(codes, vec![V4_OK, V4_OK, V4_NO]);
    let (by_alice, by_anon) = tokio::join!(
        received_within(&mut alice, TWO_TICKS),
        received_within(&mut anon, TWO_TICKS),
    );
    assert_eq!(by_alice, Vec::<String>::new());
    assert_eq!(by_anon, Vec::<String>::new());
}

#[tokio::test]
async fn nobody_writes_the_tree_even_with_a_readwrite_grant() {
    let broker = broker(1).await;
    let addr = broker.first_addr();
    let mut ops = user4(addr, "ops-1", "ops").await;
    assert_eq!(suback4(&mut ops, &["$SYS/#"]).await, vec![V4_OK]);

    // MQTT 5: refused with 0x87.
    let mut alice = Raw::v5_login(addr, "alice-5", "alice", "alice-pw").await;
    let mut p = m5::Publish::new("$SYS/broker/version", Q5::AtLeastOnce, "forged", None);
    p.pkid = 7;
    p.retain = true;
    alice.send5(m5::Packet::Publish(p)).await;
    match alice.next5(WAIT).await {
        Some(m5::Packet::PubAck(ack)) => {
            assert_eq!((ack.pkid, ack.reason), (7, m5::PubAckReason::NotAuthorized))
        }
        other => panic!("expected PUBACK, got {other:?}"),
    }
    // 3.1.1 cannot say no: acknowledged and dropped.
    let mut alice4 = user4(addr, "alice-4", "alice").await;
    alice4.publish_acked("$SYS/x", true, "forged").await;

    let seen = received_within(&mut ops, TWO_TICKS).await;
    assert!(seen.iter().any(|t| t == "$SYS/broker/uptime"), "{seen:?}");
    assert!(!seen.iter().any(|t| t == "$SYS/x"), "{seen:?}");
    // The retained value is still the broker's.
    let mut late = user4(addr, "ops-2", "ops").await;
    assert_eq!(
        suback4(&mut late, &["$SYS/broker/version", "$SYS/x"]).await,
        vec![V4_OK, V4_OK]
    );
    let p = late.next_publish().await;
    assert_eq!(p.topic, "$SYS/broker/version");
    assert!(p.payload.starts_with(b"moatmq version "), "{:?}", p.payload);
    assert_eq!(
        received_within(&mut late, Duration::from_millis(400))
            .await
            .len(),
        0
    );
}

#[tokio::test]
async fn interval_zero_publishes_nothing() {
    let broker = broker(0).await;
    let mut ops = user4(broker.first_addr(), "ops-1", "ops").await;
    assert_eq!(suback4(&mut ops, &["$SYS/#"]).await, vec![V4_OK]);
    assert_eq!(
        received_within(&mut ops, TWO_TICKS).await,
        Vec::<String>::new()
    );
}
