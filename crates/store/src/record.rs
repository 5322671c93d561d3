//! On-disk framing and sealing. A log file is a header followed by frames:
//!
//! ```text
//! header: "MOATMQRS" | version u32 LE | file id [16] | nonce [12] | tag [16]   (56 bytes)
//! frame:  len u32 LE | !len u32 LE | nonce [12] | ciphertext+tag [len]
//! ```
//!
//! The header's tag seals an empty plaintext under the key with the magic, version and
//! file id as associated data: if it fails the key is wrong (or the header was altered),
//! which is reported before any record is looked at. A record's associated data is the
//! file id, its sequence number (0-based, consecutive) and its length, so it only opens at
//! its own position in its own file. The length is stored twice (plain and inverted) so a
//! damaged length field is detected instead of being mistaken for a torn tail.
//! Every encryption uses a fresh random 96-bit nonce.

use aes_gcm::aead::{Aead, AeadInPlace, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::format::{Format, RETAINED};
use crate::{RetainedKey, RetainedMessage, StoreError};

/// File magic of the retained store.
pub(crate) const MAGIC: &[u8; 8] = RETAINED.magic;
/// Format version written. Version 2 files are always paired with a high-water mark
/// (`mark.rs`); version 1 files (written before it existed) are still read, and rewritten
/// as version 2 on open. The version is bound into the header's tag, so it cannot be
/// changed without the key.
pub(crate) const VERSION: u32 = RETAINED.version;
/// Random per-file id length.
pub(crate) const FILE_ID_LEN: usize = 16;
/// AES-GCM nonce length.
pub(crate) const NONCE_LEN: usize = 12;
/// AES-GCM tag length.
pub(crate) const TAG_LEN: usize = 16;
/// Header length.
pub(crate) const HEADER_LEN: usize = 8 + 4 + FILE_ID_LEN + NONCE_LEN + TAG_LEN;
/// Frame prefix: length and inverted length.
pub(crate) const PREFIX_LEN: usize = 8;
/// Largest ciphertext accepted (MQTT packets top out at 256 MiB).
pub(crate) const MAX_CIPHERTEXT_LEN: u32 = 512 << 20;

/// A file's random identity, bound into every record of that file.
pub(crate) type FileId = [u8; FILE_ID_LEN];

/// Plaintext record as written (borrowing, so flushing does not clone messages).
/// Variants are encoded by position: new ones go at the end so older files still read.
#[derive(Serialize)]
pub(crate) enum RecordRef<'a> {
    /// A message without an owner (written before owners were kept, or by tools).
    Set(&'a RetainedMessage),
    Clear(&'a str),
    /// A message and the identity that published it (`RetainedMessage::owner`).
    SetOwned(&'a RetainedMessage, &'a str),
}

impl<'a> RecordRef<'a> {
    /// The record that stores `msg`, with its owner when it has one.
    pub(crate) fn set(msg: &'a RetainedMessage) -> RecordRef<'a> {
        match &msg.owner {
            Some(owner) => RecordRef::SetOwned(msg, owner),
            None => RecordRef::Set(msg),
        }
    }
}

/// Plaintext record as read back; same encoding as [`RecordRef`].
#[derive(Deserialize, Debug)]
pub(crate) enum Record {
    Set(RetainedMessage),
    Clear(String),
    SetOwned(RetainedMessage, String),
}

impl Record {
    /// A `Set`/`SetOwned` as its message (owner filled in); `Clear` as its topic.
    pub(crate) fn into_change(self) -> Result<RetainedMessage, String> {
        match self {
            Record::Set(m) => Ok(m),
            Record::SetOwned(mut m, owner) => {
                m.owner = Some(owner);
                Ok(m)
            }
            Record::Clear(topic) => Err(topic),
        }
    }
}

/// Bytes one frame holding `msg` takes in the log: the encoded record (topic, payload,
/// properties, expiry, owner) plus the frame's length prefix, nonce and tag.
pub(crate) fn frame_bytes(msg: &RetainedMessage) -> u64 {
    let plain = postcard::experimental::serialized_size(&RecordRef::set(msg)).unwrap_or(usize::MAX);
    (plain as u64).saturating_add((PREFIX_LEN + NONCE_LEN + TAG_LEN) as u64)
}

/// Why a frame failed to open.
#[derive(Debug)]
pub(crate) enum OpenError {
    /// Authentication failed: tampered, misplaced, or another key.
    Auth,
    /// Authenticated, but the plaintext is not a valid record.
    Decode(String),
}

/// Builds the cipher for a key.
pub(crate) fn cipher(key: &RetainedKey) -> Aes256Gcm {
    Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(key.expose_secret()))
}

pub(crate) fn random_file_id() -> FileId {
    let mut id = [0u8; FILE_ID_LEN];
    rand::rngs::OsRng.fill_bytes(&mut id);
    id
}

/// A nonce never used before with any key in this process, and with overwhelming
/// probability in no other: a random 96-bit base drawn once per process (from the OS),
/// with a process-wide counter added into its low 64 bits. Unlike a fresh random nonce
/// per record it costs no system call, and it has no birthday bound: random 96-bit
/// nonces are good for about 2^32 records per key (NIST SP 800-38D), which a busy
/// session log would pass within days.
pub(crate) fn fresh_nonce() -> [u8; NONCE_LEN] {
    static BASE: std::sync::OnceLock<[u8; NONCE_LEN]> = std::sync::OnceLock::new();
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut n = *BASE.get_or_init(|| {
        let mut b = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut b);
        b
    });
    let count = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (_, low) = n.split_at_mut(NONCE_LEN - 8);
    let sum = u64::from_be_bytes(low.try_into().unwrap_or_default()).wrapping_add(count);
    low.copy_from_slice(&sum.to_be_bytes());
    n
}

#[cfg(test)]
#[test]
fn nonces_do_not_repeat() {
    let mut seen = std::collections::HashSet::new();
    for _ in 0..10_000 {
        assert!(seen.insert(fresh_nonce()));
    }
}

#[cfg(test)]
pub(crate) fn header_aad(version: u32, file_id: &FileId) -> Vec<u8> {
    header_aad_in(&RETAINED, version, file_id)
}

/// The header's associated data; the magic tells the kinds of log apart.
fn header_aad_in(fmt: &Format, version: u32, file_id: &FileId) -> Vec<u8> {
    let mut aad = Vec::with_capacity(32);
    aad.extend_from_slice(b"moatmq-store-header");
    aad.extend_from_slice(fmt.magic);
    aad.extend_from_slice(&version.to_le_bytes());
    aad.extend_from_slice(file_id);
    aad
}

/// A record's associated data: the format's domain, the file id, its sequence number and
/// its length (for the retained store: `moatmq-store-record | id | seq | len`).
fn record_aad(fmt: &Format, file_id: &FileId, seq: u64, len: u32) -> Vec<u8> {
    let mut aad = Vec::with_capacity(fmt.record_domain.len() + FILE_ID_LEN + 12);
    aad.extend_from_slice(fmt.record_domain);
    aad.extend_from_slice(file_id);
    aad.extend_from_slice(&seq.to_le_bytes());
    aad.extend_from_slice(&len.to_le_bytes());
    aad
}

/// The header for a new file with id `file_id`.
pub(crate) fn seal_header(
    cipher: &Aes256Gcm,
    fmt: &Format,
    file_id: &FileId,
) -> Result<Vec<u8>, StoreError> {
    let nonce = fresh_nonce();
    let tag = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: &[],
                aad: &header_aad_in(fmt, fmt.version, file_id),
            },
        )
        .map_err(|_| StoreError::Encode("header encryption failed".to_owned()))?;
    let mut out = Vec::with_capacity(HEADER_LEN);
    out.extend_from_slice(fmt.magic);
    out.extend_from_slice(&fmt.version.to_le_bytes());
    out.extend_from_slice(file_id);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&tag);
    Ok(out)
}

/// Why a header was refused.
#[derive(Debug)]
pub(crate) enum HeaderError {
    /// Not a store file or unknown version: the reason.
    Format(&'static str),
    /// The key check failed.
    KeyCheck,
}

/// Checks a header of a `fmt` log and returns its file id and format version.
pub(crate) fn open_header_in(
    cipher: &Aes256Gcm,
    fmt: &Format,
    header: &[u8; HEADER_LEN],
) -> Result<(FileId, u32), HeaderError> {
    if &header[..8] != fmt.magic {
        return Err(HeaderError::Format(if fmt.magic == MAGIC {
            "not a moatmq retained store (bad magic)"
        } else {
            "not a moatmq session store (bad magic)"
        }));
    }
    let mut version = [0u8; 4];
    version.copy_from_slice(&header[8..12]);
    let version = u32::from_le_bytes(version);
    if !(fmt.min_version..=fmt.version).contains(&version) {
        return Err(HeaderError::Format("unsupported store format version"));
    }
    let mut file_id = [0u8; FILE_ID_LEN];
    file_id.copy_from_slice(&header[12..12 + FILE_ID_LEN]);
    let nonce = &header[12 + FILE_ID_LEN..12 + FILE_ID_LEN + NONCE_LEN];
    let tag = &header[12 + FILE_ID_LEN + NONCE_LEN..];
    cipher
        .decrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: tag,
                aad: &header_aad_in(fmt, version, &file_id),
            },
        )
        .map_err(|_| HeaderError::KeyCheck)?;
    Ok((file_id, version))
}

/// A record's plaintext (postcard), in memory that is zeroed on drop.
pub(crate) fn encode(record: &impl Serialize) -> Result<zeroize::Zeroizing<Vec<u8>>, StoreError> {
    Ok(zeroize::Zeroizing::new(
        postcard::to_stdvec(record).map_err(|e| StoreError::Encode(e.to_string()))?,
    ))
}

/// Plaintexts of records not yet written, back to back in one buffer that is zeroed
/// when cleared or dropped: encoding a record allocates nothing once the buffer has
/// grown to a commit's size.
#[derive(Default)]
pub(crate) struct Pending {
    buf: zeroize::Zeroizing<Vec<u8>>,
    /// Where each record ends in `buf`.
    ends: Vec<usize>,
    /// Records taken back before their commit ([`Pending::kill`]): not written.
    dead: Vec<bool>,
    /// Records not dead.
    live: usize,
}

/// Lets postcard encode into the end of a borrowed buffer.
struct Tail<'a>(&'a mut Vec<u8>);

impl Extend<u8> for Tail<'_> {
    fn extend<I: IntoIterator<Item = u8>>(&mut self, iter: I) {
        self.0.extend(iter);
    }
}

impl Pending {
    /// Encodes `record` after the others; returns its plaintext length.
    pub(crate) fn push(&mut self, record: &impl Serialize) -> Result<usize, StoreError> {
        let start = self.buf.len();
        if let Err(e) = postcard::to_extend(record, Tail(&mut self.buf)) {
            self.buf.truncate(start);
            return Err(StoreError::Encode(e.to_string()));
        }
        self.ends.push(self.buf.len());
        self.dead.push(false);
        self.live += 1;
        Ok(self.buf.len() - start)
    }

    /// Where record `i` is in `buf`.
    fn span(&self, i: usize) -> std::ops::Range<usize> {
        let start = i.checked_sub(1).map_or(0, |p| self.ends[p]);
        start..self.ends[i]
    }

    /// Takes back the last record pushed; returns its plaintext length (0 if it was
    /// dead already).
    pub(crate) fn pop(&mut self) -> Option<usize> {
        let span = self.span(self.ends.len().checked_sub(1)?);
        self.ends.pop();
        if self.dead.pop() == Some(false) {
            self.live -= 1;
        }
        zeroize::Zeroize::zeroize(&mut self.buf[span.start..]);
        self.buf.truncate(span.start);
        Some(span.len())
    }

    /// Index the next record pushed will have.
    pub(crate) fn next_index(&self) -> usize {
        self.ends.len()
    }

    /// Drops record `i` (a change undone before it was written: a message acknowledged
    /// within the commit that would have stored it), zeroing its plaintext; returns its
    /// plaintext length, or `None` if there is no such record or it was dropped already.
    pub(crate) fn kill(&mut self, i: usize) -> Option<usize> {
        if !std::mem::replace(self.dead.get_mut(i)?, true) {
            self.live -= 1;
            let span = self.span(i);
            let len = span.len();
            zeroize::Zeroize::zeroize(&mut self.buf[span]);
            return Some(len);
        }
        None
    }

    /// The plaintexts of the records not dropped, in order.
    pub(crate) fn records(&self) -> impl ExactSizeIterator<Item = &[u8]> + '_ {
        Live {
            pending: self,
            next: 0,
            left: self.live,
        }
    }

    /// Records not dropped.
    pub(crate) fn len(&self) -> usize {
        self.live
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Forgets every record, zeroing their plaintext (the buffer's capacity is kept).
    pub(crate) fn clear(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.buf[..]);
        self.buf.clear();
        self.ends.clear();
        self.dead.clear();
        self.live = 0;
    }
}

/// [`Pending::records`]: the live records, in order.
struct Live<'a> {
    pending: &'a Pending,
    next: usize,
    left: usize,
}

impl<'a> Iterator for Live<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let p = self.pending;
        while self.next < p.ends.len() {
            let i = self.next;
            self.next += 1;
            if !p.dead[i] {
                self.left -= 1;
                return Some(&p.buf[p.span(i)]);
            }
        }
        None
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl ExactSizeIterator for Live<'_> {}

/// Seals a record's plaintext as a complete frame at position `seq` of a `fmt` file,
/// appended to `out` and sealed in place: a commit seals all its records into one buffer
/// without a buffer per record.
pub(crate) fn seal_plain_into(
    cipher: &Aes256Gcm,
    fmt: &Format,
    file_id: &FileId,
    seq: u64,
    plain: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), StoreError> {
    let ct_len = plain.len() + TAG_LEN;
    let len = u32::try_from(ct_len)
        .ok()
        .filter(|l| *l <= MAX_CIPHERTEXT_LEN)
        .ok_or_else(|| StoreError::Encode(format!("record of {ct_len} bytes is too large")))?;
    let nonce = fresh_nonce();
    out.extend_from_slice(&encode_prefix(len));
    out.extend_from_slice(&nonce);
    let start = out.len();
    out.extend_from_slice(plain);
    let aad = record_aad(fmt, file_id, seq, len);
    let tag = cipher
        .encrypt_in_place_detached(Nonce::from_slice(&nonce), &aad, &mut out[start..])
        .map_err(|_| StoreError::Encode("record encryption failed".to_owned()))?;
    out.extend_from_slice(&tag);
    Ok(())
}

/// Plaintext bytes after which a batch frame is sealed and the next record begins a new
/// one (so a batch ends within one record past this). Sealing is cheaper per byte in
/// long runs than per record (AES-GCM's per-call cost is about that of 150 bytes here),
/// and a frame's length prefix, nonce and tag are paid once per batch.
pub(crate) const BATCH_PLAIN: usize = 64 << 10;

/// Seals record plaintexts as frames appended to a buffer: each as its own frame, or for
/// a format version that batches ([`Format::batches`]) several to a frame, each
/// preceded by its length (a postcard `u32`), up to [`BATCH_PLAIN`] bytes. A batch is
/// sealed in place once full and by [`Framer::finish`]; until then its plaintext is in
/// the buffer, which is zeroed from the frame's start if sealing fails.
pub(crate) struct Framer<'c> {
    cipher: &'c Aes256Gcm,
    fmt: &'c Format,
    file_id: FileId,
    batched: bool,
    /// Position of the next frame sealed.
    pub(crate) seq: u64,
    /// Where the batch being filled starts in the buffer.
    open: Option<usize>,
}

impl<'c> Framer<'c> {
    pub(crate) fn new(
        cipher: &'c Aes256Gcm,
        fmt: &'c Format,
        version: u32,
        file_id: &FileId,
        seq: u64,
    ) -> Framer<'c> {
        Framer {
            cipher,
            fmt,
            file_id: *file_id,
            batched: fmt.batches(version),
            seq,
            open: None,
        }
    }

    /// Adds one record's plaintext to `out`.
    pub(crate) fn push(&mut self, plain: &[u8], out: &mut Vec<u8>) -> Result<(), StoreError> {
        if !self.batched {
            seal_plain_into(self.cipher, self.fmt, &self.file_id, self.seq, plain, out)?;
            self.seq += 1;
            return Ok(());
        }
        let len = u32::try_from(plain.len())
            .ok()
            .filter(|l| *l <= MAX_CIPHERTEXT_LEN)
            .ok_or_else(|| {
                StoreError::Encode(format!("record of {} bytes is too large", plain.len()))
            })?;
        if let Some(start) = self.open {
            if out.len() - start - PREFIX_LEN - NONCE_LEN >= BATCH_PLAIN {
                self.finish(out)?;
            }
        }
        if self.open.is_none() {
            self.open = Some(out.len());
            out.extend_from_slice(&[0; PREFIX_LEN + NONCE_LEN]);
        }
        postcard::to_extend(&len, Tail(out)).map_err(|e| StoreError::Encode(e.to_string()))?;
        out.extend_from_slice(plain);
        Ok(())
    }

    /// Seals the batch being filled, if any.
    pub(crate) fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), StoreError> {
        let Some(start) = self.open.take() else {
            return Ok(());
        };
        let res = self.seal_batch(start, out);
        if res.is_err() {
            zeroize::Zeroize::zeroize(&mut out[start..]);
            out.truncate(start);
        }
        res
    }

    fn seal_batch(&mut self, start: usize, out: &mut Vec<u8>) -> Result<(), StoreError> {
        let body = start + PREFIX_LEN + NONCE_LEN;
        let ct_len = out.len() - body + TAG_LEN;
        let len = u32::try_from(ct_len)
            .ok()
            .filter(|l| *l <= MAX_CIPHERTEXT_LEN)
            .ok_or_else(|| StoreError::Encode(format!("batch of {ct_len} bytes is too large")))?;
        let nonce = fresh_nonce();
        out[start..start + PREFIX_LEN].copy_from_slice(&encode_prefix(len));
        out[start + PREFIX_LEN..body].copy_from_slice(&nonce);
        let aad = record_aad(self.fmt, &self.file_id, self.seq, len);
        let tag = self
            .cipher
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), &aad, &mut out[body..])
            .map_err(|_| StoreError::Encode("record encryption failed".to_owned()))?;
        out.extend_from_slice(&tag);
        self.seq += 1;
        Ok(())
    }
}

/// Hands each record of a batch frame's plaintext to `on_record`, with the bytes it takes
/// in the batch (its length prefix included).
pub(crate) fn split_batch(
    mut plain: &[u8],
    mut on_record: impl FnMut(&[u8], u64) -> Result<(), OpenError>,
) -> Result<(), OpenError> {
    if plain.is_empty() {
        return Err(OpenError::Decode("empty batch".to_owned()));
    }
    while !plain.is_empty() {
        let (len, rest): (u32, &[u8]) = postcard::take_from_bytes(plain)
            .map_err(|e| OpenError::Decode(format!("batch: record length: {e}")))?;
        let len = len as usize;
        if len > rest.len() {
            return Err(OpenError::Decode(
                "batch: a record runs past the end of its frame".to_owned(),
            ));
        }
        let taken = (plain.len() - rest.len() + len) as u64;
        on_record(&rest[..len], taken)?;
        plain = &rest[len..];
    }
    Ok(())
}

/// Bytes a record of `plain_len` bytes takes in a batch: its length prefix and itself.
pub(crate) fn batched_len(plain_len: usize) -> u64 {
    let prefix = postcard::experimental::serialized_size(&(plain_len as u32)).unwrap_or(5);
    (prefix + plain_len) as u64
}

/// The 8-byte frame prefix for a ciphertext of `len` bytes.
pub(crate) fn encode_prefix(len: u32) -> [u8; PREFIX_LEN] {
    let mut p = [0u8; PREFIX_LEN];
    p[..4].copy_from_slice(&len.to_le_bytes());
    p[4..].copy_from_slice(&(!len).to_le_bytes());
    p
}

/// The ciphertext length a prefix announces, or `None` if the prefix is damaged.
pub(crate) fn decode_prefix(p: &[u8; PREFIX_LEN]) -> Option<u32> {
    let mut a = [0u8; 4];
    let mut b = [0u8; 4];
    a.copy_from_slice(&p[..4]);
    b.copy_from_slice(&p[4..]);
    let len = u32::from_le_bytes(a);
    (len == !u32::from_le_bytes(b)).then_some(len)
}

/// Opens a retained frame body (`nonce | ciphertext`) read at position `seq`.
#[cfg(test)]
pub(crate) fn open_record(
    cipher: &Aes256Gcm,
    file_id: &FileId,
    seq: u64,
    len: u32,
    body: &[u8],
) -> Result<Record, OpenError> {
    let plain = open_plain(cipher, &RETAINED, file_id, seq, len, body)?;
    decode_record(&plain)
}

/// Opens a frame body (`nonce | ciphertext`) read at position `seq` of a `fmt` file and
/// returns its plaintext.
pub(crate) fn open_plain(
    cipher: &Aes256Gcm,
    fmt: &Format,
    file_id: &FileId,
    seq: u64,
    len: u32,
    body: &[u8],
) -> Result<zeroize::Zeroizing<Vec<u8>>, OpenError> {
    if body.len() < NONCE_LEN + TAG_LEN {
        return Err(OpenError::Auth);
    }
    let (nonce, ct) = body.split_at(NONCE_LEN);
    Ok(zeroize::Zeroizing::new(
        cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: &record_aad(fmt, file_id, seq, len),
                },
            )
            .map_err(|_| OpenError::Auth)?,
    ))
}

/// Decodes a whole plaintext as one value; trailing bytes are an error.
pub(crate) fn decode_exact<'de, T: Deserialize<'de>>(plain: &'de [u8]) -> Result<T, OpenError> {
    let (value, rest): (T, &[u8]) =
        postcard::take_from_bytes(plain).map_err(|e| OpenError::Decode(e.to_string()))?;
    if !rest.is_empty() {
        return Err(OpenError::Decode("trailing bytes after record".to_owned()));
    }
    Ok(value)
}

/// Decodes a retained record's plaintext.
pub(crate) fn decode_record(plain: &[u8]) -> Result<Record, OpenError> {
    let record: Record = decode_exact(plain)?;
    if let Record::Set(m) | Record::SetOwned(m, _) = &record {
        if m.qos > 2 {
            return Err(OpenError::Decode(format!("invalid qos {}", m.qos)));
        }
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::Pending;

    #[test]
    fn pending_keeps_records_in_order_and_takes_back_the_last() {
        let mut p = Pending::default();
        assert_eq!(p.push(&(1u8, "a".to_owned())).unwrap(), 3);
        p.push(&vec![7u8; 300]).unwrap();
        let gone = p.push(&"gone").unwrap();
        assert_eq!(p.pop(), Some(gone));
        let records: Vec<Vec<u8>> = p.records().map(<[u8]>::to_vec).collect();
        assert_eq!(records.len(), p.len());
        assert_eq!(records[0], postcard::to_stdvec(&(1u8, "a")).unwrap());
        assert_eq!(records[1], postcard::to_stdvec(&vec![7u8; 300]).unwrap());
        p.clear();
        assert!(p.is_empty() && p.records().next().is_none());
        assert_eq!(p.pop(), None);
        assert!(p.is_empty());
    }
}
