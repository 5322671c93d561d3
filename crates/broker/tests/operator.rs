//! Operator defaults against the real broker: publish rate limits pace a fast client
//! without cutting it off, `[[rate_limit.user]]` lifts them for one user, and
//! `disconnect_after` is the only way to get a paced client disconnected; a payload over
//! `max_payload_size` (Mosquitto's `message_size_limit`) is dropped, the client kept.

mod common;

use common::login5;
use moatmq_testkit::{v5, Raw, TestBroker, QUIET, WAIT};
use rumqttc::v5::mqttbytes::v5 as m5;
use rumqttc::v5::mqttbytes::v5::Packet as P5;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::Event;
use std::time::Duration;
use tokio::time::Instant;

/// Publishes QoS 1 messages as fast as the client lets it (it keeps up with its PUBACKs:
/// at most its in-flight window is unacknowledged) until `until` or `count` are acked.
/// Returns the PUBACKs received and whether the connection was still up at the end.
async fn publish_flood(
    c: &mut v5::Client,
    topic: &str,
    until: Instant,
    count: usize,
) -> (usize, bool) {
    let client = c.client.clone();
    let topic = topic.to_string();
    let publisher = tokio::spawn(async move {
        for i in 0..count as u32 {
            if client
                .publish(&topic, QoS::AtLeastOnce, false, i.to_be_bytes().to_vec())
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let mut acked = 0;
    loop {
        match tokio::time::timeout_at(until, c.rx.recv()).await {
            Ok(Some(Event::Incoming(P5::PubAck(_)))) => {
                acked += 1;
                if acked == count {
                    break;
                }
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    publisher.abort();
    let alive = c.ended.borrow().is_none();
    (acked, alive)
}

#[tokio::test]
async fn a_fast_publisher_is_paced_but_not_disconnected_by_default() {
    // Only the rate is lowered (so a debug build can exceed it); `disconnect_after` is
    // left at its default.
    let broker = TestBroker::builder()
        .anonymous()
        .rate_limit("messages_per_second", 100)
        .rate_limit("message_burst", 100)
        .start()
        .await;
    let addr = broker.first_addr();
    let mut sub = v5::connected(addr, "watch").await;
    common::subscribed5(&mut sub, "flood").await;
    let c = v5::connected(addr, "fast").await;
    let started = Instant::now();
    // Longer than the 10 s after which the broker used to disconnect a paced client.
    let until = started + Duration::from_secs(12);
    let client = c.client.clone();
    let publisher = tokio::spawn(async move {
        // QoS 0 has no acknowledgement to wait for: the client is over its rate all along.
        for i in 0u32.. {
            let payload = i.to_be_bytes().to_vec();
            if client
                .publish("flood", QoS::AtMostOnce, false, payload)
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let mut seen = 0;
    while sub.publish_within(until - Instant::now()).await.is_some() {
        seen += 1;
    }
    publisher.abort();
    let elapsed = started.elapsed().as_secs_f64();
    assert!(
        c.ended.borrow().is_none(),
        "disconnected: {:?}",
        c.ended.borrow()
    );
    assert!(
        seen as f64 <= 100.0 + 100.0 * elapsed + 100.0,
        "not paced: {seen} delivered in {elapsed:.1} s"
    );
    assert!(seen >= 500, "barely served: {seen} in {elapsed:.1} s");
}

#[tokio::test]
async fn an_overridden_user_is_unlimited_and_others_are_cut_off_by_disconnect_after() {
    let broker = TestBroker::builder()
        .users(&[("ingest", "pw-ingest"), ("sensor", "pw-sensor")])
        .rate_limit("messages_per_second", 20)
        .rate_limit("message_burst", 20)
        .rate_limit("disconnect_after", 1)
        .toml("[[rate_limit.user]]\nname = \"ingest\"\nmessages_per_second = 0\nbytes_per_second = 0\n")
        .start()
        .await;
    let addr = broker.first_addr();

    let mut ingest = v5::connect(login5(addr, "ingest-1", "ingest", "pw-ingest"))
        .await
        .unwrap();
    let started = Instant::now();
    let (acked, alive) = publish_flood(
        &mut ingest,
        "ingest/in",
        started + Duration::from_secs(10),
        1000,
    )
    .await;
    // Paced at 20/s after a burst of 20, 1000 messages would take 49 s.
    assert_eq!(acked, 1000, "ingest was held back");
    assert!(
        alive,
        "ingest was disconnected: {:?}",
        ingest.ended.borrow()
    );

    let mut sensor = v5::connect(login5(addr, "sensor-1", "sensor", "pw-sensor"))
        .await
        .unwrap();
    let client = sensor.client.clone();
    let flood = tokio::spawn(async move {
        for i in 0u32.. {
            let payload = i.to_be_bytes().to_vec();
            let sent = client.publish("sensor/in", QoS::AtMostOnce, false, payload);
            if sent.await.is_err() {
                break;
            }
        }
    });
    // MQTT 5 DISCONNECT 0x96, unless the flooding client's write failed first.
    let reason = sensor.closed_within(Duration::from_secs(5)).await;
    assert!(reason.is_some(), "sensor was not disconnected");
    flood.abort();
}

#[tokio::test]
async fn a_publish_over_max_payload_size_is_dropped_and_the_client_stays() {
    // What import-mosquitto makes of `message_size_limit 1000`.
    let broker = TestBroker::builder()
        .anonymous()
        .limit("max_payload_size", 1000)
        .start()
        .await;
    let addr = broker.first_addr();
    let mut sub = v5::connected(addr, "watch").await;
    common::subscribed5(&mut sub, "size/#").await;
    let (mut c, _) = Raw::connect5(addr, moatmq_testkit::connect5("sizer"), None, None).await;
    for (pkid, topic, len) in [(1, "size/big", 1001), (2, "size/ok", 1000)] {
        let mut p = m5::Publish::new(topic, QoS::AtLeastOnce, vec![b'x'; len], None);
        p.pkid = pkid;
        c.send5(m5::Packet::Publish(p)).await;
        let expected = if len > 1000 {
            m5::PubAckReason::ImplementationSpecificError
        } else {
            m5::PubAckReason::Success
        };
        match c.next5(WAIT).await {
            Some(m5::Packet::PubAck(ack)) => assert_eq!((ack.pkid, ack.reason), (pkid, expected)),
            other => panic!("expected a PUBACK for {topic}, got {other:?}"),
        }
    }
    let p = sub.next_publish().await;
    assert_eq!(p.topic, "size/ok", "the large message was delivered");
    assert!(!c.closed_within(QUIET).await, "the client was disconnected");
}

#[tokio::test]
async fn a_will_over_max_payload_size_is_not_published() {
    // A will enters the broker like any publish: the same limit, the same step (admit).
    let broker = TestBroker::builder()
        .anonymous()
        .limit("max_payload_size", 1000)
        .start()
        .await;
    let addr = broker.first_addr();
    let mut sub = v5::connected(addr, "watch").await;
    common::subscribed5(&mut sub, "gone/#").await;
    for (id, len) in [("big", 1001), ("ok", 1000)] {
        let will = m5::LastWill::new(
            format!("gone/{id}"),
            vec![b'x'; len],
            QoS::AtLeastOnce,
            false,
            None,
        );
        let (c, code) = Raw::connect5(addr, moatmq_testkit::connect5(id), Some(will), None).await;
        assert_eq!(code, Some(m5::ConnectReturnCode::Success), "{id}");
        // Gone without a DISCONNECT: the will is due.
        drop(c);
    }
    let p = sub.next_publish().await;
    assert_eq!(p.topic, "gone/ok", "the will over the limit went out");
    assert!(
        sub.publish_within(QUIET).await.is_none(),
        "a second will arrived"
    );
}
