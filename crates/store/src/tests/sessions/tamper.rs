//! Every kind of damage the retained store detects, on the session store: each refused
//! with an error naming `sessions.log` (and the record), never loaded as less.

use super::*;
use crate::tests::frames;

fn rewrite(dir: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let mut bytes = std::fs::read(log_path(dir)).unwrap();
    f(&mut bytes);
    std::fs::write(log_path(dir), &bytes).unwrap();
}

fn names_the_session_log(err: &StoreError) {
    let text = err.to_string();
    assert!(
        text.contains("sessions.log") && text.contains("session store"),
        "{text}"
    );
    assert!(!text.contains("retained"), "{text}");
}

#[test]
fn flipped_byte_names_the_record() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 3);
    rewrite(dir.path(), |b| {
        let (start, end) = frames(b)[2];
        b[(start + end) / 2] ^= 0x01;
    });
    let err = open(dir.path()).unwrap_err();
    names_the_session_log(&err);
    assert!(err.to_string().contains("record 2"), "{err}");
    assert!(matches!(
        err,
        StoreError::WrongKeyOrTampered { record: 2, .. }
    ));
}

#[test]
fn swapped_and_removed_records_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 3);
    let good = std::fs::read(log_path(dir.path())).unwrap();
    rewrite(dir.path(), |b| {
        let f = frames(b);
        let (r1, r2) = (b[f[1].0..f[1].1].to_vec(), b[f[2].0..f[2].1].to_vec());
        let mut swapped = r2;
        swapped.extend_from_slice(&r1);
        b.splice(f[1].0..f[2].1, swapped);
    });
    assert!(matches!(
        open(dir.path()).unwrap_err(),
        StoreError::WrongKeyOrTampered { record: 1, .. }
    ));
    std::fs::write(log_path(dir.path()), &good).unwrap();
    rewrite(dir.path(), |b| {
        let f = frames(b);
        b.drain(f[1].0..f[1].1);
    });
    assert!(matches!(
        open(dir.path()).unwrap_err(),
        StoreError::WrongKeyOrTampered { record: 1, .. }
    ));
}

#[test]
fn wrong_key_is_reported_as_such() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 1);
    let err = SessionLog::open(dir.path(), super::super::other_key(), LIMITS).unwrap_err();
    names_the_session_log(&err);
    assert!(matches!(err, StoreError::WrongKey { .. }));
}

#[test]
fn truncation_and_zeroing_are_refused_not_loaded_short() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 4);
    let good = std::fs::read(log_path(dir.path())).unwrap();
    let f = frames(&good);
    for cut in [f[3].0, f[1].0, crate::record::HEADER_LEN] {
        std::fs::write(log_path(dir.path()), &good[..cut]).unwrap();
        let err = open(dir.path()).unwrap_err();
        names_the_session_log(&err);
        assert!(err.to_string().contains("moatmq sessions accept"), "{err}");
        assert!(
            matches!(err, StoreError::Truncated { required: 5, .. }),
            "{err:?}"
        );
    }
    let mut zeroed = good.clone();
    zeroed[f[3].0..].fill(0);
    std::fs::write(log_path(dir.path()), &zeroed).unwrap();
    assert!(matches!(
        open(dir.path()).unwrap_err(),
        StoreError::Truncated {
            found: "zero bytes",
            ..
        }
    ));
}

#[test]
fn older_copy_is_refused_and_accept_takes_it() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 1);
    let old = std::fs::read(log_path(dir.path())).unwrap();
    let k = skey(Some("alice"), "c1");
    {
        let mut s = open(dir.path()).unwrap();
        s.remove_session(&k).unwrap();
        s.commit().unwrap();
    }
    // The older copy brings the removed session back: refused.
    std::fs::write(log_path(dir.path()), &old).unwrap();
    assert!(matches!(
        open(dir.path()).unwrap_err(),
        StoreError::Truncated { .. }
    ));
    // After a compaction the old file is another file altogether.
    SessionLog::open_for_test_as_is(dir.path())
        .compact()
        .unwrap();
    std::fs::write(log_path(dir.path()), &old).unwrap();
    let err = open(dir.path()).unwrap_err();
    names_the_session_log(&err);
    assert!(matches!(err, StoreError::RolledBack { .. }));
    assert_eq!(crate::accept_sessions(dir.path(), key()).unwrap(), 1);
    assert!(open(dir.path()).unwrap().session(&k).is_some());
}

#[test]
fn missing_mark_or_log_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 1);
    let mark = std::fs::read(mark_path(dir.path())).unwrap();
    std::fs::remove_file(mark_path(dir.path())).unwrap();
    let err = open(dir.path()).unwrap_err();
    names_the_session_log(&err);
    assert!(matches!(err, StoreError::MarkMissing { .. }));
    std::fs::write(mark_path(dir.path()), &mark).unwrap();
    std::fs::remove_file(log_path(dir.path())).unwrap();
    let err = open(dir.path()).unwrap_err();
    assert!(matches!(err, StoreError::LogMissing { records: 2, .. }));
    assert!(matches!(
        crate::read_sessions(dir.path(), &key()).unwrap_err(),
        StoreError::LogMissing { .. }
    ));
}

#[test]
fn a_retained_log_or_mark_never_opens_as_a_session_store() {
    let dir = tempfile::tempdir().unwrap();
    super::super::store_with(dir.path(), 2);
    // Same key, same folder: the retained files put in the session files' place.
    std::fs::copy(super::super::log_path(dir.path()), log_path(dir.path())).unwrap();
    std::fs::copy(super::super::mark_path(dir.path()), mark_path(dir.path())).unwrap();
    let err = open(dir.path()).unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt { offset: 0, reason, .. } if reason.contains("session store")),
        "{err:?}"
    );
    // A retained mark beside a real session log does not vouch for it.
    let other = tempfile::tempdir().unwrap();
    store_with(other.path(), 1);
    std::fs::copy(log_path(other.path()), log_path(dir.path())).unwrap();
    std::fs::copy(mark_path(other.path()), mark_path(dir.path())).unwrap();
    open(dir.path()).unwrap();
    std::fs::copy(super::super::mark_path(dir.path()), mark_path(dir.path())).unwrap();
    assert!(matches!(
        open(dir.path()).unwrap_err(),
        StoreError::MarkMissing { .. }
    ));
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
    /// Any damage to a session log is an error or (a torn tail) a shorter load: never a
    /// panic, never more sessions than were written.
    #[test]
    fn mutated_logs_never_panic(
        flips in proptest::collection::vec((0usize..4096, 1u8..=255), 1..4),
        cut in proptest::option::of(0usize..4096),
    ) {
        let dir = tempfile::tempdir().unwrap();
        store_with(dir.path(), 3);
        rewrite(dir.path(), |b| {
            for (at, x) in &flips {
                let at = at % b.len();
                b[at] ^= x;
            }
            if let Some(c) = cut {
                b.truncate(c % (b.len() + 1));
            }
        });
        if let Ok(s) = open(dir.path()) {
            proptest::prop_assert!(s.len() <= 1);
        }
    }
}
