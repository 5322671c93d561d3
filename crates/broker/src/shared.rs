//! State shared by every connection ([`Shared`]) and what a connection knows about
//! itself before its CONNECT ([`ConnInfo`]).
//!
//! Plain data plus the one way out for security events ([`Shared::emit`]); the steps
//! that act on it live in their own modules (`admit`, `will`, `session_expiry`).

use crate::admission::{Admission, Slot};
use crate::audit::{AuditLog, Who};
use crate::durable::SessionBook;
use crate::event::{self, Event};
use crate::handshake_log::HandshakeLog;
use crate::metrics::Metrics;
use crate::policy::{Identity, ListenerPolicy, Policy};
use crate::ratelimit::ConnectionLimiter;
use crate::retained::RetainedStore;
use crate::retained_index::RetainedIndex;
use crate::router::RouterHandle;
use crate::sessions::Sessions;
use crate::sys_tree::SysTree;
use crate::timers::Timers;
use moatmq_config::Config;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use tokio::sync::watch;

/// State shared by every connection.
pub struct Shared {
    pub config: Config,
    pub router: RouterHandle,
    pub policy: Policy,
    pub metrics: Arc<Metrics>,
    /// The audit log, when `[audit]` is configured.
    pub audit: Option<AuditLog>,
    /// New connections per source address (`[rate_limit]`).
    pub conn_limiter: ConnectionLimiter,
    /// Connections held and pending per source address (`limits.max_*_per_address`).
    pub admission: Arc<Admission>,
    /// Rate limit for the log lines about failed handshakes.
    pub handshake_log: HandshakeLog,
    /// Rate limit for the log lines and audit events about per-address refusals.
    pub refusal_log: HandshakeLog,
    /// The encrypted retained store, when `[retained]` is configured.
    pub retained: Option<Arc<RetainedStore>>,
    /// Every retained message, served by the gateways on SUBSCRIBE (the set the
    /// store, if any, persists).
    pub retained_index: RetainedIndex,
    /// Flips to `true` when the broker shuts down.
    pub shutdown: watch::Receiver<bool>,
    /// Wills waiting out their MQTT 5 delay, by router client id.
    pub delayed_wills: Timers,
    /// Disconnected persistent sessions waiting to expire, by router client id.
    pub session_timers: Timers,
    /// The connection holding each router client id (no takeover inside the router).
    pub sessions: Sessions,
    /// The durable copy of persistent sessions, when the session store is on.
    pub durable: Option<SessionBook>,
    /// This node's link to the other nodes, when `[cluster]` is configured.
    pub cluster: Option<crate::cluster::Cluster>,
    /// Live updates of the `$SYS` tree, for gateways holding `$SYS/...` subscriptions.
    pub sys: SysTree,
}

impl Shared {
    /// Sends one security event about a connection to its metric, the trace log and
    /// the audit log.
    pub fn emit(&self, who: &Who<'_>, event: Event<'_>) {
        event::emit(&self.metrics, self.audit.as_ref(), Some(who), event);
    }

    /// The same for an event about no connection (a reload).
    pub fn emit_global(&self, event: Event<'_>) {
        event::emit(&self.metrics, self.audit.as_ref(), None, event);
    }
}

/// What a gateway knows about its connection before CONNECT.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub listener: ListenerPolicy,
    pub peer: SocketAddr,
    /// Verified client-certificate CN, on listeners with `identity = "cn"`.
    pub cert_identity: Option<String>,
    /// The source address is over `rate_limit.connections_per_second`.
    pub rate_limited: bool,
    /// When the connection must have sent its CONNECT (`limits.connect_timeout` from
    /// accept, shared with the PROXY header, TLS and WebSocket steps).
    pub deadline: tokio::time::Instant,
    /// The connection's per-address slot, held by the listener for the connection's life.
    pub slot: Weak<Slot>,
}

impl ConnInfo {
    /// The connection of what the broker admits on nobody's socket (a restored
    /// session's will, cluster input): audited under the listener name `source`.
    pub fn internal(source: &str) -> ConnInfo {
        ConnInfo {
            listener: ListenerPolicy {
                name: source.into(),
                allow_anonymous: false,
            },
            peer: SocketAddr::from(([0, 0, 0, 0], 0)),
            cert_identity: None,
            rate_limited: false,
            deadline: tokio::time::Instant::now(),
            slot: Weak::new(),
        }
    }

    /// The CONNACK went out: the connection stops counting as pending for its address.
    pub fn established(&self) {
        if let Some(slot) = self.slot.upgrade() {
            slot.established();
        }
    }

    /// The audit log's view of this connection.
    pub fn who<'a>(&'a self, client_id: Option<&'a str>, username: Option<&'a str>) -> Who<'a> {
        Who {
            listener: &self.listener.name,
            peer: self.peer,
            client_id,
            username,
        }
    }

    /// The audit log's view of this connection once its client is known.
    pub fn client<'a>(&'a self, who: &'a Identity) -> Who<'a> {
        self.who(Some(&who.client_id), who.username.as_deref())
    }
}
