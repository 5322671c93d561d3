//! A session writer held up (a slow disk, a long commit, a large resume) must not let
//! what it has to record pile up in memory. For an offline session: what is
//! on its way to the writer counts against `max_queued_messages` already, and past it
//! the newest is dropped (counted and audited) at once, as the writer would drop it
//! once it caught up. Before, the limits applied only when the writer took each
//! message, so at `autosave_interval = 1` (the default; nothing waits for a commit)
//! everything published meanwhile waited for the writer in memory, however much. For a
//! connected persistent session, each delivery records changes (sent, acknowledged):
//! its deliveries wait while the writer is behind, as for a full client window. Here
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
/// Changes waiting past which the writer is behind (test hook; 262,144 otherwise).
const BEHIND_AT: usize = 40;

/// The hooks, read once per process; both tests set the same.
fn hooks() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::env::set_var(
            "MOATMQ_TEST_SESSION_COMMIT_DELAY_MS",
            STALL.as_millis().to_string(),
        );
        std::env::set_var("MOATMQ_TEST_SESSION_WRITER_BEHIND", BEHIND_AT.to_string());
    });
}

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
    broker.disconnect_audited("slow-disk").await;
    broker.disconnect_audited("roomy").await;
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
    while first.elapsed() < STALL - Duration::from_millis(300) {
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

#[tokio::test]
async fn a_persistent_subscribers_deliveries_wait_for_a_writer_that_is_behind() {
    hooks();
    let broker = TestBroker::builder()
        .anonymous()
        .retained_store()
        .set("retained", "autosave_interval", 1)
        .metrics()
        .start()
        .await;
    let addr = broker.first_addr();
    leave_subscribed(addr, "parked", "p/#").await;
    let mut live = v4::connect(persistent(addr, "live")).await.unwrap();
    live.subscribe_acked("l/#").await;
    tokio::time::sleep((INTERVAL + STALL) * 2 + Duration::from_millis(500)).await;

    let mut publ = v4::connected(addr, "publisher").await;
    // Queued for the offline session, it is written by the next commit (a delivery
    // acknowledged within the interval is not): that commit holds the writer for STALL.
    publ.client
        .publish("p/x", QoS::AtLeastOnce, false, "parked")
        .await
        .unwrap();
    publ.client
        .publish("l/x", QoS::AtLeastOnce, false, "m0")
        .await
        .unwrap();
    let first = Instant::now();
    tokio::time::sleep(INTERVAL + Duration::from_millis(200)).await;
    const N: usize = 300;
    for i in 1..=N {
        publ.client
            .publish("l/x", QoS::AtLeastOnce, false, format!("m{i}"))
            .await
            .unwrap();
    }
    // While the writer is held up: the publisher is not, the subscriber's deliveries
    // (each recording a send and an acknowledgement) stop once BEHIND_AT changes wait.
    // (The commit began within INTERVAL of m0, before the burst: it lasts at least
    // until STALL after m0.)
    let stall_ends = first + STALL - Duration::from_millis(300);
    let mut behind = 0.0;
    while behind != 1.0 && Instant::now() < stall_ends {
        behind = broker.metric("moatmq_session_writer_behind").await;
    }
    assert_eq!(behind, 1.0, "the metric shows the writer behind");
    let mut got = Vec::new();
    while let Ok(Some(p)) =
        tokio::time::timeout_at(stall_ends.into(), live.publish_within(WAIT)).await
    {
        got.push(String::from_utf8(p.payload.to_vec()).unwrap());
    }
    let mut acked = 0;
    while let Ok(Some(event)) = tokio::time::timeout(Duration::ZERO, publ.rx.recv()).await {
        if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) = event {
            acked += 1;
        }
    }
    assert_eq!(acked, N + 2, "the publisher was held up");
    assert!(
        got.len() < 2 * BEHIND_AT,
        "{} of {} delivered while the writer was held up: their records piled up",
        got.len(),
        N + 1
    );
    // Then the rest, in order.
    while got.len() < N + 1 {
        let p = live.next_publish().await;
        got.push(String::from_utf8(p.payload.to_vec()).unwrap());
    }
    let expected: Vec<String> = (0..=N).map(|i| format!("m{i}")).collect();
    assert_eq!(got, expected);
    broker
        .metric_is("moatmq_session_writer_behind", 0.0, "the writer caught up")
        .await;
}
