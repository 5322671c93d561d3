//! MQTT 3.1.1 and 5 packets written byte by byte, for the tests, benchmarks and fuzz
//! harness that must send what a real client library will not (malformed lengths,
//! hostile field values) or cannot afford (thousands of logins).
//!
//! Written independently of rumqttd's encoder, so the broker's decoder is not only fed
//! what its own encoder produces. Standard library only: the fuzz harness includes this
//! file by path (`fuzz/src/main.rs`) without taking the test kit's dependencies.

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
        self.u16(s.len().min(65535) as u16);
        self.0.extend_from_slice(&s[..s.len().min(65535)]);
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
    /// The whole packet with this body.
    pub fn frame(&self, first: u8) -> Vec<u8> {
        frame(first, &self.0)
    }
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

/// A CONNECT, clean session: 3.1.1, or 5 with an empty properties block.
pub fn connect(
    v5: bool,
    client_id: &[u8],
    login: Option<(&[u8], &[u8])>,
    keep_alive: u16,
) -> Vec<u8> {
    let mut b = Body::default();
    b.str(b"MQTT").u8(if v5 { 5 } else { 4 });
    b.u8(0x02 | if login.is_some() { 0xC0 } else { 0 });
    b.u16(keep_alive);
    if v5 {
        b.props(&[]);
    }
    b.str(client_id);
    if let Some((user, password)) = login {
        b.str(user).str(password);
    }
    b.frame(0x10)
}

/// A 3.1.1 PUBLISH (packet id only at QoS 1 and 2).
pub fn publish(topic: &[u8], qos: u8, pkid: u16, payload: &[u8], retain: bool) -> Vec<u8> {
    let mut b = Body::default();
    b.str(topic);
    if qos > 0 {
        b.u16(pkid);
    }
    b.raw(payload);
    b.frame(0x30 | (qos << 1) | u8::from(retain))
}

/// A 3.1.1 SUBSCRIBE of `(filter, qos)` pairs.
pub fn subscribe(pkid: u16, filters: &[(&[u8], u8)]) -> Vec<u8> {
    let mut b = Body::default();
    b.u16(pkid);
    for (filter, qos) in filters {
        b.str(filter).u8(*qos);
    }
    b.frame(0x82)
}

/// DISCONNECT (3.1.1, or 5 with reason 0x00 implied).
pub const DISCONNECT: [u8; 2] = [0xE0, 0x00];

/// The remaining length announced at the start of `buf` and the size of the fixed
/// header, once both are there.
pub fn remaining_length(buf: &[u8]) -> Option<(usize, usize)> {
    let mut len = 0usize;
    for (i, byte) in buf.iter().skip(1).take(4).enumerate() {
        len |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((len, i + 2));
        }
    }
    None
}

/// The topic and payload of a 3.1.1 PUBLISH body (`first` its first byte).
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
    fn packets_match_the_specification_bytes() {
        assert_eq!(
            connect(false, b"c", None, 30),
            [0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 30, 0, 1, b'c']
        );
        assert_eq!(
            connect(true, b"c", None, 0)[1],
            14,
            "a properties byte more"
        );
        assert_eq!(
            publish(b"t", 1, 7, b"x", true),
            [0x33, 6, 0, 1, b't', 0, 7, b'x']
        );
        assert_eq!(
            subscribe(1, &[(b"a/#", 1)]),
            [0x82, 8, 0, 1, 0, 3, b'a', b'/', b'#', 1]
        );
        let big = frame(0x30, &[0; 200]);
        assert_eq!(remaining_length(&big), Some((200, 3)));
        assert_eq!(remaining_length(&[0x30, 0x80]), None, "length not complete");
        let p = publish(b"a/b", 1, 9, b"hi", false);
        let (len, at) = remaining_length(&p).unwrap();
        assert_eq!(
            publish_parts(p[0], &p[at..at + len]),
            Some((&b"a/b"[..], &b"hi"[..]))
        );
    }
}
