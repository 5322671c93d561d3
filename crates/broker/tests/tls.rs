//! TLS and mTLS listeners with real certificates made in the test: pub/sub over TLS with
//! MQTT 3.1.1 and 5, TLS 1.2-only and 1.3-only handshakes, and client certificates as
//! identities (CN = username), with every way a certificate or CN can be wrong.

mod common;

use common::{suback4, V4_NO, V4_OK};
use moatmq_testkit::{v4, v5, Listener, Raw, TestBroker, TestCa};
use rumqttc::{QoS, TlsConfiguration, Transport};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use time::Duration;

/// rumqttc TLS transport trusting `ca`, optionally presenting a client certificate.
fn tls(ca: &TestCa, client: Option<&(PathBuf, PathBuf)>) -> Transport {
    let client_auth = client.map(|(crt, key)| {
        (
            std::fs::read(crt).expect("client cert"),
            std::fs::read(key).expect("client key"),
        )
    });
    Transport::Tls(TlsConfiguration::Simple {
        ca: ca.pem().as_bytes().to_vec(),
        alpn: None,
        client_auth,
    })
}

fn tls4(addr: SocketAddr, id: &str, t: Transport) -> v4::MqttOptions {
    let mut o = v4::options(addr, id);
    o.set_transport(t);
    o
}

fn tls5(addr: SocketAddr, id: &str, t: Transport) -> v5::MqttOptions {
    let mut o = v5::options(addr, id);
    o.set_transport(t);
    o
}

/// A broker with one TLS listener `tls`, anonymous, its certificate from `ca`.
async fn tls_anonymous(ca: &TestCa) -> TestBroker {
    TestBroker::builder()
        .listener(Listener::tcp("tls").set("allow_anonymous", true).tls())
        .server_cert(ca)
        .start()
        .await
}

#[tokio::test]
async fn tls_pubsub_v4_and_v5() {
    let ca = TestCa::new("server ca");
    let broker = tls_anonymous(&ca).await;
    let addr = broker.addr("tls");

    let mut sub4 = v4::connect(tls4(addr, "sub4", tls(&ca, None)))
        .await
        .expect("v4 over TLS");
    assert_eq!(suback4(&mut sub4, &["t/#"]).await, vec![V4_OK]);
    let mut sub5 = v5::connect(tls5(addr, "sub5", tls(&ca, None)))
        .await
        .expect("v5 over TLS");
    common::subscribed5(&mut sub5, "t/#").await;

    let pub5 = v5::connect(tls5(addr, "pub5", tls(&ca, None)))
        .await
        .unwrap();
    pub5.client
        .publish(
            "t/5",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            "from5",
        )
        .await
        .unwrap();
    assert_eq!(sub4.next_publish().await.payload, "from5".as_bytes());
    assert_eq!(&sub5.next_publish().await.payload[..], b"from5");

    let pub4 = v4::connect(tls4(addr, "pub4", tls(&ca, None)))
        .await
        .unwrap();
    pub4.client
        .publish("t/4", QoS::ExactlyOnce, false, "from4")
        .await
        .unwrap();
    assert_eq!(sub4.next_publish().await.payload, "from4".as_bytes());
    assert_eq!(&sub5.next_publish().await.payload[..], b"from4");
}

#[tokio::test]
async fn server_certificate_from_another_ca_is_not_trusted() {
    let ca = TestCa::new("server ca");
    let other = TestCa::new("someone else");
    let broker = tls_anonymous(&ca).await;
    let r = v4::connect(tls4(broker.addr("tls"), "c", tls(&other, None))).await;
    assert!(
        r.is_err(),
        "a client must not trust a server it has no CA for"
    );
}

#[tokio::test]
async fn plaintext_client_on_a_tls_listener_gets_nothing() {
    let ca = TestCa::new("server ca");
    let broker = tls_anonymous(&ca).await;
    let mut raw = Raw::tcp(broker.addr("tls")).await;
    let mut out = bytes::BytesMut::new();
    moatmq_testkit::connect4("plain").write(&mut out).unwrap();
    raw.send(&out).await;
    let got = raw
        .bytes_until_closed(moatmq_testkit::WAIT)
        .await
        .expect("the broker closes the connection");
    // At most a TLS alert (0x15), never a CONNACK (0x20).
    assert_ne!(
        got.first(),
        Some(&0x20),
        "no CONNACK to a plaintext CONNECT"
    );
}

/// Connects with only `version` enabled on the client and checks a CONNACK comes back.
async fn handshake_with(
    addr: SocketAddr,
    ca: &TestCa,
    version: &'static rustls::SupportedProtocolVersion,
) -> rustls::ProtocolVersion {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let der = rustls_pemfile::certs(&mut ca.pem().as_bytes())
        .next()
        .unwrap()
        .unwrap();
    roots.add(der).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.expect("handshake");
    let negotiated = tls.get_ref().1.protocol_version().expect("version");
    let mut out = bytes::BytesMut::new();
    moatmq_testkit::connect4("versioned")
        .write(&mut out)
        .unwrap();
    tls.write_all(&out).await.unwrap();
    let mut connack = [0u8; 4];
    tokio::time::timeout(moatmq_testkit::WAIT, tls.read_exact(&mut connack))
        .await
        .expect("CONNACK in time")
        .expect("CONNACK");
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00], "accepted");
    negotiated
}

#[tokio::test]
async fn tls12_only_and_tls13_only_clients_both_connect() {
    let ca = TestCa::new("server ca");
    let broker = tls_anonymous(&ca).await;
    let addr = broker.addr("tls");
    assert_eq!(
        handshake_with(addr, &ca, &rustls::version::TLS12).await,
        rustls::ProtocolVersion::TLSv1_2
    );
    assert_eq!(
        handshake_with(addr, &ca, &rustls::version::TLS13).await,
        rustls::ProtocolVersion::TLSv1_3
    );
}

struct Mtls {
    broker: TestBroker,
    server_ca: TestCa,
    client_ca: TestCa,
    certs: tempfile::TempDir,
}

impl Mtls {
    async fn start() -> Mtls {
        let server_ca = TestCa::new("server ca");
        let client_ca = TestCa::new("client ca");
        // The identity is the client certificate's CN; no password, no anonymous.
        let mtls = Listener::tcp("mtls")
            .tls()
            .tls_set("client_ca", "client-ca.crt")
            .tls_set("require_client_cert", true)
            .tls_set("identity", "cn");
        let broker = TestBroker::builder()
            .listener(mtls)
            .server_cert(&server_ca)
            .client_ca(&client_ca)
            .audit()
            .start()
            .await;
        Mtls {
            broker,
            server_ca,
            client_ca,
            certs: tempfile::tempdir().unwrap(),
        }
    }

    fn addr(&self) -> SocketAddr {
        self.broker.addr("mtls")
    }

    fn dir(&self) -> &Path {
        self.certs.path()
    }

    fn cert(&self, name: &str, cn: &str) -> Transport {
        let pair = self.client_ca.valid_client(self.dir(), name, cn);
        tls(&self.server_ca, Some(&pair))
    }
}

#[tokio::test]
async fn client_certificate_cn_is_the_identity() {
    let m = Mtls::start().await;
    let mut alice = v4::connect(tls4(m.addr(), "a1", m.cert("alice", "alice")))
        .await
        .expect("alice's certificate is accepted without a password");
    // Tenant isolation (no ACL file): the identity is "alice" exactly when alice/# is
    // granted and bob/# is not.
    let codes = suback4(&mut alice, &["alice/#", "bob/#"]).await;
    assert_eq!(codes, vec![V4_OK, V4_NO]);
    let bob = v5::connect(tls5(m.addr(), "b1", m.cert("bob", "bob")))
        .await
        .expect("bob over v5");
    bob.client
        .publish(
            "alice/x",
            rumqttc::v5::mqttbytes::QoS::AtMostOnce,
            false,
            "from bob",
        )
        .await
        .unwrap();
    alice
        .client
        .publish("alice/x", QoS::AtLeastOnce, false, "mine")
        .await
        .unwrap();
    let got = alice.next_publish().await;
    assert_eq!(got.payload, "mine".as_bytes(), "bob may not write alice/x");
    common::assert_quiet4(&mut alice).await;
}

#[tokio::test]
async fn missing_expired_not_yet_valid_and_foreign_certificates_fail() {
    let m = Mtls::start().await;
    let none = tls(&m.server_ca, None);
    assert!(v4::connect(tls4(m.addr(), "none", none)).await.is_err());

    let expired = m.client_ca.client(
        m.dir(),
        "expired",
        "alice",
        Duration::days(-30),
        Duration::days(-1),
    );
    let r = v4::connect(tls4(m.addr(), "exp", tls(&m.server_ca, Some(&expired)))).await;
    assert!(r.is_err(), "expired certificate accepted");

    let future = m.client_ca.client(
        m.dir(),
        "future",
        "alice",
        Duration::days(1),
        Duration::days(30),
    );
    let r = v5::connect(tls5(m.addr(), "fut", tls(&m.server_ca, Some(&future)))).await;
    assert!(r.is_err(), "not-yet-valid certificate accepted");

    let foreign_ca = TestCa::new("foreign ca");
    let foreign = foreign_ca.valid_client(m.dir(), "foreign", "alice");
    let r = v4::connect(tls4(m.addr(), "for", tls(&m.server_ca, Some(&foreign)))).await;
    assert!(r.is_err(), "certificate of a foreign CA accepted");

    // None of those were a CONNACK refusal: they failed in the handshake.
    let ok = v4::connect(tls4(m.addr(), "ok", m.cert("alice", "alice"))).await;
    assert!(ok.is_ok(), "a valid certificate still works afterwards");
}

#[tokio::test]
async fn cn_with_wildcards_or_separator_is_refused_v4() {
    let m = Mtls::start().await;
    for (name, cn) in [("plus", "+"), ("slash", "a/b")] {
        let r = v4::connect(tls4(m.addr(), name, m.cert(name, cn))).await;
        match r {
            Err(v4::ConnectionError::ConnectionRefused(code)) => {
                assert_eq!(code, rumqttc::ConnectReturnCode::NotAuthorized, "CN {cn}")
            }
            other => panic!("CN {cn}: expected CONNACK 0x05, got {:?}", other.err()),
        }
    }
}

#[tokio::test]
async fn cn_with_wildcards_or_separator_is_refused_v5() {
    use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as C5;
    let m = Mtls::start().await;
    for (name, cn) in [("hash", "#"), ("slash", "a/b")] {
        let r = v5::connect(tls5(m.addr(), name, m.cert(name, cn))).await;
        match r {
            Err(v5::ConnectionError::ConnectionRefused(code)) => {
                assert_eq!(code, C5::NotAuthorized, "CN {cn}")
            }
            other => panic!("CN {cn}: expected CONNACK 0x87, got {:?}", other.err()),
        }
    }
}

#[tokio::test]
async fn connect_username_must_equal_the_cn() {
    let m = Mtls::start().await;
    let mut o = tls4(m.addr(), "a1", m.cert("alice", "alice"));
    o.set_credentials("bob", "whatever");
    match v4::connect(o).await {
        Err(v4::ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, rumqttc::ConnectReturnCode::NotAuthorized)
        }
        other => panic!("expected CONNACK 0x05, got {:?}", other.err()),
    }
    // The refusal says why in the audit log (and the text log), not just "not authorized".
    let audit = std::fs::read_to_string(m.broker.path("audit.log")).expect("audit log");
    let failure: serde_json::Value = audit
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON line"))
        .find(|e| e["event"] == "auth_failure")
        .expect("an auth_failure event");
    assert_eq!(
        failure["reason"],
        r#"username "bob" differs from certificate CN "alice""#
    );
    let mut o = tls4(m.addr(), "a2", m.cert("alice2", "alice"));
    o.set_credentials("alice", "");
    let mut alice = v4::connect(o).await.expect("the CN as username is fine");
    assert_eq!(
        suback4(&mut alice, &["alice/#", "bob/#"]).await,
        vec![V4_OK, V4_NO]
    );
}
