//! A session writer held up (a slow disk, a long commit, a large resume) must not let
//! messages for an offline session pile up in memory past its queue's limits: what is
//! on its way to the writer counts against `max_queued_messages` already, and past it
//! the newest is dropped (counted and audited) at once, as the writer would drop it
//! once it caught up. Before, the limits applied only when the writer took each
//! message, so at `autosave_interval = 1` (the default; nothing waits for a commit)
//! everything published meanwhile waited for the writer in memory, however much. Here
//! a test hook makes every commit take 3 s longer, so the commit of one message holds
//! the writer while the next ones arrive. Its own process: the hook is an environment
//! variable.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use moatmq_testkit::{v4, TestBroker, WAIT};
use rumqttc::QoS;

const STALL: Duration = Duration::from_secs(3);
/// `autosave_interval`.
const INTERVAL: Duration = Duration::from_secs(1);
const QUEUE: usize = 5;

fn persistent(addr: SocketAddr, id: &str) -> v4::MqttOptions {
    let mut o = v4::options(addr, id);
    o.set_clean_session(false);
    o
}

/// A persistent session subscribed to `filter` at QoS 1, then disconnected.
async fn leave_subscribed(addr: SocketAddr, id: &str, filter: &str) {
    let mut sub = v4::connect(persistent(addr, id)).await.unwrap();
    sub.subscribe_acked(filter).await;
    sub.client.disconnect().await.unwrap();
    assert!(sub.closed_within(WAIT).await.is_some());
}

/// Waits until the audit log has the end of the connection of `id` (the broker is
/// done collecting what the router held for it).
async fn disconnected(broker: &TestBroker, id: &str) {
    let deadline = Instant::now() + WAIT;
    let quoted = format!("\"{id}\"");
    while Instant::now() < deadline {
        let audit = std::fs::read_to_string(broker.path("audit.log")).unwrap_or_default();
        if audit
            .lines()
            .any(|l| l.contains("\"disconnect\"") && l.contains(&quoted))
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no disconnect of {id} audited");
}

/// The payloads a persistent session gets on reconnecting, until it is quiet.
async fn drained(addr: SocketAddr, id: &str) -> Vec<String> {
    let mut sub = v4::connect(persistent(addr, id)).await.unwrap();
    assert!(sub.connack.session_present);
    let mut got = Vec::new();
    while let Some(p) = sub.publish_within(Duration::from_secs(2)).await {
        got.push(String::from_utf8(p.payload.to_vec()).unwrap());
    }
    got
}

#[tokio::test]
async fn an_offline_queue_stays_within_its_limit_while_the_writer_is_held_up() {
    std::env::set_var(
        "MOATMQ_TEST_SESSION_COMMIT_DELAY_MS",
        STALL.as_millis().to_string(),
    );
    let broker = TestBroker::builder()
        .anonymous()
        .retained_store()
        .set("retained", "autosave_interval", 1)
        .limit("max_queued_messages", QUEUE as i64)
        .metrics()
        .audit()
        .start()
        .await;
    let addr = broker.first_addr();
    leave_subscribed(addr, "slow-disk", "q/#").await;
    leave_subscribed(addr, "roomy", "r/#").await;
    disconnected(&broker, "slow-disk").await;
    disconnected(&broker, "roomy").await;
    // The commits of the setup's changes are over (at most two, each after the
    // interval): the writer waits for work.
    tokio::time::sleep((INTERVAL + STALL) * 2 + Duration::from_millis(500)).await;
    assert_eq!(
        broker.metric("moatmq_session_messages_dropped_total").await,
        0.0
    );

    let publ = v4::connected(addr, "publisher").await;
    publ.client
        .publish("q/x", QoS::AtLeastOnce, false, "m0")
        .await
        .unwrap();
    // The writer stores m0 at once and commits it within the interval: from then on,
    // for STALL, it is held up in that commit.
    let first = Instant::now();
    tokio::time::sleep(INTERVAL + Duration::from_millis(200)).await;
    for i in 1..=60 {
        publ.client
            .publish("q/x", QoS::AtLeastOnce, false, format!("m{i}"))
            .await
            .unwrap();
    }
    for i in 0..3 {
        publ.client
            .publish("r/x", QoS::AtLeastOnce, false, format!("r{i}"))
            .await
            .unwrap();
    }
    // m0 is stored; of the 60 on their way to the held-up writer, QUEUE may wait for it:
    // the other 55 are dropped now, not once the writer gets to them.
    let mut dropped = 0.0;
    while first.elapsed() < INTERVAL + STALL - Duration::from_millis(300) {
        dropped = broker.metric("moatmq_session_messages_dropped_total").await;
        if dropped == 55.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        dropped, 55.0,
        "messages for a full offline queue waited in memory for a writer that was held up"
    );

    // Once it catches up the writer drops one more (m0 is stored already): the newest
    // go, each counted and audited once.
    broker
        .metric_is(
            "moatmq_session_messages_dropped_total",
            56.0,
            "drops counted",
        )
        .await;
    let audit = std::fs::read_to_string(broker.path("audit.log")).unwrap();
    let full = audit
        .lines()
        .filter(|l| l.contains("\"session_queue_full\"") && l.contains("\"slow-disk\""))
        .count();
    assert_eq!(full, 56, "each drop audited once");

    // (The router's in-memory copies, bounded by `max_queued_bytes`, would deliver all
    // of them in this run: the store is what a restart brings back.) The other session
    // lost nothing.
    let broker = broker.restart().await;
    let addr = broker.first_addr();
    let expected: Vec<String> = (0..QUEUE).map(|i| format!("m{i}")).collect();
    assert_eq!(drained(addr, "slow-disk").await, expected);
    assert_eq!(drained(addr, "roomy").await, vec!["r0", "r1", "r2"]);
}
