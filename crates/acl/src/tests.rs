//! Decision tests on whole files: the examples of issue 4, built-in rules, loading.

use std::path::Path;

use crate::{Acl, AclError, Decision, Identity};

mod props;

const ISSUE_FILE: &str = "\
# anonymous clients (lines before the first `user`)
topic read public/#

user admin
topic readwrite #
topic read $SYS/#

user alice
topic readwrite alice/#
topic deny alice/secrets/#

pattern readwrite %u/#
pattern write devices/%c/telemetry
";

fn parse(text: &str) -> Acl {
    Acl::parse(Path::new("acl"), text).unwrap()
}

fn user<'a>(name: &'a str, client: &'a str) -> Identity<'a> {
    Identity {
        username: Some(name),
        client_id: client,
    }
}

const ANON: Identity<'static> = Identity {
    username: None,
    client_id: "anon-1",
};

fn allow(line: usize) -> Decision {
    Decision {
        allowed: true,
        line: Some(line),
    }
}

fn deny(line: usize) -> Decision {
    Decision {
        allowed: false,
        line: Some(line),
    }
}

#[test]
fn alice_subscriptions() {
    let acl = parse(ISSUE_FILE);
    let alice = user("alice", "a1");
    for refused in [
        "#",
        "+/#",
        "+/sensors/#",
        "bob/#",
        "+",
        "$SYS/#",
        "$share/g/#",
        "$share/g/bob/#",
    ] {
        assert_eq!(
            acl.check_subscribe(&alice, refused),
            Decision::NO_MATCH,
            "{refused}"
        );
    }
    for granted in ["alice/#", "alice/+/temp", "alice", "$share/g/alice/#"] {
        assert_eq!(acl.check_subscribe(&alice, granted), allow(9), "{granted}");
    }
    // Wholly inside the deny rule: refused, naming the deny line.
    assert_eq!(acl.check_subscribe(&alice, "alice/secrets/#"), deny(10));
    assert_eq!(acl.check_subscribe(&alice, "alice/secrets/+/x"), deny(10));
    // Only partly overlapping: granted, enforced per message.
    assert_eq!(acl.check_subscribe(&alice, "alice/+/x"), allow(9));
    assert_eq!(acl.check_read(&alice, "alice/secrets/x"), deny(10));
    assert_eq!(acl.check_read(&alice, "alice/public/x"), allow(9));
}

#[test]
fn alice_publish_and_read() {
    let acl = parse(ISSUE_FILE);
    let alice = user("alice", "a1");
    assert_eq!(acl.check_publish(&alice, "alice/x"), allow(9));
    assert_eq!(acl.check_publish(&alice, "alice/secrets/k"), deny(10));
    assert_eq!(acl.check_publish(&alice, "bob/x"), Decision::NO_MATCH);
    assert_eq!(acl.check_read(&alice, "bob/x"), Decision::NO_MATCH);
    assert_eq!(acl.check_read(&alice, "public/x"), Decision::NO_MATCH);
    // Invalid topic names are denied whatever the rules.
    assert_eq!(acl.check_publish(&alice, "alice/#"), Decision::NO_MATCH);
    assert_eq!(acl.check_publish(&alice, ""), Decision::NO_MATCH);
    assert_eq!(acl.check_subscribe(&alice, "alice/#/x"), Decision::NO_MATCH);
    assert_eq!(
        acl.check_subscribe(&alice, "$share/g+/alice/#"),
        Decision::NO_MATCH
    );
}

#[test]
fn patterns_apply_to_everyone() {
    let acl = parse(ISSUE_FILE);
    // bob has no section, only the patterns (written inside alice's section).
    let bob = user("bob", "dev7");
    assert_eq!(acl.check_read(&bob, "bob/x"), allow(12));
    assert_eq!(acl.check_subscribe(&bob, "bob/#"), allow(12));
    assert_eq!(acl.check_subscribe(&bob, "alice/#"), Decision::NO_MATCH);
    assert_eq!(acl.check_publish(&bob, "devices/dev7/telemetry"), allow(13));
    assert_eq!(
        acl.check_read(&bob, "devices/dev7/telemetry"),
        Decision::NO_MATCH
    );
    assert_eq!(
        acl.check_publish(&bob, "devices/dev8/telemetry"),
        Decision::NO_MATCH
    );
    // %c works for anonymous clients too, %u never does.
    assert_eq!(
        acl.check_publish(&ANON, "devices/anon-1/telemetry"),
        allow(13)
    );
    assert_eq!(acl.check_publish(&ANON, "anon-1/x"), Decision::NO_MATCH);
}

#[test]
fn anonymous_and_admin() {
    let acl = parse(ISSUE_FILE);
    assert_eq!(acl.check_read(&ANON, "public/news"), allow(2));
    assert_eq!(acl.check_subscribe(&ANON, "public/#"), allow(2));
    assert_eq!(acl.check_publish(&ANON, "public/news"), Decision::NO_MATCH);
    assert_eq!(acl.check_subscribe(&ANON, "#"), Decision::NO_MATCH);
    let admin = user("admin", "root");
    assert_eq!(acl.check_read(&admin, "alice/secrets/x"), allow(5));
    assert_eq!(acl.check_subscribe(&admin, "#"), allow(5));
    assert_eq!(acl.check_read(&admin, "$SYS/uptime"), allow(6));
    assert_eq!(acl.check_subscribe(&admin, "$SYS/#"), allow(6));
    assert_eq!(acl.check_publish(&admin, "$SYS/uptime"), Decision::NO_MATCH);
}

#[test]
fn crafted_identities_never_fill_patterns() {
    let acl = parse(ISSUE_FILE);
    for name in ["+", "#", "a/b", "a\0", "a\tb", "", "$SYS"] {
        let who = user(name, "c");
        for topic in ["a/b", "+/x", "$SYS/x", "x", "/b"] {
            assert!(!acl.check_read(&who, topic).allowed, "{name:?} {topic:?}");
        }
        for filter in ["#", "+/#", "a/#", "$SYS/#"] {
            assert!(
                !acl.check_subscribe(&who, filter).allowed,
                "{name:?} {filter:?}"
            );
        }
        let dev = Identity {
            username: Some("bob"),
            client_id: name,
        };
        assert!(!acl.check_publish(&dev, "devices/a/b/telemetry").allowed);
        assert!(!acl.check_publish(&dev, "devices//telemetry").allowed);
    }
}

#[test]
fn deny_wins_wherever_it_is() {
    let acl =
        parse("user u\ntopic read a/#\ntopic read a/b/#\ntopic deny a/b/c\npattern read %u/#\n");
    let u = user("u", "c");
    assert_eq!(acl.check_read(&u, "a/b/c"), deny(4));
    assert_eq!(acl.check_read(&u, "a/b/d"), allow(2));
    assert_eq!(acl.check_subscribe(&u, "a/b/c"), deny(4));
    assert_eq!(acl.check_subscribe(&u, "a/b/+"), allow(2));
    // Deny listed first still reports itself.
    let acl2 = parse("user u\ntopic deny x\ntopic x\n");
    assert_eq!(acl2.check_publish(&u, "x"), deny(2));
    // A deny of one kind of access is still a deny: `deny` has no read/write split.
    let acl3 = parse("topic write x\ntopic deny x\n");
    assert_eq!(acl3.check_publish(&ANON, "x"), deny(2));
}

#[test]
fn read_and_write_are_separate() {
    let acl = parse("user u\ntopic read r\ntopic write w\ntopic rw\n");
    let u = user("u", "c");
    assert_eq!(acl.check_read(&u, "r"), allow(2));
    assert_eq!(acl.check_publish(&u, "r"), Decision::NO_MATCH);
    assert_eq!(acl.check_publish(&u, "w"), allow(3));
    assert_eq!(acl.check_read(&u, "w"), Decision::NO_MATCH);
    assert_eq!(acl.check_subscribe(&u, "w"), Decision::NO_MATCH);
    assert_eq!(acl.check_read(&u, "rw"), allow(4));
    assert_eq!(acl.check_publish(&u, "rw"), allow(4));
}

#[test]
fn topics_with_spaces_and_repeated_sections() {
    let acl = parse("user u\ntopic read my room/#\nuser v\ntopic x\nuser u\ntopic write y z\n");
    let u = user("u", "c");
    assert_eq!(acl.check_read(&u, "my room/lamp"), allow(2));
    assert_eq!(acl.check_publish(&u, "y z"), allow(6));
    assert_eq!(acl.check_publish(&u, "x"), Decision::NO_MATCH);
    assert_eq!(acl.rule_count(), 3);
}

#[test]
fn builtin_default_rules() {
    let acl = Acl::builtin_default();
    assert!(acl.is_builtin());
    assert_eq!(acl.file_name(), None);
    let yes = Decision {
        allowed: true,
        line: None,
    };
    assert_eq!(acl.check_publish(&ANON, "any/topic"), yes);
    assert_eq!(acl.check_read(&ANON, "any/topic"), yes);
    assert_eq!(acl.check_subscribe(&ANON, "#"), yes);
    assert_eq!(acl.check_read(&ANON, "$SYS/uptime"), Decision::NO_MATCH);
    assert_eq!(acl.check_subscribe(&ANON, "$SYS/#"), Decision::NO_MATCH);
    let alice = user("alice", "a1");
    assert_eq!(acl.check_publish(&alice, "alice/x"), yes);
    assert_eq!(acl.check_subscribe(&alice, "alice/#"), yes);
    assert_eq!(acl.check_read(&alice, "bob/x"), Decision::NO_MATCH);
    assert_eq!(acl.check_subscribe(&alice, "#"), Decision::NO_MATCH);
    assert_eq!(acl.check_subscribe(&alice, "+/#"), Decision::NO_MATCH);
    assert!(!acl.check_read(&user("$SYS", "c"), "$SYS/x").allowed);
}

#[test]
fn empty_file_denies_everything() {
    let acl = parse("# nothing\n\n");
    assert_eq!(acl.check_read(&ANON, "a"), Decision::NO_MATCH);
    assert_eq!(
        acl.check_subscribe(&user("u", "c"), "a"),
        Decision::NO_MATCH
    );
    assert_eq!(acl.file_name(), Some(Path::new("acl")));
}

#[test]
fn load_reads_files_and_reports_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("aclfile");
    std::fs::write(&path, ISSUE_FILE).unwrap();
    let acl = Acl::load(&path).unwrap();
    assert_eq!(acl.file_name(), Some(path.as_path()));
    assert_eq!(acl.check_read(&user("alice", "a"), "alice/x"), allow(9));

    std::fs::write(&path, b"topic a\ntopic b\ntopic \xff\n").unwrap();
    match Acl::load(&path) {
        Err(AclError::Parse {
            file,
            line: 3,
            reason,
        }) => {
            assert_eq!(file, path);
            assert_eq!(reason, "not valid UTF-8");
        }
        other => panic!("{other:?}"),
    }

    let missing = dir.path().join("missing");
    match Acl::load(&missing) {
        Err(AclError::Io { file, source }) => {
            assert_eq!(file, missing);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn acl_is_shareable() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<Acl>();
    assert_send_sync::<AclError>();
}

/// Every file in `testdata/invalid` (a corpus of known-bad inputs) is rejected with a
/// parse error naming a line, never accepted and never a panic.
#[test]
fn invalid_corpus_is_rejected() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/invalid");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        match Acl::load(&path) {
            Err(AclError::Parse { file, line, .. }) => {
                assert_eq!(file, path);
                assert!(line >= 1, "{}", path.display());
            }
            other => panic!("{}: {other:?}", path.display()),
        }
        seen += 1;
    }
    assert!(seen >= 10);
}

#[test]
fn digest_is_of_the_text_parsed() {
    let a = parse("user alice\ntopic read a/#\n");
    assert_eq!(a.digest(), parse("user alice\ntopic read a/#\n").digest());
    assert_ne!(
        a.digest(),
        parse("user alice\ntopic readwrite a/#\n").digest()
    );
    assert!(a.digest().is_some());
    assert_eq!(Acl::builtin_default().digest(), None);
}
