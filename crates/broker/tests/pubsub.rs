//! Publish/subscribe through the real broker over TCP with rumqttc, MQTT 3.1.1 and 5.

use moatmq_testkit::{v4, v5, TestBroker, QUIET};
use rumqttc::QoS;

#[tokio::test]
async fn v4_publish_subscribe_at_every_qos() {
    let broker = TestBroker::start().await;
    let addr = broker.first_addr();
    let mut sub = v4::connected(addr, "sub").await;
    sub.client.subscribe("a/+", QoS::ExactlyOnce).await.unwrap();
    sub.incoming(|p| matches!(p, rumqttc::Packet::SubAck(_)).then_some(()))
        .await
        .expect("suback");
    let publ = v4::connected(addr, "pub").await;
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        publ.client
            .publish("a/b", qos, false, format!("{qos:?}"))
            .await
            .unwrap();
        let got = sub.next_publish().await;
        assert_eq!(&got.topic, "a/b");
        assert_eq!(got.payload, format!("{qos:?}").as_bytes());
        // QoS 0 stays QoS 0; a QoS 1 message to a QoS 2 subscription arrives as QoS 2
        // (rumqttd forwards at the subscription's QoS; docs/compliance.md).
        match qos {
            QoS::AtMostOnce => assert_eq!(got.qos, QoS::AtMostOnce),
            _ => assert!(got.qos as u8 >= qos as u8, "{:?} < {qos:?}", got.qos),
        }
        assert!(!got.dup, "DUP is not forwarded (MQTT-3.3.1-3)");
    }
    // Many QoS 0 messages to a QoS 2 subscriber: all arrive, and the router's QoS 2
    // copies are acknowledged by the gateway in order (else the router drops the link).
    for i in 0..300u32 {
        publ.client
            .publish("a/many", QoS::AtMostOnce, false, i.to_be_bytes().to_vec())
            .await
            .unwrap();
    }
    for i in 0..300u32 {
        let got = sub.next_publish().await;
        assert_eq!(got.payload, i.to_be_bytes().to_vec());
        assert_eq!(got.qos, QoS::AtMostOnce);
    }
}

#[tokio::test]
async fn v5_publish_subscribe_with_properties() {
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    use rumqttc::v5::mqttbytes::QoS as Q5;
    let broker = TestBroker::start().await;
    let addr = broker.first_addr();
    let mut sub = v5::connected(addr, "sub5").await;
    sub.client.subscribe("x/#", Q5::AtLeastOnce).await.unwrap();
    sub.incoming(|p| matches!(p, rumqttc::v5::mqttbytes::v5::Packet::SubAck(_)).then_some(()))
        .await
        .expect("suback");
    let publ = v5::connected(addr, "pub5").await;
    let props = PublishProperties {
        content_type: Some("text/plain".into()),
        user_properties: vec![("k".into(), "v".into())],
        ..Default::default()
    };
    publ.client
        .publish_with_properties("x/y/z", Q5::AtLeastOnce, false, "hello", props)
        .await
        .unwrap();
    let got = sub.next_publish().await;
    assert_eq!(&got.topic[..], b"x/y/z");
    assert_eq!(&got.payload[..], b"hello");
    let p = got.properties.expect("properties forwarded");
    assert_eq!(p.content_type.as_deref(), Some("text/plain"));
    assert_eq!(p.user_properties, vec![("k".to_string(), "v".to_string())]);
}

#[tokio::test]
async fn v5_properties_are_stripped_for_v4_subscribers() {
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    use rumqttc::v5::mqttbytes::QoS as Q5;
    let broker = TestBroker::start().await;
    let addr = broker.first_addr();
    let mut sub = v4::connected(addr, "old").await;
    sub.client.subscribe("m", QoS::AtLeastOnce).await.unwrap();
    sub.incoming(|p| matches!(p, rumqttc::Packet::SubAck(_)).then_some(()))
        .await
        .expect("suback");
    let publ = v5::connected(addr, "new").await;
    let props = PublishProperties {
        content_type: Some("t".into()),
        ..Default::default()
    };
    publ.client
        .publish_with_properties("m", Q5::AtLeastOnce, false, "p", props)
        .await
        .unwrap();
    assert_eq!(sub.next_publish().await.payload, "p".as_bytes());
}

#[tokio::test]
async fn retained_message_reaches_late_subscriber() {
    let broker = TestBroker::start().await;
    let addr = broker.first_addr();
    let mut publ = v4::connected(addr, "p").await;
    publ.publish_acked("state/door", true, "locked").await;
    let mut late = v4::connected(addr, "late").await;
    late.client
        .subscribe("state/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    let got = late.next_publish().await;
    assert_eq!(got.payload, "locked".as_bytes());
    assert!(
        got.retain,
        "retained flag set on delivery to a new subscriber"
    );
}

#[tokio::test]
async fn dollar_topics_are_not_matched_by_leading_wildcards() {
    let broker = TestBroker::start().await;
    let addr = broker.first_addr();
    let mut sub = v4::connected(addr, "s").await;
    sub.client.subscribe("#", QoS::AtMostOnce).await.unwrap();
    sub.incoming(|p| matches!(p, rumqttc::Packet::SubAck(_)).then_some(()))
        .await
        .expect("suback");
    let publ = v4::connected(addr, "p").await;
    publ.client
        .publish("$internal/x", QoS::AtMostOnce, false, "no")
        .await
        .unwrap();
    publ.client
        .publish("plain", QoS::AtMostOnce, false, "yes")
        .await
        .unwrap();
    assert_eq!(sub.next_publish().await.payload, "yes".as_bytes());
    assert!(sub.publish_within(QUIET).await.is_none());
}

#[tokio::test]
async fn v5_retain_handling_2_sends_no_retained_messages() {
    use rumqttc::v5::mqttbytes::v5::{Filter, RetainForwardRule};
    use rumqttc::v5::mqttbytes::QoS as Q5;
    let broker = TestBroker::start().await;
    let addr = broker.first_addr();
    let mut publ = v4::connected(addr, "p").await;
    publ.publish_acked("rh/state", true, "old").await;

    let filter = |rule| Filter {
        path: "rh/#".into(),
        qos: Q5::AtLeastOnce,
        nolocal: false,
        preserve_retain: false,
        retain_forward_rule: rule,
    };
    let mut none = v5::connected(addr, "rh2").await;
    none.client
        .subscribe_many(vec![filter(RetainForwardRule::Never)])
        .await
        .unwrap();
    let mut all = v5::connected(addr, "rh0").await;
    all.client
        .subscribe_many(vec![filter(RetainForwardRule::OnEverySubscribe)])
        .await
        .unwrap();
    assert_eq!(&all.next_publish().await.payload[..], b"old");
    assert!(
        none.publish_within(QUIET).await.is_none(),
        "retained message sent despite retain handling 2"
    );
    // Live messages still arrive.
    publ.client
        .publish("rh/state", QoS::AtLeastOnce, false, "new")
        .await
        .unwrap();
    assert_eq!(&none.next_publish().await.payload[..], b"new");
}

/// rumqttd alone sends at most its free in-flight slots (or 200) of the retained
/// messages matching a new subscription; moatmq serves them itself, all of them.
#[tokio::test]
async fn every_retained_message_reaches_a_wildcard_subscriber() {
    let broker = TestBroker::start().await;
    let addr = broker.first_addr();
    let publ = v4::connected(addr, "many").await;
    const N: usize = 500;
    for i in 0..N {
        publ.client
            .publish(
                format!("fleet/{i:04}/state"),
                QoS::ExactlyOnce,
                true,
                format!("s{i}"),
            )
            .await
            .unwrap();
    }
    // Wait until the last one is in (the publisher's acks come in order).
    let mut probe = v4::connected(addr, "probe").await;
    probe
        .client
        .subscribe(format!("fleet/{:04}/state", N - 1), QoS::AtMostOnce)
        .await
        .unwrap();
    assert_eq!(
        probe.next_publish().await.payload,
        format!("s{}", N - 1).as_bytes()
    );

    for (id, qos) in [("all-q1", QoS::AtLeastOnce), ("all-q2", QoS::ExactlyOnce)] {
        let mut sub = v4::connected(addr, id).await;
        sub.client.subscribe("fleet/#", qos).await.unwrap();
        let mut seen = std::collections::BTreeSet::new();
        while seen.len() < N {
            let p = sub.next_publish().await;
            assert!(p.retain, "retained flag set");
            // min(message QoS 2, subscription QoS); QoS 2 deliveries only keep coming
            // if their PUBREC/PUBREL/PUBCOMP exchanges complete.
            assert_eq!(
                p.qos,
                qos,
                "{id}: {} pkid {} after {}",
                p.topic,
                p.pkid,
                seen.len()
            );
            seen.insert(p.topic.clone());
        }
        assert!(sub.publish_within(QUIET).await.is_none(), "no duplicates");
    }
    // An MQTT 5 client too.
    let mut sub5 = v5::connected(addr, "all-v5").await;
    sub5.client
        .subscribe("fleet/+/state", rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .unwrap();
    let mut count = 0;
    while count < N {
        let p = sub5.next_publish().await;
        assert!(p.retain);
        count += 1;
    }
}

#[tokio::test]
async fn an_empty_live_publish_does_not_delete_the_retained_message() {
    let broker = TestBroker::start().await;
    let addr = broker.first_addr();
    let mut publ = v4::connected(addr, "p").await;
    publ.client
        .publish("door", QoS::AtLeastOnce, true, "locked")
        .await
        .unwrap();
    // Empty payload without the retain flag: a normal message, the retained one stays.
    publ.publish_acked("door", false, "").await;
    let mut late = v4::connected(addr, "late").await;
    late.client
        .subscribe("door", QoS::AtMostOnce)
        .await
        .unwrap();
    let got = late.next_publish().await;
    assert_eq!(got.payload, "locked".as_bytes());
    assert_eq!(
        got.qos,
        QoS::AtMostOnce,
        "min(message QoS 1, subscription QoS 0)"
    );
    // Empty payload with the retain flag clears it.
    publ.publish_acked("door", true, "").await;
    let mut later = v4::connected(addr, "later").await;
    later
        .client
        .subscribe("door", QoS::AtMostOnce)
        .await
        .unwrap();
    assert!(later.publish_within(QUIET).await.is_none());
}

#[tokio::test]
async fn large_retained_messages_arrive_whole() {
    let broker = TestBroker::start().await;
    let addr = broker.first_addr();
    let big = |id: &str| {
        let mut o = v4::options(addr, id);
        o.set_max_packet_size(1 << 20, 1 << 20);
        o
    };
    let publ = v4::connect(big("big")).await.unwrap();
    let body = vec![7u8; 200 * 1024];
    for i in 0..40 {
        publ.client
            .publish(format!("big/{i:02}"), QoS::AtLeastOnce, true, body.clone())
            .await
            .unwrap();
    }
    let mut probe = v4::connect(big("probe")).await.unwrap();
    probe
        .client
        .subscribe("big/39", QoS::AtMostOnce)
        .await
        .unwrap();
    probe.next_publish().await;

    let mut sub = v4::connect(big("reader")).await.unwrap();
    sub.client
        .subscribe("big/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    for _ in 0..40 {
        let p = sub.next_publish().await;
        assert_eq!(p.payload.len(), body.len());
        assert!(p.retain);
    }
    assert!(sub.publish_within(QUIET).await.is_none());
}
