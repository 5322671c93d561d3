//! Preflight: everything `serve` refuses that can be found without binding a socket or
//! replaying the retained store: the password file, the ACL file, each listener's TLS
//! certificate, key and client CA (missing, unreadable, swapped, not matching each
//! other), the retained-store key (missing, malformed, readable by group or others, not
//! the key of the existing store's or session log's header), the `[cluster]` credentials
//! and TLS files, and the audit log's folder. (The config
//! itself, overlapping bind addresses included, is checked when it is loaded.)
//!
//! `moatmq check` is this function; `moatmq serve` calls it before starting, so the
//! two refuse the same configuration with the same message, and `Broker::start` loads
//! the same files through the same functions.

use crate::error::BrokerError;
use crate::policy::Policy;
use moatmq_config::Config;

/// Checks the files `config` names; the first problem is returned.
pub fn validate(config: &Config) -> Result<(), BrokerError> {
    // A throwaway counter: nothing is checked here.
    Policy::load(config, Default::default())?;
    for l in &config.listener {
        crate::listener::tls_for(config, l)?;
    }
    if let Some(r) = &config.retained {
        let key = crate::retained::load_key(config, r)?;
        // The header only: a store written under another key is refused here too.
        key.check_store(&config.resolve(&r.path))
            .map_err(crate::retained::RetainedError::Store)?;
        // And the session log's, where durable sessions are on.
        if let Some(s) = config.sessions() {
            key.check_session_store(&config.resolve(&s.path))
                .map_err(crate::retained::RetainedError::Store)?;
        }
    }
    if let Some(c) = &config.cluster {
        cluster_files(config, c)?;
    }
    if let Some(a) = config.audit.as_ref().filter(|a| a.path.as_os_str() != "-") {
        let path = config.resolve(&a.path);
        let folder = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        };
        match std::fs::metadata(&folder) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(BrokerError::Audit {
                    path,
                    source: std::io::Error::other(format!("{} is not a folder", folder.display())),
                })
            }
            Err(source) => return Err(BrokerError::Audit { path, source }),
        }
    }
    Ok(())
}

/// The `[cluster]` credentials file and TLS files exist and can be read (NATS itself is
/// not contacted: `check` must work where NATS is not reachable).
fn cluster_files(config: &Config, c: &moatmq_config::Cluster) -> Result<(), BrokerError> {
    let tls = c.tls.as_ref();
    let files = [
        ("credentials", c.credentials.as_ref()),
        ("tls.ca", tls.and_then(|t| t.ca.as_ref())),
        ("tls.cert", tls.and_then(|t| t.cert.as_ref())),
        ("tls.key", tls.and_then(|t| t.key.as_ref())),
    ];
    for (key, path) in files {
        let Some(path) = path else { continue };
        let path = config.resolve(path);
        if let Err(e) = std::fs::File::open(&path) {
            return Err(BrokerError::Cluster {
                reason: format!("{key} {}: {e}", path.display()),
            });
        }
    }
    Ok(())
}
