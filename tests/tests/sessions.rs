//! Durable sessions through a real `moatmq serve` process: with `autosave_interval = 0`
//! a QoS 1 message acknowledged to its publisher is on disk for every offline persistent
//! session it was queued for, so SIGKILL loses none of them (Mosquitto's `persistence
//! true` migration case: session present, 5 of 5 delivered).

use moatmq_e2e::{store_config, Moatmq};
use moatmq_testkit::wire::{self, Version};
use moatmq_testkit::{v4, Raw, QUIET, WAIT};
use rumqttc::QoS;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn config(dir: &Path, autosave_interval: u64) -> PathBuf {
    let key = dir.join("store.key");
    if !key.exists() {
        moatmq_store::RetainedKey::write_new(&key).unwrap();
    }
    store_config(dir, &format!("autosave_interval = {autosave_interval}\n"))
}

fn persistent(port: u16, id: &str) -> v4::MqttOptions {
    let mut o = v4::options(addr(port), id);
    o.set_clean_session(false);
    o
}

#[tokio::test]
async fn acknowledged_messages_for_an_offline_session_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Moatmq::serve(&config(dir.path(), 0), &[]);
    let port = broker.port("tcp");
    let mut sub = v4::connect(persistent(port, "sensor-sink")).await.unwrap();
    sub.subscribe_acked("site/+/temp").await;
    sub.client.disconnect().await.unwrap();
    assert!(sub.closed_within(WAIT).await.is_some());

    let mut publ = v4::connected(addr(port), "thermo").await;
    for i in 0..5 {
        publ.publish_acked(format!("site/{i}/temp"), false, format!("t{i}"))
            .await;
    }
    // Acknowledged with autosave_interval = 0 means on disk: no flush, no goodbye.
    broker.kill();
    drop(publ);

    let broker = Moatmq::serve(&config(dir.path(), 0), &[]);
    let port = broker.port("tcp");
    let mut sub = v4::connect(persistent(port, "sensor-sink")).await.unwrap();
    assert!(sub.connack.session_present, "session lost in the crash");
    for i in 0..5 {
        let p = sub.next_publish().await;
        assert_eq!(
            (p.topic.as_str(), &p.payload[..], p.qos),
            (
                format!("site/{i}/temp").as_str(),
                format!("t{i}").as_bytes(),
                QoS::AtLeastOnce
            )
        );
    }
    assert!(sub.publish_within(QUIET).await.is_none(), "delivered twice");
}

#[tokio::test]
async fn sigterm_keeps_sessions_with_an_autosave_interval() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Moatmq::serve(&config(dir.path(), 3600), &[]);
    let port = broker.port("tcp");
    let mut sub = v4::connect(persistent(port, "slow-sync")).await.unwrap();
    sub.subscribe_acked("jobs/#").await;
    sub.client.disconnect().await.unwrap();
    assert!(sub.closed_within(WAIT).await.is_some());
    let mut publ = v4::connected(addr(port), "dispatcher").await;
    publ.publish_acked("jobs/1", false, "queued").await;
    // Nothing was saved yet (an hour's interval): the shutdown saves it.
    let mut broker = broker;
    broker.signal("-TERM");
    assert!(broker.exit_within(WAIT * 2).success());
    drop(publ);

    let broker = Moatmq::serve(&config(dir.path(), 3600), &[]);
    let port = broker.port("tcp");
    let mut sub = v4::connect(persistent(port, "slow-sync")).await.unwrap();
    assert!(sub.connack.session_present);
    assert_eq!(&sub.next_publish().await.payload[..], b"queued");
}

#[tokio::test]
async fn a_message_in_flight_to_a_connected_client_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Moatmq::serve(&config(dir.path(), 0), &[]);
    let port = broker.port("tcp");
    let mut o = persistent(port, "slow-acker");
    o.set_manual_acks(true);
    let mut sub = v4::connect(o).await.unwrap();
    sub.subscribe_acked("orders/#").await;
    let mut publ = v4::connected(addr(port), "shop").await;
    publ.publish_acked("orders/17", false, "2 x widget").await;
    let got = sub.next_publish().await;
    assert!(!got.dup);
    // Never acknowledged: the crash comes first (after the writer's next commit).
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    broker.kill();
    drop((sub, publ));

    let broker = Moatmq::serve(&config(dir.path(), 0), &[]);
    let port = broker.port("tcp");
    let mut sub = v4::connect(persistent(port, "slow-acker")).await.unwrap();
    assert!(sub.connack.session_present);
    let again = sub.next_publish().await;
    assert_eq!(
        (again.topic.as_str(), &again.payload[..], again.dup),
        ("orders/17", &b"2 x widget"[..], true)
    );
    assert!(sub.publish_within(QUIET).await.is_none(), "delivered twice");
}

/// A persistent session back with a backlog stored while it was offline: until the
/// client has acknowledged each message, the message stays on disk, so a crash in the
/// middle of the drain (here its second, after a dropped connection) loses none of them
/// (they were acknowledged to the publisher).
#[tokio::test]
async fn a_backlog_being_drained_survives_kill_9() {
    const QUEUED: usize = 300;
    let dir = tempfile::tempdir().unwrap();
    let broker = Moatmq::serve(&config(dir.path(), 0), &[]);
    let port = broker.port("tcp");
    let mut sub = v4::connect(persistent(port, "backlog")).await.unwrap();
    sub.subscribe_acked("orders/#").await;
    sub.client.disconnect().await.unwrap();
    assert!(sub.closed_within(WAIT).await.is_some());
    let mut publ = v4::connected(addr(port), "shop").await;
    for i in 0..QUEUED {
        publ.publish_acked(format!("orders/{i}"), false, format!("order {i}"))
            .await;
    }

    // Back, it acknowledges ten of what the broker sends and drops off; back again, ten
    // more.
    let mut acked = std::collections::BTreeSet::new();
    let mut sub = None;
    for _ in 0..2 {
        drop(sub.take());
        let mut o = persistent(port, "backlog");
        o.set_manual_acks(true);
        let mut s = v4::connect(o).await.unwrap();
        assert!(s.connack.session_present);
        for _ in 0..10 {
            let p = s.next_publish().await;
            s.client.ack(&p).await.unwrap();
            acked.insert(String::from_utf8(p.payload.to_vec()).unwrap());
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        sub = Some(s);
    }
    // The acknowledgements reach the broker and its writer commits; then the crash.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    broker.kill();
    drop((sub, publ));

    let broker = Moatmq::serve(&config(dir.path(), 0), &[]);
    let port = broker.port("tcp");
    let mut sub = v4::connect(persistent(port, "backlog")).await.unwrap();
    assert!(sub.connack.session_present);
    let mut again = std::collections::BTreeSet::new();
    while let Some(p) = sub.publish_within(QUIET).await {
        let text = String::from_utf8(p.payload.to_vec()).unwrap();
        assert!(again.insert(text.clone()), "{text} delivered twice");
    }
    let lost: Vec<String> = (0..QUEUED)
        .map(|i| format!("order {i}"))
        .filter(|m| !acked.contains(m) && !again.contains(m))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {QUEUED} lost in the crash: {lost:?}",
        lost.len()
    );
}

/// A persistent subscriber that fell behind (it stopped acknowledging: the router holds
/// what passes its in-flight limit) disconnects, then the broker is killed: every message
/// acknowledged to the publisher comes after the restart, once. What the router held was
/// in its memory only (200 of 300 lost before the connection's end stored it).
#[tokio::test]
async fn a_slow_subscribers_backlog_survives_kill_9_after_it_disconnects() {
    const QUEUED: usize = 300;
    let dir = tempfile::tempdir().unwrap();
    let broker = Moatmq::serve(&config(dir.path(), 0), &[]);
    let port = broker.port("tcp");
    let mut o = persistent(port, "laggard");
    o.set_manual_acks(true);
    let mut sub = v4::connect(o).await.unwrap();
    sub.subscribe_acked("orders/#").await;
    let mut publ = v4::connected(addr(port), "shop").await;
    for i in 0..QUEUED {
        publ.publish_acked(format!("orders/{i}"), false, format!("order {i}"))
            .await;
    }
    while sub.publish_within(QUIET).await.is_some() {}
    sub.client.disconnect().await.unwrap();
    assert!(sub.closed_within(WAIT).await.is_some());
    // The connection's end reaches the writer, which commits; then the crash.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    broker.kill();
    drop(publ);

    let broker = Moatmq::serve(&config(dir.path(), 0), &[]);
    let port = broker.port("tcp");
    let mut sub = v4::connect(persistent(port, "laggard")).await.unwrap();
    assert!(sub.connack.session_present);
    let mut again = Vec::new();
    while let Some(p) = sub.publish_within(QUIET).await {
        again.push(String::from_utf8(p.payload.to_vec()).unwrap());
    }
    let sent: Vec<String> = (0..QUEUED).map(|i| format!("order {i}")).collect();
    assert_eq!(again, sent, "lost, twice or out of order after the crash");
}

/// A raw 3.1.1 client resuming the persistent session `id`.
async fn raw_persistent(port: u16, id: &str) -> Raw {
    let mut connect = wire::Connect::new(Version::V4, id);
    connect.clean = false;
    Raw::accepted(addr(port), &connect).await.0
}

/// The next packet: (first byte, packet id).
async fn next_packet(raw: &mut Raw) -> (u8, u16) {
    let f = raw.frame_within(WAIT).await.expect("a packet");
    let pkid = wire::publish_pkid(f.first, &f.body)
        .unwrap_or_else(|| u16::from_be_bytes([f.body[0], f.body[1]]));
    (f.first, pkid)
}

/// MQTT-4.3.3 across a crash, with `autosave_interval = 0`: a QoS 2 message the client
/// got comes again after kill -9 with DUP under its packet id (which the client knows
/// as one it has), never as a new message; once the client's PUBREC brought a PUBREL,
/// the PUBREL comes again, not the message (the client may have completed the
/// exchange: a PUBLISH under that id is then a new message). The second exchange is
/// the gateway's own delivery of the stored message: its PUBREC was not recorded
/// before, and the message came again. (That each packet goes out only once the store
/// has its state is checked with a slowed store: `durable_commit_delay.rs`.)
#[tokio::test]
async fn qos_2_deliveries_stay_exactly_once_across_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Moatmq::serve(&config(dir.path(), 0), &[]);
    let port = broker.port("tcp");
    let mut sub = raw_persistent(port, "ledger").await;
    sub.send(&wire::subscribe(Version::V4, 1, &[(b"ledger/#", 2)]))
        .await;
    assert_eq!(next_packet(&mut sub).await.0, wire::first::SUBACK);
    let mut publ = v4::connected(addr(port), "ledger-writer").await;
    publ.publish_at(QoS::ExactlyOnce, "ledger/x", false, "1 EUR")
        .await;
    let (first, pkid) = next_packet(&mut sub).await;
    assert_eq!(first, wire::first::PUBLISH | 4, "a new QoS 2 PUBLISH");
    broker.kill();

    let broker = Moatmq::serve(&config(dir.path(), 0), &[]);
    let port = broker.port("tcp");
    let mut sub = raw_persistent(port, "ledger").await;
    assert_eq!(
        next_packet(&mut sub).await,
        (wire::first::PUBLISH | 4 | 0x08, pkid),
        "sent again as a new message, not with DUP under its packet id"
    );
    sub.send(&wire::ack(wire::first::PUBREC, pkid)).await;
    assert_eq!(next_packet(&mut sub).await, (wire::first::PUBREL, pkid));
    broker.kill();

    let broker = Moatmq::serve(&config(dir.path(), 0), &[]);
    let mut sub = raw_persistent(broker.port("tcp"), "ledger").await;
    assert_eq!(
        next_packet(&mut sub).await,
        (wire::first::PUBREL, pkid),
        "the message again, not the PUBREL owed"
    );
    sub.send(&wire::ack(wire::first::PUBCOMP, pkid)).await;
    assert!(sub.frame_within(QUIET).await.is_none(), "nothing else");
}
