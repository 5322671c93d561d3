use super::*;
use crate::{rekey, FlushStats};

#[test]
fn round_trip_with_properties() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, loaded) = open(dir.path()).unwrap();
    assert!(loaded.is_empty() && s.is_empty());
    let a = v5_msg("home/door", "locked");
    let b = msg("home/light", "on");
    s.set(a.clone()).unwrap();
    s.set(b.clone()).unwrap();
    s.set(msg("home/light", "first")).unwrap();
    s.set(b.clone()).unwrap();
    assert_eq!(s.flush().unwrap().records, 2);
    assert_eq!(s.flush().unwrap(), FlushStats::default());
    drop(s);
    let (s, loaded) = open(dir.path()).unwrap();
    assert_eq!(sorted(loaded), vec![a.clone(), b.clone()]);
    assert_eq!(s.len(), 2);
    assert_eq!(s.get("home/door").as_deref(), Some(&a));
    assert_eq!(
        s.live_bytes(),
        crate::stored_bytes(&a) + crate::stored_bytes(&b)
    );
}

#[test]
fn directory_created_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("a/b");
    open(&sub).unwrap();
    let mode = std::fs::metadata(&sub).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    let mode = std::fs::metadata(log_path(&sub))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn clear_removes_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = open(dir.path()).unwrap();
    s.set(msg("a", "1")).unwrap();
    s.set(msg("b", "2")).unwrap();
    s.flush().unwrap();
    s.clear("a");
    s.clear("never-set");
    assert_eq!(s.flush().unwrap().records, 1);
    drop(s);
    let (_, loaded) = open(dir.path()).unwrap();
    assert_eq!(loaded, vec![msg("b", "2")]);
}

#[test]
fn expired_not_returned() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = open(dir.path()).unwrap();
    // (Set last: any change first clears what has expired.)
    s.set(v5_msg("fresh", "y")).unwrap();
    s.set(RetainedMessage {
        expires_at: Some(1),
        ..msg("old", "x")
    })
    .unwrap();
    s.flush().unwrap();
    assert_eq!(s.purge_expired(crate::now_unix()), 1);
    drop(s);
    let (_, loaded) = open(dir.path()).unwrap();
    assert_eq!(loaded, vec![v5_msg("fresh", "y")]);
}

#[test]
fn file_reveals_neither_topic_nor_payload() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = open(dir.path()).unwrap();
    s.set(v5_msg("patients/ward7/bed3/vitals", "heart-rate-72"))
        .unwrap();
    s.flush().unwrap();
    s.compact().unwrap();
    s.set(msg("doors/front", "unlocked-now")).unwrap();
    s.flush().unwrap();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        for needle in [
            &b"patients/ward7"[..],
            b"heart-rate",
            b"doors/front",
            b"unlocked-now",
            b"application/json",
            b"reply/here",
        ] {
            assert!(!bytes.windows(needle.len()).any(|w| w == needle));
        }
    }
}

#[test]
fn full_on_limits() {
    let dir = tempfile::tempdir().unwrap();
    let one = crate::stored_bytes(&msg("a", "1"));
    let limits = StoreLimits {
        max_messages: 2,
        max_bytes: 3 * one,
        ..LIMITS
    };
    let (mut s, _) = Store::open(dir.path(), key(), limits).unwrap();
    s.set(msg("a", "1")).unwrap();
    s.set(msg("b", "2")).unwrap();
    assert!(matches!(
        s.set(msg("c", "3")),
        Err(StoreError::Full(crate::Refusal::Messages))
    ));
    // A replacement counts once: it may grow up to max_bytes, not past it.
    s.set(msg("a", &"x".repeat(one as usize))).unwrap();
    assert!(matches!(
        s.set(msg("a", &"x".repeat(one as usize + 2))),
        Err(StoreError::Full(crate::Refusal::Bytes))
    ));
    s.clear("b");
    assert!(matches!(
        s.set(msg("c", &"x".repeat(one as usize))),
        Err(StoreError::Full(crate::Refusal::Bytes))
    ));
    s.clear("a");
    s.set(msg("c", "3")).unwrap();
    assert_eq!(s.len(), 1);
}

#[test]
fn compaction_keeps_exactly_the_live_set() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = open(dir.path()).unwrap();
    assert!(!s.maybe_compact().unwrap());
    for round in 0..20 {
        for i in 0..100 {
            s.set(msg(&format!("t{i}"), &format!("{round:0>200}")))
                .unwrap();
        }
        s.flush().unwrap();
    }
    for i in 50..100 {
        s.clear(&format!("t{i}"));
    }
    s.flush().unwrap();
    let before = s.file_bytes();
    let live = sorted(s.messages().iter().map(|m| (**m).clone()).collect());
    assert_eq!(live.len(), 50);
    assert!(s.maybe_compact().unwrap());
    assert!(s.file_bytes() * 10 < before);
    assert!(!s.maybe_compact().unwrap());
    // The compacted log keeps accepting appends.
    s.set(msg("t0", "after")).unwrap();
    s.flush().unwrap();
    drop(s);
    let (_, loaded) = open(dir.path()).unwrap();
    let mut expect = live;
    expect[0] = msg("t0", "after");
    assert_eq!(sorted(loaded), expect);
}

#[test]
fn background_compaction_includes_changes_made_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = open(dir.path()).unwrap();
    for i in 0..10 {
        s.set(msg(&format!("t{i}"), "v1")).unwrap();
    }
    s.flush().unwrap();
    let mut job = s.begin_compaction();
    let job = std::thread::spawn(move || {
        job.run().unwrap();
        job
    });
    s.set(msg("t0", "v2")).unwrap();
    s.clear("t1");
    s.flush().unwrap();
    s.set(msg("new", "v1")).unwrap();
    s.finish_compaction(job.join().unwrap()).unwrap();
    assert_eq!(s.pending(), 0);
    let live = sorted(s.messages().iter().map(|m| (**m).clone()).collect());
    drop(s);
    let (_, loaded) = open(dir.path()).unwrap();
    assert_eq!(sorted(loaded), live);
    assert_eq!(live.len(), 10);
    assert!(live.contains(&msg("t0", "v2")) && live.contains(&msg("new", "v1")));
}

#[test]
fn stale_job_refused_and_tmp_removed_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = open(dir.path()).unwrap();
    s.set(msg("a", "1")).unwrap();
    let old = s.begin_compaction();
    let mut new = s.begin_compaction();
    assert!(matches!(
        s.finish_compaction(old),
        Err(StoreError::StaleCompaction)
    ));
    new.run().unwrap();
    drop(new); // abandoned after writing: a crash before the rename
    drop(s);
    assert!(std::fs::read_dir(dir.path()).unwrap().count() > 2);
    let (_, loaded) = open(dir.path()).unwrap();
    assert!(loaded.is_empty(), "the set was never flushed");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
}

#[test]
fn flush_cost_is_proportional_to_changes() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = open(dir.path()).unwrap();
    let payload = "x".repeat(100);
    for i in 0..100_000 {
        s.set(msg(&format!("sensors/{i}"), &payload)).unwrap();
    }
    s.flush().unwrap();
    for i in 0..1000 {
        s.set(msg(&format!("sensors/{}", i * 97), "changed"))
            .unwrap();
    }
    let stats = s.flush().unwrap();
    assert_eq!(stats.records, 1000);
    assert!(
        stats.bytes * 50 < s.file_bytes(),
        "{stats:?} vs {}",
        s.file_bytes()
    );
    assert_eq!(s.len(), 100_000);
    // No reopen of 100,000 records here: unoptimized AES-GCM makes it cost seconds in a
    // test build; appended batches are read back by the other tests.
}

#[test]
fn failed_append_is_cut_back_before_retry() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = open(dir.path()).unwrap();
    s.set(msg("a", "1")).unwrap();
    s.flush().unwrap();
    // What a write that failed half-way would leave behind.
    let mut bytes = std::fs::read(log_path(dir.path())).unwrap();
    bytes.extend_from_slice(&[0xAB; 300]);
    std::fs::write(log_path(dir.path()), &bytes).unwrap();
    s.log.needs_truncate = true;
    s.set(msg("b", "2")).unwrap();
    s.flush().unwrap();
    drop(s);
    let (_, loaded) = open(dir.path()).unwrap();
    assert_eq!(sorted(loaded), vec![msg("a", "1"), msg("b", "2")]);
}

#[test]
fn rekey_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = open(dir.path()).unwrap();
    s.set(v5_msg("a", "1")).unwrap();
    s.set(msg("b", "2")).unwrap();
    s.flush().unwrap();
    drop(s);
    assert_eq!(rekey(dir.path(), key(), &other_key()).unwrap(), 2);
    assert!(matches!(open(dir.path()), Err(StoreError::WrongKey { .. })));
    let (_, loaded) = Store::open(dir.path(), other_key(), LIMITS).unwrap();
    assert_eq!(sorted(loaded), vec![v5_msg("a", "1"), msg("b", "2")]);
    // Rekey with a wrong "old" key changes nothing.
    assert!(matches!(
        rekey(dir.path(), key(), &key()),
        Err(StoreError::WrongKey { .. })
    ));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
}

/// `moatmq retained rekey` run as root on the broker user's store keeps the log's owner
/// and group (as root the store is first given another owner; otherwise it checks that
/// the caller's own ownership stays).
#[test]
fn rekey_keeps_the_logs_owner() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = open(dir.path()).unwrap();
    s.set(msg("a", "1")).unwrap();
    s.flush().unwrap();
    drop(s);
    let log = log_path(dir.path());
    if std::fs::metadata(&log).unwrap().uid() == 0 {
        std::os::unix::fs::chown(&log, Some(4321), Some(8765)).unwrap();
    }
    let before = std::fs::metadata(&log).unwrap();
    rekey(dir.path(), key(), &other_key()).unwrap();
    let after = std::fs::metadata(&log).unwrap();
    assert_eq!((after.uid(), after.gid()), (before.uid(), before.gid()));
    assert_eq!(after.mode() & 0o777, 0o600);
}

/// `check_store` reads the header only: the right key passes, another is `WrongKey`, a
/// store not made yet passes, and nothing is written.
#[test]
fn check_store_reads_only_the_header() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    key().check_store(&store).unwrap();
    assert!(!store.exists(), "nothing created");
    let (mut s, _) = open(&store).unwrap();
    s.set(msg("a", "1")).unwrap();
    s.flush().unwrap();
    drop(s);
    let before = std::fs::read(log_path(&store)).unwrap();
    key().check_store(&store).unwrap();
    assert!(matches!(
        other_key().check_store(&store),
        Err(StoreError::WrongKey { .. })
    ));
    std::fs::write(log_path(&store), b"short").unwrap();
    assert!(matches!(
        key().check_store(&store),
        Err(StoreError::Corrupt { offset: 0, .. })
    ));
    std::fs::write(log_path(&store), &before).unwrap();
    assert_eq!(std::fs::read(log_path(&store)).unwrap(), before);
}
