//! A retained store put back from an older copy, end to end: a message a client deleted
//! would come back, so the real broker refuses to start and names the log and its
//! high-water mark; after `accept` (what `moatmq retained accept` runs) it starts with
//! the older copy, as the operator chose.

use moatmq_testkit::{v4, TestBroker, QUIET};
use rumqttc::QoS;

async fn retained_of(broker: &TestBroker) -> Vec<(String, Vec<u8>)> {
    let mut c = v4::connected(broker.first_addr(), "reader").await;
    c.client
        .subscribe("door/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    let mut got = Vec::new();
    while let Some(p) = c.publish_within(QUIET).await {
        got.push((p.topic.clone(), p.payload.to_vec()));
    }
    got.sort();
    got
}

#[tokio::test]
async fn older_copy_of_the_store_refuses_to_start_until_accepted() {
    let broker = TestBroker::builder()
        .anonymous()
        .retained_store()
        .set("retained", "autosave_interval", 0)
        .start()
        .await;
    let key_path = broker.path("retained.key");
    let mut p = v4::connected(broker.first_addr(), "dev").await;
    for (topic, payload) in [("door/front", "locked"), ("door/back", "open")] {
        p.publish_acked(topic, true, payload).await;
    }
    let dir = broker.stop().await;
    let log = dir.path().join("data/retained/retained.log");
    let backup = std::fs::read(&log).unwrap();

    // The client deletes its message.
    let broker = TestBroker::start_in(dir).await;
    let mut p = v4::connected(broker.first_addr(), "dev").await;
    p.publish_acked("door/back", true, "").await;
    assert_eq!(
        retained_of(&broker).await,
        vec![("door/front".into(), b"locked".to_vec())]
    );
    let dir = broker.stop().await;

    // The older copy is put back: starting would resurrect door/back.
    std::fs::write(&log, &backup).unwrap();
    let config_path = dir.path().join("broker.toml");
    let err = moatmq_broker::Broker::start(moatmq_config::Config::load(&config_path).unwrap())
        .await
        .err()
        .expect("a rolled-back store must stop the start");
    let text = err.to_string();
    assert!(
        text.contains("data/retained/retained.log:")
            && text.contains("data/retained/retained.log.hwm")
            && text.contains("1 records after offset")
            && text.contains("moatmq retained accept"),
        "{text}"
    );

    // The operator accepts the older copy on purpose.
    let key = moatmq_store::RetainedKey::load(&key_path).unwrap();
    assert_eq!(
        moatmq_store::accept(&dir.path().join("data/retained"), key).unwrap(),
        2
    );
    let broker = TestBroker::start_in(dir).await;
    assert_eq!(
        retained_of(&broker).await,
        vec![
            ("door/back".into(), b"open".to_vec()),
            ("door/front".into(), b"locked".to_vec())
        ]
    );
}
