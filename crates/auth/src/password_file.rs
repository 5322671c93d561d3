//! The password file: `username:hash` lines, `#` comments and blank lines.
//!
//! Hashes are Argon2 PHC strings (Argon2id is what [`hash_password`] writes; argon2i and
//! argon2d strings are accepted too) or mosquitto `$7$` / `$6$` lines (see the `legacy`
//! module). The whole file is checked when loaded: a malformed line, an invalid
//! username, a duplicate user or out-of-range hash parameters make loading fail with
//! the file name, the line number and a reason, so a broken file never half-loads.
//!
//! Verification is constant time in the password. An unknown username is verified
//! against a dummy Argon2id hash with the default parameters, so the time taken does not
//! reveal whether the user exists; a user with a (cheap) mosquitto hash also pays for
//! that dummy verification, so timing does not single out accounts awaiting a re-hash.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use argon2::{Algorithm, Argon2, Params, Version};
use password_hash::rand_core::OsRng;
use password_hash::{PasswordHash, PasswordHasher, SaltString};
use subtle::ConstantTimeEq;

use crate::legacy::LegacyHash;
use crate::{valid_identity, AuthError};

/// Memory cost of new hashes, in KiB (OWASP's Argon2id recommendation).
pub const ARGON2_M_COST_KIB: u32 = 19_456;
/// Time cost (passes) of new hashes.
pub const ARGON2_T_COST: u32 = 2;
/// Parallelism of new hashes.
pub const ARGON2_P_COST: u32 = 1;

/// Largest Argon2 memory cost accepted from a file (1 GiB): one login must not be able
/// to exhaust the broker's memory because of a typo in the file.
const MAX_M_COST_KIB: u32 = 1024 * 1024;
/// Largest Argon2 time cost accepted from a file.
const MAX_T_COST: u32 = 64;
/// Largest Argon2 parallelism accepted from a file.
const MAX_P_COST: u32 = 16;

/// Argon2id hash of a random password that nobody knows, with the same parameters as
/// [`hash_password`], verified when the username is unknown so that the answer takes as
/// long as for a real user.
const DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$CcnMOHcpotwMV+clBdXgsg$MCLrG92TvaZFSC+Wzwqr9cf4BbVeNMaBIxooJ51PPWY";

/// The outcome of a password check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The password matches an Argon2 hash.
    Accepted,
    /// The password matches a mosquitto `$7$` or `$6$` hash: accept the login, and log
    /// that the entry should be re-hashed with `moatmq passwd`.
    AcceptedLegacyHash,
    /// Unknown user or wrong password (deliberately indistinguishable).
    Rejected,
}

/// One user's stored hash, validated at load time.
enum StoredHash {
    /// An Argon2 PHC string; re-parsed (cheaply) at each verification because
    /// `PasswordHash` borrows its text.
    Argon2(String),
    /// A mosquitto hash.
    Legacy(LegacyHash),
}

/// A loaded password file. Cheap to share (`Arc<PasswordFile>`) and immutable: a reload
/// builds a new one.
pub struct PasswordFile {
    source: PathBuf,
    users: HashMap<String, StoredHash>,
}

impl fmt::Debug for PasswordFile {
    // Never print hashes: they are offline-crackable.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PasswordFile")
            .field("source", &self.source)
            .field("users", &self.users.len())
            .finish_non_exhaustive()
    }
}

impl PasswordFile {
    /// Parses the text of a password file; `file_name` is only used in error messages.
    ///
    /// Errors are [`AuthError::Parse`] naming the first bad line; they never contain the
    /// hash or any other text of the line except, for duplicates, the username.
    pub fn parse(file_name: &Path, text: &str) -> Result<PasswordFile, AuthError> {
        let err = |line: usize, reason: String| AuthError::Parse {
            file: file_name.to_path_buf(),
            line,
            reason,
        };
        let mut users: HashMap<String, StoredHash> = HashMap::new();
        let mut first_line: HashMap<String, usize> = HashMap::new();
        for (index, raw) in text.lines().enumerate() {
            let number = index + 1;
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((username, hash)) = line.split_once(':') else {
                return Err(err(number, "missing ':' between username and hash".into()));
            };
            check_username(username).map_err(|r| err(number, r.into()))?;
            if let Some(first) = first_line.get(username) {
                return Err(err(
                    number,
                    format!("duplicate user {username:?} (first defined on line {first})"),
                ));
            }
            let stored = parse_hash(hash).map_err(|r| err(number, r.into()))?;
            first_line.insert(username.to_owned(), number);
            users.insert(username.to_owned(), stored);
        }
        Ok(PasswordFile {
            source: file_name.to_path_buf(),
            users,
        })
    }

    /// Reads and parses the password file at `path`.
    pub fn load(path: &Path) -> Result<PasswordFile, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let file = Self::parse(path, &text)?;
        tracing::debug!(
            path = %path.display(),
            users = file.len(),
            legacy = file.legacy_users(),
            "password file loaded"
        );
        Ok(file)
    }

    /// Checks `password` for `username`.
    ///
    /// Blocking and CPU/memory heavy (one Argon2 computation, about 19 MiB with the
    /// default parameters): call it on a bounded blocking pool. The comparison is
    /// constant time, and an unknown user is verified against a dummy Argon2id hash with
    /// the default parameters so timing does not reveal which usernames exist.
    pub fn verify(&self, username: &str, password: &[u8]) -> Verdict {
        match self.users.get(username) {
            Some(StoredHash::Argon2(phc)) => {
                if verify_argon2(phc, password) {
                    Verdict::Accepted
                } else {
                    Verdict::Rejected
                }
            }
            Some(StoredHash::Legacy(legacy)) => {
                // A mosquitto hash is far cheaper than Argon2id: spend the dummy cost as
                // well so timing does not single out users that still need a re-hash.
                let _ = verify_argon2(DUMMY_HASH, password);
                if legacy.verify(password) {
                    Verdict::AcceptedLegacyHash
                } else {
                    Verdict::Rejected
                }
            }
            None => {
                // Spend the same time as for a real user; the result is irrelevant.
                let _ = verify_argon2(DUMMY_HASH, password);
                Verdict::Rejected
            }
        }
    }

    /// Number of users whose entry is a mosquitto `$7$` / `$6$` hash and should be
    /// re-hashed with `moatmq passwd` (the broker can warn about it at start-up).
    pub fn legacy_users(&self) -> usize {
        self.users
            .values()
            .filter(|h| matches!(h, StoredHash::Legacy(_)))
            .count()
    }

    /// Number of users in the file.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether the file defines no user at all.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// The file this was loaded from (or the name given to [`PasswordFile::parse`]).
    pub fn source(&self) -> &Path {
        &self.source
    }
}

/// Hashes `password` as Argon2id (m=19456 KiB, t=2, p=1, random 16-byte salt) and
/// returns the PHC string, e.g. `$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>`.
pub fn hash_password(password: &[u8]) -> Result<String, AuthError> {
    let params = Params::new(ARGON2_M_COST_KIB, ARGON2_T_COST, ARGON2_P_COST, None)
        .map_err(|e| AuthError::Hash(e.to_string()))?;
    let salt = SaltString::generate(&mut OsRng);
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password(password, &salt)
        .map(|h| h.to_string())
        .map_err(|e| AuthError::Hash(e.to_string()))
}

/// Why `username` cannot appear in a password file, if it cannot.
pub(crate) fn check_username(username: &str) -> Result<(), &'static str> {
    if username.trim() != username {
        return Err("username has leading or trailing whitespace");
    }
    if username.contains(':') {
        return Err("username contains ':'");
    }
    if username.contains(['/', '+', '#']) {
        // The ACL engine substitutes usernames into patterns (`%u/#`) and `user` lines:
        // a wildcard or level separator there would widen what the user may reach.
        return Err(
            "username is not a valid identity: '/', '+' and '#' are MQTT's topic level separator and wildcards, and a username is put into ACL patterns such as %u/#, where one would widen the user's access; use another character such as '-' or '_'",
        );
    }
    if !valid_identity(username) {
        return Err(
            "username is not a valid identity (empty, longer than 65535 bytes, or contains NUL or a control character)",
        );
    }
    Ok(())
}

/// Validates a hash field; the error is a fixed reason that never echoes the hash.
fn parse_hash(hash: &str) -> Result<StoredHash, &'static str> {
    if hash.is_empty() {
        return Err("empty hash");
    }
    if hash.starts_with("$argon2") {
        check_argon2(hash)?;
        return Ok(StoredHash::Argon2(hash.to_owned()));
    }
    if hash.starts_with("$7$") || hash.starts_with("$6$") {
        return LegacyHash::parse(hash).map(StoredHash::Legacy);
    }
    Err("unsupported hash format: expected $argon2id$..., or mosquitto $7$ or $6$ (plain-text passwords are not accepted)")
}

/// Checks that `phc` is an Argon2 PHC string that can be verified, with bounded costs.
fn check_argon2(phc: &str) -> Result<(), &'static str> {
    let parsed = PasswordHash::new(phc).map_err(|_| "malformed Argon2 PHC string")?;
    Algorithm::try_from(parsed.algorithm).map_err(|_| "unknown Argon2 variant")?;
    if let Some(v) = parsed.version {
        Version::try_from(v).map_err(|_| "unsupported Argon2 version")?;
    }
    let params = Params::try_from(&parsed).map_err(|_| "invalid Argon2 parameters")?;
    if params.m_cost() > MAX_M_COST_KIB
        || params.t_cost() > MAX_T_COST
        || params.p_cost() > MAX_P_COST
    {
        return Err("Argon2 parameters too expensive (limits: m=1048576, t=64, p=16)");
    }
    if parsed.salt.is_none() || parsed.hash.is_none() {
        return Err("Argon2 PHC string without salt or hash");
    }
    Ok(())
}

thread_local! {
    /// Argon2's working memory (~19 MiB at the default cost), kept per thread. Allocating
    /// and freeing it at every login left a freed block in each thread's malloc arena:
    /// hundreds of MiB after a login storm. Reused, it costs one block per hashing thread.
    static ARGON2_MEMORY: std::cell::RefCell<Vec<argon2::Block>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Verifies against an Argon2 PHC string with the algorithm, version and parameters it
/// names; the outputs are compared in constant time.
fn verify_argon2(phc: &str, password: &[u8]) -> bool {
    let Ok(parsed) = PasswordHash::new(phc) else {
        return false;
    };
    let (Ok(algorithm), Ok(params)) = (
        Algorithm::try_from(parsed.algorithm),
        Params::try_from(&parsed),
    ) else {
        return false;
    };
    let version = match parsed.version.map(Version::try_from) {
        None => Version::V0x13,
        Some(Ok(v)) => v,
        Some(Err(_)) => return false,
    };
    let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
        return false;
    };
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
        return false;
    };
    let mut out = zeroize::Zeroizing::new(vec![0u8; expected.len()]);
    let blocks = params.block_count();
    let argon2 = Argon2::new(algorithm, version, params);
    let hashed = ARGON2_MEMORY.with(|memory| {
        let mut memory = memory.borrow_mut();
        if memory.len() < blocks {
            memory.resize(blocks, argon2::Block::default());
        }
        argon2.hash_password_into_with_memory(password, salt, &mut out, &mut memory[..blocks])
    });
    hashed.is_ok() && bool::from(expected.as_bytes().ct_eq(&out))
}

#[cfg(test)]
mod tests;
