//! What tells one kind of log from another: the retained store and the session store
//! share the framing, sealing, reading and high-water-mark code, and differ only in the
//! names and constants here. Each kind has its own file magic (bound into the header's
//! tag) and its own associated-data domains for records and mark slots, so a file, a
//! record or a mark of one kind never authenticates as the other, even under one key.

/// The constants of one kind of log.
#[derive(Debug)]
pub(crate) struct Format {
    /// File magic, first 8 bytes of the header.
    pub(crate) magic: &'static [u8; 8],
    /// Format version written.
    pub(crate) version: u32,
    /// Oldest format version still read.
    pub(crate) min_version: u32,
    /// First version always paired with a high-water mark: a log of an older version
    /// without one was written before marks existed and is accepted once.
    pub(crate) marked_since: u32,
    /// First version whose frames hold a batch of records (each with its length before
    /// it) rather than one; `None` if every version seals each record alone.
    pub(crate) batched_since: Option<u32>,
    /// Domain string at the start of each record's associated data.
    pub(crate) record_domain: &'static [u8],
    /// Domain string at the start of each mark slot's associated data.
    pub(crate) mark_domain: &'static [u8],
    /// Name of the log inside its folder.
    pub(crate) log_name: &'static str,
    /// Name of the high-water mark inside the folder.
    pub(crate) mark_name: &'static str,
    /// Prefix of compaction/rekey temporary files; stale ones are removed on open.
    pub(crate) tmp_prefix: &'static str,
    /// How logs and errors call it.
    pub(crate) what: &'static str,
    /// The command that takes a damaged log as it is, named in errors.
    pub(crate) accept: &'static str,
}

/// The retained store (its format predates this table: the values are its originals).
pub(crate) const RETAINED: Format = Format {
    magic: b"MOATMQRS",
    version: 2,
    min_version: 1,
    marked_since: 2,
    batched_since: None,
    record_domain: b"moatmq-store-record",
    mark_domain: b"moatmq-store-hwm",
    log_name: "retained.log",
    mark_name: "retained.log.hwm",
    tmp_prefix: "retained.log.tmp",
    what: "retained store",
    accept: "moatmq retained accept",
};

/// The session store. Every version is paired with a high-water mark; from version 2 a
/// frame holds the records of one commit (up to [`BATCH_PLAIN`](crate::record::BATCH_PLAIN)
/// bytes of them), sealed together.
pub(crate) const SESSIONS: Format = Format {
    magic: b"MOATMQSS",
    version: 2,
    min_version: 1,
    marked_since: 1,
    batched_since: Some(2),
    record_domain: b"moatmq-session-record",
    mark_domain: b"moatmq-session-hwm",
    log_name: "sessions.log",
    mark_name: "sessions.log.hwm",
    tmp_prefix: "sessions.log.tmp",
    what: "session store",
    accept: "moatmq sessions accept",
};

impl Format {
    /// Whether frames of a `version` file hold batches of records.
    pub(crate) fn batches(&self, version: u32) -> bool {
        self.batched_since.is_some_and(|v| version >= v)
    }
}

/// The format whose log or mark `file` is, by its name (for error messages).
pub(crate) fn of_file(file: &std::path::Path) -> &'static Format {
    let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if name.starts_with("sessions.log") {
        &SESSIONS
    } else {
        &RETAINED
    }
}
