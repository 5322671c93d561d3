//! Helpers shared by the broker's integration tests: a raw MQTT client over a plain
//! socket (for exact reason codes and bad input that rumqttc will not send or hides),
//! SUBACK waiting for the rumqttc clients, and config/password-file builders.
//!
//! Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use bytes::BytesMut;
use moatmq_testkit::{v4, v5, QUIET, WAIT};
use rumqttc::v5::mqttbytes::v5 as m5;
use rumqttc::v5::mqttbytes::QoS as Q5;
use rumqttc::QoS;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A client that writes bytes and decodes what comes back, with no protocol logic of its
/// own: it never answers, acknowledges or validates anything.
pub struct Raw {
    stream: TcpStream,
    buf: BytesMut,
}

impl Raw {
    pub async fn tcp(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).await.expect("tcp connect");
        Raw {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// Wraps a socket the test opened itself (bound source address, PROXY header sent).
    pub fn from_stream(stream: TcpStream) -> Raw {
        Raw {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// Writes bytes; an error (connection already closed by the broker) is ignored.
    pub async fn send(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
    }

    pub async fn send5(&mut self, packet: m5::Packet) {
        let mut out = BytesMut::new();
        packet.write(&mut out).expect("encode v5 packet");
        self.send(&out).await;
    }

    /// Reads more bytes into the buffer; `false` on end of stream, error or timeout.
    async fn fill(&mut self, deadline: tokio::time::Instant) -> bool {
        matches!(
            tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await,
            Ok(Ok(n)) if n > 0
        )
    }

    /// The next MQTT 5 packet within `wait`; `None` if the connection closed or nothing came.
    pub async fn next5(&mut self, wait: Duration) -> Option<m5::Packet> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match m5::Packet::read(&mut self.buf, None) {
                Ok(p) => return Some(p),
                Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("broker sent a malformed v5 packet: {e:?}"),
            }
            if !self.fill(deadline).await {
                return None;
            }
        }
    }

    /// The next MQTT 3.1.1 packet within `wait`; `None` if closed or nothing came.
    pub async fn next4(&mut self, wait: Duration) -> Option<rumqttc::Packet> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match rumqttc::mqttbytes::v4::read(&mut self.buf, 1 << 20) {
                Ok(p) => return Some(p),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("broker sent a malformed v4 packet: {e:?}"),
            }
            if !self.fill(deadline).await {
                return None;
            }
        }
    }

    /// Whether the broker closes the connection within `wait` (anything it sends first
    /// is discarded).
    pub async fn closed_within(&mut self, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => self.buf.clear(),
            }
        }
    }

    /// Everything the broker sends until it closes the connection; `None` if it is still
    /// open after `wait`.
    pub async fn bytes_until_closed(&mut self, wait: Duration) -> Option<Vec<u8>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => return None,
                Ok(Ok(0)) | Ok(Err(_)) => return Some(self.buf.split().to_vec()),
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Sends an MQTT 3.1.1 CONNECT and returns the CONNACK code (`None`: no CONNACK).
    pub async fn connect4(
        addr: SocketAddr,
        connect: rumqttc::mqttbytes::v4::Connect,
    ) -> (Raw, Option<rumqttc::ConnectReturnCode>) {
        let mut raw = Raw::tcp(addr).await;
        let mut out = BytesMut::new();
        connect.write(&mut out).expect("encode connect");
        raw.send(&out).await;
        let code = match raw.next4(WAIT).await {
            Some(rumqttc::Packet::ConnAck(ack)) => Some(ack.code),
            Some(other) => panic!("expected CONNACK, got {other:?}"),
            None => None,
        };
        (raw, code)
    }

    /// Sends an MQTT 5 CONNECT and returns the CONNACK code (`None`: no CONNACK).
    pub async fn connect5(
        addr: SocketAddr,
        connect: m5::Connect,
        will: Option<m5::LastWill>,
        login: Option<m5::Login>,
    ) -> (Raw, Option<m5::ConnectReturnCode>) {
        let mut raw = Raw::tcp(addr).await;
        raw.send5(m5::Packet::Connect(connect, will, login)).await;
        let code = match raw.next5(WAIT).await {
            Some(m5::Packet::ConnAck(ack)) => Some(ack.code),
            Some(other) => panic!("expected CONNACK, got {other:?}"),
            None => None,
        };
        (raw, code)
    }

    /// An accepted MQTT 5 connection with a username and password.
    pub async fn v5_login(addr: SocketAddr, id: &str, user: &str, pass: &str) -> Raw {
        let (raw, code) =
            Raw::connect5(addr, connect5(id), None, Some(m5::Login::new(user, pass))).await;
        assert_eq!(
            code,
            Some(m5::ConnectReturnCode::Success),
            "{user} connects"
        );
        raw
    }

    /// SUBSCRIBE (MQTT 5) to `filters` at QoS 1 and return the SUBACK's reason codes.
    pub async fn subscribe5(
        &mut self,
        pkid: u16,
        filters: &[&str],
    ) -> Vec<m5::SubscribeReasonCode> {
        let mut sub = m5::Subscribe::new_many(
            filters.iter().map(|f| m5::Filter::new(*f, Q5::AtLeastOnce)),
            None,
        );
        sub.pkid = pkid;
        self.send5(m5::Packet::Subscribe(sub)).await;
        loop {
            match self.next5(WAIT).await {
                Some(m5::Packet::SubAck(ack)) => {
                    assert_eq!(ack.pkid, pkid);
                    return ack.return_codes;
                }
                Some(_) => continue,
                None => panic!("no SUBACK"),
            }
        }
    }

    /// The next PUBLISH (MQTT 5) within `wait`, acknowledging QoS 1 ones.
    pub async fn publish5_within(&mut self, wait: Duration) -> Option<m5::Publish> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next5(left).await {
                Some(m5::Packet::Publish(p)) => {
                    if p.qos == Q5::AtLeastOnce {
                        let ack = m5::PubAck::new(p.pkid, None);
                        self.send5(m5::Packet::PubAck(ack)).await;
                    }
                    return Some(p);
                }
                Some(_) => continue,
                None => return None,
            }
        }
    }
}

/// An MQTT 5 CONNECT with a clean start and a 30 s keep alive.
pub fn connect5(id: &str) -> m5::Connect {
    m5::Connect {
        keep_alive: 30,
        client_id: id.to_string(),
        clean_start: true,
        properties: None,
    }
}

/// An MQTT 3.1.1 CONNECT with a clean session and a 30 s keep alive.
pub fn connect4(id: &str) -> rumqttc::mqttbytes::v4::Connect {
    let mut c = rumqttc::mqttbytes::v4::Connect::new(id);
    c.keep_alive = 30;
    c
}

/// Subscribes a 3.1.1 client and returns the SUBACK codes.
pub async fn suback4(c: &mut v4::Client, filters: &[&str]) -> Vec<rumqttc::SubscribeReasonCode> {
    let subs = filters
        .iter()
        .map(|f| rumqttc::SubscribeFilter::new(f.to_string(), QoS::AtLeastOnce));
    c.client
        .subscribe_many(subs)
        .await
        .expect("subscribe queued");
    c.incoming(|p| match p {
        rumqttc::Packet::SubAck(ack) => Some(ack.return_codes.clone()),
        _ => None,
    })
    .await
    .expect("SUBACK")
}

/// Subscribes a v5 rumqttc client to granted filters and waits for the SUBACK.
/// (rumqttc's v5 event loop ends on any refusal code: use [`Raw`] for refusals.)
pub async fn subscribed5(c: &mut v5::Client, filter: &str) {
    c.client
        .subscribe(filter, Q5::AtLeastOnce)
        .await
        .expect("subscribe queued");
    c.incoming(|p| matches!(p, m5::Packet::SubAck(_)).then_some(()))
        .await
        .expect("SUBACK");
}

/// The 3.1.1 SUBACK code for a granted QoS 1 subscription.
pub const V4_OK: rumqttc::SubscribeReasonCode =
    rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce);
/// The 3.1.1 SUBACK refusal (0x80).
pub const V4_NO: rumqttc::SubscribeReasonCode = rumqttc::SubscribeReasonCode::Failure;

/// Checks that the broker at `addr` still serves a well-behaved client end to end.
pub async fn assert_serving(addr: SocketAddr) {
    let mut sub = v4::connected(addr, "healthy-sub").await;
    let codes = suback4(&mut sub, &["health/#"]).await;
    assert_eq!(codes, vec![V4_OK]);
    let publ = v4::connected(addr, "healthy-pub").await;
    publ.client
        .publish("health/check", QoS::AtLeastOnce, false, "ok")
        .await
        .unwrap();
    assert_eq!(sub.next_publish().await.payload, "ok".as_bytes());
}

/// A password file with `user:password` pairs, hashed with Argon2id.
pub fn password_file(dir: &Path, users: &[(&str, &str)]) {
    let mut text = String::from("# test users\n");
    for (user, pass) in users {
        let hash = moatmq_auth::hash_password(pass.as_bytes()).expect("hash");
        text.push_str(&format!("{user}:{hash}\n"));
    }
    moatmq_testkit::write_file(dir, "passwd", &text);
}

/// Options for a 3.1.1 client with a username and password.
pub fn login4(addr: SocketAddr, id: &str, user: &str, pass: &str) -> v4::MqttOptions {
    let mut o = v4::options(addr, id);
    o.set_credentials(user, pass);
    o
}

/// Options for an MQTT 5 client with a username and password.
pub fn login5(addr: SocketAddr, id: &str, user: &str, pass: &str) -> v5::MqttOptions {
    let mut o = v5::options(addr, id);
    o.set_credentials(user, pass);
    o
}

/// Waits [`QUIET`] and asserts no PUBLISH arrived.
pub async fn assert_quiet4(c: &mut v4::Client) {
    if let Some(p) = c.publish_within(QUIET).await {
        panic!("unexpected delivery on {}: {:?}", p.topic, p.payload);
    }
}
