//! Security events: one type, emitted in one place ([`emit`]), which feeds the
//! Prometheus counter, the trace log and the JSON audit log from the same value, so the
//! three never disagree about what happened.
//!
//! The audit log's event names and fields are an interface (docs/operating.md): a
//! variant's [`Event::name`] and field names never change.

use crate::audit::{AuditLog, Who};
use crate::metrics::Metrics;
use serde_json::Value;
use tracing::{debug, info};

/// Something a connection did that an operator may have to answer for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<'a> {
    /// A CONNECT arrived (before authentication; `username` is the one claimed).
    Connect { protocol: &'static str },
    /// The client is in: CONNACK 0x00 sent.
    AuthSuccess {
        method: &'static str,
        protocol: &'static str,
    },
    /// Wrong password, unknown user, refused certificate identity.
    AuthFailure { reason: &'a str },
    /// No capacity to check the password: answered "server busy", not a failure.
    LoginBusy { reason: &'a str },
    /// The ACL refused `action` on `topic`; `rule_line` is the deciding line, if any.
    AuthzDeny {
        action: &'a str,
        topic: &'a str,
        rule_line: Option<usize>,
    },
    /// A retained message was refused (quota).
    RetainedRefused {
        topic: &'a str,
        reason: &'static str,
    },
    /// A rate or per-address limit refused the client. `audited: false` counts it
    /// without an audit line (a flood of refusals must not flood the disk).
    RateLimited { limit: &'a str, audited: bool },
    /// A persistent session was refused (`limits.max_sessions_per_user`).
    SessionRefused { limit: &'static str },
    /// A message for an offline persistent session was dropped: its queue is full
    /// (`limit`: `max_queued_messages` or `max_queued_bytes`). About the session, not a
    /// connection.
    SessionQueueFull {
        owner: Option<&'a str>,
        client_id: &'a str,
        limit: &'static str,
    },
    /// The connection ended; `reason` is a stable word (gateway/close.rs).
    Disconnect {
        reason: &'static str,
        detail: Option<&'a str>,
    },
    /// SIGHUP reloaded password file, ACL, TLS material and the audit log; these
    /// failed (the previous version of each stays in force). About no connection.
    ConfigReload { errors: &'a [String] },
}

impl Event<'_> {
    /// The audit log's `event` field.
    pub fn name(&self) -> &'static str {
        match self {
            Event::Connect { .. } => "connect",
            Event::AuthSuccess { .. } => "auth_success",
            Event::AuthFailure { .. } => "auth_failure",
            Event::LoginBusy { .. } => "login_busy",
            Event::AuthzDeny { .. } => "authz_deny",
            Event::RetainedRefused { .. } => "retained_refused",
            Event::RateLimited { .. } => "rate_limited",
            Event::SessionRefused { .. } => "session_refused",
            Event::SessionQueueFull { .. } => "session_queue_full",
            Event::Disconnect { .. } => "disconnect",
            Event::ConfigReload { .. } => "config_reload",
        }
    }

    /// The audit line's fields after the connection's own.
    fn fields(&self) -> Vec<(&'static str, Value)> {
        match *self {
            Event::Connect { protocol } => vec![("protocol", protocol.into())],
            Event::AuthSuccess { method, .. } => vec![("method", method.into())],
            Event::AuthFailure { reason } | Event::LoginBusy { reason } => {
                vec![("reason", reason.into())]
            }
            Event::AuthzDeny {
                action,
                topic,
                rule_line,
            } => vec![
                ("action", action.into()),
                ("topic", topic.into()),
                ("rule_line", rule_line.map_or(Value::Null, Into::into)),
            ],
            Event::RetainedRefused { topic, reason } => {
                vec![("topic", topic.into()), ("reason", reason.into())]
            }
            Event::RateLimited { limit, .. } => vec![("limit", limit.into())],
            Event::SessionRefused { limit } => vec![("limit", limit.into())],
            Event::SessionQueueFull {
                owner,
                client_id,
                limit,
            } => vec![
                ("owner", owner.map_or(Value::Null, Into::into)),
                ("client_id", client_id.into()),
                ("limit", limit.into()),
            ],
            Event::Disconnect { reason, .. } => vec![("reason", reason.into())],
            Event::ConfigReload { errors } => {
                let errors: Vec<Value> = errors.iter().map(|e| e.as_str().into()).collect();
                vec![("errors", errors.into())]
            }
        }
    }

    fn audited(&self) -> bool {
        !matches!(self, Event::RateLimited { audited: false, .. })
    }
}

/// Counts, traces and audits one event about the connection `who`, or about none.
pub fn emit(metrics: &Metrics, audit: Option<&AuditLog>, who: Option<&Who<'_>>, event: Event<'_>) {
    count(metrics, &event);
    match who {
        Some(who) => trace(who, &event),
        None => trace_global(&event),
    }
    match (audit, who, event.audited()) {
        (Some(audit), Some(who), true) => audit.event(event.name(), who, &event.fields()),
        (Some(audit), None, true) => audit.global(event.name(), &event.fields()),
        _ => {}
    }
}

fn trace_global(event: &Event<'_>) {
    if let Event::SessionQueueFull {
        owner,
        client_id,
        limit,
    } = *event
    {
        debug!(
            owner,
            client_id, limit, "queue of an offline session full: message dropped"
        );
    }
    if let Event::ConfigReload { errors } = *event {
        for e in errors {
            tracing::error!("reload: {e}");
        }
        info!(errors = errors.len(), "configuration reloaded");
    }
}

fn count(metrics: &Metrics, event: &Event<'_>) {
    match *event {
        Event::AuthSuccess { .. } => {
            metrics.auth_success.inc();
        }
        Event::AuthFailure { .. } => {
            metrics.auth_failure.inc();
        }
        Event::LoginBusy { .. } => {
            metrics.login_busy.inc();
        }
        Event::AuthzDeny { action, .. } => metrics.deny(action),
        Event::RetainedRefused { reason, .. } => metrics.retained_refused(reason),
        Event::RateLimited { .. } => {
            metrics.rate_limited.inc();
        }
        Event::SessionQueueFull { .. } => {
            metrics.session_messages_dropped.inc();
        }
        Event::Connect { .. }
        | Event::SessionRefused { .. }
        | Event::Disconnect { .. }
        | Event::ConfigReload { .. } => {}
    }
}

fn trace(who: &Who<'_>, event: &Event<'_>) {
    let (listener, peer) = (who.listener, who.peer);
    let client_id = who.client_id.unwrap_or("");
    let username = who.username.unwrap_or("");
    match *event {
        Event::Connect { protocol } => {
            debug!(listener, %peer, client_id, protocol, "CONNECT received")
        }
        Event::AuthSuccess { protocol, .. } => {
            info!(listener, %peer, client_id, username, protocol, "client connected")
        }
        Event::AuthFailure { reason } => {
            info!(listener, %peer, client_id, reason, "authentication failed")
        }
        Event::LoginBusy { .. } => {
            debug!(listener, %peer, client_id, "login answered busy: no capacity to check the password")
        }
        Event::AuthzDeny {
            action,
            topic,
            rule_line,
        } => debug!(
            listener,
            client_id,
            action,
            topic,
            ?rule_line,
            "denied by ACL"
        ),
        Event::RetainedRefused { topic, reason } => {
            debug!(
                listener,
                client_id, topic, reason, "retained message refused"
            )
        }
        Event::RateLimited { limit, .. } => {
            debug!(listener, %peer, client_id, limit, "rate limited")
        }
        Event::SessionRefused { limit } => {
            info!(listener, %peer, client_id, limit, "persistent session refused")
        }
        Event::Disconnect { reason, detail } => {
            info!(listener, %peer, client_id, reason, detail, "client disconnected")
        }
        Event::ConfigReload { .. } | Event::SessionQueueFull { .. } => trace_global(event),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who() -> Who<'static> {
        Who {
            listener: "default",
            peer: "127.0.0.1:5000".parse().unwrap(),
            client_id: Some("c1"),
            username: Some("alice"),
        }
    }

    fn audit_lines(events: &[Event<'_>]) -> (Vec<serde_json::Value>, std::sync::Arc<Metrics>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let audit = AuditLog::open(path.clone()).unwrap();
        let metrics = Metrics::new();
        for e in events {
            emit(&metrics, Some(&audit), Some(&who()), *e);
        }
        let text = std::fs::read_to_string(path).unwrap();
        let lines = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (lines, metrics)
    }

    #[test]
    fn one_event_reaches_the_audit_log_and_its_counter() {
        let (lines, metrics) = audit_lines(&[Event::AuthzDeny {
            action: "publish",
            topic: "bob/x",
            rule_line: Some(3),
        }]);
        assert_eq!(lines.len(), 1);
        let line = &lines[0];
        assert_eq!(line["event"], "authz_deny");
        assert_eq!(line["client_id"], "c1");
        assert_eq!(line["username"], "alice");
        assert_eq!(line["action"], "publish");
        assert_eq!(line["topic"], "bob/x");
        assert_eq!(line["rule_line"], 3);
        let scraped = metrics.render();
        assert!(
            scraped.contains("moatmq_acl_denials_total{action=\"publish\"} 1"),
            "{scraped}"
        );
    }

    #[test]
    fn a_reload_is_audited_without_a_connection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let audit = AuditLog::open(path.clone()).unwrap();
        let errors = ["password file: gone".to_string()];
        emit(
            &Metrics::new(),
            Some(&audit),
            None,
            Event::ConfigReload { errors: &errors },
        );
        let line: serde_json::Value =
            serde_json::from_str(std::fs::read_to_string(path).unwrap().trim()).unwrap();
        assert_eq!(line["event"], "config_reload");
        assert_eq!(line["errors"][0], "password file: gone");
        assert!(line.get("client_id").is_none(), "{line}");
    }

    #[test]
    fn an_unaudited_refusal_is_still_counted() {
        let (lines, metrics) = audit_lines(&[
            Event::RateLimited {
                limit: "max_connections_per_address",
                audited: false,
            },
            Event::RateLimited {
                limit: "messages",
                audited: true,
            },
        ]);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0]["limit"], "messages");
        assert!(metrics.render().contains("moatmq_rate_limited_total 2"));
    }
}
