//! MQTT 3.1.1 / 5 packets written byte by byte: a generator of random packets (mostly
//! well-formed, with hostile field values: invalid UTF-8, NUL, wildcards, huge ids, wrong
//! lengths, unknown properties) and the well-formed packets of the seed corpus.
//!
//! The bytes are written with moatmq-testkit's `wire` module (written independently of
//! rumqttd's encoder, so the decoder is not only fed what its own encoder produces).

use moatmq_testkit::wire::{frame, varint, Body};
use rand::rngs::StdRng;
use rand::Rng;

/// Well-formed packets of every type a client sends, for the seed corpus, with a name.
pub fn valid_packets(v5: bool) -> Vec<(&'static str, Vec<u8>)> {
    let level = if v5 { 5 } else { 4 };
    let no_props = |b: &mut Body| {
        if v5 {
            b.props(&[]);
        }
    };
    let mut out = Vec::new();

    let mut b = Body::default();
    b.str(b"MQTT").u8(level).u8(0x02).u16(60);
    if v5 {
        // session expiry 0x11, receive maximum 0x21, user property 0x26
        let mut p = Body::default();
        p.u8(0x11)
            .u32(3600)
            .u8(0x21)
            .u16(10)
            .u8(0x26)
            .str(b"k")
            .str(b"v");
        b.props(&p.0);
    }
    b.str(b"client-1");
    out.push(("connect", frame(0x10, &b.0)));

    // will (flag 0x04, QoS 1 0x08, retain 0x20), username 0x80, password 0x40
    let mut b = Body::default();
    b.str(b"MQTT").u8(level).u8(0xEE).u16(30);
    no_props(&mut b);
    b.str(b"client-2");
    if v5 {
        let mut p = Body::default();
        p.u8(0x18).u32(5).u8(0x03).str(b"text/plain");
        b.props(&p.0);
    }
    b.str(b"will/topic")
        .str(b"gone")
        .str(b"alice")
        .str(b"secret");
    out.push(("connect-will-login", frame(0x10, &b.0)));

    let mut b = Body::default();
    b.str(b"a/b");
    no_props(&mut b);
    b.raw(b"hello");
    out.push(("publish-qos0", frame(0x30, &b.0)));

    let mut b = Body::default();
    b.str(b"sensors/1/temp").u16(7);
    if v5 {
        // payload format 0x01, message expiry 0x02, content type 0x03, response topic 0x08,
        // correlation data 0x09, user property 0x26
        let mut p = Body::default();
        p.u8(0x01).u8(1).u8(0x02).u32(60).u8(0x03).str(b"json");
        p.u8(0x08)
            .str(b"reply/here")
            .u8(0x09)
            .str(b"\x01\x02")
            .u8(0x26)
            .str(b"a")
            .str(b"b");
        b.props(&p.0);
    }
    b.raw(b"{\"t\":21.5}");
    out.push(("publish-qos1-retain", frame(0x33, &b.0)));

    let mut b = Body::default();
    b.str(b"x").u16(65535);
    no_props(&mut b);
    out.push(("publish-qos2-empty", frame(0x34, &b.0)));

    for (name, first) in [
        ("puback", 0x40),
        ("pubrec", 0x50),
        ("pubrel", 0x62),
        ("pubcomp", 0x70),
    ] {
        let mut b = Body::default();
        b.u16(1);
        if v5 {
            b.u8(0x00).props(&[]);
        }
        out.push((name, frame(first, &b.0)));
    }

    let mut b = Body::default();
    b.u16(2);
    no_props(&mut b);
    b.str(b"a/+/c").u8(0x01).str(b"d/#").u8(0x02);
    b.str(b"$share/g/e").u8(if v5 { 0x2c } else { 0x00 });
    out.push(("subscribe", frame(0x82, &b.0)));

    let mut b = Body::default();
    b.u16(3);
    no_props(&mut b);
    b.str(b"a/+/c").str(b"d/#");
    out.push(("unsubscribe", frame(0xA2, &b.0)));

    out.push(("pingreq", vec![0xC0, 0x00]));
    out.push(("disconnect", vec![0xE0, 0x00]));
    if v5 {
        let mut b = Body::default();
        b.u8(0x04);
        let mut p = Body::default();
        p.u8(0x11).u32(0);
        b.props(&p.0);
        out.push(("disconnect-with-will", frame(0xE0, &b.0)));
    }
    out
}

/// A random string field: usually a plausible topic or id, often hostile.
fn string(rng: &mut StdRng) -> Vec<u8> {
    match rng.gen_range(0..12) {
        0 => Vec::new(),
        1 => b"a/\xff\xfe/b".to_vec(), // invalid UTF-8
        2 => b"a\0b".to_vec(),         // NUL
        3 => b"a/#".to_vec(),          // wildcard
        4 => b"+/+/#".to_vec(),        // wildcards
        5 => "a/".repeat(rng.gen_range(1..200)).into_bytes(), // deep
        6 => vec![b'x'; rng.gen_range(0..4000)], // long
        7 => b"$SYS/broker/x".to_vec(),
        8 => b"$share/g/a/+".to_vec(),
        9 => (0..rng.gen_range(0..32)).map(|_| rng.gen()).collect(),
        10 => "\u{fffd}\u{1F600}/é".as_bytes().to_vec(),
        _ => format!("t/{}", rng.gen_range(0..100)).into_bytes(),
    }
}

/// A random MQTT 5 properties block: known property ids with values of the right shape,
/// sometimes unknown ids or wrong lengths.
fn properties(rng: &mut StdRng) -> Vec<u8> {
    let mut p = Body::default();
    for _ in 0..rng.gen_range(0..5) {
        let id: u8 = match rng.gen_range(0..20) {
            0 => rng.gen(),
            n => [
                0x01, 0x02, 0x03, 0x08, 0x09, 0x0B, 0x11, 0x12, 0x13, 0x15, 0x16, 0x17, 0x18, 0x19,
                0x1F, 0x21, 0x22, 0x23, 0x26,
            ][n as usize - 1],
        };
        p.u8(id);
        match id {
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => {
                p.u8(rng.gen());
            }
            0x13 | 0x21 | 0x22 | 0x23 => {
                p.u16(rng.gen());
            }
            0x02 | 0x11 | 0x18 | 0x27 => {
                p.u32(rng.gen());
            }
            0x0B => {
                let mut v = Vec::new();
                varint(&mut v, rng.gen_range(0..300_000_000));
                p.raw(&v);
            }
            0x26 => {
                p.str(&string(rng)).str(&string(rng));
            }
            _ => {
                p.str(&string(rng));
            }
        }
    }
    p.0
}

/// One random packet of any type, mostly with the right layout for its type.
pub fn random_packet(rng: &mut StdRng, v5: bool) -> Vec<u8> {
    let ty: u8 = rng.gen_range(0..16);
    let flags: u8 = if rng.gen_bool(0.8) {
        match ty {
            3 => rng.gen_range(0..16),
            6 | 8 | 10 => 2,
            _ => 0,
        }
    } else {
        rng.gen_range(0..16)
    };
    let maybe_props = |rng: &mut StdRng, b: &mut Body| {
        if v5 || rng.gen_bool(0.05) {
            let p = properties(rng);
            b.props(&p);
        }
    };
    let mut b = Body::default();
    match ty {
        1 => {
            let name: &[u8] = match rng.gen_range(0..6) {
                0 => b"MQIsdp",
                1 => b"MQT",
                _ => b"MQTT",
            };
            let level = if rng.gen_bool(0.9) {
                if v5 {
                    5
                } else {
                    4
                }
            } else {
                rng.gen()
            };
            let cflags: u8 = rng.gen();
            b.str(name).u8(level).u8(cflags).u16(rng.gen());
            maybe_props(rng, &mut b);
            b.str(&string(rng));
            if cflags & 0x04 != 0 {
                maybe_props(rng, &mut b);
                b.str(&string(rng)).str(&string(rng));
            }
            if cflags & 0x80 != 0 {
                b.str(&string(rng));
            }
            if cflags & 0x40 != 0 {
                b.str(&string(rng));
            }
        }
        3 => {
            b.str(&string(rng));
            if flags & 0x06 != 0 {
                b.u16(rng.gen());
            }
            maybe_props(rng, &mut b);
            let n = rng.gen_range(0..64);
            b.raw(&vec![b'p'; n]);
        }
        4..=7 => {
            b.u16(rng.gen());
            if v5 && rng.gen_bool(0.7) {
                b.u8(rng.gen());
                maybe_props(rng, &mut b);
            }
        }
        8 | 10 => {
            b.u16(rng.gen());
            maybe_props(rng, &mut b);
            for _ in 0..rng.gen_range(0..4) {
                b.str(&string(rng));
                if ty == 8 {
                    b.u8(rng.gen());
                }
            }
        }
        2 | 9 | 11 => {
            b.u16(rng.gen());
            maybe_props(rng, &mut b);
            b.u8(rng.gen());
        }
        14 if rng.gen_bool(0.5) => {
            b.u8(rng.gen());
            maybe_props(rng, &mut b);
        }
        12..=14 => {}
        _ => {
            let n = rng.gen_range(0..32);
            b.raw(&(0..n).map(|_| rng.gen()).collect::<Vec<u8>>());
        }
    }
    let first = (ty << 4) | flags;
    if rng.gen_bool(0.05) {
        // Announce a different length than the body has.
        let mut out = vec![first];
        varint(&mut out, rng.gen_range(0..b.0.len() + 8));
        out.extend_from_slice(&b.0);
        return out;
    }
    frame(first, &b.0)
}

/// One to three random packets in a row (what one socket read may hold).
pub fn random_stream(rng: &mut StdRng, v5: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..rng.gen_range(1..=3) {
        out.extend(random_packet(rng, v5));
    }
    out
}
