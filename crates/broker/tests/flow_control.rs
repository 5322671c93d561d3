//! Flow control (MQTT 5 3.3.4): no more QoS 1/2 PUBLISHes in flight to a client than the
//! Receive Maximum it announced; the rest follow as it acknowledges, in order, none lost.

use moatmq_testkit::{connect5, v4, Raw, TestBroker, QUIET, WAIT};
use rumqttc::v5::mqttbytes::v5 as m5;
use std::time::Duration;

#[tokio::test]
async fn a_client_gets_no_more_in_flight_than_its_receive_maximum() {
    let broker = TestBroker::start().await;
    let addr = broker.first_addr();
    let mut connect = connect5("small-window");
    connect.properties = Some(m5::ConnectProperties {
        receive_maximum: Some(2),
        ..m5::ConnectProperties::new()
    });
    let (mut sub, code) = Raw::connect5(addr, connect, None, None).await;
    assert_eq!(code, Some(m5::ConnectReturnCode::Success));
    sub.subscribe5(1, &["fc/#"]).await;
    let mut publ = v4::connected(addr, "burst").await;
    for i in 0..6 {
        publ.publish_acked(format!("fc/{i}"), false, format!("m{i}"))
            .await;
    }
    let mut got = Vec::new();
    let mut unacked = Vec::new();
    while got.len() < 6 {
        // Read whatever comes; at most two may be unacknowledged.
        match sub
            .next5(if unacked.len() < 2 { WAIT } else { QUIET })
            .await
        {
            Some(m5::Packet::Publish(p)) => {
                got.push(String::from_utf8_lossy(&p.payload).into_owned());
                unacked.push(p.pkid);
                assert!(unacked.len() <= 2, "{} in flight, window 2", unacked.len());
            }
            Some(other) => panic!("unexpected {other:?}"),
            None => {
                assert_eq!(unacked.len(), 2, "stalled with room in the window");
                let pkid = unacked.remove(0);
                sub.send5(m5::Packet::PubAck(m5::PubAck::new(pkid, None)))
                    .await;
            }
        }
    }
    assert_eq!(got, ["m0", "m1", "m2", "m3", "m4", "m5"]);
}

/// MQTT 5 3.3.4, 4.13: a client that sent more QoS 2 PUBLISHes than the broker's Receive
/// Maximum, and is still answering the PUBRECs ahead of the DISCONNECT 0x93 when the
/// broker has closed its side, can write its PUBRELs and reads the DISCONNECT: the
/// broker reads on for a while instead of answering them with a reset (the Paho
/// interoperability suite's test_flow_control2 does this).
#[tokio::test]
async fn a_client_still_acknowledging_reads_the_disconnect() {
    let broker = TestBroker::builder()
        .anonymous()
        .limit("max_inflight", 2)
        .start()
        .await;
    let (mut raw, code) =
        Raw::connect5(broker.first_addr(), connect5("still-acking"), None, None).await;
    assert_eq!(code, Some(m5::ConnectReturnCode::Success));
    let publish = |pkid| {
        let mut p = m5::Publish::new(
            "fc/late",
            rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
            "x",
            None,
        );
        p.pkid = pkid;
        m5::Packet::Publish(p)
    };
    // Two within the window, their PUBRECs left unread; then one too many.
    raw.send5(publish(1)).await;
    raw.send5(publish(2)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    raw.send5(publish(3)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut pubrecs = 0;
    loop {
        match raw.next5(WAIT).await {
            Some(m5::Packet::PubRec(rec)) => {
                pubrecs += 1;
                let mut rel = bytes::BytesMut::new();
                m5::Packet::PubRel(m5::PubRel::new(rec.pkid, None))
                    .write(&mut rel)
                    .unwrap();
                raw.write(&rel)
                    .await
                    .expect("a PUBREL written after the broker closed its side");
                // A slow client: whatever the broker answers to it has arrived.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Some(m5::Packet::Disconnect(d)) => {
                assert_eq!(
                    d.reason_code,
                    m5::DisconnectReasonCode::ReceiveMaximumExceeded
                );
                break;
            }
            other => panic!("expected PUBREC or DISCONNECT, got {other:?}"),
        }
    }
    assert_eq!(pubrecs, 2);
}
