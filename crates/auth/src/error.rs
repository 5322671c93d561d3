//! The one error type of this crate.
//!
//! No variant ever carries a password or a password hash: parse errors name the file,
//! the line number and a fixed reason, never the text of the line.

use std::path::PathBuf;

/// Everything that can go wrong while loading, verifying or writing credentials.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// A password file could not be read or written (nor the temporary file beside it
    /// or its folder, reported under the file's name): usually a wrong path or missing
    /// permissions.
    #[error("password file {}: {source}", path.display())]
    Io {
        /// The file or directory that was being accessed.
        path: PathBuf,
        /// The underlying operating-system error.
        #[source]
        source: std::io::Error,
    },

    /// A password file line is malformed: no `:`, an invalid username, a duplicate
    /// user, or a hash in an unknown format or with out-of-range parameters.
    #[error("{}:{line}: {reason}", file.display())]
    Parse {
        /// The password file.
        file: PathBuf,
        /// 1-based line number (0 when the problem is not tied to one line).
        line: usize,
        /// What is wrong; never contains the hash or any other secret.
        reason: String,
    },

    /// A username given to [`update_password_file`](crate::update_password_file) cannot
    /// be used as an identity (empty, too long, or contains `:`, `/`, `+`, `#`, NUL or a
    /// control character).
    #[error("invalid username {username:?}: {reason}")]
    InvalidUsername {
        /// The refused username (escaped when displayed).
        username: String,
        /// Why it was refused.
        reason: &'static str,
    },

    /// `moatmq passwd --delete` named a user that is not in the file.
    #[error("{}: no user {username:?}", file.display())]
    UnknownUser {
        /// The password file.
        file: PathBuf,
        /// The username that was not found.
        username: String,
    },

    /// Hashing a password failed (in practice only if the system random number
    /// generator is unavailable).
    #[error("cannot hash password: {0}")]
    Hash(String),

    /// The bytes given as a client certificate are not a single DER X.509 certificate.
    #[error("invalid client certificate: {0}")]
    Certificate(String),

    /// The client certificate's subject has no common name (CN).
    #[error("client certificate subject has no common name")]
    MissingCommonName,

    /// The client certificate's subject has more than one common name, so the identity
    /// would be ambiguous.
    #[error("client certificate subject has more than one common name")]
    AmbiguousCommonName,

    /// The client certificate's common name is not a UTF-8 (or ASCII-compatible) string.
    #[error("client certificate common name is not valid UTF-8")]
    CommonNameNotUtf8,
}
