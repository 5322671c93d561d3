//! Each crash point of docs/sessions.md, by cutting the files where a crash would leave
//! them: before a commit's write, in the middle of it (at every frame boundary and in
//! the middle of every frame), after its fsync but before the mark caught up, and in a
//! compaction before and after its rename. Every one must load a state the running store
//! went through, at least everything committed before. Also the upgrade from version 1
//! (one frame per record).

use super::*;
use crate::format::{Format, SESSIONS};
use crate::mark::{Mark, MarkFile, Vouch};
use crate::record::{self, HEADER_LEN};
use crate::tests::frames;
use crate::{log, Enqueued, PendingWill};

/// Copies the files of store folder `src` into a new folder.
fn copy_dir(src: &Path) -> tempfile::TempDir {
    let dst = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.path().join(e.file_name())).unwrap();
    }
    dst
}

/// One change made to the store.
type Step = Box<dyn FnMut(&mut SessionLog)>;
/// The log's and the mark's bytes.
type Files = (Vec<u8>, Vec<u8>);

/// Runs a scenario committing in batches. Returns the state after each commit (index =
/// frames in the log: a commit this small is one frame, sealed as a whole) and the log
/// and mark bytes after each commit.
fn scenario(dir: &Path) -> (Vec<Vec<Session>>, Vec<Files>) {
    let mut s = open(dir).unwrap();
    let mut states = vec![all(&s)];
    let mut commits = vec![(
        std::fs::read(log_path(dir)).unwrap(),
        std::fs::read(mark_path(dir)).unwrap(),
    )];
    let (a, b) = (skey(Some("a"), "c"), skey(None, "c"));
    let mut batches: Vec<Vec<Step>> = Vec::new();
    let (a1, a2, a3, b1) = (a.clone(), a.clone(), a.clone(), b.clone());
    batches.push(vec![
        Box::new(move |s| assert!(s.put_session(&a1, meta(&["a/#"])).unwrap())),
        Box::new(move |s| assert!(s.put_session(&b1, meta(&["#"])).unwrap())),
    ]);
    let (a1, b1) = (a.clone(), b.clone());
    batches.push(vec![
        Box::new(move |s| {
            assert!(matches!(
                s.enqueue(&a1, qmsg("a/1", "one")).unwrap(),
                Enqueued::Queued(0)
            ))
        }),
        Box::new(move |s| {
            assert!(matches!(
                s.enqueue(&a2, qmsg("a/2", "two")).unwrap(),
                Enqueued::Queued(1)
            ))
        }),
        Box::new(move |s| assert!(s.mark_sent(&a3, 0, 5).unwrap())),
        Box::new(move |s| assert!(s.qos2_in(&b1, 9).unwrap())),
    ]);
    let (a1, a2, a3, b1) = (a.clone(), a.clone(), a.clone(), b.clone());
    batches.push(vec![
        Box::new(move |s| assert!(s.complete(&a1, 0).unwrap())),
        Box::new(move |s| {
            let will = PendingWill {
                message: qmsg("a/will", "bye"),
                publish_at: 99,
            };
            assert!(s.set_will(&a2, Some(will)).unwrap())
        }),
        Box::new(move |s| {
            let mut m = meta(&["a/#", "a/x"]);
            m.disconnected_at = Some(50);
            assert!(!s.put_session(&a3, m).unwrap())
        }),
        Box::new(move |s| assert!(s.remove_session(&b1).unwrap())),
    ]);
    for batch in batches {
        for mut change in batch {
            change(&mut s);
        }
        s.commit().unwrap();
        assert_eq!(
            s.journal.log.next_seq as usize,
            states.len(),
            "one frame per commit"
        );
        states.push(all(&s));
        commits.push((
            std::fs::read(log_path(dir)).unwrap(),
            std::fs::read(mark_path(dir)).unwrap(),
        ));
    }
    (states, commits)
}

#[test]
fn every_cut_of_every_commit_loads_a_state_it_went_through() {
    let dir = tempfile::tempdir().unwrap();
    let (states, commits) = scenario(dir.path());
    let mut tried = 0;
    for i in 1..commits.len() {
        let (prev_log, prev_mark) = &commits[i - 1];
        let (log, _) = &commits[i];
        let fr = frames(log);
        let first = frames(prev_log).len();
        // Every length the log can have had while commit `i` was being written (with the
        // mark still as commit `i - 1` left it): its old end, every frame boundary, the
        // middle of every frame, a cut inside a length prefix, and the whole commit
        // written but the mark not yet updated.
        let mut cuts: Vec<(usize, usize)> = vec![(prev_log.len(), first)];
        for (n, (start, end)) in fr.iter().enumerate().skip(first) {
            cuts.push((start + 3, n));
            cuts.push(((start + end) / 2, n));
            cuts.push((end - 1, n));
            cuts.push((*end, n + 1));
        }
        for (cut, records) in cuts {
            let d = tempfile::tempdir().unwrap();
            std::fs::write(log_path(d.path()), &log[..cut]).unwrap();
            std::fs::write(mark_path(d.path()), prev_mark).unwrap();
            let s = open(d.path()).unwrap_or_else(|e| panic!("commit {i}, cut at {cut}: {e}"));
            assert_eq!(all(&s), states[records], "commit {i}, cut at {cut}");
            // A torn tail is cut away so the next append follows the last good record.
            let good = if records == 0 {
                HEADER_LEN
            } else {
                fr[records - 1].1
            };
            assert_eq!(s.file_bytes(), good as u64);
            assert_eq!(
                std::fs::metadata(log_path(d.path())).unwrap().len(),
                good as u64
            );
            tried += 1;
        }
        // And a zero-filled tail (the file grew, its data never landed).
        let d = tempfile::tempdir().unwrap();
        let mut zeroed = log.clone();
        zeroed[prev_log.len()..].fill(0);
        std::fs::write(log_path(d.path()), &zeroed).unwrap();
        std::fs::write(mark_path(d.path()), prev_mark).unwrap();
        assert_eq!(all(&open(d.path()).unwrap()), states[first]);
    }
    assert!(tried >= 15, "{tried}");
    // Reopened state after a cut keeps working: appends follow the good prefix.
    let (log, _) = &commits[2];
    let (_, prev_mark) = &commits[1];
    let d = tempfile::tempdir().unwrap();
    let f = frames(log);
    std::fs::write(log_path(d.path()), &log[..f[f.len() - 1].0 + 5]).unwrap();
    std::fs::write(mark_path(d.path()), prev_mark).unwrap();
    let mut s = open(d.path()).unwrap();
    s.put_session(&skey(None, "new"), meta(&[])).unwrap();
    s.commit().unwrap();
    let expect = all(&s);
    drop(s);
    assert_eq!(all(&open(d.path()).unwrap()), expect);
}

#[test]
fn crash_inside_a_compaction_loads_either_file() {
    let dir = tempfile::tempdir().unwrap();
    let (states, _) = scenario(dir.path());
    let before = states.last().unwrap().clone();
    let mut s = open(dir.path()).unwrap();
    assert_eq!(all(&s), before);
    // The compaction's steps, stopped where a crash could stop them.
    let tmp = dir.path().join(format!("{}-compact", SESSIONS.tmp_prefix));
    let records = s.state.snapshot_records();
    let w = log::write_fresh_plain(&tmp, &s.journal.log.cipher, &SESSIONS, records).unwrap();
    // 1. The new file written (even half written), the mark not yet touched.
    let half = copy_dir(dir.path());
    let len = std::fs::metadata(half.path().join(tmp.file_name().unwrap()))
        .unwrap()
        .len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(half.path().join(tmp.file_name().unwrap()))
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    assert_eq!(all(&open(half.path()).unwrap()), before);
    assert!(!half.path().join(tmp.file_name().unwrap()).exists());
    // 2. The mark names both files, the rename not done.
    let both = Mark {
        current: Some(s.journal.log.vouch()),
        next: Some(Vouch::of(&w)),
    };
    s.journal
        .log
        .mark
        .write(&s.journal.log.cipher, &both, true)
        .unwrap();
    drop(s);
    let unrenamed = copy_dir(dir.path());
    assert_eq!(all(&open(unrenamed.path()).unwrap()), before);
    // 3. Renamed, but neither the directory fsync nor the mark update happened.
    std::fs::rename(&tmp, log_path(dir.path())).unwrap();
    let renamed = copy_dir(dir.path());
    assert_eq!(all(&open(renamed.path()).unwrap()), before);
    // Once a start has settled on the new file, the old one is a rollback.
    let old = std::fs::read(log_path(unrenamed.path())).unwrap();
    std::fs::write(log_path(renamed.path()), old).unwrap();
    assert!(matches!(
        open(renamed.path()).unwrap_err(),
        StoreError::RolledBack { .. }
    ));
}

#[test]
fn crash_inside_a_rekey_keeps_the_old_key_working() {
    let dir = tempfile::tempdir().unwrap();
    let before = store_with(dir.path(), 2);
    let mut s = open(dir.path()).unwrap();
    let new = record::cipher(&super::super::other_key());
    let tmp = dir.path().join(format!("{}-rekey", SESSIONS.tmp_prefix));
    let records = s.state.snapshot_records();
    let w = log::write_fresh_plain(&tmp, &new, &SESSIONS, records).unwrap();
    // The older slot holds the new file's mark under the new key; no rename yet.
    s.journal
        .log
        .mark
        .write(
            &new,
            &Mark {
                current: Some(Vouch::of(&w)),
                next: None,
            },
            true,
        )
        .unwrap();
    drop(s);
    assert_eq!(all(&open(dir.path()).unwrap()), before);
    assert!(!tmp.exists());
}

#[test]
fn a_commit_larger_than_a_batch_is_several_frames_and_a_cut_between_them_keeps_a_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path()).unwrap();
    let k = skey(Some("a"), "c");
    s.put_session(&k, meta(&["a/#"])).unwrap();
    s.commit().unwrap();
    let before = std::fs::read(log_path(dir.path())).unwrap();
    let mark = std::fs::read(mark_path(dir.path())).unwrap();
    let payload = "x".repeat(300);
    for i in 0..600 {
        s.enqueue(&k, qmsg(&format!("a/{i}"), &payload)).unwrap();
    }
    s.commit().unwrap();
    drop(s);
    let log = std::fs::read(log_path(dir.path())).unwrap();
    let fr = frames(&log);
    let first = frames(&before).len();
    assert!(fr.len() - first >= 3, "{} frames", fr.len() - first);
    // A crash while the commit was being written: every frame boundary and the middle
    // of every frame, with the mark as the commit before left it.
    let mut last = 0;
    for &(start, end) in &fr[first..] {
        for (cut, whole) in [((start + end) / 2, false), (end, true)] {
            let d = tempfile::tempdir().unwrap();
            std::fs::write(log_path(d.path()), &log[..cut]).unwrap();
            std::fs::write(mark_path(d.path()), &mark).unwrap();
            let s = open(d.path()).unwrap();
            let held = &all(&s)[0].messages;
            let topics: Vec<String> = held.values().map(|m| m.message.topic.clone()).collect();
            let expect: Vec<String> = (0..held.len()).map(|i| format!("a/{i}")).collect();
            assert_eq!(topics, expect, "cut at {cut}: a prefix, in order");
            if whole {
                assert!(held.len() > last, "cut at {cut}: each frame adds messages");
            } else {
                assert_eq!(held.len(), last, "cut at {cut}: a torn frame adds none");
            }
            last = held.len();
        }
    }
    assert_eq!(last, 600);
}

#[test]
fn a_version_1_log_is_read_and_rewritten_in_the_current_version() {
    static V1: Format = Format {
        version: 1,
        batched_since: None,
        ..SESSIONS
    };
    // The sessions a previous release stored, one frame per record.
    let src = tempfile::tempdir().unwrap();
    let expect = {
        let mut s = open(src.path()).unwrap();
        for c in ["one", "two"] {
            let k = skey(Some("a"), c);
            s.put_session(&k, meta(&["a/#"])).unwrap();
            for i in 0..3 {
                s.enqueue(&k, qmsg(&format!("a/{i}"), "m")).unwrap();
            }
        }
        s.mark_sent(&skey(Some("a"), "one"), 0, 7).unwrap();
        s.commit().unwrap();
        let records = s.state.snapshot_records();
        let dir = tempfile::tempdir().unwrap();
        let cipher = record::cipher(&key());
        let w = log::write_fresh_plain(&log_path(dir.path()), &cipher, &V1, records).unwrap();
        assert_eq!(
            w.next_seq as usize, w.records,
            "version 1: a frame per record"
        );
        let mark = Mark {
            current: Some(Vouch::of(&w)),
            next: None,
        };
        MarkFile::create(dir.path(), &cipher, &V1, &mark).unwrap();
        (all(&s), dir)
    };
    let (sessions, dir) = expect;
    let version = |d: &Path| {
        let b = std::fs::read(log_path(d)).unwrap();
        u32::from_le_bytes(b[8..12].try_into().unwrap())
    };
    assert_eq!(version(dir.path()), 1);
    // Without its mark it is refused as any session log is: version 1 always had one.
    let unmarked = copy_dir(dir.path());
    std::fs::remove_file(mark_path(unmarked.path())).unwrap();
    assert!(matches!(
        open(unmarked.path()).unwrap_err(),
        StoreError::MarkMissing { .. }
    ));
    let frames_before = frames(&std::fs::read(log_path(dir.path())).unwrap()).len();
    let mut s = open(dir.path()).unwrap();
    assert_eq!(all(&s), sessions);
    assert_eq!(version(dir.path()), SESSIONS.version);
    let frames_after = frames(&std::fs::read(log_path(dir.path())).unwrap()).len();
    assert!(
        frames_after < frames_before,
        "{frames_after} < {frames_before}"
    );
    // And it goes on from there, with its size bookkeeping in the current format's
    // terms: each record read from the old log counts what it takes in the rewritten
    // one, not its old frame (the estimate of what a compaction would keep was off by
    // 34 bytes per record, and removing everything took it below zero).
    s.enqueue(&skey(Some("a"), "two"), qmsg("a/3", "m"))
        .unwrap();
    s.commit().unwrap();
    assert!(s.remove_session(&skey(Some("a"), "one")).unwrap());
    let estimate = s.state.live_frame_bytes;
    s.compact().unwrap();
    let kept = s.state.live_frame_bytes;
    assert!(
        estimate.abs_diff(kept) <= 40,
        "estimated {estimate} bytes live, a compaction kept {kept}"
    );
    drop(s);
    assert_eq!(all(&open(dir.path()).unwrap()).len(), 1);
}
