//! The one error type of the store. Every variant that concerns a file names it, and
//! every variant that concerns a record names its index or byte offset, so an operator
//! can tell "wrong key" from "record 17 was altered" from "disk full". Messages about a
//! log or its mark say which store it is (retained or sessions) by the file's name.

use std::path::{Path, PathBuf};

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
    #[error("wrong key for {} {file}: the header's key check failed", what(file))]
    WrongKey {
        /// The log file.
        file: PathBuf,
    },
    /// The header decrypted under this key but record `record` (0-based) did not
    /// authenticate: it was altered, swapped, replayed from another file, or records
    /// before it were removed.
    #[error("{} {file}: record {record} failed authentication (tampered, reordered, replayed or records removed before it)", what(file))]
    WrongKeyOrTampered {
        /// The log file.
        file: PathBuf,
        /// 0-based index of the first record that failed.
        record: u64,
    },
    /// The file's structure is broken: bad magic or version, a malformed length prefix,
    /// an oversized record, or a record that authenticated but does not decode.
    #[error("{} {file} is corrupt at byte offset {offset}: {reason}", what(file))]
    Corrupt {
        /// The log file.
        file: PathBuf,
        /// Byte offset of the header or record at fault.
        offset: u64,
        /// What was wrong.
        reason: String,
    },
    /// The log holds fewer records than its high-water mark vouches for: it was cut (at a
    /// record boundary or down to its header), its last records were zeroed, or an older
    /// copy of the same file was put back. A torn record *past* the mark is a crash during
    /// a save and is not this error. `moatmq retained accept` takes the log as it is.
    #[error("{} {file}: {missing} records after offset {offset} are missing (file ends at byte {file_len}; expected record {expected}, found {found}); its high-water mark {mark} requires {required} records. The file was cut, its last records zeroed, or an older copy restored; to keep it anyway run `{} -c CONFIG`", what(file), accept(file))]
    Truncated {
        /// The log file.
        file: PathBuf,
        /// The high-water mark file.
        mark: PathBuf,
        /// How many records are missing.
        missing: u64,
        /// Byte offset where the first missing record should start.
        offset: u64,
        /// Length of the log file.
        file_len: u64,
        /// 0-based index of the first missing record.
        expected: u64,
        /// What is there instead: "end of file", "zero bytes" or "a torn record".
        found: &'static str,
        /// Records the mark requires.
        required: u64,
    },
    /// The log is not the file its high-water mark was last written for: an older copy
    /// (from before a compaction or rekey), or another store's log, was put in its place.
    #[error("{} {file} is not the file its high-water mark {mark} was written for: an older copy was restored or the file was replaced; to keep it anyway run `{} -c CONFIG`", what(file), accept(file))]
    RolledBack {
        /// The log file.
        file: PathBuf,
        /// The high-water mark file.
        mark: PathBuf,
    },
    /// The high-water mark is missing or unreadable although the log was written by a
    /// version that always keeps one (deleted, damaged, or written under another key).
    #[error("{} {file}: its high-water mark {mark} is missing or unreadable ({reason}), so truncation and rollback cannot be ruled out; to keep the log anyway run `{} -c CONFIG`", what(file), accept(file))]
    MarkMissing {
        /// The log file.
        file: PathBuf,
        /// The high-water mark file.
        mark: PathBuf,
        /// Why: missing, damaged, or another key.
        reason: &'static str,
    },
    /// The log file is gone but its high-water mark says it held records: the store was
    /// deleted (starting empty would silently lose every retained message).
    #[error("{} {file} is missing but its high-water mark {mark} says it held {records} records; to start with an empty store anyway run `{} -c CONFIG`", what(file), accept(file))]
    LogMissing {
        /// The log file that should exist.
        file: PathBuf,
        /// The high-water mark file.
        mark: PathBuf,
        /// Records the mark vouches for.
        records: u64,
    },
    /// `set` would make a total grow past one of the [`crate::StoreLimits`].
    #[error("retained store is full ({} reached)", .0.label())]
    Full(crate::Refusal),
    /// A session-store call named a session that is not kept (enqueue before put).
    #[error("no such session")]
    UnknownSession,
    /// A message could not be encoded (for example a field too large to frame).
    #[error("cannot encode retained record: {0}")]
    Encode(String),
    /// A value of the cluster's shared state in NATS (`cluster.rs`) was refused: it does
    /// not authenticate under this node's key at its bucket and key (altered, moved, or
    /// written by a node with another key), or does not hold what that key names.
    #[error("cluster value {bucket}/{key} refused: {reason}")]
    SealedValue {
        /// The KV bucket.
        bucket: String,
        /// The KV key (a keyed hash, not the topic).
        key: String,
        /// What was wrong.
        reason: String,
    },
    /// `finish_compaction` was given a job that did not run successfully, or that is not
    /// the latest one started on this store.
    #[error("compaction job not run, failed, or superseded by a later one")]
    StaleCompaction,
}

/// "retained store" or "session store", by the file's name.
fn what(file: &Path) -> &'static str {
    crate::format::of_file(file).what
}

/// The command that accepts a damaged log of `file`'s kind.
fn accept(file: &Path) -> &'static str {
    crate::format::of_file(file).accept
}

impl StoreError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> StoreError {
        StoreError::Io {
            path: path.into(),
            source,
        }
    }
}
