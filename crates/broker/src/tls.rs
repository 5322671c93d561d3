//! TLS for listeners: rustls with TLS 1.2 and 1.3 only, optional client certificates
//! verified against a CA bundle (all of its certificates, not just the first), and the
//! certificate's subject CN as identity where the listener asks for it.
//!
//! The acceptor sits behind a lock so SIGHUP can swap in rotated certificates; a load
//! that fails keeps the old acceptor in force.

use moatmq_config::{CertIdentity, Config, Tls};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ServerConnection, WebPkiClientVerifier};
use rustls::{RootCertStore, ServerConfig};
use sha2::{Digest, Sha256};
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use tokio_rustls::TlsAcceptor;

/// Why TLS material could not be loaded; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file is missing, unreadable or not PEM.
    #[error("{what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// A PEM file without what it should hold (a key given as `cert`: cert and key
    /// swapped).
    #[error("{what} {}: no PEM {expected} found", path.display())]
    Empty {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    /// rustls refused the material.
    #[error("{what}: {source}")]
    Rustls {
        what: &'static str,
        source: rustls::Error,
    },
    /// A client CA certificate rustls cannot use.
    #[error("client CA {}: {source}", path.display())]
    BadCa {
        path: PathBuf,
        source: rustls::Error,
    },
    /// The client CA bundle gives no verifier.
    #[error("client CA: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// The client's certificate has no usable CN.
    #[error(transparent)]
    Identity(#[from] moatmq_auth::AuthError),
}

/// A listener's TLS settings and current acceptor.
pub struct TlsSetup {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    require_client_cert: bool,
    identity: CertIdentity,
    acceptor: RwLock<TlsAcceptor>,
    /// SHA-256 over the client CA certificates in force (DER, each length-prefixed).
    client_ca_digest: RwLock<Option<[u8; 32]>>,
}

impl TlsSetup {
    /// Loads certificates and key; errors name the file and what is wrong with it.
    pub fn load(config: &Config, tls: &Tls) -> Result<TlsSetup, TlsError> {
        let cert = config.resolve(&tls.cert);
        let key = config.resolve(&tls.key);
        let client_ca = tls.client_ca.as_ref().map(|p| config.resolve(p));
        let (acceptor, digest) = build(&cert, &key, client_ca.as_deref(), tls.require_client_cert)?;
        Ok(TlsSetup {
            cert,
            key,
            client_ca,
            require_client_cert: tls.require_client_cert,
            identity: tls.identity,
            acceptor: RwLock::new(acceptor),
            client_ca_digest: RwLock::new(digest),
        })
    }

    /// Re-reads certificate, key and CA (SIGHUP); on error the old ones stay in force.
    pub fn reload(&self) -> Result<(), TlsError> {
        let (fresh, digest) = build(
            &self.cert,
            &self.key,
            self.client_ca.as_deref(),
            self.require_client_cert,
        )?;
        if let Ok(mut acceptor) = self.acceptor.write() {
            *acceptor = fresh;
        }
        if let Ok(mut slot) = self.client_ca_digest.write() {
            *slot = digest;
        }
        Ok(())
    }

    /// Whom this listener trusts, as one line to compare with other nodes': whether a
    /// client certificate is required, how it names the client and a digest of the
    /// client CAs in force (not the server's own certificate, which may differ).
    pub fn trust(&self) -> String {
        let digest = match self.client_ca_digest.read() {
            Ok(d) => *d,
            Err(poisoned) => *poisoned.into_inner(),
        };
        format!(
            "require_client_cert={} identity={:?} client_ca={}",
            self.require_client_cert,
            self.identity,
            digest.map_or_else(|| "none".to_owned(), hex::encode)
        )
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        match self.acceptor.read() {
            Ok(a) => a.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The identity a verified client certificate gives, if the listener maps one.
    pub fn identity_of(&self, conn: &ServerConnection) -> Result<Option<String>, TlsError> {
        if self.identity != CertIdentity::Cn {
            return Ok(None);
        }
        let Some(leaf) = conn.peer_certificates().and_then(|c| c.first()) else {
            // No certificate (only possible with require_client_cert = false): the
            // client authenticates with a password instead.
            return Ok(None);
        };
        Ok(Some(moatmq_auth::certificate_common_name(leaf.as_ref())?))
    }
}

fn build(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
    require_client_cert: bool,
) -> Result<(TlsAcceptor, Option<[u8; 32]>), TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = read_certs(cert, "certificate")?;
    let key = read_key(key)?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|source| TlsError::Rustls {
            what: "TLS versions",
            source,
        })?;
    let mut ca_digest = None;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            let mut hasher = Sha256::new();
            for c in read_certs(ca, "client CA")? {
                hasher.update((c.len() as u64).to_be_bytes());
                hasher.update(c.as_ref());
                roots.add(c).map_err(|source| TlsError::BadCa {
                    path: ca.to_path_buf(),
                    source,
                })?;
            }
            ca_digest = Some(hasher.finalize().into());
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if require_client_cert {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(verifier.build()?)
        }
    };
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|source| TlsError::Rustls {
            what: "certificate and key do not fit together",
            source,
        })?;
    Ok((TlsAcceptor::from(Arc::new(config)), ca_digest))
}

/// `what` names the file in errors: "certificate" or "client CA".
fn read_certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let fail = |source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(fail)?;
    let certs = rustls_pemfile::certs(&mut BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .map_err(fail)?;
    if certs.is_empty() {
        // A private key given as `cert` (cert and key swapped) ends up here.
        return Err(TlsError::Empty {
            what,
            path: path.to_path_buf(),
            expected: "certificate",
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let what = "private key";
    let fail = |source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(fail)?;
    rustls_pemfile::private_key(&mut BufReader::new(file))
        .map_err(fail)?
        .ok_or_else(|| TlsError::Empty {
            what,
            path: path.to_path_buf(),
            expected: "private key",
        })
}
