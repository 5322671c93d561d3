//! TLS for listeners: rustls with TLS 1.2 and 1.3 only, optional client certificates
//! verified against a CA bundle (all of its certificates, not just the first), and the
//! certificate's subject CN as identity where the listener asks for it.
//!
//! The acceptor sits behind a lock so SIGHUP can swap in rotated certificates; a load
//! that fails keeps the old acceptor in force.

use crate::error::BrokerError;
use moatmq_config::{CertIdentity, Config, Listener, Tls};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ServerConnection, WebPkiClientVerifier};
use rustls::{RootCertStore, ServerConfig};
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use tokio_rustls::TlsAcceptor;

/// A listener's TLS settings and current acceptor.
pub struct TlsSetup {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    require_client_cert: bool,
    identity: CertIdentity,
    acceptor: RwLock<TlsAcceptor>,
}

impl TlsSetup {
    /// Loads certificates and key; errors name the file and what is wrong with it.
    pub fn load(config: &Config, tls: &Tls) -> Result<TlsSetup, String> {
        let cert = config.resolve(&tls.cert);
        let key = config.resolve(&tls.key);
        let client_ca = tls.client_ca.as_ref().map(|p| config.resolve(p));
        let acceptor = build(&cert, &key, client_ca.as_deref(), tls.require_client_cert)?;
        Ok(TlsSetup {
            cert,
            key,
            client_ca,
            require_client_cert: tls.require_client_cert,
            identity: tls.identity,
            acceptor: RwLock::new(acceptor),
        })
    }

    /// Loads the TLS material of listener `l`, if it has a `[listener.tls]`.
    pub fn for_listener(config: &Config, l: &Listener) -> Result<Option<TlsSetup>, BrokerError> {
        let Some(tls) = &l.tls else {
            return Ok(None);
        };
        TlsSetup::load(config, tls)
            .map(Some)
            .map_err(|reason| BrokerError::Tls {
                name: l.name.clone(),
                reason,
            })
    }

    /// Re-reads certificate, key and CA (SIGHUP); on error the old ones stay in force.
    pub fn reload(&self) -> Result<(), String> {
        let fresh = build(
            &self.cert,
            &self.key,
            self.client_ca.as_deref(),
            self.require_client_cert,
        )?;
        if let Ok(mut acceptor) = self.acceptor.write() {
            *acceptor = fresh;
        }
        Ok(())
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        match self.acceptor.read() {
            Ok(a) => a.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The identity a verified client certificate gives, if the listener maps one.
    pub fn identity_of(&self, conn: &ServerConnection) -> Result<Option<String>, String> {
        if self.identity != CertIdentity::Cn {
            return Ok(None);
        }
        let Some(leaf) = conn.peer_certificates().and_then(|c| c.first()) else {
            // No certificate (only possible with require_client_cert = false): the
            // client authenticates with a password instead.
            return Ok(None);
        };
        moatmq_auth::certificate_common_name(leaf.as_ref())
            .map(Some)
            .map_err(|e| e.to_string())
    }
}

fn build(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
    require_client_cert: bool,
) -> Result<TlsAcceptor, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = read_certs(cert, "certificate")?;
    let key = read_key(key)?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in read_certs(ca, "client CA")? {
                roots
                    .add(c)
                    .map_err(|e| format!("client CA {}: {e}", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if require_client_cert {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(verifier.build().map_err(|e| e.to_string())?)
        }
    };
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|e| format!("certificate and key do not fit together: {e}"))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// `what` names the file in errors: "certificate" or "client CA".
fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let fail = |e: &dyn std::fmt::Display| format!("{what} {}: {e}", path.display());
    let file = std::fs::File::open(path).map_err(|e| fail(&e))?;
    let certs = rustls_pemfile::certs(&mut BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(&e))?;
    if certs.is_empty() {
        // A private key given as `cert` (cert and key swapped) ends up here.
        return Err(fail(&"no PEM certificate found"));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let fail = |e: &dyn std::fmt::Display| format!("private key {}: {e}", path.display());
    let file = std::fs::File::open(path).map_err(|e| fail(&e))?;
    rustls_pemfile::private_key(&mut BufReader::new(file))
        .map_err(|e| fail(&e))?
        .ok_or_else(|| fail(&"no PEM private key found"))
}
