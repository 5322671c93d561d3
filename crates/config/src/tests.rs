use super::*;
use std::path::Path;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse_with(Path::new("broker.toml"), text, None)
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

#[test]
fn rate_limits_pace_by_default_and_users_override_them() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.rate_limit.disconnect_after, 0, "pace only by default");
    let text = format!(
        "{MINIMAL}[rate_limit]\nmessages_per_second = 50\nmessage_burst = 60\n\
         [[rate_limit.user]]\nname = \"ingest\"\nmessages_per_second = 0\nbytes_per_second = 0\n\
         [[rate_limit.user]]\nname = \"bridge\"\nmessages_per_second = 5000\n"
    );
    let rl = parse(&text).unwrap().rate_limit;
    let ingest = rl.publish_rates(Some("ingest"));
    assert_eq!(
        (ingest.messages_per_second, ingest.bytes_per_second),
        (0, 0)
    );
    let bridge = rl.publish_rates(Some("bridge"));
    assert_eq!(
        (bridge.messages_per_second, bridge.message_burst),
        (5000, 60),
        "a key left out keeps the [rate_limit] value"
    );
    assert_eq!(
        bridge.bytes_per_second, DEFAULT_BYTES_PER_SECOND,
        "a key left out keeps the [rate_limit] value"
    );
    assert_eq!(rl.publish_rates(None).messages_per_second, 50);
    assert_eq!(rl.publish_rates(Some("other")).messages_per_second, 50);
}

#[test]
fn rate_limit_user_errors_name_the_table_line() {
    let text =
        format!("{MINIMAL}[[rate_limit.user]]\nname = \"a\"\n[[rate_limit.user]]\nname = \"a\"\n");
    let err = parse(&text).unwrap_err();
    assert_eq!(
        err.to_string(),
        "broker.toml:7: rate_limit.user[1].name: each user may have one [[rate_limit.user]] table"
    );
    let text = format!(
        "{MINIMAL}[[rate_limit.user]]\nname = \"a\"\nmessages_per_second = 9\nmessage_burst = 0\n"
    );
    let err = parse(&text).unwrap_err();
    assert_eq!(
        err.to_string(),
        "broker.toml:7: rate_limit.user[0].message_burst: must be greater than 0 when messages_per_second is set"
    );
    let err = parse(&format!(
        "{MINIMAL}[[rate_limit.user]]\nname = \"a\"\nrate = 1\n"
    ))
    .unwrap_err();
    assert!(matches!(err, ConfigError::Syntax { line: 6, .. }), "{err}");
}

#[test]
fn overlapping_binds_are_refused_with_the_line() {
    let second = |bind: &str| format!("{MINIMAL}\n[[listener]]\nname = \"b\"\nbind = \"{bind}\"\n");
    for bind in ["127.0.0.1:1883", "0.0.0.0:1883", "[::]:1883"] {
        let err = parse(&second(bind)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "broker.toml:7: listener[1].bind: same port on the same or a wildcard address \
             as listener[0].bind",
            "{bind}"
        );
    }
    // Other port, other address, IPv6 loopback next to IPv4, or port 0 (a free one):
    for bind in ["127.0.0.1:1884", "127.0.0.2:1883", "[::1]:1883"] {
        parse(&second(bind)).unwrap_or_else(|e| panic!("{bind}: {e}"));
    }
    let zero = "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:0\"\n\
                [[listener]]\nname = \"b\"\nbind = \"127.0.0.1:0\"\n";
    parse(zero).unwrap();
    let err = parse(&format!("{MINIMAL}[metrics]\nbind = \"0.0.0.0:1883\"\n")).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("broker.toml:5: metrics.bind: same port on the same or a wildcard address as listener[0].bind"),
        "{err}"
    );
}

#[test]
fn per_address_limits_default_from_max_connections() {
    let c = parse(&format!("{MINIMAL}[limits]\nmax_connections = 200\n")).unwrap();
    assert_eq!(c.limits.connections_per_address(), 50);
    assert_eq!(c.limits.max_pending_per_address, 32);
    let c = parse(&format!(
        "{MINIMAL}[limits]\nmax_connections_per_address = 7\nmax_pending_per_address = 2\n"
    ))
    .unwrap();
    assert_eq!(c.limits.connections_per_address(), 7);
    assert_eq!(c.limits.max_pending_per_address, 2);
    let err = parse(&format!("{MINIMAL}[limits]\nmax_pending_per_address = 0\n")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "broker.toml:5: limits.max_pending_per_address: must be greater than 0"
    );
}

#[test]
fn websocket_paths_default_to_mqtt_and_are_checked() {
    let ws = "[[listener]]\nname = \"ws\"\nbind = \"127.0.0.1:8080\"\nprotocol = \"ws\"\n";
    let c = parse(ws).unwrap();
    assert_eq!(c.listener[0].ws_paths(), vec!["/mqtt".to_string()]);
    let c = parse(&format!("{ws}path = [\"/\", \"/ws\", \"*\"]\n")).unwrap();
    assert_eq!(c.listener[0].ws_paths(), vec!["/", "/ws", "*"]);
    for (bad, reason) in [
        ("path = []", "must list at least one path"),
        ("path = [\"mqtt\"]", "must start with /"),
        ("path = [\"/a b\"]", "must start with /"),
    ] {
        let err = parse(&format!("{ws}{bad}\n")).unwrap_err().to_string();
        assert!(
            err.starts_with("broker.toml:5: listener[0].path: "),
            "{err}"
        );
        assert!(err.contains(reason), "{err}");
    }
    let err = parse(&format!("{MINIMAL}path = [\"/mqtt\"]\n")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "broker.toml:4: listener[0].path: applies only to protocol = \"ws\""
    );
}

#[test]
fn forwarded_header_settings_are_checked() {
    let ws = "[[listener]]\nname = \"ws\"\nbind = \"127.0.0.1:8080\"\nprotocol = \"ws\"\n";
    let ok = format!(
        "{ws}[listener.forwarded]\nheader = \"CF-Connecting-IP\"\ntrusted_proxies = [\"127.0.0.1\", \"10.0.0.0/8\", \"::1/128\"]\n"
    );
    let c = parse(&ok).unwrap();
    let proxies = c.listener[0].forwarded.as_ref().unwrap().proxies();
    assert_eq!(proxies.len(), 3);
    assert!(proxies[1].contains(&"10.1.2.3".parse::<std::net::IpAddr>().unwrap()));
    for (bad, key, reason) in [
        (
            "header = \"CF-Connecting-IP\"\ntrusted_proxies = [\"10.0.0.0/33\"]",
            "trusted_proxies",
            "IP address or CIDR",
        ),
        (
            "header = \"CF-Connecting-IP\"\ntrusted_proxies = []",
            "trusted_proxies",
            "must list",
        ),
        (
            "header = \"X Forwarded\"\ntrusted_proxies = [\"10.0.0.1\"]",
            "header",
            "HTTP header name",
        ),
    ] {
        let err = parse(&format!("{ws}[listener.forwarded]\n{bad}\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("listener[0].forwarded.{key}: ")) && err.contains(reason),
            "{err}"
        );
    }
    let err = parse(&format!(
        "{MINIMAL}[listener.forwarded]\nheader = \"X-Forwarded-For\"\ntrusted_proxies = [\"10.0.0.1\"]\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(err.contains("applies only to protocol = \"ws\""), "{err}");
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

#[test]
fn max_queued_messages_defaults_to_1000_and_zero_is_unlimited() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.limits.max_queued_messages, 1000);
    assert_eq!(c.limits.queued_messages_bound(), 1000);
    let c = parse(&format!("{MINIMAL}[limits]\nmax_queued_messages = 0\n")).unwrap();
    assert_eq!(c.limits.queued_messages_bound(), usize::MAX);
}

#[test]
fn sessions_are_durable_beside_the_retained_store_by_default() {
    // No store: sessions stay in memory, QoS 0 queueing still configurable.
    let c = parse(&format!(
        "{MINIMAL}[sessions]\nqueue_qos0_messages = true\n"
    ))
    .unwrap();
    assert_eq!(c.sessions(), None);
    assert!(c.sessions.queue_qos0_messages);
    // A store: same folder, key and interval.
    let retained = "[retained]\npath = \"r\"\nkey_file = \"k\"\nautosave_interval = 7\n";
    let c = parse(&format!("{MINIMAL}{retained}")).unwrap();
    assert_eq!(
        c.sessions(),
        Some(SessionsConfig {
            path: "r".into(),
            key_file: Some("k".into()),
            autosave_interval: 7,
            queue_qos0_messages: false,
        })
    );
    // [sessions] overrides path and interval, or turns it off.
    let c = parse(&format!(
        "{MINIMAL}{retained}[sessions]\npath = \"s\"\nautosave_interval = 0\nqueue_qos0_messages = true\n"
    ))
    .unwrap();
    let s = c.sessions().unwrap();
    assert_eq!(
        (s.path.as_path(), s.autosave_interval, s.queue_qos0_messages),
        (Path::new("s"), 0, true)
    );
    let c = parse(&format!("{MINIMAL}{retained}[sessions]\nenabled = false\n")).unwrap();
    assert_eq!(c.sessions(), None);
}

#[test]
fn durable_sessions_without_a_retained_store_are_refused() {
    for (key, value) in [
        ("enabled", "true"),
        ("path", "\"s\""),
        ("autosave_interval", "0"),
    ] {
        let err = parse(&format!("{MINIMAL}[sessions]\n{key} = {value}\n")).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("broker.toml:5: sessions.{key}: durable sessions need a [retained] section: its key encrypts them")
        );
    }
    parse(&format!("{MINIMAL}[sessions]\nenabled = false\n")).unwrap();
}

#[test]
fn sys_interval_defaults_to_ten_seconds_and_is_bounded() {
    assert_eq!(parse(MINIMAL).unwrap().sys.interval, 10);
    let off = parse(&format!("{MINIMAL}[sys]\ninterval = 0\n")).unwrap();
    assert_eq!(off.sys.interval, 0);
    let err = parse(&format!("{MINIMAL}[sys]\ninterval = 65536\n")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "broker.toml:5: sys.interval: must be at most 65535 seconds (0 turns the $SYS tree off)"
    );
    let err = parse(&format!("{MINIMAL}[sys]\ninterval = -1\n")).unwrap_err();
    assert!(matches!(err, ConfigError::Syntax { line: 5, .. }), "{err}");
}

const CLUSTER: &str =
    "[cluster]\nservers = [\"nats://127.0.0.1:4222\"]\nnode_name = \"moatmq-0\"\n";
/// What a cluster needs beside `[cluster]`: the key that seals its shared state.
const CLUSTER_KEY: &str = "[retained]\npath = \"data\"\nkey_file = \"retained.key\"\n";

#[test]
fn cluster_is_absent_by_default_and_parses_with_defaults() {
    assert!(parse(MINIMAL).unwrap().cluster.is_none());
    let c = parse(&format!("{MINIMAL}{CLUSTER}{CLUSTER_KEY}")).unwrap();
    let cluster = c.cluster.unwrap();
    assert_eq!(cluster.servers, ["nats://127.0.0.1:4222"]);
    assert_eq!(cluster.node_name, "moatmq-0");
    assert_eq!(cluster.subject_prefix, DEFAULT_SUBJECT_PREFIX);
    assert!(cluster.tls.is_none() && cluster.credentials.is_none());
    assert!(cluster.native_user.is_none());
    assert_eq!(
        (
            cluster.replicas,
            cluster.transfer_max_age,
            cluster.transfer_max_bytes,
            cluster.retained_marker_age
        ),
        (1, 300, 1 << 30, 3600)
    );
    let c = parse(&format!(
        "{MINIMAL}{CLUSTER}replicas = 3\ntransfer_max_age = 3600\ntransfer_max_bytes = 1048576\n\
         retained_marker_age = 1\n{CLUSTER_KEY}"
    ))
    .unwrap();
    let cluster = c.cluster.unwrap();
    assert_eq!(
        (
            cluster.replicas,
            cluster.transfer_max_age,
            cluster.transfer_max_bytes,
            cluster.retained_marker_age
        ),
        (3, 3600, 1 << 20, 1)
    );
}

#[test]
fn cluster_tls_and_credentials_parse() {
    let text = format!(
        "{MINIMAL}{CLUSTER}subject_prefix = \"site.a\"\ncredentials = \"n.creds\"\n\
         native_user = \"bridge\"\n[cluster.tls]\nca = \"ca.crt\"\ncert = \"c.crt\"\nkey = \"c.key\"\n{CLUSTER_KEY}"
    );
    let cluster = parse(&text).unwrap().cluster.unwrap();
    assert_eq!(cluster.subject_prefix, "site.a");
    assert_eq!(cluster.native_user.as_deref(), Some("bridge"));
    let tls = cluster.tls.unwrap();
    assert_eq!(tls.ca.unwrap(), Path::new("ca.crt"));
    assert_eq!(tls.key.unwrap(), Path::new("c.key"));
}

#[test]
fn cluster_rejections_name_key_and_line() {
    let cases = [
        (
            "[cluster]\nservers = []\nnode_name = \"a\"\n",
            "broker.toml:5: cluster.servers: must list at least one NATS server such as \"nats://127.0.0.1:4222\"",
        ),
        (
            "[cluster]\nservers = [\"http://x:4222\"]\nnode_name = \"a\"\n",
            "broker.toml:5: cluster.servers: each server must be a nats:// or tls:// URL such as \"nats://host:4222\"",
        ),
        (
            "[cluster]\nservers = [\"nats://x:4222\"]\nnode_name = \"a b\"\n",
            "broker.toml:6: cluster.node_name: must be 1 to 64 letters, digits, - or _ (unique per node; or set MOATMQ_NODE_NAME)",
        ),
        (
            "[cluster]\nservers = [\"nats://x:4222\"]\nnode_name = \"a\"\nsubject_prefix = \"a.>\"\n",
            "broker.toml:7: cluster.subject_prefix: must be a NATS subject of literal tokens (no *, >, spaces or empty tokens)",
        ),
        (
            "[cluster]\nservers = [\"nats://x:4222\"]\nnode_name = \"a\"\nsubject_prefix = \"a..b\"\n",
            "broker.toml:7: cluster.subject_prefix: must be a NATS subject of literal tokens (no *, >, spaces or empty tokens)",
        ),
        (
            "[cluster]\nservers = [\"nats://x:4222\"]\nnode_name = \"a\"\nnative_user = \"\"\n",
            "broker.toml:7: cluster.native_user: must not be empty (leave it out to drop messages from NATS clients)",
        ),
        (
            "[cluster]\nservers = [\"nats://x:4222\"]\nnode_name = \"a\"\nreplicas = 0\n",
            "broker.toml:7: cluster.replicas: must be 1 to 5 (JetStream keeps at most 5 copies; 3 for a NATS cluster of three)",
        ),
        (
            "[cluster]\nservers = [\"nats://x:4222\"]\nnode_name = \"a\"\ntransfer_max_age = 60\n",
            "broker.toml:7: cluster.transfer_max_age: must be at least 120 seconds (the transfer stream's duplicate window)",
        ),
        (
            "[cluster]\nservers = [\"nats://x:4222\"]\nnode_name = \"a\"\ntransfer_max_bytes = 1000\n",
            "broker.toml:7: cluster.transfer_max_bytes: must be at least 1048576 (1 MiB)",
        ),
        (
            "[cluster]\nservers = [\"nats://x:4222\"]\nnode_name = \"a\"\nretained_marker_age = 0\n",
            "broker.toml:7: cluster.retained_marker_age: must be at least 1 second (a delete marker younger than that is never compacted)",
        ),
        (
            "[cluster]\nservers = [\"nats://x:4222\"]\nnode_name = \"a\"\ncheckpoint_interval = 3601\n",
            "broker.toml:7: cluster.checkpoint_interval: must be 0 to 3600 seconds (0 = no checkpoints)",
        ),
        (
            "[cluster]\nservers = [\"nats://x:4222\"]\nnode_name = \"a\"\nforward_queue = 100\n",
            "broker.toml:7: cluster.forward_queue: must be 256 to 1048576",
        ),
        (
            "[cluster]\nservers = [\"nats://x:4222\"]\nnode_name = \"a\"\nretained_queue = 2000000\n",
            "broker.toml:7: cluster.retained_queue: must be 256 to 1048576",
        ),
        (
            "[cluster]\nservers = [\"nats://x:4222\"]\nnode_name = \"a\"\ntransfer_batch = 0\n",
            "broker.toml:7: cluster.transfer_batch: must be 1 to 4096 (1 = one message per transfer stream message)",
        ),
        (
            "[cluster]\nservers = [\"nats://x:4222\"]\nnode_name = \"a\"\n[cluster.tls]\ncert = \"c.crt\"\n",
            "broker.toml:8: cluster.tls.cert: cert and key go together: set both or neither",
        ),
    ];
    for (section, expected) in cases {
        let err = parse(&format!("{MINIMAL}{section}")).unwrap_err();
        assert_eq!(err.to_string(), expected, "{section}");
    }
}

#[test]
fn cluster_without_a_retained_key_is_refused() {
    let err = parse(&format!("{MINIMAL}{CLUSTER}")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "broker.toml:4: cluster: a cluster needs a [retained] section: its key seals the state the nodes share in NATS (every node uses the same key)"
    );
}

#[test]
fn cluster_without_node_name_or_with_unknown_key_is_refused() {
    let err = parse(&format!(
        "{MINIMAL}[cluster]\nservers = [\"nats://x:4222\"]\n"
    ))
    .unwrap_err();
    assert!(err.to_string().contains("node_name"), "{err}");
    assert!(err.to_string().contains("MOATMQ_NODE_NAME"), "{err}");
    let err = parse(&format!("{MINIMAL}{CLUSTER}node = \"x\"\n")).unwrap_err();
    assert!(matches!(err, ConfigError::Syntax { line: 7, .. }), "{err}");
}

#[test]
fn the_node_name_from_the_environment_wins_and_is_checked_like_the_key() {
    let file = Path::new("broker.toml");
    let servers = "[retained]\npath = \"r\"\n[cluster]\nservers = [\"nats://x:4222\"]\n";
    // One config for every pod: the name comes from the environment.
    let c = Config::parse_with(
        file,
        &format!("{MINIMAL}{servers}"),
        Some("moatmq-2".into()),
    )
    .unwrap();
    assert_eq!(c.cluster.unwrap().node_name, "moatmq-2");
    let c = Config::parse_with(
        file,
        &format!("{MINIMAL}{servers}node_name = \"from-file\"\n"),
        Some("moatmq-1".into()),
    )
    .unwrap();
    assert_eq!(c.cluster.unwrap().node_name, "moatmq-1");
    let err =
        Config::parse_with(file, &format!("{MINIMAL}{servers}"), Some("a b".into())).unwrap_err();
    assert!(err.to_string().contains("cluster.node_name"), "{err}");
    // Without [cluster] the variable changes nothing.
    let c = Config::parse_with(file, MINIMAL, Some("moatmq-0".into())).unwrap();
    assert!(c.cluster.is_none());
}
