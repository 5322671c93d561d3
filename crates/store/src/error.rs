//! The one error type of the store. Every variant that concerns a file names it, and
//! every variant that concerns a record names its index or byte offset, so an operator
//! can tell "wrong key" from "record 17 was altered" from "disk full".

use std::path::PathBuf;

/// Everything that can go wrong opening, writing, compacting or rekeying a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A read, write, fsync, rename or directory operation failed (disk full, permissions,
    /// read-only file system). Nothing pending is lost: retry the operation later.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or directory the operation was on.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The key file could not be read (`retained.key_file`, `retained rekey --new-key`)
    /// or written (`keygen --out`): a wrong path, permissions, or it already exists.
    #[error("retained-store key file {}: {source}", path.display())]
    KeyFile {
        /// The key file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The key file can be read by its group or by others; `chmod 600` it.
    #[error("key file {path} is readable by group or others; run `chmod 600` on it")]
    KeyPermissions {
        /// The key file.
        path: PathBuf,
    },
    /// The key text is not 64 hex characters (32 bytes); the text itself is never echoed.
    #[error("invalid retained-store key: {0}")]
    BadKey(String),
    /// The key-check block in the file header does not decrypt: the store was written
    /// under another key (or its header was altered).
    #[error("wrong key for retained store {file}: the header's key check failed")]
    WrongKey {
        /// The log file.
        file: PathBuf,
    },
    /// The header decrypted under this key but record `record` (0-based) did not
    /// authenticate: it was altered, swapped, replayed from another file, or records
    /// before it were removed.
    #[error("retained store {file}: record {record} failed authentication (tampered, reordered, replayed or records removed before it)")]
    WrongKeyOrTampered {
        /// The log file.
        file: PathBuf,
        /// 0-based index of the first record that failed.
        record: u64,
    },
    /// The file's structure is broken: bad magic or version, a malformed length prefix,
    /// an oversized record, or a record that authenticated but does not decode.
    #[error("retained store {file} is corrupt at byte offset {offset}: {reason}")]
    Corrupt {
        /// The log file.
        file: PathBuf,
        /// Byte offset of the header or record at fault.
        offset: u64,
        /// What was wrong.
        reason: String,
    },
    /// `set` of a new topic would exceed `max_messages` or `max_bytes`.
    #[error("retained store is full (max_messages or max_bytes reached)")]
    Full,
    /// A message could not be encoded (for example a field too large to frame).
    #[error("cannot encode retained record: {0}")]
    Encode(String),
    /// `finish_compaction` was given a job that did not run successfully, or that is not
    /// the latest one started on this store.
    #[error("compaction job not run, failed, or superseded by a later one")]
    StaleCompaction,
}

impl StoreError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> StoreError {
        StoreError::Io {
            path: path.into(),
            source,
        }
    }
}
