//! Durable sessions: a persistent session, its subscriptions and the messages queued
//! for it while offline survive a broker restart, encrypted on disk, and stay their
//! owner's.

mod common;
use common::{assert_quiet4, broker_with_store, login4, suback4, with_delayed_will, V4_OK};
use moatmq_testkit::wire::{self, Version};
use moatmq_testkit::{v4, v5, Raw, TestBroker, QUIET, WAIT};
use rumqttc::v5::mqttbytes::v5 as m5;
use rumqttc::QoS;
use std::net::SocketAddr;

fn persistent4(addr: SocketAddr, id: &str) -> v4::MqttOptions {
    let mut o = v4::options(addr, id);
    o.set_clean_session(false);
    o
}

/// A persistent 3.1.1 session subscribed to `filter` at QoS 1, then disconnected.
async fn leave_subscribed(addr: SocketAddr, id: &str, filter: &str) {
    let mut sub = v4::connect(persistent4(addr, id)).await.unwrap();
    assert_eq!(suback4(&mut sub, &[filter]).await, vec![V4_OK]);
    sub.client.disconnect().await.unwrap();
    assert!(sub.closed_within(WAIT).await.is_some());
}

async fn publish_n(addr: SocketAddr, topic: &str, n: usize) {
    let mut publ = v4::connected(addr, "publisher").await;
    for i in 0..n {
        publ.publish_acked(topic, false, format!("m{i}")).await;
    }
    publ.client.disconnect().await.unwrap();
}

fn session_log(broker: &TestBroker) -> Vec<u8> {
    std::fs::read(broker.path("data/retained/sessions.log")).expect("sessions.log")
}

#[tokio::test]
async fn queued_messages_and_subscriptions_survive_a_restart() {
    let broker = broker_with_store(0).await;
    leave_subscribed(broker.first_addr(), "fleet-7", "plant/+/alarm").await;
    publish_n(broker.first_addr(), "plant/3/alarm", 5).await;

    let broker = broker.restart().await;
    let addr = broker.first_addr();
    let mut sub = v4::connect(persistent4(addr, "fleet-7")).await.unwrap();
    assert!(sub.connack.session_present, "session lost in the restart");
    for i in 0..5 {
        let p = sub.next_publish().await;
        assert_eq!(
            (p.topic.as_str(), &p.payload[..]),
            ("plant/3/alarm", format!("m{i}").as_bytes())
        );
        assert_eq!(p.qos, QoS::AtLeastOnce);
    }
    // The subscription itself came back: a message published now arrives live.
    publish_n(addr, "plant/9/alarm", 1).await;
    assert_eq!(sub.next_publish().await.topic, "plant/9/alarm");
    sub.client.disconnect().await.unwrap();
    assert!(sub.closed_within(WAIT).await.is_some());

    // Acknowledged messages are gone from the store: nothing comes twice.
    let broker = broker.restart().await;
    let mut sub = v4::connect(persistent4(broker.first_addr(), "fleet-7"))
        .await
        .unwrap();
    assert!(sub.connack.session_present);
    assert_quiet4(&mut sub).await;
}

#[tokio::test]
async fn messages_queued_after_a_restart_come_after_those_from_before() {
    let broker = broker_with_store(5).await;
    leave_subscribed(broker.first_addr(), "ordered", "o/#").await;
    publish_n(broker.first_addr(), "o/before", 3).await;
    let broker = broker.restart().await;
    let addr = broker.first_addr();
    let mut publ = v4::connected(addr, "publisher").await;
    publ.publish_acked("o/after", false, "a0").await;
    let mut sub = v4::connect(persistent4(addr, "ordered")).await.unwrap();
    assert!(sub.connack.session_present);
    let mut got = Vec::new();
    for _ in 0..4 {
        let p = sub.next_publish().await;
        got.push(format!(
            "{}={}",
            p.topic,
            String::from_utf8_lossy(&p.payload)
        ));
    }
    assert_eq!(
        got,
        ["o/before=m0", "o/before=m1", "o/before=m2", "o/after=a0"]
    );
    assert_quiet4(&mut sub).await;
}

#[tokio::test]
async fn the_session_file_holds_no_client_id_topic_or_payload_in_clear() {
    let broker = broker_with_store(0).await;
    leave_subscribed(broker.first_addr(), "ward7-monitor", "ward7/#").await;
    let mut publ = v4::connected(broker.first_addr(), "publisher").await;
    publ.publish_acked("ward7/bed3/vitals", false, "pulse=61")
        .await;
    let broker = broker.restart().await;
    let disk = session_log(&broker);
    assert!(!disk.is_empty());
    for secret in [&b"ward7-monitor"[..], b"ward7/", b"pulse=61"] {
        assert!(
            !disk.windows(secret.len()).any(|w| w == secret),
            "{:?} in clear in sessions.log",
            String::from_utf8_lossy(secret)
        );
    }
}

#[tokio::test]
async fn a_session_that_expired_while_the_broker_was_down_is_gone() {
    let broker = broker_with_store(0).await;
    let addr = broker.first_addr();
    let mut o = v5::options(addr, "short");
    o.set_clean_start(false);
    o.set_connect_properties(m5::ConnectProperties {
        session_expiry_interval: Some(1),
        ..m5::ConnectProperties::new()
    });
    let mut sub = v5::connect(o).await.unwrap();
    common::subscribed5(&mut sub, "s/#").await;
    sub.client.disconnect().await.unwrap();
    assert!(sub.closed_within(WAIT).await.is_some());
    let dir = broker.stop().await;
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let broker = TestBroker::start_in(dir).await;
    let mut o = v5::options(broker.first_addr(), "short");
    o.set_clean_start(false);
    o.set_connect_properties(m5::ConnectProperties {
        session_expiry_interval: Some(60),
        ..m5::ConnectProperties::new()
    });
    let sub = v5::connect(o).await.unwrap();
    assert!(!sub.connack.session_present, "expired session came back");
}

#[tokio::test]
async fn a_restored_session_stays_its_owners() {
    let broker = TestBroker::builder()
        .users(&[("alice", "alice-pw"), ("bob", "bob-pw")])
        .retained_store()
        .start()
        .await;
    let addr = broker.first_addr();
    let mut o = login4(addr, "shared-id", "alice", "alice-pw");
    o.set_clean_session(false);
    let mut alice = v4::connect(o).await.unwrap();
    assert_eq!(suback4(&mut alice, &["alice/q"]).await, vec![V4_OK]);
    alice.client.disconnect().await.unwrap();
    assert!(alice.closed_within(WAIT).await.is_some());
    let mut publ = v4::connect(login4(addr, "alice-pub", "alice", "alice-pw"))
        .await
        .unwrap();
    publ.publish_acked("alice/q", false, "for alice only").await;

    let broker = broker.restart().await;
    let addr = broker.first_addr();
    // bob with alice's client id after the restart: nothing of hers.
    let mut ob = login4(addr, "shared-id", "bob", "bob-pw");
    ob.set_clean_session(false);
    let mut bob = v4::connect(ob).await.unwrap();
    assert!(
        !bob.connack.session_present,
        "bob inherited alice's session"
    );
    assert_quiet4(&mut bob).await;
    bob.client.disconnect().await.unwrap();
    assert!(bob.closed_within(WAIT).await.is_some());

    let mut o = login4(addr, "shared-id", "alice", "alice-pw");
    o.set_clean_session(false);
    let mut alice = v4::connect(o).await.unwrap();
    assert!(alice.connack.session_present);
    assert_eq!(
        alice.next_publish().await.payload,
        "for alice only".as_bytes()
    );
}

#[tokio::test]
async fn an_acl_tightened_across_the_restart_applies_to_queued_messages() {
    let broker = TestBroker::builder()
        .users(&[("alice", "alice-pw")])
        .acl("user alice\ntopic readwrite alice/#\n")
        .retained_store()
        .start()
        .await;
    let addr = broker.first_addr();
    let mut o = login4(addr, "reader", "alice", "alice-pw");
    o.set_clean_session(false);
    let mut alice = v4::connect(o.clone()).await.unwrap();
    assert_eq!(suback4(&mut alice, &["alice/#"]).await, vec![V4_OK]);
    alice.client.disconnect().await.unwrap();
    assert!(alice.closed_within(WAIT).await.is_some());
    let mut publ = v4::connect(login4(addr, "writer", "alice", "alice-pw"))
        .await
        .unwrap();
    publ.publish_acked("alice/secret/plan", false, "hidden")
        .await;
    publ.publish_acked("alice/open", false, "visible").await;

    let dir = broker.stop().await;
    std::fs::write(
        dir.path().join("aclfile"),
        "user alice\ntopic deny alice/secret/#\ntopic readwrite alice/#\n",
    )
    .unwrap();
    let broker = TestBroker::start_in(dir).await;
    let mut o = login4(broker.first_addr(), "reader", "alice", "alice-pw");
    o.set_clean_session(false);
    let mut alice = v4::connect(o).await.unwrap();
    assert!(alice.connack.session_present);
    let p = alice.next_publish().await;
    assert_eq!(p.topic, "alice/open", "the denied message was delivered");
    assert_quiet4(&mut alice).await;
}

#[tokio::test]
async fn a_clean_session_discards_the_stored_one() {
    let broker = broker_with_store(0).await;
    leave_subscribed(broker.first_addr(), "cleaner", "c/#").await;
    publish_n(broker.first_addr(), "c/x", 2).await;
    let mut o = v4::options(broker.first_addr(), "cleaner");
    o.set_clean_session(true);
    let clean = v4::connect(o).await.unwrap();
    assert!(!clean.connack.session_present);
    clean.client.disconnect().await.unwrap();
    let broker = broker.restart().await;
    let mut sub = v4::connect(persistent4(broker.first_addr(), "cleaner"))
        .await
        .unwrap();
    assert!(
        !sub.connack.session_present,
        "a discarded session came back"
    );
    assert_quiet4(&mut sub).await;
}

/// A persistent subscriber that never acknowledges (rumqttc with manual acks).
async fn unacking(addr: SocketAddr, id: &str) -> v4::Client {
    let mut o = persistent4(addr, id);
    o.set_manual_acks(true);
    v4::connect(o).await.unwrap()
}

#[tokio::test]
async fn a_message_sent_but_not_acknowledged_is_sent_again_with_dup_after_a_restart() {
    let broker = broker_with_store(0).await;
    let addr = broker.first_addr();
    let mut sub = unacking(addr, "forgetful").await;
    sub.subscribe_acked("inbox/#").await;
    publish_n(addr, "inbox/a", 1).await;
    let first = sub.next_publish().await;
    assert!(!first.dup);
    // Still connected, message unacknowledged: the broker restarts (SIGTERM).
    let broker = broker.restart().await;
    drop(sub);
    let mut sub = v4::connect(persistent4(broker.first_addr(), "forgetful"))
        .await
        .unwrap();
    assert!(sub.connack.session_present);
    let again = sub.next_publish().await;
    assert_eq!(
        (again.topic.as_str(), &again.payload[..]),
        ("inbox/a", &b"m0"[..])
    );
    assert!(again.dup, "a message sent before is sent again with DUP");
    assert_quiet4(&mut sub).await;
}

#[tokio::test]
async fn an_unacknowledged_message_is_not_duplicated_by_a_reconnect_without_restart() {
    let broker = broker_with_store(0).await;
    let addr = broker.first_addr();
    let mut sub = unacking(addr, "flaky").await;
    sub.subscribe_acked("inbox/#").await;
    publish_n(addr, "inbox/b", 1).await;
    sub.next_publish().await;
    sub.client.disconnect().await.unwrap();
    assert!(sub.closed_within(WAIT).await.is_some());
    let mut sub = v4::connect(persistent4(addr, "flaky")).await.unwrap();
    assert!(sub.connack.session_present);
    assert_eq!(sub.next_publish().await.topic, "inbox/b");
    assert_quiet4(&mut sub).await;
    // Acknowledged now: a restart brings nothing back.
    sub.client.disconnect().await.unwrap();
    assert!(sub.closed_within(WAIT).await.is_some());
    let broker = broker.restart().await;
    let mut sub = v4::connect(persistent4(broker.first_addr(), "flaky"))
        .await
        .unwrap();
    assert!(sub.connack.session_present);
    assert_quiet4(&mut sub).await;
}

/// A persistent subscriber that fell behind (past the router's in-flight limit) goes
/// and comes back to the same broker: what it was sent comes again with DUP, what the
/// router still held follows, then what was published while it was away: each once, in
/// order (the connection's end takes the router's backlog into the store).
#[tokio::test]
async fn a_slow_subscriber_back_gets_its_backlog_once_in_order() {
    let broker = broker_with_store(1).await;
    let addr = broker.first_addr();
    let mut sub = unacking(addr, "laggard").await;
    sub.subscribe_acked("feed/#").await;
    publish_n(addr, "feed/a", 300).await;
    let mut sent = 0;
    while sub.publish_within(QUIET).await.is_some() {
        sent += 1;
    }
    assert!(sent < 300, "the router held some back ({sent} sent)");
    sub.client.disconnect().await.unwrap();
    assert!(sub.closed_within(WAIT).await.is_some());
    let mut publ = v4::connected(addr, "late-publisher").await;
    publ.publish_acked("feed/b", false, "away").await;

    let mut sub = v4::connect(persistent4(addr, "laggard")).await.unwrap();
    assert!(sub.connack.session_present);
    let mut got = Vec::new();
    while let Some(p) = sub.publish_within(QUIET).await {
        got.push((String::from_utf8(p.payload.to_vec()).unwrap(), p.dup));
    }
    let mut expected: Vec<(String, bool)> = (0..300).map(|i| (format!("m{i}"), i < sent)).collect();
    expected.push(("away".into(), false));
    assert_eq!(got, expected);
}

/// Persistent subscribers that fell behind go away while more is published for them,
/// and the broker restarts before they are back: everything comes, once, in publish
/// order. Two faults, each a race (four subscribers, so that they show without the
/// fixes in most runs): what the router still held was stored after what was queued
/// while the connection's end collected it, so the restart replayed newer messages
/// first (e2e `acknowledged_messages_for_an_offline_session_survive_kill_9` saw it in
/// CI); and a message admitted while the session was still online but handed to the
/// router after the collection was in the router's memory only, lost by the restart.
#[tokio::test]
async fn slow_subscribers_gone_while_more_comes_get_everything_in_order_after_a_restart() {
    const ROUNDS: usize = 4;
    let broker = broker_with_store(0).await;
    let addr = broker.first_addr();
    let mut sent = Vec::new();
    for round in 0..ROUNDS {
        let mut sub = unacking(addr, &format!("laggard-{round}")).await;
        sub.subscribe_acked(&format!("feed/{round}/#")).await;
        publish_n(addr, &format!("feed/{round}/a"), 300).await;
        let mut n = 0;
        while sub.publish_within(QUIET).await.is_some() {
            n += 1;
        }
        assert!(n < 300, "the router held some back ({n} sent)");
        sent.push(n);
        // Published as it leaves: some admitted while it is still online (not queued
        // in the store), some while its connection's end collects the router's backlog.
        let (started, publishing_now) = tokio::sync::oneshot::channel();
        let publishing = tokio::spawn(async move {
            let mut publ = v4::connected(addr, &format!("late-publisher-{round}")).await;
            let mut started = Some(started);
            for i in 0..100 {
                publ.publish_acked(&format!("feed/{round}/b"), false, format!("n{i}"))
                    .await;
                if let Some(started) = started.take() {
                    let _ = started.send(());
                }
            }
        });
        publishing_now.await.unwrap();
        sub.client.disconnect().await.unwrap();
        assert!(sub.closed_within(WAIT).await.is_some());
        publishing.await.unwrap();
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    let broker = broker.restart().await;
    for (round, sent) in sent.iter().enumerate() {
        let mut sub = v4::connect(persistent4(
            broker.first_addr(),
            &format!("laggard-{round}"),
        ))
        .await
        .unwrap();
        assert!(sub.connack.session_present);
        let mut got = Vec::new();
        while let Some(p) = sub.publish_within(QUIET).await {
            got.push(String::from_utf8(p.payload.to_vec()).unwrap());
        }
        let expected: Vec<String> = (0..300)
            .map(|i| format!("m{i}"))
            .chain((0..100).map(|i| format!("n{i}")))
            .collect();
        assert_eq!(got, expected, "laggard-{round} ({} sent before)", sent);
    }
}

/// A broker with a session store that queues 3 messages per session, with metrics and
/// an audit log.
async fn three_queued() -> TestBroker {
    TestBroker::builder()
        .anonymous()
        .retained_store()
        .limit("max_queued_messages", 3)
        .metrics()
        .audit()
        .start()
        .await
}

#[tokio::test]
async fn a_full_queue_drops_the_newest_counted_and_audited() {
    let broker = three_queued().await;
    let addr = broker.first_addr();
    leave_subscribed(addr, "small-queue", "q/#").await;
    // The broker is done with the connection's end (what the router still held for it
    // collected) before anything is published, so which messages are kept is known
    // (racing it: the next test).
    broker.disconnect_audited("small-queue").await;
    publish_n(addr, "q/x", 5).await;
    // The publisher is never held up by a full queue; the drops are counted.
    let mut dropped = 0.0;
    for _ in 0..50 {
        dropped = broker.metric("moatmq_session_messages_dropped_total").await;
        if dropped >= 2.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(dropped, 2.0);
    let audit = std::fs::read_to_string(broker.path("audit.log")).unwrap();
    let full: Vec<&str> = audit
        .lines()
        .filter(|l| l.contains("\"session_queue_full\""))
        .collect();
    assert_eq!(full.len(), 2, "{audit}");
    assert!(full[0].contains("\"small-queue\"") && full[0].contains("max_queued_messages"));

    let broker = broker.restart().await;
    let mut sub = v4::connect(persistent4(broker.first_addr(), "small-queue"))
        .await
        .unwrap();
    for i in 0..3 {
        assert_eq!(sub.next_publish().await.payload, format!("m{i}").as_bytes());
    }
    assert_quiet4(&mut sub).await;
}

/// Publishes racing the subscriber's disconnect (some reach the router while its
/// connection ends, and are collected from there, others are queued for it offline,
/// most both): each message that does not fit is counted and audited once. (Before,
/// one dropped from the offline queue was counted again when the router's copy was
/// collected: 293 drops counted for 200 messages.)
#[tokio::test]
async fn a_full_queue_counts_each_drop_once_when_publishes_race_the_disconnect() {
    const N: usize = 200;
    let broker = three_queued().await;
    let addr = broker.first_addr();
    let mut sub = v4::connect(persistent4(addr, "racing")).await.unwrap();
    assert_eq!(suback4(&mut sub, &["q/#"]).await, vec![V4_OK]);
    let mut publ = v4::connected(addr, "publisher").await;
    for i in 0..N {
        if i == N / 2 {
            sub.client.disconnect().await.unwrap();
        }
        publ.client
            .publish("q/x", QoS::AtLeastOnce, false, format!("m{i}"))
            .await
            .unwrap();
    }
    assert!(sub.closed_within(WAIT).await.is_some());
    let mut acked = 0;
    while acked < N {
        let ack = publ
            .incoming(|p| matches!(p, rumqttc::Packet::PubAck(_)).then_some(()))
            .await;
        assert!(ack.is_some(), "{acked} of {N} acknowledged");
        acked += 1;
    }
    // The session store's writer counts as it goes: until it is done.
    let (mut dropped, mut full) = (-1.0, 0);
    for _ in 0..100 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let now = broker.metric("moatmq_session_messages_dropped_total").await;
        let audit = std::fs::read_to_string(broker.path("audit.log")).unwrap();
        full = audit
            .lines()
            .filter(|l| l.contains("\"session_queue_full\""))
            .count();
        if now == dropped && full as f64 == now {
            break;
        }
        dropped = now;
    }
    assert_eq!(full as f64, dropped, "each drop audited once");
    // The stored queue keeps 3 of the N (rumqttd's memory may still deliver more while
    // the broker runs, docs/sessions.md): at most N - 3 dropped, each counted once.
    assert!(
        dropped as usize <= N - 3,
        "{dropped} drops counted for {N} messages, 3 of them kept"
    );
    let sub = v4::connect(persistent4(addr, "racing")).await.unwrap();
    assert!(sub.connack.session_present);
}

#[tokio::test]
async fn qos_0_messages_are_kept_for_offline_sessions_only_when_configured() {
    for queue_qos0 in [false, true] {
        let broker = TestBroker::builder()
            .anonymous()
            .retained_store()
            .set("sessions", "queue_qos0_messages", queue_qos0)
            .start()
            .await;
        let addr = broker.first_addr();
        leave_subscribed(addr, "qos0-sink", "z/#").await;
        let mut publ = v4::connected(addr, "publisher").await;
        publ.client
            .publish("z/0", QoS::AtMostOnce, false, "best effort")
            .await
            .unwrap();
        publ.publish_acked("z/1", false, "sure").await;
        let broker = broker.restart().await;
        let mut sub = v4::connect(persistent4(broker.first_addr(), "qos0-sink"))
            .await
            .unwrap();
        if queue_qos0 {
            assert_eq!(sub.next_publish().await.topic, "z/0");
        }
        assert_eq!(
            sub.next_publish().await.topic,
            "z/1",
            "queue_qos0 {queue_qos0}"
        );
        assert_quiet4(&mut sub).await;
    }
}

#[tokio::test]
async fn sessions_enabled_false_keeps_them_in_memory() {
    let broker = TestBroker::builder()
        .anonymous()
        .retained_store()
        .set("sessions", "enabled", false)
        .start()
        .await;
    leave_subscribed(broker.first_addr(), "volatile", "v/#").await;
    publish_n(broker.first_addr(), "v/x", 1).await;
    let broker = broker.restart().await;
    assert!(!broker.path("data/retained/sessions.log").exists());
    let sub = v4::connect(persistent4(broker.first_addr(), "volatile"))
        .await
        .unwrap();
    assert!(!sub.connack.session_present);
}

/// A raw 3.1.1 client resuming a persistent session.
async fn raw_persistent(addr: SocketAddr, id: &str) -> Raw {
    let mut connect = wire::Connect::new(Version::V4, id);
    connect.clean = false;
    Raw::accepted(addr, &connect).await.0
}

#[tokio::test]
async fn an_incoming_qos_2_exchange_completes_exactly_once_across_a_restart() {
    let broker = broker_with_store(0).await;
    let addr = broker.first_addr();
    let mut watcher = v4::connected(addr, "watcher").await;
    watcher.subscribe_acked("pay/#").await;
    let mut payer = raw_persistent(addr, "payer").await;
    let publish = wire::Publish::new(Version::V4, b"pay/1", b"100 EUR")
        .qos(2, 7)
        .encode();
    payer.send(&publish).await;
    let rec = payer.frame_within(WAIT).await.expect("PUBREC");
    assert_eq!(
        (rec.first, &rec.body[..2]),
        (wire::first::PUBREC, &[0, 7][..])
    );
    assert_eq!(&watcher.next_publish().await.payload[..], b"100 EUR");

    let broker = broker.restart().await;
    let addr = broker.first_addr();
    let mut watcher = v4::connected(addr, "watcher").await;
    watcher.subscribe_acked("pay/#").await;
    let mut payer = raw_persistent(addr, "payer").await;
    // The payer never saw its PUBREC: it sends the PUBLISH again, with DUP.
    let mut again = publish.clone();
    again[0] |= 0x08;
    payer.send(&again).await;
    let rec = payer.frame_within(WAIT).await.expect("PUBREC");
    assert_eq!(
        (rec.first, &rec.body[..2]),
        (wire::first::PUBREC, &[0, 7][..])
    );
    payer.send(&wire::ack(wire::first::PUBREL, 7)).await;
    let comp = payer.frame_within(WAIT).await.expect("PUBCOMP");
    assert_eq!(
        (comp.first, &comp.body[..2]),
        (wire::first::PUBCOMP, &[0, 7][..])
    );
    assert!(
        watcher.publish_within(QUIET).await.is_none(),
        "paid twice: the resent QoS 2 PUBLISH was admitted again"
    );
}

/// The session store can be behind the client: with `autosave_interval` above 0 a
/// crash after a QoS 2 exchange's PUBCOMP and before the next save leaves its packet id
/// pending (here: a restart between PUBREC and PUBREL, the client then behaving as one
/// that completed the exchange). The client's next message under that id, sent as new
/// (no DUP: a resend always has it, MQTT-3.3.1-1), is a new message: delivered, not
/// answered as a resend and lost (it was, before).
#[tokio::test]
async fn a_new_message_under_a_packet_id_the_store_still_holds_is_delivered() {
    let broker = broker_with_store(0).await;
    let addr = broker.first_addr();
    let mut payer = raw_persistent(addr, "payer").await;
    let first = wire::Publish::new(Version::V4, b"pay/1", b"100 EUR").qos(2, 7);
    payer.send(&first.encode()).await;
    assert_eq!(
        payer.frame_within(WAIT).await.expect("PUBREC").first,
        wire::first::PUBREC
    );

    let broker = broker.restart().await;
    let addr = broker.first_addr();
    let mut watcher = v4::connected(addr, "watcher").await;
    watcher.subscribe_acked("pay/#").await;
    let mut payer = raw_persistent(addr, "payer").await;
    let next = wire::Publish::new(Version::V4, b"pay/2", b"5 EUR").qos(2, 7);
    payer.send(&next.encode()).await;
    let rec = payer.frame_within(WAIT).await.expect("PUBREC");
    assert_eq!(
        (rec.first, &rec.body[..2]),
        (wire::first::PUBREC, &[0, 7][..])
    );
    let got = watcher
        .publish_within(WAIT)
        .await
        .expect("the new message under packet id 7 was taken for a resend");
    assert_eq!(&got.payload[..], b"5 EUR");
    payer.send(&wire::ack(wire::first::PUBREL, 7)).await;
    assert_eq!(
        payer.frame_within(WAIT).await.expect("PUBCOMP").first,
        wire::first::PUBCOMP
    );
    // Resent with DUP (its PUBREC lost), the new one is not delivered twice.
    let mut again = wire::Publish::new(Version::V4, b"pay/3", b"1 EUR")
        .qos(2, 8)
        .encode();
    payer.send(&again).await;
    assert_eq!(
        payer.frame_within(WAIT).await.expect("PUBREC").first,
        wire::first::PUBREC
    );
    again[0] |= 0x08;
    payer.send(&again).await;
    assert_eq!(
        payer.frame_within(WAIT).await.expect("PUBREC").first,
        wire::first::PUBREC
    );
    assert_eq!(&watcher.next_publish().await.payload[..], b"1 EUR");
    assert!(watcher.publish_within(QUIET).await.is_none(), "twice");
}

#[tokio::test]
async fn a_delayed_will_survives_a_restart_unless_its_client_comes_back() {
    let broker = broker_with_store(0).await;
    let addr = broker.first_addr();
    // Both drop their sockets: each has a will due in 2 s.
    drop(with_delayed_will(addr, "dies", 2, 60).await);
    drop(with_delayed_will(addr, "returns", 2, 60).await);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let broker = broker.restart().await;
    let addr = broker.first_addr();
    let mut watcher = v5::connected(addr, "watcher").await;
    common::subscribed5(&mut watcher, "wills/#").await;
    // "returns" is back before its delay ran out: its will is cancelled.
    let mut back = v5::options(addr, "returns");
    back.set_clean_start(false);
    back.set_connect_properties(m5::ConnectProperties {
        session_expiry_interval: Some(60),
        ..m5::ConnectProperties::new()
    });
    let back = v5::connect(back).await.unwrap();
    assert!(back.connack.session_present);
    let will = watcher.next_publish().await;
    assert_eq!(
        (&will.topic[..], &will.payload[..]),
        (&b"wills/dies"[..], &b"gone"[..])
    );
    assert!(
        watcher
            .publish_within(std::time::Duration::from_secs(3))
            .await
            .is_none(),
        "the will of a client that came back was published"
    );
}

#[tokio::test]
async fn message_expiry_keeps_counting_across_a_restart() {
    let broker = broker_with_store(0).await;
    let addr = broker.first_addr();
    let mut o = v5::options(addr, "expiring");
    o.set_clean_start(false);
    o.set_connect_properties(m5::ConnectProperties {
        session_expiry_interval: Some(600),
        ..m5::ConnectProperties::new()
    });
    let mut sub = v5::connect(o.clone()).await.unwrap();
    common::subscribed5(&mut sub, "e/#").await;
    sub.client.disconnect().await.unwrap();
    assert!(sub.closed_within(WAIT).await.is_some());
    let publ = v5::connected(addr, "publisher").await;
    for (topic, expiry) in [("e/short", 1), ("e/long", 600)] {
        let props = m5::PublishProperties {
            message_expiry_interval: Some(expiry),
            ..Default::default()
        };
        publ.client
            .publish_with_properties(
                topic,
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                false,
                "x",
                props,
            )
            .await
            .unwrap();
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let dir = broker.stop().await;
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let broker = TestBroker::start_in(dir).await;
    let mut o = v5::options(broker.first_addr(), "expiring");
    o.set_clean_start(false);
    let mut sub = v5::connect(o).await.unwrap();
    assert!(sub.connack.session_present);
    let p = sub.next_publish().await;
    assert_eq!(&p.topic[..], b"e/long", "an expired message was delivered");
    let left = p
        .properties
        .and_then(|p| p.message_expiry_interval)
        .unwrap();
    assert!((1..=599).contains(&left), "expiry left: {left}");
    assert!(sub.publish_within(QUIET).await.is_none());
}

#[tokio::test]
async fn stored_sessions_count_against_max_sessions_per_user_after_a_restart() {
    let broker = TestBroker::builder()
        .users(&[("alice", "alice-pw")])
        .retained_store()
        .limit("max_sessions_per_user", 1)
        .start()
        .await;
    let mut o = login4(broker.first_addr(), "first", "alice", "alice-pw");
    o.set_clean_session(false);
    let first = v4::connect(o).await.unwrap();
    first.client.disconnect().await.unwrap();
    let broker = broker.restart().await;
    let mut o = login4(broker.first_addr(), "second", "alice", "alice-pw");
    o.set_clean_session(false);
    assert!(
        v4::connect(o).await.is_err(),
        "a second persistent session past the cap"
    );
    let mut o = login4(broker.first_addr(), "first", "alice", "alice-pw");
    o.set_clean_session(false);
    assert!(v4::connect(o).await.unwrap().connack.session_present);
}

/// Starts a broker on `dir` expecting it to refuse; returns the error.
async fn refused_start(dir: &tempfile::TempDir) -> String {
    let config = moatmq_config::Config::load(&dir.path().join("broker.toml")).unwrap();
    match moatmq_broker::Broker::start(config).await {
        Ok(_) => panic!("the broker started on a damaged session log"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn a_tampered_or_truncated_session_log_refuses_the_start_naming_the_file() {
    let broker = broker_with_store(0).await;
    leave_subscribed(broker.first_addr(), "victim", "t/#").await;
    publish_n(broker.first_addr(), "t/x", 20).await;
    let dir = broker.stop().await;
    let log = dir.path().join("data/retained/sessions.log");
    let good = std::fs::read(&log).unwrap();

    let mut tampered = good.clone();
    let at = good.len() / 2;
    tampered[at] ^= 0x40;
    std::fs::write(&log, &tampered).unwrap();
    let err = refused_start(&dir).await;
    assert!(err.contains("sessions.log"), "{err}");

    std::fs::write(&log, &good[..good.len() / 2]).unwrap();
    let err = refused_start(&dir).await;
    assert!(err.contains("sessions.log"), "{err}");

    // The intact file starts again, with the session and its messages.
    std::fs::write(&log, &good).unwrap();
    let broker = TestBroker::start_in(dir).await;
    let mut sub = v4::connect(persistent4(broker.first_addr(), "victim"))
        .await
        .unwrap();
    assert!(sub.connack.session_present);
    assert_eq!(sub.next_publish().await.payload, "m0".as_bytes());
}

#[tokio::test]
async fn a_long_absence_across_a_restart_delivers_everything_once_in_order() {
    let broker = broker_with_store(0).await;
    leave_subscribed(broker.first_addr(), "away", "a/#").await;
    publish_n(broker.first_addr(), "a/before", 2).await;
    let broker = broker.restart().await;
    let addr = broker.first_addr();
    // Many more messages queue up in this run than were carried over.
    publish_n(addr, "a/after", 12).await;
    let mut sub = v4::connect(persistent4(addr, "away")).await.unwrap();
    assert!(sub.connack.session_present);
    let mut got = Vec::new();
    for _ in 0..14 {
        let p = sub.next_publish().await;
        got.push(format!(
            "{}={}",
            p.topic,
            String::from_utf8_lossy(&p.payload)
        ));
    }
    let mut want: Vec<String> = (0..2).map(|i| format!("a/before=m{i}")).collect();
    want.extend((0..12).map(|i| format!("a/after=m{i}")));
    assert_eq!(got, want);
    assert_quiet4(&mut sub).await;
    sub.client.disconnect().await.unwrap();
    assert!(sub.closed_within(WAIT).await.is_some());
    // All acknowledged: another restart brings nothing back.
    let broker = broker.restart().await;
    let mut sub = v4::connect(persistent4(broker.first_addr(), "away"))
        .await
        .unwrap();
    assert!(sub.connack.session_present);
    assert_quiet4(&mut sub).await;
}

#[tokio::test]
async fn forwards_waiting_for_a_full_receive_window_survive_a_restart() {
    let broker = broker_with_store(0).await;
    let addr = broker.first_addr();
    // A durable v5 session that takes one message in flight and never acknowledges it.
    let mut connect = moatmq_testkit::connect5("narrow");
    connect.clean_start = false;
    connect.properties = Some(m5::ConnectProperties {
        session_expiry_interval: Some(600),
        receive_maximum: Some(1),
        ..m5::ConnectProperties::new()
    });
    let (mut sub, code) = Raw::connect5(addr, connect, None, None).await;
    assert_eq!(code, Some(m5::ConnectReturnCode::Success));
    sub.subscribe5(1, &["w/#"]).await;
    publish_n(addr, "w/x", 3).await;
    match sub.next5(WAIT).await {
        Some(m5::Packet::Publish(p)) => assert_eq!(&p.payload[..], b"m0"),
        other => panic!("expected the first PUBLISH, got {other:?}"),
    }
    // m1 and m2 wait in the gateway for the window when the broker stops.
    let broker = broker.restart().await;
    drop(sub);
    let mut o = v5::options(broker.first_addr(), "narrow");
    o.set_clean_start(false);
    o.set_connect_properties(m5::ConnectProperties {
        session_expiry_interval: Some(600),
        ..m5::ConnectProperties::new()
    });
    let mut sub = v5::connect(o).await.unwrap();
    assert!(sub.connack.session_present);
    for i in 0..3 {
        assert_eq!(
            &sub.next_publish().await.payload[..],
            format!("m{i}").as_bytes()
        );
    }
    assert!(sub.publish_within(QUIET).await.is_none());
}

/// A persistent MQTT 5 session (expiry 300 s, clean start `clean`) and its CONNACK.
async fn persistent5(addr: SocketAddr, id: &str, clean: bool) -> (Raw, m5::ConnAck) {
    let mut connect = moatmq_testkit::connect5(id);
    connect.clean_start = clean;
    connect.properties = Some(m5::ConnectProperties {
        session_expiry_interval: Some(300),
        ..m5::ConnectProperties::new()
    });
    Raw::connack5(addr, connect).await
}

#[tokio::test]
async fn subscription_identifiers_and_no_local_survive_a_restart() {
    let broker = broker_with_store(1).await;
    let addr = broker.first_addr();
    let (mut dev, _) = persistent5(addr, "dev", true).await;
    let mut sub = m5::Subscribe::new(
        m5::Filter {
            path: "cmd/#".into(),
            qos: rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            nolocal: true,
            preserve_retain: false,
            retain_forward_rule: m5::RetainForwardRule::Never,
        },
        Some(m5::SubscribeProperties {
            id: Some(42),
            user_properties: Vec::new(),
        }),
    );
    sub.pkid = 1;
    dev.send5(m5::Packet::Subscribe(sub)).await;
    assert!(matches!(dev.next5(WAIT).await, Some(m5::Packet::SubAck(_))));
    dev.send(&[0xE0, 0x00]).await;
    assert!(dev.closed_within(WAIT).await);
    publish_n(addr, "cmd/before", 1).await;

    let broker = broker.restart().await;
    let addr = broker.first_addr();
    let (mut dev, ack) = persistent5(addr, "dev", false).await;
    assert!(ack.session_present);
    // Queued before the restart (replayed by the gateway) and routed after it (by the
    // re-created router subscription): both with the identifier.
    publish_n(addr, "cmd/after", 1).await;
    for topic in [&b"cmd/before"[..], b"cmd/after"] {
        let p = dev.publish5_within(WAIT).await.expect("PUBLISH");
        assert_eq!(&p.topic[..], topic);
        let ids = p.properties.map(|p| p.subscription_identifiers);
        assert_eq!(ids, Some(vec![42]), "{topic:?}");
    }
    // Its own publish does not come back: No Local was kept too.
    let own = m5::Publish::new(
        "cmd/own",
        rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        "x",
        None,
    );
    dev.send5(m5::Packet::Publish(own)).await;
    publish_n(addr, "cmd/other", 1).await;
    let p = dev.publish5_within(WAIT).await.expect("PUBLISH");
    assert_eq!(&p.topic[..], b"cmd/other");
}

/// A QoS 2 PUBLISH read off a raw 3.1.1 connection: (payload, packet id, DUP).
async fn qos2_publish(raw: &mut Raw) -> (Vec<u8>, u16, bool) {
    let f = raw.frame_within(WAIT).await.expect("PUBLISH");
    assert_eq!(f.first & 0xF6, wire::first::PUBLISH | 4, "a QoS 2 PUBLISH");
    let pkid = wire::publish_pkid(f.first, &f.body).expect("a packet id");
    let (_, payload) = wire::publish_parts(f.first, &f.body).expect("a PUBLISH");
    (payload.to_vec(), pkid, f.first & 0x08 != 0)
}

/// The persistent session `ledger` on a raw 3.1.1 connection, subscribed to
/// `ledger/#` at QoS 2.
async fn ledger_subscriber(addr: SocketAddr) -> Raw {
    let mut sub = raw_persistent(addr, "ledger").await;
    sub.send(&wire::subscribe(Version::V4, 1, &[(b"ledger/#", 2)]))
        .await;
    assert_eq!(
        sub.frame_within(WAIT).await.expect("SUBACK").first,
        wire::first::SUBACK
    );
    sub
}

/// Publishes `payload` at QoS 2 from a raw client, the whole exchange.
async fn publish_qos2(addr: SocketAddr, payload: &[u8]) {
    let mut publ = raw_persistent(addr, "ledger-writer").await;
    let p = wire::Publish::new(Version::V4, b"ledger/x", payload).qos(2, 9);
    publ.send(&p.encode()).await;
    assert_eq!(
        publ.frame_within(WAIT).await.expect("PUBREC").first,
        wire::first::PUBREC
    );
    publ.send(&wire::ack(wire::first::PUBREL, 9)).await;
    assert_eq!(
        publ.frame_within(WAIT).await.expect("PUBCOMP").first,
        wire::first::PUBCOMP
    );
}

/// MQTT-4.4.0-1: a QoS 2 message the client was sent and had not acknowledged comes
/// again after a reconnect, and after a restart, with DUP and its original packet id,
/// so the client tells it from a new message (exactly once); the exchange then
/// completes and nothing comes a third time.
#[tokio::test]
async fn an_unacknowledged_qos_2_message_comes_again_under_its_packet_id() {
    let broker = broker_with_store(0).await;
    let addr = broker.first_addr();
    let mut sub = ledger_subscriber(addr).await;
    // Two messages acknowledged in full first: the packet ids of the next ones are
    // not the ones a new connection would start with.
    for done in [b"d0", b"d1"] {
        publish_qos2(addr, done).await;
        let (_, pkid, _) = qos2_publish(&mut sub).await;
        sub.send(&wire::ack(wire::first::PUBREC, pkid)).await;
        assert_eq!(
            sub.frame_within(WAIT).await.expect("PUBREL").first,
            wire::first::PUBREL
        );
        sub.send(&wire::ack(wire::first::PUBCOMP, pkid)).await;
    }
    for m in [b"m0", b"m1", b"m2"] {
        publish_qos2(addr, m).await;
    }
    let mut first = Vec::new();
    for _ in 0..3 {
        let (payload, pkid, dup) = qos2_publish(&mut sub).await;
        assert!(!dup);
        first.push((payload, pkid));
    }
    drop(sub);

    let expect_again = |raw_frames: Vec<(Vec<u8>, u16, bool)>| {
        let again: Vec<(Vec<u8>, u16)> = raw_frames
            .iter()
            .map(|(payload, pkid, dup)| {
                assert!(dup, "sent again with DUP");
                (payload.clone(), *pkid)
            })
            .collect();
        assert_eq!(again, first, "the same messages under the same packet ids");
    };
    let mut sub = raw_persistent(addr, "ledger").await;
    let mut frames = Vec::new();
    for _ in 0..3 {
        frames.push(qos2_publish(&mut sub).await);
    }
    expect_again(frames);
    drop(sub);

    let broker = broker.restart().await;
    let addr = broker.first_addr();
    let mut sub = raw_persistent(addr, "ledger").await;
    let mut frames = Vec::new();
    for _ in 0..3 {
        frames.push(qos2_publish(&mut sub).await);
    }
    expect_again(frames);
    for (_, pkid) in &first {
        sub.send(&wire::ack(wire::first::PUBREC, *pkid)).await;
        let rel = sub.frame_within(WAIT).await.expect("PUBREL");
        assert_eq!(
            (rel.first, &rel.body[..2]),
            (wire::first::PUBREL, &pkid.to_be_bytes()[..])
        );
        sub.send(&wire::ack(wire::first::PUBCOMP, *pkid)).await;
    }
    // Completed: a new message comes, nothing of the old ones.
    publish_qos2(addr, b"after").await;
    let (payload, _, dup) = qos2_publish(&mut sub).await;
    assert_eq!((payload.as_slice(), dup), (&b"after"[..], false));
    assert!(sub.frame_within(QUIET).await.is_none());
}

/// A QoS 2 message whose PUBREC reached the broker and whose PUBCOMP did not: the
/// PUBREL comes again under the same packet id (not the message: the client has it),
/// after a reconnect and after a restart (MQTT-4.4.0-1); the PUBCOMP ends the exchange
/// for good.
#[tokio::test]
async fn a_pubrel_owed_comes_again_after_a_reconnect_and_a_restart() {
    let broker = broker_with_store(0).await;
    let addr = broker.first_addr();
    let mut sub = ledger_subscriber(addr).await;
    publish_qos2(addr, b"once").await;
    let (payload, pkid, _) = qos2_publish(&mut sub).await;
    assert_eq!(payload, b"once");
    let pubrel = (wire::first::PUBREL, pkid.to_be_bytes().to_vec());
    let next = |f: Option<moatmq_testkit::Frame>| {
        let f = f.expect("a packet");
        (f.first, f.body[..2].to_vec())
    };
    sub.send(&wire::ack(wire::first::PUBREC, pkid)).await;
    assert_eq!(next(sub.frame_within(WAIT).await), pubrel);
    drop(sub);

    let mut sub = raw_persistent(addr, "ledger").await;
    assert_eq!(
        next(sub.frame_within(WAIT).await),
        pubrel,
        "after a reconnect"
    );
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let broker = broker.restart().await;
    drop(sub);
    let addr = broker.first_addr();
    let mut sub = raw_persistent(addr, "ledger").await;
    assert_eq!(
        next(sub.frame_within(WAIT).await),
        pubrel,
        "after a restart"
    );
    sub.send(&wire::ack(wire::first::PUBCOMP, pkid)).await;
    assert!(sub.frame_within(QUIET).await.is_none(), "nothing else");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    let broker = broker.restart().await;
    drop(sub);
    let mut sub = raw_persistent(broker.first_addr(), "ledger").await;
    assert!(
        sub.frame_within(QUIET).await.is_none(),
        "completed for good"
    );
}

/// A QoS 2 message stored while its session was offline and replayed after a restart
/// (the gateway's own delivery, not the router's), whose PUBREC came and whose PUBCOMP
/// did not: after another restart the PUBREL comes again under its packet id, not the
/// message (the client may have completed the exchange, and would take a PUBLISH under
/// that id as a new message: delivered twice).
#[tokio::test]
async fn a_pubrel_owed_for_a_replayed_message_comes_again_after_a_restart() {
    let broker = broker_with_store(0).await;
    let addr = broker.first_addr();
    let mut sub = ledger_subscriber(addr).await;
    sub.send(&wire::frame(0xE0, &[])).await;
    assert!(sub.frame_within(WAIT).await.is_none(), "closed");
    publish_qos2(addr, b"queued").await;
    let broker = broker.restart().await;
    let mut sub = raw_persistent(broker.first_addr(), "ledger").await;
    let (payload, pkid, _) = qos2_publish(&mut sub).await;
    assert_eq!(payload, b"queued");
    sub.send(&wire::ack(wire::first::PUBREC, pkid)).await;
    let rel = sub.frame_within(WAIT).await.expect("PUBREL");
    let pubrel = (wire::first::PUBREL, pkid.to_be_bytes().to_vec());
    assert_eq!((rel.first, rel.body[..2].to_vec()), pubrel);

    let broker = broker.restart().await;
    drop(sub);
    let mut sub = raw_persistent(broker.first_addr(), "ledger").await;
    let f = sub.frame_within(WAIT).await.expect("a packet");
    assert_eq!(
        (f.first, f.body[..2].to_vec()),
        pubrel,
        "the PUBREL owed, not the message again"
    );
    sub.send(&wire::ack(wire::first::PUBCOMP, pkid)).await;
    assert!(sub.frame_within(QUIET).await.is_none(), "nothing else");
}

/// Publishes `m0`, `m1`, ... (`n` of them) at QoS 2 to `ledger/x`.
async fn publish_qos2_ledger(addr: SocketAddr, n: usize) {
    let mut publ = v4::connected(addr, "ledger-writer").await;
    for i in 0..n {
        publ.publish_at(QoS::ExactlyOnce, "ledger/x", false, format!("m{i}"))
            .await;
    }
}

/// rumqttd numbers its forwards 1..=100 and takes an id again once the client's PUBREC
/// came, before the PUBCOMP. Here the client has PUBREC'd 100 QoS 2 messages (ids
/// 1..=100, their PUBRELs owed) and goes away without reading further. The 101st was
/// sent under id 1 again; on the reconnect it came first, with DUP under id 1, while
/// the client still held its exchange 1 open: a client keeps one message per open id,
/// so the newcomer took the place of m0 and m0 was never delivered (paho-mqtt lost 100
/// of 2,000 QoS 2 messages this way in a reconnect loop). Now it waits in the broker
/// for id 1's PUBCOMP, and a stored message under an id whose PUBREL is owed is
/// replayed under an id of its own; each PUBREL releases the message the client holds
/// under it.
#[tokio::test]
async fn a_message_resent_after_a_reconnect_does_not_take_the_id_of_an_exchange_still_open() {
    let broker = broker_with_store(1).await;
    let addr = broker.first_addr();
    let mut sub = ledger_subscriber(addr).await;
    let publishing = tokio::spawn(publish_qos2_ledger(addr, 101));
    // The client's side of each exchange: the message it holds under each open id.
    let mut open: std::collections::HashMap<u16, Vec<u8>> = std::collections::HashMap::new();
    while open.len() < 100 {
        let f = sub.frame_within(WAIT).await.expect("PUBLISH or PUBREL");
        if f.first == wire::first::PUBREL {
            // Not read: the client goes away before it.
            continue;
        }
        assert_eq!(f.first & 0xF6, wire::first::PUBLISH | 4, "a QoS 2 PUBLISH");
        let pkid = wire::publish_pkid(f.first, &f.body).expect("a packet id");
        let (_, payload) = wire::publish_parts(f.first, &f.body).expect("a PUBLISH");
        if payload == b"m100" {
            // Written under a reused id, never read (before the broker held it for
            // that id's PUBCOMP: `a_packet_id_is_not_used_again_before_its_pubcomp`).
            break;
        }
        open.insert(pkid, payload.to_vec());
        sub.send(&wire::ack(wire::first::PUBREC, pkid)).await;
    }
    publishing.await.unwrap();
    tokio::time::sleep(QUIET).await;
    assert_eq!(open.len(), 100);
    drop(sub);

    let mut sub = raw_persistent(addr, "ledger").await;
    let mut delivered = Vec::new();
    while let Some(f) = sub.frame_within(QUIET).await {
        let pkid = u16::from_be_bytes([f.body[0], f.body[1]]);
        if f.first == wire::first::PUBREL {
            delivered.extend(open.remove(&pkid));
            sub.send(&wire::ack(wire::first::PUBCOMP, pkid)).await;
            continue;
        }
        assert_eq!(f.first & 0xF6, wire::first::PUBLISH | 4, "a QoS 2 PUBLISH");
        let pkid = wire::publish_pkid(f.first, &f.body).expect("a packet id");
        let (_, payload) = wire::publish_parts(f.first, &f.body).expect("a PUBLISH");
        if let Some(held) = open.get(&pkid) {
            assert_eq!(
                String::from_utf8_lossy(held),
                String::from_utf8_lossy(payload),
                "a PUBLISH under id {pkid}, whose exchange is still open for another message"
            );
        }
        open.insert(pkid, payload.to_vec());
        sub.send(&wire::ack(wire::first::PUBREC, pkid)).await;
    }
    let mut delivered: Vec<String> = delivered
        .into_iter()
        .map(|p| String::from_utf8(p).unwrap())
        .collect();
    delivered.sort_by_key(|m| m[1..].parse::<u32>().unwrap());
    let expected: Vec<String> = (0..=100).map(|i| format!("m{i}")).collect();
    assert_eq!(delivered, expected, "each delivered once");
    assert!(open.is_empty(), "exchanges left open: {open:?}");
}

/// The same reuse while the client stays connected: with 100 QoS 2 messages at their
/// PUBREL (the client has not sent its PUBCOMPs yet), the 101st does not come under an
/// id whose exchange is still open; it comes once the PUBCOMP for that id frees it
/// (MQTT 5 2.2.1, 3.1.1 2.3.1). Before, it came at once under id 1, between that id's
/// PUBREL and its PUBCOMP: a PUBREL owed after a reconnect then released it instead of
/// the message it was for.
#[tokio::test]
async fn a_packet_id_is_not_used_again_before_its_pubcomp() {
    let broker = broker_with_store(1).await;
    let addr = broker.first_addr();
    let mut sub = ledger_subscriber(addr).await;
    let publishing = tokio::spawn(publish_qos2_ledger(addr, 101));
    let mut at_pubrel = std::collections::BTreeSet::new();
    let mut published = 0;
    while let Some(f) = sub.frame_within(QUIET).await {
        if f.first == wire::first::PUBREL {
            at_pubrel.insert(u16::from_be_bytes([f.body[0], f.body[1]]));
            continue;
        }
        assert_eq!(f.first & 0xF6, wire::first::PUBLISH | 4, "a QoS 2 PUBLISH");
        let pkid = wire::publish_pkid(f.first, &f.body).expect("a packet id");
        assert!(
            !at_pubrel.contains(&pkid),
            "a PUBLISH under id {pkid} before its PUBCOMP (after {published})"
        );
        published += 1;
        sub.send(&wire::ack(wire::first::PUBREC, pkid)).await;
    }
    publishing.await.unwrap();
    assert_eq!(published, 100, "the router's 100 in flight");
    assert_eq!(at_pubrel.len(), 100);
    // Each PUBCOMP frees its id: the last message comes under one of them.
    for pkid in at_pubrel {
        sub.send(&wire::ack(wire::first::PUBCOMP, pkid)).await;
    }
    let (payload, pkid, _) = qos2_publish(&mut sub).await;
    assert_eq!(payload, b"m100");
    assert!((1..=100).contains(&pkid));
}
