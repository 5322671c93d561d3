//! The audit log: one JSON object per line for each security event (`connect`,
//! `auth_success`, `auth_failure`, `authz_deny`, `disconnect`, `config_reload`,
//! `rate_limited`), with an RFC 3339 timestamp, listener, client id, username and peer.
//!
//! It never carries a password: events take their fields from the gateway's identity
//! and reasons, never from the CONNECT's password field. The file is reopened on SIGHUP
//! so logrotate can move it away.

use serde_json::{Map, Value};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Mutex;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Where audit lines go.
pub struct AuditLog {
    path: Option<PathBuf>,
    file: Mutex<Option<File>>,
}

/// The connection an event is about.
pub struct Who<'a> {
    pub listener: &'a str,
    pub peer: SocketAddr,
    pub client_id: Option<&'a str>,
    pub username: Option<&'a str>,
}

impl AuditLog {
    /// Opens `path` for appending (`-` = stdout).
    pub fn open(path: PathBuf) -> std::io::Result<AuditLog> {
        if path.as_os_str() == "-" {
            return Ok(AuditLog {
                path: None,
                file: Mutex::new(None),
            });
        }
        let file = open_append(&path)?;
        Ok(AuditLog {
            path: Some(path),
            file: Mutex::new(Some(file)),
        })
    }

    /// Reopens the file (SIGHUP, after logrotate moved it).
    pub fn reopen(&self) -> std::io::Result<()> {
        if let Some(path) = &self.path {
            let file = open_append(path)?;
            if let Ok(mut slot) = self.file.lock() {
                *slot = Some(file);
            }
        }
        Ok(())
    }

    /// Writes one event about a connection.
    pub fn event(&self, event: &str, who: &Who<'_>, extra: &[(&str, Value)]) {
        let mut line = Map::new();
        line.insert("ts".into(), now().into());
        line.insert("event".into(), event.into());
        line.insert("listener".into(), who.listener.into());
        line.insert("peer".into(), who.peer.to_string().into());
        line.insert(
            "client_id".into(),
            who.client_id.map_or(Value::Null, Into::into),
        );
        line.insert(
            "username".into(),
            who.username.map_or(Value::Null, Into::into),
        );
        for (k, v) in extra {
            line.insert((*k).into(), v.clone());
        }
        self.write(Value::Object(line));
    }

    /// Writes an event that concerns no connection (`config_reload`).
    pub fn global(&self, event: &str, extra: &[(&str, Value)]) {
        let mut line = Map::new();
        line.insert("ts".into(), now().into());
        line.insert("event".into(), event.into());
        for (k, v) in extra {
            line.insert((*k).into(), v.clone());
        }
        self.write(Value::Object(line));
    }

    fn write(&self, value: Value) {
        let mut text = value.to_string();
        text.push('\n');
        let Ok(mut file) = self.file.lock() else {
            return;
        };
        let result = match file.as_mut() {
            Some(f) => f.write_all(text.as_bytes()),
            None => std::io::stdout().lock().write_all(text.as_bytes()),
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "audit log write failed");
        }
    }
}

fn open_append(path: &PathBuf) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

fn now() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default()
}
