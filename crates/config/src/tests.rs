use super::*;
use std::path::Path;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new("broker.toml"), text)
}

const MINIMAL: &str = "[[listener]]\nname = \"local\"\nbind = \"127.0.0.1:1883\"\n";

#[test]
fn minimal_config_gets_defaults() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.listener.len(), 1);
    assert_eq!(c.listener[0].protocol, Protocol::Mqtt);
    assert!(!c.auth.allow_anonymous);
    assert_eq!(c.limits.max_packet_size, DEFAULT_MAX_PACKET_SIZE);
    assert_eq!(c.limits.connect_timeout, 5);
    assert!(!c.anonymous_allowed(&c.listener[0]));
}

#[test]
fn unknown_key_is_named_with_its_line() {
    let err = parse(&format!("{MINIMAL}\n[limits]\nmax_pakcet_size = 5\n")).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ConfigError::Syntax { line: 6, .. }), "{msg}");
    assert!(msg.starts_with("broker.toml:6:"), "{msg}");
    assert!(msg.contains("max_pakcet_size"), "{msg}");
}

#[test]
fn wrong_type_is_refused() {
    let err = parse(&format!("{MINIMAL}[limits]\nmax_connections = \"many\"\n")).unwrap_err();
    assert!(matches!(err, ConfigError::Syntax { line: 5, .. }), "{err}");
}

#[test]
fn bad_bind_names_listener_key_and_line() {
    let text = format!("{MINIMAL}\n[[listener]]\nname = \"b\"\nbind = \"localhost\"\n");
    let err = parse(&text).unwrap_err();
    assert_eq!(
        err.to_string(),
        "broker.toml:7: listener[1].bind: must be an ip:port address such as 127.0.0.1:1883"
    );
}

#[test]
fn duplicate_listener_names_are_refused() {
    let text = format!("{MINIMAL}[[listener]]\nname = \"local\"\nbind = \"127.0.0.1:1884\"\n");
    let err = parse(&text).unwrap_err();
    assert!(err.to_string().contains("unique"), "{err}");
}

#[test]
fn zero_limits_are_refused() {
    let err = parse(&format!("{MINIMAL}[limits]\nmax_inflight = 0\n")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "broker.toml:5: limits.max_inflight: must be greater than 0"
    );
}

#[test]
fn no_listener_is_refused() {
    let err = parse("[auth]\nallow_anonymous = true\n").unwrap_err();
    assert!(
        err.to_string().contains("at least one [[listener]]"),
        "{err}"
    );
}

#[test]
fn cn_identity_requires_client_ca() {
    let text = format!("{MINIMAL}[listener.tls]\ncert = \"a\"\nkey = \"b\"\nidentity = \"cn\"\n");
    let err = parse(&text).unwrap_err();
    assert!(err.to_string().contains("client_ca"), "{err}");
}

#[test]
fn listener_override_of_anonymous() {
    let text = format!("{MINIMAL}allow_anonymous = true\n");
    let c = parse(&text).unwrap();
    assert!(c.anonymous_allowed(&c.listener[0]));
}

#[test]
fn example_file_parses() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../broker.toml.example");
    if let Ok(c) = Config::load(&path) {
        assert!(!c.listener.is_empty());
    } else {
        panic!(
            "broker.toml.example must parse: {:?}",
            Config::load(&path).err()
        );
    }
}

#[test]
fn relative_paths_resolve_against_the_config_folder() {
    let c = Config::parse(Path::new("/etc/moatmq/broker.toml"), MINIMAL).unwrap();
    assert_eq!(
        c.resolve(Path::new("passwd")),
        Path::new("/etc/moatmq/passwd")
    );
    assert_eq!(c.resolve(Path::new("/abs")), Path::new("/abs"));
}

/// One bad key per section, placed after decoys (the same key name in other sections,
/// a value that is a "secret"): the error names the right key on the right line and
/// never echoes the value.
#[test]
fn every_section_reports_the_right_line_without_the_value() {
    const SECRET: &str = "hunter2-secret";
    let listener = "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1883\"\n";
    let cases: &[(&str, &str, &str)] = &[
        // (the sections after the listener, the bad line's text, the key in the message)
        (
            "[metrics]\nbind = \"hunter2-secret\"\n",
            "bind = \"hunter2-secret\"",
            "metrics.bind",
        ),
        (
            "[[listener]]\nname = \"b\"\nbind = \"hunter2-secret\"\n",
            "bind = \"hunter2-secret\"",
            "listener[1].bind",
        ),
        (
            "[[listener]]\nname = \"b\"\nbind = \"127.0.0.1:1\"\n[listener.tls]\ncert = \"c\"\n\
             key = \"k\"\nidentity = \"cn\"\n",
            "identity = \"cn\"",
            "listener[1].tls.identity",
        ),
        (
            "[retained]\npath = \"r\"\nmax_messages = 5\nmax_bytes = 0\n",
            "max_bytes = 0",
            "retained.max_bytes",
        ),
        (
            "[limits]\nmax_packet_size = 5\nmax_inflight = 0\n",
            "max_inflight = 0",
            "limits.max_inflight",
        ),
        (
            "[rate_limit]\nmessages_per_second = 5\nmessage_burst = 0\n",
            "message_burst = 0",
            "rate_limit.message_burst",
        ),
        (
            "[auth]\nallow_anonymous = \"hunter2-secret\"\n",
            "allow_anonymous",
            "",
        ),
        ("[acl]\nfile = 5\n", "file = 5", ""),
        ("[audit]\npath = [\"hunter2-secret\"]\n", "path =", ""),
        ("[log]\nformat = \"hunter2-secret\"\n", "format =", ""),
        (
            "[limits]\nmax_connections = \"hunter2-secret\"\n",
            "max_connections",
            "",
        ),
    ];
    for (sections, bad, key) in cases {
        let text = format!("{listener}{sections}");
        let line = text.lines().position(|l| l.starts_with(bad)).unwrap() + 1;
        let err = parse(&text).expect_err(sections).to_string();
        assert!(
            err.starts_with(&format!("broker.toml:{line}: {key}")),
            "{sections:?}: expected line {line} and key {key:?}, got {err}"
        );
        assert!(!err.contains(SECRET), "the value leaked: {err}");
    }
}

#[test]
fn retained_per_user_quotas_default_to_a_tenth_and_zero_is_unlimited() {
    let c = parse(&format!("{MINIMAL}[retained]\npath = \"r\"\n")).unwrap();
    let r = c.retained.unwrap();
    assert_eq!(r.max_messages_per_user, r.max_messages / 10);
    assert_eq!(r.max_bytes_per_user, DEFAULT_RETAINED_MAX_BYTES_PER_USER);
    let c = parse(&format!(
        "{MINIMAL}[retained]\npath = \"r\"\nmax_messages_per_user = 0\nmax_bytes_per_user = 7\n"
    ))
    .unwrap();
    let r = c.retained.unwrap();
    assert_eq!((r.max_messages_per_user, r.max_bytes_per_user), (0, 7));
}
