//! The checks the gateway asks for: who a client is (authentication) and what it may do
//! (authorization). The gateway calls these and nothing else decides access.
//!
//! Authentication: a verified certificate CN on `identity = "cn"` listeners; else a
//! username/password checked against the Argon2id password file on the hashing pool
//! (`hashing.rs`: one thread per core), with a growing delay for addresses that keep
//! failing; else anonymous, only where the listener allows it. Authorization: the ACL
//! file, or the built-in rules (tenant isolation) when none is configured. Both are
//! swapped whole on SIGHUP; a file that fails to load keeps the old one in force.

use crate::hashing::HashPool;
use moatmq_acl::{Acl, Decision};
use moatmq_auth::{valid_identity, LoginThrottle, PasswordFile, Verdict};
use moatmq_config::Config;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use tracing::{info, warn};
use zeroize::Zeroizing;

/// Who a connected client is.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Authenticated username or certificate CN; `None` for anonymous clients.
    pub username: Option<String>,
    /// The client id the client connected with (or was assigned).
    pub client_id: String,
}

impl Identity {
    fn acl(&self) -> moatmq_acl::Identity<'_> {
        moatmq_acl::Identity {
            username: self.username.as_deref(),
            client_id: &self.client_id,
        }
    }
}

/// Why a CONNECT was refused by authentication. The client only learns "bad
/// credentials" or "not authorized"; logs and the audit log get the reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// Wrong or unknown username/password (3.1.1: 0x04, 5: 0x86).
    BadCredentials,
    /// No username on a listener without anonymous access (3.1.1: 0x05, 5: 0x87).
    AnonymousNotAllowed,
    /// The username or certificate CN is empty, too long, or contains `/`, `+`, `#` or a
    /// control character (3.1.1: 0x05, 5: 0x87).
    InvalidIdentity,
    /// `identity = "cn"`: the CONNECT carried a username other than the certificate's
    /// CN (Mosquitto's use_identity_as_username ignores it; 3.1.1: 0x05, 5: 0x87).
    UsernameNotCertificateCn,
}

impl AuthFailure {
    /// The stable word logged and audited as the reason.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthFailure::BadCredentials => "bad_credentials",
            AuthFailure::AnonymousNotAllowed => "anonymous_not_allowed",
            AuthFailure::InvalidIdentity => "invalid_identity",
            AuthFailure::UsernameNotCertificateCn => "username_not_certificate_cn",
        }
    }

    /// Whether the client is told "bad username or password" rather than "not authorized".
    pub fn is_bad_credentials(self) -> bool {
        self == AuthFailure::BadCredentials
    }
}

/// What a listener accepts.
#[derive(Debug, Clone)]
pub struct ListenerPolicy {
    pub name: Arc<str>,
    pub allow_anonymous: bool,
}

/// Why the policy files could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error(transparent)]
    Acl(#[from] moatmq_acl::AclError),
    #[error(transparent)]
    Auth(#[from] moatmq_auth::AuthError),
}

/// Authentication and authorization decisions.
pub struct Policy {
    password_path: Option<PathBuf>,
    passwords: RwLock<Option<Arc<PasswordFile>>>,
    acl_path: Option<PathBuf>,
    acl: RwLock<Arc<Acl>>,
    /// Bumped on every ACL reload, so connections know their cached view is stale.
    acl_generation: AtomicU64,
    throttle: LoginThrottle,
    hashing: HashPool,
}

impl Policy {
    /// Loads the password and ACL files named in `config`.
    pub fn load(config: &Config) -> Result<Policy, PolicyError> {
        let password_path = config
            .auth
            .password_file
            .as_ref()
            .map(|p| config.resolve(p));
        let passwords = match &password_path {
            Some(p) => {
                let file = PasswordFile::load(p)?;
                if file.legacy_users() > 0 {
                    warn!(users = file.legacy_users(), "password file has mosquitto_passwd hashes; re-hash them with `moatmq passwd`");
                }
                Some(Arc::new(file))
            }
            None => None,
        };
        let acl_path = config.acl.file.as_ref().map(|p| config.resolve(p));
        let acl = match &acl_path {
            Some(p) => Acl::load(p)?,
            None => {
                warn!("no ACL file: users may use only `<username>/#`; anonymous clients every topic except $-topics");
                Acl::builtin_default()
            }
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Ok(Policy {
            password_path,
            passwords: RwLock::new(passwords),
            acl_path,
            acl: RwLock::new(Arc::new(acl)),
            acl_generation: AtomicU64::new(0),
            throttle: LoginThrottle::new(),
            hashing: HashPool::new(cores),
        })
    }

    /// SIGHUP: re-reads the password and ACL files. A file that fails keeps the old one.
    pub fn reload(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if let Some(p) = &self.password_path {
            match PasswordFile::load(p) {
                Ok(file) => {
                    info!(users = file.len(), "password file reloaded");
                    if let Ok(mut slot) = self.passwords.write() {
                        *slot = Some(Arc::new(file));
                    }
                }
                Err(e) => errors.push(format!("{e} (previous password file stays in force)")),
            }
        }
        if let Some(p) = &self.acl_path {
            match Acl::load(p) {
                Ok(acl) => {
                    info!(rules = acl.rule_count(), "ACL file reloaded");
                    if let Ok(mut slot) = self.acl.write() {
                        *slot = Arc::new(acl);
                    }
                    self.acl_generation.fetch_add(1, Ordering::Release);
                }
                Err(e) => errors.push(format!("{e} (previous ACL stays in force)")),
            }
        }
        errors
    }

    fn current_acl(&self) -> Arc<Acl> {
        match self.acl.read() {
            Ok(a) => a.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Decides who a CONNECT is. `cert_identity` is the verified certificate CN when the
    /// listener maps certificates to identities.
    pub async fn authenticate(
        &self,
        listener: &ListenerPolicy,
        peer: IpAddr,
        username: Option<&str>,
        password: Option<&str>,
        cert_identity: Option<&str>,
    ) -> Result<Option<String>, AuthFailure> {
        // Every answer waits out the address's failure delay, success or not, so the
        // delay itself tells a guesser nothing.
        let delay = self.throttle.delay_for(peer);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let result = self
            .decide(listener, username, password, cert_identity)
            .await;
        match &result {
            Ok(_) => self.throttle.record_success(peer),
            Err(_) => self.throttle.record_failure(peer),
        }
        result
    }

    async fn decide(
        &self,
        listener: &ListenerPolicy,
        username: Option<&str>,
        password: Option<&str>,
        cert_identity: Option<&str>,
    ) -> Result<Option<String>, AuthFailure> {
        if let Some(cn) = cert_identity {
            // One name in logs and audit: a CONNECT username must be the CN.
            if !valid_identity(cn) {
                return Err(AuthFailure::InvalidIdentity);
            }
            if username.is_some_and(|u| u != cn) {
                return Err(AuthFailure::UsernameNotCertificateCn);
            }
            return Ok(Some(cn.to_string()));
        }
        let passwords = match self.passwords.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        match (username, passwords) {
            (None, _) if listener.allow_anonymous => Ok(None),
            (None, _) => Err(AuthFailure::AnonymousNotAllowed),
            // Without a password file nobody can prove a name: where anonymous access is
            // allowed the client is anonymous, whatever username it claims.
            // A name that could widen a `%u` pattern is refused whoever claims it.
            (Some(user), _) if !valid_identity(user) => Err(AuthFailure::InvalidIdentity),
            (Some(_), None) if listener.allow_anonymous => Ok(None),
            (Some(_), None) => Err(AuthFailure::BadCredentials),
            (Some(user), Some(file)) => {
                if !valid_identity(user) {
                    return Err(AuthFailure::InvalidIdentity);
                }
                let password = Zeroizing::new(password.unwrap_or("").as_bytes().to_vec());
                let verdict = self.hashing.verify(file, user, password).await;
                match verdict {
                    Verdict::Accepted => Ok(Some(user.to_string())),
                    Verdict::AcceptedLegacyHash => {
                        warn!(username = user, "password entry uses a mosquitto_passwd hash; re-hash it with `moatmq passwd`");
                        Ok(Some(user.to_string()))
                    }
                    Verdict::Rejected => Err(AuthFailure::BadCredentials),
                }
            }
        }
    }

    /// May `who` publish to `topic`? The decision names the deciding ACL line.
    pub fn may_publish(&self, who: &Identity, topic: &str) -> Decision {
        self.current_acl().check_publish(&who.acl(), topic)
    }

    /// May `who` subscribe to `filter` (a `$share/group/` prefix already removed)?
    pub fn may_subscribe(&self, who: &Identity, filter: &str) -> Decision {
        self.current_acl().check_subscribe(&who.acl(), filter)
    }

    /// A connection's cached view of the ACL, for the per-message read check.
    pub fn acl_view(&self) -> AclView {
        let generation = self.acl_generation.load(Ordering::Acquire);
        AclView {
            generation,
            acl: self.current_acl(),
        }
    }

    /// May `who` receive a message on `topic`? Checked for every delivered message,
    /// against the connection's cached view, refreshed at once after a reload (so a
    /// revoked subscription stops delivering with the next message).
    pub fn may_read(&self, view: &mut AclView, who: &Identity, topic: &str) -> Decision {
        if self.acl_generation.load(Ordering::Acquire) != view.generation {
            *view = self.acl_view();
        }
        view.acl.check_read(&who.acl(), topic)
    }
}

/// One connection's snapshot of the ACL: reading it costs no lock and no shared write.
pub struct AclView {
    generation: u64,
    acl: Arc<Acl>,
}

/// Strips a `$share/<group>/` prefix.
pub fn unshare(filter: &str) -> &str {
    moatmq_acl::strip_share(filter).unwrap_or(filter)
}
