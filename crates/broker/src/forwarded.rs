//! The client address a trusted HTTP proxy names in a header (`[listener.forwarded]`),
//! for WebSocket listeners behind a tunnel such as cloudflared that cannot send the
//! PROXY protocol.
//!
//! The header is believed only when the TCP peer is one of `trusted_proxies`; from any
//! other peer it is ignored, so a client cannot pick its own address. `X-Forwarded-For`
//! is a list each proxy appends to: only its last entry, written by the trusted proxy
//! itself, is used (earlier entries are whatever the client sent). Any other header must
//! hold exactly one address. A missing or unreadable header leaves the proxy's address.

use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};
use tokio_tungstenite::tungstenite::http::HeaderMap;

/// A listener's `[listener.forwarded]`, parsed.
#[derive(Debug, Clone)]
pub struct ForwardedPolicy {
    header: String,
    /// `X-Forwarded-For`: take the last hop of a list.
    list: bool,
    proxies: Vec<IpNet>,
}

impl ForwardedPolicy {
    pub fn new(config: &moatmq_config::Forwarded) -> ForwardedPolicy {
        ForwardedPolicy {
            header: config.header.to_ascii_lowercase(),
            list: config.header.eq_ignore_ascii_case("x-forwarded-for"),
            proxies: config.proxies(),
        }
    }

    /// Whether the header of a connection from `peer` is believed.
    pub fn trusts(&self, peer: IpAddr) -> bool {
        let peer = match peer {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(peer, IpAddr::V4),
            v4 => v4,
        };
        self.proxies.iter().any(|net| net.contains(&peer))
    }

    /// The client address the header names, if it names one clearly.
    pub fn client_address(&self, headers: &HeaderMap) -> Option<IpAddr> {
        let mut values = headers.get_all(self.header.as_str()).iter();
        if self.list {
            // Each proxy appends; several header lines read as one list, in order.
            let last_line = values.next_back()?.to_str().ok()?;
            return parse_address(last_line.rsplit(',').next()?);
        }
        let value = values.next()?;
        if values.next().is_some() {
            return None; // two answers: believe neither
        }
        parse_address(value.to_str().ok()?)
    }
}

/// `203.0.113.7`, `2001:db8::1`, and the `ip:port` / `[v6]:port` forms some proxies write.
fn parse_address(text: &str) -> Option<IpAddr> {
    let text = text.trim();
    text.parse::<IpAddr>()
        .ok()
        .or_else(|| text.parse::<SocketAddr>().ok().map(|s| s.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::http::HeaderValue;

    fn policy(header: &str) -> ForwardedPolicy {
        ForwardedPolicy::new(&moatmq_config::Forwarded {
            header: header.into(),
            trusted_proxies: vec!["10.0.0.0/8".into(), "127.0.0.1".into()],
        })
    }

    /// Header lines as received, name and value.
    type Lines<'a> = &'a [(&'static str, &'static str)];

    fn headers(lines: Lines<'_>) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in lines {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn only_listed_proxies_are_trusted() {
        let p = policy("CF-Connecting-IP");
        assert!(p.trusts("10.9.8.7".parse().unwrap()));
        assert!(p.trusts("127.0.0.1".parse().unwrap()));
        assert!(p.trusts("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!p.trusts("127.0.0.2".parse().unwrap()));
        assert!(!p.trusts("192.0.2.1".parse().unwrap()));
    }

    /// Checks what a policy for `header` reads from each set of header lines.
    fn reads(header: &str, cases: &[(Lines<'_>, Option<&str>)]) {
        let p = policy(header);
        for (lines, expected) in cases {
            let expected = expected.map(|ip| ip.parse::<IpAddr>().unwrap());
            assert_eq!(p.client_address(&headers(lines)), expected, "{lines:?}");
        }
    }

    #[test]
    fn single_value_header() {
        reads(
            "CF-Connecting-IP",
            &[
                (
                    &[("cf-connecting-ip", " 203.0.113.7 ")],
                    Some("203.0.113.7"),
                ),
                (&[("CF-Connecting-IP", "2001:db8::1")], Some("2001:db8::1")),
                (&[], None),
                (&[("cf-connecting-ip", "nonsense")], None),
                (&[("cf-connecting-ip", "1.2.3.4, 5.6.7.8")], None),
                (
                    &[
                        ("cf-connecting-ip", "1.2.3.4"),
                        ("cf-connecting-ip", "5.6.7.8"),
                    ],
                    None,
                ),
            ],
        );
    }

    #[test]
    fn x_forwarded_for_uses_the_last_hop() {
        reads(
            "X-Forwarded-For",
            &[
                (
                    &[("x-forwarded-for", "198.51.100.1, 203.0.113.7")],
                    Some("203.0.113.7"),
                ),
                (
                    &[
                        ("x-forwarded-for", "198.51.100.1"),
                        ("x-forwarded-for", "203.0.113.8:4711"),
                    ],
                    Some("203.0.113.8"),
                ),
                (&[("x-forwarded-for", "1.2.3.4, garbage")], None),
            ],
        );
    }
}
