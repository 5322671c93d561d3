//! When a node counts as gone (`cluster/dead.rs`), with real nodes on a real nats-server.
//! Its own test binary: how long a node takes to count as gone and how often the sweep
//! runs are shortened for the whole process (`MOATMQ_TEST_NODE_GONE_MS`,
//! `MOATMQ_TEST_DEAD_SWEEP_MS`, read once).

mod cluster_support;

use cluster_support::{cluster_seal, node_at, password, wait_ready, NatsLink, ACL};
use moatmq_testkit::v5;
use std::time::Duration;
use tokio::time::Instant;

/// How long after its last entry a node counts as gone, in this binary. Longer than a
/// node takes to reconnect to NATS once it can (async-nats waits up to 4 s between
/// attempts) and put its entry again.
const GONE: Duration = Duration::from_secs(20);

fn shorten_liveness() {
    std::env::set_var("MOATMQ_TEST_NODE_GONE_MS", GONE.as_millis().to_string());
    std::env::set_var("MOATMQ_TEST_DEAD_SWEEP_MS", "500");
}

/// Whether `bucket` holds a value at `key`.
async fn holds(bucket: &async_nats::jetstream::kv::Store, key: &str) -> bool {
    matches!(
        bucket.entry(key).await,
        Ok(Some(e)) if e.operation == async_nats::jetstream::kv::Operation::Put
    )
}

/// alice's persistent session `kept` on `node`, connected, with an expiry of 1 s.
async fn kept_on(node: &moatmq_testkit::TestBroker) -> v5::Client {
    let mut o = v5::options(node.first_addr(), "kept");
    o.set_credentials("alice", password("alice"));
    o.set_clean_start(false);
    o.set_connect_properties(rumqttc::v5::mqttbytes::v5::ConnectProperties {
        session_expiry_interval: Some(1),
        ..rumqttc::v5::mqttbytes::v5::ConnectProperties::new()
    });
    v5::connect(o).await.expect("login")
}

/// The ownership and handoff buckets.
async fn buckets(
    nats: &cluster_support::Nats,
) -> (
    async_nats::jetstream::kv::Store,
    async_nats::jetstream::kv::Store,
) {
    let js = async_nats::jetstream::new(nats.client().await);
    (
        js.get_key_value("moatmq_owner").await.unwrap(),
        js.get_key_value("moatmq_handoff").await.unwrap(),
    )
}

/// The KV key of alice's session `id` (her router client id: identity as hex, then the
/// client id).
fn key_of(id: &str) -> String {
    cluster_seal().session_key_of(&format!("u616c696365:{id}"))
}

/// NATS goes away for longer than a node takes to count as gone, and comes back to the
/// sweeping node (the smallest name) a few seconds before the other. Every node's entry
/// is then as old as the break: the sweep must not take node B, which is alive and
/// serving a client, for gone. Had it, it would remove what B left for that client's
/// persistent session (its ownership entry, and its park, which counts as expired when
/// counted from B's last entry), and a later death of B would lose the session. (It
/// did: the sweeping node looked as soon as its own entry was new.)
#[tokio::test]
async fn nodes_back_from_a_nats_outage_are_not_taken_for_gone() {
    shorten_liveness();
    let nats = cluster_support::Nats::start().await;
    let mut link_a = NatsLink::start(&nats).await;
    let mut link_b = NatsLink::start(&nats).await;
    let a = node_at(&link_a.url(), "node-a", ACL, "", |b| b).await;
    let b = node_at(&link_b.url(), "node-b", ACL, "", |b| b).await;

    // A persistent session connected to B whose expiry (1 s) is long past when counted
    // from B's last entry before the break.
    let _kept = kept_on(&b).await;
    let (owner, handoff) = buckets(&nats).await;
    let key = key_of("kept");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(holds(&owner, &key).await && holds(&handoff, &key).await) {
        assert!(Instant::now() < deadline, "no claim and live park for kept");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    link_a.cut().await;
    link_b.cut().await;
    wait_ready(&a, false).await;
    wait_ready(&b, false).await;
    tokio::time::sleep(GONE + Duration::from_secs(1)).await;
    link_a.restore().await;
    wait_ready(&a, true).await;
    let a_back = Instant::now();
    // A puts its entry again and sweeps every 500 ms: alone with NATS for 3 s.
    tokio::time::sleep(Duration::from_secs(3)).await;
    link_b.restore().await;
    wait_ready(&b, true).await;
    // Past the first sweep A may make, and a few more.
    tokio::time::sleep_until(a_back + GONE + Duration::from_secs(2)).await;
    assert!(
        holds(&owner, &key).await,
        "node B's live session lost its ownership entry to the sweep"
    );
    assert!(
        holds(&handoff, &key).await,
        "node B's live session lost its park to the sweep"
    );
}

/// Node B alone is cut off from NATS for longer than a node takes to count as gone: the
/// sweep takes it for gone (it removes the ownership entry of B's clean session), but B
/// still serves its clients, and its connected persistent session keeps its ownership
/// entry and park although its expiry (1 s) has passed since B was last heard from:
/// they are kept a day at least. (Both went in the same sweep before: the session was
/// lost if B was restarted or died after the partition.)
#[tokio::test]
async fn a_node_cut_off_alone_keeps_what_its_connected_sessions_left_in_nats() {
    shorten_liveness();
    let nats = cluster_support::Nats::start().await;
    let _a = node_at(&nats.url(), "node-a", ACL, "", |b| b).await;
    let mut link_b = NatsLink::start(&nats).await;
    let b = node_at(&link_b.url(), "node-b", ACL, "", |b| b).await;
    let _kept = kept_on(&b).await;
    let mut o = v5::options(b.first_addr(), "clean");
    o.set_credentials("alice", password("alice"));
    let _clean = v5::connect(o).await.expect("login");
    let (owner, handoff) = buckets(&nats).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(holds(&owner, &key_of("kept")).await
        && holds(&handoff, &key_of("kept")).await
        && holds(&owner, &key_of("clean")).await)
    {
        assert!(Instant::now() < deadline, "no claims and live park");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    link_b.cut().await;
    wait_ready(&b, false).await;
    // A sweeps every 500 ms: B is gone once its entry is GONE old.
    let deadline = Instant::now() + GONE + Duration::from_secs(10);
    while holds(&owner, &key_of("clean")).await {
        assert!(Instant::now() < deadline, "node B never taken for gone");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A sweep or two more.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        holds(&owner, &key_of("kept")).await,
        "the connected session on node B lost its ownership entry"
    );
    assert!(
        holds(&handoff, &key_of("kept")).await,
        "the connected session on node B lost its park"
    );
    link_b.restore().await;
    wait_ready(&b, true).await;
}
