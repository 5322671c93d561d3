//! Attacks the file alone cannot reveal, caught by the high-water mark: a log cut at a
//! record boundary or to its bare header, its last records zeroed, an older copy put
//! back, the mark or the log deleted. And what must still load: a torn write after a
//! crash, a crash inside a compaction, the first start after an upgrade.

use super::*;
use crate::mark::{Mark, MARK_NAME};
use crate::{accept, rekey};

fn rewrite(dir: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let mut bytes = std::fs::read(log_path(dir)).unwrap();
    f(&mut bytes);
    std::fs::write(log_path(dir), &bytes).unwrap();
}

/// The fields of a `Truncated` error: (missing, offset, expected, found, required).
fn truncated(err: StoreError) -> (u64, u64, u64, &'static str, u64) {
    match err {
        StoreError::Truncated {
            file,
            mark,
            missing,
            offset,
            expected,
            found,
            required,
            ..
        } => {
            assert!(file.ends_with("retained.log"), "{}", file.display());
            assert!(mark.ends_with(MARK_NAME), "{}", mark.display());
            (missing, offset, expected, found, required)
        }
        other => panic!("expected Truncated, got {other:?}"),
    }
}

#[test]
fn cut_at_a_record_boundary_names_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 5);
    let mut cut = 0;
    rewrite(dir.path(), |b| {
        cut = frames(b)[3].0;
        b.truncate(cut);
    });
    let err = open(dir.path()).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("retained.log: 2 records after offset")
            && text.contains(&format!("file ends at byte {cut}"))
            && text.contains("expected record 3, found end of file")
            && text.contains("retained.log.hwm requires 5 records")
            && text.contains("moatmq retained accept"),
        "{text}"
    );
    assert_eq!(truncated(err), (2, cut as u64, 3, "end of file", 5));
}

#[test]
fn cut_to_the_bare_header_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 3);
    rewrite(dir.path(), |b| b.truncate(HEADER_LEN));
    let at = HEADER_LEN as u64;
    assert_eq!(
        truncated(open(dir.path()).unwrap_err()),
        (3, at, 0, "end of file", 3)
    );
}

#[test]
fn zeroed_last_records_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 4);
    let mut at = 0;
    rewrite(dir.path(), |b| {
        at = frames(b)[2].0;
        b[at..].fill(0);
    });
    assert_eq!(
        truncated(open(dir.path()).unwrap_err()),
        (2, at as u64, 2, "zero bytes", 4)
    );
}

#[test]
fn older_copy_of_the_same_file_does_not_resurrect_a_deleted_message() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 2);
    let backup = std::fs::read(log_path(dir.path())).unwrap();
    let (mut s, _) = open(dir.path()).unwrap();
    s.clear("t0");
    s.flush().unwrap();
    drop(s);
    std::fs::write(log_path(dir.path()), &backup).unwrap();
    let (missing, _, expected, found, required) = truncated(open(dir.path()).unwrap_err());
    assert_eq!(
        (missing, expected, found, required),
        (1, 2, "end of file", 3)
    );
}

#[test]
fn older_copy_from_before_a_compaction_is_a_rollback() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 3);
    let backup = std::fs::read(log_path(dir.path())).unwrap();
    let (mut s, _) = open(dir.path()).unwrap();
    s.clear("t1");
    s.compact().unwrap();
    drop(s);
    std::fs::write(log_path(dir.path()), &backup).unwrap();
    let err = open(dir.path()).unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(&err, StoreError::RolledBack { file, mark }
            if file.ends_with("retained.log") && mark.ends_with(MARK_NAME)),
        "{err:?}"
    );
    assert!(
        text.contains("retained.log is not the file its high-water mark")
            && text.contains("retained.log.hwm"),
        "{text}"
    );
}

#[test]
fn another_stores_log_is_a_rollback() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    store_with(a.path(), 4);
    store_with(b.path(), 1);
    std::fs::copy(log_path(a.path()), log_path(b.path())).unwrap();
    assert!(matches!(open(b.path()), Err(StoreError::RolledBack { .. })));
}

#[test]
fn torn_last_write_after_a_crash_still_loads() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 3);
    // Crash mid-append: the mark is written only after the log's fsync, so it never
    // counts the record being written.
    let mark = std::fs::read(mark_path(dir.path())).unwrap();
    let (mut s, _) = open(dir.path()).unwrap();
    s.set(msg("t3", "payload-3")).unwrap();
    s.set(msg("t4", "payload-4")).unwrap();
    s.flush().unwrap();
    drop(s);
    std::fs::write(mark_path(dir.path()), mark).unwrap();
    let mut torn_at = 0;
    rewrite(dir.path(), |b| {
        let (start, end) = frames(b)[4];
        torn_at = start;
        b.truncate(end - 3);
    });
    let (mut s, loaded) = open(dir.path()).unwrap();
    assert_eq!(loaded.len(), 4, "the complete record past the mark is kept");
    assert_eq!(s.file_bytes(), torn_at as u64);
    s.set(msg("t9", "x")).unwrap();
    s.flush().unwrap();
    drop(s);
    assert_eq!(open(dir.path()).unwrap().1.len(), 5);

    // The same with the unfinished batch's space left as zeros (file extended first).
    let mark = std::fs::read(mark_path(dir.path())).unwrap();
    rewrite(dir.path(), |b| b.extend_from_slice(&[0; 300]));
    std::fs::write(mark_path(dir.path()), mark).unwrap();
    assert_eq!(open(dir.path()).unwrap().1.len(), 5);
}

#[test]
fn crash_inside_a_compaction_loads_either_file() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 3);
    let old_log = std::fs::read(log_path(dir.path())).unwrap();
    let (mut s, _) = open(dir.path()).unwrap();
    let old = s.log.vouch();
    s.clear("t0");
    s.compact().unwrap();
    let new = s.log.vouch();
    // The state just before the rename: the mark names both files, fsynced.
    let both = Mark {
        current: Some(old),
        next: Some(new),
    };
    s.log
        .mark
        .write(&s.log.cipher.clone(), &both, true)
        .unwrap();
    drop(s);
    let new_log = std::fs::read(log_path(dir.path())).unwrap();
    let mark = std::fs::read(mark_path(dir.path())).unwrap();

    // Renamed, then the crash: the new file is in place.
    assert_eq!(open(dir.path()).unwrap().1.len(), 2);
    // Not yet renamed: the old file is in place (its temporary copy is cleaned up).
    std::fs::write(mark_path(dir.path()), &mark).unwrap();
    std::fs::write(log_path(dir.path()), &old_log).unwrap();
    std::fs::write(dir.path().join("retained.log.tmp-1"), &new_log).unwrap();
    assert_eq!(open(dir.path()).unwrap().1.len(), 3);
    // Once a start has settled on a file, the other one is a rollback.
    std::fs::write(log_path(dir.path()), &new_log).unwrap();
    assert!(matches!(
        open(dir.path()),
        Err(StoreError::RolledBack { .. })
    ));
}

#[test]
fn compaction_and_appends_keep_the_mark_exact() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 4);
    let (mut s, _) = open(dir.path()).unwrap();
    s.compact().unwrap();
    s.set(msg("a", "1")).unwrap();
    s.flush().unwrap();
    s.set(msg("b", "2")).unwrap();
    s.flush().unwrap();
    drop(s);
    assert_eq!(open(dir.path()).unwrap().1.len(), 6);
    rewrite(dir.path(), |b| b.truncate(frames(b)[5].0));
    assert_eq!(truncated(open(dir.path()).unwrap_err()).0, 1);
}

#[test]
fn deleted_or_damaged_mark_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 2);
    let mark = std::fs::read(mark_path(dir.path())).unwrap();
    std::fs::remove_file(mark_path(dir.path())).unwrap();
    let err = open(dir.path()).unwrap_err();
    assert!(
        matches!(
            &err,
            StoreError::MarkMissing {
                reason: "no such file",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("retained.log.hwm is missing"));
    let mut damaged = mark.clone();
    damaged[30] ^= 1;
    damaged[4096 + 30] ^= 1;
    std::fs::write(mark_path(dir.path()), &damaged).unwrap();
    assert!(matches!(
        open(dir.path()),
        Err(StoreError::MarkMissing { .. })
    ));
    // One damaged slot (a torn write) is not an error: the other one holds.
    let mut one = mark;
    one[30] ^= 1;
    std::fs::write(mark_path(dir.path()), &one).unwrap();
    assert_eq!(open(dir.path()).unwrap().1.len(), 2);
    // A wrong key is still reported as such, not as a damaged mark.
    assert!(matches!(
        Store::open(dir.path(), other_key(), LIMITS),
        Err(StoreError::WrongKey { .. })
    ));
}

#[test]
fn deleted_log_is_refused_not_started_empty() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 2);
    std::fs::remove_file(log_path(dir.path())).unwrap();
    let err = open(dir.path()).unwrap_err();
    assert!(
        matches!(err, StoreError::LogMissing { records: 2, .. }),
        "{err:?}"
    );
}

/// Rewrites the log's header as format version 1 (what moatmq wrote before marks).
fn make_version_1(dir: &Path) {
    use aes_gcm::aead::{Aead, Payload};
    use aes_gcm::Nonce;
    rewrite(dir, |b| {
        let mut file_id = [0u8; 16];
        file_id.copy_from_slice(&b[12..28]);
        let nonce = [5u8; 12];
        let tag = record::cipher(&key())
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &[],
                    aad: &record::header_aad(1, &file_id),
                },
            )
            .unwrap();
        b[8..12].copy_from_slice(&1u32.to_le_bytes());
        b[28..40].copy_from_slice(&nonce);
        b[40..56].copy_from_slice(&tag);
    });
}

#[test]
fn first_start_after_upgrade_creates_the_mark_and_rewrites_the_log() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 3);
    make_version_1(dir.path());
    std::fs::remove_file(mark_path(dir.path())).unwrap();
    let (_, loaded) = open(dir.path()).unwrap();
    assert_eq!(loaded.len(), 3);
    let log = std::fs::read(log_path(dir.path())).unwrap();
    assert_eq!(log[8..12], 2u32.to_le_bytes(), "rewritten as version 2");
    assert!(mark_path(dir.path()).exists());
    // From now on a deleted mark is noticed.
    std::fs::remove_file(mark_path(dir.path())).unwrap();
    assert!(matches!(
        open(dir.path()),
        Err(StoreError::MarkMissing { .. })
    ));
}

#[test]
fn accept_takes_the_store_as_it_is_and_the_checks_resume() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 4);
    rewrite(dir.path(), |b| b.truncate(frames(b)[2].0));
    assert!(matches!(
        open(dir.path()),
        Err(StoreError::Truncated { .. })
    ));
    assert_eq!(accept(dir.path(), key()).unwrap(), 2);
    let (mut s, loaded) = open(dir.path()).unwrap();
    assert_eq!(
        sorted(loaded),
        vec![msg("t0", "payload-0"), msg("t1", "payload-1")]
    );
    s.set(msg("t5", "x")).unwrap();
    s.flush().unwrap();
    drop(s);
    rewrite(dir.path(), |b| b.truncate(frames(b)[2].0));
    assert!(matches!(
        open(dir.path()),
        Err(StoreError::Truncated { .. })
    ));

    // Both slots were rewritten: a torn write to either later falls back to a claim the
    // accepted log meets.
    accept(dir.path(), key()).unwrap();
    let mark = std::fs::read(mark_path(dir.path())).unwrap();
    for slot in [0, 4096] {
        let mut torn = mark.clone();
        torn[slot + 30] ^= 1;
        std::fs::write(mark_path(dir.path()), &torn).unwrap();
        assert_eq!(open(dir.path()).unwrap().1.len(), 2, "slot at {slot} torn");
    }

    // A deleted mark, a deleted log: accepted too (the latter as an empty store).
    accept(dir.path(), key()).unwrap();
    std::fs::remove_file(mark_path(dir.path())).unwrap();
    assert_eq!(accept(dir.path(), key()).unwrap(), 2);
    std::fs::remove_file(log_path(dir.path())).unwrap();
    assert!(matches!(
        open(dir.path()),
        Err(StoreError::LogMissing { .. })
    ));
    assert_eq!(accept(dir.path(), key()).unwrap(), 0);
    assert!(open(dir.path()).unwrap().1.is_empty());
}

#[test]
fn accept_still_refuses_tampered_records_and_wrong_keys() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 3);
    rewrite(dir.path(), |b| {
        let (start, end) = frames(b)[1];
        b[(start + end) / 2] ^= 1;
    });
    assert!(matches!(
        accept(dir.path(), key()),
        Err(StoreError::WrongKeyOrTampered { record: 1, .. })
    ));
    assert!(matches!(
        accept(dir.path(), other_key()),
        Err(StoreError::WrongKey { .. })
    ));
}

#[test]
fn rekey_moves_the_mark_to_the_new_key() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 3);
    rekey(dir.path(), key(), &other_key()).unwrap();
    let (s, _) = Store::open(dir.path(), other_key(), LIMITS).unwrap();
    drop(s);
    rewrite(dir.path(), |b| b.truncate(frames(b)[1].0));
    assert!(matches!(
        Store::open(dir.path(), other_key(), LIMITS),
        Err(StoreError::Truncated { missing: 2, .. })
    ));
}

#[test]
fn crash_inside_a_rekey_before_the_rename_keeps_the_old_key_working() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 2);
    let (mut s, _) = open(dir.path()).unwrap();
    // What rekey does before its rename: the older slot gets the new key's mark.
    let new_mark = Mark {
        current: Some(s.log.vouch()),
        next: None,
    };
    s.log
        .mark
        .write(&record::cipher(&other_key()), &new_mark, true)
        .unwrap();
    drop(s);
    assert_eq!(open(dir.path()).unwrap().1.len(), 2);
}
