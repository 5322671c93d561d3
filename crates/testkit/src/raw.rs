//! A raw MQTT client over any byte stream: it writes the bytes it is given and reads
//! back whole frames ([`Frame`], cut by [`crate::wire::cut`]) or rumqttc-decoded packets,
//! all from one buffer. It has no protocol logic of its own: it never answers,
//! acknowledges or validates anything unless a method's name says so
//! ([`Raw::publish5_within`] acknowledges QoS 1). Tests use it for exact reason codes and
//! for bad input rumqttc will not send; the benchmarks for connections by the thousand.

use crate::wire::{self, Version};
use bytes::{Buf, BytesMut};
use rumqttc::v5::mqttbytes::v5 as m5;
use rumqttc::v5::mqttbytes::QoS as Q5;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// How long the connecting helpers wait for a CONNACK or SUBACK.
const ANSWER: Duration = Duration::from_secs(5);

/// One whole packet as the broker sent it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// The first byte: packet type and flags.
    pub first: u8,
    /// Everything after the remaining length.
    pub body: Vec<u8>,
}

/// A connection and what has been read from it but not yet taken.
pub struct Raw<S = TcpStream> {
    stream: S,
    buf: BytesMut,
    /// How much room one read makes in `buf`.
    read_size: usize,
}

impl Raw<TcpStream> {
    /// A TCP connection to `addr`; panics if it cannot be opened.
    pub async fn tcp(addr: SocketAddr) -> Raw {
        Raw::new(TcpStream::connect(addr).await.expect("tcp connect"))
    }

    /// A connection accepted with a hand-written CONNECT (clean session, keep alive
    /// 30 s); panics unless the CONNACK accepts it.
    pub async fn connected(addr: SocketAddr, version: Version, id: &str) -> Raw {
        Raw::accepted(addr, &wire::Connect::new(version, id))
            .await
            .0
    }

    /// A connection accepted with `connect`, and whether its CONNACK says session
    /// present; panics unless the CONNACK accepts it.
    pub async fn accepted(addr: SocketAddr, connect: &wire::Connect) -> (Raw, bool) {
        let mut raw = Raw::tcp(addr).await;
        raw.send(&connect.encode()).await;
        let connack = raw.frame_within(ANSWER).await.expect("CONNACK");
        assert_eq!(connack.first, wire::first::CONNACK);
        assert_eq!(connack.body[1], 0, "CONNACK refused");
        (raw, connack.body[0] & 1 == 1)
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
        let code = match raw.next4(ANSWER).await {
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
        let code = match raw.next5(ANSWER).await {
            Some(m5::Packet::ConnAck(ack)) => Some(ack.code),
            Some(other) => panic!("expected CONNACK, got {other:?}"),
            None => None,
        };
        (raw, code)
    }

    /// Sends an MQTT 5 CONNECT and returns the connection with its CONNACK; panics if
    /// none comes.
    pub async fn connack5(addr: SocketAddr, connect: m5::Connect) -> (Raw, m5::ConnAck) {
        let mut raw = Raw::tcp(addr).await;
        raw.send5(m5::Packet::Connect(connect, None, None)).await;
        match raw.next5(ANSWER).await {
            Some(m5::Packet::ConnAck(ack)) => (raw, ack),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// An accepted MQTT 5 connection with a username and password.
    pub async fn v5_login(addr: SocketAddr, id: &str, user: &str, pass: &str) -> Raw {
        let login = Some(m5::Login::new(user, pass));
        let (raw, code) = Raw::connect5(addr, connect5(id), None, login).await;
        assert_eq!(
            code,
            Some(m5::ConnectReturnCode::Success),
            "{user} connects"
        );
        raw
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Raw<S> {
    /// Wraps a stream opened elsewhere (a bound source address, a PROXY header already
    /// sent, TLS).
    pub fn new(stream: S) -> Raw<S> {
        Raw::with_capacity(stream, 16 * 1024)
    }

    /// Like [`Raw::new`], reading up to `read_size` bytes at a time (small for many idle
    /// connections, large for a stream of publishes).
    pub fn with_capacity(stream: S, read_size: usize) -> Raw<S> {
        Raw {
            stream,
            buf: BytesMut::with_capacity(read_size),
            read_size,
        }
    }

    /// Shuts the write side down (TCP FIN, TLS close_notify).
    pub async fn shutdown(&mut self) -> io::Result<()> {
        self.stream.shutdown().await
    }

    /// Writes and flushes `bytes`.
    pub async fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// Writes bytes; an error (connection already closed by the broker) is ignored.
    pub async fn send(&mut self, bytes: &[u8]) {
        let _ = self.write(bytes).await;
    }

    /// Encodes an MQTT 5 packet with rumqttc and sends it.
    pub async fn send5(&mut self, packet: m5::Packet) {
        let mut out = BytesMut::new();
        packet.write(&mut out).expect("encode v5 packet");
        self.send(&out).await;
    }

    /// Reads more bytes into the buffer; `Ok(false)` at the end of the stream.
    async fn fill(&mut self) -> io::Result<bool> {
        if self.buf.capacity() - self.buf.len() < self.read_size / 2 {
            self.buf.reserve(self.read_size);
        }
        Ok(self.stream.read_buf(&mut self.buf).await? > 0)
    }

    /// Like [`Self::fill`], `false` also on an error or at `deadline`.
    async fn fill_until(&mut self, deadline: Instant) -> bool {
        matches!(
            tokio::time::timeout_at(deadline, self.fill()).await,
            Ok(Ok(true))
        )
    }

    /// The next whole frame. Cancel-safe: what was read stays in the buffer. The end of
    /// the stream is `UnexpectedEof`, a remaining length over four bytes `InvalidData`.
    pub async fn read(&mut self) -> io::Result<Frame> {
        loop {
            let cut =
                wire::cut(&self.buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            if let Some((first, header, len)) = cut {
                self.buf.advance(header);
                let body = self.buf.split_to(len).to_vec();
                return Ok(Frame { first, body });
            }
            if !self.fill().await? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// The next whole frame within `wait`; `None` if the connection closed or nothing
    /// came. Panics on a malformed remaining length: the broker never sends one.
    pub async fn frame_within(&mut self, wait: Duration) -> Option<Frame> {
        match tokio::time::timeout(wait, self.read()).await {
            Ok(Ok(frame)) => Some(frame),
            Ok(Err(e)) if e.kind() == io::ErrorKind::InvalidData => {
                panic!("the broker sent a malformed frame: {e}")
            }
            Ok(Err(_)) | Err(_) => None,
        }
    }

    /// The next MQTT 5 packet within `wait`; `None` if the connection closed or nothing came.
    pub async fn next5(&mut self, wait: Duration) -> Option<m5::Packet> {
        let deadline = Instant::now() + wait;
        loop {
            match m5::Packet::read(&mut self.buf, None) {
                Ok(p) => return Some(p),
                Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("broker sent a malformed v5 packet: {e:?}"),
            }
            if !self.fill_until(deadline).await {
                return None;
            }
        }
    }

    /// The next MQTT 3.1.1 packet within `wait`; `None` if closed or nothing came.
    pub async fn next4(&mut self, wait: Duration) -> Option<rumqttc::Packet> {
        let deadline = Instant::now() + wait;
        loop {
            match rumqttc::mqttbytes::v4::read(&mut self.buf, 1 << 20) {
                Ok(p) => return Some(p),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("broker sent a malformed v4 packet: {e:?}"),
            }
            if !self.fill_until(deadline).await {
                return None;
            }
        }
    }

    /// Whether the broker closes the connection within `wait` (anything it sends first
    /// is discarded).
    pub async fn closed_within(&mut self, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        loop {
            self.buf.clear();
            match tokio::time::timeout_at(deadline, self.fill()).await {
                Err(_) => return false,
                Ok(Ok(false)) | Ok(Err(_)) => return true,
                Ok(Ok(true)) => {}
            }
        }
    }

    /// Everything the broker sends until it closes the connection; `None` if it is still
    /// open after `wait`.
    pub async fn bytes_until_closed(&mut self, wait: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.fill()).await {
                Err(_) => return None,
                Ok(Ok(false)) | Ok(Err(_)) => return Some(self.buf.split().to_vec()),
                Ok(Ok(true)) => {}
            }
        }
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
            match self.next5(ANSWER).await {
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
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
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

/// An MQTT 5 CONNECT (rumqttc's type) with a clean start and a 30 s keep alive.
pub fn connect5(id: &str) -> m5::Connect {
    m5::Connect {
        keep_alive: 30,
        client_id: id.to_string(),
        clean_start: true,
        properties: None,
    }
}

/// An MQTT 5 will (rumqttc's type) at QoS 1, not retained, published `delay` seconds
/// after its client leaves (will delay interval).
pub fn delayed_will5(topic: &str, payload: &str, delay: u32) -> m5::LastWill {
    let props = m5::LastWillProperties {
        delay_interval: Some(delay),
        payload_format_indicator: None,
        message_expiry_interval: None,
        content_type: None,
        response_topic: None,
        correlation_data: None,
        user_properties: Vec::new(),
    };
    m5::LastWill::new(
        topic,
        payload.to_string(),
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        false,
        Some(props),
    )
}

/// An MQTT 3.1.1 CONNECT (rumqttc's type) with a clean session and a 30 s keep alive.
pub fn connect4(id: &str) -> rumqttc::mqttbytes::v4::Connect {
    let mut c = rumqttc::mqttbytes::v4::Connect::new(id);
    c.keep_alive = 30;
    c
}
