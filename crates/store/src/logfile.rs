//! An open log of any kind (`format.rs`) with its high-water mark: how it is opened and
//! checked, appended to and rewritten. The retained store opens through here; the
//! session store uses all of it.
//!
//! Opening decides as the crate doc says: the header's key check, every record's
//! authentication in order, then the mark's vouch for this file id (at least that many
//! records; a file it does not name is rolled back; no mark beside a log written by a
//! version that always keeps one is refused); a torn tail past the mark is cut with a
//! warning. Writes keep the mark's order: the log is fsynced before the mark claims it,
//! and around a rename the mark names both files until the directory fsync is done.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::BufReader;
use std::os::unix::fs::{DirBuilderExt, FileExt};
use std::path::{Path, PathBuf};

use aes_gcm::Aes256Gcm;
use zeroize::Zeroizing;

use crate::format::Format;
use crate::log::{self, Frames, Required, Written};
use crate::mark::{self, Found, Mark, MarkFile, Vouch};
use crate::record::{self, FileId, OpenError};
use crate::{RetainedKey, StoreError};

/// How [`LogFile::open`] treats what the high-water mark says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Trust {
    /// Refuse a log the mark does not vouch for (normal start).
    Checked,
    /// Take the log as it is and rewrite the mark to match (`moatmq retained accept`).
    AsIs,
}

/// An open, verified log and its mark.
pub(crate) struct LogFile {
    pub(crate) fmt: &'static Format,
    pub(crate) dir: PathBuf,
    pub(crate) log_path: PathBuf,
    pub(crate) cipher: Aes256Gcm,
    pub(crate) file: File,
    pub(crate) file_id: FileId,
    /// Format version of the file as opened.
    pub(crate) version: u32,
    pub(crate) next_seq: u64,
    /// Length of the verified, fsynced log; appends go here.
    pub(crate) committed_len: u64,
    /// A failed append may have left bytes past `committed_len`.
    pub(crate) needs_truncate: bool,
    /// A rename was done but the directory fsync failed: retry it before appending.
    pub(crate) needs_dir_sync: bool,
    pub(crate) mark: MarkFile,
    /// The log a rewrite replaced, while the rename's directory fsync is pending.
    pub(crate) prev: Option<Vouch>,
    /// The last commit's buffer (about [`log::WRITE_CHUNK`] at most), kept for the next.
    pub(crate) write_buf: Vec<u8>,
}

impl std::fmt::Debug for LogFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogFile")
            .field("log_path", &self.log_path)
            .field("records", &self.next_seq)
            .field("file_bytes", &self.committed_len)
            .finish_non_exhaustive()
    }
}

/// Whether the mark found lets a log with `file_id` and `version` be read, and how many
/// records it must hold.
fn required(
    fmt: &Format,
    found: &Found,
    log_path: &Path,
    mark_path: &Path,
    file_id: &FileId,
    version: u32,
) -> Result<Option<Required>, StoreError> {
    match found {
        Found::Unreadable => Err(StoreError::MarkMissing {
            file: log_path.to_owned(),
            mark: mark_path.to_owned(),
            reason: "it is damaged or was written under another key",
        }),
        Found::Mark(_, mark) => match mark.vouch_for(file_id) {
            Some(v) => Ok(Some(Required {
                records: v.records,
                mark: mark_path.to_owned(),
            })),
            None => Err(StoreError::RolledBack {
                file: log_path.to_owned(),
                mark: mark_path.to_owned(),
            }),
        },
        // Written before marks existed: the first start after an upgrade.
        Found::Nothing if version < fmt.marked_since => Ok(None),
        Found::Nothing => Err(StoreError::MarkMissing {
            file: log_path.to_owned(),
            mark: mark_path.to_owned(),
            reason: "no such file",
        }),
    }
}

fn open_existing(path: &Path) -> Result<(File, u64), StoreError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| StoreError::io(path, e))?;
    let len = file.metadata().map_err(|e| StoreError::io(path, e))?.len();
    Ok((file, len))
}

impl LogFile {
    /// Opens (or creates, mode 0700) the folder `dir` and its `fmt` log, verifies every
    /// record against the mark and hands each record's plaintext and frame length to
    /// `on_record` in order; then the mark is settled to vouch for exactly this log.
    pub(crate) fn open(
        dir: &Path,
        key: RetainedKey,
        fmt: &'static Format,
        trust: Trust,
        on_record: impl FnMut(&[u8], u64) -> Result<(), OpenError>,
    ) -> Result<LogFile, StoreError> {
        // The key's bytes go as soon as the cipher holds its schedule.
        let cipher = record::cipher(&key);
        drop(key);
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| StoreError::io(dir, e))?;
        remove_stale_tmp(dir, fmt)?;
        let log_path = dir.join(fmt.log_name);
        let mark_path = dir.join(fmt.mark_name);
        let mut found = mark::read_in(dir, &cipher, fmt, true)?;
        let (file, frames) = if log_path.exists() {
            let (file, file_len) = open_existing(&log_path)?;
            let reader = BufReader::with_capacity(1 << 20, &file);
            let frames = log::read_frames(
                reader,
                file_len,
                &cipher,
                fmt,
                &log_path,
                |id, version| match trust {
                    Trust::AsIs => Ok(None),
                    Trust::Checked => required(fmt, &found, &log_path, &mark_path, id, version),
                },
                on_record,
            )?;
            if frames.good_len < file_len {
                file.set_len(frames.good_len)
                    .and_then(|()| file.sync_all())
                    .map_err(|e| StoreError::io(&log_path, e))?;
            }
            (file, frames)
        } else {
            match (trust, &found) {
                (Trust::Checked, Found::Unreadable) => {
                    return Err(StoreError::MarkMissing {
                        file: log_path,
                        mark: mark_path,
                        reason: "it is damaged or was written under another key",
                    })
                }
                (
                    Trust::Checked,
                    Found::Mark(
                        _,
                        Mark {
                            current: Some(v), ..
                        },
                    ),
                ) => {
                    return Err(StoreError::LogMissing {
                        file: log_path,
                        mark: mark_path,
                        records: v.records,
                    })
                }
                _ => {}
            }
            tracing::info!(file = %log_path.display(), "creating a new, empty {}", fmt.what);
            let tmp = dir.join(format!("{}-new", fmt.tmp_prefix));
            let w = log::write_fresh_plain(&tmp, &cipher, fmt, std::iter::empty())?;
            // The mark names the new file before it is renamed into place, so a crash in
            // between leaves no log without a mark.
            let next = Vouch::of(&w);
            let mark = Mark {
                current: None,
                next: Some(next),
            };
            found = Found::Mark(MarkFile::create(dir, &cipher, fmt, &mark)?, mark);
            log::install(&tmp, &log_path, dir)?;
            let frames = Frames {
                file_id: w.file_id,
                version: fmt.version,
                next_seq: w.next_seq,
                good_len: w.len,
            };
            (w.file, frames)
        };
        // The log in place may have been renamed there by a compaction whose directory
        // fsync never ran: make that durable before the mark vouches for it alone.
        log::sync_dir(dir)?;
        let settled = Mark {
            current: Some(Vouch {
                file_id: frames.file_id,
                records: frames.next_seq,
                len: frames.good_len,
            }),
            next: None,
        };
        let mark = match found {
            Found::Mark(mut mf, _) if trust == Trust::Checked => {
                mf.write(&cipher, &settled, true)?;
                mf
            }
            // Accepting may lower what the mark vouches for: rewrite both slots, or a torn
            // write later would fall back to the other slot's higher claim.
            Found::Mark(..) | Found::Unreadable => MarkFile::create(dir, &cipher, fmt, &settled)?,
            Found::Nothing => {
                if trust == Trust::Checked {
                    tracing::warn!(
                        file = %log_path.display(),
                        mark = %mark_path.display(),
                        "{} has no high-water mark yet (written by an older moatmq); creating it",
                        fmt.what
                    );
                }
                MarkFile::create(dir, &cipher, fmt, &settled)?
            }
        };
        Ok(LogFile {
            fmt,
            dir: dir.to_owned(),
            log_path,
            cipher,
            file,
            file_id: frames.file_id,
            version: frames.version,
            next_seq: frames.next_seq,
            committed_len: frames.good_len,
            needs_truncate: false,
            needs_dir_sync: false,
            mark,
            prev: None,
            write_buf: Vec::new(),
        })
    }

    /// Reads and verifies the `fmt` log in `dir` against its mark as [`LogFile::open`]
    /// does, but writes nothing and creates nothing (safe while a broker has it open: a
    /// torn tail past the mark is a save in progress and is skipped). A folder without
    /// log and mark reads as empty.
    pub(crate) fn inspect(
        dir: &Path,
        cipher: &Aes256Gcm,
        fmt: &'static Format,
        on_record: impl FnMut(&[u8], u64) -> Result<(), OpenError>,
    ) -> Result<(), StoreError> {
        let log_path = dir.join(fmt.log_name);
        let mark_path = dir.join(fmt.mark_name);
        let found = mark::read_in(dir, cipher, fmt, false)?;
        let file = match File::open(&log_path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return match found {
                    Found::Mark(
                        _,
                        Mark {
                            current: Some(v), ..
                        },
                    ) => Err(StoreError::LogMissing {
                        file: log_path,
                        mark: mark_path,
                        records: v.records,
                    }),
                    _ => Ok(()),
                };
            }
            Err(e) => return Err(StoreError::io(&log_path, e)),
        };
        let file_len = file
            .metadata()
            .map_err(|e| StoreError::io(&log_path, e))?
            .len();
        log::read_frames(
            BufReader::with_capacity(1 << 20, &file),
            file_len,
            cipher,
            fmt,
            &log_path,
            |id, version| required(fmt, &found, &log_path, &mark_path, id, version),
            on_record,
        )?;
        Ok(())
    }

    /// The committed state of the log, as the mark records it.
    pub(crate) fn vouch(&self) -> Vouch {
        Vouch {
            file_id: self.file_id,
            records: self.next_seq,
            len: self.committed_len,
        }
    }

    /// What the mark should say now: this log, or while a rewrite's rename may not be
    /// durable yet, the previous log and this one.
    fn mark_now(&self) -> Mark {
        let here = Some(self.vouch());
        match self.prev {
            Some(prev) => Mark {
                current: Some(prev),
                next: here,
            },
            None => Mark {
                current: here,
                next: None,
            },
        }
    }

    /// Writes the mark after a save. A failure costs no data (the log is already
    /// durable), only protection until the next save writes it again: warn and go on.
    pub(crate) fn update_mark(&mut self) {
        let mark = self.mark_now();
        if let Err(e) = self.mark.write(&self.cipher, &mark, false) {
            tracing::warn!(error = %e, "{}: high-water mark not updated; retrying at the next save", self.fmt.what);
        }
    }

    /// Seals `records` at the end of the log (in a batching format, together), fsyncs,
    /// then updates the mark; returns the bytes added. On error nothing counts as written
    /// and the next append first cuts the file back to its last good length.
    pub(crate) fn append<'r>(
        &mut self,
        records: impl ExactSizeIterator<Item = &'r [u8]>,
    ) -> Result<u64, StoreError> {
        if self.needs_dir_sync {
            log::sync_dir(&self.dir)?;
            self.needs_dir_sync = false;
            self.prev = None;
            self.update_mark();
        }
        if records.len() == 0 {
            return Ok(0);
        }
        let io = |e| StoreError::io(&self.log_path, e);
        if self.needs_truncate {
            self.file.set_len(self.committed_len).map_err(io)?;
            self.needs_truncate = false;
        }
        // One buffer for every commit (ciphertext only), written out a chunk at a time:
        // a burst of records (an autosave interval's worth) is never sealed into one
        // buffer as large as itself, which would be allocated and faulted in each time.
        let mut buf = std::mem::take(&mut self.write_buf);
        let mut framer = record::Framer::new(
            &self.cipher,
            self.fmt,
            self.version,
            &self.file_id,
            self.next_seq,
        );
        let res = write_sealed(
            &self.file,
            &self.log_path,
            &mut framer,
            records,
            &mut buf,
            self.committed_len,
        )
        .and_then(|end| self.file.sync_data().map(|()| end).map_err(io));
        let seq = framer.seq;
        self.write_buf = buf;
        let end = match res {
            Ok(end) => end,
            Err(e) => {
                self.needs_truncate = true;
                return Err(e);
            }
        };
        let added = end - self.committed_len;
        self.committed_len = end;
        self.next_seq = seq;
        self.update_mark();
        Ok(added)
    }

    /// A temporary file name of this log's kind (`{tmp_prefix}-{what}`): removed on open
    /// if a crash left it.
    pub(crate) fn tmp_path(&self, what: impl std::fmt::Display) -> PathBuf {
        self.dir.join(format!("{}-{what}", self.fmt.tmp_prefix))
    }

    /// Replaces the log by a new file holding `records` (compaction on this thread): see
    /// [`LogFile::install`].
    pub(crate) fn rewrite(
        &mut self,
        records: impl Iterator<Item = Result<Zeroizing<Vec<u8>>, StoreError>>,
    ) -> Result<usize, StoreError> {
        let tmp = self.tmp_path("compact");
        let w = match log::write_fresh_plain(&tmp, &self.cipher, self.fmt, records) {
            Ok(w) => w,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let records = w.records;
        let res = self.install(w, &[]);
        if res.is_err() {
            // Gone already if the rename happened.
            let _ = std::fs::remove_file(&tmp);
        }
        res.map(|()| records)
    }

    /// Puts `w` (a fresh log written by [`log::write_fresh_plain`], possibly on another
    /// thread) in place of the log, after appending `since` to it (the changes made while
    /// it was written): fsync, the mark naming both files (fsynced), rename, directory
    /// fsync, the mark naming the new one. A crash at any step leaves either file complete
    /// and loadable. Before the rename an error leaves the old log in use (the caller
    /// removes the temporary file); after it the new file is in use and the directory
    /// fsync is retried by the next append (`needs_dir_sync`).
    pub(crate) fn install(
        &mut self,
        mut w: Written,
        since: &[Zeroizing<Vec<u8>>],
    ) -> Result<(), StoreError> {
        if self.needs_dir_sync {
            // The last rename must be durable before the mark may forget the file before it.
            log::sync_dir(&self.dir)?;
            self.needs_dir_sync = false;
            self.prev = None;
        }
        if !since.is_empty() {
            let mut framer = record::Framer::new(
                &self.cipher,
                self.fmt,
                self.fmt.version,
                &w.file_id,
                w.next_seq,
            );
            let plain = since.iter().map(|p| p.as_slice());
            let end = write_sealed(
                &w.file,
                &w.tmp_path,
                &mut framer,
                plain,
                &mut Vec::new(),
                w.len,
            )?;
            w.file
                .sync_data()
                .map_err(|e| StoreError::io(&w.tmp_path, e))?;
            w.next_seq = framer.seq;
            w.len = end;
        }
        let old = self.vouch();
        let new = Vouch::of(&w);
        let both = Mark {
            current: Some(old),
            next: Some(new),
        };
        self.mark.write(&self.cipher, &both, true)?;
        std::fs::rename(&w.tmp_path, &self.log_path)
            .map_err(|e| StoreError::io(&self.log_path, e))?;
        // The rename happened: from here on the new file is the log.
        self.prev = Some(old);
        self.file = w.file;
        self.file_id = w.file_id;
        self.version = self.fmt.version;
        self.next_seq = w.next_seq;
        self.committed_len = w.len;
        self.needs_truncate = false;
        if let Err(e) = log::sync_dir(&self.dir) {
            self.needs_dir_sync = true;
            return Err(e);
        }
        self.prev = None;
        self.update_mark();
        Ok(())
    }

    /// Rewrites the log holding `records` sealed under `new` (rekey); the log must not be
    /// used after. The older mark slot gets the new file's mark under the new key, the
    /// newest keeps the old file's under the old key until the rename is durable, so
    /// after a crash the mark matches whichever file and key are in place. The new log
    /// keeps the old one's owner and group.
    pub(crate) fn rekey_into(
        &mut self,
        new: &Aes256Gcm,
        records: impl Iterator<Item = Result<Zeroizing<Vec<u8>>, StoreError>>,
    ) -> Result<usize, StoreError> {
        let tmp = self.tmp_path("rekey");
        let owner =
            std::fs::metadata(&self.log_path).map_err(|e| StoreError::io(&self.log_path, e))?;
        let w = log::write_fresh_plain(&tmp, new, self.fmt, records)?;
        if let Err(e) = keep_owner(&w.file, &owner) {
            let _ = std::fs::remove_file(&tmp);
            return Err(StoreError::io(&self.log_path, e));
        }
        let mark = Mark {
            current: Some(Vouch::of(&w)),
            next: None,
        };
        let res = self
            .mark
            .write(new, &mark, true)
            .and_then(|()| log::install(&w.tmp_path, &self.log_path, &self.dir));
        if let Err(e) = res {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        self.mark.write(new, &mark, true)?;
        Ok(w.records)
    }
}

/// Seals `records` with `framer` and writes them into `file` (`path` names it in errors)
/// from offset `at`, about [`log::WRITE_CHUNK`] at a time through `buf`, without an
/// fsync; returns where they end. `buf` is left empty, and zeroed if a record failed
/// while a batch (plaintext until sealed) was being filled.
fn write_sealed<'r>(
    file: &File,
    path: &Path,
    framer: &mut record::Framer<'_>,
    records: impl Iterator<Item = &'r [u8]>,
    buf: &mut Vec<u8>,
    mut at: u64,
) -> Result<u64, StoreError> {
    let mut chunk = |framer: &mut record::Framer<'_>, buf: &mut Vec<u8>| {
        framer.finish(buf)?;
        file.write_all_at(buf, at)
            .map_err(|e| StoreError::io(path, e))?;
        at += buf.len() as u64;
        buf.clear();
        Ok::<(), StoreError>(())
    };
    buf.clear();
    let res = (|| {
        for plain in records {
            framer.push(plain, buf)?;
            if buf.len() >= log::WRITE_CHUNK {
                chunk(framer, buf)?;
            }
        }
        chunk(framer, buf)
    })();
    match res {
        Ok(()) => Ok(at),
        Err(e) => {
            zeroize::Zeroize::zeroize(&mut buf[..]);
            buf.clear();
            Err(e)
        }
    }
}

/// Removes temporary files left by a compaction or rekey interrupted by a crash; the
/// rename had not happened, so the log they were replacing is still complete.
pub(crate) fn remove_stale_tmp(dir: &Path, fmt: &Format) -> Result<(), StoreError> {
    let entries = std::fs::read_dir(dir).map_err(|e| StoreError::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| StoreError::io(dir, e))?;
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(fmt.tmp_prefix)
        {
            let p = entry.path();
            tracing::info!(file = %p.display(), "removing interrupted compaction file");
            std::fs::remove_file(&p).map_err(|e| StoreError::io(&p, e))?;
        }
    }
    Ok(())
}

/// Gives `file` the owner and group of `old` (a no-op when they already match, so it
/// needs root only when root runs the command on another user's store).
fn keep_owner(file: &std::fs::File, old: &std::fs::Metadata) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let new = file.metadata()?;
    if (new.uid(), new.gid()) == (old.uid(), old.gid()) {
        return Ok(());
    }
    std::os::unix::fs::fchown(file, Some(old.uid()), Some(old.gid()))
}
