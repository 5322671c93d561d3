//! Hand-written MQTT 3.1.1 packets over plain TCP or TLS (rustls 0.23, optional client
//! certificate), for the scenarios where rumqttc is too heavy (thousands of short-lived
//! logins) or cannot carry our TLS setup (rumqttc 0.24 links rustls 0.22).
//! Only what the benchmarks need: CONNECT/CONNACK, SUBSCRIBE/SUBACK, QoS 0 PUBLISH.

use anyhow::{bail, Context};
use moatmq_testkit::wire;
use rustls::pki_types::ServerName;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// A byte stream: plain TCP or TLS over TCP.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// An open connection, buffered for reading.
pub type Conn = BufReader<Box<dyn Io>>;

/// Where to connect and how.
#[derive(Clone)]
pub struct Target {
    pub addr: String,
    pub tls: Option<(TlsConnector, ServerName<'static>)>,
}

impl Target {
    pub fn plain(addr: &str) -> Target {
        Target {
            addr: addr.to_string(),
            tls: None,
        }
    }
}

/// A TLS client configuration trusting `ca`, with an optional client certificate.
/// Session resumption is off, so every connection does a full handshake (and, for
/// mTLS, presents and has verified its certificate).
pub fn tls_connector(ca: &Path, client: Option<(&Path, &Path)>) -> anyhow::Result<TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut std::io::BufReader::new(
        File::open(ca).with_context(|| format!("{}", ca.display()))?,
    )) {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut config = match client {
        Some((cert, key)) => {
            let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(
                File::open(cert).with_context(|| format!("{}", cert.display()))?,
            ))
            .collect::<Result<Vec<_>, _>>()?;
            let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(
                File::open(key).with_context(|| format!("{}", key.display()))?,
            ))?
            .context("no private key in the key file")?;
            builder.with_client_auth_cert(certs, key)?
        }
        None => builder.with_no_client_auth(),
    };
    config.resumption = rustls::client::Resumption::disabled();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// TCP connect (TCP_NODELAY), then the TLS handshake if the target has TLS.
pub async fn open(target: &Target) -> anyhow::Result<Conn> {
    let tcp = TcpStream::connect(&target.addr).await?;
    tcp.set_nodelay(true)?;
    let io: Box<dyn Io> = match &target.tls {
        Some((connector, name)) => Box::new(connector.connect(name.clone(), tcp).await?),
        None => Box::new(tcp),
    };
    Ok(BufReader::with_capacity(64 * 1024, io))
}

/// CONNECT, MQTT 3.1.1, clean session, keep alive 0 (no PINGREQ needed). A username
/// without a password logs in with an empty one.
pub fn connect_packet(client_id: &str, username: Option<&str>, password: Option<&str>) -> Vec<u8> {
    let login = username.map(|u| (u.as_bytes(), password.unwrap_or("").as_bytes()));
    wire::connect(false, client_id.as_bytes(), login, 0)
}

/// QoS 0 PUBLISH.
pub fn publish_packet(topic: &str, payload: &[u8], retain: bool) -> Vec<u8> {
    wire::publish(topic.as_bytes(), 0, 0, payload, retain)
}

/// SUBSCRIBE with one filter.
pub fn subscribe_packet(pkid: u16, filter: &str, qos: u8) -> Vec<u8> {
    wire::subscribe(pkid, &[(filter.as_bytes(), qos)])
}

pub use wire::{publish_parts, DISCONNECT};

/// Reads one packet: returns its first byte; `body` holds the rest.
pub async fn read_packet(conn: &mut Conn, body: &mut Vec<u8>) -> anyhow::Result<u8> {
    let first = conn.read_u8().await?;
    let mut len = 0usize;
    let mut shift = 0;
    loop {
        let byte = conn.read_u8().await?;
        len |= usize::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 21 {
            bail!("malformed remaining length");
        }
    }
    body.resize(len, 0);
    conn.read_exact(body).await?;
    Ok(first)
}

/// Sends CONNECT and waits for the CONNACK; returns its return code (0 = accepted).
pub async fn login(
    conn: &mut Conn,
    client_id: &str,
    username: Option<&str>,
    password: Option<&str>,
) -> anyhow::Result<u8> {
    conn.write_all(&connect_packet(client_id, username, password))
        .await?;
    conn.flush().await?;
    let mut body = Vec::new();
    let first = read_packet(conn, &mut body).await?;
    if first != 0x20 || body.len() < 2 {
        bail!("expected CONNACK, got packet type {}", first >> 4);
    }
    Ok(body[1])
}

/// Subscribes to one filter and waits for its SUBACK; fails if the broker refused it.
pub async fn subscribe(conn: &mut Conn, filter: &str, qos: u8) -> anyhow::Result<()> {
    conn.write_all(&subscribe_packet(1, filter, qos)).await?;
    conn.flush().await?;
    let mut body = Vec::new();
    loop {
        let first = read_packet(conn, &mut body).await?;
        if first >> 4 == 9 {
            if body.get(2).is_some_and(|&rc| rc >= 0x80) {
                bail!("subscription to {filter} refused");
            }
            return Ok(());
        }
    }
}
