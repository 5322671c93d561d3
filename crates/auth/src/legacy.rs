//! Hashes written by `mosquitto_passwd`, accepted so Mosquitto users can bring their
//! password files.
//!
//! - `$7$<iterations>$<base64 salt>$<base64 hash>`: PBKDF2-HMAC-SHA512 with a 64-byte
//!   output (Mosquitto 2.x; 101 iterations and a 12-byte salt by default).
//! - `$6$<base64 salt>$<base64 hash>`: one SHA-512 over `password || salt` (Mosquitto 1.x).
//!
//! Both are much weaker than Argon2id, so a successful check is reported as legacy and
//! the broker asks for a re-hash. Comparisons are constant time.

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use sha2::{Digest, Sha512};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// Length of a SHA-512 / PBKDF2-HMAC-SHA512 output as mosquitto stores it.
const HASH_LEN: usize = 64;
/// Largest salt accepted; mosquitto uses 12 bytes.
const MAX_SALT_LEN: usize = 1024;
/// Largest PBKDF2 iteration count accepted: far above mosquitto's default (101) and
/// anything sensible, low enough that a crafted file cannot stall a verification thread
/// for minutes.
pub(crate) const MAX_PBKDF2_ITERATIONS: u32 = 10_000_000;

/// Mosquitto writes standard base64 with padding; accept it without padding too.
const B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_encode_padding(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A parsed mosquitto hash.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum LegacyHash {
    /// `$7$`: PBKDF2-HMAC-SHA512.
    Pbkdf2Sha512 {
        iterations: u32,
        salt: Vec<u8>,
        hash: [u8; HASH_LEN],
    },
    /// `$6$`: SHA-512 over password then salt.
    Sha512 { salt: Vec<u8>, hash: [u8; HASH_LEN] },
}

impl LegacyHash {
    /// Parses a `$7$` or `$6$` string; the error is a fixed reason that never contains
    /// the input.
    pub(crate) fn parse(s: &str) -> Result<Self, &'static str> {
        if let Some(rest) = s.strip_prefix("$7$") {
            let mut parts = rest.split('$');
            let (Some(iter), Some(salt), Some(hash), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err("malformed $7$ hash: expected $7$<iterations>$<salt>$<hash>");
            };
            let iterations: u32 = iter
                .parse()
                .map_err(|_| "malformed $7$ hash: iteration count is not a number")?;
            if iterations == 0 || iterations > MAX_PBKDF2_ITERATIONS {
                return Err("$7$ hash: iteration count out of range (1 to 10000000)");
            }
            let salt = decode_salt(salt)?;
            let hash = decode_hash(hash)?;
            Ok(Self::Pbkdf2Sha512 {
                iterations,
                salt,
                hash,
            })
        } else if let Some(rest) = s.strip_prefix("$6$") {
            let mut parts = rest.split('$');
            let (Some(salt), Some(hash), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err("malformed $6$ hash: expected $6$<salt>$<hash>");
            };
            Ok(Self::Sha512 {
                salt: decode_salt(salt)?,
                hash: decode_hash(hash)?,
            })
        } else {
            Err("not a mosquitto $7$ or $6$ hash")
        }
    }

    /// Whether `password` matches, compared in constant time.
    pub(crate) fn verify(&self, password: &[u8]) -> bool {
        let mut computed = Zeroizing::new([0u8; HASH_LEN]);
        let expected = match self {
            Self::Pbkdf2Sha512 {
                iterations,
                salt,
                hash,
            } => {
                pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, *iterations, &mut computed[..]);
                hash
            }
            Self::Sha512 { salt, hash } => {
                let mut digest = Sha512::new();
                digest.update(password);
                digest.update(salt);
                computed.copy_from_slice(&digest.finalize());
                hash
            }
        };
        bool::from(computed.ct_eq(expected))
    }

    /// PBKDF2 iterations a check of this hash runs (0 for `$6$`).
    pub(crate) fn pbkdf2_iterations(&self) -> u32 {
        match self {
            Self::Pbkdf2Sha512 { iterations, .. } => *iterations,
            Self::Sha512 { .. } => 0,
        }
    }

    /// Formats as mosquitto would (used by tests to build vectors).
    #[cfg(test)]
    pub(crate) fn to_mosquitto_string(&self) -> String {
        match self {
            Self::Pbkdf2Sha512 {
                iterations,
                salt,
                hash,
            } => format!("$7${iterations}${}${}", B64.encode(salt), B64.encode(hash)),
            Self::Sha512 { salt, hash } => format!("$6${}${}", B64.encode(salt), B64.encode(hash)),
        }
    }
}

fn decode_salt(s: &str) -> Result<Vec<u8>, &'static str> {
    let salt = B64
        .decode(s)
        .map_err(|_| "mosquitto hash: salt is not valid base64")?;
    if salt.is_empty() || salt.len() > MAX_SALT_LEN {
        return Err("mosquitto hash: salt length out of range (1 to 1024 bytes)");
    }
    Ok(salt)
}

fn decode_hash(s: &str) -> Result<[u8; HASH_LEN], &'static str> {
    // Decode into a buffer with room for one extra byte, so over-long input is detected
    // without allocating for arbitrarily long strings.
    if s.len() > 4 * (HASH_LEN + 3) / 3 + 4 {
        return Err("mosquitto hash: hash is not 64 bytes");
    }
    let bytes = B64
        .decode(s)
        .map_err(|_| "mosquitto hash: hash is not valid base64")?;
    bytes
        .try_into()
        .map_err(|_| "mosquitto hash: hash is not 64 bytes")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn pbkdf2_vector(password: &[u8], iterations: u32, salt: &[u8]) -> String {
        let mut hash = [0u8; HASH_LEN];
        pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, iterations, &mut hash);
        LegacyHash::Pbkdf2Sha512 {
            iterations,
            salt: salt.to_vec(),
            hash,
        }
        .to_mosquitto_string()
    }

    #[test]
    fn pbkdf2_round_trip() {
        let s = pbkdf2_vector(b"hunter2", 101, b"twelve bytes");
        assert!(s.starts_with("$7$101$"));
        let h = LegacyHash::parse(&s).unwrap();
        assert!(h.verify(b"hunter2"));
        assert!(!h.verify(b"hunter3"));
        assert!(!h.verify(b""));
    }

    #[test]
    fn sha512_round_trip() {
        let salt = b"saltsaltsalt";
        let mut d = Sha512::new();
        d.update(b"pw");
        d.update(salt);
        let hash: [u8; 64] = d.finalize().into();
        let s = LegacyHash::Sha512 {
            salt: salt.to_vec(),
            hash,
        }
        .to_mosquitto_string();
        let h = LegacyHash::parse(&s).unwrap();
        assert!(h.verify(b"pw"));
        assert!(!h.verify(b"pW"));
    }

    #[test]
    fn malformed() {
        for bad in [
            "$7$",
            "$7$101$",
            "$7$x$AAAA$AAAA",
            "$7$0$AAAA$AAAA",
            "$7$99999999999$AAAA$AAAA",
            "$7$101$!!!!$AAAA",
            "$7$101$AAAA$AAAA",
            "$7$101$AAAA$AAAA$AAAA",
            "$6$AAAA",
            "$6$$AAAA",
            "$5$AAAA$AAAA",
        ] {
            assert!(LegacyHash::parse(bad).is_err(), "{bad:?}");
        }
    }
}
