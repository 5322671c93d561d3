//! [`TestBrokerBuilder`]: a broker's configuration written as calls instead of TOML
//! text, with the files it names (password file, ACL file, certificates, store key)
//! written into the broker's temp folder. It renders `broker.toml` in a fixed order:
//! the listeners (each followed by its `tls` and `forwarded` tables), then the sections
//! in the order first set, then any raw TOML added with [`TestBrokerBuilder::toml`].
//! Every listener binds `127.0.0.1:0`; the bound ports are read back from the broker.

use crate::{write_file, TestBroker, TestCa};
use std::path::{Path, PathBuf};
use toml::Value;

/// One `[[listener]]`.
#[derive(Clone, Debug)]
pub struct Listener {
    name: String,
    keys: Vec<(String, Value)>,
    tls: Vec<(String, Value)>,
    forwarded: Vec<(String, Value)>,
}

impl Listener {
    /// A plain MQTT listener called `name` on `127.0.0.1:0`.
    pub fn tcp(name: &str) -> Listener {
        Listener {
            name: name.to_string(),
            keys: vec![("bind".into(), "127.0.0.1:0".into())],
            tls: Vec::new(),
            forwarded: Vec::new(),
        }
    }

    /// An MQTT-over-WebSocket listener called `name` on `127.0.0.1:0`.
    pub fn ws(name: &str) -> Listener {
        Listener::tcp(name).set("protocol", "ws")
    }

    /// Any other listener key, e.g. `allow_anonymous`, `trust_proxy_protocol`, `path`.
    pub fn set(mut self, key: &str, value: impl Into<Value>) -> Listener {
        self.keys.push((key.to_string(), value.into()));
        self
    }

    /// TLS with the certificate [`TestBrokerBuilder::server_cert`] writes.
    pub fn tls(self) -> Listener {
        self.tls_set("cert", "server.crt")
            .tls_set("key", "server.key")
    }

    /// A key of `[listener.tls]`, e.g. `client_ca`, `require_client_cert`, `identity`.
    pub fn tls_set(mut self, key: &str, value: impl Into<Value>) -> Listener {
        self.tls.push((key.to_string(), value.into()));
        self
    }

    /// `[listener.forwarded]`: the client address comes from `header` when the
    /// connection comes from one of `trusted_proxies`.
    pub fn forwarded(mut self, header: &str, trusted_proxies: &[&str]) -> Listener {
        self.forwarded.push(("header".into(), header.into()));
        let proxies: Vec<Value> = trusted_proxies.iter().map(|p| (*p).into()).collect();
        self.forwarded
            .push(("trusted_proxies".into(), Value::Array(proxies)));
        self
    }

    fn render(&self, out: &mut String) {
        out.push_str("[[listener]]\n");
        push_key(out, "name", &self.name.as_str().into());
        for (key, value) in &self.keys {
            push_key(out, key, value);
        }
        for (table, keys) in [("tls", &self.tls), ("forwarded", &self.forwarded)] {
            if !keys.is_empty() {
                out.push_str(&format!("[listener.{table}]\n"));
                for (key, value) in keys {
                    push_key(out, key, value);
                }
            }
        }
    }
}

fn push_key(out: &mut String, key: &str, value: &Value) {
    out.push_str(&format!("{key} = {value}\n"));
}

/// A broker being configured; [`TestBrokerBuilder::start`] starts it.
pub struct TestBrokerBuilder {
    dir: tempfile::TempDir,
    listeners: Vec<Listener>,
    sections: Vec<(String, Vec<(String, Value)>)>,
    raw: String,
}

impl TestBrokerBuilder {
    pub(crate) fn new() -> TestBrokerBuilder {
        TestBrokerBuilder {
            dir: tempfile::tempdir().expect("temp dir"),
            listeners: Vec::new(),
            sections: Vec::new(),
            raw: String::new(),
        }
    }

    /// Adds a listener. Without any, the broker gets one plain listener called `tcp`.
    pub fn listener(mut self, listener: Listener) -> Self {
        self.listeners.push(listener);
        self
    }

    /// Sets `key` in `[section]` (a later value for the same key replaces the earlier).
    pub fn set(mut self, section: &str, key: &str, value: impl Into<Value>) -> Self {
        let value = value.into();
        let keys = match self.sections.iter_mut().find(|(s, _)| s == section) {
            Some((_, keys)) => keys,
            None => {
                self.sections.push((section.to_string(), Vec::new()));
                &mut self.sections.last_mut().expect("just pushed").1
            }
        };
        match keys.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = value,
            None => keys.push((key.to_string(), value)),
        }
        self
    }

    /// `[auth] allow_anonymous = true`.
    pub fn anonymous(self) -> Self {
        self.set("auth", "allow_anonymous", true)
    }

    /// A password file `passwd` with these `(user, password)` pairs (Argon2id), as
    /// `[auth] password_file`.
    pub fn users(self, users: &[(&str, &str)]) -> Self {
        write_password_file(self.dir.path(), users);
        self.set("auth", "password_file", "passwd")
    }

    /// The ACL file `aclfile` with `rules`, as `[acl] file`.
    pub fn acl(self, rules: &str) -> Self {
        write_file(self.dir.path(), "aclfile", rules);
        self.set("acl", "file", "aclfile")
    }

    /// A key of `[limits]`.
    pub fn limit(self, key: &str, value: impl Into<Value>) -> Self {
        self.set("limits", key, value)
    }

    /// A key of `[rate_limit]`.
    pub fn rate_limit(self, key: &str, value: impl Into<Value>) -> Self {
        self.set("rate_limit", key, value)
    }

    /// `[rate_limit] connections_per_second = 0`: every test connection comes from
    /// loopback, so the per-address connection rate would otherwise hold tests back.
    pub fn no_connection_rate(self) -> Self {
        self.rate_limit("connections_per_second", 0)
    }

    /// An encrypted retained store in `data/retained` with a fresh key `retained.key`
    /// (other `[retained]` keys with [`Self::set`]).
    pub fn retained_store(self) -> Self {
        let key = self.dir.path().join("retained.key");
        if !key.exists() {
            moatmq_store::RetainedKey::write_new(&key).expect("write retained key");
        }
        self.set("retained", "path", "data/retained")
            .set("retained", "key_file", "retained.key")
    }

    /// `[metrics]` on `127.0.0.1:0` ([`TestBroker::metrics_addr`]).
    pub fn metrics(self) -> Self {
        self.set("metrics", "bind", "127.0.0.1:0")
    }

    /// `[audit]` to `audit.log` in the broker's folder.
    pub fn audit(self) -> Self {
        self.set("audit", "path", "audit.log")
    }

    /// A server certificate `server.crt` / `server.key` signed by `ca`, for
    /// [`Listener::tls`].
    pub fn server_cert(self, ca: &TestCa) -> Self {
        ca.server(self.dir.path(), "server");
        self
    }

    /// `ca`'s certificate as `client-ca.crt`, for `Listener::tls_set("client_ca", ..)`.
    pub fn client_ca(self, ca: &TestCa) -> Self {
        ca.write_ca(self.dir.path(), "client-ca.crt");
        self
    }

    /// Writes `dir/name` for the broker to read.
    pub fn file(self, name: &str, text: &str) -> Self {
        write_file(self.dir.path(), name, text);
        self
    }

    /// TOML appended as it is, after everything else (e.g. `[[rate_limit.user]]`).
    pub fn toml(mut self, text: &str) -> Self {
        self.raw.push_str(text);
        self
    }

    /// The folder the broker's files are written to.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The `broker.toml` this renders to.
    pub fn config_text(&self) -> String {
        let mut out = String::new();
        if self.listeners.is_empty() {
            Listener::tcp("tcp").render(&mut out);
        }
        for l in &self.listeners {
            l.render(&mut out);
        }
        for (section, keys) in &self.sections {
            out.push_str(&format!("[{section}]\n"));
            for (key, value) in keys {
                push_key(&mut out, key, value);
            }
        }
        out.push_str(&self.raw);
        out
    }

    /// Writes `broker.toml` and hands back the folder and the config's path, for a test
    /// that starts the broker itself (e.g. to see `Broker::start` fail).
    pub fn write(self) -> (tempfile::TempDir, PathBuf) {
        let path = write_file(self.dir.path(), "broker.toml", &self.config_text());
        (self.dir, path)
    }

    /// Writes `broker.toml` and starts the broker on the test's runtime.
    pub async fn start(self) -> TestBroker {
        let text = self.config_text();
        TestBroker::with_config_in(self.dir, &text).await
    }
}

/// Writes the password file `dir/passwd` with these `(user, password)` pairs, hashed
/// with Argon2id (also to change it under a running broker before a reload).
///
/// The same users get the same file (hashes and salts) within one test process, as the
/// nodes of a cluster share one password file in a deployment.
pub fn write_password_file(dir: &Path, users: &[(&str, &str)]) -> PathBuf {
    type Files = std::collections::HashMap<Vec<(String, String)>, String>;
    static FILES: std::sync::Mutex<Option<Files>> = std::sync::Mutex::new(None);
    let wanted: Vec<(String, String)> = users
        .iter()
        .map(|(u, p)| ((*u).to_owned(), (*p).to_owned()))
        .collect();
    let mut files = FILES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let text = files
        .get_or_insert_with(Files::new)
        .entry(wanted)
        .or_insert_with(|| {
            let mut text = String::from("# test users\n");
            for (user, pass) in users {
                let hash = moatmq_auth::hash_password(pass.as_bytes()).expect("hash");
                text.push_str(&format!("{user}:{hash}\n"));
            }
            text
        })
        .clone();
    drop(files);
    write_file(dir, "passwd", &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_listeners_then_sections_in_order() {
        let b = TestBrokerBuilder::new()
            .listener(Listener::tcp("tcp"))
            .listener(
                Listener::ws("cf")
                    .set("path", vec!["/", "/ws"])
                    .forwarded("CF-Connecting-IP", &["127.0.0.31/32"]),
            )
            .listener(Listener::tcp("tls").set("allow_anonymous", true).tls())
            .anonymous()
            .limit("max_packet_size", 1024)
            .rate_limit("connections_per_second", 0)
            .limit("connect_timeout", 1)
            .limit("max_packet_size", 2048)
            .toml("[[rate_limit.user]]\nname = \"x\"\n");
        assert_eq!(
            b.config_text(),
            r#"[[listener]]
name = "tcp"
bind = "127.0.0.1:0"
[[listener]]
name = "cf"
bind = "127.0.0.1:0"
protocol = "ws"
path = ["/", "/ws"]
[listener.forwarded]
header = "CF-Connecting-IP"
trusted_proxies = ["127.0.0.31/32"]
[[listener]]
name = "tls"
bind = "127.0.0.1:0"
allow_anonymous = true
[listener.tls]
cert = "server.crt"
key = "server.key"
[auth]
allow_anonymous = true
[limits]
max_packet_size = 2048
connect_timeout = 1
[rate_limit]
connections_per_second = 0
[[rate_limit.user]]
name = "x"
"#
        );
    }

    #[test]
    fn the_default_listener_is_tcp() {
        let text = TestBrokerBuilder::new().anonymous().config_text();
        assert_eq!(
            text,
            "[[listener]]\nname = \"tcp\"\nbind = \"127.0.0.1:0\"\n[auth]\nallow_anonymous = true\n"
        );
    }
}
