//! A persistent subscriber that keeps going away and coming back while two publishers
//! send, across a graceful restart in the middle: every message arrives, and none
//! twice unless the broker says so (DUP: a redelivery of one the client had not
//! acknowledged). Each disconnect collects what the router still held for the session
//! into the store (`Gateway::router_settled`) while publishes keep coming: a forward
//! collected but not acknowledged to the router used to come a second time, without
//! DUP (`durable_collect.rs` has that race alone; these failed in most runs without its
//! fix). Once with a 3.1.1 client acknowledging everything, once with an MQTT 5 client
//! whose Receive Maximum of 5 makes the broker hold forwards back and which leaves
//! every third message unacknowledged.

use moatmq_testkit::{v4, v5, TestBroker, WAIT};
use rumqttc::v5::mqttbytes::v5::ConnectProperties;
use std::net::SocketAddr;
use std::time::Duration;

/// Messages per publisher and phase (two publishers, two phases).
const N: usize = 1000;

/// `(publisher, number, dup)` in the order the subscriber got them.
type Got = Vec<(usize, usize, bool)>;

fn record(got: &mut Got, payload: &[u8], dup: bool) {
    let text = std::str::from_utf8(payload).unwrap();
    let (p, i) = text.split_once(':').unwrap();
    got.push((p.parse().unwrap(), i.parse().unwrap(), dup));
}

fn publishers(addr: SocketAddr, from: usize) -> Vec<tokio::task::JoinHandle<()>> {
    (0..2usize)
        .map(|p| {
            tokio::spawn(async move {
                let mut publ = v4::connected(addr, &format!("publisher-{p}")).await;
                for i in from..from + N {
                    publ.publish_acked(format!("churn/{p}"), false, format!("{p}:{i}"))
                        .await;
                }
            })
        })
        .collect()
}

/// How long the subscriber stays connected in `round`: 10 to 100 ms.
fn stay(round: usize) -> Duration {
    Duration::from_millis(10 + (round * 37 % 90) as u64)
}

async fn broker() -> TestBroker {
    TestBroker::builder()
        .anonymous()
        .retained_store()
        .set("retained", "autosave_interval", 1)
        // The subscriber falls far behind: nothing may be dropped for the queue's size.
        .limit("max_queued_messages", 100_000)
        .start()
        .await
}

/// Every message of both publishers and both phases, each once without DUP.
fn assert_each_once(got: &Got) {
    for p in 0..2 {
        let mut seen = vec![0usize; 2 * N];
        let mut twice = Vec::new();
        for &(_, i, dup) in got.iter().filter(|g| g.0 == p) {
            if seen[i] > 0 && !dup {
                twice.push(i);
            }
            seen[i] += 1;
        }
        let missing: Vec<usize> = (0..2 * N).filter(|&i| seen[i] == 0).collect();
        assert!(missing.is_empty(), "publisher {p}: missing {missing:?}");
        assert!(
            twice.is_empty(),
            "publisher {p}: twice without DUP {twice:?}"
        );
    }
}

fn options4(addr: SocketAddr) -> v4::MqttOptions {
    let mut o = v4::options(addr, "churner");
    o.set_clean_session(false);
    o
}

async fn churn4(addr: SocketAddr, from: usize, got: &mut Got) {
    let publishing = publishers(addr, from);
    for round in 0.. {
        let mut sub = v4::connect(options4(addr)).await.unwrap();
        assert!(sub.connack.session_present);
        let until = tokio::time::Instant::now() + stay(round);
        while let Some(p) = sub
            .publish_within(until.saturating_duration_since(tokio::time::Instant::now()))
            .await
        {
            record(got, &p.payload, p.dup);
        }
        let done = publishing.iter().all(|h| h.is_finished());
        sub.client.disconnect().await.unwrap();
        assert!(sub.closed_within(WAIT).await.is_some());
        // Read (and acknowledged) before the disconnect.
        while let Some(p) = sub.publish_within(Duration::from_millis(1)).await {
            record(got, &p.payload, p.dup);
        }
        if done {
            break;
        }
    }
}

#[tokio::test]
async fn a_subscriber_coming_and_going_under_load_gets_every_message_once() {
    let broker = broker().await;
    let addr = broker.first_addr();
    let mut sub = v4::connect(options4(addr)).await.unwrap();
    sub.subscribe_acked("churn/#").await;
    sub.client.disconnect().await.unwrap();
    assert!(sub.closed_within(WAIT).await.is_some());
    let mut got = Vec::new();
    churn4(addr, 0, &mut got).await;
    let broker = broker.restart().await;
    let addr = broker.first_addr();
    churn4(addr, N, &mut got).await;
    let mut sub = v4::connect(options4(addr)).await.unwrap();
    assert!(sub.connack.session_present);
    while let Some(p) = sub.publish_within(Duration::from_secs(2)).await {
        record(&mut got, &p.payload, p.dup);
    }
    assert_each_once(&got);
}

fn options5(addr: SocketAddr) -> v5::MqttOptions {
    let mut o = v5::options(addr, "churner");
    o.set_clean_start(false);
    o.set_connect_properties(ConnectProperties {
        session_expiry_interval: Some(300),
        receive_maximum: Some(5),
        ..ConnectProperties::new()
    });
    o.set_manual_acks(true);
    o
}

async fn churn5(addr: SocketAddr, from: usize, got: &mut Got) {
    let publishing = publishers(addr, from);
    for round in 0.. {
        let mut sub = v5::connect(options5(addr)).await.unwrap();
        assert!(sub.connack.session_present);
        let until = tokio::time::Instant::now() + stay(round);
        let mut read = 0;
        while let Some(p) = sub
            .publish_within(until.saturating_duration_since(tokio::time::Instant::now()))
            .await
        {
            record(got, &p.payload, p.dup);
            read += 1;
            // Every third stays unacknowledged: sent again, with DUP, next time.
            if read % 3 != 0 {
                sub.client.ack(&p).await.unwrap();
            }
        }
        let done = publishing.iter().all(|h| h.is_finished());
        sub.client.disconnect().await.unwrap();
        assert!(sub.closed_within(WAIT).await.is_some());
        // Read, never acknowledged: they come again with DUP.
        while let Some(p) = sub.publish_within(Duration::from_millis(1)).await {
            record(got, &p.payload, p.dup);
        }
        if done {
            break;
        }
    }
}

#[tokio::test]
async fn a_slow_mqtt5_subscriber_coming_and_going_under_load_gets_every_message_once() {
    let broker = broker().await;
    let addr = broker.first_addr();
    let mut opts = options5(addr);
    opts.set_manual_acks(false);
    let mut sub = v5::connect(opts).await.unwrap();
    sub.subscribe_acked("churn/#").await;
    sub.client.disconnect().await.unwrap();
    assert!(sub.closed_within(WAIT).await.is_some());
    let mut got = Vec::new();
    churn5(addr, 0, &mut got).await;
    let broker = broker.restart().await;
    let addr = broker.first_addr();
    churn5(addr, N, &mut got).await;
    let mut opts = options5(addr);
    opts.set_manual_acks(false);
    let mut sub = v5::connect(opts).await.unwrap();
    assert!(sub.connack.session_present);
    while let Some(p) = sub.publish_within(Duration::from_secs(2)).await {
        record(&mut got, &p.payload, p.dup);
    }
    assert_each_once(&got);
}
