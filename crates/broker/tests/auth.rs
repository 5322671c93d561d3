//! Password authentication over real connections: Argon2id password files, mosquitto
//! `$7$` files, the CONNACK codes of MQTT 3.1.1 and 5, and anonymous access refused by
//! default. (Certificate identities are in tls.rs.)

mod common;

use common::{login4, login5};
use moatmq_testkit::{v4, v5, TestBroker};
use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as C5;
use rumqttc::ConnectReturnCode as C4;

async fn broker_with_users(users: &[(&str, &str)]) -> TestBroker {
    TestBroker::builder().users(users).start().await
}

fn refused4(r: Result<v4::Client, v4::ConnectionError>) -> C4 {
    match r {
        Err(v4::ConnectionError::ConnectionRefused(code)) => code,
        Ok(_) => panic!("connection accepted"),
        Err(e) => panic!("no CONNACK refusal: {e}"),
    }
}

fn refused5(r: Result<v5::Client, v5::ConnectionError>) -> C5 {
    match r {
        Err(v5::ConnectionError::ConnectionRefused(code)) => code,
        Ok(_) => panic!("connection accepted"),
        Err(e) => panic!("no CONNACK refusal: {e}"),
    }
}

#[tokio::test]
async fn good_and_bad_passwords_v4() {
    let broker = broker_with_users(&[("alice", "alice-pw"), ("bob", "bob-pw")]).await;
    let addr = broker.first_addr();
    let ok = v4::connect(login4(addr, "a", "alice", "alice-pw")).await;
    assert_eq!(ok.expect("good password").connack.code, C4::Success);
    let bad = v4::connect(login4(addr, "a2", "alice", "bob-pw")).await;
    assert_eq!(refused4(bad), C4::BadUserNamePassword);
    // An unknown user gets the same answer as a wrong password.
    let unknown = v4::connect(login4(addr, "m", "mallory", "alice-pw")).await;
    assert_eq!(refused4(unknown), C4::BadUserNamePassword);
}

#[tokio::test]
async fn good_and_bad_passwords_v5() {
    let broker = broker_with_users(&[("alice", "alice-pw"), ("bob", "bob-pw")]).await;
    let addr = broker.first_addr();
    let ok = v5::connect(login5(addr, "b", "bob", "bob-pw")).await;
    assert_eq!(ok.expect("good password").connack.code, C5::Success);
    let bad = v5::connect(login5(addr, "b2", "bob", "")).await;
    assert_eq!(refused5(bad), C5::BadUserNamePassword);
    let unknown = v5::connect(login5(addr, "m", "mallory", "bob-pw")).await;
    assert_eq!(refused5(unknown), C5::BadUserNamePassword);
}

#[tokio::test]
async fn anonymous_is_refused_by_default() {
    let broker = broker_with_users(&[("alice", "alice-pw")]).await;
    let addr = broker.first_addr();
    assert_eq!(
        refused4(v4::connect(v4::options(addr, "anon4")).await),
        C4::NotAuthorized
    );
    assert_eq!(
        refused5(v5::connect(v5::options(addr, "anon5")).await),
        C5::NotAuthorized
    );
}

#[tokio::test]
async fn anonymous_is_refused_without_any_auth_config() {
    let broker = TestBroker::builder().start().await;
    let addr = broker.first_addr();
    assert_eq!(
        refused4(v4::connect(v4::options(addr, "anon")).await),
        C4::NotAuthorized
    );
}

#[tokio::test]
async fn mosquitto_passwd_file_is_accepted() {
    let builder = TestBroker::builder().set("auth", "password_file", "passwd");
    let src = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../auth/testdata/mosquitto_passwd.txt"
    );
    std::fs::copy(src, builder.dir().join("passwd")).unwrap();
    let broker = builder.start().await;
    let addr = broker.first_addr();
    // Passwords from crates/auth/testdata/README.md.
    let alice = v4::connect(login4(addr, "a", "alice", "correct horse")).await;
    assert_eq!(alice.expect("alice ($7$)").connack.code, C4::Success);
    let bob = v5::connect(login5(addr, "b", "bob", "hunter2")).await;
    assert_eq!(bob.expect("bob ($7$)").connack.code, C5::Success);
    let legacy = v4::connect(login4(addr, "l", "legacy6", "s3cret!")).await;
    assert_eq!(legacy.expect("legacy6 ($6$)").connack.code, C4::Success);
    let wrong = v4::connect(login4(addr, "w", "alice", "hunter2")).await;
    assert_eq!(refused4(wrong), C4::BadUserNamePassword);
}

#[tokio::test]
async fn password_file_with_a_bad_line_is_reported_with_its_line() {
    let hash = moatmq_auth::hash_password(b"pw").unwrap();
    let (_dir, path) = TestBroker::builder()
        .file(
            "passwd",
            &format!("# users\nalice:{hash}\nbob has no hash\n"),
        )
        .set("auth", "password_file", "passwd")
        .write();
    let config = moatmq_config::Config::load(&path).expect("the config itself is valid");
    let err = match moatmq_broker::Broker::start(config).await {
        Ok(_) => panic!("a broker started with a broken password file"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("passwd:3"), "{err}");
}

#[tokio::test]
async fn username_that_is_not_a_valid_identity_is_refused() {
    let broker = broker_with_users(&[("alice", "alice-pw")]).await;
    let addr = broker.first_addr();
    for user in ["+", "#"] {
        let r = v4::connect(login4(addr, "w", user, "alice-pw")).await;
        assert_eq!(refused4(r), C4::NotAuthorized, "username {user}");
    }
}
