//! Property tests: the matcher and the coverage check against brute force.

use std::path::Path;

use proptest::prelude::*;

use crate::{topic_matches_filter, valid_topic_filter, Acl, Identity};

/// Few distinct level names, so generated topics, filters and rules overlap often.
fn level() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("a".to_owned()),
        Just("b".to_owned()),
        Just("alice".to_owned()),
        Just("$s".to_owned()),
        Just(String::new()),
    ]
}

fn topic() -> impl Strategy<Value = String> {
    prop::collection::vec(level(), 1..5)
        .prop_map(|l| l.join("/"))
        .prop_filter("topic names are non-empty", |t| !t.is_empty())
}

/// A valid filter: levels or `+`, optionally ending in `#`.
fn filter() -> impl Strategy<Value = String> {
    let lvl = prop_oneof![3 => level(), 1 => Just("+".to_owned())];
    (prop::collection::vec(lvl, 0..4), any::<bool>()).prop_map(|(mut l, hash)| {
        if hash || l.concat().is_empty() {
            l.push("#".to_owned());
        }
        l.join("/")
    })
}

/// An ACL line for user alice: (keyword, access word, topic).
fn rule() -> impl Strategy<Value = (bool, &'static str, String)> {
    let access = prop::sample::select(vec!["read", "write", "readwrite", "deny", ""]);
    let topic = prop_oneof![4 => filter(), 1 => filter().prop_map(|f| format!("%u/{f}"))];
    (any::<bool>(), access, topic)
}

/// Builds `user alice` + rules; returns the text and, per line, whether it is a deny.
fn acl_text(rules: &[(bool, &str, String)]) -> (String, Vec<bool>) {
    let mut text = String::from("user alice\n");
    let mut is_deny = vec![false, false];
    for (pattern, access, topic) in rules {
        let kw = if *pattern { "pattern" } else { "topic" };
        text.push_str(&format!("{kw} {access} {topic}\n").replace("  ", " "));
        is_deny.push(*access == "deny");
    }
    (text, is_deny)
}

/// A topic matched by `filter`, filling wildcards from `pool`.
fn instantiate(filter: &str, pool: &[String], extra: usize) -> String {
    let mut pool = pool.iter().cycle();
    let mut out: Vec<String> = Vec::new();
    for f in filter.split('/') {
        match f {
            "+" => out.push(pool.next().cloned().unwrap_or_default()),
            "#" => out.extend(pool.by_ref().take(extra).cloned()),
            _ => out.push(f.to_owned()),
        }
    }
    out.join("/")
}

const ALICE: Identity<'static> = Identity {
    username: Some("alice"),
    client_id: "c1",
};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// If a subscription is granted, every topic it can match is readable (unless a deny
    /// rule matches that topic), and the one granting line alone allows it.
    #[test]
    fn coverage_agrees_with_brute_force(
        rules in prop::collection::vec(rule(), 0..6),
        sub in filter(),
        pool in prop::collection::vec(level(), 1..4),
        extra in 0usize..3,
        randoms in prop::collection::vec(topic(), 0..8),
    ) {
        let (text, is_deny) = acl_text(&rules);
        let acl = Acl::parse(Path::new("p"), &text).unwrap();
        let decision = acl.check_subscribe(&ALICE, &sub);
        if let (true, Some(line)) = (decision.allowed, decision.line) {
            let granting = text.lines().nth(line - 1).unwrap_or_default();
            let single = Acl::parse(Path::new("s"), &format!("user alice\n{granting}\n")).unwrap();
            let candidates = randoms.iter().cloned().chain(std::iter::once(instantiate(&sub, &pool, extra)));
            for t in candidates.filter(|t| topic_matches_filter(&sub, t)) {
                let read = acl.check_read(&ALICE, &t);
                prop_assert!(
                    read.allowed || read.line.is_some_and(|l| is_deny[l]),
                    "filter {sub:?} granted but topic {t:?} refused by {read:?}\n{text}"
                );
                prop_assert!(single.check_read(&ALICE, &t).allowed, "line {line} does not cover {t:?}");
            }
        }
    }

    /// A filter written exactly like a read grant is granted unless a deny covers it.
    #[test]
    fn identical_filter_is_covered(f in filter(), acc in prop::sample::select(vec!["read", "readwrite", ""])) {
        let acl = Acl::parse(Path::new("p"), &format!("user alice\ntopic {acc} {f}\n").replace("  ", " ")).unwrap();
        prop_assert!(acl.check_subscribe(&ALICE, &f).allowed);
    }

    /// `p/#` matches `p` and everything below it.
    #[test]
    fn hash_matches_everything_below(prefix in topic(), suffix in topic()) {
        let f = format!("{prefix}/#");
        prop_assert!(valid_topic_filter(&f));
        prop_assert!(topic_matches_filter(&f, &prefix));
        let acl = Acl::parse(Path::new("p"), &format!("topic read {f}\n")).unwrap();
        let anon = Identity { username: None, client_id: "c" };
        let below = format!("{prefix}/{suffix}");
        prop_assert!(topic_matches_filter(&f, &below));
        prop_assert!(acl.check_read(&anon, &below).allowed);
        if !suffix.starts_with('$') {
            prop_assert!(topic_matches_filter("#", &suffix));
        }
    }

    /// A bare `#` (or leading `+`) never reaches `$SYS/...`, in filters or in rules.
    #[test]
    fn bare_hash_never_matches_sys(suffix in topic()) {
        let t = format!("$SYS/{suffix}");
        for f in ["#", "+/#", "+", "+/+", "+/+/#"] {
            prop_assert!(!topic_matches_filter(f, &t));
        }
        let acl = Acl::parse(Path::new("p"), "topic #\ntopic +/#\npattern #\nuser u\ntopic #\n").unwrap();
        for who in [Identity { username: None, client_id: "c" }, Identity { username: Some("u"), client_id: "c" }] {
            prop_assert!(!acl.check_read(&who, &t).allowed);
            prop_assert!(!acl.check_publish(&who, &t).allowed);
            prop_assert!(!acl.check_subscribe(&who, "$SYS/#").allowed);
        }
    }

    /// A matching deny rule refuses, whatever grants surround it, and names itself.
    #[test]
    fn deny_beats_any_grant(
        before in prop::collection::vec(rule(), 0..4),
        denied in filter(),
        after in prop::collection::vec(rule(), 0..4),
        pool in prop::collection::vec(level(), 1..4),
        extra in 0usize..3,
    ) {
        let mut rules = before;
        rules.push((false, "deny", denied.clone()));
        rules.extend(after);
        let (text, is_deny) = acl_text(&rules);
        let acl = Acl::parse(Path::new("p"), &text).unwrap();
        let t = instantiate(&denied, &pool, extra);
        if topic_matches_filter(&denied, &t) {
            for d in [acl.check_read(&ALICE, &t), acl.check_publish(&ALICE, &t)] {
                prop_assert!(!d.allowed);
                prop_assert!(d.line.is_some_and(|l| is_deny[l]), "{d:?}");
            }
            prop_assert!(!acl.check_subscribe(&ALICE, &denied).allowed);
        }
    }

    /// Arbitrary text never panics the parser, and arbitrary inputs never panic checks.
    #[test]
    fn nothing_panics(text in ".{0,200}", user in ".{0,8}", client in ".{0,8}", t in ".{0,20}") {
        let parsed = Acl::parse(Path::new("fuzz"), &text);
        let acl = parsed.unwrap_or_else(|_| Acl::builtin_default());
        for who in [Identity { username: Some(&user), client_id: &client }, Identity { username: None, client_id: &client }] {
            let _ = acl.check_read(&who, &t);
            let _ = acl.check_publish(&who, &t);
            let _ = acl.check_subscribe(&who, &t);
        }
        let _ = topic_matches_filter(&t, &text);
    }
}
