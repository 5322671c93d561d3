//! `moatmq check` refuses what `moatmq serve` refuses, with the same message and the
//! same exit code (64 for a configuration or file problem), before any port is bound:
//! missing, swapped or mismatched TLS certificate and key, a missing, group-readable or
//! wrong retained-store key, overlapping bind addresses, missing password or ACL files. A
//! runtime failure (the port is taken) exits 1.

use moatmq_testkit::TestCa;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A port the test keeps bound while `serve` runs: a `serve` that bound its listeners
/// before refusing would fail on this port with "address in use" (exit 1) instead of
/// the refusal (exit 64) the tests expect.
fn held_port() -> (TcpListener, u16) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    let port = l.local_addr().expect("local addr").port();
    (l, port)
}

/// Runs `moatmq ARGS` (no retained key in the environment unless given) and returns
/// its exit code and stderr; kills it if it still runs after 10 s.
fn run(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let err_path = dir.path().join("stderr");
    let mut cmd = Command::new(moatmq_e2e::moatmq());
    cmd.args(args)
        .env_remove("MOATMQ_RETAINED_KEY")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err_path).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn moatmq");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "moatmq {args:?} kept running:\n{}",
                std::fs::read_to_string(&err_path).unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status.code(), std::fs::read_to_string(&err_path).unwrap())
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

/// `check` and `serve` on `config` both exit 64 with the same message, which contains
/// every one of `needles` and names no OS error twice. The callers hold the configured
/// port (see [`held_port`]), so exit 64 also shows that nothing was bound first.
#[track_caller]
fn both_refuse(dir: &Path, config: &str, needles: &[&str]) -> String {
    let path = write(dir, "broker.toml", config);
    let (code, check_err) = run(&["check", "-c", &path], &[]);
    assert_eq!(code, Some(64), "check: {check_err}");
    for needle in needles {
        assert!(check_err.contains(needle), "{needle:?} in {check_err}");
    }
    assert!(
        check_err.matches("os error").count() <= 1,
        "OS error repeated: {check_err}"
    );
    let (code, serve_err) = run(&["serve", "-c", &path], &[]);
    assert_eq!(code, Some(64), "serve: {serve_err}");
    assert_eq!(serve_err, check_err, "same message from serve and check");
    check_err
}

fn tls_config(port: u16, cert: &str, key: &str) -> String {
    format!(
        "[[listener]]\nname = \"secure\"\nbind = \"127.0.0.1:{port}\"\n\
         [listener.tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n"
    )
}

#[test]
fn tls_problems_are_found_by_check_as_by_serve() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_held, port) = held_port();
    let (cert, key) = TestCa::new("ca").server(d, "server");
    let (_, other_key) = TestCa::new("other").server(d, "other");
    let (cert, key, other_key) = (
        cert.to_str().unwrap(),
        key.to_str().unwrap(),
        other_key.to_str().unwrap(),
    );
    let missing = d.join("nothere.crt");
    let missing = missing.to_str().unwrap();

    both_refuse(
        d,
        &tls_config(port, missing, key),
        &[
            "listener secure: certificate ",
            "nothere.crt",
            "No such file",
        ],
    );
    // Swapped: the key file holds no certificate.
    both_refuse(
        d,
        &tls_config(port, key, cert),
        &["listener secure: certificate ", "no PEM certificate found"],
    );
    // A key that belongs to another certificate.
    both_refuse(
        d,
        &tls_config(port, cert, other_key),
        &["listener secure: certificate and key do not fit together"],
    );
    let (code, err) = run(
        &[
            "check",
            "-c",
            &write(d, "ok.toml", &tls_config(port, cert, key)),
        ],
        &[],
    );
    assert_eq!(code, Some(0), "{err}");
}

fn retained_config(port: u16, store: &str, key_file: Option<&str>) -> String {
    let key = key_file.map_or(String::new(), |k| format!("key_file = \"{k}\"\n"));
    format!(
        "[[listener]]\nname = \"tcp\"\nbind = \"127.0.0.1:{port}\"\nallow_anonymous = true\n\
         [retained]\npath = \"{store}\"\n{key}"
    )
}

#[test]
fn retained_key_problems_are_found_by_check_as_by_serve() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_held, port) = held_port();
    let store = d.join("store");
    let store = store.to_str().unwrap();

    both_refuse(
        d,
        &retained_config(port, store, Some("nothere.key")),
        &["retained-store key file ", "nothere.key", "No such file"],
    );
    both_refuse(
        d,
        &retained_config(port, store, None),
        &["[retained] needs a key: set MOATMQ_RETAINED_KEY or retained.key_file"],
    );
    let key = d.join("retained.key");
    let (code, err) = run(&["keygen", "--out", key.to_str().unwrap()], &[]);
    assert_eq!(code, Some(0), "{err}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    both_refuse(
        d,
        &retained_config(port, store, Some("retained.key")),
        &["retained.key is readable by group or others; run `chmod 600` on it"],
    );
    assert!(
        !Path::new(store).exists(),
        "check and serve created no store"
    );

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let ok = write(
        d,
        "ok.toml",
        &retained_config(port, store, Some("retained.key")),
    );
    let (code, err) = run(&["check", "-c", &ok], &[]);
    assert_eq!(code, Some(0), "{err}");
    // A store written under this key, then checked with another: the header says so.
    let (code, err) = run(&["retained", "list", "-c", &ok], &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(!Path::new(store).exists(), "list creates no store");
    moatmq_store::Store::open(
        Path::new(store),
        moatmq_store::RetainedKey::load(&key).unwrap(),
        moatmq_store::StoreLimits::UNLIMITED,
    )
    .unwrap();
    let other = d.join("other.key");
    let (code, err) = run(&["keygen", "--out", other.to_str().unwrap()], &[]);
    assert_eq!(code, Some(0), "{err}");
    both_refuse(
        d,
        &retained_config(port, store, Some("other.key")),
        &[
            "retained store: wrong key for retained store ",
            "retained.log",
        ],
    );
    // A session log written under another key is refused the same way.
    drop(
        moatmq_store::SessionLog::open(
            &d.join("sess"),
            moatmq_store::RetainedKey::load(&other).unwrap(),
            moatmq_store::SessionLimits::UNLIMITED,
        )
        .unwrap(),
    );
    let with_sessions = format!(
        "{}[sessions]\npath = \"sess\"\n",
        retained_config(port, store, Some("retained.key"))
    );
    both_refuse(d, &with_sessions, &["wrong key", "sessions.log"]);
    // The key in the environment (as the Kubernetes manifests give it) is enough.
    let hex = std::fs::read_to_string(&key).unwrap();
    let env_only = write(d, "env.toml", &retained_config(port, store, None));
    let (code, err) = run(
        &["check", "-c", &env_only],
        &[("MOATMQ_RETAINED_KEY", &hex)],
    );
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn file_and_bind_problems_are_found_by_check_as_by_serve() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_held, port) = held_port();
    let listener = format!("[[listener]]\nname = \"tcp\"\nbind = \"127.0.0.1:{port}\"\n");
    both_refuse(
        d,
        &format!("{listener}[auth]\npassword_file = \"nothere\"\n"),
        &["password file ", "nothere", "No such file"],
    );
    both_refuse(
        d,
        &format!("{listener}allow_anonymous = true\n[acl]\nfile = \"nothere\"\n"),
        &["ACL file ", "nothere", "No such file"],
    );
    both_refuse(
        d,
        &format!("{listener}allow_anonymous = true\n[[listener]]\nname = \"all\"\nbind = \"0.0.0.0:{port}\"\n"),
        &["broker.toml:7: listener[1].bind: same port on the same or a wildcard address as listener[0].bind"],
    );
    both_refuse(
        d,
        &format!("{listener}allow_anonymous = true\n[audit]\npath = \"nothere/audit.log\"\n"),
        &["audit log ", "nothere/audit.log", "No such file"],
    );
}

/// A config error names the line and key, the same from check and serve, and never the
/// value, which may be a secret.
#[test]
fn config_errors_name_line_and_key_but_never_the_value() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_held, port) = held_port();
    let listener = format!("[[listener]]\nname = \"tcp\"\nbind = \"127.0.0.1:{port}\"\n");
    for (config, needle) in [
        (
            format!("{listener}[metrics]\nbind = \"hunter2-secret\"\n"),
            "broker.toml:5: metrics.bind: must be an ip:port address",
        ),
        (
            format!("{listener}[limits]\nmax_connections = \"hunter2-secret\"\n"),
            "broker.toml:5: limits.max_connections: invalid type: string, expected usize",
        ),
        (
            format!("{listener}[log]\nformat = \"hunter2-secret\"\n"),
            "broker.toml:5: log.format: unknown value, expected `text` or `json`",
        ),
    ] {
        let err = both_refuse(d, &config, &[needle]);
        assert!(!err.contains("hunter2"), "the value leaked: {err}");
    }
}

/// A port already taken is a runtime failure: exit 1, which systemd retries.
#[test]
fn a_taken_port_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let path = write(
        dir.path(),
        "broker.toml",
        &format!(
            "[[listener]]\nname = \"tcp\"\nbind = \"127.0.0.1:{port}\"\nallow_anonymous = true\n"
        ),
    );
    let (code, err) = run(&["check", "-c", &path], &[]);
    assert_eq!(code, Some(0), "check binds nothing: {err}");
    let (code, err) = run(&["serve", "-c", &path], &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("listener tcp: cannot bind"), "{err}");
}

/// The unit and the docs state the one rule.
#[test]
fn systemd_unit_does_not_restart_on_exit_64() {
    let root = moatmq_e2e::repo_root().to_path_buf();
    let unit = std::fs::read_to_string(root.join("deploy/systemd/moatmq.service")).unwrap();
    assert!(unit
        .lines()
        .any(|l| l.trim() == "RestartPreventExitStatus=64"));
    // RestartPreventExitStatus applies to the main process only: the checks must run
    // in `serve` itself (they do, see above), not in an ExecStartPre.
    assert!(!unit.lines().any(|l| l.trim().starts_with("ExecStartPre=")));
    assert!(unit
        .lines()
        .any(|l| l.trim() == "ExecStart=/usr/local/bin/moatmq serve -c /etc/moatmq/broker.toml"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    assert!(
        readme.contains("exit code 64"),
        "README states the exit codes"
    );
}
