//! The fuzz targets: each runs one input through a decoder of untrusted bytes and panics
//! on anything the code must never do (panic, disagree with itself). `run` returns
//! whether the input was accepted (decoded), which the runner uses as a cheap validity
//! signal to keep structurally valid inputs in its pool.

use crate::mqtt;
use crate::store::store_key;
use bytes::BytesMut;
use moatmq_broker::codec::{first_packet, publish_header, qos_and_pkid};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use rumqttd::protocol::{v4::V4, v5::V5, Packet, Protocol};
use std::path::Path;

/// One fuzz target.
pub struct Target {
    pub name: &'static str,
    /// Runs one input; `true` if the decoder accepted it.
    pub run: fn(&[u8]) -> bool,
    /// A fresh random input (structure-aware generation).
    pub generate: fn(&mut StdRng) -> Vec<u8>,
    /// Tokens the mutator may insert.
    pub dict: &'static [&'static [u8]],
}

pub const TARGETS: &[Target] = &[
    Target {
        name: "mqtt_v4",
        run: |d| mqtt_decode(d, false),
        generate: |r| mqtt::random_stream(r, false),
        dict: MQTT_DICT,
    },
    Target {
        name: "mqtt_v5",
        run: |d| mqtt_decode(d, true),
        generate: |r| mqtt::random_stream(r, true),
        dict: MQTT_DICT,
    },
    Target {
        name: "acl_parse",
        run: acl_parse,
        generate: gen_acl,
        dict: ACL_DICT,
    },
    Target {
        name: "topic_match",
        run: topic_match,
        generate: gen_topic_pair,
        dict: TOPIC_DICT,
    },
    Target {
        name: "passwd_parse",
        run: passwd_parse,
        generate: gen_passwd,
        dict: PASSWD_DICT,
    },
    Target {
        name: "config_parse",
        run: config_parse,
        generate: gen_config,
        dict: CONFIG_DICT,
    },
    Target {
        name: "proxy_header",
        run: proxy_header,
        generate: gen_proxy_header,
        dict: PROXY_DICT,
    },
    Target {
        name: "store_records",
        run: store_records,
        generate: crate::store::generate,
        dict: &[],
    },
];

/// The gateway's default `limits.max_packet_size`.
pub const MAX_PACKET: usize = 1024 * 1024;

const MQTT_DICT: &[&[u8]] = &[
    b"\x00\x04MQTT\x04",
    b"\x00\x04MQTT\x05",
    b"\x00\x06MQIsdp\x03",
    b"\xff\xff\xff\x7f",
    b"\x80\x80\x80\x80\x01",
    b"\x00\x00",
    b"\xff\xff",
    b"\x26\x00\x01k\x00\x01v",
    b"\x23\x00\x01",
    b"\x0b\x01",
    b"\x00\x03a/#",
    b"\x00\x09$share/g/",
    b"\x20\x02\x00\x00",
    b"\xb0\x02\x00\x01",
    b"\xc0\x00",
    b"\xe0\x00",
];

/// Decodes every packet in `data` as the gateway does after CONNECT (publish header read
/// off the wire first, then rumqttd's decoder), checks the two agree, and re-encodes
/// each decoded publish as it would be forwarded to MQTT 3.1.1 and 5 subscribers.
fn mqtt_decode(data: &[u8], v5: bool) -> bool {
    // What the connection's first bytes look like, as read before CONNECT.
    let _ = first_packet(data);
    let mut codec: Box<dyn Protocol> = if v5 { Box::new(V5) } else { Box::new(V4) };
    let mut buf = BytesMut::from(data);
    let mut accepted = false;
    for _ in 0..64 {
        if buf.is_empty() {
            break;
        }
        let header = publish_header(&buf);
        // The gateway's own guard in front of rumqttd; rumqttd itself runs unguarded here
        // so that any panic past the guard is found.
        if guarded() && moatmq_broker::codec::refuse_before_decode(&buf).is_some() {
            break;
        }
        match codec.read_mut(&mut buf, MAX_PACKET) {
            Ok(packet) => {
                accepted = true;
                check_packet(packet, header);
            }
            Err(_) => break,
        }
    }
    accepted
}

/// `MOATMQ_FUZZ_UNGUARDED=1` runs rumqttd without the gateway's guard, to see what the
/// guard is for.
fn guarded() -> bool {
    static GUARDED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *GUARDED.get_or_init(|| std::env::var_os("MOATMQ_FUZZ_UNGUARDED").is_none())
}

fn check_packet(packet: Packet, header: Option<(rumqttd::protocol::QoS, u16)>) {
    if let Packet::Publish(publish, props) = packet {
        // The gateway trusts publish_header for QoS and packet id: it must agree with
        // what rumqttd decoded, or acknowledgements go to the wrong id.
        let decoded = qos_and_pkid(&publish);
        assert_eq!(
            header,
            Some(decoded),
            "publish_header disagrees with rumqttd"
        );
        if let Ok(topic) = std::str::from_utf8(&publish.topic) {
            let _ = moatmq_broker::topic::valid_topic_name(topic, 32);
        }
        // Forwarded to a 3.1.1 subscriber (properties stripped) and to an MQTT 5 one.
        let mut out = BytesMut::new();
        V4.write(Packet::Publish(publish.clone(), None), &mut out)
            .expect("v4 encodes a decoded publish");
        let mut out5 = BytesMut::new();
        V5.write(Packet::Publish(publish.clone(), props.clone()), &mut out5)
            .expect("v5 encodes a decoded publish");
        match V5.read_mut(&mut out5, usize::MAX) {
            Ok(Packet::Publish(p, q)) => {
                assert_eq!(p.topic, publish.topic, "topic changed in a v5 round trip");
                assert_eq!(
                    p.payload, publish.payload,
                    "payload changed in a v5 round trip"
                );
                assert_eq!(q, props, "properties changed in a v5 round trip");
            }
            other => panic!("re-encoded v5 publish does not decode: {other:?}"),
        }
    }
}

const ACL_DICT: &[&[u8]] = &[
    b"topic ",
    b"topic read ",
    b"topic write ",
    b"topic readwrite ",
    b"topic deny ",
    b"user ",
    b"pattern ",
    b"pattern read ",
    b"%u",
    b"%c",
    b"#",
    b"+",
    b"/",
    b"$share/",
    b"$SYS/",
    b"\n",
    b"\r\n",
    b"\0",
];

fn acl_parse(data: &[u8]) -> bool {
    let text = String::from_utf8_lossy(data);
    let Ok(acl) = moatmq_acl::Acl::parse(Path::new("fuzz.acl"), &text) else {
        return false;
    };
    let _ = acl.rule_count();
    // Topics: fixed ones plus every word of the file (so rules get exercised).
    let mut topics: Vec<&str> = vec![
        "a",
        "a/b",
        "$SYS/x",
        "alice/x",
        "c1/x",
        "#",
        "+/+",
        "$share/g/a",
        "",
        "a//b",
    ];
    topics.extend(text.split_whitespace().take(32));
    let users = [None, Some("alice"), Some(""), Some("a/b"), Some("$x")];
    for username in users {
        for client_id in ["c1", "", "+"] {
            let who = moatmq_acl::Identity {
                username,
                client_id,
            };
            for t in &topics {
                let read = acl.check_read(&who, t);
                let sub = acl.check_subscribe(&who, t);
                let _ = acl.check_publish(&who, t);
                if let Some(line) = read.line.or(sub.line) {
                    assert!(line >= 1, "line numbers are 1-based");
                }
                // A granted subscription to a plain topic implies the topic may be read.
                if sub.allowed && moatmq_acl::valid_topic_name(t) && !t.starts_with("$share/") {
                    assert!(
                        read.allowed,
                        "subscribe {t:?} allowed but reading it is not"
                    );
                }
            }
        }
    }
    true
}

fn gen_acl(rng: &mut StdRng) -> Vec<u8> {
    let mut out = String::new();
    for _ in 0..rng.gen_range(0..12) {
        let line = match rng.gen_range(0..8) {
            0 => format!("user {}", pick(rng, &["alice", "bob", "", "a b", "%u"])),
            1 => "# comment".to_string(),
            2 => String::new(),
            3 => format!("pattern {} {}", access(rng), topic_like(rng)),
            _ => format!("topic {} {}", access(rng), topic_like(rng)),
        };
        out.push_str(&line);
        out.push_str(pick(rng, &["\n", "\r\n", "  \n"]));
    }
    out.into_bytes()
}

fn access(rng: &mut StdRng) -> &'static str {
    pick(
        rng,
        &[
            "",
            "read",
            "write",
            "readwrite",
            "deny",
            "READ",
            "subscribe",
        ],
    )
}

fn topic_like(rng: &mut StdRng) -> String {
    let parts = [
        "a", "b", "+", "#", "%u", "%c", "$SYS", "$share", "g", "", "é", "x+", "#a", "\0",
    ];
    let n = rng.gen_range(0..6);
    (0..n)
        .map(|_| pick(rng, &parts))
        .collect::<Vec<_>>()
        .join("/")
}

fn pick<'a>(rng: &mut StdRng, items: &[&'a str]) -> &'a str {
    items.choose(rng).copied().unwrap_or("")
}

const TOPIC_DICT: &[&[u8]] = &[b"#", b"+", b"/", b"$", b"$share/", b"$SYS", b"\n", b"\0"];

/// Input: `filter \n topic`.
fn topic_match(data: &[u8]) -> bool {
    let text = String::from_utf8_lossy(data);
    let (filter, topic) = text.split_once('\n').unwrap_or((&text, ""));
    let vf = moatmq_acl::valid_topic_filter(filter);
    let vt = moatmq_acl::valid_topic_name(topic);
    let _ = moatmq_acl::strip_share(filter);
    let _ = moatmq_broker::topic::valid_topic_filter(filter, 32);
    let _ = moatmq_broker::topic::valid_topic_name(topic, 32);
    let m = moatmq_acl::topic_matches_filter(filter, topic);
    if m {
        assert!(vf && vt, "match with an invalid filter or topic");
    }
    if m && topic.starts_with('$') {
        assert!(
            !filter.starts_with('#') && !filter.starts_with('+'),
            "leading wildcard matched a $-topic"
        );
    }
    if vt && !topic.starts_with('$') {
        assert!(
            moatmq_acl::topic_matches_filter("#", topic),
            "# does not match {topic:?}"
        );
    }
    if vt && !topic.starts_with("$share/") {
        assert!(
            moatmq_acl::topic_matches_filter(topic, topic),
            "{topic:?} does not match itself"
        );
    }
    m
}

fn gen_topic_pair(rng: &mut StdRng) -> Vec<u8> {
    let f = topic_like(rng);
    let t = if rng.gen_bool(0.5) {
        f.replace(['+', '#'], "x")
    } else {
        topic_like(rng)
    };
    format!("{f}\n{t}").into_bytes()
}

const PASSWD_DICT: &[&[u8]] = &[
    b"$argon2id$v=19$m=19456,t=2,p=1$",
    b"$argon2i$",
    b"$7$101$",
    b"$6$",
    b":",
    b"\n",
    b"#",
    b"$",
    b"m=4294967295",
    b"==",
];

/// Parses a password file. Verification is not run: it costs an Argon2 hash per call,
/// and the parser is what bounds the hash parameters it accepts.
fn passwd_parse(data: &[u8]) -> bool {
    let text = String::from_utf8_lossy(data);
    match moatmq_auth::PasswordFile::parse(Path::new("fuzz.passwd"), &text) {
        Ok(file) => {
            let _ = (file.len(), file.legacy_users());
            true
        }
        Err(e) => {
            // Errors never carry the hash text (pinned by the auth crate's tests for
            // known lines; here for every line the fuzzer makes).
            let msg = e.to_string();
            for line in text.lines() {
                if let Some((_, hash)) = line.split_once(':') {
                    if hash.len() >= 16 {
                        assert!(!msg.contains(hash.trim()), "error leaks a hash: {msg}");
                    }
                }
            }
            false
        }
    }
}

fn gen_passwd(rng: &mut StdRng) -> Vec<u8> {
    let b64 = |rng: &mut StdRng, n: usize| -> String {
        const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        (0..n)
            .map(|_| A[rng.gen_range(0..A.len())] as char)
            .collect()
    };
    let mut out = String::new();
    for _ in 0..rng.gen_range(0..5) {
        let user = pick(rng, &["alice", "bob", "", "a/b", "x+", "alice"]);
        let hash = match rng.gen_range(0..5) {
            0 => format!(
                "$argon2id$v=19$m={},t={},p={}${}${}",
                rng.gen_range(0..100_000),
                rng.gen_range(0..5),
                rng.gen_range(0..5),
                b64(rng, 22),
                b64(rng, 43)
            ),
            1 => format!(
                "$7${}${}${}",
                rng.gen_range(0..2000),
                b64(rng, 16),
                b64(rng, 88)
            ),
            2 => format!("$6${}${}", b64(rng, 16), b64(rng, 86)),
            3 => b64(rng, 10),
            _ => String::new(),
        };
        out.push_str(&format!("{user}:{hash}\n"));
    }
    out.into_bytes()
}

const CONFIG_DICT: &[&[u8]] = &[
    b"[[listener]]\n",
    b"[listener.tls]\n",
    b"[auth]\n",
    b"[acl]\n",
    b"[retained]\n",
    b"[limits]\n",
    b"[log]\n",
    b"name = \"l\"\n",
    b"bind = \"127.0.0.1:0\"\n",
    b"protocol = \"ws\"\n",
    b" = ",
    b"\"",
    b"0",
    b"18446744073709551615",
    b"-1",
    b"true",
    b"\"hunter2-secret\"",
    b"[metrics]\n",
    b"[rate_limit]\n",
    b"[[rate_limit.user]]\n",
];

/// Parses broker.toml text, and the same text as a mosquitto.conf for the importer.
fn config_parse(data: &[u8]) -> bool {
    let text = String::from_utf8_lossy(data);
    let _ = moatmq_config::import_mosquitto(&text, Path::new("fuzz/mosquitto.conf"));
    match moatmq_config::Config::parse(Path::new("fuzz.toml"), &text) {
        Ok(config) => {
            for l in &config.listener {
                let _ = config.anonymous_allowed(l);
            }
            true
        }
        Err(e) => {
            // One line, and no configured value: a secret written only as a value
            // (after `= "` or `= ["`) never reaches the message.
            let msg = e.to_string();
            assert!(
                !msg.contains('\n'),
                "config error over several lines: {msg:?}"
            );
            let only_values = text
                .match_indices(CONFIG_SECRET)
                .all(|(at, _)| text[..at].ends_with("= \"") || text[..at].ends_with("= [\""));
            if only_values {
                assert!(!msg.contains(CONFIG_SECRET), "config value echoed: {msg}");
            }
            false
        }
    }
}

/// A value the config generator and dictionary write where secrets go.
const CONFIG_SECRET: &str = "hunter2-secret";

fn gen_config(rng: &mut StdRng) -> Vec<u8> {
    let sections = [
        "[[listener]]",
        "[auth]",
        "[acl]",
        "[retained]",
        "[limits]",
        "[log]",
        "[metrics]",
        "[listener.tls]",
    ];
    let keys = [
        "name = \"tcp\"",
        "bind = \"127.0.0.1:1883\"",
        "bind = \"[::1]:0\"",
        "bind = \"nonsense\"",
        "protocol = \"mqtt\"",
        "protocol = \"ws\"",
        "allow_anonymous = true",
        "password_file = \"passwd\"",
        "file = \"aclfile\"",
        "path = \"data\"",
        "key_file = \"k\"",
        "autosave_interval = 0",
        "max_packet_size = 0",
        "max_packet_size = 18446744073709551615",
        "connect_timeout = 1",
        "max_topic_levels = 1",
        "max_queued_bytes = 1",
        "format = \"json\"",
        "level = \"debug\"",
        "unknown = 1",
        "max_connections = -1",
        "bind = \"hunter2-secret\"",
        "max_connections = \"hunter2-secret\"",
        "format = \"hunter2-secret\"",
        "path = [\"hunter2-secret\"]",
        "name = \"hunter2-secret\"",
    ];
    let mut out = String::new();
    if rng.gen_bool(0.8) {
        out.push_str("[[listener]]\nname = \"tcp\"\nbind = \"127.0.0.1:0\"\n");
    }
    for _ in 0..rng.gen_range(0..8) {
        if rng.gen_bool(0.3) {
            out.push_str(pick(rng, &sections));
        } else {
            out.push_str(pick(rng, &keys));
        }
        out.push('\n');
    }
    out.into_bytes()
}

fn store_records(data: &[u8]) -> bool {
    match moatmq_store::decode_log_image(&store_key(), data) {
        Ok(messages) => {
            for m in &messages {
                assert!(m.qos <= 2, "decoded qos {}", m.qos);
            }
            true
        }
        Err(e) => {
            let _ = e.to_string();
            false
        }
    }
}

const PROXY_DICT: &[&[u8]] = &[
    b"PROXY ",
    b"TCP4 ",
    b"TCP6 ",
    b"UNKNOWN",
    b"\r\n",
    b"\r\n\r\n\0\r\nQUIT\n",
    b"\x21\x11\x00\x0c",
    b"\x21\x21\x00\x24",
    b"\x20\x00\x00\x00",
    b"255.255.255.255 ",
    b"::ffff:1.2.3.4 ",
    b"65535 ",
];

/// The PROXY protocol reader on a trusting listener, fed `data` as the socket's bytes.
/// It must never read past the header it accepts (the TLS or MQTT bytes that follow stay
/// in the socket), and the header alone must give the same answer.
fn proxy_header(data: &[u8]) -> bool {
    let mut rest = data;
    let result = poll_ready(moatmq_broker::proxy::read_header(&mut rest));
    let Ok(addr) = result else {
        return false;
    };
    let header = &data[..data.len() - rest.len()];
    assert!(
        header.starts_with(b"PROXY ") || header.starts_with(b"\r\n\r\n\0\r\nQUIT\n"),
        "accepted a header without a PROXY signature"
    );
    if header.starts_with(b"PROXY ") {
        assert!(
            header.ends_with(b"\r\n"),
            "v1 header accepted without its CRLF"
        );
    }
    let mut again = header;
    let second = poll_ready(moatmq_broker::proxy::read_header(&mut again));
    assert_eq!(
        second.ok(),
        Some(addr),
        "the header alone reads differently"
    );
    assert!(again.is_empty(), "the header alone was not read to its end");
    true
}

/// Runs a future over in-memory input, which is always ready: one poll must finish it.
fn poll_ready<F: std::future::Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(out) => out,
        std::task::Poll::Pending => panic!("a read of in-memory bytes did not complete"),
    }
}

fn gen_proxy_header(rng: &mut StdRng) -> Vec<u8> {
    let mut out = if rng.gen_bool(0.5) {
        let v6 = rng.gen_bool(0.5);
        let (fam, src, dst) = if v6 {
            ("TCP6", "2001:db8::7", "::1")
        } else {
            ("TCP4", "203.0.113.7", "10.0.0.1")
        };
        let fam = *[fam, "UNKNOWN", "TCP5"].choose(rng).unwrap_or(&fam);
        format!("PROXY {fam} {src} {dst} {} 1883\r\n", rng.gen::<u16>()).into_bytes()
    } else {
        let mut v2 = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        let v6 = rng.gen_bool(0.5);
        let len: u16 = if v6 { 36 } else { 12 };
        let cmd = *[0x21u8, 0x20, 0x11].choose(rng).unwrap_or(&0x21);
        v2.extend([cmd, if v6 { 0x21 } else { 0x11 }]);
        v2.extend(len.to_be_bytes());
        v2.extend((0..len).map(|_| rng.gen::<u8>()));
        v2
    };
    out.extend(b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00");
    out
}
