use super::*;

fn rewrite(dir: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let mut bytes = std::fs::read(log_path(dir)).unwrap();
    f(&mut bytes);
    std::fs::write(log_path(dir), &bytes).unwrap();
}

fn record_of(err: StoreError) -> u64 {
    match err {
        StoreError::WrongKeyOrTampered { record, file } => {
            assert!(file.ends_with("retained.log"), "{}", file.display());
            record
        }
        other => panic!("expected WrongKeyOrTampered, got {other:?}"),
    }
}

#[test]
fn flipped_byte_in_middle_record_names_it() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 3);
    rewrite(dir.path(), |b| {
        let (start, end) = frames(b)[1];
        b[(start + end) / 2] ^= 0x01;
    });
    let err = open(dir.path()).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("record 1") && text.contains("retained.log"),
        "{text}"
    );
    assert_eq!(record_of(err), 1);
}

#[test]
fn flipped_byte_in_length_prefix_is_corruption_not_torn() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 3);
    let mut at = 0;
    rewrite(dir.path(), |b| {
        at = frames(b)[1].0;
        b[at + 1] ^= 0x40; // makes the length run past end of file
    });
    match open(dir.path()).unwrap_err() {
        StoreError::Corrupt { offset, .. } => assert_eq!(offset, at as u64),
        other => panic!("{other:?}"),
    }
}

#[test]
fn swapped_records_detected() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 3);
    rewrite(dir.path(), |b| {
        let f = frames(b);
        let (r0, r1) = (b[f[0].0..f[0].1].to_vec(), b[f[1].0..f[1].1].to_vec());
        let mut swapped = r1;
        swapped.extend_from_slice(&r0);
        b.splice(f[0].0..f[1].1, swapped);
    });
    assert_eq!(record_of(open(dir.path()).unwrap_err()), 0);
}

#[test]
fn whole_record_removed_from_middle_detected() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 4);
    rewrite(dir.path(), |b| {
        let f = frames(b);
        b.drain(f[1].0..f[1].1);
    });
    assert_eq!(record_of(open(dir.path()).unwrap_err()), 1);
}

#[test]
fn record_replayed_from_another_file_detected() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    store_with(a.path(), 2);
    store_with(b.path(), 2);
    let foreign = std::fs::read(log_path(a.path())).unwrap();
    let fa = frames(&foreign);
    rewrite(b.path(), |bytes| {
        let fb = frames(bytes);
        bytes.splice(fb[1].0..fb[1].1, foreign[fa[1].0..fa[1].1].iter().copied());
    });
    assert_eq!(record_of(open(b.path()).unwrap_err()), 1);
}

#[test]
fn bad_tag_on_last_complete_record_is_tampering() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 3);
    rewrite(dir.path(), |b| {
        let n = b.len();
        b[n - 1] ^= 0x80;
    });
    assert_eq!(record_of(open(dir.path()).unwrap_err()), 2);
}

#[test]
fn torn_tail_is_dropped_and_earlier_records_kept() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 2);
    // A crash while appending record 2: the log got half of it, the high-water mark
    // (written only after the log's fsync) still says 2 records.
    let mark = std::fs::read(mark_path(dir.path())).unwrap();
    let (mut s, _) = open(dir.path()).unwrap();
    s.set(msg("t2", "payload-2")).unwrap();
    s.flush().unwrap();
    drop(s);
    std::fs::write(mark_path(dir.path()), mark).unwrap();
    rewrite(dir.path(), |b| {
        let (start, end) = frames(b)[2];
        b.truncate((start + end) / 2);
    });
    let (mut s, loaded) = open(dir.path()).unwrap();
    assert_eq!(
        sorted(loaded),
        vec![msg("t0", "payload-0"), msg("t1", "payload-1")]
    );
    // The store appends after the cut and reads back cleanly.
    s.set(msg("t9", "x")).unwrap();
    s.flush().unwrap();
    drop(s);
    assert_eq!(open(dir.path()).unwrap().1.len(), 3);
}

#[test]
fn torn_prefix_and_zero_filled_tail_are_torn() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 2);
    rewrite(dir.path(), |b| b.extend_from_slice(&[7, 0, 0]));
    assert_eq!(open(dir.path()).unwrap().1.len(), 2);
    rewrite(dir.path(), |b| b.extend_from_slice(&[0; 4096]));
    assert_eq!(open(dir.path()).unwrap().1.len(), 2);
    assert_eq!(
        frames(&std::fs::read(log_path(dir.path())).unwrap()).len(),
        2
    );
}

#[test]
fn wrong_key_is_reported_as_such() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 2);
    let err = Store::open(dir.path(), other_key(), LIMITS).unwrap_err();
    assert!(matches!(err, StoreError::WrongKey { .. }), "{err:?}");
    assert!(err.to_string().contains("wrong key"));
    // Even a store with no records tells a wrong key apart.
    let empty = tempfile::tempdir().unwrap();
    open(empty.path()).unwrap();
    assert!(matches!(
        Store::open(empty.path(), other_key(), LIMITS),
        Err(StoreError::WrongKey { .. })
    ));
}

#[test]
fn damaged_header_and_short_file_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 1);
    rewrite(dir.path(), |b| b[0] = b'X');
    assert!(matches!(
        open(dir.path()),
        Err(StoreError::Corrupt { offset: 0, .. })
    ));
    rewrite(dir.path(), |b| b.truncate(10));
    assert!(matches!(
        open(dir.path()),
        Err(StoreError::Corrupt { offset: 0, .. })
    ));
    rewrite(dir.path(), Vec::clear);
    assert!(matches!(open(dir.path()), Err(StoreError::Corrupt { .. })));
}
