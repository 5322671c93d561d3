//! Session caps (issue 11): `limits.max_subscriptions_per_client` counts per session, not
//! per connection (reconnecting to a persistent session used to reset it), and
//! `limits.max_sessions_per_user` bounds the persistent sessions one user keeps.

mod common;

use common::{V4_NO, V4_OK};
use moatmq_testkit::{connect4, connect5, v4, Raw, TestBroker, QUIET, WAIT};
use rumqttc::v5::mqttbytes::v5 as m5;
use std::net::SocketAddr;

async fn broker() -> TestBroker {
    TestBroker::builder()
        .anonymous()
        .limit("max_subscriptions_per_client", 3)
        .limit("max_sessions_per_user", 2)
        .audit()
        .start()
        .await
}

async fn persistent(addr: SocketAddr, id: &str) -> v4::Client {
    let mut o = v4::options(addr, id);
    o.set_clean_session(false);
    v4::connect(o).await.expect("connects")
}

async fn bye(c: v4::Client) {
    let mut c = c;
    c.client.disconnect().await.unwrap();
    assert!(c.closed_within(WAIT).await.is_some());
}

#[tokio::test]
async fn the_subscription_limit_counts_per_session() {
    let broker = broker().await;
    let addr = broker.first_addr();
    let mut c = persistent(addr, "subs").await;
    assert_eq!(
        common::suback4(&mut c, &["a/1", "a/2", "a/3"]).await,
        vec![V4_OK; 3]
    );
    bye(c).await;
    let mut c = persistent(addr, "subs").await;
    assert!(c.connack.session_present);
    // The session holds 3 already: a 4th is refused, a held one may be renewed.
    assert_eq!(
        common::suback4(&mut c, &["a/4", "a/1"]).await,
        vec![V4_NO, V4_OK]
    );
    bye(c).await;
    // A clean session starts from nothing.
    let mut c = v4::connected(addr, "subs").await;
    assert_eq!(
        common::suback4(&mut c, &["b/1", "b/2", "b/3"]).await,
        vec![V4_OK; 3]
    );
}

#[tokio::test]
async fn persistent_sessions_per_user_are_capped() {
    let broker = broker().await;
    let addr = broker.first_addr();
    bye(persistent(addr, "p1").await).await;
    bye(persistent(addr, "p2").await).await;
    // Kept while disconnected: a third persistent session is refused, in both versions.
    let mut c = connect4("p3");
    c.clean_session = false;
    let (_, code) = Raw::connect4(addr, c).await;
    assert_eq!(code, Some(rumqttc::ConnectReturnCode::ServiceUnavailable));
    let mut c = connect5("p3");
    c.clean_start = false;
    c.properties = Some(m5::ConnectProperties {
        session_expiry_interval: Some(60),
        ..m5::ConnectProperties::new()
    });
    let (_, code) = Raw::connect5(addr, c, None, None).await;
    assert_eq!(code, Some(m5::ConnectReturnCode::QuotaExceeded));
    // Clean sessions are not capped, and kept sessions resume.
    let _clean = v4::connected(addr, "clean").await;
    let p1 = persistent(addr, "p1").await;
    assert!(p1.connack.session_present);
    bye(p1).await;
    // A clean connection discards p1's session: room for another.
    bye(v4::connected(addr, "p1").await).await;
    tokio::time::sleep(QUIET).await;
    let p3 = persistent(addr, "p3").await;
    assert!(!p3.connack.session_present);
    let audit = std::fs::read_to_string(broker.path("audit.log")).unwrap();
    let refused = audit
        .lines()
        .filter(|l| l.contains("session_refused"))
        .count();
    assert_eq!(refused, 2, "{audit}");
}
