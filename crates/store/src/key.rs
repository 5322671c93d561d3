//! The 32-byte AES-256 key of the retained store. It lives in `Zeroizing` memory, its
//! `Debug` prints `RetainedKey(<redacted>)`, and the raw bytes leave this module only
//! through the explicit [`RetainedKey::expose_secret`]. Key files hold 64 hex characters
//! and a newline, and are refused when their group or others may read them.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use rand::RngCore;
use zeroize::Zeroizing;

use crate::StoreError;

/// Length of the AES-256 key in bytes.
pub const KEY_LEN: usize = 32;

/// A 32-byte AES-256-GCM key held in memory that is zeroed on drop.
#[derive(Clone)]
pub struct RetainedKey {
    bytes: Zeroizing<[u8; KEY_LEN]>,
}

impl std::fmt::Debug for RetainedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RetainedKey(<redacted>)")
    }
}

impl RetainedKey {
    /// A fresh random key from the operating system's CSPRNG.
    pub fn generate() -> RetainedKey {
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        rand::rngs::OsRng.fill_bytes(bytes.as_mut());
        RetainedKey { bytes }
    }

    /// Parses 64 hex characters; surrounding whitespace (a trailing newline) is allowed.
    /// The error never contains the text.
    pub fn from_hex(hex: &str) -> Result<RetainedKey, StoreError> {
        let trimmed = hex.trim();
        if trimmed.len() != 2 * KEY_LEN {
            return Err(StoreError::BadKey(format!(
                "expected {} hex characters, found {}",
                2 * KEY_LEN,
                trimmed.len()
            )));
        }
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        hex::decode_to_slice(trimmed, bytes.as_mut())
            .map_err(|_| StoreError::BadKey("not a hex string".to_owned()))?;
        Ok(RetainedKey { bytes })
    }

    /// Reads a key file, refusing one whose mode lets group or others read or write it.
    pub fn load(path: &Path) -> Result<RetainedKey, StoreError> {
        let io = |source| StoreError::KeyFile {
            path: path.to_owned(),
            source,
        };
        let mut file = std::fs::File::open(path).map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(StoreError::KeyPermissions {
                path: path.to_owned(),
            });
        }
        // Bounded read: a key file is 65 bytes; never slurp an arbitrary file into memory.
        let mut text = Zeroizing::new(String::new());
        (&mut file)
            .take(1024)
            .read_to_string(&mut text)
            .map_err(io)?;
        RetainedKey::from_hex(&text)
    }

    /// Creates `path` (which must not exist) with mode 0600 holding a new random key as
    /// hex and a newline, fsyncs it, and returns the key. Backs `moatmq keygen --out FILE`.
    pub fn write_new(path: &Path) -> Result<RetainedKey, StoreError> {
        let key = RetainedKey::generate();
        let io = |source| StoreError::KeyFile {
            path: path.to_owned(),
            source,
        };
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        let mut text = Zeroizing::new(hex::encode(key.bytes.as_ref()));
        text.push('\n');
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(io)?;
        Ok(key)
    }

    /// Checks, reading only the log's header, that this key opens the store in `dir`
    /// (`moatmq check`): [`StoreError::WrongKey`] if it was written under another key,
    /// [`StoreError::Corrupt`] if the header is not a store header. A store that does
    /// not exist yet is fine: `Store::open` creates it. Writes nothing, so it is safe
    /// while a broker has the store open.
    pub fn check_store(&self, dir: &Path) -> Result<(), StoreError> {
        self.check_log(dir, &crate::format::RETAINED)
    }

    /// [`RetainedKey::check_store`] for the session store in `dir` (`sessions.log`).
    pub fn check_session_store(&self, dir: &Path) -> Result<(), StoreError> {
        self.check_log(dir, &crate::format::SESSIONS)
    }

    fn check_log(&self, dir: &Path, fmt: &crate::format::Format) -> Result<(), StoreError> {
        let log_path = dir.join(fmt.log_name);
        let mut file = match std::fs::File::open(&log_path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(StoreError::io(&log_path, e)),
        };
        let mut header = [0u8; crate::record::HEADER_LEN];
        let corrupt = |reason: &str| StoreError::Corrupt {
            file: log_path.clone(),
            offset: 0,
            reason: reason.to_owned(),
        };
        file.read_exact(&mut header).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => corrupt("file is shorter than the store header"),
            _ => StoreError::io(&log_path, e),
        })?;
        match crate::record::open_header_in(&crate::record::cipher(self), fmt, &header) {
            Ok(_) => Ok(()),
            Err(crate::record::HeaderError::Format(reason)) => Err(corrupt(reason)),
            Err(crate::record::HeaderError::KeyCheck) => {
                Err(StoreError::WrongKey { file: log_path })
            }
        }
    }

    /// The raw key bytes. Call only to build a cipher; never log or persist them.
    pub fn expose_secret(&self) -> &[u8; KEY_LEN] {
        &self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_whitespace() {
        let k = RetainedKey::from_hex(&format!("  {}\n", "ab".repeat(32))).unwrap();
        assert_eq!(k.expose_secret(), &[0xab; 32]);
        assert!(matches!(
            RetainedKey::from_hex("abcd"),
            Err(StoreError::BadKey(_))
        ));
        assert!(matches!(
            RetainedKey::from_hex(&"zz".repeat(32)),
            Err(StoreError::BadKey(_))
        ));
    }

    #[test]
    fn debug_is_redacted() {
        let k = RetainedKey::from_hex(&"ab".repeat(32)).unwrap();
        let s = format!("{k:?}");
        assert_eq!(s, "RetainedKey(<redacted>)");
    }

    #[test]
    fn write_new_then_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let k = RetainedKey::write_new(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            RetainedKey::load(&path).unwrap().expose_secret(),
            k.expose_secret()
        );
        // create_new: never overwrite an existing key.
        assert!(matches!(
            RetainedKey::write_new(&path),
            Err(StoreError::KeyFile { .. })
        ));
    }

    #[test]
    fn group_readable_key_file_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        RetainedKey::write_new(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            RetainedKey::load(&path),
            Err(StoreError::KeyPermissions { .. })
        ));
    }
}
