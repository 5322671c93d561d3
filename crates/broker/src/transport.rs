//! Byte transports under the gateway: plain TCP, TLS and WebSocket all look the same
//! to it, a reader that appends bytes to a buffer and a writer that writes them all.
//!
//! WebSocket frames are unwrapped here: binary messages carry MQTT bytes (a message may
//! hold part of a packet or several packets, as RFC 6455 and MQTT 5 section 6 allow);
//! text messages are a protocol error; pings are answered by tungstenite itself.

use bytes::BytesMut;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use std::io;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Any byte stream a listener accepted: TCP or TLS over TCP.
pub trait ByteStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> ByteStream for T {}

pub type BoxStream = Box<dyn ByteStream>;

/// Reading side of a connection.
pub enum Reader {
    /// Plain TCP: owned halves, no lock per read (tokio::io::split takes one).
    Tcp(OwnedReadHalf),
    Stream(ReadHalf<BoxStream>),
    Ws(SplitStream<WebSocketStream<BoxStream>>),
}

/// Writing side of a connection.
pub enum Writer {
    Tcp(OwnedWriteHalf),
    Stream(WriteHalf<BoxStream>),
    Ws(SplitSink<WebSocketStream<BoxStream>, Message>),
}

/// Splits a plain TCP connection.
pub fn split_tcp(tcp: TcpStream) -> (Reader, Writer) {
    let (r, w) = tcp.into_split();
    (Reader::Tcp(r), Writer::Tcp(w))
}

/// Splits a plain byte stream.
pub fn split_stream(stream: BoxStream) -> (Reader, Writer) {
    let (r, w) = tokio::io::split(stream);
    (Reader::Stream(r), Writer::Stream(w))
}

/// Splits an accepted WebSocket.
pub fn split_ws(ws: WebSocketStream<BoxStream>) -> (Reader, Writer) {
    let (w, r) = ws.split();
    (Reader::Ws(r), Writer::Ws(w))
}

/// The room a read gets: a busy client is read at least this much at a time, and a
/// buffer that fills with one large packet grows to twice its size.
const READ_ROOM: usize = 4096;

/// Gives `buf` room for the next read when little is left.
fn make_room(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < READ_ROOM / 4 {
        buf.reserve(READ_ROOM.max(buf.len()));
    }
}

impl Reader {
    /// Appends what arrives to `buf`; `Ok(0)` is end of stream. Cancel-safe.
    ///
    /// An idle connection waits without a buffer: plain TCP waits for the socket to be
    /// readable and only then gives an empty buffer its room; a TLS stream whose buffer
    /// was given back reads its first bytes into the few `read_buf` reserves, and gets
    /// its room from the next read on (docs/benchmarks.md, idle connections).
    pub async fn read(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            Reader::Tcp(r) => loop {
                r.readable().await?;
                make_room(buf);
                match r.try_read_buf(buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    read => return read,
                }
            },
            Reader::Stream(r) => {
                if buf.capacity() > 0 {
                    make_room(buf);
                }
                r.read_buf(buf).await
            }
            Reader::Ws(r) => loop {
                match r.next().await {
                    None => return Ok(0),
                    Some(Err(e)) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
                    Some(Ok(Message::Binary(data))) => {
                        if data.is_empty() {
                            continue;
                        }
                        buf.extend_from_slice(&data);
                        return Ok(data.len());
                    }
                    Some(Ok(Message::Close(_))) => return Ok(0),
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                    Some(Ok(Message::Text(_))) => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "text WebSocket message; MQTT needs binary messages",
                        ))
                    }
                }
            },
        }
    }

    /// Reads and drops what the client still sends after the broker closed its side,
    /// until the client closes too, `limit` bytes have come or `time` has passed.
    ///
    /// A TCP socket closed before the peer's last writes arrive (or with bytes unread)
    /// answers them with a reset (RFC 1122 4.2.2.13), and the peer's next write fails,
    /// possibly before it has read what was sent last.
    pub async fn drain(mut self, time: Duration, limit: usize) {
        let mut buf = BytesMut::new();
        let mut total = 0;
        let _ = tokio::time::timeout(time, async {
            while total < limit {
                buf.clear();
                match self.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => total += n,
                }
            }
        })
        .await;
    }
}

impl Writer {
    /// Writes all of `data` and flushes it.
    pub async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Writer::Tcp(w) => w.write_all(data).await,
            Writer::Stream(w) => {
                w.write_all(data).await?;
                w.flush().await
            }
            Writer::Ws(w) => w
                .send(Message::Binary(data.to_vec()))
                .await
                .map_err(|e| io::Error::new(io::ErrorKind::BrokenPipe, e)),
        }
    }

    /// Closes the connection politely (TLS close_notify, WebSocket close frame).
    pub async fn shutdown(&mut self) {
        match self {
            Writer::Tcp(w) => {
                let _ = w.shutdown().await;
            }
            Writer::Stream(w) => {
                let _ = w.shutdown().await;
            }
            Writer::Ws(w) => {
                let _ = w.close().await;
            }
        }
    }
}
