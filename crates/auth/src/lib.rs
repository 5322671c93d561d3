//! Authentication for moatmq: who is on the other end of a connection.
//!
//! Two sources of identity feed the same username that the ACL engine uses:
//!
//! - a client certificate's subject CN ([`certificate_common_name`]), and
//! - a username and password checked against a password file ([`PasswordFile`]).
//!
//! Either way the name must pass [`valid_identity`] (no `/`, `+`, `#`, NUL or control
//! characters), because a name such as `+` would otherwise widen a `%u` ACL pattern.
//!
//! Password files hold `username:hash` lines. New hashes are Argon2id PHC strings
//! (`$argon2id$v=19$m=19456,t=2,p=1$...`, see [`hash_password`]); lines written by
//! `mosquitto_passwd` (`$7$` PBKDF2-HMAC-SHA512 and the older `$6$` salted SHA-512) are
//! accepted so a Mosquitto installation can bring its file, and a successful login
//! against one returns [`Verdict::AcceptedLegacyHash`] so the broker can ask for a
//! re-hash. [`update_password_file`] backs `moatmq passwd`.
//!
//! [`LoginThrottle`] slows down online guessing from one source address;
//! [`max_checked_guesses`] states how far.
//!
//! This crate is pure: no async, no sockets. [`PasswordFile::verify`] is deliberately
//! slow and memory hungry; callers run it on a bounded blocking pool.
#![forbid(unsafe_code)]

mod cache;
mod error;
mod identity;
mod legacy;
mod password_file;
mod throttle;
mod update;

pub use cache::CredentialCache;
pub use error::AuthError;
pub use identity::{certificate_common_name, valid_identity, MAX_IDENTITY_LEN};
pub use password_file::{hash_password, PasswordFile, Verdict};
pub use throttle::address_bucket;
pub use throttle::{max_checked_guesses, LoginThrottle, ThrottleParams};
pub use update::update_password_file;
