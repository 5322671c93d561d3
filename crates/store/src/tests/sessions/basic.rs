use super::*;
use crate::{Delivery, Enqueued, MessageProperties, PendingWill};

#[test]
fn everything_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let k = skey(Some("alice"), "c1");
    let anon = skey(None, "c1");
    let before = {
        let mut s = open(dir.path()).unwrap();
        assert!(s.put_session(&k, meta(&["alice/#", "alice/+/x"])).unwrap());
        assert!(!s.put_session(&k, meta(&["alice/#"])).unwrap());
        assert!(s.put_session(&anon, meta(&["#"])).unwrap());
        let Enqueued::Queued(a) = s.enqueue(&k, qmsg("alice/a", "1")).unwrap() else {
            panic!()
        };
        let Enqueued::Queued(b) = s
            .enqueue(
                &k,
                QueuedMessage {
                    qos: 2,
                    retain: true,
                    properties: Some(Box::new(MessageProperties {
                        content_type: Some("text/plain".into()),
                        user_properties: vec![("k".into(), "v".into())],
                        ..Default::default()
                    })),
                    expires_at: Some(u64::MAX / 2),
                    ..qmsg("alice/b", "2")
                },
            )
            .unwrap()
        else {
            panic!()
        };
        let Enqueued::Queued(c) = s.enqueue(&k, qmsg("alice/c", "3")).unwrap() else {
            panic!()
        };
        assert!(s.mark_sent(&k, a, 7).unwrap());
        assert!(s.mark_sent(&k, b, 8).unwrap());
        assert!(s.mark_released(&k, b).unwrap());
        assert!(s.complete(&k, c).unwrap());
        assert!(s.qos2_in(&k, 42).unwrap());
        assert!(!s.qos2_in(&k, 42).unwrap(), "a resent pkid is reported");
        assert!(s.qos2_in(&anon, 1).unwrap());
        assert!(s.qos2_in_done(&anon, 1).unwrap());
        let will = PendingWill {
            message: qmsg("alice/will", "gone"),
            publish_at: 1_000,
        };
        assert!(s.set_will(&k, Some(will)).unwrap());
        let mut m = meta(&["alice/#"]);
        m.disconnected_at = Some(500);
        s.put_session(&k, m).unwrap();
        assert_eq!(s.pending(), 15);
        let stats = s.commit().unwrap();
        assert_eq!(stats.records, 15);
        assert_eq!(s.pending(), 0);
        let sess = s.session(&k).unwrap();
        assert_eq!(sess.messages[&a].delivery, Delivery::Sent { pkid: 7 });
        assert_eq!(sess.messages[&b].delivery, Delivery::Released { pkid: 8 });
        assert!(!sess.messages.contains_key(&c));
        assert_eq!(sess.expires_at(), Some(4100));
        all(&s)
    };
    let s = open(dir.path()).unwrap();
    assert_eq!(all(&s), before);
}

/// A forward (queued and marked sent at once, as the broker does for a connected
/// client) that is acknowledged before the next commit is never written, nor is its
/// `Done`; one acknowledged after the commit, or not at all, is written as usual.
#[test]
fn a_forward_acknowledged_before_the_commit_is_never_written() {
    let dir = tempfile::tempdir().unwrap();
    let k = skey(Some("alice"), "c1");
    let mut s = open(dir.path()).unwrap();
    s.put_session(&k, meta(&["alice/#"])).unwrap();
    s.commit().unwrap();
    let empty = s.file_bytes();
    let forward = |s: &mut SessionLog, topic: &str, pkid: u16| {
        let Enqueued::Queued(id) = s.enqueue(&k, qmsg(topic, "payload")).unwrap() else {
            panic!("queued")
        };
        assert!(s.mark_sent(&k, id, pkid).unwrap());
        id
    };
    // Acknowledged within the commit: nothing at all reaches the file.
    for pkid in 1..=50 {
        let id = forward(&mut s, "alice/fast", pkid);
        assert!(s.complete(&k, id).unwrap());
    }
    assert_eq!(s.pending(), 0);
    s.commit().unwrap();
    assert_eq!(s.file_bytes(), empty);
    // Still unacknowledged at the commit: written, then its Done.
    let late = forward(&mut s, "alice/late", 7);
    // Never acknowledged: written and kept, redelivered after a restart.
    let open_one = forward(&mut s, "alice/open", 8);
    // Acknowledged in the same commit as two others that are not: only it is dropped.
    let fast = forward(&mut s, "alice/fast", 9);
    assert!(s.complete(&k, fast).unwrap());
    assert_eq!(s.pending(), 4, "Message and Sent of each of the two others");
    s.commit().unwrap();
    assert!(s.complete(&k, late).unwrap());
    assert_eq!(s.pending(), 1, "the Done of a written forward");
    s.commit().unwrap();
    drop(s);
    let s = open(dir.path()).unwrap();
    let sess = s.session(&k).unwrap();
    let held: Vec<(u64, &str, Delivery)> = sess
        .messages
        .iter()
        .map(|(id, h)| (*id, h.message.topic.as_str(), h.delivery))
        .collect();
    assert_eq!(held, [(open_one, "alice/open", Delivery::Sent { pkid: 8 })]);
}

#[test]
fn a_commit_of_several_megabytes_is_written_in_chunks_and_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = SessionLog::open(dir.path(), key(), SessionLimits::UNLIMITED).unwrap();
    let k = skey(Some("a"), "big");
    s.put_session(&k, meta(&["a/#"])).unwrap();
    let payload = "p".repeat(10_000);
    for i in 0..400 {
        s.enqueue(&k, qmsg(&format!("a/{i}"), &payload)).unwrap();
    }
    let stats = s.commit().unwrap();
    assert_eq!(stats.records, 401);
    assert!(stats.bytes > 4_000_000, "{}", stats.bytes);
    assert_eq!(
        s.file_bytes(),
        std::fs::metadata(log_path(dir.path())).unwrap().len()
    );
    let expect = all(&s);
    drop(s);
    let s = SessionLog::open(dir.path(), key(), SessionLimits::UNLIMITED).unwrap();
    assert_eq!(all(&s), expect);
    assert_eq!(all(&s)[0].messages.len(), 400);
}

#[test]
fn uncommitted_changes_are_lost_committed_ones_kept() {
    let dir = tempfile::tempdir().unwrap();
    let k = skey(Some("u"), "c");
    {
        let mut s = open(dir.path()).unwrap();
        s.put_session(&k, meta(&["u/#"])).unwrap();
        s.enqueue(&k, qmsg("u/1", "x")).unwrap();
        s.commit().unwrap();
        s.enqueue(&k, qmsg("u/2", "y")).unwrap();
        // Dropped without a commit: a crash.
    }
    let s = open(dir.path()).unwrap();
    let sess = s.session(&k).unwrap();
    assert_eq!(sess.messages.len(), 1);
    assert_eq!(sess.messages.values().next().unwrap().message.topic, "u/1");
}

#[test]
fn remove_forgets_everything_and_a_new_session_starts_empty() {
    let dir = tempfile::tempdir().unwrap();
    let k = skey(Some("u"), "c");
    let mut s = open(dir.path()).unwrap();
    s.put_session(&k, meta(&["u/#"])).unwrap();
    s.enqueue(&k, qmsg("u/1", "x")).unwrap();
    assert!(s.remove_session(&k).unwrap());
    assert!(!s.remove_session(&k).unwrap());
    assert!(matches!(
        s.enqueue(&k, qmsg("u/1", "x")),
        Err(StoreError::UnknownSession)
    ));
    assert!(!s.mark_sent(&k, 0, 1).unwrap());
    s.put_session(&k, meta(&[])).unwrap();
    s.commit().unwrap();
    drop(s);
    let s = open(dir.path()).unwrap();
    let sess = s.session(&k).unwrap();
    assert!(sess.messages.is_empty() && sess.meta.subscriptions.is_empty());
}

#[test]
fn queue_bounds_drop_the_newest_per_session() {
    let dir = tempfile::tempdir().unwrap();
    let limits = SessionLimits {
        max_queued_messages: 2,
        max_queued_bytes: 20,
    };
    let mut s = SessionLog::open(dir.path(), key(), limits).unwrap();
    let (a, b) = (skey(Some("u"), "a"), skey(Some("u"), "b"));
    s.put_session(&a, meta(&[])).unwrap();
    s.put_session(&b, meta(&[])).unwrap();
    let Enqueued::Queued(first) = s.enqueue(&a, qmsg("t", "1")).unwrap() else {
        panic!()
    };
    assert!(matches!(
        s.enqueue(&a, qmsg("t", "2")).unwrap(),
        Enqueued::Queued(_)
    ));
    assert_eq!(
        s.enqueue(&a, qmsg("t", "3")).unwrap(),
        Enqueued::DroppedMessages
    );
    // Another session is not affected.
    assert!(matches!(
        s.enqueue(&b, qmsg("t", "1")).unwrap(),
        Enqueued::Queued(_)
    ));
    // Messages in flight do not count (Mosquitto's meaning).
    s.mark_sent(&a, first, 1).unwrap();
    assert!(matches!(
        s.enqueue(&a, qmsg("t", "4")).unwrap(),
        Enqueued::Queued(_)
    ));
    assert_eq!(
        s.enqueue(&b, qmsg("t", &"x".repeat(19))).unwrap(),
        Enqueued::DroppedBytes
    );
    let held: Vec<String> = s
        .session(&a)
        .unwrap()
        .messages
        .values()
        .map(|h| String::from_utf8(h.message.payload.to_vec()).unwrap())
        .collect();
    assert_eq!(held, ["1", "2", "4"]);
}

#[test]
fn purge_expired_sessions_and_messages() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path()).unwrap();
    let (gone, kept, live) = (skey(None, "gone"), skey(None, "kept"), skey(None, "live"));
    let mut m = meta(&[]);
    m.expiry_interval = 10;
    m.disconnected_at = Some(100);
    s.put_session(&gone, m.clone()).unwrap();
    m.expiry_interval = 1000;
    s.put_session(&kept, m).unwrap();
    s.put_session(&live, meta(&[])).unwrap();
    let expiring = QueuedMessage {
        expires_at: Some(105),
        ..qmsg("t", "old")
    };
    s.enqueue(&kept, expiring.clone()).unwrap();
    let Enqueued::Queued(inflight) = s.enqueue(&kept, expiring).unwrap() else {
        panic!()
    };
    s.mark_sent(&kept, inflight, 9).unwrap();
    s.enqueue(&kept, qmsg("t", "fresh")).unwrap();
    let purged = s.purge_expired(110).unwrap();
    assert_eq!(purged.sessions, vec![gone.clone()]);
    // The expired message in flight is kept: its exchange must complete.
    assert_eq!(purged.messages, 1);
    s.commit().unwrap();
    drop(s);
    let s = open(dir.path()).unwrap();
    assert!(s.session(&gone).is_none());
    assert_eq!(s.session(&kept).unwrap().messages.len(), 2);
    assert!(s.session(&live).is_some());
}

#[test]
fn file_reveals_no_client_id_owner_filter_topic_or_payload() {
    let dir = tempfile::tempdir().unwrap();
    let k = skey(Some("owner-SECRET"), "client-SECRET");
    let mut s = open(dir.path()).unwrap();
    s.put_session(&k, meta(&["filter-SECRET/#"])).unwrap();
    s.enqueue(&k, qmsg("topic-SECRET", "payload-SECRET"))
        .unwrap();
    s.set_will(
        &k,
        Some(PendingWill {
            message: qmsg("will-SECRET", "x"),
            publish_at: 0,
        }),
    )
    .unwrap();
    s.commit().unwrap();
    s.compact().unwrap();
    drop(s);
    for f in [log_path(dir.path()), mark_path(dir.path())] {
        let bytes = std::fs::read(&f).unwrap();
        assert!(
            !bytes.windows(6).any(|w| w == b"SECRET"),
            "{} leaks plaintext",
            f.display()
        );
    }
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(log_path(dir.path()))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn compaction_keeps_the_state_and_shrinks_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let k = skey(Some("u"), "c");
    let mut s = open(dir.path()).unwrap();
    s.put_session(&k, meta(&["u/#"])).unwrap();
    for i in 0..2000 {
        let Enqueued::Queued(id) = s.enqueue(&k, qmsg("u/t", &"p".repeat(100))).unwrap() else {
            panic!()
        };
        if i % 10 != 0 {
            s.complete(&k, id).unwrap();
        }
        s.commit().unwrap();
    }
    // Commits compacted on their own once garbage dominated.
    assert!(
        s.file_bytes() < 200 * 150 * 3 + 64 * 1024,
        "{}",
        s.file_bytes()
    );
    let before = all(&s);
    let stats = s.compact().unwrap();
    assert!(stats.compacted);
    let small = s.file_bytes();
    assert!(small < 200 * 200, "{small}");
    drop(s);
    let s = open(dir.path()).unwrap();
    assert_eq!(all(&s), before);
    assert_eq!(s.session(&k).unwrap().messages.len(), 200);
}

#[test]
fn rekey_and_read_only_listing() {
    let dir = tempfile::tempdir().unwrap();
    let before = store_with(dir.path(), 3);
    assert_eq!(crate::read_sessions(dir.path(), &key()).unwrap(), before);
    let other = super::super::other_key();
    assert_eq!(crate::rekey_sessions(dir.path(), key(), &other).unwrap(), 1);
    assert!(matches!(
        open(dir.path()).unwrap_err(),
        StoreError::WrongKey { .. }
    ));
    let s = SessionLog::open(dir.path(), other.clone(), LIMITS).unwrap();
    assert_eq!(all(&s), before);
    drop(s);
    // Listing writes nothing: not even the mark.
    let stamp = |p: PathBuf| std::fs::read(p).unwrap();
    let (log, mark) = (stamp(log_path(dir.path())), stamp(mark_path(dir.path())));
    assert_eq!(crate::read_sessions(dir.path(), &other).unwrap(), before);
    assert_eq!(stamp(log_path(dir.path())), log);
    assert_eq!(stamp(mark_path(dir.path())), mark);
    // A folder without a session store lists as empty and stays without one.
    let empty = tempfile::tempdir().unwrap();
    assert!(crate::read_sessions(empty.path(), &key())
        .unwrap()
        .is_empty());
    assert!(!log_path(empty.path()).exists());
}

#[test]
fn key_check_reads_the_session_header() {
    let dir = tempfile::tempdir().unwrap();
    key().check_session_store(dir.path()).unwrap();
    store_with(dir.path(), 1);
    key().check_session_store(dir.path()).unwrap();
    assert!(matches!(
        super::super::other_key().check_session_store(dir.path()),
        Err(StoreError::WrongKey { .. })
    ));
}

#[test]
fn sits_beside_the_retained_store_in_one_folder() {
    let dir = tempfile::tempdir().unwrap();
    super::super::store_with(dir.path(), 2);
    let before = store_with(dir.path(), 2);
    let (r, msgs) = super::super::open(dir.path()).unwrap();
    assert_eq!(msgs.len(), 2);
    drop(r);
    assert_eq!(all(&open(dir.path()).unwrap()), before);
}

/// `stats` counts sessions, held and queued messages and queued bytes, the same for the
/// log and the memory backend; a sent message is held but no longer queued.
#[test]
fn stats_count_sessions_and_queues_in_both_backends() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path()).unwrap();
    let mut mem = crate::MemorySessions::new(LIMITS);
    for s in [&mut log as &mut dyn SessionStore, &mut mem] {
        let (a, b) = (skey(Some("a"), "c"), skey(None, "c"));
        s.put_session(&a, meta(&["a/#"])).unwrap();
        s.put_session(&b, meta(&["#"])).unwrap();
        let Enqueued::Queued(id) = s.enqueue(&a, qmsg("a/1", "12345")).unwrap() else {
            panic!("queue is empty")
        };
        s.enqueue(&a, qmsg("a/2", "1")).unwrap();
        s.enqueue(&b, qmsg("b", "")).unwrap();
        s.mark_sent(&a, id, 1).unwrap();
        assert_eq!(
            s.stats(),
            crate::SessionStats {
                sessions: 2,
                held_messages: 3,
                queued_messages: 2,
                queued_bytes: 4 + 1,
            }
        );
    }
    assert_eq!(mem.commit().unwrap(), crate::CommitStats::default());
    log.commit().unwrap();
    drop(log);
    assert_eq!(open(dir.path()).unwrap().stats(), mem.stats());
}

#[test]
fn payload_encoding_reads_like_the_byte_sequence_logs_were_written_with() {
    // Logs written before payloads were serialized as one byte string encoded them as a
    // sequence of bytes: both must give the same record, both ways.
    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct Before {
        topic: String,
        payload: Vec<u8>,
        qos: u8,
        retain: bool,
        properties: Option<MessageProperties>,
        expires_at: Option<u64>,
    }
    let payload: Vec<u8> = (0..=255).chain(0..40).collect();
    let now = qmsg("alice/t", "");
    let now = QueuedMessage {
        payload: payload.clone().into(),
        ..now
    };
    let before = Before {
        topic: now.topic.clone(),
        payload,
        qos: now.qos,
        retain: now.retain,
        properties: now.properties.as_deref().cloned(),
        expires_at: now.expires_at,
    };
    let new_bytes = postcard::to_stdvec(&now).unwrap();
    assert_eq!(new_bytes, postcard::to_stdvec(&before).unwrap());
    assert_eq!(
        postcard::from_bytes::<QueuedMessage>(&new_bytes).unwrap(),
        now
    );
    assert_eq!(postcard::from_bytes::<Before>(&new_bytes).unwrap(), before);
}
