//! A connection held while its publishes wait (the retained store's save, the session
//! store's commit at `autosave_interval = 0`, the cluster's transfer stream, which may
//! wait for as long as NATS is away), or while the packets it is owed wait for the
//! session store (`Gateway::saved_first`: on a cluster node a SUBACK waits for the
//! session's park in NATS), is still read, up to [`HELD_READ`] bytes, and its
//! PINGREQs answered: otherwise a client whose keep-alive is shorter than the wait
//! closes the connection itself (no PINGRESP) although nothing is wrong with it. What
//! else it sends stays in the buffer, undecoded, in order, until the wait is over
//! (decoding a SUBSCRIBE or a PUBLISH then would pass the held publishes).

use super::Close;
use crate::metrics::Metrics;
use crate::transport::{Reader, Writer};
use bytes::{Buf, BytesMut};
use std::future::Future;
use std::pin::Pin;

/// What a held connection reads at most before the wait ends: past it the client's
/// own TCP window holds it back (and a PINGREQ behind that is not seen).
pub(super) const HELD_READ: usize = 64 * 1024;

/// The PINGRESP packet.
pub(super) const PINGRESP: [u8; 2] = [0xD0, 0x00];

/// Waits for `wait`, reading the client meanwhile for its PINGREQs (answered at
/// once; the rest stays in `buf`, undecoded): what `wait` gave, and whether anything
/// else was read (to decode once the wait is over). A shutdown or a takeover ends the
/// wait first: nothing the wait was for has been written to the client yet.
pub(super) async fn read_while<T>(
    wait: impl Future<Output = T>,
    reader: &mut Reader,
    writer: &mut Writer,
    buf: &mut BytesMut,
    metrics: &Metrics,
    mut shutting_down: Pin<&mut impl Future>,
    mut replaced: Pin<&mut impl Future>,
) -> Result<(T, bool), Close> {
    tokio::pin!(wait);
    let read_before = buf.len();
    let mut scanned = 0;
    loop {
        tokio::select! {
            biased;
            done = &mut wait => return Ok((done, buf.len() != read_before)),
            _ = &mut shutting_down => return Err(Close::Shutdown),
            _ = &mut replaced => return Err(Close::Replaced),
            read = reader.read(buf), if buf.len() < HELD_READ => {
                match read {
                    Ok(0) => return Err(Close::ClientClosed),
                    Ok(n) => {
                        metrics.bytes_in.inc_by(n as u64);
                    }
                    Err(e) => return Err(Close::Network(e.to_string())),
                }
                for _ in 0..take_pingreqs(buf, &mut scanned) {
                    if let Err(e) = writer.write_all(&PINGRESP).await {
                        return Err(Close::Network(e.to_string()));
                    }
                }
            }
        }
    }
}

/// Takes every complete PINGREQ out of `buf` and says how many there were. The packets
/// before `*scanned` are known complete and not PINGREQs; it moves past those it reads.
/// A packet that is incomplete or whose length is malformed stops the scan: the decoder
/// deals with it once the wait is over.
pub(super) fn take_pingreqs(buf: &mut BytesMut, scanned: &mut usize) -> usize {
    let mut pings = 0;
    while let Some(rest) = buf.get(*scanned..).filter(|r| !r.is_empty()) {
        let Some((header, len)) = fixed_header(rest) else {
            break;
        };
        let Some(total) = header.checked_add(len).filter(|&t| t <= rest.len()) else {
            break;
        };
        if rest[0] == 0xC0 && len == 0 {
            let mut tail = buf.split_off(*scanned);
            tail.advance(2);
            buf.unsplit(tail);
            pings += 1;
        } else {
            *scanned += total;
        }
    }
    pings
}

/// The fixed header's length and the remaining length of the packet starting `bytes`;
/// `None` if it is not all there or longer than MQTT allows (4 length bytes).
fn fixed_header(bytes: &[u8]) -> Option<(usize, usize)> {
    let mut len = 0usize;
    for (i, &b) in bytes.iter().enumerate().skip(1).take(4) {
        len |= usize::from(b & 0x7f) << (7 * (i - 1));
        if b & 0x80 == 0 {
            return Some((i + 1, len));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const PING: [u8; 2] = [0xC0, 0x00];

    fn publish(payload: &[u8]) -> Vec<u8> {
        // QoS 0 PUBLISH to "t": topic length 2 bytes + "t" + payload.
        let mut p = vec![0x30, (3 + payload.len()) as u8, 0x00, 0x01, b't'];
        p.extend_from_slice(payload);
        p
    }

    #[test]
    fn pingreqs_anywhere_are_taken_the_rest_kept_in_order() {
        let mut bytes = PING.to_vec();
        bytes.extend(publish(b"one"));
        bytes.extend(PING);
        bytes.extend(publish(b"two"));
        bytes.extend(PING);
        let mut buf = BytesMut::from(&bytes[..]);
        let mut scanned = 0;
        assert_eq!(take_pingreqs(&mut buf, &mut scanned), 3);
        let mut rest = publish(b"one");
        rest.extend(publish(b"two"));
        assert_eq!(&buf[..], &rest[..]);
        assert_eq!(scanned, rest.len());
        // Nothing new: nothing more, nothing rescanned.
        assert_eq!(take_pingreqs(&mut buf, &mut scanned), 0);
    }

    #[test]
    fn an_incomplete_or_malformed_packet_stops_the_scan() {
        // A PUBLISH read in part: nothing to take yet.
        let whole = publish(b"payload");
        let mut buf = BytesMut::from(&whole[..5]);
        let mut scanned = 0;
        assert_eq!(take_pingreqs(&mut buf, &mut scanned), 0);
        assert_eq!(scanned, 0);
        // The rest of it and a PINGREQ arrive: the PINGREQ is taken, the PUBLISH kept.
        buf.extend_from_slice(&whole[5..]);
        buf.extend_from_slice(&PING);
        assert_eq!(take_pingreqs(&mut buf, &mut scanned), 1);
        assert_eq!(&buf[..], &whole[..]);
        // A length of five bytes is no MQTT length: left for the decoder to refuse.
        let mut buf = BytesMut::from(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01, 0xC0, 0x00][..]);
        let mut scanned = 0;
        assert_eq!(take_pingreqs(&mut buf, &mut scanned), 0);
        assert_eq!(buf.len(), 8);
        // A PINGREQ with a remaining length is not one: kept for the decoder.
        let mut buf = BytesMut::from(&[0xC0, 0x01, 0x00][..]);
        assert_eq!(take_pingreqs(&mut buf, &mut 0), 0);
        assert_eq!(buf.len(), 3);
    }
}
