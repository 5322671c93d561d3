//! A fourth MQTT implementation's view: MQTT.js (npm `mqtt` 5, installed into
//! tests/mqttjs by .ci/run) with MQTT 3.1.1 and 5 over plain TCP, TLS, mutual TLS and
//! WebSocket: every delivery arrives at min(published QoS, granted QoS), a QoS 1 message
//! to a QoS 2 subscription included (the case that once arrived at QoS 2).

use moatmq_testkit::{Listener, TestBroker, TestCa};
use std::path::Path;
use std::process::{Command, Stdio};

fn mqttjs_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/mqttjs"))
}

/// Runs tests/mqttjs/qos.mjs with `args`; fails the test on any wrong delivery.
async fn qos_cases(args: Vec<String>) {
    assert!(
        mqttjs_dir().join("node_modules/mqtt").exists(),
        "MQTT.js not installed: `npm ci --prefix tests/mqttjs` (.ci/run does)"
    );
    let out = tokio::task::spawn_blocking(move || {
        Command::new("timeout")
            .arg("60")
            .arg("node")
            .arg(mqttjs_dir().join("qos.mjs"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("node")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("ok ")).count(),
        18,
        "{stdout}"
    );
    println!("{stdout}");
}

#[tokio::test]
async fn mqttjs_gets_every_delivery_at_the_lower_of_published_and_granted_qos() {
    let server_ca = TestCa::new("server ca");
    let client_ca = TestCa::new("client ca");
    let broker = TestBroker::builder()
        .listener(Listener::tcp("tcp").set("allow_anonymous", true))
        .listener(Listener::tcp("tls").set("allow_anonymous", true).tls())
        .listener(
            Listener::tcp("mtls")
                .tls()
                .tls_set("client_ca", "client-ca.crt")
                .tls_set("require_client_cert", true)
                .tls_set("identity", "cn"),
        )
        .listener(Listener::ws("ws").set("allow_anonymous", true))
        .server_cert(&server_ca)
        .client_ca(&client_ca)
        .start()
        .await;
    let ca = server_ca.write_ca(broker.path("").as_path(), "server-ca.crt");
    let (cert, key) = client_ca.valid_client(broker.path("").as_path(), "alice", "alice");
    let path = |p: &Path| p.to_str().unwrap().to_string();
    let port = |name| broker.addr(name).port();

    qos_cases(vec![
        format!("mqtt://127.0.0.1:{}", port("tcp")),
        "js/tcp".into(),
    ])
    .await;
    qos_cases(vec![
        format!("mqtts://127.0.0.1:{}", port("tls")),
        "js/tls".into(),
        path(&ca),
    ])
    .await;
    // The certificate's CN is the identity: tenant isolation keeps alice to alice/#.
    qos_cases(vec![
        format!("mqtts://127.0.0.1:{}", port("mtls")),
        "alice/js".into(),
        path(&ca),
        path(&cert),
        path(&key),
    ])
    .await;
    qos_cases(vec![
        format!("ws://127.0.0.1:{}/mqtt", port("ws")),
        "js/ws".into(),
    ])
    .await;
}
