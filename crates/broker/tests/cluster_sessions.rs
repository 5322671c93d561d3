//! Sessions across cluster nodes (docs/cluster.md, "Session ownership and takeover"):
//! a `nats-server -js` on loopback, two in-process nodes, rumqttc clients. A client id
//! connected on one node and again on another is taken over (MQTT 5: DISCONNECT 0x8E;
//! 3.1.1: closed), only by the same identity; the ownership bucket holds hashes and
//! sealed values only, and a forged value hands nobody a session.

mod cluster_support;

use cluster_support::{cluster_seal, node, password, Nats};
use futures_util::StreamExt;
use moatmq_testkit::{v4, v5, QUIET, WAIT};
use rumqttc::QoS;
use std::net::SocketAddr;

async fn login4(addr: SocketAddr, id: &str, user: &str) -> v4::Client {
    let mut o = v4::options(addr, id);
    o.set_credentials(user, password(user));
    v4::connect(o).await.expect("login")
}

/// A 3.1.1 login keeping its session (clean session 0).
async fn persistent4(addr: SocketAddr, id: &str, user: &str) -> v4::Client {
    let mut o = v4::options(addr, id);
    o.set_credentials(user, password(user));
    o.set_clean_session(false);
    v4::connect(o).await.expect("login")
}

async fn login5(addr: SocketAddr, id: &str, user: &str) -> v5::Client {
    let mut o = v5::options(addr, id);
    o.set_credentials(user, password(user));
    v5::connect(o).await.expect("login")
}

/// `c` (3.1.1) still gets what `user` publishes to `topic` on node `addr`.
async fn still_served4(c: &mut v4::Client, addr: SocketAddr, user: &str, topic: &str) {
    c.subscribe_acked(topic).await;
    let publ = login4(addr, &format!("{user}-pub"), user).await;
    publ.client
        .publish(topic, QoS::AtLeastOnce, false, "still here")
        .await
        .expect("publish queued");
    assert_eq!(&c.next_publish().await.payload[..], b"still here");
}

#[tokio::test]
async fn an_mqtt5_client_id_connected_on_another_node_takes_over_with_0x8e() {
    let nats = Nats::start().await;
    let a = node(&nats, "node-a").await;
    let b = node(&nats, "node-b").await;
    let mut old = login5(a.first_addr(), "dev1", "alice").await;
    let _new = login5(b.first_addr(), "dev1", "alice").await;
    let ended = old
        .closed_within(WAIT)
        .await
        .expect("the connection on node A is closed");
    assert!(ended.contains("SessionTakenOver"), "{ended}");

    // And back: the client id moves to node A again, node B's connection goes.
    let mut on_b = login5(b.first_addr(), "dev2", "alice").await;
    let mut on_a = login5(a.first_addr(), "dev2", "alice").await;
    let ended = on_b.closed_within(WAIT).await.expect("node B's closed");
    assert!(ended.contains("SessionTakenOver"), "{ended}");
    assert!(
        on_a.closed_within(QUIET).await.is_none(),
        "the newest connection stays"
    );
}

#[tokio::test]
async fn a_3_1_1_client_id_connected_on_another_node_takes_over_and_the_new_one_is_served() {
    let nats = Nats::start().await;
    let a = node(&nats, "node-a").await;
    let b = node(&nats, "node-b").await;
    let mut old = login4(a.first_addr(), "dev1", "alice").await;
    let mut new = login4(b.first_addr(), "dev1", "alice").await;
    assert!(
        old.closed_within(WAIT).await.is_some(),
        "the 3.1.1 connection on node A is closed"
    );
    assert!(
        new.closed_within(QUIET).await.is_none(),
        "the new one stays"
    );
    still_served4(&mut new, b.first_addr(), "alice", "alice/t").await;
}

#[tokio::test]
async fn the_node_that_lost_a_session_keeps_no_stale_copy_of_it() {
    let nats = Nats::start().await;
    let a = node(&nats, "node-a").await;
    let b = node(&nats, "node-b").await;
    let mut first = persistent4(a.first_addr(), "keeper", "alice").await;
    first.subscribe_acked("alice/k").await;
    first.client.disconnect().await.unwrap();
    first.closed_within(WAIT).await;
    let again = persistent4(a.first_addr(), "keeper", "alice").await;
    assert!(again.connack.session_present, "kept on node A");
    let mut moved = persistent4(b.first_addr(), "keeper", "alice").await;
    let mut again = again;
    assert!(again.closed_within(WAIT).await.is_some(), "taken over");
    moved.client.disconnect().await.unwrap();
    moved.closed_within(WAIT).await;
    // Node A discarded its copy: no session there that went on queuing meanwhile.
    let back = persistent4(a.first_addr(), "keeper", "alice").await;
    assert!(!back.connack.session_present, "a stale session on node A");
}

#[tokio::test]
async fn another_user_with_the_same_client_id_takes_nothing_over() {
    let nats = Nats::start().await;
    let a = node(&nats, "node-a").await;
    let b = node(&nats, "node-b").await;
    let mut alice = login4(a.first_addr(), "shared-id", "alice").await;
    let mut alice5 = login5(a.first_addr(), "shared-id5", "alice").await;
    let mut bob = login4(b.first_addr(), "shared-id", "bob").await;
    let _bob5 = login5(b.first_addr(), "shared-id5", "bob").await;
    assert!(
        alice.closed_within(QUIET).await.is_none(),
        "bob took over alice's connection on another node"
    );
    assert!(
        alice5.closed_within(QUIET).await.is_none(),
        "bob took over alice's MQTT 5 connection on another node"
    );
    still_served4(&mut alice, a.first_addr(), "alice", "alice/t").await;
    still_served4(&mut bob, b.first_addr(), "bob", "bob/t").await;
}

#[tokio::test]
async fn the_ownership_bucket_holds_no_plaintext_and_a_forged_owner_closes_but_hands_nothing() {
    let nats = Nats::start().await;
    let a = node(&nats, "node-a").await;
    let mut alice = login4(a.first_addr(), "dev-secret", "alice").await;
    let js = async_nats::jetstream::new(nats.client().await);
    let kv = js.get_key_value("moatmq_owner").await.expect("the bucket");
    let seal = cluster_seal();
    // alice's router client id: identity as hex, then the client id.
    let key = seal.session_key_of("u616c696365:dev-secret");
    let entry = kv.entry(key.clone()).await.unwrap().expect("alice's claim");
    let keys: Vec<String> = kv.keys().await.unwrap().map(|k| k.unwrap()).collect().await;
    assert_eq!(keys, vec![key.clone()]);
    let find = |needle: &[u8]| entry.value.windows(needle.len()).any(|w| w == needle);
    assert!(!find(b"dev-secret") && !find(b"alice") && !find(b"node-a"));
    let owner = seal
        .open_owner("moatmq_owner", &key, &entry.value)
        .expect("sealed for its key");
    assert_eq!(owner.node, "node-a");

    // A value sealed for another key, moved here: refused (counted), and the key is no
    // longer this node's, so the connection is closed; nothing else is touched.
    let rejected = a.metric("moatmq_cluster_state_rejected_total").await;
    let other = seal.session_key_of("u626f62:dev-secret");
    let forged = seal.seal_owner("moatmq_owner", &other, &owner).unwrap();
    kv.put(&key, forged.into()).await.unwrap();
    assert!(
        alice.closed_within(WAIT).await.is_some(),
        "a value this node cannot trust releases the session"
    );
    assert_eq!(
        a.metric("moatmq_cluster_state_rejected_total").await,
        rejected + 1.0
    );
    // The client comes back and claims it again.
    let mut again = login4(a.first_addr(), "dev-secret", "alice").await;
    assert!(again.closed_within(QUIET).await.is_none());
    let entry = kv.entry(key.clone()).await.unwrap().unwrap();
    assert!(seal.open_owner("moatmq_owner", &key, &entry.value).is_ok());
}
