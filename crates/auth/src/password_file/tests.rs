use super::*;
use proptest::prelude::*;

fn file() -> &'static Path {
    Path::new("passwd")
}

/// Asserts that parsing fails on `line` with a reason containing `reason`.
fn assert_parse_error(text: &str, line: usize, reason: &str) {
    match PasswordFile::parse(file(), text) {
        Err(AuthError::Parse {
            file: f,
            line: l,
            reason: r,
        }) => {
            assert_eq!(f, file());
            assert_eq!(l, line, "line for {text:?}: {r}");
            assert!(r.contains(reason), "reason {r:?} should contain {reason:?}");
        }
        other => panic!("expected a parse error for {text:?}, got {other:?}"),
    }
}

fn pbkdf2_line(user: &str, password: &[u8]) -> String {
    format!(
        "{user}:{}",
        crate::legacy::tests::pbkdf2_vector(password, 101, b"0123456789ab")
    )
}

#[test]
fn parses_comments_blank_lines_and_users() {
    let alice = hash_password(b"alice-pw").unwrap();
    let text = format!(
        "# moatmq users\n\n  # indented comment\nalice:{alice}\r\n{}\n   \n",
        pbkdf2_line("bob", b"bob-pw")
    );
    let pf = PasswordFile::parse(file(), &text).unwrap();
    assert_eq!(pf.len(), 2);
    assert!(!pf.is_empty());
    assert_eq!(pf.verify("alice", b"alice-pw"), Verdict::Accepted);
    assert_eq!(pf.verify("bob", b"bob-pw"), Verdict::AcceptedLegacyHash);

    let empty = PasswordFile::parse(file(), "# nobody\n").unwrap();
    assert!(empty.is_empty());
    assert_eq!(empty.verify("alice", b"alice-pw"), Verdict::Rejected);
}

#[test]
fn bad_lines_are_reported_with_their_number() {
    let good = hash_password(b"x").unwrap();
    assert_parse_error(
        &format!("# c\nalice:{good}\nno colon here\n"),
        3,
        "missing ':'",
    );
    assert_parse_error(&format!("\n\na/b:{good}\n"), 3, "not a valid identity");
    assert_parse_error(&format!("+:{good}\n"), 1, "not a valid identity");
    assert_parse_error(&format!(":{good}\n"), 1, "not a valid identity");
    assert_parse_error(&format!("alice :{good}\n"), 1, "whitespace");
    assert_parse_error("alice:\n", 1, "empty hash");
    assert_parse_error("alice:plaintext\n", 1, "unsupported hash format");
    assert_parse_error("alice:$argon2id$garbage\n", 1, "without salt or hash");
    assert_parse_error("alice:$argon2id$$$$\n", 1, "malformed Argon2");
    assert_parse_error(
        "alice:$argon2x$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo\n",
        1,
        "unknown Argon2 variant",
    );
    assert_parse_error(
        &format!("alice:{good}\nbob:{good}\nalice:{good}\n"),
        3,
        "duplicate user \"alice\" (first defined on line 1)",
    );
    assert_parse_error("alice:$7$101$AAAA$AAAA\n", 1, "not 64 bytes");
    // Absurd costs are refused rather than stalling a login.
    let huge = good.replace("m=19456", "m=4000000");
    assert_parse_error(&format!("alice:{huge}\n"), 1, "too expensive");
}

#[test]
fn parse_errors_never_echo_the_hash() {
    let secretish = "$argon2id$v=19$m=19456,t=2,p=1$c2VjcmV0c2FsdA$SECRETSECRET";
    let err = PasswordFile::parse(file(), &format!("alice:{secretish}\n")).unwrap_err();
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains("SECRET"), "{shown}");
    let err = PasswordFile::parse(file(), "hunter2\n").unwrap_err();
    assert!(!format!("{err} {err:?}").contains("hunter2"));
    assert_eq!(
        err.to_string(),
        "passwd:1: missing ':' between username and hash"
    );
}

#[test]
fn debug_redacts_hashes() {
    let hash = hash_password(b"pw").unwrap();
    let pf = PasswordFile::parse(file(), &format!("alice:{hash}\n")).unwrap();
    let shown = format!("{pf:?}");
    assert!(!shown.contains("argon2"), "{shown}");
    assert!(!shown.contains(&hash), "{shown}");
    assert!(shown.contains("users: 1"), "{shown}");
}

#[test]
fn verify_right_wrong_and_unknown() {
    let hash = hash_password(b"correct horse").unwrap();
    let pf = PasswordFile::parse(file(), &format!("alice:{hash}\n")).unwrap();
    assert_eq!(pf.verify("alice", b"correct horse"), Verdict::Accepted);
    assert_eq!(pf.verify("alice", b"correct horsf"), Verdict::Rejected);
    assert_eq!(pf.verify("alice", b""), Verdict::Rejected);
    assert_eq!(pf.verify("Alice", b"correct horse"), Verdict::Rejected);
    assert_eq!(pf.verify("mallory", b"correct horse"), Verdict::Rejected);
}

/// Unknown users and legacy users must not answer measurably faster than a real
/// Argon2id user, nor faster than a `$7$` entry with a raised iteration count (generous
/// bound so the test is not flaky).
#[test]
fn unknown_and_legacy_users_cost_the_slowest_entry() {
    let hash = hash_password(b"pw").unwrap();
    let slow7 = crate::legacy::tests::pbkdf2_vector(b"pw", 20_000, b"0123456789ab");
    let text = format!(
        "alice:{hash}\n{}\ncarol:{slow7}\n",
        pbkdf2_line("bob", b"pw")
    );
    let pf = PasswordFile::parse(file(), &text).unwrap();
    // Interleaved rounds, fastest of each: robust against other tests loading the CPU.
    let mut best = [std::time::Duration::MAX; 4];
    for _ in 0..4 {
        for (i, user) in ["alice", "mallory", "bob", "carol"].into_iter().enumerate() {
            let start = std::time::Instant::now();
            pf.verify(user, b"wrong");
            best[i] = best[i].min(start.elapsed());
        }
    }
    let [real, unknown, legacy, slow] = best;
    assert!(unknown * 2 > real, "unknown {unknown:?} vs real {real:?}");
    assert!(legacy * 2 > real, "legacy {legacy:?} vs real {real:?}");
    assert!(
        unknown * 2 > slow,
        "unknown {unknown:?} vs slow $7$ {slow:?}"
    );
}

#[test]
fn hash_password_round_trip_and_parameters() {
    let a = hash_password(b"pw").unwrap();
    let b = hash_password(b"pw").unwrap();
    assert!(a.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{a}");
    assert_ne!(a, b, "salts are random");
    assert!(verify_argon2(&a, b"pw"));
    assert!(!verify_argon2(&a, b"pW"));
}

#[test]
fn dummy_work_uses_the_default_parameters_without_argon2_entries() {
    let pf = PasswordFile::parse(file(), "").unwrap();
    let (verdict, work) = pf.verify_counted("nobody", b"pw");
    assert_eq!(verdict, Verdict::Rejected);
    assert_eq!(work.argon2, Some((19_456, 2, 1)));
    assert_eq!(work.pbkdf2_iterations, 0);
    let real = PasswordHash::new(&hash_password(b"x").unwrap())
        .map(|h| Params::try_from(&h).unwrap())
        .unwrap();
    assert_eq!(costs(&default_params()), costs(&real));
}

/// A `$7$` entry with a raised iteration count must not answer slower than an unknown
/// user (issue 11): every check does the work of the file's slowest entry.
#[test]
fn every_check_costs_the_slowest_entry() {
    let alice = hash_password(b"alice-pw").unwrap();
    let slow7 = crate::legacy::tests::pbkdf2_vector(b"carol-pw", 5_000, b"0123456789ab");
    let six = {
        use sha2::Digest;
        let mut d = sha2::Sha512::new();
        d.update(b"dave-pw");
        d.update(b"saltsaltsalt");
        let hash: [u8; 64] = d.finalize().into();
        crate::legacy::LegacyHash::Sha512 {
            salt: b"saltsaltsalt".to_vec(),
            hash,
        }
        .to_mosquitto_string()
    };
    let text = format!(
        "alice:{alice}\n{}\ncarol:{slow7}\ndave:{six}\n",
        pbkdf2_line("bob", b"bob-pw")
    );
    let pf = PasswordFile::parse(file(), &text).unwrap();
    let expected = Work {
        argon2: Some((19_456, 2, 1)),
        pbkdf2_iterations: 5_000,
    };
    for (user, right) in [
        ("nobody", "x"),
        ("alice", "alice-pw"),
        ("bob", "bob-pw"),
        ("carol", "carol-pw"),
        ("dave", "dave-pw"),
    ] {
        for pw in [right, "wrong"] {
            let (_, work) = pf.verify_counted(user, pw.as_bytes());
            assert_eq!(work, expected, "{user} with {pw:?}");
        }
    }
    assert_eq!(pf.verify("carol", b"carol-pw"), Verdict::AcceptedLegacyHash);
    assert_eq!(pf.verify("dave", b"dave-pw"), Verdict::AcceptedLegacyHash);
    assert_eq!(pf.verify("alice", b"alice-pw"), Verdict::Accepted);

    // A raised Argon2 entry raises everyone's Argon2 work; a reload without the slow
    // `$7$` entry (a new parse) lowers the PBKDF2 padding again.
    let raised_params = Params::new(ARGON2_M_COST_KIB, ARGON2_T_COST + 1, 1, None).unwrap();
    let raised = Argon2::new(Algorithm::Argon2id, Version::V0x13, raised_params.clone())
        .hash_password(b"erin-pw", &SaltString::generate(&mut OsRng))
        .unwrap()
        .to_string();
    let text = format!(
        "alice:{alice}\nerin:{raised}\n{}\n",
        pbkdf2_line("bob", b"bob-pw")
    );
    let pf = PasswordFile::parse(file(), &text).unwrap();
    let expected = Work {
        argon2: Some(costs(&raised_params)),
        pbkdf2_iterations: 101,
    };
    for user in ["nobody", "bob", "erin"] {
        assert_eq!(pf.verify_counted(user, b"wrong").1, expected, "{user}");
    }
    assert_eq!(pf.verify("erin", b"erin-pw"), Verdict::Accepted);
}

#[test]
fn other_argon2_variants_are_accepted() {
    let params = Params::new(1024, 1, 1, None).unwrap();
    for alg in [Algorithm::Argon2i, Algorithm::Argon2d, Algorithm::Argon2id] {
        let salt = SaltString::generate(&mut OsRng);
        let phc = Argon2::new(alg, Version::V0x13, params.clone())
            .hash_password(b"pw", &salt)
            .unwrap()
            .to_string();
        let pf = PasswordFile::parse(file(), &format!("u:{phc}\n")).unwrap();
        assert_eq!(pf.verify("u", b"pw"), Verdict::Accepted, "{alg:?}");
        assert_eq!(pf.verify("u", b"px"), Verdict::Rejected, "{alg:?}");
    }
}

#[test]
fn mosquitto_7_computed_vector_is_legacy() {
    let pf = PasswordFile::parse(file(), &pbkdf2_line("bob", b"hunter2")).unwrap();
    assert_eq!(pf.verify("bob", b"hunter2"), Verdict::AcceptedLegacyHash);
    assert_eq!(pf.verify("bob", b"hunter3"), Verdict::Rejected);
}

/// Written by the real `mosquitto_passwd` 2.0 (`-b`, and `-H sha512` for the `$6$` line).
#[test]
fn real_mosquitto_passwd_file() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/mosquitto_passwd.txt");
    let pf = PasswordFile::load(&path).unwrap();
    assert_eq!(pf.len(), 3);
    assert_eq!(pf.legacy_users(), 3);
    assert_eq!(
        pf.verify("alice", b"correct horse"),
        Verdict::AcceptedLegacyHash
    );
    assert_eq!(pf.verify("bob", b"hunter2"), Verdict::AcceptedLegacyHash);
    assert_eq!(
        pf.verify("legacy6", b"s3cret!"),
        Verdict::AcceptedLegacyHash
    );
    assert_eq!(pf.verify("alice", b"hunter2"), Verdict::Rejected);
    assert_eq!(pf.verify("legacy6", b"s3cret"), Verdict::Rejected);
    assert_eq!(pf.verify("carol", b"hunter2"), Verdict::Rejected);
}

#[test]
fn load_missing_file_is_io_error() {
    let err = PasswordFile::load(Path::new("/nonexistent/moatmq/passwd")).unwrap_err();
    assert!(matches!(err, AuthError::Io { .. }), "{err:?}");
    assert!(
        err.to_string()
            .starts_with("password file /nonexistent/moatmq/passwd: "),
        "{err}"
    );
}

proptest! {
    #[test]
    fn parse_never_panics(text in "\\PC*") {
        let _ = PasswordFile::parse(file(), &text);
    }

    #[test]
    fn parse_never_panics_on_hash_like_lines(
        user in "[a-z]{0,4}",
        kind in prop_oneof![Just("$7$"), Just("$6$"), Just("$argon2id$"), Just("$argon2i$v=19$"), Just("")],
        rest in "[A-Za-z0-9+/=$,.:vmtp]{0,120}",
    ) {
        let _ = PasswordFile::parse(file(), &format!("{user}:{kind}{rest}\n"));
    }
}

/// Every file in `testdata/bad/` must be refused with a parse error on a known line.
#[test]
fn corpus_of_bad_files_is_refused() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/bad");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        match PasswordFile::load(&path) {
            Err(AuthError::Parse { file, line, .. }) => {
                assert_eq!(file, path);
                assert!(line >= 1, "{}", path.display());
            }
            other => panic!("{} should be refused, got {other:?}", path.display()),
        }
        count += 1;
    }
    assert!(count >= 10);
}

#[test]
fn digest_follows_users_and_hashes_not_comments_or_order() {
    let alice = pbkdf2_line("alice", b"alice-pw");
    let bob = pbkdf2_line("bob", b"bob-pw");
    let digest = |text: &str| PasswordFile::parse(file(), text).unwrap().digest();
    let base = digest(&format!("{alice}\n{bob}\n"));
    assert_eq!(base, digest(&format!("# users\n{bob}\n\n{alice}\n")));
    assert_ne!(base, digest(&format!("{alice}\n")), "a user removed");
    let bob_changed = pbkdf2_line("bob", b"other-pw");
    assert_ne!(
        base,
        digest(&format!("{alice}\n{bob_changed}\n")),
        "a password changed"
    );
}
