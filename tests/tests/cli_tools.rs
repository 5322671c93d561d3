//! The `moatmq` binary's tools, run as an operator would: `passwd`, `keygen`,
//! `retained list` / `rekey` / `accept`, `acl check` and `import-mosquitto`, each followed through
//! to a real `moatmq serve` child process that clients connect to (over TCP and mTLS).
//!
//! Brokers bind 127.0.0.1:0 and the tests read the bound addresses from the broker's
//! "listening" log lines; a [`Moatmq`] guard kills its child on drop, so a failing test
//! leaves no broker behind.

use moatmq_e2e::Moatmq;
use moatmq_testkit::wire::{self, Connect, Publish, Version};
use moatmq_testkit::{v4, Raw, TestCa, QUIET, WAIT};
use rumqttc::{ConnectReturnCode, ConnectionError, Packet, QoS, SubscribeReasonCode};
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// `moatmq ARGS` with no stdin and no retained key from the environment.
fn moatmq(args: &[&str]) -> Output {
    moatmq_with_stdin(args, "")
}

/// `moatmq ARGS` with `input` on stdin (a pipe, so never a terminal).
fn moatmq_with_stdin(args: &[&str], input: &str) -> Output {
    let mut child = Command::new(moatmq_e2e::moatmq())
        .args(args)
        .env_remove("MOATMQ_RETAINED_KEY")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run moatmq");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(input.as_bytes()).expect("write stdin");
    drop(stdin);
    child.wait_with_output().expect("moatmq output")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs `moatmq ARGS` and requires success.
#[track_caller]
fn ok(args: &[&str]) -> String {
    let o = moatmq(args);
    assert!(
        o.status.success(),
        "moatmq {args:?}: {}\n{}",
        o.status,
        stderr(&o)
    );
    stdout(&o)
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777
}

/// A client with a username and password; `Err` is the refusal.
async fn login(port: u16, id: &str, user: &str, pass: &str) -> Result<v4::Client, ConnectionError> {
    let mut o = v4::options(addr(port), id);
    o.set_credentials(user, pass);
    v4::connect(o).await
}

#[track_caller]
fn assert_refused(r: Result<v4::Client, ConnectionError>, what: &str) {
    match r {
        Err(ConnectionError::ConnectionRefused(
            ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized,
        )) => {}
        Err(e) => panic!("{what}: expected a refusing CONNACK, got {e}"),
        Ok(_) => panic!("{what}: connected but should have been refused"),
    }
}

/// Subscribes and returns the SUBACK's return code.
async fn subscribe(c: &mut v4::Client, filter: &str) -> SubscribeReasonCode {
    c.client
        .subscribe(filter, QoS::AtLeastOnce)
        .await
        .expect("send SUBSCRIBE");
    c.incoming(|p| match p {
        Packet::SubAck(ack) => Some(ack.return_codes[0]),
        _ => None,
    })
    .await
    .expect("SUBACK")
}

/// Publishes retained QoS 1 messages and waits for every PUBACK.
async fn publish_retained_acked(c: &mut v4::Client, messages: &[(&str, &str)]) {
    for (topic, payload) in messages {
        c.client
            .publish(*topic, QoS::AtLeastOnce, true, *payload)
            .await
            .expect("send PUBLISH");
    }
    for _ in messages {
        c.incoming(|p| matches!(p, Packet::PubAck(_)).then_some(()))
            .await
            .expect("PUBACK");
    }
}

/// The retained messages a fresh subscriber to `#` receives, sorted.
async fn retained_messages(port: u16) -> Vec<(String, String)> {
    let mut c = v4::connected(addr(port), "reader").await;
    assert!(matches!(
        subscribe(&mut c, "#").await,
        SubscribeReasonCode::Success(_)
    ));
    let mut got = Vec::new();
    while let Some(p) = c.publish_within(QUIET).await {
        assert!(p.retain, "{} was not retained", p.topic);
        got.push((
            p.topic.clone(),
            String::from_utf8_lossy(&p.payload).into_owned(),
        ));
    }
    got.sort();
    got
}

#[tokio::test]
async fn passwd_round_trip_then_the_broker_accepts_only_the_new_password() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("passwd");
    let f = path_str(&file);
    std::fs::write(
        &file,
        "# users of the test broker\n\n# keep this comment too\n",
    )
    .unwrap();
    // As a systemd install has it (root:moatmq 0640): the mode is kept by every update.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();

    let add = |user: &str, pass: &str| {
        let o = moatmq_with_stdin(&["passwd", f, user], &format!("{pass}\n"));
        assert!(o.status.success(), "passwd {user}: {}", stderr(&o));
        assert!(!stdout(&o).contains(pass) && !stderr(&o).contains(pass));
    };
    add("alice", "old password");
    add("bob", "bob's password");
    let first = std::fs::read_to_string(&file).unwrap();
    let alice_old = first
        .lines()
        .find(|l| l.starts_with("alice:"))
        .expect("alice added")
        .to_string();
    assert!(alice_old.starts_with("alice:$argon2id$"), "{alice_old}");
    assert!(!first.contains("old password"));

    add("alice", "new password");
    let text = std::fs::read_to_string(&file).unwrap();
    let alice: Vec<&str> = text.lines().filter(|l| l.starts_with("alice:")).collect();
    assert_eq!(alice.len(), 1, "updated in place, not added twice:\n{text}");
    assert_ne!(alice[0], alice_old, "the hash changed");

    ok(&["passwd", "--delete", f, "bob"]);
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(!text.contains("bob:"), "{text}");
    assert!(text.contains("alice:$argon2id$"));
    assert!(text.starts_with("# users of the test broker\n"), "{text}");
    assert!(text.contains("# keep this comment too\n"), "{text}");
    assert_eq!(mode(&file), 0o640);
    // An empty password is refused, and the file is left as it was.
    let o = moatmq_with_stdin(&["passwd", f, "carol"], "\n");
    assert!(!o.status.success());
    assert_eq!(std::fs::read_to_string(&file).unwrap(), text);

    let config = dir.path().join("broker.toml");
    std::fs::write(
        &config,
        "[[listener]]\nname = \"tcp\"\nbind = \"127.0.0.1:0\"\n\
         [auth]\nallow_anonymous = false\npassword_file = \"passwd\"\n",
    )
    .unwrap();
    ok(&["check", "-c", path_str(&config)]);
    let broker = Moatmq::serve(&config, &[]);
    let port = broker.port("tcp");
    let c = login(port, "alice-1", "alice", "new password")
        .await
        .expect("the new password is accepted");
    assert_eq!(c.connack.code, ConnectReturnCode::Success);
    assert_refused(
        login(port, "alice-2", "alice", "old password").await,
        "old password",
    );
    assert_refused(
        login(port, "bob-1", "bob", "bob's password").await,
        "deleted user",
    );
}

#[test]
fn keygen_writes_a_private_key_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("retained.key");
    let k = path_str(&key);
    ok(&["keygen", "--out", k]);
    assert_eq!(mode(&key), 0o600);
    let text = std::fs::read_to_string(&key).unwrap();
    let hex = text.trim_end();
    assert_eq!(hex.len(), 64, "32 bytes in hex");
    assert!(hex.bytes().all(|b| b.is_ascii_hexdigit()));

    let o = moatmq(&["keygen", "--out", k]);
    assert!(!o.status.success(), "an existing key must not be replaced");
    assert!(stderr(&o).contains("retained.key"), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&key).unwrap(), text, "unchanged");

    // `-` is stdout, not a file named `-`.
    let o = Command::new(moatmq_e2e::moatmq())
        .args(["keygen", "--out", "-"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let printed = stdout(&o);
    assert_eq!(printed.trim_end().len(), 64, "{printed}");
    assert!(printed.trim_end().bytes().all(|b| b.is_ascii_hexdigit()));
    assert_ne!(printed, text);
    assert!(!dir.path().join("-").exists(), "a file named - was written");

    // A second key is a different key.
    let other = dir.path().join("other.key");
    ok(&["keygen", "--out", path_str(&other)]);
    assert_ne!(std::fs::read_to_string(&other).unwrap(), text);
}

/// broker.toml for one anonymous listener on port 0 and a durable retained store.
fn retained_config(dir: &Path, key_file: &str) -> PathBuf {
    let config = dir.join("broker.toml");
    std::fs::write(
        &config,
        format!(
            "[[listener]]\nname = \"tcp\"\nbind = \"127.0.0.1:0\"\n\
             [auth]\nallow_anonymous = true\n\
             [retained]\npath = \"data/retained\"\nkey_file = \"{key_file}\"\n\
             autosave_interval = 0\n"
        ),
    )
    .unwrap();
    config
}

#[tokio::test]
async fn retained_survive_kill_9_list_and_rekey() {
    let dir = tempfile::tempdir().unwrap();
    ok(&["keygen", "--out", path_str(&dir.path().join("old.key"))]);
    let messages = [
        ("door/front", "locked"),
        ("ward7/bed3/vitals", "pulse=61"),
        ("plant/line2/state", "running"),
    ];
    let expected: Vec<(String, String)> = {
        let mut v: Vec<_> = messages
            .iter()
            .map(|(t, p)| (t.to_string(), p.to_string()))
            .collect();
        v.sort();
        v
    };

    let config = retained_config(dir.path(), "old.key");
    let broker = Moatmq::serve(&config, &[]);
    let port = broker.port("tcp");
    let mut c = v4::connected(addr(port), "device").await;
    publish_retained_acked(&mut c, &messages).await;
    // Acknowledged with autosave_interval = 0 means on disk: SIGKILL loses nothing.
    broker.kill();
    drop(c);

    let config = retained_config(dir.path(), "old.key");
    let broker = Moatmq::serve(&config, &[]);
    let port = broker.port("tcp");
    assert_eq!(retained_messages(port).await, expected, "after kill -9");
    broker.kill();

    let listed = ok(&["retained", "list", "-c", path_str(&config)]);
    for (topic, payload) in messages {
        let line = listed
            .lines()
            .find(|l| l.split('\t').next() == Some(topic))
            .unwrap_or_else(|| panic!("{topic} not listed:\n{listed}"));
        assert!(line.contains(&format!("{} bytes", payload.len())), "{line}");
        assert!(line.ends_with("\towner /anonymous"), "{line}");
        assert!(!listed.contains(payload), "list shows sizes, not payloads");
    }
    assert!(listed.contains("3 messages"), "{listed}");

    let new_key = dir.path().join("new.key");
    ok(&["keygen", "--out", path_str(&new_key)]);
    let out = ok(&[
        "retained",
        "rekey",
        "-c",
        path_str(&config),
        "--new-key",
        path_str(&new_key),
    ]);
    assert!(out.contains("re-encrypted 3 messages"), "{out}");

    let config = retained_config(dir.path(), "new.key");
    let broker = Moatmq::serve(&config, &[]);
    let port = broker.port("tcp");
    assert_eq!(retained_messages(port).await, expected, "after rekey");
    drop(broker);

    // The old key no longer opens the store: the broker refuses to start, saying why.
    let config = retained_config(dir.path(), "old.key");
    let (status, err) = serve_expecting_exit(&config);
    assert!(!status.success(), "old key: {status}\n{err}");
    assert!(err.contains("wrong key"), "{err}");
    assert!(!err.contains("listening"), "{err}");
}

/// A cluster node's stores are not rekeyed: the cluster's key marker in NATS would
/// refuse the node at its next start, and what the cluster keeps in NATS is sealed with
/// the old key. The rekey re-encrypted the node's stores and told the operator to use
/// the new key before.
#[tokio::test]
async fn store_rekey_refuses_a_cluster_nodes_config_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    ok(&["keygen", "--out", path_str(&dir.path().join("old.key"))]);
    ok(&["keygen", "--out", path_str(&dir.path().join("new.key"))]);
    let config = retained_config(dir.path(), "old.key");
    let broker = Moatmq::serve(&config, &[]);
    let mut c = v4::connected(addr(broker.port("tcp")), "device").await;
    publish_retained_acked(&mut c, &[("door/front", "locked")]).await;
    drop(broker);

    let node = dir.path().join("node.toml");
    let mut toml = std::fs::read_to_string(&config).unwrap();
    toml.push_str("[cluster]\nservers = [\"nats://127.0.0.1:4222\"]\nnode_name = \"node-a\"\n");
    std::fs::write(&node, toml).unwrap();
    for command in ["store", "retained"] {
        let new_key = dir.path().join("new.key");
        let o = moatmq(&[
            command,
            "rekey",
            "-c",
            path_str(&node),
            "--new-key",
            path_str(&new_key),
        ]);
        let err = stderr(&o);
        assert!(
            !o.status.success(),
            "{command} rekey of a cluster node: {err}"
        );
        assert!(
            err.contains("[cluster]") && err.contains("not supported"),
            "{err}"
        );
    }
    // Still under the old key.
    let listed = ok(&["retained", "list", "-c", path_str(&config)]);
    assert!(listed.contains("door/front"), "{listed}");
}

/// `moatmq serve -c CONFIG` that should fail to start: its exit status and stderr.
/// Panics (after killing it) if it is still running after 5 s.
#[tokio::test]
async fn truncated_store_refused_until_retained_accept() {
    let dir = tempfile::tempdir().unwrap();
    ok(&["keygen", "--out", path_str(&dir.path().join("k.key"))]);
    let config = retained_config(dir.path(), "k.key");
    let broker = Moatmq::serve(&config, &[]);
    let port = broker.port("tcp");
    let mut c = v4::connected(addr(port), "device").await;
    publish_retained_acked(&mut c, &[("door/front", "locked"), ("door/back", "open")]).await;
    drop(broker);
    drop(c);

    // Cut down to its bare 56-byte header: every record gone, nothing damaged.
    let log = dir.path().join("data/retained/retained.log");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&log)
        .unwrap()
        .set_len(56)
        .unwrap();
    let (status, err) = serve_expecting_exit(&config);
    assert!(!status.success(), "{status}\n{err}");
    assert!(
        err.contains("retained.log: 2 records after offset 56 are missing")
            && err.contains("moatmq retained accept"),
        "{err}"
    );
    assert!(!err.contains("listening"), "{err}");

    let out = ok(&["retained", "accept", "-c", path_str(&config)]);
    assert!(
        out.contains("accepting: ") && out.contains("accepted: 0 messages kept"),
        "{out}"
    );
    let out = ok(&["retained", "accept", "-c", path_str(&config)]);
    assert!(out.contains("nothing to accept"), "{out}");
    let broker = Moatmq::serve(&config, &[]);
    let port = broker.port("tcp");
    assert_eq!(retained_messages(port).await, vec![]);
    drop(broker);
}

fn serve_expecting_exit(config: &Path) -> (std::process::ExitStatus, String) {
    let mut m = Moatmq::spawn(&["serve", "-c", path_str(config)], &[]);
    let status = m.exit_within(Duration::from_secs(5));
    (status, m.final_log())
}

#[test]
fn acl_check_prints_the_decision_and_the_deciding_line() {
    let dir = tempfile::tempdir().unwrap();
    let acl = dir.path().join("aclfile");
    std::fs::write(
        &acl,
        "# anonymous clients\n\
         topic read public/#\n\
         \n\
         user alice\n\
         topic readwrite alice/#\n\
         topic deny alice/secret/#\n",
    )
    .unwrap();
    let a = path_str(&acl);
    let check = |user: Option<&str>, action: &str, topic: &str| {
        let mut args = vec!["acl", "check", "--acl", a];
        if let Some(u) = user {
            args.extend(["--user", u]);
        }
        args.extend([action, topic]);
        let o = moatmq(&args);
        let out = stdout(&o).trim_end().to_string();
        // Exit code 0 allow, 1 deny: scripts branch on it.
        let expected = if out.starts_with("allow") { 0 } else { 1 };
        assert_eq!(o.status.code(), Some(expected), "{args:?}: {out}");
        out
    };
    assert_eq!(
        check(Some("alice"), "write", "alice/kitchen/temp"),
        format!("allow ({a}:5)")
    );
    assert_eq!(
        check(Some("alice"), "subscribe", "alice/#"),
        format!("allow ({a}:5)"),
        "a deny on part of the filter is enforced per message"
    );
    assert_eq!(
        check(Some("alice"), "subscribe", "alice/secret/#"),
        format!("deny ({a}:6)")
    );
    assert_eq!(
        check(Some("alice"), "read", "alice/secret/pin"),
        format!("deny ({a}:6)")
    );
    assert_eq!(
        check(Some("alice"), "read", "alice/kitchen/temp"),
        format!("allow ({a}:5)")
    );
    assert_eq!(
        check(Some("bob"), "write", "alice/kitchen/temp"),
        "deny (no rule matched: default deny)"
    );
    assert_eq!(check(None, "read", "public/news"), format!("allow ({a}:2)"));
    assert_eq!(
        check(None, "write", "public/news"),
        "deny (no rule matched: default deny)"
    );
    // MQTT's names for the actions are accepted too.
    assert_eq!(
        check(Some("alice"), "publish", "alice/kitchen/temp"),
        format!("allow ({a}:5)")
    );
    assert_eq!(
        check(Some("alice"), "publish", "alice/secret/pin"),
        format!("deny ({a}:6)")
    );

    // Errors are 2 or more, never 0 or 1: a missing or invalid file, a bad action.
    let missing = dir.path().join("missing");
    let o = moatmq(&["acl", "check", "--acl", path_str(&missing), "read", "x"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("missing"), "{}", stderr(&o));
    let typo = dir.path().join("typo");
    std::fs::write(&typo, "user alice\ntopic readwrit alice/#\n").unwrap();
    let o = moatmq(&["acl", "check", "--acl", path_str(&typo), "read", "x"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("{}:2: unknown access word", path_str(&typo))),
        "{}",
        stderr(&o)
    );
    let o = moatmq(&["acl", "check", "--acl", a, "readwrite", "x"]);
    assert!(o.status.code().is_some_and(|c| c >= 2), "{:?}", o.status);
}

/// mosquitto.conf with a password listener and an mTLS listener whose certificate CN is
/// the username, a `mosquitto_passwd` file and an ACL file, converted and served.
#[tokio::test]
async fn import_mosquitto_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Written by the real mosquitto_passwd ($7$): alice 'correct horse', bob 'hunter2'.
    let passwd = d.join("passwd");
    std::fs::copy(
        moatmq_e2e::repo_root().join("crates/auth/testdata/mosquitto_passwd.txt"),
        &passwd,
    )
    .unwrap();
    std::fs::set_permissions(&passwd, std::fs::Permissions::from_mode(0o600)).unwrap();
    let acl = d.join("aclfile");
    std::fs::write(
        &acl,
        "user alice\n\
         topic readwrite alice/#\n\
         topic read sensors/#\n\
         \n\
         user bob\n\
         topic readwrite bob/#\n\
         \n\
         user sensor-7\n\
         topic write sensors/7/#\n",
    )
    .unwrap();
    let server_ca = TestCa::new("mosquitto server ca");
    let client_ca = TestCa::new("mosquitto client ca");
    let (server_crt, server_key) = server_ca.server(d, "server");
    let ca_crt = client_ca.write_ca(d, "client-ca.crt");
    let (client_crt, client_key) = client_ca.valid_client(d, "sensor-7", "sensor-7");

    // Ports of the Mosquitto file, checked in the import; the broker then binds port 0.
    let (port, tls_port) = (18830, 18831);
    let conf = d.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "# as an existing Mosquitto 2 installation would have it\n\
             per_listener_settings false\n\
             allow_anonymous false\n\
             password_file {passwd}\n\
             acl_file {acl}\n\
             \n\
             listener {port} 127.0.0.1\n\
             \n\
             listener {tls_port} 127.0.0.1\n\
             certfile {crt}\n\
             keyfile {key}\n\
             cafile {ca}\n\
             require_certificate true\n\
             use_identity_as_username true\n",
            passwd = passwd.display(),
            acl = acl.display(),
            crt = server_crt.display(),
            key = server_key.display(),
            ca = ca_crt.display(),
        ),
    )
    .unwrap();

    let config = d.join("broker.toml");
    let o = moatmq(&[
        "import-mosquitto",
        path_str(&conf),
        "--out",
        path_str(&config),
    ]);
    assert!(o.status.success(), "import: {}", stderr(&o));
    let toml = std::fs::read_to_string(&config).unwrap();
    for needle in [
        format!("bind = \"127.0.0.1:{port}\""),
        format!("bind = \"127.0.0.1:{tls_port}\""),
        "require_client_cert = true".to_string(),
        "identity = \"cn\"".to_string(),
        format!("password_file = \"{}\"", passwd.display()),
        format!("file = \"{}\"", acl.display()),
        "allow_anonymous = false".to_string(),
    ] {
        assert!(toml.contains(&needle), "{needle} missing in:\n{toml}");
    }
    ok(&["check", "-c", path_str(&config)]);
    let toml = toml
        .replace(&format!("127.0.0.1:{port}\""), "127.0.0.1:0\"")
        .replace(&format!("127.0.0.1:{tls_port}\""), "127.0.0.1:0\"");
    std::fs::write(&config, toml).unwrap();

    let broker = Moatmq::serve(&config, &[]);
    let (port, tls_port) = (
        broker.port(&format!("port-{port}")),
        broker.port(&format!("port-{tls_port}")),
    );
    // Same users, same passwords (mosquitto's $7$ hashes), same ACL.
    let mut alice = login(port, "alice-1", "alice", "correct horse")
        .await
        .expect("alice logs in with her Mosquitto password");
    assert_refused(
        login(port, "alice-2", "alice", "hunter2").await,
        "alice with bob's password",
    );
    assert!(matches!(
        subscribe(&mut alice, "alice/#").await,
        SubscribeReasonCode::Success(_)
    ));
    assert!(matches!(
        subscribe(&mut alice, "sensors/#").await,
        SubscribeReasonCode::Success(_)
    ));
    assert_eq!(
        subscribe(&mut alice, "bob/#").await,
        SubscribeReasonCode::Failure,
        "bob's topics are not alice's"
    );
    let bob = login(port, "bob-1", "bob", "hunter2")
        .await
        .expect("bob logs in");
    bob.client
        .publish("bob/inbox", QoS::AtLeastOnce, false, "for bob only")
        .await
        .unwrap();
    alice
        .client
        .publish("alice/notes", QoS::AtLeastOnce, false, "hello")
        .await
        .unwrap();
    let p = alice.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("alice/notes", &b"hello"[..])
    );

    // The mTLS listener: the certificate's CN is the username, no password.
    let mut o = v4::options(addr(tls_port), "sensor-7-conn");
    o.set_transport(rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Simple {
        ca: server_ca.pem().as_bytes().to_vec(),
        alpn: None,
        client_auth: Some((
            std::fs::read(&client_crt).unwrap(),
            std::fs::read(&client_key).unwrap(),
        )),
    }));
    let mut sensor = v4::connect(o)
        .await
        .expect("sensor-7 connects with its certificate");
    sensor
        .client
        .publish("sensors/7/temp", QoS::AtLeastOnce, false, "21.5")
        .await
        .unwrap();
    let p = alice.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("sensors/7/temp", &b"21.5"[..])
    );
    assert_eq!(
        subscribe(&mut sensor, "alice/#").await,
        SubscribeReasonCode::Failure,
        "sensor-7 may only write its own topics"
    );
    // Nothing else reached alice: not bob's message, not a refused one.
    assert!(alice.publish_within(QUIET).await.is_none());

    // Without a client certificate the TLS handshake is refused.
    let mut o = v4::options(addr(tls_port), "no-cert");
    o.set_transport(rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Simple {
        ca: server_ca.pem().as_bytes().to_vec(),
        alpn: None,
        client_auth: None,
    }));
    assert!(
        tokio::time::timeout(WAIT, v4::connect(o))
            .await
            .map_or(true, |r| r.is_err()),
        "a client without a certificate got in"
    );
}

#[test]
fn import_mosquitto_out_never_overwrites_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(&conf, "listener 1883 127.0.0.1\nmessage_size_limit 1000\n").unwrap();
    let out = dir.path().join("broker.toml");
    std::fs::write(&out, "# my hand-tuned config\n").unwrap();
    let (c, o) = (path_str(&conf), path_str(&out));
    let run = moatmq(&["import-mosquitto", c, "--out", o]);
    assert!(!run.status.success(), "an existing file was replaced");
    let err = stderr(&run);
    assert!(
        err.contains("broker.toml exists") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "# my hand-tuned config\n"
    );
    ok(&["import-mosquitto", c, "--out", o, "--force"]);
    let toml = std::fs::read_to_string(&out).unwrap();
    assert!(toml.contains("max_payload_size = 1000"), "{toml}");
    ok(&["check", "-c", o]);
}

#[test]
fn passwd_explains_why_a_wildcard_username_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("passwd");
    for user in ["team+1", "a/b", "x#"] {
        let o = moatmq_with_stdin(&["passwd", path_str(&file), user], "pw\n");
        assert!(!o.status.success(), "{user} was accepted");
        let err = stderr(&o);
        assert!(
            err.contains("wildcards") && err.contains("%u/#") && err.contains("'-' or '_'"),
            "{user}: {err}"
        );
    }
    assert!(!file.exists(), "nothing was written");
    let o = moatmq_with_stdin(&["passwd", path_str(&file), "team-1"], "pw\n");
    assert!(o.status.success(), "{}", stderr(&o));
}

/// At the default log level, ordinary traffic leaves only moatmq's own lines: no rustls
/// WARN for a client sending an IP address as SNI (mosquitto_pub does when connecting
/// by IP), no rumqttd ERROR for a link that already went away; disconnect reasons are
/// stable words, not Rust debug text.
#[tokio::test]
async fn ordinary_traffic_logs_no_noise_and_plain_disconnect_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = TestCa::new("noise ca");
    let (crt, key) = ca.server(d, "server");
    let ca_file = ca.write_ca(d, "ca.crt");
    let config = d.join("broker.toml");
    std::fs::write(
        &config,
        format!(
            "[[listener]]\nname = \"tcp\"\nbind = \"127.0.0.1:0\"\n\
             [[listener]]\nname = \"tls\"\nbind = \"127.0.0.1:0\"\n\
             [listener.tls]\ncert = \"{}\"\nkey = \"{}\"\n\
             [auth]\nallow_anonymous = true\n",
            crt.display(),
            key.display()
        ),
    )
    .unwrap();
    let served = Moatmq::serve(&config, &[]);
    let (port, tls_port) = (served.port("tcp"), served.port("tls"));
    for i in 0..3 {
        let mut c = v4::connected(addr(port), &format!("plain-{i}")).await;
        c.publish_acked("t", false, "x").await;
        c.client.disconnect().await.unwrap();
        assert!(c.closed_within(WAIT).await.is_some(), "plain-{i} closed");
    }
    // A client that goes away without DISCONNECT, and a session taken over.
    {
        let mut raw = Raw::tcp(addr(port)).await;
        raw.send(&Connect::new(Version::V4, "raw").keep_alive(60).encode())
            .await;
        raw.frame_within(WAIT).await.expect("CONNACK");
    }
    // CONNECT, publishes and DISCONNECT in one write, then gone.
    for i in 0..5 {
        let mut raw = Raw::tcp(addr(port)).await;
        let mut bytes = Connect::new(Version::V4, format!("rw{i}"))
            .keep_alive(60)
            .encode();
        for _ in 0..50 {
            bytes.extend(Publish::new(Version::V4, b"t", b"x").encode());
        }
        bytes.extend(wire::DISCONNECT);
        raw.send(&bytes).await;
        let _ = raw.bytes_until_closed(WAIT).await;
    }
    let first = v4::connected(addr(port), "twice").await;
    let _second = v4::connected(addr(port), "twice").await;
    drop(first);
    let o = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &tls_port.to_string(), "--cafile"])
        .arg(&ca_file)
        .args([
            "--insecure",
            "-i",
            "by-ip",
            "-t",
            "t",
            "-m",
            "over tls",
            "-q",
            "1",
        ])
        .output()
        .expect("mosquitto_pub (package mosquitto-clients) is installed");
    assert!(o.status.success(), "mosquitto_pub: {}", stderr(&o));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = served.log();
    for noise in [
        "Illegal SNI",
        "already gone",
        "ClientDisconnect",
        "Network(",
    ] {
        assert!(!log.contains(noise), "{noise} in the log:\n{log}");
    }
    assert!(
        log.contains("reason=\"client_disconnect\"") || log.contains("reason=client_disconnect"),
        "{log}"
    );
}
