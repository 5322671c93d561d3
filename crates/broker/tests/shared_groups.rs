//! Shared-subscription groups are per identity (issue 11): rumqttd keys groups by name
//! alone, so bob's `$share/workers/...` took turns with alice's and stalled her group.

mod common;

use common::{login4, suback4, V4_OK};
use moatmq_testkit::{v4, TestBroker, QUIET};
use rumqttc::QoS;
use std::net::SocketAddr;

async fn broker() -> TestBroker {
    TestBroker::builder()
        .users(&[("alice", "alice-pw"), ("bob", "bob-pw")])
        .start()
        .await
}

async fn member(addr: SocketAddr, id: &str, user: &str, filter: &str) -> v4::Client {
    let mut c = v4::connect(login4(addr, id, user, &format!("{user}-pw")))
        .await
        .expect("connects");
    assert_eq!(suback4(&mut c, &[filter]).await, vec![V4_OK]);
    c
}

/// Publishes 20 QoS 1 messages as alice on `alice/jobs`.
async fn twenty_jobs(addr: SocketAddr) {
    let alice = v4::connect(login4(addr, "alice-pub", "alice", "alice-pw"))
        .await
        .expect("connects");
    for i in 0..20 {
        alice
            .client
            .publish("alice/jobs", QoS::AtLeastOnce, false, format!("{i}"))
            .await
            .unwrap();
    }
}

/// Messages a client gets until nothing comes for a while.
async fn drain(c: &mut v4::Client) -> usize {
    let mut n = 0;
    while c.publish_within(QUIET * 2).await.is_some() {
        n += 1;
    }
    n
}

#[tokio::test]
async fn another_tenant_in_a_same_named_group_takes_nothing() {
    let broker = broker().await;
    let addr = broker.first_addr();
    let mut alice = member(addr, "alice-w", "alice", "$share/workers/alice/jobs").await;
    let mut bob = member(addr, "bob-w", "bob", "$share/workers/bob/x").await;
    twenty_jobs(addr).await;
    assert_eq!(drain(&mut alice).await, 20, "alice gets all her jobs");
    assert_eq!(drain(&mut bob).await, 0);
}

#[tokio::test]
async fn one_tenants_members_still_share() {
    let broker = broker().await;
    let addr = broker.first_addr();
    let mut one = member(addr, "alice-w1", "alice", "$share/workers/alice/jobs").await;
    let mut two = member(addr, "alice-w2", "alice", "$share/workers/alice/jobs").await;
    let _bob = member(addr, "bob-w", "bob", "$share/workers/bob/jobs").await;
    twenty_jobs(addr).await;
    let (a, b) = tokio::join!(drain(&mut one), drain(&mut two));
    assert_eq!(a + b, 20, "each job once");
    assert!(a > 0 && b > 0, "split between both: {a} + {b}");
}
