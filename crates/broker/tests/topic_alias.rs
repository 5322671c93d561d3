//! MQTT 5 client topic aliases (3.3.2.3.4, `limits.max_topic_alias`, Mosquitto's
//! `max_topic_alias`): announced in the CONNACK, set by a PUBLISH with a topic, used by
//! one with an empty topic, resolved before any check; out of range is DISCONNECT 0x94,
//! used before set 0x82.

mod common;
use moatmq_testkit::{v5, Raw, TestBroker, WAIT};
use rumqttc::v5::mqttbytes::v5 as m5;
use rumqttc::v5::mqttbytes::QoS;

fn aliased(topic: &str, alias: u16, payload: &str) -> m5::Packet {
    let props = m5::PublishProperties {
        topic_alias: Some(alias),
        ..Default::default()
    };
    m5::Packet::Publish(m5::Publish::new(
        topic,
        QoS::AtMostOnce,
        payload.to_string(),
        Some(props),
    ))
}

async fn publisher(addr: std::net::SocketAddr, id: &str) -> (Raw, Option<u16>) {
    let (raw, ack) = Raw::connack5(addr, moatmq_testkit::connect5(id)).await;
    (raw, ack.properties.and_then(|p| p.topic_alias_max))
}

async fn closed_with(raw: &mut Raw) -> m5::DisconnectReasonCode {
    match raw.next5(WAIT).await {
        Some(m5::Packet::Disconnect(d)) => d.reason_code,
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
}

#[tokio::test]
async fn an_alias_set_then_used_reaches_subscribers_under_its_topic() {
    let broker = TestBroker::start().await;
    let addr = broker.first_addr();
    let mut sub = v5::connected(addr, "listener").await;
    common::subscribed5(&mut sub, "plant/#").await;
    let (mut publ, announced) = publisher(addr, "aliaser").await;
    assert_eq!(announced, Some(10), "the default maximum is announced");
    publ.send5(aliased("plant/7/temp", 3, "21.5")).await;
    publ.send5(aliased("", 3, "21.6")).await;
    for payload in [&b"21.5"[..], b"21.6"] {
        let p = sub.next_publish().await;
        assert_eq!(
            (&p.topic[..], &p.payload[..]),
            (&b"plant/7/temp"[..], payload)
        );
        assert!(
            p.properties.is_none_or(|p| p.topic_alias.is_none()),
            "the client's alias is not forwarded"
        );
    }
}

#[tokio::test]
async fn an_alias_out_of_range_or_unset_closes_the_connection() {
    let broker = TestBroker::builder()
        .anonymous()
        .limit("max_topic_alias", 2)
        .start()
        .await;
    let addr = broker.first_addr();
    let (mut p, announced) = publisher(addr, "too-far").await;
    assert_eq!(announced, Some(2));
    p.send5(aliased("a/b", 3, "x")).await;
    assert_eq!(
        closed_with(&mut p).await,
        m5::DisconnectReasonCode::TopicAliasInvalid
    );
    let (mut p, _) = publisher(addr, "zero").await;
    p.send5(aliased("a/b", 0, "x")).await;
    assert_eq!(
        closed_with(&mut p).await,
        m5::DisconnectReasonCode::TopicAliasInvalid
    );
    let (mut p, _) = publisher(addr, "unset").await;
    p.send5(aliased("", 1, "x")).await;
    assert_eq!(
        closed_with(&mut p).await,
        m5::DisconnectReasonCode::ProtocolError
    );
}

#[tokio::test]
async fn an_alias_cannot_get_around_the_acl() {
    let broker = TestBroker::builder()
        .users(&[("alice", "alice-pw"), ("bob", "bob-pw")])
        .start()
        .await;
    let addr = broker.first_addr();
    let mut bob = Raw::v5_login(addr, "bob-sub", "bob", "bob-pw").await;
    bob.subscribe5(1, &["bob/#"]).await;
    let mut alice = Raw::v5_login(addr, "alice-pub", "alice", "alice-pw").await;
    // Setting an alias to a topic alice may not write is refused like the topic itself;
    // using the alias publishes to that same topic, refused again.
    alice.send5(aliased("bob/inbox", 1, "forged")).await;
    alice.send5(aliased("", 1, "forged again")).await;
    // bob's own message on the same topic still arrives: the subscription works, and it
    // is the only one.
    bob.send5(aliased("bob/inbox", 1, "own")).await;
    let got = bob.publish5_within(WAIT).await.expect("bob's own message");
    assert_eq!(&got.payload[..], b"own");
    assert!(bob
        .publish5_within(std::time::Duration::from_millis(400))
        .await
        .is_none());
}

#[tokio::test]
async fn a_client_that_allows_aliases_gets_them_for_up_to_its_maximum_topics() {
    let broker = TestBroker::start().await;
    let addr = broker.first_addr();
    let mut connect = moatmq_testkit::connect5("aliased-sub");
    connect.properties = Some(m5::ConnectProperties {
        topic_alias_max: Some(2),
        ..m5::ConnectProperties::new()
    });
    let (mut sub, _) = Raw::connack5(addr, connect).await;
    assert_eq!(sub.subscribe5(1, &["al/#"]).await.len(), 1);
    let plain = v5::connected(addr, "plain-sub").await;
    let mut plain = plain;
    common::subscribed5(&mut plain, "al/#").await;

    let (mut publ, _) = publisher(addr, "publisher").await;
    let topics = ["al/1", "al/1", "al/2", "al/3", "al/2", "al/1"];
    for t in topics {
        publ.send5(m5::Packet::Publish(m5::Publish::new(
            t,
            QoS::AtMostOnce,
            t,
            None,
        )))
        .await;
    }
    let mut got = Vec::new();
    for _ in topics {
        let p = sub.publish5_within(WAIT).await.expect("PUBLISH");
        let alias = p.properties.as_ref().and_then(|p| p.topic_alias);
        got.push((
            String::from_utf8(p.topic.to_vec()).unwrap(),
            alias,
            p.payload,
        ));
    }
    let expected = [
        ("al/1", Some(1)),
        ("", Some(1)),
        ("al/2", Some(2)),
        ("al/3", None),
        ("", Some(2)),
        ("", Some(1)),
    ];
    for ((topic, alias, payload), (want_topic, want_alias), sent) in got
        .iter()
        .zip(expected)
        .zip(topics)
        .map(|((g, e), t)| (g, e, t))
    {
        assert_eq!((topic.as_str(), *alias), (want_topic, want_alias));
        assert_eq!(&payload[..], sent.as_bytes());
    }
    // A client that did not allow them gets every topic in full.
    for t in topics {
        let p = plain.next_publish().await;
        assert_eq!(&p.topic[..], t.as_bytes());
        assert!(p.properties.and_then(|p| p.topic_alias).is_none());
    }
}
