//! The one error type of this crate.
//!
//! Messages name the file and line but never echo the offending text: an ACL file is
//! configuration, and configuration text does not belong in logs.

use std::path::PathBuf;

/// Why an ACL file could not be loaded. Any of these is a start-up (or reload) error:
/// the broker never falls back to other rules.
#[derive(Debug, thiserror::Error)]
pub enum AclError {
    /// The file could not be read: usually a wrong path or missing permissions.
    #[error("cannot read ACL file {}: {source}", file.display())]
    Io {
        /// The file that was being read.
        file: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A line is not valid ACL syntax: unknown keyword, missing or invalid topic, missing
    /// user name, or bytes that are not UTF-8.
    #[error("{}:{line}: {reason}", file.display())]
    Parse {
        /// The file being parsed.
        file: PathBuf,
        /// 1-based line number of the offending line.
        line: usize,
        /// What is wrong with the line (never the line's text itself).
        reason: String,
    },
}
