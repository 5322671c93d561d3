//! `import_mosquitto`: one test per converted option, the warnings for the rest, and two
//! real files (Debian's default mosquitto.conf and a per-listener one). Every produced
//! TOML must load with `Config::parse`.

use moatmq_config::{import_mosquitto, CertIdentity, Config, ConfigError, ImportReport, Protocol};
use std::path::Path;

const CONF: &str = "/etc/mosquitto/mosquitto.conf";

fn import(text: &str) -> (Config, ImportReport) {
    let report = import_mosquitto(text, Path::new(CONF)).expect("import");
    let config = Config::parse(Path::new("/etc/moatmq/broker.toml"), &report.toml)
        .unwrap_or_else(|e| panic!("{e}\n{}", report.toml));
    (config, report)
}

fn warned(report: &ImportReport, needle: &str) -> bool {
    report.warnings.iter().any(|w| w.contains(needle))
}

#[test]
fn no_listener_is_local_only_like_mosquitto() {
    let (c, r) = import("");
    assert_eq!(c.listener.len(), 1);
    assert_eq!(c.listener[0].bind, "127.0.0.1:1883");
    assert!(c.anonymous_allowed(&c.listener[0]));
    assert!(!c.auth.allow_anonymous);
    assert!(warned(&r, "local-only"), "{:?}", r.warnings);
}

#[test]
fn local_only_keeps_an_explicit_allow_anonymous_false() {
    let (c, _) = import("allow_anonymous false\n");
    assert!(!c.anonymous_allowed(&c.listener[0]));
}

#[test]
fn port_and_bind_address_make_the_default_listener() {
    let (c, r) = import("port 1884\n");
    assert_eq!(c.listener[0].bind, "0.0.0.0:1884");
    assert!(!c.anonymous_allowed(&c.listener[0]));
    assert!(warned(&r, "IPv6"));
    let (c, _) = import("bind_address 10.0.0.5\nport 1884\n");
    assert_eq!(c.listener[0].bind, "10.0.0.5:1884");
}

#[test]
fn a_listener_option_alone_makes_mosquitto_listen_everywhere() {
    // Seen with mosquitto 2.0.11: `max_connections 10` alone opens 0.0.0.0:1883.
    let (c, _) = import("max_connections 10\n");
    assert_eq!(c.listener[0].bind, "0.0.0.0:1883");
    assert!(!c.anonymous_allowed(&c.listener[0]));
    assert_eq!(c.limits.max_connections, 10);
}

#[test]
fn listeners_with_hosts() {
    let (c, r) = import("listener 1883 localhost\nlistener 1884 ::1\nlistener 1885 broker.lan\n");
    let binds: Vec<&str> = c.listener.iter().map(|l| l.bind.as_str()).collect();
    assert_eq!(binds, ["127.0.0.1:1883", "[::1]:1884", "127.0.0.1:1885"]);
    assert!(warned(&r, "host names"));
    assert!(!r.toml.contains("broker.lan"), "host names are not echoed");
}

#[test]
fn listener_names_are_unique() {
    let (c, _) = import("listener 1883 127.0.0.1\nlistener 1883 ::1\n");
    assert_eq!(c.listener[0].name, "port-1883");
    assert_eq!(c.listener[1].name, "port-1883-2");
}

#[test]
fn protocol_websockets_becomes_ws() {
    let (c, r) = import("listener 9001 127.0.0.1\nprotocol websockets\n");
    assert_eq!(c.listener[0].protocol, Protocol::Ws);
    // Mosquitto accepts any path: clients on / or /ws keep working.
    assert_eq!(c.listener[0].ws_paths(), vec!["*".to_string()]);
    assert!(!warned(&r, "/mqtt"));
    let (c, _) = import("listener 1883 127.0.0.1\nprotocol mqtt\n");
    assert_eq!(c.listener[0].protocol, Protocol::Mqtt);
}

#[test]
fn certfile_and_keyfile_become_tls() {
    let (c, _) = import("listener 8883\ncertfile /c/server.crt\nkeyfile /c/server.key\n");
    let tls = c.listener[0].tls.as_ref().unwrap();
    assert_eq!(tls.cert, Path::new("/c/server.crt"));
    assert_eq!(tls.key, Path::new("/c/server.key"));
    assert!(tls.client_ca.is_none());
}

#[test]
fn certfile_without_keyfile_stays_plaintext_with_a_warning() {
    let (c, r) = import("listener 8883\ncertfile /c/server.crt\n");
    assert!(c.listener[0].tls.is_none());
    assert!(warned(&r, "both certfile and keyfile"));
}

#[test]
fn require_certificate_with_cafile_is_mtls() {
    let (c, _) = import(
        "listener 8883\ncertfile /c/s.crt\nkeyfile /c/s.key\ncafile /c/ca.crt\nrequire_certificate true\n",
    );
    let tls = c.listener[0].tls.as_ref().unwrap();
    assert_eq!(tls.client_ca.as_deref(), Some(Path::new("/c/ca.crt")));
    assert!(tls.require_client_cert);
    assert_eq!(tls.identity, CertIdentity::None);
}

#[test]
fn cafile_without_require_certificate_asks_for_no_client_certificate() {
    let (c, r) = import("listener 8883\ncertfile /c/s.crt\nkeyfile /c/s.key\ncafile /c/ca.crt\n");
    assert!(c.listener[0].tls.as_ref().unwrap().client_ca.is_none());
    assert!(warned(&r, "cafile without require_certificate"));
}

#[test]
fn use_identity_as_username_becomes_identity_cn() {
    let mtls = "listener 8883\ncertfile /c/s.crt\nkeyfile /c/s.key\ncafile /c/ca.crt\nrequire_certificate true\n";
    let (c, _) = import(&format!("{mtls}use_identity_as_username true\n"));
    assert_eq!(
        c.listener[0].tls.as_ref().unwrap().identity,
        CertIdentity::Cn
    );
    let (c, r) = import(
        "listener 8883\ncertfile /c/s.crt\nkeyfile /c/s.key\nuse_identity_as_username true\n",
    );
    assert_eq!(
        c.listener[0].tls.as_ref().unwrap().identity,
        CertIdentity::None
    );
    assert!(warned(&r, "use_identity_as_username needs"));
}

#[test]
fn allow_anonymous_is_global_without_per_listener_settings() {
    let (c, _) = import("listener 1883 127.0.0.1\nallow_anonymous true\nlistener 1884 127.0.0.1\n");
    assert!(c.auth.allow_anonymous);
    assert!(c.listener.iter().all(|l| l.allow_anonymous.is_none()));
}

#[test]
fn per_listener_settings_keeps_allow_anonymous_per_listener() {
    let (c, _) = import(
        "per_listener_settings true\nlistener 1883 127.0.0.1\nallow_anonymous true\nlistener 1884 127.0.0.1\n",
    );
    assert!(!c.auth.allow_anonymous);
    assert!(c.anonymous_allowed(&c.listener[0]));
    assert!(!c.anonymous_allowed(&c.listener[1]));
}

#[test]
fn password_file_and_acl_file_are_pointed_at() {
    let (c, _) =
        import("listener 1883\npassword_file /etc/mosquitto/passwd\nacl_file /etc/mosquitto/acl\n");
    assert_eq!(
        c.auth.password_file.as_deref(),
        Some(Path::new("/etc/mosquitto/passwd"))
    );
    assert_eq!(c.acl.file.as_deref(), Some(Path::new("/etc/mosquitto/acl")));
}

#[test]
fn relative_paths_are_anchored_at_the_mosquitto_conf_folder() {
    let (c, r) = import("listener 1883\npassword_file passwd\n");
    assert_eq!(
        c.auth.password_file.as_deref(),
        Some(Path::new("/etc/mosquitto/passwd"))
    );
    assert!(warned(&r, "relative paths"));
}

#[test]
fn different_per_listener_password_files_keep_the_first_and_warn() {
    let (c, r) = import(
        "per_listener_settings true\nlistener 1883\npassword_file /a\nlistener 1884\npassword_file /b\n",
    );
    assert_eq!(c.auth.password_file.as_deref(), Some(Path::new("/a")));
    assert!(warned(&r, "different password files"));
}

#[test]
fn persistence_becomes_an_encrypted_retained_store() {
    let (c, r) = import(
        "persistence true\npersistence_location /var/lib/mosquitto/\nautosave_interval 30\n",
    );
    let ret = c.retained.as_ref().unwrap();
    assert_eq!(ret.path, Path::new("/var/lib/mosquitto/moatmq-retained"));
    assert_eq!(ret.key_file.as_deref(), Some(Path::new("retained.key")));
    assert_eq!(ret.autosave_interval, 30);
    assert!(warned(&r, "moatmq keygen --out"), "{:?}", r.warnings);
    assert!(warned(&r, "not migrated"));
    assert!(warned(&r, "persistent sessions start over"));
    // Persistent sessions are durable beside the retained store, with its interval.
    let s = c.sessions().unwrap();
    assert_eq!(s.path, ret.path);
    assert_eq!(s.autosave_interval, 30);
    // The folder named holds moatmq's own files, not mosquitto.db.
    assert!(warned(
        &r,
        "persistence_location: moatmq writes its own files"
    ));
    // persistence_file has no equivalent.
    let (_, r) = import("persistence true\npersistence_file m.db\n");
    assert!(
        warned(&r, "persistence_file: not carried over"),
        "{:?}",
        r.warnings
    );
}

#[test]
fn persistence_off_keeps_retained_in_memory() {
    let (c, r) = import("persistence false\nautosave_interval 30\n");
    assert!(c.retained.is_none());
    assert!(warned(&r, "persistence is off"));
}

#[test]
fn autosave_interval_zero_keeps_the_default() {
    let (c, r) = import("persistence true\nautosave_interval 0\n");
    assert_eq!(c.retained.unwrap().autosave_interval, 1);
    assert!(warned(&r, "autosave_interval 0"));
}

#[test]
fn max_packet_size_is_carried_and_capped() {
    let (c, _) = import("max_packet_size 65536\n");
    assert_eq!(c.limits.max_packet_size, 65536);
    let (c, _) = import("max_packet_size 999999999\n");
    assert_eq!(c.limits.max_packet_size, 268_435_455);
    let (c, r) = import("max_packet_size 0\n");
    assert_eq!(c.limits.max_packet_size, 1_048_576);
    assert!(warned(&r, "max_packet_size 0"));
}

#[test]
fn max_connections_per_listener_is_summed() {
    let (c, r) = import("listener 1883\nmax_connections 10\nlistener 1884\nmax_connections 5\n");
    assert_eq!(c.limits.max_connections, 15);
    assert!(warned(&r, "the sum"));
    let (c, r) = import("listener 1883\nmax_connections 10\nlistener 1884\n");
    assert_eq!(c.limits.max_connections, 10_000);
    assert!(warned(&r, "not every listener"));
    let (c, _) = import("listener 1883\nmax_connections -1\n");
    assert_eq!(c.limits.max_connections, 10_000);
}

#[test]
fn every_other_option_is_named_once_with_a_reason() {
    let (_, r) = import(
        "pid_file /run/m.pid\nuser mosquitto\nlog_dest stderr\nlog_dest syslog\n\
         listener 1883\nmount_point tenant/\npsk_hint x\nauth_plugin /x.so\nauth_opt_host db\nfrobnicate 1\n",
    );
    for (opt, why) in [
        ("pid_file", "pid file"),
        ("user", "unprivileged"),
        ("log_dest", "[log]"),
        ("mount_point", "ACLs"),
        ("psk_hint", "pre-shared"),
        ("auth_plugin", "plugins"),
        ("auth_opt_host", "plugins"),
        ("frobnicate", "not a Mosquitto 2.x option"),
    ] {
        let w: Vec<_> = r
            .warnings
            .iter()
            .filter(|w| w.contains(&format!(": {opt}: ")))
            .collect();
        assert_eq!(w.len(), 1, "{opt}: {:?}", r.warnings);
        assert!(w[0].contains(why), "{}", w[0]);
        assert!(w[0].starts_with(CONF), "{}", w[0]);
    }
    assert!(
        warned(&r, "mosquitto.conf:3: log_dest"),
        "first line is named"
    );
}

#[test]
fn bridges_are_one_warning() {
    let (c, r) = import(
        "connection cloud\naddress cloud.example:8883\ntopic # both 0\nremote_username u\nlistener 1883\n",
    );
    assert_eq!(c.listener.len(), 1);
    assert!(warned(&r, "bridges are not supported"));
    assert!(!warned(&r, "remote_username"));
    assert!(!warned(&r, ": topic:"));
}

#[test]
fn warnings_are_repeated_as_comments_and_never_echo_values() {
    let (_, r) = import("keyfile_password hunter2\nlistener 1883\n");
    assert!(r.toml.contains("# warning: "));
    assert!(!r.toml.contains("hunter2"));
    assert!(!r.warnings.iter().any(|w| w.contains("hunter2")));
}

#[test]
fn values_mosquitto_refuses_are_errors_with_file_and_line() {
    for (text, line, reason) in [
        (
            "\nallow_anonymous yes\n",
            2,
            "allow_anonymous: expected true or false",
        ),
        (
            "listener 99999\n",
            1,
            "listener: expected a port number 0-65535",
        ),
        (
            "listener 1883\nprotocol mqtts\n",
            2,
            "protocol: expected mqtt or websockets",
        ),
        (
            "max_connections many\n",
            1,
            "max_connections: expected a whole number",
        ),
        ("password_file\n", 1, "password_file: a value is required"),
    ] {
        let err = import_mosquitto(text, Path::new(CONF)).unwrap_err();
        match &err {
            ConfigError::Syntax {
                line: l, reason: r, ..
            } => {
                assert_eq!((*l, r.as_str()), (line, reason), "{text:?}")
            }
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().starts_with(&format!("{CONF}:{line}: ")));
    }
}

#[test]
fn include_dir_files_are_read_in_name_order() {
    let dir = tempfile::tempdir().unwrap();
    let conf_d = dir.path().join("conf.d");
    std::fs::create_dir(&conf_d).unwrap();
    std::fs::write(conf_d.join("b.conf"), "listener 1884 127.0.0.1\n").unwrap();
    std::fs::write(conf_d.join("a.conf"), "listener 1883 127.0.0.1\n").unwrap();
    std::fs::write(conf_d.join("README"), "listener 1\n").unwrap();
    let conf = dir.path().join("mosquitto.conf");
    let r = import_mosquitto("include_dir conf.d\n", &conf).unwrap();
    let c = Config::parse(&dir.path().join("broker.toml"), &r.toml).unwrap();
    let binds: Vec<&str> = c.listener.iter().map(|l| l.bind.as_str()).collect();
    assert_eq!(binds, ["127.0.0.1:1883", "127.0.0.1:1884"]);

    let r = import_mosquitto("include_dir /nonexistent/conf.d\n", &conf).unwrap();
    assert!(warned(&r, "include_dir: not carried over"));
}

fn testdata(name: &str) -> (std::path::PathBuf, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/mosquitto")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    (path, text)
}

#[test]
fn debian_default_mosquitto_conf() {
    // Debian 12's /etc/mosquitto/mosquitto.conf (package mosquitto 2.0.11). Its
    // include_dir is absolute; on a machine without that folder it is only a warning,
    // and Debian ships it holding nothing but a README.
    let (path, text) = testdata("debian-default.conf");
    let r = import_mosquitto(&text, &path).unwrap();
    let c = Config::parse(Path::new("/etc/moatmq/broker.toml"), &r.toml)
        .unwrap_or_else(|e| panic!("{e}\n{}", r.toml));
    assert_eq!(c.listener.len(), 1);
    assert_eq!(c.listener[0].bind, "127.0.0.1:1883");
    assert!(c.anonymous_allowed(&c.listener[0]));
    let ret = c.retained.as_ref().unwrap();
    assert_eq!(ret.path, Path::new("/var/lib/mosquitto/moatmq-retained"));
    for opt in ["pid_file", "log_dest"] {
        assert!(
            warned(&r, &format!(": {opt}: not carried over")),
            "{:?}",
            r.warnings
        );
    }
    assert!(warned(&r, "moatmq keygen"));
}

#[test]
fn per_listener_settings_with_two_listeners() {
    let (path, text) = testdata("per-listener.conf");
    let r = import_mosquitto(&text, &path).unwrap();
    let c = Config::parse(Path::new("/etc/moatmq/broker.toml"), &r.toml)
        .unwrap_or_else(|e| panic!("{e}\n{}", r.toml));
    assert_eq!(c.listener.len(), 2);
    let (local, tls) = (&c.listener[0], &c.listener[1]);
    assert_eq!(local.bind, "127.0.0.1:1883");
    assert!(c.anonymous_allowed(local));
    assert!(local.tls.is_none());
    assert_eq!(tls.bind, "0.0.0.0:8883");
    assert!(!c.anonymous_allowed(tls));
    let t = tls.tls.as_ref().unwrap();
    assert_eq!(t.cert, Path::new("/etc/mosquitto/certs/server.crt"));
    assert_eq!(
        t.client_ca.as_deref(),
        Some(Path::new("/etc/mosquitto/ca_certificates/ca.crt"))
    );
    assert!(t.require_client_cert);
    assert_eq!(t.identity, CertIdentity::Cn);
    assert_eq!(
        c.auth.password_file.as_deref(),
        Some(Path::new("/etc/mosquitto/passwd"))
    );
    assert_eq!(
        c.acl.file.as_deref(),
        Some(Path::new("/etc/mosquitto/aclfile"))
    );
    assert_eq!(c.limits.max_connections, 1100);
    assert_eq!(c.limits.max_packet_size, 65536);
    assert_eq!(c.retained.as_ref().unwrap().autosave_interval, 60);
    for opt in ["log_dest", "log_type", "tls_version"] {
        assert!(
            warned(&r, &format!(": {opt}: not carried over")),
            "{:?}",
            r.warnings
        );
    }
}

#[test]
fn rate_limits_are_off_as_in_mosquitto_with_a_comment() {
    let (c, r) = import("listener 1883\n");
    let rl = &c.rate_limit;
    assert_eq!(
        (
            rl.connections_per_second,
            rl.messages_per_second,
            rl.bytes_per_second
        ),
        (0, 0, 0)
    );
    assert!(
        r.toml.contains("# Mosquitto has no rate limits"),
        "{}",
        r.toml
    );
}

#[test]
fn message_size_limit_becomes_max_payload_size() {
    let (c, r) = import("listener 1883\nmessage_size_limit 262144\n");
    assert_eq!(c.limits.max_payload_size, Some(262_144));
    assert_eq!(c.limits.max_packet_size, 1_048_576);
    assert!(!warned(&r, "message_size_limit"), "{:?}", r.warnings);
    let (c, _) = import("listener 1883\nmessage_size_limit 0\n");
    assert_eq!(
        c.limits.max_payload_size, None,
        "0 = no limit, as in Mosquitto"
    );
}

#[test]
fn max_queued_messages_is_carried_with_its_meaning() {
    let (c, r) = import("listener 1883\nmax_queued_messages 5000\n");
    assert_eq!(c.limits.max_queued_messages, 5000);
    // 5000 messages of 1 KiB fit the default byte bound: left alone, nothing to review.
    assert_eq!(c.limits.max_queued_bytes, 8 * 1_048_576);
    assert!(!warned(&r, "max_queued"), "{:?}", r.warnings);
    // 0 is no limit in both.
    let (c, _) = import("listener 1883\nmax_queued_messages 0\n");
    assert_eq!(c.limits.max_queued_messages, 0);
    assert_eq!(c.limits.queued_messages_bound(), usize::MAX);
}

#[test]
fn a_large_message_bound_raises_the_byte_bound_with_a_comment() {
    let (c, r) = import("listener 1883\nmax_queued_messages 50000\n");
    assert_eq!(c.limits.max_queued_messages, 50000);
    assert_eq!(c.limits.max_queued_bytes, 50000 * 1024);
    assert!(
        warned(&r, "max_queued_bytes was raised"),
        "{:?}",
        r.warnings
    );
    assert!(r.toml.contains("# from max_queued_messages"), "{}", r.toml);
    // A byte bound given is carried as is.
    let (c, r) = import("listener 1883\nmax_queued_messages 50000\nmax_queued_bytes 100000\n");
    assert_eq!(c.limits.max_queued_bytes, 100_000);
    assert!(warned(&r, "per subscribed filter"), "{:?}", r.warnings);
    let (c, r) = import("listener 1883\nmax_queued_bytes 0\n");
    assert_eq!(c.limits.max_queued_bytes, 8 * 1_048_576);
    assert!(warned(&r, "no limit"), "{:?}", r.warnings);
}

#[test]
fn queue_qos0_messages_becomes_the_sessions_option() {
    let (c, r) = import("listener 1883\nqueue_qos0_messages true\n");
    assert!(c.sessions.queue_qos0_messages);
    assert!(!warned(&r, "queue_qos0_messages"), "{:?}", r.warnings);
    let (c, _) = import("listener 1883\nqueue_qos0_messages false\n");
    assert!(!c.sessions.queue_qos0_messages);
    let err = import_mosquitto("queue_qos0_messages yes\n", Path::new(CONF)).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("{CONF}:1: queue_qos0_messages: expected true or false")
    );
}

#[test]
fn persistent_client_expiration_becomes_max_session_expiry() {
    for (value, seconds) in [
        ("2h", 7200),
        ("1d", 86_400),
        ("2w", 1_209_600),
        ("1m", 2_592_000),
        ("1y", 31_536_000),
    ] {
        let (c, r) = import(&format!("persistent_client_expiration {value}\n"));
        assert_eq!(c.limits.max_session_expiry, seconds, "{value}");
        assert!(
            !warned(&r, "persistent_client_expiration"),
            "{:?}",
            r.warnings
        );
    }
    for bad in ["1", "d", "0d", "1s", "-1d", "hunter2"] {
        let err = import_mosquitto(
            &format!("persistent_client_expiration {bad}\n"),
            Path::new(CONF),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!("{CONF}:1: persistent_client_expiration: ")),
            "{msg}"
        );
        assert!(!msg.contains("hunter2"), "{msg}");
    }
}

#[test]
fn one_listeners_acl_file_applying_to_all_is_warned() {
    let (c, r) = import(
        "per_listener_settings true\nlistener 1883 127.0.0.1\nallow_anonymous true\n\
         listener 8883\nacl_file /etc/mosquitto/acl\npassword_file /etc/mosquitto/passwd\n",
    );
    assert_eq!(c.acl.file.as_deref(), Some(Path::new("/etc/mosquitto/acl")));
    for option in ["acl_file", "password_file"] {
        assert!(
            warned(
                &r,
                &format!("{option}: with per_listener_settings only some listeners")
            ),
            "{:?}",
            r.warnings
        );
    }
    // Every listener with the same file: nothing changes, nothing to say.
    let (_, r) = import(
        "per_listener_settings true\nlistener 1883\nacl_file /a\nlistener 1884\nacl_file /a\n",
    );
    assert!(!warned(&r, "acl_file"), "{:?}", r.warnings);
}

#[test]
fn identity_cn_warns_that_a_differing_username_is_refused() {
    let (c, r) = import(
        "listener 8883\ncertfile /c.pem\nkeyfile /k.pem\ncafile /ca.pem\n\
         require_certificate true\nuse_identity_as_username true\n",
    );
    assert_eq!(
        c.listener[0].tls.as_ref().unwrap().identity,
        CertIdentity::Cn
    );
    assert!(
        warned(
            &r,
            "refuses a client whose username differs from its certificate CN"
        ),
        "{:?}",
        r.warnings
    );
}

#[test]
fn max_keepalive_is_carried() {
    let (c, r) = import("max_keepalive 120\nmax_topic_alias 4\n");
    assert_eq!(c.limits.max_keepalive, 120);
    assert_eq!(c.limits.max_topic_alias, 4);
    assert!(!warned(&r, "max_topic_alias"), "{:?}", r.warnings);
    assert!(!warned(&r, "max_keepalive"), "{:?}", r.warnings);
    let (c, _) = import("");
    assert_eq!(c.limits.max_keepalive, 65535, "caps nothing by default");
}

#[test]
fn sys_interval_is_carried_over() {
    let (c, r) = import("listener 1883\nsys_interval 30\n");
    assert_eq!(c.sys.interval, 30);
    assert!(!warned(&r, "sys_interval"), "{:?}", r.warnings);
    let (c, _) = import("listener 1883\nsys_interval 0\n");
    assert_eq!(c.sys.interval, 0, "0 turns the tree off in both");
    let (c, _) = import("listener 1883\n");
    assert_eq!(c.sys.interval, moatmq_config::DEFAULT_SYS_INTERVAL);
    let (c, _) = import("listener 1883\nsys_interval 100000\n");
    assert_eq!(c.sys.interval, 65535);
}
