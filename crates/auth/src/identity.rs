//! Identity names: the rules a username or certificate CN must meet, and extracting the
//! CN from a client certificate.
//!
//! A name is refused if it could change the meaning of an ACL pattern or a topic once
//! substituted for `%u`: `/` (level separator), `+` and `#` (wildcards), NUL and control
//! characters (log injection, invalid in MQTT strings). It must also fit an MQTT string
//! (at most 65535 bytes).

use x509_parser::prelude::{FromDer, X509Certificate};

use crate::AuthError;

/// The longest identity accepted, in bytes: the maximum length of an MQTT UTF-8 string.
pub const MAX_IDENTITY_LEN: usize = 65_535;

/// Whether `name` is usable as an identity (username or certificate CN).
///
/// It must be non-empty, at most [`MAX_IDENTITY_LEN`] bytes, and contain no `/`, `+`,
/// `#`, NUL or control character (C0, DEL or C1).
pub fn valid_identity(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_IDENTITY_LEN
        && !name
            .chars()
            .any(|c| matches!(c, '/' | '+' | '#') || c.is_control())
}

/// The subject common name (CN) of a DER-encoded client certificate.
///
/// Fails if the bytes are not exactly one DER certificate, if the subject has no CN or
/// more than one (an ambiguous identity), or if the CN is not a UTF-8 compatible string.
/// The caller still has to check the name with [`valid_identity`].
pub fn certificate_common_name(der: &[u8]) -> Result<String, AuthError> {
    let (rest, cert) = X509Certificate::from_der(der)
        .map_err(|e| AuthError::Certificate(format!("not a DER X.509 certificate ({e})")))?;
    if !rest.is_empty() {
        return Err(AuthError::Certificate(
            "trailing bytes after the certificate".to_owned(),
        ));
    }
    let mut names = cert.subject().iter_common_name();
    let first = names.next().ok_or(AuthError::MissingCommonName)?;
    if names.next().is_some() {
        return Err(AuthError::AmbiguousCommonName);
    }
    first
        .as_str()
        .map(str::to_owned)
        .map_err(|_| AuthError::CommonNameNotUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities() {
        for ok in [
            "alice",
            "sensor-7",
            "émile",
            "a b",
            "$SYS",
            "user@example.com",
            "a:b",
        ] {
            assert!(valid_identity(ok), "{ok:?} should be valid");
        }
        for bad in [
            "", "+", "a/b", "#", "a#", "x+y", "nul\0", "\x07", "tab\t", "del\x7f", "c1\u{85}",
        ] {
            assert!(!valid_identity(bad), "{bad:?} should be refused");
        }
        assert!(valid_identity(&"a".repeat(MAX_IDENTITY_LEN)));
        assert!(!valid_identity(&"a".repeat(MAX_IDENTITY_LEN + 1)));
    }

    fn cert_with_subject(dn: rcgen::DistinguishedName) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = dn;
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn common_name_of_a_certificate() {
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::OrganizationName, "moatmq tests");
        dn.push(rcgen::DnType::CommonName, "sensor-42");
        let der = cert_with_subject(dn);
        assert_eq!(certificate_common_name(&der).unwrap(), "sensor-42");
    }

    #[test]
    fn certificate_without_common_name() {
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::OrganizationName, "no cn");
        let der = cert_with_subject(dn);
        assert!(matches!(
            certificate_common_name(&der),
            Err(AuthError::MissingCommonName)
        ));
    }

    #[test]
    fn certificate_with_bad_common_name_is_returned_for_the_caller_to_refuse() {
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, "a/b");
        let der = cert_with_subject(dn);
        let cn = certificate_common_name(&der).unwrap();
        assert_eq!(cn, "a/b");
        assert!(!valid_identity(&cn));
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        assert!(matches!(
            certificate_common_name(b"not a certificate"),
            Err(AuthError::Certificate(_))
        ));
        assert!(matches!(
            certificate_common_name(&[]),
            Err(AuthError::Certificate(_))
        ));
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, "x");
        let mut der = cert_with_subject(dn);
        der.push(0);
        assert!(matches!(
            certificate_common_name(&der),
            Err(AuthError::Certificate(_))
        ));
    }
}
