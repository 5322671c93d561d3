//! The checks the gateway asks for: who a client is (authentication) and what it may do
//! (authorization). The gateway calls these and nothing else decides access.
//!
//! Authentication: a verified certificate CN on `identity = "cn"` listeners; else a
//! username/password checked against the Argon2id password file on the hashing pool
//! (`hashing.rs`: one thread per core, addresses served in turn), with a growing delay
//! for addresses and (address, username) pairs that keep failing and at most two
//! password logins in progress per address (`login_gate.rs`); else anonymous, only where
//! the listener allows it. No room to check a password is "busy", never a failure. Authorization: the ACL
//! file, or the built-in rules (tenant isolation) when none is configured. Both are
//! swapped whole on SIGHUP; a file that fails to load keeps the old one in force.

use crate::hashing::{HashPool, Settle};
use crate::login_gate::LoginGate;
use moatmq_acl::{Acl, Decision};
use moatmq_auth::{valid_identity, CredentialCache, LoginThrottle, PasswordFile, Verdict};
use moatmq_config::Config;
use prometheus_client::metrics::counter::Counter;
use std::collections::HashSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
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

/// Why a CONNECT was refused by authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthFailure {
    /// Wrong or unknown username/password (3.1.1: 0x04, 5: 0x86).
    BadCredentials,
    /// Anonymous refused, or the identity is not acceptable (3.1.1: 0x05, 5: 0x87).
    NotAuthorized,
    /// On an `identity = "cn"` listener the CONNECT's username is not the certificate's
    /// CN (3.1.1: 0x05, 5: 0x87). Mosquitto ignores the username there; moatmq refuses
    /// so logs and ACLs never see two names for one client.
    UsernameNotCertificateCn { username: String, cn: String },
    /// No capacity to check the password now: the address has its logins in progress
    /// and its queue full, or the hashing queue is full (3.1.1: 0x03, 5: 0x89). Not a
    /// failed login: no strike, no `auth_failure`.
    Busy,
}

impl AuthFailure {
    /// The reason in words, for the log and the audit event.
    pub fn reason(&self) -> String {
        match self {
            AuthFailure::BadCredentials => "bad username or password".into(),
            AuthFailure::NotAuthorized => "not authorized".into(),
            AuthFailure::UsernameNotCertificateCn { username, cn } => {
                format!("username {username:?} differs from certificate CN {cn:?}")
            }
            AuthFailure::Busy => "server busy: no capacity to check the password".into(),
        }
    }
}

/// One login attempt: where it comes from and what it presents. No `Debug`: it holds the
/// password.
pub struct Attempt<'a> {
    /// The listener the client connected to.
    pub listener: &'a ListenerPolicy,
    /// The client's address (after PROXY protocol or a trusted forwarding header).
    pub peer: IpAddr,
    /// The CONNECT's username, if any.
    pub username: Option<&'a str>,
    /// The CONNECT's password, if any.
    pub password: Option<&'a str>,
    /// The verified certificate CN when the listener maps certificates to identities.
    pub cert_identity: Option<&'a str>,
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
    /// Shared with the metrics, which count its throttled addresses at each scrape.
    throttle: Arc<LoginThrottle>,
    gate: LoginGate,
    hashing: HashPool,
    /// Recent successful password checks (`auth.credential_cache_*`): a reconnecting
    /// client skips the hash.
    credentials: Arc<CredentialCache>,
    /// Users already warned about in this process for a mosquitto_passwd hash.
    legacy_warned: Mutex<HashSet<String>>,
}

impl Policy {
    /// Loads the password and ACL files named in `config`; each password actually
    /// checked counts in `password_checks`.
    pub fn load(config: &Config, password_checks: Counter) -> Result<Policy, PolicyError> {
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
        let throttle = Arc::new(LoginThrottle::new());
        Ok(Policy {
            password_path,
            passwords: RwLock::new(passwords),
            acl_path,
            acl: RwLock::new(Arc::new(acl)),
            acl_generation: AtomicU64::new(0),
            gate: LoginGate::new(throttle.params()),
            throttle,
            hashing: HashPool::new(cores, password_checks),
            credentials: Arc::new(CredentialCache::new(
                config.auth.credential_cache_size,
                Duration::from_secs(config.auth.credential_cache_ttl),
            )),
            legacy_warned: Mutex::new(HashSet::new()),
        })
    }

    /// The failed-login throttle, for the metrics to read at scrape time.
    pub fn throttle(&self) -> Arc<LoginThrottle> {
        self.throttle.clone()
    }

    /// SIGHUP: re-reads the password and ACL files. A file that fails keeps the old one.
    pub fn reload(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if let Some(p) = &self.password_path {
            match PasswordFile::load(p) {
                Ok(file) => {
                    info!(users = file.len(), "password file reloaded");
                    // Remembered logins of changed or deleted entries go now.
                    self.credentials.retain_valid(&file);
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

    /// Digests of the ACL and the password file in force (`None`: the built-in rules,
    /// no password file), for comparing with other cluster nodes (`cluster::nodes`).
    pub fn digests(&self) -> (Option<[u8; 32]>, Option<[u8; 32]>) {
        let passwords = match self.passwords.read() {
            Ok(p) => p.as_ref().map(|f| f.digest()),
            Err(poisoned) => poisoned.into_inner().as_ref().map(|f| f.digest()),
        };
        (self.current_acl().digest(), passwords)
    }

    fn current_acl(&self) -> Arc<Acl> {
        match self.acl.read() {
            Ok(a) => a.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Decides who a CONNECT is.
    pub async fn authenticate(&self, attempt: &Attempt<'_>) -> Result<Option<String>, AuthFailure> {
        let peer = attempt.peer;
        let claimed = attempt.username.unwrap_or("");
        // A password login holds one of its address's slots from before its delay until
        // its check is done, so parallel attempts cannot wait out the delay together.
        let checks_password = attempt.cert_identity.is_none() && attempt.username.is_some();
        let _slot = if checks_password {
            match self.gate.enter(peer).await {
                Ok(slot) => Some(slot),
                Err(_) => return Err(AuthFailure::Busy),
            }
        } else {
            None
        };
        // Every answer waits out the failure delay, success or not, so the delay itself
        // tells a guesser nothing.
        let delay = self.throttle.delay_for(peer, claimed);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        // A check the hashing pool runs is settled there (failure counted, success
        // remembered) whether or not the client waits for it: hanging up gets no free
        // guesses, and a device that gave up during a storm finds its retry in the
        // credential cache instead of being throttled for it.
        let (result, settled) = self.decide(attempt).await;
        if !settled {
            match &result {
                Ok(_) => self.throttle.record_success(peer, claimed),
                Err(AuthFailure::Busy) => {}
                Err(_) => self.throttle.record_failure(peer, claimed),
            }
        }
        result
    }

    /// The verdict, and whether the hashing pool has already settled it.
    async fn decide(&self, attempt: &Attempt<'_>) -> (Result<Option<String>, AuthFailure>, bool) {
        let Attempt {
            listener,
            peer,
            username,
            password,
            cert_identity,
        } = *attempt;
        if let Some(cn) = cert_identity {
            if !valid_identity(cn) {
                return (Err(AuthFailure::NotAuthorized), false);
            }
            // One name in logs and audit: a CONNECT username must be the CN.
            if let Some(u) = username.filter(|&u| u != cn) {
                let mismatch = AuthFailure::UsernameNotCertificateCn {
                    username: u.to_string(),
                    cn: cn.to_string(),
                };
                return (Err(mismatch), false);
            }
            return (Ok(Some(cn.to_string())), false);
        }
        let passwords = match self.passwords.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        let (user, file) = match (username, passwords) {
            (None, _) if listener.allow_anonymous => return (Ok(None), false),
            (None, _) => return (Err(AuthFailure::NotAuthorized), false),
            // A name that could widen a `%u` pattern is refused whoever claims it.
            (Some(user), _) if !valid_identity(user) => {
                return (Err(AuthFailure::NotAuthorized), false)
            }
            // Without a password file nobody can prove a name: where anonymous access is
            // allowed the client is anonymous, whatever username it claims.
            (Some(_), None) if listener.allow_anonymous => return (Ok(None), false),
            (Some(_), None) => return (Err(AuthFailure::BadCredentials), false),
            (Some(user), Some(file)) => (user, file),
        };
        let password = Zeroizing::new(password.unwrap_or("").as_bytes().to_vec());
        // The same credentials verified a moment ago (a reconnect): no new hash.
        let (verdict, settled) = match self.credentials.lookup(&file, user, &password) {
            Some(verdict) => (Ok(verdict), false),
            None => {
                let settle = self.settle(peer, &file, user, &password);
                let verdict = self
                    .hashing
                    .verify(peer, file.clone(), user, password, settle)
                    .await;
                (verdict, true)
            }
        };
        let result = match verdict {
            Ok(Verdict::Accepted) => Ok(Some(user.to_string())),
            Ok(Verdict::AcceptedLegacyHash) => {
                self.warn_legacy_once(user);
                Ok(Some(user.to_string()))
            }
            Ok(Verdict::Rejected) => Err(AuthFailure::BadCredentials),
            // Never checked: nothing to settle.
            Err(_) => return (Err(AuthFailure::Busy), false),
        };
        (result, settled)
    }

    /// What a finished password check leaves behind, done on the hashing thread: a
    /// rejection counts as a failure, an acceptance clears its (address, username) count
    /// and is remembered in the credential cache.
    fn settle(
        &self,
        peer: IpAddr,
        file: &Arc<PasswordFile>,
        user: &str,
        password: &Zeroizing<Vec<u8>>,
    ) -> Settle {
        let (throttle, credentials) = (self.throttle.clone(), self.credentials.clone());
        let (file, user, password) = (file.clone(), user.to_string(), password.clone());
        Box::new(move |verdict| {
            match verdict {
                Verdict::Rejected => throttle.record_failure(peer, &user),
                Verdict::Accepted | Verdict::AcceptedLegacyHash => {
                    throttle.record_success(peer, &user)
                }
            }
            credentials.insert(&file, &user, &password, verdict);
        })
    }

    /// Warns that `user` logged in against a mosquitto_passwd hash, once per user per
    /// process (a WARN on every login of a device drowns the log).
    fn warn_legacy_once(&self, user: &str) {
        if first_time(&self.legacy_warned, user) {
            warn!(username = user, "password entry uses a mosquitto_passwd hash; re-hash it with `moatmq passwd` (logged once per user)");
        }
    }

    /// May `who` publish to `topic`? The decision names the deciding ACL line. The
    /// broker's `$SYS/...` tree is written by the broker only, whatever the ACL grants
    /// (built-in refusal, no line).
    pub fn may_publish(&self, who: &Identity, topic: &str) -> Decision {
        if crate::topic::is_sys(topic) {
            return Decision::NO_MATCH;
        }
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

/// Whether `user` is new to `seen` (and remembers it). Only users of the password file
/// get here, so the set is bounded by the file.
fn first_time(seen: &Mutex<HashSet<String>>, user: &str) -> bool {
    let mut seen = seen
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if seen.contains(user) {
        return false;
    }
    seen.insert(user.to_string())
}

/// Strips a `$share/<group>/` prefix.
pub fn unshare(filter: &str) -> &str {
    moatmq_acl::strip_share(filter).unwrap_or(filter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_hash_warning_is_once_per_user() {
        let seen = Mutex::new(HashSet::new());
        assert!(first_time(&seen, "alice"));
        assert!(!first_time(&seen, "alice"));
        assert!(first_time(&seen, "bob"));
        assert!(!first_time(&seen, "alice"));
    }
}
