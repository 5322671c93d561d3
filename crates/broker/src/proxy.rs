//! PROXY protocol v1 and v2 headers (HAProxy's spec), read on listeners with
//! `trust_proxy_protocol = true` so limits and audit see the client's address instead of
//! the tunnel's. Only there: on other listeners a client could forge its address.
//!
//! The header is read byte-exactly, never past its end, so TLS or MQTT bytes that follow
//! stay in the socket.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Why a PROXY header was refused (the connection is closed).
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("PROXY header: {0}")]
    Io(#[from] std::io::Error),
    #[error("missing PROXY protocol header")]
    Missing,
    #[error("PROXY v1 header too long")]
    TooLong,
    #[error("malformed PROXY {0} header")]
    Malformed(&'static str),
    #[error("PROXY {0}: {1}")]
    Field(&'static str, &'static str),
}

const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
const V1_MAX: usize = 107;
const V2_MAX_LEN: usize = 1024;

/// Reads a PROXY header; returns the source address it names, `None` for a LOCAL/UNKNOWN
/// header (health checks from the proxy itself): the socket's peer address applies then.
pub async fn read_header<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<SocketAddr>, ProxyError> {
    let mut start = [0u8; 12];
    r.read_exact(&mut start).await?;
    if start == V2_SIGNATURE {
        return read_v2(r).await;
    }
    if !start.starts_with(b"PROXY ") {
        return Err(ProxyError::Missing);
    }
    let mut line = start.to_vec();
    while !line.ends_with(b"\r\n") {
        if line.len() >= V1_MAX {
            return Err(ProxyError::TooLong);
        }
        let mut b = [0u8; 1];
        r.read_exact(&mut b).await?;
        line.push(b[0]);
    }
    parse_v1(&line[..line.len() - 2])
}

fn parse_v1(line: &[u8]) -> Result<Option<SocketAddr>, ProxyError> {
    let text =
        std::str::from_utf8(line).map_err(|_| ProxyError::Field("v1", "header is not ASCII"))?;
    let parts: Vec<&str> = text.split(' ').collect();
    match parts.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Ok(None),
        ["PROXY", fam @ ("TCP4" | "TCP6"), src, _dst, sport, _dport] => {
            let ip: IpAddr = src
                .parse()
                .map_err(|_| ProxyError::Field("v1", "bad source address"))?;
            if (*fam == "TCP4") != ip.is_ipv4() {
                return Err(ProxyError::Field("v1", "address family mismatch"));
            }
            let port: u16 = sport
                .parse()
                .map_err(|_| ProxyError::Field("v1", "bad source port"))?;
            Ok(Some(SocketAddr::new(ip, port)))
        }
        _ => Err(ProxyError::Malformed("v1")),
    }
}

async fn read_v2<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<SocketAddr>, ProxyError> {
    let mut head = [0u8; 4];
    r.read_exact(&mut head).await?;
    let (ver_cmd, family) = (head[0], head[1]);
    let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
    if ver_cmd >> 4 != 2 || len > V2_MAX_LEN {
        return Err(ProxyError::Malformed("v2"));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    if ver_cmd & 0x0f == 0 {
        return Ok(None); // LOCAL
    }
    match family >> 4 {
        1 if body.len() >= 12 => {
            let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            let port = u16::from_be_bytes([body[8], body[9]]);
            Ok(Some(SocketAddr::new(ip.into(), port)))
        }
        2 if body.len() >= 36 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&body[..16]);
            let port = u16::from_be_bytes([body[32], body[33]]);
            Ok(Some(SocketAddr::new(Ipv6Addr::from(octets).into(), port)))
        }
        0 => Ok(None),
        _ => Err(ProxyError::Field("v2", "unsupported address family")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn v1_and_v2_headers_leave_the_rest_unread() {
        let mut v1: &[u8] = b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 1883\r\nMQTT";
        let addr = read_header(&mut v1).await.unwrap();
        assert_eq!(addr, Some("203.0.113.7:40000".parse().unwrap()));
        assert_eq!(v1, b"MQTT");

        let mut bytes = V2_SIGNATURE.to_vec();
        bytes.extend([
            0x21, 0x11, 0, 12, 198, 51, 100, 9, 10, 0, 0, 1, 0x9c, 0x40, 0x07, 0x5b,
        ]);
        bytes.extend(b"rest");
        let mut v2: &[u8] = &bytes;
        let addr = read_header(&mut v2).await.unwrap();
        assert_eq!(addr, Some("198.51.100.9:40000".parse().unwrap()));
        assert_eq!(v2, b"rest");
    }

    #[tokio::test]
    async fn bad_headers_are_refused() {
        for bad in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            b"PROXY TCP4 nonsense 1 2 3\r\n",
            b"PROXY TCP4 ::1 ::1 1 2\r\n",
        ] {
            let mut r = bad;
            assert!(read_header(&mut r).await.is_err(), "{bad:?}");
        }
        let mut long = b"PROXY ".to_vec();
        long.extend([b'x'; 200]);
        let mut r: &[u8] = &long;
        assert!(read_header(&mut r).await.is_err());
    }
}
