//! A throwaway certificate authority for TLS tests.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};

/// A CA that signs server and client certificates into a folder.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
    pem: String,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name = dn(name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("ca key");
        let cert = params.self_signed(&key).expect("ca cert");
        let pem = cert.pem();
        TestCa { cert, key, pem }
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// Writes the CA certificate to `dir/name`.
    pub fn write_ca(&self, dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, &self.pem).expect("write ca");
        p
    }

    /// A server certificate for localhost / 127.0.0.1, written as `name.crt` / `name.key`.
    pub fn server(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params.distinguished_name = dn("localhost");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params, dir, name)
    }

    /// A client certificate with subject CN `cn`, valid from `from` to `until` relative to now.
    pub fn client(
        &self,
        dir: &Path,
        name: &str,
        cn: &str,
        from: Duration,
        until: Duration,
    ) -> (PathBuf, PathBuf) {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let now = OffsetDateTime::now_utc();
        params.not_before = now + from;
        params.not_after = now + until;
        self.issue(params, dir, name)
    }

    /// A client certificate valid now for a year.
    pub fn valid_client(&self, dir: &Path, name: &str, cn: &str) -> (PathBuf, PathBuf) {
        self.client(dir, name, cn, Duration::days(-1), Duration::days(365))
    }

    fn issue(&self, params: CertificateParams, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.cert, &self.key).expect("sign");
        let crt = dir.join(format!("{name}.crt"));
        let keyp = dir.join(format!("{name}.key"));
        std::fs::write(&crt, cert.pem()).expect("write cert");
        std::fs::write(&keyp, key.serialize_pem()).expect("write key");
        (crt, keyp)
    }
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}
