//! Reading a log file back (verifying every frame, in order) and writing a fresh log
//! file (header plus one record per live item) for creation, compaction and rekey; the
//! same code for every kind of log (`format.rs`), with the retained store's wrappers.
//! A frame is "torn" only when it runs past end-of-file, or when everything from its
//! start to end-of-file is zero bytes (a file extended by a crash before its data
//! landed), and only past the records the high-water mark requires: a torn frame, zero
//! bytes or end-of-file before that is [`StoreError::Truncated`]. Anything else that fails
//! is an error naming the record or offset.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aes_gcm::Aes256Gcm;
use zeroize::Zeroizing;

use crate::format::{Format, RETAINED};
use crate::record::{self, FileId, OpenError, RecordRef, HEADER_LEN, NONCE_LEN};
use crate::record::{HeaderError, MAX_CIPHERTEXT_LEN, PREFIX_LEN, TAG_LEN};
use crate::set::{Item, Items};
use crate::{RetainedMessage, StoreError};

/// Creates `path` anew (a leftover from a crash is removed first), readable and
/// writable by the owner only.
pub(crate) fn fresh_private_file(path: &Path) -> Result<File, StoreError> {
    let io = |e| StoreError::io(path, e);
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io)
}

/// What [`read_frames`] found besides the records.
#[derive(Debug)]
pub(crate) struct Frames {
    pub(crate) file_id: FileId,
    /// Format version of the file's header.
    pub(crate) version: u32,
    pub(crate) next_seq: u64,
    /// Length of the verified prefix of the file; less than its size if the tail was torn.
    pub(crate) good_len: u64,
}

/// What the high-water mark requires of a log: at least `records` records.
#[derive(Debug)]
pub(crate) struct Required {
    pub(crate) records: u64,
    /// The mark file, named in errors.
    pub(crate) mark: PathBuf,
}

fn corrupt(file: &Path, offset: u64, reason: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        file: file.to_owned(),
        offset,
        reason: reason.into(),
    }
}

/// Reads up to `buf.len()` bytes, fewer only at end of input.
fn read_full(r: &mut impl Read, buf: &mut [u8], file: &Path) -> Result<usize, StoreError> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(StoreError::io(file, e)),
        }
    }
    Ok(n)
}

/// Whether the rest of the input is all zero bytes.
fn rest_is_zero(r: &mut impl Read, file: &Path) -> Result<bool, StoreError> {
    let mut buf = [0u8; 8192];
    loop {
        let n = read_full(r, &mut buf, file)?;
        if buf[..n].iter().any(|b| *b != 0) {
            return Ok(false);
        }
        if n < buf.len() {
            return Ok(true);
        }
    }
}

/// Replays one retained record into `live`.
pub(crate) fn apply_retained(live: &mut Items, plain: &[u8]) -> Result<(), OpenError> {
    match record::decode_record(plain)?.into_change() {
        Ok(msg) => {
            live.replace(Item(Arc::new(msg)));
        }
        Err(topic) => {
            live.remove(topic.as_str());
        }
    }
    Ok(())
}

/// Reads and verifies a whole retained log of `file_len` bytes and returns its live
/// messages; messages expired at `now` are dropped. See [`read_frames`].
pub(crate) fn read_log(
    r: impl Read,
    file_len: u64,
    cipher: &Aes256Gcm,
    file: &Path,
    now: u64,
    required: impl FnOnce(&FileId, u32) -> Result<Option<Required>, StoreError>,
) -> Result<Items, StoreError> {
    let mut live = Items::new();
    read_frames(
        r,
        file_len,
        cipher,
        &RETAINED,
        file,
        required,
        |plain, _| apply_retained(&mut live, plain),
    )?;
    live.retain(|item| !item.0.is_expired(now));
    Ok(live)
}

/// Reads and verifies a whole `fmt` log of `file_len` bytes, handing each record's
/// plaintext and the bytes it takes (its frame's length; in a batch, its length prefix
/// and itself) to `on_record` in order. Errors name the frame (`record N`, counted from
/// 0), which in a batching format holds several records. `file` only names the file
/// in errors. Once the header is verified, `required` is asked (with the file id and
/// version) how many records must be present; it may refuse the file instead.
pub(crate) fn read_frames(
    mut r: impl Read,
    file_len: u64,
    cipher: &Aes256Gcm,
    fmt: &Format,
    file: &Path,
    required: impl FnOnce(&FileId, u32) -> Result<Option<Required>, StoreError>,
    mut on_record: impl FnMut(&[u8], u64) -> Result<(), OpenError>,
) -> Result<Frames, StoreError> {
    let mut header = [0u8; HEADER_LEN];
    if read_full(&mut r, &mut header, file)? < HEADER_LEN {
        return Err(corrupt(file, 0, "file is shorter than the store header"));
    }
    let (file_id, version) = record::open_header_in(cipher, fmt, &header).map_err(|e| match e {
        HeaderError::Format(reason) => corrupt(file, 0, reason),
        HeaderError::KeyCheck => StoreError::WrongKey {
            file: file.to_owned(),
        },
    })?;
    let required = required(&file_id, version)?;
    // The end of the records: fine past what the mark requires, truncation before it.
    let end = |seq: u64, offset: u64, found: &'static str| match &required {
        Some(req) if seq < req.records => Err(StoreError::Truncated {
            file: file.to_owned(),
            mark: req.mark.clone(),
            missing: req.records - seq,
            offset,
            file_len,
            expected: seq,
            found,
            required: req.records,
        }),
        _ => {
            if found != "end of file" {
                torn(fmt, file, offset, seq);
            }
            Ok(())
        }
    };
    let mut offset = HEADER_LEN as u64;
    let mut seq = 0u64;
    let mut body = Vec::new();
    loop {
        let mut prefix = [0u8; PREFIX_LEN];
        let got = read_full(&mut r, &mut prefix, file)?;
        if got == 0 {
            end(seq, offset, "end of file")?;
            break;
        }
        if got < PREFIX_LEN {
            end(seq, offset, "a torn record")?;
            break;
        }
        let Some(len) = record::decode_prefix(&prefix) else {
            if prefix.iter().all(|b| *b == 0) && rest_is_zero(&mut r, file)? {
                end(seq, offset, "zero bytes")?;
                break;
            }
            return Err(corrupt(
                file,
                offset,
                format!("record {seq}: damaged length prefix"),
            ));
        };
        let frame_len = (PREFIX_LEN + NONCE_LEN) as u64 + u64::from(len);
        if offset.saturating_add(frame_len) > file_len {
            end(seq, offset, "a torn record")?;
            break;
        }
        if len > MAX_CIPHERTEXT_LEN || (len as usize) < TAG_LEN {
            return Err(corrupt(
                file,
                offset,
                format!("record {seq}: impossible length {len}"),
            ));
        }
        body.resize(NONCE_LEN + len as usize, 0);
        if read_full(&mut r, &mut body, file)? < body.len() {
            // The file shrank while we read it, or `file_len` was wrong: same as torn.
            end(seq, offset, "a torn record")?;
            break;
        }
        let batched = fmt.batches(version);
        let opened = record::open_plain(cipher, fmt, &file_id, seq, len, &body).and_then(|plain| {
            if batched {
                record::split_batch(&plain, &mut on_record)
            } else {
                on_record(&plain, frame_len)
            }
        });
        match opened {
            Ok(()) => {}
            Err(OpenError::Auth) => {
                return Err(StoreError::WrongKeyOrTampered {
                    file: file.to_owned(),
                    record: seq,
                })
            }
            Err(OpenError::Decode(reason)) => {
                return Err(corrupt(file, offset, format!("record {seq}: {reason}")))
            }
        }
        offset += frame_len;
        seq += 1;
    }
    Ok(Frames {
        file_id,
        version,
        next_seq: seq,
        good_len: offset,
    })
}

fn torn(fmt: &Format, file: &Path, offset: u64, seq: u64) {
    tracing::warn!(
        file = %file.display(),
        offset,
        record = seq,
        "{} ends in a torn record (crash during a save); dropping it",
        fmt.what
    );
}

/// A freshly written, fsynced log file not yet renamed into place.
#[derive(Debug)]
pub(crate) struct Written {
    pub(crate) file: File,
    pub(crate) tmp_path: PathBuf,
    pub(crate) file_id: FileId,
    pub(crate) next_seq: u64,
    pub(crate) len: u64,
    /// Records written (more than frames in a batching format).
    pub(crate) records: usize,
}

/// Logs are sealed and written in chunks of about this size.
pub(crate) const WRITE_CHUNK: usize = 1 << 20;

/// Writes `tmp_path` (replacing a stale one) as a retained log with a new file id and
/// one `Set` per message, then fsyncs it.
pub(crate) fn write_fresh<'a>(
    tmp_path: &Path,
    cipher: &Aes256Gcm,
    messages: impl Iterator<Item = &'a RetainedMessage>,
) -> Result<Written, StoreError> {
    write_fresh_plain(
        tmp_path,
        cipher,
        &RETAINED,
        messages.map(|m| record::encode(&RecordRef::set(m))),
    )
}

/// Writes `tmp_path` (replacing a stale one) as a `fmt` log with a new file id holding
/// the given record plaintexts, then fsyncs it.
pub(crate) fn write_fresh_plain(
    tmp_path: &Path,
    cipher: &Aes256Gcm,
    fmt: &Format,
    records: impl Iterator<Item = Result<Zeroizing<Vec<u8>>, StoreError>>,
) -> Result<Written, StoreError> {
    let io = |e| StoreError::io(tmp_path, e);
    let file = fresh_private_file(tmp_path)?;
    let file_id = record::random_file_id();
    let mut w = BufWriter::with_capacity(1 << 20, &file);
    let header = record::seal_header(cipher, fmt, &file_id)?;
    w.write_all(&header).map_err(io)?;
    let mut len = header.len() as u64;
    let mut framer = record::Framer::new(cipher, fmt, fmt.version, &file_id, 0);
    let mut buf = Vec::new();
    let mut count = 0usize;
    for plain in records {
        framer.push(&plain?, &mut buf)?;
        count += 1;
        if buf.len() >= WRITE_CHUNK {
            framer.finish(&mut buf)?;
            w.write_all(&buf).map_err(io)?;
            len += buf.len() as u64;
            buf.clear();
        }
    }
    framer.finish(&mut buf)?;
    w.write_all(&buf).map_err(io)?;
    len += buf.len() as u64;
    w.flush().map_err(io)?;
    drop(w);
    file.sync_all().map_err(io)?;
    Ok(Written {
        file,
        tmp_path: tmp_path.to_owned(),
        file_id,
        next_seq: framer.seq,
        len,
        records: count,
    })
}

/// Renames `from` over `to` and fsyncs their directory so the rename survives a crash.
pub(crate) fn install(from: &Path, to: &Path, dir: &Path) -> Result<(), StoreError> {
    std::fs::rename(from, to).map_err(|e| StoreError::io(to, e))?;
    sync_dir(dir)
}

/// Fsyncs a directory (makes creations and renames in it durable).
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io(dir, e))
}
