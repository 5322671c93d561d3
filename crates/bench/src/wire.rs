//! Connections for the load tools, over plain TCP or TLS (rustls 0.23, optional client
//! certificate), speaking MQTT 3.1.1 with moatmq-testkit's packet encoder and raw
//! client: rumqttc is too heavy for thousands of short-lived logins and cannot carry
//! our TLS setup (rumqttc 0.24 links rustls 0.22). Only what the benchmarks need:
//! CONNECT/CONNACK, SUBSCRIBE/SUBACK, QoS 0 PUBLISH.

use anyhow::{bail, Context};
use moatmq_testkit::wire::{self, Version};
use moatmq_testkit::Raw;
use rustls::pki_types::ServerName;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

pub use moatmq_testkit::wire::{publish_parts, DISCONNECT};

/// A byte stream: plain TCP or TLS over TCP.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// An open connection, buffered for reading.
pub type Conn = Raw<Box<dyn Io>>;

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
    Ok(Raw::with_capacity(io, 64 * 1024))
}

/// CONNECT, MQTT 3.1.1, clean session, keep alive 0 (no PINGREQ needed).
fn connect_packet(client_id: &str, username: Option<&str>, password: Option<&str>) -> Vec<u8> {
    let mut connect = wire::Connect::new(Version::V4, client_id).keep_alive(0);
    connect.username = username.map(|u| u.as_bytes().to_vec());
    connect.password = password.map(|p| p.as_bytes().to_vec());
    connect.encode()
}

/// QoS 0 PUBLISH.
pub fn publish_packet(topic: &str, payload: &[u8], retain: bool) -> Vec<u8> {
    wire::Publish::new(Version::V4, topic.as_bytes(), payload)
        .retain(retain)
        .encode()
}

/// SUBSCRIBE with one filter.
pub fn subscribe_packet(pkid: u16, filter: &str, qos: u8) -> Vec<u8> {
    wire::subscribe(Version::V4, pkid, &[(filter.as_bytes(), qos)])
}

/// Sends CONNECT and waits for the CONNACK; returns its return code (0 = accepted).
pub async fn login(
    conn: &mut Conn,
    client_id: &str,
    username: Option<&str>,
    password: Option<&str>,
) -> anyhow::Result<u8> {
    conn.write(&connect_packet(client_id, username, password))
        .await?;
    let connack = conn.read().await?;
    if connack.first != wire::first::CONNACK || connack.body.len() < 2 {
        bail!("expected CONNACK, got packet type {}", connack.first >> 4);
    }
    Ok(connack.body[1])
}

/// Subscribes to one filter and waits for its SUBACK; fails if the broker refused it.
pub async fn subscribe(conn: &mut Conn, filter: &str, qos: u8) -> anyhow::Result<()> {
    conn.write(&subscribe_packet(1, filter, qos)).await?;
    loop {
        let packet = conn.read().await?;
        if packet.first >> 4 == 9 {
            if packet.body.get(2).is_some_and(|&rc| rc >= 0x80) {
                bail!("subscription to {filter} refused");
            }
            return Ok(());
        }
    }
}
