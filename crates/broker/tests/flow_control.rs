//! Flow control (MQTT 5 3.3.4): no more QoS 1/2 PUBLISHes in flight to a client than the
//! Receive Maximum it announced; the rest follow as it acknowledges, in order, none lost.

use moatmq_testkit::{connect5, v4, Raw, TestBroker, QUIET, WAIT};
use rumqttc::v5::mqttbytes::v5 as m5;

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
