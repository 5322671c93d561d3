//! `moatmq passwd`: add, update or delete one user in a password file.
//!
//! Every other line (users, comments, blank lines, line endings) is kept byte for byte.
//! An existing user's line is replaced where it stands; a new user is appended. The
//! result is parsed before it is written, so the command never leaves a file the broker
//! would refuse to load. The file is replaced atomically: a temporary file with mode
//! 0600 in the same directory, given the existing file's owner, group and mode, fsync,
//! rename over the target, fsync of the directory. So a `root:moatmq 0640` file stays
//! `root:moatmq 0640` (the broker, running as `moatmq`, can still read it on SIGHUP); a
//! new file gets mode 0600 and the caller's user and group. A symbolic link at `path` is
//! replaced by a regular file with the link target's owner, group and mode.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use rand::Rng;
use zeroize::Zeroizing;

use crate::password_file::{check_username, hash_password, PasswordFile};
use crate::AuthError;

/// Adds or updates `username` (when `password` is `Some`) or deletes it (when `None`).
///
/// A missing file is created when adding; deleting from a missing file or deleting an
/// unknown user is an error ([`AuthError::Io`] / [`AuthError::UnknownUser`]). The new
/// password is hashed with [`hash_password`] (Argon2id), which also migrates a mosquitto
/// entry. The file is written atomically, keeping an existing file's owner, group and
/// mode (a new file gets 0600).
pub fn update_password_file(
    path: &Path,
    username: &str,
    password: Option<&[u8]>,
) -> Result<(), AuthError> {
    check_username(username).map_err(|reason| AuthError::InvalidUsername {
        username: username.to_owned(),
        reason,
    })?;
    let io_err = |source: io::Error| AuthError::Io {
        path: path.to_path_buf(),
        source,
    };
    let old = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound && password.is_some() => String::new(),
        Err(e) => return Err(io_err(e)),
    };
    let new_line = match password {
        Some(pw) => Some(Zeroizing::new(format!("{username}:{}", hash_password(pw)?))),
        None => None,
    };
    let new = rewrite(&old, username, new_line.as_deref().map(String::as_str));
    let Some(new) = new else {
        return Err(AuthError::UnknownUser {
            file: path.to_path_buf(),
            username: username.to_owned(),
        });
    };
    // Refuse to write a file the broker would not load.
    PasswordFile::parse(path, &new)?;
    write_atomically(path, new.as_bytes())
}

/// The line's username if it is a user line (not blank, not a comment).
fn line_user(line: &str) -> Option<&str> {
    let trimmed = line.trim();
    if trimmed.is_empty() || trimmed.starts_with('#') {
        return None;
    }
    trimmed.split_once(':').map(|(user, _)| user)
}

/// Returns the new text, or `None` when deleting a user that is not present.
/// `new_line` is `username:hash` without a line ending.
fn rewrite(old: &str, username: &str, new_line: Option<&str>) -> Option<String> {
    let mut out = String::with_capacity(old.len() + 128);
    let mut found = false;
    for line in old.split_inclusive('\n') {
        let content = line.trim_end_matches(['\n', '\r']);
        if line_user(content) != Some(username) {
            out.push_str(line);
            continue;
        }
        if !found {
            if let Some(new_line) = new_line {
                out.push_str(new_line);
                out.push_str(&line[content.len()..]);
            }
        }
        // Any later duplicate of the same user is dropped too.
        found = true;
    }
    match (found, new_line) {
        (false, None) => return None,
        (false, Some(new_line)) => {
            if !out.is_empty() && !out.ends_with('\n') {
                out.push('\n');
            }
            out.push_str(new_line);
            out.push('\n');
        }
        (true, _) => {}
    }
    Some(out)
}

/// Writes `contents` to a 0600 temporary file beside `path`, gives it the owner, group
/// and mode of the file it replaces, syncs it and renames it over `path`, then syncs the
/// directory so the rename itself survives a crash. Errors name `path`, never the
/// temporary file; on error `path` is untouched and the temporary file removed.
fn write_atomically(path: &Path, contents: &[u8]) -> Result<(), AuthError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "passwd".to_owned());
    let tmp = dir.join(format!(
        ".{file_name}.tmp.{}.{:016x}",
        std::process::id(),
        rand::thread_rng().gen::<u64>()
    ));
    let io_err = |source: io::Error| AuthError::Io {
        path: path.to_path_buf(),
        source,
    };
    // The file being replaced, if any: its owner, group and mode carry over.
    let existing = match fs::metadata(path) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err(e)),
    };
    let result = (|| {
        let mut file = open_private(&tmp)?;
        if let Some(old) = &existing {
            keep_owner_and_mode(&file, old)?;
        }
        file.write_all(contents)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(e));
    }
    sync_dir(&dir).map_err(io_err)
}

/// Gives `file` the owner, group and permission bits of `old`. Changing the owner needs
/// root (or being the owner already, for a group one belongs to): when that fails the
/// error stops the update rather than leave a file the broker may not be able to read.
#[cfg(unix)]
fn keep_owner_and_mode(file: &File, old: &fs::Metadata) -> io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let new = file.metadata()?;
    if (new.uid(), new.gid()) != (old.uid(), old.gid()) {
        std::os::unix::fs::fchown(file, Some(old.uid()), Some(old.gid())).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot keep its owner and group ({}:{}): {e}; run as root or as its owner",
                    old.uid(),
                    old.gid()
                ),
            )
        })?;
    }
    file.set_permissions(fs::Permissions::from_mode(old.mode() & 0o7777))
}

#[cfg(not(unix))]
fn keep_owner_and_mode(_file: &File, _old: &fs::Metadata) -> io::Result<()> {
    Ok(())
}

#[cfg(unix)]
fn open_private(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

#[cfg(not(unix))]
fn open_private(path: &Path) -> io::Result<File> {
    OpenOptions::new().write(true).create_new(true).open(path)
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrite_keeps_other_lines() {
        let old = "# users\r\nalice:A\r\n\nbob:B\n# end";
        assert_eq!(
            rewrite(old, "alice", Some("alice:X")).unwrap(),
            "# users\r\nalice:X\r\n\nbob:B\n# end"
        );
        assert_eq!(
            rewrite(old, "carol", Some("carol:C")).unwrap(),
            "# users\r\nalice:A\r\n\nbob:B\n# end\ncarol:C\n"
        );
        assert_eq!(
            rewrite(old, "bob", None).unwrap(),
            "# users\r\nalice:A\r\n\n# end"
        );
        assert_eq!(rewrite(old, "carol", None), None);
        assert_eq!(rewrite("", "a", Some("a:H")).unwrap(), "a:H\n");
        // A commented-out user is not the user.
        assert_eq!(rewrite("#a:H\n", "a", None), None);
    }

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn add_update_delete_keep_comments_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");

        // Created when missing.
        update_password_file(&path, "alice", Some(b"one")).unwrap();
        #[cfg(unix)]
        assert_eq!(mode(&path), 0o600);
        let pf = PasswordFile::load(&path).unwrap();
        assert_eq!(pf.verify("alice", b"one"), crate::Verdict::Accepted);

        // Hand-edited comments and a mosquitto user survive.
        let alice_line = fs::read_to_string(&path).unwrap();
        let bob = crate::legacy::tests::pbkdf2_vector(b"bob-pw", 101, b"0123456789ab");
        fs::write(
            &path,
            format!("# header\n{alice_line}\n# bob from mosquitto\nbob:{bob}\n"),
        )
        .unwrap();
        update_password_file(&path, "carol", Some(b"three")).unwrap();
        update_password_file(&path, "alice", Some(b"two")).unwrap();
        #[cfg(unix)]
        assert_eq!(mode(&path), 0o600);
        let text = fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "# header");
        assert!(lines[1].starts_with("alice:$argon2id$"));
        assert_eq!(lines[2], "");
        assert_eq!(lines[3], "# bob from mosquitto");
        assert_eq!(lines[4], format!("bob:{bob}"));
        assert!(lines[5].starts_with("carol:$argon2id$"));
        assert_eq!(lines.len(), 6);
        let pf = PasswordFile::load(&path).unwrap();
        assert_eq!(pf.verify("alice", b"one"), crate::Verdict::Rejected);
        assert_eq!(pf.verify("alice", b"two"), crate::Verdict::Accepted);
        assert_eq!(
            pf.verify("bob", b"bob-pw"),
            crate::Verdict::AcceptedLegacyHash
        );
        assert_eq!(pf.verify("carol", b"three"), crate::Verdict::Accepted);

        // Migrating bob rewrites his line in place as Argon2id.
        update_password_file(&path, "bob", Some(b"bob-pw")).unwrap();
        let pf = PasswordFile::load(&path).unwrap();
        assert_eq!(pf.verify("bob", b"bob-pw"), crate::Verdict::Accepted);

        update_password_file(&path, "alice", None).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with("# header\n\n# bob from mosquitto\nbob:$argon2id$"),
            "{text}"
        );
        assert_eq!(PasswordFile::load(&path).unwrap().len(), 2);

        // No temporary files are left behind.
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    /// A `root:moatmq 0640` file stays so after an update; nothing else is left in the
    /// folder. As root the file is first given another owner and group (the systemd
    /// case: root edits a file the broker's user reads through its group).
    #[cfg(unix)]
    #[test]
    fn update_keeps_owner_group_and_mode() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        update_password_file(&path, "alice", Some(b"one")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let mine = fs::metadata(&path).unwrap();
        if mine.uid() == 0 {
            std::os::unix::fs::chown(&path, Some(4321), Some(8765)).unwrap();
        }
        let before = fs::metadata(&path).unwrap();
        update_password_file(&path, "bob", Some(b"two")).unwrap();
        update_password_file(&path, "alice", None).unwrap();
        let after = fs::metadata(&path).unwrap();
        assert_eq!(mode(&path), 0o640);
        assert_eq!((after.uid(), after.gid()), (before.uid(), before.gid()));
        assert_eq!(PasswordFile::load(&path).unwrap().len(), 1);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    /// Errors name the password file, never the temporary file beside it: here the
    /// temporary file's name is too long for the file system (also refused to root).
    #[test]
    fn errors_name_the_password_file_not_the_temporary_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p".repeat(240));
        let err = update_password_file(&path, "alice", Some(b"one")).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(&err, AuthError::Io { path: p, .. } if p == &path),
            "{text}"
        );
        assert!(
            text.starts_with(&format!("password file {}: ", path.display())),
            "{text}"
        );
        assert!(!text.contains(".tmp."), "{text}");
        assert!(!path.exists());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn refusals() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        assert!(matches!(
            update_password_file(&path, "alice", None),
            Err(AuthError::Io { .. })
        ));
        assert!(!path.exists());
        for bad in ["", "a/b", "+", "#", "a:b", " a", "nul\0"] {
            assert!(
                matches!(
                    update_password_file(&path, bad, Some(b"pw")),
                    Err(AuthError::InvalidUsername { .. })
                ),
                "{bad:?}"
            );
        }
        update_password_file(&path, "alice", Some(b"pw")).unwrap();
        assert!(matches!(
            update_password_file(&path, "bob", None),
            Err(AuthError::UnknownUser { .. })
        ));
        // A file the broker would refuse is not made worse and not rewritten.
        fs::write(&path, "garbage line\n").unwrap();
        assert!(matches!(
            update_password_file(&path, "bob", Some(b"pw")),
            Err(AuthError::Parse { line: 1, .. })
        ));
        assert_eq!(fs::read_to_string(&path).unwrap(), "garbage line\n");
    }
}
