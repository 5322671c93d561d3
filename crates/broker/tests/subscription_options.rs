//! MQTT 5 delivery rules rumqttd's router leaves to moatmq, against the real broker
//! with raw MQTT 5 clients (every flag and property as it is on the wire):
//! QoS = min(published, granted) (3.8.4), No Local and Retain As Published (3.8.3.1),
//! subscription identifiers (3.8.2.1.2, 3.3.2.3.8).

use moatmq_testkit::{Raw, TestBroker, QUIET, WAIT};
use rumqttc::v5::mqttbytes::v5 as m5;
use rumqttc::v5::mqttbytes::QoS;
use std::net::SocketAddr;

async fn client(addr: SocketAddr, id: &str) -> (Raw, m5::ConnAck) {
    Raw::connack5(addr, moatmq_testkit::connect5(id)).await
}

/// What a SUBSCRIBE asks for besides its filter.
#[derive(Clone, Copy)]
struct Opts {
    qos: QoS,
    no_local: bool,
    retain_as_published: bool,
    id: Option<usize>,
}

const PLAIN: Opts = Opts {
    qos: QoS::AtLeastOnce,
    no_local: false,
    retain_as_published: false,
    id: None,
};

async fn subscribe(raw: &mut Raw, pkid: u16, filter: &str, o: Opts) {
    let filter = m5::Filter {
        path: filter.into(),
        qos: o.qos,
        nolocal: o.no_local,
        preserve_retain: o.retain_as_published,
        retain_forward_rule: m5::RetainForwardRule::OnEverySubscribe,
    };
    let properties = o.id.map(|id| m5::SubscribeProperties {
        id: Some(id),
        user_properties: Vec::new(),
    });
    raw.send5(m5::Packet::Subscribe(m5::Subscribe {
        pkid,
        filters: vec![filter],
        properties,
    }))
    .await;
    match raw.next5(WAIT).await {
        Some(m5::Packet::SubAck(ack)) => {
            assert_eq!(ack.pkid, pkid);
            assert!(
                matches!(ack.return_codes[..], [m5::SubscribeReasonCode::Success(_)]),
                "{ack:?}"
            );
        }
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

/// Publishes and completes the publisher's side of the exchange.
async fn publish(raw: &mut Raw, pkid: u16, topic: &str, qos: QoS, retain: bool) {
    let mut p = m5::Publish::new(topic, qos, format!("{topic} at {qos:?}"), None);
    p.pkid = if qos == QoS::AtMostOnce { 0 } else { pkid };
    p.retain = retain;
    raw.send5(m5::Packet::Publish(p)).await;
    match qos {
        QoS::AtMostOnce => {}
        QoS::AtLeastOnce => {
            assert!(matches!(raw.next5(WAIT).await, Some(m5::Packet::PubAck(_))))
        }
        QoS::ExactlyOnce => {
            assert!(matches!(raw.next5(WAIT).await, Some(m5::Packet::PubRec(_))));
            raw.send5(m5::Packet::PubRel(m5::PubRel::new(pkid, None)))
                .await;
            assert!(matches!(
                raw.next5(WAIT).await,
                Some(m5::Packet::PubComp(_))
            ));
        }
    }
}

/// The next PUBLISH within `wait`, acknowledged as its QoS asks (QoS 2 completed).
async fn receive(raw: &mut Raw, wait: std::time::Duration) -> Option<m5::Publish> {
    let p = match raw.next5(wait).await? {
        m5::Packet::Publish(p) => p,
        other => panic!("expected PUBLISH, got {other:?}"),
    };
    match p.qos {
        QoS::AtMostOnce => {}
        QoS::AtLeastOnce => {
            raw.send5(m5::Packet::PubAck(m5::PubAck::new(p.pkid, None)))
                .await
        }
        QoS::ExactlyOnce => {
            raw.send5(m5::Packet::PubRec(m5::PubRec::new(p.pkid, None)))
                .await;
            match raw.next5(WAIT).await {
                Some(m5::Packet::PubRel(rel)) => assert_eq!(rel.pkid, p.pkid),
                other => panic!("expected PUBREL, got {other:?}"),
            }
            raw.send5(m5::Packet::PubComp(m5::PubComp::new(p.pkid, None)))
                .await;
        }
    }
    Some(p)
}

async fn received(raw: &mut Raw) -> m5::Publish {
    receive(raw, WAIT).await.expect("a PUBLISH")
}

fn ids(p: &m5::Publish) -> Vec<usize> {
    p.properties
        .as_ref()
        .map(|p| p.subscription_identifiers.clone())
        .unwrap_or_default()
}

#[tokio::test]
async fn each_delivery_is_at_the_lower_of_the_published_and_the_granted_qos() {
    let broker = TestBroker::start().await;
    let addr = broker.first_addr();
    let (mut two, _) = client(addr, "granted-2").await;
    subscribe(
        &mut two,
        1,
        "q/#",
        Opts {
            qos: QoS::ExactlyOnce,
            ..PLAIN
        },
    )
    .await;
    let (mut one, _) = client(addr, "granted-1").await;
    subscribe(&mut one, 1, "q/#", PLAIN).await;
    let (mut publ, _) = client(addr, "publisher").await;
    // Twice round, so the router accepted the QoS 1 acknowledgement of a forward it
    // sent at QoS 2 and goes on delivering.
    for round in 0..2u16 {
        for (i, (published, at_two, at_one)) in [
            (QoS::AtMostOnce, QoS::AtMostOnce, QoS::AtMostOnce),
            (QoS::AtLeastOnce, QoS::AtLeastOnce, QoS::AtLeastOnce),
            (QoS::ExactlyOnce, QoS::ExactlyOnce, QoS::AtLeastOnce),
        ]
        .into_iter()
        .enumerate()
        {
            let pkid = 1 + round * 3 + i as u16;
            publish(&mut publ, pkid, &format!("q/{i}"), published, false).await;
            let p = received(&mut two).await;
            assert_eq!((&p.topic[..], p.qos), (format!("q/{i}").as_bytes(), at_two));
            assert!(!p.dup && !p.retain);
            let p = received(&mut one).await;
            assert_eq!((&p.topic[..], p.qos), (format!("q/{i}").as_bytes(), at_one));
        }
    }
    assert!(receive(&mut two, QUIET).await.is_none(), "one copy each");
}

#[tokio::test]
async fn no_local_keeps_a_clients_own_publishes_from_it_and_only_those() {
    let broker = TestBroker::start().await;
    let addr = broker.first_addr();
    let no_local = Opts {
        no_local: true,
        ..PLAIN
    };
    let (mut a, _) = client(addr, "a").await;
    subscribe(&mut a, 1, "chat/#", no_local).await;
    let (mut b, _) = client(addr, "b").await;
    subscribe(&mut b, 1, "chat/#", no_local).await;
    let (mut plain, _) = client(addr, "plain").await;
    subscribe(&mut plain, 1, "chat/+", PLAIN).await;

    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
        publish(&mut a, 7, "chat/a", qos, false).await;
        assert_eq!(&received(&mut b).await.topic[..], b"chat/a");
        assert_eq!(&received(&mut plain).await.topic[..], b"chat/a");
        assert!(
            receive(&mut a, QUIET).await.is_none(),
            "its own, at {qos:?}"
        );
    }
    publish(&mut b, 8, "chat/b", QoS::AtLeastOnce, false).await;
    assert_eq!(&received(&mut a).await.topic[..], b"chat/b", "another's");

    // A client may not pass as another: a user property naming a connection is its own.
    let mut p = m5::Publish::new("chat/forged", QoS::AtMostOnce, "x", None);
    p.properties = Some(m5::PublishProperties {
        user_properties: (1..64)
            .map(|c| ("$moatmq-origin".to_string(), c.to_string()))
            .collect(),
        ..Default::default()
    });
    plain.send5(m5::Packet::Publish(p)).await;
    for c in [&mut a, &mut b] {
        let got = received(c).await;
        assert_eq!(&got.topic[..], b"chat/forged");
        let props = got.properties.unwrap_or_default();
        assert!(props.user_properties.is_empty(), "{props:?}");
    }
}

#[tokio::test]
async fn retain_as_published_keeps_the_flag_on_live_forwards_for_those_who_ask() {
    let broker = TestBroker::start().await;
    let addr = broker.first_addr();
    let (mut rap, _) = client(addr, "rap").await;
    let keep = Opts {
        retain_as_published: true,
        ..PLAIN
    };
    subscribe(&mut rap, 1, "state/#", keep).await;
    let (mut plain, _) = client(addr, "plain").await;
    subscribe(&mut plain, 1, "state/#", PLAIN).await;
    let (mut publ, _) = client(addr, "publisher").await;
    // With a payload format indicator of the client's own, which must come through.
    let mut p = m5::Publish::new("state/lamp", QoS::AtLeastOnce, "on", None);
    p.pkid = 1;
    p.retain = true;
    p.properties = Some(m5::PublishProperties {
        payload_format_indicator: Some(1),
        ..Default::default()
    });
    publ.send5(m5::Packet::Publish(p)).await;
    assert!(matches!(
        publ.next5(WAIT).await,
        Some(m5::Packet::PubAck(_))
    ));
    publish(&mut publ, 2, "state/door", QoS::AtLeastOnce, false).await;

    let lamp = received(&mut rap).await;
    assert!(lamp.retain, "published retained, Retain As Published");
    let pfi = lamp.properties.and_then(|p| p.payload_format_indicator);
    assert_eq!(pfi, Some(1));
    assert!(!received(&mut rap).await.retain, "published without retain");
    let lamp = received(&mut plain).await;
    assert!(
        !lamp.retain,
        "live forwards clear it otherwise (MQTT-3.3.1-12)"
    );
    let pfi = lamp.properties.and_then(|p| p.payload_format_indicator);
    assert_eq!(pfi, Some(1));
    assert!(!received(&mut plain).await.retain);
}

#[tokio::test]
async fn subscription_identifiers_come_with_every_matching_delivery() {
    let broker = TestBroker::start().await;
    let addr = broker.first_addr();
    let (mut publ, _) = client(addr, "publisher").await;
    publish(&mut publ, 1, "dev/1/temp", QoS::AtLeastOnce, true).await;

    let (mut sub, ack) = client(addr, "identified").await;
    let available = ack
        .properties
        .and_then(|p| p.subscription_identifiers_available);
    assert_ne!(available, Some(0), "announced as available");
    let with = |id| Opts {
        id: Some(id),
        ..PLAIN
    };
    subscribe(&mut sub, 1, "dev/#", with(5)).await;
    let retained = received(&mut sub).await;
    assert!(retained.retain);
    assert_eq!(ids(&retained), [5], "retained ones too");
    subscribe(&mut sub, 2, "dev/+/temp", with(268_435_455)).await;
    let retained = received(&mut sub).await;
    assert_eq!(ids(&retained), [268_435_455]);

    publish(&mut publ, 2, "dev/2/temp", QoS::AtLeastOnce, false).await;
    // One copy per matching subscription (MQTT-3.3.4-5), each with its identifier.
    let mut got = vec![
        ids(&received(&mut sub).await),
        ids(&received(&mut sub).await),
    ];
    got.sort();
    assert_eq!(got, [vec![5], vec![268_435_455]]);
    publish(&mut publ, 3, "dev/2/hum", QoS::AtLeastOnce, false).await;
    assert_eq!(ids(&received(&mut sub).await), [5]);

    // Subscribed again without one: its deliveries have none.
    subscribe(&mut sub, 3, "dev/#", PLAIN).await;
    let _retained = received(&mut sub).await;
    publish(&mut publ, 4, "dev/3/hum", QoS::AtLeastOnce, false).await;
    let p = received(&mut sub).await;
    assert_eq!(&p.topic[..], b"dev/3/hum");
    assert!(ids(&p).is_empty(), "{:?}", p.properties);

    // Identifier 0 is a protocol error (3.8.2.1.2).
    let (mut bad, _) = client(addr, "zero").await;
    bad.send5(m5::Packet::Subscribe(m5::Subscribe {
        pkid: 1,
        filters: vec![m5::Filter::new("dev/#", QoS::AtLeastOnce)],
        properties: Some(m5::SubscribeProperties {
            id: Some(0),
            user_properties: Vec::new(),
        }),
    }))
    .await;
    match bad.next5(WAIT).await {
        Some(m5::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, m5::DisconnectReasonCode::ProtocolError)
        }
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
}

#[tokio::test]
async fn request_and_response_pass_response_topic_and_correlation_data_unchanged() {
    // Paho's test_request_response: requester and responder on one topic, both No Local.
    let broker = TestBroker::start().await;
    let addr = broker.first_addr();
    let no_local = Opts {
        qos: QoS::ExactlyOnce,
        no_local: true,
        ..PLAIN
    };
    let (mut requester, _) = client(addr, "requester").await;
    subscribe(&mut requester, 1, "TopicA", no_local).await;
    let (mut responder, _) = client(addr, "responder").await;
    subscribe(&mut responder, 1, "TopicA", no_local).await;

    let with = |payload: &str, response_topic: Option<&str>| {
        let mut p = m5::Publish::new("TopicA", QoS::AtLeastOnce, payload.to_string(), None);
        p.pkid = 1;
        p.properties = Some(m5::PublishProperties {
            response_topic: response_topic.map(str::to_string),
            correlation_data: Some(bytes::Bytes::from_static(b"334")),
            ..Default::default()
        });
        m5::Packet::Publish(p)
    };
    requester.send5(with("request", Some("TopicA"))).await;
    assert!(matches!(
        requester.next5(WAIT).await,
        Some(m5::Packet::PubAck(_))
    ));
    let request = received(&mut responder).await;
    let props = request.properties.expect("properties");
    assert_eq!(props.response_topic.as_deref(), Some("TopicA"));
    assert_eq!(props.correlation_data.as_deref(), Some(&b"334"[..]));

    responder.send5(with("response", None)).await;
    assert!(matches!(
        responder.next5(WAIT).await,
        Some(m5::Packet::PubAck(_))
    ));
    // The requester's first PUBLISH is the response: its own request never came back.
    let response = received(&mut requester).await;
    assert_eq!(&response.payload[..], b"response");
    let props = response.properties.expect("properties");
    assert_eq!(props.correlation_data.as_deref(), Some(&b"334"[..]));
    assert!(
        receive(&mut responder, QUIET).await.is_none(),
        "its own response"
    );
}

#[tokio::test]
async fn a_resumed_session_keeps_its_subscription_identifiers() {
    // rumqttd forgets them when a persistent session's client goes; moatmq gives them
    // again on resume, without a second copy of anything or a stray SUBACK.
    let broker = TestBroker::start().await;
    let addr = broker.first_addr();
    let resume = |clean: bool| async move {
        let mut connect = moatmq_testkit::connect5("resumer");
        connect.clean_start = clean;
        connect.properties = Some(m5::ConnectProperties {
            session_expiry_interval: Some(60),
            ..m5::ConnectProperties::new()
        });
        let (raw, ack) = Raw::connack5(addr, connect).await;
        assert_eq!(ack.session_present, !clean);
        raw
    };
    let mut c = resume(true).await;
    subscribe(
        &mut c,
        1,
        "res/#",
        Opts {
            id: Some(9),
            ..PLAIN
        },
    )
    .await;
    c.send(&[0xE0, 0x00]).await;
    assert!(c.closed_within(WAIT).await);
    let mut c = resume(false).await;
    subscribe(&mut c, 2, "other/#", PLAIN).await;
    let (mut publ, _) = client(addr, "publisher").await;
    publish(&mut publ, 1, "res/1", QoS::AtLeastOnce, false).await;
    let p = received(&mut c).await;
    assert_eq!(ids(&p), [9]);
    assert!(receive(&mut c, QUIET).await.is_none(), "one copy");
}

#[tokio::test]
async fn no_local_on_a_shared_subscription_is_a_protocol_error() {
    let broker = TestBroker::start().await;
    let (mut c, _) = client(broker.first_addr(), "sharer").await;
    let mut filter = m5::Filter::new("$share/g/t", QoS::AtLeastOnce);
    filter.nolocal = true;
    c.send5(m5::Packet::Subscribe(m5::Subscribe {
        pkid: 1,
        filters: vec![filter],
        properties: None,
    }))
    .await;
    match c.next5(WAIT).await {
        Some(m5::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, m5::DisconnectReasonCode::ProtocolError)
        }
        other => panic!("expected DISCONNECT 0x82, got {other:?}"),
    }
}
