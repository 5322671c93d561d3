//! A third MQTT implementation's view: Eclipse Paho's Python client (paho-mqtt 2.x from
//! PyPI, installed by .ci/run) runs the MQTT 5 cases of tests/paho/mqtt5.py (QoS
//! downgrade, No Local, Retain As Published, retain handling, subscription identifiers,
//! request/response, properties, message and session expiry, wills and will delay, flow
//! control, server keep alive, maximum packet size, server topic aliases, assigned client ids, shared
//! subscriptions, `$` topics) against the real broker.

use moatmq_testkit::TestBroker;
use std::process::{Command, Stdio};

#[tokio::test]
async fn paho_python_client_mqtt5_cases() {
    let has_paho = Command::new("python3")
        .args(["-c", "import paho.mqtt.client"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has_paho,
        "python3 with paho-mqtt not found: `python3 -m pip install paho-mqtt` (.ci/run does)"
    );
    let broker = TestBroker::builder()
        .anonymous()
        .limit("max_keepalive", 60)
        .start()
        .await;
    let port = broker.first_addr().port();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/paho/mqtt5.py");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("timeout")
            .args(["120", "python3", script, "--port", &port.to_string()])
            .stdin(Stdio::null())
            .output()
            .expect("python3")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(!stdout.contains("FAIL"), "{stdout}");
    println!("{stdout}");
}
