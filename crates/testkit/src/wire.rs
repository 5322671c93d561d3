//! MQTT 3.1.1 and 5 packets written byte by byte, and whole frames cut from a byte
//! stream. No dependencies beyond std, so the fuzz harness and the benchmarks use it too.
//!
//! Written independently of rumqttd's and rumqttc's encoders, so the broker's decoder is
//! not only fed what those produce. Nothing is validated: a field longer than its length
//! prefix allows is cut, a remaining length past 268,435,455 gets five bytes, and a test
//! may frame any body under any first byte, which is how malformed packets are written.

/// The protocol level a packet is written for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1.1 (protocol level 4).
    V4,
    /// MQTT 5: packets that have a properties block get an empty one.
    V5,
}

/// First bytes of the packets a client sends.
pub mod first {
    pub const CONNECT: u8 = 0x10;
    pub const CONNACK: u8 = 0x20;
    pub const PUBLISH: u8 = 0x30;
    pub const PUBACK: u8 = 0x40;
    pub const PUBREC: u8 = 0x50;
    pub const PUBREL: u8 = 0x62;
    pub const PUBCOMP: u8 = 0x70;
    pub const SUBSCRIBE: u8 = 0x82;
    pub const SUBACK: u8 = 0x90;
    pub const UNSUBSCRIBE: u8 = 0xA2;
    pub const UNSUBACK: u8 = 0xB0;
    pub const PINGREQ: u8 = 0xC0;
    pub const DISCONNECT: u8 = 0xE0;
}

/// Appends a variable byte integer (1 to 4 bytes; values past 268,435,455 get 5 bytes,
/// which is malformed on purpose).
pub fn varint(out: &mut Vec<u8>, mut v: usize) {
    loop {
        let mut b = (v % 128) as u8;
        v /= 128;
        if v > 0 {
            b |= 0x80;
        }
        out.push(b);
        if v == 0 {
            break;
        }
    }
}

/// A whole packet: first byte, remaining length, body.
pub fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(first);
    varint(&mut out, body.len());
    out.extend_from_slice(body);
    out
}

/// A packet body being written.
#[derive(Default)]
pub struct Body(pub Vec<u8>);

impl Body {
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// A u16-length-prefixed string or binary field (cut at 65,535 bytes).
    pub fn str(&mut self, s: &[u8]) -> &mut Self {
        let s = &s[..s.len().min(65535)];
        self.u16(s.len() as u16);
        self.0.extend_from_slice(s);
        self
    }
    pub fn raw(&mut self, s: &[u8]) -> &mut Self {
        self.0.extend_from_slice(s);
        self
    }
    /// MQTT 5 properties block: variable-byte length then the properties.
    pub fn props(&mut self, props: &[u8]) -> &mut Self {
        varint(&mut self.0, props.len());
        self.0.extend_from_slice(props);
        self
    }
    /// An empty properties block for MQTT 5, nothing for 3.1.1.
    fn no_props(&mut self, version: Version) -> &mut Self {
        if version == Version::V5 {
            self.props(&[]);
        }
        self
    }
}

/// A CONNECT: clean session, keep alive 30 s, no will, no login, until set otherwise.
#[derive(Clone, Debug)]
pub struct Connect {
    pub version: Version,
    pub client_id: Vec<u8>,
    pub clean: bool,
    pub keep_alive: u16,
    pub username: Option<Vec<u8>>,
    pub password: Option<Vec<u8>>,
    /// Will topic, payload, QoS and retain flag.
    pub will: Option<(Vec<u8>, Vec<u8>, u8, bool)>,
}

impl Connect {
    pub fn new(version: Version, client_id: impl AsRef<[u8]>) -> Connect {
        Connect {
            version,
            client_id: client_id.as_ref().to_vec(),
            clean: true,
            keep_alive: 30,
            username: None,
            password: None,
            will: None,
        }
    }

    /// Username and password.
    pub fn login(mut self, username: impl AsRef<[u8]>, password: impl AsRef<[u8]>) -> Self {
        self.username = Some(username.as_ref().to_vec());
        self.password = Some(password.as_ref().to_vec());
        self
    }

    pub fn keep_alive(mut self, seconds: u16) -> Self {
        self.keep_alive = seconds;
        self
    }

    pub fn will(mut self, topic: &[u8], payload: &[u8], qos: u8, retain: bool) -> Self {
        self.will = Some((topic.to_vec(), payload.to_vec(), qos, retain));
        self
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut flags = 0u8;
        if self.clean {
            flags |= 0x02;
        }
        if let Some((_, _, qos, retain)) = &self.will {
            flags |= 0x04 | (qos << 3) | if *retain { 0x20 } else { 0 };
        }
        if self.password.is_some() {
            flags |= 0x40;
        }
        if self.username.is_some() {
            flags |= 0x80;
        }
        let mut b = Body::default();
        b.str(b"MQTT");
        b.u8(match self.version {
            Version::V4 => 4,
            Version::V5 => 5,
        });
        b.u8(flags).u16(self.keep_alive).no_props(self.version);
        b.str(&self.client_id);
        if let Some((topic, payload, _, _)) = &self.will {
            b.no_props(self.version).str(topic).str(payload);
        }
        for field in [&self.username, &self.password].into_iter().flatten() {
            b.str(field);
        }
        frame(first::CONNECT, &b.0)
    }
}

/// A PUBLISH: QoS 0, not retained, until set otherwise.
#[derive(Clone, Debug)]
pub struct Publish<'a> {
    pub version: Version,
    pub topic: &'a [u8],
    pub payload: &'a [u8],
    pub qos: u8,
    /// Written only for QoS 1 and 2.
    pub pkid: u16,
    pub retain: bool,
}

impl<'a> Publish<'a> {
    pub fn new(version: Version, topic: &'a [u8], payload: &'a [u8]) -> Publish<'a> {
        Publish {
            version,
            topic,
            payload,
            qos: 0,
            pkid: 0,
            retain: false,
        }
    }

    pub fn qos(mut self, qos: u8, pkid: u16) -> Self {
        self.qos = qos;
        self.pkid = pkid;
        self
    }

    pub fn retain(mut self, retain: bool) -> Self {
        self.retain = retain;
        self
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Body(Vec::with_capacity(
            self.topic.len() + self.payload.len() + 5,
        ));
        b.str(self.topic);
        if self.qos > 0 {
            b.u16(self.pkid);
        }
        b.no_props(self.version).raw(self.payload);
        frame(
            first::PUBLISH | (self.qos << 1) | u8::from(self.retain),
            &b.0,
        )
    }
}

/// A SUBSCRIBE of `filters`, each with its options byte (the QoS, for 3.1.1).
pub fn subscribe(version: Version, pkid: u16, filters: &[(&[u8], u8)]) -> Vec<u8> {
    let mut b = Body::default();
    b.u16(pkid).no_props(version);
    for (filter, options) in filters {
        b.str(filter).u8(*options);
    }
    frame(first::SUBSCRIBE, &b.0)
}

/// An UNSUBSCRIBE of `filters`.
pub fn unsubscribe(version: Version, pkid: u16, filters: &[&[u8]]) -> Vec<u8> {
    let mut b = Body::default();
    b.u16(pkid).no_props(version);
    for filter in filters {
        b.str(filter);
    }
    frame(first::UNSUBSCRIBE, &b.0)
}

/// A PUBACK, PUBREC, PUBREL or PUBCOMP (`first` says which) with only a packet id, which
/// MQTT 5 reads as reason 0x00 without properties.
pub fn ack(first: u8, pkid: u16) -> Vec<u8> {
    frame(first, &pkid.to_be_bytes())
}

/// DISCONNECT without a reason (normal disconnection in both versions).
pub const DISCONNECT: [u8; 2] = [first::DISCONNECT, 0x00];

/// Where the next whole packet lies in `buf`: `Ok(Some((first, header_len, body_len)))`,
/// `Ok(None)` while more bytes are needed, `Err(Malformed)` for a remaining length of
/// more than four bytes.
pub fn cut(buf: &[u8]) -> Result<Option<(u8, usize, usize)>, Malformed> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let mut len = 0usize;
    for (i, &byte) in buf.iter().enumerate().skip(1) {
        if i > 4 {
            return Err(Malformed);
        }
        len |= usize::from(byte & 0x7f) << (7 * (i - 1));
        if byte & 0x80 == 0 {
            let header = i + 1;
            return Ok((buf.len() >= header + len).then_some((first, header, len)));
        }
    }
    Ok(None)
}

/// A remaining length of more than four bytes.
#[derive(Debug, PartialEq, Eq)]
pub struct Malformed;

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("malformed remaining length")
    }
}

impl std::error::Error for Malformed {}

/// The packet id of a QoS 1/2 PUBLISH (`first` its first byte), which follows its
/// topic; `None` for another packet or QoS 0.
pub fn publish_pkid(first: u8, body: &[u8]) -> Option<u16> {
    if first >> 4 != 3 || (first >> 1) & 3 == 0 || body.len() < 2 {
        return None;
    }
    let at = 2 + usize::from(u16::from_be_bytes([body[0], body[1]]));
    Some(u16::from_be_bytes([*body.get(at)?, *body.get(at + 1)?]))
}

/// The topic and payload of an MQTT 3.1.1 PUBLISH (`first` its first byte).
pub fn publish_parts(first: u8, body: &[u8]) -> Option<(&[u8], &[u8])> {
    if first >> 4 != 3 || body.len() < 2 {
        return None;
    }
    let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
    let qos = (first >> 1) & 3;
    let payload_at = 2 + topic_len + if qos > 0 { 2 } else { 0 };
    let topic = body.get(2..2 + topic_len)?;
    Some((topic, body.get(payload_at..)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_lengths_match_the_spec_table() {
        for (v, bytes) in [
            (0, &[0x00][..]),
            (127, &[0x7f]),
            (128, &[0x80, 0x01]),
            (16_383, &[0xff, 0x7f]),
            (16_384, &[0x80, 0x80, 0x01]),
            (268_435_455, &[0xff, 0xff, 0xff, 0x7f]),
            (268_435_456, &[0x80, 0x80, 0x80, 0x80, 0x01]),
        ] {
            let mut out = Vec::new();
            varint(&mut out, v);
            assert_eq!(out, bytes, "{v}");
        }
    }

    #[test]
    fn connect_v4_and_v5_with_login_and_will() {
        let c = Connect::new(Version::V4, "id").login("u", "p");
        assert_eq!(
            c.encode(),
            b"\x10\x14\0\x04MQTT\x04\xc2\0\x1e\0\x02id\0\x01u\0\x01p".to_vec()
        );
        let c = Connect::new(Version::V5, "id").will(b"w", b"x", 1, true);
        assert_eq!(
            c.encode(),
            b"\x10\x16\0\x04MQTT\x05\x2e\0\x1e\0\0\x02id\0\0\x01w\0\x01x".to_vec()
        );
    }

    #[test]
    fn publish_and_subscribe() {
        let p = Publish::new(Version::V4, b"a/b", b"hi")
            .qos(1, 7)
            .retain(true);
        assert_eq!(p.encode(), b"\x33\x09\0\x03a/b\0\x07hi".to_vec());
        let p = Publish::new(Version::V5, b"t", b"");
        assert_eq!(p.encode(), b"\x30\x04\0\x01t\0".to_vec());
        assert_eq!(
            subscribe(Version::V4, 1, &[(b"a/+", 1)]),
            b"\x82\x08\0\x01\0\x03a/+\x01".to_vec()
        );
        assert_eq!(
            unsubscribe(Version::V5, 2, &[b"x"]),
            b"\xa2\x06\0\x02\0\0\x01x".to_vec()
        );
    }

    #[test]
    fn cut_finds_whole_frames_only() {
        assert_eq!(cut(&[]), Ok(None));
        assert_eq!(cut(&[0x30]), Ok(None));
        assert_eq!(cut(&[0x30, 0x80]), Ok(None));
        assert_eq!(cut(&[0x30, 0x02, 0]), Ok(None));
        assert_eq!(cut(&[0x30, 0x02, 0, 0, 9]), Ok(Some((0x30, 2, 2))));
        assert_eq!(cut(&[0xC0, 0x00]), Ok(Some((0xC0, 2, 0))));
        assert_eq!(cut(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]), Err(Malformed));
        let big = frame(0x30, &[7; 200]);
        assert_eq!(cut(&big), Ok(Some((0x30, 3, 200))));
    }

    #[test]
    fn publish_parts_reads_topic_and_payload() {
        let p = Publish::new(Version::V4, b"t/1", b"pay").qos(2, 9).encode();
        let (first, header, len) = cut(&p).unwrap().unwrap();
        let body = &p[header..header + len];
        assert_eq!(publish_parts(first, body), Some((&b"t/1"[..], &b"pay"[..])));
        assert_eq!(publish_parts(0x40, body), None);
        assert_eq!(publish_pkid(first, body), Some(9));
        assert_eq!(publish_pkid(0x40, body), None, "not a PUBLISH");
        let q0 = Publish::new(Version::V4, b"t/1", b"pay").encode();
        let (first, header, len) = cut(&q0).unwrap().unwrap();
        assert_eq!(
            publish_pkid(first, &q0[header..header + len]),
            None,
            "QoS 0"
        );
    }
}
