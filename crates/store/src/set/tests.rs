//! The set's order, filters and limits (ported from the broker's former `RetainedIndex`).

use super::*;

/// A message of `alice`'s whose record takes `size` bytes (topics of one length).
fn sized(topic: &str, size: u64, owner: &str) -> RetainedMessage {
    let mut m = RetainedMessage {
        topic: topic.to_owned(),
        payload: Vec::new(),
        qos: 1,
        properties: None,
        expires_at: None,
        owner: Some(owner.to_owned()),
    };
    let base = stored_bytes(&m);
    m.payload = vec![b'x'; (size - base) as usize];
    assert_eq!(stored_bytes(&m), size, "payload length prefix grew");
    m
}

/// The smallest record size the tests use: room for payloads up to ~120 bytes.
fn unit() -> u64 {
    stored_bytes(&sized_base("t/xx", "alice")) + 10
}

fn sized_base(topic: &str, owner: &str) -> RetainedMessage {
    RetainedMessage {
        topic: topic.to_owned(),
        payload: Vec::new(),
        qos: 1,
        properties: None,
        expires_at: None,
        owner: Some(owner.to_owned()),
    }
}

fn entry(topic: &str) -> RetainedMessage {
    sized(topic, unit(), "alice")
}

fn limits(max_messages: usize, max_bytes: u64) -> StoreLimits {
    StoreLimits {
        max_messages,
        max_bytes,
        max_messages_per_user: 0,
        max_bytes_per_user: 0,
    }
}

fn topics(set: &RetainedSet, filter: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut batch = Vec::new();
        let more = set.matching(filter, after.as_deref(), 2, &mut batch);
        after = batch.last().map(|m| m.topic.clone()).or(after);
        out.extend(batch.into_iter().map(|m| m.topic.clone()));
        if !more {
            return out;
        }
    }
}

#[test]
fn prefixes() {
    assert_eq!(literal_prefix("a/b/#"), "a/b");
    assert_eq!(literal_prefix("a/+/c"), "a");
    assert_eq!(literal_prefix("#"), "");
    assert_eq!(literal_prefix("+/x"), "");
    assert_eq!(literal_prefix("a/b"), "a/b");
}

#[test]
fn matching_walks_in_batches_and_respects_wildcards() {
    let set = RetainedSet::new(limits(100, 1 << 20));
    for t in ["a", "a/b", "a/c/d", "ab/x", "b", "$SYS/x"] {
        set.set(entry(t)).unwrap();
    }
    assert_eq!(topics(&set, "a/#"), vec!["a", "a/b", "a/c/d"]);
    assert_eq!(topics(&set, "#"), vec!["a", "a/b", "a/c/d", "ab/x", "b"]);
    assert_eq!(topics(&set, "+/x"), vec!["ab/x"]);
    assert_eq!(topics(&set, "a/b"), vec!["a/b"]);
    assert_eq!(topics(&set, "$SYS/#"), vec!["$SYS/x"]);
    set.clear("a/b");
    assert_eq!(topics(&set, "a/#"), vec!["a", "a/c/d"]);
}

#[test]
fn bounds_refuse_what_grows_past_them() {
    let u = unit();
    let set = RetainedSet::new(limits(2, 1 << 20));
    set.set(entry("t/x1")).unwrap();
    set.set(entry("t/y1")).unwrap();
    assert_eq!(set.set(entry("t/z1")), Err(Refusal::Messages));
    // Replacing is not a new message.
    set.set(entry("t/x1")).unwrap();
    set.clear("t/y1");
    set.set(entry("t/z1")).unwrap();

    let small = RetainedSet::new(limits(10, 3 * u));
    small.set(sized("t/a1", 2 * u, "alice")).unwrap();
    assert_eq!(
        small.set(sized("t/b1", 2 * u, "alice")),
        Err(Refusal::Bytes)
    );
    // A replacement may not grow past the bound either (or replacing a small message
    // would get round it), but it may shrink.
    small.set(sized("t/b1", u, "alice")).unwrap();
    assert_eq!(
        small.set(sized("t/b1", u + 1, "alice")),
        Err(Refusal::Bytes)
    );
    small.set(sized("t/a1", u, "alice")).unwrap();
    small.set(sized("t/b1", 2 * u, "alice")).unwrap();
    assert_eq!(small.bytes(), 3 * u);
}

#[test]
fn per_user_bounds_count_each_owner() {
    let u = unit();
    let set = RetainedSet::new(StoreLimits {
        max_messages: 100,
        max_bytes: 1 << 20,
        max_messages_per_user: 2,
        max_bytes_per_user: 3 * u,
    });
    set.set(sized("a/1", 2 * u, "alice")).unwrap();
    set.set(sized("a/2", u, "alice")).unwrap();
    assert_eq!(
        set.set(sized("a/3", u, "alice")),
        Err(Refusal::UserMessages)
    );
    // Her own replacement counts once; growing past her bytes does not pass.
    set.set(sized("a/2", u, "alice")).unwrap();
    assert_eq!(
        set.set(sized("a/2", u + 1, "alice")),
        Err(Refusal::UserBytes)
    );
    assert_eq!(
        set.usage("alice"),
        Usage {
            messages: 2,
            bytes: 3 * u
        }
    );
    // Bob is not affected by her being full.
    set.set(sized("b/1", 2 * u, "bob")).unwrap();
    // Bob replacing her message takes it over: hers is freed, his is charged.
    set.set(sized("a/1", u, "bob")).unwrap();
    assert_eq!(set.usage("alice").messages, 1);
    assert_eq!(set.usage("bob").messages, 2);
    set.set(sized("a/3", u, "alice")).unwrap();
    // Clearing frees.
    set.clear("a/3");
    set.clear("a/2");
    assert_eq!(set.usage("alice"), Usage::default());
}

#[test]
fn loading_keeps_everything_and_counts_legacy_owners() {
    fn first_level(topic: &str) -> &str {
        topic.split('/').next().unwrap_or_default()
    }
    let set = RetainedSet::with_legacy_owner(
        StoreLimits {
            max_messages: 2,
            max_messages_per_user: 1,
            ..StoreLimits::UNLIMITED
        },
        first_level,
    );
    let mut items = Items::new();
    for t in ["c/1", "c/2", "c/3"] {
        let mut m = entry(t);
        m.owner = None;
        items.insert(Item(Arc::new(m)));
    }
    set.load(items);
    // Past both bounds, all kept and served; more is refused until under them.
    assert_eq!(set.len(), 3);
    assert_eq!(set.usage("c").messages, 3);
    assert_eq!(topics(&set, "c/#").len(), 3);
    assert_eq!(set.set(entry("d/1")), Err(Refusal::Messages));
    let mut m = entry("c/1");
    m.owner = None;
    set.set(m).unwrap();
}

#[test]
fn expired_messages_are_not_returned() {
    let set = RetainedSet::new(limits(10, 1 << 20));
    let mut e = entry("gone");
    e.expires_at = Some(1);
    set.set(e).unwrap();
    assert!(topics(&set, "#").is_empty());
    assert!(topics(&set, "gone").is_empty());
}

#[test]
fn expired_messages_stop_counting() {
    let set = RetainedSet::new(StoreLimits {
        max_messages: 2,
        max_bytes: 1 << 20,
        max_messages_per_user: 1,
        max_bytes_per_user: 0,
    });
    let mut e = entry("soon");
    e.expires_at = Some(now_unix() + 1000);
    set.set(e).unwrap();
    assert_eq!(set.set(entry("other")), Err(Refusal::UserMessages));
    let mut e = entry("soon");
    e.expires_at = Some(1);
    set.set(e).unwrap();
    set.set(entry("other")).unwrap();
    assert_eq!(set.usage("alice").messages, 1);
    assert_eq!(set.len(), 1);
}

#[test]
fn changes_are_recorded_only_for_a_log() {
    let set = RetainedSet::new(StoreLimits::UNLIMITED);
    set.set(entry("a")).unwrap();
    assert_eq!(set.pending(), 0);
    assert!(set.take_dirty().is_empty());
    set.load(Items::new());
    set.set(entry("a")).unwrap();
    set.set(entry("b")).unwrap();
    set.clear("b");
    let mut taken = set.take_dirty();
    taken.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(taken.len(), 2);
    assert_eq!(taken[0].1.as_deref(), Some(&entry("a")));
    assert_eq!(taken[1], ("b".to_owned(), None));
    assert_eq!(set.pending(), 0);
    set.restore_dirty(["b".to_owned()]);
    assert_eq!(set.pending(), 1);
}

/// Readers are not held up by a save: the log takes `Arc` clones and writes unlocked.
#[test]
fn a_reader_gets_its_batch_while_changes_are_taken() {
    let set = RetainedSet::new(StoreLimits::UNLIMITED);
    set.load(Items::new());
    for i in 0..1000 {
        set.set(entry(&format!("t/{i:04}"))).unwrap();
    }
    let taken = set.take_dirty();
    // Holding what a flush would write does not lock the set.
    let mut out = Vec::new();
    assert!(set.matching("t/#", None, 10, &mut out));
    assert_eq!(out.len(), 10);
    assert!(Arc::ptr_eq(
        &out[0],
        taken
            .iter()
            .find(|c| c.0 == "t/0000")
            .unwrap()
            .1
            .as_ref()
            .unwrap()
    ));
}

/// The broker's `$SYS` tree: served from the set, never written, outside every bound.
#[test]
fn memory_only_topics_are_served_but_never_logged_or_counted() {
    let sys = |t: &str| t.starts_with("$SYS/");
    let set = RetainedSet::new(limits(1, unit())).with_memory_only(sys);
    set.load(Items::new());
    set.set(entry("a")).unwrap();
    assert_eq!(set.take_dirty().len(), 1);
    // The set is full (one message, all its bytes), yet the tree goes in.
    set.set(sized_base("$SYS/broker/uptime", "/broker"))
        .unwrap();
    set.set(sized_base("$SYS/broker/version", "/broker"))
        .unwrap();
    assert_eq!(set.len(), 1);
    assert_eq!(set.bytes(), unit());
    assert_eq!(set.usage("/broker"), Usage::default());
    assert_eq!(set.pending(), 0, "not marked for the log");
    assert!(set.take_dirty().is_empty());
    assert_eq!(
        topics(&set, "$SYS/#"),
        ["$SYS/broker/uptime", "$SYS/broker/version"]
    );
    let snapshot: Vec<_> = set
        .begin_snapshot(0)
        .iter()
        .map(|m| m.topic.clone())
        .collect();
    assert_eq!(snapshot, ["a"], "left out of compactions");
    set.abort_snapshot();
    set.clear("$SYS/broker/uptime");
    assert_eq!(set.pending(), 0);
    assert_eq!(topics(&set, "$SYS/#"), ["$SYS/broker/version"]);
    // Still full for everyone else.
    assert_eq!(set.set(entry("b")), Err(Refusal::Messages));
}
