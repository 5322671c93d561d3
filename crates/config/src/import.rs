//! `moatmq import-mosquitto`: converts a `mosquitto.conf` into a `broker.toml`.
//!
//! The file is read the way Mosquitto 2.x reads it: one `option value...` per line, `#`
//! lines are comments, options apply in file order, `include_dir` splices in the
//! folder's `*.conf` files in name order. Listener options before the first `listener`
//! line belong to the default listener (`port`), which exists only if one of them is
//! set; with no listener at all Mosquitto runs in local-only mode (loopback, anonymous
//! allowed) and so does the result. With `per_listener_settings true` the security
//! options (`allow_anonymous`, `password_file`, `acl_file`) belong to the listener they
//! follow.
//!
//! What maps is written to the TOML; every other option is named in a warning saying
//! why it cannot be carried over, once, with the line it was first seen on. The ACL and
//! password files are not rewritten: the result points at them. A value that Mosquitto
//! itself would refuse (a bad boolean, port or number) is an error naming file and line;
//! errors and warnings never echo option values.

use crate::error::ConfigError;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The result of an import: a `broker.toml` text and what could not be carried over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportReport {
    /// The converted configuration; it parses with [`crate::Config::parse`]. The
    /// warnings are repeated at its top as comments.
    pub toml: String,
    /// One line per option that was dropped or changed meaning, and why.
    pub warnings: Vec<String>,
}

/// Converts the Mosquitto configuration `conf_text`, read from `conf_path`.
///
/// `conf_path` names errors and anchors relative paths (`include_dir`, certificate,
/// password and ACL files): Mosquitto resolves those against its working directory,
/// which is usually the configuration's folder; a warning says so when it happens.
pub fn import_mosquitto(conf_text: &str, conf_path: &Path) -> Result<ImportReport, ConfigError> {
    let mut st = State::new(conf_path);
    st.feed(conf_text, conf_path, 0)?;
    Ok(st.finish())
}

/// Mosquitto limits neither connection nor publish rates: neither does the result, so
/// clients that worked keep working.
const RATE_LIMIT: &str = "
[rate_limit]
# Mosquitto has no rate limits, so they are off here (0) as they were. moatmq's defaults
# (20 new connections/s per address, 1000 messages/s and 10 MiB/s per client, paced, never
# disconnected) keep one client from taking the broker: once you know your clients' rates,
# delete these lines and give fast clients their own limits with [[rate_limit.user]].
connections_per_second = 0
messages_per_second = 0
bytes_per_second = 0
";

/// Options that only make sense inside a bridge (`connection ...`) section.
const BRIDGE_OPTIONS: &[&str] = &[
    "address",
    "addresses",
    "bridge_attempt_unsubscribe",
    "bridge_bind_address",
    "bridge_cafile",
    "bridge_capath",
    "bridge_certfile",
    "bridge_identity",
    "bridge_insecure",
    "bridge_keyfile",
    "bridge_max_packet_size",
    "bridge_outgoing_retain",
    "bridge_protocol_version",
    "bridge_psk",
    "bridge_require_ocsp",
    "bridge_tls_version",
    "cleansession",
    "clientid",
    "idle_timeout",
    "keepalive_interval",
    "local_cleansession",
    "local_clientid",
    "local_password",
    "local_username",
    "notification_topic",
    "notifications",
    "notifications_local_only",
    "remote_clientid",
    "remote_password",
    "remote_username",
    "restart_timeout",
    "round_robin",
    "start_type",
    "threshold",
    "topic",
    "try_private",
];

/// Why an option has no moatmq equivalent.
fn unsupported_reason(option: &str) -> &'static str {
    match option {
        "pid_file" => "moatmq writes no pid file; systemd or the container runtime tracks the process",
        "user" => "moatmq does not switch users; start it as an unprivileged user (systemd User=, container USER)",
        "log_dest" | "log_type" | "log_facility" | "log_timestamp" | "log_timestamp_format"
        | "connection_messages" | "websockets_log_level" => {
            "moatmq logs to stderr; choose [log] format and level instead"
        }
        "persistence_file" | "autosave_on_changes" => {
            "moatmq keeps retained messages and persistent sessions in its own encrypted files \
             (retained.log, sessions.log in the [retained] path), saved by time (autosave_interval)"
        }
        "max_inflight_messages" | "max_inflight_bytes" | "upgrade_outgoing_qos" => {
            "outgoing in-flight is fixed at 100 messages per client"
        }
        "retain_available" => "retained messages are always available in moatmq",
        "max_qos" | "check_retain_source"
        | "allow_zero_length_clientid" | "auto_id_prefix" | "clientid_prefixes"
        | "use_username_as_clientid" | "set_tcp_nodelay" | "memory_limit"
        | "allow_duplicate_messages" | "websockets_headers_size" | "accept_protocol_versions" => {
            "moatmq has no such setting"
        }
        "mount_point" => {
            "moatmq has no mount points: clients of this listener now share the topic tree with all others; isolate them with ACLs"
        }
        "http_dir" => "moatmq serves no files over HTTP",
        "bind_interface" => "moatmq binds addresses, not interfaces; set the listener's bind address",
        "socket_domain" => "moatmq binds exactly the address family of its bind address",
        "use_subject_as_username" => "only the certificate's CN can be the username (identity = \"cn\")",
        "capath" => "moatmq reads one CA bundle: concatenate the folder's certificates into a file and set client_ca",
        "crlfile" => "certificate revocation lists are not supported; remove revoked users from the CA or password file",
        "tls_version" | "ciphers" | "ciphers_tls1.3" | "dhparamfile" | "ecdh_curve" => {
            "moatmq always offers TLS 1.2 and 1.3 with rustls' default cipher suites"
        }
        "tls_engine" | "tls_engine_kpass_sha1" | "tls_keyform" | "keyfile_password" => {
            "keys are read from PEM files only"
        }
        "require_ocsp" | "ocsp_stapling" => "OCSP is not supported",
        "psk_hint" | "psk_file" => "TLS pre-shared keys are not supported; use certificates or passwords",
        "auth_plugin" | "auth_plugin_deny_special_chars" | "plugin" | "global_plugin" => {
            "plugins are not supported"
        }
        o if o.starts_with("auth_opt_") || o.starts_with("plugin_opt_") => {
            "plugins are not supported"
        }
        "connection" => "bridges are not supported; this bridge and its options were skipped",
        "include_dir" => "the folder could not be read, so its files were not imported",
        _ => "not a Mosquitto 2.x option known to the importer",
    }
}

/// One Mosquitto listener: the default one (`port`) or a `listener` line.
#[derive(Default)]
struct MqListener {
    /// Line of the `listener` line; 0 for the default listener.
    line: usize,
    port: Option<u16>,
    host: Option<String>,
    websockets: bool,
    certfile: Option<String>,
    keyfile: Option<String>,
    cafile: Option<String>,
    require_certificate: bool,
    use_identity_as_username: bool,
    max_connections: Option<i64>,
    allow_anonymous: Option<bool>,
    password_file: Option<String>,
    acl_file: Option<String>,
    /// Any listener option was given for it (makes the default listener exist).
    used: bool,
}

struct State {
    conf_dir: PathBuf,
    per_listener_settings: bool,
    default: MqListener,
    listeners: Vec<MqListener>,
    allow_anonymous: Option<bool>,
    password_file: Option<String>,
    acl_file: Option<String>,
    persistence: bool,
    persistence_location: Option<String>,
    autosave_interval: Option<i64>,
    max_packet_size: Option<i64>,
    message_size_limit: Option<i64>,
    max_queued_messages: Option<i64>,
    max_keepalive: Option<i64>,
    max_topic_alias: Option<i64>,
    sys_interval: Option<i64>,
    max_queued_bytes: Option<i64>,
    queue_qos0_messages: bool,
    /// `persistent_client_expiration` in seconds.
    client_expiration: Option<u64>,
    in_bridge: bool,
    relative_paths: bool,
    warnings: Vec<String>,
    /// Options already warned about, so each is named once.
    reported: Vec<String>,
}

fn syntax(file: &Path, line: usize, reason: String) -> ConfigError {
    ConfigError::Syntax {
        file: file.to_path_buf(),
        line,
        reason,
    }
}

fn parse_bool(v: &str, file: &Path, line: usize, opt: &str) -> Result<bool, ConfigError> {
    match v {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(syntax(file, line, format!("{opt}: expected true or false"))),
    }
}

fn parse_int(v: &str, file: &Path, line: usize, opt: &str) -> Result<i64, ConfigError> {
    v.parse()
        .map_err(|_| syntax(file, line, format!("{opt}: expected a whole number")))
}

/// Mosquitto's `persistent_client_expiration`: a whole number and a unit, `h` hours,
/// `d` days, `w` weeks, `m` months (30 days) or `y` years (365 days).
fn parse_duration(v: &str, file: &Path, line: usize, opt: &str) -> Result<u64, ConfigError> {
    let bad = || {
        syntax(
            file,
            line,
            format!("{opt}: expected a whole number and h, d, w, m or y"),
        )
    };
    let (n, unit) = v.split_at(v.len().saturating_sub(1));
    let hours = match unit {
        "h" => 1,
        "d" => 24,
        "w" => 24 * 7,
        "m" => 24 * 30,
        "y" => 24 * 365,
        _ => return Err(bad()),
    };
    let n: u64 = n.parse().map_err(|_| bad())?;
    n.checked_mul(hours * 3600)
        .filter(|&s| s > 0)
        .ok_or_else(bad)
}

fn parse_port(v: &str, file: &Path, line: usize, opt: &str) -> Result<u16, ConfigError> {
    v.parse()
        .map_err(|_| syntax(file, line, format!("{opt}: expected a port number 0-65535")))
}

impl State {
    fn new(conf_path: &Path) -> State {
        State {
            conf_dir: conf_path
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default(),
            per_listener_settings: false,
            default: MqListener::default(),
            listeners: Vec::new(),
            allow_anonymous: None,
            password_file: None,
            acl_file: None,
            persistence: false,
            persistence_location: None,
            autosave_interval: None,
            max_packet_size: None,
            message_size_limit: None,
            max_queued_messages: None,
            max_keepalive: None,
            max_topic_alias: None,
            sys_interval: None,
            max_queued_bytes: None,
            queue_qos0_messages: false,
            client_expiration: None,
            in_bridge: false,
            relative_paths: false,
            warnings: Vec::new(),
            reported: Vec::new(),
        }
    }

    fn warn_once(&mut self, option: &str, file: &Path, line: usize, reason: &str) {
        if self.reported.iter().any(|o| o == option) {
            return;
        }
        self.reported.push(option.to_string());
        self.warnings.push(format!(
            "{}:{line}: {option}: not carried over: {reason}",
            file.display()
        ));
    }

    fn current(&mut self) -> &mut MqListener {
        match self.listeners.last_mut() {
            Some(l) => l,
            None => &mut self.default,
        }
    }

    /// A path as Mosquitto would open it, anchored at the configuration's folder.
    fn path(&mut self, v: &str) -> String {
        let p = Path::new(v);
        if p.is_absolute() || self.conf_dir.as_os_str().is_empty() {
            return v.to_string();
        }
        self.relative_paths = true;
        self.conf_dir.join(p).to_string_lossy().into_owned()
    }

    fn feed(&mut self, text: &str, file: &Path, depth: usize) -> Result<(), ConfigError> {
        for (n, raw) in text.lines().enumerate() {
            let line = n + 1;
            let t = raw.trim();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            let mut words = t.split_whitespace();
            let opt = words.next().unwrap_or_default();
            let args: Vec<&str> = words.collect();
            let value = args.first().copied().unwrap_or_default();
            let need_value = |v: &str| {
                if v.is_empty() {
                    Err(syntax(file, line, format!("{opt}: a value is required")))
                } else {
                    Ok(())
                }
            };
            if self.in_bridge && BRIDGE_OPTIONS.contains(&opt) {
                continue;
            }
            match opt {
                "listener" => {
                    need_value(value)?;
                    self.in_bridge = false;
                    let port = parse_port(value, file, line, opt)?;
                    self.listeners.push(MqListener {
                        line,
                        port: Some(port),
                        host: args.get(1).map(|h| h.to_string()),
                        used: true,
                        ..MqListener::default()
                    });
                }
                "port" => {
                    need_value(value)?;
                    self.default.port = Some(parse_port(value, file, line, opt)?);
                    self.default.used = true;
                }
                "bind_address" => {
                    need_value(value)?;
                    self.default.host = Some(value.to_string());
                    self.default.used = true;
                }
                "protocol" => {
                    let ws = match value {
                        "mqtt" => false,
                        "websockets" => true,
                        _ => {
                            return Err(syntax(
                                file,
                                line,
                                "protocol: expected mqtt or websockets".into(),
                            ))
                        }
                    };
                    let l = self.current();
                    l.websockets = ws;
                    l.used = true;
                }
                "certfile" | "keyfile" | "cafile" => {
                    need_value(value)?;
                    let p = self.path(value);
                    let l = self.current();
                    l.used = true;
                    match opt {
                        "certfile" => l.certfile = Some(p),
                        "keyfile" => l.keyfile = Some(p),
                        _ => l.cafile = Some(p),
                    }
                }
                "require_certificate" | "use_identity_as_username" => {
                    let b = parse_bool(value, file, line, opt)?;
                    let l = self.current();
                    l.used = true;
                    if opt == "require_certificate" {
                        l.require_certificate = b;
                    } else {
                        l.use_identity_as_username = b;
                    }
                }
                "max_connections" => {
                    need_value(value)?;
                    let v = parse_int(value, file, line, opt)?;
                    let l = self.current();
                    l.max_connections = Some(v);
                    l.used = true;
                }
                "per_listener_settings" => {
                    self.per_listener_settings = parse_bool(value, file, line, opt)?;
                }
                "allow_anonymous" => {
                    let b = parse_bool(value, file, line, opt)?;
                    if self.per_listener_settings {
                        let l = self.current();
                        l.allow_anonymous = Some(b);
                        l.used = true;
                    } else {
                        self.allow_anonymous = Some(b);
                    }
                }
                "password_file" | "acl_file" => {
                    need_value(value)?;
                    let p = Some(self.path(value));
                    let per_listener = self.per_listener_settings;
                    let target = if per_listener {
                        let l = self.current();
                        l.used = true;
                        if opt == "password_file" {
                            &mut l.password_file
                        } else {
                            &mut l.acl_file
                        }
                    } else if opt == "password_file" {
                        &mut self.password_file
                    } else {
                        &mut self.acl_file
                    };
                    *target = p;
                }
                "persistence" => self.persistence = parse_bool(value, file, line, opt)?,
                "queue_qos0_messages" => {
                    self.queue_qos0_messages = parse_bool(value, file, line, opt)?;
                }
                "persistent_client_expiration" => {
                    need_value(value)?;
                    self.client_expiration = Some(parse_duration(value, file, line, opt)?);
                }
                "persistence_location" => {
                    need_value(value)?;
                    self.persistence_location = Some(self.path(value));
                }
                "autosave_interval" => {
                    need_value(value)?;
                    self.autosave_interval = Some(parse_int(value, file, line, opt)?);
                }
                "max_keepalive" => {
                    need_value(value)?;
                    self.max_keepalive = Some(parse_int(value, file, line, opt)?);
                }
                "max_topic_alias" => {
                    need_value(value)?;
                    self.max_topic_alias = Some(parse_int(value, file, line, opt)?);
                }
                "sys_interval" => {
                    need_value(value)?;
                    self.sys_interval = Some(parse_int(value, file, line, opt)?);
                }
                "max_packet_size"
                | "message_size_limit"
                | "max_queued_messages"
                | "max_queued_bytes" => {
                    need_value(value)?;
                    let v = Some(parse_int(value, file, line, opt)?);
                    match opt {
                        "max_packet_size" => self.max_packet_size = v,
                        "message_size_limit" => self.message_size_limit = v,
                        "max_queued_messages" => self.max_queued_messages = v,
                        _ => self.max_queued_bytes = v,
                    }
                }
                "include_dir" => {
                    need_value(value)?;
                    let dir = PathBuf::from(self.path(value));
                    self.include(&dir, file, line, depth)?;
                }
                "connection" => {
                    self.in_bridge = true;
                    self.warn_once(opt, file, line, unsupported_reason(opt));
                }
                _ => {
                    if matches!(
                        opt,
                        "mount_point" | "http_dir" | "bind_interface" | "socket_domain"
                    ) {
                        self.current().used = true;
                    }
                    self.warn_once(opt, file, line, unsupported_reason(opt));
                }
            }
        }
        Ok(())
    }

    /// Mosquitto's `include_dir`: every `*.conf` in the folder, in name order.
    fn include(
        &mut self,
        dir: &Path,
        file: &Path,
        line: usize,
        depth: usize,
    ) -> Result<(), ConfigError> {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) if depth < 8 => entries,
            _ => {
                self.warn_once("include_dir", file, line, unsupported_reason("include_dir"));
                return Ok(());
            }
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "conf") && p.is_file())
            .collect();
        files.sort();
        for path in files {
            let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Io {
                file: path.clone(),
                source,
            })?;
            self.feed(&text, &path, depth + 1)?;
        }
        Ok(())
    }

    fn finish(mut self) -> ImportReport {
        let local_only = self.listeners.is_empty() && !self.default.used;
        let mut listeners = std::mem::take(&mut self.listeners);
        if self.default.used || local_only {
            let mut d = std::mem::take(&mut self.default);
            if local_only {
                d.host = Some("127.0.0.1".into());
                self.warnings.push(
                    "mosquitto.conf defines no listener: Mosquitto's local-only mode becomes a \
                     listener on 127.0.0.1:1883 (IPv4 only) that allows anonymous clients"
                        .into(),
                );
                if d.allow_anonymous.is_none() && self.allow_anonymous.is_none() {
                    d.allow_anonymous = Some(true);
                }
            }
            listeners.insert(0, d);
        }

        let mut out = String::new();
        let mut names: Vec<String> = Vec::new();
        let mut password_files: Vec<String> = self.password_file.iter().cloned().collect();
        let mut acl_files: Vec<String> = self.acl_file.iter().cloned().collect();
        let mut limits_per_listener: Vec<Option<i64>> = Vec::new();
        for l in &listeners {
            let port = l.port.unwrap_or(1883);
            let base = if l.line == 0 {
                "default".to_string()
            } else {
                format!("port-{port}")
            };
            let mut name = base.clone();
            let mut k = 2;
            while names.contains(&name) {
                name = format!("{base}-{k}");
                k += 1;
            }
            let at = if l.line == 0 {
                "the default listener".to_string()
            } else {
                format!("the listener on line {}", l.line)
            };
            let bind = self.bind(l.host.as_deref(), port, &at);
            let _ = writeln!(
                out,
                "[[listener]]\nname = {}\nbind = {}",
                q(&name),
                q(&bind)
            );
            if l.websockets {
                out.push_str("protocol = \"ws\"\n");
                out.push_str(
                    "# Mosquitto accepts WebSocket clients on any path; narrow this to the paths\n\
                     # your clients use (moatmq's default is [\"/mqtt\"]).\n\
                     path = [\"*\"]\n",
                );
            }
            if let Some(anon) = l.allow_anonymous {
                let _ = writeln!(out, "allow_anonymous = {anon}");
            }
            self.tls(&mut out, l, &at);
            names.push(name);
            out.push('\n');
            password_files.extend(l.password_file.iter().cloned());
            acl_files.extend(l.acl_file.iter().cloned());
            limits_per_listener.push(l.max_connections.filter(|&c| c > 0));
        }

        if self.per_listener_settings && listeners.len() > 1 {
            for (option, count) in [
                (
                    "password_file",
                    listeners
                        .iter()
                        .filter(|l| l.password_file.is_some())
                        .count(),
                ),
                (
                    "acl_file",
                    listeners.iter().filter(|l| l.acl_file.is_some()).count(),
                ),
            ] {
                if count > 0 && count < listeners.len() {
                    self.warnings.push(format!(
                        "{option}: with per_listener_settings only some listeners had one; moatmq has one for all listeners, so it now applies to the others too"
                    ));
                }
            }
        }
        out.push_str("[auth]\n");
        let _ = writeln!(
            out,
            "allow_anonymous = {}",
            self.allow_anonymous.unwrap_or(false)
        );
        if let Some(p) = self.only_one(&password_files, "password_file", "password files") {
            let _ = writeln!(out, "password_file = {}", q(&p));
        }
        out.push_str("\n[acl]\n");
        if let Some(p) = self.only_one(&acl_files, "acl_file", "ACL files") {
            let _ = writeln!(out, "file = {}", q(&p));
        }
        out.push('\n');

        self.retained(&mut out);
        self.sessions(&mut out);
        self.limits(&mut out, &limits_per_listener);
        self.sys(&mut out);
        out.push_str(RATE_LIMIT);

        if self.relative_paths {
            self.warnings.push(
                "relative paths were anchored at the folder of mosquitto.conf; moatmq resolves \
                 relative paths against the folder of broker.toml, so the result uses absolute ones \
                 where that folder was known"
                    .into(),
            );
        }
        let mut toml = String::from(
            "# Converted from a Mosquitto configuration by `moatmq import-mosquitto`.\n",
        );
        for w in &self.warnings {
            for (i, part) in w.lines().enumerate() {
                let _ = writeln!(toml, "# {}{part}", if i == 0 { "warning: " } else { "  " });
            }
        }
        toml.push('\n');
        toml.push_str(&out);
        ImportReport {
            toml,
            warnings: self.warnings,
        }
    }

    /// moatmq binds one `ip:port`; Mosquitto also takes host names and binds every family.
    fn bind(&mut self, host: Option<&str>, port: u16, at: &str) -> String {
        match host {
            None => {
                self.warnings.push(format!(
                    "{at}: Mosquitto listened on every IPv4 and IPv6 address; the result binds 0.0.0.0 (add a [::] listener for IPv6)"
                ));
                format!("0.0.0.0:{port}")
            }
            Some("localhost") => format!("127.0.0.1:{port}"),
            Some(h) => match h.parse::<std::net::IpAddr>() {
                Ok(std::net::IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
                Ok(ip) => format!("{ip}:{port}"),
                Err(_) => {
                    self.warnings.push(format!(
                        "{at}: moatmq binds IP addresses, not host names or socket paths; the result binds 127.0.0.1: set the address you meant"
                    ));
                    format!("127.0.0.1:{port}")
                }
            },
        }
    }

    fn tls(&mut self, out: &mut String, l: &MqListener, at: &str) {
        let (Some(cert), Some(key)) = (&l.certfile, &l.keyfile) else {
            if l.certfile.is_some()
                || l.keyfile.is_some()
                || l.cafile.is_some()
                || l.require_certificate
            {
                self.warnings.push(format!(
                    "{at}: TLS needs both certfile and keyfile; without them the listener was converted as plaintext, as Mosquitto would serve it"
                ));
            }
            return;
        };
        let _ = writeln!(out, "[listener.tls]\ncert = {}\nkey = {}", q(cert), q(key));
        match (&l.cafile, l.require_certificate) {
            (Some(ca), true) => {
                let _ = writeln!(out, "client_ca = {}\nrequire_client_cert = true", q(ca));
                if l.use_identity_as_username {
                    out.push_str("identity = \"cn\"\n");
                    self.warnings.push(format!(
                        "{at}: use_identity_as_username: Mosquitto ignored the username a client sent; moatmq refuses a client whose username differs from its certificate CN (sending none, or the CN, is accepted)"
                    ));
                }
            }
            (None, true) => self.warnings.push(format!(
                "{at}: require_certificate without cafile: no CA to verify clients against, so client certificates are not requested; set client_ca"
            )),
            (Some(_), false) => self.warnings.push(format!(
                "{at}: cafile without require_certificate: Mosquitto did not ask for client certificates, so neither does the result"
            )),
            (None, false) => {}
        }
        if l.use_identity_as_username && !(l.cafile.is_some() && l.require_certificate) {
            self.warnings.push(format!(
                "{at}: use_identity_as_username needs require_certificate and cafile; it was dropped"
            ));
        }
    }

    /// moatmq has one password file and one ACL file for all listeners.
    fn only_one(&mut self, files: &[String], option: &str, what: &str) -> Option<String> {
        let first = files.first()?.clone();
        if files.iter().any(|f| *f != first) {
            self.warnings.push(format!(
                "{option}: listeners used different {what}; moatmq has one for all listeners, the first was kept: merge the others into it"
            ));
        }
        Some(first)
    }

    fn retained(&mut self, out: &mut String) {
        if !self.persistence {
            if self.persistence_location.is_some() || self.autosave_interval.is_some() {
                self.warnings.push(
                    "persistence is off, so persistence_location and autosave_interval were ignored, as by Mosquitto; retained messages stay in memory".into(),
                );
            }
            return;
        }
        let dir = Path::new(self.persistence_location.as_deref().unwrap_or(""));
        let path = dir.join("moatmq-retained").to_string_lossy().into_owned();
        let _ = writeln!(
            out,
            "# persistence: retained messages, and persistent sessions beside them (sessions.log)\n\
             [retained]\npath = {}\nkey_file = \"retained.key\"",
            q(&path)
        );
        match self.autosave_interval {
            Some(n) if n > 0 => {
                let _ = writeln!(out, "autosave_interval = {n}");
            }
            Some(_) => self.warnings.push(
                "autosave_interval 0 (Mosquitto: save only at exit) has no equivalent; moatmq's default of 1 second was kept (its 0 means durable before the PUBACK)".into(),
            ),
            None => {}
        }
        out.push('\n');
        if self.persistence_location.is_some() {
            self.warnings.push(format!(
                "persistence_location: moatmq writes its own files (retained.log, sessions.log) into {}; \
                 mosquitto.db there is neither read nor changed",
                q(&path)
            ));
        }
        self.warnings.push(
            "persistence: the retained store and the persistent sessions stored beside it are \
             encrypted and need a key: generate it with `moatmq keygen --out retained.key` next to \
             broker.toml (or set MOATMQ_RETAINED_KEY). Mosquitto's database (mosquitto.db) is not \
             migrated: retained messages must be published again, and persistent sessions start \
             over (their clients subscribe again)"
                .into(),
        );
    }

    /// `queue_qos0_messages` is Mosquitto's option with Mosquitto's meaning; it applies to
    /// sessions in memory too.
    fn sessions(&mut self, out: &mut String) {
        if self.queue_qos0_messages {
            out.push_str("[sessions]\nqueue_qos0_messages = true\n\n");
        }
    }

    /// Mosquitto bounds each client's queue in messages and/or bytes. moatmq has the same
    /// `max_queued_messages` per session; its `max_queued_bytes` bounds the bytes queued
    /// per subscribed filter (and a session's queue). A byte bound is carried as is; with
    /// only a message bound, the byte bound is raised if it would cut such a queue first
    /// (at an assumed 1 KiB per message).
    fn queue_limit(&mut self, lines: &mut String) {
        const ASSUMED_MESSAGE_BYTES: i64 = 1024;
        const DEFAULT_BYTES: i64 = crate::DEFAULT_MAX_QUEUED_BYTES as i64;
        if let Some(n) = self.max_queued_messages {
            // Mosquitto's 0 means no limit, and so does moatmq's.
            let _ = writeln!(lines, "max_queued_messages = {}", n.max(0));
        }
        match self.max_queued_bytes {
            Some(b) if b > 0 => {
                let _ = writeln!(lines, "max_queued_bytes = {b}");
                self.warnings.push(
                    "max_queued_bytes: Mosquitto bounds the bytes queued per client, moatmq per \
                     subscribed filter and per session; review [limits] max_queued_bytes"
                        .into(),
                );
            }
            Some(_) => self.warnings.push(
                "max_queued_bytes 0 (Mosquitto: no limit) has no equivalent; moatmq's default \
                 max_queued_bytes of 8388608 was kept"
                    .into(),
            ),
            None => {
                let estimate = self
                    .max_queued_messages
                    .filter(|&n| n > 0)
                    .map_or(0, |n| n.saturating_mul(ASSUMED_MESSAGE_BYTES));
                if estimate > DEFAULT_BYTES {
                    let _ = writeln!(
                        lines,
                        "# from max_queued_messages at 1 KiB per message, so the byte bound does not\n\
                         # cut a queue before the message bound does\n\
                         max_queued_bytes = {estimate}"
                    );
                    self.warnings.push(
                        "max_queued_messages: [limits] max_queued_bytes was raised to hold that many \
                         messages of 1 KiB (it also bounds each session's queue): review it against \
                         your message sizes"
                            .into(),
                    );
                }
            }
        }
    }

    /// Mosquitto's `sys_interval` is `[sys] interval`, same seconds, same 0 = off (Mosquitto
    /// takes 0..=65535).
    fn sys(&mut self, out: &mut String) {
        if let Some(seconds) = self.sys_interval {
            let _ = writeln!(out, "\n[sys]\ninterval = {}", seconds.clamp(0, 65535));
        }
    }

    fn limits(&mut self, out: &mut String, per_listener: &[Option<i64>]) {
        let mut lines = String::new();
        if let Some(seconds) = self.client_expiration {
            let _ = writeln!(lines, "max_session_expiry = {seconds}");
        }
        if let Some(seconds) = self.max_keepalive {
            // Mosquitto takes 10..=65535; below 10 it refuses to start.
            let _ = writeln!(lines, "max_keepalive = {}", seconds.clamp(10, 65535));
        }
        if let Some(n) = self.max_topic_alias {
            let _ = writeln!(lines, "max_topic_alias = {}", n.clamp(0, 65535));
        }
        if let Some(size) = self.max_packet_size {
            const MQTT_MAX: i64 = 268_435_455;
            if size <= 0 {
                self.warnings.push("max_packet_size 0 (Mosquitto: no limit) has no equivalent; moatmq's default of 1048576 bytes was kept".into());
            } else {
                let _ = writeln!(lines, "max_packet_size = {}", size.min(MQTT_MAX));
            }
        }
        match self.message_size_limit {
            // Mosquitto drops a larger PUBLISH and keeps the client; so does max_payload_size.
            Some(size) if size > 0 => {
                let _ = writeln!(lines, "max_payload_size = {size}");
            }
            _ => {}
        }
        self.queue_limit(&mut lines);
        if per_listener.iter().any(Option::is_some) {
            let all = per_listener.iter().all(Option::is_some);
            if all {
                let total: i64 = per_listener.iter().flatten().sum();
                let _ = writeln!(lines, "max_connections = {total}");
            }
            if per_listener.len() > 1 {
                self.warnings.push(format!(
                    "max_connections: Mosquitto limits each listener, moatmq all listeners together; {}",
                    if all { "the result uses the sum" } else { "not every listener had a limit, so moatmq's default of 10000 applies" }
                ));
            }
        }
        if !lines.is_empty() {
            out.push_str("[limits]\n");
            out.push_str(&lines);
        }
    }
}

/// A TOML basic string.
fn q(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
