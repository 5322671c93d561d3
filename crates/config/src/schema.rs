//! The `broker.toml` schema. Defaults are named constants; `validate` checks the rest.

use crate::error::Invalid;
use serde::Deserialize;
use std::path::PathBuf;

pub const DEFAULT_MAX_PACKET_SIZE: usize = 1_048_576;
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
pub const DEFAULT_CONNECT_TIMEOUT: u64 = 5;
pub const DEFAULT_MAX_PENDING_PER_ADDRESS: usize = 32;
pub const DEFAULT_MAX_INFLIGHT: u16 = 100;
pub const DEFAULT_MAX_SUBSCRIPTIONS_PER_CLIENT: usize = 100;
pub const DEFAULT_MAX_TOPIC_LEVELS: usize = 32;
pub const DEFAULT_MAX_CLIENT_ID_LENGTH: usize = 128;
/// Mosquitto's default for `max_keepalive`: the MQTT maximum, nothing is capped.
pub const DEFAULT_MAX_KEEPALIVE: u16 = 65535;
/// Mosquitto's default for `max_topic_alias`.
pub const DEFAULT_MAX_TOPIC_ALIAS: u16 = 10;
pub const DEFAULT_MAX_QUEUED_BYTES: usize = 8 * 1_048_576;
/// Mosquitto's default for `max_queued_messages`.
pub const DEFAULT_MAX_QUEUED_MESSAGES: usize = 1000;
pub const DEFAULT_MAX_SESSION_EXPIRY: u64 = 7 * 24 * 3600;
pub const DEFAULT_MAX_SESSIONS_PER_USER: usize = 16;
pub const DEFAULT_AUTOSAVE_INTERVAL: u64 = 1;
/// Seconds between `$SYS` updates (Mosquitto's `sys_interval` default).
pub const DEFAULT_SYS_INTERVAL: u64 = 10;
/// The largest `sys.interval` (Mosquitto's bound for `sys_interval`).
pub const MAX_SYS_INTERVAL: u64 = 65_535;
pub const DEFAULT_CONNECTIONS_PER_SECOND: u32 = 20;
pub const DEFAULT_CONNECTION_BURST: u32 = 40;
pub const DEFAULT_MESSAGES_PER_SECOND: u32 = 1000;
pub const DEFAULT_MESSAGE_BURST: u32 = 2000;
pub const DEFAULT_BYTES_PER_SECOND: u64 = 10_485_760;
pub const DEFAULT_DISCONNECT_AFTER: u64 = 0;
pub const DEFAULT_RETAINED_MAX_MESSAGES: usize = 1_000_000;
pub const DEFAULT_RETAINED_MAX_BYTES: u64 = 1_073_741_824;
/// A tenth of the global count, so no one user can fill the store for everyone.
pub const DEFAULT_RETAINED_MAX_MESSAGES_PER_USER: usize = 100_000;
/// About a tenth of the global bytes (100 MiB).
pub const DEFAULT_RETAINED_MAX_BYTES_PER_USER: u64 = 104_857_600;

/// The whole `broker.toml`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[[listener]]` tables: where clients connect. At least one.
    #[serde(default)]
    pub listener: Vec<Listener>,
    #[serde(default)]
    pub auth: Auth,
    #[serde(default)]
    pub acl: Acl,
    /// `[retained]`: the encrypted retained store; absent = retained messages in memory only.
    #[serde(default)]
    pub retained: Option<Retained>,
    /// `[sessions]`: where persistent sessions are kept; see [`Config::sessions`].
    #[serde(default)]
    pub sessions: Sessions,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub rate_limit: RateLimit,
    /// `[audit]`: JSON-lines security events; absent = no audit log.
    #[serde(default)]
    pub audit: Option<Audit>,
    /// `[metrics]`: Prometheus metrics and health endpoints; absent = off.
    #[serde(default)]
    pub metrics: Option<Metrics>,
    /// `[sys]`: the `$SYS/broker/...` tree.
    #[serde(default)]
    pub sys: Sys,
    #[serde(default)]
    pub log: Log,
    /// `[cluster]`: several nodes sharing one NATS (docs/cluster.md); absent = one node.
    #[serde(default)]
    pub cluster: Option<Cluster>,
    /// The file this config was read from; relative paths resolve against its folder.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// One `[[listener]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    /// Appears in logs, metrics and audit events; unique.
    pub name: String,
    /// `ip:port` to bind, e.g. `127.0.0.1:1883` or `0.0.0.0:8883`.
    pub bind: String,
    /// `mqtt` (MQTT over TCP) or `ws` (MQTT over WebSocket).
    #[serde(default)]
    pub protocol: Protocol,
    /// `ws` listeners: the HTTP paths WebSocket upgrades are accepted on; `"*"` = any.
    /// Default `["/mqtt"]`.
    #[serde(default)]
    pub path: Option<Vec<String>>,
    /// `[listener.tls]`: absent = plaintext.
    #[serde(default)]
    pub tls: Option<Tls>,
    /// Overrides `auth.allow_anonymous` for this listener.
    #[serde(default)]
    pub allow_anonymous: Option<bool>,
    /// Read a PROXY protocol v1/v2 header before MQTT (only behind a trusted proxy).
    #[serde(default)]
    pub trust_proxy_protocol: bool,
    /// `[listener.forwarded]` (`ws` listeners): take the client address from a header a
    /// trusted proxy sets. Absent (default) = the TCP peer's address.
    #[serde(default)]
    pub forwarded: Option<Forwarded>,
}

/// `[listener.forwarded]`: for a WebSocket listener behind an HTTP proxy or tunnel
/// (cloudflared, nginx) that cannot send the PROXY protocol.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Forwarded {
    /// The header naming the client, e.g. `CF-Connecting-IP` (one address) or
    /// `X-Forwarded-For` (its last hop, the one the trusted proxy appended).
    pub header: String,
    /// Addresses or CIDRs (`127.0.0.1/32`, `10.0.0.0/8`) of the proxies whose header is
    /// believed; a connection from anywhere else keeps its TCP peer address.
    pub trusted_proxies: Vec<String>,
}

impl Forwarded {
    /// `trusted_proxies` as networks (a bare address is a /32 or /128).
    pub fn proxies(&self) -> Vec<ipnet::IpNet> {
        self.trusted_proxies
            .iter()
            .filter_map(|p| parse_net(p))
            .collect()
    }
}

fn parse_net(text: &str) -> Option<ipnet::IpNet> {
    let text = text.trim();
    text.parse::<ipnet::IpNet>().ok().or_else(|| {
        text.parse::<std::net::IpAddr>()
            .ok()
            .map(ipnet::IpNet::from)
    })
}

/// The WebSocket path a `ws` listener serves when `path` is not set.
pub const DEFAULT_WS_PATH: &str = "/mqtt";

impl Listener {
    /// The paths a `ws` listener accepts upgrades on (`"*"` = any).
    pub fn ws_paths(&self) -> Vec<String> {
        self.path
            .clone()
            .unwrap_or_else(|| vec![DEFAULT_WS_PATH.to_string()])
    }
}

/// Transport spoken on a listener.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Mqtt,
    Ws,
}

/// `[listener.tls]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// PEM certificate chain, server certificate first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA bundle that client certificates are verified against (mTLS).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: refuse clients without a valid certificate during the handshake.
    #[serde(default = "default_true")]
    pub require_client_cert: bool,
    /// `cn`: the certificate's subject CN is the username; `none`: certificate only gates TLS.
    #[serde(default)]
    pub identity: CertIdentity,
}

/// Environment variable that names this node, winning over `[cluster] node_name`.
pub const NODE_NAME_ENV: &str = "MOATMQ_NODE_NAME";

/// The subject prefix when `[cluster] subject_prefix` is not set.
pub const DEFAULT_SUBJECT_PREFIX: &str = "moatmq";

/// `[cluster]`: this node's link to the NATS that joins the cluster's nodes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// NATS server URLs (`nats://host:4222`, `tls://host:4222`); at least one.
    pub servers: Vec<String>,
    /// This node's name, unique in the cluster: messages carry it so no node takes its
    /// own back. Letters, digits, `-` and `_`, 1 to 64 characters. The environment
    /// variable [`NODE_NAME_ENV`] wins (one config for every pod of a StatefulSet, each
    /// named by its pod); required when that is not set.
    #[serde(default)]
    pub node_name: String,
    /// First subject token(s) of every message the cluster exchanges; default "moatmq".
    #[serde(default = "default_subject_prefix")]
    pub subject_prefix: String,
    /// NATS credentials file (JWT and nkey seed), when the NATS server requires one.
    #[serde(default)]
    pub credentials: Option<PathBuf>,
    /// Username whose ACL decides what messages from NATS-native clients (no moatmq
    /// headers) may be written; absent = this node does not take such messages in (set
    /// it alike on every node: each message is taken in by one node with it).
    #[serde(default)]
    pub native_user: Option<String>,
    /// `[cluster.tls]`: TLS to NATS; absent = what the URLs say (`tls://` uses the
    /// system roots).
    #[serde(default)]
    pub tls: Option<ClusterTls>,
    /// Copies JetStream keeps of the cluster's streams and buckets (1 to 5): 3 on a NATS
    /// cluster of three or more servers, so losing one of them loses nothing.
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    /// Seconds a message stays in the transfer stream (at least 120, the stream's
    /// duplicate window): how long a node may be away and still get what it missed.
    #[serde(default = "default_transfer_max_age")]
    pub transfer_max_age: u64,
    /// Bytes the transfer stream may hold (at least 1 MiB); past it the oldest go.
    #[serde(default = "default_transfer_max_bytes")]
    pub transfer_max_bytes: u64,
    /// Seconds a delete marker stays in the retained bucket before any node compacts it
    /// (at least 1): longer than any node's watch of the bucket may stall without a
    /// reload (docs/cluster.md, "Compacting the retained bucket's delete markers").
    #[serde(default = "default_retained_marker_age")]
    pub retained_marker_age: u64,
    /// Messages sealed into one transfer stream message at most (1 to 4096): what is
    /// queued when the node sends goes as one batch (never waiting for more); 1 = one
    /// message each, which every moatmq release reads (docs/cluster.md, "Batching
    /// transfer messages": a rolling upgrade from a release that does not read batches).
    #[serde(default = "default_transfer_batch")]
    pub transfer_batch: usize,
    /// Seconds between the checkpoints of a connected persistent session that receives
    /// messages (0 to 3600; 0 = none): where its client had acknowledged everything, in
    /// its park in NATS, so a node taking it after its node died reads from there
    /// (docs/cluster.md, "Connected sessions are parked too, with checkpoints").
    #[serde(default = "default_checkpoint_interval")]
    pub checkpoint_interval: u64,
    /// Takes transfer stream messages that do not carry the time they were sealed (sent
    /// by releases before it), which cannot be told from replays of captured ones, and
    /// writes retained values and wills without it (so that such releases open them):
    /// only while upgrading a cluster from such a release (docs/cluster.md, "Replays").
    #[serde(default)]
    pub accept_untimed: bool,
    /// Messages waiting for NATS at most (256 to 1,048,576), besides up to 4,096 already
    /// handed to the NATS client unacknowledged: past it a QoS 0 message is
    /// not forwarded (counted) and a QoS 1/2 publisher is disconnected unacknowledged,
    /// rather than the node holding more in memory while NATS is slow or away.
    #[serde(default = "default_cluster_queue")]
    pub forward_queue: usize,
    /// Retained topics whose latest change waits for the retained bucket at most (256 to
    /// 1,048,576): past it a QoS 0 change is not stored in NATS (counted), a QoS 1/2 one
    /// is not acknowledged.
    #[serde(default = "default_cluster_queue")]
    pub retained_queue: usize,
}

/// The transfer stream's duplicate window, which its max age may not be under.
pub const TRANSFER_DUPLICATE_WINDOW_SECS: u64 = 120;

fn default_replicas() -> usize {
    1
}

fn default_transfer_max_age() -> u64 {
    300
}

fn default_transfer_max_bytes() -> u64 {
    1 << 30
}

fn default_retained_marker_age() -> u64 {
    3600
}

fn default_transfer_batch() -> usize {
    128
}

fn default_checkpoint_interval() -> u64 {
    10
}

fn default_cluster_queue() -> usize {
    16_384
}

/// `[cluster.tls]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterTls {
    /// PEM CA bundle the NATS servers' certificates are verified against.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// PEM client certificate chain, for NATS servers that verify clients (with `key`).
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    #[serde(default)]
    pub key: Option<PathBuf>,
}

fn default_subject_prefix() -> String {
    DEFAULT_SUBJECT_PREFIX.to_string()
}

/// A NATS subject of literal tokens: no wildcard, whitespace or empty token.
fn valid_subject_prefix(prefix: &str) -> bool {
    prefix.len() <= 128
        && prefix.split('.').all(|token| {
            !token.is_empty()
                && token != "*"
                && token != ">"
                && token
                    .chars()
                    .all(|c| c.is_ascii_graphic() && c != '*' && c != '>')
        })
}

/// A `nats://` or `tls://` URL with a host.
fn valid_nats_url(url: &str) -> bool {
    let rest = url
        .strip_prefix("nats://")
        .or_else(|| url.strip_prefix("tls://"));
    rest.is_some_and(|r| {
        let host = r.rsplit('@').next().unwrap_or(r);
        !host.is_empty() && !host.starts_with(':') && !host.contains(char::is_whitespace)
    })
}

impl Cluster {
    fn validate(&self) -> Result<(), Invalid> {
        if self.servers.is_empty() {
            return Err(Invalid::new(
                "cluster.servers",
                "must list at least one NATS server such as \"nats://127.0.0.1:4222\"",
            ));
        }
        if !self.servers.iter().all(|s| valid_nats_url(s)) {
            return Err(Invalid::new(
                "cluster.servers",
                "each server must be a nats:// or tls:// URL such as \"nats://host:4222\"",
            ));
        }
        let name_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        if self.node_name.is_empty()
            || self.node_name.len() > 64
            || !self.node_name.chars().all(name_char)
        {
            return Err(Invalid::new(
                "cluster.node_name",
                "must be 1 to 64 letters, digits, - or _ (unique per node; or set MOATMQ_NODE_NAME)",
            ));
        }
        if !valid_subject_prefix(&self.subject_prefix) {
            return Err(Invalid::new(
                "cluster.subject_prefix",
                "must be a NATS subject of literal tokens (no *, >, spaces or empty tokens)",
            ));
        }
        if self.native_user.as_deref() == Some("") {
            return Err(Invalid::new(
                "cluster.native_user",
                "must not be empty (leave it out to drop messages from NATS clients)",
            ));
        }
        if !(1..=5).contains(&self.replicas) {
            return Err(Invalid::new(
                "cluster.replicas",
                "must be 1 to 5 (JetStream keeps at most 5 copies; 3 for a NATS cluster of three)",
            ));
        }
        if self.transfer_max_age < TRANSFER_DUPLICATE_WINDOW_SECS {
            return Err(Invalid::new(
                "cluster.transfer_max_age",
                "must be at least 120 seconds (the transfer stream's duplicate window)",
            ));
        }
        if self.transfer_max_bytes < 1 << 20 || self.transfer_max_bytes > i64::MAX as u64 {
            return Err(Invalid::new(
                "cluster.transfer_max_bytes",
                "must be at least 1048576 (1 MiB)",
            ));
        }
        if !(1..=4096).contains(&self.transfer_batch) {
            return Err(Invalid::new(
                "cluster.transfer_batch",
                "must be 1 to 4096 (1 = one message per transfer stream message)",
            ));
        }
        for (key, value) in [
            ("cluster.forward_queue", self.forward_queue),
            ("cluster.retained_queue", self.retained_queue),
        ] {
            if !(256..=1 << 20).contains(&value) {
                return Err(Invalid::new(key, "must be 256 to 1048576"));
            }
        }
        if self.checkpoint_interval > 3600 {
            return Err(Invalid::new(
                "cluster.checkpoint_interval",
                "must be 0 to 3600 seconds (0 = no checkpoints)",
            ));
        }
        if self.retained_marker_age == 0 {
            return Err(Invalid::new(
                "cluster.retained_marker_age",
                "must be at least 1 second (a delete marker younger than that is never compacted)",
            ));
        }
        if let Some(tls) = &self.tls {
            if tls.cert.is_some() != tls.key.is_some() {
                return Err(Invalid::new(
                    "cluster.tls.cert",
                    "cert and key go together: set both or neither",
                ));
            }
        }
        Ok(())
    }
}

/// How a client certificate maps to an identity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CertIdentity {
    Cn,
    #[default]
    None,
}

/// `[auth]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Auth {
    /// Clients without credentials may connect. Off by default (fail closed).
    #[serde(default)]
    pub allow_anonymous: bool,
    /// `username:PHC-hash` lines (Argon2id; mosquitto_passwd `$7$` lines accepted).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Seconds a successful password verification is remembered (keyed HMAC, memory
    /// only), so a reconnecting client skips the slow hash; 0 = off.
    #[serde(default = "default_credential_cache_ttl")]
    pub credential_cache_ttl: u64,
    /// Most remembered verifications; the oldest go first; 0 = off.
    #[serde(default = "default_credential_cache_size")]
    pub credential_cache_size: usize,
}

impl Default for Auth {
    fn default() -> Auth {
        Auth {
            allow_anonymous: false,
            password_file: None,
            credential_cache_ttl: default_credential_cache_ttl(),
            credential_cache_size: default_credential_cache_size(),
        }
    }
}

/// Default `auth.credential_cache_ttl`: ten minutes.
pub const DEFAULT_CREDENTIAL_CACHE_TTL: u64 = 600;
/// Default `auth.credential_cache_size`.
pub const DEFAULT_CREDENTIAL_CACHE_SIZE: usize = 100_000;

fn default_credential_cache_ttl() -> u64 {
    DEFAULT_CREDENTIAL_CACHE_TTL
}

fn default_credential_cache_size() -> usize {
    DEFAULT_CREDENTIAL_CACHE_SIZE
}

/// `[acl]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Acl {
    /// Mosquitto-syntax ACL file; absent = tenant isolation (`pattern readwrite %u/#`).
    #[serde(default)]
    pub file: Option<PathBuf>,
}

/// `[retained]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retained {
    /// Folder of the encrypted log, created if missing.
    pub path: PathBuf,
    /// 32-byte AES-256 key, hex; the environment variable `MOATMQ_RETAINED_KEY` wins.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Seconds between saves; 0 = durable before the publish is acknowledged.
    #[serde(default = "default_autosave_interval")]
    pub autosave_interval: u64,
    /// New retained topics past this count are refused.
    #[serde(default = "default_retained_max_messages")]
    pub max_messages: usize,
    /// Retained messages that would take the store past this many bytes (each counted
    /// as its stored record: topic, payload, properties, expiry, owner) are refused.
    #[serde(default = "default_retained_max_bytes")]
    pub max_bytes: u64,
    /// Most retained messages one user (publisher identity) may own; 0 = unlimited.
    #[serde(default = "default_retained_max_messages_per_user")]
    pub max_messages_per_user: usize,
    /// Most stored bytes one user may own, counted like `max_bytes`; 0 = unlimited.
    #[serde(default = "default_retained_max_bytes_per_user")]
    pub max_bytes_per_user: u64,
}

/// `[sessions]`: persistent sessions (3.1.1 clean session off, MQTT 5 session expiry
/// above 0) with their subscriptions, queued and in-flight messages. Durable (stored
/// encrypted under the `[retained]` key) when a `[retained]` store is configured, unless
/// turned off here; in memory otherwise. Every key is optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sessions {
    /// Store sessions durably; default: on when `[retained]` is configured, off
    /// otherwise. `true` without a `[retained]` section is an error (its key is needed).
    #[serde(default)]
    pub enabled: Option<bool>,
    /// Folder of `sessions.log` and its high-water mark, created if missing; default the
    /// `[retained]` path (the two logs sit side by side).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Seconds between commits; 0 = a publish queued for an offline session is durable
    /// before it is acknowledged. Default: `[retained] autosave_interval`.
    #[serde(default)]
    pub autosave_interval: Option<u64>,
    /// Queue QoS 0 messages for offline persistent sessions too (Mosquitto's
    /// `queue_qos0_messages`); default off: only QoS 1 and 2 are queued.
    #[serde(default)]
    pub queue_qos0_messages: bool,
}

/// Durable sessions as they apply after defaults: what [`Config::sessions`] returns.
/// Paths are as written in the file: resolve them with [`Config::resolve`], like the
/// `[retained]` ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionsConfig {
    /// Folder of `sessions.log` (default: the retained store's folder).
    pub path: PathBuf,
    /// The retained store's key file (`MOATMQ_RETAINED_KEY` wins, as for the store).
    pub key_file: Option<PathBuf>,
    /// Seconds between commits; 0 = durable before the acknowledgement.
    pub autosave_interval: u64,
    /// Whether QoS 0 messages are queued for offline sessions.
    pub queue_qos0_messages: bool,
}

/// `[limits]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest packet accepted, in bytes (remaining length); larger closes the connection.
    #[serde(default = "default_max_packet_size")]
    pub max_packet_size: usize,
    /// Largest PUBLISH payload accepted, in bytes; a larger one is dropped and the
    /// connection kept (Mosquitto's `message_size_limit`). Absent = only
    /// `max_packet_size` applies.
    #[serde(default)]
    pub max_payload_size: Option<usize>,
    /// Connections served at once over all listeners; more are refused.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Connections one source address (IPv4 address, IPv6 /64) may hold at once, counted
    /// from accept, before any TLS or WebSocket handshake; default `max_connections / 4`.
    #[serde(default)]
    pub max_connections_per_address: Option<usize>,
    /// Connections one source address may have still in their PROXY header, TLS,
    /// WebSocket or CONNECT phase (not yet answered with a CONNACK).
    #[serde(default = "default_max_pending_per_address")]
    pub max_pending_per_address: usize,
    /// Seconds a new connection has for all of PROXY header, TLS, WebSocket upgrade and
    /// CONNECT together: one deadline from accept.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: u64,
    /// QoS 1/2 messages a client may have unacknowledged towards the broker (receive maximum).
    #[serde(default = "default_max_inflight")]
    pub max_inflight: u16,
    /// Subscriptions one client may hold.
    #[serde(default = "default_max_subscriptions_per_client")]
    pub max_subscriptions_per_client: usize,
    /// Levels (`/`-separated) a topic or filter may have.
    #[serde(default = "default_max_topic_levels")]
    pub max_topic_levels: usize,
    /// Bytes in a client id.
    #[serde(default = "default_max_client_id_length")]
    pub max_client_id_length: usize,
    /// Longest keep alive a client may use, in seconds (Mosquitto's `max_keepalive`):
    /// an MQTT 5 client asking for 0 or more is told this one (server keep alive); a
    /// 3.1.1 client asking for 0 or more is refused, as 3.1.1 cannot be told. 65535 (the
    /// default) caps nothing.
    #[serde(default = "default_max_keepalive")]
    pub max_keepalive: u16,
    /// Topic aliases an MQTT 5 client may set (Mosquitto's `max_topic_alias`),
    /// announced in the CONNACK; 0 allows none.
    #[serde(default = "default_max_topic_alias")]
    pub max_topic_alias: u16,
    /// Per subscribed filter, bytes of the newest messages kept for subscribers that
    /// have not read them yet (offline persistent sessions, slow readers); older
    /// messages are dropped past it.
    #[serde(default = "default_max_queued_bytes")]
    pub max_queued_bytes: usize,
    /// QoS 1 and 2 messages (and QoS 0 with `[sessions] queue_qos0_messages`) queued for
    /// one persistent session beyond those in flight, as in Mosquitto; past it the newest
    /// message is dropped for that session. 0 = no limit (Mosquitto's meaning; the
    /// session's `max_queued_bytes` still applies).
    #[serde(default = "default_max_queued_messages")]
    pub max_queued_messages: usize,
    /// Seconds a disconnected persistent session is kept at most: 3.1.1 sessions with
    /// clean session off, and MQTT 5 session expiry intervals longer than this.
    #[serde(default = "default_max_session_expiry")]
    pub max_session_expiry: u64,
    /// Persistent sessions one user (all anonymous clients count as one) may have kept
    /// at once, connected or not; the CONNECT of one more is refused.
    #[serde(default = "default_max_sessions_per_user")]
    pub max_sessions_per_user: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_packet_size: DEFAULT_MAX_PACKET_SIZE,
            max_payload_size: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_address: None,
            max_pending_per_address: DEFAULT_MAX_PENDING_PER_ADDRESS,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_inflight: DEFAULT_MAX_INFLIGHT,
            max_subscriptions_per_client: DEFAULT_MAX_SUBSCRIPTIONS_PER_CLIENT,
            max_topic_levels: DEFAULT_MAX_TOPIC_LEVELS,
            max_client_id_length: DEFAULT_MAX_CLIENT_ID_LENGTH,
            max_keepalive: DEFAULT_MAX_KEEPALIVE,
            max_topic_alias: DEFAULT_MAX_TOPIC_ALIAS,
            max_queued_bytes: DEFAULT_MAX_QUEUED_BYTES,
            max_queued_messages: DEFAULT_MAX_QUEUED_MESSAGES,
            max_session_expiry: DEFAULT_MAX_SESSION_EXPIRY,
            max_sessions_per_user: DEFAULT_MAX_SESSIONS_PER_USER,
        }
    }
}

impl Limits {
    /// `max_queued_messages` as a bound: 0 (no limit) is `usize::MAX`.
    pub fn queued_messages_bound(&self) -> usize {
        match self.max_queued_messages {
            0 => usize::MAX,
            n => n,
        }
    }

    /// `max_connections_per_address`, or its default: a quarter of `max_connections`.
    pub fn connections_per_address(&self) -> usize {
        self.max_connections_per_address
            .unwrap_or((self.max_connections / 4).max(1))
    }
}

/// `[rate_limit]`: token buckets; 0 turns one off.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// New connections per second per source address.
    #[serde(default = "default_connections_per_second")]
    pub connections_per_second: u32,
    /// Connections a source address may open at once before the rate applies.
    #[serde(default = "default_connection_burst")]
    pub connection_burst: u32,
    /// PUBLISH packets per second per client; beyond it the client is read more slowly.
    #[serde(default = "default_messages_per_second")]
    pub messages_per_second: u32,
    /// PUBLISH packets a client may send at once before the rate applies.
    #[serde(default = "default_message_burst")]
    pub message_burst: u32,
    /// PUBLISH bytes per second per client (burst: one second's worth).
    #[serde(default = "default_bytes_per_second")]
    pub bytes_per_second: u64,
    /// Seconds a publisher may stay over its limit without a break, paced, before it is
    /// disconnected (MQTT 5: DISCONNECT 0x96); 0 = never, pacing only.
    #[serde(default = "default_disconnect_after")]
    pub disconnect_after: u64,
    /// `[[rate_limit.user]]`: other publish limits for one username.
    #[serde(default)]
    pub user: Vec<UserRateLimit>,
}

/// One `[[rate_limit.user]]`: publish limits for clients authenticated as `name`
/// (password or certificate CN). A key left out keeps the `[rate_limit]` value.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserRateLimit {
    /// The username these limits apply to; unique.
    pub name: String,
    /// PUBLISH packets per second per client of this user; 0 = unlimited.
    #[serde(default)]
    pub messages_per_second: Option<u32>,
    /// PUBLISH packets a client of this user may send at once.
    #[serde(default)]
    pub message_burst: Option<u32>,
    /// PUBLISH bytes per second per client of this user; 0 = unlimited.
    #[serde(default)]
    pub bytes_per_second: Option<u64>,
}

/// The publish limits that apply to one client, after `[[rate_limit.user]]` overrides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishRates {
    /// PUBLISH packets per second; 0 = unlimited.
    pub messages_per_second: u32,
    pub message_burst: u32,
    /// PUBLISH bytes per second; 0 = unlimited.
    pub bytes_per_second: u64,
}

impl RateLimit {
    /// The publish limits for a client authenticated as `username` (None: anonymous).
    pub fn publish_rates(&self, username: Option<&str>) -> PublishRates {
        let user = username.and_then(|u| self.user.iter().find(|o| o.name == u));
        PublishRates {
            messages_per_second: user
                .and_then(|u| u.messages_per_second)
                .unwrap_or(self.messages_per_second),
            message_burst: user
                .and_then(|u| u.message_burst)
                .unwrap_or(self.message_burst),
            bytes_per_second: user
                .and_then(|u| u.bytes_per_second)
                .unwrap_or(self.bytes_per_second),
        }
    }
}

impl Default for RateLimit {
    fn default() -> RateLimit {
        RateLimit {
            connections_per_second: DEFAULT_CONNECTIONS_PER_SECOND,
            connection_burst: DEFAULT_CONNECTION_BURST,
            messages_per_second: DEFAULT_MESSAGES_PER_SECOND,
            message_burst: DEFAULT_MESSAGE_BURST,
            bytes_per_second: DEFAULT_BYTES_PER_SECOND,
            disconnect_after: DEFAULT_DISCONNECT_AFTER,
            user: Vec::new(),
        }
    }
}

/// `[audit]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Audit {
    /// A file to append JSON lines to (reopened on SIGHUP for logrotate), or `-` for stdout.
    pub path: PathBuf,
}

/// `[metrics]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// `ip:port` serving `GET /metrics`, `/healthz` and `/readyz`.
    pub bind: String,
}

/// `[sys]`: the `$SYS/broker/...` tree of broker statistics, under Mosquitto's names.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sys {
    /// Seconds between updates (Mosquitto's `sys_interval`); 0 = no `$SYS` tree.
    #[serde(default = "default_sys_interval")]
    pub interval: u64,
}

impl Default for Sys {
    fn default() -> Sys {
        Sys {
            interval: DEFAULT_SYS_INTERVAL,
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Log {
    /// `text` or `json`.
    #[serde(default)]
    pub format: LogFormat,
    /// A tracing filter such as `info` or `moatmq_broker=debug`; `RUST_LOG` wins.
    #[serde(default)]
    pub level: Option<String>,
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

fn default_connections_per_second() -> u32 {
    DEFAULT_CONNECTIONS_PER_SECOND
}
fn default_connection_burst() -> u32 {
    DEFAULT_CONNECTION_BURST
}
fn default_messages_per_second() -> u32 {
    DEFAULT_MESSAGES_PER_SECOND
}
fn default_message_burst() -> u32 {
    DEFAULT_MESSAGE_BURST
}
fn default_bytes_per_second() -> u64 {
    DEFAULT_BYTES_PER_SECOND
}
fn default_disconnect_after() -> u64 {
    DEFAULT_DISCONNECT_AFTER
}
fn default_sys_interval() -> u64 {
    DEFAULT_SYS_INTERVAL
}
fn default_true() -> bool {
    true
}
fn default_autosave_interval() -> u64 {
    DEFAULT_AUTOSAVE_INTERVAL
}
fn default_retained_max_messages() -> usize {
    DEFAULT_RETAINED_MAX_MESSAGES
}
fn default_retained_max_bytes() -> u64 {
    DEFAULT_RETAINED_MAX_BYTES
}
fn default_retained_max_messages_per_user() -> usize {
    DEFAULT_RETAINED_MAX_MESSAGES_PER_USER
}
fn default_retained_max_bytes_per_user() -> u64 {
    DEFAULT_RETAINED_MAX_BYTES_PER_USER
}
fn default_max_packet_size() -> usize {
    DEFAULT_MAX_PACKET_SIZE
}
fn default_max_connections() -> usize {
    DEFAULT_MAX_CONNECTIONS
}
fn default_max_pending_per_address() -> usize {
    DEFAULT_MAX_PENDING_PER_ADDRESS
}
fn default_connect_timeout() -> u64 {
    DEFAULT_CONNECT_TIMEOUT
}
fn default_max_inflight() -> u16 {
    DEFAULT_MAX_INFLIGHT
}
fn default_max_subscriptions_per_client() -> usize {
    DEFAULT_MAX_SUBSCRIPTIONS_PER_CLIENT
}
fn default_max_topic_levels() -> usize {
    DEFAULT_MAX_TOPIC_LEVELS
}
fn default_max_client_id_length() -> usize {
    DEFAULT_MAX_CLIENT_ID_LENGTH
}
fn default_max_keepalive() -> u16 {
    DEFAULT_MAX_KEEPALIVE
}
fn default_max_topic_alias() -> u16 {
    DEFAULT_MAX_TOPIC_ALIAS
}
fn default_max_queued_messages() -> usize {
    DEFAULT_MAX_QUEUED_MESSAGES
}
fn default_max_queued_bytes() -> usize {
    DEFAULT_MAX_QUEUED_BYTES
}
fn default_max_session_expiry() -> u64 {
    DEFAULT_MAX_SESSION_EXPIRY
}
fn default_max_sessions_per_user() -> usize {
    DEFAULT_MAX_SESSIONS_PER_USER
}

/// Whether two bind addresses cannot both be bound: the same port (not 0, which picks
/// a free one) on the same address, or one of them a wildcard that covers the other
/// (`0.0.0.0` covers IPv4 addresses; `[::]` is dual-stack on Linux and covers both).
fn addresses_overlap(a: std::net::SocketAddr, b: std::net::SocketAddr) -> bool {
    let covers = |w: std::net::SocketAddr, o: std::net::SocketAddr| {
        w.ip().is_unspecified() && (w.is_ipv6() || o.is_ipv4())
    };
    a.port() != 0 && a.port() == b.port() && (a.ip() == b.ip() || covers(a, b) || covers(b, a))
}

/// Why two binds cannot both be served; the other bind's key path follows.
const OVERLAPS: &str = "same port on the same or a wildcard address as";

/// An HTTP request path as a client sends it: absolute, no query or fragment.
fn valid_ws_path(p: &str) -> bool {
    p.starts_with('/')
        && !p
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '?' || c == '#')
}

impl Config {
    /// Checks what the types cannot. Called by `load`/`parse`.
    pub fn validate(self) -> Result<Config, Invalid> {
        if self.listener.is_empty() {
            return Err(Invalid::new(
                "listener",
                "at least one [[listener]] is required",
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (i, l) in self.listener.iter().enumerate() {
            if l.name.is_empty() || l.name.len() > 64 {
                return Err(Invalid::new("name", "must be 1 to 64 characters").in_listener(i));
            }
            if !names.insert(l.name.as_str()) {
                return Err(Invalid::new("name", "listener names must be unique").in_listener(i));
            }
            if l.bind.parse::<std::net::SocketAddr>().is_err() {
                return Err(Invalid::new(
                    "bind",
                    "must be an ip:port address such as 127.0.0.1:1883",
                )
                .in_listener(i));
            }
            if let Some(paths) = &l.path {
                if l.protocol != Protocol::Ws {
                    return Err(
                        Invalid::new("path", "applies only to protocol = \"ws\"").in_listener(i)
                    );
                }
                if paths.is_empty() {
                    return Err(Invalid::new(
                        "path",
                        "must list at least one path, e.g. [\"/mqtt\"], or [\"*\"] for any",
                    )
                    .in_listener(i));
                }
                if paths.iter().any(|p| p != "*" && !valid_ws_path(p)) {
                    return Err(Invalid::new(
                        "path",
                        "each path must start with / and hold no spaces, ? or #, or be \"*\"",
                    )
                    .in_listener(i));
                }
            }
            if let Some(f) = &l.forwarded {
                if l.protocol != Protocol::Ws {
                    return Err(Invalid::new(
                        "forwarded",
                        "applies only to protocol = \"ws\" (use trust_proxy_protocol for mqtt)",
                    )
                    .in_listener(i));
                }
                let token = |c: char| c.is_ascii_alphanumeric() || "-_".contains(c);
                if f.header.is_empty() || !f.header.chars().all(token) {
                    return Err(Invalid::new(
                        "forwarded.header",
                        "must be an HTTP header name such as CF-Connecting-IP",
                    )
                    .in_listener(i));
                }
                if f.trusted_proxies.is_empty() {
                    return Err(Invalid::new(
                        "forwarded.trusted_proxies",
                        "must list the proxies' addresses or CIDRs",
                    )
                    .in_listener(i));
                }
                if f.trusted_proxies.iter().any(|p| parse_net(p).is_none()) {
                    return Err(Invalid::new(
                        "forwarded.trusted_proxies",
                        "each entry must be an IP address or CIDR such as 10.0.0.0/8",
                    )
                    .in_listener(i));
                }
            }
            if let Some(tls) = &l.tls {
                if tls.identity == CertIdentity::Cn && tls.client_ca.is_none() {
                    return Err(Invalid::new(
                        "tls.identity",
                        "identity = \"cn\" needs client_ca to verify client certificates",
                    )
                    .in_listener(i));
                }
            }
        }
        // Two sockets on one address: `serve` would fail on the second bind.
        let binds: Vec<std::net::SocketAddr> = self
            .listener
            .iter()
            .filter_map(|l| l.bind.parse().ok())
            .collect();
        for (i, addr) in binds.iter().enumerate() {
            if let Some(j) = binds[..i].iter().position(|b| addresses_overlap(*b, *addr)) {
                return Err(
                    Invalid::conflict("bind", &format!("listener[{j}].bind"), OVERLAPS)
                        .in_listener(i),
                );
            }
        }
        if let Some(m) = &self.metrics {
            if let Ok(addr) = m.bind.parse::<std::net::SocketAddr>() {
                if let Some(j) = binds.iter().position(|b| addresses_overlap(*b, addr)) {
                    return Err(Invalid::conflict(
                        "metrics.bind",
                        &format!("listener[{j}].bind"),
                        OVERLAPS,
                    ));
                }
            }
        }
        let lim = &self.limits;
        for (key, value) in [
            ("limits.max_packet_size", lim.max_packet_size),
            ("limits.max_connections", lim.max_connections),
            ("limits.connect_timeout", lim.connect_timeout as usize),
            (
                "limits.max_connections_per_address",
                lim.connections_per_address(),
            ),
            (
                "limits.max_pending_per_address",
                lim.max_pending_per_address,
            ),
            ("limits.max_inflight", lim.max_inflight as usize),
            (
                "limits.max_subscriptions_per_client",
                lim.max_subscriptions_per_client,
            ),
            ("limits.max_topic_levels", lim.max_topic_levels),
            ("limits.max_client_id_length", lim.max_client_id_length),
            ("limits.max_keepalive", lim.max_keepalive as usize),
            ("limits.max_queued_bytes", lim.max_queued_bytes),
            ("limits.max_session_expiry", lim.max_session_expiry as usize),
            ("limits.max_sessions_per_user", lim.max_sessions_per_user),
        ] {
            if value == 0 {
                return Err(Invalid::new(key, "must be greater than 0"));
            }
        }
        if lim.max_packet_size > 268_435_455 {
            return Err(Invalid::new(
                "limits.max_packet_size",
                "must be at most 268435455, the MQTT maximum",
            ));
        }
        if lim.max_payload_size == Some(0) {
            return Err(Invalid::new(
                "limits.max_payload_size",
                "must be greater than 0 (leave it out for no payload limit)",
            ));
        }
        if let Some(m) = &self.metrics {
            if m.bind.parse::<std::net::SocketAddr>().is_err() {
                return Err(Invalid::new(
                    "metrics.bind",
                    "must be an ip:port address such as 127.0.0.1:9100",
                ));
            }
        }
        if self.sys.interval > MAX_SYS_INTERVAL {
            return Err(Invalid::new(
                "sys.interval",
                "must be at most 65535 seconds (0 turns the $SYS tree off)",
            ));
        }
        let rl = &self.rate_limit;
        if rl.connections_per_second > 0 && rl.connection_burst == 0 {
            return Err(Invalid::new(
                "rate_limit.connection_burst",
                "must be greater than 0 when connections_per_second is set",
            ));
        }
        if rl.messages_per_second > 0 && rl.message_burst == 0 {
            return Err(Invalid::new(
                "rate_limit.message_burst",
                "must be greater than 0 when messages_per_second is set",
            ));
        }
        let mut users = std::collections::HashSet::new();
        for (i, u) in rl.user.iter().enumerate() {
            let key = |k: &str| format!("rate_limit.user[{i}].{k}");
            if u.name.is_empty() {
                return Err(Invalid::new(key("name"), "must not be empty"));
            }
            if !users.insert(u.name.as_str()) {
                return Err(Invalid::new(
                    key("name"),
                    "each user may have one [[rate_limit.user]] table",
                ));
            }
            let rates = rl.publish_rates(Some(&u.name));
            if rates.messages_per_second > 0 && rates.message_burst == 0 {
                return Err(Invalid::new(
                    key("message_burst"),
                    "must be greater than 0 when messages_per_second is set",
                ));
            }
        }
        if let Some(r) = &self.retained {
            if r.max_messages == 0 {
                return Err(Invalid::new(
                    "retained.max_messages",
                    "must be greater than 0",
                ));
            }
            if r.max_bytes == 0 {
                return Err(Invalid::new("retained.max_bytes", "must be greater than 0"));
            }
        }
        if let Some(c) = &self.cluster {
            c.validate()?;
            if self.retained.is_none() {
                // Without a key the cluster's state in NATS would be plaintext.
                return Err(Invalid::new(
                    "cluster",
                    "a cluster needs a [retained] section: its key seals the state the nodes share in NATS (every node uses the same key)",
                ));
            }
        }
        if self.retained.is_none() {
            let s = &self.sessions;
            for (key, set) in [
                ("sessions.enabled", s.enabled == Some(true)),
                ("sessions.path", s.path.is_some()),
                ("sessions.autosave_interval", s.autosave_interval.is_some()),
            ] {
                if set {
                    return Err(Invalid::new(
                        key,
                        "durable sessions need a [retained] section: its key encrypts them",
                    ));
                }
            }
        }
        Ok(self)
    }

    /// Where and how persistent sessions are stored durably, defaults applied; `None`
    /// when they stay in memory (no `[retained]` store, or `[sessions] enabled = false`).
    pub fn sessions(&self) -> Option<SessionsConfig> {
        let retained = self.retained.as_ref()?;
        let s = &self.sessions;
        if s.enabled == Some(false) {
            return None;
        }
        Some(SessionsConfig {
            path: s.path.clone().unwrap_or_else(|| retained.path.clone()),
            key_file: retained.key_file.clone(),
            autosave_interval: s.autosave_interval.unwrap_or(retained.autosave_interval),
            queue_qos0_messages: s.queue_qos0_messages,
        })
    }

    /// Whether anonymous clients may connect on `listener`.
    pub fn anonymous_allowed(&self, listener: &Listener) -> bool {
        listener
            .allow_anonymous
            .unwrap_or(self.auth.allow_anonymous)
    }
}
