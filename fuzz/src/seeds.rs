//! Writes the generated part of the seed corpus (`moatmq-fuzz seeds`): valid packets of
//! every client packet type in MQTT 3.1.1 and 5, example ACL, password and config files
//! and small valid store logs made with the store crate's API. Known-bad inputs found by
//! fuzzing are added by hand as `corpus/<target>/bad-*` and are never rewritten.

use crate::mqtt;
use crate::store::store_key;
use bytes::BytesMut;
use moatmq_store::{Store, StoreLimits};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rumqttd::protocol::{v4::V4, v5::V5, Protocol};
use std::path::Path;

pub fn write_all(corpus: &Path) -> Result<usize, String> {
    let mut n = 0;
    let mut put = |target: &str, name: &str, bytes: &[u8]| -> Result<(), String> {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        std::fs::write(dir.join(format!("seed-{name}")), bytes).map_err(|e| e.to_string())?;
        n += 1;
        Ok(())
    };

    for (name, header) in [
        (
            "v1-tcp4.bin",
            &b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 1883\r\n"[..],
        ),
        ("v1-tcp6.bin", b"PROXY TCP6 2001:db8::7 ::1 40000 1883\r\n"),
        ("v1-unknown.bin", b"PROXY UNKNOWN\r\n"),
        (
            "v2-tcp4.bin",
            b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c\xc6\x33\x64\x09\x0a\x00\x00\x01\x9c\x40\x07\x5b",
        ),
        ("v2-local.bin", b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00"),
    ] {
        let mut bytes = header.to_vec();
        bytes.extend(b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00");
        put("proxy_header", name, &bytes)?;
    }

    for (target, v5) in [("mqtt_v4", false), ("mqtt_v5", true)] {
        let mut all = Vec::new();
        for (name, bytes) in mqtt::valid_packets(v5) {
            // Each seed must decode, or it is not the seed it claims to be.
            let mut buf = BytesMut::from(&bytes[..]);
            let decoded = if v5 {
                V5.read_mut(&mut buf, usize::MAX)
            } else {
                V4.read_mut(&mut buf, usize::MAX)
            };
            decoded.map_err(|e| format!("{target} seed {name} does not decode: {e}"))?;
            put(target, &format!("{name}.bin"), &bytes)?;
            all.extend(bytes);
        }
        put(target, "all-in-one-read.bin", &all)?;
    }

    put(
        "acl_parse",
        "tenants.acl",
        b"# anonymous section\ntopic read public/#\n\nuser alice\ntopic readwrite alice/#\ntopic deny alice/secret/#\n\nuser admin\ntopic readwrite #\ntopic read $SYS/#\n\npattern readwrite tenants/%u/#\npattern write devices/%c/status\n",
    )?;
    put(
        "acl_parse",
        "shared.acl",
        b"user bob\ntopic read $share/g/jobs/+\ntopic write jobs/+\r\npattern read %u/+/in\n",
    )?;

    for (name, pair) in [
        ("hash", "#\na/b"),
        ("plus", "a/+/c\na/b/c"),
        ("sys", "+/x\n$SYS/x"),
        ("share", "$share/g/a/#\na/b"),
        ("exact", "a/b\na/b"),
        ("empty-levels", "a//#\na//b"),
    ] {
        put("topic_match", &format!("{name}.txt"), pair.as_bytes())?;
    }

    let argon = moatmq_auth::hash_password(b"correct horse").map_err(|e| e.to_string())?;
    put(
        "passwd_parse",
        "argon2id.txt",
        format!("# users\nalice:{argon}\n\nbob:{argon}\n").as_bytes(),
    )?;

    let repo = crate::fuzz_dir().join("..");
    let example = std::fs::read(repo.join("broker.toml.example")).map_err(|e| e.to_string())?;
    put("config_parse", "broker.toml.example", &example)?;
    put(
        "config_parse",
        "tls-retained.toml",
        b"[[listener]]\nname = \"tls\"\nbind = \"0.0.0.0:8883\"\n[listener.tls]\ncert = \"s.crt\"\nkey = \"s.key\"\nclient_ca = \"ca.crt\"\nidentity = \"cn\"\n\n[[listener]]\nname = \"ws\"\nbind = \"127.0.0.1:8080\"\nprotocol = \"ws\"\n\n[auth]\npassword_file = \"passwd\"\n[acl]\nfile = \"aclfile\"\n[retained]\npath = \"data\"\nautosave_interval = 0\n[limits]\nmax_packet_size = 4096\nconnect_timeout = 1\n[log]\nformat = \"json\"\n",
    )?;
    put(
        "config_parse",
        "mosquitto.conf",
        b"listener 1883 127.0.0.1\nallow_anonymous false\npassword_file /etc/mosquitto/passwd\nacl_file /etc/mosquitto/acl\nmax_packet_size 1000\n\nlistener 8883\ncertfile server.crt\nkeyfile server.key\nrequire_certificate true\nuse_identity_as_username true\n",
    )?;

    // Small valid logs, one written with several flushes and one compacted.
    for (name, seed) in [("log-a.bin", 1u64), ("log-b.bin", 2), ("log-c.bin", 3)] {
        let mut rng = StdRng::seed_from_u64(seed);
        put("store_records", name, &crate::store::generate(&mut rng))?;
    }
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let (store, _) =
        Store::open(dir.path(), store_key(), StoreLimits::UNLIMITED).map_err(|e| e.to_string())?;
    put(
        "store_records",
        "log-empty.bin",
        &std::fs::read(store.log_path()).map_err(|e| e.to_string())?,
    )?;
    Ok(n)
}
