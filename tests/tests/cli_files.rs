//! The real `moatmq` binary's file errors: each names which file it is (configuration,
//! password, ACL or key file) and its path, says the OS error once, and never shows the
//! temporary file a rewrite goes through.

use std::process::{Command, Stdio};

/// Runs `moatmq ARGS` with `input` on stdin; returns the exit code and stderr.
fn run(args: &[&str], input: &str) -> (Option<i32>, String) {
    use std::io::Write;
    let mut child = Command::new(moatmq_e2e::moatmq())
        .args(args)
        .env_remove("MOATMQ_RETAINED_KEY")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run moatmq");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The command fails with exactly one line that starts with `prefix` (the kind of file
/// and its path) and names the OS error once.
#[track_caller]
fn fails_naming(args: &[&str], input: &str, prefix: &str, os_error: &str) {
    let (code, err) = run(args, input);
    assert!(code.is_some_and(|c| c != 0), "{args:?} succeeded: {err}");
    let line = err.trim_end();
    assert!(!line.contains('\n'), "one line: {err}");
    let line = line.strip_prefix("error: ").unwrap_or(line);
    assert!(line.starts_with(prefix), "{prefix:?} starts {line:?}");
    assert_eq!(
        line.matches(os_error).count(),
        1,
        "{os_error:?} once in {line:?}"
    );
    assert_eq!(line.matches("os error").count(), 1, "{line:?}");
    assert!(!line.contains(".tmp."), "temporary file shown: {line:?}");
}

#[test]
fn file_errors_name_the_file_and_say_the_os_error_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let missing_dir = d.join("nothere");
    let passwd = missing_dir.join("passwd");
    let passwd = passwd.to_str().unwrap();
    // Adding to a file in a missing folder: the temporary file cannot be created.
    fails_naming(
        &["passwd", passwd, "alice"],
        "pw\n",
        &format!("password file {passwd}: "),
        "No such file or directory",
    );
    fails_naming(
        &["passwd", "--delete", passwd, "alice"],
        "",
        &format!("password file {passwd}: "),
        "No such file or directory",
    );
    let acl = d.join("nothere.acl");
    let acl = acl.to_str().unwrap();
    fails_naming(
        &["acl", "check", "--acl", acl, "--user", "a", "read", "a/b"],
        "",
        &format!("cannot read ACL file {acl}: "),
        "No such file or directory",
    );
    let config = d.join("nothere.toml");
    let config = config.to_str().unwrap();
    fails_naming(
        &["check", "-c", config],
        "",
        &format!("configuration file {config}: "),
        "No such file or directory",
    );
    // keygen never overwrites: the key file exists.
    let key = d.join("retained.key");
    let key = key.to_str().unwrap();
    let (code, err) = run(&["keygen", "--out", key], "");
    assert_eq!(code, Some(0), "{err}");
    fails_naming(
        &["keygen", "--out", key],
        "",
        &format!("retained-store key file {key}: "),
        "File exists",
    );
    let toml = d.join("broker.toml");
    std::fs::write(
        &toml,
        format!(
            "[[listener]]\nname = \"tcp\"\nbind = \"127.0.0.1:1883\"\n\
             [retained]\npath = \"store\"\nkey_file = \"{key}\"\n"
        ),
    )
    .unwrap();
    let new_key = d.join("new.key");
    let new_key = new_key.to_str().unwrap();
    fails_naming(
        &[
            "retained",
            "rekey",
            "-c",
            toml.to_str().unwrap(),
            "--new-key",
            new_key,
        ],
        "",
        &format!("retained-store key file {new_key}: "),
        "No such file or directory",
    );
}

/// `moatmq acl check` on the top-level aclfile.example: prints `allow`/`deny` and the
/// deciding line (stdout), whatever the exit code convention.
fn decide(args: &[&str]) -> String {
    let example = moatmq_e2e::repo_root().join("aclfile.example");
    let mut all = vec!["acl", "check", "--acl", example.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = Command::new(moatmq_e2e::moatmq())
        .args(&all)
        .stdin(Stdio::null())
        .output()
        .expect("run moatmq");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("allow") || stdout.starts_with("deny"),
        "{all:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout.split_whitespace().next().unwrap().to_string()
}

#[test]
fn aclfile_example_loads_and_decides_as_its_comments_say() {
    for (args, verdict) in [
        // Tenants.
        (&["--user", "alice", "write", "alice/lamp"][..], "allow"),
        (&["--user", "alice", "read", "bob/lamp"], "deny"),
        (&["--user", "alice", "subscribe", "#"], "deny"),
        (
            &[
                "--user",
                "alice",
                "--client-id",
                "d1",
                "write",
                "devices/d1/up",
            ],
            "allow",
        ),
        (
            &[
                "--user",
                "alice",
                "--client-id",
                "d1",
                "write",
                "devices/d2/up",
            ],
            "deny",
        ),
        (&["--user", "alice", "read", "announcements/x"], "allow"),
        (&["--user", "alice", "write", "announcements/x"], "deny"),
        // The superuser, $SYS included.
        (&["--user", "admin", "write", "bob/lamp"], "allow"),
        (&["--user", "admin", "subscribe", "$SYS/#"], "allow"),
        // The read-only ingestor.
        (&["--user", "ingest", "read", "bob/telemetry/t"], "allow"),
        (&["--user", "ingest", "write", "bob/telemetry/t"], "deny"),
        // Deny wins; anonymous clients get nothing.
        (
            &["--user", "guest", "read", "announcements/internal/x"],
            "deny",
        ),
        (&["read", "alice/lamp"], "deny"),
    ] {
        assert_eq!(decide(args), verdict, "{args:?}");
    }
}

/// `moatmq ARGS --help`: stdout, requiring success.
fn help(args: &[&str]) -> String {
    let out = Command::new(moatmq_e2e::moatmq())
        .args(args)
        .arg("--help")
        .stdin(Stdio::null())
        .output()
        .expect("run moatmq");
    assert!(out.status.success(), "{args:?} --help");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The lines of a `Heading:` section of clap's help, up to the next blank line followed
/// by a heading.
fn section<'a>(text: &'a str, heading: &str) -> Vec<&'a str> {
    text.lines()
        .skip_while(|l| *l != heading)
        .skip(1)
        .take_while(|l| l.is_empty() || l.starts_with(' '))
        .collect()
}

/// Every subcommand, argument and flag has a help text, found by walking `--help`.
#[test]
fn every_subcommand_and_flag_has_help() {
    let mut todo: Vec<Vec<String>> = vec![vec![]];
    let mut seen = 0;
    while let Some(path) = todo.pop() {
        let args: Vec<&str> = path.iter().map(String::as_str).collect();
        let text = help(&args);
        seen += 1;
        for line in section(&text, "Commands:") {
            let mut words = line.split_whitespace();
            let Some(name) = words.next() else { continue };
            assert!(words.next().is_some(), "{args:?}: {name} has no help");
            if name != "help" {
                let mut sub = path.clone();
                sub.push(name.to_string());
                todo.push(sub);
            }
        }
        for heading in ["Arguments:", "Options:"] {
            let lines = section(&text, heading);
            // An entry is `<ARG>`, `-c, --config <CONFIG>` or `--delete`; other lines
            // are help texts (the long form's, below the entry) or possible values (`- x`).
            let is_entry = |l: &str| {
                let t = l.trim_start();
                t.starts_with('<') || (t.starts_with('-') && !t.starts_with("- "))
            };
            for (i, line) in lines.iter().enumerate() {
                if !is_entry(line) {
                    continue;
                }
                let entry = line.trim_start();
                // Short form: the text on the same line after two spaces; long form: on
                // the next line, which is then not an entry itself.
                let inline = entry.split("  ").filter(|p| !p.trim().is_empty()).count() > 1;
                let below = lines
                    .get(i + 1)
                    .is_some_and(|n| !n.trim().is_empty() && !is_entry(n));
                assert!(inline || below, "{args:?}: {entry:?} has no help");
            }
        }
    }
    assert!(seen >= 10, "walked {seen} help pages");
    // The ones the issue names.
    for (command, needles) in [
        (
            "check",
            &[
                "-c, --config <CONFIG>",
                "Configuration file (broker.toml) to check",
                "64",
            ][..],
        ),
        (
            "keygen",
            &["--out <OUT>", "The key file to create", "stdout"],
        ),
        ("passwd", &["<FILE>", "Password file", "<USER>", "Username"]),
    ] {
        let text = help(&[command]);
        for needle in needles {
            assert!(
                text.contains(needle),
                "{command} --help: {needle:?} in\n{text}"
            );
        }
    }
}

/// The README names what a first-time user needs: installing the binary, the packages
/// the tests need, and every `[limits]` key in its table.
#[test]
fn readme_covers_first_contact() {
    let root = moatmq_e2e::repo_root().to_path_buf();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    assert!(readme.contains("cargo install --path crates/moatmq --locked"));
    assert!(readme.contains("mosquitto-clients"));
    assert!(
        readme.contains("`nats-server`"),
        "the cluster tests' package"
    );
    assert!(readme.contains("aclfile.example"));
    let limits = readme
        .lines()
        .find(|l| l.starts_with("| `[limits]`"))
        .expect("[limits] row");
    for key in moatmq_config_keys(&root.join("broker.toml.example"), "[limits]") {
        assert!(
            limits.contains(&format!("`{key}`")),
            "README [limits]: {key}"
        );
    }
}

/// The keys (commented or not) of `section` in broker.toml.example.
fn moatmq_config_keys(example: &std::path::Path, section: &str) -> Vec<String> {
    let text = std::fs::read_to_string(example).unwrap();
    text.lines()
        .skip_while(|l| l.trim() != section)
        .skip(1)
        .take_while(|l| {
            !l.trim_start()
                .trim_start_matches('#')
                .trim_start()
                .starts_with('[')
        })
        .filter_map(|l| {
            let l = l.trim_start().trim_start_matches('#').trim_start();
            let (key, _) = l.split_once('=')?;
            let key = key.trim();
            (!key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
                .then(|| key.to_string())
        })
        .collect()
}
