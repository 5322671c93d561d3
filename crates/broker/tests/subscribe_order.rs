//! When a subscription is in effect, seen by rumqttc clients on fresh connections (clean
//! sessions, which open their router link only when they first need it: lazy links):
//! - once a client has its SUBACK, what another client publishes next reaches it;
//! - a SUBSCRIBE the broker reads before another client's PUBLISH is in effect for that
//!   PUBLISH, as the Eclipse Paho suite assumes (`test_subscribe_options`,
//!   `test_request_response`: a client subscribes and, without waiting for its SUBACK,
//!   another publishes). MQTT orders nothing across connections (4.6), but a broker that
//!   lets the later packet overtake loses the message for that subscriber.

mod common;

use common::subscribed5;
use moatmq_testkit::{v5, TestBroker};
use rumqttc::v5::mqttbytes::QoS;

/// Rounds per test: each with new connections, so each subscriber opens its link anew.
const ROUNDS: usize = 20;

async fn broker() -> TestBroker {
    TestBroker::builder()
        .anonymous()
        .no_connection_rate()
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_subscribed_a_client_gets_what_another_publishes_next() {
    let broker = broker().await;
    let addr = broker.first_addr();
    for round in 0..ROUNDS {
        let topic = format!("order/acked/{round}");
        let mut sub = v5::connected(addr, &format!("sub{round}")).await;
        let publ = v5::connected(addr, &format!("pub{round}")).await;
        subscribed5(&mut sub, &topic).await;
        publ.client
            .publish(&topic, QoS::AtLeastOnce, false, format!("m{round}"))
            .await
            .unwrap();
        let got = sub.publish_within(moatmq_testkit::WAIT).await;
        assert_eq!(
            got.map(|p| p.payload),
            Some(format!("m{round}").into()),
            "round {round}: a publish after the SUBACK was lost"
        );
    }
}

/// On a current-thread runtime the broker reads the two connections in the order their
/// packets arrived: the subscriber's SUBSCRIBE, then the publisher's PUBLISH. The
/// subscriber's first SUBSCRIBE must reach the router before the PUBLISH does, although
/// its connection had no router link yet. Before spare links it waited for a link to be
/// built, and the PUBLISH overtook it every round.
#[tokio::test]
async fn a_subscribe_read_before_a_publish_is_in_effect_for_it() {
    let broker = broker().await;
    let addr = broker.first_addr();
    for round in 0..ROUNDS {
        let topic = format!("order/paho/{round}");
        let mut requester = v5::connected(addr, &format!("requester{round}")).await;
        let mut responder = v5::connected(addr, &format!("responder{round}")).await;
        // As in the Paho suite: the publisher has subscribed (its link is open).
        subscribed5(&mut requester, &format!("order/other/{round}")).await;
        // Both queued at once: the SUBSCRIBE is written first, the PUBLISH right after.
        responder
            .client
            .subscribe(&topic, QoS::AtLeastOnce)
            .await
            .unwrap();
        requester
            .client
            .publish(&topic, QoS::AtLeastOnce, false, "request")
            .await
            .unwrap();
        let got = responder.publish_within(moatmq_testkit::WAIT).await;
        assert_eq!(
            got.map(|p| p.payload),
            Some("request".into()),
            "round {round}: the PUBLISH overtook the SUBSCRIBE read before it"
        );
    }
}
