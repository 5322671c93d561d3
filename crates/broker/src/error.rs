//! The broker's one error type: why it could not start, or why it stopped serving.
//!
//! Each variant names the file, listener or component at fault; none carries a
//! configured secret. [`BrokerError::is_config`] sorts them for the exit code.

use crate::policy::PolicyError;
use crate::retained::RetainedError;
use crate::router::RouterFailure;

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// A listener could not bind (address in use, permission).
    #[error("listener {name}: cannot bind {addr}: {source}")]
    Bind {
        name: String,
        addr: String,
        source: std::io::Error,
    },
    /// TLS material could not be loaded.
    #[error("listener {name}: {source}")]
    Tls {
        name: String,
        source: crate::tls::TlsError,
    },
    /// The password or ACL file could not be loaded.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The router or its internal link could not start (out of threads or memory).
    #[error(transparent)]
    Router(#[from] crate::router::RouterError),
    /// The retained store could not be opened (wrong key, tampering, permissions).
    #[error(transparent)]
    Retained(#[from] RetainedError),
    /// The audit log cannot be opened for appending (its folder is missing, permissions).
    #[error("audit log {}: {source}", path.display())]
    Audit {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// The NATS connection of `[cluster]` could not be set up (credentials file
    /// unreadable, TLS files unusable, a server URL NATS refuses).
    #[error("cluster: {reason}")]
    Cluster { reason: String },
    /// The router died or stopped answering while serving (`run` only; see
    /// [`Broker::serve`]): the process should exit so its supervisor restarts it.
    #[error("{0}; exiting so the service manager restarts moatmq")]
    RouterFailed(#[from] RouterFailure),
}

impl BrokerError {
    /// Whether the configuration or a file it names is at fault, so that starting again
    /// without changing them cannot help (`moatmq` exits 64, not 1, and systemd's
    /// `RestartPreventExitStatus=64` does not restart it). A port in use or a router that
    /// could not start is a runtime failure.
    pub fn is_config(&self) -> bool {
        !matches!(
            self,
            BrokerError::Bind { .. } | BrokerError::Router(_) | BrokerError::RouterFailed(_)
        )
    }
}
