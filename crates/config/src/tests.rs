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
fn max_sessions_per_user_defaults_to_16_and_refuses_0() {
    assert_eq!(parse(MINIMAL).unwrap().limits.max_sessions_per_user, 16);
    let err = parse(&format!("{MINIMAL}[limits]\nmax_sessions_per_user = 0\n")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "broker.toml:5: limits.max_sessions_per_user: must be greater than 0"
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
