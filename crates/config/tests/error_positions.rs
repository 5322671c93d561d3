//! Every config error names the right key on the right line, however the file repeats
//! key names across sections, and never echoes a value.
//!
//! Each case puts a bad value where a text scan for the key name would go wrong: the
//! same key name appears earlier in another section (or another `[[listener]]`), often
//! with the same "secret" value. The line marked `# <-` is where the error must point.

use moatmq_config::{Config, ConfigError};
use proptest::prelude::*;
use std::path::Path;

const SECRET: &str = "hunter2-secret";
const MARK: &str = "# <-";

/// Parses `text`, which marks the expected line with `# <-`, and checks the message is
/// `broker.toml:<line>: <key>: ...` without the secret.
fn assert_points_at(text: &str, key: &str) -> ConfigError {
    let line = text
        .lines()
        .position(|l| l.ends_with(MARK))
        .expect("a marked line")
        + 1;
    let err = Config::parse(Path::new("broker.toml"), text).expect_err(text);
    let msg = err.to_string();
    let want = format!("broker.toml:{line}: {key}: ");
    assert!(
        msg.starts_with(&want),
        "want {want:?}, got {msg:?} for\n{text}"
    );
    assert!(!msg.contains("hunter2"), "the value leaked: {msg}");
    assert!(!msg.contains('\n'), "one line: {msg:?}");
    err
}

const FIRST: &str = "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1883\"\n";

#[test]
fn listener() {
    // bind: validation; the same key in [metrics] and listener[0] before it.
    assert_points_at(
        &format!(
            "{FIRST}[metrics]\nbind = \"127.0.0.1:9100\"\n\
             [[listener]]\nname = \"b\"\nbind = \"hunter2-secret\" {MARK}\n"
        ),
        "listener[1].bind",
    );
    // name: too long; the same key in [[rate_limit.user]] before it.
    assert_points_at(
        &format!(
            "{FIRST}[[rate_limit.user]]\nname = \"x\"\n\
             [[listener]]\nname = \"{}\" {MARK}\nbind = \"127.0.0.1:1884\"\n",
            SECRET.repeat(5)
        ),
        "listener[1].name",
    );
    // A duplicate name is reported on the second listener, not the first.
    assert_points_at(
        &format!("{FIRST}[[listener]]\nname = \"a\" {MARK}\nbind = \"127.0.0.1:1884\"\n"),
        "listener[1].name",
    );
    // protocol: not a known value.
    assert_points_at(
        &format!(
            "{FIRST}protocol = \"mqtt\"\n\
             [[listener]]\nname = \"b\"\nbind = \"127.0.0.1:1884\"\nprotocol = \"hunter2-secret\" {MARK}\n"
        ),
        "listener[1].protocol",
    );
    // allow_anonymous: wrong type; the same key in [auth] before it.
    assert_points_at(
        &format!(
            "{FIRST}[auth]\nallow_anonymous = true\n\
             [[listener]]\nname = \"b\"\nbind = \"127.0.0.1:1884\"\nallow_anonymous = \"hunter2-secret\" {MARK}\n"
        ),
        "listener[1].allow_anonymous",
    );
    assert_points_at(
        &format!(
            "{FIRST}trust_proxy_protocol = true\n[[listener]]\nname = \"b\"\n\
             bind = \"127.0.0.1:1884\"\ntrust_proxy_protocol = \"hunter2-secret\" {MARK}\n"
        ),
        "listener[1].trust_proxy_protocol",
    );
    // A key the second listener leaves out: the line of its [[listener]].
    assert_points_at(
        &format!("{FIRST}[[listener]] {MARK}\nname = \"b\"\n"),
        "listener[1].bind",
    );
    // Overlapping binds: the later listener's bind, naming the earlier by key path.
    let err = assert_points_at(
        &format!("{FIRST}[[listener]]\nname = \"b\"\nbind = \"0.0.0.0:1883\" {MARK}\n"),
        "listener[1].bind",
    );
    assert!(err.to_string().ends_with("as listener[0].bind"), "{err}");
}

#[test]
fn listener_websocket_path() {
    // path: validation; the same key in [retained] and [audit] before it.
    assert_points_at(
        &format!(
            "{FIRST}[retained]\npath = \"hunter2-secret\"\n[audit]\npath = \"a.log\"\n\
             [[listener]]\nname = \"ws\"\nbind = \"127.0.0.1:8080\"\nprotocol = \"ws\"\n\
             path = [\"/mqtt\", \"hunter2-secret\"] {MARK}\n"
        ),
        "listener[1].path",
    );
    // path on a plain MQTT listener, after a ws listener that has one.
    assert_points_at(
        &format!(
            "[[listener]]\nname = \"ws\"\nbind = \"127.0.0.1:8080\"\nprotocol = \"ws\"\npath = [\"/\"]\n\
             [[listener]]\nname = \"b\"\nbind = \"127.0.0.1:1884\"\npath = [\"/\"] {MARK}\n"
        ),
        "listener[1].path",
    );
}

#[test]
fn listener_tls() {
    let tls = "[listener.tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n";
    // identity: not a known value; listener[0] has the same table.
    assert_points_at(
        &format!(
            "{FIRST}{tls}[[listener]]\nname = \"b\"\nbind = \"127.0.0.1:1884\"\n\
             {tls}identity = \"hunter2-secret\" {MARK}\n"
        ),
        "listener[1].tls.identity",
    );
    // identity = "cn" without client_ca: validation.
    assert_points_at(
        &format!(
            "{FIRST}{tls}identity = \"none\"\n[[listener]]\nname = \"b\"\nbind = \"127.0.0.1:1884\"\n\
             {tls}identity = \"cn\" {MARK}\n"
        ),
        "listener[1].tls.identity",
    );
    // key: wrong type; `key` also in listener[0].tls, and the same value in [acl].
    assert_points_at(
        &format!(
            "{FIRST}{tls}[acl]\nfile = \"hunter2-secret\"\n\
             [[listener]]\nname = \"b\"\nbind = \"127.0.0.1:1884\"\n\
             [listener.tls]\ncert = \"c.pem\"\nkey = [\"hunter2-secret\"] {MARK}\n"
        ),
        "listener[1].tls.key",
    );
    // A missing key: the line of the second listener's [listener.tls].
    assert_points_at(
        &format!(
            "{FIRST}{tls}[[listener]]\nname = \"b\"\nbind = \"127.0.0.1:1884\"\n\
             [listener.tls] {MARK}\ncert = \"c.pem\"\n"
        ),
        "listener[1].tls.key",
    );
    // An inline table is placed as well as a [listener.tls] section.
    assert_points_at(
        &format!(
            "{FIRST}{tls}[[listener]]\nname = \"b\"\nbind = \"127.0.0.1:1884\"\n\
             tls = {{ cert = \"c.pem\", key = \"k.pem\", require_client_cert = \"hunter2-secret\" }} {MARK}\n"
        ),
        "listener[1].tls.require_client_cert",
    );
}

#[test]
fn listener_forwarded() {
    let ws = |name: &str, port: u16| {
        format!("[[listener]]\nname = \"{name}\"\nbind = \"127.0.0.1:{port}\"\nprotocol = \"ws\"\n")
    };
    let good =
        "[listener.forwarded]\nheader = \"CF-Connecting-IP\"\ntrusted_proxies = [\"10.0.0.0/8\"]\n";
    let (a, b) = (ws("a", 8080), ws("b", 8081));
    assert_points_at(
        &format!(
            "{a}{good}{b}[listener.forwarded]\nheader = \"hunter2 secret\" {MARK}\n\
             trusted_proxies = [\"10.0.0.1\"]\n"
        ),
        "listener[1].forwarded.header",
    );
    assert_points_at(
        &format!(
            "{a}{good}{b}[listener.forwarded]\nheader = \"X-Forwarded-For\"\n\
             trusted_proxies = [\"10.0.0.1\", \"hunter2-secret\"] {MARK}\n"
        ),
        "listener[1].forwarded.trusted_proxies",
    );
    // Elements of a multi-line array: the key's line.
    assert_points_at(
        &format!(
            "{a}{good}{b}[listener.forwarded]\nheader = \"X-Forwarded-For\"\n\
             trusted_proxies = [ {MARK}\n  \"10.0.0.1\",\n  5,\n]\n"
        ),
        "listener[1].forwarded.trusted_proxies",
    );
    // forwarded on an mqtt listener.
    assert_points_at(
        &format!(
            "{a}{good}[[listener]]\nname = \"m\"\nbind = \"127.0.0.1:1883\"\n\
             [listener.forwarded] {MARK}\n{}",
            &good["[listener.forwarded]\n".len()..]
        ),
        "listener[1].forwarded",
    );
}

#[test]
fn auth() {
    assert_points_at(
        &format!(
            "{FIRST}allow_anonymous = true\n[auth]\nallow_anonymous = \"hunter2-secret\" {MARK}\n"
        ),
        "auth.allow_anonymous",
    );
    assert_points_at(
        &format!(
            "{FIRST}[acl]\nfile = \"hunter2-secret\"\n[auth]\npassword_file = [\"hunter2-secret\"] {MARK}\n"
        ),
        "auth.password_file",
    );
    assert_points_at(
        &format!("{FIRST}[auth]\ncredential_cache_ttl = -1 {MARK}\n"),
        "auth.credential_cache_ttl",
    );
}

#[test]
fn acl() {
    assert_points_at(
        &format!("{FIRST}[auth]\npassword_file = \"hunter2-secret\"\n[acl]\nfile = 5 {MARK}\n"),
        "acl.file",
    );
    assert_points_at(
        &format!("{FIRST}[acl]\nfiles = \"hunter2-secret\" {MARK}\n"),
        "acl.files",
    );
}

#[test]
fn retained() {
    // max_bytes after max_bytes_per_user and max_messages: not either of those.
    assert_points_at(
        &format!(
            "{FIRST}[retained]\npath = \"r\"\nmax_bytes_per_user = 5\nmax_messages = 5\n\
             max_bytes = 0 {MARK}\n"
        ),
        "retained.max_bytes",
    );
    assert_points_at(
        &format!(
            "{FIRST}[retained]\npath = \"r\"\nmax_messages_per_user = 1\nmax_messages = 0 {MARK}\n"
        ),
        "retained.max_messages",
    );
    assert_points_at(
        &format!(
            "{FIRST}[audit]\npath = \"hunter2-secret\"\n[retained]\npath = \"r\"\n\
             autosave_interval = \"hunter2-secret\" {MARK}\n"
        ),
        "retained.autosave_interval",
    );
    // path left out: the [retained] line.
    assert_points_at(
        &format!(
            "{FIRST}[audit]\npath = \"a\"\n[retained] {MARK}\nkey_file = \"hunter2-secret\"\n"
        ),
        "retained.path",
    );
}

#[test]
fn sessions() {
    // enabled = true without [retained]; `path` in [audit] before it.
    assert_points_at(
        &format!("{FIRST}[audit]\npath = \"a\"\n[sessions]\nqueue_qos0_messages = true\nenabled = true {MARK}\n"),
        "sessions.enabled",
    );
    // path without [retained]: not [audit]'s path.
    assert_points_at(
        &format!("{FIRST}[audit]\npath = \"hunter2-secret\"\n[sessions]\npath = \"hunter2-secret\" {MARK}\n"),
        "sessions.path",
    );
    // autosave_interval: wrong type, after [retained]'s own.
    assert_points_at(
        &format!(
            "{FIRST}[retained]\npath = \"r\"\nautosave_interval = 1\n\
             [sessions]\nautosave_interval = \"hunter2-secret\" {MARK}\n"
        ),
        "sessions.autosave_interval",
    );
    assert_points_at(
        &format!("{FIRST}[sessions]\nqueue_qos0_messages = \"hunter2-secret\" {MARK}\n"),
        "sessions.queue_qos0_messages",
    );
}

#[test]
fn limits() {
    assert_points_at(
        &format!(
            "{FIRST}[rate_limit]\nmessages_per_second = 5\n[limits]\nmax_packet_size = 5\n\
             max_inflight = 0 {MARK}\n"
        ),
        "limits.max_inflight",
    );
    assert_points_at(
        &format!("{FIRST}[limits]\nmax_connections = \"hunter2-secret\" {MARK}\n"),
        "limits.max_connections",
    );
    assert_points_at(
        &format!("{FIRST}[limits]\nmax_inflight = 70000 {MARK}\n"),
        "limits.max_inflight",
    );
    assert_points_at(
        &format!("{FIRST}[limits]\nmax_queued_bytes = 5\nmax_queued_messages = -1 {MARK}\n"),
        "limits.max_queued_messages",
    );
    assert_points_at(
        &format!("{FIRST}[limits]\nmax_pakcet_size = 5 {MARK}\n"),
        "limits.max_pakcet_size",
    );
    // Dotted keys at the top level are placed like a [limits] section.
    assert_points_at(
        &format!("limits.max_topic_levels = 0 {MARK}\n{FIRST}"),
        "limits.max_topic_levels",
    );
}

#[test]
fn rate_limit() {
    assert_points_at(
        &format!(
            "{FIRST}[rate_limit]\nmessages_per_second = 5\n\
             [[rate_limit.user]]\nname = \"u\"\nmessage_burst = 7\n\
             [[rate_limit.user]]\nname = \"v\"\nmessages_per_second = 9\nmessage_burst = 0 {MARK}\n"
        ),
        "rate_limit.user[1].message_burst",
    );
    assert_points_at(
        &format!(
            "{FIRST}[rate_limit]\nbytes_per_second = 5\n[[rate_limit.user]]\nname = \"u\"\n\
             bytes_per_second = \"hunter2-secret\" {MARK}\n"
        ),
        "rate_limit.user[0].bytes_per_second",
    );
    assert_points_at(
        &format!(
            "{FIRST}[[rate_limit.user]]\nname = \"u\"\n[[rate_limit.user]]\nname = \"u\" {MARK}\n"
        ),
        "rate_limit.user[1].name",
    );
    assert_points_at(
        &format!(
            "{FIRST}[rate_limit]\nmessages_per_second = 5\nmessage_burst = 0 {MARK}\n\
             [[rate_limit.user]]\nname = \"u\"\nmessage_burst = 7\n"
        ),
        "rate_limit.message_burst",
    );
    assert_points_at(
        &format!("{FIRST}[rate_limit]\ndisconnect_after = \"hunter2-secret\" {MARK}\n"),
        "rate_limit.disconnect_after",
    );
}

#[test]
fn audit() {
    assert_points_at(
        &format!("{FIRST}[retained]\npath = \"r\"\n[audit]\npath = [\"hunter2-secret\"] {MARK}\n"),
        "audit.path",
    );
}

#[test]
fn metrics() {
    // The same key in both listeners before it, with a valid and the same bad value.
    assert_points_at(
        &format!(
            "{FIRST}[[listener]]\nname = \"b\"\nbind = \"127.0.0.1:1884\"\n\
             [metrics]\nbind = \"hunter2-secret\" {MARK}\n"
        ),
        "metrics.bind",
    );
    assert_points_at(
        &format!("{FIRST}[metrics]\nbind = \"0.0.0.0:1883\" {MARK}\n"),
        "metrics.bind",
    );
    assert_points_at(&format!("{FIRST}[metrics] {MARK}\n"), "metrics.bind");
}

#[test]
fn log() {
    assert_points_at(
        &format!("{FIRST}[log]\nlevel = \"info\"\nformat = \"hunter2-secret\" {MARK}\n"),
        "log.format",
    );
    assert_points_at(
        &format!("{FIRST}[log]\nlevel = [\"hunter2-secret\"] {MARK}\n"),
        "log.level",
    );
}

#[test]
fn top_level() {
    assert_points_at(&format!("hunter = 2 {MARK}\n{FIRST}"), "hunter");
    assert_points_at(&format!("{FIRST}hunter = 2 {MARK}\n"), "listener[0].hunter");
    assert_points_at(
        &format!("listener = \"hunter2-secret\" {MARK}\n"),
        "listener",
    );
}

#[test]
fn malformed_toml_is_placed_and_not_echoed() {
    for bad in [
        "bind = hunter2-secret",
        "bind = \"hunter2-secret",
        "bind = 'hunter2-secret",
        "bind = \"hunter2\\q-secret\"",
    ] {
        let text = format!("{FIRST}[metrics]\n{bad}\n");
        let err = Config::parse(Path::new("broker.toml"), &text).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ConfigError::Syntax { line: 5, .. }), "{msg}");
        assert!(!msg.contains("hunter2"), "{msg}");
        assert!(!msg.contains('\n'), "{msg:?}");
    }
}

/// A key with a good and a bad value.
type Key = (&'static str, String, String);

/// One section of a generated config.
#[derive(Debug, Clone)]
struct Section {
    /// `[[listener]]`, `[metrics]`, ...
    header: &'static str,
    /// The key path of the table, without an index.
    path: &'static str,
    keys: Vec<Key>,
    /// `[listener.tls]` inside a listener.
    sub: Option<(&'static str, Vec<Key>)>,
}

fn q(s: &str) -> String {
    format!("\"{s}\"")
}

fn sections() -> Vec<Section> {
    let secret = q(SECRET);
    let listener = |i: u16| Section {
        header: "[[listener]]",
        path: "listener",
        keys: vec![
            ("name", q(&format!("l{i}")), q(&SECRET.repeat(5))),
            (
                "bind",
                q(&format!("127.0.0.1:{}", 1883 + i)),
                secret.clone(),
            ),
            ("protocol", q("mqtt"), secret.clone()),
            ("allow_anonymous", "true".into(), secret.clone()),
            ("trust_proxy_protocol", "false".into(), secret.clone()),
        ],
        sub: Some((
            "tls",
            vec![
                ("cert", q("c.pem"), format!("[{secret}]")),
                ("key", q(SECRET), "5".into()),
                ("identity", q("none"), secret.clone()),
            ],
        )),
    };
    let user = |j: u16| Section {
        header: "[[rate_limit.user]]",
        path: "rate_limit.user",
        keys: vec![
            ("name", q(&format!("u{j}")), "5".into()),
            ("messages_per_second", "9".into(), secret.clone()),
            ("message_burst", "3".into(), "0".into()),
            ("bytes_per_second", "100".into(), secret.clone()),
        ],
        sub: None,
    };
    let table = |header, path, keys| Section {
        header,
        path,
        keys,
        sub: None,
    };
    vec![
        listener(0),
        listener(1),
        listener(2),
        user(0),
        user(1),
        table(
            "[metrics]",
            "metrics",
            vec![("bind", q("127.0.0.1:9100"), secret.clone())],
        ),
        table(
            "[audit]",
            "audit",
            vec![("path", q(SECRET), format!("[{secret}]"))],
        ),
        table(
            "[retained]",
            "retained",
            vec![
                ("path", q(SECRET), "1".into()),
                ("max_messages_per_user", "1".into(), secret.clone()),
                ("max_messages", "5".into(), "0".into()),
                ("max_bytes_per_user", "1".into(), "-1".into()),
                ("max_bytes", "5".into(), "0".into()),
            ],
        ),
        table(
            "[sessions]",
            "sessions",
            vec![
                ("enabled", "true".into(), secret.clone()),
                ("path", q(SECRET), "1".into()),
                ("autosave_interval", "0".into(), secret.clone()),
                ("queue_qos0_messages", "true".into(), secret.clone()),
            ],
        ),
        table(
            "[limits]",
            "limits",
            vec![
                ("max_packet_size", "500".into(), "0".into()),
                ("max_queued_messages", "0".into(), "-1".into()),
                ("max_inflight", "5".into(), "0".into()),
                ("max_connections", "5".into(), secret.clone()),
            ],
        ),
        table(
            "[rate_limit]",
            "rate_limit",
            vec![
                ("messages_per_second", "5".into(), secret.clone()),
                ("message_burst", "5".into(), "0".into()),
                ("bytes_per_second", "5".into(), secret.clone()),
            ],
        ),
        table(
            "[auth]",
            "auth",
            vec![
                ("allow_anonymous", "false".into(), secret.clone()),
                ("password_file", q(SECRET), format!("[{secret}]")),
            ],
        ),
        table(
            "[acl]",
            "acl",
            vec![("file", q(SECRET), format!("{{ x = {secret} }}"))],
        ),
        table(
            "[log]",
            "log",
            vec![
                ("format", q("json"), secret.clone()),
                ("level", q("info"), format!("[{secret}]")),
            ],
        ),
    ]
}

/// Writes `sections` in order with the `target`th key (counting every key of every
/// section in that order) bad; returns the text and the bad line and its key path.
fn render(sections: &[Section], target: usize) -> (String, Option<(usize, String)>) {
    let mut text = String::new();
    let mut lines = 0;
    let mut want = None;
    let mut seen = std::collections::HashMap::new();
    let mut n = 0;
    let mut push = |text: &mut String, line: String| {
        text.push_str(&line);
        text.push('\n');
        lines += 1;
        lines
    };
    for s in sections {
        let index = seen.entry(s.path).or_insert(0usize);
        let table = if s.header.starts_with("[[") {
            format!("{}[{index}]", s.path)
        } else {
            s.path.to_string()
        };
        *index += 1;
        push(&mut text, s.header.to_string());
        let sub = s
            .sub
            .iter()
            .flat_map(|(name, keys)| keys.iter().map(move |k| (Some(*name), k)));
        let mut header_done = false;
        for (sub, (key, good, bad)) in s.keys.iter().map(|k| (None, k)).chain(sub) {
            if let (Some(name), false) = (sub, header_done) {
                push(&mut text, format!("[{}.{name}]", s.path));
                header_done = true;
            }
            let path = match sub {
                Some(name) => format!("{table}.{name}.{key}"),
                None => format!("{table}.{key}"),
            };
            let value = if n == target { bad } else { good };
            let line = push(&mut text, format!("{key} = {value}"));
            if n == target {
                want = Some((line, path));
            }
            n += 1;
        }
    }
    (text, want)
}

fn key_count() -> usize {
    sections()
        .iter()
        .map(|s| s.keys.len() + s.sub.as_ref().map_or(0, |(_, k)| k.len()))
        .sum()
}

#[test]
fn generated_configs_are_valid_without_a_bad_key() {
    let (text, bad) = render(&sections(), usize::MAX);
    assert_eq!(bad, None);
    Config::parse(Path::new("broker.toml"), &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
}

proptest! {
    /// Sections in any order, one bad value anywhere: the error names that key, on
    /// that line, and not the value.
    #[test]
    fn a_bad_value_anywhere_is_placed(
        sections in Just(sections()).prop_shuffle(),
        target in 0..key_count(),
    ) {
        let (text, bad) = render(&sections, target);
        let (line, key) = bad.expect("target within the keys");
        let err = Config::parse(Path::new("broker.toml"), &text).expect_err(&text);
        let msg = err.to_string();
        let want = format!("broker.toml:{line}: {key}: ");
        prop_assert!(msg.starts_with(&want), "want {}, got {} for\n{}", want, msg, text);
        prop_assert!(!msg.contains("hunter2"), "the value leaked: {}", msg);
    }
}
