//! The encrypted retained store, end to end: what a client retained survives a restart,
//! encrypted on disk, and a wrong key or tampering stops the broker from starting.

mod common;
use common::broker_with_store;
use moatmq_testkit::{v4, v5, TestBroker, QUIET};
use rumqttc::QoS;

async fn retained_of(broker: &TestBroker, filter: &str) -> Vec<(String, Vec<u8>)> {
    let mut c = v4::connected(broker.first_addr(), "reader").await;
    c.client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    let mut got = Vec::new();
    while let Some(p) = c.publish_within(QUIET).await {
        assert!(p.retain);
        got.push((p.topic.clone(), p.payload.to_vec()));
    }
    got.sort();
    got
}

fn store_bytes(broker: &TestBroker) -> Vec<u8> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(broker.path("data/retained")).unwrap() {
        all.extend(std::fs::read(entry.unwrap().path()).unwrap());
    }
    all
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn restart_keeps_retained_messages_encrypted_on_disk() {
    let broker = broker_with_store(0).await;
    let mut p = v4::connected(broker.first_addr(), "dev").await;
    p.publish_acked("ward7/bed3/vitals", true, "pulse=61").await;
    p.publish_acked("door/front", true, "locked").await;
    p.publish_acked("door/back", true, "open").await;
    // An empty retained payload clears.
    p.publish_acked("door/back", true, "").await;

    let disk = store_bytes(&broker);
    assert!(!disk.is_empty());
    for secret in [&b"ward7/bed3"[..], b"pulse=61", b"door/front", b"locked"] {
        assert!(
            !contains(&disk, secret),
            "{:?} in plain text on disk",
            String::from_utf8_lossy(secret)
        );
    }

    let broker = broker.restart().await;
    assert_eq!(
        retained_of(&broker, "#").await,
        vec![
            ("door/front".to_string(), b"locked".to_vec()),
            ("ward7/bed3/vitals".to_string(), b"pulse=61".to_vec()),
        ]
    );
}

#[tokio::test]
async fn v5_properties_survive_and_expired_messages_are_not_replayed() {
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    use rumqttc::v5::mqttbytes::QoS as Q5;
    let broker = broker_with_store(1).await;
    let p = v5::connected(broker.first_addr(), "dev5").await;
    let props = PublishProperties {
        content_type: Some("application/json".into()),
        user_properties: vec![("unit".into(), "C".into())],
        ..Default::default()
    };
    p.client
        .publish_with_properties("t/keep", Q5::AtLeastOnce, true, "{}", props)
        .await
        .unwrap();
    let short = PublishProperties {
        message_expiry_interval: Some(1),
        ..Default::default()
    };
    p.client
        .publish_with_properties("t/expire", Q5::AtLeastOnce, true, "x", short)
        .await
        .unwrap();
    // Let the autosave run, and the 1 s expiry pass.
    tokio::time::sleep(std::time::Duration::from_millis(2200)).await;

    let broker = broker.restart().await;
    let mut c = v5::connected(broker.first_addr(), "r5").await;
    c.client.subscribe("t/#", Q5::AtLeastOnce).await.unwrap();
    let got = c.next_publish().await;
    assert_eq!(&got.topic[..], b"t/keep");
    let props = got.properties.expect("properties kept");
    assert_eq!(props.content_type.as_deref(), Some("application/json"));
    assert_eq!(
        props.user_properties,
        vec![("unit".to_string(), "C".to_string())]
    );
    assert!(
        c.publish_within(QUIET).await.is_none(),
        "expired message replayed"
    );
}

#[tokio::test]
async fn shutdown_flushes_what_the_autosave_had_not_saved() {
    let broker = broker_with_store(3600).await;
    let mut p = v4::connected(broker.first_addr(), "dev").await;
    p.publish_acked("late/state", true, "on").await;
    let broker = broker.restart().await;
    assert_eq!(
        retained_of(&broker, "late/#").await,
        vec![("late/state".into(), b"on".to_vec())]
    );
}

#[tokio::test]
async fn wrong_key_or_tampering_refuses_to_start() {
    let broker = broker_with_store(0).await;
    let mut p = v4::connected(broker.first_addr(), "dev").await;
    for i in 0..5 {
        p.publish_acked(format!("k/{i}"), true, "v").await;
    }
    let dir = broker.stop().await;
    let config_path = dir.path().join("broker.toml");
    let log = dir.path().join("data/retained/retained.log");
    let key = dir.path().join("retained.key");

    // Wrong key.
    let good_key = std::fs::read(&key).unwrap();
    std::fs::remove_file(&key).unwrap();
    moatmq_store::RetainedKey::write_new(&key).unwrap();
    let err = moatmq_broker::Broker::start(moatmq_config::Config::load(&config_path).unwrap())
        .await
        .err()
        .expect("a wrong key must stop the start");
    assert!(err.to_string().contains("key"), "{err}");

    // Right key, one flipped byte in the middle of the log.
    std::fs::write(&key, good_key).unwrap();
    let mut bytes = std::fs::read(&log).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&log, bytes).unwrap();
    let err = moatmq_broker::Broker::start(moatmq_config::Config::load(&config_path).unwrap())
        .await
        .err()
        .expect("tampering must stop the start");
    assert!(err.to_string().contains("retained.log"), "{err}");
}
