//! The high-water mark (`retained.log.hwm` beside the log): a small file, sealed with the
//! store's key, that says which log file must be there and how many records it must hold
//! at least. The log alone cannot tell a file cut at a record boundary, or an older copy of
//! itself, from the real thing; the mark can.
//!
//! How it decides, on open (see `Store::open`):
//! - the log's file id is the mark's `current` one: the log must hold at least its
//!   `records`; fewer is [`StoreError::Truncated`] (cut, zeroed tail, or an older copy);
//! - it is the mark's `next` one (a compaction renamed its new file into place and
//!   crashed before the mark caught up): the same check against `next`;
//! - anything else is [`StoreError::RolledBack`]: the log is not the file last written;
//! - no mark beside a version-2 log is [`StoreError::MarkMissing`]; beside a version-1 log
//!   (written before marks existed) it is the first start after an upgrade: the mark is
//!   created and the log rewritten as version 2.
//!
//! Writes are ordered so a crash never makes the mark claim more than the log holds: the
//! log is fsynced before the mark is written; before a compaction renames its new file the
//! mark names both files (fsynced), and only after the directory fsync the new one alone.
//! A torn write damages one slot only: the file has two slots (at 0 and 4096, so in
//! different sectors and pages), each write goes to the older one, and the newest slot
//! that authenticates wins. After each save the mark is written but not fsynced (that
//! would double the cost of a save); it is fsynced at creation, compaction, rekey and
//! when the store is dropped. After a power loss it may therefore lag the log by what the
//! kernel had not written back, which only narrows what it can detect.
//!
//! Slot: `"MOATMQHW" | nonce [12] | AES-256-GCM(counter u64 | current | next) + tag`,
//! each of `current`/`next` being `present u8 | file id [16] | records u64 | bytes u64`;
//! the associated data is a domain string of its own plus the slot index.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;

use crate::format::Format;
#[cfg(test)]
use crate::format::RETAINED;
use crate::log;
use crate::record::{FileId, FILE_ID_LEN, NONCE_LEN, TAG_LEN};
use crate::StoreError;

/// Name of the retained store's mark inside its directory.
#[cfg(test)]
pub(crate) const MARK_NAME: &str = RETAINED.mark_name;
const MAGIC: &[u8; 8] = b"MOATMQHW";
const VOUCH_LEN: usize = 1 + FILE_ID_LEN + 8 + 8;
const PLAIN_LEN: usize = 8 + 2 * VOUCH_LEN;
pub(crate) const SLOT_LEN: usize = MAGIC.len() + NONCE_LEN + PLAIN_LEN + TAG_LEN;
const SLOT_OFFSETS: [u64; 2] = [0, 4096];
const FILE_LEN: u64 = 4096 + SLOT_LEN as u64;

/// "The file with this id holds at least `records` records in its first `len` bytes."
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Vouch {
    pub(crate) file_id: FileId,
    pub(crate) records: u64,
    pub(crate) len: u64,
}

impl Vouch {
    /// What a mark says of a freshly written log.
    pub(crate) fn of(w: &log::Written) -> Vouch {
        Vouch {
            file_id: w.file_id,
            records: w.next_seq,
            len: w.len,
        }
    }
}

/// What the mark says: the log in place, and during a compaction the one replacing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Mark {
    pub(crate) current: Option<Vouch>,
    pub(crate) next: Option<Vouch>,
}

impl Mark {
    /// The vouch for the log with `file_id`, if the mark names it.
    pub(crate) fn vouch_for(&self, file_id: &FileId) -> Option<Vouch> {
        [self.current, self.next]
            .into_iter()
            .flatten()
            .find(|v| &v.file_id == file_id)
    }
}

/// The mark file, open for writing.
#[derive(Debug)]
pub(crate) struct MarkFile {
    pub(crate) path: PathBuf,
    fmt: &'static Format,
    file: File,
    counter: u64,
    /// Slot holding the newest valid mark; writes go to the other one.
    newest: usize,
}

/// A slot's associated data: the format's mark domain and the slot index (for the
/// retained store `moatmq-store-hwm | slot`).
fn aad(fmt: &Format, slot: usize) -> Vec<u8> {
    let mut a = Vec::with_capacity(fmt.mark_domain.len() + 1);
    a.extend_from_slice(fmt.mark_domain);
    a.push(slot as u8);
    a
}

fn encode_vouch(out: &mut Vec<u8>, v: Option<Vouch>) {
    let v = v.map_or((0u8, [0u8; FILE_ID_LEN], 0u64, 0u64), |v| {
        (1, v.file_id, v.records, v.len)
    });
    out.push(v.0);
    out.extend_from_slice(&v.1);
    out.extend_from_slice(&v.2.to_le_bytes());
    out.extend_from_slice(&v.3.to_le_bytes());
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

fn decode_vouch(b: &[u8]) -> Option<Option<Vouch>> {
    let mut file_id = [0u8; FILE_ID_LEN];
    file_id.copy_from_slice(&b[1..1 + FILE_ID_LEN]);
    let v = Vouch {
        file_id,
        records: u64_at(b, 1 + FILE_ID_LEN),
        len: u64_at(b, 1 + FILE_ID_LEN + 8),
    };
    match b[0] {
        0 => Some(None),
        1 => Some(Some(v)),
        _ => None,
    }
}

fn seal_slot(
    cipher: &Aes256Gcm,
    fmt: &Format,
    slot: usize,
    counter: u64,
    mark: &Mark,
) -> Result<Vec<u8>, StoreError> {
    let mut plain = Vec::with_capacity(PLAIN_LEN);
    plain.extend_from_slice(&counter.to_le_bytes());
    encode_vouch(&mut plain, mark.current);
    encode_vouch(&mut plain, mark.next);
    let mut nonce = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let ct = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: &plain,
                aad: &aad(fmt, slot),
            },
        )
        .map_err(|_| StoreError::Encode("high-water mark encryption failed".to_owned()))?;
    let mut out = Vec::with_capacity(SLOT_LEN);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    Ok(out)
}

fn open_slot(cipher: &Aes256Gcm, fmt: &Format, slot: usize, bytes: &[u8]) -> Option<(u64, Mark)> {
    if bytes.len() < SLOT_LEN || &bytes[..MAGIC.len()] != MAGIC {
        return None;
    }
    let nonce = &bytes[MAGIC.len()..MAGIC.len() + NONCE_LEN];
    let plain = cipher
        .decrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: &bytes[MAGIC.len() + NONCE_LEN..SLOT_LEN],
                aad: &aad(fmt, slot),
            },
        )
        .ok()?;
    if plain.len() != PLAIN_LEN {
        return None;
    }
    let mark = Mark {
        current: decode_vouch(&plain[8..8 + VOUCH_LEN])?,
        next: decode_vouch(&plain[8 + VOUCH_LEN..])?,
    };
    Some((u64_at(&plain, 0), mark))
}

/// What was found beside the log.
#[derive(Debug)]
pub(crate) enum Found {
    /// No mark file.
    Nothing,
    /// A mark file, but no slot authenticates under this key: damaged, or written under
    /// another key. Reported only once the log's header has shown the key is right.
    Unreadable,
    /// The newest valid mark.
    Mark(MarkFile, Mark),
}

/// Reads the retained store's mark in `dir`.
#[cfg(test)]
pub(crate) fn read(dir: &Path, cipher: &Aes256Gcm) -> Result<Found, StoreError> {
    read_in(dir, cipher, &RETAINED, true)
}

/// Reads the mark of a `fmt` log in `dir`, opened for writing too if `writable`.
pub(crate) fn read_in(
    dir: &Path,
    cipher: &Aes256Gcm,
    fmt: &'static Format,
    writable: bool,
) -> Result<Found, StoreError> {
    let path = dir.join(fmt.mark_name);
    let file = match OpenOptions::new().read(true).write(writable).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Found::Nothing),
        Err(e) => return Err(StoreError::io(&path, e)),
    };
    let mut bytes = Vec::new();
    // Bounded: a mark is FILE_LEN bytes; never slurp whatever was put in its place.
    (&file)
        .take(FILE_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| StoreError::io(&path, e))?;
    let mut best: Option<(usize, u64, Mark)> = None;
    if bytes.len() as u64 == FILE_LEN {
        for (slot, off) in SLOT_OFFSETS.iter().enumerate() {
            let off = *off as usize;
            if let Some((counter, mark)) = open_slot(cipher, fmt, slot, &bytes[off..off + SLOT_LEN])
            {
                if !matches!(&best, Some((_, c, _)) if *c >= counter) {
                    best = Some((slot, counter, mark));
                }
            }
        }
    }
    let Some((newest, counter, mark)) = best else {
        return Ok(Found::Unreadable);
    };
    Ok(Found::Mark(
        MarkFile {
            path,
            fmt,
            file,
            counter,
            newest,
        },
        mark,
    ))
}

impl MarkFile {
    /// Creates (or replaces) the mark in `dir` holding `mark` in both slots: written to a
    /// temporary file, fsynced, renamed into place, directory fsynced.
    pub(crate) fn create(
        dir: &Path,
        cipher: &Aes256Gcm,
        fmt: &'static Format,
        mark: &Mark,
    ) -> Result<MarkFile, StoreError> {
        let path = dir.join(fmt.mark_name);
        let tmp = dir.join(format!("{}-hwm", fmt.tmp_prefix));
        let io = |e| StoreError::io(&tmp, e);
        let file = log::fresh_private_file(&tmp)?;
        file.set_len(FILE_LEN).map_err(io)?;
        for (slot, off) in SLOT_OFFSETS.iter().enumerate() {
            // Slot 1 gets the higher counter, so the next write goes to slot 0.
            let bytes = seal_slot(cipher, fmt, slot, slot as u64, mark)?;
            file.write_all_at(&bytes, *off).map_err(io)?;
        }
        file.sync_all().map_err(io)?;
        if let Err(e) = log::install(&tmp, &path, dir) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(MarkFile {
            path,
            fmt,
            file,
            counter: 1,
            newest: 1,
        })
    }

    /// Writes `mark` into the older slot, sealed with `cipher`, and fsyncs it if `sync`.
    /// The newest slot stays as it was until the next write, so a torn write (or a crash
    /// in a rekey, whose new slot the old key cannot open) leaves the previous mark.
    pub(crate) fn write(
        &mut self,
        cipher: &Aes256Gcm,
        mark: &Mark,
        sync: bool,
    ) -> Result<(), StoreError> {
        let slot = 1 - self.newest;
        let counter = self.counter + 1;
        let bytes = seal_slot(cipher, self.fmt, slot, counter, mark)?;
        self.file
            .write_all_at(&bytes, SLOT_OFFSETS[slot])
            .and_then(|()| if sync { self.file.sync_data() } else { Ok(()) })
            .map_err(|e| StoreError::io(&self.path, e))?;
        self.counter = counter;
        self.newest = slot;
        Ok(())
    }

    /// Forces what was written to disk.
    pub(crate) fn sync(&self) -> Result<(), StoreError> {
        self.file
            .sync_data()
            .map_err(|e| StoreError::io(&self.path, e))
    }
}
