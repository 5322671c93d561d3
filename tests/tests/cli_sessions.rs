//! The session-store tools run as an operator would: `sessions list` and `sessions
//! accept` on a session log written beside the retained store, `store rekey` (and its
//! alias `retained rekey`) re-encrypting both stores, and `check` refusing a `[sessions]`
//! section that cannot work. The logs are written with the store crate, as the broker
//! writes them.

use moatmq_store::{
    QueuedMessage, RetainedKey, RetainedMessage, SessionKey, SessionLimits, SessionLog,
    SessionMeta, SessionStore, Store, StoreError, StoreLimits, SubscriptionOptions,
};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// `moatmq ARGS` without a key in the environment: exit code, stdout, stderr.
fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(moatmq_e2e::moatmq())
        .args(args)
        .env_remove("MOATMQ_RETAINED_KEY")
        .stdin(Stdio::null())
        .output()
        .expect("run moatmq");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `moatmq ARGS`, requires success and returns stdout.
#[track_caller]
fn ok(args: &[&str]) -> String {
    let (code, out, err) = run(args);
    assert_eq!(code, Some(0), "moatmq {args:?}: {err}");
    out
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// A key written by `moatmq keygen` into `dir`.
fn keygen(dir: &Path, name: &str) -> RetainedKey {
    let path = dir.join(name);
    ok(&["keygen", "--out", s(&path)]);
    RetainedKey::load(&path).unwrap()
}

/// broker.toml in `dir` with a `[retained]` store in `dir/data` under `key_file`, and
/// `extra` after it.
fn config(dir: &Path, key_file: &str, extra: &str) -> PathBuf {
    let path = dir.join("broker.toml");
    std::fs::write(
        &path,
        format!(
            "[[listener]]\nname = \"tcp\"\nbind = \"127.0.0.1:0\"\n\
             [retained]\npath = \"data\"\nkey_file = \"{key_file}\"\n{extra}"
        ),
    )
    .unwrap();
    path
}

fn key_of(owner: Option<&str>, client_id: &str) -> SessionKey {
    SessionKey {
        owner: owner.map(str::to_owned),
        client_id: client_id.to_owned(),
    }
}

fn message(topic: &str, payload: &str) -> QueuedMessage {
    QueuedMessage {
        topic: topic.into(),
        payload: payload.to_owned().into(),
        qos: 1,
        retain: false,
        properties: None,
        expires_at: None,
    }
}

/// A session log in `dir`, as a broker leaves it: alice's device offline with two
/// queued messages (one of them sent, unacknowledged), an anonymous client connected,
/// and a client id with a terminal escape in it.
fn write_sessions(dir: &Path, key: RetainedKey) -> SessionLog {
    let mut log = SessionLog::open(dir, key, SessionLimits::UNLIMITED).unwrap();
    let now = moatmq_store::now_unix();
    let subscriptions = ["alice/#", "alice/cmd"]
        .into_iter()
        .map(|f| (f.to_owned(), SubscriptionOptions::default()))
        .collect();
    let alice = key_of(Some("alice"), "alice-phone");
    log.put_session(
        &alice,
        SessionMeta {
            protocol: 5,
            expiry_interval: 3600,
            disconnected_at: Some(now - 600),
            subscriptions,
        },
    )
    .unwrap();
    for (topic, payload) in [("alice/door", "secret-payload"), ("alice/cmd", "open")] {
        log.enqueue(&alice, message(topic, payload)).unwrap();
    }
    log.enqueue(&alice, message("alice/x", "y")).unwrap();
    log.mark_sent(&alice, 2, 7).unwrap();
    let connected = SessionMeta {
        protocol: 4,
        expiry_interval: 60,
        ..SessionMeta::default()
    };
    log.put_session(&key_of(None, "sensor-1"), connected.clone())
        .unwrap();
    log.put_session(&key_of(Some("mallory"), "evil\x1b[2J"), connected)
        .unwrap();
    log.commit().unwrap();
    log
}

#[test]
fn sessions_list_reads_the_log_beside_the_retained_store_without_writing() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "k.key");
    let config = config(dir.path(), "k.key", "");
    let data = dir.path().join("data");

    // Nothing stored yet: nothing listed, nothing created.
    let out = ok(&["sessions", "list", "-c", s(&config)]);
    assert!(out.contains("0 sessions"), "{out}");
    assert!(!data.exists(), "list created the store folder");

    // Listed while the log is open (a running broker), from its last commit.
    let mut log = write_sessions(&data, key);
    log.put_session(&key_of(None, "uncommitted"), SessionMeta::default())
        .unwrap();
    let files = |name: &str| std::fs::read(data.join(name)).unwrap();
    let before = (files("sessions.log"), files("sessions.log.hwm"));
    let out = ok(&["sessions", "list", "-c", s(&config)]);
    assert_eq!(before, (files("sessions.log"), files("sessions.log.hwm")));
    let line = |id: &str| {
        out.lines()
            .find(|l| l.split('\t').next() == Some(id))
            .unwrap_or_else(|| panic!("{id} not listed:\n{out}"))
            .to_owned()
    };
    let alice = line("alice-phone");
    for needle in [
        "\towner alice\t",
        "\t2 subscriptions\t",
        "\t2 queued\t",
        "\t1 in flight\t",
        "\texpires in ",
    ] {
        assert!(alice.contains(needle), "{needle:?} in {alice:?}");
    }
    assert!(line("sensor-1").contains("\towner (anonymous)\t"), "{out}");
    assert!(line("sensor-1").contains("\tconnected"), "{out}");
    // The escape is shown, not sent to the terminal.
    assert!(!out.contains('\x1b'), "{out:?}");
    line("evil\\u{1b}[2J");
    assert!(!out.contains("uncommitted"), "{out}");
    assert!(
        !out.contains("secret-payload"),
        "list shows counts, not payloads"
    );
    assert!(
        out.contains("3 sessions, 2 queued messages, 1 in flight"),
        "{out}"
    );
}

#[test]
fn sessions_commands_say_why_without_durable_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.toml");
    std::fs::write(
        &path,
        "[[listener]]\nname = \"tcp\"\nbind = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let (code, _, err) = run(&["sessions", "list", "-c", s(&path)]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("persistent sessions are kept in memory only"),
        "{err}"
    );
    keygen(dir.path(), "k.key");
    let path = config(dir.path(), "k.key", "[sessions]\nenabled = false\n");
    let (code, _, err) = run(&["sessions", "accept", "-c", s(&path)]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("durable sessions are off"), "{err}");
}

#[test]
fn check_refuses_durable_sessions_without_a_retained_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.toml");
    std::fs::write(
        &path,
        "[[listener]]\nname = \"tcp\"\nbind = \"127.0.0.1:0\"\n\n[sessions]\nenabled = true\n",
    )
    .unwrap();
    let (code, _, err) = run(&["check", "-c", s(&path)]);
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.starts_with(&format!(
            "{}:6: sessions.enabled: durable sessions need a [retained] section",
            path.display()
        )),
        "{err}"
    );
}

#[test]
fn sessions_accept_takes_a_truncated_log_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "k.key");
    let config = config(dir.path(), "k.key", "");
    let data = dir.path().join("data");
    let (code, _, err) = run(&["sessions", "accept", "-c", s(&config)]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("no session store at"), "{err}");
    drop(write_sessions(&data, key.clone()));

    // Cut to its bare 56-byte header: every record gone, nothing damaged.
    let log = data.join("sessions.log");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&log)
        .unwrap()
        .set_len(56)
        .unwrap();
    let refused = SessionLog::open(&data, key.clone(), SessionLimits::UNLIMITED).unwrap_err();
    assert!(matches!(refused, StoreError::Truncated { .. }), "{refused}");
    assert!(
        refused.to_string().contains("moatmq sessions accept"),
        "{refused}"
    );
    let out = ok(&["sessions", "accept", "-c", s(&config)]);
    assert!(
        out.contains("accepting: ") && out.contains("accepted: 0 sessions kept"),
        "{out}"
    );
    let out = ok(&["sessions", "accept", "-c", s(&config)]);
    assert!(out.contains("nothing to accept"), "{out}");
    assert!(SessionLog::open(&data, key, SessionLimits::UNLIMITED)
        .unwrap()
        .is_empty());
}

#[test]
fn store_rekey_reencrypts_both_stores_and_finishes_after_a_partial_run() {
    let dir = tempfile::tempdir().unwrap();
    let old = keygen(dir.path(), "old.key");
    let data = dir.path().join("data");
    let (mut retained, _) = Store::open(&data, old.clone(), StoreLimits::UNLIMITED).unwrap();
    retained
        .set(RetainedMessage {
            topic: "door/front".into(),
            payload: b"locked".to_vec(),
            qos: 1,
            properties: None,
            expires_at: None,
            owner: None,
        })
        .unwrap();
    retained.flush().unwrap();
    drop(retained);
    drop(write_sessions(&data, old.clone()));
    let new_path = dir.path().join("new.key");
    let new = keygen(dir.path(), "new.key");
    let config = config(dir.path(), "old.key", "");

    let out = ok(&[
        "store",
        "rekey",
        "-c",
        s(&config),
        "--new-key",
        s(&new_path),
    ]);
    assert!(out.contains("re-encrypted 1 messages"), "{out}");
    assert!(out.contains("re-encrypted 3 sessions"), "{out}");
    assert_eq!(
        SessionLog::open(&data, new.clone(), SessionLimits::UNLIMITED)
            .unwrap()
            .len(),
        3
    );
    assert!(matches!(
        SessionLog::open(&data, old.clone(), SessionLimits::UNLIMITED).unwrap_err(),
        StoreError::WrongKey { .. }
    ));
    let listed = ok(&[
        "sessions",
        "list",
        "-c",
        s(&self::config(dir.path(), "new.key", "")),
    ]);
    assert!(listed.contains("3 sessions"), "{listed}");

    // A run that stopped after the retained store: the session log is put back under
    // the old key, and `retained rekey` (the alias) finishes the job.
    moatmq_store::rekey_sessions(&data, new.clone(), &old).unwrap();
    let config = self::config(dir.path(), "old.key", "");
    let out = ok(&[
        "retained",
        "rekey",
        "-c",
        s(&config),
        "--new-key",
        s(&new_path),
    ]);
    assert!(
        out.contains("the retained store is under the new key already"),
        "{out}"
    );
    assert!(out.contains("re-encrypted 3 sessions"), "{out}");
    let (store, messages) = Store::open(&data, new.clone(), StoreLimits::UNLIMITED).unwrap();
    assert_eq!(messages.len(), 1);
    drop(store);
    assert_eq!(
        SessionLog::open(&data, new, SessionLimits::UNLIMITED)
            .unwrap()
            .len(),
        3
    );
}
