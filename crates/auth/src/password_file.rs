//! The password file: `username:hash` lines, `#` comments and blank lines.
//!
//! Hashes are Argon2 PHC strings (Argon2id is what [`hash_password`] writes; argon2i and
//! argon2d strings are accepted too) or mosquitto `$7$` / `$6$` lines (see the `legacy`
//! module). The whole file is checked when loaded: a malformed line, an invalid
//! username, a duplicate user or out-of-range hash parameters make loading fail with
//! the file name, the line number and a reason, so a broken file never half-loads.
//!
//! Verification is constant time in the password, and every check costs what the
//! file's slowest entry costs, so timing reveals neither whether a user exists nor which
//! accounts still await a re-hash: each check does one Argon2 computation at the most
//! expensive parameters in the file (the user's own for an Argon2 entry; a dummy one,
//! with those parameters, otherwise) plus PBKDF2-HMAC-SHA512 up to the highest `$7$`
//! iteration count in the file (a `$7$` user's own iterations, padded with dummy ones).
//! The padding is computed when the file is loaded, so a reload recomputes it. Only an
//! Argon2 entry with cheaper parameters than the file's most expensive one answers
//! faster; `moatmq passwd` writes every entry with the same parameters.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use argon2::{Algorithm, Argon2, Params, Version};
use password_hash::rand_core::OsRng;
use password_hash::{PasswordHash, PasswordHasher, SaltString};
use sha2::Digest as _;
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

/// Salt of the dummy Argon2 and PBKDF2 computations that pad a check to the file's
/// slowest entry (their results are thrown away).
const DUMMY_SALT: &[u8; 16] = b"moatmq-dummy-slt";

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
    /// SHA-256 of each user's hash text: what the credential cache binds an entry to, so
    /// a changed or deleted entry never matches what was cached for the old one.
    stamps: HashMap<String, [u8; 32]>,
    /// SHA-256 over every user and stamp in username order: equal for two files with
    /// the same users and hashes, whatever their comments or line order.
    digest: [u8; 32],
    pad: Padding,
}

/// SHA-256 over each username (length-prefixed) and its stamp, in username order.
fn digest_of(stamps: &HashMap<String, [u8; 32]>) -> [u8; 32] {
    let mut users: Vec<_> = stamps.iter().collect();
    users.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let mut hasher = sha2::Sha256::new();
    for (name, stamp) in users {
        hasher.update((name.len() as u64).to_be_bytes());
        hasher.update(name.as_bytes());
        hasher.update(stamp);
    }
    hasher.finalize().into()
}

/// What one check costs in this file: the most expensive entry's work.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Padding {
    /// The most expensive Argon2 parameters of the file (the defaults without any
    /// Argon2 entry): every check computes one Argon2 hash with them.
    argon2: Params,
    /// The highest `$7$` iteration count of the file (0 without any): every check runs
    /// this many PBKDF2-HMAC-SHA512 iterations.
    pbkdf2_iterations: u32,
}

/// The work one check did, for tests that compare users.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Work {
    /// Memory, passes and lanes of the Argon2 computation (`None` if none ran).
    pub(crate) argon2: Option<(u32, u32, u32)>,
    /// PBKDF2-HMAC-SHA512 iterations, real and dummy.
    pub(crate) pbkdf2_iterations: u64,
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
        let mut stamps: HashMap<String, [u8; 32]> = HashMap::new();
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
            stamps.insert(
                username.to_owned(),
                sha2::Sha256::digest(hash.as_bytes()).into(),
            );
            users.insert(username.to_owned(), stored);
        }
        let pad = Padding::of(&users);
        let digest = digest_of(&stamps);
        Ok(PasswordFile {
            source: file_name.to_path_buf(),
            users,
            stamps,
            digest,
            pad,
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
    /// constant time, and every check (unknown users included) costs as much as the
    /// file's slowest entry so timing does not reveal which usernames exist.
    pub fn verify(&self, username: &str, password: &[u8]) -> Verdict {
        self.verify_counted(username, password).0
    }

    /// [`PasswordFile::verify`], also saying what work was done.
    pub(crate) fn verify_counted(&self, username: &str, password: &[u8]) -> (Verdict, Work) {
        let pad = &self.pad;
        let (verdict, argon2, pbkdf2) = match self.users.get(username) {
            Some(StoredHash::Argon2(phc)) => {
                let (ok, params) = verify_argon2_with(phc, password);
                let verdict = if ok {
                    Verdict::Accepted
                } else {
                    Verdict::Rejected
                };
                (verdict, params.as_ref().map(costs), 0)
            }
            Some(StoredHash::Legacy(legacy)) => {
                // A mosquitto hash is far cheaper than Argon2id: spend the dummy cost as
                // well so timing does not single out users that still need a re-hash.
                dummy_argon2(&pad.argon2, password);
                let verdict = if legacy.verify(password) {
                    Verdict::AcceptedLegacyHash
                } else {
                    Verdict::Rejected
                };
                (
                    verdict,
                    Some(costs(&pad.argon2)),
                    legacy.pbkdf2_iterations(),
                )
            }
            None => {
                // Spend the same time as for a real user; the result is irrelevant.
                dummy_argon2(&pad.argon2, password);
                (Verdict::Rejected, Some(costs(&pad.argon2)), 0)
            }
        };
        // Up to the slowest `$7$` entry's iterations (PBKDF2's cost is linear in them).
        let missing = pad.pbkdf2_iterations.saturating_sub(pbkdf2);
        if missing > 0 {
            let mut out = zeroize::Zeroizing::new([0u8; 64]);
            pbkdf2::pbkdf2_hmac::<sha2::Sha512>(password, DUMMY_SALT, missing, &mut out[..]);
        }
        let work = Work {
            argon2,
            pbkdf2_iterations: u64::from(pbkdf2) + u64::from(missing),
        };
        (verdict, work)
    }

    /// The stamp of `username`'s entry (a digest of its hash text), if the user exists.
    pub(crate) fn stamp(&self, username: &str) -> Option<&[u8; 32]> {
        self.stamps.get(username)
    }

    /// A digest of the users and their hashes (not of comments or line order): two
    /// files with the same digest accept the same logins.
    pub fn digest(&self) -> [u8; 32] {
        self.digest
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

impl Padding {
    /// The most expensive entry's work among `users`.
    fn of(users: &HashMap<String, StoredHash>) -> Padding {
        let mut argon2: Option<Params> = None;
        let mut pbkdf2_iterations = 0;
        for stored in users.values() {
            match stored {
                StoredHash::Argon2(phc) => {
                    // Validated at load: the parse cannot fail here. The output length
                    // is the dummy's own, whatever the entry's.
                    let Some(params) = argon2_params(phc)
                        .and_then(|p| Params::new(p.m_cost(), p.t_cost(), p.p_cost(), None).ok())
                    else {
                        continue;
                    };
                    // Work is memory blocks times passes; lanes run one after another.
                    let cost = |p: &Params| u64::from(p.m_cost()) * u64::from(p.t_cost());
                    if argon2.as_ref().map_or(true, |a| cost(&params) > cost(a)) {
                        argon2 = Some(params);
                    }
                }
                StoredHash::Legacy(legacy) => {
                    pbkdf2_iterations = pbkdf2_iterations.max(legacy.pbkdf2_iterations());
                }
            }
        }
        Padding {
            argon2: argon2.unwrap_or_else(default_params),
            pbkdf2_iterations,
        }
    }
}

/// What an Argon2 computation costs: memory in KiB, passes, lanes.
fn costs(p: &Params) -> (u32, u32, u32) {
    (p.m_cost(), p.t_cost(), p.p_cost())
}

/// The parameters of new hashes.
fn default_params() -> Params {
    Params::new(ARGON2_M_COST_KIB, ARGON2_T_COST, ARGON2_P_COST, None).unwrap_or(Params::DEFAULT)
}

/// The parameters named in an Argon2 PHC string.
fn argon2_params(phc: &str) -> Option<Params> {
    let parsed = PasswordHash::new(phc).ok()?;
    Params::try_from(&parsed).ok()
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
#[cfg(test)]
fn verify_argon2(phc: &str, password: &[u8]) -> bool {
    verify_argon2_with(phc, password).0
}

/// [`verify_argon2`], also returning the parameters a hash was computed with (`None`
/// if the string could not be used, which load-time validation rules out).
fn verify_argon2_with(phc: &str, password: &[u8]) -> (bool, Option<Params>) {
    let Ok(parsed) = PasswordHash::new(phc) else {
        return (false, None);
    };
    let (Ok(algorithm), Ok(params)) = (
        Algorithm::try_from(parsed.algorithm),
        Params::try_from(&parsed),
    ) else {
        return (false, None);
    };
    let version = match parsed.version.map(Version::try_from) {
        None => Version::V0x13,
        Some(Ok(v)) => v,
        Some(Err(_)) => return (false, None),
    };
    let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
        return (false, None);
    };
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
        return (false, None);
    };
    let mut out = zeroize::Zeroizing::new(vec![0u8; expected.len()]);
    let hashed = argon2_into(algorithm, version, params.clone(), password, salt, &mut out);
    let ok = hashed && bool::from(expected.as_bytes().ct_eq(&out));
    (ok, Some(params))
}

/// One Argon2id computation with `params` whose result is thrown away: the cost of a
/// real check, for users without an Argon2 entry.
fn dummy_argon2(params: &Params, password: &[u8]) {
    let mut out = zeroize::Zeroizing::new([0u8; 32]);
    let _ = argon2_into(
        Algorithm::Argon2id,
        Version::V0x13,
        params.clone(),
        password,
        DUMMY_SALT,
        &mut out[..],
    );
}

/// Computes an Argon2 hash into `out`, in this thread's reused work area.
fn argon2_into(
    algorithm: Algorithm,
    version: Version,
    params: Params,
    password: &[u8],
    salt: &[u8],
    out: &mut [u8],
) -> bool {
    let blocks = params.block_count();
    let argon2 = Argon2::new(algorithm, version, params);
    ARGON2_MEMORY.with(|memory| {
        let mut memory = memory.borrow_mut();
        if memory.len() < blocks {
            memory.resize(blocks, argon2::Block::default());
        }
        argon2
            .hash_password_into_with_memory(password, salt, out, &mut memory[..blocks])
            .is_ok()
    })
}

#[cfg(test)]
mod tests;
