//! A second, independent MQTT implementation's view: libmosquitto's command-line
//! clients (package mosquitto-clients, installed by .ci/run) against moatmq, MQTT 3.1.1
//! and 5, including retained messages, QoS 2 and a refused login.

use moatmq_testkit::TestBroker;
use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn tool(name: &str) -> Command {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "{name} not found: install the package mosquitto-clients \
         (e.g. `apt-get install mosquitto-clients`; .ci/run does)"
    );
    Command::new(name)
}

fn base(cmd: &mut Command, addr: SocketAddr, version: &str) {
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &addr.port().to_string(),
        "-V",
        version,
    ]);
}

async fn run(mut cmd: Command) -> Output {
    tokio::task::spawn_blocking(move || cmd.stdin(Stdio::null()).output().expect("run"))
        .await
        .unwrap()
}

async fn pub_sub_round_trip(version: &str) {
    let broker = TestBroker::start().await;
    let addr = broker.first_addr();

    // A retained message first, then a subscriber that must see it and a live one.
    let mut retained = tool("mosquitto_pub");
    base(&mut retained, addr, version);
    retained.args([
        "-t",
        "interop/state",
        "-m",
        "retained-value",
        "-r",
        "-q",
        "1",
    ]);
    assert!(run(retained).await.status.success());

    let mut sub = tool("mosquitto_sub");
    base(&mut sub, addr, version);
    sub.args(["-t", "interop/#", "-q", "2", "-v", "-C", "2", "-W", "5"]);
    let sub = tokio::task::spawn_blocking(move || sub.stdin(Stdio::null()).output().expect("sub"));
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut live = tool("mosquitto_pub");
    base(&mut live, addr, version);
    live.args(["-t", "interop/live", "-m", "live-value", "-q", "2"]);
    assert!(run(live).await.status.success());

    let out = sub.await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "mosquitto_sub failed: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        vec!["interop/state retained-value", "interop/live live-value"]
    );
}

#[tokio::test]
async fn mosquitto_clients_v311() {
    pub_sub_round_trip("mqttv311").await;
}

#[tokio::test]
async fn mosquitto_clients_v5() {
    pub_sub_round_trip("mqttv5").await;
}

#[tokio::test]
async fn mosquitto_client_sees_a_refused_login() {
    // No [auth]: anonymous clients are refused.
    let broker = TestBroker::builder().start().await;
    let mut publ = tool("mosquitto_pub");
    base(&mut publ, broker.first_addr(), "mqttv5");
    publ.args(["-t", "x", "-m", "y", "-u", "nobody", "-P", "nothing"]);
    let out = run(publ).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(
        err.contains("bad user name or password") || err.contains("not authorized"),
        "{err}"
    );
}

/// Mosquitto's `persistence true` migration case with libmosquitto's clients: a
/// persistent subscriber leaves, five QoS 1 messages are published, the broker restarts
/// (SIGTERM), and the subscriber comes back to all five.
async fn persistent_session_survives_a_restart(version: &str) {
    let broker = TestBroker::builder()
        .anonymous()
        .retained_store()
        .start()
        .await;
    let persistent = |addr: SocketAddr, more: &[&str]| {
        let mut sub = tool("mosquitto_sub");
        base(&mut sub, addr, version);
        sub.args(["-c", "-i", "migrated", "-q", "1", "-t", "mig/#", "-v"]);
        if version == "mqttv5" {
            sub.args(["-x", "300"]);
        }
        sub.args(more);
        sub
    };
    let out = run(persistent(broker.first_addr(), &["-E"])).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for i in 0..5 {
        let mut publ = tool("mosquitto_pub");
        base(&mut publ, broker.first_addr(), version);
        publ.args(["-t", &format!("mig/{i}"), "-m", &format!("m{i}"), "-q", "1"]);
        assert!(run(publ).await.status.success());
    }
    let broker = broker.restart().await;
    let out = run(persistent(broker.first_addr(), &["-C", "5", "-W", "10"])).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        ["mig/0 m0", "mig/1 m1", "mig/2 m2", "mig/3 m3", "mig/4 m4"]
    );
}

#[tokio::test]
async fn mosquitto_persistent_session_survives_a_restart_v311() {
    persistent_session_survives_a_restart("mqttv311").await;
}

#[tokio::test]
async fn mosquitto_persistent_session_survives_a_restart_v5() {
    persistent_session_survives_a_restart("mqttv5").await;
}

/// libmosquitto's view of QoS = min(published, granted) (MQTT 3.8.4): subscribed at
/// QoS 2, each message arrives at the QoS it was published with; with Retain As
/// Published (MQTT 5) a live message published retained keeps the flag.
async fn delivered_qos(version: &str) {
    let broker = TestBroker::start().await;
    let addr = broker.first_addr();
    let mut sub = tool("mosquitto_sub");
    base(&mut sub, addr, version);
    sub.args([
        "-t", "qos/#", "-q", "2", "-F", "%t %q %r", "-C", "4", "-W", "5",
    ]);
    if version == "mqttv5" {
        sub.arg("--retain-as-published");
    }
    let sub = tokio::task::spawn_blocking(move || sub.stdin(Stdio::null()).output().expect("sub"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (topic, qos, retain) in [
        ("qos/0", "0", false),
        ("qos/1", "1", false),
        ("qos/2", "2", false),
        ("qos/r", "1", true),
    ] {
        let mut publ = tool("mosquitto_pub");
        base(&mut publ, addr, version);
        publ.args(["-t", topic, "-m", "x", "-q", qos]);
        if retain {
            publ.arg("-r");
        }
        assert!(run(publ).await.status.success());
    }
    let out = sub.await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "mosquitto_sub failed: {text}");
    let kept = if version == "mqttv5" { "1" } else { "0" };
    let expected = [
        "qos/0 0 0",
        "qos/1 1 0",
        "qos/2 2 0",
        &format!("qos/r 1 {kept}"),
    ];
    assert_eq!(text.lines().collect::<Vec<_>>(), expected);
}

#[tokio::test]
async fn mosquitto_client_gets_the_published_qos_v311() {
    delivered_qos("mqttv311").await;
}

#[tokio::test]
async fn mosquitto_client_gets_the_published_qos_and_retain_as_published_v5() {
    delivered_qos("mqttv5").await;
}
