//! Topic ACLs over real connections with two tenants, alice and bob: every wildcard
//! escape, shared subscriptions, `$SYS`, retained messages, wills, deny-inside-grant,
//! refused publishes and client ids shared between users. Both with the built-in rules
//! (tenant isolation, `%u/#`) and with an ACL file.

mod common;

use common::{assert_quiet4, login4, login5, suback4, V4_NO, V4_OK};
use moatmq_testkit::{v4, v5, Raw, TestBroker, QUIET, WAIT};
use rumqttc::v5::mqttbytes::v5 as m5;
use rumqttc::v5::mqttbytes::QoS as Q5;
use rumqttc::QoS;
use std::net::SocketAddr;

const USERS: &[(&str, &str)] = &[
    ("alice", "alice-pw"),
    ("bob", "bob-pw"),
    ("admin", "admin-pw"),
];

/// Which rules the broker enforces.
#[derive(Clone, Copy)]
enum Rules {
    /// No ACL file: tenant isolation, `%u/#`.
    Default,
    /// [`ACL`] as the ACL file.
    AclFile,
}

const ACL: &str = "\
# nothing for anonymous clients
user alice
topic readwrite alice/#
topic deny alice/secrets/#

user bob
topic readwrite bob/#

user admin
topic readwrite #

pattern read devices/%c/cmd
";

async fn broker(rules: Rules) -> TestBroker {
    let broker = TestBroker::builder().users(USERS);
    match rules {
        Rules::Default => broker.start().await,
        Rules::AclFile => broker.acl(ACL).start().await,
    }
}

fn pw(user: &str) -> String {
    format!("{user}-pw")
}

async fn user4(addr: SocketAddr, id: &str, user: &str) -> v4::Client {
    v4::connect(login4(addr, id, user, &pw(user)))
        .await
        .unwrap_or_else(|e| panic!("{user} connects: {e}"))
}

async fn user5(addr: SocketAddr, id: &str, user: &str) -> v5::Client {
    v5::connect(login5(addr, id, user, &pw(user)))
        .await
        .unwrap_or_else(|e| panic!("{user} connects: {e}"))
}

/// Filters alice tries, and whether she may hold them (under both rule sets).
const ESCAPES: &[(&str, bool)] = &[
    ("alice/#", true),
    ("#", false),
    ("+/#", false),
    ("+/sensors/#", false),
    ("bob/#", false),
    ("alice/+/temp", true),
    ("+/+/temp", false),
    ("$SYS/#", false),
    ("$SYS/broker/uptime", false),
    ("$share/g/bob/#", false),
    ("$share/g/+/#", false),
    ("$share/g/alice/#", true),
];

async fn wildcard_escapes_v4(rules: Rules) {
    let broker = broker(rules).await;
    let addr = broker.first_addr();
    let mut alice = user4(addr, "alice-1", "alice").await;
    let filters: Vec<&str> = ESCAPES.iter().map(|(f, _)| *f).collect();
    let expected: Vec<_> = ESCAPES
        .iter()
        .map(|(_, ok)| if *ok { V4_OK } else { V4_NO })
        .collect();
    assert_eq!(suback4(&mut alice, &filters).await, expected);

    let bob = user4(addr, "bob-1", "bob").await;
    for topic in ["bob/sensors/t", "bob/x/temp", "bob/secret"] {
        bob.client
            .publish(topic, QoS::AtLeastOnce, false, "bob's")
            .await
            .unwrap();
    }
    alice
        .client
        .publish("alice/sensors/temp", QoS::AtLeastOnce, false, "alice's")
        .await
        .unwrap();
    // Delivered once per matching subscription (alice/#, alice/+/temp, the share):
    // all of them alice's own.
    let first = alice.next_publish().await;
    assert_eq!(first.topic, "alice/sensors/temp");
    while let Some(p) = alice.publish_within(QUIET).await {
        assert_eq!(p.topic, "alice/sensors/temp", "leaked {:?}", p.payload);
    }
}

#[tokio::test]
async fn wildcard_escapes_are_refused_v4_default_rules() {
    wildcard_escapes_v4(Rules::Default).await;
}

#[tokio::test]
async fn wildcard_escapes_are_refused_v4_acl_file() {
    wildcard_escapes_v4(Rules::AclFile).await;
}

async fn wildcard_escapes_v5(rules: Rules) {
    let broker = broker(rules).await;
    let addr = broker.first_addr();
    let mut alice = Raw::v5_login(addr, "alice-5", "alice", "alice-pw").await;
    let filters: Vec<&str> = ESCAPES.iter().map(|(f, _)| *f).collect();
    let codes = alice.subscribe5(7, &filters).await;
    assert_eq!(codes.len(), ESCAPES.len());
    for ((filter, ok), code) in ESCAPES.iter().zip(&codes) {
        if *ok {
            assert!(
                matches!(code, m5::SubscribeReasonCode::Success(_)),
                "{filter}: {code:?}"
            );
        } else {
            assert_eq!(*code, m5::SubscribeReasonCode::NotAuthorized, "{filter}");
        }
    }
    let bob = user5(addr, "bob-5", "bob").await;
    bob.client
        .publish("bob/sensors/t", Q5::AtLeastOnce, false, "bob's")
        .await
        .unwrap();
    assert!(alice.publish5_within(QUIET).await.is_none(), "bob's leaked");
}

#[tokio::test]
async fn wildcard_escapes_are_refused_v5_default_rules() {
    wildcard_escapes_v5(Rules::Default).await;
}

#[tokio::test]
async fn wildcard_escapes_are_refused_v5_acl_file() {
    wildcard_escapes_v5(Rules::AclFile).await;
}

#[tokio::test]
async fn shared_subscription_on_own_topics_delivers() {
    let broker = broker(Rules::Default).await;
    let addr = broker.first_addr();
    let mut alice = user4(addr, "alice-s", "alice").await;
    assert_eq!(
        suback4(&mut alice, &["$share/g/alice/#", "$share/g/bob/#"]).await,
        vec![V4_OK, V4_NO]
    );
    let bob = user4(addr, "bob-s", "bob").await;
    bob.client
        .publish("bob/x", QoS::AtLeastOnce, false, "no")
        .await
        .unwrap();
    let me = user4(addr, "alice-p", "alice").await;
    me.client
        .publish("alice/x", QoS::AtLeastOnce, false, "yes")
        .await
        .unwrap();
    let got = alice.next_publish().await;
    assert_eq!(
        (got.topic.as_str(), &got.payload[..]),
        ("alice/x", &b"yes"[..])
    );
    common::assert_quiet4(&mut alice).await;
}

#[tokio::test]
async fn deny_inside_a_grant_is_enforced_per_message_and_for_retained() {
    let broker = broker(Rules::AclFile).await;
    let addr = broker.first_addr();
    let mut admin = user4(addr, "admin", "admin").await;
    // Only the secret is retained: a withheld delivery must not race an unacknowledged
    // one (see withheld_delivery_does_not_break_in_order_acks).
    admin.publish_acked("alice/secrets/r", true, "secret").await;

    let mut alice = user4(addr, "alice-d", "alice").await;
    assert_eq!(
        suback4(&mut alice, &["alice/#", "alice/secrets/#"]).await,
        vec![V4_OK, V4_NO],
        "a filter wholly inside a deny rule is refused"
    );
    assert!(
        alice.publish_within(QUIET).await.is_none(),
        "retained secret leaked"
    );

    // The router appends a QoS 2 publish only once it is released, possibly after later
    // QoS 1 ones: let the withheld ones settle before the public one (see above).
    for (topic, qos) in [
        ("alice/secrets/live", QoS::AtLeastOnce),
        ("alice/secrets/two", QoS::ExactlyOnce),
        ("alice/secrets/zero", QoS::AtMostOnce),
    ] {
        admin
            .client
            .publish(topic, qos, false, topic)
            .await
            .unwrap();
    }
    tokio::time::sleep(QUIET).await;
    admin
        .client
        .publish("alice/public/live", QoS::AtLeastOnce, false, "public")
        .await
        .unwrap();
    let got = alice.next_publish().await;
    assert_eq!(got.topic, "alice/public/live");
    common::assert_quiet4(&mut alice).await;

    // alice cannot write under the deny either.
    let mut watcher = user4(addr, "admin-w", "admin").await;
    assert_eq!(suback4(&mut watcher, &["alice/#"]).await, vec![V4_OK]);
    // admin may read everything: the retained secret arrives first.
    assert!(watcher.next_publish().await.retain);
    alice
        .client
        .publish("alice/secrets/y", QoS::AtLeastOnce, false, "y")
        .await
        .unwrap();
    common::assert_quiet4(&mut watcher).await;
}

/// rumqttd's router accepts acknowledgements of what it forwards only in order
/// (`Outgoing::register_ack`: "out of order ack" disconnects the link). The gateway
/// acknowledges a withheld (read-denied) forward at once, so if an earlier forward is
/// still waiting for the client's PUBACK, the router sees the acks out of order and
/// drops the subscriber's link.
#[tokio::test]
async fn withheld_delivery_does_not_break_in_order_acks() {
    let broker = broker(Rules::AclFile).await;
    let addr = broker.first_addr();
    let mut alice = Raw::v5_login(addr, "alice-raw", "alice", "alice-pw").await;
    assert!(matches!(
        alice.subscribe5(1, &["alice/#"]).await[..],
        [m5::SubscribeReasonCode::Success(_)]
    ));
    let admin = user4(addr, "admin", "admin").await;
    admin
        .client
        .publish("alice/public/1", QoS::AtLeastOnce, false, "one")
        .await
        .unwrap();
    // Not acknowledged yet: pkid of "one" is the router's in-flight head.
    let one = match alice.next5(WAIT).await {
        Some(m5::Packet::Publish(p)) => p,
        other => panic!("expected PUBLISH, got {other:?}"),
    };
    admin
        .client
        .publish("alice/secrets/2", QoS::AtLeastOnce, false, "withheld")
        .await
        .unwrap();
    tokio::time::sleep(QUIET).await;
    alice
        .send5(m5::Packet::PubAck(m5::PubAck::new(one.pkid, None)))
        .await;
    admin
        .client
        .publish("alice/public/3", QoS::AtLeastOnce, false, "three")
        .await
        .unwrap();
    let three = alice
        .publish5_within(WAIT)
        .await
        .expect("alice still served");
    assert_eq!(&three.payload[..], b"three");
}

#[tokio::test]
async fn retained_message_of_bob_does_not_reach_alice() {
    let broker = broker(Rules::Default).await;
    let addr = broker.first_addr();
    let mut bob = user4(addr, "bob-r", "bob").await;
    bob.publish_acked("bob/state", true, "bob's state").await;
    let mut alice = user4(addr, "alice-r", "alice").await;
    let codes = suback4(
        &mut alice,
        &["#", "+/state", "bob/#", "bob/state", "alice/#"],
    )
    .await;
    assert_eq!(codes, vec![V4_NO, V4_NO, V4_NO, V4_NO, V4_OK]);
    common::assert_quiet4(&mut alice).await;
    // The retained message is there: bob gets it.
    let mut bob2 = user4(addr, "bob-r2", "bob").await;
    assert_eq!(suback4(&mut bob2, &["bob/#"]).await, vec![V4_OK]);
    assert_eq!(bob2.next_publish().await.payload, "bob's state".as_bytes());
}

#[tokio::test]
async fn will_to_a_forbidden_topic_is_refused_at_connect() {
    let broker = broker(Rules::Default).await;
    let addr = broker.first_addr();
    let mut o = login4(addr, "alice-w", "alice", "alice-pw");
    o.set_last_will(rumqttc::LastWill::new(
        "bob/will",
        "x",
        QoS::AtLeastOnce,
        false,
    ));
    match v4::connect(o).await {
        Err(v4::ConnectionError::ConnectionRefused(c)) => {
            assert_eq!(c, rumqttc::ConnectReturnCode::NotAuthorized)
        }
        other => panic!("expected CONNACK 0x05, got {:?}", other.err()),
    }
    let mut o = login5(addr, "alice-w5", "alice", "alice-pw");
    o.set_last_will(m5::LastWill::new(
        "bob/will",
        "x",
        Q5::AtLeastOnce,
        false,
        None,
    ));
    match v5::connect(o).await {
        Err(v5::ConnectionError::ConnectionRefused(c)) => {
            assert_eq!(c, m5::ConnectReturnCode::NotAuthorized)
        }
        other => panic!("expected CONNACK 0x87, got {:?}", other.err()),
    }
    let mut o = login4(addr, "alice-ok", "alice", "alice-pw");
    o.set_last_will(rumqttc::LastWill::new(
        "alice/will",
        "x",
        QoS::AtLeastOnce,
        false,
    ));
    assert!(
        v4::connect(o).await.is_ok(),
        "a will on her own topic is fine"
    );
}

#[tokio::test]
async fn client_id_with_wildcards_never_matches_a_pattern() {
    let broker = broker(Rules::AclFile).await;
    let addr = broker.first_addr();
    let mut d1 = user4(addr, "d1", "alice").await;
    assert_eq!(
        suback4(
            &mut d1,
            &["devices/d1/cmd", "devices/+/cmd", "devices/d2/cmd"]
        )
        .await,
        vec![V4_OK, V4_NO, V4_NO]
    );
    let mut plus = user4(addr, "+", "alice").await;
    assert_eq!(
        suback4(&mut plus, &["devices/+/cmd", "devices/#"]).await,
        vec![V4_NO, V4_NO]
    );
}

#[tokio::test]
async fn publish_without_write_access_is_dropped() {
    let broker = broker(Rules::Default).await;
    let addr = broker.first_addr();
    let mut bob = user4(addr, "bob-l", "bob").await;
    assert_eq!(suback4(&mut bob, &["bob/#"]).await, vec![V4_OK]);

    // MQTT 5: refused with 0x87 in the PUBACK / PUBREC.
    let mut alice = Raw::v5_login(addr, "alice-5", "alice", "alice-pw").await;
    let mut p = m5::Publish::new("bob/x", Q5::AtLeastOnce, "q1", None);
    p.pkid = 11;
    alice.send5(m5::Packet::Publish(p)).await;
    match alice.next5(WAIT).await {
        Some(m5::Packet::PubAck(ack)) => {
            assert_eq!(
                (ack.pkid, ack.reason),
                (11, m5::PubAckReason::NotAuthorized)
            )
        }
        other => panic!("expected PUBACK, got {other:?}"),
    }
    let mut p = m5::Publish::new("bob/x", Q5::ExactlyOnce, "q2", None);
    p.pkid = 12;
    alice.send5(m5::Packet::Publish(p)).await;
    match alice.next5(WAIT).await {
        Some(m5::Packet::PubRec(rec)) => {
            assert_eq!(
                (rec.pkid, rec.reason),
                (12, m5::PubRecReason::NotAuthorized)
            )
        }
        other => panic!("expected PUBREC, got {other:?}"),
    }
    alice
        .send5(m5::Packet::Publish(m5::Publish::new(
            "bob/x",
            Q5::AtMostOnce,
            "q0",
            None,
        )))
        .await;

    // MQTT 3.1.1: acknowledged (it cannot say no) and dropped; the connection stays.
    let alice4 = user4(addr, "alice-4", "alice").await;
    alice4
        .client
        .publish("bob/x", QoS::AtLeastOnce, false, "v4")
        .await
        .unwrap();
    let mut a4 = alice4;
    let acked = a4
        .incoming(|p| matches!(p, rumqttc::Packet::PubAck(_)).then_some(()))
        .await;
    assert!(acked.is_some(), "3.1.1 PUBACK");
    common::assert_quiet4(&mut bob).await;
    assert!(a4.closed_within(QUIET).await.is_none(), "not disconnected");
}

#[tokio::test]
async fn same_client_id_of_another_user_neither_takes_over_nor_inherits() {
    let broker = broker(Rules::Default).await;
    let addr = broker.first_addr();
    // alice leaves a persistent session with a subscription behind.
    let mut o = login4(addr, "shared-id", "alice", "alice-pw");
    o.set_clean_session(false);
    let mut alice = v4::connect(o.clone()).await.unwrap();
    assert_eq!(suback4(&mut alice, &["alice/q"]).await, vec![V4_OK]);
    alice.client.disconnect().await.unwrap();
    assert!(alice.closed_within(WAIT).await.is_some());

    let mut publ = user4(addr, "alice-pub", "alice").await;
    publ.publish_acked("alice/q", false, "queued for alice")
        .await;

    // bob with the same client id: a fresh session, nothing of alice's.
    let mut ob = login4(addr, "shared-id", "bob", "bob-pw");
    ob.set_clean_session(false);
    let mut bob = v4::connect(ob).await.unwrap();
    assert!(
        !bob.connack.session_present,
        "bob inherited alice's session"
    );
    common::assert_quiet4(&mut bob).await;
    bob.client.disconnect().await.unwrap();
    assert!(bob.closed_within(WAIT).await.is_some());

    // alice's session survived bob.
    let mut alice = v4::connect(o).await.unwrap();
    assert!(
        alice.connack.session_present,
        "alice's session was destroyed"
    );
    assert_eq!(
        alice.next_publish().await.payload,
        "queued for alice".as_bytes()
    );
}

#[tokio::test]
async fn same_client_id_of_another_user_does_not_close_the_first() {
    let broker = broker(Rules::Default).await;
    let addr = broker.first_addr();
    let mut alice = user5(addr, "dup", "alice").await;
    common::subscribed5(&mut alice, "alice/live").await;
    let _bob = user5(addr, "dup", "bob").await;
    assert!(
        alice.closed_within(QUIET).await.is_none(),
        "bob took over alice's connection"
    );
    let publ = user4(addr, "alice-pub", "alice").await;
    publ.client
        .publish("alice/live", QoS::AtLeastOnce, false, "still here")
        .await
        .unwrap();
    assert_eq!(&alice.next_publish().await.payload[..], b"still here");
}

#[tokio::test]
async fn same_user_same_client_id_takes_over() {
    let broker = broker(Rules::Default).await;
    let addr = broker.first_addr();
    let mut first = user5(addr, "mine", "alice").await;
    let mut second = user5(addr, "mine", "alice").await;
    let ended = first
        .closed_within(WAIT)
        .await
        .expect("the old connection is closed");
    assert!(ended.contains("SessionTakenOver"), "{ended}");
    common::subscribed5(&mut second, "alice/t").await;
    let publ = user4(addr, "alice-pub", "alice").await;
    publ.client
        .publish("alice/t", QoS::AtLeastOnce, false, "to the new one")
        .await
        .unwrap();
    assert_eq!(&second.next_publish().await.payload[..], b"to the new one");

    let mut old4 = user4(addr, "mine4", "alice").await;
    let _new4 = user4(addr, "mine4", "alice").await;
    assert!(old4.closed_within(WAIT).await.is_some(), "v4 taken over");
}

/// A 3.1.1 connection of `user` with a retained will on `topic`, held open by the caller.
async fn with_will(addr: SocketAddr, id: &str, user: &str, topic: &str) -> Raw {
    let mut connect = moatmq_testkit::connect4(id);
    connect.login = Some(rumqttc::mqttbytes::v4::Login::new(user, pw(user)));
    connect.last_will = Some(rumqttc::LastWill::new(
        topic,
        format!("{user} is gone"),
        QoS::AtLeastOnce,
        true,
    ));
    let (raw, code) = Raw::connect4(addr, connect).await;
    assert_eq!(code, Some(rumqttc::ConnectReturnCode::Success), "{user}");
    raw
}

#[tokio::test]
async fn will_is_checked_against_the_acl_in_force_when_it_is_published() {
    let broker = broker(Rules::AclFile).await;
    let addr = broker.first_addr();
    let mut admin = user4(addr, "admin-watch", "admin").await;
    assert_eq!(
        suback4(&mut admin, &["alice/#", "bob/#"]).await,
        vec![V4_OK, V4_OK]
    );
    let alice = with_will(addr, "alice-w", "alice", "alice/status").await;
    let bob = with_will(addr, "bob-w", "bob", "bob/status").await;

    // The operator takes alice's write access away and reloads (SIGHUP).
    moatmq_testkit::write_file(
        &broker.path(""),
        "aclfile",
        &ACL.replace("topic readwrite alice/#", "topic read alice/#"),
    );
    assert!(broker.reload().is_empty(), "reload succeeds");
    drop(alice);
    drop(bob);

    // bob's will still goes out; alice's, written when she could, does not.
    let p = admin.next_publish().await;
    assert_eq!(p.topic, "bob/status");
    assert_quiet4(&mut admin).await;
    // Nor was it retained for later subscribers.
    let mut late = user4(addr, "admin-late", "admin").await;
    assert_eq!(
        suback4(&mut late, &["alice/#", "bob/#"]).await,
        vec![V4_OK, V4_OK]
    );
    let p = late.next_publish().await;
    assert_eq!(p.topic, "bob/status");
    assert_quiet4(&mut late).await;
}
