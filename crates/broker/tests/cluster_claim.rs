//! A claim by another node that arrives as a connection of a persistent session ends
//! (its session settled as kept offline here, the connection not yet gone) hands the
//! session over: it found the connection still registered, told it (nobody listened
//! any more) and the session was never handed over, so the other node waited 3 s and
//! started it new, without its subscriptions or queued messages (seen now and then
//! with a session moving between two nodes at every reconnect,
//! tests/paho/reconnect_loop.py). Its own test binary: the window is widened for the
//! whole process (`MOATMQ_TEST_SETTLED_PAUSE_MS`, read once).

mod cluster_support;

use cluster_support::{login4, node, offline4_at, persistent4, Nats};
use moatmq_testkit::WAIT;
use rumqttc::QoS;
use std::time::Duration;

/// How long a connection that ended keeps its claim and client id after its session
/// was settled.
const SETTLED_PAUSE: Duration = Duration::from_millis(1500);

/// The subscriber leaves node B, which keeps its session offline; while B's connection
/// is still ending, the client connects to node A: A gets the session from B (session
/// present, the message queued for it on B), not a new one after waiting 3 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claim_as_the_connection_ends_hands_the_session_over() {
    std::env::set_var(
        "MOATMQ_TEST_SETTLED_PAUSE_MS",
        SETTLED_PAUSE.as_millis().to_string(),
    );
    let nats = Nats::start().await;
    let a = node(&nats, "node-a").await;
    let b = node(&nats, "node-b").await;
    offline4_at(
        b.first_addr(),
        "mover",
        "alice",
        "alice/flow/#",
        QoS::AtLeastOnce,
    )
    .await;
    let mut publisher = login4(b.first_addr(), "publisher", "alice").await;
    // B's connection settled the session as kept offline, and still holds on.
    tokio::time::sleep(SETTLED_PAUSE / 3).await;
    publisher
        .publish_acked("alice/flow/1", false, "queued on B")
        .await;

    let started = tokio::time::Instant::now();
    let mut moved = persistent4(a.first_addr(), "mover", "alice").await;
    assert!(
        moved.connack.session_present,
        "the session came along (after {:?})",
        started.elapsed()
    );
    let got = moved.publish_within(WAIT).await;
    assert_eq!(
        got.as_ref().map(|p| &p.payload[..]),
        Some(&b"queued on B"[..]),
        "the message queued for it on B reaches it on A"
    );
}
