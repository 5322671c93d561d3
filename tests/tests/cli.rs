//! The real `moatmq` binary: `check` exit codes, `serve` with and without a config,
//! SIGTERM (MQTT 5 clients get DISCONNECT 0x8B, exit 0) and SIGHUP reloads of the
//! password file, the ACL file and a rotated server certificate.
//!
//! Each test binds its listeners on 127.0.0.1:0 and reads the bound addresses from the
//! broker's "listening" log lines.

use moatmq_e2e::Moatmq;
use moatmq_testkit::{v4, v5, TestCa, QUIET, WAIT};
use rumqttc::QoS;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// `moatmq serve` on `config`, written to `dir/broker.toml`.
fn serve(dir: &Path, config: &str, env: &[(&str, &str)]) -> Moatmq {
    let path = dir.join("broker.toml");
    std::fs::write(&path, config).unwrap();
    Moatmq::serve(&path, env)
}

fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(moatmq_e2e::moatmq())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run moatmq");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn listener(port: u16) -> String {
    format!("[[listener]]\nname = \"tcp\"\nbind = \"127.0.0.1:{port}\"\n")
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn passwd(dir: &Path, users: &[(&str, &str)]) {
    let text: String = users
        .iter()
        .map(|(u, p)| {
            format!(
                "{u}:{}\n",
                moatmq_auth::hash_password(p.as_bytes()).unwrap()
            )
        })
        .collect();
    std::fs::write(dir.join("passwd"), text).unwrap();
}

fn login(port: u16, id: &str, user: &str, pass: &str) -> v4::MqttOptions {
    let mut o = v4::options(addr(port), id);
    o.set_credentials(user, pass);
    o
}

#[test]
fn check_names_file_and_line_and_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.toml");
    std::fs::write(
        &path,
        "[[listener]]\nname = \"tcp\"\nbind = \"127.0.0.1:1883\"\nlisten_everywhere = true\n",
    )
    .unwrap();
    let (code, stderr) = run(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("broker.toml:4"), "{stderr}");

    std::fs::write(&path, listener(1883)).unwrap();
    let (code, stderr) = run(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{stderr}");
}

#[test]
fn serve_with_an_invalid_config_exits_64_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    // Held while `serve` runs: a broker that bound before refusing would exit 1 with
    // "cannot bind" instead of 64.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let path = dir.path().join("broker.toml");
    std::fs::write(
        &path,
        format!("{}[limits]\nmax_packet_size = \"big\"\n", listener(port)),
    )
    .unwrap();
    let (code, stderr) = run(&["serve", "-c", path.to_str().unwrap()]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("broker.toml:5"), "{stderr}");
    assert!(!stderr.contains("cannot bind"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_sends_v5_clients_0x8b_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!("{}allow_anonymous = true\n", listener(0));
    let mut m = serve(dir.path(), &config, &[]);
    let port = m.port("tcp");
    let mut c5 = v5::connected(addr(port), "c5").await;
    let mut c4 = v4::connected(addr(port), "c4").await;
    m.signal("-TERM");
    let ended = c5
        .closed_within(WAIT)
        .await
        .expect("v5 client disconnected");
    assert!(ended.contains("ServerShuttingDown"), "{ended}");
    assert!(c4.closed_within(WAIT).await.is_some());
    assert!(m.exit_within(WAIT).success());
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_the_password_file() {
    let dir = tempfile::tempdir().unwrap();
    passwd(dir.path(), &[("alice", "alice-pw")]);
    let config = format!("{}[auth]\npassword_file = \"passwd\"\n", listener(0));
    let m = serve(dir.path(), &config, &[]);
    let port = m.port("tcp");
    assert!(v4::connect(login(port, "b", "bob", "bob-pw"))
        .await
        .is_err());
    passwd(dir.path(), &[("alice", "alice-pw"), ("bob", "bob-pw")]);
    m.signal("-HUP");
    m.wait_for("configuration reloaded");
    let bob = v4::connect(login(port, "b", "bob", "bob-pw")).await;
    assert!(bob.is_ok(), "bob added by SIGHUP");
    // A broken file keeps the previous one in force.
    std::fs::write(dir.path().join("passwd"), "this is not a password file\n").unwrap();
    m.signal("-HUP");
    m.wait_for("configuration reloaded");
    assert!(v4::connect(login(port, "a", "alice", "alice-pw"))
        .await
        .is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_acl_reload_revokes_a_live_subscription() {
    let dir = tempfile::tempdir().unwrap();
    passwd(
        dir.path(),
        &[("alice", "alice-pw"), ("feeder", "feeder-pw")],
    );
    let acl = "user alice\ntopic read feed/#\nuser feeder\ntopic write feed/#\n";
    std::fs::write(dir.path().join("aclfile"), acl).unwrap();
    let config = format!(
        "{}[auth]\npassword_file = \"passwd\"\n[acl]\nfile = \"aclfile\"\n",
        listener(0)
    );
    let m = serve(dir.path(), &config, &[]);
    let port = m.port("tcp");
    let mut alice = v4::connect(login(port, "a", "alice", "alice-pw"))
        .await
        .unwrap();
    alice.subscribe_acked("feed/#").await;
    let feeder = v4::connect(login(port, "f", "feeder", "feeder-pw"))
        .await
        .unwrap();
    feeder
        .client
        .publish("feed/1", QoS::AtLeastOnce, false, "before")
        .await
        .unwrap();
    assert_eq!(alice.next_publish().await.payload, "before".as_bytes());

    std::fs::write(
        dir.path().join("aclfile"),
        "user feeder\ntopic write feed/#\n",
    )
    .unwrap();
    m.signal("-HUP");
    m.wait_for("configuration reloaded");
    feeder
        .client
        .publish("feed/2", QoS::AtLeastOnce, false, "after")
        .await
        .unwrap();
    assert!(
        alice.publish_within(QUIET).await.is_none(),
        "still delivered"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_picks_up_a_rotated_server_certificate() {
    use rumqttc::{TlsConfiguration, Transport};
    let dir = tempfile::tempdir().unwrap();
    let old_ca = TestCa::new("old ca");
    let new_ca = TestCa::new("new ca");
    old_ca.server(dir.path(), "server");
    let config = format!(
        "{}allow_anonymous = true\n[listener.tls]\ncert = \"server.crt\"\nkey = \"server.key\"\n",
        listener(0)
    );
    let m = serve(dir.path(), &config, &[]);
    let port = m.port("tcp");
    let trusting = |ca: &TestCa, id: &str| {
        let mut o = v4::options(addr(port), id);
        o.set_transport(Transport::Tls(TlsConfiguration::Simple {
            ca: ca.pem().as_bytes().to_vec(),
            alpn: None,
            client_auth: None,
        }));
        o
    };
    assert!(v4::connect(trusting(&old_ca, "o1")).await.is_ok());
    assert!(v4::connect(trusting(&new_ca, "n1")).await.is_err());
    new_ca.server(dir.path(), "server");
    m.signal("-HUP");
    m.wait_for("configuration reloaded");
    assert!(
        v4::connect(trusting(&new_ca, "n2")).await.is_ok(),
        "new certificate served"
    );
    assert!(v4::connect(trusting(&old_ca, "o2")).await.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_without_config_listens_on_loopback_1883() {
    // Needs 127.0.0.1:1883 free: if it is taken the broker exits and this fails, saying
    // so (it never passes against whatever else listens there).
    if let Err(e) = std::net::TcpListener::bind("127.0.0.1:1883") {
        panic!("127.0.0.1:1883 is taken ({e}): this test needs it free");
    }
    let mut m = Moatmq::spawn(&["serve"], &[]);
    let line = m.wait_for("listening");
    assert!(line.contains("addr=127.0.0.1:1883"), "{line}");
    let mut sub = v4::connected(addr(1883), "sub").await;
    sub.subscribe_acked("demo/#").await;
    let publ = v4::connected(addr(1883), "pub").await;
    publ.client
        .publish("demo/hello", QoS::AtLeastOnce, false, "world")
        .await
        .unwrap();
    assert_eq!(sub.next_publish().await.payload, "world".as_bytes());
    assert!(m.log().contains("anonymous"), "warning logged");
    m.signal("-TERM");
    assert!(m.exit_within(WAIT).success());
}

#[tokio::test(flavor = "multi_thread")]
async fn passwords_never_reach_the_log_at_trace_level() {
    let dir = tempfile::tempdir().unwrap();
    let good = "good-Sentinel-7f3a";
    let bad = "bad-Sentinel-91c2";
    passwd(dir.path(), &[("alice", good)]);
    let config = format!("{}[auth]\npassword_file = \"passwd\"\n", listener(0));
    let mut m = serve(dir.path(), &config, &[("RUST_LOG", "trace")]);
    let port = m.port("tcp");
    let ok = v4::connect(login(port, "a", "alice", good)).await;
    assert!(ok.is_ok());
    let mut o5 = v5::options(addr(port), "a5");
    o5.set_credentials("alice", good);
    assert!(v5::connect(o5).await.is_ok());
    assert!(v4::connect(login(port, "b", "alice", bad)).await.is_err());
    m.signal("-TERM");
    assert!(m.exit_within(WAIT).success());
    let log = m.final_log();
    assert!(log.contains("authentication failed"), "trace log captured");
    assert!(!log.contains("Sentinel"), "a password reached the log");
}

#[tokio::test(flavor = "multi_thread")]
async fn client_strings_cannot_forge_text_log_lines() {
    let dir = tempfile::tempdir().unwrap();
    passwd(dir.path(), &[("alice", "alice-pw")]);
    let config = format!("{}[auth]\npassword_file = \"passwd\"\n", listener(0));
    let mut m = serve(dir.path(), &config, &[]);
    let port = m.port("tcp");
    let forged = "FORGED INFO moatmq: admin logged in";
    // A client id and a username each carrying a line break and a bidi override.
    let id = format!("dev\n{forged}\u{202e}");
    let ok = v4::connect(login(port, &id, "alice", "alice-pw")).await;
    assert!(ok.is_ok(), "an odd but valid client id is accepted");
    let user = format!("mallory\r\n{forged}");
    assert!(v4::connect(login(port, "m", &user, "x")).await.is_err());
    drop(ok);
    m.signal("-TERM");
    assert!(m.exit_within(WAIT).success());
    let log = m.final_log();
    assert!(
        log.contains("dev\\nFORGED"),
        "client id logged, escaped:\n{log}"
    );
    assert!(log.contains("\\u{202e}"), "bidi override escaped:\n{log}");
    assert!(
        !log.lines().any(|l| l.starts_with("FORGED")),
        "a client string started a log line:\n{log}"
    );
    assert!(!log.contains('\u{202e}'), "raw bidi override in the log");
}

/// journald, `docker logs` and log files are not terminals: the text log carries no
/// colour escape codes there, with or without NO_COLOR.
#[test]
fn text_log_has_no_colour_codes_when_stderr_is_not_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("broker.toml"), listener(0)).unwrap();

    let mut child = Command::new(moatmq_e2e::moatmq())
        .args([
            "serve",
            "-c",
            dir.path().join("broker.toml").to_str().unwrap(),
        ])
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn moatmq");
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    while !seen.contains("listening") {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        seen.push_str(&line);
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        seen.contains("listening"),
        "the broker did not start:\n{seen}"
    );
    assert!(
        !seen.contains('\u{1b}'),
        "colour escape codes in a piped log:\n{seen:?}"
    );
}

/// A router that dies (a real panic, injected through the test-hooks feature the testkit
/// enables) makes the binary exit 70 within 5 s, with one ERROR line saying why.
#[test]
fn a_dead_router_exits_non_zero_within_5_s() {
    for fault in ["kill", "wedge"] {
        let dir = tempfile::tempdir().unwrap();
        let config = format!("{}allow_anonymous = true\n", listener(0));
        let path = dir.path().join("broker.toml");
        std::fs::write(&path, config).unwrap();
        let mut m = Moatmq::spawn(
            &["serve", "-c", path.to_str().unwrap()],
            &[("MOATMQ_TEST_ROUTER_FAULT", fault)],
        );
        let status = m.exit_within(Duration::from_secs(5) + Duration::from_secs(2));
        assert_eq!(status.code(), Some(70), "{fault}");
        let log = m.final_log();
        let errors: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("ERROR") && l.contains("router failed"))
            .collect();
        assert_eq!(errors.len(), 1, "{fault}: one ERROR line:\n{log}");
    }
}
