//! MQTT framing helpers around `rumqttd::protocol`: which protocol version a CONNECT
//! speaks, and the publish header fields (QoS, packet id) that rumqttd keeps private.
//!
//! rumqttd's `Publish` hides `qos`, `pkid` and `dup`; its `serialize`/`deserialize`
//! pair is the public door. We read those fields from the wire bytes where we have them
//! and build publishes through `Publish::deserialize`.

use bytes::{BufMut, Bytes, BytesMut};
use rumqttd::protocol::{
    v4::V4, v5::V5, Disconnect, DisconnectReasonCode, Packet, Protocol, Publish, QoS,
};

/// The MQTT version a connection speaks, from its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V4,
    V5,
}

impl Version {
    /// The version as people write it: "3.1.1" or "5".
    pub fn name(self) -> &'static str {
        match self {
            Version::V4 => "3.1.1",
            Version::V5 => "5",
        }
    }
}

/// The codec for a protocol version.
pub fn codec_for(version: Version) -> Box<dyn Protocol + Send> {
    match version {
        Version::V4 => Box::new(V4),
        Version::V5 => Box::new(V5),
    }
}

/// What the first bytes of a connection say.
#[derive(Debug, PartialEq, Eq)]
pub enum FirstPacket {
    /// More bytes are needed.
    Incomplete,
    /// A CONNECT with this protocol level (4 = 3.1.1, 5 = 5.0, others unsupported).
    Connect { level: u8 },
    /// Not a CONNECT, or not MQTT at all.
    NotConnect,
}

/// Reads the protocol level of a CONNECT at the start of `buf` without consuming it.
pub fn first_packet(buf: &[u8]) -> FirstPacket {
    let Some(&first) = buf.first() else {
        return FirstPacket::Incomplete;
    };
    if first != 0x10 {
        return FirstPacket::NotConnect;
    }
    // Remaining length: 1 to 4 bytes.
    let mut i = 1;
    loop {
        match buf.get(i) {
            None => return FirstPacket::Incomplete,
            Some(b) if b & 0x80 == 0 => break,
            Some(_) if i == 4 => return FirstPacket::NotConnect,
            Some(_) => i += 1,
        }
    }
    let header = i + 1;
    // Protocol name (u16 length + bytes), then the level byte.
    let (Some(&hi), Some(&lo)) = (buf.get(header), buf.get(header + 1)) else {
        return FirstPacket::Incomplete;
    };
    let name_len = u16::from_be_bytes([hi, lo]) as usize;
    if name_len > 6 {
        return FirstPacket::NotConnect;
    }
    let name_end = header + 2 + name_len;
    let (Some(name), Some(&level)) = (buf.get(header + 2..name_end), buf.get(name_end)) else {
        return FirstPacket::Incomplete;
    };
    match name {
        b"MQTT" | b"MQIsdp" => FirstPacket::Connect { level },
        _ => FirstPacket::NotConnect,
    }
}

/// Refuses, before rumqttd sees them, packets its decoder would panic on. rumqttd 0.20's
/// MQTT 5 decoder reaches `unreachable!()` for a CONNACK or UNSUBACK with a body (found by
/// fuzz/, target mqtt_v5); a server never receives either, so both versions refuse them.
/// `Some(packet type)` means close the connection as malformed.
pub fn refuse_before_decode(buf: &[u8]) -> Option<u8> {
    let kind = buf.first()? >> 4;
    matches!(kind, 2 | 11).then_some(kind)
}

/// The reason code of an MQTT 5 DISCONNECT written without a property length
/// (`E0 01 rc`), which the specification allows and rumqttd does not decode.
pub fn short_v5_disconnect(buf: &[u8]) -> Option<u8> {
    match buf {
        [0xE0, 0x01, reason, ..] => Some(*reason),
        _ => None,
    }
}

/// The remaining length a packet's fixed header announces, once its bytes are there.
pub fn announced_length(buf: &[u8]) -> Option<usize> {
    let mut len = 0usize;
    for (i, b) in buf.iter().skip(1).take(4).enumerate() {
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some(len);
        }
    }
    None
}

/// QoS and packet id of a PUBLISH whose complete frame starts `frame`, read from the wire.
/// `None` if `frame` is not a well-formed PUBLISH header.
pub fn publish_header(frame: &[u8]) -> Option<(QoS, u16)> {
    let first = *frame.first()?;
    if first >> 4 != 3 {
        return None;
    }
    let qos = qos_bits(first)?;
    if qos == QoS::AtMostOnce {
        return Some((qos, 0));
    }
    let mut i = 1;
    while frame.get(i)? & 0x80 != 0 {
        i += 1;
        if i > 4 {
            return None;
        }
    }
    let topic_at = i + 1;
    let topic_len = u16::from_be_bytes([*frame.get(topic_at)?, *frame.get(topic_at + 1)?]) as usize;
    let pkid_at = topic_at + 2 + topic_len;
    let pkid = u16::from_be_bytes([*frame.get(pkid_at)?, *frame.get(pkid_at + 1)?]);
    Some((qos, pkid))
}

/// QoS and packet id of a decoded publish (rumqttd keeps them crate-private).
/// Serializes a copy of the header only: the payload is left out.
pub fn qos_and_pkid(publish: &Publish) -> (QoS, u16) {
    let mut head = publish.clone();
    head.payload = Bytes::new();
    let bytes = head.serialize();
    let qos = qos_bits(bytes[0]).unwrap_or(QoS::AtMostOnce);
    (qos, u16::from_be_bytes([bytes[1], bytes[2]]))
}

/// The QoS bits of a PUBLISH's first byte; `None` for the invalid value 3.
fn qos_bits(first: u8) -> Option<QoS> {
    match (first >> 1) & 0b11 {
        0 => Some(QoS::AtMostOnce),
        1 => Some(QoS::AtLeastOnce),
        2 => Some(QoS::ExactlyOnce),
        _ => None,
    }
}

/// Builds a publish for the router (no DUP, not retained: see [`clear_dup`]).
pub fn make_router_publish(topic: Bytes, payload: Bytes, qos: QoS, pkid: u16) -> Publish {
    publish_from(0b0011_0000 | ((qos as u8) << 1), topic, payload, pkid)
}

/// Builds a publish with the given QoS and packet id.
pub fn make_publish(topic: Bytes, payload: Bytes, qos: QoS, retain: bool, pkid: u16) -> Publish {
    make_publish_dup(topic, payload, qos, retain, pkid, false)
}

/// [`make_publish`] with the DUP flag: a message sent again after a reconnect.
pub fn make_publish_dup(
    topic: Bytes,
    payload: Bytes,
    qos: QoS,
    retain: bool,
    pkid: u16,
    dup: bool,
) -> Publish {
    publish_from(
        0b0011_0000 | (u8::from(dup) << 3) | retain as u8 | ((qos as u8) << 1),
        topic,
        payload,
        pkid,
    )
}

/// A publish from its first header byte, through rumqttd's public `deserialize`.
fn publish_from(header: u8, topic: Bytes, payload: Bytes, pkid: u16) -> Publish {
    let mut o = BytesMut::with_capacity(5 + topic.len() + payload.len());
    o.put_u8(header);
    o.put_u16(pkid);
    o.put_u16(topic.len() as u16);
    o.extend_from_slice(&topic);
    o.extend_from_slice(&payload);
    Publish::deserialize(o.freeze())
}

/// The DUP bit of a PUBLISH's first byte.
pub const DUP: u8 = 0b1000;

/// Clears the DUP bit of the PUBLISH at the start of `buf` (a complete or partial
/// frame): rumqttd's router keeps it and passes it to every forward, and a client's DUP
/// is not forwarded (MQTT-3.3.1-3). Other packets are left alone. (The QoS a message was
/// published at travels in its properties: `origin.rs`.)
pub fn clear_dup(buf: &mut [u8]) {
    if let Some(first) = buf.first_mut() {
        if *first >> 4 == 3 {
            *first &= !DUP;
        }
    }
}

/// Rewrites the encoded QoS 1/2 PUBLISH at `out[mark..]` (the last frame in `out`) as
/// QoS 0: the packet id goes, the remaining length shrinks by two, the DUP bit clears.
/// Returns false (and leaves `out` alone) if the frame does not parse.
pub fn downgrade_to_qos0(out: &mut BytesMut, mark: usize) -> bool {
    let frame = &out[mark..];
    let Some(&first) = frame.first() else {
        return false;
    };
    let Some(remaining) = announced_length(frame) else {
        return false;
    };
    let len_bytes = frame[1..].iter().take_while(|b| *b & 0x80 != 0).count() + 1;
    let body = 1 + len_bytes;
    let Some(topic_len) = frame
        .get(body..body + 2)
        .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    else {
        return false;
    };
    let pkid_at = body + 2 + topic_len;
    if remaining < 2 + topic_len + 2 || frame.len() != body + remaining {
        return false;
    }
    let mut rewritten = BytesMut::with_capacity(frame.len());
    rewritten.put_u8(first & !(DUP | 0b0110));
    let mut len = remaining - 2;
    loop {
        let byte = (len % 128) as u8;
        len /= 128;
        if len == 0 {
            rewritten.put_u8(byte);
            break;
        }
        rewritten.put_u8(byte | 0x80);
    }
    rewritten.extend_from_slice(&frame[body..pkid_at]);
    rewritten.extend_from_slice(&frame[pkid_at + 2..]);
    out.truncate(mark);
    out.extend_from_slice(&rewritten);
    true
}

/// Appends an MQTT 5 DISCONNECT with `reason` and no properties to `out`.
///
/// rumqttd 0.20's encoder gets this wrong both ways: without properties it writes
/// remaining length 1 followed by two bytes (reason and a property length 0), a malformed
/// frame whose stray 0x00 clients read as a packet of reserved type 0; with empty
/// properties it writes `E0 00`, dropping the reason. We take the reason byte from its
/// output (its reason-to-byte table is private) and frame it ourselves.
pub fn write_v5_disconnect(reason: DisconnectReasonCode, out: &mut BytesMut) {
    let mut scratch = BytesMut::with_capacity(4);
    let packet = Packet::Disconnect(
        Disconnect {
            reason_code: reason,
        },
        None,
    );
    match (V5.write(packet, &mut scratch), scratch.get(2)) {
        (Ok(_), Some(&code)) => out.extend_from_slice(&[0xE0, 0x02, code, 0x00]),
        // Normal disconnection: `E0 00`, which is well formed.
        _ => out.extend_from_slice(&[0xE0, 0x00]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v5_disconnect_carries_its_reason_in_a_well_formed_frame() {
        let mut out = BytesMut::new();
        write_v5_disconnect(DisconnectReasonCode::SessionTakenOver, &mut out);
        write_v5_disconnect(DisconnectReasonCode::ServerShuttingDown, &mut out);
        write_v5_disconnect(DisconnectReasonCode::NormalDisconnection, &mut out);
        assert_eq!(
            &out[..],
            &[0xE0, 0x02, 0x8E, 0x00, 0xE0, 0x02, 0x8B, 0x00, 0xE0, 0x00]
        );
    }

    #[test]
    fn detects_v4_and_v5_connect() {
        let v4 = [0x10, 0x0c, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60];
        assert_eq!(first_packet(&v4), FirstPacket::Connect { level: 4 });
        let mut v5 = v4;
        v5[8] = 5;
        assert_eq!(first_packet(&v5), FirstPacket::Connect { level: 5 });
        assert_eq!(first_packet(&v4[..5]), FirstPacket::Incomplete);
        assert_eq!(first_packet(&[0x30, 0]), FirstPacket::NotConnect);
        assert_eq!(first_packet(b"GET / HTTP/1.1"), FirstPacket::NotConnect);
        assert_eq!(
            first_packet(&[0x10, 0xff, 0xff, 0xff, 0xff, 0x01]),
            FirstPacket::NotConnect
        );
    }

    #[test]
    fn downgrade_keeps_topic_properties_and_payload() {
        use rumqttd::protocol::{v4::V4, v5::V5, Packet, Protocol, PublishProperties};
        for payload_len in [3usize, 200, 20_000] {
            let payload = Bytes::from(vec![9u8; payload_len]);
            let p = make_publish("a/b".into(), payload.clone(), QoS::AtLeastOnce, false, 7);
            // 3.1.1
            let mut out = BytesMut::from(&b"xx"[..]);
            V4.write(Packet::Publish(p.clone(), None), &mut out)
                .unwrap();
            assert!(downgrade_to_qos0(&mut out, 2));
            let mut frame = out.split_off(2);
            match V4.read_mut(&mut frame, usize::MAX).unwrap() {
                Packet::Publish(got, None) => {
                    assert_eq!(qos_and_pkid(&got).0, QoS::AtMostOnce);
                    assert_eq!(got.topic, "a/b");
                    assert_eq!(got.payload, payload);
                }
                other => panic!("{other:?}"),
            }
            // 5, with properties
            let props = PublishProperties {
                content_type: Some("t".into()),
                ..Default::default()
            };
            let mut out = BytesMut::new();
            V5.write(Packet::Publish(p, Some(props.clone())), &mut out)
                .unwrap();
            assert!(downgrade_to_qos0(&mut out, 0));
            match V5.read_mut(&mut out, usize::MAX).unwrap() {
                Packet::Publish(got, Some(got_props)) => {
                    assert_eq!(qos_and_pkid(&got).0, QoS::AtMostOnce);
                    assert_eq!(got.payload, payload);
                    assert_eq!(got_props.content_type, props.content_type);
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn clears_the_dup_bit_of_publishes_only() {
        for (before, after) in [(0x30, 0x30), (0x3A, 0x32), (0x3D, 0x35), (0x8A, 0x8A)] {
            let mut frame = [before, 0];
            clear_dup(&mut frame);
            assert_eq!(frame[0], after, "{before:#x}");
        }
    }

    #[test]
    fn announced_lengths() {
        assert_eq!(announced_length(&[0x10]), None);
        assert_eq!(announced_length(&[0x10, 0x0c]), Some(12));
        assert_eq!(
            announced_length(&[0x10, 0x80, 0x80, 0x80, 0x01]),
            Some(1 << 21)
        );
        assert_eq!(
            announced_length(&[0x10, 0xff, 0xff, 0xff, 0x7f]),
            Some(268_435_455)
        );
        assert_eq!(announced_length(&[0x10, 0xff, 0xff]), None);
    }

    #[test]
    fn publish_header_and_make_publish_agree() {
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
            let p = make_publish("a/b".into(), "xyz".into(), qos, true, 77);
            let (q, id) = qos_and_pkid(&p);
            assert_eq!(q, qos);
            assert_eq!(id, 77);
            assert!(p.retain);
        }
        // QoS 1, topic "a", pkid 0x0102, payload "x"
        let frame = [0x32, 6, 0, 1, b'a', 1, 2, b'x'];
        assert_eq!(publish_header(&frame), Some((QoS::AtLeastOnce, 0x0102)));
        assert_eq!(publish_header(&[0x36, 2]), None);
        assert_eq!(publish_header(&[0x32, 6, 0, 9]), None);
    }

    #[test]
    fn server_only_packets_are_refused_before_rumqttd() {
        // CONNACK and UNSUBACK with a body: rumqttd's v5 decoder panics on both.
        assert_eq!(refuse_before_decode(&[0x20, 2, 0, 0]), Some(2));
        assert_eq!(refuse_before_decode(&[0xB0, 2, 0, 1]), Some(11));
        assert_eq!(refuse_before_decode(&[0x30, 0]), None);
        assert_eq!(refuse_before_decode(&[]), None);
    }
}
